"""Helpers shared by the Pallas backends of sanajax.kernels: padding and head packing.

Head packing. SANA's linear heads are narrow (D = 32: 64 bytes of bf16 per token and head), and
the model hands the kernels q, k, v as (B, N, H, D), whose free reshape is (B, N, H * D). A
kernel block takes G adjacent heads of that view, (tokens, G * D) with G * D = 64 or 128: each
token row is then one contiguous 128/256-byte run (a full cache line on a GPU, the 128 lanes of a
TPU vreg) instead of G strided 64-byte pieces, and no transpose is needed. The G heads share one
(G*D, G*D) state computed as a single matmul, relu(k)^T v over the block, whose off-diagonal
(head x other head) blocks are masked to zero by `block_ones`; the per-head normaliser
relu(q) . ksum is one more matmul against that same 0/1 block-diagonal matrix. The kernels are
memory-bound, so the G x redundant multiply-adds are cheap next to the bytes saved.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  """The smallest multiple of m that is >= x."""
  return -(-x // m) * m


def next_power_of_2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of x up to `size` (no-op when already that size)."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


class HeadPacking(NamedTuple):
  """G heads of d_pad lanes side by side in one kernel block of the (B, N, heads_pad * d_pad) view.

  heads, dim, dim_v: the caller's H, D (q, k) and Dv (v). d_pad >= max(D, Dv): the per-head width
  in the kernel (zero-padded). heads_pad: H rounded up to a multiple of G (zero heads: their state
  is zero and their output 0 / eps = 0, sliced off).
  """
  heads: int
  dim: int
  dim_v: int
  d_pad: int
  group: int
  heads_pad: int

  @property
  def width(self) -> int:
    """Lanes of one block: G * d_pad."""
    return self.group * self.d_pad

  @property
  def blocks(self) -> int:
    """Head blocks per batch element: heads_pad / G."""
    return self.heads_pad // self.group


def head_packing(heads: int, dim: int, dim_v: int, *, d_pad: int, group: int) -> HeadPacking:
  return HeadPacking(heads, dim, dim_v, d_pad, group, round_up(heads, group))


def pack_heads(x: jax.Array, p: HeadPacking) -> jax.Array:
  """(B, N, H, D or Dv) -> (B, N, heads_pad * d_pad); a free reshape when nothing is padded."""
  x = pad_axis(pad_axis(x, 3, p.d_pad), 2, p.heads_pad)
  return x.reshape(x.shape[0], x.shape[1], p.heads_pad * p.d_pad)


def unpack_heads(x: jax.Array, p: HeadPacking, dim: int) -> jax.Array:
  """(B, N, heads_pad * d_pad) -> (B, N, H, dim)."""
  x = x.reshape(x.shape[0], x.shape[1], p.heads_pad, p.d_pad)
  return x[:, :, :p.heads, :dim]


def block_ones(p: HeadPacking) -> jax.Array:
  """(W, W) float32, 1 where row and column lie in the same head, else 0 (W = G * d_pad)."""
  head = jnp.arange(p.width) // p.d_pad
  return (head[:, None] == head[None, :]).astype(jnp.float32)


def states_from_blocks(kv: jax.Array, ksum: jax.Array, p: HeadPacking) -> tuple[jax.Array, jax.Array]:
  """Block states kv (B, blocks, W, W), ksum (B, blocks, W) -> per head (B, H, D, Dv), (B, H, D).

  Takes the diagonal (head, head) blocks; exact (a gather, no arithmetic).
  """
  b, g, dp = kv.shape[0], p.group, p.d_pad
  kv = jnp.diagonal(kv.reshape(b, p.blocks, g, dp, g, dp), axis1=2, axis2=4)  # (B, blocks, dp, dp, G)
  kv = jnp.moveaxis(kv, -1, 2).reshape(b, p.heads_pad, dp, dp)
  ksum = ksum.reshape(b, p.heads_pad, dp)
  return kv[:, :p.heads, :p.dim, :p.dim_v], ksum[:, :p.heads, :p.dim]


def states_to_blocks(kv: jax.Array, ksum: jax.Array, p: HeadPacking) -> tuple[jax.Array, jax.Array]:
  """Inverse of `states_from_blocks`: per-head states -> block-diagonal (B, blocks, W, W), (B, blocks, W)."""
  b, g, dp = kv.shape[0], p.group, p.d_pad
  kv = pad_axis(pad_axis(pad_axis(kv, 1, p.heads_pad), 2, dp), 3, dp).reshape(b, p.blocks, g, dp, 1, dp)
  eye = jnp.eye(g, dtype=kv.dtype)[:, None, :, None]  # (G, 1, G, 1): keeps block (g, g); x * 0 = 0 elsewhere.
  kv = (kv * eye).reshape(b, p.blocks, p.width, p.width)
  ksum = pad_axis(pad_axis(ksum, 1, p.heads_pad), 2, dp).reshape(b, p.blocks, p.width)
  return kv, ksum
