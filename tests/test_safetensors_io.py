"""sanajax.safetensors_io: the numpy safetensors reader/writer, and the errors for truncated or corrupt files.

No torch here: files are written with write_safetensors (tests/test_convert.py checks them against
the safetensors library) and damaged byte by byte.
"""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from sanajax.safetensors_io import WeightsError, check_tensors, read_safetensors, read_state_dict, write_safetensors

TENSORS = {"blocks.0.attn.to_q.weight": np.arange(40, dtype=np.float32).reshape(4, 10),
           "blocks.0.norm.weight": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16),
           "step": np.array([7], np.int64)}


def _write(path):
  write_safetensors(str(path), TENSORS)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return n, header


def test_round_trip_keeps_values_and_dtypes(tmp_path):
  _write(tmp_path / "m.safetensors")
  back = read_safetensors(str(tmp_path / "m.safetensors"))
  assert sorted(back) == sorted(TENSORS)
  for k, v in TENSORS.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k].astype(np.float64), v.astype(np.float64))


def test_truncated_data_names_the_file_and_tensor(tmp_path):
  path = tmp_path / "model.safetensors"
  n, header = _write(path)
  start, end = (8 + n + o for o in header["blocks.0.attn.to_q.weight"]["data_offsets"])
  cut = start + 24  # 6 of the tensor's 40 floats are left.
  with open(path, "r+b") as f:
    f.truncate(cut)
  with pytest.raises(WeightsError) as err:
    read_safetensors(str(path))
  assert str(err.value) == (f"{path}: tensor 'blocks.0.attn.to_q.weight' needs bytes {start}..{end} but the file "
                            f"has {cut} bytes (truncated?).")
  # Through a model directory too, as every loader reads.
  with pytest.raises(WeightsError, match="model.safetensors: tensor 'blocks.0.attn.to_q.weight' needs bytes"):
    read_state_dict(str(tmp_path))


def test_truncated_header_and_tiny_file(tmp_path):
  path = tmp_path / "model.safetensors"
  n, _ = _write(path)
  with open(path, "r+b") as f:
    f.truncate(8 + n // 2)
  with pytest.raises(WeightsError) as err:
    read_safetensors(str(path))
  assert str(err.value) == f"{path}: the header needs bytes 8..{8 + n} but the file has {8 + n // 2} bytes (truncated?)."
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(WeightsError, match=r"model.safetensors: 5 bytes, too short for a safetensors file"):
    read_safetensors(str(path))


def test_corrupt_header_is_named(tmp_path):
  path = tmp_path / "model.safetensors"
  n, header = _write(path)
  with open(path, "r+b") as f:  # Garbage where the JSON starts.
    f.seek(8)
    f.write(b"\xff\x00garbage")
  with pytest.raises(WeightsError, match=r"model.safetensors: the header is not valid JSON"):
    read_safetensors(str(path))
  # A header whose offsets do not match its shape (corrupt, not truncated).
  header["step"]["shape"] = [3]
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"\0" * 1000)
  with pytest.raises(WeightsError, match=r"tensor 'step' of shape \(3,\) and dtype I64 needs 24 bytes but its "
                                         r"data_offsets are \[\d+, \d+\] \(corrupt header\?\)"):
    read_safetensors(str(path))
  # Not a safetensors file at all (text): the "header length" is absurd.
  path.write_text("this is a text file, not weights\n")
  with pytest.raises(WeightsError, match="not plausible"):
    read_safetensors(str(path))


def test_check_tensors_names_every_mismatch():
  with pytest.raises(WeightsError) as err:
    check_tensors({"a": (2, 3), "b": (4,), "extra": (1,)}, {"a": (2, 3), "b": (5,), "c": (7,)}, "dir")
  assert str(err.value).splitlines() == ["dir does not match the model its config.json describes:",
                                         "  missing tensor c (expected shape (7,))",
                                         "  unexpected tensor extra of shape (1,)",
                                         "  tensor b has shape (4,), expected (5,)"]
  check_tensors({"a": (1,), "lm_head.weight": (3,)}, {"a": (1,)}, "dir", ignore=lambda k: k.startswith("lm_head."))
