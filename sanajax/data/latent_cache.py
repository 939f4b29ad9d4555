"""Latent cache: a source's images encoded once by the frozen AE, kept in host memory.

DiT training reads the same AE latents every epoch; encoding them once instead of in every
train step takes the AE forward out of the step (on the tiny default it was ~1/3 of the step's
time: 0.11 s of AE encode next to 0.24 s of DiT forward + backward at batch 32 on 2 CPU cores).
The cache holds nothing that cannot be rebuilt: it is rebuilt from the source and the AE
checkpoint at every (re)start, deterministically, so a resumed run reads the same latents and,
through the pipeline's saved position, the same batches.

    cache = build_latent_cache(source, encode_fn, num_examples=20_000)
    it = make_train_iterator(cache, batch_size=32, seed=0, tokenize_fn=...)  # batches hold "latent"

Memory: num_examples x h x w x c float32 (the tiny default: 20,000 x 8 x 8 x 8 = 41 MB;
Sana at 1024 px, 32 x 32 x 32 latents: 128 KB an image).

With aspect-ratio buckets (`bucket_ids`, config.data.buckets) each image is encoded at its bucket's size (the
source gives it so), in batches of one bucket, and the cache keeps each example's bucket (`bucket_ids()`), so the
pipeline's BucketSchedule still makes every batch one bucket. All hosts then cache the same first `num_examples`
images (a global batch is one bucket on every host, so each host's schedule needs every example's bucket).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from sanajax.data.pipeline import SkipWarnings, uint8_to_unit
from sanajax.data.sources import UNDECODABLE


class LatentSource:
  """Random-access source of cached latents (the pipeline's source protocol, field "latent").

  Items: {"latent": float32 (h, w, c) raw AE latent, "captions": list[str], "scores": list[float],
  "path": where the image came from}. `skipped` counts the source's images that could not be
  used (undecodable, too large) while the cache was built (the train iterator starts its count
  there); `skipped_images` lists them as (path, reason).
  """
  field = "latent"

  def __init__(self, latents: np.ndarray | list[np.ndarray], captions: list[list[str]], scores: list[list[float]],
               where: list[str], skipped: int = 0, skipped_images: list[tuple[str, str]] | None = None,
               buckets: np.ndarray | None = None):
    """latents: (N, h, w, c), or with `buckets` ((N,) int bucket of each example) a list of N arrays, each
    (h_i, w_i, c) at its bucket's size."""
    if not len(latents) == len(captions) == len(scores) == len(where):
      raise ValueError("LatentSource: latents, captions, scores and where must have one entry per example.")
    if len(latents) == 0:
      raise ValueError("LatentSource: no examples (every image of the source failed to decode?).")
    if buckets is not None and len(buckets) != len(latents):
      raise ValueError("LatentSource: buckets must have one entry per example.")
    self.latents = latents
    self.captions = captions
    self.scores = scores
    self.where = where
    self.skipped = int(skipped)
    self.skipped_images = list(skipped_images or [])
    self._buckets = None if buckets is None else np.asarray(buckets, np.int32)
    self.nbytes = sum(x.nbytes for x in latents) if isinstance(latents, list) else latents.nbytes

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"latent": self.latents[i], "captions": self.captions[i], "scores": self.scores[i],
            "path": self.where[i]}

  def bucket_ids(self, table=None) -> np.ndarray:
    """(N,) int32 bucket of each cached example (buckets.bucket_ids_of reads it); only for a bucketed cache."""
    del table  # the buckets the images were encoded at
    if self._buckets is None:
      raise ValueError("LatentSource: built without bucket_ids (square crops); it has no buckets.")
    return self._buckets.copy()


