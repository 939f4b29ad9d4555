"""Post-training quantization of the denoiser with qwix (google/qwix): int8 weights, int8 weights and
activations, fp8. For sampling only; the text encoder and the AE are left as they are.

    qmodel, qparams = quantize_backbone(model, params, "int8", config.model)
    v = qmodel.apply({"params": qparams}, x, t, context, mask)      # as model.apply

Modes (MODES):
  none          the float model, unchanged.
  int8          weight-only: each quantized kernel (I, O) is stored as int8 with one float32 absmax
                scale per output channel (1, O); the matmul dequantizes it to the compute dtype.
  int8_dynamic  int8 weights as above and int8 activations, their absmax scale computed per token at
                run time (dynamic range: no calibration data); the matmul runs int8 x int8.
  fp8           weights and activations in float8_e4m3fn, scaled as int8_dynamic. Accepted on CUDA
                GPUs of compute capability >= 8.9 (FP8 tensor cores: Ada, Hopper, Blackwell); on any
                other platform it is refused (XLA would run it upcast: no speed, and int8 stores the
                same bytes). `check_platform=False` skips that check (the tests compare the
                numerics on CPU).

What is quantized: the Linear layers inside the transformer blocks (SANA: self-attention q/k/v/out,
cross-attention q/k/v/out, the Mix-FFN's two 1x1 convs; MM-DiT: both streams' q/k/v/out projections and
MLPs). They hold 96.9% of Sana-1600M's parameters (docs/quantization.md#what-is-quantized). The
patch embedding, the timestep / guidance / caption embedders, the adaLN tables and modulation, the
norms, the depthwise 3x3 conv and the output projection stay float: they are small, and each either
reads raw inputs (latents, timesteps, text states) or writes the velocity. The attention products
themselves (softmax or linear) are not quantized: only the rules' Dense layers match.

qwix's PTQ works on the Flax linen module by interception (no change to sanajax.models): the model
is wrapped by `qwix.quantize_model`, the quantized parameter tree is derived from the float one by
`qwix.quantize_params`, and `apply` takes it in place of the float tree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax import extras
from sanajax.models import weights_util
from sanajax.models.backbones import MMDiTBackbone, backbone_name, build_backbone, init_args

MODES = ("none", "int8", "int8_dynamic", "fp8")

# Dense layers inside the transformer blocks, by backbone (module paths as the parameter tree names them).
SANA_LAYERS = (r".*transformer_blocks_\d+/(attn1|attn2)/(to_q|to_k|to_v|to_out)|"
               r".*transformer_blocks_\d+/ff/(conv_inverted|conv_point)")
MMDIT_LAYERS = (r".*transformer_blocks_\d+/(attn|attn2)/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out|"
                r"to_add_out)|.*transformer_blocks_\d+/(ff|ff_context)/(net_0/proj|net_2)")
LAYERS = {"sana_dit": SANA_LAYERS, "mmdit": MMDIT_LAYERS}

FP8_MIN_COMPUTE_CAPABILITY = 8.9  # FP8 tensor cores: sm_89 (Ada) and sm_90 (Hopper) onwards.


def check_mode(mode: str, name: str = "quantize", *, check_platform: bool = False) -> None:
  """ValueError naming `name` (a flag or field) and the choices when mode is not one of MODES; with
  check_platform, also fp8 where the devices have no FP8 tensor cores (fp8_device_error).
  extras.MissingPackageError for a quantized mode without qwix (the "quantize" extra)."""
  if mode not in MODES:
    raise ValueError(f"{name}={mode!r}: choose one of {', '.join(MODES)} (none: the float model).")
  if mode != "none":
    extras.require("qwix", f"{name}={mode}")
  if mode == "fp8" and check_platform and (error := fp8_device_error(name=name)):
    raise ValueError(error)


def fp8_device_error(devices=None, name: str = "quantize") -> str | None:
  """Why fp8 cannot run on `devices` (default: jax.devices()), or None where every one has FP8 tensor cores."""
  for d in devices if devices is not None else jax.devices():
    cc = getattr(d, "compute_capability", None)
    if d.platform != "gpu" or cc is None or float(cc) < FP8_MIN_COMPUTE_CAPABILITY:
      kind = f"a {d.platform.upper()} ({d.device_kind}" + (f", compute capability {cc})" if cc else ")")
      return (f"{name}=fp8 needs a CUDA GPU of compute capability >= {FP8_MIN_COMPUTE_CAPABILITY} (H100, L4, ...); "
              f"this is {kind}: use int8 or int8_dynamic.")
  return None


def rules(mode: str, model_config: Mapping[str, Any]) -> list:
  """The qwix.QuantizationRule list of a mode ([] for none): one rule for the blocks' Dense layers."""
  import qwix  # Optional dependency (extra "quantize"): only quantized sampling needs it.
  check_mode(mode)
  if mode == "none":
    return []
  layers = LAYERS[backbone_name(model_config)]
  qtype = {"int8": jnp.int8, "int8_dynamic": jnp.int8, "fp8": jnp.float8_e4m3fn}[mode]
  act = None if mode == "int8" else qtype
  # dot_general only: nn.Dense's matmul. Absmax (symmetric) calibration, per output channel for the
  # weights and per token for the activations (qwix's defaults for a Dense's dot_general).
  return [qwix.QuantizationRule(module_path=layers, op_names=("dot_general",), weight_qtype=qtype, act_qtype=act)]


