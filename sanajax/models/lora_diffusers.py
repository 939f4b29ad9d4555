"""LoRA adapters <-> the PEFT / diffusers LoRA file (`pytorch_lora_weights.safetensors`).

    lora = load_lora("my_lora")                  # a directory holding pytorch_lora_weights.safetensors, or the file
    save_lora("out", lora)                        # what SanaPipeline.load_lora_weights("out") loads

sanajax's adapters are {flax module path: {"a": (in, r), "b": (r, out), "alpha": ()}} (sanajax.models.lora);
the file holds, per adapted module of the transformer,

    transformer.<diffusers module>.lora_A.weight   (r, in)      [(r, in, 1, 1) for the 1x1 convs]
    transformer.<diffusers module>.lora_B.weight   (out, r)     [(out, r, 1, 1)]

and the PEFT LoraConfig (r, lora_alpha, target_modules, rank_pattern, alpha_pattern) as JSON under the
safetensors header's `lora_adapter_metadata` key, packed with the "transformer." prefix, as diffusers'
save_lora_weights(transformer_lora_adapter_metadata=...) writes it. Without that metadata diffusers (and
load_lora) take lora_alpha = r, PEFT's default, i.e. scale 1.

Module names: flax 'transformer_blocks_3/attn1/to_out' is diffusers 'transformer_blocks.3.attn1.to_out.0'
(the same rule as sana_dit_diffusers' state dict; MM-DiT's 'ff/net_2' is 'ff.net.2').
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sanajax.dtypes import dtype_from_name
from sanajax.models.sana_dit import POINTWISE_CONVS
from sanajax.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"  # SanaLoraLoaderMixin.transformer_name
# Flax module names "X_N" that are diffusers ModuleList entries "X.N" (not e.g. linear_1, a plain name).
_LISTS = ("transformer_blocks", "single_transformer_blocks", "net")
# diffusers ModuleLists whose entry 0 is the Linear (Attention.to_out = [Linear, Dropout]).
_INDEXED = ("to_out",)
_PEFT_PREFIXES = (f"{PREFIX}.", "base_model.model.")


class LoraFileError(ValueError):
  """A LoRA file that does not fit: inconsistent ranks, unknown modules, a shape the model lacks."""


def module_name(path: str) -> str:
  """Flax module path 'transformer_blocks_3/attn1/to_out' -> diffusers 'transformer_blocks.3.attn1.to_out.0'."""
  out = []
  for part in path.split("/"):
    m = re.fullmatch(r"(.+)_(\d+)", part)
    if m and m.group(1) in _LISTS:
      out += [m.group(1), m.group(2)]
    elif part in _INDEXED:
      out += [part, "0"]
    else:
      out.append(part)
  return ".".join(out)


def flax_path(name: str) -> str:
  """The inverse of module_name: 'transformer_blocks.3.attn1.to_out.0' -> 'transformer_blocks_3/attn1/to_out'."""
  parts, out, i = name.split("."), [], 0
  while i < len(parts):
    part = parts[i]
    nxt = parts[i + 1] if i + 1 < len(parts) else None
    if part in _LISTS and nxt is not None and nxt.isdigit():
      out.append(f"{part}_{nxt}")
      i += 2
    elif part in _INDEXED and nxt == "0":
      out.append(part)
      i += 2
    else:
      out.append(part)
      i += 1
  return "/".join(out)


def short_name(name: str) -> str:
  """The name a PEFT target_modules entry usually gives: the last component ('to_q'), or the last two when
  the last is an index ('to_out.0', 'net.2')."""
  parts = name.split(".")
  return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _is_conv(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in POINTWISE_CONVS


def state_dict_from_lora(lora: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """{'transformer.<module>.lora_A.weight': (r, in) or (r, in, 1, 1), ...lora_B.weight: (out, r) ...} float32."""
  out = {}
  for path, entry in lora.items():
    a, b = np.asarray(entry["a"], np.float32), np.asarray(entry["b"], np.float32)
    wa, wb = a.T, b.T
    if _is_conv(path):
      wa, wb = wa[:, :, None, None], wb[:, :, None, None]
    name = f"{PREFIX}.{module_name(path)}"
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(wa)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(wb)
  return out


def _most_common(values: dict[str, float]) -> float:
  vals = list(values.values())
  return max(set(vals), key=vals.count)


def peft_config(lora: Mapping[str, Mapping[str, Any]], dropout: float = 0.0) -> dict:
  """The PEFT LoraConfig fields of `lora`: the commonest rank / alpha as r / lora_alpha, the others as
  rank_pattern / alpha_pattern (keyed by full module name), target_modules the adapted modules' names."""
  ranks = {module_name(p): int(np.shape(e["a"])[1]) for p, e in lora.items()}
  alphas = {module_name(p): float(np.asarray(e.get("alpha", np.shape(e["a"])[1]))) for p, e in lora.items()}
  r, alpha = _most_common(ranks), _most_common(alphas)
  return {"r": int(r), "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": sorted(ranks),
          "rank_pattern": {k: v for k, v in ranks.items() if v != r},
          "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
          "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True,
          "peft_type": "LORA"}


