"""experiments.time_sampler_study: two micro runs end to end (study.json, study.md, the plot), a resume that
neither retrains nor re-scores, and a validation loss that depends on (params, data, times, noise) only."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from small_configs import RESBLOCK_AE  # tests/small_configs.py (tests/ is on sys.path)

from experiments import time_sampler_study as study
from sanajax.generation import Generator
from sanajax.workdir.files import load_workdir_config
from sanajax.workdir.loaders import init_dit_params

# The smallest MM-DiT (1 block of width 32, 32 px, one text layer; tests/test_mmdit_training.py's sizes) on
# the shared test AE (conftest's tiny_ae: RESBLOCK_AE at 32 px); 2 steps, a checkpoint after each.
SMALL = {"data.resolution": 32, "model.num_layers": 1, "model.num_attention_heads": 1,
         "model.caption_projection_dim": 32, "model.sample_size": 4, "text.num_layers": 1, **RESBLOCK_AE,
         "train.batch_size": 4, "train.log_every": 1, "train.warmup_steps": 1}
SAMPLERS = ("logit_normal", "uniform")


def _argv(out, ae):
  sets = [f"--set={k}={v!r}" for k, v in SMALL.items()]
  return ["--out", str(out), "--ae_workdir", ae, "--steps", "2", "--checkpoint_every", "1", "--num_prompts", "2",
          "--final_prompts", "3", "--num_val", "3", "--num_times", "3", "--samplers", ",".join(SAMPLERS), *sets]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_ae):
  out = tmp_path_factory.mktemp("study")
  assert study.main(_argv(out, tiny_ae)) == 0
  return out, tiny_ae


def test_runs_end_to_end_and_resumes_without_retraining(ran, monkeypatch):
  out, ae = ran
  result = json.loads((out / "study.json").read_text())
  got = sorted((r["sampler"], r["step"], r["num_prompts"]) for r in result["rows"])
  assert got == sorted((s, step, 3 if step == 2 else 2) for s in SAMPLERS for step in (1, 2)), got
  assert result["times"] == pytest.approx([1 / 6, 0.5, 5 / 6])
  for r in result["rows"]:
    assert np.isfinite(r["val_loss"]) and len(r["val_loss_per_t"]) == 3 and 0 <= r["geneval_overall"] <= 1
    assert r["val_loss"] == pytest.approx(np.mean(r["val_loss_per_t"]))
  # The runs differ only in their time sampler (the fields --set named are recorded as overrides).
  a, b = (load_workdir_config(str(out / s)).to_dict() for s in SAMPLERS)
  flat = lambda d, p="": {f"{p}{k}": v for key, val in d.items() for k, v in (
      flat(val, f"{key}.").items() if isinstance(val, dict) else [(key, val)]) if k != "cli_overrides"}
  fa, fb = flat(a), flat(b)
  assert {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} == {"diffusion.weighting"}
  assert fa["train.keep_checkpoints"] >= 3 and fa["eval.euler_steps"] == 0 and fa["eval.restoration_t0"] == 0
  assert (out / "time_samplers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (out / "study.md").read_text()
  assert all(f"| {s} | {r['geneval_overall']:.3f} |" in table for s, r in study.final_rows(result).items())

  # Restarted with the same command: nothing is trained or scored again, and the results are the same.
  def refuse(*a, **k):
    raise AssertionError("a finished run was redone")
  monkeypatch.setattr(study, "train", refuse)
  monkeypatch.setattr(study, "score_checkpoint", refuse)
  assert study.main(_argv(out, ae)) == 0
  assert json.loads((out / "study.json").read_text())["rows"] == result["rows"]


def test_validation_loss_is_one_function_of_params_data_and_times(ran):
  out, _ = ran
  configs = {s: load_workdir_config(str(out / s)) for s in SAMPLERS}
  generator = Generator.from_workdir(str(out / SAMPLERS[0]))
  # The held-out set and its noise are the same whichever run's config builds them.
  sets = [study.validation_set(generator, configs[s], 3, 3) for s in SAMPLERS]
  for k in sets[0]:
    np.testing.assert_array_equal(np.asarray(sets[0][k]), np.asarray(sets[1][k]), err_msg=k)
  val = sets[0]
  # The MM-DiT starts with adaLN-Zero output layers: its velocity is 0, so the loss at t is mean((eps_t - x0)^2).
  fresh = init_dit_params(configs[SAMPLERS[0]], jax.random.PRNGKey(0))
  want = [np.mean(np.square(np.asarray(val["noise"][k], np.float64) - np.asarray(val["latents"], np.float64)))
          for k in range(3)]
  np.testing.assert_allclose(study.validation_loss(generator.dit, fresh, val), want, rtol=1e-5)
  # Every row is that function of its checkpoint's EMA params, whichever sampler trained them: the other
  # run's set gives the same numbers, and two runs' (different) params give different ones.
  rows = {(r["sampler"], r["step"]): r for r in json.loads((out / "study.json").read_text())["rows"]}
  losses = {}
  for s in SAMPLERS:
    params = study.checkpoint_params(str(out / s), configs[s], 2)
    losses[s] = study.validation_loss(generator.dit, params, sets[1])
    np.testing.assert_allclose(losses[s], rows[(s, 2)]["val_loss_per_t"], rtol=1e-6)
  assert not np.allclose(losses[SAMPLERS[0]], losses[SAMPLERS[1]], rtol=1e-7, atol=0)


def test_the_sampler_fields_cannot_be_overridden(tmp_path):
  with pytest.raises(SystemExit, match="diffusion.weighting"):
    study.main(["--out", str(tmp_path), "--set", "diffusion.weighting=uniform"])
  with pytest.raises(SystemExit, match="--samplers"):
    study.main(["--out", str(tmp_path), "--samplers", "lognorm"])
