"""Optimizers: CAME (SANA's default) as an optax transformation, Muon (the tiny default; optax.contrib
with AdamW on the non-matrix parameters), and `build_optimizer` from a config.

CAME (Luo et al., ACL 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization"),
Algorithm 1, for a gradient G_t of an n x m matrix (rows = second-last axis, cols = last axis);
1_k is a vector of k ones:

  r_t = b2 r_{t-1} + (1 - b2) (G_t^2 + eps1 1_n 1_m^T) 1_m         row statistics   (n,)
  c_t = b2 c_{t-1} + (1 - b2) 1_n^T (G_t^2 + eps1 1_n 1_m^T)       column statistics (m,)
  v_t = r_t c_t / (1_n^T r_t)                                      factored E[G^2]  (n, m)
  u_t = G_t / sqrt(v_t)
  u^_t = u_t / max(1, RMS(u_t) / d)                                update clipping, d = clip_threshold
  m_t = b1 m_{t-1} + (1 - b1) u^_t                                 first moment
  U_t = (u^_t - m_t)^2                                             instability
  R_t = b3 R_{t-1} + (1 - b3) (U_t + eps2 1_n 1_m^T) 1_m
  C_t = b3 C_{t-1} + (1 - b3) 1_n^T (U_t + eps2 1_n 1_m^T)
  S_t = R_t C_t / (1_n^T R_t)                                      factored confidence
  theta_t = theta_{t-1} - lr m_t / sqrt(S_t)

As in the authors' code (`came_pytorch`, which SANA's CAMEWrapper follows): row/column statistics
are means rather than sums (the ratio in v_t and S_t is the same), there is no bias correction,
parameters with >= 2 axes are factored over their last two axes (leading axes are batch-like),
parameters with < 2 axes keep an unfactored v_t = b2 v_{t-1} + (1 - b2)(G_t^2 + eps1) and skip the
confidence step (theta -= lr m_t), and weight decay is decoupled and scaled by the learning rate:
theta -= lr * weight_decay * theta, using theta before the step.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sanajax.config_check import OPTIMIZERS, SCHEDULES  # the names a config may give (checked before a run)
from sanajax.models.mmdit import FROZEN_PARAMS  # leaves that are buffers: never updated, never decayed
from sanajax.models.sana_dit import STACKED_BLOCKS
from sanajax.training.muon import grouped_muon

# AdamW's epsilon unless train.adam_eps says otherwise: optax's default (and torch.optim.AdamW's).
ADAM_EPS = 1e-8
# Stand-in for the state a parameter does not use (factored vs unfactored), as optax.adafactor does.
_UNUSED = (1,)


class CameState(NamedTuple):
  """CAME state; every field but `count` is a pytree shaped like the params.

  mu: first moment m_t (param shape). v_row / v_col: factored second moment, param.shape[:-1] /
  param.shape[:-2] + param.shape[-1:]. v: unfactored second moment (param shape, < 2-D params).
  r_row / r_col: factored instability, shapes as v_row / v_col. Unused entries have shape (1,).
  """
  count: jax.Array
  mu: Any
  v_row: Any
  v_col: Any
  v: Any
  r_row: Any
  r_col: Any


def _stacked(path) -> bool:
  """Whether a leaf lies under a scan_layers stack (model.scan_layers): its leading axis is the layer,
  and the optimizer treats each layer as its own parameter, exactly as in the unrolled layout."""
  return any(isinstance(k, jax.tree_util.DictKey) and k.key == STACKED_BLOCKS for k in path)


def _per_layer(fn, path):
  return jax.vmap(fn) if _stacked(path) else fn


def _factored(shape) -> bool:
  return len(shape) >= 2


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _factored_rsqrt(row: jax.Array, col: jax.Array) -> jax.Array:
  """1 / sqrt(row col / mean(row)) as a (.., n, m) array from row (.., n) and col (.., m)."""
  r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., :, None]
  c_factor = jax.lax.rsqrt(col)[..., None, :]
  return r_factor * c_factor


def _ema(old: jax.Array, new: jax.Array, beta: float) -> jax.Array:
  return beta * old + (1 - beta) * new


def _init_leaf(p: jax.Array):
  """Zero state for one parameter: (mu, v_row, v_col, v, r_row, r_col), all float32."""
  z = lambda shape: jnp.zeros(shape, jnp.float32)
  if _factored(p.shape):
    row, col = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
    return z(p.shape), z(row), z(col), z(_UNUSED), z(row), z(col)
  return z(p.shape), z(_UNUSED), z(_UNUSED), z(p.shape), z(_UNUSED), z(_UNUSED)


def _update_leaf(g, mu, v_row, v_col, v, r_row, r_col, *, b1, b2, b3, eps1, eps2, clip_threshold):
  """One CAME step for one parameter (float32). Returns (direction, new state); params move by -lr * direction."""
  g = g.astype(jnp.float32)
  g2 = jnp.square(g) + eps1
  if _factored(g.shape):
    v_row = _ema(v_row, jnp.mean(g2, axis=-1), b2)
    v_col = _ema(v_col, jnp.mean(g2, axis=-2), b2)
    u = g * _factored_rsqrt(v_row, v_col)
  else:
    v = _ema(v, g2, b2)
    u = g * jax.lax.rsqrt(v)
  u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)
  mu = _ema(mu, u, b1)
  if _factored(g.shape):
    instability = jnp.square(u - mu) + eps2
    r_row = _ema(r_row, jnp.mean(instability, axis=-1), b3)
    r_col = _ema(r_col, jnp.mean(instability, axis=-2), b3)
    direction = mu * _factored_rsqrt(r_row, r_col)
  else:
    direction = mu
  return direction, (mu, v_row, v_col, v, r_row, r_col)


def came(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999,
         eps1: float = 1e-30, eps2: float = 1e-16, clip_threshold: float = 1.0,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """CAME as an optax transformation (the full update rule is in the module docstring).

  Args:
    learning_rate: a float or an optax schedule of the step count (0-based, as optax does).
    b1, b2, b3: decay of the first moment, the second moment and the instability (SANA: 0.9, 0.999,
      0.9999).
    eps1, eps2: added to G^2 and to the instability (SANA: 1e-30, 1e-16).
    clip_threshold: d, the largest RMS an (unscaled) update may have.
    weight_decay: decoupled, multiplied by the learning rate; needs `params` in `update` when > 0.
  Returns:
    A transformation whose updates are to be added to the params (`optax.apply_updates`); they have
    each param's dtype while the state stays float32.
  """
  hyper = dict(b1=b1, b2=b2, b3=b3, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold)

  def init_fn(params):
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    per_field = list(zip(*[_per_layer(_init_leaf, path)(p) for path, p in with_path])) or [()] * 6
    fields = [jax.tree_util.tree_unflatten(treedef, list(f)) for f in per_field]
    return CameState(jnp.zeros([], jnp.int32), *fields)

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError("came(weight_decay > 0) needs params: call update(grads, state, params).")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [g for _, g in with_path]
    flat_state = [treedef.flatten_up_to(f) for f in state[1:]]
    step = functools.partial(_update_leaf, **hyper)
    results = [_per_layer(step, path)(g, *s) for (path, g), *s in zip(with_path, *flat_state)]
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    directions = [d for d, _ in results]
    if weight_decay:
      directions = [d + weight_decay * p.astype(jnp.float32)
                    for d, p in zip(directions, treedef.flatten_up_to(params))]
    new_updates = [(-lr * d).astype(g.dtype) for d, g in zip(directions, leaves)]
    per_field = list(zip(*[s for _, s in results])) or [()] * 6
    fields = [jax.tree_util.tree_unflatten(treedef, list(f)) for f in per_field]
    new_state = CameState(optax.safe_increment(state.count), *fields)
    return jax.tree_util.tree_unflatten(treedef, new_updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# Moonlight's update-RMS match (Liu et al. 2025, "Muon is Scalable for LLM Training", eq. 4): an
# orthogonalised update scaled to RMS 0.2, AdamW's typical update RMS, so AdamW's learning rate and
# weight decay carry over unchanged.
MUON_MATCHED_RMS = 0.2


def muon_dimension_numbers(params):
  """Which parameters Muon orthogonalises: dense kernels (in, out) and convolution kernels
  (kh, kw, in, out) with in > 1, flattened to (kh kw in, out); None (AdamW) for everything else
  (biases, norm scales, modulation tables, depthwise kernels). Under a scan_layers stack the leading
  layer axis is a batch axis: each layer's matrix is orthogonalised on its own, as when unrolled."""
  def rule(path, p):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # boxed params end in .value
    if not keys or keys[-1] != "kernel":
      return None
    o = 1 if STACKED_BLOCKS in keys else 0  # axes after the layer axis
    if p.ndim == 2 + o:
      return optax.contrib.MuonDimensionNumbers(reduction_axis=o, output_axis=1 + o)
    if p.ndim == 4 + o and p.shape[2 + o] > 1:
      return optax.contrib.MuonDimensionNumbers(reduction_axis=(o, 1 + o, 2 + o), output_axis=3 + o)
    return None
  return jax.tree_util.tree_map_with_path(rule, params)


