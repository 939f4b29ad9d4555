"""Random-access image-caption sources.

A source is anything with `__len__` and `__getitem__(i) -> dict` holding
  image:    uint8 (R, R, 3) RGB, or None when the file cannot be decoded;
  captions: list[str], at least one ('' for an uncaptioned image);
  scores:   list[float], one CLIP score per caption, or [] when there are none;
  path:     (optional) where the example came from, for warnings;
  skip_reason: (optional) why `image` is None, e.g. UNDECODABLE or too_large(...), for warnings.
Grain's `MapDataset.source` reads it directly (see `pipeline.py`).
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import logging
import os
import re
import tarfile
from typing import Any

import numpy as np
from array_record.python import array_record_data_source
from PIL import Image, ImageOps

from sanajax import extras
from sanajax.data import records
from sanajax.data.buckets import BucketTable, fit_to_bucket
from sanajax.data.feature_cache import SOURCE_PREFIX as CACHE_PREFIX
from sanajax.data.feature_cache import CacheSource
from sanajax.data.shapes import ShapesSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_JSONL = "captions.jsonl"

# The default of config.data.max_image_megapixels: PIL's own limit (Image.MAX_IMAGE_PIXELS =
# 89,478,485 px, a 256 MiB RGB decode) rounded down, so by default PIL's process-wide limit stays
# as it is and no image PIL would warn about is decoded. A 1024 px training crop needs ~1 MP.
DEFAULT_MAX_IMAGE_MEGAPIXELS = 89.0
# Why an image was skipped (an item's "skip_reason"), unless it is too_large(...).
UNDECODABLE = "truncated, empty or not an image"
# EXIF orientation tag, and its values that swap width and height (transposes, 90 / 270 degree turns).
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)


# ---------------------------------------------------------------------------------------
# Decoding.


def _to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB; transparent pixels become white.

  White (not black) matches what a viewer shows for a transparent PNG, so a caption
  like "a red circle" still describes the result.
  """
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    # 16-bit / float greyscale: `convert("RGB")` would clip everything above 255.
    a = np.asarray(img, dtype=np.float64)
    # I;16 is 16-bit by definition; "I"/"F" say nothing about the range, so look.
    scale = 1.0 / 257.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0
    img = Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8), "L")
  if img.mode == "P" or img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      "transparency" in img.info):
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return img.convert("RGB") if img.mode != "RGB" else img


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
  """Resizes the shorter side to `resolution` and centre-crops to a square.

  Done as one bicubic resize of the central square (`box=`), which is the same as
  resize-then-crop but skips resampling the pixels the crop would throw away. Pillow's
  bicubic filter widens its support when downscaling, so it is antialiased.

  Args:
    img: RGB image of size (W, H) in pixels.
    resolution: R, output side in pixels.

  Returns:
    RGB image of size (R, R).
  """
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) / 2.0, (h - side) / 2.0
  if (w, h) == (resolution, resolution):
    return img
  return img.resize((resolution, resolution), Image.Resampling.BICUBIC,
                    box=(left, top, left + side, top + side))


def too_large(max_megapixels: float, size: tuple[int, int] | None = None) -> str:
  """The skip reason of an image over the pixel limit; `size` (W, H) in pixels when known."""
  prefix = f"{size[0]}x{size[1]} px, " if size else ""
  return f"{prefix}larger than the {max_megapixels:g}-megapixel limit (config.data.max_image_megapixels)"


def _allow_pil_pixels(max_pixels: int) -> None:
  """Raises PIL's process-wide decompression-bomb limit to at least `max_pixels`.

  PIL warns above Image.MAX_IMAGE_PIXELS and refuses above twice that, in Image.open, before we
  see the size; a config limit above PIL's must win, or images under it would still be refused.
  Only ever raised (never lowered, never set when PIL's check is off), and set here rather than
  once at start because grain's worker processes import a fresh PIL.
  """
  current = Image.MAX_IMAGE_PIXELS
  if current is not None and max_pixels > current:
    Image.MAX_IMAGE_PIXELS = max_pixels


