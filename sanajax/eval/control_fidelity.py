"""Control fidelity of a ControlNet on the shapes data: do the objects land where the condition put them?

For held-out scenes (drawn from their own random stream, never a training index), the condition is
the scene's Canny edge map and the prompt its full caption. GenEval-lite's detector
(eval.geneval_lite.detect_objects_batch) finds the objects of each sample; each detected object's
mask is its detected shape drawn in its detected box (shapes.render; an "unknown" shape fills its
box). Each true object of the control scene is matched one-to-one (greedy, highest IoU first, any
colour: the edges carry no colour) to a detected mask:

  mean_iou      mean over the true objects of their matched mask IoU (0 when unmatched)
  placed_frac   share of scenes whose every object is matched with IoU >= PLACED_IOU

reported with and without the ControlNet on the same prompts and noise (docs/controlnet.md).

    result = evaluate_controlnet_run(config, workdir)     # after training; WORKDIR/control_fidelity.json
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from sanajax.data import shapes
from sanajax.data.conditions import condition_images
from sanajax.eval.geneval_lite import detect_objects_batch
from sanajax.generation import Generator
from sanajax.workdir.loaders import load_controlnet

PLACED_IOU = 0.5  # an object "lands where the control put it" at IoU >= 0.5 (the usual detection match)
_SCENE_SALT = 29  # the held-out scenes' own random stream: np.random.default_rng([seed, i, 29])
RESULT_FILE = "control_fidelity.json"


def control_scenes(num: int, resolution: int, seed: int = 0) -> list[shapes.Scene]:
  """`num` held-out scenes (all templates, shapes' "eval" split) from their own random stream."""
  return [shapes.sample_scene(np.random.default_rng([seed, i, _SCENE_SALT]), resolution, "eval") for i in range(num)]


def object_mask(obj: shapes.Obj, resolution: int) -> np.ndarray:
  """bool (R, R): the pixels of `obj` drawn alone (an unknown shape fills its box)."""
  shape = obj.shape if obj.shape in shapes.SHAPES else "square"
  image = shapes.render([shapes.Obj("black", shape, obj.box)], resolution)
  return np.any(image != np.array(shapes.BACKGROUND, np.uint8), axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 0.0


def scene_fidelity(truth: Sequence[shapes.Obj], detected: Sequence[shapes.Obj], resolution: int) -> list[float]:
  """Matched IoU of each true object (greedy one-to-one on the highest IoU; 0 when unmatched)."""
  true_masks = [object_mask(o, resolution) for o in truth]
  det_masks = [object_mask(o, resolution) for o in detected]
  pairs = sorted(((_iou(t, d), i, j) for i, t in enumerate(true_masks) for j, d in enumerate(det_masks)), reverse=True)
  best = [0.0] * len(truth)
  used_t, used_d = set(), set()
  for iou, i, j in pairs:
    if i in used_t or j in used_d or iou <= 0:
      continue
    best[i] = iou
    used_t.add(i)
    used_d.add(j)
  return best


def fidelity(images: np.ndarray, scenes: Sequence[shapes.Scene]) -> dict:
  """{"mean_iou", "placed_frac", "num_scenes"} of samples uint8 (N, R, R, 3) against their control scenes."""
  resolution = images.shape[1]
  detected = detect_objects_batch(images)
  ious, placed = [], []
  for scene, found in zip(scenes, detected):
    best = scene_fidelity(scene.objects, found, resolution)
    ious.extend(best)
    placed.append(all(v >= PLACED_IOU for v in best))
  return {"mean_iou": float(np.mean(ious)), "placed_frac": float(np.mean(placed)), "num_scenes": len(scenes)}


def sample_scenes(generator: Generator, scenes: Sequence[shapes.Scene], *, controlled: bool, condition: str,
                  options: dict, sampler: str, steps: int, cfg: float, seed: int = 0, control_scale: float = 1.0,
                  batch_size: int = 32) -> tuple[np.ndarray, float]:
  """(uint8 samples (N, R, R, 3), seconds per image after compiling) of the scenes' captions; controlled: each
  with its scene's condition (the generator has a ControlNet attached), else the generator's model alone.
  Batch k's noise is seed + k's, the same with and without control."""
  prompts = [s.captions[0] for s in scenes]
  conditions = condition_images(condition, np.stack([s.image for s in scenes]), options)
  out, elapsed, timed = [], 0.0, 0
  for k, start in enumerate(range(0, len(scenes), batch_size)):
    chunk = slice(start, start + batch_size)
    if controlled:
      generator.set_control(conditions[chunk], control_scale)
    t0 = time.perf_counter()
    images = generator.generate(prompts[chunk], sampler=sampler, steps=steps, cfg=cfg, seed=seed + k,
                                batch_size=batch_size)
    if k > 0 or len(scenes) <= batch_size:  # the first call compiles (unless it is the only one)
      elapsed, timed = elapsed + time.perf_counter() - t0, timed + len(images)
    out.append(images)
  return np.concatenate(out), elapsed / max(timed, 1)


def compare(base: Generator, controlled: Generator, scenes: Sequence[shapes.Scene], *, condition: str, options: dict,
            sampler: str, steps: int, cfg: float, seed: int = 0, batch_size: int = 32) -> dict:
  """Control fidelity and seconds per image with and without the ControlNet (same prompts and noise)."""
  result = {"sampler": sampler, "steps": int(steps), "cfg": float(cfg)}
  for name, gen, on in (("without", base, False), ("with", controlled, True)):
    images, per_image = sample_scenes(gen, scenes, controlled=on, condition=condition, options=options,
                                      sampler=sampler, steps=steps, cfg=cfg, seed=seed, batch_size=batch_size)
    result[name] = {**fidelity(images, scenes), "seconds_per_image": per_image}
    result[f"{name}_images"] = images
  return result


def evaluate_controlnet_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """After training: control fidelity of the ControlNet in `workdir` on config.eval.control_scenes held-out
  scenes with the config's sampler, vs its base alone; writes WORKDIR/control_fidelity.json."""
  cn = config.controlnet
  num = int(config.eval.get("control_scenes", 64))
  scenes = control_scenes(num, int(config.data.resolution), int(config.seed))
  base = Generator.from_workdir(cn.base_workdir)
  controlled = Generator.from_workdir(cn.base_workdir)
  model, params, _ = load_controlnet(workdir)
  controlled.attach_controlnet(model, params)
  options = {"low": cn.get("canny_low", 100.0), "high": cn.get("canny_high", 200.0),
             "blur_sigma": cn.get("canny_blur_sigma", 0.0)}
  result = compare(base, controlled, scenes, condition=cn.condition, options=options,
                   sampler=config.sample.sampler, steps=int(config.sample.steps), cfg=float(config.sample.cfg),
                   seed=int(config.seed))
  result.pop("with_images")
  result.pop("without_images")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULT_FILE), "w") as f:
      json.dump(result, f, indent=2)
    print(f"Control fidelity ({num} held-out scenes, {result['sampler']} {result['steps']} steps): mean IoU "
          f"{result['with']['mean_iou']:.3f} with the ControlNet vs {result['without']['mean_iou']:.3f} without; "
          f"all objects placed in {result['with']['placed_frac']:.2f} vs {result['without']['placed_frac']:.2f} "
          f"of the scenes.", flush=True)
  return result
