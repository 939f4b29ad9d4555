"""Procedural shapes text-to-image data set (the embedded default data).

Spec: docs/shapes.md. Every scene is generated from a caption template, so every
caption attached to the image describes it exactly. Scenes carry several captions with
CLIP-like scores (full description ~31, prefixed ~29.5, less detailed ~27, partial ~21.5), so
SANA's caption sampler (keep score >= 25, weight score^(1/0.1)) has something to choose from.

A held-out split (`is_heldout`) reserves ~15% of multi-object combinations and ~15% of the
prefixed single-object phrasings for evaluation (`eval_prompt_set`).

Coordinates are pixels, x right, y down; boxes are (x0, y0, x1, y1) with x1/y1 exclusive.
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np

BACKGROUND = (245, 245, 245)
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 40),
  "purple": (140, 60, 180),
  "orange": (240, 130, 30),
  "cyan": (40, 190, 200),
  "black": (30, 30, 30),
}
# Colours the training data never draws and the tiny text encoder's vocabulary lacks (a prompt's word for
# one reaches the DiT as the unknown token, like DreamBooth's rare identifier): for teaching a trained model a
# new colour (docs/lora.md#shapes). Each lies > 60 (geneval_lite.COLOR_TOL) from every palette colour's
# background blends and vice versa, so detection with the extended palette never confuses them.
NOVEL_COLORS: dict[str, tuple[int, int, int]] = {
  "magenta": (220, 40, 200),
}
ALL_COLORS = {**COLORS, **NOVEL_COLORS}  # what captions may name and render draws
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")
PREFIXES = ("", "a photo of ", "an image showing ", "a drawing of ")
RELATIONS = ("to the left of", "to the right of", "above", "below")
_INVERSE_RELATION = {
  "to the left of": "to the right of", "to the right of": "to the left of",
  "above": "below", "below": "above",
}

# Geometry, as fractions of the canvas side R (SHAPES.md).
MIN_SIZE_FRAC = 0.22
MAX_SIZE_FRAC = 0.34
GAP_FRAC = 0.04          # min distance between two bounding boxes
EDGE_FRAC = 0.02         # min distance from a bounding box to the canvas edge
RELATION_MARGIN_FRAC = 0.1  # min centre offset along the axis a relation names

# Scene template mix; every category must be common enough for a model to learn it.
SINGLE_FRAC = 0.30
TWO_FRAC = 0.25
POSITION_FRAC = 0.25
COUNTING_FRAC = 0.20
SCENE_KINDS = ("single", "two", "position", "counting")
SCENE_WEIGHTS = (SINGLE_FRAC, TWO_FRAC, POSITION_FRAC, COUNTING_FRAC)
COUNTS = (2, 3, 4)  # counting scenes; "one" is the single form "a red circle"

# CLIP-like caption scores: base per caption form, plus uniform jitter in [-J, J].
SCORE_FULL = 31.0        # the complete description
SCORE_EQUIVALENT = 30.8  # the complete description reworded (swapped order / inverse relation)
SCORE_PREFIXED = 29.5    # the complete description with a prefix
SCORE_COARSE = 27.0      # true but less detailed (a position scene without its relation)
SCORE_PARTIAL = 21.5     # names only one object: below SANA's 25 threshold
SCORE_JITTER = 0.75
SCORE_THRESHOLD = 25.0   # SANA keeps captions scoring at least this

# Held-out bucket: crc32(key) % 100 < HELDOUT_PERCENT.
HELDOUT_PERCENT = 15

# Evaluation categories, GenEval-style.
CATEGORIES = ("single", "two", "counting", "colors", "position", "attribution")


def _words(text: str) -> list[str]:
  return text.split()


VOCAB: list[str] = sorted(set(
  ["a", "an", "and"]
  + [w for p in PREFIXES for w in _words(p)]
  + [w for r in RELATIONS for w in _words(r)]
  + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
  + [NUMBERS[n - 1] for n in COUNTS]))


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: palette colour name, shape name, box (x0, y0, x1, y1) in pixels."""
  color: str
  shape: str
  box: tuple[float, float, float, float]

  @property
  def center(self) -> tuple[float, float]:
    """(cx, cy) of the box, pixels."""
    x0, y0, x1, y1 = self.box
    return (x0 + x1) / 2, (y0 + y1) / 2


