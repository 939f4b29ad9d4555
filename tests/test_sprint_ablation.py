"""experiments.sprint_ablation: the three distillations, the evaluation table, resume, bad teacher dirs."""
import json
import math
import os

import jax
import numpy as np
import pytest
from small_configs import (
  SMALLEST_MODEL,  # tests/small_configs.py (tests/ is on sys.path)
)

from experiments import sprint_ablation
from sanajax import config_utils
from sanajax.training import dit as train_lib
from sanajax.training import sprint, sprint_config
from sanajax.training.optim import build_optimizer
from sanajax.workdir.loaders import build_text_encoder, init_dit_params, load_ae

# Nearly all of this file's time is XLA compiling on the CPU (the teacher's AE and DiT steps, three
# distillation steps, four samplers): the teacher is the smallest model (tests/small_configs.py).
# 64 px, not 32: XLA:CPU compiles the random draws of 8x8x8 latents (every distillation step and
# sampler has several) ~2.5x faster than those of 4x4x8 ones (measured).
SMALL = {"data.resolution": 64, **SMALLEST_MODEL, "train.batch_size": 4}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny teacher (SMALL: 64 px, 1 block, h 64) trained for 2 steps on its own 2-step AE; 6 GenEval prompts."""
  d = tmp_path_factory.mktemp("teacher")
  config = config_utils.load_config("configs/tiny.py", overrides={
      **SMALL, "ae.workdir": str(d / "ae"), "ae_train.num_steps": 2, "ae_train.batch_size": 4,
      "ae_train.log_every": 1, "train.num_steps": 2, "train.log_every": 1, "train.checkpoint_every": 2,
      "train.warmup_steps": 1, "eval.num_prompts": 6})
  train_lib.train(config, str(d))
  return d


def test_sprint_tiny_taps_the_default_teachers_blocks_like_the_reference():
  # The reference taps blocks 2, 8, 14, 19 of 20 (spread over the depth, the last block included);
  # configs/sprint_tiny.py does the same over configs/tiny.py's depth, as spread_blocks does for
  # other teachers (6 blocks: 1, 3, 5), so a change of the default's depth must update it.
  assert sprint_config.spread_blocks(6, 3) == (1, 3, 5)
  depth = config_utils.load_config("configs/tiny.py").model.depth
  ids = tuple(config_utils.load_config("configs/sprint_tiny.py").distill.head_block_ids)
  assert ids == sprint_config.spread_blocks(depth, 3) and max(ids) == depth - 1, (ids, depth)


def test_bad_teacher_dir_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="does not exist"):
    sprint_ablation.main(["--teacher_workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
  with pytest.raises(SystemExit, match="no config.json"):
    sprint_ablation.main(["--teacher_workdir", str(tmp_path), "--out", str(tmp_path / "o")])
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "config.json").write_text(json.dumps(config_utils.load_config("configs/tiny.py").to_dict()))
  with pytest.raises(SystemExit, match="no checkpoint"):
    sprint_ablation.main(["--teacher_workdir", str(tmp_path / "t"), "--out", str(tmp_path / "o")])


def test_variants_skip_the_work_they_do_not_need(teacher_dir, monkeypatch):
  """LADD only never computes the sCM targets (teacher velocity + JVP); sCM only never builds the
  discriminator's inputs. Counted while tracing one step of each variant (jax.eval_shape on
  abstract weights: no compilation)."""
  calls = {"scm_targets": 0, "discriminator_inputs": 0}
  for name in calls:
    original = getattr(sprint.SprintDistiller, name)
    def counted(self, *a, _original=original, _name=name, **k):
      calls[_name] += 1
      return _original(self, *a, **k)
    monkeypatch.setattr(sprint.SprintDistiller, name, counted)
  teacher_config = sprint_config.check_teacher(str(teacher_dir))
  ae_model, ae_params, ae_scaling, _ = load_ae(str(teacher_dir / "ae"))
  for variant, overrides in sprint_ablation.VARIANTS:
    config = sprint_config.student_config(teacher_config, str(teacher_dir), 1,
                                            {**overrides, "train.batch_size": 4})
    text = build_text_encoder(config)
    tx, schedule = build_optimizer(config.train, 1)
    distiller = sprint.SprintDistiller(config, teacher_config, ae_model, ae_scaling, text, tx, tx, schedule)
    student = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
    state = jax.eval_shape(distiller.init_state, student, jax.random.PRNGKey(1))
    teacher = jax.eval_shape(lambda: init_dit_params(teacher_config, jax.random.PRNGKey(0)))
    frozen = {"ae": ae_params, "text": text.params, "teacher": teacher}
    ids = np.ones((4, config.text.max_length), np.int32)
    res = config.data.resolution
    batch = {"image": np.zeros((4, res, res, 3), np.float32), "input_ids": ids, "attention_mask": ids}
    calls.update(scm_targets=0, discriminator_inputs=0)
    _, metrics = jax.eval_shape(distiller.step_fn, state, frozen, batch)
    expected = {"scm_only": (1, 0), "ladd_only": (0, 1), "scm_ladd": (1, 1)}[variant]
    assert (calls["scm_targets"], calls["discriminator_inputs"]) == expected, variant
    assert ("scm_loss" in metrics, "d_loss" in metrics) == (expected[0] == 1, expected[1] == 1), variant


def test_driver_writes_every_row_and_resumes(teacher_dir, tmp_path):
  out = tmp_path / "ablation"
  args = ["--teacher_workdir", str(teacher_dir), "--out", str(out), "--steps", "2", "--num_fid", "16",
          "--set", "train.batch_size=4", "--set", "train.log_every=1"]
  assert sprint_ablation.main(args) == 0
  result = json.loads((out / "ablation.json").read_text())
  rows = {(r["model"], r["sampler"], r["steps"]) for r in result["rows"]}
  assert rows == {("teacher", "flow_dpm", 20)} | {(m, "scm", k) for m in ("scm_only", "ladd_only", "scm_ladd")
                                                  for k in (1, 2, 4)}
  for r in result["rows"]:
    assert r["num_geneval"] == 6 and r["num_fid"] == 16
    assert 0.0 <= r["geneval_overall"] <= 1.0
    assert math.isfinite(r["fid_lite"]) and r["fid_lite"] > 0  # 2-step models are far from the data.
  for name in ("scm_only", "ladd_only", "scm_ladd"):
    metrics = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    # Each variant logged the losses it trains and only those.
    assert ("scm_loss" in keys) == (name != "ladd_only") and ("d_loss" in keys) == (name != "scm_only"), keys
  table = (out / "ablation.md").read_text().splitlines()
  assert len(table) == 2 + 10 and all("nan" not in line for line in table)
  assert set(result["targets"]) >= {"one_step_within_0.05", "four_step_at_least_teacher"}

  # A second call finds every run finished and every row cached: same numbers, no new samples.
  stamps = {p: os.path.getmtime(out / "evals" / p) for p in os.listdir(out / "evals")}
  assert sprint_ablation.main(args) == 0
  assert json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]
  assert {p: os.path.getmtime(out / "evals" / p) for p in os.listdir(out / "evals")} == stamps

  # The same command with a larger --steps continues the run from its checkpoint and re-samples
  # its rows (they came from the step-2 weights); the teacher's rows stay cached.
  longer = ["--teacher_workdir", str(teacher_dir), "--out", str(out), "--steps", "3", "--num_fid", "16",
            "--variants", "scm_ladd", "--set", "train.batch_size=4", "--set", "train.log_every=1"]
  assert sprint_ablation.main(longer) == 0
  rows = {(r["model"], r["steps"]): r for r in json.loads((out / "ablation.json").read_text())["rows"]}
  assert {r["checkpoint_step"] for (m, _), r in rows.items() if m == "scm_ladd"} == {3}
  assert rows[("teacher", 20)]["checkpoint_step"] == 2
  now = {p: os.path.getmtime(out / "evals" / p) for p in os.listdir(out / "evals")}
  assert {p for p in now if now[p] != stamps[p]} == {f"scm_ladd_scm{k}.json" for k in (1, 2, 4)}

  # --num_prompts re-scores every row it shows on that many prompts (the run is not distilled again).
  assert sprint_ablation.main(longer + ["--num_prompts", "12"]) == 0
  rows = json.loads((out / "ablation.json").read_text())["rows"]
  assert len(rows) == 4 and {r["num_geneval"] for r in rows} == {12}
  assert json.loads((out / "scm_ladd" / "ablation_timing.json").read_text())["steps"] == 3
