"""T5 encoder in Flax: transformers' T5EncoderModel (SD3's T5 v1.1 XXL text encoder).

    model, params = load_t5_encoder("stable-diffusion-3-medium-diffusers/text_encoder_3")  # t5_transformers
    h = model.apply({"params": params}, input_ids, attention_mask)  # (B, L) int32, (B, L) 0/1 -> (B, L, d_model)

h equals T5EncoderModel(...).last_hidden_state (after the final norm). The stack: x = shared[input_ids]; per
block x += o(attn(q, k, v of layer_norm(x))) with bidirectional attention, logits q.k *without* the
1/sqrt(d_kv) scale plus a relative position bias (num_buckets buckets of |key - query|, half exact, half
logarithmic up to max_distance, a separate half for keys after the query) that only block 0 owns and all
blocks share; then x += wo(act(wi_0(norm(x))) * wi_1(norm(x))) (T5 v1.1's gated-GELU, act = gelu_new, the
tanh form) or wo(act(wi(norm(x)))) when not gated. Norms are T5's RMS norm: x / sqrt(mean(x^2) + eps) * weight,
no mean subtraction and no bias, computed in float32. No linear layer has a bias. Padded keys
(attention_mask 0) are masked. Parameter logical axes: vocab, embed, heads (num_heads * d_kv), mlp; the bias
table is (None, None).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# T5's layer norm is an RMSNorm: no mean subtraction, no bias, float32 statistics.
from sanajax.models.layers import RMSNorm

Dtype = Any
_init = nn.initializers.normal(stddev=0.05)

# transformers' ACT2FN names T5 configs use (feed_forward_proj "gated-gelu" means gelu_new) -> the functions.
ACTIVATIONS = {"gelu_new": lambda x: nn.gelu(x, approximate=True), "gelu_pytorch_tanh": lambda x: nn.gelu(x, True),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu, "silu": nn.silu}


def _dense(features: int, axes: tuple, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(_init, axes), name=name)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
                             ) -> np.ndarray:
  """T5's bidirectional bucket of key - query offsets (int numpy array, any shape) -> int32 in [0, num_buckets).

  Half the buckets for keys after the query, half for keys at or before it; in each half, exact offsets
  below num_buckets / 4, then logarithmic bins up to max_distance (larger offsets share the last bin).
  On the host in float32 as transformers computes it (the sequence length is static), so offsets that land
  exactly on a bin edge (16, 32, 64 for the defaults) fall on the same side as in torch.
  """
  half = num_buckets // 2
  buckets = (relative_position > 0).astype(np.int32) * half
  n = np.abs(relative_position)
  max_exact = half // 2
  ratio = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
           / np.float32(math.log(max_distance / max_exact)))
  large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int32)  # Truncation, as torch's .to(long).
  large = np.minimum(large, half - 1)
  return (buckets + np.where(n < max_exact, n, large)).astype(np.int32)


class T5Attention(nn.Module):
  """Unscaled multi-head attention plus a position bias (1 | B, H, L, L); `allowed` (B, L) masks keys."""
  num_heads: int
  d_kv: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, allowed: jax.Array) -> jax.Array:
    b, l, h = x.shape
    inner = self.num_heads * self.d_kv
    q, k, v = (_dense(inner, ("embed", "heads"), self.dtype, n)(x).reshape(b, l, self.num_heads, self.d_kv)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    logits = jnp.where(allowed[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, inner)
    return _dense(h, ("heads", "embed"), self.dtype, "o")(out)


class T5FeedForward(nn.Module):
  """wo(act(wi_0(x)) * wi_1(x)) when gated (T5 v1.1), else wo(act(wi(x)))."""
  d_ff: int
  gated: bool
  act: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fn = ACTIVATIONS[self.act]
    if self.gated:
      y = fn(_dense(self.d_ff, ("embed", "mlp"), self.dtype, "wi_0")(x)) * _dense(self.d_ff, ("embed", "mlp"),
                                                                                self.dtype, "wi_1")(x)
    else:
      y = fn(_dense(self.d_ff, ("embed", "mlp"), self.dtype, "wi")(x))
    return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, "wo")(y)


class T5Encoder(nn.Module):
  """transformers' T5EncoderModel: input_ids (B, L) int32, attention_mask (B, L) 0/1 or None -> (B, L, d_model).

  Any padding side works (positions are relative). Output in `dtype`; norms and softmax in float32.
  """
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  is_gated_act: bool = True
  dense_act_fn: str = "gelu_new"
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"T5 dense_act_fn {self.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}.")
    b, l = input_ids.shape
    shared = self.param("shared", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                        (self.vocab_size, self.d_model), jnp.float32)
    x = shared[input_ids].astype(self.dtype)
    allowed = jnp.ones((b, l), bool) if attention_mask is None else attention_mask.astype(bool)
    table = self.param("relative_attention_bias", nn.with_logical_partitioning(_init, (None, None)),
                       (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    pos = np.arange(l)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.relative_attention_num_buckets,
                                       self.relative_attention_max_distance)  # (L query, L key)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L), float32, shared by every block.
    for i in range(self.num_layers):
      y = RMSNorm(self.layer_norm_epsilon, dtype=self.dtype, name=f"block_{i}_attn_norm")(x)
      x = x + T5Attention(self.num_heads, self.d_kv, self.dtype, name=f"block_{i}_attn")(y, bias, allowed)
      y = RMSNorm(self.layer_norm_epsilon, dtype=self.dtype, name=f"block_{i}_ff_norm")(x)
      x = x + T5FeedForward(self.d_ff, self.is_gated_act, self.dense_act_fn, self.dtype, name=f"block_{i}_ff")(y)
    return RMSNorm(self.layer_norm_epsilon, dtype=self.dtype, name="final_layer_norm")(x)
