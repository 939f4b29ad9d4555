"""SD3's KL VAE: parity with diffusers' AutoencoderKL (encode = posterior mean, decode), loading a
save_pretrained directory, the bit-identical round trip, refused tensors, logical axes, tiling."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax.models import autoencoder_kl as akl
from sanajax.models import autoencoder_kl_diffusers as akd
from sanajax.models import dcae, dcae_tiling
from sanajax.safetensors_io import WeightsError, read_safetensors, write_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Odd sizes: 2 stages (f = 2), 4 groups of 2 / 4 channels, SD3's 16 latent channels and its factors.
TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=16, layers_per_block=1,
            scaling_factor=1.5305, shift_factor=0.0609)


def _ref(use_quant_conv: bool, seed: int = 0):
  """A tiny diffusers AutoencoderKL, every parameter perturbed (GroupNorm 1/0 inits and zero biases matter)."""
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderKL(**TINY, use_quant_conv=use_quant_conv, use_post_quant_conv=use_quant_conv).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return ref


def _nchw(x: np.ndarray):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(t) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("use_quant_conv", [True, False])
def test_parity_with_diffusers(use_quant_conv):
  """24 x 40 images (non-square; 12 x 20 latents, 240 attention tokens), both quant-conv settings.
  Measured: ~1e-6 of max|torch| for encode and decode (float32 rounding)."""
  ref = _ref(use_quant_conv)
  model = akl.build_autoencoder_kl(akd.autoencoder_kl_config_from_diffusers(dict(ref.config)))
  assert (model.use_quant_conv, model.use_post_quant_conv) == (use_quant_conv, use_quant_conv)
  params = akd.params_from_diffusers_state_dict(ref.state_dict(), model)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(_nchw(x)).latent_dist
    mean_ref, logvar_ref = _nhwc(posterior.mean), _nhwc(posterior.logvar)
    y_ref = _nhwc(ref.decode(_nchw(mean_ref)).sample)
  with jax.default_matmul_precision("highest"):
    mean, logvar = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode_moments))(params, x)
    z = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(params, x)
    y = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))(params, mean_ref)
  assert z.shape == mean_ref.shape == (2, 12, 20, 16) and y.shape == y_ref.shape == x.shape
  np.testing.assert_array_equal(z, mean)  # encode is the posterior mean
  assert _rel(z, mean_ref) <= 1e-4
  assert _rel(logvar, logvar_ref) <= 1e-4
  assert _rel(y, y_ref) <= 1e-4
  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply({"params": params}, x[:, :23], method=model.encode)


def test_load_sd3_vae_from_save_pretrained_and_round_trip(tmp_path):
  """save_pretrained -> load_sd3_vae (config, factors, outputs) -> save_diffusers: the same tensors,
  bit for bit, in a directory diffusers loads back into the same model."""
  ref = _ref(use_quant_conv=False, seed=1)
  src, dst = str(tmp_path / "vae"), str(tmp_path / "out")
  ref.save_pretrained(src)
  model, params, ae_config = akd.load_sd3_vae(src, return_config=True)
  assert (model.scaling_factor, model.shift_factor) == (1.5305, 0.0609)
  assert (model.latent_channels, model.downsample_factor, model.use_quant_conv) == (16, 2, False)
  assert ae_config.block_out_channels == [8, 16] and ae_config.dtype == "float32"
  x = np.random.RandomState(2).uniform(-1, 1, (1, 16, 8, 3)).astype(np.float32)
  with torch.no_grad():
    z_ref = _nhwc(ref.encode(_nchw(x)).latent_dist.mean)
  with jax.default_matmul_precision("highest"):
    assert _rel(model.apply({"params": params}, x, method=model.encode), z_ref) <= 1e-4

  akd.save_diffusers(dst, model, params)
  a = read_safetensors(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  b = read_safetensors(os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  assert sorted(a) == sorted(b) and len(a) == len(ref.state_dict())
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32 and a[k].tobytes() == b[k].tobytes(), k
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  for field in akl.CONFIG_FIELDS + ("down_block_types", "up_block_types"):
    assert cfg[field] == _json(ref.config[field]), field
  back = diffusers.AutoencoderKL.from_pretrained(dst)
  assert back.config.shift_factor == 0.0609 and back.post_quant_conv is None
  for k, v in ref.state_dict().items():
    assert torch.equal(back.state_dict()[k], v), k


def _json(value):
  return list(value) if isinstance(value, tuple) else value


def test_mismatched_tensors_are_refused_each_named(tmp_path):
  ref = _ref(use_quant_conv=True)
  path = str(tmp_path / "vae")
  ref.save_pretrained(path)
  file = os.path.join(path, "diffusion_pytorch_model.safetensors")
  tensors = {k: np.array(v) for k, v in read_safetensors(file).items()}  # copies: the file is memory-mapped
  tensors["decoder.conv_out.weight"] = np.zeros((4, 8, 3, 3), np.float32)  # 4 output channels, not 3
  del tensors["encoder.mid_block.attentions.0.to_q.bias"]
  tensors["encoder.extra.weight"] = np.zeros((2,), np.float32)
  write_safetensors(file, tensors)
  with pytest.raises(WeightsError) as err:
    akd.load_sd3_vae(path)
  msg = str(err.value)
  assert r"tensor decoder.conv_out.weight has shape (4, 8, 3, 3), expected (3, 8, 3, 3)" in msg
  assert "missing tensor encoder.mid_block.attentions.0.to_q.bias (expected shape (16,))" in msg
  assert "unexpected tensor encoder.extra.weight of shape (2,)" in msg
  # The same check for an in-memory state dict; and a config sanajax cannot build, every field named.
  state = ref.state_dict()
  state.pop("quant_conv.bias")
  with pytest.raises(WeightsError, match=r"missing tensor quant_conv\.bias"):
    akd.params_from_diffusers_state_dict(state, akl.build_autoencoder_kl(akd.autoencoder_kl_config_from_diffusers(
        dict(ref.config))))
  bad = dict(ref.config, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], norm_num_groups=3)
  with pytest.raises(ValueError, match=r"down_block_types .*AttnDownEncoderBlock2D.*; block_out_channels \[8, 16\]"):
    akd.autoencoder_kl_config_from_diffusers(bad)


def test_logical_axes_on_every_param_and_sd3_defaults():
  model = akl.AutoencoderKL()  # SD3's VAE: 83.65M parameters, as diffusers' (counted on the meta device)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  assert all(len(v.names) == len(v.value.shape) and set(v.names) <= set(dcae.CONV_AXES) for v in leaves)
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                                  use_quant_conv=False, use_post_quant_conv=False)
  assert dcae.param_count(boxed) == sum(p.numel() for p in ref.parameters())
  assert (model.scaling_factor, model.shift_factor, model.downsample_factor) == (1.5305, 0.0609, 8)


def test_tiled_decode_reuses_the_dcae_tiling():
  """dcae_tiling.decode_latents / tiled_decode take this AE (downsample_factor, encode, decode).

  A tile-sized latent decodes untiled (diffusers' rule: tile only when a side exceeds the tile):
  equal to model.decode. Wider (6 x 14 latents, tile 16 px
  = 8 latents, stride 12 px): one row of three tiles; the first 12 px columns are the first tile's
  decode, the next 4 the diffusers ramp between it and the second tile.
  """
  ref = _ref(use_quant_conv=True)
  model = akl.build_autoencoder_kl(akd.autoencoder_kl_config_from_diffusers(dict(ref.config)))
  params = akd.params_from_diffusers_state_dict(ref.state_dict(), model)
  cfg = ml_collections.ConfigDict({"tile_size_px": 16, "tile_stride_px": 12})
  z = np.random.RandomState(3).randn(1, 6, 14, 16).astype(np.float32)
  decode = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))
  with jax.default_matmul_precision("highest"):
    whole = np.asarray(decode(params, z[:, :, :8]))
    by_rule = jax.jit(lambda p, v: dcae_tiling.decode_latents(model, p, v, cfg))
    np.testing.assert_array_equal(by_rule(params, z[:, :, :8]), whole)
    # tiled_decode itself: a latent no larger than the stride (tiles start at 0, stride, ...) is one tile.
    one = jax.jit(lambda p, v: dcae_tiling.tiled_decode(model, p, v, tile=16, stride=12))(params, z[:, :6, :6])
    assert _rel(one, decode(params, z[:, :6, :6])) <= 1e-6
    tiled = np.asarray(by_rule(params, z))
    second = np.asarray(decode(params, z[:, :, 6:14]))
  assert tiled.shape == (1, 12, 28, 3)
  assert _rel(tiled[:, :, :12], whole[:, :, :12]) <= 1e-6
  w = (np.arange(4) / 4.0).astype(np.float32)[None, None, :, None]
  assert _rel(tiled[:, :, 12:16], whole[:, :, 12:16] * (1 - w) + second[:, :, :4] * w) <= 1e-6
  assert _rel(tiled, np.asarray(decode(params, z))) > 1e-3  # GroupNorm and attention see the tile only
