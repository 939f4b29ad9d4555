"""Tests of GenEval-lite (sanajax/eval/geneval_lite.py) on the shapes data set."""
import json

import numpy as np
import pytest
from PIL import Image

from sanajax.data import shapes as S
from sanajax.eval import geneval_lite as G


def _renders(prompt_set, resolution, seed=0):
  rng = np.random.default_rng(seed)
  return [S.scene_for_prompt(p, rng, resolution) for p, _ in prompt_set]


def _blur3(images):
  """3x3 box blur of uint8 (N, H, W, 3), edges replicated."""
  x = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  out = sum(x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
  return np.round(out).astype(np.uint8)


@pytest.mark.parametrize("resolution", [32, 64])
def test_perfect_on_own_renders(resolution):
  ps = S.eval_prompt_set(120, seed=resolution)
  images = np.stack([s.image for s in _renders(ps, resolution)])
  res = G.evaluate(images, [p for p, _ in ps], [c for _, c in ps])
  assert res["overall"] == 1.0
  assert set(res["categories"]) == set(S.CATEGORIES)
  assert all(v["rate"] == 1.0 and v["total"] == 20 for v in res["categories"].values())
  assert res["num_images"] == 120 and all(res["per_image"])


def test_detect_objects_matches_ground_truth():
  ps = S.eval_prompt_set(60, seed=3)
  for scene in _renders(ps, 64, seed=1):
    found = G.detect_objects(scene.image)
    assert len(found) == len(scene.objects)
    for o in scene.objects:
      match = [d for d in found if (d.color, d.shape) == (o.color, o.shape)
               and np.abs(np.subtract(d.box, o.box)).max() <= 1.0]
      assert match, (o, found)


def test_robust_to_blur_and_noise():
  ps = S.eval_prompt_set(120, seed=5)
  images = np.stack([s.image for s in _renders(ps, 64, seed=2)])
  noisy = _blur3(images).astype(np.float32)
  noisy += np.random.default_rng(0).normal(0, 10, noisy.shape)
  noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
  res = G.evaluate(noisy, [p for p, _ in ps], [c for _, c in ps])
  assert res["overall"] >= 0.95


def test_speckle_is_not_an_object():
  scene = S.scene_for_prompt("three red circles", np.random.default_rng(0), 64)
  image = scene.image.copy()
  rng = np.random.default_rng(1)
  # Isolated palette-coloured pixels (and pairs) on the background.
  for _ in range(40):
    i, j = rng.integers(0, 63, size=2)
    if (image[i:i + 2, j:j + 2] == S.BACKGROUND).all():
      image[i, j:j + rng.integers(1, 3)] = S.COLORS["red"]
  assert G.check(G.detect_objects(image), "three red circles", "counting", 64)


@pytest.mark.parametrize("resolution", [32, 64])
def test_near_zero_on_noise(resolution):
  ps = S.eval_prompt_set(120, seed=0)
  noise = np.random.default_rng(resolution).integers(0, 256, (120, resolution, resolution, 3),
                                                      dtype=np.uint8)
  res = G.evaluate(noise, [p for p, _ in ps], [c for _, c in ps])
  assert res["overall"] <= 0.05
  blank = np.full((6, resolution, resolution, 3), S.BACKGROUND, np.uint8)
  assert G.evaluate(blank, [p for p, _ in ps[:6]], [c for _, c in ps[:6]])["overall"] == 0.0


def _other(seq, x):
  return next(v for v in seq if v != x)


def _wrong(prompt, cat):
  """A prompt of the same category that the image of `prompt` does not satisfy."""
  cap = S.parse_caption(prompt)
  items = list(cap.items)
  if cat == "single":  # another shape
    items[0] = (items[0][0], _other(S.SHAPES, items[0][1]))
  elif cat == "colors":  # another colour
    items[0] = (_other(S.COLORS, items[0][0]), items[0][1])
  elif cat == "two":  # the third shape instead of the second
    items[1] = (items[1][0], next(s for s in S.SHAPES if s not in (items[0][1], items[1][1])))
  elif cat == "attribution":  # colours swapped between the two objects
    items = [(items[1][0], items[0][1]), (items[0][0], items[1][1])]
  elif cat == "counting":  # one more or one fewer
    return S.Caption("counting", cap.items, 3 if cap.count != 3 else 4).text
  elif cat == "position":  # the opposite relation
    return S.Caption("position", cap.items, 2, S._INVERSE_RELATION[cap.relation]).text
  return S.Caption(cap.kind, tuple(items), cap.count, cap.relation, cap.prefix).text


def test_wrong_prompts_fail():
  ps = S.eval_prompt_set(120, seed=4)
  scenes = _renders(ps, 64, seed=3)
  images = np.stack([s.image for s in scenes])
  wrong = [_wrong(p, c) for p, c in ps]
  assert all(w != p for w, (p, _) in zip(wrong, ps))
  res = G.evaluate(images, wrong, [c for _, c in ps])
  assert res["overall"] == 0.0, [(w, c) for w, (_, c), ok in zip(wrong, ps, res["per_image"])
                                 if ok]


def test_check_rules():
  circle = S.Obj("red", "circle", (5, 20, 20, 35))
  objs = [circle, S.Obj("green", "square", (40, 22, 55, 37))]
  assert G.check([circle], "a blue circle", "single", 64)
  assert not G.check([circle], "a blue circle", "colors", 64)
  assert G.check([circle], "a red circle", "colors", 64)
  assert G.check(objs, "a red circle to the left of a green square", "position", 64)
  assert not G.check(objs, "a red circle above a green square", "position", 64)
  assert G.check(objs, "a blue circle and a red square", "two", 64)
  assert not G.check(objs, "a blue circle and a red square", "attribution", 64)
  assert not G.check(objs, "two red circles", "counting", 64)
  two_circles = [circle, S.Obj("red", "circle", (5, 45, 20, 60))]
  assert G.check(two_circles, "two red circles", "counting", 64)
  with pytest.raises(ValueError):
    G.check(objs, "a red circle", "counting", 64)


def test_extra_objects_and_clutter_fail():
  circle = S.Obj("red", "circle", (5, 20, 20, 35))
  # The named object plus an unnamed one is not the scene the prompt asks for.
  assert not G.check([circle, S.Obj("green", "square", (40, 22, 55, 37))], "a red circle", "single", 64)
  assert not G.check([circle], "a red circle", "single", 64, clutter=G.MAX_CLUTTER_FRAC + 0.01)
  # A correct render with coloured noise sprinkled over 20% of the background fails; clean passes.
  scene = S.scene_for_prompt("a red circle", np.random.default_rng(0), 64)
  rng = np.random.default_rng(1)
  noisy = scene.image.copy()
  bg = np.all(noisy == S.BACKGROUND, axis=-1) & (rng.random(noisy.shape[:2]) < 0.2)
  noisy[bg] = rng.integers(0, 256, (int(bg.sum()), 3))
  objects, clutter = G.analyze_batch(np.stack([scene.image, noisy]))
  assert clutter[0] == 0.0 and clutter[1] > G.MAX_CLUTTER_FRAC
  assert G.evaluate(np.stack([scene.image, noisy]), ["a red circle"] * 2, ["colors"] * 2)["per_image"] == [True, False]


def test_default_categories_and_table():
  prompts = ["three blue squares", "a red circle above a green square", "a red circle"]
  scenes = _renders([(p, None) for p in prompts], 64)
  res = G.evaluate([s.image for s in scenes], prompts)
  assert set(res["categories"]) == {"counting", "position", S.category("a red circle")}
  assert res["overall"] == 1.0
  table = G.format_table(res)
  assert "counting" in table and "overall" in table and "1.000" in table
  half = G.evaluate([scenes[0].image] * 2, ["three blue squares", "four blue squares"])
  assert half["overall"] == 0.5 and half["categories"]["counting"]["passed"] == 1


def test_cli(tmp_path, capsys):
  ps = S.eval_prompt_set(12, seed=0)
  img_dir = tmp_path / "images"
  img_dir.mkdir()
  for i, scene in enumerate(_renders(ps, 32)):
    Image.fromarray(scene.image).save(img_dir / f"{i:05d}.png")
  prompts_file = tmp_path / "prompts.txt"
  G.write_prompts_file(str(prompts_file), ps)
  out = tmp_path / "result.json"
  argv = [f"--images={img_dir}", f"--prompts_file={prompts_file}", f"--json_out={out}"]
  assert G.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary["overall"] == 1.0 and summary["num_images"] == 12
  assert set(summary["categories"]) == set(S.CATEGORIES)
  assert json.loads(out.read_text())["per_image"] == [True] * 12
  # Plain prompts (no categories) work too.
  prompts_file.write_text("".join(p + "\n" for p, _ in ps))
  assert G.main(argv[:2]) == 0
  # Mismatched image count and missing paths are clear errors.
  (img_dir / "00011.png").unlink()
  for bad in (argv[:2], [f"--images={tmp_path / 'nope'}", argv[1]],
              [argv[0], f"--prompts_file={tmp_path / 'nope.txt'}"]):
    with pytest.raises(SystemExit):
      G.main(bad)
  err = capsys.readouterr().err
  assert "11 numbered .png images" in err and "no such directory" in err
  assert "no such file" in err


def test_failure_reasons():
  red_circle = S.Obj("red", "circle", (5, 20, 20, 35))
  green_square = S.Obj("green", "square", (40, 22, 55, 37))
  pair = [red_circle, green_square]
  cases = [
      ([red_circle], "a red circle", "colors", 0.0, None),
      ([red_circle], "a red circle", "colors", G.MAX_CLUTTER_FRAC + 0.01, "clutter"),
      ([], "a red circle", "single", 0.0, "missing"),
      (pair, "a red circle", "single", 0.0, "extra"),
      ([green_square], "a red circle", "single", 0.0, "shape"),
      ([red_circle], "a blue circle", "single", 0.0, None),  # single ignores colour
      ([red_circle], "a blue circle", "colors", 0.0, "color"),
      (pair, "a red circle and a green circle", "two", 0.0, "shape"),
      (pair, "a green circle and a red square", "attribution", 0.0, "color"),
      ([red_circle, S.Obj("red", "circle", (5, 45, 20, 60))], "two red circles", "counting", 0.0, None),
      ([red_circle, S.Obj("blue", "circle", (5, 45, 20, 60))], "two red circles", "counting", 0.0, "color"),
      (pair, "a red circle to the left of a green square", "position", 0.0, None),
      (pair, "a red circle above a green square", "position", 0.0, "relation"),
  ]
  for objs, prompt, cat, clutter, want in cases:
    assert G.failure(objs, prompt, cat, 64, clutter) == want, (prompt, cat)
    assert G.check(objs, prompt, cat, 64, clutter) == (want is None)
  assert set(want for *_, want in cases) - {None} == set(G.FAILURE_REASONS)


def test_failures_are_counted_per_category():
  prompts = ["a red circle", "a red circle", "two blue squares"]
  scenes = _renders([(p, None) for p in prompts], 64)
  blank = np.full_like(scenes[0].image, S.BACKGROUND)
  # Right image, a blank one, and a render of the wrong colour for the counting prompt.
  wrong = S.scene_for_prompt("two red squares", np.random.default_rng(0), 64).image
  res = G.evaluate([scenes[0].image, blank, wrong], prompts, ["colors", "colors", "counting"])
  assert res["categories"]["colors"]["failures"] == {"missing": 1}
  assert res["categories"]["counting"]["failures"] == {"color": 1}
  assert res["per_image"] == [True, False, False]
  table = G.format_table(res)
  assert "missing 1" in table and "color 1" in table
