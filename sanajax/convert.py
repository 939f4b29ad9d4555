"""Pretrained weights in and out: diffusers SANA / DC-AE and transformers Gemma-2 <-> sanajax.

Python API (no torch needed: safetensors files are read with a small numpy reader, memory-mapped)

    model, params = load_sana_transformer("Sana_1600M_1024px_diffusers/transformer")
    v = model.apply({"params": params}, latents, t, context, context_mask)
        # latents (B, H, W, C) float32, t (B,) = diffusers' timestep / 1000, context (B, L, caption_channels),
        # context_mask (B, L) 0/1 -> prediction (B, H, W, C) (flow velocity for SANA)
    model, params = load_dcae("Sana_1600M_1024px_diffusers/vae")
    z = model.apply({"params": params}, images, method=model.encode)   # images (B, H, W, 3) in [-1, 1]
    x = model.apply({"params": params}, z, method=model.decode)        # raw latent, no scaling applied;
                                                                      # model.scaling_factor is the released one
    model, params = load_gemma2("Sana_1600M_1024px_diffusers/text_encoder")  # Gemma2Model or ...ForCausalLM
    h = model.apply({"params": params}, input_ids, attention_mask)     # = Gemma2Model(...).last_hidden_state
    encoder = load_text_encoder(text_dir, text_config, tokenizer_dir)  # TextEncoder with SANA's CHI prompt
    save_diffusers(out_dir, model, params)                             # SanaDiT or DCAE -> diffusers directory

Every loader compares the tensors on disk with what the model needs before converting anything;
a missing, unexpected or mis-shaped tensor is an error that names each one with its shape.

Command line (an Orbax workdir that `sanajax.sample` samples from and `sanajax.train` fine-tunes):

    python -m sanajax.convert --from=diffusers --src=Sana_1600M_1024px_diffusers --dst=WORKDIR
    python -m sanajax.convert --from=transformers --src=gemma-2-2b-it --dst=TEXT_WORKDIR
    python -m sanajax.convert --to=diffusers --src=WORKDIR --dst=OUT

A converted pipeline workdir holds config.json (a full sanajax config: the SANA configs'
training/sampling sections, model/ae/text sections read from the directories),
checkpoints/0 (the DiT weights as `ema_params`, what sampling and `init_from` read),
ae/ (the DC-AE as an AE workdir: config.json, ae_info.json with the scaling factor, checkpoints)
and text_encoder/ (Gemma-2 as config.json + checkpoints, its tokenizer in text_encoder/tokenizer).
config.text.pretrained is "text_encoder", relative to the workdir, so the workdir can be moved.
A source directory with only transformer files (no model_index.json) converts the DiT alone;
give --ae and --text_encoder (converted workdirs) to complete it.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict

from sanajax.models import dcae, sana_dit, text_encoder

# --------------------------------------------------------------------------- safetensors / .bin I/O

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as read-only numpy arrays (memory-mapped, any dtype incl. bf16).

  The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets}} and the raw bytes; safetensors.numpy cannot return bfloat16, hence this reader.
  """
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n else b""
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which sanajax cannot read.")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays (float32/16, bfloat16, ints) as one .safetensors file (keys sorted, as torch's)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset, arrays = 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data must start 8-byte aligned.
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """The tensors of a diffusers / transformers model directory, by state-dict key.

  Reads, in this order of preference: a sharded `*.safetensors.index.json` (every shard it
  names), the single `*.safetensors` file(s), or `*.bin` (only if torch is importable).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory!r} is not a directory.")
  indexes = sorted(glob.glob(os.path.join(directory, "*.safetensors.index.json")))
  if indexes:
    with open(indexes[0]) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, s) for s in shards]
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"{indexes[0]} names shards that are not there: {missing}.")
  else:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if files:
    out: dict[str, np.ndarray] = {}
    for p in files:
      out.update(read_safetensors(p))
    return out
  bins = sorted(glob.glob(os.path.join(directory, "*.bin")))
  if bins:
    try:
      import torch
    except ImportError:
      raise ImportError(f"{directory} holds only .bin weights, which need torch to read; install torch or "
                        f"re-save them as safetensors.") from None
    out = {}
    for p in bins:
      for k, v in torch.load(p, map_location="cpu", weights_only=True).items():
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out
  raise FileNotFoundError(f"No weights in {directory}: expected *.safetensors (or a *.safetensors.index.json) "
                          f"or *.bin files.")


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  with open(path) as f:
    return json.load(f)


def check_tensors(got: Mapping[str, tuple], want: Mapping[str, tuple], source: str,
                  ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Raises ValueError naming every missing, unexpected and mis-shaped tensor (never a partial load)."""
  got = {k: tuple(v) for k, v in got.items() if not ignore(k)}
  want = {k: tuple(v) for k, v in want.items()}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if not (missing or extra or wrong):
    return
  lines = [f"{source} does not match the model its config.json describes:"]
  lines += [f"  missing tensor {k} (expected shape {want[k]})" for k in missing]
  lines += [f"  unexpected tensor {k} of shape {got[k]}" for k in extra]
  lines += [f"  tensor {k} has shape {got[k]}, expected {want[k]}" for k in wrong]
  raise ValueError("\n".join(lines))


