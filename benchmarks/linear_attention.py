"""Benchmark: fused ReLU linear attention, Pallas vs XLA, at Sana-1600M shapes (GPU).

    python benchmarks/linear_attention.py

H=70 heads of D=32, bf16; N = 1024, 4096, 16384 tokens; B = 1, 4. For each shape and
impl: forward and forward+backward, median wall time over repeats after warm-up (each
call ends in block_until_ready). "roofline" = the time to move the bytes of q, k, v and
out once (plus g, dq, dk, dv for the backward) at the device's HBM bandwidth, divided by
the measured time: 1.0 would be a perfectly memory-bound kernel. Prints a table and
appends one dated row per measurement to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import datetime
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from sanajax.kernels import linear_attention

H, D, DTYPE = 70, 32, jnp.bfloat16
SEQ_LENS, BATCHES = (1024, 4096, 16384), (1, 4)
WARMUP, REPEATS = 3, 20
# Peak HBM bandwidth in bytes/s by device-kind substring (datasheet figures).
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "TPU v5": 2.76e12,
                   "TPU v4": 1.2e12}
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def _bandwidth(device) -> float | None:
  for key, bw in HBM_BYTES_PER_S.items():
    if key.lower() in device.device_kind.lower():
      return bw
  return None


def _median_seconds(fn, *args) -> float:
  for _ in range(WARMUP):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _functions(impl: str):
  attend = lambda q, k, v: linear_attention(q, k, v, impl=impl)
  fwd = jax.jit(attend)

  @jax.jit
  def fwd_bwd(q, k, v, g):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g)

  return fwd, fwd_bwd


def main() -> None:
  device = jax.devices()[0]
  bandwidth = _bandwidth(device)
  itemsize = jnp.dtype(DTYPE).itemsize
  rows = []
  for b in BATCHES:
    for n in SEQ_LENS:
      keys = jax.random.split(jax.random.PRNGKey(0), 4)
      q, k, v, g = [jax.random.normal(key, (b, n, H, D), DTYPE) for key in keys]
      tensor_bytes = b * n * H * D * itemsize
      for impl in ("xla", "pallas"):
        fwd, fwd_bwd = _functions(impl)
        for mode, seconds, n_tensors in (
            ("fwd", _median_seconds(fwd, q, k, v), 4),               # q, k, v, out
            ("fwd+bwd", _median_seconds(fwd_bwd, q, k, v, g), 8)):   # + g, dq, dk, dv
          roofline = n_tensors * tensor_bytes / bandwidth / seconds if bandwidth else float("nan")
          rows.append((b, n, impl, mode, seconds * 1e3, roofline))

  header = f"{'B':>2} {'N':>6} {'impl':>7} {'mode':>8} {'ms':>9} {'roofline':>9}"
  print(f"{device.device_kind}, jax {jax.__version__}, H={H} D={D} {jnp.dtype(DTYPE).name}")
  print(header)
  for b, n, impl, mode, ms, roof in rows:
    print(f"{b:>2} {n:>6} {impl:>7} {mode:>8} {ms:>9.3f} {roof:>9.2f}")

  today = datetime.date.today().isoformat()
  new_file = not RESULTS.exists()
  with RESULTS.open("a") as f:
    if new_file:
      f.write("# Benchmark results\n\n| date | device | jax | bench | B | N | H | D | dtype | impl "
              "| mode | median ms | HBM roofline |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for b, n, impl, mode, ms, roof in rows:
      f.write(f"| {today} | {device.device_kind} | {jax.__version__} | linear_attention | {b} | {n} "
              f"| {H} | {D} | {jnp.dtype(DTYPE).name} | {impl} | {mode} | {ms:.3f} | {roof:.2f} |\n")


if __name__ == "__main__":
  main()
