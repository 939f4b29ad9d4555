"""clip_text.CLIPTextModelWithProjection <-> transformers' CLIPTextModelWithProjection: config.json, state-dict
names, and the loader of a transformers directory (SD3's text_encoder / text_encoder_2).

    model, params = load_clip_text_encoder("stable-diffusion-3-medium-diffusers/text_encoder")
    out = model.apply({"params": params}, input_ids)  # dict: last_hidden_state, penultimate_hidden_state, pooled
    tokenizer = load_tokenizer("stable-diffusion-3-medium-diffusers/tokenizer")  # gemma2_transformers' HFTokenizer

Names: 'text_model.encoder.layers.3.self_attn.q_proj.weight' <-> layers_3/self_attn/q_proj/kernel (transposed),
LayerNorm weight <-> scale, 'text_model.embeddings.token_embedding.weight' <-> token_embedding,
'text_projection.weight' <-> text_projection/kernel (transposed).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.dtypes import dtype_from_name
from sanajax.models.clip_text import ACTIVATIONS, CLIPTextModelWithProjection
from sanajax.models.weights_util import abstract_params, flat_names
from sanajax.safetensors_io import check_tensors, read_json, read_state_dict, tensor_shapes

_PREFIX = "text_model."
_EMBEDDINGS = {"token_embedding": "embeddings.token_embedding.weight",
               "position_embedding": "embeddings.position_embedding.weight"}


def clip_config_from_transformers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The fields of clip_text.CLIPTextModelWithProjection from a CLIPTextConfig config.json (a full CLIPConfig's
  text_config is taken when given one)."""
  if cfg.get("model_type") == "clip" and "text_config" in cfg:
    cfg = dict(cfg["text_config"], projection_dim=cfg.get("projection_dim", cfg["text_config"].get("projection_dim")))
  if cfg.get("model_type", "clip_text_model") != "clip_text_model":
    raise ValueError(f"Expected a CLIP text config (model_type 'clip_text_model'), got {cfg.get('model_type')!r}.")
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise NotImplementedError(f"CLIP hidden_act {act!r} is not supported (one of {sorted(ACTIVATIONS)}).")
  c = ml_collections.ConfigDict()
  c.vocab_size = int(cfg["vocab_size"])
  c.hidden_size = int(cfg["hidden_size"])
  c.num_layers = int(cfg["num_hidden_layers"])
  c.num_heads = int(cfg["num_attention_heads"])
  c.intermediate_size = int(cfg["intermediate_size"])
  c.projection_dim = int(cfg.get("projection_dim", 512))
  c.max_position_embeddings = int(cfg.get("max_position_embeddings", 77))
  c.hidden_act = act
  c.layer_norm_eps = float(cfg.get("layer_norm_eps", 1e-5))
  c.eos_token_id = int(cfg.get("eos_token_id", 2))
  c.dtype = dtype
  return c


def build_clip_text(c: Mapping[str, Any]) -> CLIPTextModelWithProjection:
  """The Flax model of a clip_config_from_transformers ConfigDict."""
  return CLIPTextModelWithProjection(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_layers"], num_heads=c["num_heads"],
      intermediate_size=c["intermediate_size"], projection_dim=c["projection_dim"],
      max_position_embeddings=c["max_position_embeddings"], hidden_act=c["hidden_act"],
      layer_norm_eps=c["layer_norm_eps"], eos_token_id=c["eos_token_id"],
      dtype=dtype_from_name(c.get("dtype", "float32"), "CLIP dtype"))


def _torch_key(path: str) -> tuple[str, bool]:
  """(transformers key, transposed) of a Flax param path 'layers_0/self_attn/q_proj/kernel'."""
  if path in _EMBEDDINGS:
    return _PREFIX + _EMBEDDINGS[path], False
  if path == "text_projection/kernel":
    return "text_projection.weight", True
  parts = path.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
  if parts[0].startswith("layers_"):
    parts = ["encoder", "layers", parts[0][len("layers_"):]] + parts[1:]
  return _PREFIX + ".".join(parts[:-1] + [leaf]), parts[-1] == "kernel"


def clip_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """transformers CLIPTextModelWithProjection state dict of Flax params (boxed or not)."""
  out = {}
  for path, value in flat_names(params).items():
    key, transposed = _torch_key(path)
    out[key] = jnp.asarray(value).T if transposed else jnp.asarray(value)
  return out


def clip_params_from_state_dict(state: Mapping[str, Any], model: CLIPTextModelWithProjection) -> dict:
  """Flax params (float32) of `model` from a transformers state dict holding every tensor the model needs."""
  want = flat_names(abstract_params(model, *clip_init_args()))
  params: dict = {}
  for path in want:
    key, transposed = _torch_key(path)
    arr = np.asarray(state[key], np.float32)
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arr.T if transposed else arr)
  return params


def clip_init_args() -> tuple:
  """(input_ids,) ShapeDtypeStructs that init the model (one token)."""
  return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)


def _ignored(key: str) -> bool:
  # position_ids: a non-persistent buffer that older transformers versions saved.
  return key == _PREFIX + "embeddings.position_ids"


def load_clip_text_encoder(path: str, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a transformers CLIPTextModelWithProjection directory (config.json + safetensors).

  model.apply({"params": params}, input_ids (B, L) int32) -> dict with last_hidden_state,
  penultimate_hidden_state (B, L, hidden) and pooled (B, projection_dim), in `dtype`; params float32.
  Every missing, unexpected or mis-shaped tensor is named in one WeightsError. With return_config,
  returns (model, params, config ConfigDict).
  """
  cfg = clip_config_from_transformers(read_json(os.path.join(path, "config.json")), dtype=dtype)
  model = build_clip_text(cfg)
  want = jax.eval_shape(clip_state_dict_from_params, abstract_params(model, *clip_init_args()))
  state = read_state_dict(path)
  check_tensors(tensor_shapes(state), tensor_shapes(want), path, ignore=_ignored)
  params = clip_params_from_state_dict(state, model)
  return (model, params, cfg) if return_config else (model, params)