def _shapes(tree) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in tree.items()}


def _boxed_abstract(model: nn.Module, *args) -> dict:
  """ShapeDtypeStructs of model.init(key, *args)["params"], with their nn.Partitioned boxes (no allocation)."""
  return jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *args)["params"]


def _abstract_params(model: nn.Module, *args) -> dict:
  """Unboxed ShapeDtypeStructs of model.init(key, *args)["params"] (no allocation)."""
  return nn.unbox(_boxed_abstract(model, *args))


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _like(like: Any, params: Any) -> Any:
  """Unboxed `params` put into the structure of `like`: nn.Partitioned boxes (as model.init returns
  them, and as the trainers save them) and shardings where `like` has them."""
  def put(box, value):
    if _is_box(box):
      return box.replace_boxed(put(box.value, value))
    return jax.device_put(jnp.asarray(value, jnp.float32), getattr(box, "sharding", None))
  return jax.tree.map(put, like, params, is_leaf=_is_box)


def _to_float32(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float32) for k, v in state_dict.items()}


# --------------------------------------------------------------------------- SANA transformer

# diffusers config.json fields that sanajax does not model; values other than these are refused.
_DIT_FIXED = {"attention_bias": False, "norm_elementwise_affine": False, "dropout": 0.0}
_DIT_SPRINT_FIELDS = ("timestep_scale", "guidance_embeds", "guidance_embeds_scale")


def _dit_supports_sprint() -> bool:
  return "guidance_embeds" in sana_dit.SanaDiT.__dataclass_fields__


def sana_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `model` ConfigDict (fields of configs/sana_600m.py) from SanaTransformer2DModel's config.json."""
  for field, value in _DIT_FIXED.items():
    if cfg.get(field, value) != value:
      raise NotImplementedError(f"SanaTransformer2DModel with {field}={cfg[field]!r} is not supported "
                                f"(every released SANA model has {field}={value!r}).")
  heads, head_dim = int(cfg.get("num_attention_heads", 70)), int(cfg.get("attention_head_dim", 32))
  hidden = heads * head_dim
  cross_dim = cfg.get("cross_attention_dim", 2240)
  if cross_dim is not None and int(cross_dim) != hidden:
    raise NotImplementedError(f"cross_attention_dim={cross_dim} differs from the hidden size {hidden}; sanajax's "
                              f"cross-attention reads the projected caption (hidden size) as diffusers' SANA does.")
  qk_norm = cfg.get("qk_norm")
  if qk_norm not in (None, "rms_norm_across_heads"):
    raise NotImplementedError(f"qk_norm={qk_norm!r} is not supported; only None or 'rms_norm_across_heads'.")
  interpolation = cfg.get("interpolation_scale")
  in_channels = int(cfg.get("in_channels", 32))
  m = ml_collections.ConfigDict()
  m.name = "sana_dit"
  m.depth = int(cfg.get("num_layers", 20))
  m.hidden_size = hidden
  m.linear_head_dim = head_dim
  m.cross_num_heads = int(cfg.get("num_cross_attention_heads", 20))
  m.cross_head_dim = int(cfg.get("cross_attention_head_dim", 112))
  m.mlp_ratio = float(cfg.get("mlp_ratio", 2.5))
  m.patch_size = int(cfg.get("patch_size", 1))
  m.caption_channels = int(cfg.get("caption_channels", 2304))
  m.in_channels = in_channels
  m.out_channels = int(cfg.get("out_channels") or in_channels)
  m.sample_size = int(cfg.get("sample_size", 32))
  # diffusers: a sin-cos PE exists iff interpolation_scale is set (PatchEmbed pos_embed_type).
  m.use_pe = interpolation is not None
  m.pe_interpolation = float(interpolation) if interpolation is not None else 1.0
  m.attn_eps = 1e-15  # SanaLinearAttnProcessor2_0's eps.
  m.norm_eps = float(cfg.get("norm_eps", 1e-6))
  m.y_norm_scale = 0.01  # Only the initial value of caption_norm/scale; loaded weights replace it.
  m.qk_norm = qk_norm is not None
  m.dtype = dtype
  m.attn_impl = "xla"
  m.remat = "none"
  timestep_scale = float(cfg.get("timestep_scale", 1.0))
  if cfg.get("guidance_embeds", False):
    if not _dit_supports_sprint():
      raise NotImplementedError("This diffusers directory is a SANA-Sprint model (guidance_embeds: true); "
                                "sanajax.models.sana_dit.SanaDiT has no guidance embedder yet.")
    m.guidance_embeds = True
    m.guidance_embeds_scale = float(cfg.get("guidance_embeds_scale", 0.1))
    # SanaSprintPipeline feeds the transformer the sCM time s in [0, 1] as `timestep` (it never
    # applies timestep_scale, 1.0 in the released config); sanajax embeds 1000 * timestep_scale * t,
    # so Sprint models get 0.001 x diffusers' value and take t = s (configs/sprint_600m.py).
    m.timestep_scale = timestep_scale * _SPRINT_TIME
  elif timestep_scale != 1.0:
    m.timestep_scale = timestep_scale  # SanaPipeline feeds timestep * timestep_scale, as sanajax embeds.
  return m