def save_lora(directory: str, lora: Mapping[str, Mapping[str, Any]], *, dropout: float = 0.0,
              dtype: str = "float32") -> str:
  """Writes DIRECTORY/pytorch_lora_weights.safetensors (the PEFT / diffusers layout above, tensors as
  `dtype`: float32 for a bit-identical round trip, bfloat16 or float16); returns the file's path."""
  np_dtype = np.dtype(dtype_from_name(dtype, "the export dtype"))
  os.makedirs(directory, exist_ok=True)
  config = peft_config(lora, dropout)
  metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()},
                                                      indent=2, sort_keys=True)}
  path = os.path.join(directory, LORA_WEIGHT_NAME)
  write_safetensors(path, {k: v.astype(np_dtype) for k, v in state_dict_from_lora(lora).items()}, metadata)
  return path


def _adapter_config(path: str) -> dict:
  """The LoraConfig fields stored in the file's header (prefix removed), {} without metadata."""
  raw = read_safetensors_metadata(path).get(METADATA_KEY)
  if not raw:
    return {}
  cfg = json.loads(raw)
  return {k.removeprefix(f"{PREFIX}."): v for k, v in cfg.items() if k.startswith(f"{PREFIX}.") or "." not in k}


def _pattern_value(pattern: Mapping[str, Any], name: str, default):
  """PEFT's rank/alpha pattern lookup: a key that equals the module name or is a '.'-suffix (or regex) of it."""
  for key, value in pattern.items():
    if name == key or name.endswith("." + key) or re.fullmatch(key, name):
      return value
  return default


def load_lora(path: str, *, r: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """A PEFT / diffusers Sana LoRA as sanajax adapters {flax path: {"a": (in, r), "b": (r, out), "alpha": ()}}.

  path: a directory holding pytorch_lora_weights.safetensors (or one other .safetensors file), or the
  file. Keys may carry diffusers' "transformer." prefix or PEFT's "base_model.model."; text-encoder
  LoRAs are refused. alpha comes from the stored LoraConfig (lora_alpha / alpha_pattern; use_rslora's
  alpha / sqrt(r) scale is folded into alpha), else r (scale 1). r: the rank the caller expects
  (e.g. config.lora.r); any adapter of another rank is an error. Raises LoraFileError when lora_A and
  lora_B disagree on the rank, the stored config's rank differs from the tensors', or a key is not a
  LoRA weight.
  """
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if LORA_WEIGHT_NAME in files:
      files = [LORA_WEIGHT_NAME]
    if len(files) != 1:
      raise FileNotFoundError(f"{path}: expected {LORA_WEIGHT_NAME} (or one .safetensors file), found {files or 'none'}.")
    path = os.path.join(path, files[0])
  tensors = read_safetensors(path)
  cfg = _adapter_config(path)
  if cfg.get("use_dora"):
    raise LoraFileError(f"{path}: a DoRA adapter (use_dora); sanajax reads plain LoRA only.")
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    name = key
    for prefix in _PEFT_PREFIXES:
      name = name.removeprefix(prefix)
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
    if m is None:
      if key.startswith(("text_encoder", "te_")):
        raise LoraFileError(f"{path}: {key!r} is a text-encoder LoRA weight; sanajax reads transformer LoRAs only.")
      raise LoraFileError(f"{path}: {key!r} is not a LoRA weight (expected <module>.lora_A.weight / lora_B.weight).")
    pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, np.float32)
  use_rslora = bool(cfg.get("use_rslora", False))
  out = {}
  for name, pair in sorted(pairs.items()):
    if set(pair) != {"A", "B"}:
      raise LoraFileError(f"{path}: module {name} has only lora_{''.join(pair)}; both lora_A and lora_B are needed.")
    wa, wb = pair["A"], pair["B"]
    if wa.ndim == 4:
      if wa.shape[2:] != (1, 1) or wb.shape[2:] != (1, 1):
        raise LoraFileError(f"{path}: module {name}: only 1x1 conv LoRAs are supported, got lora_A {wa.shape}.")
      wa, wb = wa[:, :, 0, 0], wb[:, :, 0, 0]
    rank = wa.shape[0]
    if wb.shape[1] != rank:
      raise LoraFileError(f"{path}: module {name}: rank mismatch, lora_A {pair['A'].shape} has rank {rank} but "
                          f"lora_B {pair['B'].shape} has {wb.shape[1]}.")
    stored_r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"))
    if stored_r is not None and int(stored_r) != rank:
      raise LoraFileError(f"{path}: module {name}: rank mismatch, the stored LoraConfig says r={stored_r} but the "
                          f"tensors have rank {rank}.")
    if r is not None and rank != r:
      raise LoraFileError(f"{path}: module {name} has rank {rank}, but rank {r} was asked for (lora.r); "
                          f"set --config.lora.r={rank} or use an adapter of rank {r}.")
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", rank)))
    if use_rslora:
      alpha *= float(np.sqrt(rank))  # PEFT rsLoRA scale alpha / sqrt(r) == (alpha sqrt(r)) / r.
    out[flax_path(name)] = {"a": np.ascontiguousarray(wa.T), "b": np.ascontiguousarray(wb.T),
                            "alpha": np.asarray(alpha, np.float32)}
  if not out:
    raise LoraFileError(f"{path} holds no LoRA weights.")
  return out
