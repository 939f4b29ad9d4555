"""Can the teacher's architecture draw in ONE pass? A regression probe for Sprint's 1-step target.

    python -m experiments.one_step_probe --teacher_workdir=workdirs/tiny [--pairs=20000] [--steps=3000]

Not a distillation method of SANA-Sprint: a measurement of what a one-pass generator of the
teacher's size can reach on shapes, to tell a capacity limit from an optimisation one when a Sprint
student's 1-step score stays low. It is the oldest one-step distillation (Luhman & Luhman 2021,
"knowledge distillation"): the teacher draws `pairs` (noise z, latents x0) with its own sampler
(Flow-DPM-Solver 20 steps, CFG 4.5, its config's guidance interval) for training captions; a copy
of the teacher (its weights as the start) is regressed at flow time t = 1 onto the velocity that
lands on x0 in one Euler step, v = z - x0 (mean squared error; Muon, cosine, batch 64); then the
copy draws the held-out GenEval-lite prompts with one Euler step (conditional only: CFG is in the
targets) and is scored as training's final eval is. Writes OUT/one_step_probe.json.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sanajax.cli import quiet_library_logs
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.shapes import eval_prompt_set
from sanajax.data.sources import make_source_from_config
from sanajax.eval import geneval_lite
from sanajax.generation import Generator
from sanajax.training.optim import build_optimizer

TEACHER_SAMPLER, TEACHER_STEPS, CFG = "flow_dpm", 20, 4.5


def teacher_pairs(generator, num_pairs: int, *, batch: int = 500, seed: int = 123) -> dict:
  """{"z", "x0", "input_ids", "attention_mask"}: num_pairs (rounded up to whole batches) noise /
  teacher-sample latent pairs (N, h, w, C) float32 and the tokenized training captions they were
  drawn for (the shapes train split, shuffled with `seed`)."""
  g, c = generator, generator.config
  # Generator.latents_fn: the noise and the teacher's sample of it, before the AE decoder.
  draw = jax.jit(lambda key, ids, mask: g.latents_fn(g.dit_params, g.text_params, key, ids, mask, TEACHER_SAMPLER,
                                                     TEACHER_STEPS, jnp.float32(CFG), g.cfg_interval))

  batch = min(batch, num_pairs)
  data = make_train_iterator(make_source_from_config(c.data, seed), batch_size=batch, seed=seed,
                             tokenize_fn=g.text.tokenize)
  out = {"z": [], "x0": [], "input_ids": [], "attention_mask": []}
  for i in range(-(-num_pairs // batch)):
    b = next(data)
    z, x0 = draw(jax.random.fold_in(jax.random.PRNGKey(seed), i), jnp.asarray(b["input_ids"]),
                 jnp.asarray(b["attention_mask"]))
    for k, v in (("z", z), ("x0", x0), ("input_ids", b["input_ids"]), ("attention_mask", b["attention_mask"])):
      out[k].append(np.asarray(v))
  return {k: np.concatenate(v) for k, v in out.items()}


def regress(generator, pairs: dict, *, steps: int, learning_rate: float, batch: int = 64, seed: int = 0,
            log_every: int = 250):
  """The teacher's weights regressed at t = 1 onto v = z - x0 (Muon, cosine); returns (params, losses),
  losses the batch MSE at every step (float32 numpy)."""
  g = generator
  train = ml_collections.ConfigDict(dict(optimizer="muon", learning_rate=learning_rate,
                                         warmup_steps=min(50, steps // 10), schedule="cosine", grad_clip=1.0))
  tx, _ = build_optimizer(train, steps)

  def loss_fn(params, z, x0, ids, mask):
    ctx = g.text.embed(g.text_params, ids, mask)
    v = g.dit.apply({"params": params}, z, jnp.ones((z.shape[0],), jnp.float32), ctx, mask)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (z - x0)))

  @jax.jit
  def step(params, opt_state, z, x0, ids, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, z, x0, ids, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = g.dit_params
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  losses = []
  start = time.perf_counter()
  for i in range(steps):
    idx = rng.integers(0, len(pairs["z"]), batch)
    params, opt_state, loss = step(params, opt_state, *(pairs[k][idx] for k in ("z", "x0", "input_ids",
                                                                                 "attention_mask")))
    losses.append(float(loss))
    if log_every and (i % log_every == 0 or i == steps - 1):
      print(f"probe step {i + 1}/{steps}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
  return params, np.asarray(losses, np.float32)


def run(teacher_workdir: str, out: str, *, num_pairs: int, steps: int, learning_rate: float,
        num_prompts: int | None = None) -> dict:
  g = Generator.from_workdir(teacher_workdir)
  start = time.perf_counter()
  pairs = teacher_pairs(g, num_pairs)
  pair_seconds = time.perf_counter() - start
  print(f"{len(pairs['z'])} teacher pairs ({TEACHER_SAMPLER} {TEACHER_STEPS}, CFG {CFG}, interval "
        f"{g.cfg_interval}) in {pair_seconds:.0f} s.", flush=True)
  params, losses = regress(g, pairs, steps=steps, learning_rate=learning_rate)
  g.dit_params, g.cfg_interval = params, None
  num_prompts = g.config.eval.num_prompts if num_prompts is None else num_prompts
  prompt_set = eval_prompt_set(num_prompts, seed=g.config.seed)
  prompts = [p for p, _ in prompt_set]
  images = g.generate(prompts, sampler="flow_euler", steps=1, cfg=1.0, seed=g.config.seed)
  result = geneval_lite.evaluate(images, prompts, [c for _, c in prompt_set])
  print(f"One-pass probe (1 Euler step, regressed on {len(pairs['z'])} teacher samples, {steps} steps):", flush=True)
  print(geneval_lite.format_table(result), flush=True)
  summary = {"overall": result["overall"], "geneval": {k: v["rate"] for k, v in result["categories"].items()},
             "pairs": int(len(pairs["z"])), "steps": steps, "learning_rate": learning_rate,
             "loss_first": float(losses[0]), "loss_last_100": float(np.mean(losses[-100:])),
             "pair_seconds": pair_seconds, "teacher_workdir": os.path.abspath(teacher_workdir)}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "one_step_probe.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher_workdir", required=True, help="A sanajax.train workdir (config.json + checkpoints).")
  parser.add_argument("--out", default=None, help="Where one_step_probe.json goes (default: the teacher workdir).")
  parser.add_argument("--pairs", type=int, default=20000, help="Teacher samples to regress on.")
  parser.add_argument("--steps", type=int, default=3000, help="Regression steps (batch 64).")
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  args = parser.parse_args(argv)
  quiet_library_logs()
  run(args.teacher_workdir, args.out or args.teacher_workdir, num_pairs=args.pairs, steps=args.steps,
      learning_rate=args.learning_rate)
  return 0


if __name__ == "__main__":
  sys.exit(main())
