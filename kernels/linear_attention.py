"""ReLU linear attention (SANA's LiteLA), O(N) in the number of tokens.

    out = relu(q) (relu(k)^T v) / (relu(q) relu(k)^T 1 + eps)

The K^T V state (D x D per head) and the normaliser (D per head) are accumulated in
float32 whatever the input dtype, as SANA does (`fp32_attention`), and the division is
done in float32; the output is cast back to v's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15) -> jax.Array:
  """Pure-jnp reference. q, k, v: (B, N, H, D) -> (B, N, H, D) in v's dtype."""
  qf = jax.nn.relu(q.astype(jnp.float32))
  kf = jax.nn.relu(k.astype(jnp.float32))
  vf = v.astype(jnp.float32)
  kv = jnp.einsum("bnhd,bnhe->bhde", kf, vf)  # (B, H, D, Dv): the K^T V state.
  k_sum = jnp.sum(kf, axis=1)  # (B, H, D): the normaliser state, relu(k)^T 1.
  num = jnp.einsum("bnhd,bhde->bnhe", qf, kv)
  den = jnp.einsum("bnhd,bhd->bnh", qf, k_sum)[..., None]
  return (num / (den + eps)).astype(v.dtype)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15, impl: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Fused ReLU linear attention. q, k, v: (B, N, H, D); returns (B, N, H, D) in v's dtype.

  impl: "xla" (the jnp reference), "pallas" (the backend's Pallas kernel) or "auto".
  """
  del interpret  # Only the Pallas path reads it.
  if impl in ("auto", "xla"):
    return linear_attention_reference(q, k, v, eps=eps)
  if impl == "pallas":
    raise NotImplementedError("The Pallas linear-attention kernel is not built yet; use impl='xla'.")
  raise ValueError(f"Unknown linear attention impl {impl!r}; expected 'auto', 'xla' or 'pallas'.")
