"""Writes the on-disk latent and text-feature cache (the library behind `python -m sanajax.data.cache`).

Reads a source (any `config.data.source` form) with the config's aspect-ratio buckets, encodes each image
with the frozen AE (batches of one bucket: one compiled encode per bucket size) and each caption with the
text encoder, and writes ArrayRecord shards in sanajax.data.feature_cache's layout.

Resumable: a shard is written as `*.tmp` and renamed when whole, then its index JSON; a rerun with the
same --dst skips the shards that have an index. Sharded: shard s holds the source's s-th contiguous
slice; with several processes, process p writes shards p, p + P, ...; whichever finishes the last shard
marks the cache complete. A --dst made for another config is refused (naming the fields), never mixed.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from sanajax.data import feature_cache, records
from sanajax.data.buckets import table_from_config
from sanajax.data.pipeline import SkipWarnings, uint8_to_unit
from sanajax.data.sources import DEFAULT_MAX_IMAGE_MEGAPIXELS, UNDECODABLE, make_source
from sanajax.resolution import apply_resolution
from sanajax.training.dit import make_encode_fn
from sanajax.workdir.files import ae_workdir
from sanajax.workdir.loaders import build_text_encoder, load_ae

DEFAULT_SHARD_SIZE = 5000  # records per shard when --shards is not given (~0.7-7 GB at 1024 px: docs/data.md#cache)


def _default_shards(n: int, process_count: int) -> int:
  return max(process_count, math.ceil(n / DEFAULT_SHARD_SIZE))


def build_cache(config: ml_collections.ConfigDict, src: str, dst: str, *, workdir: str = "", shards: int = 0,
                batch_size: int = 16, process_index: int = 0, process_count: int = 1,
                log: Callable[[str], None] = print) -> dict:
  """Writes (or finishes) the cache of `src` for `config` into `dst`; returns its cache.json.

  Args:
    config: the training config (its ae, text, data.resolution, data.buckets, model.patch_size).
    src: a data source string (shapes, folder:DIR, arrayrecord:DIR, ...).
    workdir: where a relative config.text.pretrained and an empty config.ae.workdir (WORKDIR/ae) point.
    shards: shard count (0: one per DEFAULT_SHARD_SIZE source examples, at least one per process).
    batch_size: images per AE call and captions per text-encoder call (the last batch is padded).
  """
  config = apply_resolution(config)
  if not config.ae.get("workdir") and not workdir:
    raise ValueError("the cache needs the trained AE: set --config.ae.workdir (or --workdir, whose ae/ it is).")
  table = table_from_config(config)
  source = make_source(src, int(config.data.resolution), int(config.seed),
                       max_image_megapixels=config.data.get("max_image_megapixels", DEFAULT_MAX_IMAGE_MEGAPIXELS),
                       buckets=table)
  ae_model, ae_params, ae_scaling, _ = load_ae(ae_workdir(config, workdir))
  text = build_text_encoder(config, workdir or None)
  signature = feature_cache.cache_signature(config, ae_scaling, table)
  n = len(source)
  os.makedirs(dst, exist_ok=True)
  info = feature_cache.read_info(dst)
  if info is not None:
    diff = feature_cache.signature_mismatch(info["signature"], feature_cache._plain(signature))  # pylint: disable=protected-access
    if diff:
      raise ValueError(f"--dst={dst} holds a cache made for another config ({'; '.join(diff)}); use a new --dst.")
    if info["src"] != src or (shards and shards != info["shards"]):
      raise ValueError(f"--dst={dst} holds a cache of --src={info['src']} in {info['shards']} shards; finish it with "
                       f"those, or use a new --dst.")
    shards = info["shards"]
  shards = shards or _default_shards(n, process_count)
  info = {"format": feature_cache.FORMAT, "signature": signature, "src": src, "shards": shards,
          "num_source": n, "complete": False, "shards_done": _shards_done(dst, shards)}
  if process_index == 0:
    records.write_json_atomic(os.path.join(dst, feature_cache.INFO_FILE), info)
    null_context, null_mask = text.encode([""])
    np.savez(os.path.join(dst, feature_cache.NULL_TEXT_FILE), context=np.asarray(null_context[0], np.float32),
             mask=np.asarray(null_mask[0], np.int32))

  encode = make_encode_fn(ae_model, ae_params)
  start = time.perf_counter()
  slices = np.array_split(np.arange(n), shards)
  written = skipped = 0
  for s in range(process_index, shards, process_count):
    path = records.shard_path(dst, s, shards, feature_cache.PREFIX)
    if os.path.isfile(records.index_path(path)):
      continue  # finished by an earlier run
    count, bad = _write_shard(path, source, slices[s], encode, text, batch_size, process_index == 0)
    written, skipped = written + count, skipped + bad
  info["shards_done"] = _shards_done(dst, shards)
  info["complete"] = info["shards_done"] == shards
  if info["complete"]:  # idempotent: every process that sees the last shard done may write it.
    records.write_json_atomic(os.path.join(dst, feature_cache.INFO_FILE), info)
  log(f"Cache {dst}: {written} images written ({skipped} skipped) in {time.perf_counter() - start:.0f} s; "
      f"{info['shards_done']} of {shards} shards done" + ("" if info["complete"] else " (rerun to finish)") + ".")
  return info


def _shards_done(dst: str, shards: int) -> int:
  return sum(os.path.isfile(records.index_path(records.shard_path(dst, s, shards, feature_cache.PREFIX)))
             for s in range(shards))


def _write_shard(path: str, source, indices: np.ndarray, encode, text, batch_size: int, show: bool) -> tuple[int, int]:
  """Encodes source[indices] into one shard; returns (records written, images skipped)."""
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  buckets, keys, skipped = [], [], []
  warn = SkipWarnings()
  pending: dict[tuple, list[dict]] = {}  # image shape -> examples waiting for a full batch

  def flush(shape):
    group = pending.pop(shape, [])
    if not group:
      return
    images = [ex["image"] for ex in group]
    images += [images[0]] * (batch_size - len(images))  # one compiled encode per bucket size
    latents = np.asarray(encode(uint8_to_unit(np.stack(images))), np.float32)
    captions = [c for ex in group for c in ex["captions"]]
    contexts, masks = _encode_captions(text, captions, batch_size)
    at = 0
    for i, ex in enumerate(group):
      k = len(ex["captions"])
      writer.write(feature_cache.encode_record(latents[i], list(contexts[at:at + k]), list(masks[at:at + k]),
                                               ex["captions"], ex.get("scores") or [], ex["where"], ex["bucket"]))
      buckets.append(int(ex["bucket"]))
      keys.append(ex["where"])
      at += k

  with tqdm(total=len(indices), desc=os.path.basename(path), unit="image", disable=not show, mininterval=2.0,
            dynamic_ncols=True) as bar:
    for i in indices:
      ex = source[int(i)]
      where = str(ex.get("path", f"index {i}"))
      bar.update(1)
      if ex["image"] is None:
        skipped.append([where, ex.get("skip_reason") or UNDECODABLE])
        warn(*skipped[-1])
        continue
      image = ex["image"]
      bucket = _bucket_of(source, image)
      entry = {"image": image, "captions": list(ex["captions"]) or [""], "scores": list(ex.get("scores") or []),
               "where": where, "bucket": bucket}
      pending.setdefault(image.shape, []).append(entry)
      if len(pending[image.shape]) == batch_size:
        flush(image.shape)
    for shape in list(pending):
      flush(shape)
  writer.close()
  os.replace(tmp, path)
  records.write_json_atomic(records.index_path(path), {"num_records": len(buckets), "buckets": buckets,
                                                      "keys": keys, "skipped": skipped,
                                                      "source_range": [int(indices[0]), int(indices[-1]) + 1]
                                                      if len(indices) else [0, 0]})
  return len(buckets), len(skipped)


def _bucket_of(source, image: np.ndarray) -> int:
  """The bucket of a decoded image: its size's id (BucketTable.size_id; the source cropped it to that size)."""
  table = getattr(source, "buckets", None)
  return 0 if table is None else table.size_id(*image.shape[:2])


def _encode_captions(text, captions: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(contexts (N, L, D) float32, masks (N, L) int32) of N captions, in batches of batch_size (padded)."""
  contexts, masks = [], []
  for start in range(0, len(captions), batch_size):
    chunk = captions[start:start + batch_size]
    out, mask = text.encode(chunk + [""] * (batch_size - len(chunk)))  # one compiled shape
    contexts.append(np.asarray(out, np.float32)[:len(chunk)])
    masks.append(np.asarray(mask, np.int32)[:len(chunk)])
  return np.concatenate(contexts), np.concatenate(masks)
