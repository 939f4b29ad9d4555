"""Sharding plans and multi-host training: from one CPU to a pod by config (README "Scaling").

  mesh.py        config.mesh -> jax.make_mesh over (data, fsdp, sequence, tensor); logical-axis rules
  plan.py        Plan: shardings of states and batches, activation constraints
  sequence.py    sequence-parallel linear attention and Mix-FFN conv halo (shard_map)
  distributed.py jax.distributed.initialize from flags / SLURM / TPU pods
(Per-device bytes of a plan, `python -m sanajax.info`, are sanajax.training.memory: they size the trainer's state.)
"""
from sanajax.parallel.context import active_plan, use_plan
from sanajax.parallel.mesh import (
           DEFAULT_RULES,
           MESH_AXES,
           logical_to_mesh,
           make_mesh,
           mesh_config,
           mesh_shape,
           use_cpu_devices,
)
from sanajax.parallel.plan import Plan

__all__ = ["DEFAULT_RULES", "MESH_AXES", "Plan", "active_plan", "logical_to_mesh", "make_mesh", "mesh_config",
           "mesh_shape", "use_cpu_devices", "use_plan"]
