"""Frozen text encoder: Gemma-2 in Flax, a word tokenizer with Gemma's special ids, SANA's CHI scheme.

    enc = TextEncoder(config.text, vocab=shapes.VOCAB)
    context, mask = enc.encode(["a red circle left of a blue square"])  # (B, max_length, hidden), (B, max_length)

`Gemma2` equals transformers' Gemma2Model (last_hidden_state after the final norm):
embedding * sqrt(hidden) (in the compute dtype), per layer x += post_attn_norm(attn(input_norm(x)))
and x += post_ffw_norm(mlp(pre_ffw_norm(x))); RMSNorm scales by (1 + weight); GQA with RoPE;
logits * query_pre_attn_scalar^-0.5, soft-capped cap * tanh(logits / cap); causal attention, with a
sliding window on even layers (transformers' layer_types: layer i slides when (i + 1) is odd);
GELU(tanh)-gated MLP. Parameter logical axes: vocab, embed, q_heads (num_heads * head_dim),
kv_heads (num_kv_heads * head_dim), mlp.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax.dtypes import dtype_from_name

Dtype = Any
_init = nn.initializers.normal(stddev=0.02)  # Gemma2Config.initializer_range.


class GemmaRMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * (1 + scale), in float32, cast back; scale starts at 0."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],),
                       jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale)).astype(x.dtype)


def _dense(features, axes, dtype, name):
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(_init, axes), name=name)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form). x (B, L, H, D), positions (L,) -> same shape and dtype."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # (L, D)
  cos, sin = jnp.cos(emb)[None, :, None].astype(x.dtype), jnp.sin(emb)[None, :, None].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Gemma2Attention(nn.Module):
  """GQA self-attention with RoPE, soft-capped logits and an explicit boolean mask (B, L, L)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  softcap: float | None
  rope_theta: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    b, l, h = x.shape
    q = _dense(self.num_heads * self.head_dim, ("embed", "q_heads"), self.dtype, "q_proj")(x)
    k = _dense(self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), self.dtype, "k_proj")(x)
    v = _dense(self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), self.dtype, "v_proj")(x)
    pos = jnp.arange(l)
    q = rope(q.reshape(b, l, self.num_heads, self.head_dim), pos, self.rope_theta)
    k = rope(k.reshape(b, l, self.num_kv_heads, self.head_dim), pos, self.rope_theta)
    v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, l, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * self.query_pre_attn_scalar ** -0.5
    if self.softcap:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, l, self.num_heads * self.head_dim)
    return _dense(h, ("q_heads", "embed"), self.dtype, "o_proj")(out)


class Gemma2MLP(nn.Module):
  """down(gelu_tanh(gate(x)) * up(x))."""
  intermediate_size: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gate = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, "gate_proj")(x)
    up = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, "up_proj")(x)
    return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, "down_proj")(nn.gelu(gate, approximate=True) * up)


