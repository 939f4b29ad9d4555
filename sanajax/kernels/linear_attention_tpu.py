"""ReLU linear attention as Pallas kernels for TPU (Mosaic TPU).

Runs on CPU under `interpret=True` (the generic Pallas interpreter), which the tests use.

Layout: operands are transposed to (B, H, N, D) so a block's last two dims are
(block_n, D): Mosaic tiles the minor two dims by (8|16, 128), and with (B, N, H, D) the
head axis would sit second-minor. D and Dv are zero-padded to a multiple of 128 lanes
and N to a multiple of block_n (itself a multiple of 16, the bf16 sublane tile).
Sana's D = 32 therefore moves 4x the bytes it needs; packing 4 heads per 128 lanes with
a block-diagonal state is the obvious next step and is not done here.

TPU grids run sequentially on a core, so the reductions over N are a grid axis marked
"arbitrary" whose output block (the fp32 state) stays resident in VMEM and is
accumulated in place; (B, H) are "parallel" (split across TensorCores where there are
two). Passes, as in the Triton module:
  forward  1. state  grid (B, H, N/bn): kv += relu(k)^T v, ksum += relu(k)^T 1
           2. out    grid (B, H, N/bn): relu(q) kv / (relu(q) ksum + eps)
  backward 1. dstate grid (B, H, N/bn): d_kv += relu(q)^T d_num, d_ksum += relu(q)^T d_den
           2. dqkv   grid (B, H, N/bn): dq, dk, dv per tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sanajax.kernels._common import pad_axis, round_up

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
_TN = (((0,), (0,)), ((), ()))  # a^T b: contract the token axis of both.
_NT = (((1,), (1,)), ((), ()))  # a b^T.
_NN = (((1,), (0,)), ((), ()))

DEFAULT_BLOCK_N = 512


def _dot(a, b, dims):
  precision = _HIGHEST if _F32 in (a.dtype, b.dtype) else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _num_den(qr, kv, ksum, eps):
  """qr: (bn, D) fp32; kv: (D, Dv); ksum: (1, D) -> num (bn, Dv), den (bn, 1)."""
  num = _dot(qr, kv, _NN)
  den = jnp.sum(qr * ksum, axis=1, keepdims=True) + eps
  return num, den


# ----------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, kv_ref, ksum_ref):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    kv_ref[...] = jnp.zeros(kv_ref.shape, _F32)
    ksum_ref[...] = jnp.zeros(ksum_ref.shape, _F32)

  kr = _relu(k_ref[...])
  kv_ref[...] += _dot(kr, v_ref[...], _TN)
  ksum_ref[...] += jnp.sum(kr.astype(_F32), axis=0, keepdims=True)


def _out_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, eps):
  qr = _relu(q_ref[...]).astype(_F32)
  num, den = _num_den(qr, kv_ref[...], ksum_ref[...], eps)
  o_ref[...] = (num / den).astype(o_ref.dtype)


def _dstate_kernel(q_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref, *, eps):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    dkv_ref[...] = jnp.zeros(dkv_ref.shape, _F32)
    dksum_ref[...] = jnp.zeros(dksum_ref.shape, _F32)

  qr = _relu(q_ref[...]).astype(_F32)
  num, den = _num_den(qr, kv_ref[...], ksum_ref[...], eps)
  d_num = g_ref[...].astype(_F32) / den
  d_den = -jnp.sum(d_num * num, axis=1, keepdims=True) / den  # (bn, 1)
  dkv_ref[...] += _dot(qr, d_num, _TN)
  dksum_ref[...] += jnp.sum(qr * d_den, axis=0, keepdims=True)


def _dqkv_kernel(q_ref, k_ref, v_ref, g_ref, kv_ref, ksum_ref, dkv_ref, dksum_ref,
                 dq_ref, dk_ref, dv_ref, *, eps):
  kv, ksum = kv_ref[...], ksum_ref[...]
  q = q_ref[...]
  qr = _relu(q).astype(_F32)
  num, den = _num_den(qr, kv, ksum, eps)
  d_num = g_ref[...].astype(_F32) / den
  d_den = -jnp.sum(d_num * num, axis=1, keepdims=True) / den
  d_qr = _dot(d_num, kv, _NT) + d_den * ksum
  # where, not a multiply: d_qr of an all-zero row is ~g/eps and may overflow to inf.
  dq_ref[...] = jnp.where(q > 0, d_qr, 0.0).astype(dq_ref.dtype)

  dkv = dkv_ref[...]
  k = k_ref[...]
  d_kr = _dot(v_ref[...].astype(_F32), dkv, _NT) + dksum_ref[...]
  dk_ref[...] = jnp.where(k > 0, d_kr, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = _dot(_relu(k).astype(_F32), dkv, _NN).astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- wrappers


def _seq_spec(block_n: int, d: int) -> pl.BlockSpec:
  # (B, H, N, D) -> kernel sees (block_n, d).
  return pl.BlockSpec((None, None, block_n, d), lambda b, h, t: (b, h, t, 0))


def _state_spec(rows: int, cols: int) -> pl.BlockSpec:
  # (B, H, rows, cols) -> the same (rows, cols) block for every tile (resident in VMEM).
  return pl.BlockSpec((None, None, rows, cols), lambda b, h, t: (b, h, 0, 0))


def _params(reduce: bool):
  last = "arbitrary" if reduce else "parallel"
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", last))


def _to_tpu_layout(x: jax.Array, n_pad: int, d_pad: int) -> jax.Array:
  """(B, N, H, D) -> zero-padded (B, H, n_pad, d_pad)."""
  return pad_axis(pad_axis(jnp.swapaxes(x, 1, 2), 2, n_pad), 3, d_pad)


def _prepare(q, k, v, block_n):
  n, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
  block_n = min(block_n, round_up(n, 16))
  n_pad = round_up(n, block_n)
  dp, dvp = round_up(d, 128), round_up(dv, 128)
  return (_to_tpu_layout(q, n_pad, dp), _to_tpu_layout(k, n_pad, dp),
          _to_tpu_layout(v, n_pad, dvp), block_n)


def _state(k, v, block_n, interpret):
  b, h, n, dp = k.shape
  dvp = v.shape[-1]
  return pl.pallas_call(
      _state_kernel,
      grid=(b, h, n // block_n),
      in_specs=[_seq_spec(block_n, dp), _seq_spec(block_n, dvp)],
      out_specs=[_state_spec(dp, dvp), _state_spec(1, dp)],
      out_shape=[jax.ShapeDtypeStruct((b, h, dp, dvp), _F32),
                 jax.ShapeDtypeStruct((b, h, 1, dp), _F32)],
      compiler_params=_params(reduce=True),
      interpret=interpret,
      name="linear_attention_state_tpu",
  )(k, v)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """q, k: (B, N, H, D); v: (B, N, H, Dv).

  Returns (out (B, N, H, Dv) in v's dtype, kv (B, H, D, Dv) fp32, ksum (B, H, D) fp32).
  """
  bsz, n, h, d = q.shape
  dv = v.shape[-1]
  qp, kp, vp, block_n = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  dp, dvp = qp.shape[-1], vp.shape[-1]
  kv, ksum = _state(kp, vp, block_n, interpret)
  out = pl.pallas_call(
      functools.partial(_out_kernel, eps=eps),
      grid=(bsz, h, qp.shape[2] // block_n),
      in_specs=[_seq_spec(block_n, dp), _state_spec(dp, dvp), _state_spec(1, dp)],
      out_specs=_seq_spec(block_n, dvp),
      out_shape=jax.ShapeDtypeStruct((bsz, h, qp.shape[2], dvp), v.dtype),
      compiler_params=_params(reduce=False),
      interpret=interpret,
      name="linear_attention_out_tpu",
  )(qp, kv, ksum)
  out = jnp.swapaxes(out[:, :, :n, :dv], 1, 2)
  return out, kv[:, :, :d, :dv], ksum[:, :, 0, :d]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv: jax.Array, ksum: jax.Array,
             g: jax.Array, *, eps: float = 1e-15, interpret: bool = False,
             block_n: int | None = None):
  """Cotangents of `forward`'s out. g: (B, N, H, Dv); kv (B, H, D, Dv), ksum (B, H, D) fp32.

  Returns (dq, dk, dv) in the dtypes of q, k, v, layout (B, N, H, D).
  """
  bsz, n, h, d = q.shape
  dv_dim = v.shape[-1]
  qp, kp, vp, block_n = _prepare(q, k, v, block_n or DEFAULT_BLOCK_N)
  n_pad, dp, dvp = qp.shape[2], qp.shape[-1], vp.shape[-1]
  gp = _to_tpu_layout(g, n_pad, dvp)
  kv = pad_axis(pad_axis(kv, 2, dp), 3, dvp)
  ksum = pad_axis(ksum, 2, dp)[:, :, None, :]
  grid = (bsz, h, n_pad // block_n)

  dkv, dksum = pl.pallas_call(
      functools.partial(_dstate_kernel, eps=eps),
      grid=grid,
      in_specs=[_seq_spec(block_n, dp), _seq_spec(block_n, dvp), _state_spec(dp, dvp),
                _state_spec(1, dp)],
      out_specs=[_state_spec(dp, dvp), _state_spec(1, dp)],
      out_shape=[jax.ShapeDtypeStruct((bsz, h, dp, dvp), _F32),
                 jax.ShapeDtypeStruct((bsz, h, 1, dp), _F32)],
      compiler_params=_params(reduce=True),
      interpret=interpret,
      name="linear_attention_bwd_state_tpu",
  )(qp, gp, kv, ksum)

  seq_d, seq_dv = _seq_spec(block_n, dp), _seq_spec(block_n, dvp)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_dqkv_kernel, eps=eps),
      grid=grid,
      in_specs=[seq_d, seq_d, seq_dv, seq_dv, _state_spec(dp, dvp), _state_spec(1, dp),
                _state_spec(dp, dvp), _state_spec(1, dp)],
      out_specs=[seq_d, seq_d, seq_dv],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=_params(reduce=False),
      interpret=interpret,
      name="linear_attention_bwd_dqkv_tpu",
  )(qp, kp, vp, gp, kv, ksum, dkv, dksum)
  unpad = lambda x, dim: jnp.swapaxes(x[:, :, :n, :dim], 1, 2)
  return unpad(dq, d), unpad(dk, d), unpad(dv, dv_dim)
