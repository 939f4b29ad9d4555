"""Linear-attention kernels vs the jnp reference, on CPU in the Pallas interpreter, and lowered
for "cuda" / "tpu" at SANA's real shapes without a device.

Every kernel config is checked by one jitted function returning forward, the three
gradients and a JVP, so each shape costs one compile (interpret mode compiles slowly).
The lowering tests use ShapeDtypeStructs, so no large array is ever made.
"""

import jax
import jax.numpy as jnp
import lowering  # tests/lowering.py (tests/ is on sys.path)
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from sanajax.kernels import _common
from sanajax.kernels import linear_attention_pallas_triton as triton_mod
from sanajax.kernels import linear_attention_tpu as tpu_mod
from sanajax.kernels.linear_attention import (
  linear_attention,
  linear_attention_reference,
  linear_attention_vjp_only,
)


def _inputs(shape, dtype=jnp.float32, dead_rows=True, seed=0):
  """q, k, v, cotangent g, and tangents; with whole q/k rows <= 0 when dead_rows."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  q, k, v, g, tq, tk, tv = [jax.random.normal(key, shape, jnp.float32) for key in keys]
  if dead_rows:
    # relu(q) row of zeros: den = eps only. One row strictly negative, one exactly zero.
    q = q.at[:, 3].set(-jnp.abs(q[:, 3])).at[:, 4].set(0.0)
    k = k.at[:, 5].set(-jnp.abs(k[:, 5]))  # A key that adds nothing to the state.
  cast = lambda *xs: [x.astype(dtype) for x in xs]
  return cast(q, k, v), cast(g), cast(tq, tk, tv)


def _all_derivatives(fn):
  """jit(fn) -> (out, (dq, dk, dv) of sum(out * g), JVP tangent)."""
  def run(qkv, g, tangents):
    out, vjp = jax.vjp(fn, *qkv)
    _, t_out = jax.jvp(fn, tuple(qkv), tuple(tangents))
    return out, vjp(g), t_out
  return jax.jit(run)


def _assert_close(actual, expected, rel):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), "non-finite values"
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def _check_against_reference(impl, shape, dtype=jnp.float32, rel=2e-5):
  qkv, (g,), tangents = _inputs(shape, dtype)
  kernel = lambda q, k, v: linear_attention(q, k, v, impl=impl, interpret=True)
  out, grads, t_out = _all_derivatives(kernel)(qkv, g, tangents)
  ref_out, ref_grads, ref_t = _all_derivatives(linear_attention_reference)(qkv, g, tangents)
  assert out.dtype == dtype and out.shape == shape
  assert t_out.dtype == dtype
  _assert_close(out, ref_out, rel)
  for name, a, b in zip("qkv", grads, ref_grads):
    assert a.dtype == dtype, name
    _assert_close(a, b, rel)
  _assert_close(t_out, ref_t, rel)
  # The dead q rows attend to nothing: out = 0 / eps = 0, not NaN.
  np.testing.assert_array_equal(np.asarray(out[:, 3:5], np.float32), 0.0)


@pytest.mark.parametrize("impl,shape,small_tiles", [
    ("pallas", (2, 37, 2, 32), False),     # N not a multiple of the tile; Sana's D; 2 heads packed per block.
    ("pallas", (1, 100, 1, 72), True),     # D not a power of two: padded to 128.
    ("pallas", (1, 20, 1, 112), False),
    ("pallas_tpu", (1, 37, 2, 72), True),  # TPU kernel: one head per 128 lanes.
])
def test_pallas_matches_reference_f32(impl, shape, small_tiles, monkeypatch):
  if small_tiles:
    # Default tiles hold a whole test sequence; 16-token tiles exercise the N loop:
    # Triton: 2 chunks of 4 tiles (N padded to 128), the partial states summed;
    # TPU: 3 grid steps accumulating into the resident state block.
    monkeypatch.setattr(triton_mod, "DEFAULT_BLOCK_N", 16)
    monkeypatch.setattr(triton_mod, "_TARGET_PROGRAMS", 2)
    monkeypatch.setattr(tpu_mod, "DEFAULT_BLOCK_N", 16)
    assert triton_mod._tiling(100, 1, 16) == (16, 4, 2)
  _check_against_reference(impl, shape)


@pytest.mark.parametrize("impl", ["pallas", "pallas_tpu"])
def test_pallas_matches_reference_bf16(impl):
  # The state is fp32 in both; only summation order differs, so ~1 bf16 ulp.
  # N = 100: small and not a power of two (Triton: one 128-token tile). H = 6: Triton packs 2 heads
  # per block, TPU 4 per 128 lanes with H padded to 8.
  _check_against_reference(impl, (1, 100, 6, 32), jnp.bfloat16, rel=2e-2)


def test_mosaic_gpu_state_kernel_in_jax_s_interpreter_where_it_has_one():
  """jax >= 0.11 interprets Mosaic GPU kernels on CPU: the state kernel (WGMMA over 2 packed heads, relu in
  SMEM, fp32 accumulator across the sequential N steps) then equals the reference in bf16, with Triton's
  output and backward passes interpreted around it. N = 100: two 64-token steps, the second padded; 3
  heads: 2 blocks, the second half padding. jax 0.10 has no such interpreter: one clear error."""
  if hasattr(plgpu, "force_gpu_interpret_mode"):
    _check_against_reference("pallas_mosaic_gpu", (2, 100, 3, 32), jnp.bfloat16, rel=2e-2)
  else:
    (q, k, v), _, _ = _inputs((1, 8, 1, 32), jnp.bfloat16, dead_rows=False)
    with pytest.raises(ValueError, match=r"no interpret mode in jax .* \(jax >= 0.11 has one\)"):
      linear_attention(q, k, v, impl="pallas_mosaic_gpu", interpret=True)


def test_grad_uses_backward_kernels_and_vjp_only_path():
  """jax.grad of the public (custom_jvp) function transposes the linear_call into the
  backward kernels; the bare custom_vjp function gives the same gradients."""
  shape = (1, 37, 2, 32)
  (q, k, v), (g,), _ = _inputs(shape)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * g)
  public = loss(lambda q, k, v: linear_attention(q, k, v, impl="pallas", interpret=True))
  jaxpr = str(jax.make_jaxpr(jax.grad(public, argnums=(0, 1, 2)))(q, k, v))
  assert "linear_attention_bwd_dqkv" in jaxpr and "linear_attention_bwd_state" in jaxpr

  vjp_only = loss(lambda q, k, v: linear_attention_vjp_only(q, k, v, interpret=True))
  grads = jax.jit(jax.grad(vjp_only, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, jax.grad(loss(linear_attention_reference), argnums=(0, 1, 2))(q, k, v)):
    _assert_close(a, b, 2e-5)


def test_reference_matches_naive_quadratic():
  (q, k, v), _, _ = _inputs((2, 33, 3, 8), dead_rows=True)
  eps = 1e-15

  @jax.jit
  def naive(q, k, v):
    qr, kr = jax.nn.relu(q), jax.nn.relu(k)
    scores = jnp.einsum("bnhd,bmhd->bhnm", qr, kr, precision="highest")  # (B, H, N, N)
    num = jnp.einsum("bhnm,bmhe->bnhe", scores, v, precision="highest")
    return num / (jnp.swapaxes(scores.sum(-1), 1, 2)[..., None] + eps)

  ref = jax.jit(linear_attention_reference, static_argnames="eps")(q, k, v, eps=eps)
  _assert_close(ref, naive(q, k, v), 1e-5)


def test_auto_and_xla_are_the_reference_on_cpu():
  (q, k, v), _, _ = _inputs((1, 8, 1, 4), dead_rows=False)
  ref = linear_attention_reference(q, k, v)
  for impl in ("auto", "xla"):
    np.testing.assert_array_equal(linear_attention(q, k, v, impl=impl), ref)


def test_impl_errors():
  (q, k, v), _, _ = _inputs((1, 8, 1, 4), dead_rows=False)
  with pytest.raises(ValueError, match="interpret=True"):
    linear_attention(q, k, v, impl="pallas")
  with pytest.raises(ValueError, match="Unknown linear attention impl"):
    linear_attention(q, k, v, impl="cuda")
  for impl in ("pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"):
    # An explicit kernel traces on a CPU machine (so it can be lowered for its device), and
    # compiling it for the CPU is one clear error.
    fn = jax.jit(lambda q, k, v, impl=impl: linear_attention(q, k, v, impl=impl))
    fn.trace(q, k, v)
    with pytest.raises(ValueError, match=f"the '{impl}' kernel is being compiled for the CPU"):
      fn(q, k, v)


def test_head_packing_round_trip():
  """Per-head states <-> block-diagonal block states, and the (B, N, H * D) view, with D and H padding."""
  p = _common.head_packing(3, 5, 6, d_pad=8, group=2)  # 3 heads -> 4, width 16
  rng = np.random.default_rng(0)
  kv, ksum, x = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 7, 3, 5))

  @jax.jit
  def round_trip(kv, ksum, x):
    kvb, ksumb = _common.states_to_blocks(kv, ksum, p)
    packed = _common.pack_heads(x, p)
    return kvb, ksumb, _common.states_from_blocks(kvb, ksumb, p), packed, _common.unpack_heads(packed, p, 5)

  kvb, ksumb, (kv2, ksum2), packed, x2 = round_trip(kv, ksum, x)
  assert kvb.shape == (2, 2, 16, 16) and ksumb.shape == (2, 2, 16) and packed.shape == (2, 7, 32)
  np.testing.assert_array_equal(kvb * (1 - _common.block_ones(p)), 0.0)  # nothing across heads
  np.testing.assert_array_equal(kvb[:, 0, 8:13, 8:14], kv[:, 1].astype(np.float32))  # head 1: block 0, 2nd
  np.testing.assert_array_equal(packed[:, :, 8:13], x[:, :, 1].astype(np.float32))
  for a, b in ((kv2, kv), (ksum2, ksum), (x2, x)):
    np.testing.assert_array_equal(a, b.astype(np.float32))


# ------------------------------------------------------------------ lowering for cuda / tpu

# SANA's linear-attention calls, (B, N, H, D): the DiT's heads are hidden / 32 (configs/sana_1600m.py:
# 2240 -> 70, configs/sana_600m.py: 1152 -> 36); N = (px / 32)^2 tokens (1024 px -> 1024, 4096 px ->
# 16384). The DC-AE (configs/dcae_f32c32.py, head dim 32, one multiscale branch doubling the heads)
# at 1024 px: 1024 channels -> 64 heads at 32x32 and 64x64 tokens, 512 -> 32 heads at 128x128.
_REAL_SHAPES = {
    "1600M 1024px": (1, 1024, 70, 32),
    "1600M 4096px": (1, 16384, 70, 32),
    "600M 2048px B=2": (2, 4096, 36, 32),
    "DC-AE 512ch 128x128": (1, 16384, 32, 32),
    "small N": (1, 100, 70, 32),  # N < 128 and not a power of two.
}
_TARGETS = {"triton": lowering.TRITON, "mosaic_gpu": lowering.MOSAIC_GPU, "tpu": lowering.MOSAIC_TPU}


def _kernel_calls(impl, platform, shape, dtype):
  """Lowers forward + VJP + JVP of the public function for `platform` from abstract shapes;
  returns the custom-call targets in order."""
  attend = lambda q, k, v: linear_attention(q, k, v, impl=impl)

  def fwd_vjp_jvp(q, k, v, g):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g), jax.jvp(attend, (q, k, v), (q, k, v))[1]

  s = jax.ShapeDtypeStruct(shape, dtype)
  return lowering.kernel_calls(fwd_vjp_jvp, s, s, s, s, platform=platform)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("impl,platform", [("pallas_triton", "cuda"), ("pallas_tpu", "tpu"),
                                           ("pallas_mosaic_gpu", "cuda")])
def test_kernels_lower_for_their_device_at_sana_shapes(impl, platform, dtype):
  """Each backend lowers for its platform on this CPU machine: forward (2 kernels: state, output),
  reverse (2 backward kernels) and forward-mode (the forward kernels again; the tangent is jnp)."""
  backend = impl.removeprefix("pallas_")
  shapes = _REAL_SHAPES
  if backend == "mosaic_gpu" and dtype == jnp.float32:
    shapes = {k: shapes[k] for k in ("1600M 1024px",)}  # fp32 runs the Triton kernels, tested above.
  for name, shape in shapes.items():
    calls = _kernel_calls(impl, platform, shape, dtype)
    if backend == "mosaic_gpu" and dtype == jnp.bfloat16:
      # The Mosaic GPU state pass (2 of the 6 kernels), Triton for the output pass and backward.
      expected = sorted([_TARGETS["mosaic_gpu"]] * 2 + [_TARGETS["triton"]] * 4)
    elif backend == "mosaic_gpu":
      expected = [_TARGETS["triton"]] * 6  # fp32: WGMMA has no IEEE fp32, the Triton state pass runs.
    else:
      expected = [_TARGETS[backend]] * 6
    assert sorted(calls) == expected, (name, calls)


def test_dcae_attention_reaches_the_triton_kernel_in_bf16():
  """The DC-AE's linear attention passes q, k, v in one dtype, so in bf16 it lowers to the Triton
  kernels for "cuda" (with an fp32 v it never could: the kernels take no dtype mix)."""
  from sanajax.models.dcae import MultiscaleLinearAttention  # a model, needed only by this test

  block = MultiscaleLinearAttention(channels=64, attn_impl="pallas_triton", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 16, 16, 64), jnp.bfloat16)
  params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
  assert lowering.kernel_calls(block.apply, params, x) == [lowering.TRITON] * 2


def test_sana_1600m_forward_and_train_gradient_lower_for_cuda_with_the_triton_kernels():
  """What the device call's dit_forward and train_step steps compile, at their real shapes, from abstract
  parameters (no array is made): the Sana-1600M DiT forward at 1024 and 4096 px (B 1, layers scanned, so
  one state + one output kernel in the loop body), and the gradient at 1024 px, B 8, remat full (those
  two again for the recomputed forward, and the two backward kernels)."""
  import flax.linen as nn  # the model is needed only by this test

  from sanajax import config_utils
  from sanajax.models import dit_facts, sana_dit

  for res, batch, grad in ((1024, 1, False), (4096, 1, False), (1024, 8, True)):
    config = config_utils.load_config("sana_1600m", str(res), {"model.attn_impl": "pallas_triton", "model.remat": "full"})
    facts = dit_facts.describe(config)
    dit = sana_dit.build_dit(config.model)
    x = jax.ShapeDtypeStruct((batch, *facts["latent_shape"]), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, facts["text_tokens"], config.model.caption_channels), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((batch, facts["text_tokens"]), jnp.int32)
    params = jax.eval_shape(lambda *a: nn.unbox(dit.init(jax.random.PRNGKey(0), *a))["params"], x, t, ctx, mask)
    forward = lambda p, *a: dit.apply({"params": p}, *a)
    fn = jax.grad(lambda p, *a: jnp.mean(jnp.square(forward(p, *a).astype(jnp.float32)))) if grad else forward
    assert config.model.scan_layers
    assert lowering.kernel_calls(fn, params, x, t, ctx, mask) == [lowering.TRITON] * (6 if grad else 2), (res, grad)


def test_dcae_f32c32_decode_at_1024_px_lowers_for_cuda_with_the_triton_kernels():
  """The device call's dcae_decode step at its real shape (bf16, 1024 px): every EfficientViT block's
  linear attention (state + output kernels) lowers to Triton for cuda."""
  import flax.linen as nn  # the model is needed only by this test

  from sanajax import config_utils
  from sanajax.models import dcae

  c = config_utils.load_config("dcae_f32c32", overrides={"ae.attn_impl": "pallas_triton", "ae.dtype": "bfloat16"}).ae
  model, f = dcae.build_dcae(c), dcae.downsample_factor(c)
  images = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
  params = jax.eval_shape(lambda im: nn.unbox(model.init(jax.random.PRNGKey(0), im))["params"], images)
  z = jax.ShapeDtypeStruct((1, 1024 // f, 1024 // f, c.latent_channels), jnp.bfloat16)
  decode = lambda p, z: model.apply({"params": p}, z, method=model.decode)
  assert lowering.kernel_calls(decode, params, z) == [lowering.TRITON] * (2 * lowering.efficientvit_blocks(c))
