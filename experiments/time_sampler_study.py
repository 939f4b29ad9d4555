"""SD3's training-time sampler comparison on shapes, at equal compute, on the tiny MM-DiT (issue 28).

    python -m experiments.time_sampler_study --out=workdirs/time_samplers --ae_workdir=workdirs/mmdit_tiny/ae \
        [--steps=1500] [--checkpoint_every=250] [--plot=docs/images/time_samplers.png] [--set k=v ...]

1. Four runs of configs/mmdit_tiny.py (sanajax.training.dit.train, each in OUT/<sampler>/) that differ only
   in config.diffusion.weighting: logit_normal (mean 0, std 1), mode (scale 1.29), cosmap and uniform (SD3,
   arXiv:2403.03206, section 3.1; flow.sample_time). Same seed (so the same initialisation, data order and
   noise draws), same steps and batch: equal compute. The AE is shared (--ae_workdir, read only; without it
   one AE is trained into OUT/ae by the first run). Every --checkpoint_every steps a checkpoint is kept;
   the runs' own end-of-training evaluation is off (this driver scores every checkpoint instead).
   Resumable: a killed driver restarted with the same command continues each run from its last checkpoint
   and skips finished ones.
2. For every kept checkpoint of every run, with the EMA weights:
   a. the validation loss: the flow-matching loss on held-out data (the first --num_val scenes of the shapes
      "eval" split, never trained on, AE-encoded once, captioned with their full scene description) at a
      FIXED grid of --num_times evenly spaced flow times t_k = (k + 1/2) / K, with the same noise for every
      run. It is a function of (params, data, t grid) only, so it compares the samplers on equal terms,
      unlike each run's training loss, which is weighted by its own time density;
   b. GenEval-lite on the held-out prompts (the runs' sampler: DPM-20, CFG 4.5 on the default's guidance
      interval): --num_prompts at intermediate checkpoints, --final_prompts at the last (the first
      --num_prompts of those are the intermediate set, so the curve uses them at every step).
   Each row is cached in OUT/evals/<sampler>_<step>.json: a restart re-scores nothing.
3. OUT/study.json (every number, wall times), OUT/study.md (the table) and the plot (--plot, default
   OUT/time_samplers.png): validation loss and GenEval-lite against step, one line per sampler.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from experiments.sprint_ablation import fid_set, parse_sets, run_timed
from sanajax import config_utils
from sanajax.cli import quiet_library_logs
from sanajax.data import shapes
from sanajax.data.pipeline import uint8_to_unit
from sanajax.diffusion import flow
from sanajax.eval import geneval_lite
from sanajax.generation import Generator
from sanajax.models.backbones import apply_conditioned
from sanajax.training.dit import make_encode_fn, train
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import checkpoint_dir, load_workdir_config
from sanajax.workdir.loaders import init_dit_params

matplotlib.use("Agg")  # Files only: no display on training machines.
import matplotlib.pyplot as plt  # after the backend is chosen

CONFIG = "configs/mmdit_tiny.py"
# (name, overrides): SD3's four samplers with its settings (arXiv:2403.03206, section 3.1 and Table 1:
# logit-normal lognorm(0, 1), mode(1.29), CosMap, uniform). Nothing else differs between the runs.
SAMPLERS = (
    ("logit_normal", {"diffusion.weighting": "logit_normal", "diffusion.logit_mean": 0.0, "diffusion.logit_std": 1.0}),
    ("mode", {"diffusion.weighting": "mode", "diffusion.mode_scale": 1.29}),
    ("cosmap", {"diffusion.weighting": "cosmap"}),
    ("uniform", {"diffusion.weighting": "uniform"}),
)
STUDY_FIELDS = ("diffusion.weighting", "diffusion.logit_mean", "diffusion.logit_std", "diffusion.mode_scale")
COLORS = {"logit_normal": "C0", "mode": "C1", "cosmap": "C2", "uniform": "C3"}


def study_config(name: str, *, steps: int | None, checkpoint_every: int, ae_workdir: str,
                 overrides: dict | None = None) -> ml_collections.ConfigDict:
  """configs/mmdit_tiny.py with sampler `name`'s time weighting, checkpoints every `checkpoint_every` steps
  all kept, no end-of-training evaluation extras, the shared AE, then --set `overrides` (all runs)."""
  overrides = dict(overrides or {})
  base = {"ae.workdir": os.path.abspath(ae_workdir), "eval.euler_steps": 0, "eval.restoration_t0": 0.0,
          "train.checkpoint_every": int(checkpoint_every)}
  if steps is not None:
    base["train.num_steps"] = int(steps)
  config = config_utils.load_config(CONFIG, overrides={**base, **overrides, **dict(SAMPLERS)[name]})
  # Every checkpoint is scored, so none may be deleted (the final step is saved too).
  config.train.keep_checkpoints = math.ceil(config.train.num_steps / config.train.checkpoint_every) + 1
  return config


def run_training(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes, or skips a finished run); returns {"train_seconds", "steps"} summed over calls. No
  evaluate callback: every checkpoint is scored by score_checkpoint."""
  return run_timed(train, config, workdir, "study_timing.json", "train_seconds")


