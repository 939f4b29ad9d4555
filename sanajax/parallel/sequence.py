"""Sequence parallelism for the linear DiT: image tokens split over the `sequence` mesh axis.

SANA's self-attention is linear: out_n = relu(q_n) S / (relu(q_n) z + eps) with the per-head
state S = sum_n relu(k_n)^T v_n (D x D) and normaliser z = sum_n relu(k_n) (D). Both are sums
over tokens, so each shard computes them on its own tokens and one all-reduce of a
(B, H, D, D + 1) tensor over `sequence` makes them exact; no token ever leaves its device
(ring attention, which softmax models need, moves all keys and values around the ring).

The Mix-FFN's 3x3 depthwise conv runs on the token grid (B, H, W, C) whose rows are split over
`sequence`: each shard receives one row from each neighbour (`ppermute`) and zeros at the
image border, exactly the zero padding of the unsharded conv.

Both run inside `jax.shard_map` over the whole mesh; the batch keeps its data x fsdp split and
heads / channels their tensor split (as the plan's rules say), so entering and leaving the
shard_map moves no data when the activations already follow the plan.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sanajax.kernels import depthwise_conv

AXIS = "sequence"


def _spec_with_sequence(plan: Any, names: tuple, shape: tuple, seq_dim: int, what: str) -> P:
  """The plan's spec for `names` with dimension `seq_dim` split exactly over `sequence`."""
  s = plan.axis_size(AXIS)
  if shape[seq_dim] % s:
    raise ValueError(f"Sequence parallelism over {s} devices needs the {what} ({shape[seq_dim]}) to be a "
                     f"multiple of {s}; change config.mesh.sequence or the resolution.")
  names = tuple(n if i != seq_dim else None for i, n in enumerate(names))
  spec = list(plan.spec(names, shape))
  spec += [None] * (len(shape) - len(spec))
  spec[seq_dim] = AXIS
  return P(*spec)


def linear_attention(plan: Any, q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15) -> jax.Array:
  """ReLU linear attention with tokens split over `sequence`. q, k, v: (B, N, H, D) -> (B, N, H, D).

  Same math as sanajax.kernels.linear_attention_reference (float32 state and division, result in
  v's dtype); differs from it only by the order of the token sum.
  """
  spec = _spec_with_sequence(plan, ("batch", None, "heads", None), q.shape, 1, "number of image tokens")

  def local(q, k, v):
    qf = jax.nn.relu(q.astype(jnp.float32))
    kf = jax.nn.relu(k.astype(jnp.float32))
    kv = jnp.einsum("bnhd,bnhe->bhde", kf, v.astype(jnp.float32))  # this shard's K^T V
    k_sum = jnp.sum(kf, axis=1)  # this shard's normaliser
    kv, k_sum = jax.lax.psum((kv, k_sum), AXIS)  # the one collective: (B, H, D, D + 1) floats
    num = jnp.einsum("bnhd,bhde->bnhe", qf, kv)
    den = jnp.einsum("bnhd,bhd->bnh", qf, k_sum)[..., None]
    return (num / (den + eps)).astype(v.dtype)

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)


def depthwise_conv2d(plan: Any, x: jax.Array, kernel: jax.Array, channel_axis: str | None = "mlp") -> jax.Array:
  """sanajax.kernels.depthwise_conv.depthwise_conv2d with rows split over `sequence` (one halo exchange).

  x (B, H, W, C), kernel (k, k, 1, C) -> (B, H, W, C); H / sequence must be >= k // 2.
  """
  kk = kernel.shape[0]
  pad = kk // 2
  s = plan.axis_size(AXIS)
  x_spec = _spec_with_sequence(plan, ("batch", None, None, channel_axis), x.shape, 1, "latent grid height")
  if x.shape[1] // s < pad:
    raise ValueError(f"Each of the {s} sequence shards needs >= {pad} rows of the {x.shape[1]}-row grid.")
  k_spec = P(None, None, None, x_spec[3])

  def local(x, kernel):
    # Shard i sends its last rows down to i + 1 and its first rows up to i - 1; the ends receive
    # zeros from ppermute, which is the conv's zero padding at the image border.
    from_above = jax.lax.ppermute(x[:, -pad:], AXIS, [(i, i + 1) for i in range(s - 1)])
    from_below = jax.lax.ppermute(x[:, :pad], AXIS, [(i + 1, i) for i in range(s - 1)])
    ext = jnp.concatenate([from_above, x, from_below], axis=1)
    # The 'same' conv of the extended block; its first and last `pad` rows saw the zero padding
    # instead of the halo and are dropped.
    return depthwise_conv.depthwise_conv2d(ext, kernel)[:, pad:-pad]

  return jax.shard_map(local, mesh=plan.mesh, in_specs=(x_spec, k_spec), out_specs=x_spec)(x, kernel)
