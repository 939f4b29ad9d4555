"""The train state: everything a run needs to continue exactly where it stopped.

The optimizer (an optax transformation) is not part of the state: it is rebuilt from the
config, so the state is a plain pytree of arrays that Orbax saves and restores as is.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sanajax.config_check import host_batch_size

# What the NaN guard can name, in the order of `TrainState.nan_code`.
NAN_QUANTITIES = ("loss", "grad_norm")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far.
  params: Any  # float32 master weights.
  opt_state: Any
  ema_params: Any  # EMA of params (a copy of params when the EMA is off, so sampling code is uniform).
  rng: jax.Array  # uint32[2] raw key; split once per step.
  nan_step: jax.Array  # int32: first step (1-based, as logged) whose update was non-finite; -1 if none.
  nan_code: jax.Array  # int32 index into NAN_QUANTITIES.


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Fresh state at step 0 with the EMA initialised to the parameters."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=jnp.asarray(rng, jnp.uint32),
      nan_step=jnp.full((), -1, jnp.int32),
      nan_code=jnp.zeros((), jnp.int32),
  )


def create_sharded_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                               params_key: jax.Array, rng: jax.Array, plan: Any) -> tuple[TrainState, Any]:
  """(state, its shardings) built by one jit with `plan`'s out_shardings (sanajax.parallel.Plan).

  Parameters, optimizer moments and EMA follow the parameters' logical names (FSDP / tensor
  splits), scalars and the rng are replicated. Values equal create_train_state's.
  """
  def make(params_key, rng):
    return create_train_state(init_params(params_key), tx, rng)
  abstract = jax.eval_shape(make, params_key, rng)
  shardings = plan.shardings(abstract)
  # numpy keys: jit inputs every process passes identically (no single-device placement).
  keys = (np.asarray(jax.device_get(params_key)), np.asarray(jax.device_get(rng)))
  return jax.jit(make, out_shardings=shardings)(*keys), shardings


def init_run_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                   params_key: jax.Array, rng: jax.Array, plan: Any, batch_size: int) -> tuple[TrainState, Any, int]:
  """(state, state shardings, per-process batch) for a fresh run (the DiT's and the AE's).

  create_sharded_train_state builds the whole state by one jit whose out_shardings follow the
  plan (sanajax.parallel.Plan), so no device ever holds more than its shard;
  `batch_size` (config.train.batch_size) is the global batch, split over processes (each reads
  its own part of the data) and then over data x fsdp, so it must be a multiple of both.
  """
  batch = host_batch_size(plan, batch_size)
  state, shardings = create_sharded_train_state(init_params, tx, params_key, rng, plan)
  return state, shardings, batch


def jit_step(plan: Any, in_shardings: Any = None, out_shardings: Any = None) -> Callable[[Callable], Callable]:
  """The jax.jit decorator of a train step fn(state, ...) -> (state, metrics): the state (argument 0)
  is donated; explicit in/out shardings from the plan."""
  return lambda fn: jax.jit(fn, donate_argnums=(0,), in_shardings=in_shardings, out_shardings=out_shardings)


def micro_slice(x: jax.Array, micro: tuple[Any, int] | None) -> jax.Array:
  """Microbatch i of k of a batch-leading array x (B, ...): the examples i, i + k, i + 2k, ... (B / k of them).

  Strided, not contiguous, so that under a data / fsdp split of B every device keeps an equal share of each
  microbatch (B / k must split over the batch shards as B does). micro None: x itself."""
  if micro is None:
    return x
  i, k = micro
  return jax.lax.dynamic_index_in_dim(x.reshape(x.shape[0] // k, k, *x.shape[1:]), i, axis=1, keepdims=False)


def accumulated_value_and_grad(loss_fn: Callable, steps: int) -> Callable:
  """jax.value_and_grad(loss_fn) over `steps` microbatches (train.grad_accum_steps): the mean loss and the
  mean gradient, one microbatch's activations in memory at a time (a lax.scan).

  loss_fn(params, *args, micro=(i, steps)) computes microbatch i's mean loss (micro_slice of its batch;
  random draws made for the whole batch and sliced alike), so with equal microbatches the result equals
  the whole batch's value and gradient up to float32 summation order. steps 1: jax.value_and_grad(loss_fn).
  """
  if steps == 1:
    return jax.value_and_grad(loss_fn)

  def value_and_grad(params, *args):
    def body(total, i):
      value = jax.value_and_grad(loss_fn)(params, *args, micro=(i, steps))
      return jax.tree.map(jnp.add, total, value), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zero, jnp.arange(steps))
    return loss / steps, jax.tree.map(lambda g: g / steps, grads)

  return value_and_grad


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA decay used at `step` (0-based): min(decay, (1 + step) / (10 + step)).

  The warm-up (TensorFlow's ExponentialMovingAverage `num_updates` rule) keeps the EMA from
  carrying the random initialisation: with a fixed 0.999, 30% of it would still be in the
  EMA after 1,200 steps, which is a whole CPU run (measured: the EMA weights of such a run
  sampled blank images while the raw weights drew shapes).
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """ema <- d * ema + (1 - d) * params with d = ema_decay_at(step, decay); decay 0 copies params."""
  if decay <= 0.0:
    return params
  d = ema_decay_at(step, decay)
  return jax.tree.map(lambda e, p: e * d + p.astype(e.dtype) * (1.0 - d), ema, params)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, tx: optax.GradientTransformation,
                    ema_decay: float, rng: jax.Array) -> tuple[TrainState, jax.Array]:
  """One optimizer update, guarded against non-finite values.

  A non-finite loss or gradient norm leaves params, optimizer state and EMA untouched and
  records the first such step and which quantity it was; the loop reads that at its next
  logging step and stops the run (no host sync per step). Returns (new state, grad norm).
  """
  grad_norm = optax.tree.norm(grads)
  loss_ok = jnp.isfinite(loss)
  grad_ok = jnp.isfinite(grad_norm)
  ok = loss_ok & grad_ok
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params, ema_decay, state.step)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  first_bad = (~ok) & (state.nan_step < 0)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema, state.ema_params),
      rng=rng,
      nan_step=jnp.where(first_bad, state.step + 1, state.nan_step),
      nan_code=jnp.where(first_bad, jnp.where(loss_ok, 1, 0), state.nan_code),
  )
  return new_state, grad_norm
