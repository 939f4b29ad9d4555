"""Training a small set of parameters beside a frozen base DiT (the trainable / frozen split).

The DiT trainer (training/dit.py) asks this module three things, so a fine-tune that freezes the base
needs no other change to the trainer, its checkpoints, resume or sharding:

  trainable_init(config)           -> key -> the trainable tree the TrainState holds (None: the whole DiT)
  frozen_parts(config, plan)       -> {"base": the frozen DiT params, placed by the plan} added to the
                                      step's frozen arguments beside the AE and text encoder ({} if none)
  apply_model(config, dit, params, frozen, key, x, t, context, mask) -> the prediction the loss reads

The state (parameters, optimizer moments, EMA) then holds only the trainable tree, so a checkpoint is
that small: a 1600M model's rank-4 adapters are 18 MB in float32 (docs/lora.md#memory).

Kinds: `config.lora` (sanajax.models.lora: adapters on the base's Dense layers, injected on the fly with
PEFT's dropout). A ControlNet, which also freezes the base, adds its own branch to the three functions.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from sanajax.models import lora as lora_lib
from sanajax.models.backbones import apply_conditioned
from sanajax.parallel.mesh import DEFAULT_RULES, normalize_rules
from sanajax.training import memory
from sanajax.training.optim import build_optimizer
from sanajax.workdir.loaders import init_params_from, lora_abstract, lora_base_path


def _is_lora(config: ml_collections.ConfigDict) -> bool:
  return "lora" in config


def trainable_init(config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any] | None:
  """key -> the boxed trainable tree of a frozen-base run (LoRA: fresh adapters, b = 0 so the run starts
  at the base), or None when the whole DiT trains."""
  if not _is_lora(config):
    return None
  spec = lora_lib.LoraSpec.from_config(config.lora)
  like, _ = lora_abstract(config)
  paths = lora_lib.target_paths(like, spec.target_modules)
  return lambda key: lora_lib.init(key, like, paths, spec.r, boxed=True)


def frozen_parts(config: ml_collections.ConfigDict, plan) -> dict:
  """{"base": the frozen base DiT's params} of a frozen-base run, placed by `plan` (split under fsdp /
  tensor like the trained DiT), kernels stored as config.lora.base_dtype; {} when the whole DiT trains."""
  if not _is_lora(config):
    return {}
  like, _ = lora_abstract(config)
  base_path = lora_base_path(config)
  base = lora_lib.cast_kernels(init_params_from(base_path, like), config.lora.get("base_dtype", "float32"))
  print(f"LoRA: frozen base {base_path} (kernels {config.lora.get('base_dtype', 'float32')}); adapters of rank "
        f"{config.lora.r} on {len(lora_lib.target_paths(like, lora_lib.LoraSpec.from_config(config.lora).target_modules))}"
        f" modules.", flush=True)
  return {"base": plan.place(base)}


def apply_model(config: ml_collections.ConfigDict, dit, params, frozen: dict, key: jax.Array, *args):
  """The DiT's prediction for the loss: the trained params themselves, or (a frozen-base run) the base in
  frozen["base"] with the trainable part applied (LoRA: injected adapters; dropout keyed by `key`)."""
  if not _is_lora(config):
    return apply_conditioned(dit, {"params": params}, *args)
  spec = lora_lib.LoraSpec.from_config(config.lora)
  adapters = lora_lib.flat(params, alpha=spec.lora_alpha)
  with lora_lib.injected([(adapters, 1.0)], dropout=spec.lora_dropout, rng=key):
    return apply_conditioned(dit, {"params": jax.lax.stop_gradient(frozen["base"])}, *args)


def lora_plan_memory(config: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, Any]:
  """Per-device bytes of a LoRA run of `config` (a config with a `lora` section; the base need not exist:
  shapes only), in memory.plan_memory's rows: parameters = the trained adapters, gradients and optimizer
  state of those, ema (0 with train.ema_decay 0), activations as full fine-tuning (the backward pass still
  runs through every block; the adapters' own r-wide activations are not counted), plus
  `frozen_base`: the base's parameters with kernels in lora.base_dtype, split by the same rules."""
  full = memory.plan_memory(config, num_devices)
  mesh = memory._abstract_mesh(tuple(full["mesh"].values()))
  rules = normalize_rules((config.get("mesh") or {}).get("rules", DEFAULT_RULES))
  like, adapters = lora_abstract(config)
  base_dtype = config.lora.get("base_dtype", "float32")
  base = jax.eval_shape(lambda p: lora_lib.cast_kernels(p, base_dtype), like)
  tx, _ = build_optimizer(config.train, int(config.train.num_steps))
  a = memory.tree_bytes_per_device(adapters, mesh, rules)
  out = dict(full, parameters=a, gradients=a, optimizer_state=memory.tree_bytes_per_device(
      jax.eval_shape(tx.init, adapters), mesh, rules), ema=a if float(config.train.ema_decay) > 0 else 0,
             frozen_base=memory.tree_bytes_per_device(base, mesh, rules))
  out["total"] = sum(out[k] for k in ("parameters", "gradients", "optimizer_state", "ema", "activations",
                                      "frozen_base"))
  return out