def load_image(path: str | bytes, resolution: int, max_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS,
               buckets: BucketTable | None = None) -> tuple[np.ndarray | None, str]:
  """Decodes an image file (a path, or the file's bytes) to uint8 (R, R, 3) RGB, or says why it cannot be used.

  With `buckets` (sanajax.data.buckets) the image goes to the bucket nearest its aspect ratio (from the
  header, after the EXIF orientation) and comes out (h, w, 3) at that bucket's size instead.

  Truncated files, zero-byte files, non-images and images over `max_megapixels` (W x H / 1e6,
  checked from the header, before decoding) give None and the reason (the pipeline skips,
  names and counts them) rather than raising mid-epoch.

  Returns:
    (image, "") or (None, reason): UNDECODABLE or too_large(...).
  """
  max_pixels = int(max_megapixels * 1e6)
  _allow_pil_pixels(max_pixels)
  try:
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
      if img.size[0] * img.size[1] > max_pixels:
        return None, too_large(max_megapixels, img.size)
      # JPEG only: let libjpeg decode at a reduced DCT scale that still leaves the
      # shorter side >= R; decoding a 4K JPEG for a 64 px crop is mostly wasted work.
      size, rotated = (resolution, resolution), False  # the output's (h, w) px
      if buckets is not None:
        rotated = _transposed(img)
        w, h = img.size[::-1] if rotated else img.size
        size = buckets.sizes[buckets.assign(h, w)]
      # (draft takes the stored (w, h): both output sides stay covered.)
      img.draft("RGB", size if rotated else size[::-1])
      img.load()  # Force the full decode so a truncated file fails here, not later.
      img = ImageOps.exif_transpose(img)
      img = _to_rgb(img)
  except Image.DecompressionBombError:
    # Over twice PIL's limit, which _allow_pil_pixels keeps >= ours: over ours too.
    return None, too_large(max_megapixels)
  except Exception as e:  # pylint: disable=broad-except
    # PIL's decoders raise a zoo of types on bad data (OSError, SyntaxError,
    # ValueError, EOFError, struct.error...).
    log.debug("cannot decode %s: %s: %s", path if isinstance(path, str) else "bytes", type(e).__name__, e)
    return None, UNDECODABLE
  if buckets is not None:
    return np.asarray(fit_to_bucket(img, *size), dtype=np.uint8), ""
  return np.asarray(resize_center_crop(img, resolution), dtype=np.uint8), ""


def _transposed(img: Image.Image) -> bool:
  """Whether the EXIF orientation of an opened (not decoded) image swaps its width and height. Reads the
  EXIF block the header parse left in img.info; img.getexif() would decode a whole PNG to look for one."""
  raw = img.info.get("exif")
  if not raw:
    return False
  exif = Image.Exif()
  try:
    exif.load(raw)
  except Exception:  # pylint: disable=broad-except
    return False  # a damaged EXIF block: ImageOps.exif_transpose ignores it too
  return exif.get(_EXIF_ORIENTATION, 1) in _EXIF_TRANSPOSED


def image_size(path) -> tuple[int, int] | None:
  """(height, width) px of an image file (a path or its bytes) as shown (EXIF orientation applied), from
  its header only; None when it cannot be read. What buckets are assigned from before any decode."""
  try:
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
      w, h = img.size
      return (w, h) if _transposed(img) else (h, w)
  except Exception:  # pylint: disable=broad-except
    return None  # the decode later skips and names it; here it only has no bucket.


# ---------------------------------------------------------------------------------------
# Captions.


def _to_float(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _parse_caption_lines(text: str) -> tuple[list[str], list[float]]:
  """Parses a sidecar .txt: one caption a line, optionally `caption<TAB>score`.

  Scores are kept only when every caption has one (else the choice is uniform).
  """
  captions, scores = [], []
  for line in text.splitlines():
    line = line.strip()
    if not line:
      continue
    caption, sep, score = line.rpartition("\t")
    value = _to_float(score) if sep else None
    if value is None:  # No tab, or the tab was part of the caption, not a separator.
      captions.append(line)
    else:
      captions.append(caption.strip())
      scores.append(value)
  if len(scores) != len(captions):
    scores = []
  return (captions or [""]), scores


def _read_jsonl(path: str) -> dict[str, tuple[list[str], list[float]]]:
  """Reads captions.jsonl: {"file": rel path, "caption": str | "captions": [...],
  "scores": [...]} a line. Several lines for one file are concatenated."""
  table: dict[str, tuple[list[str], list[float]]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        rel = os.path.normpath(rec["file"]).replace(os.sep, "/")
        caps = rec["captions"] if "captions" in rec else [rec["caption"]]
        scores = [float(s) for s in rec.get("scores", [])]
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}:{lineno}: expected a JSON object with 'file' and 'caption' (str) or "
            f"'captions' (list) and optional 'scores' (list of numbers); got {line.strip()!r}"
            f" ({type(e).__name__}: {e}).") from e
      if isinstance(caps, str):
        caps = [caps]
      if scores and len(scores) != len(caps):
        raise ValueError(f"{path}:{lineno}: {len(caps)} captions but {len(scores)} scores.")
      old_caps, old_scores = table.get(rel, ([], []))
      keep_scores = (old_scores or not old_caps) and scores
      table[rel] = (old_caps + [str(c) for c in caps],
                    (old_scores + scores) if keep_scores else [])
  return table


