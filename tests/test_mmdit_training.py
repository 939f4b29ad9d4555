"""The MM-DiT on sanajax's paths: the backbone dispatch, config checks, a short train -> resume ->
sample on shapes, the info facts and the converter's export (issue 28's first wave)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_configs import RESBLOCK_AE  # tests/small_configs.py (tests/ is on sys.path)

from sanajax import config_utils
from sanajax.config_check import ConfigError, validate_config
from sanajax.convert import save_diffusers
from sanajax.eval import after_training
from sanajax.generation import Generator
from sanajax.models import backbones, mmdit, sana_dit
from sanajax.models.dit_facts import describe
from sanajax.training import dit as train_lib
from sanajax.training.metrics import read_metrics

# The smallest MM-DiT the checks need: 2 blocks of width 32 (1 head of 32), 32 px, one text layer.
SMALL = {"data.resolution": 32, "model.num_layers": 2, "model.num_attention_heads": 1,
         "model.caption_projection_dim": 32, "model.sample_size": 4, "text.num_layers": 1, **RESBLOCK_AE,
         "ae_train.num_steps": 2, "ae_train.batch_size": 4, "ae_train.log_every": 1, "train.batch_size": 4,
         "train.num_steps": 4, "train.log_every": 1, "train.checkpoint_every": 2, "train.warmup_steps": 1,
         "eval.num_prompts": 6, "eval.euler_steps": 0, "eval.restoration_t0": 0.0}


def small_config(tmp_path, **overrides):
  return config_utils.load_config("configs/mmdit_tiny.py", overrides={
      **SMALL, "ae.workdir": str(tmp_path / "ae"), **overrides})


def test_build_backbone_dispatches_on_model_name():
  assert isinstance(backbones.build_backbone(config_utils.load_config("tiny").model), sana_dit.SanaDiT)
  m = config_utils.load_config("mmdit_tiny").model
  model = backbones.build_backbone(m)
  assert isinstance(model, backbones.MMDiTBackbone) and not model.guidance_embeds
  assert backbones.context_channels(m) == m.joint_attention_dim == 64
  with pytest.raises(ValueError, match="model.name='nope'"):
    backbones.build_backbone({**m.to_dict(), "name": "nope"})
  with pytest.raises(ValueError, match="pooled_projection_dim"):
    backbones.build_backbone({**m.to_dict(), "pooled_projection_dim": 32})


def test_the_pooled_text_is_the_masked_mean_of_the_encoder_states():
  m = config_utils.load_config("mmdit_tiny", overrides={"model.num_layers": 1}).model
  model = backbones.build_backbone(m)
  x, t, ctx, mask = (jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, m.in_channels)), jnp.array([0.3, 0.8]),
                     jax.random.normal(jax.random.PRNGKey(1), (2, 5, 64)), jnp.array([[1, 1, 1, 0, 0], [1] * 5]))
  params = model.init(jax.random.PRNGKey(2), x, t, ctx, mask)["params"]
  # adaLN-Zero starts every output at 0: perturb every weight so the output depends on the pooled text.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = treedef.unflatten([v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
  got = model.apply({"params": params}, x, t, ctx, mask)
  pooled = np.stack([np.asarray(ctx[0, :3]).mean(0), np.asarray(ctx[1]).mean(0)])
  want = model.model.apply({"params": params}, x, t, ctx, jnp.asarray(pooled), mask)
  assert float(jnp.max(jnp.abs(got))) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  other = model.apply({"params": params}, x, t, ctx, mask, pooled=jnp.zeros((2, 64)))
  assert float(jnp.max(jnp.abs(other - got))) > 1e-4  # pooled= overrides the mean


def test_mmdit_config_fields_are_checked():
  base = config_utils.load_config("mmdit_tiny")
  validate_config(base, "dit")
  bad = config_utils.load_config("mmdit_tiny", overrides={"model.caption_projection_dim": 48,
                                                          "model.joint_attention": "flash"})
  with pytest.raises(ConfigError) as e:
    validate_config(bad, "dit")
  text = str(e.value)
  assert "model.caption_projection_dim=48: must equal num_attention_heads x attention_head_dim = 64" in text
  assert "model.joint_attention='flash'" in text
  sprint = config_utils.load_config("mmdit_tiny", overrides={"model.pooled_text": "clip"})
  with pytest.raises(ConfigError, match="model.pooled_text='clip': Sprint distils single-encoder MM-DiTs only"):
    validate_config(sprint, "sprint")  # tests/test_sprint_mmdit.py distils a masked-mean MM-DiT


def test_info_counts_the_mmdit_as_diffusers_does():
  config = config_utils.load_config("mmdit_tiny")
  facts = describe(config)
  assert facts["total_params"] == mmdit.param_count(config.model)
  assert facts["depth"] == 5 and facts["hidden_size"] == 64 and facts["image_tokens"] == 16
  linear = describe(config_utils.load_config("mmdit_tiny", overrides={"model.joint_attention": "linear"}))
  assert linear["total_params"] == facts["total_params"]
  assert linear["forward_flops"] != facts["forward_flops"]


def test_mmdit_trains_resumes_and_samples(tmp_path):
  """dit.train with model.name='mmdit': finite losses, a resumed run continues to num_steps, the
  Generator and the after-training evaluation sample the workdir."""
  config = small_config(tmp_path)
  workdir = str(tmp_path / "run")
  assert train_lib.train(config, workdir) == {}
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  longer = small_config(tmp_path, **{"train.num_steps": 6})
  result = train_lib.train(longer, workdir, evaluate=after_training.evaluate_dit_run)
  assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert result["num_images"] == 6 and 0.0 <= result["overall"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  generator = Generator.from_workdir(workdir)
  a = generator.generate(["a red circle", "two blue squares"], steps=2, seed=3)
  b = generator.generate(["a red circle", "two blue squares"], steps=2, seed=3)
  assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)


def test_convert_save_diffusers_exports_an_mmdit(tmp_path):
  m = config_utils.load_config("mmdit_tiny", overrides={"model.num_layers": 1}).model
  model = mmdit.build_mmdit(m)
  inputs = [jnp.zeros(a.shape, a.dtype) for a in mmdit.init_args(m)]
  params = model.init(jax.random.PRNGKey(0), *inputs)["params"]
  save_diffusers(str(tmp_path / "transformer"), model, jax.tree.map(np.asarray, params))
  with open(tmp_path / "transformer" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["_class_name"] == "SD3Transformer2DModel" and cfg["num_layers"] == 1
  assert cfg["joint_attention_dim"] == 64 and cfg["qk_norm"] == "rms_norm"