@dataclasses.dataclass
class Scene:
  """A rendered scene: image uint8 (R, R, 3), its objects and scored captions."""
  image: np.ndarray
  objects: list[Obj]
  captions: list[str]
  scores: list[float]
  kind: str = ""  # the template it came from: one of SCENE_KINDS


# ----------------------------------------------------------------------------- captions


@dataclasses.dataclass(frozen=True)
class Caption:
  """A parsed caption.

  kind: "single" | "two" | "position" | "counting".
  items: the (color, shape) pairs named, in caption order (one for single/counting).
  count: number of objects for counting, else the number of items.
  relation: for position, one of RELATIONS (items[0] REL items[1]).
  prefix: one of PREFIXES.
  """
  kind: str
  items: tuple[tuple[str, str], ...]
  count: int = 1
  relation: str | None = None
  prefix: str = ""

  @property
  def canonical(self) -> str:
    """The caption without its prefix."""
    if self.kind == "single":
      return _phrase(*self.items[0])
    if self.kind == "counting":
      color, shape = self.items[0]
      return f"{NUMBERS[self.count - 1]} {color} {shape}s"
    if self.kind == "two":
      return f"{_phrase(*self.items[0])} and {_phrase(*self.items[1])}"
    return f"{_phrase(*self.items[0])} {self.relation} {_phrase(*self.items[1])}"

  @property
  def text(self) -> str:
    return self.prefix + self.canonical

  def with_prefix(self, prefix: str) -> "Caption":
    return dataclasses.replace(self, prefix=prefix)

  def equivalent(self) -> "Caption":
    """The same content reworded: objects swapped (two) or relation inverted (position)."""
    a, b = self.items
    rel = _INVERSE_RELATION[self.relation] if self.relation else None
    return dataclasses.replace(self, items=(b, a), relation=rel)

  def normalized(self) -> "Caption":
    """A unique representative of the caption's meaning (no prefix).

    Two-object captions sort their items; position captions use only "left of"/"above".
    The held-out rule hashes this, so rewordings of a held-out caption are held out too.
    """
    cap = self.with_prefix("")
    if cap.kind == "two" and cap.items[1] < cap.items[0]:
      cap = cap.equivalent()
    if cap.kind == "position" and cap.relation in ("to the right of", "below"):
      cap = cap.equivalent()
    return cap


def article(color: str) -> str:
  """English indefinite article for a word starting with `color`."""
  return "an" if color[0] in "aeiou" else "a"


def _phrase(color: str, shape: str) -> str:
  return f"{article(color)} {color} {shape}"


def _parse_phrase(text: str, caption: str) -> tuple[str, str]:
  words = text.split()
  if (len(words) != 3 or words[1] not in ALL_COLORS or words[2] not in SHAPES
      or words[0] != article(words[1])):
    raise ValueError(f"cannot parse object phrase {text!r} in caption {caption!r}")
  return words[1], words[2]


def parse_caption(caption: str) -> Caption:
  """Parses a caption of the shapes grammar; raises ValueError if it is not one."""
  text = " ".join(caption.strip().lower().split())
  prefix = ""
  for p in sorted(PREFIXES, key=len, reverse=True):
    if p and text.startswith(p):
      prefix, text = p, text[len(p):]
      break
  words = text.split()
  if len(words) == 3 and words[0] in NUMBERS[1:]:
    count = NUMBERS.index(words[0]) + 1
    if words[1] in ALL_COLORS and words[2].endswith("s") and words[2][:-1] in SHAPES:
      return Caption("counting", ((words[1], words[2][:-1]),), count, None, prefix)
    raise ValueError(f"cannot parse counting caption {caption!r}")
  if " and " in text:
    left, right = text.split(" and ", 1)
    items = (_parse_phrase(left, caption), _parse_phrase(right, caption))
    return Caption("two", items, 2, None, prefix)
  for rel in RELATIONS:
    if f" {rel} " in text:
      left, right = text.split(f" {rel} ", 1)
      items = (_parse_phrase(left, caption), _parse_phrase(right, caption))
      return Caption("position", items, 2, rel, prefix)
  return Caption("single", (_parse_phrase(text, caption),), 1, None, prefix)


