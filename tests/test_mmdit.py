"""MM-DiT (SD3 / SD3.5): parity with diffusers' SD3Transformer2DModel, the weights round trip, the
text mask, the linear joint attention, parameter totals of the released architectures, and one
forward under an fsdp x tensor plan on 8 fake devices equal to one device.

The 8-device case runs this file as a script in a subprocess (`python tests/test_mmdit.py plan`):
XLA_FLAGS must be set before jax starts, and the rest of the suite runs on one device.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny SD3.5-style model with odd sizes: 3 layers (the last pre-only), block 0 dual-attention,
# per-head RMSNorm on q / k, a 13-wide text and 7-wide pooled input, 5 -> 6 channels; latents
# 10 x 6 (a 5 x 3 patch grid, not square) inside an 11 x 11 PE table (the centre crop).
TINY = dict(sample_size=12, patch_size=2, in_channels=5, num_layers=3, attention_head_dim=8, num_attention_heads=3,
            joint_attention_dim=13, caption_projection_dim=24, pooled_projection_dim=7, out_channels=6,
            pos_embed_max_size=11, dual_attention_layers=(0,), qk_norm="rms_norm")
LATENT_HW, TEXT_LEN, BATCH = (10, 6), 5, 2


def _inputs(seed=0, length=TEXT_LEN):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, *LATENT_HW, TINY["in_channels"])).astype(np.float32)
  t = np.array([0.3, 0.871], np.float32)
  ctx = rng.standard_normal((BATCH, length, TINY["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((BATCH, TINY["pooled_projection_dim"])).astype(np.float32)
  return x, t, ctx, pooled


def _torch_model(arch, seed=0):
  """A random SD3Transformer2DModel; every weight N(0, 0.3), the zero-initialised adaLN ones too
  (else the blocks would be the identity and parity would test little)."""
  import torch  # Test-only reference implementation.
  from diffusers import SD3Transformer2DModel
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**arch).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model


def _torch_forward(model, x, t, ctx, pooled):
  import torch  # Test-only reference implementation.
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(ctx), torch.from_numpy(pooled),
                torch.from_numpy(t * 1000)).sample
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """The tiny torch model saved with save_pretrained, and its output on _inputs()."""
  model = _torch_model(TINY)
  path = str(tmp_path_factory.mktemp("sd3") / "transformer")
  model.save_pretrained(path, safe_serialization=True)
  return path, model, _torch_forward(model, *_inputs())


@pytest.fixture(scope="module")
def loaded(saved):
  import jax

  from sanajax.models.mmdit_diffusers import load_sd3_transformer
  model, params, config = load_sd3_transformer(saved[0], return_config=True)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return model, params, config, apply


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_parity_with_sd3_transformer(saved, loaded):
  """Measured: 5.8e-6 x max|torch| (max|torch| 13.6)."""
  _, _, ref = saved
  _, params, config, apply = loaded
  assert config.qk_norm == "rms_norm" and tuple(config.dual_attention_layers) == (0,)
  out = apply(params, *_inputs())
  assert out.shape == (BATCH, *LATENT_HW, TINY["out_channels"])
  assert _rel_err(out, ref) <= 1e-4, _rel_err(out, ref)


def test_parity_sd3_medium_style_without_crop_table(tmp_path):
  """SD3.0-style blocks (no qk_norm, no dual attention) and no pos_embed_max_size (the PE computed on
  the patch grid with base size sample_size / p, diffusers' non-persistent buffer)."""
  import jax

  from sanajax.models.mmdit_diffusers import load_sd3_transformer
  arch = dict(TINY, num_layers=2, dual_attention_layers=(), qk_norm=None, pos_embed_max_size=None)
  torch_model = _torch_model(arch, seed=1)
  torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
  model, params = load_sd3_transformer(str(tmp_path))
  assert "pos_embed" not in params["pos_embed"]
  inputs = _inputs(1)
  err = _rel_err(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *inputs),
                 _torch_forward(torch_model, *inputs))
  assert err <= 1e-4, err


def test_round_trip_is_bit_identical(saved, loaded, tmp_path):
  from sanajax.models.mmdit_diffusers import save_diffusers
  from sanajax.safetensors_io import read_json, read_state_dict
  model, params, _, _ = loaded
  save_diffusers(str(tmp_path), model, params, "float32")
  a, b = read_state_dict(saved[0]), read_state_dict(str(tmp_path))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
  src, out = read_json(os.path.join(saved[0], "config.json")), read_json(str(tmp_path / "config.json"))
  for field, value in src.items():
    if not field.startswith("_"):
      assert out[field] == (list(value) if isinstance(value, tuple) else value), field


