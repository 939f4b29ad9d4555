"""SANA-Sprint of an MM-DiT teacher (issue 28): `configs/sprint_tiny.py` on a model.name='mmdit' workdir.

The student takes the teacher's MM-DiT (sprint.with_teacher_architecture) plus the CFG embedding;
these check that it starts as the teacher, that the sCM tangent's jax.jvp through the MM-DiT is its
derivative, that a few sCM + LADD steps train it, that it samples with the sCM sampler and that an
MM-DiT Sprint cannot take is refused in one line.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_configs import RESBLOCK_AE  # tests/small_configs.py (tests/ is on sys.path)
from test_sprint_distill import check_tangent_against_central_differences

from sanajax import config_utils
from sanajax.config_check import ConfigError
from sanajax.diffusion import trigflow
from sanajax.generation import Generator
from sanajax.models.backbones import build_backbone
from sanajax.training import dit as train_lib
from sanajax.training import sprint
from sanajax.training.metrics import read_metrics
from sanajax.workdir.loaders import init_dit_params, load_dit_params

# Over ~2 minutes (measured 123 s of CPU, shared AE build included, on cores loaded ~8x; 25 min of wall
# clock there at nice 19): it trains a teacher, distils and samples, so it sits in the slow suite.
pytestmark = pytest.mark.slow

# Odd sizes: 3 joint blocks of width 20 (1 head of 20; the sin-cos PE needs a multiple of 4), 32 px
# (2 x 2 tokens of the 4 x 4 latents), one text layer, the ResBlock AE (tests/tiny_base.py's, trained once a run).
TEACHER = {"data.resolution": 32, "model.num_layers": 3, "model.num_attention_heads": 1,
           "model.attention_head_dim": 20, "model.caption_projection_dim": 20, "model.sample_size": 4,
           "text.num_layers": 1, **RESBLOCK_AE, "train.batch_size": 4, "train.num_steps": 3, "train.log_every": 1,
           "train.checkpoint_every": 3, "train.warmup_steps": 1, "eval.num_prompts": 0,
           "sample.cfg_interval": (0.5, 1.0)}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_ae):
  """A tiny random MM-DiT teacher trained 3 steps on the test run's shared AE (tests/conftest.py tiny_ae)."""
  d = tmp_path_factory.mktemp("mmdit_teacher")
  config = config_utils.load_config("configs/mmdit_tiny.py", overrides={**TEACHER, "ae.workdir": tiny_ae})
  train_lib.train(config, str(d))
  return d


def sprint_config(teacher_dir, **overrides):
  """configs/sprint_tiny.py (a SANA DiT config) pointed at the MM-DiT teacher; the text / AE / data
  fields must be the teacher's, the model section becomes the teacher's."""
  base = {"data.resolution": 32, "text.num_layers": 1, **RESBLOCK_AE, "teacher_workdir": str(teacher_dir),
          "train.batch_size": 4, "train.num_steps": 3, "train.log_every": 1, "train.checkpoint_every": 3,
          "train.warmup_steps": 1, "distill.tangent_warmup_steps": 1, "eval.num_prompts": 0}
  base.update(overrides)
  return config_utils.load_config("configs/sprint_tiny.py", overrides=base)


