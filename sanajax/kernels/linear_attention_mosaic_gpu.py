"""ReLU linear attention, state pass as a Pallas Mosaic GPU kernel (Hopper, sm_90+).

NOT YET RUN ON A GPU. The tests lower this module for "cuda" at SANA's shapes (tests/test_kernels.py).
Its numerics: jax >= 0.11 has a Mosaic GPU interpreter on CPU (`interpret=True` here), in which the
state pass equals the reference (tests/test_kernels.py, run under jax 0.11.2 on 2026-12-07); jax 0.10
has none, so `interpret=True` is a clear error there. Its speed waits for the first H100 run
(docs/benchmarks.md, "Kernels: what a GPU must measure"). `linear_attention(impl="auto" |
"pallas")` does not pick it: on every GPU they use the Triton kernels (interpret-mode tested), a
static choice with no compile attempt per shape. impl="pallas_mosaic_gpu" selects it explicitly.

What runs here:
  * state kv = relu(k)^T v, heads packed (sanajax.kernels._common): WGMMA needs m and n to be
    multiples of 64, and SANA's heads are D = 32, so a block takes G = 64 / D heads (2), a
    (bn, 64) tile of the (B, N, H * D) view. Grid (B, H/G, N/bn), the last axis sequential;
    each step TMAs the k and v tiles into swizzled SMEM (2 steps in flight), applies relu in
    place, and issues one 64x64xbn WGMMA with the k tile transposed as A into a (64, 64) fp32
    register accumulator (plgpu.ACC) that lives across the sequential steps. The per-head
    (D, Dv) states are its diagonal blocks (the cross-head blocks are discarded).
  * ksum = sum_n relu(k) is a plain XLA reduction (one extra read of k; a column reduction in
    the WGMMA register layout is the part least likely to lower).
  * the output pass and the whole backward are the Triton module's kernels. Fusing the output
    pass here (a second WGMMA per tile) is the next step if the first GPU run shows the state
    kernel beating Triton's.
  * fp32 inputs: WGMMA multiplies fp32 only as TF32, which would not match the fp32 reference,
    so fp32 calls run the Triton state pass instead (`supports`); the call still works.
Constraints: bn = 64; D and Dv padded to a power of two (<= 64) or a multiple of 64.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sanajax.kernels import _common
from sanajax.kernels import linear_attention_pallas_triton as _triton
from sanajax.kernels._common import pad_axis, round_up

try:
  # jax >= 0.11 lowers pl.pallas_call only for Triton on GPU (no rule for Mosaic GPU compiler params);
  # its Mosaic GPU pallas_call takes the same arguments (a plgpu.kernel over the parallel grid axes with
  # plgpu.emit_pipeline over the sequential ones) and lowers to the same mosaic_gpu custom call.
  from jax._src.pallas.mosaic_gpu.pallas_call import pallas_call as _mosaic_gpu_pallas_call
except ImportError:  # jax 0.10: pl.pallas_call lowers Mosaic GPU compiler params itself.
  _mosaic_gpu_pallas_call = None

_F32 = jnp.float32
BLOCK_N = 64
WIDTH = 64  # lanes per block: G = 64 / D heads (2 at SANA's D = 32).


def packing(heads: int, dim: int, dim_v: int) -> _common.HeadPacking:
  """G = 64 / d_pad heads per block, so the WGMMA's m = n = W is 64 (WGMMA needs multiples of 64)."""
  widest = max(dim, dim_v)
  d_pad = _common.next_power_of_2(max(widest, 8)) if widest <= WIDTH else round_up(widest, WIDTH)
  return _common.head_packing(heads, dim, dim_v, d_pad=d_pad, group=max(1, WIDTH // d_pad))


def supports(q_dtype, k_dtype, v_dtype) -> str | None:
  """None when this kernel takes these dtypes, else the reason (a static check: no compile is tried)."""
  if jnp.dtype(v_dtype).itemsize != 2 or jnp.dtype(k_dtype) != jnp.dtype(v_dtype):
    return (f"the Mosaic GPU state kernel takes 16-bit k and v of one dtype (WGMMA runs fp32 only as TF32); "
            f"got k {jnp.dtype(k_dtype).name}, v {jnp.dtype(v_dtype).name}")
  return None


def _smem_transforms(width: int, dtype) -> tuple:
  """Tiling + swizzle for a (rows, width) SMEM tile: one swizzle row = min(128 B, the row)."""
  row_bytes = width * jnp.dtype(dtype).itemsize
  swizzle = min(128, row_bytes)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _state_kernel(k_smem, v_smem, kv_ref, acc_ref):
  """k_smem, v_smem: (bn, W) SMEM tiles of G heads; acc_ref: (W, W) fp32 ACC (all head pairs)."""
  k_smem[...] = jnp.maximum(k_smem[...], jnp.zeros((), k_smem.dtype))  # relu in place.
  plgpu.commit_smem()  # Generic-proxy stores must be visible to the async (WGMMA) proxy.
  plgpu.wgmma(acc_ref, k_smem.transpose((1, 0)), v_smem)
  plgpu.wgmma_wait(0)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _store():
    kv_ref[...] = acc_ref[...]


def _state(k, v, p):
  """k, v packed (B, N, Hp * Dp), N % BLOCK_N == 0 -> kv (B, blocks, W, W) fp32 (cross-head blocks unmasked)."""
  b, n, _ = k.shape
  w = p.width
  seq = plgpu.BlockSpec((None, BLOCK_N, w), lambda i, j, t: (i, t, j), transforms=_smem_transforms(w, k.dtype))
  call = dict(grid=(b, p.blocks, n // BLOCK_N), in_specs=[seq, seq],
              out_specs=plgpu.BlockSpec((None, None, w, w), lambda i, j, t: (i, j, 0, 0)),
              out_shape=jax.ShapeDtypeStruct((b, p.blocks, w, w), _F32), scratch_shapes=[plgpu.ACC((w, w), _F32)],
              compiler_params=plgpu.CompilerParams(dimension_semantics=("parallel", "parallel", "sequential"),
                                                   max_concurrent_steps=2))
  if _mosaic_gpu_pallas_call is not None:
    return _mosaic_gpu_pallas_call(_state_kernel, **call)(k, v)
  return pl.pallas_call(_state_kernel, name="linear_attention_state_mgpu", **call)(k, v)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
            interpret: bool = False, block_n: int | None = None):
  """Same contract as the Triton module's `forward`: (out, kv fp32, ksum fp32)."""
  if interpret and not hasattr(plgpu, "force_gpu_interpret_mode"):
    raise ValueError(f"Mosaic GPU kernels have no interpret mode in jax {jax.__version__} (jax >= 0.11 has one); "
                     "use the Triton backend.")
  if supports(q.dtype, k.dtype, v.dtype) is not None:
    return _triton.forward(q, k, v, eps=eps, interpret=interpret, block_n=block_n)
  n = q.shape[1]
  p = packing(q.shape[2], q.shape[3], v.shape[3])
  n_pad = round_up(n, BLOCK_N)
  kp, vp = (pad_axis(_common.pack_heads(x, p), 1, n_pad) for x in (k, v))
  ksum = jnp.sum(jax.nn.relu(k.astype(_F32)), axis=1)  # (B, H, D)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()) if interpret else contextlib.nullcontext():
    blocks = _state(kp, vp, p)
  kv, _ = _common.states_from_blocks(blocks, jnp.zeros(kp.shape[:1] + (p.blocks, p.width), _F32), p)
  out = _triton.output(q, kv, ksum, v.dtype, eps=eps, interpret=interpret, block_n=block_n)  # Triton's output pass.
  return out, kv, ksum


backward = _triton.backward  # No Mosaic GPU backward kernels (yet).
