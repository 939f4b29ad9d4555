"""Kernels for sanajax: ReLU linear attention (jnp reference, Pallas Triton / Mosaic GPU / TPU backends).

Every kernel has a pure-jnp reference with the same signature; `impl` picks one.
"""
from __future__ import annotations

from sanajax.kernels.linear_attention import linear_attention, linear_attention_reference, linear_attention_vjp_only

__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_vjp_only"]