_SPRINT_TIME = 1e-3  # sanajax Sprint timestep_scale per unit of diffusers' (see sana_config_from_diffusers).


def dit_diffusers_config(model_config: Mapping[str, Any]) -> dict:
  """SanaTransformer2DModel config.json contents for a sanajax `model` config (inverse of the above)."""
  kw = sana_dit.diffusers_kwargs(model_config)
  if kw.get("guidance_embeds"):  # The inverse of sana_config_from_diffusers' Sprint time convention.
    kw["timestep_scale"] = kw["timestep_scale"] / _SPRINT_TIME
  return {"_class_name": "SanaTransformer2DModel", "_diffusers_version": _diffusers_version(), **kw}


def _diffusers_version() -> str:
  try:
    import diffusers
    return diffusers.__version__
  except ImportError:
    return "0.32.0"  # The first diffusers with SanaTransformer2DModel and AutoencoderDC.


def dit_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """The exact inverse of sana_dit.params_from_diffusers_state_dict: Flax params -> diffusers state dict.

  transformer_blocks_3/attn1/to_out/kernel -> transformer_blocks.3.attn1.to_out.0.weight; kernels
  transposed back ((I, O) -> (O, I); conv (kh, kw, I, O) -> (O, I, kh, kw); the 1x1 convs that are
  Dense here -> (O, I, 1, 1)); scale -> weight. Works on arrays or ShapeDtypeStructs (via eval_shape).
  """
  out = {}
  for path, value in flatten_dict(nn.unbox(params)).items():
    parts = list(path)
    if parts[0].startswith("transformer_blocks_"):
      parts = ["transformer_blocks", parts[0][len("transformer_blocks_"):]] + parts[1:]
    if "to_out" in parts:
      i = parts.index("to_out")
      parts.insert(i + 1, "0")
    leaf = parts[-1]
    value = jnp.asarray(value)
    if leaf == "kernel":
      if value.ndim == 2 and parts[-2] in sana_dit._POINTWISE:
        value = value.T[:, :, None, None]
      elif value.ndim == 2:
        value = value.T
      elif value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      parts[-1] = "weight"
    elif leaf == "scale":
      parts[-1] = "weight"
    out[".".join(parts)] = value
  return out


def _dit_init_args(model_config: Mapping[str, Any]) -> tuple:
  p = model_config["patch_size"]
  return sana_dit.dummy_inputs(model_config, (p, p), 1)


