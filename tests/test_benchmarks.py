"""benchmarks/: every script runs with --smoke (tiny shapes, CPU, jax and torch) and writes the rows
it returns into a RESULTS file; the FLOP counts in the rows are sanajax.info's; the batch search
stops cleanly at an out-of-memory error; the training loop reads device values only at logging
and checkpoint steps; the train step donates its state."""
import datetime
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import lowering  # tests/lowering.py (tests/ is on sys.path)
import numpy as np
import optax
import pytest
from held import held_env  # tests/held.py

from sanajax.models import dit_facts
from sanajax.models.layers import remat_policy
from sanajax.training import loop as loop_lib
from sanajax.training.state import create_train_state

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import their sibling `_harness`
import _harness as hx  # noqa: E402

COLUMNS = ["date", "device", "versions", "bench", "case", "impl", "median ms", "figure", "target", "met"]


def _script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _table(path):
  """The rows of the last markdown table in `path`, as dicts keyed by COLUMNS."""
  lines = [l for l in pathlib.Path(path).read_text().splitlines() if l.startswith("| ")]
  rows = [[c.strip() for c in l.strip()[1:-1].split(" | ")] for l in lines]
  header = rows.index(COLUMNS)
  # run_all.sh --budget appends a section with its own table of the same columns: skip its header.
  out = [dict(zip(COLUMNS, r)) for r in rows[header + 1:] if r[0] != "---" and r != COLUMNS]
  assert all(len(d) == len(COLUMNS) for d in out)
  return out


def _check_written(path, returned, bench):
  table = _table(path)
  assert len(table) == len(returned) > 0
  today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  for row, r in zip(table, returned):
    assert row["date"] == today and row["device"].endswith("(smoke)") and row["bench"] == bench == r.bench
    assert "jax " in row["versions"] and "torch " in row["versions"] and "diffusers " in row["versions"]
    assert (row["case"], row["impl"], row["figure"]) == (r.case, r.impl, r.figure)
    assert row["median ms"] == hx.fmt_ms(r.ms)
    if r.ms is not None:
      assert r.ms > 0
  return table


def _number(pattern, text):
  match = re.search(pattern, text)
  assert match, (pattern, text)
  return float(match.group(1))


def test_linear_attention_smoke(tmp_path):
  out = tmp_path / "RESULTS.md"
  rows = _script("linear_attention").main(["--smoke", "--results", str(out)])
  _check_written(out, rows, "linear_attention")
  impls = [r.impl for r in rows]
  # One shape: fwd and fwd+bwd for xla and pallas, then diffusers eager and compiled.
  assert impls == ["sanajax xla", "sanajax pallas"] * 2 + ["diffusers eager", "diffusers torch.compile eager"]
  pallas = [r for r in rows if r.impl == "sanajax pallas"]
  assert all(r.target.startswith(">= 1.5x xla") and r.met in ("yes", "no") for r in pallas)
  for r in pallas:  # the speed-up printed is xla time / pallas time of the same row pair
    xla = next(x for x in rows if x.impl == "sanajax xla" and x.case == r.case)
    assert _number(r"([\d.]+)x xla", r.figure) == pytest.approx(xla.ms / r.ms, abs=0.006)
  for r in rows[-2:]:  # diffusers' processor arithmetic computes the same attention (bf16 output)
    assert _number(r"rel err vs sanajax xla ([\d.e+-]+)", r.figure) <= 1e-2


def test_linear_attention_cpu_comparison_smoke(tmp_path):
  """--cpu (the README's CPU figure): impl="xla" and torch eager on the same inputs, the ratio printed
  is sanajax / torch of the two rows, and the rows name the CPU."""
  out = tmp_path / "RESULTS.md"
  rows = _script("linear_attention").main(["--cpu", "--smoke", "--repeats", "2", "--results", str(out)])
  assert [r.impl for r in rows] == ["sanajax xla f32", "diffusers arithmetic, torch eager f32"]
  ratio = _number(r"^([\d.]+)x torch eager", rows[0].figure)
  assert abs(ratio - rows[0].ms / rows[1].ms) < 0.01 and rows[0].met == ("yes" if ratio <= 1.0 else "no")
  assert _number(r"rel err vs sanajax xla ([\d.e+-]+)", rows[1].figure) < 1e-5
  table = _table(out)
  assert [r["impl"] for r in table] == [r.impl for r in rows] and table[0]["device"].startswith("cpu: ")


