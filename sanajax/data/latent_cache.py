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

  def __init__(self, latents: np.ndarray, captions: list[list[str]], scores: list[list[float]],
               where: list[str], skipped: int = 0, skipped_images: list[tuple[str, str]] | None = None):
    if not len(latents) == len(captions) == len(scores) == len(where):
      raise ValueError("LatentSource: latents, captions, scores and where must have one entry per example.")
    if len(latents) == 0:
      raise ValueError("LatentSource: no examples (every image of the source failed to decode?).")
    self.latents = latents
    self.captions = captions
    self.scores = scores
    self.where = where
    self.skipped = int(skipped)
    self.skipped_images = list(skipped_images or [])

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"latent": self.latents[i], "captions": self.captions[i], "scores": self.scores[i],
            "path": self.where[i]}


def build_latent_cache(source, encode_fn: Callable[[np.ndarray], Any], num_examples: int, *,
                       batch_size: int = 256, process_index: int = 0, process_count: int = 1,
                       log: Callable[[str], None] = print) -> LatentSource:
  """Encodes this process's share of the first `num_examples` items of `source`.

  Args:
    source: a pipeline source (sanajax.data.sources): [i] -> {"image": uint8 (R, R, 3) or None, ...}.
    encode_fn: float32 images (B, R, R, 3) in [-1, 1] -> raw latents (B, h, w, c) (a jitted
      AE encode), always called with B = batch_size (the last batch is padded).
    num_examples: how many source items to cache over all processes (capped at len(source)).
    process_index, process_count: this process reads items process_index::process_count, so the
      hosts of a multi-host run cache disjoint shares.
    log: receives one line when the cache is done.

  Images the source cannot give (undecodable, too large) are never cached: named in warnings as the
  train iterator names them (pipeline.SkipWarnings), counted (LatentSource.skipped, which the
  iterator's `skipped` and so the `skipped_images` metric start from) and listed
  (LatentSource.skipped_images). Process 0 shows a progress bar of the images read and encoded.
  """
  if num_examples < 1:
    raise ValueError(f"latent cache size must be >= 1, got {num_examples}.")
  start = time.perf_counter()
  indices = range(process_index, min(int(num_examples), len(source)), process_count)
  latents, captions, scores, where = [], [], [], []
  pending: list[np.ndarray] = []
  skipped: list[tuple[str, str]] = []
  warn = SkipWarnings()
  bar = tqdm(total=len(indices), desc="latent cache", unit="image", dynamic_ncols=True,
             disable=process_index != 0, mininterval=2.0)

  def flush():
    if pending:
      n = len(pending)
      # The last batch is padded to full size: one compiled encode serves every batch.
      pending.extend([pending[0]] * (batch_size - n))
      latents.append(np.asarray(encode_fn(uint8_to_unit(np.stack(pending))), np.float32)[:n])
      pending.clear()
    # Counts the images read (encoded or skipped), so the bar ends at its total.
    bar.update(len(where) + len(skipped) - bar.n)

  with bar:
    for i in indices:
      ex = source[i]
      if ex["image"] is None:
        skipped.append((str(ex.get("path", f"index {i}")), ex.get("skip_reason") or UNDECODABLE))
        warn(*skipped[-1])
        continue
      pending.append(ex["image"])
      captions.append(list(ex["captions"]))
      scores.append(list(ex.get("scores") or []))
      where.append(str(ex.get("path", f"index {i}")))
      if len(pending) == batch_size:
        flush()
    flush()
  cache = LatentSource(np.concatenate(latents) if latents else np.zeros((0,)), captions, scores, where,
                       len(skipped), skipped)
  named = (": " + ", ".join(path for path, _ in skipped[:3]) + (", ..." if len(skipped) > 3 else "")) if skipped else ""
  log(f"Latent cache: {len(cache)} images encoded in {time.perf_counter() - start:.0f} s "
      f"({cache.latents.nbytes / 2**20:.0f} MiB; {len(skipped)} skipped{named}).")
  return cache