# ---------------------------------------------------------------------------------------
# Sources.


class FolderSource:
  """All images under a folder (recursive), with sidecar or jsonl captions.

  Images: files ending in .png/.jpg/.jpeg/.webp/.bmp (any case), sorted by relative
  path so that index i names the same file on every host and run.
  Captions, in order of precedence:
    1. `captions.jsonl` at the root: {"file": "sub/x.png", "caption": "..."} or
       {"file": ..., "captions": [...], "scores": [...]} a line;
    2. a sidecar `x.txt` next to `x.png`: one caption a line, or `caption<TAB>score`;
    3. otherwise [""] (counted in `num_uncaptioned`, trained as the unconditional case).

  Args:
    path: folder to scan.
    resolution: R; images are resized (shorter side) and centre-cropped to R x R.
    max_image_megapixels: images with more pixels (W x H / 1e6) are skipped, named as too large.
    buckets: aspect-ratio buckets (sanajax.data.buckets; None: square crops): each image comes out at its
      bucket's (h, w), and `bucket_ids` gives every image's bucket from the headers.
  """

  def __init__(self, path: str, resolution: int,
               max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS, buckets: BucketTable | None = None):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.resolution = int(resolution)
    self.buckets = buckets
    self.max_image_megapixels = _check_megapixels(max_image_megapixels)
    if not os.path.isdir(self.path):
      raise FileNotFoundError(
          f"FolderSource: {self.path!r} is not a directory. Pass source='folder:PATH' "
          f"with PATH a folder of {'/'.join(IMAGE_EXTENSIONS)} images.")
    self.files, texts = self._scan()
    if not self.files:
      raise FileNotFoundError(
          f"FolderSource: no images under {self.path!r} (looked recursively for files "
          f"ending in {', '.join(IMAGE_EXTENSIONS)}, any case).")
    jsonl = os.path.join(self.path, CAPTIONS_JSONL)
    self._jsonl = _read_jsonl(jsonl) if os.path.isfile(jsonl) else {}
    # Sidecars are read lazily in __getitem__ (cheap, and keeps a huge folder's init
    # fast); here we only remember which images have one.
    self._has_sidecar = [os.path.splitext(f)[0] + ".txt" in texts for f in self.files]
    self.num_uncaptioned = sum(
        1 for f, s in zip(self.files, self._has_sidecar) if not s and f not in self._jsonl)
    if self.num_uncaptioned:
      log.warning("FolderSource %s: %d of %d images have no caption (no %s entry, no "
                  "sidecar .txt); they train with the empty caption.", self.path,
                  self.num_uncaptioned, len(self.files), CAPTIONS_JSONL)

  def _scan(self) -> tuple[list[str], set[str]]:
    """Returns (sorted relative image paths, set of relative .txt paths), '/'-separated."""
    images, texts = [], set()
    for root, dirs, names in os.walk(self.path, followlinks=True):
      dirs.sort()
      rel_root = os.path.relpath(root, self.path)
      for name in names:
        rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
        low = name.lower()
        if low.endswith(IMAGE_EXTENSIONS):
          images.append(rel)
        elif low.endswith(".txt"):
          texts.add(rel)
    return sorted(images), texts

  def __len__(self) -> int:
    return len(self.files)

  def bucket_ids(self, table: BucketTable) -> np.ndarray:
    """(N,) int32 bucket of each image, from its header (-1: unreadable, never scheduled); 8 threads, as
    opening a file is mostly waiting on the disk (~0.1 ms an image on a local SSD)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      sizes = list(pool.map(image_size, (os.path.join(self.path, f) for f in self.files), chunksize=256))
    return table.assign_many(np.asarray([s or (0, 0) for s in sizes], np.int64))

  def captions_for(self, i: int) -> tuple[list[str], list[float]]:
    """Captions and scores of image i (see class docstring for precedence)."""
    rel = self.files[i]
    if rel in self._jsonl:
      caps, scores = self._jsonl[rel]
      return list(caps) or [""], list(scores)
    if self._has_sidecar[i]:
      txt = os.path.join(self.path, os.path.splitext(rel)[0] + ".txt")
      with open(txt, encoding="utf-8", errors="replace") as f:
        return _parse_caption_lines(f.read())
    return [""], []

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    path = os.path.join(self.path, self.files[i])
    captions, scores = self.captions_for(i)
    image, reason = load_image(path, self.resolution, self.max_image_megapixels, self.buckets)
    return {"image": image, "captions": captions, "scores": scores, "path": path,
            "skip_reason": reason}

  def raw(self, i: int) -> records.ImageRecord:
    """Image i's file bytes as stored and its captions (size (0, 0): not read); what a build stores."""
    i = int(i)
    with open(os.path.join(self.path, self.files[i]), "rb") as f:
      data = f.read()
    captions, scores = self.captions_for(i)
    return records.ImageRecord(data, captions, scores, (0, 0), self.files[i])

  def where(self, i: int) -> str:
    return os.path.join(self.path, self.files[int(i)])

  def __repr__(self) -> str:
    return f"FolderSource({self.path!r}, resolution={self.resolution}, n={len(self)})"