# ----------------------------------------------------------------------------- held-out split


def _in_bucket(key: str) -> bool:
  return zlib.crc32(key.encode("utf-8")) % 100 < HELDOUT_PERCENT


def is_heldout(caption: str) -> bool:
  """Whether `caption` is reserved for evaluation (never used with split="train").

  Multi-object captions: held out iff their normalized canonical form (prefix stripped,
  rewordings merged, see Caption.normalized) hashes into the bucket, so evaluation tests
  new combinations. Single-object captions: the bare caption is always trained; a prefixed
  one is held out iff the full string hashes into the bucket (new phrasings).
  """
  cap = parse_caption(caption)
  if cap.kind == "single":
    return bool(cap.prefix) and _in_bucket(cap.text)
  return _in_bucket(cap.normalized().text)


# ----------------------------------------------------------------------------- rendering


def render(objects: list[Obj], resolution: int) -> np.ndarray:
  """Draws objects with flat fills (no anti-aliasing) on the background.

  A pixel (i, j) is filled when its centre (j + 0.5, i + 0.5) lies inside the shape.
  Returns uint8 (R, R, 3).
  """
  r = resolution
  image = np.empty((r, r, 3), np.uint8)
  image[:] = BACKGROUND
  for obj in objects:
    x0, y0, x1, y1 = obj.box
    # Only the pixels of the box can be inside the shape.
    i0, i1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), r)
    j0, j1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), r)
    py = np.arange(i0, i1, dtype=np.float64)[:, None] + 0.5
    px = np.arange(j0, j1, dtype=np.float64)[None, :] + 0.5
    mask = _shape_mask(obj.shape, obj.box, px, py)
    image[i0:i1, j0:j1][mask] = ALL_COLORS[obj.color]
  return image


def _shape_mask(shape: str, box, px: np.ndarray, py: np.ndarray) -> np.ndarray:
  """Boolean mask of pixel centres (px (1, W), py (H, 1)) inside the shape."""
  x0, y0, x1, y1 = box
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  w, h = x1 - x0, y1 - y0
  inside_box = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
  if shape == "square":
    return inside_box
  if shape == "circle":
    return ((px - cx) / (w / 2)) ** 2 + ((py - cy) / (h / 2)) ** 2 <= 1.0
  if shape == "triangle":
    # Apex at (cx, y0), base from (x0, y1) to (x1, y1).
    half_width = (py - y0) / h * (w / 2)
    return inside_box & (np.abs(px - cx) <= half_width)
  raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- layout


def _size_range(r: int) -> tuple[int, int]:
  """Integer box sides allowed at resolution r (pixels, inclusive)."""
  lo, hi = int(np.ceil(MIN_SIZE_FRAC * r)), int(np.floor(MAX_SIZE_FRAC * r))
  if lo > hi:
    raise ValueError(f"resolution {r} too small for the size range")
  return lo, hi


def _separated(a: tuple, b: tuple, gap: float) -> bool:
  """Whether boxes a and b are at least `gap` apart (along x or along y)."""
  gap_x = max(b[0] - a[2], a[0] - b[2])
  gap_y = max(b[1] - a[3], a[1] - b[3])
  return max(gap_x, gap_y) >= gap


def relation_holds(a: tuple, b: tuple, relation: str, margin: float,
                   dominant: bool = False) -> bool:
  """Whether box a is `relation` box b: centres differ by >= margin on that axis.

  dominant additionally asks the offset on that axis to be at least the other one, which
  the data uses so that "left of" scenes are not mostly "above" scenes.
  """
  dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  signed = {"to the left of": -dx, "to the right of": dx, "above": -dy, "below": dy}[relation]
  other = abs(dy) if relation in ("to the left of", "to the right of") else abs(dx)
  return signed >= margin and (not dominant or signed >= other)


