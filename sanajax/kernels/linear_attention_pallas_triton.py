"""ReLU linear attention as Pallas kernels for the Triton backend (any CUDA/ROCm GPU).

The same kernels run on CPU under `interpret=True` (Pallas' generic interpreter), which
is how the tests check them. Layout stays (B, N, H, D): blocks squeeze the head axis, so
no transposes are needed.

Forward, two passes:
  1. state: grid (B, H, C); program (b, h, c) loops over the N tiles of chunk c and
     writes a partial kv = relu(k)^T v (D, Dv) and ksum = relu(k)^T 1 (D,), both fp32.
     The C partials are summed by XLA (tiny). Chunking N gives B*H*C programs, enough
     to fill the SMs when B*H is small (Sana: H=70, B=1 is 70 programs otherwise).
  2. out: grid (B, H, N/block_n); out = relu(q) kv / (relu(q) ksum + eps) per tile.
Backward, two passes (no N x N anything):
  1. dstate: grid (B, H, C); recomputes num, den per tile and reduces
     d_kv = relu(q)^T (g / den) and d_ksum = relu(q)^T d_den, fp32 partials.
  2. dqkv: grid (B, H, N/block_n); dq, dk, dv per tile from the states and d-states.

Padding: N is zero-padded to C * tiles_per_chunk * block_n (zero rows of relu(k) add
nothing to the state; zero rows of q give out = 0 and are sliced off). D and Dv are
zero-padded to a power of two >= 16 because Triton's tl.dot needs power-of-two tiles of
at least 16; Sana's D = 32 needs no padding. All matmuls accumulate in fp32; the fp32
ones use Precision.HIGHEST (IEEE fp32, not TF32) so the result matches the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sanajax.kernels._common import pad_axis, round_up

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST

DEFAULT_BLOCK_N = 128
# Aim for this many programs in the reduction passes (about 2 waves on a 132-SM H100).
_TARGET_PROGRAMS = 264


def _padded_dim(d: int) -> int:
  return max(16, pl.next_power_of_2(d))


def _tiling(n: int, batch_heads: int, block_n: int) -> tuple[int, int, int]:
  """Returns (block_n, tiles_per_chunk, num_chunks) for a sequence of n tokens."""
  block_n = min(block_n, round_up(max(n, 1), 16))  # Small N: one small tile, not 128.
  n_tiles = -(-n // block_n)
  want_chunks = max(1, min(n_tiles, -(-_TARGET_PROGRAMS // batch_heads)))
  tiles_per_chunk = -(-n_tiles // want_chunks)
  return block_n, tiles_per_chunk, -(-n_tiles // tiles_per_chunk)


def _dot(a, b, *, trans_a=False, trans_b=False):
  """fp32-accumulating matmul; IEEE fp32 when an operand is fp32."""
  precision = _HIGHEST if _F32 in (a.dtype, b.dtype) else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _relu(x):
  # relu is exact in any float dtype, so bf16 operands can go to the MMA unchanged.
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _num_den(qr, kv, ksum, eps):
  """qr: (bn, D) fp32; kv: (D, Dv); ksum: (D,) -> num (bn, Dv), den (bn,), fp32."""
  num = _dot(qr, kv)
  den = jnp.sum(qr * ksum[None, :], axis=1) + eps
  return num, den


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, kv_ref, ksum_ref, *, block_n):
  """k_ref: (chunk, D), v_ref: (chunk, Dv) -> kv_ref (D, Dv), ksum_ref (D,) fp32."""
  def body(t, carry):
    kv, ksum = carry
    rows = pl.ds(pl.multiple_of(t * block_n, block_n), block_n)
    kr = _relu(k_ref[rows, :])
    kv = kv + _dot(kr, v_ref[rows, :], trans_a=True)
    return kv, ksum + jnp.sum(kr.astype(_F32), axis=0)

  init = (jnp.zeros(kv_ref.shape, _F32), jnp.zeros(ksum_ref.shape, _F32))
  kv, ksum = lax.fori_loop(0, k_ref.shape[0] // block_n, body, init)
  kv_ref[...] = kv
  ksum_ref[...] = ksum


def _out_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, eps):
  """q_ref: (bn, D); kv_ref: (D, Dv); ksum_ref: (D,) -> o_ref (bn, Dv)."""
  qr = _relu(q_ref[...]).astype(_F32)
  num, den = _num_den(qr, kv_ref[...], ksum_ref[...], eps)
  o_ref[...] = (num / den[:, None]).astype(o_ref.dtype)


def _dstate_kernel(q_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, *, block_n, eps):
  """Reduces d_kv (D, Dv) and d_ksum (D,) over the tiles of one chunk, fp32."""
  kv, ksum = kv_ref[...], ksum_ref[...]

  def body(t, carry):
    dkv, dksum = carry
    rows = pl.ds(pl.multiple_of(t * block_n, block_n), block_n)
    qr = _relu(q_ref[rows, :]).astype(_F32)
    num, den = _num_den(qr, kv, ksum, eps)
    d_num = g_ref[rows, :].astype(_F32) / den[:, None]
    d_den = -jnp.sum(d_num * num, axis=1) / den  # -sum(g num / den^2) over Dv.
    dkv = dkv + _dot(qr, d_num, trans_a=True)
    return dkv, dksum + jnp.sum(qr * d_den[:, None], axis=0)

  init = (jnp.zeros(dkv_ref.shape, _F32), jnp.zeros(dksum_ref.shape, _F32))
  dkv, dksum = lax.fori_loop(0, q_ref.shape[0] // block_n, body, init)
  dkv_ref[...] = dkv
  dksum_ref[...] = dksum


def _dqkv_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref,
                 dq_ref, dk_ref, dv_ref, *, eps):
  """Per tile of bn tokens: dq (bn, D), dk (bn, D), dv (bn, Dv)."""
  kv, ksum = kv_ref[...], ksum_ref[...]
  q = q_ref[...]
  qr = _relu(q).astype(_F32)
  num, den = _num_den(qr, kv, ksum, eps)
  d_num = g_ref[...].astype(_F32) / den[:, None]
  d_den = -jnp.sum(d_num * num, axis=1) / den
  d_qr = _dot(d_num, kv, trans_b=True) + d_den[:, None] * ksum[None, :]
  # where, not a multiply: d_qr of an all-zero row is ~g/eps and may overflow to inf.
  dq_ref[...] = jnp.where(q > 0, d_qr, 0.0).astype(dq_ref.dtype)

  dkv, dksum = dkv_ref[...], dksum_ref[...]
  k = k_ref[...]
  d_kr = _dot(v_ref[...].astype(_F32), dkv, trans_b=True) + dksum[None, :]
  dk_ref[...] = jnp.where(k > 0, d_kr, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_relu(k).astype(_F32), dkv).astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- wrappers


def _seq_spec(rows: int, d: int) -> pl.BlockSpec:
  # (B, N, H, D) -> kernel sees (rows, d); grid is (b, h, t).
  return pl.BlockSpec((None, rows, None, d), lambda b, h, t: (b, t, h, 0))


def _state_spec(*shape: int) -> pl.BlockSpec:
  # (B, H, *shape) -> kernel sees shape; the same block for every tile or chunk.
  return pl.BlockSpec((None, None, *shape), lambda b, h, t: (b, h) + (0,) * len(shape))


def _partial_spec(*shape: int) -> pl.BlockSpec:
  # (B, H, C, *shape) -> kernel sees shape; one block per chunk.
  return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, h, c) + (0,) * len(shape))


def _compiler_params(d: int):
  return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _prepare(q, k, v, block_n):
  """Pads (B, N, H, D) operands; returns them with the static tiling."""
  b, n, h, d = q.shape
  dv = v.shape[-1]
  block_n, tpc, chunks = _tiling(n, b * h, block_n)
  n_pad = chunks * tpc * block_n
  dp, dvp = _padded_dim(d), _padded_dim(dv)
  q = pad_axis(pad_axis(q, 1, n_pad), 3, dp)
  k = pad_axis(pad_axis(k, 1, n_pad), 3, dp)
  v = pad_axis(pad_axis(v, 1, n_pad), 3, dvp)
  return q, k, v, (block_n, tpc, chunks)


def _state(k, v, tiling, interpret):
  b, n, h, dp = k.shape
  dvp = v.shape[-1]
  block_n, tpc, chunks = tiling
  kv, ksum = pl.pallas_call(
      functools.partial(_state_kernel, block_n=block_n),
      grid=(b, h, chunks),
      in_specs=[_seq_spec(tpc * block_n, dp), _seq_spec(tpc * block_n, dvp)],
      out_specs=[_partial_spec(dp, dvp), _partial_spec(dp)],
      out_shape=[jax.ShapeDtypeStruct((b, h, chunks, dp, dvp), _F32),
                 jax.ShapeDtypeStruct((b, h, chunks, dp), _F32)],
      compiler_params=_compiler_params(dp),
      interpret=interpret,
      name="linear_attention_state",
  )(k, v)
  return kv.sum(axis=2), ksum.sum(axis=2)


def _out(q, kv, ksum, out_dtype, tiling, eps, interpret):
  b, n, h, dp = q.shape
  dvp = kv.shape[-1]
  block_n = tiling[0]
  return pl.pallas_call(
      functools.partial(_out_kernel, eps=eps),
      grid=(b, h, n // block_n),
      in_specs=[_seq_spec(block_n, dp), _state_spec(dp, dvp), _state_spec(dp)],
      out_specs=_seq_spec(block_n, dvp),
      out_shape=jax.ShapeDtypeStruct((b, n, h, dvp), out_dtype),
      compiler_params=_compiler_params(dp),
      interpret=interpret,
      name="linear_attention_out",
  )(q, kv, ksum)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """q, k: (B, N, H, D); v: (B, N, H, Dv).

  Returns (out (B, N, H, Dv) in v's dtype, kv (B, H, D, Dv) fp32, ksum (B, H, D) fp32).
  """
  n, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
  qp, kp, vp, tiling = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  kv, ksum = _state(kp, vp, tiling, interpret)
  out = _out(qp, kv, ksum, v.dtype, tiling, eps, interpret)
  return out[:, :n, :, :dv], kv[:, :, :d, :dv], ksum[:, :, :d]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv: jax.Array, ksum: jax.Array,
             g: jax.Array, *, eps: float = 1e-15, interpret: bool = False,
             block_n: int | None = None):
  """Cotangents of `forward`'s out. g: (B, N, H, Dv); kv, ksum: the fp32 states.

  Returns (dq, dk, dv) in the dtypes of q, k, v.
  """
  b, n, h, d = q.shape
  dv_dim = v.shape[-1]
  qp, kp, vp, tiling = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  block_n, tpc, chunks = tiling
  n_pad, dp, dvp = qp.shape[1], qp.shape[-1], vp.shape[-1]
  gp = pad_axis(pad_axis(g, 1, n_pad), 3, dvp)
  kv = pad_axis(pad_axis(kv, 2, dp), 3, dvp)
  ksum = pad_axis(ksum, 2, dp)
  params = _compiler_params(dp)

  dkv, dksum = pl.pallas_call(
      functools.partial(_dstate_kernel, block_n=block_n, eps=eps),
      grid=(b, h, chunks),
      in_specs=[_seq_spec(tpc * block_n, dp), _seq_spec(tpc * block_n, dvp),
                _state_spec(dp, dvp), _state_spec(dp)],
      out_specs=[_partial_spec(dp, dvp), _partial_spec(dp)],
      out_shape=[jax.ShapeDtypeStruct((b, h, chunks, dp, dvp), _F32),
                 jax.ShapeDtypeStruct((b, h, chunks, dp), _F32)],
      compiler_params=params,
      interpret=interpret,
      name="linear_attention_bwd_state",
  )(qp, gp, kv, ksum)
  dkv, dksum = dkv.sum(axis=2), dksum.sum(axis=2)

  seq_d, seq_dv = _seq_spec(block_n, dp), _seq_spec(block_n, dvp)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_dqkv_kernel, eps=eps),
      grid=(b, h, n_pad // block_n),
      in_specs=[seq_d, seq_d, seq_dv, seq_dv, _state_spec(dp, dvp), _state_spec(dp),
                _state_spec(dp, dvp), _state_spec(dp)],
      out_specs=[seq_d, seq_d, seq_dv],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="linear_attention_bwd_dqkv",
  )(qp, kp, vp, gp, kv, ksum, dkv, dksum)
  return dq[:, :n, :, :d], dk[:, :n, :, :d], dv[:, :n, :, :dv_dim]
