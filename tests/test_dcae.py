"""DC-AE: parameter count and numerics against diffusers' AutoencoderDC, shortcuts, tiny-AE checks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax.config_utils import load_config
from sanajax.models import dcae


@pytest.fixture(scope="module")
def tiny():
  """The tiny AE and one jitted init/encode/decode/grad function (one compile, ~20 s on CPU)."""
  cfg = load_config("dcae_tiny").ae
  model = dcae.build_dcae(cfg)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)

  @jax.jit
  def run(key, x):
    params = nn.unbox(model.init(key, x))["params"]
    z = model.apply({"params": params}, x, method=model.encode)
    y = model.apply({"params": params}, z, method=model.decode)
    loss, grads = jax.value_and_grad(lambda p: dcae.reconstruction_loss(model.apply({"params": p}, x), x))(params)
    return z, y, loss, grads

  return cfg, model, x, run


def test_f32c32_param_count_matches_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = load_config("dcae_f32c32").ae
  with torch.device("meta"):  # ~312M parameters: count them without allocating.
    ref = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(cfg))
  n_torch = sum(p.numel() for p in ref.parameters())
  model = dcae.build_dcae(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert dcae.param_count(shapes["params"]) == n_torch == 312_250_275
  assert model.scaling_factor == pytest.approx(0.41407)
  assert dcae.downsample_factor(cfg) == 32


def test_pixel_shuffle_roundtrip_and_torch_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = dcae.pixel_unshuffle(x)
  assert y.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(dcae.pixel_shuffle(y), x)
  # torch order: channel c*4 + i*2 + j holds pixel (2h+i, 2w+j) of channel c.
  for c, i, j in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
    np.testing.assert_array_equal(y[:, :, :, c * 4 + i * 2 + j], x[:, i::2, j::2, c])


def test_down_shortcut_is_channel_average_of_unshuffled_pixels():
  """DCDownBlock2d(4 -> 8): shortcut = mean over pairs of the 16 space-to-channel values."""
  x = jnp.asarray(np.random.RandomState(1).randn(1, 4, 4, 4), jnp.float32)
  block = dcae.DCDownBlock2d(8, pixel_unshuffle=False, shortcut=True)
  params = nn.unbox(block.init(jax.random.PRNGKey(0), x))
  params = jax.tree_util.tree_map(jnp.zeros_like, params)  # zero conv: only the shortcut is left
  y = block.apply(params, x)
  xn = np.asarray(x)
  # Output channel o averages unshuffled channels 2o, 2o+1; unshuffled channel c*4+i*2+j.
  want = np.zeros((1, 2, 2, 8), np.float32)
  for o in range(8):
    vals = [xn[0, (u % 4) // 2::2, u % 2::2, u // 4] for u in (2 * o, 2 * o + 1)]
    want[0, :, :, o] = (vals[0] + vals[1]) / 2
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_up_shortcut_is_channel_repeat_then_shuffle():
  """DCUpBlock2d(8 -> 4): each input channel feeds 4*4/8 = 2 output channels' 2x2 pixels."""
  x = jnp.asarray(np.random.RandomState(2).randn(1, 2, 3, 8), jnp.float32)
  block = dcae.DCUpBlock2d(4, interpolate=True, shortcut=True)
  params = jax.tree_util.tree_map(jnp.zeros_like, nn.unbox(block.init(jax.random.PRNGKey(0), x)))
  y = np.asarray(block.apply(params, x))
  xn = np.asarray(x)
  for c in range(4):
    for i in range(2):
      for j in range(2):
        u = c * 4 + i * 2 + j  # channel of the repeated tensor, which holds input channel u // 2
        np.testing.assert_allclose(y[0, i::2, j::2, c], xn[0, :, :, u // 2], rtol=1e-6)
  # The encoder/decoder shortcuts: group mean and repeat-interleave.
  z = jnp.arange(12.0).reshape(1, 1, 1, 12)
  np.testing.assert_allclose(dcae.channel_average(z, 3)[0, 0, 0], [1, 4, 7, 10])
  np.testing.assert_allclose(dcae.channel_repeat(z[..., :2], 3)[0, 0, 0], [0, 0, 0, 1, 1, 1])


def test_tiny_shapes_determinism_and_grads(tiny):
  cfg, model, x, run = tiny
  f = dcae.downsample_factor(cfg)
  assert f == 8
  key = jax.random.PRNGKey(0)
  z, y, loss, grads = run(key, x)
  assert z.shape == (2, 64 // f, 64 // f, cfg.latent_channels) and z.dtype == jnp.float32
  assert y.shape == x.shape
  z_again, y_again, _, _ = run(key, x)
  np.testing.assert_array_equal(z_again, z)  # deterministic
  np.testing.assert_array_equal(y_again, y)
  z2, _, _, _ = run(key, -x)  # a different image gives a different latent
  assert float(jnp.max(jnp.abs(z2 - z))) > 1e-3
  # The loss goes through __call__; equal to the loss of decode(encode(x)) computed separately.
  assert float(loss) == pytest.approx(float(dcae.reconstruction_loss(y, x)), rel=1e-5)
  leaves = jax.tree_util.tree_leaves(grads)
  assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves)  # every parameter is used
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(lambda: model.init(key, x[:, :60]))


def test_logical_axes_on_every_param(tiny):
  _, model, x, _ = tiny
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  allowed = set(dcae.CONV_AXES)
  assert all(len(v.names) == len(v.value.shape) and set(v.names) <= allowed for v in leaves)


def test_loss_and_psnr_values():
  x = jnp.zeros((2, 4, 4, 3))
  assert float(dcae.psnr(x, x)) == pytest.approx(100.0)
  # Error 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = -10 log10(0.01) = 20 dB.
  assert float(dcae.psnr(x + 0.2, x)) == pytest.approx(20.0, abs=1e-4)
  assert float(dcae.psnr(x + 5.0, x + 1.0)) == pytest.approx(100.0)  # recon clipped to [-1, 1] first
  assert float(dcae.reconstruction_loss(x + 0.5, x)) == pytest.approx(0.5 + 0.25)


def _odd_config(down, up, enc_layers=(1, 1, 2), dec_layers=(1, 2, 1)):
  return ml_collections.ConfigDict(dict(
      in_channels=3, latent_channels=4, attention_head_dim=8,
      encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
      decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
      encoder_block_out_channels=[8, 16, 32], decoder_block_out_channels=[8, 16, 32],
      encoder_layers_per_block=list(enc_layers), decoder_layers_per_block=list(dec_layers),
      encoder_qkv_multiscales=[[], [3], [3, 5]], decoder_qkv_multiscales=[[], [], [5]],
      upsample_block_type=up, downsample_block_type=down, decoder_norm_types="rms_norm",
      decoder_act_fns=["silu", "relu", "silu"], scaling_factor=1.0))


@pytest.mark.parametrize("down,up,hw,layers", [
    ("conv", "interpolate", (24, 20), ((1, 1, 2), (1, 2, 1))),
    # 8x12 makes the last stage 2x3 = 6 tokens <= head_dim 8: diffusers' "quadratic" branch.
    ("pixel_unshuffle", "pixel_shuffle", (8, 12), ((1, 1, 2), (1, 2, 1))),
    # A first stage with no layers: conv_in / conv_out become down/up blocks (the *-in-1.0 AEs).
    ("conv", "interpolate", (16, 12), ((0, 1, 1), (0, 1, 1))),
])
def test_parity_with_diffusers(down, up, hw, layers):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = _odd_config(down, up, *layers)
  torch.manual_seed(0)
  ref = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(cfg)).eval()
  with torch.no_grad():  # perturb norms (init 1/0) and biases so every parameter matters
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  params = dcae.params_from_diffusers_state_dict(ref.state_dict(), cfg)
  model = dcae.build_dcae(cfg)
  x = np.random.RandomState(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    z_ref = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
    y_ref = ref.decode(torch.from_numpy(z_ref).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    z = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(params, x))
    y = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))(params, z_ref))
  assert z.shape == z_ref.shape and y.shape == y_ref.shape
  assert np.abs(z - z_ref).max() <= 1e-4 * np.abs(z_ref).max()
  assert np.abs(y - y_ref).max() <= 1e-4 * np.abs(y_ref).max()


def test_params_from_diffusers_rejects_wrong_config():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = _odd_config("conv", "interpolate")
  ref = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(cfg))
  other = _odd_config("conv", "interpolate")
  other.latent_channels = 8
  with pytest.raises(ValueError, match="do not fit"):
    dcae.params_from_diffusers_state_dict(ref.state_dict(), other)
  del torch
