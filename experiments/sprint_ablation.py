"""The SANA-Sprint ablation on shapes: sCM only, LADD only, sCM + LADD, against their teacher.

    python -m experiments.sprint_ablation --teacher_workdir=workdirs/tiny_c8 --out=workdirs/sprint_ablation \
        [--steps=1500] [--num_fid=2000] [--set distill.some_field=value ...]

1. Three distillations (sanajax.training.sprint.distill, each in OUT/<variant>/, resumable: a killed
   driver restarted with the same command continues each run from its last checkpoint and skips
   finished ones): scm_ladd (the default, adv_lambda 0.5), scm_only (adv_lambda = 0: no
   discriminator pass is traced) and ladd_only (scm_lambda = 0: no teacher velocity, no JVP).
   The student config is configs/sprint_tiny.py with the teacher's architecture, text encoder,
   data and AE taken from the teacher's config.json (a teacher other than configs/tiny.py works
   unchanged); --set overrides come last.
2. Evaluation of the teacher (Flow-DPM-Solver, 20 steps, CFG 4.5: its training's final eval) and
   of each student with the sCM sampler at 1, 2 and 4 steps (embedded CFG 4.5). Each (model,
   sampler, steps) is sampled ONCE, in one Generator.generate call over the GenEval-lite prompts
   (eval.num_prompts held-out prompts, the teacher's final-eval set: its 240 images equal the
   teacher's samples/ images; --num_prompts asks for more) followed by the captions of the first num_fid held-out ("eval"
   split) data scenes; GenEval-lite scores the first part, FID-lite (sanajax.eval.fid_lite: Frechet
   distance of pooled frozen-AE-encoder features) compares the second part with those scenes'
   own images. Every row is cached in OUT/evals/ with the step of the checkpoint it was sampled
   from: a restart re-samples nothing, and a run continued with a larger --steps (the same command
   with the new --steps) is distilled further and its rows re-sampled.
3. OUT/ablation.json (every number, wall times, the targets of issue 5) and OUT/ablation.md (the
   table); a grid of the first 36 GenEval-lite samples per row in OUT/grids/.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import ast
import json
import os
import sys
import time
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image

from sanajax.cli import quiet_library_logs
from sanajax.data import shapes
from sanajax.data.sources import make_source
from sanajax.eval import fid_lite, geneval_lite
from sanajax.generation import Generator, make_grid
from sanajax.training.sprint import distill
from sanajax.training.sprint_config import check_teacher, student_config
from sanajax.workdir.checkpoint import latest_workdir_step
from sanajax.workdir.files import ae_workdir
from sanajax.workdir.loaders import load_ae, load_dit_params

# (name, overrides): the paper's ablation (Sprint Table: sCM only / LADD only / both).
VARIANTS = (
    ("scm_only", {"distill.adv_lambda": 0.0}),
    ("ladd_only", {"distill.scm_lambda": 0.0}),
    ("scm_ladd", {}),
)
STUDENT_STEPS = (1, 2, 4)
TEACHER_SAMPLER, TEACHER_STEPS, CFG = "flow_dpm", 20, 4.5
def parse_sets(items: Sequence[str]) -> dict:
  """["a.b=1e-4", "c=(0, 1)"] -> {"a.b": 1e-4, "c": (0, 1)} (Python literals, else strings)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set expects key=value, got {item!r}.")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def run_timed(run, config: ml_collections.ConfigDict, workdir: str, timing_file: str, seconds_key: str) -> dict:
  """run(config, workdir) (a trainer or distiller that resumes from its checkpoints) unless the workdir already
  holds config.train.num_steps; returns {seconds_key, "steps"}, the seconds summed over calls and kept in
  workdir/timing_file, so a driver restarted mid-run reports the whole run's time."""
  timing_path = os.path.join(workdir, timing_file)
  timing = {seconds_key: 0.0, "steps": 0}
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      timing = json.load(f)
  if (latest_workdir_step(workdir) or 0) >= config.train.num_steps:
    return timing
  start = time.perf_counter()
  run(config, workdir)
  timing[seconds_key] += time.perf_counter() - start
  timing["steps"] = int(config.train.num_steps)
  with open(timing_path, "w") as f:
    json.dump(timing, f, indent=2)
  return timing


