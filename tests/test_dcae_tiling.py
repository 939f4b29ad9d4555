"""Tiled DC-AE encode/decode: equal to diffusers' tiled AutoencoderDC, equal to the untiled AE away
from the seams (convolution-only AE), memory bounded by the tile, and the config rule."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax.config_utils import load_config
from sanajax.models import dcae, dcae_tiling

# Small tiles for the f8 tiny AE: 16 x 16 latents per tile, 12 latents step, 4 latents (32 px) of overlap.
TILE, STRIDE = 128, 96


def _tiny_cfg(conv_only=False):
  cfg = load_config("dcae_tiny").ae
  if conv_only:  # No global attention: each output pixel then depends on a bounded neighbourhood only.
    cfg.encoder_block_types = ["ResBlock"] * 4
    cfg.decoder_block_types = ["ResBlock"] * 4
  return cfg


def _init(cfg, seed=0):
  """The AE and random params filled in numpy from the abstract tree (a jitted model.init of the
  whole AE compiles for a minute on the shared CPU): kernels N(0, 1/fan_in), norm scales 1 +- 0.1,
  biases N(0, 0.1)."""
  model = dcae.build_dcae(cfg)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
    return jnp.asarray((name == "scale") + 0.1 * rng.normal(size=shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _away_from_seams(size, tile, stride, margin):
  """(size,) bool: pixels at least `margin` px inside every tile covering them (image borders excepted)."""
  p = np.arange(size)
  keep = np.ones(size, bool)
  for start, length in dcae_tiling._spans(size, tile, stride):
    end = start + length
    inside = ((p - start >= margin) | (start == 0)) & ((end - 1 - p >= margin) | (end == size))
    keep &= ~((p >= start) & (p < end)) | inside
  return keep


def test_matches_diffusers_tiled_autoencoder():
  """Same random weights, diffusers enable_tiling(128, 96): decode 32x24 latents (a 3x2 tile grid),
  encode 128x200 px (one tile row; the blend code is shared with decode)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = _tiny_cfg()
  torch.manual_seed(0)
  ref = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(cfg)).eval()
  with torch.no_grad():  # perturb norms and biases so every parameter matters
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE, tile_sample_stride_height=STRIDE,
                    tile_sample_stride_width=STRIDE)
  params = dcae.params_from_diffusers_state_dict(ref.state_dict(), cfg)
  model = dcae.build_dcae(cfg)
  # Non-square, and 200 px is not a multiple of 8: the last encode tiles are zero-padded as in diffusers.
  z = np.random.RandomState(0).randn(1, 32, 24, cfg.latent_channels).astype(np.float32)
  x = np.random.RandomState(1).uniform(-1, 1, (1, 128, 200, 3)).astype(np.float32)
  with torch.no_grad():
    y_ref = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    z_ref = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    y = np.asarray(jax.jit(functools.partial(dcae_tiling.tiled_decode, model, tile=TILE, stride=STRIDE))(params, z))
    z_enc = np.asarray(jax.jit(functools.partial(dcae_tiling.tiled_encode, model, tile=TILE, stride=STRIDE))(params, x))
  assert y.shape == y_ref.shape == (1, 256, 192, 3) and z_enc.shape == z_ref.shape == (1, 16, 25, cfg.latent_channels)
  # Measured: 9.2e-7 (decode) and ~1e-6 (encode) of max|torch|: the same algorithm, float32 rounding.
  assert np.abs(y - y_ref).max() <= 1e-4 * np.abs(y_ref).max()
  assert np.abs(z_enc - z_ref).max() <= 1e-4 * np.abs(z_ref).max()


def test_untiled_equality_away_from_seams_and_memory_bound():
  """A convolution-only AE (no global attention; 8 channels at full resolution, so activations
  dwarf the 3-channel image), images one tile high: 128 x 288 px (3 tiles) and 128 x 576 px (6).

  Seams. Receptive radius of this decoder in output pixels: conv_in + ResBlock at 1/8 (3 latent
  px = 24), up-conv + ResBlock at 1/4 (3 px = 12), at 1/2 (6), at full size (3), conv_out (1): 46.
  Pixels 48 px inside every tile covering them must equal the untiled decode: measured 2.9e-7 of
  max|untiled| (a third of the pixels), against 0.20 near the seams and 0.14 at 16 px in. With the
  attention blocks of configs/dcae_tiny.py each tile's output depends on the whole tile (linear
  attention is global), so no pixel is exactly seam-free: measured 0.56 of max|untiled| 48 px
  inside the tiles (as everywhere) on these random weights; diffusers' / SANA's reference tiling
  has the same property (test above).

  Memory (XLA's buffer assignment, compile().memory_analysis() on CPU). Bound: one 128 x 128 tile's
  untiled temp (1.84 MB) plus 4 image-sized float32 buffers (tile outputs before blending, blended
  pieces). Measured tiled temp 2.35 and 3.23 MB against bounds 3.60 and 5.37 MB; the untiled decode
  breaks them (4.13 and 8.26 MB; checked at the larger size): its activations grow with the image
  at every stage's width.
  """
  cfg = _tiny_cfg(conv_only=True)
  cfg.encoder_block_out_channels = cfg.decoder_block_out_channels = [8, 16, 16, 16]
  cfg.encoder_layers_per_block = cfg.decoder_layers_per_block = [1, 1, 1, 1]
  cfg.latent_channels = 4
  model, params = _init(cfg)
  full = lambda p, v: model.apply({"params": p}, v, method=model.decode)
  tiled = functools.partial(dcae_tiling.tiled_decode, model, tile=TILE, stride=STRIDE)

  def compiled(fn, latent_hw):
    z = jax.ShapeDtypeStruct((1, *latent_hw, cfg.latent_channels), jnp.float32)
    return jax.jit(fn).lower(params, z).compile()

  one_tile = compiled(full, (16, 16)).memory_analysis().temp_size_in_bytes
  bound = lambda width: one_tile + 4 * (128 * width * 8 * 3 * 4)
  assert compiled(tiled, (16, 36)).memory_analysis().temp_size_in_bytes <= bound(36)
  tiled_c, full_c = compiled(tiled, (16, 72)), compiled(full, (16, 72))
  assert tiled_c.memory_analysis().temp_size_in_bytes <= bound(72)
  assert full_c.memory_analysis().temp_size_in_bytes > bound(72)

  z = np.random.RandomState(0).randn(1, 16, 72, cfg.latent_channels).astype(np.float32)
  diff = np.abs(np.asarray(tiled_c(params, z)) - np.asarray(full_c(params, z))).max(axis=(0, 3))
  scale = np.abs(np.asarray(full_c(params, z))).max()
  seams = lambda margin: ~(_away_from_seams(128, TILE, STRIDE, margin)[:, None]
                           & _away_from_seams(576, TILE, STRIDE, margin)[None, :])
  assert (~seams(48)).mean() > 0.3  # a third of the image is checked
  assert diff[~seams(48)].max() <= 1e-5 * scale
  assert diff[seams(16)].max() > 1e-2 * scale  # the seams are really there: the mask matters


