"""Aspect-ratio buckets (SANA's multi-scale training): each image goes to the nearest of a fixed set of
(height, width) sizes of about the training resolution's area, and every global batch holds one bucket.

    table = bucket_table("sana", resolution=1024, multiple=32)    # config.data.buckets = "sana"
    k = table.assign(height=768, width=1365)                        # nearest ratio h / w, as SANA
    table.sizes[k]                                                  # (768, 1344): the bucket, in pixels
    fit_to_bucket(pil_image, *table.sizes[k])                       # cover-resize + centre crop

Tables: at 512 / 1024 / 2048 / 4096 px, SANA's ASPECT_RATIO_512 / 1024 / 2048 / 4096 (NVlabs/Sana
diffusion/data/datasets/utils.py; key = height / width rounded to 2 digits, value = [height, width]).
At any other resolution R (the 32 / 64 px shapes runs), the same 40 ratios with the 1024 table's sizes
scaled by R / 1024 (so the area scales to ~R^2), each side rounded to the model's multiple (AE
downsampling x patch size) and at least one multiple. At R = 512 with a multiple of 32 that
reproduces SANA's 512 table exactly.

Global batches: `BucketSchedule` lays every epoch out as whole global batches, each from one bucket,
as a pure function of (seed, epoch, bucket of each example), so every host computes the same schedule
and takes its own slice of each global batch: the sharded step sees one shape per step.

Compiled shapes: one train-step program per bucket that forms at least one global batch
(`BucketSchedule.shapes_in_use`), at most the table's distinct sizes (40 at SANA's resolutions, fewer
after rounding at small ones); each compiles the first time its bucket comes up, and the trainer
prints the list at start. Buckets with fewer examples than one global batch never form a batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sanajax.resolution import ae_downsample

# SANA's ASPECT_RATIO_512 (NVlabs/Sana diffusion/data/datasets/utils.py, read through its fork
# a5wu/Sana at commit 965ab13), key: [height, width] in pixels. SANA's ASPECT_RATIO_1024 / 2048 /
# 4096 are this table x 2 / 4 / 8, entry for entry (checked row by row against the same file), so
# they are derived below rather than copied three more times.
_SANA_512 = (
    ("0.25", 256, 1024), ("0.26", 256, 992), ("0.27", 256, 960), ("0.28", 256, 928),
    ("0.32", 288, 896), ("0.33", 288, 864), ("0.35", 288, 832), ("0.4", 320, 800),
    ("0.42", 320, 768), ("0.48", 352, 736), ("0.5", 352, 704), ("0.52", 352, 672),
    ("0.57", 384, 672), ("0.6", 384, 640), ("0.68", 416, 608), ("0.72", 416, 576),
    ("0.78", 448, 576), ("0.82", 448, 544), ("0.88", 480, 544), ("0.94", 480, 512),
    ("1.0", 512, 512), ("1.07", 512, 480), ("1.13", 544, 480), ("1.21", 544, 448),
    ("1.29", 576, 448), ("1.38", 576, 416), ("1.46", 608, 416), ("1.67", 640, 384),
    ("1.75", 672, 384), ("2.0", 704, 352), ("2.09", 736, 352), ("2.4", 768, 320),
    ("2.5", 800, 320), ("2.89", 832, 288), ("3.0", 864, 288), ("3.11", 896, 288),
    ("3.62", 928, 256), ("3.75", 960, 256), ("3.88", 992, 256), ("4.0", 1024, 256),
)
# SANA's tables by resolution: {R: {key: (height, width)}}.
SANA_ASPECT_RATIOS = {res: {k: (h * res // 512, w * res // 512) for k, h, w in _SANA_512}
                      for res in (512, 1024, 2048, 4096)}
BUCKET_KINDS = ("", "sana")  # config.data.buckets: "" square crops, "sana" SANA's ratios.
_SHUFFLE_SALT = 13  # keeps these draws apart from the pipeline's other seeded rngs.
_ALTERNATE_SALT = 17


class BucketTable:
  """An ordered set of buckets: `keys[k]` (SANA's ratio string), `sizes[k]` = (height, width) px.

  Several keys may share a size after rounding at small resolutions; they are still separate keys
  (assignment is by ratio, as SANA's), and `shapes` lists the distinct sizes.
  """

  def __init__(self, name: str, resolution: int, multiple: int, entries: Sequence[tuple[str, int, int]]):
    self.name, self.resolution, self.multiple = name, int(resolution), int(multiple)
    self.keys = tuple(k for k, _, _ in entries)
    self.sizes = tuple((int(h), int(w)) for _, h, w in entries)
    self._ratios = np.asarray([float(k) for k in self.keys], np.float64)

  def __len__(self) -> int:
    return len(self.keys)

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """Distinct (height, width) sizes, in table order."""
    return list(dict.fromkeys(self.sizes))

  def assign(self, height: float, width: float) -> int:
    """Index of the bucket whose ratio key is nearest to height / width; the first on a tie (SANA's
    get_closest_ratio: min(keys, key=|float(key) - h / w|))."""
    return int(np.argmin(np.abs(self._ratios - float(height) / float(width))))

  def size_id(self, height: int, width: int) -> int:
    """The id of a bucket size: the index of the first key with that (height, width). Keys that round to
    one size share it, so their images batch together (one compiled shape)."""
    return self.sizes.index((int(height), int(width)))

  def assign_many(self, sizes: np.ndarray) -> np.ndarray:
    """(N, 2) (height, width) px, a row with a non-positive entry unknown -> (N,) int32 size id of each
    image's bucket (`assign`, then `size_id`); -1 where unknown. What BucketSchedule groups by."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    ok = (sizes > 0).all(axis=1)
    ratio = np.where(ok, sizes[:, 0] / np.where(ok, sizes[:, 1], 1.0), 1.0)
    key = np.argmin(np.abs(self._ratios[None, :] - ratio[:, None]), axis=1)
    canonical = np.asarray([self.size_id(*s) for s in self.sizes], np.int32)
    return np.where(ok, canonical[key], -1).astype(np.int32)

  def square(self) -> int:
    """Index of the square bucket (key "1.0"): where square sources (shapes) go."""
    return self.size_id(*self.sizes[self.keys.index("1.0")])

  def nearest_sizes(self, height: int, width: int, count: int = 3) -> list[tuple[int, int]]:
    """The `count` distinct bucket sizes nearest to (height, width) by ratio, then by area."""
    ratio, area = height / width, height * width
    ranked = sorted(self.shapes, key=lambda s: (abs(math.log(s[0] / s[1] / ratio)), abs(s[0] * s[1] - area)))
    return ranked[:count]

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "resolution": self.resolution, "multiple": self.multiple,
            "buckets": [[k, h, w] for k, (h, w) in zip(self.keys, self.sizes)]}

  def __repr__(self) -> str:
    return f"BucketTable({self.name!r}, resolution={self.resolution}, {len(self.shapes)} sizes)"


def _round_to(x: float, multiple: int) -> int:
  return max(multiple, round(x / multiple) * multiple)


def bucket_table(name: str, resolution: int, multiple: int) -> BucketTable | None:
  """The bucket table of `config.data.buckets` (None for "": square crops).

  resolution: R in pixels; multiple: sizes must be multiples of this (AE downsampling x patch size).
  SANA's own table at R in (512, 1024, 2048, 4096) when its sizes are multiples of `multiple`; else its
  1024 table scaled by R / 1024 and rounded to `multiple` (module docstring).
  """
  if name == "":
    return None
  if name != "sana":
    raise ValueError(f"config.data.buckets={name!r}: must be one of {', '.join(map(repr, BUCKET_KINDS))}.")
  resolution, multiple = int(resolution), int(multiple)
  sana = SANA_ASPECT_RATIOS.get(resolution)
  if sana is not None and all(h % multiple == 0 and w % multiple == 0 for h, w in sana.values()):
    return BucketTable(name, resolution, multiple, [(k, h, w) for k, (h, w) in sana.items()])
  scale = resolution / 1024
  entries = [(k, _round_to(h * scale, multiple), _round_to(w * scale, multiple))
             for k, (h, w) in SANA_ASPECT_RATIOS[1024].items()]
  return BucketTable(name, resolution, multiple, entries)


def model_multiple(config) -> int:
  """What every image side must be a multiple of for a config's model: AE downsampling x patch size."""
  return ae_downsample(config) * int(config.model.get("patch_size", 1))


def table_from_config(config) -> BucketTable | None:
  """The bucket table of `config.data.buckets` (absent or "": None, square crops) at data.resolution."""
  return bucket_table(config.data.get("buckets", ""), int(config.data.resolution), model_multiple(config))


def fit_to_bucket(img: Image.Image, height: int, width: int) -> Image.Image:
  """Resizes `img` to cover (height, width) and centre-crops to it (SANA's Resize + CenterCrop).

  One bicubic resize of the central region with the bucket's aspect ratio (`box=`), the same as
  resize-then-crop without resampling the pixels the crop throws away.

  Returns:
    RGB image of size (width, height).
  """
  w, h = img.size
  if (w, h) == (width, height):
    return img
  scale = max(height / h, width / w)  # cover: both sides at least the bucket's
  # min(): width / (width / w) can round to w + 1 ulp, and PIL refuses a box past the image.
  crop_w, crop_h = min(width / scale, w), min(height / scale, h)
  left, top = (w - crop_w) / 2.0, (h - crop_h) / 2.0
  return img.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


class BucketSchedule:
  """Stream position -> source index such that each run of B = host batch positions is this host's
  slice of one global batch, and every global batch comes from one bucket.

  Epoch e (pure function of seed, e and the bucket ids, so identical on every host): all N examples
  in a seeded permutation, grouped by bucket (stable), cut into global batches of G = B x P examples
  (a bucket's remainder waits for the next epoch, where the permutation differs), then the batches
  shuffled. Host p reads entries p*B .. p*B + B - 1 of each global batch.

  Args:
    bucket_ids: (N,) int, the bucket of each source example; -1 for examples that cannot be used
      (unreadable headers): never scheduled.
    host_batch: B, examples per host per step. process_index / process_count: p / P.
  """

  def __init__(self, bucket_ids: np.ndarray, host_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.bucket_ids = np.asarray(bucket_ids, np.int32)
    self.host_batch, self.seed = int(host_batch), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.global_batch = self.host_batch * self.process_count
    usable = self.bucket_ids[self.bucket_ids >= 0]
    buckets, counts = np.unique(usable, return_counts=True)
    self.counts = dict(zip(buckets.tolist(), counts.tolist()))
    self.batches_per_epoch = int(sum(c // self.global_batch for c in counts))
    if self.batches_per_epoch == 0:
      raise ValueError(f"no aspect-ratio bucket holds a whole global batch of {self.global_batch} examples "
                       f"(bucket sizes {self.counts}); lower train.batch_size or set config.data.buckets=''.")
    self.members = {b: np.flatnonzero(self.bucket_ids == b) for b in self.counts}
    self._cache = (-1, None, None)  # (epoch, batches (nb, G), bucket of each batch); replaced whole.

  @property
  def examples_per_epoch(self) -> int:
    """Positions of this host's stream in one epoch (batches_per_epoch x B)."""
    return self.batches_per_epoch * self.host_batch

  def buckets_in_use(self) -> list[int]:
    """Buckets that form at least one global batch: each is one compiled shape of the train step."""
    return sorted(b for b, c in self.counts.items() if c >= self.global_batch)

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    cached_epoch, batches, of = self._cache
    if cached_epoch == epoch:
      return batches, of
    rng = np.random.default_rng([self.seed, epoch, _SHUFFLE_SALT])
    perm = rng.permutation(len(self.bucket_ids))
    perm = perm[self.bucket_ids[perm] >= 0]
    perm = perm[np.argsort(self.bucket_ids[perm], kind="stable")]  # grouped by bucket, shuffled within
    rows, owners = [], []
    start = 0
    for b in sorted(self.counts):
      n = self.counts[b]
      whole = n - n % self.global_batch
      rows.append(perm[start:start + whole].reshape(-1, self.global_batch))
      owners.append(np.full(whole // self.global_batch, b, np.int32))
      start += n
    batches, of = np.concatenate(rows), np.concatenate(owners)
    order = rng.permutation(len(batches))
    batches, of = batches[order], of[order]
    self._cache = (epoch, batches, of)
    return batches, of

  def lookup(self, k: int) -> tuple[int, int]:
    """(source index, bucket) of this host's stream position k."""
    j, slot = divmod(int(k), self.host_batch)
    epoch, row = divmod(j, self.batches_per_epoch)
    batches, of = self._epoch(epoch)
    return int(batches[row, self.process_index * self.host_batch + slot]), int(of[row])

  def alternate(self, k: int, attempt: int, bucket: int) -> int:
    """Another example of `bucket` to stand in for an unusable one at position k (SANA picks a random
    example of the same ratio); a pure function of (seed, k, attempt), so a resumed run picks the same."""
    members = self.members[bucket]
    rng = np.random.default_rng([self.seed, int(k), int(attempt), _ALTERNATE_SALT])
    return int(members[rng.integers(len(members))])

  def __call__(self, k: int, _) -> int:
    return self.lookup(k)[0]


def bucket_ids_of(source, table: BucketTable) -> np.ndarray:
  """(N,) int32 bucket of each example of `source`: its `bucket_ids(table)` when it has one (a folder
  reads the image headers; a cache has them stored), else every example is square (the shapes set
  renders R x R) and goes to the square bucket."""
  if hasattr(source, "bucket_ids"):
    return np.asarray(source.bucket_ids(table), np.int32)
  return np.full(len(source), table.square(), np.int32)


def describe_buckets(table: BucketTable, bucket_ids: np.ndarray, global_batch: int) -> str:
  """One line for the log: how many buckets form batches (= compiled step shapes) and their sizes."""
  ids, counts = np.unique(np.asarray(bucket_ids)[np.asarray(bucket_ids) >= 0], return_counts=True)
  used = [(int(b), int(c)) for b, c in zip(ids, counts) if c >= global_batch]
  idle = int(sum(c for b, c in zip(ids, counts) if c < global_batch))
  sizes = ", ".join(f"{table.sizes[b][0]}x{table.sizes[b][1]} ({c})" for b, c in used)
  return (f"Aspect-ratio buckets ({table.name}, {table.resolution} px): {len(used)} of {len(table.shapes)} sizes form "
          f"global batches of {global_batch}, one compiled step each: {sizes}"
          + (f"; {idle} images in buckets smaller than a batch are not trained on" if idle else "") + ".")


def check_sample_size(config, height: int, width: int) -> tuple[int, int]:
  """(height, width) px if the config's model can sample that size, else a ValueError naming the nearest
  sizes it can: both sides multiples of AE downsampling x patch size (the DiT's attention is linear and its
  PE, if any, is computed for any grid); with data.buckets the nearest bucket sizes are named too."""
  height, width, multiple = int(height), int(width), model_multiple(config)
  if height >= multiple and width >= multiple and height % multiple == 0 and width % multiple == 0:
    return height, width
  near = lambda x: sorted({max(multiple, x // multiple * multiple), max(multiple, -(-x // multiple) * multiple)})
  sizes = [f"{h}x{w}" for h in near(height) for w in near(width)]
  table = table_from_config(config) or bucket_table("sana", int(config.data.resolution), multiple)
  buckets = ", ".join(f"{h}x{w}" for h, w in table.nearest_sizes(max(height, 1), max(width, 1)))
  raise ValueError(f"--height={height} --width={width}: this model samples sizes whose sides are multiples of "
                   f"{multiple} (AE downsampling x model.patch_size); nearest: {', '.join(sizes)} (HxW); nearest "
                   f"aspect-ratio buckets at {config.data.resolution} px: {buckets}.")