class LayerDims(NamedTuple):
  """The sizes a decoder layer needs (hashable, so it can be a Module attribute)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  query_pre_attn_scalar: float
  attn_logit_softcapping: float | None
  rope_theta: float
  rms_norm_eps: float
  dtype: Any


class Gemma2Layer(nn.Module):
  """One decoder layer: x += post_attn_norm(attn(input_norm(x))); x += post_ffw_norm(mlp(pre_ffw_norm(x)))."""
  cfg: LayerDims

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    c = self.cfg
    y = GemmaRMSNorm(c.rms_norm_eps, name="input_layernorm")(x)
    y = Gemma2Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.query_pre_attn_scalar, c.attn_logit_softcapping,
                        c.rope_theta, c.dtype, name="self_attn")(y, allowed)
    x = x + GemmaRMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(y)
    y = GemmaRMSNorm(c.rms_norm_eps, name="pre_feedforward_layernorm")(x)
    y = Gemma2MLP(c.intermediate_size, c.dtype, name="mlp")(y)
    return x + GemmaRMSNorm(c.rms_norm_eps, name="post_feedforward_layernorm")(y)


class Gemma2(nn.Module):
  """Gemma-2 decoder stack: input_ids (B, L) int32, attention_mask (B, L) 0/1 -> (B, L, hidden).

  Positions are 0..L-1 (right padding, as SANA's tokenizer call); padded keys are masked.
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  sliding_window: int | None = 4096
  attn_logit_softcapping: float | None = 50.0
  query_pre_attn_scalar: float = 256
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    _, l = input_ids.shape
    emb = self.param("embed_tokens", nn.with_logical_partitioning(_init, ("vocab", "embed")),
                     (self.vocab_size, self.hidden_size), jnp.float32)
    x = emb.astype(self.dtype)[input_ids]
    x = x * jnp.asarray(math.sqrt(self.hidden_size), self.dtype)  # transformers rounds the scale to the dtype too.
    q_idx, k_idx = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
    causal = (k_idx <= q_idx)[None] & attention_mask.astype(bool)[:, None, :]  # (B, L, L)
    dims = LayerDims(self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size,
                     self.query_pre_attn_scalar, self.attn_logit_softcapping, self.rope_theta, self.rms_norm_eps,
                     self.dtype)
    local = causal
    if self.sliding_window:
      local = causal & (k_idx > q_idx - self.sliding_window)[None]
    for i in range(self.num_layers):
      allowed = local if i % 2 == 0 else causal  # transformers: layer i slides iff (i + 1) % 2.
      x = Gemma2Layer(dims, name=f"layers_{i}")(x, allowed)
    return GemmaRMSNorm(self.rms_norm_eps, name="norm")(x)


def build_gemma2(text_config: Mapping[str, Any], vocab_size: int | None = None) -> Gemma2:
  """Gemma2 from a config's `text` section (fields as configs/tiny.py; Gemma-2-2B defaults for
  query_pre_attn_scalar = head_dim, rope_theta 10000, rms_norm_eps 1e-6)."""
  c = text_config
  vocab_size = vocab_size or c.get("vocab_size")
  if not vocab_size:
    raise ValueError("Gemma2 needs a vocab size: set text.vocab_size or pass the tokenizer's.")
  return Gemma2(
      vocab_size=int(vocab_size), hidden_size=c["hidden_size"], num_layers=c["num_layers"], num_heads=c["num_heads"],
      num_kv_heads=c["num_kv_heads"], head_dim=c["head_dim"], intermediate_size=c["intermediate_size"],
      sliding_window=c.get("sliding_window"), attn_logit_softcapping=c.get("attn_logit_softcapping"),
      query_pre_attn_scalar=c.get("query_pre_attn_scalar") or c["head_dim"], rope_theta=c.get("rope_theta", 10000.0),
      rms_norm_eps=c.get("rms_norm_eps", 1e-6), dtype=dtype_from_name(c.get("dtype", "float32"), "text.dtype"))


def params_from_transformers_state_dict(state_dict: Mapping[str, Any], text_config: Mapping[str, Any] | None = None
                                        ) -> dict:
  """Flax Gemma2 params from a transformers Gemma2Model (or ...ForCausalLM: 'model.' is stripped).

  'layers.3.self_attn.q_proj.weight' -> layers_3/self_attn/q_proj/kernel (transposed); norm weights
  -> scale; embed_tokens.weight -> embed_tokens. lm_head is ignored (tied to the embedding).
  """
  del text_config  # The shapes carry everything; kept for symmetry with build_gemma2.
  params: dict = {}
  for key, value in state_dict.items():
    arr = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, np.float32)
    if key.startswith("model."):
      key = key[len("model."):]
    if key.startswith("lm_head"):
      continue
    parts = key.split(".")
    if parts[0] == "embed_tokens":
      params["embed_tokens"] = jnp.asarray(arr)
      continue
    if parts[0] == "norm":
      params["norm"] = {"scale": jnp.asarray(arr)}
      continue
    if parts[0] != "layers":
      raise KeyError(f"Do not know how to map transformers key {key!r}.")
    layer = params.setdefault(f"layers_{parts[1]}", {})
    if parts[2].endswith("layernorm"):
      layer[parts[2]] = {"scale": jnp.asarray(arr)}
    else:  # self_attn.q_proj.weight / mlp.gate_proj.weight
      layer.setdefault(parts[2], {})[parts[3]] = {"kernel": jnp.asarray(arr.T)}
  return params


