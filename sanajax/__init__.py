"""sanajax: SANA / SANA-Sprint text-to-image in JAX + Flax."""

__version__ = "0.1.0"
