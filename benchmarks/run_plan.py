"""The one prepared device call: the benchmark plan in order of value, inside a time budget.

    bash benchmarks/run_all.sh --budget=420                  # on the GPU: rows into benchmarks/RESULTS.md
    bash benchmarks/run_all.sh --budget=420 --smoke --out=/tmp/R.md   # the same plan on CPU, tiny shapes

Steps, in order of value (each in this process, one after another, compile included in its time):
  0. ceilings: a bf16 (n, n) matmul (TFLOP/s) and a device-memory copy (GB/s), cheap, first;
  1. linear_attention: the kernel at Sana-1600M shapes (H 70, D 32, N 1024 / 4096 / 16384, B 1),
     impls xla, pallas_triton, pallas_mosaic_gpu, fwd and fwd+bwd, next to diffusers' arithmetic;
  2. dit_forward: the 1600M DiT forward at 1024 px B 1 and 4096 px B 1, next to diffusers;
  3. dcae_decode: DC-AE f32c32 decode at 1024 px, next to diffusers;
  4. sprint_sample: the SANA-Sprint 1600M 1-step 1024-px pipeline, next to SanaSprintPipeline;
  5. train_step: ONE batch (--train_batch, default 8) with remat full, next to diffusers (no batch search).

Time slices: step i gets the share WEIGHTS[i] / (sum of the weights of the steps left) of the time
left before the deadline (start + budget), at least its MIN_SECONDS and at most the time left. A step
whose slice is under its MIN_SECONDS (a rough compile + run estimate) is skipped and reported as
skipped with the reason. A running step that passes its slice is stopped (SIGALRM raises StepTimeout,
a BaseException so that the scripts' `except Exception` do not swallow it; a long XLA compile is
interrupted only when it returns to Python) and reported as stopped. A step's rows reach --out only
when the step finished: each script writes into a scratch file, copied into --out afterwards, so a
step is never half-written. The diffusers comparison is eager only (--torch_compile_backend=none):
torch.compile with inductor takes minutes per shape at 1600M, more than a slice; pass
--torch_compile_backend=inductor to add it where time allows.

Output: a dated section appended to --out (default benchmarks/RESULTS.md; smoke: none unless given)
with the device name, the ceilings, a table of every row (one `run_all` row per step: ran / skipped /
stopped / failed, seconds, slice) and, per missed target, one line saying where the figure stands
against the ceilings measured in the same run. Exit status 1 if a step failed or was stopped.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import _harness as hx  # first: sets the JAX allocator environment before jax is imported
import jax

sys.path.insert(0, str(hx.REPO))  # `python benchmarks/run_plan.py` puts benchmarks/, not the repo, on sys.path


class Step(NamedTuple):
  """One benchmark of the plan. argv / smoke_argv: the script's flags (besides the common ones)."""
  name: str
  weight: float
  min_seconds: float  # GPU estimate of compile + the shortest run; below it the step is skipped
  argv: tuple[str, ...]
  smoke_argv: tuple[str, ...] | None = None  # None: the same as argv


TRAIN_BATCH = 8  # benchmarks/train_step.py's default --torch_batch: 1600M at 1024 px fits one 80 GB GPU with remat.
IMPLS = "--impls=xla,pallas_triton,pallas_mosaic_gpu"
PLAN = (
    Step("linear_attention", 0.20, 25, (IMPLS, "--seq_lens=1024,4096,16384", "--batches=1"), (IMPLS,)),
    Step("dit_forward", 0.25, 60, ("--cases=1024x1,4096x1",), ("--cases=512x1",)),
    Step("dcae_decode", 0.15, 30, ("--resolutions=1024",), ()),
    Step("sprint_sample", 0.20, 45, ("--steps=1",), ()),
    Step("train_step", 0.20, 60, ("--policies=full",)),  # batch flags added in step_argv
)
SMOKE_MIN_SECONDS = 1.0
CEILING_SIZES = {"matmul_n": (8192, 256), "copy_bytes": (1 << 30, 1 << 22)}  # (GPU, smoke)


class StepTimeout(BaseException):
  """Raised by SIGALRM when a step passes its slice."""


def _on_alarm(signum, frame):
  raise StepTimeout()


def load_script(name: str):
  """benchmarks/NAME.py as a module (its main(argv) returns its rows)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", hx.BENCH_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def step_argv(step: Step, args, scratch: pathlib.Path, slice_s: float) -> list[str]:
  """The script's argv in this plan: its own flags, the common ones, rows into `scratch`."""
  argv = list(step.smoke_argv if args.smoke and step.smoke_argv is not None else step.argv)
  argv += ["--results", str(scratch), "--torch_compile_backend", args.torch_compile_backend,
           "--warmup", "1", "--repeats", str(args.repeats)]
  if step.name == "train_step":
    batch = 1 if args.smoke else args.train_batch
    argv += [f"--start_batch={batch}", f"--max_batch={batch}", f"--torch_batch={batch}",
             f"--time_budget_s={slice_s:.0f}"]
  return argv + (["--smoke"] if args.smoke else [])


