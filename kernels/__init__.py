"""Kernels for sanajax, importable as `sanajax.kernels`.

Every kernel has a pure-jnp reference with the same signature; `impl` picks one.
"""
from sanajax.kernels.linear_attention import (linear_attention, linear_attention_reference,
                                              linear_attention_vjp_only)

__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_vjp_only"]