def load_sana_transformer(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers SanaTransformer2DModel directory (config.json + weights).

  The returned model is a `SanaDiT` with float32 parameters and compute dtype `dtype`:
  model.apply({"params": params}, latents, t, context, context_mask) with latents (B, H, W, C)
  float32, t (B,) = diffusers' `timestep` / 1000, context (B, L, caption_channels) and
  context_mask (B, L) of 0/1 -> (B, H, W, out_channels), as diffusers' forward (NCHW there).
  SANA-Sprint directories (guidance_embeds: true) follow sanajax's Sprint convention instead:
  t is the time SanaSprintPipeline passes as `timestep` (the sCM time in [0, 1]; the model's
  timestep_scale is 0.001 x diffusers'), and the keyword `guidance=(B,)` is the raw CFG scale
  (e.g. 4.5; the model multiplies it by guidance_embeds_scale, as that pipeline does).
  With return_config, returns (model, params, model_config ConfigDict).
  """
  cfg = read_json(os.path.join(path, "config.json"))
  if cfg.get("_class_name", "SanaTransformer2DModel") != "SanaTransformer2DModel":
    raise ValueError(f"{path} holds a {cfg['_class_name']}, not a SanaTransformer2DModel.")
  model_config = sana_config_from_diffusers(cfg, dtype=dtype)
  model = sana_dit.build_dit(model_config)
  want = jax.eval_shape(dit_state_dict_from_params, _abstract_params(model, *_dit_init_args(model_config)))
  state = read_state_dict(path)
  check_tensors(_shapes(state), _shapes(want), path)
  params = sana_dit.params_from_diffusers_state_dict(state)
  return (model, params, model_config) if return_config else (model, params)


# --------------------------------------------------------------------------- DC-AE

def dcae_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `ae` ConfigDict (fields of configs/dcae_f32c32.py) from AutoencoderDC's config.json."""
  import inspect
  defaults = {k: v.default for k, v in inspect.signature(dcae.DCAE).parameters.items()}
  ae = ml_collections.ConfigDict()
  for field in dcae._CONFIG_FIELDS + dcae._OPTIONAL_FIELDS[:-1]:
    value = cfg.get(field, defaults.get(field))
    ae[field] = list(value) if isinstance(value, tuple) else value
  ae.attn_eps = dcae.ATTN_EPS
  ae.dtype = dtype
  ae.attn_impl = "xla"
  ae.workdir = ""
  return ae


def dcae_diffusers_config(ae_config: ml_collections.ConfigDict) -> dict:
  kw = {k: list(v) if isinstance(v, tuple) else v for k, v in dcae.diffusers_kwargs(ae_config).items()}
  return {"_class_name": "AutoencoderDC", "_diffusers_version": _diffusers_version(), **_listify(kw)}


def _listify(value):
  if isinstance(value, (list, tuple)):
    return [_listify(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _listify(v) for k, v in value.items()}
  return value


def _torch_key(path: tuple[str, ...]) -> str:
  """('encoder', 'down_blocks_3_1', 'attn', 'to_qkv_multiscale_0', 'proj_in') -> 'encoder.down_blocks.3.1...'.

  Inverse of dcae._flax_path: trailing '_<digits>' groups of a name are list indices.
  """
  parts = []
  for name in path:
    pieces = name.split("_")
    i = len(pieces)
    while i > 1 and pieces[i - 1].isdigit():
      i -= 1
    parts.append("_".join(pieces[:i]))
    parts.extend(pieces[i:])
  return ".".join(parts)


def dcae_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """The exact inverse of dcae.params_from_diffusers_state_dict (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, value in flatten_dict(nn.unbox(params)).items():
    leaf, value = path[-1], jnp.asarray(value)
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[_torch_key(path[:-1]) + "." + leaf] = value
  return out


def load_dcae(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers AutoencoderDC directory.

  model.apply({"params": params}, images, method=model.encode): images (B, H, W, 3) in [-1, 1]
  -> raw latent (B, H/f, W/f, latent_channels) (no scaling factor); method=model.decode inverts
  it. model.scaling_factor is the config's (0.41407 for the released f32c32).
  """
  cfg = read_json(os.path.join(path, "config.json"))
  if cfg.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
    raise ValueError(f"{path} holds a {cfg['_class_name']}, not an AutoencoderDC.")
  ae_config = dcae_config_from_diffusers(cfg, dtype=dtype)
  model = dcae.build_dcae(ae_config)
  f = dcae.downsample_factor(ae_config)
  want = jax.eval_shape(dcae_state_dict_from_params,
                        _abstract_params(model, jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)))
  state = read_state_dict(path)
  check_tensors(_shapes(state), _shapes(want), path)
  params = dcae.params_from_diffusers_state_dict(state, ae_config)
  return (model, params, ae_config) if return_config else (model, params)


# --------------------------------------------------------------------------- Gemma-2

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


def load_gemma2(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a transformers Gemma-2 directory (Gemma2Model or Gemma2ForCausalLM).

  model.apply({"params": params}, input_ids (B, L) int32, attention_mask (B, L) 0/1) ->
  (B, L, hidden) float32, transformers' Gemma2Model(...).last_hidden_state (after the final norm).
  lm_head (tied to the embedding in Gemma-2) is ignored.
  """
  cfg = read_json(os.path.join(path, "config.json"))
  text_config = gemma2_config_from_transformers(cfg, dtype=dtype)
  model = text_encoder.build_gemma2(text_config)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  want = jax.eval_shape(gemma2_state_dict_from_params, _abstract_params(model, ids, ids))
  state = read_state_dict(path)
  if any(k.startswith("model.") for k in state):  # Gemma2ForCausalLM.
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
  check_tensors(_shapes(state), _shapes(want), path, ignore=lambda k: k.startswith("lm_head."))
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


def load_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer saved in `path` (tokenizer.json / tokenizer.model), via transformers.AutoTokenizer."""
  try:
    import transformers
  except ImportError:
    raise ImportError("Loading a Gemma tokenizer needs `transformers` (pip install transformers).") from None
  return HFTokenizer(transformers.AutoTokenizer.from_pretrained(path))


def _is_orbax_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, "config.json"))


def load_text_encoder(path: str, text_config: Mapping[str, Any] | None = None,
                      tokenizer_path: str | None = None) -> text_encoder.TextEncoder:
  """A frozen TextEncoder from a converted text workdir (sanajax.convert --from=transformers) or a
  transformers Gemma-2 directory; `text_config` supplies max_length, chi_prompt and dtype (model
  dimensions come from `path`). Tokenizer: tokenizer_path, else path/tokenizer, path, or the
  sibling ../tokenizer of a diffusers pipeline.
  """
  run = dict(text_config or {})
  if _is_orbax_workdir(path):
    from sanajax.workdir.checkpoint import Checkpointer
    from sanajax.workdir.files import load_workdir_config
    saved = load_workdir_config(path).text
    dims = gemma2_config_from_dict(saved, run.get("dtype", saved.get("dtype", "float32")))
    model = text_encoder.build_gemma2(dims)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    params = Checkpointer(os.path.join(path, "checkpoints"), read_only=True).restore_params(
        _abstract_params(model, ids, ids))
  else:
    _, params, dims = load_gemma2(path, dtype=run.get("dtype", "float32"), return_config=True)
  candidates = [tokenizer_path] if tokenizer_path else [os.path.join(path, "tokenizer"), path,
                                                        os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                     "tokenizer")]
  tok_dir = next((c for c in candidates if c and _has_tokenizer(c)), None)
  if tok_dir is None:
    raise FileNotFoundError(f"No tokenizer files (tokenizer.json / tokenizer.model) in {candidates}.")
  config = ml_collections.ConfigDict(dict(dims))
  config.max_length = int(run.get("max_length", 300))  # SANA's model_max_length.
  config.chi_prompt = run.get("chi_prompt", "") or ""
  return text_encoder.TextEncoder(config, tokenizer=load_tokenizer(tok_dir), params=params)