def time_grid(num_times: int) -> np.ndarray:
  """K evenly spaced flow times t_k = (k + 1/2) / K in (0, 1), float32 (K,): the midpoints of K equal bins."""
  return ((np.arange(num_times) + 0.5) / num_times).astype(np.float32)


def validation_set(generator: Generator, config: ml_collections.ConfigDict, num: int, num_times: int,
                   seed: int = 0) -> dict:
  """The held-out data every checkpoint is scored on, built once.

  The first `num` scenes of the shapes "eval" split (never trained on), AE-encoded as training encodes
  ((raw - ae_shift) * ae_scaling), captioned with their full scene description and text-encoded; and
  the noise for each time of the grid, drawn from `seed` alone (the same for every run).
  Returns {"latents": (N, h, w, C), "context": (N, L, D), "mask": (N, L), "times": (K,),
  "noise": (K, N, h, w, C)}, float32 (mask int32).
  """
  captions, images = fid_set(config.data.source, int(config.data.resolution), num, int(config.seed))
  raw = make_encode_fn(generator.ae_model, generator.ae_params)(uint8_to_unit(images))
  latents = (jnp.asarray(raw, jnp.float32) - generator.ae_shift) * generator.ae_scaling
  ids, mask = generator.text.tokenize(captions)
  context = generator.text.embed(generator.text_params, jnp.asarray(ids), jnp.asarray(mask))
  keys = jax.random.split(jax.random.PRNGKey(seed), num_times)
  noise = jnp.stack([jax.random.normal(k, latents.shape, jnp.float32) for k in keys])
  return {"latents": latents, "context": context, "mask": jnp.asarray(mask), "times": jnp.asarray(time_grid(num_times)),
          "noise": noise}


@functools.partial(jax.jit, static_argnums=0)
def _loss_at(dit, params, latents, context, mask, noise, t):
  """The flow-matching loss (float32 scalar) of the whole set at one time t (a scalar)."""
  tt = jnp.full((latents.shape[0],), t, jnp.float32)
  pred = apply_conditioned(dit, {"params": params}, flow.interpolate(latents, noise, tt), tt, context, mask)
  return flow.flow_matching_loss(pred, flow.velocity_target(latents, noise))


def validation_loss(dit, params, val: dict) -> np.ndarray:
  """The per-time validation losses (K,) float64 of `params` on a validation_set: the mean squared error of
  the predicted velocity at each time of the fixed grid. A function of (params, data, times, noise) only:
  nothing of a run's time sampler enters it."""
  return np.array([float(_loss_at(dit, params, val["latents"], val["context"], val["mask"], val["noise"][k], t))
                   for k, t in enumerate(val["times"])])


def checkpoint_params(workdir: str, config: ml_collections.ConfigDict, step: int):
  """The EMA DiT parameters of `workdir`'s checkpoint at `step` (read only)."""
  abstract = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
  return Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract, ema=True, step=step)


def score_checkpoint(generator: Generator, val: dict, params, config, num_prompts: int, curve_prompts: int) -> dict:
  """Validation loss and GenEval-lite (the config's sampler, steps and CFG; its guidance interval) of one
  checkpoint's EMA params. geneval_curve: GenEval-lite of the first `curve_prompts` prompts (a prefix of the
  same balanced set), what the curve plots at every step."""
  per_t = validation_loss(generator.dit, params, val)
  generator.dit_params = generator.plan.place(params)
  prompt_set = shapes.eval_prompt_set(num_prompts, seed=int(config.seed))
  prompts, cats = [p for p, _ in prompt_set], [c for _, c in prompt_set]
  start = time.perf_counter()
  images = generator.generate(prompts, sampler=config.sample.sampler, steps=int(config.sample.steps),
                              cfg=float(config.sample.cfg), seed=int(config.seed))
  seconds = time.perf_counter() - start
  result = geneval_lite.evaluate(images, prompts, cats)
  curve = result if curve_prompts >= num_prompts else geneval_lite.evaluate(
      images[:curve_prompts], prompts[:curve_prompts], cats[:curve_prompts])
  return {"val_loss": float(per_t.mean()), "val_loss_per_t": [float(v) for v in per_t],
          "geneval_overall": float(result["overall"]),
          "geneval": {k: v["rate"] for k, v in result["categories"].items()},
          "geneval_curve": float(curve["overall"]), "num_prompts": num_prompts, "curve_prompts": curve_prompts,
          "sampling_seconds": seconds}


