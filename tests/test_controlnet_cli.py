"""ControlNet end to end on the smallest models: train a few steps with the CLI, resume, sample with a control
image (resized, with a warning), a Sprint student steered by it (scm, 1 and 2 steps), and the user errors.

Slow (several CLI subprocesses, each compiling its programs): marked `slow`.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_cli import assert_user_error, run_cli  # tests/test_cli.py helpers (tests/ is on sys.path)
from tiny_base import AE_OVERRIDES

from sanajax import config_utils
from sanajax.generation import Generator
from sanajax.models.sana_dit import build_dit, student_params_from_teacher
from sanajax.training.dit import train
from sanajax.workdir.files import ae_workdir, load_workdir_config
from sanajax.workdir.loaders import build_text_encoder, load_ae, load_controlnet, load_dit_params

pytestmark = pytest.mark.slow

SMALL = ["--config.train.batch_size=4", "--config.train.log_every=1", "--config.eval.control_scenes=2",
         "--config.sample.steps=2", "--config.controlnet.num_layers=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ae):
  """{"base": a 2-block DiT trained 1 step (the shared AE), "cn": a ControlNet trained 2 steps on it by the CLI,
  "r": the run}."""
  root = tmp_path_factory.mktemp("controlnet")
  config = config_utils.load_config("configs/tiny.py", overrides={
      **AE_OVERRIDES, "ae.workdir": tiny_ae, "model.depth": 2, "train.batch_size": 4, "train.num_steps": 1,
      "train.log_every": 1, "data.latent_cache": 0, "eval.num_prompts": 0})
  base, cn = str(root / "base"), str(root / "cn")
  train(config, base)
  r = run_cli("sanajax.train", f"--config=configs/controlnet_tiny.py:{base}", f"--workdir={cn}",
              "--config.train.num_steps=2", *SMALL, timeout=600)
  return {"base": base, "cn": cn, "r": r, "root": root}


def test_train_evaluate_and_resume(runs):
  r = runs["r"]
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(runs["cn"], "control_fidelity.json")) as f:
    result = json.load(f)
  for side in ("with", "without"):
    assert 0.0 <= result[side]["mean_iou"] <= 1.0 and result[side]["num_scenes"] == 2
  r2 = run_cli("sanajax.train", f"--config=configs/controlnet_tiny.py:{runs['base']}", f"--workdir={runs['cn']}",
               "--config.train.num_steps=3", *SMALL, timeout=600)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "Resumed from checkpoint at step 2" in r2.stdout


def test_sample_with_a_control_image_of_the_wrong_size(runs, tmp_path):
  control = tmp_path / "edges.png"
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(control)
  out = tmp_path / "out"
  r = run_cli("sanajax.sample", f"--workdir={runs['cn']}", f"--control={control}", "--control_scale=0.8",
              "--prompt=a red circle", f"--out={out}", "--steps=2", timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resized to the model's 32x32" in r.stderr
  assert sorted(os.listdir(out)) == ["00000.png", "grid.png"]


@pytest.mark.parametrize("args,needles", [
    (("--workdir=BASE", "--control=C"), ("--control needs a ControlNet",)),
    (("--workdir=CN",), ("--control=IMAGE",)),
    (("--workdir=CN", "--control=/nonexistent.png"), ("does not exist",)),
    (("--workdir=CN", "--controlnet=CN", "--control=C"), ("is a ControlNet workdir",)),
    # A model's workdir as the ControlNet: said so (it was "No weights in BASE: expected *.safetensors ...").
    (("--workdir=BASE", "--controlnet=BASE", "--control=C"), ("is a sanajax workdir of another kind of run",
                                                            "pass a ControlNet workdir")),
])
def test_sample_errors_are_one_line(runs, tmp_path, args, needles):
  control = tmp_path / "c.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(control)
  args = [a.replace("BASE", runs["base"]).replace("=CN", "=" + runs["cn"]).replace("=C", f"={control}")
          if a != "--control=/nonexistent.png" else a for a in args]
  r = run_cli("sanajax.sample", *args, "--prompt=a red circle", f"--out={tmp_path / 'o'}", timeout=120)
  assert_user_error(r, *needles)


def test_bad_controlnet_config_is_refused_before_any_work(runs, tmp_path):
  r = run_cli("sanajax.train", f"--config=configs/controlnet_tiny.py:{runs['base']}", f"--workdir={tmp_path / 'x'}",
              "--config.controlnet.num_layers=2", timeout=120)
  assert_user_error(r, "controlnet.num_layers=2")
  assert not os.path.exists(tmp_path / "x")


def test_a_sprint_student_sampled_with_the_teachers_controlnet(runs):
  """The ControlNet trained on the teacher steers a Sprint student under scm (1 and 2 steps): the
  condition changes the images, and scale 0 gives the student alone."""
  base = runs["base"]
  config = load_workdir_config(base)  # the teacher's config, as a Sprint student of it has
  config.model.guidance_embeds = True
  config.ae.workdir = ae_workdir(config, base)
  tc = config
  student = build_dit(config.model)
  like = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, tc.model.in_channels)), jnp.zeros((1,)),
                      jnp.zeros((1, 1, tc.model.caption_channels)), jnp.ones((1, 1), jnp.int32))["params"]
  params = student_params_from_teacher(nn.unbox(load_dit_params(base)), nn.unbox(like))
  ae_model, ae_params, scaling, _ = load_ae(config.ae.workdir)
  gen = Generator(config, params, ae_model, ae_params, scaling, build_text_encoder(config), 8)
  plain = gen.generate(["a red circle"], sampler="scm", steps=1, cfg=4.5)
  model, cn_params, trained_on = load_controlnet(runs["cn"])
  assert trained_on == base
  gen.attach_controlnet(model, cn_params)
  edges = np.zeros((1, 32, 32, 3), np.uint8)
  edges[0, 8:24, 8] = 255
  for steps in (1, 2):
    gen.set_control(edges, 0.0)
    off = gen.generate(["a red circle"], sampler="scm", steps=steps, cfg=4.5)
    gen.set_control(edges, 1.0)
    on = gen.generate(["a red circle"], sampler="scm", steps=steps, cfg=4.5)
    if steps == 1:
      np.testing.assert_array_equal(off, plain)
    assert on.shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match="control images must be"):
    gen.set_control(edges[:, :16])