# ---------------------------------------------------------------------------------------
# Sources of encoded images: ArrayRecord shards, WebDataset tars, TFDS. Each gives the stored
# bytes (`raw(i)`, an ImageRecord; what `sanajax.data.build` writes) and decodes them in
# `__getitem__` exactly as a folder's files are decoded (load_image).

class _EncodedSource:
  """Base of the sources of encoded images. Subclasses set self.resolution and
  self.max_image_megapixels and define __len__, raw(i) -> ImageRecord and where(i) -> str.

  A record that cannot be read at all (a damaged shard or tar, a record of another format) is an
  item with image None and the reason, skipped, named and counted by the pipeline like an
  undecodable image: it never stops a run.
  """
  resolution: int
  max_image_megapixels: float
  buckets: BucketTable | None = None
  skipped = 0  # examples the source dropped before training (e.g. at build time); see TrainIterator.

  def raw(self, i: int) -> records.ImageRecord:
    raise NotImplementedError

  def where(self, i: int) -> str:
    raise NotImplementedError

  def bucket_ids(self, table: BucketTable) -> np.ndarray:
    """(N,) int32 bucket of each example from its image header (-1: unreadable); as FolderSource.bucket_ids."""
    def size(i):
      try:
        return image_size(self.raw(i).image)
      except Exception:  # pylint: disable=broad-except
        return None  # a damaged record: skipped and named when it is read.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      sizes = list(pool.map(size, range(len(self)), chunksize=256))
    return table.assign_many(np.asarray([s or (0, 0) for s in sizes], np.int64))

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    try:
      rec = self.raw(i)
    except Exception as e:  # pylint: disable=broad-except
      # A damaged record raises whatever its reader raises (RecordError, OSError, ValueError, ...).
      return {"image": None, "captions": [""], "scores": [], "path": self.where(i),
              "skip_reason": f"unreadable record ({type(e).__name__}: {e})"}
    image, reason = load_image(rec.image, self.resolution, self.max_image_megapixels, self.buckets)
    where = self.where(i)
    if rec.key and rec.key not in where:  # a shard's record number alone does not say which image it was
      where += f" ({rec.key})"
    return {"image": image, "captions": rec.captions, "scores": rec.scores, "path": where, "skip_reason": reason}