def gemma2_config_from_dict(text: Mapping[str, Any], dtype: str) -> ml_collections.ConfigDict:
  """The architecture fields of a saved `text` section (those build_gemma2 reads), with `dtype`."""
  fields = ("kind", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping",
            "query_pre_attn_scalar", "rope_theta", "rms_norm_eps")
  c = ml_collections.ConfigDict({f: text[f] for f in fields if f in text})
  c.dtype = dtype
  return c


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


# --------------------------------------------------------------------------- export to diffusers

def save_diffusers(directory: str, model: nn.Module, params: Mapping, *, dtype: str = "float32",
                   sample_size: int | None = None) -> None:
  """Writes a sanajax SanaDiT or DCAE as a diffusers directory (config.json +
  diffusion_pytorch_model.safetensors) that SanaTransformer2DModel / AutoencoderDC.from_pretrained
  loads. dtype: float32 (bit-identical round trip), bfloat16 or float16. sample_size (DiT only):
  diffusers' `sample_size` (latent side); default the model's PE base grid, else 32.
  """
  if isinstance(model, sana_dit.SanaDiT):
    mc = model_config_from_module(model, sample_size)
    config, state = dit_diffusers_config(mc), dit_state_dict_from_params(params)
  elif isinstance(model, dcae.DCAE):
    ae_config = ml_collections.ConfigDict({f: _listify(getattr(model, f)) for f in dcae._CONFIG_FIELDS +
                                           dcae._OPTIONAL_FIELDS[:-1]})
    config, state = dcae_diffusers_config(ae_config), dcae_state_dict_from_params(params)
  else:
    raise TypeError(f"save_diffusers exports a SanaDiT or a DCAE, got {type(model).__name__}.")
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, "diffusion_pytorch_model.safetensors"),
                    {k: np.asarray(v, np.float32).astype(np_dtype) for k, v in state.items()})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def model_config_from_module(model: sana_dit.SanaDiT, sample_size: int | None = None) -> dict:
  """The `model` config fields of a SanaDiT instance (what build_dit would rebuild it from)."""
  fields = ("depth", "hidden_size", "linear_head_dim", "cross_num_heads", "cross_head_dim", "mlp_ratio",
            "patch_size", "caption_channels", "in_channels", "out_channels", "use_pe", "pe_interpolation",
            "attn_eps", "norm_eps", "y_norm_scale", "qk_norm") + tuple(
                f for f in _DIT_SPRINT_FIELDS if f in sana_dit.SanaDiT.__dataclass_fields__)
  mc = {f: getattr(model, f) for f in fields}
  if sample_size is None:
    sample_size = model.pe_base_size * model.patch_size if model.pe_base_size else 32
  mc["sample_size"] = int(sample_size)
  return mc