def test_config_rule_and_errors():
  """decode_latents / encode_images tile only when tile_size_px > 0 and a side exceeds the tile."""
  cfg = _tiny_cfg(conv_only=True)
  model = dcae.build_dcae(cfg)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"])

  def uses_map(fn, *args):  # the tiled path is the only one with a scan (lax.map)
    return "scan" in str(jax.make_jaxpr(fn)(*args))

  c = cfg.latent_channels
  z_small, z_big = jnp.zeros((1, 16, 16, c)), jnp.zeros((1, 16, 17, c))  # 128 x 128 and 128 x 136 px
  # Fresh functions each time: make_jaxpr caches traces per function object, and cfg changes below.
  decode = lambda: (lambda p, v: dcae_tiling.decode_latents(model, p, v, cfg))
  encode = lambda: (lambda p, v: dcae_tiling.encode_images(model, p, v, cfg))
  cfg.tile_size_px, cfg.tile_stride_px = 128, 96
  assert not uses_map(decode(), params, z_small)
  assert uses_map(decode(), params, z_big)
  assert uses_map(encode(), params, jnp.zeros((1, 136, 64, 3)))
  assert not uses_map(encode(), params, jnp.zeros((1, 128, 64, 3)))
  cfg.tile_size_px = 0  # off: never tiled
  assert not uses_map(decode(), params, z_big)
  # The SANA configs carry the reference's 1024 / 896; configs without the fields (the tiny 64 px
  # one: no field, so that workdirs written before tiling existed still resume) never tile.
  assert dcae_tiling.tiling_from_config(load_config("dcae_f32c32").ae) == (1024, 896)
  assert dcae_tiling.tiling_from_config(load_config("dcae_tiny").ae) == (0, 0)
  with pytest.raises(ValueError, match="multiples of the AE downsampling"):
    dcae_tiling.tiled_decode(model, params, z_big, tile=100, stride=96)
  with pytest.raises(ValueError, match="stride <= tile"):
    dcae_tiling.tiled_decode(model, params, z_big, tile=64, stride=96)
  with pytest.raises(ValueError, match="expects latents"):
    dcae_tiling.tiled_decode(model, params, z_big[0], tile=64, stride=48)


def test_generator_decodes_in_tiles_above_the_tile_size(monkeypatch):
  """The Generator's one jitted sampling call decodes through decode_latents: with the tiny config
  (64 px, f8) and ae.tile_size_px = 32, the latents go to tiled_decode with the config's tile/stride."""
  from sanajax.generation import Generator
  from sanajax.resolution import ae_downsample
  from sanajax.workdir.loaders import build_text_encoder, init_dit_params
  cfg = load_config("tiny")
  cfg.ae.tile_size_px, cfg.ae.tile_stride_px = 32, 24
  model = dcae.build_dcae(cfg.ae)
  # Concrete AE weights (the Generator places them on its plan); the sampling call itself is only traced.
  ae_params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"]
  text = build_text_encoder(cfg)
  calls = []
  real = dcae_tiling.tiled_decode

  def spy(m, p, z, **kw):
    calls.append((z.shape, kw))
    return real(m, p, z, **kw)

  monkeypatch.setattr(dcae_tiling, "tiled_decode", spy)
  gen = Generator(cfg, None, model, ae_params, 1.0, text, ae_downsample(cfg))
  dit_params = jax.eval_shape(lambda: init_dit_params(cfg, jax.random.PRNGKey(0)))
  ids, mask = text.tokenize(["a red circle"])
  out = jax.eval_shape(lambda d, a, t: gen._sample_fn(
      d, a, t, jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask), "flow_euler", 2, 4.5, None),
      dit_params, ae_params, text.params)
  assert out.shape == (1, 64, 64, 3)
  assert calls == [((1, 8, 8, cfg.ae.latent_channels), {"tile": 32, "stride": 24})]