class ArrayRecordSource(_EncodedSource):
  """ArrayRecord shards written by `python -m sanajax.data.build` (format: sanajax.data.records).

  Read through ArrayRecord's random-access data source (the one grain's ArrayRecordDataSource wraps): one
  index space over all shards, in shard order, each shard in the order of the source it was built from.

  Args:
    path: the build's output directory (DIR of `arrayrecord:DIR`).
    resolution, max_image_megapixels, buckets: as FolderSource.
  """

  def __init__(self, path: str, resolution: int, max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS,
               buckets: BucketTable | None = None):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.resolution = int(resolution)
    self.buckets = buckets
    self.max_image_megapixels = _check_megapixels(max_image_megapixels)
    self.shards = records.list_shards(self.path)
    indices = [records.read_index(s) for s in self.shards]
    counts = [int(ix["num_records"]) for ix in indices]
    self._ends = np.cumsum(counts)
    self._sizes = np.asarray([hw for ix in indices for hw in ix["sizes"]], np.int32).reshape(-1, 2)
    # Images the build could not use (not images at all); they are named in each shard's index.
    self.skipped = sum(len(ix.get("skipped", [])) for ix in indices)
    # array_record's data source (grain.sources.ArrayRecordDataSource is this class plus grain's stats; importing
    # grain here would pull in JAX, which a build's worker processes do not need).
    self._records = array_record_data_source.ArrayRecordDataSource(self.shards)
    if len(self._records) != int(self._ends[-1]) or len(self._sizes) != len(self._records):
      raise ValueError(f"arrayrecord:{self.path}: the shards hold {len(self._records)} records but their .json "
                       f"indices say {int(self._ends[-1])}; rebuild the directory with python -m sanajax.data.build.")

  def __len__(self) -> int:
    return int(self._ends[-1])

  def original_sizes(self) -> np.ndarray:
    """int32 (N, 2): every record's original (height, width) in pixels, from the shard indices (no reads)."""
    return self._sizes

  def bucket_ids(self, table: BucketTable) -> np.ndarray:
    """(N,) int32 bucket of each record, from the sizes the build stored (reads no record)."""
    return table.assign_many(self._sizes.astype(np.int64))

  def raw(self, i: int) -> records.ImageRecord:
    return records.ImageRecord.from_bytes(self._records[int(i)])

  def where(self, i: int) -> str:
    shard = int(np.searchsorted(self._ends, i, side="right"))
    local = i - (int(self._ends[shard - 1]) if shard else 0)
    return f"{self.shards[shard]}[{local}]"

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.path!r}, resolution={self.resolution}, n={len(self)}, shards={len(self.shards)})"


_WDS_IMAGE_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
  """'shards/{000..009}.tar' -> the ten names (WebDataset's own shard notation); other text unchanged."""
  match = _BRACES.search(pattern)
  if not match:
    return [pattern]
  lo, hi = match.group(1), match.group(2)
  width = len(lo) if lo.startswith("0") else 0
  out = []
  for n in range(int(lo), int(hi) + 1):
    out += expand_braces(pattern[:match.start()] + f"{n:0{width}d}" + pattern[match.end():])
  return out


def webdataset_matches(pattern: str) -> list[str]:
  """Every path (files and folders) that a webdataset: glob / brace pattern matches, sorted, ~ expanded."""
  return sorted({p for pat in expand_braces(os.path.expanduser(pattern)) for p in glob.glob(pat)})


def bare_folder_hint(value: str) -> str:
  """For a source written as a bare folder path (no kind: prefix): ' (did you mean folder:VALUE?)', or
  arrayrecord:VALUE when it holds finished shards; '' for anything else."""
  path = os.path.expanduser(value)
  if not os.path.isdir(path):
    return ""
  kind = "arrayrecord" if any(name.endswith(records.SHARD_SUFFIX) for name in os.listdir(path)) else "folder"
  return f" (did you mean {kind}:{value}?)"


def _json_captions(data: bytes) -> tuple[list[str], list[float]]:
  """Captions of a WebDataset sample's .json: "captions" (list, with optional "scores"), else
  "prompt" (SANA's key), "caption" or "text"; ([], []) when it has none."""
  try:
    meta = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return [], []
  if not isinstance(meta, dict):
    return [], []
  caps = meta.get("captions")
  if isinstance(caps, list) and caps:
    caps = [str(c) for c in caps]
    scores = meta.get("scores")
    ok = isinstance(scores, list) and len(scores) == len(caps) and all(isinstance(s, (int, float)) for s in scores)
    return caps, [float(s) for s in scores] if ok else []
  for key in ("prompt", "caption", "text"):
    if isinstance(meta.get(key), str):
      return [meta[key]], []
  return [], []


