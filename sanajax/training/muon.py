"""Muon as optax.contrib.muon computes it, with the Newton-Schulz steps batched over same-shaped matrices.

optax.contrib.muon orthogonalises every weight matrix on its own: five quintic Newton-Schulz steps of
three matmuls each, per matrix. The tiny DiT has 47 such matrices, 34 of them 96 x 96, so its update was
~700 small matmuls. Here the matrices of one (m, n) shape are stacked into one (k, m, n) batch and
orthogonalised by batched matmuls: each matrix keeps its own Frobenius normalisation and products, so the
values are optax's up to float32 rounding (tested), in k times fewer operations (tiny DiT: 20.6 -> 12.2 ms
per update on 2 CPU cores, docs/results.md#the-faster-step).

The state is optax.contrib.muon's, node for node (a partition of MuonState + shape scaling + decay + rate
for the matrices, and AdamW for the rest), so checkpoints written with either restore with the other.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, MuonState

# Keller Jordan's quintic coefficients (optax.contrib.muon's default).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Matrices up to this many elements are grouped: the saving is per-operation overhead, which only small matrices
# feel; larger ones (Sana-600M's 1152 x 1152 and up) are compute-bound and stay alone, keeping their own sharding
# under a plan (a stack of differently split matrices would be resharded first).
GROUP_MAX_ELEMENTS = 1 << 20


def _is_dims(x: Any) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def _axes(x: jax.Array, dims: MuonDimensionNumbers) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, reduction, output) axes of x under dims, each normalised to non-negative ints."""
  as_tuple = lambda a: tuple(i % x.ndim for i in ((a,) if isinstance(a, int) else a))
  reduction, output = as_tuple(dims.reduction_axis), as_tuple(dims.output_axis)
  batch = tuple(i for i in range(x.ndim) if i not in reduction + output)
  return batch, reduction, output


def _fans(x: jax.Array, dims: MuonDimensionNumbers) -> tuple[int, int]:
  _, reduction, output = _axes(x, dims)
  return math.prod(x.shape[i] for i in reduction), math.prod(x.shape[i] for i in output)


def _as_matrices(x: jax.Array, dims: MuonDimensionNumbers) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """x as a (batch, fan_in, fan_out) stack and the function that puts such a stack back into x's layout."""
  batch, reduction, output = _axes(x, dims)
  order = batch + reduction + output
  moved = x.transpose(order)
  fan_in, fan_out = _fans(x, dims)
  stack = moved.reshape(-1, fan_in, fan_out)
  inverse = tuple(sorted(range(x.ndim), key=lambda i: order[i]))
  return stack, lambda s: s.reshape(moved.shape).transpose(inverse)


def newton_schulz(x: jax.Array, coeffs: jax.Array, steps: int, eps: float) -> jax.Array:
  """optax's orthogonalisation (Frobenius preconditioning, quintic steps) of each matrix of x (k, m, n)."""
  transposed = x.shape[1] > x.shape[2]  # iterate on the wide side, as optax does
  if transposed:
    x = jnp.swapaxes(x, 1, 2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)) + eps)
  a, b, c = (coeffs[i].astype(x.dtype) for i in range(3))
  for _ in range(steps):
    gram = jnp.einsum("kmn,kpn->kmp", x, x)
    poly = b * gram + c * jnp.einsum("kmp,kpq->kmq", gram, gram)
    x = a * x + jnp.einsum("kmp,kpn->kmn", poly, x)
  return jnp.swapaxes(x, 1, 2) if transposed else x


def orthogonalise_grouped(tree: Any, dims: Any, coeffs: jax.Array, steps: int, eps: float) -> Any:
  """newton_schulz on every leaf of `tree` (matrices per `dims`, a matching tree of MuonDimensionNumbers), the
  leaves with equal (fan_in, fan_out, dtype) and at most GROUP_MAX_ELEMENTS elements stacked into one batch."""
  views = []

  def collect(x, d):
    views.append(_as_matrices(x, d))
    return len(views) - 1

  index = jax.tree.map(collect, tree, dims, is_leaf=_is_dims)
  groups = collections.defaultdict(list)
  for i, (stack, _) in enumerate(views):
    small = stack.shape[1] * stack.shape[2] <= GROUP_MAX_ELEMENTS
    groups[(stack.shape[1:], stack.dtype) if small else i].append(i)
  results = [None] * len(views)
  for members in groups.values():
    stacks = [views[i][0] for i in members]
    done = newton_schulz(jnp.concatenate(stacks) if len(stacks) > 1 else stacks[0], coeffs, steps, eps)
    offset = 0
    for i, stack in zip(members, stacks):
      results[i] = views[i][1](done[offset:offset + stack.shape[0]])
      offset += stack.shape[0]
  return jax.tree.map(lambda i: results[i], index)


def scale_by_grouped_muon(dims_fn: Callable[[Any], Any], *, beta: float, eps: float, ns_steps: int = 5
                          ) -> optax.GradientTransformation:
  """optax.contrib.scale_by_muon (Nesterov momentum `beta`, Frobenius preconditioning), grouped; same MuonState."""
  def init_fn(params):
    return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                     ns_coeffs=jnp.asarray(NS_COEFFS))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                          optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                          optax.tree.bias_correction(updates, beta, count))
    out = orthogonalise_grouped(mu_hat, dims_fn(mu_hat), state.ns_coeffs, ns_steps, eps)
    return out, MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_to_rms(dims_fn: Callable[[Any], Any], rms: float) -> optax.GradientTransformation:
  """Each orthogonalised update times sqrt(max(fan_in, fan_out)) * rms (Moonlight's update-RMS match; optax's
  scale_by_shape with consistent_rms). Stateless (optax.EmptyState, as scale_by_shape)."""
  def update_fn(updates, state, params=None):
    del params
    scale = lambda u, d: u * (math.sqrt(max(_fans(u, d))) * rms)
    return jax.tree.map(scale, updates, dims_fn(updates), is_leaf=_is_dims), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def grouped_muon(learning_rate, dims_fn: Callable[[Any], Any], *, consistent_rms: float, beta: float = 0.95,
                 eps: float = 1e-8, weight_decay: float = 0.0, adam_b1: float = 0.9, adam_b2: float = 0.999
                 ) -> optax.GradientTransformation:
  """optax.contrib.muon(learning_rate, beta=, eps=, weight_decay=, adam_b1=, adam_b2=,
  adam_weight_decay=weight_decay, muon_weight_dimension_numbers=dims_fn, consistent_rms=) with grouped
  Newton-Schulz: the leaves dims_fn maps to MuonDimensionNumbers take Muon, the rest (None) AdamW (Nesterov,
  as optax's Muon half)."""
  def labels(params):
    return jax.tree.map(lambda d: "adam" if d is None else "muon", dims_fn(params), is_leaf=_is_dims)

  matrices = optax.chain(
      scale_by_grouped_muon(dims_fn, beta=beta, eps=eps),
      scale_to_rms(dims_fn, consistent_rms),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
  rest = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay, nesterov=True)
  return optax.transforms.partition({"muon": matrices, "adam": rest}, labels)
