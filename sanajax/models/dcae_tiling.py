"""Tiled DC-AE encode / decode for 2K and 4K images: peak memory set by the tile, not the image.

The algorithm is diffusers' `AutoencoderDC.tiled_encode` / `tiled_decode` (enable_tiling), step
for step, so a sanajax image equals a diffusers one decoded from the same latent with the same
tile settings (tests/test_dcae_tiling.py):

  * tiles start at 0, stride, 2 stride, ... (< the image side) and are `tile` long, cut short at
    the image's right / bottom edge (so the last row / column of tiles is smaller);
  * each tile is encoded / decoded on its own (no context from its neighbours);
  * tiles are visited row by row; tile (i, j) is blended with the tile above it (rows) and then
    with the tile to its left (columns), both as ALREADY blended, over `tile - stride` pixels
    (latent pixels for encode) with the linear ramp b[y] = a[-e + y] (1 - y/e) + b[y] y/e
    (diffusers' blend_v / blend_h; e is cut to the smaller tile when an edge tile is short);
  * each blended tile keeps its first `stride` rows and columns and the pieces are concatenated.

SANA's reference decodes 4K with tile 1024 px, stride 896 px (model_zoo.md; 128 px of overlap),
the defaults here. diffusers' own defaults are 512 / 448.

Why `lax.map`: every tile of one shape goes through ONE `lax.map` (a `scan`) of the jitted
decoder, so XLA runs the tiles one after another in a while loop whose body buffers are reused:
peak memory is one tile's activations plus the (3-channel) tile outputs, whatever the image
size (measured in tests/test_dcae_tiling.py with `compile().memory_analysis()`). A Python loop
of per-tile calls would be unrolled inside `jit` (the Generator samples and decodes in one
jitted call): the decoder would be compiled once per tile and XLA free to schedule tiles side by
side. Tiles come in at most four shapes (full, short at the bottom, short at the right, both),
hence at most four compiled bodies. Batch stays inside the tile: (B, th, tw, C) per step.

Layouts are NHWC. Latents are raw (not multiplied by the diffusion scaling factor).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.models.dcae import DCAE

# SANA's reference 4K decoding (model_zoo.md): tile 1024 px, stride 896 px.
DEFAULT_TILE_PX = 1024
DEFAULT_STRIDE_PX = 896


def _check(model: DCAE, tile: int, stride: int) -> int:
  f = model.downsample_factor
  if tile <= 0 or stride <= 0 or stride > tile:
    raise ValueError(f"Tiling needs 0 < stride <= tile; got tile={tile}, stride={stride} (pixels).")
  if tile % f or stride % f:
    raise ValueError(f"Tile ({tile}) and stride ({stride}) must be multiples of the AE downsampling {f} pixels.")
  return f


def _spans(size: int, tile: int, stride: int) -> list[tuple[int, int]]:
  """[(start, length)] of the tiles along one axis: starts 0, stride, ... < size (diffusers' range)."""
  return [(s, min(tile, size - s)) for s in range(0, size, stride)]


def _map_tiles(fn: Callable[[jax.Array], jax.Array], tiles: list[list[jax.Array]]) -> list[list[jax.Array]]:
  """Applies fn to every tile, one `lax.map` per distinct tile shape (see the module docstring)."""
  groups: dict[tuple, list[tuple[int, int]]] = {}
  for i, row in enumerate(tiles):
    for j, t in enumerate(row):
      groups.setdefault(t.shape, []).append((i, j))
  out: list[list[Any]] = [[None] * len(row) for row in tiles]
  for where in groups.values():
    stacked = jnp.stack([tiles[i][j] for i, j in where])  # (n, B, th, tw, C)
    results = jax.lax.map(fn, stacked)
    for k, (i, j) in enumerate(where):
      out[i][j] = results[k]
  return out


def _ramp(extent: int) -> tuple[jax.Array, jax.Array]:
  """diffusers' blend weights (1 - y/e, y/e) for y < e: Python-float ratios rounded to float32."""
  y = np.arange(extent, dtype=np.float64)
  return jnp.asarray((1.0 - y / extent).astype(np.float32)), jnp.asarray((y / extent).astype(np.float32))


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """b with its first e entries along `axis` (1 = rows, 2 = columns) ramped in from a's last e."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  wa, wb = _ramp(extent)
  shape = [1] * b.ndim
  shape[axis] = extent
  a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  mixed = a_tail * wa.reshape(shape) + b_head * wb.reshape(shape)
  return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _blend_and_stitch(tiles: list[list[jax.Array]], blend: int, keep: int) -> jax.Array:
  """diffusers' in-place blend order (above first, then left, both already blended) and crop/concat."""
  rows = [list(r) for r in tiles]
  out_rows = []
  for i, row in enumerate(rows):
    pieces = []
    for j in range(len(row)):
      t = row[j]
      if i > 0:
        t = _blend(rows[i - 1][j], t, blend, axis=1)
      if j > 0:
        t = _blend(row[j - 1], t, blend, axis=2)
      row[j] = t  # diffusers blends in place: later neighbours see this blended tile.
      pieces.append(t[:, :keep, :keep])
    out_rows.append(jnp.concatenate(pieces, axis=2))
  return jnp.concatenate(out_rows, axis=1)


def tiled_decode(model: DCAE, params, latents: jax.Array, *, tile: int = DEFAULT_TILE_PX,
                 stride: int = DEFAULT_STRIDE_PX) -> jax.Array:
  """Raw latent (B, h, w, C) -> images (B, h f, w f, 3) float32, decoded in overlapping tiles.

  Args:
    model, params: a DCAE or an autoencoder_kl.AutoencoderKL (any AE module with downsample_factor,
      encode and decode: every function here takes either) and its (unboxed) params.
    latents: raw latents (divide diffusion latents by the scaling factor first).
    tile, stride: tile side and tile step in PIXELS (multiples of f); overlap = tile - stride.
  Traceable (jit it, or call it inside a jitted function); a latent no larger than one tile is
  decoded as a single tile, i.e. exactly as `model.decode`.
  """
  f = _check(model, tile, stride)
  if latents.ndim != 4:
    raise ValueError(f"tiled_decode expects latents (B, h, w, C); got shape {latents.shape}.")
  tl, sl = tile // f, stride // f
  tiles = [[latents[:, y:y + th, x:x + tw] for x, tw in _spans(latents.shape[2], tl, sl)]
           for y, th in _spans(latents.shape[1], tl, sl)]
  decode = lambda z: model.apply({"params": params}, z, method=model.decode)
  return _blend_and_stitch(_map_tiles(decode, tiles), tile - stride, stride)


def tiled_encode(model: DCAE, params, images: jax.Array, *, tile: int = DEFAULT_TILE_PX,
                 stride: int = DEFAULT_STRIDE_PX) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] -> raw latent (B, H // f, W // f, C) float32, in tiles.

  Tiles are `tile` pixels with step `stride`; a short edge tile whose side is not a multiple of f
  is zero-padded at its bottom / right first and the latent cropped to H // f, W // f (as
  diffusers). The latent tiles overlap by (tile - stride) / f and are blended there.
  """
  f = _check(model, tile, stride)
  if images.ndim != 4:
    raise ValueError(f"tiled_encode expects images (B, H, W, C); got shape {images.shape}.")
  h, w = images.shape[1], images.shape[2]

  def crop(y, th, x, tw):
    t = images[:, y:y + th, x:x + tw]
    pad_h, pad_w = (-th) % f, (-tw) % f
    return jnp.pad(t, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else t

  tiles = [[crop(y, th, x, tw) for x, tw in _spans(w, tile, stride)] for y, th in _spans(h, tile, stride)]
  encode = lambda x: model.apply({"params": params}, x, method=model.encode)
  z = _blend_and_stitch(_map_tiles(encode, tiles), (tile - stride) // f, stride // f)
  return z[:, :h // f, :w // f]


def tiling_from_config(ae_config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(tile_size_px, tile_stride_px) of an `ae` config; (0, 0) when the config has no tiling fields."""
  tile = int(ae_config.get("tile_size_px", 0) or 0)
  stride = int(ae_config.get("tile_stride_px", 0) or 0) or tile
  return tile, stride