class WebDatasetSource(_EncodedSource):
  """WebDataset tar shards (SANA's format): samples of one image (.jpg/.jpeg/.png/.webp/.bmp) and a
  caption (.txt, one caption a line or caption<TAB>score; or a .json with "captions" [+ "scores"],
  "prompt", "caption" or "text"), grouped by key (the member path up to the first '.' of its name).

  Random access, so grain reads it like every other source (shuffle, per-host sharding, exact
  resume): at start the tar headers are scanned once (no image bytes are read) into an index of
  (tar, offset, length) per member; a sample is then read with os.pread. Tars must be uncompressed
  (a .tar.gz cannot be read at an offset). Samples with no image are counted in `skipped` and named.

  Args:
    pattern: a glob (`shards/*.tar`) or WebDataset's brace range (`shards/{0000..0099}.tar`).
    resolution, max_image_megapixels, buckets: as FolderSource.
  """

  def __init__(self, pattern: str, resolution: int, max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS,
               buckets: BucketTable | None = None):
    self.pattern = pattern
    self.resolution = int(resolution)
    self.buckets = buckets
    self.max_image_megapixels = _check_megapixels(max_image_megapixels)
    self.tars = [p for p in webdataset_matches(pattern) if os.path.isfile(p)]  # a folder it matches is not a shard
    if not self.tars:
      raise FileNotFoundError(f"webdataset:{pattern} matches no file; write a glob of .tar shards, e.g. "
                              f"webdataset:/data/shards/*.tar or webdataset:/data/shards/{{00000..00099}}.tar")
    # Per sample: tar number, then (offset, length) of its image, .txt and .json (-1: absent).
    rows, self.keys, no_image = [], [], []
    for t, path in enumerate(self.tars):
      for key, members in self._scan(path).items():
        image = next((members[e] for e in _WDS_IMAGE_EXTENSIONS if e in members), None)
        if image is None:
          no_image.append(f"{path}:{key}")
          continue
        txt, meta = members.get("txt", (-1, -1)), members.get("json", (-1, -1))
        rows.append((t, *image, *txt, *meta))
        self.keys.append(key)
    if not rows:
      raise FileNotFoundError(f"webdataset:{pattern}: the {len(self.tars)} tar(s) hold no sample with an image "
                              f"({', '.join(_WDS_IMAGE_EXTENSIONS)}).")
    self._index = np.asarray(rows, np.int64)
    self.skipped = len(no_image)
    if no_image:
      log.warning("webdataset:%s: %d samples have no image and are skipped, e.g. %s", pattern, len(no_image),
                  ", ".join(no_image[:3]))
    self._fds: dict[int, int] = {}

  @staticmethod
  def _scan(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {extension: (data offset, length)}} of one tar, in member order (headers only)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
      with tarfile.open(path, mode="r:") as tar:
        for m in tar:
          if not m.isfile():
            continue
          directory, name = os.path.split(m.name)
          stem, dot, ext = name.partition(".")
          if not dot or name.startswith("."):
            continue
          key = f"{directory}/{stem}" if directory else stem
          samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
      raise ValueError(f"webdataset: {path} is not an uncompressed tar ({e}); WebDataset shards are read at "
                       f"offsets, so decompress .tar.gz shards first (gunzip).") from e
    return samples

  def __len__(self) -> int:
    return len(self._index)

  def __getstate__(self):
    # File descriptors do not cross processes (grain workers): each process opens its own.
    state = dict(self.__dict__)
    state["_fds"] = {}
    return state

  def _read(self, tar: int, offset: int, length: int) -> bytes:
    fd = self._fds.get(tar)
    if fd is None:
      fd = self._fds.setdefault(tar, os.open(self.tars[tar], os.O_RDONLY))
    data = os.pread(fd, length, offset)
    if len(data) != length:
      raise OSError(f"{self.tars[tar]} ends {length - len(data)} bytes early")
    return data

  def raw(self, i: int) -> records.ImageRecord:
    t, io_, il, to, tl, jo, jl = (int(v) for v in self._index[int(i)])
    captions, scores = _json_captions(self._read(t, jo, jl)) if jo >= 0 else ([], [])
    if not captions and to >= 0:
      captions, scores = _parse_caption_lines(self._read(t, to, tl).decode("utf-8", errors="replace"))
    return records.ImageRecord(self._read(t, io_, il), captions or [""], scores, (0, 0), self.keys[int(i)])

  def where(self, i: int) -> str:
    return f"{self.tars[int(self._index[int(i), 0])]}:{self.keys[int(i)]}"

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass

  def __repr__(self) -> str:
    return f"WebDatasetSource({self.pattern!r}, resolution={self.resolution}, n={len(self)}, tars={len(self.tars)})"


def _feature(example: dict[str, Any], key: str):
  """example["a"]["b"] for key "a/b" (TFDS nests FeaturesDicts)."""
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def _texts(value) -> list[str]:
  """A TFDS Text feature (bytes / str) or a Sequence of them (numpy array of bytes) -> list of str."""
  if isinstance(value, (bytes, np.bytes_)):
    return [bytes(value).decode("utf-8", errors="replace")]
  if isinstance(value, str):
    return [value]
  return [t for v in np.asarray(value, dtype=object).ravel() for t in _texts(v)]


