"""ControlNet conditions: Canny edge maps in numpy (no OpenCV) and user-supplied condition images.

    edges = canny(images)                      # uint8 (B, H, W, 3) -> bool (B, H, W)
    control = edge_image(images)               # uint8 (B, H, W, 3): white edges on black, ControlNet's form
    control, note = load_control_image(path, resolution)   # any condition map (canny, depth, HED) from a file

A condition image is encoded by the DC-AE like the training images (sanajax.models.controlnet.
encode_control), as SanaControlNetPipeline does, so any 3-channel map the user supplies (depth, HED,
scribble) is a "generic" condition: the ControlNet learns what it means.

Canny follows OpenCV's `cv2.Canny(gray, low, high)` (the detector ControlNet's canny models are
trained with; diffusers' and lllyasviel's examples use low 100, high 200): 3x3 Sobel gradients of the
uint8 grey image (BT.601 luma, as cv2.cvtColor), L1 magnitude |gx| + |gy|, non-maximum suppression
along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis: pixels >= high are
edges, pixels >= low are edges when 8-connected to one. No Gaussian blur, as cv2.Canny (blur_sigma > 0
adds one first).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

CANNY_LOW = 100.0  # cv2.Canny thresholds of the ControlNet canny examples (lllyasviel/ControlNet gradio_canny2image)
CANNY_HIGH = 200.0
CONDITIONS = ("canny",)  # computed from the training image; other maps come as images (load_control_image)
_TAN_22_5 = np.tan(np.pi / 8)


def grayscale(images: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) -> float32 (..., H, W) luma 0.299 R + 0.587 G + 0.114 B, in 0..255."""
  x = np.asarray(images, np.float32)
  return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _blur(gray: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur (radius 3 sigma, edge-replicated borders) of (B, H, W)."""
  r = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  out = gray
  for axis in (1, 2):
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    p = np.pad(out, pad, mode="edge")
    n = out.shape[axis]
    out = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return out


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """3x3 Sobel (gx, gy) of (B, H, W) with reflected borders (OpenCV's BORDER_REFLECT_101)."""
  p = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="reflect")
  s = lambda dy, dx: p[:, 1 + dy:p.shape[1] - 1 + dy, 1 + dx:p.shape[2] - 1 + dx]
  gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
  gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
  return gx, gy


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
  """a[:, i + dy, j + dx] at (i, j), `fill` outside (B, H, W)."""
  out = np.full_like(a, fill)
  h, w = a.shape[1:]
  out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
      a[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
  return out


def canny(images: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH,
          blur_sigma: float = 0.0) -> np.ndarray:
  """Canny edges of uint8 images (B, H, W, 3) or (H, W, 3) -> bool (B, H, W) (or (H, W)); see the module docstring.

  low, high: hysteresis thresholds on the L1 Sobel magnitude (cv2.Canny's threshold1, threshold2).
  blur_sigma: optional Gaussian blur of the grey image first (0: none, as cv2.Canny).
  """
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"canny expects uint8 images (B, H, W, 3), got shape {images.shape}.")
  if not 0 <= low <= high:
    raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}.")
  # cv2 converts to uint8 grey first (rounded), so thresholds mean the same on the same images.
  gray = np.round(grayscale(images)).astype(np.float32)
  if blur_sigma > 0:
    gray = _blur(gray, blur_sigma)
  gx, gy = _sobel(gray)
  mag = np.abs(gx) + np.abs(gy)
  ax, ay = np.abs(gx), np.abs(gy)
  # Direction bins of cv2: horizontal gradient (compare left/right), vertical, and the two diagonals.
  horizontal = ay <= ax * _TAN_22_5
  vertical = ax <= ay * _TAN_22_5
  diag = ~(horizontal | vertical)
  same_sign = (gx * gy) > 0  # gradient along (1, 1) in (x, y): the "\" diagonal neighbours
  keep = np.zeros(mag.shape, bool)
  # cv2's asymmetric tie rule: strictly greater than one neighbour, >= the other (one pixel per ridge).
  for mask, (dy1, dx1), (dy2, dx2) in (
      (horizontal, (0, -1), (0, 1)), (vertical, (-1, 0), (1, 0)),
      (diag & same_sign, (-1, -1), (1, 1)), (diag & ~same_sign, (-1, 1), (1, -1))):
    n1, n2 = _shift(mag, dy1, dx1, 0.0), _shift(mag, dy2, dx2, 0.0)
    keep |= mask & (mag > n1) & (mag >= n2)
  keep &= mag > low
  strong = keep & (mag > high)
  edges = strong
  while True:  # hysteresis: grow the strong edges through 8-connected weak ones until nothing changes
    grown = edges.copy()
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy or dx:
          grown |= _shift(edges, dy, dx, False)
    grown &= keep
    if np.array_equal(grown, edges):
      break
    edges = grown
  return edges[0] if single else edges


def edge_image(images: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH,
               blur_sigma: float = 0.0) -> np.ndarray:
  """The control image of Canny ControlNets: uint8 (..., H, W, 3), 255 on edges, 0 elsewhere."""
  edges = canny(images, low, high, blur_sigma)
  return np.repeat((edges.astype(np.uint8) * 255)[..., None], 3, axis=-1)


def condition_images(kind: str, images: np.ndarray, options: dict | None = None) -> np.ndarray:
  """The condition of training images for a ControlNet: uint8 (B, H, W, 3) -> uint8 (B, H, W, 3).

  kind: "canny" (edge_image with options low, high, blur_sigma)."""
  o = dict(options or {})
  if kind == "canny":
    return edge_image(images, float(o.get("low", CANNY_LOW)), float(o.get("high", CANNY_HIGH)),
                      float(o.get("blur_sigma", 0.0)))
  raise ValueError(f"controlnet.condition={kind!r}: use one of {CONDITIONS} (other maps are given as images).")


def load_control_image(path: str, resolution: int | tuple[int, int]) -> tuple[np.ndarray, str]:
  """(uint8 (H, W, 3), note) of a condition image file (an edge, depth, HED or scribble map) at `resolution`.

  An image of another size is resized to it (bicubic, as diffusers' image processor resizes a PIL
  control image; a different aspect ratio is stretched) and `note` says so; "" when nothing changed.
  Greyscale or RGBA files become RGB. A missing or undecodable file raises ValueError naming it.
  """
  h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
  if not os.path.exists(path):
    raise ValueError(f"--control={path!r} does not exist.")
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      size = img.size  # (W, H)
      note = ""
      if size != (w, h):
        note = (f"--control image {path} is {size[0]}x{size[1]}; resized to the model's {w}x{h} "
                f"({'aspect ratio changed; ' if size[0] * h != size[1] * w else ''}give a {w}x{h} image to avoid this).")
        img = img.resize((w, h), Image.BICUBIC)
      return np.asarray(img, np.uint8), note
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"--control={path!r} is not a readable image ({e}).") from None
