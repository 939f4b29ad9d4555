"""GenEval-lite: object-level evaluation of text-to-image samples on the shapes data set.

Parses each prompt into constraints (sanajax.data.shapes grammar) and each image into
objects (palette colour classification + connected components + shape from the bounding box
fill ratio and symmetry), then reports per-category pass rates and their mean, like GenEval.

CLI:
  python -m sanajax.eval.geneval_lite --images=DIR --prompts_file=F [--json_out=FILE]
DIR holds 00000.png, 00001.png, ... one per non-empty line of F, in order. A line may be
"prompt<TAB>category" to pin the category (eval_prompt_set can ask for the same prompt as
"single" and as "colors"); otherwise `shapes.category(prompt)` decides.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Sequence

import numpy as np

from sanajax.data import shapes
from sanajax.data.shapes import CATEGORIES, COLORS, Obj

# Pixel colours. A blurred edge pixel is a mix x = bg + a (c - bg) of a colour c with the
# background; a pixel belongs to colour c when its nearest point on the segment bg -> c has
# a >= MIN_ALPHA and lies within COLOR_TOL (RGB distance). Thresholding mixes at a = 0.5
# keeps shapes their true size under blur, and the tolerance absorbs colour drift and noise.
COLOR_TOL = 60.0
MIN_ALPHA = 0.5
# Components smaller than this fraction of the image are speckle, not objects (the smallest
# object the data set draws covers ~2.4% of the image).
MIN_AREA_FRAC = 0.008
# ...and so are components whose bounding box is thinner than this fraction of the side.
MIN_SIDE_FRAC = 0.1
# Shape from the bounding box fill ratio (rows filled between their extreme pixels, so
# interior speckle does not count) and the fraction of mass in the bottom half: triangles
# (apex up) are bottom-heavy (0.75 sharp, ~0.64 for a blurred 8-pixel one), circles and
# squares balanced (0.5) and told apart by fill (square 1.0, ~0.94 blurred; circle ~0.79).
TRIANGLE_MIN_BOTTOM = 0.58
TRIANGLE_FILL = (0.35, 0.85)
MAX_BALANCE = 0.08       # |bottom - 0.5| for a circle or a square
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.6
# Bboxes further from square than MAX_ASPECT (w/h or h/w), or components whose mass is not
# left/right balanced within MAX_LR_ASYMMETRY, have shape "unknown".
MAX_ASPECT = 1.6
MAX_LR_ASYMMETRY = 0.12
# Position: centres must differ by this fraction of the side along the relation's axis (the
# data uses 0.1; half of it leaves room for a model's placement noise).
POSITION_MARGIN_FRAC = 0.05
# A sample passes only if it is a clean scene: exactly the objects the prompt names (the data
# set draws nothing else) and little clutter. Clutter = foreground pixels outside accepted
# objects plus off-palette pixels (farther than COLOR_TOL from every background->colour
# segment and than BACKGROUND_TOL from the background). Without this a noisy, colourful
# image passes "single" by containing some blob of the named shape.
MAX_CLUTTER_FRAC = 0.05
BACKGROUND_TOL = 60.0

_COLOR_NAMES = tuple(COLORS)
_COLOR_DIRS = (np.array(list(COLORS.values()), np.float32)
               - np.array(shapes.BACKGROUND, np.float32))  # (8, 3): c - bg


def _palette(extra_colors: Sequence[str] = ()) -> tuple[tuple[str, ...], np.ndarray]:
  """(names, directions c - bg) of the training palette plus `extra_colors` (shapes.NOVEL_COLORS names,
  e.g. a colour a LoRA taught: docs/lora.md#shapes); the plain palette when there are none."""
  if not extra_colors:
    return _COLOR_NAMES, _COLOR_DIRS
  unknown = [c for c in extra_colors if c not in shapes.NOVEL_COLORS]
  if unknown:
    raise ValueError(f"extra_colors {unknown} are not in shapes.NOVEL_COLORS ({', '.join(shapes.NOVEL_COLORS)}).")
  names = _COLOR_NAMES + tuple(c for c in extra_colors if c not in _COLOR_NAMES)
  dirs = np.array([shapes.ALL_COLORS[c] for c in names], np.float32) - np.array(shapes.BACKGROUND, np.float32)
  return names, dirs


# ----------------------------------------------------------------------------- detection


def _classify_pixels(images: np.ndarray, color_dirs: np.ndarray = _COLOR_DIRS) -> tuple[np.ndarray, np.ndarray]:
  """Colour index per pixel and the off-palette mask (color_dirs: _palette's, default the training palette).

  Returns (cls int8 (N, H, W): 0..7 palette colours, -1 background/none;
  off_palette bool (N, H, W): neither background nor any palette colour or blend).
  """
  # Per-channel float32 planes: several times faster than reducing over a trailing axis.
  x = [images[..., k].astype(np.float32) - v for k, v in enumerate(shapes.BACKGROUND)]
  xx = x[0] * x[0] + x[1] * x[1] + x[2] * x[2]
  best = np.full(images.shape[:3], np.inf, np.float32)
  best_alpha = np.zeros(images.shape[:3], np.float32)
  cls = np.full(images.shape[:3], -1, np.int8)
  for k, d in enumerate(color_dirs.tolist()):
    dd = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    dot = x[0] * d[0] + x[1] * d[1] + x[2] * d[2]
    alpha = np.clip(dot / dd, 0, 1)
    resid = xx - 2 * alpha * dot + alpha * alpha * dd  # |x - alpha d|^2
    closer = resid < best
    cls[closer] = k
    best_alpha[closer] = alpha[closer]
    np.minimum(best, resid, out=best)
  off_palette = (best > COLOR_TOL ** 2) & (xx > BACKGROUND_TOL ** 2)
  cls[(best > COLOR_TOL ** 2) | (best_alpha < MIN_ALPHA)] = -1
  return cls, off_palette


def _label_components(cls: np.ndarray) -> np.ndarray:
  """4-connected components of equal colour (cls >= 0), over a batch (N, H, W).

  Returns int64 labels (N, H, W): for foreground pixels the smallest flat index of the
  component, else N*H*W. Min-label propagation plus pointer jumping (label <- label of
  label), which converges in a handful of vectorised steps even for a large batch.
  """
  fg = cls >= 0
  size = cls.size
  lab = np.where(fg, np.arange(size).reshape(cls.shape), size)
  same_h = fg[:, :, 1:] & (cls[:, :, 1:] == cls[:, :, :-1])
  same_v = fg[:, 1:, :] & (cls[:, 1:, :] == cls[:, :-1, :])
  while True:
    new = lab.copy()
    np.minimum(new[:, :, :-1], np.where(same_h, lab[:, :, 1:], size), out=new[:, :, :-1])
    np.minimum(new[:, :, 1:], np.where(same_h, lab[:, :, :-1], size), out=new[:, :, 1:])
    np.minimum(new[:, :-1, :], np.where(same_v, lab[:, 1:, :], size), out=new[:, :-1, :])
    np.minimum(new[:, 1:, :], np.where(same_v, lab[:, :-1, :], size), out=new[:, 1:, :])
    # A label is a pixel of the same component, so its own label is a valid shortcut.
    for _ in range(3):
      new = np.append(new.ravel(), size)[new]
    if np.array_equal(new, lab):
      return lab
    lab = new


def _classify_shape(fill: float, bottom: float, left: float, w: int, h: int) -> str:
  """Shape name from bbox fill ratio, bottom-half and left-half mass fractions, bbox w, h."""
  if max(w / h, h / w) > MAX_ASPECT or abs(left - 0.5) > MAX_LR_ASYMMETRY:
    return "unknown"
  if bottom >= TRIANGLE_MIN_BOTTOM:
    return "triangle" if TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1] else "unknown"
  if abs(bottom - 0.5) > MAX_BALANCE:
    return "unknown"
  if fill >= SQUARE_MIN_FILL:
    return "square"
  return "circle" if fill >= CIRCLE_MIN_FILL else "unknown"


