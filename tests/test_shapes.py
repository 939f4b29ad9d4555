"""Tests of the procedural shapes data set (sanajax/data/shapes.py, spec SHAPES.md)."""
import collections
import itertools

import numpy as np
import pytest

from sanajax.data import shapes as S


def _scenes(num, resolution, split="eval", seed=0):
  rng = np.random.default_rng(seed)
  return [S.sample_scene(rng, resolution, split) for _ in range(num)]


def test_constants():
  assert S.BACKGROUND == (245, 245, 245)
  assert list(S.COLORS.items()) == [
    ("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 80, 220)),
    ("yellow", (235, 200, 40)), ("purple", (140, 60, 180)), ("orange", (240, 130, 30)),
    ("cyan", (40, 190, 200)), ("black", (30, 30, 30))]
  assert S.SHAPES == ("circle", "square", "triangle")
  assert S.NUMBERS == ("one", "two", "three", "four")
  assert S.PREFIXES == ("", "a photo of ", "an image showing ", "a drawing of ")
  assert sum(S.SCENE_WEIGHTS) == pytest.approx(1.0)
  assert min(S.SCENE_WEIGHTS) >= 0.15


def test_vocab_is_exactly_the_caption_words():
  assert S.VOCAB == sorted(set(S.VOCAB))
  assert all(w == w.lower() and " " not in w for w in S.VOCAB)
  words = set()
  for scene in _scenes(300, 32):
    for c in scene.captions:
      words.update(c.split())
  for cat in S.CATEGORIES:
    for p in S._prompt_pool(cat):
      words.update(p.split())
  assert words == set(S.VOCAB)


def test_grammar():
  assert S.Caption("single", (("orange", "square"),)).text == "an orange square"
  assert S.Caption("single", (("red", "circle"),), prefix="an image showing ").text == (
    "an image showing a red circle")
  assert S.Caption("counting", (("red", "circle"),), 3).text == "three red circles"
  two = S.Caption("two", (("orange", "triangle"), ("cyan", "square")), 2)
  assert two.text == "an orange triangle and a cyan square"
  pos = S.Caption("position", (("red", "circle"), ("orange", "square")), 2, "to the left of")
  assert pos.text == "a red circle to the left of an orange square"
  assert pos.equivalent().text == "an orange square to the right of a red circle"
  for cap in (two, pos, S.Caption("counting", (("black", "triangle"),), 4, prefix="a photo of ")):
    assert S.parse_caption(cap.text) == cap
  for bad in ("a orange square", "an red circle", "three red circle", "two red hexagons",
              "a red circle near a blue square", "red circle", "one red circle"):
    with pytest.raises(ValueError):
      S.parse_caption(bad)


def test_render_exact_fills():
  objs = [S.Obj("orange", "square", (2.0, 3.0, 12.0, 13.0)),
          S.Obj("purple", "circle", (20.0, 2.0, 30.0, 12.0)),
          S.Obj("cyan", "triangle", (4.0, 18.0, 14.0, 28.0))]
  im = S.render(objs, 32)
  assert im.dtype == np.uint8 and im.shape == (32, 32, 3)
  # Square: exactly its box.
  assert (im[3:13, 2:12] == S.COLORS["orange"]).all()
  assert (im[2, 2:12] == S.BACKGROUND).all() and (im[13, 2:12] == S.BACKGROUND).all()
  # Circle: centre filled, box corners empty, colour exact.
  assert (im[7, 25] == S.COLORS["purple"]).all()
  assert (im[2, 20] == S.BACKGROUND).all() and (im[11, 29] == S.BACKGROUND).all()
  # Triangle: apex up, row widths grow downward, base spans the box width.
  tri = (im[18:28, 4:14] == S.COLORS["cyan"]).all(-1)
  widths = tri.sum(1)
  assert widths[0] <= 2 and widths[-1] == 10
  assert (np.diff(widths) >= 0).all()
  # Only flat palette fills: no anti-aliasing.
  colors = {tuple(c) for c in np.unique(im.reshape(-1, 3), axis=0).tolist()}
  assert colors == {S.BACKGROUND, S.COLORS["orange"], S.COLORS["purple"], S.COLORS["cyan"]}


@pytest.mark.parametrize("resolution", [32, 64, 100])
def test_scene_geometry(resolution):
  r = resolution
  for scene in _scenes(60 if r > 64 else 100, r, seed=r):
    assert 1 <= len(scene.objects) <= 4
    assert scene.image.shape == (r, r, 3) and scene.image.dtype == np.uint8
    for o in scene.objects:
      x0, y0, x1, y1 = o.box
      assert 0.22 * r <= x1 - x0 <= 0.34 * r and x1 - x0 == y1 - y0
      assert min(x0, y0) >= 0.02 * r and max(x1, y1) <= 0.98 * r
    for a, b in itertools.combinations(scene.objects, 2):
      gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
      gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
      assert max(gap_x, gap_y) >= 0.04 * r
    want = {S.BACKGROUND} | {S.COLORS[o.color] for o in scene.objects}
    assert {tuple(c) for c in np.unique(scene.image.reshape(-1, 3), axis=0).tolist()} == want
    np.testing.assert_array_equal(scene.image, S.render(scene.objects, r))


def _describes(caption, objects, r):
  """Whether a full caption (score >= 25) describes the objects exactly."""
  cap = S.parse_caption(caption)
  have = sorted((o.color, o.shape) for o in objects)
  if cap.kind == "counting":
    return have == [cap.items[0]] * cap.count
  if cap.kind == "single":
    return have == [cap.items[0]]
  if have != sorted(cap.items):
    return False
  if cap.kind == "two":
    return True
  a = next(o for o in objects if (o.color, o.shape) == cap.items[0])
  b = next(o for o in objects if (o.color, o.shape) == cap.items[1])
  return S.relation_holds(a.box, b.box, cap.relation, 0.1 * r)


@pytest.mark.parametrize("resolution", [32, 64])
def test_captions_describe_the_image(resolution):
  for scene in _scenes(300, resolution, seed=1):
    assert len(scene.captions) == len(scene.scores) >= 2
    for c, s in zip(scene.captions, scene.scores):
      if s >= S.SCORE_THRESHOLD:
        assert _describes(c, scene.objects, resolution), (c, scene.objects)
      else:  # partial caption: names one object that is there
        cap = S.parse_caption(c)
        assert cap.kind == "single" and len(scene.objects) >= 2
        assert cap.items[0] in {(o.color, o.shape) for o in scene.objects}


def test_three_objects_only_in_counting_scenes():
  for scene in _scenes(300, 64, seed=2):
    if len(scene.objects) >= 3:
      assert scene.kind == "counting"
      assert len({(o.color, o.shape) for o in scene.objects}) == 1


def test_scores():
  by_form = collections.defaultdict(list)
  for scene in _scenes(300, 32, seed=3):
    cap0 = S.parse_caption(scene.captions[0])
    reworded = cap0.equivalent().text if cap0.kind in ("two", "position") else None
    for c, s in zip(scene.captions, scene.scores):
      assert c == reworded or s <= scene.scores[0]
      cap = S.parse_caption(c)
      if c in (scene.captions[0], reworded):
        by_form["full"].append(s)
      elif cap.prefix:
        by_form["prefixed"].append(s)
      elif cap.kind == "single":
        by_form["partial"].append(s)
      elif cap.kind == "two" and scene.kind == "position":
        by_form["coarse"].append(s)
  for form, (lo, hi) in {"full": (30, 32), "prefixed": (28, 31), "coarse": (26, 28),
                         "partial": (20, 23)}.items():
    assert by_form[form] and lo <= min(by_form[form]) and max(by_form[form]) <= hi, form
  assert max(by_form["partial"]) < S.SCORE_THRESHOLD <= min(by_form["coarse"])


def test_scene_mix():
  counts = collections.Counter(s.kind for s in _scenes(1000, 32, split="train", seed=4))
  for kind, weight in zip(S.SCENE_KINDS, S.SCENE_WEIGHTS):
    assert abs(counts[kind] / 1000 - weight) < 0.05, (kind, counts)


def test_source_determinism():
  src = S.ShapesSource(resolution=32, seed=7, size=100)
  assert len(src) == 100
  a, b = src[5], S.ShapesSource(resolution=32, seed=7, size=100)[5]
  assert set(a) == {"image", "captions", "scores"}
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["captions"] == b["captions"] and a["scores"] == b["scores"]
  c, d = src[6], S.ShapesSource(resolution=32, seed=8, size=100)[5]
  assert not np.array_equal(a["image"], c["image"]) or a["captions"] != c["captions"]
  assert not np.array_equal(a["image"], d["image"]) or a["captions"] != d["captions"]
  with pytest.raises(IndexError):
    src[100]


def test_heldout_rule():
  items = [(c, s) for c in S.COLORS for s in S.SHAPES]
  canon = [S.Caption("two", p, 2).text for p in itertools.permutations(items, 2)]
  canon += [S.Caption("counting", (it,), n).text for n in S.COUNTS for it in items]
  frac = np.mean([S.is_heldout(c) for c in canon])
  assert 0.08 < frac < 0.22
  for c in canon:  # the prefix never changes a multi-object caption's status
    assert S.is_heldout("a drawing of " + c) == S.is_heldout(c)
  for a, b in itertools.permutations(items[:8], 2):  # rewordings share the status
    for rel in S.RELATIONS:
      cap = S.Caption("position", (a, b), 2, rel)
      assert S.is_heldout(cap.text) == S.is_heldout(cap.equivalent().text)
    two = S.Caption("two", (a, b), 2)
    assert S.is_heldout(two.text) == S.is_heldout(two.equivalent().text)
  singles = [S.Caption("single", (it,)).text for it in items]
  assert not any(S.is_heldout(c) for c in singles)
  prefixed = [p + c for p in S.PREFIXES[1:] for c in singles]
  assert 0.05 < np.mean([S.is_heldout(c) for c in prefixed]) < 0.3


def test_heldout_never_in_train():
  src = S.ShapesSource(resolution=32, seed=0, split="train")
  seen = 0
  for i in range(2000):
    item = src[i]
    assert item["captions"] and max(item["scores"]) >= S.SCORE_THRESHOLD
    for c in item["captions"]:
      assert not S.is_heldout(c), c
      seen += 1
  assert seen > 4000
  # ...while the eval split does produce held-out captions.
  ev = S.ShapesSource(resolution=32, seed=0, split="eval")
  assert any(S.is_heldout(c) for i in range(300) for c in ev[i]["captions"])


def test_eval_prompts():
  ps = S.eval_prompt_set(120, seed=0)
  assert len(ps) == 120 and ps == S.eval_prompt_set(120, seed=0)
  assert S.eval_prompts(120) == [p for p, _ in ps]
  assert ps != S.eval_prompt_set(120, seed=1)
  counts = collections.Counter(c for _, c in ps)
  assert set(counts) == set(S.CATEGORIES) and set(counts.values()) == {20}
  kinds = {"single": "single", "colors": "single", "two": "two", "attribution": "two",
           "counting": "counting", "position": "position"}
  for p, c in ps:
    assert S.is_heldout(p), p
    cap = S.parse_caption(p)
    assert cap.kind == kinds[c]
    if c in ("two", "attribution"):
      assert cap.items[0][1] != cap.items[1][1]
    if c == "attribution":
      assert cap.items[0][0] != cap.items[1][0]
    assert S.category(p) in [k for k, v in kinds.items() if v == cap.kind]
  # Variety: many distinct prompts per category when there are enough.
  assert len({p for p, c in ps if c == "position"}) == 20


def test_category():
  assert S.category("three blue squares") == "counting"
  assert S.category("a red circle above a green square") == "position"
  assert S.category("a red circle and a red square") == "two"
  singles = {S.category(p + "a " + c + " circle") for p in S.PREFIXES for c in ("red", "blue",
                                                                               "green", "cyan")}
  assert singles == {"single", "colors"}


@pytest.mark.parametrize("prompt", ["four black triangles", "a photo of an orange circle",
                                    "a cyan square below a red triangle",
                                    "a yellow circle and a yellow square"])
def test_scene_for_prompt(prompt):
  scene = S.scene_for_prompt(prompt, np.random.default_rng(0), 64)
  assert _describes(prompt, scene.objects, 64)
  assert _describes(scene.captions[0], scene.objects, 64)
