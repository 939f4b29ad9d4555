"""Lowering a function for an accelerator on this CPU machine, and the kernels the lowered program calls
(tests/test_kernels.py, tests/test_benchmarks.py). Inputs may be ShapeDtypeStructs: nothing is allocated."""
import contextlib
import re

import jax

from sanajax.kernels import abstract_gpu

# Custom-call targets of the Pallas backends in lowered StableHLO.
TRITON = "__gpu$xla.gpu.triton"
MOSAIC_GPU = "mosaic_gpu_v2"
MOSAIC_TPU = "tpu_custom_call"


def kernel_calls(fn, *args, platform: str = "cuda") -> list[str]:
  """jit(fn) traced on `args` and lowered for `platform` ("cuda" inside abstract_gpu(): jax >= 0.11 asks
  which GPU); the custom-call targets of the program, in order."""
  with abstract_gpu() if platform == "cuda" else contextlib.nullcontext():
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return re.findall(r"custom_call @([\w$.]+)\(", text)


def efficientvit_blocks(ae_config) -> int:
  """The DC-AE decoder's EfficientViT (linear-attention) blocks: one state + output kernel pair each."""
  return sum(n for kind, n in zip(ae_config.decoder_block_types, ae_config.decoder_layers_per_block)
             if kind == "EfficientViTBlock")
