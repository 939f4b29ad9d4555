"""Linear-attention kernels vs the jnp reference, on CPU in the Pallas interpreter.

Every kernel config is checked by one jitted function returning forward, the three
gradients and a JVP, so each shape costs one compile (interpret mode compiles slowly).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    ("pallas", (2, 37, 2, 32), False),     # N not a multiple of the tile; Sana's D.
    ("pallas", (1, 100, 1, 72), True),     # D not a power of two: padded to 128.
    ("pallas", (1, 20, 1, 112), False),
    ("pallas_tpu", (1, 37, 2, 72), True),  # TPU kernel: (B, H, N, D) layout, 128 lanes.
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
  _check_against_reference(impl, (1, 37, 2, 32), jnp.bfloat16, rel=2e-2)


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
  with pytest.raises(ValueError, match="interpret=True"):
    linear_attention(q, k, v, impl="pallas_tpu")
  with pytest.raises(ValueError, match="Unknown linear attention impl"):
    linear_attention(q, k, v, impl="cuda")

