"""Shared machinery of the benchmark scripts: flags, timing, device facts, RESULTS.md rows.

Every script in benchmarks/ measures sanajax (JAX) and the PyTorch reference (diffusers, bf16,
eager and `torch.compile` in its default mode) in the same process on the same device, and
appends one dated row per figure to benchmarks/RESULTS.md with the device, the versions, and
the issue's target beside the figure. Timing rules (all scripts):
  * warm-up calls (compilation, autotuning, cuDNN/cuBLAS handle creation) are not timed;
  * JAX calls end in `jax.block_until_ready`; torch on CUDA is timed with CUDA events around
    each call (host clock on CPU); the figure is the median over `--repeats` calls.
`--smoke` runs tiny shapes on CPU (torch CPU too) in seconds; its rows go only to `--results`
(never to the real RESULTS.md). `--profile DIR` writes a `jax.profiler` trace of a few extra,
untimed sanajax calls.

JAX and torch share one GPU here, so JAX must not preallocate 75% of it: the import of this
module sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless the caller set it (it must run before
jax is first imported; the scripts import it first).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the environment variable above)
import jax.numpy as jnp  # noqa: E402

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
CONFIG_DIR = REPO / "configs"

# Datasheet figures by device-kind substring, most specific first (first match wins).
# Dense bf16 tensor-core peak, FLOP/s (no sparsity): H100/H200 SXM 989.4 TFLOP/s, H100 PCIe 756.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
                   ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v4", 275e12))
# HBM bandwidth, bytes/s.
HBM_BYTES_PER_S = (("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12),
                   ("TPU v5p", 2.76e12), ("TPU v5 lite", 0.82e12), ("TPU v4", 1.2e12))

TABLE_HEADER = ("| date | device | versions | bench | case | impl | median ms | figure | target | met |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")


@dataclasses.dataclass
class Row:
  """One measured figure. ms: median milliseconds (None when not measured, e.g. OOM).
  figure: derived numbers (ratios, TFLOP/s, utilisation); target: the issue's target for this
  figure ('' if none); met: 'yes' / 'no' / '' (no target)."""
  bench: str
  case: str
  impl: str
  ms: float | None
  figure: str = ""
  target: str = ""
  met: str = ""


def parser(description: str) -> argparse.ArgumentParser:
  """The flags every script has; scripts add their own."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (jax and torch), seconds; for tests")
  p.add_argument("--results", default=None,
                 help=f"markdown file to append rows to (default {RESULTS}; with --smoke: none unless given)")
  p.add_argument("--profile", default=None, metavar="DIR", help="write a jax.profiler trace of sanajax calls here")
  p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3, train_step 2; smoke 1)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls; the median is reported (default 20, train_step 5; smoke 3)")
  p.add_argument("--skip_torch", action="store_true", help="time sanajax only (no diffusers rows)")
  p.add_argument("--torch_compile_backend", default=None,
                 help="torch.compile backend (default 'inductor', torch's default; smoke: 'eager', which still "
                      "traces with dynamo but skips inductor's ~20 s C++ build per graph on CPU)")
  return p


def finish_args(args: argparse.Namespace, *, warmup: int = 3, repeats: int = 20) -> argparse.Namespace:
  """Fills smoke-dependent defaults (warmup / repeats: the script's non-smoke defaults) and pins
  smoke runs to the CPU."""
  if args.smoke:
    # Must precede the first device use; a no-op if the CPU backend is already the one in use.
    jax.config.update("jax_platforms", "cpu")
  args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else warmup)
  args.repeats = args.repeats if args.repeats is not None else (3 if args.smoke else repeats)
  if args.torch_compile_backend is None:
    args.torch_compile_backend = "eager" if args.smoke else "inductor"
  if args.results is None and not args.smoke:
    args.results = str(RESULTS)
  return args


# ------------------------------------------------------------------------------------ timing


def median_ms(call: Callable[[], Any], *, warmup: int, repeats: int,
              sync: Callable[[Any], Any] = jax.block_until_ready) -> float:
  """Median wall milliseconds of `sync(call())` over `repeats` calls after `warmup` untimed ones."""
  for _ in range(warmup):
    sync(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def torch_device(smoke: bool) -> str:
  """'cuda' when there is one (and not smoke), else 'cpu'. On CPU torch gets one thread: with its
  default (one per core) and other processes busy, its spinning workers made a 64-px decode take
  over a second on the shared 2-core machine."""
  import torch
  if smoke or not torch.cuda.is_available():
    torch.set_num_threads(1)
  return "cuda" if torch.cuda.is_available() and not smoke else "cpu"


def torch_median_ms(call: Callable[[], Any], *, warmup: int, repeats: int, device: str) -> float:
  """Median milliseconds of a torch call: CUDA events around each call on GPU, host clock on CPU."""
  import torch
  if device != "cuda":
    return median_ms(call, warmup=warmup, repeats=repeats, sync=lambda _: None)
  for _ in range(warmup):
    call()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)


