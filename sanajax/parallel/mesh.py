"""Device meshes and logical-axis rules from a config's `mesh` section.

    c.mesh = parallel.mesh_config()           # in every DiT config: data = fsdp = sequence = tensor = 1
    --config.mesh.fsdp=8                      # ZeRO-3 over 8 devices
    --config.mesh.data=-1 --config.mesh.tensor=2   # -1: the rest of the devices

Mesh axes, outermost first (so `data` spans hosts and `tensor` stays inside the fastest links):
  data      pure data parallelism: parameters replicated, batch split.
  fsdp      batch split AND parameters / gradients / optimizer state / EMA split over `embed`.
  sequence  image tokens split (rows of the latent grid): linear attention's K^T V state and
            normaliser are summed over it, the Mix-FFN 3x3 conv exchanges one halo row.
  tensor    Megatron-style: attention heads and Mix-FFN channels split.

Logical-axis rules map the model's names (sanajax.models.layers docstring) onto these axes. They
apply in order and a mesh axis is used at most once per array, so the activation names
("batch", "length", "embed") shard the batch over data x fsdp and leave `embed` (which shards
parameters over fsdp) whole, as MaxText's rule tables do.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: jax_num_cpu_devices only works before the first device use

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    # Frozen encoders (Plan.place): Gemma-2's attention projections (its `embed` and `mlp` axes
    # use the rules above) and the DC-AE's conv / linear output channels.
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("conv_out", "fsdp"),
    # The stacked block axis of model.scan_layers (nn.scan's params axis, MaxText's name): never
    # sharded, so each scan step reads one whole layer, split only by the rules above.
    ("layers", None),
)


def mesh_config() -> ml_collections.ConfigDict:
  """The `mesh` section every DiT config carries: all axes 1 (one device, today's code path)."""
  c = ml_collections.ConfigDict()
  for name in MESH_AXES:
    c[name] = 1
  c.rules = DEFAULT_RULES
  # On a host without an accelerator: JAX's CPU backend as this many devices (jax_num_cpu_devices),
  # so a data axis of -1 runs the batch's parts side by side; 0 keeps JAX's one CPU device. No effect
  # on GPU / TPU devices. Applied by the CLIs before JAX starts (use_cpu_devices).
  c.cpu_devices = 0
  return c


def config_field(section: Any, name: str, default: Any) -> Any:
  """section.name from a ConfigDict / dict (a saved config.json) or an attribute object, else `default`."""
  return section.get(name, default) if hasattr(section, "get") else getattr(section, name, default)


def use_cpu_devices(mesh: Any) -> str | None:
  """Applies `mesh.cpu_devices` (see mesh_config) to this process; call before JAX's first device use.

  XLA:CPU runs the tiny models' many small operations on one device with little parallelism; two
  devices, each with half the batch, keep both cores busy (docs/results.md#two-cpu-devices). An
  explicit --xla_force_host_platform_device_count in XLA_FLAGS wins. Returns a one-line note when the
  request could not be applied (JAX already started with another CPU device count), else None.
  """
  n = config_field(mesh, "cpu_devices", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"config.mesh.cpu_devices={n!r}: must be an integer >= 0 (0: JAX's default of one CPU device).")
  if n == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  if xla_bridge.backends_are_initialized():
    have = len(jax.devices("cpu"))
    return None if have == n else (f"config.mesh.cpu_devices={n} not applied: JAX had already started with {have} "
                                   f"CPU device(s).")
  jax.config.update("jax_num_cpu_devices", n)
  return None


def mesh_shape(mesh: Any, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, sequence, tensor) sizes; one -1 takes the devices the others leave."""
  sizes = []
  for name in MESH_AXES:
    v = int(config_field(mesh, name, 1))
    if v == 0 or v < -1:
      raise ValueError(f"config.mesh.{name}={v}: mesh axis sizes are positive integers or -1 (the rest).")
    sizes.append(v)
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh has more than one axis set to -1: {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if known > num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices; {num_devices} are available.")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a multiple of "
                       f"the fixed axes' product {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  return tuple(sizes)


def make_mesh(mesh: Any, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """jax.make_mesh over (data, fsdp, sequence, tensor); uses the first prod(sizes) devices.

  All axes are `Auto` (GSPMD propagates shardings between the explicit in/out shardings and
  the block-boundary constraints).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh, len(devices))
  n = math.prod(shape)
  if n != len(devices) and jax.process_count() > 1:
    raise ValueError(f"config.mesh {shape} uses {n} of {len(devices)} devices; multi-host runs must use all "
                     f"(set one axis to -1).")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:n])


def normalize_rules(rules: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules as ((logical, (mesh axes...)), ...); accepts the lists a saved config.json holds."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"A logical-axis rule is (logical_name, mesh_axis or tuple of mesh axes), got {rule!r}.")
    name, axes = rule
    axes = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
    axes = tuple(a for a in axes if a is not None)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"Rule {rule!r} names mesh axes {bad}; the mesh axes are {MESH_AXES}.")
    out.append((str(name), axes))
  return tuple(out)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules) -> jax.sharding.PartitionSpec:
  """PartitionSpec for an array with logical `names` and `shape` under `rules`.

  Rules apply in order; a rule gives its mesh axes to the first still-unassigned dimension with
  that name (so the (embed, embed) timestep kernel is split once), if none of the axes is used
  yet in this array and the dimension divides evenly (else the dimension stays whole: e.g. a
  batch of 1 at init, or 70 heads on tensor=4). Size-1 mesh axes are dropped. An array whose
  rank differs from its names (CAME's factored statistics keep the parameter's box) is replicated.
  """
  if len(names) != len(shape):
    return jax.sharding.PartitionSpec()  # e.g. CAME's factored statistics: replicated.
  assigned: list[tuple[str, ...] | None] = [None] * len(names)
  used: set[str] = set()
  for logical, axes in rules:
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes or used & set(axes):
      continue
    size = math.prod(mesh.shape[a] for a in axes)
    for i, n in enumerate(names):
      if n == logical and assigned[i] is None and shape[i] % size == 0:
        assigned[i] = axes
        used |= set(axes)
        break
  return jax.sharding.PartitionSpec(*[a[0] if a and len(a) == 1 else a for a in assigned])


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({np.prod(list(mesh.shape.values()))} devices)"