def test_student_starts_as_the_mmdit_teacher_and_its_jvp_is_the_derivative(teacher_dir):
  # Dense time (Sprint's timestep_scale 0.001): with 1000 t, F oscillates in t on a 1e-3 scale and
  # no float32 difference quotient resolves it (as test_sprint_distill's JVP test).
  config = sprint.with_teacher_architecture(sprint_config(teacher_dir, **{"model.timestep_scale": 0.001}))
  assert config.model.name == "mmdit" and config.model.num_layers == 3 and config.model.guidance_embeds
  assert config.model.timestep_scale == 0.001
  assert tuple(config.distill.head_block_ids) == (0, 1, 2)  # (0, 2, 3) of SANA's 4 blocks, spread over 3
  teacher_config, teacher_params = sprint.load_teacher(str(teacher_dir))
  teacher, student = build_backbone(teacher_config.model), build_backbone(config.model)
  assert student.guidance_embeds and not teacher.guidance_embeds
  student_f32 = build_backbone(config.model, dtype=jnp.float32)
  params = sprint.init_student_from_teacher(init_dit_params(config, jax.random.PRNGKey(0)), teacher_params)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
  ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 64))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
  cfg = jnp.array([4.0, 5.0])

  # The zero-initialised CFG embedding: the student is the teacher's (conditional) MM-DiT. It embeds
  # dense time, so compare at the same embedder input (teacher t = student t / 1000).
  t = jnp.array([0.3, 0.7])
  teacher_v = teacher.apply({"params": teacher_params}, x, t / 1000.0, ctx, mask)
  student_v = student.apply({"params": params}, x, t, ctx, mask, guidance=cfg)
  np.testing.assert_allclose(np.asarray(student_v), np.asarray(teacher_v), rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(teacher_v))) > 1e-3  # a trained teacher, not zeros

  # A zero CFG embedder or adaLN would hide inputs from the check: perturb every leaf.
  leaves, tree = jax.tree.flatten(nn.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  # The student's TrigFlow F as the distiller's JVP sees it (SprintDistiller.student_F, f32).
  F_fn = jax.jit(trigflow.flow_to_trigflow(
      lambda x_f, t_f: student_f32.apply({"params": params}, x_f, t_f, ctx, mask, guidance=cfg)))
  check_tangent_against_central_differences(F_fn, x, min_gap=20.0, label="MM-DiT ")


def test_mmdit_teacher_distils_and_samples(teacher_dir, tmp_path):
  workdir = str(tmp_path / "student")
  assert sprint.distill(sprint_config(teacher_dir), workdir) == {}
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "scm_loss", "adv_loss", "d_loss", "tangent_norm"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(r["tangent_norm"] > 0 for r in rows)  # the JVP term is in the target

  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["name"] == "mmdit" and saved["model"]["guidance_embeds"] is True
  assert saved["model"]["num_layers"] == 3 and saved["model"]["attention_head_dim"] == 20
  # The student moved away from the teacher it was initialised from.
  teacher = nn.unbox(load_dit_params(str(teacher_dir), ema=True))
  student = nn.unbox(load_dit_params(workdir, ema=False))
  t_leaf = np.asarray(teacher["transformer_blocks_1"]["ff"]["net_2"]["kernel"])
  s_leaf = np.asarray(student["transformer_blocks_1"]["ff"]["net_2"]["kernel"])
  assert t_leaf.shape == s_leaf.shape and float(np.max(np.abs(s_leaf - t_leaf))) > 1e-6
  g = student["time_text_embed"]["guidance_embedder"]["linear_2"]["kernel"]
  assert float(np.max(np.abs(np.asarray(g)))) > 0  # the zero-initialised CFG embedding trained

  # What sanajax.sample --sampler=scm and the after-training evaluation (1, 2, 4 steps) run.
  generator = Generator.from_workdir(workdir)
  one = generator.generate(["a red circle", "two blue squares"], sampler="scm", steps=1, seed=3)
  two = generator.generate(["a red circle", "two blue squares"], sampler="scm", steps=2, seed=3)
  assert one.shape == two.shape == (2, 32, 32, 3) and one.dtype == np.uint8
  assert np.any(one != two)  # the second step changes the sample


def test_an_mmdit_teacher_sprint_cannot_take_is_refused_in_one_line(teacher_dir, tmp_path):
  """SD3's CLIP-pooled MM-DiT (model.pooled_text='clip'): refused before any work, naming the field."""
  clip_teacher = tmp_path / "clip_teacher"
  shutil.copytree(teacher_dir, clip_teacher)
  path = clip_teacher / "config.json"
  saved = json.loads(path.read_text())
  saved["model"]["pooled_text"] = "clip"
  path.write_text(json.dumps(saved))
  workdir = tmp_path / "student"
  with pytest.raises(ConfigError) as e:
    sprint.distill(sprint_config(clip_teacher), str(workdir))
  message = str(e.value)
  print(message)
  assert len(e.value.problems) == 1 and "\n" not in message
  assert "model.pooled_text='clip': Sprint distils single-encoder MM-DiTs only" in message and "masked_mean" in message
  assert not workdir.exists()