# --- tokenizer -------------------------------------------------------------------------------------

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # Gemma's special ids.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
  """Word-level tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), words from 4.

  Lowercases and splits on whitespace and punctuation; a punctuation mark is a token only when
  it is in the vocab (else it only separates words); unknown words -> unk. __call__(texts,
  max_length) -> (ids, mask) int32 numpy (B, max_length): BOS first, then the words, truncated
  at max_length, right-padded with 0 (mask 0). No EOS, as Gemma's tokenizer with
  add_special_tokens=True.
  """

  def __init__(self, vocab: Sequence[str]):
    self.vocab = list(vocab)
    self.index = {w.lower(): i + 4 for i, w in enumerate(self.vocab)}
    if len(self.index) != len(self.vocab):
      raise ValueError("WordTokenizer vocab has duplicate words (after lowercasing).")

  @property
  def vocab_size(self) -> int:
    return len(self.vocab) + 4

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, BOS first, untruncated."""
    ids = [BOS_ID]
    for tok in _TOKEN_RE.findall(text.lower()):
      if tok[0].isalnum() or tok[0] == "_":
        ids.append(self.index.get(tok, UNK_ID))
      elif tok in self.index:
        ids.append(self.index[tok])
    return ids

  def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      toks = self.encode(text)[:max_length]
      ids[row, :len(toks)] = toks
      mask[row, :len(toks)] = 1
    return ids, mask


def chi_tokenize(tokenizer, prompts: Sequence[str], max_length: int, chi_prompt: str = ""
                 ) -> tuple[np.ndarray, np.ndarray]:
  """SANA's tokenisation: (ids, mask) (B, max_length) int32.

  With a CHI prompt: tokenize chi + prompt to max_length_all = len(tokens(chi)) + max_length - 2
  (tokens(chi) counts BOS), then keep index 0 (BOS) and the last max_length - 1 positions
  (diffusers pipeline_sana.py `select_index`), so the instruction mostly falls away and the user
  prompt stays. Without one: tokenize to max_length.
  SANA selects these positions from the Gemma *outputs* over the whole chi + prompt sequence, so
  the kept tokens attend to the instruction; TextEncoder.embed puts the dropped instruction
  tokens (tokens(chi)[1:-1], the same for every prompt) back in before running Gemma.
  """
  if not chi_prompt:
    return tokenizer(list(prompts), max_length)
  max_length_all = max(len(tokenizer.encode(chi_prompt)) + max_length - 2, max_length)
  ids, mask = tokenizer([chi_prompt + p for p in prompts], max_length_all)
  select = [0] + list(range(max_length_all - max_length + 1, max_length_all))
  return ids[:, select], mask[:, select]


class TextEncoder:
  """Frozen Gemma-2 text encoder with SANA's prompt handling.

  text_config: a config's `text` section. vocab: word list for WordTokenizer (the tiny setup); or
  pass `tokenizer` (anything with encode(text) and __call__(texts, max_length)). params: Gemma2
  params (e.g. from params_from_transformers_state_dict); default: random from text_config.seed.
  """

  def __init__(self, text_config: Mapping[str, Any], vocab: Sequence[str] | None = None, *, tokenizer=None,
               params=None):
    if tokenizer is None:
      if vocab is None:
        raise ValueError("TextEncoder needs a vocab (word list) or a tokenizer.")
      tokenizer = WordTokenizer(vocab)
    self.config = text_config
    self.tokenizer = tokenizer
    self.max_length = int(text_config["max_length"])
    self.chi_prompt = text_config.get("chi_prompt", "") or ""
    # The config's vocab_size (Gemma's 256000) wins; the tiny configs take the word tokenizer's.
    vocab_size = text_config.get("vocab_size") or getattr(tokenizer, "vocab_size", None)
    if getattr(tokenizer, "vocab_size", 0) > (vocab_size or 0):
      raise ValueError(f"Tokenizer has {tokenizer.vocab_size} ids but text.vocab_size is {vocab_size}.")
    self.model = build_gemma2(text_config, vocab_size)
    # The instruction tokens chi_tokenize drops (positions 1 .. len(tokens(chi)) - 2 of the full
    # sequence), re-inserted by `embed` so Gemma sees chi + prompt as in SANA (see chi_tokenize).
    chi_ids = list(tokenizer.encode(self.chi_prompt)) if self.chi_prompt else []
    self._chi_middle = np.asarray(chi_ids[1:-1], np.int32)
    if params is None:
      ids = jnp.zeros((1, self.max_length), jnp.int32)
      params = jax.jit(self.model.init)(jax.random.key(int(text_config.get("seed", 0))), ids, jnp.ones_like(ids))
      params = nn.meta.unbox(params["params"])
    self.params = params
    self._embed = jax.jit(self.embed)

  def abstract_params(self) -> Any:
    """ShapeDtypeStructs of `params` in their logical-axis boxes (vocab, embed, q_heads, kv_heads,
    mlp): what a sharding plan reads to split the frozen encoder (sanajax.parallel.Plan.place)."""
    ids = jax.ShapeDtypeStruct((1, self.max_length), jnp.int32)
    return jax.eval_shape(self.model.init, jax.random.key(0), ids, ids)["params"]

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 numpy (B, max_length), SANA's CHI scheme (see chi_tokenize)."""
    return chi_tokenize(self.tokenizer, prompts, self.max_length, self.chi_prompt)

  def embed(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Pure: (B, L) ids and mask (from `tokenize`) -> context (B, L, hidden) float32; no gradient to params.

    With a CHI prompt Gemma runs over BOS + the whole instruction + the kept tokens and the
    dropped instruction positions are removed from its output (diffusers' encode_prompt order).
    """
    params = jax.lax.stop_gradient(params)
    n = len(self._chi_middle)
    if not n:
      return self.model.apply({"params": params}, ids, mask).astype(jnp.float32)
    middle = jnp.broadcast_to(jnp.asarray(self._chi_middle, ids.dtype), (ids.shape[0], n))
    full_ids = jnp.concatenate([ids[:, :1], middle, ids[:, 1:]], axis=1)
    full_mask = jnp.concatenate([mask[:, :1], jnp.ones_like(middle, mask.dtype), mask[:, 1:]], axis=1)
    out = self.model.apply({"params": params}, full_ids, full_mask)
    return jnp.concatenate([out[:, :1], out[:, 1 + n:]], axis=1).astype(jnp.float32)

  def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (context (B, max_length, hidden) float32, mask (B, max_length) int32)."""
    ids, mask = self.tokenize(prompts)
    return self._embed(self.params, jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)