def _linen(model) -> nn.Module:
  return model.model if isinstance(model, MMDiTBackbone) else model


def quantize_model(model, mode: str, model_config: Mapping[str, Any]):
  """The backbone (SanaDiT or MMDiTBackbone, from build_backbone) with qwix's PTQ interception for `mode`."""
  import qwix  # Optional dependency (extra "quantize"): only quantized sampling needs it.
  check_mode(mode)
  if mode == "none":
    return model
  quantized = qwix.quantize_model(_linen(model), qwix.PtqProvider(rules(mode, model_config)))
  return dataclasses.replace(model, model=quantized) if isinstance(model, MMDiTBackbone) else quantized


def abstract_params(model, model_config: Mapping[str, Any]) -> Any:
  """The (quantized) model's parameter tree as ShapeDtypeStructs, nothing materialised: a quantized
  Dense kernel is a qwix WithAux(QArray(qvalue (I, O) int8 / fp8, scale (1, O) float32))."""
  return weights_util.abstract_params(model, *init_args(model_config))


def quantize_backbone(model, params, mode: str, model_config: Mapping[str, Any], *, check_platform: bool = True,
                      name: str = "quantize"):
  """(quantized model, quantized params) for `mode`; ("none": the inputs unchanged).

  params: the float parameter tree of `model` (boxed or not, on any devices; the quantized arrays
    stay where the float ones lie: the quantization is one jitted call). The result is unboxed.
  check_platform: refuse fp8 where the devices have no FP8 tensor cores (fp8_device_error).
  name: the flag or argument named in errors.
  """
  check_mode(mode, name, check_platform=check_platform)
  if mode == "none":  # before the import: a plain install (no "quantize" extra) samples unquantized
    return model, params
  import qwix  # Optional dependency (extra "quantize"): only quantized sampling needs it.
  qmodel = quantize_model(model, mode, model_config)
  abstract = abstract_params(qmodel, model_config)
  qparams = jax.jit(lambda p: qwix.quantize_params(p, abstract))(nn.unbox(params))
  return qmodel, qparams


def param_bytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree; qwix's QArrays count qvalue + scale."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory_by_mode(model_config: Mapping[str, Any]) -> dict[str, dict[str, int]]:
  """Parameter bytes of the DiT a `model` config describes, in each storage (jax.eval_shape: no weights):

  {"float32": ..., "bfloat16": ..., "int8": ..., "int8_dynamic": ..., "fp8": ...} each
  {"bytes": total, "quantized_params": parameters in quantized layers, "params": all parameters}.
  float32 / bfloat16: every parameter at 4 / 2 bytes. The quantized modes: the quantized kernels at
  1 byte plus a float32 scale per output channel, the rest float32 as sampled (bfloat16 rest: subtract
  half of `bytes - quantized bytes`; docs/quantization.md gives both).
  """
  model = build_backbone(model_config)
  float_tree = abstract_params(model, model_config)
  n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(float_tree)))
  out = {"float32": {"bytes": 4 * n, "quantized_params": 0, "params": n},
         "bfloat16": {"bytes": 2 * n, "quantized_params": 0, "params": n}}
  for mode in MODES[1:]:
    tree = abstract_params(quantize_model(model, mode, model_config), model_config)
    qvalues = [x for x in jax.tree.leaves(tree) if jnp.dtype(x.dtype).itemsize == 1]
    out[mode] = {"bytes": param_bytes(tree), "quantized_params": int(sum(np.prod(x.shape) for x in qvalues)),
                 "params": n}
  return out

