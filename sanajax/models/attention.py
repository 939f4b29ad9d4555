"""Attention layers of the SANA DiT: ReLU linear self-attention and masked softmax cross-attention.

Parameter names follow diffusers' `Attention` (to_q, to_k, to_v, to_out, norm_q, norm_k) so
weights map by a rename; logical axes as in sanajax.models.layers ("embed" for h, "heads" for
the fused heads * head_dim axis).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanajax.kernels import linear_attention
from sanajax.models.layers import RMSNorm, dense
from sanajax.parallel import sequence
from sanajax.parallel.context import active_plan

Dtype = Any


class LinearSelfAttention(nn.Module):
  """SANA LiteLA: (B, N, h) -> (B, N, h) in O(N).

  q, k, v = x W (no bias); heads = h / head_dim; out = relu(q)(relu(k)^T v) / (relu(q) relu(k)^T 1 + eps)
  per head (sanajax.kernels.linear_attention: fp32 state and division), then to_out (bias).
  qk_norm: RMSNorm (eps 1e-5, learnable) over the whole h-wide q and k before the head split,
  as SANA-1.5 / Sprint (diffusers qk_norm="rms_norm_across_heads").
  """
  hidden_size: int
  head_dim: int = 32
  eps: float = 1e-15
  qk_norm: bool = False
  impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    inner = self.hidden_size
    heads = inner // self.head_dim
    q = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="to_q")(x)
    k = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="to_k")(x)
    v = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="to_v")(x)
    if self.qk_norm:
      q = RMSNorm(1e-5, axis_name="heads", dtype=self.dtype, name="norm_q")(q)
      k = RMSNorm(1e-5, axis_name="heads", dtype=self.dtype, name="norm_k")(k)
    shape = (b, n, heads, self.head_dim)
    plan = active_plan()
    if plan is not None and plan.sequence_parallel:
      # Tokens split over the `sequence` mesh axis: local K^T V states, one all-reduce.
      out = sequence.linear_attention(plan, q.reshape(shape), k.reshape(shape), v.reshape(shape), eps=self.eps)
    else:
      out = linear_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), eps=self.eps, impl=self.impl)
    out = out.reshape(b, n, inner).astype(self.dtype)
    return dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, name="to_out")(out)


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention with a key mask. q (B, N, H, D), k/v (B, L, H, D), mask (B, L) 0/1.

  Logits, softmax and the weighted sum accumulate in float32; the result is cast to v's dtype.
  Masked keys get a -1e30 logit, so they get exactly zero weight whenever a row has one valid
  key (an all-masked row attends uniformly instead of producing NaNs).
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bnhd,blhd->bhnl", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :].astype(bool), logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhnl,blhd->bnhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype)


class CrossAttention(nn.Module):
  """Image tokens (B, N, h) attend to text tokens (B, L, h_ctx): -> (B, N, h).

  to_q: h -> heads*head_dim, to_k/to_v: h_ctx -> heads*head_dim, all with bias; masked fp32
  softmax; to_out: heads*head_dim -> h (bias). As diffusers' attn2 (query_dim=h,
  cross_attention_dim=h, heads=cross heads, dim_head=cross head dim) and SANA's
  MultiHeadCrossAttention (q_linear, kv_linear split into to_k / to_v, proj). qk_norm: RMSNorm
  (eps 1e-5) across heads on q and k, as diffusers with qk_norm set.
  """
  hidden_size: int
  num_heads: int
  head_dim: int
  qk_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
    b, n, _ = x.shape
    l = context.shape[1]
    inner = self.num_heads * self.head_dim
    q = dense(inner, ("embed", "heads"), dtype=self.dtype, name="to_q")(x)
    k = dense(inner, ("embed", "heads"), dtype=self.dtype, name="to_k")(context)
    v = dense(inner, ("embed", "heads"), dtype=self.dtype, name="to_v")(context)
    if self.qk_norm:
      q = RMSNorm(1e-5, axis_name="heads", dtype=self.dtype, name="norm_q")(q)
      k = RMSNorm(1e-5, axis_name="heads", dtype=self.dtype, name="norm_k")(k)
    out = masked_softmax_attention(q.reshape(b, n, self.num_heads, self.head_dim),
                                   k.reshape(b, l, self.num_heads, self.head_dim),
                                   v.reshape(b, l, self.num_heads, self.head_dim), mask)
    return dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, name="to_out")(out.reshape(b, n, inner))