def muon(learning_rate, *, b1: float = 0.9, b2: float = 0.999, beta: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Muon (optax.contrib.muon's rule: Nesterov momentum `beta`, 5 Newton-Schulz steps) on the weight
  matrices of `muon_dimension_numbers`, AdamW(b1, b2) on the rest, with one learning rate: the
  orthogonalised updates are rescaled to RMS MUON_MATCHED_RMS, as Moonlight does. Same-shaped matrices
  are orthogonalised together (sanajax.training.muon: optax's values and state, fewer operations)."""
  return grouped_muon(learning_rate, muon_dimension_numbers, consistent_rms=MUON_MATCHED_RMS, beta=beta, eps=eps,
                      weight_decay=weight_decay, adam_b1=b1, adam_b2=b2)


def _field(config: Any, name: str, default: Any = None, *, required: bool = False) -> Any:
  """Reads `config.name` from a ConfigDict or a dict, with a clear error when a required one is missing."""
  if name in config:
    return config[name]
  if required:
    raise ValueError(f"The train config has no field {name!r}; add `train.{name}` to the config.")
  return default


def _lr_schedule(peak: float, warmup_steps: int, schedule: str, num_steps: int) -> optax.Schedule:
  """Linear warm-up to peak over `warmup_steps`, then constant or cosine decay to 0 at `num_steps`.

  Returns lr(count) with count optax's 0-based update count, so training step s = count + 1 has
  lr = peak * s / warmup_steps during warm-up (SANA's constant-with-warm-up): peak / warmup_steps
  at the first step, not 0 (a zero first update would be wasted), and peak at step warmup_steps.
  """
  if schedule == "constant":
    main = optax.constant_schedule(peak)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=max(num_steps - warmup_steps, 1))
  else:
    raise ValueError(f"Unknown schedule {schedule!r} (train.schedule); choose one of {SCHEDULES}.")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  by_step = optax.join_schedules([warmup, main], boundaries=[warmup_steps])  # of the 1-based step.
  return lambda count: by_step(count + 1)


def is_frozen(path) -> bool:
  """Whether a parameter path (tree_flatten_with_path's keys; boxed trees' attribute keys are skipped) names a
  FROZEN_PARAMS leaf (the MM-DiT's stored sin-cos table `pos_embed/pos_embed`, a diffusers buffer)."""
  name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
  return any(name == f or name.endswith("/" + f) for f in FROZEN_PARAMS)


def freeze(opt: optax.GradientTransformation, frozen: Callable[[Any], bool] = is_frozen
           ) -> optax.GradientTransformation:
  """`opt` with the updates of the `frozen(path)` leaves set to zero: they neither train nor decay (decoupled
  weight decay would otherwise shrink a zero-gradient table every step). The state is `opt`'s own, unchanged in
  structure, so checkpoints written before this wrapper restore; a frozen leaf's moments stay zero."""
  def update_fn(updates, state, params=None):
    updates, state = opt.update(updates, state, params)
    zero = lambda path, u: jnp.zeros_like(u) if frozen(path) else u
    return jax.tree_util.tree_map_with_path(zero, updates), state

  return optax.GradientTransformation(opt.init, update_fn)


def build_optimizer(train_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """Optimizer and learning-rate schedule from a config's `train` section.

  Fields: optimizer ("adamw" | "came" | "muon"), learning_rate (peak), warmup_steps (linear warm-up
  from 0), schedule ("constant" | "cosine", the cosine decays to 0 at `num_steps`), weight_decay
  (decoupled), grad_clip (global-norm clipping before the optimizer; 0 disables), adam_b1 / adam_b2
  (AdamW's moment decays, also those of Muon's AdamW half; default 0.9 / 0.999 as in SANA's AdamW), adam_eps
  (AdamW's epsilon; optax uses one eps for Muon's AdamW half and its orthogonalisation; default optax's 1e-8,
  SD3's 1e-15 in configs/sd3_medium.py). The MM-DiT's FROZEN_PARAMS never move (`freeze`).
  Returns (transformation, schedule_fn: step -> learning rate).
  """
  c = train_config
  name = _field(c, "optimizer", required=True)
  peak = float(_field(c, "learning_rate", required=True))
  schedule_fn = _lr_schedule(peak, int(_field(c, "warmup_steps", 0)), _field(c, "schedule", "constant"), num_steps)
  weight_decay = float(_field(c, "weight_decay", 0.0))
  b1, b2 = float(_field(c, "adam_b1", 0.9)), float(_field(c, "adam_b2", 0.999))
  eps = float(_field(c, "adam_eps", ADAM_EPS))
  if name == "adamw":
    opt = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "came":
    opt = came(schedule_fn, weight_decay=weight_decay)
  elif name == "muon":
    opt = muon(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    raise ValueError(f"Unknown optimizer {name!r} (train.optimizer); choose one of {OPTIMIZERS}.")
  grad_clip = float(_field(c, "grad_clip", 0.0))
  if grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return freeze(opt), schedule_fn
