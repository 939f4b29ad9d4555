"""Ahead-of-time compile time of the DiT train step, scanned vs unrolled blocks (`sanajax.info --compile`).

    rows = compile_table()                      # 600M, 1600M, 1600M widths at 4.8B's 60 blocks
    print(format_compile_table(rows))

The step is what the DiT trainer compiles around the model: the flow-matching loss of one batch,
its gradient (remat as the config says) and the config's optimizer update, jitted and lowered
with jax.eval_shape parameters (nothing is allocated), then compiled for this machine's backend
(CPU here). Compile time is what grows with depth when the blocks are unrolled; nn.scan traces
and compiles one block. docs/scaling.md#compile-time holds the measured table.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sanajax import config_utils
from sanajax.models import sana_dit
from sanajax.training.optim import build_optimizer

# (label, config name, overrides of config.model): SANA-1.5 4.8B is the 1600M width at 60 blocks.
SIZES = (("600M (28 blocks)", "sana_600m", {}), ("1600M (20 blocks)", "sana_1600m", {}),
         ("4.8B depth (60 blocks, 1600M width)", "sana_1600m", {"depth": 60}))


def train_step_compile_seconds(config: ml_collections.ConfigDict, *, scan_layers: bool, latent_side: int = 32,
                               text_length: int = 300, batch: int = 1) -> dict[str, float]:
  """{'lower_s', 'compile_s', 'lower_cpu_s', 'compile_cpu_s'} of one DiT train step of `config` (model, remat,
  optimizer as configured) at latent_side^2 latents (32: 1024 px with the DC-AE f32) and `text_length` caption
  tokens. `*_s` are wall seconds; `*_cpu_s` this process's CPU seconds (all its threads), which other jobs on a
  shared machine inflate far less than the wall time."""
  mc = dict(config.model, scan_layers=scan_layers)
  model = sana_dit.build_dit(mc)
  x, t, ctx, mask = sana_dit.dummy_inputs(mc, (latent_side, latent_side), text_length, batch)
  params = jax.eval_shape(lambda k, *a: model.init(k, *a)["params"], jax.random.key(0), x, t, ctx, mask)
  tx, _ = build_optimizer(config.train, int(config.train.num_steps))
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, x0, t, ctx, mask, noise):
    def loss_fn(p):
      xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
      v = model.apply({"params": p}, xt, t, ctx, mask)
      return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0)))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start, start_cpu = time.perf_counter(), time.process_time()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, ctx, mask, x)
  lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
  lowered.compile()
  done, done_cpu = time.perf_counter(), time.process_time()
  return {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
          "lower_cpu_s": lowered_cpu - start_cpu, "compile_cpu_s": done_cpu - lowered_cpu}


def compile_table(sizes: Any = SIZES, progress: Callable[[str], None] | None = None,
                  **kwargs) -> list[dict[str, Any]]:
  """One row per size: label, depth and the lower / compile wall and CPU seconds, unrolled and scanned.

  progress, if given, gets a line as each of the 2 x len(sizes) steps starts and ends (the real sizes take
  minutes each on CPU: docs/scaling.md#compile-time)."""
  rows = []
  for i, (label, name, overrides) in enumerate(sizes):
    config = config_utils.load_config(name)
    config.model.update(overrides)
    row = {"size": label, "depth": int(config.model.depth)}
    for scan in (False, True):
      key = "scan" if scan else "unrolled"
      step = f"[{2 * i + scan + 1}/{2 * len(sizes)}] {label}, {'scanned' if scan else 'unrolled'} blocks"
      if progress:
        progress(f"{step}: lowering and compiling the train step ...")
      times = train_step_compile_seconds(config, scan_layers=scan, **kwargs)
      if progress:
        progress(f"{step}: lowered in {times['lower_s']:.1f} s, compiled in {times['compile_s']:.1f} s")
      row.update({f"{key}_{field}": seconds for field, seconds in times.items()})
    rows.append(row)
  return rows


def format_compile_table(rows: list[dict[str, Any]]) -> str:
  """A Markdown table of compile_table's rows: lowering and XLA compile, wall seconds with CPU seconds in
  brackets; the ratio is of CPU seconds (lowering + compile), which load on a shared machine moves least."""
  lines = [f"AOT train-step compile on {jax.default_backend()} ({jax.device_count()} devices), "
           "wall seconds (CPU seconds):",
           "| config | blocks | unrolled lower | unrolled compile | scan lower | scan compile | unrolled / scan (CPU) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    cells = [f"{r[f'{k}_s']:.1f} ({r[f'{k}_cpu_s']:.1f})"
             for k in ("unrolled_lower", "unrolled_compile", "scan_lower", "scan_compile")]
    total_u = r["unrolled_lower_cpu_s"] + r["unrolled_compile_cpu_s"]
    total_s = r["scan_lower_cpu_s"] + r["scan_compile_cpu_s"]
    lines.append(f"| {r['size']} | {r['depth']} | {' | '.join(cells)} | {total_u / total_s:.1f}x |")
  return "\n".join(lines)