def _place(rng: np.random.Generator, n: int, r: int, relation: str | None = None,
           tries: int = 1000) -> list[tuple[float, float, float, float]]:
  """Samples n non-touching integer boxes; for a relation, box 0 REL box 1 holds."""
  lo, hi = _size_range(r)
  edge, gap = EDGE_FRAC * r, GAP_FRAC * r
  first = int(np.ceil(edge))
  for _ in range(tries):
    sizes = rng.integers(lo, hi + 1, size=n).tolist()
    boxes = []
    for s in sizes:
      last = int(np.floor(r - edge - s))
      # One draw of candidate corners per object: per-call overhead dominates otherwise.
      for x0, y0 in rng.integers(first, last + 1, size=(50, 2)).tolist():
        box = (float(x0), float(y0), float(x0 + s), float(y0 + s))
        if not all(_separated(box, b, gap) for b in boxes):
          continue
        if relation and len(boxes) == 1 and not relation_holds(
            boxes[0], box, relation, RELATION_MARGIN_FRAC * r, True):
          continue
        boxes.append(box)
        break
      else:
        break
    if len(boxes) == n:
      return boxes
  raise RuntimeError(f"could not place {n} objects at resolution {r}")


# ----------------------------------------------------------------------------- scenes


def _random_caption(rng: np.random.Generator, kind: str) -> Caption:
  """A random canonical caption (no prefix) of the given scene kind."""
  def item():
    return (list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
  if kind == "single":
    return Caption("single", (item(),))
  if kind == "counting":
    return Caption("counting", (item(),), int(rng.choice(COUNTS)))
  a = item()
  b = item()
  while b == a:  # two identical objects would be a counting scene
    b = item()
  if kind == "two":
    return Caption("two", (a, b), 2)
  return Caption("position", (a, b), 2, RELATIONS[rng.integers(len(RELATIONS))])


def _scored_captions(cap: Caption, rng: np.random.Generator) -> tuple[list[str], list[float]]:
  """All captions of a scene built from `cap`, each with a CLIP-like score."""
  def score(base):
    return float(base + rng.uniform(-SCORE_JITTER, SCORE_JITTER))
  prefix = cap.prefix or PREFIXES[1 + rng.integers(len(PREFIXES) - 1)]
  full = cap.with_prefix("")
  out = [(full.text, score(SCORE_FULL)), (full.with_prefix(prefix).text, score(SCORE_PREFIXED))]
  if cap.kind in ("two", "position"):
    out.append((full.equivalent().text, score(SCORE_EQUIVALENT)))
  if cap.kind == "position":
    out.append((Caption("two", cap.items, 2).text, score(SCORE_COARSE)))
  if cap.kind != "single":
    which = cap.items[rng.integers(len(cap.items))]
    out.append((Caption("single", (which,)).text, score(SCORE_PARTIAL)))
  return [c for c, _ in out], [s for _, s in out]


def _scene_from_caption(cap: Caption, rng: np.random.Generator, resolution: int) -> Scene:
  """Lays out and renders a scene that `cap` describes exactly."""
  if cap.kind == "counting":
    specs = list(cap.items) * cap.count
  else:
    specs = list(cap.items)
  boxes = _place(rng, len(specs), resolution, cap.relation)
  objects = [Obj(c, s, b) for (c, s), b in zip(specs, boxes)]
  captions, scores = _scored_captions(cap, rng)
  return Scene(render(objects, resolution), objects, captions, scores, cap.kind)


def scene_for_prompt(prompt: str, rng: np.random.Generator, resolution: int) -> Scene:
  """A scene that `prompt` describes exactly (no held-out filtering)."""
  return _scene_from_caption(parse_caption(prompt), rng, resolution)


def sample_scene(rng: np.random.Generator, resolution: int, split: str = "train") -> Scene:
  """Samples a scene: template kind by SCENE_WEIGHTS, then layout, render, captions.

  split="train" drops held-out captions and re-draws (same kind, so the mix is kept) until
  a caption scoring >= SCORE_THRESHOLD remains; split="eval" keeps everything.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  kind = SCENE_KINDS[rng.choice(len(SCENE_KINDS), p=SCENE_WEIGHTS)]
  while True:
    scene = _scene_from_caption(_random_caption(rng, kind), rng, resolution)
    if split == "eval":
      return scene
    kept = [(c, s) for c, s in zip(scene.captions, scene.scores) if not is_heldout(c)]
    if any(s >= SCORE_THRESHOLD for _, s in kept):
      scene.captions = [c for c, _ in kept]
      scene.scores = [s for _, s in kept]
      return scene


class ShapesSource:
  """Random-access source (grain MapDataset.source): item i is deterministic in (seed, i).

  Items: {"image": uint8 (R, R, 3), "captions": list[str], "scores": list[float]}.
  """

  def __init__(self, resolution: int = 64, seed: int = 0, split: str = "train",
               size: int = 10_000_000):
    _size_range(resolution)  # fail early on a too small resolution
    self.resolution = resolution
    self.seed = seed
    self.split = split
    self.size = size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not -self.size <= i < self.size:
      raise IndexError(i)
    i %= self.size
    scene = sample_scene(np.random.default_rng([self.seed, i]), self.resolution, self.split)
    return {"image": scene.image, "captions": scene.captions, "scores": scene.scores}

  def __repr__(self) -> str:
    return (f"ShapesSource(resolution={self.resolution}, seed={self.seed}, "
            f"split={self.split!r}, size={self.size})")


# ----------------------------------------------------------------------------- evaluation prompts


def _all_items() -> list[tuple[str, str]]:
  return [(c, s) for c in COLORS for s in SHAPES]


def _prompt_pool(cat: str) -> list[str]:
  """All held-out prompts usable for evaluation category `cat`, in a fixed order."""
  items = _all_items()
  if cat in ("single", "colors"):
    caps = [Caption("single", (it,), prefix=p) for p in PREFIXES[1:] for it in items]
  elif cat == "counting":
    caps = [Caption("counting", (it,), n) for n in COUNTS for it in items]
  elif cat in ("two", "attribution"):
    # GenEval's two_object names two different classes; attribution also needs two colours.
    caps = [Caption("two", (a, b), 2) for a, b in itertools.permutations(items, 2)
            if a[1] != b[1] and (cat == "two" or a[0] != b[0])]
  elif cat == "position":
    caps = [Caption("position", (a, b), 2, rel) for rel in RELATIONS
            for a, b in itertools.permutations(items, 2)]
  else:
    raise ValueError(f"unknown category {cat!r}")
  return [c.text for c in caps if is_heldout(c.text)]


def eval_prompt_set(num: int, seed: int = 0) -> list[tuple[str, str]]:
  """`num` (prompt, category) pairs, all held out, balanced over CATEGORIES.

  Categories go round-robin (so any prefix of the list is balanced); within a category the
  held-out pool is shuffled by (seed, category) and cycled.
  """
  pools = {}
  for k, cat in enumerate(CATEGORIES):
    pool = _prompt_pool(cat)
    order = np.random.default_rng([seed, k]).permutation(len(pool))
    pools[cat] = [pool[j] for j in order]
  out = []
  for i in range(num):
    cat = CATEGORIES[i % len(CATEGORIES)]
    pool = pools[cat]
    out.append((pool[(i // len(CATEGORIES)) % len(pool)], cat))
  return out


def eval_prompts(num: int, seed: int = 0) -> list[str]:
  """The prompts of eval_prompt_set(num, seed)."""
  return [p for p, _ in eval_prompt_set(num, seed)]


def category(prompt: str) -> str:
  """The evaluation category of a prompt (one of CATEGORIES).

  The prompt's form decides, except that a single-object prompt is "single" or "colors" and
  a two-object prompt with two colours "two" or "attribution" by a stable hash of the prompt.
  """
  cap = parse_caption(prompt)
  parity = zlib.crc32(cap.text.encode("utf-8")) % 2
  if cap.kind == "single":
    return ("single", "colors")[parity]
  if cap.kind == "two":
    if cap.items[0][0] == cap.items[1][0]:
      return "two"
    return ("two", "attribution")[parity]
  return cap.kind
