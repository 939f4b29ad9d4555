"""Gemma2 <-> transformers Gemma-2 (Gemma2Model / Gemma2ForCausalLM): config.json, state-dict names,
and the tokenizer a transformers directory holds.

    model, params = load_gemma2("Sana_1600M_1024px_diffusers/text_encoder")
    h = model.apply({"params": params}, input_ids, attention_mask)   # = Gemma2Model(...).last_hidden_state
    tokenizer = load_tokenizer("Sana_1600M_1024px_diffusers/tokenizer")

The state-dict direction transformers -> Flax is text_encoder.params_from_transformers_state_dict
(beside the model); this module holds its inverse and the config mapping.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from sanajax import extras
from sanajax.models import text_encoder
from sanajax.models.weights_util import abstract_params
from sanajax.safetensors_io import check_tensors, read_json, read_state_dict, tensor_shapes

# The `text` config fields build_gemma2 reads (the architecture; not max_length, chi_prompt, ...).
_ARCH_FIELDS = ("kind", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping",
                "query_pre_attn_scalar", "rope_theta", "rms_norm_eps")


def gemma2_config_from_transformers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `text` ConfigDict (fields of configs/sana_600m.py) from a Gemma2Config config.json."""
  if cfg.get("model_type", "gemma2") != "gemma2":
    raise ValueError(f"Expected a Gemma-2 config (model_type 'gemma2'), got {cfg.get('model_type')!r}.")
  n = int(cfg["num_hidden_layers"])
  # sanajax's Gemma2 slides on even layers (i + 1 odd), transformers' default layer_types.
  default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  layer_types = cfg.get("layer_types") or default_types
  if list(layer_types) != default_types:
    raise NotImplementedError(f"Gemma-2 layer_types {layer_types} differ from the sliding/global alternation "
                              f"(even layers slide) that sanajax implements.")
  if cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) not in ("gelu_pytorch_tanh",
                                                                                         "gelu_tanh"):
    raise NotImplementedError(f"Gemma-2 hidden_activation {cfg.get('hidden_activation')!r} is not supported.")
  if cfg.get("attention_bias", False):
    raise NotImplementedError("Gemma-2 with attention_bias=True is not supported.")
  rope = cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise NotImplementedError(f"Gemma-2 rope_type {rope['rope_type']!r} is not supported.")
  t = ml_collections.ConfigDict()
  t.kind = "gemma2"
  t.vocab_size = int(cfg["vocab_size"])
  t.hidden_size = int(cfg["hidden_size"])
  t.num_layers = n
  t.num_heads = int(cfg["num_attention_heads"])
  t.num_kv_heads = int(cfg["num_key_value_heads"])
  t.head_dim = int(cfg["head_dim"])
  t.intermediate_size = int(cfg["intermediate_size"])
  t.sliding_window = cfg.get("sliding_window")
  t.final_logit_softcapping = cfg.get("final_logit_softcapping")
  t.attn_logit_softcapping = cfg.get("attn_logit_softcapping")
  t.query_pre_attn_scalar = cfg.get("query_pre_attn_scalar") or t.head_dim
  t.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  t.rms_norm_eps = float(cfg.get("rms_norm_eps", 1e-6))
  t.dtype = dtype
  return t


def gemma2_config_from_dict(text: Mapping[str, Any], dtype: str) -> ml_collections.ConfigDict:
  """The architecture fields of a saved `text` section (those build_gemma2 reads), with `dtype`."""
  c = ml_collections.ConfigDict({f: text[f] for f in _ARCH_FIELDS if f in text})
  c.dtype = dtype
  return c


def gemma2_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """Inverse of text_encoder.params_from_transformers_state_dict (Gemma2Model keys, no 'model.')."""
  out = {}
  for path, value in flatten_dict(nn.unbox(params)).items():
    value = jnp.asarray(value)
    if path == ("embed_tokens",):
      out["embed_tokens.weight"] = value
      continue
    parts = list(path)
    if parts[0].startswith("layers_"):
      parts = ["layers", parts[0][len("layers_"):]] + parts[1:]
    if parts[-1] == "kernel":
      value = value.T
    parts[-1] = "weight"
    out[".".join(parts)] = value
  return out


def gemma2_init_args() -> tuple:
  """(input_ids, attention_mask) ShapeDtypeStructs that init a Gemma2 (one token)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return ids, ids


def load_gemma2(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a transformers Gemma-2 directory (Gemma2Model or Gemma2ForCausalLM).

  model.apply({"params": params}, input_ids (B, L) int32, attention_mask (B, L) 0/1) ->
  (B, L, hidden) float32, transformers' Gemma2Model(...).last_hidden_state (after the final norm).
  lm_head (tied to the embedding in Gemma-2) is ignored. With return_config, returns
  (model, params, text_config ConfigDict).
  """
  cfg = read_json(os.path.join(path, "config.json"))
  text_config = gemma2_config_from_transformers(cfg, dtype=dtype)
  model = text_encoder.build_gemma2(text_config)
  want = jax.eval_shape(gemma2_state_dict_from_params, abstract_params(model, *gemma2_init_args()))
  state = read_state_dict(path)
  if any(k.startswith("model.") for k in state):  # Gemma2ForCausalLM.
    state = {k.removeprefix("model."): v for k, v in state.items()}
  check_tensors(tensor_shapes(state), tensor_shapes(want), path, ignore=lambda k: k.startswith("lm_head."))
  params = text_encoder.params_from_transformers_state_dict({k: v for k, v in state.items()
                                                             if not k.startswith("lm_head.")})
  return (model, params, text_config) if return_config else (model, params)


class HFTokenizer:
  """A transformers tokenizer with the interface TextEncoder expects.

  encode(text) -> ids with BOS (add_special_tokens=True, as SANA counts the CHI prompt's tokens);
  __call__(texts, max_length) -> (ids, mask) int32 numpy (B, max_length), right-padded and
  truncated, as diffusers' SanaPipeline calls it.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.tokenizer.padding_side = "right"  # SANA sets this; positions 0..L-1 assume it.

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=True))

  def __call__(self, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    out = self.tokenizer(list(texts), max_length=max_length, padding="max_length", truncation=True,
                         add_special_tokens=True, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def has_tokenizer(path: str) -> bool:
  """Whether `path` holds tokenizer files (tokenizer.json or a SentencePiece tokenizer.model)."""
  return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


# config.text.kind values whose encoder loads a released tokenizer with load_tokenizer (Gemma-2's; SD3's CLIP and T5).
RELEASED_TOKENIZER_KINDS = ("gemma2", "sd3")


def missing_tokenizer_package(text_kind: str) -> str | None:
  """The one-line error when a text encoder of `text_kind` could not load its tokenizer here (transformers is not
  installed), else None: asked before a run or a sampler loads gigabytes of weights."""
  if text_kind not in RELEASED_TOKENIZER_KINDS:
    return None
  return extras.missing_package("transformers", f"text.kind={text_kind!r} (a released model's tokenizer)")


def load_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer saved in `path` (tokenizer.json / tokenizer.model), via transformers.AutoTokenizer."""
  extras.require("transformers", f"The tokenizer in {path}")  # optional and heavy: only real tokenizers need it
  import transformers
  return HFTokenizer(transformers.AutoTokenizer.from_pretrained(path))
