"""Per-device memory of a sharding plan, from shapes alone (nothing is allocated).

Used by `python -m sanajax.info --config=... --config.mesh.fsdp=8`: a plan's mesh may be bigger
than the machine it is printed on, so shard sizes come from the mesh *shape* and the same rules
(sanajax.parallel.mesh.logical_to_mesh) the trainer uses. It lives in training/ because it sizes
the trainer's state: the DiT (models/) and the optimizer (training/optim.py).

  parameters        float32 master weights, split as their logical names say;
  gradients         the same layout and size (float32, alive during the update);
  optimizer state   `tx.init` of the parameters (AdamW: 2 x params; CAME: first moment plus
                    factored second moments), split like the parameters where shapes match;
  EMA               one more copy of the parameters;
  activations       an estimate of what the backward pass keeps (see `activation_bytes`).
Not counted: the frozen text encoder and autoencoder (split by the same rules, see Plan.place),
XLA's temporary buffers and fragmentation; leave ~10-20% of the device free.
"""
from __future__ import annotations

import math
import types
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sanajax import resolution
from sanajax.dtypes import dtype_from_name
from sanajax.models.backbones import backbone_name, build_backbone
from sanajax.models.backbones import dummy_inputs as backbone_inputs
from sanajax.models.discriminator import LaddHeads
from sanajax.parallel.mesh import (
  DEFAULT_RULES,
  MESH_AXES,
  logical_to_mesh,
  mesh_shape,
  normalize_rules,
)
from sanajax.training.optim import build_optimizer


def _abstract_mesh(shape: tuple[int, ...]) -> Any:
  # logical_to_mesh only reads `.shape`, so a plan for 256 devices is sized on a laptop.
  return types.SimpleNamespace(shape=dict(zip(MESH_AXES, shape)))


def _shard_elems(shape, names, mesh, rules) -> int:
  spec = logical_to_mesh(names, shape, mesh, rules)
  div = 1
  for axes in spec:
    for a in (axes if isinstance(axes, tuple) else (axes,) if axes else ()):
      div *= mesh.shape[a]
  return int(np.prod(shape)) // div


