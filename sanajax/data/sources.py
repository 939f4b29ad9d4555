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

import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

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


def load_image(path: str, resolution: int, max_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS
               ) -> tuple[np.ndarray | None, str]:
  """Decodes an image file to uint8 (R, R, 3) RGB, or says why it cannot be used.

  Truncated files, zero-byte files, non-images and images over `max_megapixels` (W x H / 1e6,
  checked from the header, before decoding) give None and the reason (the pipeline skips,
  names and counts them) rather than raising mid-epoch.

  Returns:
    (image, "") or (None, reason): UNDECODABLE or too_large(...).
  """
  max_pixels = int(max_megapixels * 1e6)
  _allow_pil_pixels(max_pixels)
  try:
    with Image.open(path) as img:
      if img.size[0] * img.size[1] > max_pixels:
        return None, too_large(max_megapixels, img.size)
      # JPEG only: let libjpeg decode at a reduced DCT scale that still leaves the
      # shorter side >= R; decoding a 4K JPEG for a 64 px crop is mostly wasted work.
      img.draft("RGB", (resolution, resolution))
      img.load()  # Force the full decode so a truncated file fails here, not later.
      img = ImageOps.exif_transpose(img)
      img = _to_rgb(img)
  except Image.DecompressionBombError:
    # Over twice PIL's limit, which _allow_pil_pixels keeps >= ours: over ours too.
    return None, too_large(max_megapixels)
  except Exception as e:  # pylint: disable=broad-except
    # PIL's decoders raise a zoo of types on bad data (OSError, SyntaxError,
    # ValueError, EOFError, struct.error...).
    log.debug("cannot decode %s: %s: %s", path, type(e).__name__, e)
    return None, UNDECODABLE
  return np.asarray(resize_center_crop(img, resolution), dtype=np.uint8), ""


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
  """

  def __init__(self, path: str, resolution: int,
               max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.resolution = int(resolution)
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
    image, reason = load_image(path, self.resolution, self.max_image_megapixels)
    return {"image": image, "captions": captions, "scores": scores, "path": path,
            "skip_reason": reason}

  def __repr__(self) -> str:
    return f"FolderSource({self.path!r}, resolution={self.resolution}, n={len(self)})"


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


def make_source(source: str, resolution: int, seed: int, split: str = "train", *,
                max_image_megapixels: float = DEFAULT_MAX_IMAGE_MEGAPIXELS):
  """Builds a source from its config string (`config.data.source`).

  Args:
    source: "shapes" (procedural shapes, the embedded default) or "folder:PATH".
    resolution: R, side of the square images in pixels.
    seed: seed of procedural sources (ignored by folders).
    split: "train" or an eval split; procedural sources draw disjoint examples per
      split. A folder has no splits: point another `folder:` at the eval images.
    max_image_megapixels: a folder's images over this many megapixels are skipped and named
      (`config.data.max_image_megapixels`).
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
    return FolderSource(path, resolution, max_image_megapixels)
  raise ValueError(f"unknown data source {source!r}. Accepted forms: 'shapes' (procedural "
                   "shapes set) or 'folder:PATH' (images under PATH with sidecar .txt or "
                   "captions.jsonl captions).")


def make_source_from_config(data, seed: int, split: str = "train"):
  """make_source from a config's `data` section (source, resolution, max_image_megapixels).

  A field missing from an older workdir's config.json takes its default.
  """
  return make_source(data.source, data.resolution, seed, split,
                     max_image_megapixels=data.get("max_image_megapixels", DEFAULT_MAX_IMAGE_MEGAPIXELS))
