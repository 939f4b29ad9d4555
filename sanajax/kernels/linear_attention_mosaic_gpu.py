"""ReLU linear attention, state pass as a Pallas Mosaic GPU kernel (Hopper, sm_90+).

UNVERIFIED: written against `jax.experimental.pallas.mosaic_gpu` of jax 0.10 without
a GPU to run it on; Mosaic GPU has no CPU interpreter, so no test runs this module.
`linear_attention(impl="pallas"|"auto")` only picks it after compiling it for the given
shapes (`_compiles` in linear_attention.py) and otherwise logs once and uses the Triton
kernels; impl="pallas_mosaic_gpu" uses it with no fallback.

What runs here:
  * state kv = relu(k)^T v: grid (B, H, N/bn), the last axis sequential; each step TMAs a
    (bn, D) tile of k and v into swizzled SMEM (the pipeline keeps 2 steps in flight),
    applies relu in place, and issues one WGMMA with the k tile transposed as A into a
    (D, Dv) fp32 register accumulator (plgpu.ACC) that lives across the sequential steps.
  * ksum = sum_n relu(k) is a plain XLA reduction (one extra read of k; a column
    reduction in the WGMMA register layout is the part least likely to lower).
  * the output pass and the whole backward are the Triton module's kernels.
Constraints: bf16/f16 inputs (WGMMA takes fp32 only as TF32, which would not match the
fp32 reference), D and Dv multiples of 32 after padding (64-byte swizzle rows), bn = 64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sanajax.kernels import linear_attention_pallas_triton as _triton
from sanajax.kernels._common import pad_axis, round_up

_F32 = jnp.float32
BLOCK_N = 64


def _smem_transforms(d: int, dtype) -> tuple:
  """Tiling + swizzle for a (rows, d) SMEM tile: one swizzle row = d elements (<= 128 B)."""
  row_bytes = d * jnp.dtype(dtype).itemsize
  swizzle = min(128, row_bytes)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _state_kernel(k_smem, v_smem, kv_ref, acc_ref):
  """k_smem: (bn, D), v_smem: (bn, Dv) SMEM tiles; acc_ref: (D, Dv) fp32 ACC."""
  k_smem[...] = jnp.maximum(k_smem[...], jnp.zeros((), k_smem.dtype))  # relu in place.
  plgpu.commit_smem()  # Generic-proxy stores must be visible to the async (WGMMA) proxy.
  plgpu.wgmma(acc_ref, plgpu.transpose_ref(k_smem, (1, 0)), v_smem)
  plgpu.wgmma_wait(0)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    kv_ref[...] = acc_ref[...]


def _state(k, v):
  """k: (B, N, H, D), v: (B, N, H, Dv), N % BLOCK_N == 0 -> kv (B, H, D, Dv) fp32."""
  b, n, h, d = k.shape
  dv = v.shape[-1]
  seq = lambda width, dtype: plgpu.BlockSpec(
      (None, BLOCK_N, None, width), lambda i, j, t: (i, t, j, 0),
      transforms=_smem_transforms(width, dtype))
  return pl.pallas_call(
      _state_kernel,
      grid=(b, h, n // BLOCK_N),
      in_specs=[seq(d, k.dtype), seq(dv, v.dtype)],
      out_specs=plgpu.BlockSpec((None, None, d, dv), lambda i, j, t: (i, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, d, dv), _F32),
      scratch_shapes=[plgpu.ACC((d, dv), _F32)],
      compiler_params=plgpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "sequential"),
          max_concurrent_steps=2),
      name="linear_attention_state_mgpu",
  )(k, v)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """Same contract as the Triton module's `forward`: (out, kv fp32, ksum fp32)."""
  if interpret:
    raise ValueError("Mosaic GPU kernels have no interpret mode; use the Triton backend.")
  if jnp.dtype(v.dtype).itemsize != 2 or k.dtype != v.dtype:
    raise ValueError("The Mosaic GPU state kernel takes 16-bit k and v (WGMMA is TF32 for fp32).")
  n, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
  n_pad, dp, dvp = round_up(n, BLOCK_N), round_up(d, 32), round_up(dv, 32)
  kp = pad_axis(pad_axis(k, 1, n_pad), 3, dp)
  vp = pad_axis(pad_axis(v, 1, n_pad), 3, dvp)
  kv = _state(kp, vp)[:, :, :d, :dv]
  ksum = jnp.sum(jax.nn.relu(k.astype(_F32)), axis=1)  # (B, H, D)
  # Output pass: the Triton kernel, on its own padding (power-of-two D).
  qt, _, _, tiling = _triton._prepare(q, k, v, block_n or _triton.DEFAULT_BLOCK_N)
  kvt = pad_axis(pad_axis(kv, 2, qt.shape[-1]), 3, _triton._padded_dim(dv))
  out = _triton._out(qt, kvt, pad_axis(ksum, 2, qt.shape[-1]), v.dtype, tiling, eps,
                     False)
  return out[:, :n, :, :dv], kv, ksum


backward = functools.partial(_triton.backward)  # No Mosaic GPU backward kernels (yet).