def tree_bytes_per_device(tree: Any, mesh: Any, rules) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs (boxed leaves are split by their names)."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    if isinstance(x, nn.LogicallyPartitioned):
      # A box may hold no array: optax's MaskedNode, where another transform of a partition owns the
      # leaf (train.optimizer=muon: the AdamW moments of a Muon kernel and the Muon momentum of a bias).
      for v in jax.tree.leaves(x.value):
        total += _shard_elems(tuple(v.shape), tuple(x.names), mesh, rules) * np.dtype(v.dtype).itemsize
    else:
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def activation_bytes(config: Any, latent_hw: tuple[int, int], mesh: Any) -> int:
  """Estimated activation bytes per device for one training step.

  Per image token and block, in the compute dtype: the block input (h), the attention's q, k, v
  and output (4h), Mix-FFN's expanded 2f three times (conv_inverted, SiLU, depthwise) plus f
  after the gate, and cross-attention's q and output (2c) with its float32 scores (heads x L).
  With remat "none" every block keeps all of it; with any other remat policy the blocks keep
  only their input and one block's set is live during recomputation (an upper bound for the
  "dots" policies). Batch is split over data x fsdp, tokens over sequence, heads and Mix-FFN
  channels over tensor.
  """
  m = config.model
  item = np.dtype(dtype_from_name(m.get("dtype", "float32"), "model.dtype")).itemsize
  # One microbatch's activations are live at a time (train.grad_accum_steps, training.state.accumulated_value_and_grad).
  micro = int(config.train.batch_size) // int(config.train.get("grad_accum_steps", 1) or 1)
  b_local = max(1, micro // (mesh.shape["data"] * mesh.shape["fsdp"]))
  n = (latent_hw[0] // m.patch_size) * (latent_hw[1] // m.patch_size)
  t = mesh.shape["tensor"]
  text = int(config.text.max_length)
  if backbone_name(m) == "mmdit":
    # MM-DiT, per joint token (image and text) and block: the block input (h), q, k, v and output
    # (4h), the 4x MLP's two activations (8h); with softmax joint attention, XLA's float32 scores
    # (heads x T) per token (a flash kernel keeps none).
    n, h, depth = n + text, m.num_attention_heads * m.attention_head_dim, m.num_layers
    scores = m.num_attention_heads * n * 4 if m.get("joint_attention", "softmax") == "softmax" else 0
    per_token_block = (h + (4 * h + 8 * h) / t) * item + scores / t
  else:
    h, f, depth = m.hidden_size, int(m.hidden_size * m.mlp_ratio), m.depth
    c = m.cross_num_heads * m.cross_head_dim
    per_token_block = (h + (4 * h + 6 * f + f + 2 * c) / t) * item + m.cross_num_heads / t * text * 4
  n_local = math.ceil(n / mesh.shape["sequence"])
  per_token_input = h * item
  if m.get("remat", "none") == "none":
    per_token = depth * per_token_block
  else:
    per_token = depth * per_token_input + per_token_block
  return int(b_local * n_local * per_token)


def plan_memory(config: Any, num_devices: int | None = None) -> dict[str, Any]:
  """Per-device bytes of the config's DiT training state and activations under config.mesh."""
  config = resolution.apply_resolution(config)
  mesh_cfg = config.get("mesh") or {}
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if -1 in sizes and num_devices is None:
    raise ValueError("config.mesh has a -1 axis: pass the device count to size it.")
  # Fixed axes describe the target cluster, whatever this machine has.
  shape = mesh_shape(mesh_cfg, num_devices if -1 in sizes else math.prod(sizes))
  mesh = _abstract_mesh(shape)
  rules = normalize_rules(mesh_cfg.get("rules", DEFAULT_RULES))
  m = config.model
  res = int(config.data.resolution)
  down = resolution.ae_downsample(config)
  latent_hw = (res // down, res // down)
  model = build_backbone(m)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          *backbone_inputs(m, latent_hw, int(config.text.max_length)))["params"]
  tx, _ = build_optimizer(config.train, int(config.train.num_steps))
  opt = jax.eval_shape(tx.init, params)
  p = tree_bytes_per_device(params, mesh, rules)
  out = {
      "mesh": dict(zip(MESH_AXES, shape)),
      "devices": math.prod(shape),
      "parameters": p,
      "gradients": p,
      "optimizer_state": tree_bytes_per_device(opt, mesh, rules),
      "ema": p if float(config.train.ema_decay) > 0 else 0,
      "activations": activation_bytes(config, latent_hw, mesh),
  }
  out["total"] = sum(out[k] for k in ("parameters", "gradients", "optimizer_state", "ema", "activations"))
  return out


DISTILL_ROWS = ("teacher", "heads", "heads_gradients", "heads_optimizer_state", "teacher_activations")


def distill_plan_memory(config: Any, num_devices: int | None = None) -> dict[str, Any]:
  """plan_memory of a Sprint student config (one with a `distill` section) plus what distillation adds.

    teacher                 the frozen teacher in distill.teacher_dtype, split like the student
                            (its architecture is the student's without the CFG embedding);
    heads                   the LADD heads (one per distill.head_block_ids), their gradients and
    heads_gradients,        optimizer state (the heads' optimizer is built like the student's,
    heads_optimizer_state   training.sprint.discriminator_train_config);
    teacher_activations     the generator's adversarial loss backpropagates through the teacher up to
                            its last tapped block: activation_bytes of that many blocks in the teacher's
                            dtype, at the same batch.
  The student's rows (parameters, gradients, optimizer_state, ema, activations) are plan_memory's;
  its log-variance head (hidden_size + 1 numbers) and the JVP's transient tangents are not counted.
  """
  out = plan_memory(config, num_devices)
  config = resolution.apply_resolution(config)
  mesh = _abstract_mesh(tuple(out["mesh"].values()))
  rules = normalize_rules((config.get("mesh") or {}).get("rules", DEFAULT_RULES))
  d, m = config.distill, config.model
  teacher_model = ml_collections.ConfigDict(m.to_dict())
  teacher_model.guidance_embeds = False
  teacher_dtype = dtype_from_name(d.teacher_dtype, "distill.teacher_dtype")
  down = resolution.ae_downsample(config)
  latent_hw = (int(config.data.resolution) // down,) * 2
  teacher = jax.eval_shape(build_backbone(teacher_model).init, jax.random.key(0),
                           *backbone_inputs(teacher_model, latent_hw, int(config.text.max_length)))["params"]
  teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, teacher_dtype), teacher)
  blocks = tuple(int(i) for i in d.head_block_ids)
  tokens = (latent_hw[0] // m.patch_size) * (latent_hw[1] // m.patch_size)
  heads = jax.eval_shape(LaddHeads(len(blocks)).init, jax.random.key(0),
                         [jax.ShapeDtypeStruct((1, tokens, m.hidden_size), np.float32)] * len(blocks))["params"]
  # The heads' optimizer is the student's with the heads' own rate, which does not change its size.
  tx_d, _ = build_optimizer(config.train, int(config.train.num_steps))
  tapped = ml_collections.ConfigDict(config.to_dict())
  tapped.model.depth = max(blocks) + 1
  tapped.model.dtype = d.teacher_dtype
  h = tree_bytes_per_device(heads, mesh, rules)
  out.update(teacher=tree_bytes_per_device(teacher, mesh, rules), heads=h, heads_gradients=h,
             heads_optimizer_state=tree_bytes_per_device(jax.eval_shape(tx_d.init, heads), mesh, rules),
             teacher_activations=activation_bytes(tapped, latent_hw, mesh))
  out["total"] += sum(out[k] for k in DISTILL_ROWS)
  return out


def format_plan_memory(mem: dict[str, Any]) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in mem["mesh"].items() if v > 1) or "one device"
  lines = [f"per-device memory under mesh {mesh} ({mem['devices']} devices), GiB:"]
  rows = ("parameters", "gradients", "optimizer_state", "ema", "activations")
  rows += tuple(k for k in DISTILL_ROWS if k in mem) + ("total",)
  for k in rows:
    lines.append(f"  {k:<22s} {mem[k] / 2**30:>15.2f}")
  return "\n".join(lines)