def table_rows(path: pathlib.Path) -> list[str]:
  """The row lines ('| ...') of the table that hx.append_rows wrote into a fresh file."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
  return [line for line in lines[1:] if not line.startswith("|---")]  # lines[0] is the header


def plan_row(device: str, versions: str, step: str, status: str, target: str = "", met: str = "",
             seconds: float | None = None) -> str:
  """The `run_all` row of one step (or of the ceilings), in RESULTS.md's columns."""
  today = datetime.datetime.now(datetime.UTC).date().isoformat()
  cells = [today, device, versions, "run_all", step, "plan", hx.fmt_ms(None if seconds is None else seconds * 1e3),
           status, target, met]
  return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def limit_line(row: str, ceilings: dict) -> str | None:
  """One line for a row whose target is missed: the figure against the ceilings of this run."""
  cells = [c.strip() for c in row.strip()[1:-1].split(" | ")]
  if len(cells) != 10 or cells[9] != "no":
    return None
  bench, case, impl, ms, figure, target = cells[3], cells[4], cells[5], cells[6], cells[7], cells[8]
  where = []
  if (m := re.search(r"([\d.]+) TFLOP/s", figure)) and ceilings.get("matmul"):
    where.append(f"{float(m.group(1)) * 1e12 / ceilings['matmul']:.0%} of the measured matmul ceiling")
  if (m := re.search(r"roofline ([\d.]+)", figure)) and ceilings.get("copy") and hx.hbm_bytes_per_s():
    # the script's roofline uses the datasheet bandwidth; rescale to the copy bandwidth measured here
    where.append(f"{float(m.group(1)) * hx.hbm_bytes_per_s() / ceilings['copy']:.0%} of the measured copy bandwidth")
  if "diffusers eager" in target and (m := re.search(r"([\d.]+)x diffusers eager", figure)):
    where.append(f"{m.group(1)}x diffusers eager")
  summary = "; ".join(where) or figure
  return (f"- {bench} {case} ({impl}, {ms} ms) misses `{target}`: {summary}. Trace: rerun the script with "
          f"`--profile DIR` (a per-op profile summary remains to be written).")


def slice_for(plan: Sequence[Step], i: int, left: float, smoke: bool) -> tuple[float, str | None]:
  """(seconds step i may take, None) or (0, why it is skipped), with `left` seconds of the budget left."""
  step = plan[i]
  min_s = SMOKE_MIN_SECONDS if smoke else step.min_seconds
  share = left * step.weight / sum(s.weight for s in plan[i:])
  slice_s = min(left, max(share, min_s))
  if slice_s < min_s:
    return 0.0, f"skipped: needs ~{min_s:.0f} s, {max(left, 0):.0f} s of the budget left"
  return slice_s, None