def torch_compile(fn: Callable, backend: str) -> Callable | None:
  """torch.compile in its default mode (mode=None) with the given backend; None for backend 'none'
  (no compiled diffusers rows: inductor takes minutes per shape on the 1600M model, more than
  run_all.sh --budget's time slices hold)."""
  if backend == "none":
    return None
  import torch
  return torch.compile(fn, backend=backend)


def compiled_median_ms(compiled: Callable | None, call: Callable[[], Any], *, device: str, warmup: int,
                       repeats: int) -> float | None:
  """torch_median_ms of `call` (which runs the compiled model), or None when `compiled` is None."""
  return None if compiled is None else torch_median_ms(call, device=device, warmup=warmup, repeats=repeats)


def release_torch_memory() -> None:
  """Returns torch's cached CUDA blocks to the driver, so JAX can grow into them."""
  import gc
  gc.collect()
  try:
    import torch
    if torch.cuda.is_available():
      torch.cuda.synchronize()
      torch.cuda.empty_cache()
  except ImportError:
    pass


def is_oom(error: BaseException) -> bool:
  """True for an out-of-device-memory error from XLA (RESOURCE_EXHAUSTED) or torch."""
  text = f"{type(error).__name__}: {error}"
  return "RESOURCE_EXHAUSTED" in text or "OutOfMemoryError" in text or "out of memory" in text.lower()


@contextlib.contextmanager
def maybe_profile(directory: str | None, name: str):
  """jax.profiler trace into DIRECTORY/name while the block runs (nothing if directory is None)."""
  if not directory:
    yield
    return
  path = pathlib.Path(directory) / name
  path.mkdir(parents=True, exist_ok=True)
  with jax.profiler.trace(str(path)):
    yield
  print(f"profile: {path}", flush=True)


def profile_calls(directory: str | None, name: str, call: Callable[[], Any], n: int = 3) -> None:
  """n untimed calls of an already-compiled sanajax function under the profiler."""
  if not directory:
    return
  with maybe_profile(directory, name):
    for _ in range(n):
      jax.block_until_ready(call())


# ------------------------------------------------------------------------------------ device facts


def device_kind() -> str:
  return jax.devices()[0].device_kind


def _lookup(table: Sequence[tuple[str, float]], kind: str) -> float | None:
  for key, value in table:
    if key.lower() in kind.lower():
      return value
  return None


def peak_bf16_flops(kind: str | None = None) -> float | None:
  """Datasheet dense bf16 FLOP/s of the device (None if unknown, e.g. CPU)."""
  return _lookup(PEAK_BF16_FLOPS, kind or device_kind())


def hbm_bytes_per_s(kind: str | None = None) -> float | None:
  """Datasheet HBM bandwidth of the device in bytes/s (None if unknown)."""
  return _lookup(HBM_BYTES_PER_S, kind or device_kind())


