"""The on-disk latent and text-feature cache (`config.data.source = "cache:DIR"`), as SANA's
`load_vae_feat` / `load_text_feat`: a source's images encoded once by the frozen AE (per aspect-ratio
bucket) and its captions once by the text encoder, so training runs neither.

    python -m sanajax.data.cache --config=configs/sana_1600m.py --src=arrayrecord:/data/shards --dst=/data/cache
    python -m sanajax.train --config=configs/sana_1600m.py --config.data.source=cache:/data/cache ...

Written by sanajax.training.cache_build (it needs the models); this module only reads it. Layout:

    DIR/cache.json                         format, what the cache was made with (`signature`: the AE config
                                           and its latent scaling, the text encoder config incl. the CHI
                                           prompt, the resolution, the bucket table), shard count, complete
    DIR/null_text.npz                      the empty caption's features (context (L, D), mask (L,)): what
                                           caption dropout swaps in
    DIR/cache-00000-of-00004.array_record  the records (sanajax.data.records envelope, `pack` / `unpack`)
    DIR/cache-00000-of-00004.json          its index: num_records, bucket of each record, skipped images;
                                           written last, so its presence means the shard is finished

A record: header {"captions", "scores", "key", "bucket", "latent": [h, w, c], "length": L, "dim": D,
"rows": [n_0, n_1, ...]} and blobs [raw AE latent float32 (h, w, c), then per caption: its mask (L,) uint8
and the encoder's output at the mask's n_j positions, (n_j, D) bfloat16]. The masked positions are not
stored (the DiT's cross-attention gives them zero weight; they come back as zeros), so a short caption
costs n_j x D x 2 bytes, not L x D x 2 (docs/data.md#cache).
"""
from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import ml_dtypes
import numpy as np
from array_record.python import array_record_data_source

from sanajax.data import records
from sanajax.data.buckets import BucketTable

FORMAT = 1
INFO_FILE = "cache.json"
NULL_TEXT_FILE = "null_text.npz"
PREFIX = "cache"  # shard files: cache-00000-of-00004.array_record
SOURCE_PREFIX = "cache:"
BF16 = np.dtype(ml_dtypes.bfloat16)
# config.ae fields that do not change the latents (where the AE lives; the config's scaling factor, which
# the AE workdir's ae_info.json overrides and the signature records as `ae_scaling` instead).
_AE_IGNORED = ("workdir", "scaling_factor")


class CacheMismatchError(ValueError):
  """A cache made with another AE, text encoder, CHI prompt, resolution or bucket table than the config's."""