def run(args, plan: Sequence[Step] = PLAN, load: Callable[[str], Any] = load_script) -> int:
  """Runs `plan` (load(name).main(argv) per step) and appends the section to args.out; 1 if a step
  failed or was stopped, else 0."""
  deadline = args.t0 + args.budget
  hx.finish_args(argparse.Namespace(smoke=args.smoke, results=None, warmup=1, repeats=1,
                                    torch_compile_backend="none"))  # pins smoke runs to the CPU
  device, versions = hx.describe_device(args.smoke), hx.versions()
  out = pathlib.Path(args.out) if args.out else None
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

  def emit(*new: str) -> None:
    """Prints and appends lines to --out at once (a stopped run keeps what finished)."""
    print("\n".join(new), flush=True)
    if out is not None:
      with out.open("a") as f:
        f.write("\n".join(new) + "\n")

  # Ceilings first: cheap, and every later figure is read against them.
  gpu = not args.smoke and jax.default_backend() != "cpu"  # the GPU sizes take minutes on a CPU
  n = CEILING_SIZES["matmul_n"][0 if gpu else 1]
  nbytes = CEILING_SIZES["copy_bytes"][0 if gpu else 1]
  t = time.monotonic()
  mm_ms, mm = hx.matmul_flops_per_s(n, warmup=2, repeats=10)
  cp_ms, cp = hx.copy_bytes_per_s(nbytes, warmup=2, repeats=10)
  ceilings = {"matmul": mm, "copy": cp}
  peak, hbm = hx.peak_bf16_flops(), hx.hbm_bytes_per_s()
  mm_text = f"bf16 {n}^3 matmul {hx.fmt_tflops(mm)}" + (f" ({mm / peak:.0%} of the datasheet's {peak / 1e12:.1f})"
                                                        if peak else "")
  cp_text = f"device copy of {nbytes / 2**20:.0f} MiB {cp / 1e9:.0f} GB/s" + (
      f" ({cp / hbm:.0%} of the datasheet's {hbm / 1e9:.0f})" if hbm else "")
  emit("", f"## run_all.sh --budget={args.budget:.0f}{' --smoke' if args.smoke else ''}: {device}, {stamp}", "",
       f"Ceilings measured first in this run: {mm_text}; {cp_text}. Diffusers comparison: eager"
       + ("" if args.torch_compile_backend == "none" else f" and torch.compile {args.torch_compile_backend}")
       + "; compile time counts against each step's slice.", "",
       hx.TABLE_HEADER.rstrip("\n"),
       plan_row(device, versions, "ceilings", f"matmul {mm_ms:.3f} ms = {hx.fmt_tflops(mm)}; copy {cp_ms:.3f} ms "
                f"= {cp / 1e9:.0f} GB/s", seconds=time.monotonic() - t))

  status, not_run = 0, 0
  measured: list[str] = []
  signal.signal(signal.SIGALRM, _on_alarm)
  with tempfile.TemporaryDirectory() as scratch_dir:
    for i, step in enumerate(plan):
      slice_s, skipped = slice_for(plan, i, deadline - time.monotonic(), args.smoke)
      if skipped:
        emit(plan_row(device, versions, step.name, skipped))
        not_run += 1
        continue
      scratch = pathlib.Path(scratch_dir) / f"{step.name}.md"
      argv = step_argv(step, args, scratch, slice_s)
      print(f"=== {step.name} {' '.join(argv)} (slice {slice_s:.0f} s) ===", flush=True)
      start = time.monotonic()
      signal.setitimer(signal.ITIMER_REAL, slice_s)
      try:
        load(step.name).main(argv)
        outcome = "ran"
      except StepTimeout:
        outcome = f"stopped at its {slice_s:.0f} s slice: no rows written"
        status = 1
      except Exception as e:  # noqa: BLE001  (one step's failure is a result; the plan goes on)
        outcome = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        status = 1
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
      seconds = time.monotonic() - start
      rows = table_rows(scratch) if outcome == "ran" else []
      not_run += outcome != "ran"
      measured += rows
      emit(*rows, plan_row(device, versions, step.name, f"{outcome} in {seconds:.1f} s of a {slice_s:.0f} s slice",
                           seconds=seconds))
      gc.collect()
      hx.release_torch_memory()

  misses = [line for line in (limit_line(r, ceilings) for r in measured) if line]
  emit("", "Missed targets, against this run's ceilings:" if misses else "No target missed among the figures above.",
       *misses, f"Total {time.monotonic() - args.t0:.0f} s of the {args.budget:.0f} s budget; "
       f"{len(plan) - not_run} of {len(plan)} steps ran.")
  if out is not None and os.environ.get("OUT"):  # the device tool brings $OUT back
    shutil.copy(out, pathlib.Path(os.environ["OUT"]) / "RESULTS.md")
  return status


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", type=float, required=True, help="seconds for the whole plan, compile included")
  p.add_argument("--smoke", action="store_true", help="the same plan on CPU at tiny shapes (tests)")
  p.add_argument("--out", default=None, help=f"markdown file the section is appended to (default {hx.RESULTS}; "
                                             "smoke: none unless given)")
  p.add_argument("--t0", type=float, default=None,
                 help="time.monotonic() is not shared across processes: the UNIX time the budget started "
                      "(run_all.sh passes its start, so its setup counts); default now")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; smoke 1)")
  p.add_argument("--train_batch", type=int, default=TRAIN_BATCH, help="the one train_step batch (remat full)")
  p.add_argument("--torch_compile_backend", default="none",
                 help="diffusers' torch.compile rows: none (default: eager rows only) or a backend such as inductor")
  args = p.parse_args(argv)
  if args.budget <= 0:
    raise SystemExit("--budget: give the seconds the plan may take, e.g. --budget=420")
  elapsed = max(0.0, time.time() - args.t0) if args.t0 is not None else 0.0
  args.t0 = time.monotonic() - elapsed
  args.repeats = args.repeats or (1 if args.smoke else 10)
  if args.out is None and not args.smoke:
    args.out = str(hx.RESULTS)
  return args


if __name__ == "__main__":
  sys.exit(run(parse_args()))
