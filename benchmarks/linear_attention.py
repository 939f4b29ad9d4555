"""Benchmark: fused ReLU linear attention at Sana-1600M shapes, Pallas vs XLA vs PyTorch.

    python benchmarks/linear_attention.py            # on the GPU (appends to benchmarks/RESULTS.md)
    python benchmarks/linear_attention.py --smoke    # tiny shapes on CPU, seconds
    python benchmarks/linear_attention.py --cpu      # CPU: impl="xla" vs a plain torch einsum, N = 4096

H = 70 heads of D = 32, bf16; N = 1024, 4096, 16384 tokens; B = 1, 4. For each shape:
forward and forward+backward of `sanajax.kernels.linear_attention` with impl "xla" (the jnp
reference) and "pallas" (the backend kernel), and the forward of diffusers'
`SanaLinearAttnProcessor2_0` arithmetic (ReLU, fp32 upcast, V padded by a row of ones, two
matmuls, division), torch eager and torch.compile.

"roofline" = the time to move the bytes of q, k, v and out once (plus g, dq, dk, dv for the
backward) at the device's datasheet HBM bandwidth, over the measured time: 1.0 is a perfectly
memory-bound kernel. Targets (issue 6): Pallas >= 1.5x the XLA reference and >= 70% of the
HBM roofline. Smoke: H = 2, D = 32, N = 64, B = 1; the Pallas kernel runs interpreted.

--cpu: the CPU comparison of the README. B = 1, N = 4096, H = 70, D = 32, float32 (the CPU has no
fast bf16): the forward of impl="xla" against the same arithmetic in torch eager (the einsum form
above), both with every core (torch.set_num_threads(os.cpu_count()); XLA's CPU client uses them
all), in one process; each figure is the MIN over --repeats calls (the machine may be shared, and
the min is the least disturbed), and the row gives sanajax / torch (target <= 1.0x).
"""
from __future__ import annotations

import os
import platform
import time

import _harness as hx  # first: sets the JAX allocator environment before jax is imported
import jax
import jax.numpy as jnp

from sanajax.kernels import linear_attention

SPEEDUP_TARGET, ROOFLINE_TARGET = 1.5, 0.70
TARGET_TEXT = f">= {SPEEDUP_TARGET}x xla and >= {ROOFLINE_TARGET:.0%} HBM roofline"
CPU_SHAPE = (1, 4096, 70, 32)  # (B, N, H, D): Sana-1600M's heads at 2048 px.
CPU_TARGET = "<= 1.0x torch eager"


def shapes(smoke: bool):
  """(H, D, seq_lens, batches) of the run."""
  if smoke:
    return 2, 32, (64,), (1,)
  return 70, 32, (1024, 4096, 16384), (1, 4)


def jax_functions(impl: str, interpret: bool):
  """(forward, forward+backward) jitted for one impl."""
  attend = lambda q, k, v: linear_attention(q, k, v, impl=impl, interpret=interpret)

  @jax.jit
  def fwd_bwd(q, k, v, g):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g)

  return jax.jit(attend), fwd_bwd


def torch_linear_attention(q, k, v):
  """diffusers SanaLinearAttnProcessor2_0's attention arithmetic on (B, N, H, D) tensors."""
  import torch.nn.functional as F
  dtype = v.dtype
  q = F.relu(q.permute(0, 2, 3, 1)).float()           # (B, H, D, N)
  k = F.relu(k.permute(0, 2, 1, 3)).float()           # (B, H, N, D)
  v = F.pad(v.permute(0, 2, 3, 1).float(), (0, 0, 0, 1), value=1.0)  # (B, H, D + 1, N)
  out = (v @ k) @ q                                    # (B, H, D + 1, N)
  out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
  return out.permute(0, 3, 1, 2).to(dtype)             # (B, N, H, D)


def min_ms(call, *, warmup: int, repeats: int) -> float:
  """The fastest of `repeats` calls (host clock; `call` must block until its result is ready)."""
  for _ in range(warmup):
    call()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def cpu_device() -> str:
  """'cpu: <model name> x <cores>' (the CPU of this run)."""
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  return f"cpu: {model} x {os.cpu_count()} cores"