def _plain(value: Any) -> Any:
  """JSON round trip: tuples -> lists, ConfigDicts -> dicts, so signatures compare as they are stored."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_signature(config, ae_scaling: float, table: BucketTable | None) -> dict[str, Any]:
  """What a cache must have been made with to train `config`: the AE (config.ae without its workdir) and
  its latent scaling, the text encoder (config.text, CHI prompt included; a relative `pretrained` made
  absolute), data.resolution and the bucket table (None: square crops)."""
  ae = {k: v for k, v in _plain(config.ae).items() if k not in _AE_IGNORED}
  text = _plain(config.text)
  if text.get("pretrained"):
    text["pretrained"] = os.path.abspath(os.path.expanduser(text["pretrained"]))
  return {"ae": ae, "ae_scaling": float(ae_scaling), "text": text, "resolution": int(config.data.resolution),
          "buckets": None if table is None else _plain(table.to_json())}


def signature_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """'field: cache X, config Y' for each field that differs (dict sections compared field by field)."""
  out = []
  for name in sorted(set(saved) | set(wanted)):
    a, b = saved.get(name), wanted.get(name)
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict) and name != "buckets":
      for field in sorted(set(a) | set(b)):
        if a.get(field) != b.get(field):
          out.append(f"{name}.{field}: cache {_short(a.get(field))}, config {_short(b.get(field))}")
    else:
      out.append(f"{name}: cache {_short(a)}, config {_short(b)}")
  return out


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def cache_path(source: str) -> str | None:
  """DIR of a "cache:DIR" data source, else None."""
  if isinstance(source, str) and source.startswith(SOURCE_PREFIX):
    return source[len(SOURCE_PREFIX):]
  return None


def read_info(directory: str) -> dict[str, Any] | None:
  """DIR/cache.json, or None when there is none."""
  return records.read_manifest(directory, INFO_FILE)


# ---------------------------------------------------------------------------------------
# Records.


def encode_record(latent: np.ndarray, contexts: list[np.ndarray], masks: list[np.ndarray], captions: list[str],
                  scores: list[float], key: str, bucket: int) -> bytes:
  """One example: raw latent (h, w, c) float32; per caption its encoder output (L, D) and mask (L,)."""
  latent = np.ascontiguousarray(latent, np.float32)
  length, dim = contexts[0].shape
  blobs, rows = [latent.tobytes()], []
  for context, mask in zip(contexts, masks):
    keep = np.asarray(mask) != 0
    blobs += [keep.astype(np.uint8).tobytes(), np.ascontiguousarray(np.asarray(context)[keep], BF16).tobytes()]
    rows.append(int(keep.sum()))
  header = {"captions": [str(c) for c in captions], "scores": [float(s) for s in scores], "key": str(key),
            "bucket": int(bucket), "latent": list(latent.shape), "length": int(length), "dim": int(dim), "rows": rows}
  return records.pack(header, blobs)


class _Features:
  """The text features of a record's captions, read with no copy from the record's bytes.

  features(j) -> (context (L, D) bfloat16 as stored, zeros at the masked positions; mask (L,) int32) of
  caption j. features.rows(j) -> (rows (n_j, D) bfloat16, a read-only view into the record; mask (L,)
  int32): what the training pipeline takes, padding to (B, L, D) once per batch (`pad_rows`) instead of
  once per example and again when stacking. Kept bf16 up to the device (half the host memory and transfer
  of float32); the step computes in float32.
  """

  def __init__(self, header: dict[str, Any], blobs: list[memoryview]):
    self.header, self.blobs = header, blobs

  def rows(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.frombuffer(self.blobs[1 + 2 * j], np.uint8).astype(np.int32)
    return np.frombuffer(self.blobs[2 + 2 * j], BF16).reshape(-1, self.header["dim"]), mask

  def __call__(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    rows, mask = self.rows(j)
    return pad_rows([rows], mask[None])[0], mask


def pad_rows(rows: list[np.ndarray], masks: np.ndarray, out: np.ndarray | None = None,
             out_is_zero: bool = False) -> np.ndarray:
  """Stored feature rows -> (B, L, D) bfloat16 contexts: rows[b] (n_b, D) at the positions where masks[b]
  (B, L) is non-zero, zeros elsewhere. A right-padded mask (the usual one) is one contiguous copy.
  out: an (B, L, D) array to fill (e.g. in shared memory), else a new one; out_is_zero: it reads as zeros
  already (a new shared-memory segment), so the padding is not written."""
  masks = np.asarray(masks)
  # np.zeros maps zero pages lazily: the padding costs nothing here (a 300-row context of a 100-token
  # prompt is two thirds padding); writing zeros into it would touch every page.
  zeroed = out is None or out_is_zero
  if out is None:
    out = np.zeros((*masks.shape, rows[0].shape[-1]), BF16)
  for b, (r, m) in enumerate(zip(rows, masks)):
    n = len(r)
    if n and m[:n].all():  # the kept positions are the first n: a slice, not a gather
      out[b, :n] = r
      if not zeroed:
        out[b, n:] = 0
    else:
      if not zeroed:
        out[b] = 0
      out[b, np.flatnonzero(m)] = r
  return out


def decode_record(record: bytes) -> dict[str, Any]:
  """A record as a source item: latent, captions, scores, path, bucket and `features` (_Features).
  The latent and the features are read-only views into `record` (no copy)."""
  header, blobs = records.unpack(record, views=True)
  latent = np.frombuffer(blobs[0], np.float32).reshape(header["latent"])
  return {"latent": latent, "captions": header["captions"] or [""], "scores": header["scores"],
          "path": header["key"], "bucket": header["bucket"], "features": _Features(header, blobs)}


# ---------------------------------------------------------------------------------------
# Reading.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_kept = False  # per process: a grain worker started by fork inherits both the flag and the setting


def keep_freed_memory() -> None:
  """Lets this process keep the memory it frees (blocks up to 32 MiB, up to 256 MiB of it), once per process.

  Each record read allocates its 0.6-1.5 MB (the ArrayRecord reader's buffers and the returned bytes) and frees it a
  batch later. With glibc's defaults a block that large goes back to the OS when freed (an mmap unmapped, or the heap
  top trimmed), so the next read gets fresh pages and faults every 4 KiB of them in: measured, a 300-row record's read
  took 1.6 ms of CPU that way and 1.0 ms with the memory kept (docs/data.md#throughput). The same as
  MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 in the environment; a no-op without glibc.
  """
  global _malloc_kept
  _malloc_kept = True
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # 32 MiB: glibc's upper bound for it on 64-bit
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator's own behaviour stands
    pass


class CacheSource:
  """Random-access source over a finished cache (the pipeline's protocol, field "latent").

  Items: {"latent": float32 (h, w, c) raw AE latent, "captions", "scores", "path", "bucket", "features":
  j -> (context (L, D) bfloat16, mask (L,) int32) of caption j}. `bucket_ids(table)` reads the shard
  indexes (no record is opened); `skipped` counts the images the build could not use. `null_text` is
  the empty caption's (context (L, D), mask (L,)).

  Args:
    directory: the cache DIR.
    signature: cache_signature of the run's config; a cache made otherwise is refused, naming each
      field that differs (None: no check, e.g. for inspection).
  """
  field = "latent"
  text_rows = True  # items' features.rows(j) give the stored rows: the pipeline pads them per batch

  def __init__(self, directory: str, signature: dict[str, Any] | None = None):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    info = read_info(self.directory)
    if info is None:
      raise FileNotFoundError(f"cache:{directory}: no {INFO_FILE} there; write the cache with "
                              f"python -m sanajax.data.cache --config=... --src=SOURCE --dst={directory}")
    if info.get("format") != FORMAT:
      raise ValueError(f"cache:{directory} has format {info.get('format')}, this sanajax reads {FORMAT}; rebuild it.")
    if not info.get("complete"):
      raise ValueError(f"cache:{directory} is not finished ({info.get('shards_done', '?')} of {info.get('shards')} "
                       f"shards); rerun python -m sanajax.data.cache with the same --dst to finish it (it resumes).")
    if signature is not None:
      diff = signature_mismatch(info["signature"], _plain(signature))
      if diff:  # the trainer raises it as a ConfigError: one line, exit 2.
        raise CacheMismatchError(f"data.source='cache:{directory}': made for another config ({'; '.join(diff)}); "
                                 f"rebuild it for this config with python -m sanajax.data.cache, or train the config "
                                 f"it was made for")
    self.info = info
    self.shards = records.list_shards(self.directory, PREFIX)
    indexes = [records.read_index(s) for s in self.shards]
    self._buckets = np.concatenate([np.asarray(ix["buckets"], np.int32) for ix in indexes])
    self.skipped_images = [tuple(x) for ix in indexes for x in ix.get("skipped", [])]
    self.skipped = len(self.skipped_images)
    # array_record's random-access source (what grain's ArrayRecordDataSource wraps; grain would pull in JAX).
    self._data = array_record_data_source.ArrayRecordDataSource(self.shards)
    if len(self._data) != len(self._buckets):
      raise ValueError(f"cache:{directory}: the shards hold {len(self._data)} records, their indexes "
                       f"{len(self._buckets)}; rebuild the cache.")
    with np.load(os.path.join(self.directory, NULL_TEXT_FILE)) as z:
      self.null_text = (z["context"].astype(np.float32), z["mask"].astype(np.int32))

  def __len__(self) -> int:
    return len(self._buckets)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not _malloc_kept:  # here, not at open: in each process that reads (grain workers started by spawn too)
      keep_freed_memory()
    return decode_record(self._data[int(i)])

  def bucket_ids(self, table: BucketTable | None = None) -> np.ndarray:
    """(N,) int32 bucket of each record, as stored (the signature check made the tables equal)."""
    del table
    return self._buckets.copy()

  def __repr__(self) -> str:
    return f"CacheSource({self.directory!r}, n={len(self)})"