class TfdsSource(_EncodedSource):
  """Any TFDS image-text data set prepared on disk, read through TFDS's TensorFlow-free
  `tfds.data_source` (ArrayRecord files; no TensorFlow needed).

  The image feature is read undecoded (tfds.decode.SkipDecoding) and decoded by load_image, as a
  folder's files are. Feature names may be nested with '/', e.g. "captions/text" for COCO.

  Args:
    name: the TFDS name (with config and version if needed, "coco_captions/2017:1.1.0").
    split: the split ("train", "validation", "train[:10%]", ...).
    resolution, max_image_megapixels, buckets: as FolderSource.
    image_key, caption_key: feature names (`config.data.tfds_image_key`, `tfds_caption_key`).
    score_key: the feature of per-caption CLIP scores, or "" for none (`config.data.tfds_score_key`).
    data_dir: where the prepared data set lies ("" : TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
  """

  def __init__(self, name: str, split: str, resolution: int,
               max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS, *, image_key: str = "image",
               caption_key: str = "caption", score_key: str = "", data_dir: str = "",
               buckets: BucketTable | None = None):
    extras.require("tensorflow_datasets", f"data source tfds:{name}")  # the 'data' extra, needed only here
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    self.resolution = int(resolution)
    self.buckets = buckets
    self.max_image_megapixels = _check_megapixels(max_image_megapixels)
    self.image_key, self.caption_key, self.score_key = image_key, caption_key, score_key
    decoders: dict[str, Any] = {}
    node = decoders
    parts = image_key.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = tfds.decode.SkipDecoding()
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, decoders=decoders)
    except Exception as e:  # pylint: disable=broad-except
      # TFDS raises many types here (DatasetNotFoundError, AssertionError, ValueError for a split).
      first = (str(e).strip().splitlines() or [""])[0]  # TFDS appends a list of every data set it knows
      raise ValueError(f"data source tfds:{name}:{split}: cannot open it ({type(e).__name__}: {first}). "
                       f"The data set must "
                       f"be prepared on disk in the array_record format (tfds build {name} --file_format=array_record, "
                       f"or builder.download_and_prepare(file_format='array_record')); set config.data.tfds_data_dir "
                       f"to where it lies.") from e
    features = self._ds.dataset_info.features
    for field, key in (("tfds_image_key", image_key), ("tfds_caption_key", caption_key),
                       ("tfds_score_key", score_key)):
      if key:
        try:
          _feature(features, key)
        except (KeyError, TypeError) as e:
          raise ValueError(f"config.data.{field}={key!r}: tfds:{name} has no such feature; its features are "
                           f"{sorted(features.keys())} (nest with '/').") from e

  def __len__(self) -> int:
    return len(self._ds)

  def raw(self, i: int) -> records.ImageRecord:
    example = self._ds[int(i)]
    image = _feature(example, self.image_key)
    captions = _texts(_feature(example, self.caption_key))
    scores = [float(s) for s in np.ravel(_feature(example, self.score_key))] if self.score_key else []
    return records.ImageRecord(bytes(image), captions or [""], scores if len(scores) == len(captions) else [],
                               (0, 0), f"{self.name}:{self.split}[{int(i)}]")

  def where(self, i: int) -> str:
    return f"tfds:{self.name}:{self.split}[{int(i)}]"

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, resolution={self.resolution}, n={len(self)})"