def _components(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat pixel indices of the non-speckle components, grouped by component in raster order.

  Returns (pix, starts, area): pix int64 (P,), starts (K,) offsets of each component in pix,
  area (K,) pixel counts.
  """
  lab = _label_components(cls).ravel()
  pix = np.flatnonzero(lab < lab.size)
  # A stable sort keeps raster order inside each component, so rows stay contiguous.
  pix = pix[np.argsort(lab[pix], kind="stable")]
  comp = lab[pix]
  starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]])
  area = np.diff(np.r_[starts, pix.size])
  # Drop speckle before any per-component work: noise makes ~10^5 tiny components.
  big = area >= MIN_AREA_FRAC * cls[0].size
  pix = pix[np.repeat(big, area)]
  area = area[big]
  return pix, np.r_[0, np.cumsum(area)[:-1]].astype(np.int64), area


def detect_objects_batch(images: np.ndarray) -> list[list[Obj]]:
  """Objects in each image of a batch uint8 (N, R, R, 3); see detect_objects."""
  return analyze_batch(images)[0]


def analyze_batch(images: np.ndarray, extra_colors: Sequence[str] = ()) -> tuple[list[list[Obj]], np.ndarray]:
  """Objects in each image of a batch uint8 (N, R, R, 3) and each image's clutter fraction.
  extra_colors: shapes.NOVEL_COLORS names detected beside the palette (see _palette).

  Clutter: the fraction of the image's pixels that are foreground but in no accepted object,
  or off-palette (see MAX_CLUTTER_FRAC).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images (N, H, W, 3), got {images.shape}")
  n, h, w, _ = images.shape
  names, dirs = _palette(extra_colors)
  cls, off_palette = _classify_pixels(images, dirs)
  unexplained = (cls >= 0).reshape(n, -1).sum(1) + off_palette.reshape(n, -1).sum(1)
  pix, starts, area = _components(cls)
  out: list[list[Obj]] = [[] for _ in range(n)]
  if pix.size == 0:
    return out, unexplained / (h * w)
  ys, xs = (pix // w) % h, pix % w
  y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts) + 1
  x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts) + 1
  which = np.repeat(np.arange(starts.size), area)
  # Fraction of each pixel lying below / left of its component's bbox middle.
  bottom_w = np.clip(ys + 1 - (y0 + y1)[which] / 2, 0, 1)
  left_w = np.clip((x0 + x1)[which] / 2 - xs, 0, 1)
  bottom = np.add.reduceat(bottom_w, starts) / area
  left = np.add.reduceat(left_w, starts) / area
  # Row spans: rows are contiguous runs of equal (component, y) in raster order.
  row_start = np.flatnonzero(np.r_[True, (which[1:] != which[:-1]) | (ys[1:] != ys[:-1])])
  row_end = np.r_[row_start[1:], pix.size] - 1
  spans = np.bincount(which[row_start], xs[row_end] - xs[row_start] + 1, starts.size)
  fill = spans / ((x1 - x0) * (y1 - y0))
  min_side = MIN_SIDE_FRAC * min(h, w)
  for k in range(starts.size):
    bw, bh = int(x1[k] - x0[k]), int(y1[k] - y0[k])
    if min(bw, bh) < min_side:
      continue
    first = pix[starts[k]]
    shape = _classify_shape(fill[k], bottom[k], left[k], bw, bh)
    box = (float(x0[k]), float(y0[k]), float(x1[k]), float(y1[k]))
    out[first // (h * w)].append(Obj(names[cls.ravel()[first]], shape, box))
    unexplained[first // (h * w)] -= area[k]
  return out, unexplained / (h * w)


def detect_objects(image: np.ndarray) -> list[Obj]:
  """Objects in one image uint8 (R, R, 3): palette colour, shape (or "unknown"), box.

  Boxes are pixel extents (x0, y0, x1, y1), x1/y1 exclusive.
  """
  return detect_objects_batch(np.asarray(image)[None])[0]


# ----------------------------------------------------------------------------- checks


_KINDS_FOR = {"single": "single", "colors": "single", "two": "two", "attribution": "two",
              "counting": "counting", "position": "position"}


# Why a sample fails, in the order the rules are checked (the first failing rule is reported).
FAILURE_REASONS = ("clutter", "missing", "extra", "shape", "color", "relation")


def failure(objects: list[Obj], prompt: str, cat: str | None = None,
            resolution: int = 64, clutter: float = 0.0) -> str | None:
  """The first GenEval-lite rule `objects` break for `prompt` under `cat`, or None if they pass.

  Rules, in this order (one of FAILURE_REASONS):
    clutter   more than MAX_CLUTTER_FRAC of the image is unexplained foreground or off-palette;
    missing   fewer objects than the prompt names;
    extra     more objects than the prompt names;
    shape     the right number of objects, but a named shape is absent (every category);
    color     the shapes are right, but a named colour-shape pair is absent (colors,
              attribution, counting, position);
    relation  both named objects are present, but the relation does not hold (position).
  single and two check shapes only, like GenEval's single-object and two-object tasks.
  """
  cap = shapes.parse_caption(prompt)
  cat = cat or shapes.category(prompt)
  if _KINDS_FOR.get(cat) != cap.kind:
    raise ValueError(f"prompt {prompt!r} ({cap.kind}) cannot be evaluated as {cat!r}")
  if clutter > MAX_CLUTTER_FRAC:
    return "clutter"
  if len(objects) != cap.count:
    return "missing" if len(objects) < cap.count else "extra"
  # Every object a prompt names, as (color, shape) with multiplicity.
  need = collections.Counter({cap.items[0]: cap.count} if cap.kind == "counting" else cap.items)
  need_shapes = collections.Counter()
  for (_, shape), k in need.items():
    need_shapes[shape] += k
  shape_counts = collections.Counter(o.shape for o in objects)
  if any(shape_counts[s] < k for s, k in need_shapes.items()):
    return "shape"
  if cat in ("single", "two"):
    return None
  item_counts = collections.Counter((o.color, o.shape) for o in objects)
  if any(item_counts[it] < k for it, k in need.items()):
    return "color"
  if cat != "position":
    return None
  first = [o for o in objects if (o.color, o.shape) == cap.items[0]]
  second = [o for o in objects if (o.color, o.shape) == cap.items[1]]
  margin = POSITION_MARGIN_FRAC * resolution
  if any(a is not b and shapes.relation_holds(a.box, b.box, cap.relation, margin)
         for a in first for b in second):
    return None
  return "relation"


def check(objects: list[Obj], prompt: str, cat: str | None = None,
          resolution: int = 64, clutter: float = 0.0) -> bool:
  """Whether detected `objects` satisfy `prompt` under category `cat` (GenEval rules).

  Every category first requires a clean scene: exactly as many objects as the prompt names
  and a clutter fraction (see analyze_batch) of at most MAX_CLUTTER_FRAC.

  single: the shape is present; colors: the shape with its colour; two: both shapes;
  attribution: both with their colours; counting: exactly that many of that colour and
  shape; position: both (with colours) present and the relation holding between centres
  with a margin of POSITION_MARGIN_FRAC * resolution. `failure` says which rule fails.
  """
  return failure(objects, prompt, cat, resolution, clutter) is None


def evaluate(images, prompts: Sequence[str], categories: Sequence[str] | None = None,
             batch_pixels: int = 1 << 22, extra_colors: Sequence[str] = ()) -> dict:
  """Scores images against their prompts.

  images: uint8 (N, R, R, 3) array or a sequence of (R_i, R_i, 3) arrays.
  categories: per-prompt category; default `shapes.category(prompt)`.
  batch_pixels: detection runs on chunks of about this many pixels (bounds memory).
  extra_colors: shapes.NOVEL_COLORS names to detect beside the training palette (a taught colour).
  Returns {"overall": mean of the per-category rates (categories present only),
  "num_images": N, "categories": {cat: {"rate", "passed", "total"}} in CATEGORIES order,
  "per_image": list[bool]}; each category also has "failures": {reason: count} for the
  failing images, by the first rule they break (see `failure`).
  """
  prompts = list(prompts)
  if categories is None:
    categories = [shapes.category(p) for p in prompts]
  categories = list(categories)
  if not len(images) == len(prompts) == len(categories):
    raise ValueError(f"{len(images)} images, {len(prompts)} prompts, "
                     f"{len(categories)} categories")
  reasons = []
  side = np.asarray(images[0]).shape[0] if len(images) else 1
  batch_size = max(1, batch_pixels // (side * side))
  for lo in range(0, len(prompts), batch_size):
    chunk = [np.asarray(im) for im in images[lo:lo + batch_size]]
    for im, (objs, clutter), p, c in zip(chunk, _detect_all(chunk, extra_colors), prompts[lo:], categories[lo:]):
      reasons.append(failure(objs, p, c, resolution=im.shape[0], clutter=clutter))
  return _summarize(reasons, categories)


def _detect_all(images: list[np.ndarray], extra_colors: Sequence[str] = ()) -> list[tuple[list[Obj], float]]:
  """(objects, clutter) for each image of a list, batching images of equal shape together."""
  out: list = [None] * len(images)
  by_shape = collections.defaultdict(list)
  for i, im in enumerate(images):
    by_shape[im.shape].append(i)
  for idx in by_shape.values():
    objects, clutter = analyze_batch(np.stack([images[i] for i in idx]), extra_colors)
    for i, objs, junk in zip(idx, objects, clutter):
      out[i] = (objs, float(junk))
  return out


def _summarize(reasons: list[str | None], categories: list[str]) -> dict:
  """The result dict of `evaluate` from each image's failure (None: passed) and category."""
  passed = [r is None for r in reasons]
  cats = {}
  for cat in CATEGORIES:
    flags = [ok for ok, c in zip(passed, categories) if c == cat]
    if flags:
      why = collections.Counter(r for r, c in zip(reasons, categories) if c == cat and r is not None)
      cats[cat] = {"rate": sum(flags) / len(flags), "passed": int(sum(flags)),
                   "total": len(flags), "failures": {r: why[r] for r in FAILURE_REASONS if why[r]}}
  unknown = set(categories) - set(CATEGORIES)
  if unknown:
    raise ValueError(f"unknown categories {sorted(unknown)}")
  overall = float(np.mean([v["rate"] for v in cats.values()])) if cats else 0.0
  return {"overall": overall, "num_images": len(passed), "categories": cats,
          "per_image": [bool(p) for p in passed]}


def format_table(result: dict) -> str:
  """A plain-text table: one row per category present (with why samples failed), then overall."""
  rows = [f"{'category':<12} {'passed':>7} {'total':>6} {'rate':>7}  failures"]
  for cat, v in result["categories"].items():
    why = ", ".join(f"{r} {n}" for r, n in v.get("failures", {}).items())
    rows.append(f"{cat:<12} {v['passed']:>7d} {v['total']:>6d} {v['rate']:>7.3f}  {why}".rstrip())
  rows.append(f"{'overall':<12} {'':>7} {result['num_images']:>6d} {result['overall']:>7.3f}")
  return "\n".join(rows)


# ----------------------------------------------------------------------------- CLI


def read_prompts_file(path: str) -> tuple[list[str], list[str] | None]:
  """Prompts (and categories, if every line has "prompt<TAB>category") of a prompts file."""
  with open(path, encoding="utf-8") as f:
    lines = [ln.rstrip("\n") for ln in f if ln.strip()]
  parts = [ln.split("\t") for ln in lines]
  prompts = [p[0].strip() for p in parts]
  if parts and all(len(p) == 2 for p in parts):
    return prompts, [p[1].strip() for p in parts]
  if any(len(p) > 1 for p in parts):
    raise ValueError(f"{path}: either every line or none has a <TAB>category")
  return prompts, None


def write_prompts_file(path: str, prompt_set: Sequence[tuple[str, str]]) -> None:
  """Writes (prompt, category) pairs as "prompt<TAB>category" lines."""
  with open(path, "w", encoding="utf-8") as f:
    for prompt, cat in prompt_set:
      f.write(f"{prompt}\t{cat}\n")


def load_images(directory: str, num: int) -> list[np.ndarray]:
  """Reads DIR/00000.png ... DIR/{num-1:05d}.png as uint8 RGB arrays."""
  from PIL import Image  # only the CLI needs it
  found = sorted(f for f in os.listdir(directory) if re.fullmatch(r"\d{5,}\.png", f))
  if len(found) != num:
    raise ValueError(f"{directory} holds {len(found)} numbered .png images but the prompts "
                     f"file has {num} prompts")
  images = []
  for i in range(num):
    path = os.path.join(directory, f"{i:05d}.png")
    if not os.path.exists(path):
      raise ValueError(f"missing image {path}")
    with Image.open(path) as im:
      images.append(np.asarray(im.convert("RGB")))
  return images


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sanajax.eval.geneval_lite",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--images", required=True, help="directory of 00000.png, 00001.png, ...")
  parser.add_argument("--prompts_file", required=True, help="one prompt per line")
  parser.add_argument("--json_out", default=None, help="optional path for the full result")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.images):
    parser.error(f"--images: no such directory: {args.images}")
  if not os.path.isfile(args.prompts_file):
    parser.error(f"--prompts_file: no such file: {args.prompts_file}")
  try:
    prompts, categories = read_prompts_file(args.prompts_file)
    images = load_images(args.images, len(prompts))
    result = evaluate(images, prompts, categories)
  except ValueError as e:
    parser.error(str(e))
  print(format_table(result))
  summary = {k: v for k, v in result.items() if k != "per_image"}
  print(json.dumps(summary, sort_keys=True))
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