# --------------------------------------------------------------------------- workdirs (the CLI)

CONVERTED_STEP = 0  # Converted weights are step 0: fine-tuning from them starts counting at 0.


def _save_params(directory: str, params: Any) -> None:
  """Writes params as `ema_params` of an Orbax checkpoint at step 0 (what restore_params reads).

  DiT and AE params are saved boxed, in the tree model.init returns, as the trainers save them.
  Only the EMA slot is written: sampling and `init_from` read it, and a second copy of a
  1.6B model would cost another 6.4 GB of disk.
  """
  from sanajax.workdir.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), keep=1, async_save=False)
  ckpt.save(CONVERTED_STEP, {"ema_params": params}, {"converted": True})
  ckpt.close()


def _base_config(resolution: int) -> ml_collections.ConfigDict:
  """The SANA config (configs/sana_600m.py) the training/sampling sections of a converted workdir use."""
  from sanajax import config_utils
  sana = config_utils.load_sibling(os.path.join(config_utils.REPO_CONFIG_DIR, "x.py"), "sana_600m")
  c = sana.base_config(str(resolution) if str(resolution) in sana.RESOLUTION_PRESETS else None)
  del c["resolution_presets"]  # The converted model's PE settings come from its config.json, not presets.
  c.data.resolution = resolution
  c.init_from = ""
  return c