def test_mismatched_tensors_are_refused_each_named(saved, tmp_path):
  import shutil

  from sanajax.models.mmdit_diffusers import load_sd3_transformer
  from sanajax.safetensors_io import WeightsError, read_state_dict, write_safetensors
  shutil.copy(os.path.join(saved[0], "config.json"), tmp_path / "config.json")
  state = {k: np.array(v) for k, v in read_state_dict(saved[0]).items()}
  del state["transformer_blocks.1.attn.to_add_out.weight"]
  state["transformer_blocks.2.attn.to_add_out.weight"] = np.zeros((24, 24), np.float32)  # pre-only: has none
  state["context_embedder.weight"] = np.zeros((24, 12), np.float32)
  write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), state)
  with pytest.raises(WeightsError) as e:
    load_sd3_transformer(str(tmp_path))
  msg = str(e.value)
  assert "missing tensor transformer_blocks.1.attn.to_add_out.weight" in msg, msg
  assert "unexpected tensor transformer_blocks.2.attn.to_add_out.weight" in msg, msg
  assert "tensor context_embedder.weight has shape (24, 12), expected (24, 13)" in msg, msg


def test_pos_embed_init_is_diffusers_table():
  """A fresh model's PE table (its init: float32 jnp) is diffusers' (float64 sin / cos) to 1e-5; the
  numpy path (pos_embed_max_size=None models) is bit-exact."""
  import torch  # Test-only reference implementation.

  from sanajax.models import mmdit
  with torch.no_grad():
    ref = _torch_model(dict(TINY, num_layers=1, dual_attention_layers=())).pos_embed.pos_embed.numpy()[0]
  m = TINY["pos_embed_max_size"]
  base = TINY["sample_size"] // TINY["patch_size"]
  assert np.abs(np.asarray(mmdit.sd3_pos_embed(24, range(m), range(m), m, m, base)) - ref).max() < 1e-5
  assert np.array_equal(mmdit.sd3_pos_embed(24, range(m), range(m), m, m, base, xp=np), ref)
  # The crop: rows 3..7, cols 4..6 of the table for a 5 x 3 grid.
  assert mmdit.crop_box(5, 3, m) == (3, 4)
  crop = mmdit.sd3_pos_embed(24, range(3, 8), range(4, 7), m, m, base, xp=np)
  assert np.array_equal(crop, ref.reshape(m, m, 24)[3:8, 4:7].reshape(15, 24))


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_context_mask_equals_the_unpadded_shorter_context(loaded, kind):
  """Sample 0 has 3 real text tokens and 2 padded ones full of noise; masked, its prediction is the
  one of its 3 tokens alone. Sample 1 has all 5; the mask changes nothing for it."""
  import jax
  import jax.numpy as jnp
  model, params, _, _ = loaded
  model = model.clone(joint_attention=kind)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  x, t, ctx, pooled = _inputs()
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  masked = np.asarray(apply(params, x, t, ctx, pooled, jnp.asarray(mask)))
  unmasked = np.asarray(apply(params, x, t, ctx, pooled, jnp.ones_like(mask)))  # Same program as `masked`.
  short = np.asarray(apply(params, x[:1], t[:1], ctx[:1, :3], pooled[:1]))
  assert _rel_err(masked[0], short[0]) < 1e-5, _rel_err(masked[0], short[0])
  assert _rel_err(masked[1], unmasked[1]) < 1e-5
  assert _rel_err(unmasked[0], short[0]) > 1e-3  # The padded tokens do matter without the mask.


def test_linear_joint_attention_same_tree_different_function(loaded):
  import flax.linen as nn
  import jax
  from flax.traverse_util import flatten_dict

  from sanajax.models import mmdit
  model, params, config, apply = loaded
  linear = mmdit.build_mmdit(dict(config, joint_attention="linear"))
  tree = lambda m: {k: v.shape for k, v in flatten_dict(nn.unbox(
      jax.eval_shape(lambda *a: m.init(jax.random.PRNGKey(0), *a), *_inputs())["params"]), sep="/").items()}
  assert tree(linear) == tree(model)
  out = jax.jit(lambda p, *a: linear.apply({"params": p}, *a))(params, *_inputs())
  assert np.all(np.isfinite(out)) and out.shape == (BATCH, *LATENT_HW, TINY["out_channels"])
  assert _rel_err(out, np.asarray(apply(params, *_inputs()))) > 1e-2


