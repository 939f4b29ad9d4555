"""Caption choice for images that carry several captions.

SANA trains on several machine captions per image (VILA, InternVL, ...), each scored by
CLIP. Every time an image is read, one caption is drawn (`weighted_sample_clipscore` in
NVlabs/Sana `diffusion/data/datasets/sana_data.py`):

* captions whose score is >= `threshold` (SANA `clip_thr`, 25.0) are candidates, drawn
  with probability proportional to score^(1/temperature) (`clip_thr_temperature`, 0.1);
* when no caption passes, the highest-scoring one is used.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _weights(scores: Sequence[float], threshold: float,
             temperature: float) -> list[float]:
  """Unnormalised weights exp(log(score)/T - max); see `caption_weights`.

  Plain Python on purpose: N is a handful and this runs once per example, where numpy's
  per-call overhead would dominate.
  """
  if temperature <= 0:
    raise ValueError(f"caption temperature must be > 0, got {temperature}.")
  s = [float(x) for x in scores]
  # Weights are score^(1/T): with T=0.1 and scores ~30 that is ~1e15, so work in log
  # space and subtract the max before exponentiating. Non-positive scores get weight 0.
  logw = [math.log(x) / temperature if x >= threshold and x > 0 else -math.inf for x in s]
  top = max(logw)
  if top == -math.inf:  # Nothing passes: all mass on the best caption (first on ties).
    best = s.index(max(s))
    return [1.0 if j == best else 0.0 for j in range(len(s))]
  return [math.exp(lw - top) for lw in logw]


def caption_weights(scores: Sequence[float], threshold: float = 25.0,
                    temperature: float = 0.1) -> np.ndarray:
  """Sampling probabilities of each caption, SANA's `weighted_sample_clipscore` rule.

  Args:
    scores: (N,) CLIP scores, one per caption (CLIP-score units, ~0..40).
    threshold: captions scoring below it get probability 0.
    temperature: weights are score^(1/temperature); small values favour the best one.

  Returns:
    (N,) float64 probabilities summing to 1. When no caption passes the threshold, a
    one-hot on the best-scoring caption (first one on ties).
  """
  w = np.asarray(_weights(scores, threshold, temperature))
  return w / w.sum()


def pick_caption(captions: Sequence[str], scores: Sequence[float] | None,
                 rng: np.random.Generator, threshold: float = 25.0,
                 temperature: float = 0.1) -> str:
  """Draws one caption, weighted by CLIP score (see `caption_weights`).

  Args:
    captions: (N,) candidate captions, N >= 1.
    scores: (N,) CLIP scores, or None / empty when the source has none: then the
      choice is uniform.
    rng: numpy generator; the caller seeds it per example so the draw is reproducible.
    threshold, temperature: SANA's `clip_thr` and `clip_thr_temperature`.

  Returns:
    The chosen caption.
  """
  captions = list(captions)
  if not captions:
    raise ValueError("pick_caption got no captions; an image needs at least one "
                     "caption (use [''] for an uncaptioned image).")
  if len(captions) == 1:
    return captions[0]  # Nothing to choose; keeps the rng stream untouched.
  if scores is None or len(scores) == 0:
    return captions[int(rng.integers(len(captions)))]
  if len(scores) != len(captions):
    raise ValueError(f"pick_caption got {len(captions)} captions but {len(scores)} "
                     "scores; give one score per caption or none at all.")
  w = _weights(scores, threshold, temperature)
  # Inverse-CDF draw with one uniform. u < total, so the caption found has weight > 0.
  u = rng.random() * sum(w)
  acc = 0.0
  for caption, wj in zip(captions, w):
    acc += wj
    if u < acc:
      return caption
  return captions[max(j for j, wj in enumerate(w) if wj > 0)]  # Rounding guard.
