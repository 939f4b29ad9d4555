"""A sharding plan: a mesh plus logical-axis rules, and everything derived from them.

    plan = Plan.from_config(config)                 # config.mesh; all 1 (the default) is a one-device mesh
    state_sh = plan.shardings(abstract_state)       # NamedShardings for a (boxed) pytree
    batch = plan.shard_batch(host_batch)            # host-local numpy -> global arrays over data x fsdp
    frozen = plan.place(frozen_params, like=boxed)  # frozen AE / text encoder / teacher, split by the rules
    whole = plan.gather(state.ema_params)           # global arrays -> numpy, whole on every process
    with plan.activate(): ...trace model code...    # constraints + sequence-parallel layers on

Parameters created with `nn.with_logical_partitioning` are `nn.LogicallyPartitioned` boxes
(they stay boxed in the TrainState, and optax / EMA trees built with tree.map keep the boxes),
so one walk over the state gives parameters, gradients, optimizer moments and EMA the same
sharding; leaves without names (step, rng, CAME's factored statistics) are replicated.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sanajax.parallel import context
from sanajax.parallel.mesh import (
  DEFAULT_RULES,
  config_field,
  describe_mesh,
  logical_to_mesh,
  make_mesh,
  normalize_rules,
)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  mesh: jax.sharding.Mesh
  rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "rules", normalize_rules(self.rules))

  @classmethod
  def from_config(cls, config: Any, devices: Sequence[Any] | None = None) -> "Plan":
    """The plan of `config.mesh` (absent or every axis 1: a mesh of one device, so the single-device
    run is the same code as a pod's, with trivial shardings)."""
    m = config_field(config, "mesh", None) or {}
    return cls(make_mesh(m, devices), config_field(m, "rules", DEFAULT_RULES))

  @classmethod
  def single_device(cls) -> "Plan":
    """A mesh of this process's first device: what the single-device code runs under."""
    return cls.from_config({})

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  # --- specs ---------------------------------------------------------------------------------

  def axis_size(self, name: str) -> int:
    return int(self.mesh.shape[name])

  @property
  def sequence_parallel(self) -> bool:
    return self.axis_size("sequence") > 1

  def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> P:
    return logical_to_mesh(tuple(names), tuple(shape), self.mesh, self.rules)

  def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def shardings(self, tree: Any) -> Any:
    """NamedShardings for every array of a pytree of arrays / ShapeDtypeStructs (boxes keep their
    place, so the result is a valid in/out_shardings for the tree and for its unboxed twin)."""
    def one(x):
      if _is_box(x):
        if not jax.tree.leaves(x.value):  # optax's MaskedNode (muon: a leaf the other transform owns)
          return x
        return x.replace_boxed(self.sharding(x.names, np.shape(x.value)))
      return self.replicated
    return jax.tree.map(one, tree, is_leaf=_is_box)

  def abstract(self, tree: Any) -> Any:
    """ShapeDtypeStructs with this plan's shardings (to restore a checkpoint onto this mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, self.shardings(tree))

  def batch_spec(self, ndim: int) -> P:
    """Batch arrays: the leading axis over every mesh axis "batch" maps to (data x fsdp)."""
    axes = next((a for n, a in self.rules if n == "batch"), ())
    axes = tuple(a for a in axes if self.mesh.shape[a] > 1)
    return P(axes if len(axes) > 1 else (axes[0] if axes else None), *([None] * (ndim - 1)))

  def batch_shards(self) -> int:
    """How many ways the batch is split (data x fsdp): global batches must be a multiple."""
    spec = self.batch_spec(1)[0]
    axes = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def shard_batch(self, batch: Mapping[str, Any]) -> dict:
    """Host-local numpy batch (global batch / process_count rows) -> global jax arrays. Arrays already
    laid out so (a batch the training loop prefetched to the devices) pass through unchanged."""
    out = {}
    for k, v in batch.items():
      if isinstance(v, jax.Array) and v.sharding == NamedSharding(self.mesh, self.batch_spec(v.ndim)):
        out[k] = v
        continue
      v = np.asarray(v)
      out[k] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, self.batch_spec(v.ndim)), v)
    return out

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """NamedSharding of a batch array of rank `ndim` (leading axis over data x fsdp)."""
    return NamedSharding(self.mesh, self.batch_spec(ndim))

  def place(self, tree: Any, like: Any = None) -> Any:
    """Global arrays laid out by logical names, from values every process holds whole.

    For frozen weights (AE, text encoder, a distillation teacher): under fsdp / tensor they are
    split by the same rules as the DiT instead of replicated on every device (Gemma-2-2B is
    ~5 GB in bf16). Boxed leaves of `tree` name their own axes; `like` is a boxed twin (e.g.
    jax.eval_shape of model.init) naming the axes of an unboxed `tree`. Unnamed leaves, and
    dimensions no rule splits evenly, stay replicated. The result keeps `tree`'s boxes.
    """
    unbox = lambda b: b.value if _is_box(b) else b
    shardings = [unbox(s) for s in jax.tree.leaves(self.shardings(tree if like is None else like), is_leaf=_is_box)]
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_box)
    if len(leaves) != len(shardings):
      raise ValueError(f"Plan.place: `like` has {len(shardings)} arrays, the tree {len(leaves)}.")

    def one(x, sharding):
      x = np.asarray(jax.device_get(x))
      # Each process cuts its own devices' shards (device_put cannot reach other hosts' devices).
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return treedef.unflatten([x.replace_boxed(one(x.value, s)) if _is_box(x) else one(x, s)
                              for x, s in zip(leaves, shardings)])

  def shard_global_batch(self, batch: Mapping[str, Any]) -> dict:
    """A batch every process holds whole (e.g. the prompts of a sampling call) -> global arrays
    split over data x fsdp (shard_batch is for per-process parts of a batch)."""
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      out[k] = jax.make_array_from_callback(v.shape, self.batch_sharding(v.ndim), lambda index, v=v: v[index])
    return out

  def replicate(self, tree: Any) -> Any:
    """A pytree every process holds identically (e.g. frozen AE / text-encoder weights) as global
    arrays replicated on the whole mesh (also across hosts, where device_put cannot reach)."""
    def one(x):
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])
    return jax.tree.map(one, tree)

  def gather(self, tree: Any) -> Any:
    """Global arrays -> numpy arrays whole on every process (place's inverse; keeps boxes), e.g.
    to evaluate a sharded state's parameters on one device. Collective across hosts: every
    process must call it."""

    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)

  # --- tracing -------------------------------------------------------------------------------

  @contextlib.contextmanager
  def activate(self):
    """Model code traced inside gets constraints and the sequence-parallel layers."""
    with context.use_plan(self):
      yield self

  def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

  def __repr__(self) -> str:
    return f"Plan({describe_mesh(self.mesh)})"
