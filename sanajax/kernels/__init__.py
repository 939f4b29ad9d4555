"""Kernels for sanajax, the bottom layer (imports nothing else of sanajax).

  linear_attention.py  ReLU linear attention: a pure-jnp reference and Pallas backends with the same signature
                       (Triton / Mosaic GPU / Mosaic TPU); `impl` picks one; `abstract_gpu` names the GPU
                       that a lowering for "cuda" targets on a machine without one
  depthwise_conv.py    depthwise 'same' conv as shifted multiply-adds (the DiT's Mix-FFN and the AE's convs)
"""
from __future__ import annotations

from sanajax.kernels.depthwise_conv import depthwise_conv2d
from sanajax.kernels.linear_attention import (
  abstract_gpu,
  linear_attention,
  linear_attention_reference,
  linear_attention_vjp_only,
)

__all__ = ["abstract_gpu", "depthwise_conv2d", "linear_attention", "linear_attention_reference",
           "linear_attention_vjp_only"]