def decode_latents(model: DCAE, params, latents: jax.Array, ae_config: ml_collections.ConfigDict) -> jax.Array:
  """Raw latent -> images, tiled when `ae_config.tile_size_px` > 0 and the image is larger than a tile.

  The rule is diffusers' (tile only when a side exceeds the tile), so with tile 1024 px 512 and
  1024 px images decode whole and 2K / 4K ones in tiles. Traceable.
  """
  tile, stride = tiling_from_config(ae_config)
  f = model.downsample_factor
  if tile and max(latents.shape[1], latents.shape[2]) * f > tile:
    return tiled_decode(model, params, latents, tile=tile, stride=stride)
  return model.apply({"params": params}, latents, method=model.decode)


def encode_images(model: DCAE, params, images: jax.Array, ae_config: ml_collections.ConfigDict) -> jax.Array:
  """Images -> raw latent, tiled when `ae_config.tile_size_px` > 0 and a side exceeds the tile."""
  tile, stride = tiling_from_config(ae_config)
  if tile and max(images.shape[1], images.shape[2]) > tile:
    return tiled_encode(model, params, images, tile=tile, stride=stride)
  return model.apply({"params": params}, images, method=model.encode)


__all__: Sequence[str] = ("tiled_decode", "tiled_encode", "decode_latents", "encode_images", "tiling_from_config",
                          "DEFAULT_TILE_PX", "DEFAULT_STRIDE_PX")