def convert_text_encoder(src: str, dst: str, *, tokenizer_src: str | None = None, dtype: str = "float32",
                         text_config: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """transformers Gemma-2 directory -> text workdir (config.json with `text`, checkpoints/, tokenizer/)."""
  from sanajax.workdir.files import prepare_workdir
  _, params, text = load_gemma2(src, dtype=dtype, return_config=True)
  for k, v in (text_config or {}).items():
    if k in ("max_length", "chi_prompt", "seed", "pretrained"):
      text[k] = v
  if "max_length" not in text:
    text.max_length = 300  # SANA's model_max_length.
  c = ml_collections.ConfigDict({"text": text})
  prepare_workdir(dst, c)
  _save_params(dst, params)
  tok_src = tokenizer_src or (src if _has_tokenizer(src) else None)
  if tok_src:
    load_tokenizer(tok_src).tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
  return text


def convert_ae(src: str, dst: str, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """diffusers AutoencoderDC directory -> AE workdir (as sanajax.train_ae writes; load_ae reads it)."""
  from sanajax.workdir.files import AE_INFO_FILE, prepare_workdir
  model, params, ae = load_dcae(src, dtype=dtype, return_config=True)
  f = dcae.downsample_factor(ae)
  c = ml_collections.ConfigDict({"ae": ae, "data": {"resolution": f}})
  prepare_workdir(dst, c)
  _save_params(dst, _like(_boxed_abstract(model, jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)), params))
  with open(os.path.join(dst, AE_INFO_FILE), "w") as f:
    json.dump({"scaling_factor": float(model.scaling_factor), "source": os.path.abspath(src)}, f, indent=2)
  return ae


def convert_diffusers(src: str, dst: str, *, dtype: str = "float32", ae_workdir: str = "",
                      text_workdir: str = "") -> ml_collections.ConfigDict:
  """A diffusers SANA pipeline (model_index.json; transformer/ vae/ text_encoder/ tokenizer/) or a bare
  transformer directory -> a sanajax workdir that sanajax.sample loads and sanajax.train fine-tunes."""
  from sanajax.workdir.files import prepare_workdir
  pipeline = os.path.exists(os.path.join(src, "model_index.json")) or os.path.isdir(os.path.join(src, "transformer"))
  transformer_dir = os.path.join(src, "transformer") if pipeline else src
  dit, params, model = load_sana_transformer(transformer_dir, dtype=dtype, return_config=True)
  os.makedirs(dst, exist_ok=True)
  if pipeline:
    ae = convert_ae(os.path.join(src, "vae"), os.path.join(dst, "ae"), dtype=dtype)
    ae_ref = ""  # WORKDIR/ae, the trainer's default.
  elif ae_workdir:
    from sanajax.workdir.files import load_workdir_config
    ae, ae_ref = load_workdir_config(ae_workdir).ae, os.path.abspath(ae_workdir)
  else:
    raise ValueError(f"{src} is a bare transformer directory: give --ae=AE_WORKDIR (a converted AutoencoderDC) "
                     f"and --text_encoder=TEXT_WORKDIR, or convert the whole pipeline directory.")
  resolution = model.sample_size * dcae.downsample_factor(ae)
  c = _base_config(resolution)
  c.model = model
  c.ae = ae
  c.ae.workdir = ae_ref
  c.ae.dtype = dtype
  if "ae_train" in c:
    del c["ae_train"]
  text = c.text
  if pipeline:
    text_cfg = convert_text_encoder(os.path.join(src, "text_encoder"), os.path.join(dst, "text_encoder"),
                                    tokenizer_src=os.path.join(src, "tokenizer"), dtype=dtype,
                                    text_config={"max_length": text.max_length, "chi_prompt": text.chi_prompt})
    text_ref = "text_encoder"
  elif text_workdir:
    from sanajax.workdir.files import load_workdir_config
    text_cfg, text_ref = load_workdir_config(text_workdir).text, os.path.abspath(text_workdir)
  else:
    raise ValueError(f"{src} is a bare transformer directory: give --text_encoder=TEXT_WORKDIR too.")
  new_text = gemma2_config_from_dict(text_cfg, dtype)
  new_text.pretrained = text_ref
  new_text.max_length = text.max_length
  new_text.chi_prompt = text.chi_prompt
  new_text.seed = text.seed
  c.text = new_text
  if c.model.caption_channels != c.text.hidden_size:
    raise ValueError(f"The transformer reads captions of {c.model.caption_channels} channels but the text "
                     f"encoder gives {c.text.hidden_size}.")
  if c.model.in_channels != c.ae.latent_channels:
    raise ValueError(f"The transformer takes {c.model.in_channels} latent channels but the AE gives "
                     f"{c.ae.latent_channels}.")
  if c.model.get("guidance_embeds"):  # SANA-Sprint: sCM, 2 steps, embedded guidance 4.5 (configs/sprint_600m.py).
    c.sample.sampler, c.sample.steps, c.sample.cfg = "scm", 2, 4.5
  scheduler = os.path.join(src, "scheduler", "scheduler_config.json")
  if os.path.exists(scheduler):  # The released pipeline's flow_shift (3.0 for Sana 1024px).
    c.diffusion.flow_shift = float(read_json(scheduler).get("flow_shift", c.diffusion.flow_shift))
  prepare_workdir(dst, c)
  _save_params(dst, _like(_boxed_abstract(dit, *_dit_init_args(model)), params))
  return c


def init_params_from(path: str, like: Any) -> Any:
  """DiT parameters to fine-tune from (`config.init_from`): the EMA weights of the latest checkpoint
  of a sanajax workdir (a converted one, or a finished run), or a diffusers transformer directory.

  `like` is the freshly initialised params tree as the trainer holds it (model.init's boxed
  tree of arrays or ShapeDtypeStructs, with shardings where given); the result has its structure
  and shardings, float32.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from={path!r} is not a directory.")
  if os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
    from sanajax.workdir.checkpoint import Checkpointer
    from sanajax.workdir.files import load_workdir_config
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
    saved_model = load_workdir_config(path).model
    saved = _boxed_abstract(sana_dit.build_dit(saved_model), *_dit_init_args(saved_model))
    saved_shapes, like_shapes = _shapes(_flat_names(saved)), _shapes(_flat_names(like))
    if saved_shapes == like_shapes:
      return ckpt.restore_params(like, ema=True)
    # A model with leaves the saved one lacks (SANA-Sprint phase 1 adds q/k RMSNorm and a CFG
    # embedder to a trained teacher): every saved weight goes to its place, the new leaves keep
    # their init (norm scales 1, the CFG embedder's zero last layer); any other difference raises.
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(like)):
      raise ValueError(f"init_from={path!r}: the saved model's parameters differ from this model's, and the new "
                       f"ones need initial values (pass initialised parameters, not abstract ones).")
    values = sana_dit.student_params_from_teacher(nn.unbox(ckpt.restore_params(saved, ema=True)), nn.unbox(like))
    print(f"init_from {path}: the saved model lacks {len(like_shapes) - len(saved_shapes)} parameter "
          f"arrays of this one (e.g. q/k norms); they keep their initial values.", flush=True)
    return _like(like, values)
  if os.path.exists(os.path.join(path, "transformer", "config.json")):
    path = os.path.join(path, "transformer")
  _, params = load_sana_transformer(path)
  check_tensors(_shapes(_flat_names(params)), _shapes(_flat_names(like)), path)
  return _like(like, params)


def _flat_names(tree) -> dict[str, Any]:
  return flatten_dict(nn.unbox(tree), sep="/")


def export_diffusers(workdir: str, dst: str, *, dtype: str = "float32", ema: bool = True) -> None:
  """A sanajax workdir's latest DiT (EMA) weights -> DST/transformer, and its AE -> DST/vae."""
  from sanajax.workdir.checkpoint import Checkpointer
  from sanajax.workdir.files import ae_workdir, load_workdir_config
  from sanajax.workdir.loaders import has_checkpoint, load_ae
  config = load_workdir_config(workdir)
  model_cfg = dict(config.model, dtype="float32")
  model = sana_dit.build_dit(model_cfg)
  abstract = _boxed_abstract(model, *_dit_init_args(model_cfg))
  params = nn.unbox(Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_params(
      abstract, ema=ema))
  save_diffusers(os.path.join(dst, "transformer"), model, params, dtype=dtype,
                 sample_size=config.model.get("sample_size"))
  ae_dir = ae_workdir(config, workdir)
  if has_checkpoint(ae_dir):
    ae_model, ae_params, _, _ = load_ae(ae_dir)
    save_diffusers(os.path.join(dst, "vae"), ae_model, ae_params, dtype=dtype)


def main(argv):
  from absl import app, flags

  from sanajax.training.setup import quiet_library_logs
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  f = flags.FLAGS
  if not f.src or not f.dst:
    raise app.UsageError("--src and --dst are required.")
  if not os.path.isdir(f.src):
    raise app.UsageError(f"--src {f.src!r} is not a directory.")
  if f.to:
    if f["from"].value:
      raise app.UsageError("Give --from (import) or --to (export), not both.")
    export_diffusers(f.src, f.dst, dtype=f.dtype)
    print(f"Exported {f.src} to {f.dst} (transformer/, vae/).", flush=True)
    return
  source = f["from"].value
  if source == "diffusers":
    c = convert_diffusers(f.src, f.dst, dtype=f.dtype, ae_workdir=f.ae or "", text_workdir=f.text_encoder or "")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        _abstract_params(sana_dit.build_dit(c.model), *_dit_init_args(c.model))))
    print(f"Converted {f.src} -> {f.dst}: DiT {n / 1e6:.1f}M parameters, {c.data.resolution} px. Sample with "
          f"`python -m sanajax.sample --workdir={f.dst} --prompt=...`.", flush=True)
  elif source == "transformers":
    convert_text_encoder(f.src, f.dst, dtype=f.dtype)
    print(f"Converted Gemma-2 {f.src} -> {f.dst}.", flush=True)
  else:
    raise app.UsageError("Give --from=diffusers|transformers (import) or --to=diffusers (export).")


def _define_flags():
  from absl import flags
  flags.DEFINE_enum("from", None, ["diffusers", "transformers"], "Import: the layout of --src.")
  flags.DEFINE_enum("to", None, ["diffusers"], "Export: write the sanajax workdir --src as diffusers to --dst.")
  flags.DEFINE_string("src", None, "Source directory.")
  flags.DEFINE_string("dst", None, "Destination directory.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Import: the compute dtype written into the config (parameters stay float32). "
                    "Export: the dtype of the written tensors.")
  flags.DEFINE_string("ae", None, "Bare transformer import: a converted AE workdir.")
  flags.DEFINE_string("text_encoder", None, "Bare transformer import: a converted text-encoder workdir.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