def run(out: str, *, ae_workdir: str | None = None, steps: int | None = None, checkpoint_every: int = 250,
        num_prompts: int = 120, final_prompts: int = 240, num_val: int = 256, num_times: int = 8,
        overrides: dict | None = None, samplers: Sequence[str] | None = None, plot: str | None = None) -> dict:
  """The whole study (see the module docstring); returns what study.json holds."""
  overrides = dict(overrides or {})
  fixed = sorted(set(overrides) & set(STUDY_FIELDS))
  if fixed:
    raise SystemExit(f"--set {fixed[0]}: the time sampler is what the study varies; drop it from --set.")
  if checkpoint_every < 1 or num_prompts < 1 or final_prompts < num_prompts or num_val < 1 or num_times < 1:
    raise SystemExit("--checkpoint_every, --num_prompts, --num_val and --num_times must be >= 1, and "
                     "--final_prompts >= --num_prompts.")
  chosen = [n for n, _ in SAMPLERS if samplers is None or n in samplers]
  os.makedirs(out, exist_ok=True)
  ae_dir = ae_workdir or os.path.join(out, "ae")  # without one: trained once, by the first run, and shared
  configs = {n: study_config(n, steps=steps, checkpoint_every=checkpoint_every, ae_workdir=ae_dir,
                             overrides=overrides) for n in chosen}
  if not str(configs[chosen[0]].data.source).startswith("shapes"):
    raise SystemExit(f"GenEval-lite needs the shapes data, not data.source={configs[chosen[0]].data.source!r}.")
  num_steps = int(configs[chosen[0]].train.num_steps)

  generator, val, rows, timings = None, None, [], {}
  for name in chosen:
    config, workdir = configs[name], os.path.join(out, name)
    print(f"=== {name}: training {num_steps} steps into {workdir}", flush=True)
    timings[name] = run_training(config, workdir)
    if generator is None:  # one Generator (one compiled sampler) for all runs: the same architecture
      generator = Generator.from_workdir(workdir)
    saved = load_workdir_config(workdir)
    for step in Checkpointer(checkpoint_dir(workdir), read_only=True).all_steps():
      n = final_prompts if step == num_steps else num_prompts
      cache = os.path.join(out, "evals", f"{name}_{step}.json")
      row = {}
      if os.path.exists(cache):
        with open(cache) as f:
          row = json.load(f)
      if (row.get("num_prompts"), row.get("curve_prompts"), row.get("num_val"), row.get("num_times")) != (
          n, num_prompts, num_val, num_times):
        if val is None:
          val = validation_set(generator, saved, num_val, num_times)
        row = score_checkpoint(generator, val, checkpoint_params(workdir, saved, step), saved, n, num_prompts)
        row.update(sampler=name, step=int(step), num_val=num_val, num_times=num_times)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w") as f:
          json.dump(row, f, indent=2)
      print(f"{name} step {step}: val loss {row['val_loss']:.4f}, GenEval-lite {row['geneval_overall']:.3f} "
            f"on {row['num_prompts']} prompts ({row['sampling_seconds']:.1f} s)", flush=True)
      rows.append(row)

  result = {"config": CONFIG, "steps": num_steps, "checkpoint_every": checkpoint_every,
            "ae_workdir": os.path.abspath(ae_dir), "num_val": num_val, "times": [float(t) for t in time_grid(num_times)],
            "num_prompts": num_prompts, "final_prompts": final_prompts,
            "overrides": {k: repr(v) for k, v in overrides.items()}, "timings": timings, "rows": rows}
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown_table(result)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(table)
  print(table, flush=True)
  write_plot(rows, plot or os.path.join(out, "time_samplers.png"), num_prompts=num_prompts)
  return result


def final_rows(result: dict) -> dict:
  """{sampler: the row of its last step}."""
  last = {}
  for r in result["rows"]:
    if r["step"] >= last.get(r["sampler"], {}).get("step", -1):
      last[r["sampler"]] = r
  return last