def test_dit_forward_smoke_flops_match_info_and_profile(tmp_path):
  out = tmp_path / "RESULTS.md"
  module = _script("dit_forward")
  rows = module.main(["--smoke", "--results", str(out), "--profile", str(tmp_path / "prof")])
  _check_written(out, rows, "dit_forward")
  assert [r.impl for r in rows] == ["jax", "sanajax bf16 attn=auto", "diffusers eager float32",
                                    "diffusers torch.compile eager float32"]
  sanajax = rows[1]
  config = module.load_config(512, True, "auto")
  assert _number(r"([\d.]+) GFLOP/image", sanajax.figure) == pytest.approx(
      dit_facts.describe(config)["forward_flops"] / 1e9, abs=5e-4)
  # bf16 sanajax vs float32 diffusers on the same weights: measured 6.4e-3.
  assert _number(r"rel err vs diffusers ([\d.e+-]+)", sanajax.figure) <= 3e-2
  ratio = _number(r"([\d.]+)x diffusers eager", sanajax.figure)
  assert ratio == pytest.approx(sanajax.ms / rows[2].ms, rel=0.02, abs=0.006)
  traces = list((tmp_path / "prof").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_dcae_decode_smoke(tmp_path):
  out = tmp_path / "RESULTS.md"
  rows = _script("dcae_decode").main(["--smoke", "--results", str(out)])
  _check_written(out, rows, "dcae_decode")
  assert [r.impl for r in rows] == ["sanajax bf16 attn=auto", "diffusers eager float32",
                                    "diffusers torch.compile eager float32"]
  assert rows[0].target == "<= 0.5x diffusers eager" and rows[0].met in ("yes", "no")
  # bf16 sanajax vs float32 diffusers on the same weights: measured 1.1e-2.
  assert _number(r"rel err vs diffusers ([\d.e+-]+)", rows[0].figure) <= 3e-2


def test_sprint_sample_smoke_matches_the_diffusers_pipeline(tmp_path):
  out = tmp_path / "RESULTS.md"
  rows = _script("sprint_sample").main(["--smoke", "--results", str(out), "--steps", "1,2"])
  _check_written(out, rows, "sprint_sample")
  assert [r.impl for r in rows] == ["sanajax bf16 attn=auto", "diffusers eager float32",
                                    "diffusers torch.compile eager float32"] * 2
  assert [r.case.split(" (")[0] for r in rows[::3]] == ["64px B=1 1-step", "64px B=1 2-step"]
  # One step: SanaSprintPipeline (DiT + AE decode, float32) and sanajax (bf16) on the same weights
  # compute the same image: measured 5.5e-3 (an AE scaling off by 5% gives 3.1e-2). Two steps
  # re-noise with different draws: no error shown.
  assert _number(r"rel err vs diffusers ([\d.e+-]+)", rows[0].figure) <= 2e-2
  assert "rel err" not in rows[3].figure


def test_train_step_smoke_flops_match_info(tmp_path):
  out = tmp_path / "RESULTS.md"
  module = _script("train_step")
  # One policy and one batch: each batch tried is a compile, the cost of this test.
  rows = module.main(["--smoke", "--results", str(out), "--policies", "full", "--max_batch", "1"])
  _check_written(out, rows, "train_step")
  timed = [r for r in rows if r.impl == "sanajax adamw bf16"]
  assert [r.case for r in timed] == ["512px B=1 remat=full (tiny DiT)"]
  flops = dit_facts.describe(module.load_config(512, "full", 1, True))["train_step_flops"]
  assert _number(r"([\d.e+-]+) TFLOP/step", timed[0].figure) == pytest.approx(flops / 1e12, rel=1e-2)
  assert _number(r"([\d.]+) img/s", timed[0].figure) == pytest.approx(1 / (timed[0].ms * 1e-3), rel=0.01, abs=0.06)
  for batch in (2, 8):  # the batch goes into the FLOP count through the resolution preset
    config = module.load_config(512, "full", batch, True)
    assert config.train.batch_size == batch
    assert dit_facts.describe(config)["train_step_flops"] == 3 * batch * dit_facts.describe(config)["forward_flops"]
  largest = next(r for r in rows if r.impl == "sanajax largest batch")
  assert largest.ms is None and "largest batch that fits: 1 (reached --max_batch=1)" in largest.figure
  assert [r.impl for r in rows[-2:]] == ["diffusers eager fp32", "diffusers torch.compile eager fp32"]


def test_tiny_step_times_the_default_step_and_its_parts():
  """benchmarks/tiny_step.py (docs/results.md#the-faster-step) on two optimizers: the tiny default's 0.709M
  parameters and batch 32, and Muon's update costing more than AdamW's (its Newton-Schulz products)."""
  module = _script("tiny_step")
  muon = module.main(["--steps", "3", "--repeats", "1", "--warmup", "2"])
  adamw = module.main(["--steps", "3", "--repeats", "1", "--warmup", "2", "--set", "train.optimizer=adamw"])
  assert muon["params"] == adamw["params"] == 708_704 and muon["batch"] == 32
  assert all(np.isfinite(v) and v > 0 for r in (muon, adamw) for v in r.values())
  assert muon["update_ms"] > adamw["update_ms"]


def test_batch_search_stops_at_out_of_memory():
  module = _script("train_step")

  class FakeTrainer:
    def __init__(self, fail_at, error):
      self.fail_at, self.error, self.tried = fail_at, error, []

    def time_step(self, policy, batch):
      self.tried.append(batch)
      if batch >= self.fail_at:
        raise self.error
      return float(batch)

  args = type("Args", (), {"start_batch": 2, "max_batch": 64})()
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
  trainer = FakeTrainer(16, oom)
  fits, ending = module.search_policy(trainer, "full", args, deadline=float("inf"))
  assert fits == {2: 2.0, 4: 4.0, 8: 8.0} and ending == "B=16 out of memory" and trainer.tried == [2, 4, 8, 16]
  with pytest.raises(ValueError, match="not memory"):  # any other error is a bug and propagates
    module.search_policy(FakeTrainer(4, ValueError("not memory")), "full", args, deadline=float("inf"))
  fits, ending = module.search_policy(FakeTrainer(99, oom), "full", args, deadline=0.0)
  assert fits == {} and ending == "time budget reached before B=2"
  assert hx.is_oom(oom) and not hx.is_oom(RuntimeError("INTERNAL: something else"))


def test_append_rows_extends_the_last_table(tmp_path):
  path = tmp_path / "R.md"
  path.write_text("# t\n\n## Targets\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Measurements\n\n" + hx.TABLE_HEADER)
  rows = [hx.Row("b1", "c|1", "i", 1.23456, "f", "t", "yes"), hx.Row("b2", "c2", "i", None)]
  hx.append_rows(path, rows, device="dev", versions_text="v")
  table = _table(path)
  assert [r["case"] for r in table] == ["c/1", "c2"] and [r["median ms"] for r in table] == ["1.235", "n/a"]
  assert path.read_text().startswith("# t\n") and table[0]["met"] == "yes"


def test_results_md_lists_every_target():
  text = (BENCH / "RESULTS.md").read_text()
  rows = _table(BENCH / "RESULTS.md")
  assert {r["bench"] for r in rows} - {"run_all"} == {"linear_attention", "dit_forward", "train_step", "dcae_decode",
                                                      "sprint_sample", "data_throughput"}
  for needle in (">= 1.5x", "70% of the HBM roofline", "<= 0.4x diffusers eager", ">= 70% of the bf16 8192^3",
                 "utilisation >= 45%", "largest batch", "<= 0.5x diffusers eager", "SanaSprintPipeline",
                 ">= 50 images/s per CPU core"):
    assert needle in text


PLAN_STEPS = ["linear_attention", "dit_forward", "dcae_decode", "sprint_sample", "train_step"]


def test_the_training_clis_run_on_the_gpu_image_with_the_carried_wheels(tmp_path):
  """What the device call carries also lets `python -m sanajax.train` / `distill_sprint` start there: their
  imports (grain, array_record) and the metrics writer (tensorboardX); and the emulation hides the rest."""
  code = ("import sys, importlib.util, sanajax.train, sanajax.training.sprint\n"
          "from sanajax.training.metrics import MetricWriter\n"
          "MetricWriter(sys.argv[1]).scalars(0, {'loss': 1.0})\n"
          "print(importlib.util.find_spec('gradio'), importlib.util.find_spec('peft') is not None)")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                     check=False, env=held_env("gpu_image"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["None", "True"]  # gradio is not in the image (hidden), peft is
  assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 0, "loss": 1.0}'
  assert os.listdir(tmp_path / "tensorboard" / "train")


def test_run_all_budget_smoke_runs_the_plan_end_to_end(tmp_path):
  """`bash benchmarks/run_all.sh --budget=420 --smoke --out=PATH`: the ceilings first, then every step
  of the plan reported in order (all fit in 420 s here, so all ran), each step's rows before its
  `run_all` row, diffusers beside every bench, one train-step batch with remat full, nothing written
  into the repository's RESULTS.md. Held to the GPU image's packages and the carried wheels
  (tests/held_site/sitecustomize.py): a step importing anything else would fail on the device too."""
  out = tmp_path / "RESULTS.md"
  before = (BENCH / "RESULTS.md").read_bytes()
  proc = subprocess.run(["bash", str(BENCH / "run_all.sh"), "--budget=420", "--smoke", f"--out={out}"],
                        capture_output=True, text=True, timeout=300, check=False, env=held_env("gpu_image"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (BENCH / "RESULTS.md").read_bytes() == before
  text = out.read_text()
  assert re.search(r"^## run_all.sh --budget=420 --smoke: cpu \(smoke\), \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
  ceilings = re.search(r"bf16 256\^3 matmul ([\d.]+) TFLOP/s; device copy of 4 MiB ([\d.]+) GB/s", text)
  assert ceilings and float(ceilings.group(1)) > 0 and float(ceilings.group(2)) > 0
  table = _table(out)
  plan = [r for r in table if r["bench"] == "run_all"]
  assert [r["case"] for r in plan] == ["ceilings"] + PLAN_STEPS
  for r in plan[1:]:
    assert re.fullmatch(r"ran in [\d.]+ s of a \d+ s slice", r["figure"]), r
    assert float(r["median ms"]) > 0
  benches = [r["bench"] for r in table if r["bench"] != "run_all"]
  assert benches == sorted(benches, key=PLAN_STEPS.index)  # in the plan's order
  for name in PLAN_STEPS:  # each bench's rows sit right before its plan row, diffusers among them
    rows = [r for r in table if r["bench"] == name]
    assert any(r["impl"].startswith("diffusers eager") for r in rows), name
    assert not any("torch.compile" in r["impl"] for r in rows)  # eager only in the plan
    assert table.index(rows[-1]) + 1 == table.index(next(p for p in plan if p["case"] == name))
  impls = {r["impl"] for r in table if r["bench"] == "linear_attention"}
  assert {"sanajax xla", "sanajax pallas_triton", "sanajax pallas_mosaic_gpu"} <= impls
  trained = [r["case"] for r in table if r["impl"] == "sanajax adamw bf16"]
  assert trained == ["512px B=1 remat=full (tiny DiT)"]  # one batch, remat full: no search
  assert re.search(r"^Total \d+ s of the 420 s budget; 5 of 5 steps ran\.$", text, re.M)


def test_run_plan_slices_skips_stops_and_failures(tmp_path):
  """With fake scripts: a step that would not fit is skipped with the reason, a step that passes its
  slice is stopped with none of its rows written, a failure is reported and the plan goes on."""
  plan_mod = _script("run_plan")
  Step = plan_mod.Step
  # "slow" gets 0.1 / 3.1 of the ~18 s left after the ceilings: about half a second.
  plan = (Step("fast", 1.0, 0, ()), Step("slow", 0.1, 0, ()), Step("broken", 1.0, 0, ()), Step("huge", 1.0, 1e6, ()))

  class Fake:
    def __init__(self, name):
      self.name = name

    def main(self, argv):
      results = argv[argv.index("--results") + 1]
      hx.append_rows(results, [hx.Row(self.name, "c", "sanajax", 1.0, "f", "t", "no")], device="d", versions_text="v")
      if self.name == "slow":
        time.sleep(30)  # SIGALRM stops it at its slice
      if self.name == "broken":
        raise RuntimeError("boom\nsecond line")

  args = plan_mod.parse_args(["--budget=20", "--out", str(tmp_path / "R.md")])  # not smoke: the steps' minimums
  start = time.monotonic()
  assert plan_mod.run(args, plan=plan, load=Fake) == 1
  assert time.monotonic() - start < 20  # "slow" did not sleep its 30 s
  table = _table(tmp_path / "R.md")
  status = {r["case"]: r["figure"] for r in table if r["bench"] == "run_all"}
  assert re.fullmatch(r"ran in [\d.]+ s of a [\d.]+ s slice", status["fast"])
  assert re.fullmatch(r"stopped at its \d+ s slice: no rows written in [\d.]+ s of a \d+ s slice", status["slow"])
  assert status["broken"].startswith("failed: RuntimeError: boom in ")
  assert status["huge"].startswith("skipped: needs ~")
  assert [r["bench"] for r in table if r["bench"] != "run_all"] == ["fast"]  # stopped / failed steps wrote nothing
  text = (tmp_path / "R.md").read_text()
  assert "- fast c (sanajax, 1.000 ms) misses `t`" in text and "budget; 1 of 4 steps ran." in text
  # The slices: shares of the time left by weight, at least the minimum, at most what is left.
  assert plan_mod.slice_for(plan, 0, 31.0, False) == (10.0, None)  # weight 1 of 3.1
  two = (Step("a", 1.0, 60, ()), Step("b", 1.0, 0, ()))
  assert plan_mod.slice_for(two, 0, 100.0, False) == (60.0, None)  # at least its minimum
  assert plan_mod.slice_for(two, 0, 70.0, True) == (35.0, None)  # smoke: minimum 1 s
  assert plan_mod.slice_for(two, 1, 5.0, False) == (5.0, None)  # at most what is left
  assert plan_mod.slice_for(plan, 3, 0.2, False)[1] == "skipped: needs ~1000000 s, 0 s of the budget left"
  assert plan_mod.slice_for(plan, 3, 0.2, True) == (0.0, "skipped: needs ~1 s, 0 s of the budget left")


def test_remat_policies_of_the_benchmark_exist():
  assert remat_policy("full") is None
  for name in _script("train_step").DEFAULT_POLICIES.split(","):
    if name not in ("none", "full"):
      assert remat_policy(name) is getattr(jax.checkpoint_policies, name)
  with pytest.raises(ValueError, match="Unknown remat policy"):
    remat_policy("dots_savable")


def test_train_step_donates_the_state():
  """The lowered step aliases every state leaf to an output (lowering only: no compile)."""
  module = _script("train_step")
  config = module.load_config(512, "full", 1, True)
  state = jax.eval_shape(module.make_state_fn(config), jax.random.PRNGKey(0))
  batch = jax.eval_shape(lambda key: module.make_batch(config, key), jax.random.PRNGKey(1))
  text = module.make_train_step(config).lower(state, batch).as_text()
  assert text.count("tf.aliasing_output") == len(jax.tree.leaves(state)) > 0


def test_loop_reads_the_device_only_at_log_and_checkpoint_steps(monkeypatch):
  state = create_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1), jax.random.PRNGKey(0))
  current = {"step": 0}
  synced_at = []
  real_get = jax.device_get
  monkeypatch.setattr(loop_lib.jax, "device_get", lambda x: (synced_at.append(current["step"]), real_get(x))[1])

  def step_fn(s, batch):
    current["step"] += 1
    return s.replace(step=s.step + 1), {"loss": jnp.float32(batch)}

  class Ckpt:
    directory = "none"

    def save(self, step, s, data_state):
      pass

    def wait(self):
      pass

    def check_save(self):
      pass

  class Writer:
    def __init__(self):
      self.logged = []

    def scalars(self, step, row):
      self.logged.append(step)

  writer = Writer()
  config = loop_lib.LoopConfig(num_steps=12, batch_size=1, log_every=5, checkpoint_every=8)
  loop_lib.run(config, state, step_fn, iter(range(100)), Ckpt(), writer)
  assert writer.logged == [5, 10, 12]
  assert set(synced_at) == {0, 5, 8, 10, 12}  # start, log steps, checkpoint steps, the last step


def test_sprint_sample_step_lowers_for_cuda_at_its_real_shapes():
  """The device call's sprint_sample step, its own jitted sampler (benchmarks/sprint_sample.py) at Sprint-1600M,
  1 step at 1024 px with the Triton kernels, lowered for cuda from abstract parameters: the DiT's scanned body
  (one state + output kernel pair) and the DC-AE decoder's EfficientViT blocks (one pair each)."""
  import flax.linen as nn

  from sanajax.models import dcae, sana_dit

  module = _script("sprint_sample")
  config = module.load_config(False, "pallas_triton")
  dit, ae = sana_dit.build_dit(config.model), dcae.build_dcae(config.ae)
  p, f = config.model.patch_size, dcae.downsample_factor(config.ae)
  dit_params = jax.eval_shape(lambda *a: nn.unbox(dit.init(jax.random.PRNGKey(0), *a))["params"],
                              *sana_dit.dummy_inputs(config.model, (p, p), 1))
  ae_params = jax.eval_shape(lambda x: nn.unbox(ae.init(jax.random.PRNGKey(1), x))["params"],
                             jax.ShapeDtypeStruct((1, 2 * f, 2 * f, config.ae.in_channels), jnp.float32))
  bf16 = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), tree)
  noise, ctx, mask = jax.eval_shape(lambda k: module.make_inputs(config, 1, k), jax.random.PRNGKey(0))
  run = module.sanajax_sampler(config, float(config.ae.scaling_factor), steps=1)
  calls = lowering.kernel_calls(run, bf16(dit_params), bf16(ae_params), noise, ctx, mask, jax.random.PRNGKey(2))
  assert noise.shape == (1, 1024 // f, 1024 // f, config.model.in_channels)
  assert calls == [lowering.TRITON] * (2 + 2 * lowering.efficientvit_blocks(config.ae)), calls