def run_distillation(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils (or resumes, or skips a finished run); returns {"distill_seconds", "steps"} summed over calls."""
  return run_timed(distill, config, workdir, "ablation_timing.json", "distill_seconds")


def fid_set(source: str, resolution: int, num: int, seed: int) -> tuple[list[str], np.ndarray]:
  """Captions and uint8 images of the first `num` held-out scenes (split "eval", never trained on)."""
  src = make_source(source, resolution, seed, split="eval")
  captions, images = [], []
  for i in range(num):
    item = src[i]
    captions.append(item["captions"][0])  # The full scene description (the others are partial).
    images.append(item["image"])
  return captions, np.stack(images)


def evaluate_row(generator, *, sampler: str, steps: int, seed: int, eval_set, fid_captions, real_features,
                 ae_model, ae_params, grid_path: str) -> dict:
  """GenEval-lite and FID-lite of one (model, sampler, steps) from one sampling pass."""
  prompts = [p for p, _ in eval_set]
  start = time.perf_counter()
  images = generator.generate(prompts + list(fid_captions), sampler=sampler, steps=steps, cfg=CFG, seed=seed)
  seconds = time.perf_counter() - start
  gen, fid_images = images[:len(prompts)], images[len(prompts):]
  result = geneval_lite.evaluate(gen, prompts, [c for _, c in eval_set])
  fd = fid_lite.frechet_distance(fid_lite.encoder_features(ae_model, ae_params, fid_images), real_features)
  os.makedirs(os.path.dirname(grid_path), exist_ok=True)
  Image.fromarray(make_grid(gen[:36])).save(grid_path)
  return {"sampler": sampler, "steps": steps, "cfg": CFG, "geneval_overall": float(result["overall"]),
          "geneval": {k: v["rate"] for k, v in result["categories"].items()}, "fid_lite": float(fd),
          "num_geneval": len(prompts), "num_fid": len(fid_captions), "sampling_seconds": seconds}


def run(teacher_workdir: str, out: str, *, steps: int | None = None, num_fid: int = 2000, overrides: dict | None = None,
        variants: Sequence[str] | None = None, num_prompts: int | None = None) -> dict:
  """The whole ablation (see the module docstring); returns what ablation.json holds.

  num_prompts: GenEval-lite prompts per row (None: the teacher's eval.num_prompts, its final-eval set;
  more give a tighter estimate, e.g. 960: +-0.015 instead of +-0.03 at a score of 0.6).
  """
  try:
    teacher_config = check_teacher(teacher_workdir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"--teacher_workdir: {e}") from None
  if not teacher_config.data.source.startswith("shapes"):
    raise SystemExit(f"GenEval-lite needs the shapes data; the teacher trained on {teacher_config.data.source!r}.")
  if num_fid < 2:
    raise SystemExit("--num_fid must be at least 2 (a covariance per set).")
  overrides = overrides or {}
  chosen = [(n, o) for n, o in VARIANTS if variants is None or n in variants]
  os.makedirs(out, exist_ok=True)
  timings = {}
  for name, variant in chosen:
    config = student_config(teacher_config, teacher_workdir, steps, {**variant, **overrides})
    print(f"=== {name}: distilling {config.train.num_steps} steps into {os.path.join(out, name)}", flush=True)
    timings[name] = run_distillation(config, os.path.join(out, name))
    steps = int(config.train.num_steps)  # what ablation.json records (the config's when --steps is not given)

  seed = int(teacher_config.get("seed", 0))
  eval_set = shapes.eval_prompt_set(int(num_prompts or teacher_config.eval.num_prompts), seed=seed)
  ae_model, ae_params, _, _ = load_ae(ae_workdir(teacher_config, teacher_workdir))
  fid_captions, real_images = fid_set(teacher_config.data.source, teacher_config.data.resolution, num_fid, seed)
  real_features = fid_lite.encoder_features(ae_model, ae_params, real_images)
  models = [("teacher", teacher_workdir, ((TEACHER_SAMPLER, TEACHER_STEPS),))]
  models += [(n, os.path.join(out, n), tuple(("scm", k) for k in STUDENT_STEPS)) for n, _ in chosen]
  rows = []
  generators = {}
  for name, workdir, settings in models:
    loaded = False
    step = latest_workdir_step(workdir)
    for sampler, k in settings:
      cache = os.path.join(out, "evals", f"{name}_{sampler}{k}.json")
      row = {}
      if os.path.exists(cache):
        with open(cache) as f:
          row = json.load(f)
      # A cached row is reused only for the same checkpoint (a run continued with a larger --steps
      # is re-sampled) and the same sample counts.
      if (row.get("checkpoint_step") != step or row.get("num_fid") != num_fid
          or row.get("num_geneval") != len(eval_set)):
        if not loaded:
          generator = load_generator(generators, "teacher" if name == "teacher" else "student", workdir)
          loaded = True
        row = evaluate_row(generator, sampler=sampler, steps=k, seed=seed, eval_set=eval_set,
                           fid_captions=fid_captions, real_features=real_features, ae_model=ae_model,
                           ae_params=ae_params, grid_path=os.path.join(out, "grids", f"{name}_{sampler}{k}.png"))
        row["model"] = name
        row["checkpoint_step"] = step
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w") as f:
          json.dump(row, f, indent=2)
      print(f"{name} {sampler}-{k}: GenEval-lite {row['geneval_overall']:.3f}, FID-lite {row['fid_lite']:.3f} "
            f"({row['sampling_seconds']:.1f} s)", flush=True)
      rows.append(row)

  result = {"teacher_workdir": os.path.abspath(teacher_workdir), "distill_steps": steps, "num_fid": num_fid,
            "overrides": {k: repr(v) for k, v in overrides.items()}, "timings": timings, "rows": rows,
            "targets": targets(rows)}
  with open(os.path.join(out, "ablation.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown_table(rows, timings)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(table)
  print(table, flush=True)
  return result


def load_generator(generators: dict, kind: str, workdir: str):
  """The Generator of `workdir`'s EMA weights. All students share one architecture, so they share one
  Generator (its jitted sampling is compiled once per step count, not once per student): the
  weights are swapped in."""
  if kind not in generators:
    generators[kind] = Generator.from_workdir(workdir)
    return generators[kind]
  generator = generators[kind]
  generator.dit_params = generator.plan.place(load_dit_params(workdir, ema=True))
  return generator


def targets(rows: list[dict]) -> dict:
  """Issue 5's targets for the sCM + LADD student: 1 step within 0.05 of the teacher, 4 steps >= it."""
  score = {(r["model"], r["steps"]): r["geneval_overall"] for r in rows}
  teacher = score.get(("teacher", TEACHER_STEPS))
  one, four = score.get(("scm_ladd", 1)), score.get(("scm_ladd", 4))
  if teacher is None or one is None or four is None:
    return {}
  return {"teacher": teacher, "one_step": one, "four_step": four,
          "one_step_within_0.05": bool(one >= teacher - 0.05), "four_step_at_least_teacher": bool(four >= teacher)}


def markdown_table(rows: list[dict], timings: dict) -> str:
  cats = list(rows[0]["geneval"])
  head = ["model", "sampler", "GenEval-lite", *cats, "FID-lite", "sampling s", "distill s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t = timings.get(r["model"], {}).get("distill_seconds")
    sampler = f"{'DPM' if r['sampler'] == 'flow_dpm' else 'sCM'}-{r['steps']}"
    lines.append("| " + " | ".join([r["model"], sampler, f"{r['geneval_overall']:.3f}",
                                    *(f"{r['geneval'][c]:.3f}" for c in cats), f"{r['fid_lite']:.3f}",
                                    f"{r['sampling_seconds']:.1f}", "" if t is None else f"{t:.0f}"]) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher_workdir", required=True, help="A sanajax.train workdir (config.json + checkpoints).")
  parser.add_argument("--out", required=True, help="Where the three student workdirs and the results go.")
  parser.add_argument("--steps", type=int, default=None,
                      help="Distillation steps per variant (default configs/sprint_tiny.py's train.num_steps).")
  parser.add_argument("--num_fid", type=int, default=2000, help="Samples (and data images) for FID-lite.")
  parser.add_argument("--num_prompts", type=int, default=None,
                      help="GenEval-lite prompts per row (default: the teacher's eval.num_prompts, 240 for tiny).")
  parser.add_argument("--variants", default=",".join(n for n, _ in VARIANTS), help="Comma-separated subset.")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="Student config override, e.g. --set train.learning_rate=5e-4 (all variants).")
  args = parser.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = set(variants) - {n for n, _ in VARIANTS}
  if unknown:
    raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {[n for n, _ in VARIANTS]}.")
  quiet_library_logs()
  run(args.teacher_workdir, args.out, steps=args.steps, num_fid=args.num_fid, overrides=parse_sets(args.set),
      variants=variants, num_prompts=args.num_prompts)
  return 0


if __name__ == "__main__":
  sys.exit(main())
