"""GenEval-lite and CPU latency of a trained workdir's DiT at float32, bfloat16 and the qwix quantization modes.

    python -m experiments.quantization_table --workdir=workdirs/tiny_default --out=workdirs/quantize/tiny_default
    python -m experiments.quantization_table --workdir=SPRINT_DIR --out=OUT --sampler=scm --steps=1,2

For each precision the held-out GenEval-lite prompts are sampled and scored by the evaluation training
ends with (sanajax.eval.after_training.evaluate: same prompts, seed, sampler and table), into a copy of
the workdir's config.json beside symlinks to its checkpoints (the trained workdir stays read-only):
OUT/<precision>/geneval_lite_<sampler><steps>.json and samples_<sampler><steps>/.
  fp32          the workdir as trained (model.dtype float32 for the tiny configs).
  bf16          model.dtype bfloat16 (compute in bf16, float32 reductions; the weights cast per matmul).
  int8, int8_dynamic, fp8   Generator(quantize=MODE) on the float32 model (sanajax.models.quantize).
Latency: after the evaluation (so compiled), one more batch of --latency_batch prompts is sampled
--latency_repeats times; the best wall time and the process CPU time of that run, per image, are
recorded (CPU time is steadier on a shared machine); and the mean |pixel - fp32 pixel| of the
evaluation's images (same prompts and noise), in uint8 levels. Writes OUT/quantization_table.json and prints a table.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import json
import os
import time
from typing import Sequence

import numpy as np

from sanajax.cli import quiet_library_logs
from sanajax.data.shapes import eval_prompt_set
from sanajax.eval import after_training, geneval_lite
from sanajax.generation import Generator
from sanajax.models.quantize import MODES
from sanajax.workdir.files import CONFIG_FILE, load_model_workdir_config, load_workdir_config

PRECISIONS = ("fp32", "bf16", *MODES[1:])


def precision_workdir(workdir: str, out: str, precision: str) -> str:
  """OUT/<precision>: config.json (model.dtype bfloat16 for bf16) and symlinks to the workdir's checkpoints
  and AE, so the evaluation writes its samples there and not into the trained workdir."""
  config = load_workdir_config(workdir)
  if precision == "bf16":
    config.model.dtype = "bfloat16"
  target = os.path.join(out, precision)
  os.makedirs(target, exist_ok=True)
  with open(os.path.join(target, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  for name in ("checkpoints", "ae", "text", "tokenizer"):
    src, dst = os.path.join(os.path.abspath(workdir), name), os.path.join(target, name)
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(src, dst)
  return target


def latency(generator: Generator, prompts: list[str], *, sampler: str, steps: int, cfg: float, repeats: int) -> dict:
  """Best-of-`repeats` wall and process CPU seconds per image for one compiled batch of `prompts`."""
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    generator.generate(prompts, sampler=sampler, steps=steps, cfg=cfg, batch_size=len(prompts))
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  n = len(prompts)
  return {"wall_s_per_image": min(walls) / n, "cpu_s_per_image": min(cpus) / n, "batch": n, "repeats": repeats}


def pixel_delta(out: str, precision: str, tag: str, num: int) -> float | None:
  """Mean |image - fp32 image| in uint8 levels over the evaluation's samples (same prompts and noise), or
  None before the fp32 row exists."""
  ref_dir, dir_ = (os.path.join(out, p, f"samples{tag}") for p in ("fp32", precision))
  if precision == "fp32" or not os.path.isdir(ref_dir):
    return None
  ref, imgs = (np.stack(geneval_lite.load_images(d, num)).astype(np.int16) for d in (ref_dir, dir_))
  return float(np.abs(imgs - ref).mean())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--precisions", default="fp32,bf16,int8,int8_dynamic",
                      help=f"comma-separated, from {', '.join(PRECISIONS)} (fp8: GPUs of compute capability >= 8.9)")
  parser.add_argument("--sampler", default=None, help="default: the config's sample.sampler")
  parser.add_argument("--steps", default=None, help="comma-separated step counts; default: the config's sample.steps")
  parser.add_argument("--latency_batch", type=int, default=16)
  parser.add_argument("--latency_repeats", type=int, default=3)
  parser.add_argument("--latency_only", action="store_true", help="skip GenEval-lite (e.g. a random-weight workdir)")
  args = parser.parse_args(argv)
  quiet_library_logs()
  precisions = args.precisions.split(",")
  unknown = [p for p in precisions if p not in PRECISIONS]
  if unknown:
    parser.error(f"--precisions: {unknown} not in {PRECISIONS}")
  config = load_model_workdir_config(args.workdir)
  sampler = args.sampler or config.sample.sampler
  steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [int(config.sample.steps)]
  prompts = [p for p, _ in eval_prompt_set(args.latency_batch, seed=config.seed + 1)]
  path = os.path.join(args.out, "quantization_table.json")
  table = {}
  if os.path.exists(path):  # a rerun adds to (and replaces rows of) the table
    with open(path) as f:
      table = json.load(f)
  for precision in precisions:
    target = precision_workdir(args.workdir, args.out, precision)
    quantize = precision if precision in MODES else "none"
    generator = Generator.from_workdir(target, quantize=quantize)
    for steps in steps_list:
      tag = f"_{sampler}{steps}"
      row = {}
      if not args.latency_only:
        result = after_training.evaluate(load_workdir_config(target), target, sampler=sampler, steps=steps, tag=tag,
                                         generator=generator)
        row = {"overall": result["overall"], "sampling_seconds_240": result["sampling_seconds"],
               "mean_abs_pixel_delta_vs_fp32": pixel_delta(args.out, precision, tag, result["num_images"]),
               **{f"{k}_rate": v["rate"] for k, v in result["categories"].items()}}
      else:  # compile first, outside the timing
        generator.generate(prompts, sampler=sampler, steps=steps, cfg=float(config.sample.cfg),
                           batch_size=len(prompts))
      row.update(latency(generator, prompts, sampler=sampler, steps=steps, cfg=float(config.sample.cfg),
                         repeats=args.latency_repeats))
      table[f"{precision}{tag}"] = row
      print(f"{precision} {sampler} x{steps}: GenEval-lite {row.get('overall', float('nan')):.3f}, "
            f"{row['wall_s_per_image'] * 1e3:.1f} ms/image wall, {row['cpu_s_per_image'] * 1e3:.1f} ms/image CPU",
            flush=True)
      with open(path, "w") as f:
        json.dump(table, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
