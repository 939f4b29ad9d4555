"""CLIP text encoder in Flax: transformers' CLIPTextModelWithProjection (SD3's CLIP-L and OpenCLIP bigG).

    model, params = load_clip_text_encoder("stable-diffusion-3-medium-diffusers/text_encoder")  # clip_transformers
    out = model.apply({"params": params}, input_ids)          # input_ids (B, L) int32, L <= max_position_embeddings
    out["penultimate_hidden_state"]  # (B, L, hidden): hidden_states[-2], before the final LN (what SD3 uses)
    out["last_hidden_state"]         # (B, L, hidden): after the final LN
    out["pooled"]                    # (B, projection_dim): text_projection(last_hidden_state at the EOS token)

The stack (transformers 5.25 CLIPTextTransformer): token + learned position embeddings; per layer
x += out_proj(attn(layer_norm1(x))) with causal attention scaled by head_dim^-0.5, then
x += fc2(act(fc1(layer_norm2(x)))) with act quick_gelu (x * sigmoid(1.702 x), CLIP-L) or gelu (exact erf,
bigG); a final LayerNorm. The pooled token: with the legacy eos_token_id == 2 the position of the largest
id (the EOT token has the largest id in CLIP's vocabulary), else the first position of eos_token_id.
Parameter logical axes: vocab, embed, heads (num_heads * head_dim), mlp; the position table is (None, embed).
LayerNorms and the softmax run in float32; activations elsewhere in `dtype`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_init = nn.initializers.normal(stddev=0.02)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (transformers' quick_gelu)."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names that CLIP configs use -> the functions.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True), "relu": nn.relu}


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis, computed in float32 (two-pass variance), cast back to x.dtype."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


def _dense(features: int, axes: tuple, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biases; `allowed` (B, L, L) boolean says which keys each query sees."""
  num_heads: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    b, l, h = x.shape
    d = h // self.num_heads
    q, k, v = (_dense(h, ("embed", "heads"), self.dtype, n)(x).reshape(b, l, self.num_heads, d)
               for n in ("q_proj", "k_proj", "v_proj"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    logits = jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, h)
    return _dense(h, ("heads", "embed"), self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
  """fc2(act(fc1(x)))."""
  intermediate_size: int
  hidden_act: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, "fc1")(x)
    return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(ACTIVATIONS[self.hidden_act](y))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x += attn(layer_norm1(x)); x += fc2(act(fc1(layer_norm2(x))))."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(LayerNorm(self.eps, name="layer_norm1")(x),
                                                                         allowed)
    y = LayerNorm(self.eps, name="layer_norm2")(x)
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(y)


class CLIPTextModelWithProjection(nn.Module):
  """transformers' CLIPTextModelWithProjection: input_ids (B, L) int32 [, attention_mask (B, L) 0/1] -> dict.

  Returns {"last_hidden_state" (B, L, hidden) after the final LN, "penultimate_hidden_state" (B, L, hidden)
  = hidden_states[-2], "hidden_states" (num_layers + 1 arrays (B, L, hidden): the embeddings, then each layer's
  output, none normed; for clip_skip), "pooled" (B, projection_dim) the projected EOS state (`text_embeds`)}.
  attention_mask masks padded keys on top of the causal mask (SD3 passes none: padding follows the EOS token,
  which causal attention already keeps out of every earlier position).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  projection_dim: int
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}.")
    b, l = input_ids.shape
    if l > self.max_position_embeddings:
      raise ValueError(f"CLIP input of {l} tokens is longer than max_position_embeddings="
                       f"{self.max_position_embeddings}; tokenize with max_length <= {self.max_position_embeddings}.")
    tok = self.param("token_embedding", nn.with_logical_partitioning(_init, ("vocab", "embed")),
                     (self.vocab_size, self.hidden_size), jnp.float32)
    pos = self.param("position_embedding", nn.with_logical_partitioning(_init, (None, "embed")),
                     (self.max_position_embeddings, self.hidden_size), jnp.float32)
    x = (tok[input_ids] + pos[None, :l]).astype(self.dtype)
    idx = jnp.arange(l)
    allowed = jnp.broadcast_to((idx[None, :] <= idx[:, None])[None], (b, l, l))
    if attention_mask is not None:
      allowed = allowed & attention_mask.astype(bool)[:, None, :]
    hidden_states = [x]
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, self.dtype,
                           name=f"layers_{i}")(x, allowed)
      hidden_states.append(x)
    last = LayerNorm(self.layer_norm_eps, name="final_layer_norm")(x)
    if self.eos_token_id == 2:  # transformers' legacy branch: the EOT token has the largest id.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:  # The first EOS (the pad token may equal it); argmax returns the first maximum, as torch's.
      eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled_state = last[jnp.arange(b), eos_pos]
    pooled = _dense(self.projection_dim, ("embed", None), self.dtype, "text_projection", use_bias=False)(pooled_state)
    return {"last_hidden_state": last, "penultimate_hidden_state": hidden_states[-2],
            "hidden_states": tuple(hidden_states), "pooled": pooled}
