"""Benchmark: the tiny default's train step on CPU (the only training speed a 2-core machine can measure).

    python benchmarks/tiny_step.py                                   # configs/tiny.py
    python benchmarks/tiny_step.py --config=mmdit_tiny              # the tiny MM-DiT
    python benchmarks/tiny_step.py --steps=50 --set=train.optimizer=adamw

Times, on cached latents (the default trains from the in-memory latent cache), with random weights:
- the whole jitted step of sanajax.training.dit.make_train_step (text encoder, noise, DiT forward and
  backward, clip, optimizer, EMA, NaN guard), as steps/s;
- its parts: the loss's value and gradient, and the optimizer update alone, in ms.
Each after `--warmup` calls; the median of `--repeats` timings of `--steps` calls. docs/results.md#the-faster-step
has the figures; compare versions on one machine, back to back.
"""
from __future__ import annotations

import argparse
import ast
import time

import _harness  # noqa: F401  (sets the JAX allocator environment before jax is imported)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from sanajax import config_utils  # noqa: E402
from sanajax.models.backbones import build_backbone  # noqa: E402
from sanajax.parallel import Plan  # noqa: E402
from sanajax.resolution import ae_downsample, apply_resolution  # noqa: E402
from sanajax.training import dit  # noqa: E402
from sanajax.training.optim import build_optimizer  # noqa: E402
from sanajax.workdir.loaders import build_text_encoder, latent_shape  # noqa: E402


def _time(fn, steps: int, repeats: int) -> float:
  """Median seconds per call of fn() (which returns something to block on)."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      r = fn()
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t0) / steps)
  return float(np.median(out))


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark; returns {params, batch, steps_per_s, value_and_grad_ms, update_ms}."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="tiny", help="a config name (configs/NAME.py) or path")
  parser.add_argument("--set", action="append", default=[], help="field=value (a Python literal or a string)")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=20)
  args = parser.parse_args(argv)

  config = apply_resolution(config_utils.load_config(args.config))
  for item in args.set:
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    config_utils.set_field(config, key, value)
  text_encoder, model = build_text_encoder(config), build_backbone(config.model)
  tx, schedule = build_optimizer(config.train, config.train.num_steps)
  plan = Plan.from_config(config)
  state, state_sh, batch_size = dit.init_train_state(config, tx, jax.random.PRNGKey(0), plan)
  frozen = {"ae": {}, "text": text_encoder.params}
  step = dit.make_train_step(config, model, None, text_encoder, tx, schedule, 1.0, plan=plan,
                             state_shardings=state_sh, batch_field="latent",
                             frozen_shardings=jax.tree.map(lambda _: plan.replicated, frozen))
  ids, mask = text_encoder.tokenize(["a red circle to the left of a blue square"] * batch_size)
  latent = np.random.default_rng(0).standard_normal(
      (batch_size, *latent_shape(config, ae_downsample(config)))).astype(np.float32)
  batch = {"latent": latent, "input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)}

  box = {"state": state}

  def one_step():
    box["state"], metrics = step(box["state"], frozen, batch)
    return metrics["loss"]

  loss_fn = dit.make_loss_fn(config, model, None, text_encoder, 1.0, plan)
  key = jax.random.PRNGKey(1)
  device_batch = jax.device_put(batch)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  update = jax.jit(tx.update)
  grads = value_and_grad(state.params, frozen, device_batch, key)[1]
  for _ in range(args.warmup):
    jax.block_until_ready((one_step(), value_and_grad(box["state"].params, frozen, device_batch, key),
                           update(grads, box["state"].opt_state, box["state"].params)))
  step_s = _time(one_step, args.steps, args.repeats)
  vg_s = _time(lambda: value_and_grad(box["state"].params, frozen, device_batch, key), args.steps, args.repeats)
  up_s = _time(lambda: update(grads, box["state"].opt_state, box["state"].params), args.steps, args.repeats)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{args.config} {' '.join(args.set)}: {params / 1e6:.3f}M params, batch {batch_size}, "
        f"{jax.devices()[0].device_kind}")
  print(f"  step {1 / step_s:.2f} steps/s ({step_s * 1e3:.1f} ms); value and gradient {vg_s * 1e3:.1f} ms; "
        f"optimizer update {up_s * 1e3:.1f} ms")
  return {"params": params, "batch": batch_size, "steps_per_s": 1 / step_s, "value_and_grad_ms": vg_s * 1e3,
          "update_ms": up_s * 1e3}


if __name__ == "__main__":
  main()