def markdown_table(result: dict) -> str:
  """Per sampler at the last step: GenEval-lite (final prompts) and its categories, validation loss (mean and
  at the lowest / middle / highest grid time), the best 120-prompt score on the way, training time."""
  rows = final_rows(result)
  times = result["times"]
  cats = list(next(iter(rows.values()))["geneval"])
  picks = sorted({0, len(times) // 2, len(times) - 1})
  head = ["sampler", "GenEval-lite", *cats, "val loss", *(f"val t={times[k]:.3g}" for k in picks),
          f"GenEval-lite per step ({result['num_prompts']} prompts)", "train s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in rows.items():
    curve = " / ".join(f"{x['geneval_curve']:.2f}" for x in sorted(
        (x for x in result["rows"] if x["sampler"] == name), key=lambda x: x["step"]))
    seconds = result["timings"].get(name, {}).get("train_seconds")
    lines.append("| " + " | ".join([name, f"{r['geneval_overall']:.3f}", *(f"{r['geneval'][c]:.3f}" for c in cats),
                                    f"{r['val_loss']:.4f}", *(f"{r['val_loss_per_t'][k]:.4f}" for k in picks), curve,
                                    "" if seconds is None else f"{seconds:.0f}"]) + " |")
  steps = sorted({r["step"] for r in result["rows"]})
  lines.append("")
  lines.append(f"{result['steps']} steps each; GenEval-lite on {result['final_prompts']} held-out prompts at the last "
               f"step; per-step curve at steps {', '.join(map(str, steps))}; validation loss: {result['num_val']} "
               f"held-out scenes at t = {', '.join(f'{t:.3g}' for t in times)} (mean over the grid), EMA weights.")
  return "\n".join(lines) + "\n"


def write_plot(rows: list[dict], path: str, *, num_prompts: int) -> str:
  """Two panels against training step, one line per sampler: validation loss, GenEval-lite (curve prompts)."""
  fig, (ax_loss, ax_gen) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
  for name in dict.fromkeys(r["sampler"] for r in rows):
    mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["step"])
    steps = [r["step"] for r in mine]
    color = COLORS.get(name)
    ax_loss.plot(steps, [r["val_loss"] for r in mine], marker="o", color=color, label=name)
    ax_gen.plot(steps, [r["geneval_curve"] for r in mine], marker="o", color=color, label=name)
  ax_loss.set_ylabel("validation loss (8 fixed t, held-out scenes)")
  ax_gen.set_ylabel(f"GenEval-lite ({num_prompts} held-out prompts)")
  for ax in (ax_loss, ax_gen):
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Tiny MM-DiT on shapes: SD3's training-time samplers at equal compute")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="Where the four run workdirs and the results go.")
  parser.add_argument("--ae_workdir", default=None,
                      help="A trained AE workdir all runs share, read only (default: OUT/ae, trained by the first run).")
  parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default the config's train.num_steps).")
  parser.add_argument("--checkpoint_every", type=int, default=250, help="Steps between the scored checkpoints.")
  parser.add_argument("--num_prompts", type=int, default=120, help="GenEval-lite prompts at intermediate checkpoints.")
  parser.add_argument("--final_prompts", type=int, default=240, help="GenEval-lite prompts at the last step.")
  parser.add_argument("--num_val", type=int, default=256, help="Held-out scenes of the validation loss.")
  parser.add_argument("--num_times", type=int, default=8, help="Flow times of the validation loss's fixed grid.")
  parser.add_argument("--samplers", default=",".join(n for n, _ in SAMPLERS), help="Comma-separated subset.")
  parser.add_argument("--plot", default=None, help="The plot's path (default OUT/time_samplers.png).")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="Config override for every run, e.g. --set train.batch_size=16.")
  args = parser.parse_args(argv)
  samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
  unknown = set(samplers) - {n for n, _ in SAMPLERS}
  if unknown or not samplers:
    raise SystemExit(f"--samplers: unknown {sorted(unknown)}; choose from {[n for n, _ in SAMPLERS]}.")
  if args.ae_workdir and not os.path.isdir(args.ae_workdir):
    raise SystemExit(f"--ae_workdir {args.ae_workdir!r} does not exist; give a trained AE workdir or leave it out.")
  quiet_library_logs()
  run(args.out, ae_workdir=args.ae_workdir, steps=args.steps, checkpoint_every=args.checkpoint_every,
      num_prompts=args.num_prompts, final_prompts=args.final_prompts, num_val=args.num_val, num_times=args.num_times,
      overrides=parse_sets(args.set), samplers=samplers, plot=args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
