"""ReLU linear attention as Pallas kernels for the Triton backend (any CUDA/ROCm GPU).

The same kernels run on CPU under `interpret=True` (Pallas' generic interpreter), which is how
the tests check them; without a GPU they are checked by lowering for "cuda" (tests/test_kernels.py).

Layout: heads packed (sanajax.kernels._common). The (B, N, H, D) operands are viewed as
(B, N, H * D) (free) and a program takes G adjacent heads, a (tokens, W = G * D) block: with
SANA's D = 32 and G = 2, each token row is 128 contiguous bytes of bf16 (one cache line) rather
than a 64-byte piece strided by H * D. The G heads share a (W, W) state, masked block-diagonal.
W = 64 (TARGET_WIDTH) keeps the two fp32 (W, W) states of the backward in registers; 128 is the
alternative to measure on a GPU (docs/benchmarks.md, "Kernels: what a GPU must measure").

Forward, two passes:
  1. state: grid (B, H/G, C); program (b, j, c) loops over the N tiles of chunk c and writes a
     partial kv = relu(k)^T v (W, W) and ksum = relu(k)^T 1 (W,), both fp32. The C partials are
     summed by XLA (tiny). Chunking N gives B*H/G*C programs, enough to fill the SMs when B*H is
     small (Sana-1600M: H = 70, B = 1 is 35 programs otherwise).
  2. out: grid (B, H/G, N/block_n); out = relu(q) kv / (relu(q) diag(ksum) E + eps) per tile,
     E the 0/1 block-diagonal matrix (the per-head sums of relu(q) * ksum, broadcast over Dv).
Backward, two passes (no N x N anything):
  1. dstate: grid (B, H/G, C); recomputes num, den per tile and reduces
     d_kv = relu(q)^T (g / den) and d_ksum = relu(q)^T d_den, fp32 partials.
  2. dqkv: grid (B, H/G, N/block_n); dq, dk, dv per tile from the states and d-states.

Padding: D is zero-padded to a power of two >= 16 (Triton's tl.dot needs power-of-two tiles of
at least 16; Sana's D = 32 needs none); H to a multiple of G (G is chosen to divide H when it
can, so SANA's 70 and 36 heads need none); N to C * tiles_per_chunk * block_n, where block_n is
a power of two (zero rows of relu(k) add nothing to the state; zero rows of q give out = 0 and
are sliced off).
Precision: all matmuls accumulate in fp32. With fp32 inputs the fp32 ones use
Precision.HIGHEST (IEEE fp32, not TF32), so the result matches the reference; with 16-bit inputs
the relu(k)^T v state matmuls take the 16-bit operands as they are (exact products) and the
matmuls against the fp32 state use TF32 (a 2^-11 relative rounding of the state, under the
2^-8 of the bf16 output), so none of them runs on the ~15x slower non-tensor-core fp32 path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sanajax.kernels import _common
from sanajax.kernels._common import pad_axis

_F32 = jnp.float32

DEFAULT_BLOCK_N = 128
TARGET_WIDTH = 64  # lanes per program: G = TARGET_WIDTH // D heads (see the module docstring).
# Aim for this many programs in the reduction passes (about 2 waves on a 132-SM H100).
_TARGET_PROGRAMS = 264


def packing(heads: int, dim: int, dim_v: int) -> _common.HeadPacking:
  """G = the largest power of two <= TARGET_WIDTH / d_pad that divides H (so no head padding)."""
  d_pad = max(16, _common.next_power_of_2(max(dim, dim_v)))
  group = 1
  while group * 2 * d_pad <= TARGET_WIDTH and heads % (group * 2) == 0:
    group *= 2
  return _common.head_packing(heads, dim, dim_v, d_pad=d_pad, group=group)


def _tiling(n: int, programs: int, block_n: int) -> tuple[int, int, int]:
  """Returns (block_n, tiles_per_chunk, num_chunks) for n tokens and `programs` = B * H / G.

  block_n stays a power of two (Triton's tiles must be): small N gets one tile of the next
  power of two >= N (>= 16), not 128.
  """
  block_n = min(block_n, max(16, _common.next_power_of_2(n)))
  n_tiles = -(-n // block_n)
  want_chunks = max(1, min(n_tiles, -(-_TARGET_PROGRAMS // programs)))
  tiles_per_chunk = -(-n_tiles // want_chunks)
  return block_n, tiles_per_chunk, -(-n_tiles // tiles_per_chunk)


def _dot(a, b, *, precise, trans_a=False, trans_b=False):
  """fp32-accumulating matmul; IEEE fp32 when an operand is fp32 and `precise`, else TF32."""
  precision = lax.Precision.HIGHEST if precise and _F32 in (a.dtype, b.dtype) else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _relu(x):
  # relu is exact in any float dtype, so 16-bit operands can go to the MMA unchanged.
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _num_den(qr, kv, ksum, e, eps, precise):
  """qr: (bn, W) fp32; kv: (W, W) block-diagonal; ksum: (W,); e: (W, W) 0/1 -> num, den (bn, W)."""
  num = _dot(qr, kv, precise=precise)
  den = _dot(qr * ksum[None, :], e, precise=precise) + eps  # Per-head sum, broadcast over the head's Dv.
  return num, den


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, e_ref, kv_ref, ksum_ref, *, block_n, precise):
  """k_ref, v_ref: (chunk, W) -> kv_ref (W, W) block-diagonal, ksum_ref (W,), fp32."""
  def body(t, carry):
    kv, ksum = carry
    rows = pl.ds(pl.multiple_of(t * block_n, block_n), block_n)
    kr = _relu(k_ref[rows, :])
    kv = kv + _dot(kr, v_ref[rows, :], trans_a=True, precise=precise)
    return kv, ksum + jnp.sum(kr.astype(_F32), axis=0)

  init = (jnp.zeros(kv_ref.shape, _F32), jnp.zeros(ksum_ref.shape, _F32))
  kv, ksum = lax.fori_loop(0, k_ref.shape[0] // block_n, body, init)
  kv_ref[...] = kv * e_ref[...]  # Drop the cross-head blocks.
  ksum_ref[...] = ksum


def _out_kernel(q_ref, kv_ref, ksum_ref, e_ref, o_ref, *, eps, precise):
  """q_ref: (bn, W); kv_ref: (W, W); ksum_ref: (W,) -> o_ref (bn, W)."""
  qr = _relu(q_ref[...]).astype(_F32)
  num, den = _num_den(qr, kv_ref[...], ksum_ref[...], e_ref[...], eps, precise)
  o_ref[...] = (num / den).astype(o_ref.dtype)


def _dnum_dden(qr, g, kv, ksum, e, eps, precise):
  """d out / d num = g / den and d out / d den (per head, broadcast over its D lanes), (bn, W)."""
  num, den = _num_den(qr, kv, ksum, e, eps, precise)
  d_num = g.astype(_F32) / den
  d_den = -_dot(d_num * num / den, e, precise=precise)  # -sum(g num / den^2) over the head's Dv.
  return d_num, d_den


def _dstate_kernel(q_ref, g_ref, kv_ref, ksum_ref, e_ref, dkv_ref, dksum_ref, *, block_n, eps, precise):
  """Reduces d_kv (W, W) and d_ksum (W,) over the tiles of one chunk, fp32."""
  kv, ksum, e = kv_ref[...], ksum_ref[...], e_ref[...]

  def body(t, carry):
    dkv, dksum = carry
    rows = pl.ds(pl.multiple_of(t * block_n, block_n), block_n)
    qr = _relu(q_ref[rows, :]).astype(_F32)
    d_num, d_den = _dnum_dden(qr, g_ref[rows, :], kv, ksum, e, eps, precise)
    dkv = dkv + _dot(qr, d_num, trans_a=True, precise=precise)
    return dkv, dksum + jnp.sum(qr * d_den, axis=0)

  init = (jnp.zeros(dkv_ref.shape, _F32), jnp.zeros(dksum_ref.shape, _F32))
  dkv, dksum = lax.fori_loop(0, q_ref.shape[0] // block_n, body, init)
  dkv_ref[...] = dkv * e
  dksum_ref[...] = dksum


def _dqkv_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, e_ref,
                 dq_ref, dk_ref, dv_ref, *, eps, precise):
  """Per tile of bn tokens: dq, dk, dv (bn, W)."""
  kv, ksum = kv_ref[...], ksum_ref[...]
  q = q_ref[...]
  qr = _relu(q).astype(_F32)
  d_num, d_den = _dnum_dden(qr, g_ref[...], kv, ksum, e_ref[...], eps, precise)
  d_qr = _dot(d_num, kv, trans_b=True, precise=precise) + d_den * ksum[None, :]
  # where, not a multiply: d_qr of an all-zero row is ~g/eps and may overflow to inf.
  dq_ref[...] = jnp.where(q > 0, d_qr, 0.0).astype(dq_ref.dtype)

  dkv, dksum = dkv_ref[...], dksum_ref[...]
  k = k_ref[...]
  d_kr = _dot(v_ref[...].astype(_F32), dkv, trans_b=True, precise=precise) + dksum[None, :]
  dk_ref[...] = jnp.where(k > 0, d_kr, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_relu(k).astype(_F32), dkv, precise=precise).astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- wrappers


def _seq_spec(rows: int, width: int) -> pl.BlockSpec:
  # (B, N, H * D) -> kernel sees (rows, width) = head block j; grid is (b, j, t).
  return pl.BlockSpec((None, rows, width), lambda b, j, t: (b, t, j))


def _state_spec(*shape: int) -> pl.BlockSpec:
  # (B, blocks, *shape) -> kernel sees shape; the same block for every tile or chunk.
  return pl.BlockSpec((None, None, *shape), lambda b, j, t: (b, j) + (0,) * len(shape))


def _partial_spec(*shape: int) -> pl.BlockSpec:
  # (B, blocks, C, *shape) -> kernel sees shape; one block per chunk.
  return pl.BlockSpec((None, None, None, *shape), lambda b, j, c: (b, j, c) + (0,) * len(shape))


def _const_spec(width: int) -> pl.BlockSpec:
  # The (W, W) 0/1 block-diagonal matrix, one block for all programs.
  return pl.BlockSpec((width, width), lambda b, j, t: (0, 0))


def _compiler_params(width: int):
  return plgpu.CompilerParams(num_warps=4 if width <= 32 else 8, num_stages=2)


def _plan(q_shape, dim_v: int, block_n: int):
  """(packing, tiling, n_pad) for q of shape (B, N, H, D) and Dv = dim_v."""
  b, n, h, d = q_shape
  p = packing(h, d, dim_v)
  tiling = _tiling(n, b * p.blocks, block_n)
  return p, tiling, tiling[0] * tiling[1] * tiling[2]


def _pack(x, p, n_pad):
  """(B, N, H, D) -> packed and zero-padded (B, n_pad, Hp * Dp)."""
  return pad_axis(_common.pack_heads(x, p), 1, n_pad)


def _precise(*dtypes) -> bool:
  return all(jnp.dtype(t) == _F32 for t in dtypes)


def _prepare(q, k, v, block_n):
  """Packs and pads (B, N, H, D) operands -> (q, k, v as (B, n_pad, Hp * Dp), packing, tiling, precise)."""
  p, tiling, n_pad = _plan(q.shape, v.shape[-1], block_n)
  return (*(_pack(x, p, n_pad) for x in (q, k, v)), p, tiling, _precise(q.dtype, v.dtype))


def _state(k, v, p, tiling, precise, interpret):
  """k, v packed (B, n_pad, Hp * Dp) -> block states kv (B, blocks, W, W), ksum (B, blocks, W), fp32."""
  b, w = k.shape[0], p.width
  block_n, tpc, chunks = tiling
  kv, ksum = pl.pallas_call(
      functools.partial(_state_kernel, block_n=block_n, precise=precise),
      grid=(b, p.blocks, chunks),
      in_specs=[_seq_spec(tpc * block_n, w), _seq_spec(tpc * block_n, w), _const_spec(w)],
      out_specs=[_partial_spec(w, w), _partial_spec(w)],
      out_shape=[jax.ShapeDtypeStruct((b, p.blocks, chunks, w, w), _F32),
                 jax.ShapeDtypeStruct((b, p.blocks, chunks, w), _F32)],
      compiler_params=_compiler_params(w),
      interpret=interpret,
      name="linear_attention_state",
  )(k, v, _common.block_ones(p))
  return kv.sum(axis=2), ksum.sum(axis=2)


def _out(q, kv, ksum, out_dtype, p, tiling, eps, precise, interpret):
  """q packed, block states -> out packed (B, n_pad, Hp * Dp) in out_dtype."""
  b, n_pad, _ = q.shape
  w, block_n = p.width, tiling[0]
  return pl.pallas_call(
      functools.partial(_out_kernel, eps=eps, precise=precise),
      grid=(b, p.blocks, n_pad // block_n),
      in_specs=[_seq_spec(block_n, w), _state_spec(w, w), _state_spec(w), _const_spec(w)],
      out_specs=_seq_spec(block_n, w),
      out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
      compiler_params=_compiler_params(w),
      interpret=interpret,
      name="linear_attention_out",
  )(q, kv, ksum, _common.block_ones(p))


def output(q: jax.Array, kv: jax.Array, ksum: jax.Array, out_dtype, *, eps: float, interpret: bool = False,
           block_n: int | None = None) -> jax.Array:
  """The output pass alone, from per-head states: q (B, N, H, D), kv (B, H, D, Dv), ksum (B, H, D) fp32
  -> out (B, N, H, Dv) in out_dtype (the Mosaic GPU module's forward uses it after its state pass)."""
  n, dim_v = q.shape[1], kv.shape[-1]
  p, tiling, n_pad = _plan(q.shape, dim_v, block_n or DEFAULT_BLOCK_N)
  qp, precise = _pack(q, p, n_pad), _precise(q.dtype, out_dtype)
  kvb, ksumb = _common.states_to_blocks(kv, ksum, p)
  out = _out(qp, kvb, ksumb, out_dtype, p, tiling, eps, precise, interpret)
  return _common.unpack_heads(out[:, :n], p, dim_v)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """q, k: (B, N, H, D); v: (B, N, H, Dv).

  Returns (out (B, N, H, Dv) in v's dtype, kv (B, H, D, Dv) fp32, ksum (B, H, D) fp32).
  """
  n, dv = q.shape[1], v.shape[-1]
  qp, kp, vp, p, tiling, precise = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  kvb, ksumb = _state(kp, vp, p, tiling, precise, interpret)
  out = _out(qp, kvb, ksumb, v.dtype, p, tiling, eps, precise, interpret)
  kv, ksum = _common.states_from_blocks(kvb, ksumb, p)
  return _common.unpack_heads(out[:, :n], p, dv), kv, ksum


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv: jax.Array, ksum: jax.Array,
             g: jax.Array, *, eps: float = 1e-15, interpret: bool = False,
             block_n: int | None = None):
  """Cotangents of `forward`'s out. g: (B, N, H, Dv); kv (B, H, D, Dv), ksum (B, H, D): the fp32 states.

  Returns (dq, dk, dv) in the dtypes of q, k, v, layout (B, N, H, D).
  """
  b, n, _, d = q.shape
  dv_dim = v.shape[-1]
  qp, kp, vp, p, tiling, precise = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  block_n, tpc, chunks = tiling
  n_pad, w = qp.shape[1], p.width
  gp = pad_axis(_common.pack_heads(g, p), 1, n_pad)
  kv, ksum = _common.states_to_blocks(kv, ksum, p)
  e = _common.block_ones(p)
  params = _compiler_params(w)

  dkv, dksum = pl.pallas_call(
      functools.partial(_dstate_kernel, block_n=block_n, eps=eps, precise=precise),
      grid=(b, p.blocks, chunks),
      in_specs=[_seq_spec(tpc * block_n, w), _seq_spec(tpc * block_n, w),
                _state_spec(w, w), _state_spec(w), _const_spec(w)],
      out_specs=[_partial_spec(w, w), _partial_spec(w)],
      out_shape=[jax.ShapeDtypeStruct((b, p.blocks, chunks, w, w), _F32),
                 jax.ShapeDtypeStruct((b, p.blocks, chunks, w), _F32)],
      compiler_params=params,
      interpret=interpret,
      name="linear_attention_bwd_state",
  )(qp, gp, kv, ksum, e)
  dkv, dksum = dkv.sum(axis=2), dksum.sum(axis=2)

  seq = _seq_spec(block_n, w)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_dqkv_kernel, eps=eps, precise=precise),
      grid=(b, p.blocks, n_pad // block_n),
      in_specs=[seq, seq, seq, seq, _state_spec(w, w), _state_spec(w),
                _state_spec(w, w), _state_spec(w), _const_spec(w)],
      out_specs=[seq, seq, seq],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="linear_attention_bwd_dqkv",
  )(qp, kp, vp, gp, kv, ksum, dkv, dksum, e)
  return (_common.unpack_heads(dq[:, :n], p, d), _common.unpack_heads(dk[:, :n], p, d),
          _common.unpack_heads(dv[:, :n], p, dv_dim))
