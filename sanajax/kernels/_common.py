"""Helpers shared by the Pallas backends of sanajax.kernels."""
import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  """The smallest multiple of m that is >= x."""
  return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of x up to `size` (no-op when already that size)."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)
