"""Training input pipeline: source -> shard -> shuffle -> decode -> caption -> batch.

Built on grain's `MapDataset` so that the whole order is a pure function of
(seed, process_index, process_count, len(source)): the iterator state is only "how far
along the stream we are", which makes checkpointed resume exact.

    index stream   this host's shard p::P of range(N), reshuffled every epoch
                   (grain's index shuffle, or a numpy permutation for small shards)
    example        source[idx] + one caption drawn with rng([seed, idx, epoch, 7])
    iter           to_iter_dataset -> drop undecodable (counted) -> batch(B)
                   [-> mp_prefetch(num_workers)]
    host           uint8 -> float32 in [-1, 1]; tokenize_fn(captions)
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grain
import grain.multiprocessing
import numpy as np

from sanajax.data.buckets import BucketSchedule
from sanajax.data.captions import pick_caption
from sanajax.data.feature_cache import pad_rows
from sanajax.data.sources import UNDECODABLE
from sanajax.data.workers import exit_with_parent

log = logging.getLogger(__name__)

TokenizeFn = Callable[[Sequence[str]], tuple[Any, Any]]

# Salt mixed into per-example caption rngs so they never collide with other uses of
# np.random.default_rng([seed, index]) elsewhere in the data code.
_CAPTION_RNG_SALT = 7
_SHUFFLE_RNG_SALT = 11
_MAX_WARNINGS = 5
_MAX_STAND_INS = 100  # unusable images replaced in a row within one bucket before giving up


# grain's index_shuffle cycle-walks a >= 2^16 domain, so on small shards one lookup costs
# up to ~15 ms (n=4) — slower than decoding. Below this size an explicit per-epoch
# permutation (<= 512 KB) is used instead.
_SMALL_SHARD = 1 << 16


class SkipWarnings:
  """Names skipped images in warning lines: the first _MAX_WARNINGS of them, then only counts.

  One per reader of a source (the train iterator, a latent-cache build), so that a skipped image
  is reported alike whether or not the latents are cached.
  """

  def __init__(self):
    self.warned = 0

  def __call__(self, where: str, reason: str | None) -> None:
    """where: the image's path (or "index i"); reason: why it was skipped (default UNDECODABLE)."""
    if self.warned < _MAX_WARNINGS:
      self.warned += 1
      log.warning("skipping image %s: %s%s", where, reason or UNDECODABLE,
                  "; further ones are only counted" if self.warned == _MAX_WARNINGS else "")