def matmul_flops_per_s(n: int, *, warmup: int, repeats: int) -> tuple[float, float]:
  """Measures a bf16 (n, n) @ (n, n) product in JAX on random data: (median ms, FLOP/s = 2 n^3 / time)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  mm = jax.jit(jnp.matmul)
  ms = median_ms(lambda: mm(a, b), warmup=warmup, repeats=repeats)
  return ms, 2.0 * n ** 3 / (ms * 1e-3)


def copy_bytes_per_s(nbytes: int, *, warmup: int, repeats: int) -> tuple[float, float]:
  """Measures device-memory bandwidth with a jitted `x + 1` over a float32 array of `nbytes` bytes
  (one read and one write of every byte, the pattern of a copy): (median ms, bytes/s = 2 nbytes / time)."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  add = jax.jit(lambda a: a + 1.0)
  ms = median_ms(lambda: add(x), warmup=warmup, repeats=repeats)
  return ms, 2.0 * (nbytes // 4) * 4 / (ms * 1e-3)


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions(with_torch: bool = True) -> str:
  """'jax X, jaxlib Y, flax Z, torch T, diffusers D' (packages that are installed)."""
  names = ["jax", "jaxlib", "flax"] + (["torch", "diffusers"] if with_torch else [])
  parts = [f"{n} {jax.__version__ if n == 'jax' else _version(n)}" for n in names if n == "jax" or _version(n)]
  return ", ".join(parts)


def describe_device(smoke: bool) -> str:
  kind = device_kind()
  return f"{kind} (smoke)" if smoke else kind


# ------------------------------------------------------------------------------------ output


def fmt_ms(ms: float | None) -> str:
  return "n/a" if ms is None else f"{ms:.3f}"


def fmt_tflops(flops_per_s: float) -> str:
  return f"{flops_per_s / 1e12:.3g} TFLOP/s"


def met(ok: bool | None) -> str:
  return "" if ok is None else ("yes" if ok else "no")


def vs_torch(ms: float, eager_ms: float, compiled_ms: float | None) -> str:
  """The figure comparing sanajax's `ms` with diffusers eager and torch.compile (None: not run)."""
  compiled = "" if compiled_ms is None else f", {ms / compiled_ms:.2f}x compiled"
  return f"{ms / eager_ms:.2f}x diffusers eager{compiled}"


def torch_rows(bench: str, case: str, dtype: str, backend: str, eager_ms: float, compiled_ms: float | None,
               figure: Callable[[float], str] = lambda ms: "") -> list[Row]:
  """diffusers' rows of one case: eager, then torch.compile with `backend` (none when compiled_ms is
  None); figure(ms) -> text."""
  return [Row(bench, case, f"diffusers {label} {dtype}", t_ms, figure(t_ms))
          for label, t_ms in (("eager", eager_ms), (f"torch.compile {backend}", compiled_ms)) if t_ms is not None]


def case_rows(bench: str, case: str, attn_impl: str, ms: float, figure: Sequence[str], target: str,
              ok: bool | None, other_rows: Sequence[Row] = ()) -> list[Row]:
  """sanajax's row of one case (bf16; figure parts joined by ', ', met from ok), then `other_rows`
  (the diffusers rows of torch_rows)."""
  return [Row(bench, case, f"sanajax bf16 attn={attn_impl}", ms, ", ".join(figure), target, met(ok)),
          *other_rows]


def print_rows(rows: Sequence[Row]) -> None:
  """A plain table on stdout (the device tool returns the tail of the output)."""
  print(f"{'bench':<16} {'case':<26} {'impl':<28} {'median ms':>10}  figure | target | met")
  for r in rows:
    print(f"{r.bench:<16} {r.case:<26} {r.impl:<28} {fmt_ms(r.ms):>10}  {r.figure} | {r.target} | {r.met}")
  sys.stdout.flush()


def append_rows(path: str | os.PathLike | None, rows: Sequence[Row], *, device: str, versions_text: str) -> None:
  """Appends one markdown row per Row, dated today (UTC), to `path` (no-op when path is None).

  A missing or empty file gets a title and the table header first; otherwise rows are appended
  to the file's last table (RESULTS.md keeps the measurements table last for this reason).
  """
  if path is None:
    return
  path = pathlib.Path(path)
  today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  text = path.read_text() if path.exists() else ""
  with path.open("a") as f:
    if not text.strip():
      f.write("# Benchmark results\n\n" + TABLE_HEADER)
    elif not text.endswith("\n"):
      f.write("\n")
    for r in rows:
      cells = [today, device, versions_text, r.bench, r.case, r.impl, fmt_ms(r.ms), r.figure, r.target, r.met]
      f.write("| " + " | ".join(c.replace("|", "/") for c in cells) + " |\n")
  print(f"appended {len(rows)} rows to {path}", flush=True)


def report(args: argparse.Namespace, rows: Sequence[Row]) -> None:
  """Prints the rows and appends them to args.results."""
  print_rows(rows)
  append_rows(args.results, rows, device=describe_device(args.smoke),
              versions_text=versions(with_torch=not args.skip_torch))


def rel_l2(a, b) -> float:
  """||a - b|| / ||b|| in float64 (host arrays)."""
  import numpy as np
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def to_torch(x, device: str, dtype: str | None = None):
  """A JAX array as a torch tensor on `device` with the same values (bf16 stays bf16)."""
  import numpy as np
  import torch
  name = dtype or jnp.dtype(x.dtype).name
  host = np.array(jax.device_get(x.astype(jnp.float32)))  # writable float32 copy
  return torch.from_numpy(host).to(device, getattr(torch, name))
