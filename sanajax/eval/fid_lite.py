"""A Frechet distance on frozen AE-encoder features ("FID-lite"), for runs without Inception weights.

    fd = frechet_distance(encoder_features(ae_model, ae_params, images_a),
                          encoder_features(ae_model, ae_params, images_b))

Features: the DC-AE encoder's latents of uint8 images (N, R, R, 3), average-pooled to a
`pool` x `pool` grid and flattened, (N, pool * pool * latent_channels) float64 (the tiny f8c16 AE
at 64 px: 8x8x16 latents -> 4x4x16 = 256 features). The AE is trained for reconstruction only, so
this measures how far apart two image sets are in the statistics the AE preserves (colour, layout,
coarse shape), not perceptual quality the way Inception-FID does; compare numbers only under the
same AE, pool and sample counts (the estimate is biased upwards at small N, as FID is).

Frechet distance of Gaussians fitted to the two sets:
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2),
with the matrix square root of the symmetric PSD product taken by eigendecomposition (float64).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sanajax.data.sources import make_source


@functools.partial(jax.jit, static_argnums=(0, 3))
def _features(ae_model, ae_params, images, pool: int):
  x = images.astype(jnp.float32) / 127.5 - 1.0
  z = ae_model.apply({"params": ae_params}, x, method=ae_model.encode)
  b, h, w, c = z.shape
  if h % pool or w % pool:
    raise ValueError(f"Latent grid {h}x{w} is not divisible by pool={pool}.")
  z = z.reshape(b, pool, h // pool, pool, w // pool, c).mean(axis=(2, 4))
  return z.reshape(b, -1)


def encoder_features(ae_model, ae_params, images: np.ndarray, *, pool: int = 4, batch_size: int = 128) -> np.ndarray:
  """uint8 images (N, R, R, 3) -> pooled encoder latents (N, pool * pool * C), float64."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"encoder_features expects uint8 images (N, R, R, 3), got {images.dtype} {images.shape}.")
  out = [np.asarray(_features(ae_model, ae_params, jnp.asarray(images[i:i + batch_size]), pool), np.float64)
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to (N_a, D) and (N_b, D) features (N >= 2 each)."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"frechet_distance needs (N, D) features with equal D and N >= 2, got {a.shape} and {b.shape}.")
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root_a = _sqrt_psd(s_a)
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)


def data_images(source: str, resolution: int, num: int, *, seed: int = 0, split: str = "train") -> np.ndarray:
  """The first `num` images (N, R, R, 3) uint8 of a data source (sanajax.data.sources.make_source)."""
  src = make_source(source, resolution, seed, split=split)
  images = []
  i = 0
  while len(images) < num and i < len(src):
    item = src[i]
    if item["image"] is not None:
      images.append(item["image"])
    i += 1
  return np.stack(images)