def _check_megapixels(value) -> float:
  """`config.data.max_image_megapixels` as a float > 0, or a ValueError naming the field."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if not 0 < number < float("inf"):
    raise ValueError(f"config.data.max_image_megapixels must be a finite number > 0 (megapixels, W x H / 1e6), "
                     f"got {value!r}; the default is {DEFAULT_MAX_IMAGE_MEGAPIXELS:g}.")
  return number


SOURCE_FORMS = ("'shapes' (procedural shapes set), 'folder:PATH' (images under PATH with sidecar .txt or "
                "captions.jsonl captions), 'arrayrecord:DIR' (shards of python -m sanajax.data.build), "
                "'webdataset:GLOB' (tar shards of .jpg/.png + .txt/.json), 'tfds:NAME[:SPLIT]' or 'cache:DIR' (latents "
                "and text features of python -m sanajax.data.cache)")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def parse_tfds(spec: str) -> tuple[str, str]:
  """'tfds:NAME[:SPLIT]' -> (NAME, SPLIT or "train"). NAME may carry a version ("coco:1.0.0"), SPLIT a slice."""
  parts = spec[len("tfds:"):].split(":")
  name, rest = parts[0], parts[1:]
  if rest and _VERSION.match(rest[0]):
    name, rest = f"{name}:{rest[0]}", rest[1:]
  split = ":".join(rest)  # a split may hold ':' itself ("train[:10%]")
  if not parts[0]:
    raise ValueError(f"data source {spec!r} names no data set; write 'tfds:NAME' or 'tfds:NAME:SPLIT'.")
  return name, split or "train"


def make_source(source: str, resolution: int, seed: int, split: str = "train", *,
                max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS, buckets: BucketTable | None = None,
                tfds_image_key: str = "image", tfds_caption_key: str = "caption", tfds_score_key: str = "",
                tfds_data_dir: str = ""):
  """Builds a source from its config string (`config.data.source`).

  Args:
    source: one of SOURCE_FORMS: "shapes", "folder:PATH", "arrayrecord:DIR", "webdataset:GLOB",
      "tfds:NAME[:SPLIT]" (its split is the one named there, "train" by default; `split` is not used).
    resolution: R, side of the square images in pixels.
    seed: seed of procedural sources (ignored by folders).
    split: "train" or an eval split; procedural sources draw disjoint examples per
      split. A folder has no splits: point another `folder:` at the eval images.
    max_image_megapixels: a folder's images over this many megapixels are skipped and named
      (`config.data.max_image_megapixels`).
    buckets: aspect-ratio buckets of images read from files (sanajax.data.buckets.bucket_table; None:
      square crops). The shapes set renders squares: all of it is the square bucket.
  """
  if not isinstance(source, str):
    raise ValueError(f"data source must be a string, got {source!r} "
                     f"({type(source).__name__}). Accepted: 'shapes' or 'folder:PATH'.")
  if source == "shapes":
    return ShapesSource(resolution=resolution, seed=seed, split=split)
  if source.startswith("folder:"):
    path = source[len("folder:"):]
    if not path:
      raise ValueError("data source 'folder:' has no path; write 'folder:/path/to/images'.")
    return FolderSource(path, resolution, max_image_megapixels, buckets)
  for prefix, cls in (("arrayrecord:", ArrayRecordSource), ("webdataset:", WebDatasetSource)):
    if source.startswith(prefix):
      if not source[len(prefix):]:
        raise ValueError(f"data source {source!r} has no path; write '{prefix}/path/to/...'.")
      return cls(source[len(prefix):], resolution, max_image_megapixels, buckets)
  if source.startswith("tfds:"):
    name, tfds_split = parse_tfds(source)
    return TfdsSource(name, tfds_split, resolution, max_image_megapixels, image_key=tfds_image_key,
                      caption_key=tfds_caption_key, score_key=tfds_score_key, data_dir=tfds_data_dir,
                      buckets=buckets)
  if source.startswith(CACHE_PREFIX):
    # An on-disk latent / text-feature cache (python -m sanajax.data.cache), not checked against a config here
    # (the trainer does, naming any mismatch); its items hold "latent" and "features", not "image".
    return CacheSource(source[len(CACHE_PREFIX):])
  raise ValueError(f"unknown data source {source!r}. Accepted forms: {SOURCE_FORMS}.")


def make_source_from_config(data, seed: int, split: str = "train", buckets: BucketTable | None = None):
  """make_source from a config's `data` section (source, resolution, max_image_megapixels) and the bucket
  table of data.buckets (the caller builds it: its sizes follow the model, buckets.table_from_config).

  A field missing from an older workdir's config.json takes its default.
  """
  return make_source(data.source, data.resolution, seed, split,
                     max_image_megapixels=data.get("max_image_megapixels", DEFAULT_MAX_IMAGE_MEGAPIXELS),
                     buckets=buckets, **tfds_options(data))


def tfds_options(data) -> dict[str, str]:
  """The tfds: source's feature names and data dir from a config's `data` section (defaults when absent)."""
  return {"tfds_image_key": data.get("tfds_image_key", "image"),
          "tfds_caption_key": data.get("tfds_caption_key", "caption"),
          "tfds_score_key": data.get("tfds_score_key", ""), "tfds_data_dir": data.get("tfds_data_dir", "")}