class _EpochPermutation:
  """Maps stream position k -> source index, with a fresh permutation each epoch.

  Position k is example k % n of epoch k // n, where n is this process's shard length;
  the shard holds source indices process_index + j * process_count, j < n.
  """

  def __init__(self, n: int, seed: int, process_index: int, process_count: int):
    self.n, self.seed = n, seed
    self.process_index, self.process_count = process_index, process_count
    self._cache = (-1, None)  # (epoch, permutation); replaced whole, so thread-safe.

  def _perm(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._cache
    if cached_epoch != epoch:
      perm = np.random.default_rng([self.seed, epoch, _SHUFFLE_RNG_SALT]).permutation(self.n)
      self._cache = (epoch, perm)
    return perm

  def __call__(self, k: int, _) -> int:
    epoch, pos = divmod(int(k), self.n)
    return self.process_index + int(self._perm(epoch)[pos]) * self.process_count


def stream_indices(num_source: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """Infinite MapDataset: stream position k -> source index read by this process.

  Each epoch visits every index of this process's shard (process_index::process_count)
  once, in an order reshuffled every epoch; a pure function of the arguments.
  """
  shard = grain.MapDataset.range(num_source)[process_index::process_count]
  n = len(shard)
  if n == 0:
    raise ValueError(f"source has {num_source} examples, fewer than process_count="
                     f"{process_count}: process {process_index} would read nothing.")
  if n < _SMALL_SHARD:
    perm = _EpochPermutation(n, seed, process_index, process_count)
    return grain.MapDataset.range(n).repeat().map_with_index(perm)
  return shard.seed(seed).shuffle().repeat()


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1 maps {0..255} onto [-1, 1] exactly at both ends)."""
  return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


class _LoadExample:
  """Maps (stream position k, source index idx) -> example dict. Picklable for workers.

  The caption draw depends only on (seed, idx, epoch): identical whether the stream is
  read in one go or resumed from a checkpoint, and fresh for each epoch.
  """

  def __init__(self, source, seed: int, shard_len: int, threshold: float,
               temperature: float, field: str = "image"):
    self.source = source
    self.seed = int(seed)
    self.shard_len = int(shard_len)
    self.threshold = float(threshold)
    self.temperature = float(temperature)
    self.field = field

  def __call__(self, k: int, idx: int) -> dict[str, Any]:
    idx = int(idx)
    epoch = int(k) // self.shard_len
    ex = self.source[idx]
    # Inside the stream the array travels as "image" whatever it is (an image, or a latent of
    # a LatentSource); TrainIterator names it again.
    image = ex[self.field]
    captions = ex["captions"]
    caption = captions[0] if len(captions) == 1 else ""
    if image is not None and len(captions) > 1:
      # Seeding a Generator costs ~40 us, so only when there is a choice to make.
      rng = np.random.default_rng([self.seed, idx, epoch, _CAPTION_RNG_SALT])
      caption = pick_caption(captions, ex.get("scores"), rng, self.threshold,
                             self.temperature)
    out = {"image": image, "caption": caption, "where": ex.get("path", f"index {idx}"),
           "skip_reason": "" if image is not None else ex.get("skip_reason") or UNDECODABLE}
    if "features" in ex and image is not None:
      # A text-feature cache (sanajax.data.feature_cache): the chosen caption's encoder output travels
      # with it, (rows (n, D) as stored, mask (L,)), instead of being tokenized and encoded in the step;
      # _StackBatch pads the rows to (B, L, D) once per batch.
      out["context"], out["context_mask"] = ex["features"].rows(captions.index(caption))
    return out


def _kept(ex: dict[str, Any]) -> dict[str, Any]:
  """What of an example goes into a batch: the array, the caption, cached text features if any."""
  return {k: ex[k] for k in ("image", "caption", "context", "context_mask") if k in ex}


def _none_skipped(ex: dict[str, Any]) -> dict[str, Any]:
  """What of an example of a source that never skips (a feature cache) goes into a batch, `skipped` 0."""
  if ex["image"] is None:
    raise RuntimeError(f"{ex['where']}: {ex['skip_reason']} (a cache record always decodes; rebuild the cache)")
  return {**_kept(ex), "skipped": np.int32(0)}


class _StackBatch:
  """grain batch_fn for examples with cached text features: np.stack of each field, as grain's own, but
  "context" (each example's stored rows (n_b, D)) padded into (B, L, D) by its mask here (pad_rows): one
  zeroed array and one copy of the rows, not a padded (L, D) per example copied again by the stack.
  Writes into shared memory when mp_prefetch asks (grain's SupportsSharedMemoryOutput), as grain's own
  batch does, so the batch reaches the training process with no pickling. Picklable."""

  def __init__(self):
    self._shared = False

  def enable_shared_memory_output(self) -> None:
    self._shared = True

  def _empty(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    dtype = np.dtype(dtype)
    return grain.multiprocessing.SharedMemoryArray(shape, dtype) if self._shared and dtype.kind not in "OUS" else None

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in examples[0]:
      if key == "context":
        continue
      first = np.asarray(examples[0][key])
      out[key] = np.stack([ex[key] for ex in examples], out=self._empty((len(examples), *first.shape), first.dtype))
    if "context" in examples[0]:
      rows = [ex["context"] for ex in examples]
      masks = out["context_mask"]
      # grain's SharedMemoryArray is a new segment each time, which reads as zeros: the padding is not written.
      out["context"] = pad_rows(rows, masks, out=self._empty((*masks.shape, rows[0].shape[-1]), rows[0].dtype),
                                out_is_zero=self._shared)
    return out


class _LoadBucketed:
  """Stream position k -> an example of aspect-ratio bucket scheduling (sanajax.data.buckets.BucketSchedule).

  An unusable example (undecodable, too large) is not dropped, which would shift a batch into the next
  bucket: another example of the same bucket stands in for it (SANA does the same), named (SkipWarnings)
  and counted in `skipped`. Picklable for workers.
  """

  def __init__(self, load: _LoadExample, schedule):
    self.load, self.schedule = load, schedule
    self._warn = SkipWarnings()

  def __call__(self, k: int, _) -> dict[str, Any]:
    idx, bucket = self.schedule.lookup(k)
    skipped = 0
    while True:
      ex = self.load(k, idx)
      if ex["image"] is not None:
        return {**_kept(ex), "skipped": np.int32(skipped)}
      skipped += 1
      self._warn(ex["where"], ex["skip_reason"])
      if skipped > _MAX_STAND_INS:
        raise RuntimeError(f"{skipped} unusable images in a row in the bucket of {ex['where']}; check the data source.")
      idx = self.schedule.alternate(k, skipped, bucket)


class _DropUndecodable(grain.IterDataset):
  """Drops examples whose image is None, names them (SkipWarnings) and records how many were dropped.

  Each output example carries `skipped` = number of undecodable examples dropped just
  before it. The count travels with the data (not as a side effect in this process),
  so it stays exact with mp_prefetch workers and after batching.
  """

  def __init__(self, parent: grain.IterDataset, shard_len: int):
    super().__init__(parent)
    self._shard_len = shard_len

  def __iter__(self):
    return _DropUndecodableIterator(self._parent.__iter__(), self._shard_len)

  def __str__(self) -> str:
    return "DropUndecodable"


class _DropUndecodableIterator(grain.DatasetIterator):
  """Iterator of `_DropUndecodable`; holds no state beyond its parent's."""

  def __init__(self, parent: grain.DatasetIterator, shard_len: int):
    super().__init__(parent)
    self._shard_len = shard_len
    self._warn = SkipWarnings()

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      ex = next(self._parent)
      if ex["image"] is not None:
        return {**_kept(ex), "skipped": np.int32(skipped)}
      skipped += 1
      self._warn(ex["where"], ex["skip_reason"])
      # Generous on purpose: a legitimately bad-heavy folder must never stop a run, but
      # an all-bad source should fail instead of spinning forever.
      if skipped > 10 * self._shard_len + 1000:
        raise RuntimeError(f"{skipped} undecodable images in a row (this host's shard has "
                           f"{self._shard_len}); check the data source.")

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class TrainIterator:
  """Infinite iterator of training batches with exact, JSON-serialisable state.

  `next(it)` returns a dict of numpy arrays:
    image:          float32 (B, R, R, 3) in [-1, 1]; or, from a source of latents
                    (sanajax.data.latent_cache.LatentSource, `field` "latent"):
    latent:         float32 (B, h, w, c), the AE's raw latents;
    input_ids:      int32 (B, L);
    attention_mask: int32 (B, L).
  `it.skipped` counts images dropped so far, undecodable or too large (restored by `set_state`);
  `it.last_captions` holds the B caption strings of the latest batch (for logging).
  """

  def __init__(self, grain_iter: grain.DatasetIterator, tokenize_fn: TokenizeFn,
               meta: dict[str, Any], field: str = "image", skipped: int = 0):
    self._it = grain_iter
    self._tokenize = tokenize_fn
    self._meta = meta
    self._field = field
    # Starts at what the source itself dropped (a latent cache counts the images it could not
    # decode while it was built), so the logged count covers every image ever skipped.
    self.skipped = int(skipped)
    self.last_captions: list[str] = []

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = next(self._it)
    self.skipped += int(np.sum(b["skipped"]))
    captions = [str(c) for c in b["caption"]]
    self.last_captions = captions
    if self._field == "image":
      array = uint8_to_unit(b["image"])
    else:
      array = np.asarray(b["image"], np.float32)
    if "context" in b:  # cached text-encoder output: nothing to tokenize or encode.
      return {self._field: array, "context": np.asarray(b["context"]),  # bfloat16 (L, D) rows, as cached
              "attention_mask": np.asarray(b["context_mask"], dtype=np.int32)}
    ids, mask = self._tokenize(captions)
    return {self._field: array,
            "input_ids": np.asarray(ids, dtype=np.int32),
            "attention_mask": np.asarray(mask, dtype=np.int32)}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: save it beside the model checkpoint."""
    return {"grain": self._it.get_state(), "skipped": self.skipped,
            "meta": dict(self._meta)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes where `get_state` was taken; the next batches equal the original run's."""
    changed = {k: (v, self._meta.get(k)) for k, v in state.get("meta", {}).items()
               if self._meta.get(k) != v}
    if changed:
      # Not an error: resuming with e.g. another batch size is legitimate, but the
      # stream will no longer match the uninterrupted run.
      log.warning("data iterator state was saved with different settings "
                  "(saved, now): %s; resume will not reproduce the original order.",
                  changed)
    self._it.set_state(state["grain"])
    self.skipped = int(state.get("skipped", 0))

  def close(self) -> None:
    """Stops worker processes (mp_prefetch); safe to call more than once."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (profiling switches); outside an
  `app.run` program (tests, notebooks) nothing parsed them, so accept the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(trainer_pid: int, worker_index: int, worker_count: int) -> None:
  """grain's worker_init_fn (bound to the trainer's pid): the workers leave stop signals to the trainer and end
  with it.

  Ctrl-C in a terminal, and a preemption notice (SIGTERM from SLURM's --signal, a TPU VM's shutdown), reach every
  process of the job. The trainer answers them by finishing its step and saving (sanajax.training.interrupt), and
  grain stops the workers when it closes the iterator. Workers that died of the signal instead would print a
  traceback each, leave their shared memory behind, and fail a trainer that was waiting for their batch.
  A trainer that dies without closing (SIGKILL, the OOM killer, a second signal) cannot stop them: they exit by
  themselves (workers.exit_with_parent)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  exit_with_parent(trainer_pid)


def make_train_iterator(source, *, batch_size: int, seed: int, tokenize_fn: TokenizeFn,
                        caption_threshold: float = 25.0, caption_temperature: float = 0.1,
                        process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, read_threads: int = 4,
                        bucket_ids: np.ndarray | None = None) -> TrainIterator:
  """Builds the infinite, shuffled, sharded, resumable training iterator.

  Args:
    source: random-access source (see `sources.py`; or a `latent_cache.LatentSource`, whose
      items hold "latent" instead of "image"): len() and [i] -> {"image",
      "captions", "scores", ["path"]}.
    batch_size: B, examples per batch on this process (the per-host batch).
    seed: shuffle and caption seed; same seed -> same stream.
    tokenize_fn: list of B captions -> (ids (B, L), mask (B, L)); runs in this process.
    caption_threshold, caption_temperature: SANA's clip_thr / clip_thr_temperature.
    process_index, process_count: this host reads source indices
      process_index, process_index + process_count, ... (disjoint across hosts).
    num_workers: grain worker processes (0 decodes in this process). The stream is
      deterministic for a given num_workers but changes when it changes.
    read_threads: threads that read/decode examples ahead of use in each process
      (decoding in PIL and numpy releases the GIL for the heavy parts).
    bucket_ids: (N,) aspect-ratio bucket of each source example (sanajax.data.buckets.bucket_ids_of; -1:
      unusable) or None (one shape). With them every global batch (B x process_count) is one bucket
      on every host (buckets.BucketSchedule), and an unusable example is replaced by another of its
      bucket instead of dropped, so batches keep their shape.

  Returns:
    A `TrainIterator`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                     f"{process_count}.")
  n = len(source)
  field = getattr(source, "field", "image")
  # A modest prefetch buffer: at 1024 px an example is 3 MB, and grain's default (500)
  # would hold 1.5 GB per process.
  read = grain.ReadOptions(num_threads=read_threads,
                           prefetch_buffer_size=max(2 * batch_size, 16))
  # Cached text features come as stored rows, padded once per batch (None: grain's own np.stack).
  stack = _StackBatch() if getattr(source, "text_rows", False) else None
  if bucket_ids is not None:
    schedule = BucketSchedule(bucket_ids, batch_size, seed, process_index, process_count)
    load = _LoadExample(source, seed, schedule.examples_per_epoch, caption_threshold, caption_temperature, field)
    ds = grain.MapDataset.range(schedule.examples_per_epoch).repeat().map_with_index(_LoadBucketed(load, schedule))
    # Batched before the stream is read: mp_prefetch deals the elements of the stream out to its workers in
    # turn, so with 2+ workers a batch made after it would mix positions of different buckets (one bucket a
    # batch only holds for consecutive positions). An element is now a whole batch: a few in flight suffice.
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=stack)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads)))
  else:
    ds = stream_indices(n, seed, process_index, process_count)
    shard_len = len(range(process_index, n, process_count))
    load = _LoadExample(source, seed, shard_len, caption_threshold, caption_temperature, field)
    ds = ds.map_with_index(load)
    if stack is not None:
      # A feature cache: its records always decode (a damaged one raises), so nothing is dropped and the batch is
      # made before the stream is read, as with buckets: grain's per-element prefetch (futures, a thread hand-off,
      # ~0.07 ms) then runs once a batch, not once a sample (docs/data.md#throughput).
      ds = ds.map(_none_skipped).batch(batch_size, drop_remainder=True, batch_fn=stack)
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads)))
    else:
      it_ds = _DropUndecodable(ds.to_iter_dataset(read), shard_len)
      it_ds = it_ds.batch(batch_size, drop_remainder=True, batch_fn=stack)
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                              worker_init_fn=functools.partial(_init_worker, os.getpid()))
  meta = {"seed": int(seed), "batch_size": int(batch_size), "num_source": n,
          "process_index": int(process_index), "process_count": int(process_count),
          "num_workers": int(num_workers), "buckets": None if bucket_ids is None else len(schedule.counts)}
  # Images whose header could not be read have no bucket (-1): never scheduled, counted as skipped from the start.
  unbucketed = 0 if bucket_ids is None else int(np.sum(np.asarray(bucket_ids) < 0))
  return TrainIterator(iter(it_ds), tokenize_fn, meta, field, getattr(source, "skipped", 0) + unbucketed)