def build_latent_cache(source, encode_fn: Callable[[np.ndarray], Any], num_examples: int, *,
                       batch_size: int = 256, process_index: int = 0, process_count: int = 1,
                       log: Callable[[str], None] = print, bucket_ids: np.ndarray | None = None) -> LatentSource:
  """Encodes this process's share of the first `num_examples` items of `source`.

  Args:
    source: a pipeline source (sanajax.data.sources): [i] -> {"image": uint8 (R, R, 3) or None, ...}.
    encode_fn: float32 images (B, R, R, 3) in [-1, 1] -> raw latents (B, h, w, c) (a jitted
      AE encode), always called with B = batch_size (the last batch is padded).
    num_examples: how many source items to cache over all processes (capped at len(source)).
    process_index, process_count: this process reads items process_index::process_count, so the
      hosts of a multi-host run cache disjoint shares.
    log: receives one line when the cache is done.
    bucket_ids: (len(source),) aspect-ratio bucket of each source item (buckets.bucket_ids_of; -1: no bucket,
      skipped) when the source gives each image at its bucket's size (config.data.buckets), else None. Each
      batch given to encode_fn is then one bucket (one compiled encode per bucket size), and the cache keeps
      the buckets (LatentSource.bucket_ids) for the train iterator's BucketSchedule.

  Images the source cannot give (undecodable, too large) are never cached: named in warnings as the
  train iterator names them (pipeline.SkipWarnings), counted (LatentSource.skipped, which the
  iterator's `skipped` and so the `skipped_images` metric start from) and listed
  (LatentSource.skipped_images). Process 0 shows a progress bar of the images read and encoded.
  """
  if num_examples < 1:
    raise ValueError(f"latent cache size must be >= 1, got {num_examples}.")
  start = time.perf_counter()
  indices = range(process_index, min(int(num_examples), len(source)), process_count)
  latents: list[np.ndarray | None] = []  # per cached example, in source order
  captions, scores, where, buckets = [], [], [], []
  pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # bucket (-1 unbucketed) -> [(example, image)]
  skipped: list[tuple[str, str]] = []
  warn = SkipWarnings()
  bar = tqdm(total=len(indices), desc="latent cache", unit="image", dynamic_ncols=True,
             disable=process_index != 0, mininterval=2.0)

  def flush(bucket: int):
    batch = pending.pop(bucket, [])
    if batch:
      images = [image for _, image in batch]
      # The last batch is padded to full size: one compiled encode serves every batch (of a bucket).
      images.extend([images[0]] * (batch_size - len(batch)))
      encoded = np.asarray(encode_fn(uint8_to_unit(np.stack(images))), np.float32)
      for row, (j, _) in enumerate(batch):
        latents[j] = encoded[row]
    # Counts the images read (encoded or skipped), so the bar ends at its total.
    bar.update(len(where) + len(skipped) - bar.n)

  with bar:
    for i in indices:
      ex = source[i]
      bucket = -1 if bucket_ids is None else int(bucket_ids[i])
      if ex["image"] is None or (bucket_ids is not None and bucket < 0):
        skipped.append((str(ex.get("path", f"index {i}")), ex.get("skip_reason") or UNDECODABLE))
        warn(*skipped[-1])
        continue
      pending.setdefault(bucket, []).append((len(latents), ex["image"]))
      latents.append(None)
      captions.append(list(ex["captions"]))
      scores.append(list(ex.get("scores") or []))
      where.append(str(ex.get("path", f"index {i}")))
      buckets.append(bucket)
      if len(pending[bucket]) == batch_size:
        flush(bucket)
    for bucket in list(pending):
      flush(bucket)
  if bucket_ids is None:  # one size: one array (N, h, w, c)
    cache = LatentSource(np.stack(latents) if latents else np.zeros((0,)), captions, scores, where, len(skipped),
                         skipped)
  else:
    cache = LatentSource(latents, captions, scores, where, len(skipped), skipped, buckets=np.asarray(buckets))
  named = (": " + ", ".join(path for path, _ in skipped[:3]) + (", ..." if len(skipped) > 3 else "")) if skipped else ""
  in_buckets = f" at {len(set(buckets))} bucket sizes" if bucket_ids is not None else ""
  log(f"Latent cache: {len(cache)} images encoded{in_buckets} in {time.perf_counter() - start:.0f} s "
      f"({cache.nbytes / 2**20:.0f} MiB; {len(skipped)} skipped{named}).")
  return cache