def test_remat_and_features_keep_the_function(loaded):
  import jax
  model, params, _, apply = loaded
  tapped = model.clone(remat="full", features_at=(1,))
  out, feats = jax.jit(lambda p, *a: tapped.apply({"params": p}, *a))(params, *_inputs())
  assert _rel_err(out, np.asarray(apply(params, *_inputs()))) < 1e-6
  assert feats[0].shape == (BATCH, 15, 24)


# diffusers' SD3Transformer2DModel(**arch) parameter totals (torch meta device, no allocation):
# SD3-medium 2,028,328,000; SD3.5-medium 2,243,171,520 (+ its 226,492,416-entry 384^2 PE buffer:
# the "2.5B" of Stability's card); SD3.5-large 8,056,627,520.
RELEASED_TOTALS = {"SD3_MEDIUM": 2_028_328_000, "SD35_MEDIUM": 2_243_171_520, "SD35_LARGE": 8_056_627_520}


@pytest.mark.parametrize("name", sorted(RELEASED_TOTALS))
def test_released_architectures_count_as_diffusers(name):
  import torch  # Test-only reference implementation.
  from diffusers import SD3Transformer2DModel

  from sanajax.models import mmdit
  arch = getattr(mmdit, name)
  with torch.device("meta"):
    reference = sum(p.numel() for p in SD3Transformer2DModel(**arch).parameters())
  assert reference == RELEASED_TOTALS[name]
  assert mmdit.param_count(arch) == reference


def test_config_errors_name_the_field():
  from sanajax.models import mmdit
  with pytest.raises(ValueError, match="model.joint_attention"):
    mmdit.build_mmdit(dict(TINY, joint_attention="flash"))
  with pytest.raises(ValueError, match="model.qk_norm"):
    mmdit.build_mmdit(dict(TINY, qk_norm="layer_norm"))
  with pytest.raises(ValueError, match="dual_attention_layers"):
    mmdit.build_mmdit(dict(TINY, dual_attention_layers=(3,)))
  with pytest.raises(ValueError, match="pos_embed_max_size=11"):
    mmdit.crop_box(12, 3, 11)


def test_fsdp_tensor_plan_on_8_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import xla_env
  env["XLA_FLAGS"] = xla_env.with_fast_compile(env["XLA_FLAGS"])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "plan"], check=False, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert "plan ok" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def _plan_case():
  """One forward under Plan(fsdp=4, tensor=2) vs one device; the parameters really split."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from sanajax.models import mmdit
  from sanajax.parallel import Plan, make_mesh
  assert jax.device_count() == 8
  arch = dict(TINY, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32)  # hidden 32: / 4 and / 2
  model = mmdit.build_mmdit(arch)
  x, t, ctx, pooled = _inputs()
  x, t, ctx, pooled = (np.concatenate([a] * 4) for a in (x, t, ctx, pooled))  # batch 8: split over fsdp=4
  mask = np.ones(ctx.shape[:2], np.int32)
  mask[0, 3:] = 0
  boxed = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, ctx, pooled, mask)["params"]
  params = jax.tree.map(lambda a: a + 0.05 * jnp.sign(a + 1e-3), jax.device_get(boxed))  # non-zero adaLN / proj_out
  one = model.apply({"params": params}, x, t, ctx, pooled, mask)

  plan = Plan(make_mesh({"fsdp": 4, "tensor": 2}))
  placed = plan.place(params)
  with plan.activate():
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    out = fwd(placed, *(plan.shard_global_batch({"a": a})["a"] for a in (x, t, ctx, pooled, mask)))
  err = float(jnp.max(jnp.abs(out - one)) / jnp.max(jnp.abs(one)))
  assert err < 1e-5, err
  blk = placed["transformer_blocks_0"]
  specs = {"to_q": blk["attn"]["to_q"]["kernel"].value.sharding.spec,
           "to_out": blk["attn"]["to_out"]["kernel"].value.sharding.spec,
           "ff": blk["ff"]["net_0"]["proj"]["kernel"].value.sharding.spec,
           "table": placed["pos_embed"]["pos_embed"].value.sharding.spec}
  assert specs == {"to_q": P("fsdp", "tensor"), "to_out": P("tensor", "fsdp"), "ff": P("fsdp", "tensor"),
                   "table": P(None, None, "fsdp")}, specs
  print(f"plan ok: fsdp=4 x tensor=2 vs one device rel err {err:.2e}")


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  if sys.argv[1:] == ["plan"]:
    _plan_case()
