"""Weight files on disk: safetensors read/write, model directories, and a tensor-set check.

Foundation layer (numpy only; torch only for legacy `.bin` files): the diffusers / transformers
name mappings in sanajax/models/*_diffusers.py, *_transformers.py read and write through here.

    tensors = read_safetensors("diffusion_pytorch_model.safetensors")  # {name: read-only np array}
    write_safetensors(path, {"w": np.ones((2, 3), ml_dtypes.bfloat16)})
    state = read_state_dict("Sana_1600M_1024px_diffusers/transformer")  # every shard / file of a dir
    check_tensors(tensor_shapes(state), want_shapes, source)           # names every mismatch at once

A file that is truncated or corrupt (header length past the end, a tensor's bytes past the end
of the file, a header that is not JSON) raises WeightsError naming the file and the tensor,
before any array is built from it.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from sanajax import extras

# safetensors dtype names -> numpy dtypes (ml_dtypes for bfloat16 / float8, which numpy lacks).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# A header longer than this is not a safetensors header (the format caps it at 100 MB), so a
# random or text file fails with "not a safetensors file" instead of a huge read.
_MAX_HEADER_BYTES = 100_000_000


class WeightsError(ValueError):
  """Weights on disk that cannot be read (truncated, corrupt) or do not fit the model they are for."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as read-only numpy arrays (memory-mapped, any dtype incl. bf16).

  The format is an 8-byte little-endian header length n, a JSON header {name: {dtype, shape,
  data_offsets: [start, end]}} (offsets relative to byte 8 + n) and the raw bytes;
  safetensors.numpy cannot return bfloat16, hence this reader. Raises WeightsError naming the
  file (and the tensor) when the file is shorter than its header says or the header is corrupt.
  """
  size = os.path.getsize(path)
  if size < 8:
    raise WeightsError(f"{path}: {size} bytes, too short for a safetensors file (truncated?).")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER_BYTES:
      raise WeightsError(f"{path}: header length {n} bytes is not plausible (not a safetensors file?).")
    if 8 + n > size:
      raise WeightsError(f"{path}: the header needs bytes 8..{8 + n} but the file has {size} bytes (truncated?).")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path}: the header is not valid JSON ({e}); the file is corrupt or not safetensors.") from None
  if not isinstance(header, dict):
    raise WeightsError(f"{path}: the header is not a JSON object; the file is corrupt or not safetensors.")
  data_start = 8 + n
  # Validate every entry before mapping any bytes: a bad one is named instead of failing in a reshape.
  entries = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
      start, end = int(start), int(end)
    except (KeyError, TypeError, ValueError):
      raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry {info!r} (corrupt file?).") from None
    if dtype not in _ST_DTYPES:
      raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}, which sanajax cannot read.")
    nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if not 0 <= start <= end or end - start != nbytes:
      raise WeightsError(f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes but its "
                         f"data_offsets are [{start}, {end}] (corrupt header?).")
    if data_start + end > size:
      raise WeightsError(f"{path}: tensor {name!r} needs bytes {data_start + start}..{data_start + end} but the "
                         f"file has {size} bytes (truncated?).")
    entries.append((name, _ST_DTYPES[dtype], shape, start, end))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if size > data_start else b""
  return {name: np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
          for name, dtype, shape, start, end in entries}


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The header's `__metadata__` string map of one .safetensors file ({} when it has none), e.g. the
  PEFT LoraConfig that diffusers stores under "lora_adapter_metadata"."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER_BYTES:
      raise WeightsError(f"{path}: header length {n} bytes is not plausible (not a safetensors file?).")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WeightsError(f"{path}: the header is not valid JSON ({e}); the file is corrupt or not safetensors.") \
          from None
  meta = header.get("__metadata__") if isinstance(header, dict) else None
  return dict(meta) if isinstance(meta, dict) else {}


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
    shards = sorted(set(read_json(indexes[0]).get("weight_map", {}).values()))
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
    # Only legacy .bin (pickled torch) weights need torch, an optional heavy dependency.
    extras.require("torch", f"Reading {directory}'s .bin weights (re-saved as safetensors they need nothing)")
    import torch
    out = {}
    for p in bins:
      for k, v in torch.load(p, map_location="cpu", weights_only=True).items():
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out
  raise FileNotFoundError(f"No weights in {directory}: expected *.safetensors (or a *.safetensors.index.json) "
                          f"or *.bin files.")


def read_json(path: str) -> dict:
  """The JSON object in `path`; FileNotFoundError if absent, WeightsError naming the file if not JSON."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{path} is not valid JSON ({e}).") from None


def read_model_config(directory: str, class_name: str) -> dict:
  """A diffusers model directory's config.json; a clear error when it describes another class."""
  cfg = read_json(os.path.join(directory, "config.json"))
  if cfg.get("_class_name", class_name) != class_name:
    raise ValueError(f"{directory} holds a {cfg['_class_name']}, not a {class_name}.")
  return cfg


def read_checked_state_dict(directory: str, want: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """read_state_dict(directory), checked against `want` ({name: array or ShapeDtypeStruct}, the
  state dict the model expects) by check_tensors: every tensor present, with its shape."""
  state = read_state_dict(directory)
  check_tensors(tensor_shapes(state), tensor_shapes(want), directory)
  return state


def tensor_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple]:
  """{name: shape} of a flat mapping of arrays (numpy, jax or ShapeDtypeStructs)."""
  return {k: tuple(v.shape) for k, v in tensors.items()}


def check_tensors(got: Mapping[str, tuple], want: Mapping[str, tuple], source: str,
                  ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Raises WeightsError naming every missing, unexpected and mis-shaped tensor (never a partial load).

  got, want: {name: shape}; `ignore(name)` drops names of `got` that the model does not use
  (e.g. a tied lm_head).
  """
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
  raise WeightsError("\n".join(lines))