def cpu_comparison(args) -> list[hx.Row]:
  """impl="xla" vs diffusers' arithmetic in torch eager, forward, float32, same inputs, one process."""
  import torch
  torch.set_num_threads(os.cpu_count())
  shape = (1, 64, 2, 32) if args.smoke else CPU_SHAPE
  b, n, h, d = shape
  case = f"B={b} N={n} H={h} D={d} f32 fwd (CPU)"
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = [jax.random.normal(key, shape, jnp.float32) for key in keys]
  fwd = jax.jit(lambda q, k, v: linear_attention(q, k, v, impl="xla"))
  tq, tk, tv = (hx.to_torch(x, "cpu") for x in (q, k, v))
  timing = {"warmup": args.warmup, "repeats": args.repeats}
  jax_ms = min_ms(lambda: fwd(q, k, v).block_until_ready(), **timing)
  with torch.inference_mode():
    torch_ms = min_ms(lambda: torch_linear_attention(tq, tk, tv), **timing)
    err = hx.rel_l2(torch_linear_attention(tq, tk, tv).numpy(), jax.device_get(fwd(q, k, v)))
  ratio = jax_ms / torch_ms
  print(f"linear attention {case}: sanajax xla {jax_ms:.1f} ms, torch eager {torch_ms:.1f} ms, "
        f"ratio {ratio:.2f}x (min of {args.repeats})", flush=True)
  return [hx.Row("linear_attention", case, "sanajax xla f32", jax_ms,
                 f"{ratio:.2f}x torch eager, min of {args.repeats}", CPU_TARGET, hx.met(ratio <= 1.0)),
          hx.Row("linear_attention", case, "diffusers arithmetic, torch eager f32", torch_ms,
                 f"rel err vs sanajax xla {err:.1e}, min of {args.repeats}")]


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.splitlines()[0])
  p.add_argument("--cpu", action="store_true", help="CPU: impl='xla' vs torch eager at N = 4096, float32, min of repeats")
  p.add_argument("--seq_lens", default=None, help="comma-separated N (default 1024,4096,16384; smoke 64)")
  p.add_argument("--batches", default=None, help="comma-separated B (default 1,4; smoke 1)")
  p.add_argument("--impls", default="xla,pallas",
                 help="comma-separated linear_attention impls (xla first); on an H100 also pallas_mosaic_gpu, the "
                      "state kernel that the Triton default is to be compared with (docs/kernels.md); an impl that "
                      "fails to compile gets a row saying so")
  args = p.parse_args(argv)
  if args.cpu:
    jax.config.update("jax_platforms", "cpu")
    args.skip_torch = False
  args = hx.finish_args(args, repeats=7 if args.cpu else 20)
  if args.cpu:
    rows = cpu_comparison(args)
    hx.print_rows(rows)
    device = cpu_device() + (" (smoke)" if args.smoke else "")
    hx.append_rows(args.results, rows, device=device, versions_text=hx.versions())
    return rows
  heads, dim, seq_lens, batches = shapes(args.smoke)
  seq_lens = [int(n) for n in args.seq_lens.split(",")] if args.seq_lens else seq_lens
  batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
  interpret = jax.default_backend() == "cpu"  # Pallas on CPU only runs in the interpreter.
  bandwidth = hx.hbm_bytes_per_s()
  dtype = jnp.bfloat16
  itemsize = jnp.dtype(dtype).itemsize
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  if not args.skip_torch:
    import torch
    device = hx.torch_device(args.smoke)
    compiled = hx.torch_compile(torch_linear_attention, args.torch_compile_backend)
  impls = args.impls.split(",")
  if impls[0] != "xla":
    raise SystemExit("--impls: the first impl must be xla (the speed-ups are against it)")
  functions = {impl: jax_functions(impl, interpret) for impl in impls}

  rows = []
  for b in batches:
    for n in seq_lens:
      case = f"B={b} N={n} H={heads} D={dim} bf16"
      keys = jax.random.split(jax.random.PRNGKey(0), 4)
      q, k, v, g = [jax.random.normal(key, (b, n, heads, dim), dtype) for key in keys]
      tensor_bytes = b * n * heads * dim * itemsize
      ms, failed = {}, {}
      for impl, (fwd, fwd_bwd) in functions.items():
        try:
          ms[impl, "fwd"] = hx.median_ms(lambda: fwd(q, k, v), **timing)
          ms[impl, "fwd+bwd"] = hx.median_ms(lambda: fwd_bwd(q, k, v, g), **timing)
        except Exception as e:  # An explicit kernel that does not compile here is a result.
          if impl == "xla":
            raise
          failed[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
          continue
        hx.profile_calls(args.profile, f"linear_attention_{impl}_b{b}_n{n}", lambda: fwd_bwd(q, k, v, g))
      # Each kernel's output against the XLA reference on the device (the CI checks it only interpreted).
      ref_out = jax.device_get(functions["xla"][0](q, k, v).astype(jnp.float32))
      errors = {impl: hx.rel_l2(jax.device_get(functions[impl][0](q, k, v).astype(jnp.float32)), ref_out)
                for impl in impls[1:] if impl not in failed}
      for mode, n_tensors in (("fwd", 4), ("fwd+bwd", 8)):  # q, k, v, out (+ g, dq, dk, dv)
        for impl in impls:
          if impl in failed:
            rows.append(hx.Row("linear_attention", f"{case} {mode}", f"sanajax {impl}", None, failed[impl],
                               TARGET_TEXT, "no"))
            continue
          t = ms[impl, mode]
          roofline = n_tensors * tensor_bytes / bandwidth / (t * 1e-3) if bandwidth else None
          figure = f"roofline {roofline:.2f}" if roofline is not None else "roofline n/a (unknown HBM)"
          target, ok = "", None
          if impl != "xla":
            speedup = ms["xla", mode] / t
            figure = f"{speedup:.2f}x xla, {figure}" + (f", rel err vs xla {errors[impl]:.1e}" if mode == "fwd" else "")
            target = TARGET_TEXT
            ok = speedup >= SPEEDUP_TARGET and roofline is not None and roofline >= ROOFLINE_TARGET
          rows.append(hx.Row("linear_attention", f"{case} {mode}", f"sanajax {impl}", t, figure, target, hx.met(ok)))
      if not args.skip_torch:
        tq, tk, tv = (hx.to_torch(x, device) for x in (q, k, v))
        ref = ref_out
        with torch.inference_mode():
          got = torch_linear_attention(tq, tk, tv).float().cpu().numpy()
          for label, fn in (("eager", torch_linear_attention), (f"torch.compile {args.torch_compile_backend}", compiled)):
            if fn is None:  # --torch_compile_backend=none
              continue
            t = hx.torch_median_ms(lambda: fn(tq, tk, tv), device=device, **timing)
            rows.append(hx.Row("linear_attention", f"{case} fwd", f"diffusers {label}", t,
                               f"rel err vs sanajax xla {hx.rel_l2(got, ref):.1e}"))
  hx.report(args, rows)
  return rows


if __name__ == "__main__":
  main()
