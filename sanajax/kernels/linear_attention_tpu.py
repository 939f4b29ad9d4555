"""ReLU linear attention as Pallas kernels for TPU (Mosaic TPU).

Runs on CPU under `interpret=True` (the generic Pallas interpreter), which the tests use; without
a TPU they also lower it for "tpu" (a tpu_custom_call holding the Mosaic module).

Layout: heads packed into the 128 lanes (sanajax.kernels._common). The (B, N, H, D) operands
are viewed as (B, N, H * D), a free reshape, and a block is (block_n, 128): G = 128 / D heads
(4 for SANA's D = 32) side by side, lane-dense, with no transpose in XLA or in the kernel. The
G heads share a (128, 128) fp32 state, masked block-diagonal, and the per-head normaliser is a
matmul against the 0/1 block-diagonal matrix E. D is zero-padded to a divisor of 128 (a power of
two) or, above 128, to a multiple of 128; H to a multiple of G (Sana-1600M's 70 heads -> 72, one
XLA pad of q, k, v; 600M's 36 and the DC-AE's 32/64 need none); N to a multiple of block_n
(itself a multiple of 16, the bf16 sublane tile). When all heads fit in fewer than 128 lanes the
block is the whole H * D row (allowed: a block dim equal to the array dim).

TPU grids run sequentially on a core, so the reductions over N are a grid axis marked
"arbitrary" whose output block (the fp32 state) stays resident in VMEM and is accumulated in
place; (B, head blocks) are "parallel" (split across TensorCores where there are two). Passes,
as in the Triton module:
  forward  1. state  grid (B, H/G, N/bn): kv += relu(k)^T v, ksum += relu(k)^T 1
           2. out    grid (B, H/G, N/bn): relu(q) kv / (relu(q) diag(ksum) E + eps)
  backward 1. dstate grid (B, H/G, N/bn): d_kv += relu(q)^T d_num, d_ksum += relu(q)^T d_den
           2. dqkv   grid (B, H/G, N/bn): dq, dk, dv per tile.
Precision: fp32 inputs use Precision.HIGHEST for the matmuls with an fp32 operand; 16-bit inputs
use the default (one MXU pass), which rounds the fp32 state to bf16 in those matmuls (relative
2^-9, the size of the bf16 output's own rounding) and keeps the kernel memory-bound.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sanajax.kernels import _common
from sanajax.kernels._common import pad_axis, round_up

_F32 = jnp.float32
_TN = (((0,), (0,)), ((), ()))  # a^T b: contract the token axis of both.
_NT = (((1,), (1,)), ((), ()))  # a b^T.
_NN = (((1,), (0,)), ((), ()))

DEFAULT_BLOCK_N = 512
LANES = 128


def packing(heads: int, dim: int, dim_v: int) -> _common.HeadPacking:
  """G heads of d_pad lanes per 128-lane block (or all H heads when H * d_pad < 128)."""
  widest = max(dim, dim_v)
  if widest > LANES:
    return _common.head_packing(heads, dim, dim_v, d_pad=round_up(widest, LANES), group=1)
  d_pad = _common.next_power_of_2(widest)
  group = min(LANES // d_pad, heads)
  return _common.head_packing(heads, dim, dim_v, d_pad=d_pad, group=group)


def _dot(a, b, dims, precise):
  precision = lax.Precision.HIGHEST if precise and _F32 in (a.dtype, b.dtype) else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _num_den(qr, kv, ksum, e, eps, precise):
  """qr: (bn, W) fp32; kv: (W, W) block-diagonal; ksum: (1, W); e: (W, W) 0/1 -> num, den (bn, W)."""
  num = _dot(qr, kv, _NN, precise)
  den = _dot(qr * ksum, e, _NN, precise) + eps  # Per-head sum, broadcast over the head's Dv lanes.
  return num, den


def _dnum_dden(qr, g, kv, ksum, e, eps, precise):
  num, den = _num_den(qr, kv, ksum, e, eps, precise)
  d_num = g.astype(_F32) / den
  d_den = -_dot(d_num * num / den, e, _NN, precise)  # -sum(g num / den^2) over the head's Dv.
  return d_num, d_den


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, e_ref, kv_ref, ksum_ref, *, precise):
  step, last = pl.program_id(2), pl.num_programs(2) - 1

  @pl.when(step == 0)
  def _init():
    kv_ref[...] = jnp.zeros(kv_ref.shape, _F32)
    ksum_ref[...] = jnp.zeros(ksum_ref.shape, _F32)

  kr = _relu(k_ref[...])
  kv_ref[...] += _dot(kr, v_ref[...], _TN, precise)
  ksum_ref[...] += jnp.sum(kr.astype(_F32), axis=0, keepdims=True)

  @pl.when(step == last)
  def _mask():
    kv_ref[...] = kv_ref[...] * e_ref[...]  # Drop the cross-head blocks.


def _out_kernel(q_ref, kv_ref, ksum_ref, e_ref, o_ref, *, eps, precise):
  qr = _relu(q_ref[...]).astype(_F32)
  num, den = _num_den(qr, kv_ref[...], ksum_ref[...], e_ref[...], eps, precise)
  o_ref[...] = (num / den).astype(o_ref.dtype)


def _dstate_kernel(q_ref, g_ref, kv_ref, ksum_ref, e_ref, dkv_ref, dksum_ref, *, eps, precise):
  step, last = pl.program_id(2), pl.num_programs(2) - 1

  @pl.when(step == 0)
  def _init():
    dkv_ref[...] = jnp.zeros(dkv_ref.shape, _F32)
    dksum_ref[...] = jnp.zeros(dksum_ref.shape, _F32)

  qr = _relu(q_ref[...]).astype(_F32)
  d_num, d_den = _dnum_dden(qr, g_ref[...], kv_ref[...], ksum_ref[...], e_ref[...], eps, precise)
  dkv_ref[...] += _dot(qr, d_num, _TN, precise)
  dksum_ref[...] += jnp.sum(qr * d_den, axis=0, keepdims=True)

  @pl.when(step == last)
  def _mask():
    dkv_ref[...] = dkv_ref[...] * e_ref[...]


def _dqkv_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, e_ref,
                 dq_ref, dk_ref, dv_ref, *, eps, precise):
  kv, ksum = kv_ref[...], ksum_ref[...]
  q = q_ref[...]
  qr = _relu(q).astype(_F32)
  d_num, d_den = _dnum_dden(qr, g_ref[...], kv, ksum, e_ref[...], eps, precise)
  d_qr = _dot(d_num, kv, _NT, precise) + d_den * ksum
  # where, not a multiply: d_qr of an all-zero row is ~g/eps and may overflow to inf.
  dq_ref[...] = jnp.where(q > 0, d_qr, 0.0).astype(dq_ref.dtype)

  dkv = dkv_ref[...]
  k = k_ref[...]
  d_kr = _dot(v_ref[...].astype(_F32), dkv, _NT, precise) + dksum_ref[...]
  dk_ref[...] = jnp.where(k > 0, d_kr, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_relu(k).astype(_F32), dkv, _NN, precise).astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- wrappers


def _seq_spec(block_n: int, width: int) -> pl.BlockSpec:
  # (B, N, H * D) -> kernel sees (block_n, width) = head block j; grid is (b, j, t).
  return pl.BlockSpec((None, block_n, width), lambda b, j, t: (b, t, j))


def _state_spec(rows: int, cols: int) -> pl.BlockSpec:
  # (B, blocks, rows, cols) -> the same (rows, cols) block for every tile (resident in VMEM).
  return pl.BlockSpec((None, None, rows, cols), lambda b, j, t: (b, j, 0, 0))


def _const_spec(width: int) -> pl.BlockSpec:
  return pl.BlockSpec((width, width), lambda b, j, t: (0, 0))


def _params(reduce: bool):
  last = "arbitrary" if reduce else "parallel"
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", last))


def _prepare(q, k, v, block_n):
  """Packs and pads -> (q, k, v as (B, n_pad, Hp * Dp), packing, block_n, precise)."""
  n = q.shape[1]
  p = packing(q.shape[2], q.shape[3], v.shape[3])
  block_n = min(block_n, round_up(n, 16))
  n_pad = round_up(n, block_n)
  packed = [pad_axis(_common.pack_heads(x, p), 1, n_pad) for x in (q, k, v)]
  precise = jnp.dtype(q.dtype) == _F32 and jnp.dtype(v.dtype) == _F32
  return (*packed, p, block_n, precise)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """q, k: (B, N, H, D); v: (B, N, H, Dv).

  Returns (out (B, N, H, Dv) in v's dtype, kv (B, H, D, Dv) fp32, ksum (B, H, D) fp32).
  """
  bsz, n = q.shape[:2]
  qp, kp, vp, p, block_n, precise = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  w, e = p.width, _common.block_ones(p)
  grid = (bsz, p.blocks, qp.shape[1] // block_n)
  kv, ksum = pl.pallas_call(
      functools.partial(_state_kernel, precise=precise),
      grid=grid,
      in_specs=[_seq_spec(block_n, w), _seq_spec(block_n, w), _const_spec(w)],
      out_specs=[_state_spec(w, w), _state_spec(1, w)],
      out_shape=[jax.ShapeDtypeStruct((bsz, p.blocks, w, w), _F32),
                 jax.ShapeDtypeStruct((bsz, p.blocks, 1, w), _F32)],
      compiler_params=_params(reduce=True),
      interpret=interpret,
      name="linear_attention_state_tpu",
  )(kp, vp, e)
  out = pl.pallas_call(
      functools.partial(_out_kernel, eps=eps, precise=precise),
      grid=grid,
      in_specs=[_seq_spec(block_n, w), _state_spec(w, w), _state_spec(1, w), _const_spec(w)],
      out_specs=_seq_spec(block_n, w),
      out_shape=jax.ShapeDtypeStruct(qp.shape, v.dtype),
      compiler_params=_params(reduce=False),
      interpret=interpret,
      name="linear_attention_out_tpu",
  )(qp, kv, ksum, e)
  kv, ksum = _common.states_from_blocks(kv, ksum[:, :, 0], p)
  return _common.unpack_heads(out[:, :n], p, v.shape[-1]), kv, ksum


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv: jax.Array, ksum: jax.Array,
             g: jax.Array, *, eps: float = 1e-15, interpret: bool = False,
             block_n: int | None = None):
  """Cotangents of `forward`'s out. g: (B, N, H, Dv); kv (B, H, D, Dv), ksum (B, H, D) fp32.

  Returns (dq, dk, dv) in the dtypes of q, k, v, layout (B, N, H, D).
  """
  bsz, n, _, d = q.shape
  qp, kp, vp, p, block_n, precise = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  n_pad, w, e = qp.shape[1], p.width, _common.block_ones(p)
  gp = pad_axis(_common.pack_heads(g, p), 1, n_pad)
  kv, ksum = _common.states_to_blocks(kv, ksum, p)
  ksum = ksum[:, :, None, :]
  grid = (bsz, p.blocks, n_pad // block_n)

  dkv, dksum = pl.pallas_call(
      functools.partial(_dstate_kernel, eps=eps, precise=precise),
      grid=grid,
      in_specs=[_seq_spec(block_n, w), _seq_spec(block_n, w), _state_spec(w, w), _state_spec(1, w),
                _const_spec(w)],
      out_specs=[_state_spec(w, w), _state_spec(1, w)],
      out_shape=[jax.ShapeDtypeStruct((bsz, p.blocks, w, w), _F32),
                 jax.ShapeDtypeStruct((bsz, p.blocks, 1, w), _F32)],
      compiler_params=_params(reduce=True),
      interpret=interpret,
      name="linear_attention_bwd_state_tpu",
  )(qp, gp, kv, ksum, e)

  seq = _seq_spec(block_n, w)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_dqkv_kernel, eps=eps, precise=precise),
      grid=grid,
      in_specs=[seq, seq, seq, seq, _state_spec(w, w), _state_spec(1, w), _state_spec(w, w),
                _state_spec(1, w), _const_spec(w)],
      out_specs=[seq, seq, seq],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=_params(reduce=False),
      interpret=interpret,
      name="linear_attention_bwd_dqkv_tpu",
  )(qp, kp, vp, gp, kv, ksum, dkv, dksum, e)
  return (_common.unpack_heads(dq[:, :n], p, d), _common.unpack_heads(dk[:, :n], p, d),
          _common.unpack_heads(dv[:, :n], p, v.shape[-1]))
