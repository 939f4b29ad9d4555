"""t5_encoder.T5Encoder <-> transformers' T5EncoderModel: config.json, state-dict names, and the loader of a
transformers directory (SD3's text_encoder_3).

    model, params = load_t5_encoder("stable-diffusion-3-medium-diffusers/text_encoder_3")
    h = model.apply({"params": params}, input_ids, attention_mask)  # = T5EncoderModel(...).last_hidden_state
    tokenizer = load_tokenizer("stable-diffusion-3-medium-diffusers/tokenizer_3")  # gemma2_transformers' HFTokenizer

Names: 'encoder.block.3.layer.0.SelfAttention.q.weight' <-> block_3_attn/q/kernel (transposed),
'encoder.block.3.layer.0.layer_norm.weight' <-> block_3_attn_norm/scale, 'encoder.block.3.layer.1.DenseReluDense
.wi_0.weight' <-> block_3_ff/wi_0/kernel, '.layer.1.layer_norm' <-> block_3_ff_norm,
'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight' <-> relative_attention_bias,
'shared.weight' <-> shared (files that hold only the tied 'encoder.embed_tokens.weight' are read too).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.dtypes import dtype_from_name
from sanajax.models.t5_encoder import ACTIVATIONS, T5Encoder
from sanajax.models.weights_util import abstract_params, flat_names
from sanajax.safetensors_io import check_tensors, read_json, read_state_dict, tensor_shapes

_TIED = "encoder.embed_tokens.weight"
_BLOCK = re.compile(r"block_(\d+)_(attn_norm|attn|ff_norm|ff)$")
_SUBLAYER = {"attn_norm": "layer.0.layer_norm", "attn": "layer.0.SelfAttention", "ff_norm": "layer.1.layer_norm",
             "ff": "layer.1.DenseReluDense"}


def t5_config_from_transformers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The fields of t5_encoder.T5Encoder from a T5Config config.json (T5 v1.1: feed_forward_proj 'gated-gelu')."""
  if cfg.get("model_type", "t5") not in ("t5", "umt5"):
    raise ValueError(f"Expected a T5 config (model_type 't5'), got {cfg.get('model_type')!r}.")
  if cfg.get("model_type") == "umt5":
    raise NotImplementedError("UMT5 (a relative position bias in every layer) is not supported; T5 only.")
  proj = cfg.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  act = proj.split("-")[-1]
  act = "gelu_new" if proj == "gated-gelu" else act  # transformers' T5Config maps gated-gelu to gelu_new.
  if act not in ACTIVATIONS:
    raise NotImplementedError(f"T5 feed_forward_proj {proj!r} is not supported (activations {sorted(ACTIVATIONS)}).")
  c = ml_collections.ConfigDict()
  c.vocab_size = int(cfg["vocab_size"])
  c.d_model = int(cfg["d_model"])
  c.d_kv = int(cfg["d_kv"])
  c.d_ff = int(cfg["d_ff"])
  c.num_layers = int(cfg["num_layers"])
  c.num_heads = int(cfg["num_heads"])
  c.relative_attention_num_buckets = int(cfg.get("relative_attention_num_buckets", 32))
  c.relative_attention_max_distance = int(cfg.get("relative_attention_max_distance", 128))
  c.is_gated_act = gated
  c.dense_act_fn = act
  c.layer_norm_epsilon = float(cfg.get("layer_norm_epsilon", 1e-6))
  c.dtype = dtype
  return c


def build_t5_encoder(c: Mapping[str, Any]) -> T5Encoder:
  """The Flax model of a t5_config_from_transformers ConfigDict."""
  return T5Encoder(
      vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"], num_layers=c["num_layers"],
      num_heads=c["num_heads"], relative_attention_num_buckets=c["relative_attention_num_buckets"],
      relative_attention_max_distance=c["relative_attention_max_distance"], is_gated_act=c["is_gated_act"],
      dense_act_fn=c["dense_act_fn"], layer_norm_epsilon=c["layer_norm_epsilon"],
      dtype=dtype_from_name(c.get("dtype", "float32"), "T5 dtype"))


def _torch_key(path: str) -> tuple[str, bool]:
  """(transformers key, transposed) of a Flax param path 'block_0_attn/q/kernel'."""
  if path == "shared":
    return "shared.weight", False
  if path == "relative_attention_bias":
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False
  if path == "final_layer_norm/scale":
    return "encoder.final_layer_norm.weight", False
  first, *rest = path.split("/")
  m = _BLOCK.match(first)
  if not m:
    raise KeyError(f"No transformers name for T5 param {path!r}.")
  mid = "." + rest[0] if len(rest) == 2 else ""  # q / k / v / o / wi_0 / wi_1 / wi / wo
  return f"encoder.block.{m.group(1)}.{_SUBLAYER[m.group(2)]}{mid}.weight", rest[-1] == "kernel"


def t5_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """transformers T5EncoderModel state dict (with 'shared.weight', without the tied copy) of Flax params."""
  out = {}
  for path, value in flat_names(params).items():
    key, transposed = _torch_key(path)
    out[key] = jnp.asarray(value).T if transposed else jnp.asarray(value)
  return out


def t5_params_from_state_dict(state: Mapping[str, Any], model: T5Encoder) -> dict:
  """Flax params (float32) of `model` from a transformers state dict holding every tensor the model needs."""
  params: dict = {}
  for path in flat_names(abstract_params(model, *t5_init_args())):
    key, transposed = _torch_key(path)
    arr = np.asarray(state[key], np.float32)
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arr.T if transposed else arr)
  return params


def t5_init_args() -> tuple:
  """(input_ids, attention_mask) ShapeDtypeStructs that init the model (one token)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return ids, ids


def load_t5_encoder(path: str, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a transformers T5EncoderModel directory (config.json + safetensors; a full
  T5ForConditionalGeneration's decoder and lm_head tensors are ignored).

  model.apply({"params": params}, input_ids (B, L) int32, attention_mask (B, L) 0/1) -> (B, L, d_model) in
  `dtype`; params float32. Every missing, unexpected or mis-shaped tensor is named in one WeightsError.
  With return_config, returns (model, params, config ConfigDict).
  """
  cfg = t5_config_from_transformers(read_json(os.path.join(path, "config.json")), dtype=dtype)
  model = build_t5_encoder(cfg)
  want = jax.eval_shape(t5_state_dict_from_params, abstract_params(model, *t5_init_args()))
  state = dict(read_state_dict(path))
  if _TIED in state and "shared.weight" not in state:  # Some exports keep only the encoder's tied copy.
    state["shared.weight"] = state.pop(_TIED)
  check_tensors(tensor_shapes(state), tensor_shapes(want), path,
                ignore=lambda k: k == _TIED or k.startswith(("decoder.", "lm_head.")))
  params = t5_params_from_state_dict(state, model)
  return (model, params, cfg) if return_config else (model, params)
