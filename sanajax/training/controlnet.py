"""Training a SANA ControlNet on a frozen base DiT (`python -m sanajax.train --config=configs/controlnet_tiny.py:BASE`).

The DiT's own trainer pieces do the work: the flow-matching loss is training.dit.make_loss_fn run on a
models.controlnet.ControlledDiT whose trainable parameters are the ControlNet's (the base DiT, AE and
text encoder are frozen arguments of the step), the loop, checkpoints, resume, NaN guard and sharding
plan are the shared ones. What is new is the condition: each batch's images get their condition
(config.controlnet.condition, "canny": data.conditions.edge_image, on the host, so a resumed run sees
the same conditions), which the step encodes with the frozen DC-AE like the images (times the
scaling factor), as SanaControlNetPipeline encodes its control image.

The workdir holds config.json (the base's config plus the `controlnet` section naming the base
workdir) and the ControlNet's train state; sampling reads both (sanajax.sample --workdir=THIS
--control=IMAGE, or --controlnet=THIS on the base's Sprint student).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.data.conditions import condition_images
from sanajax.data.pipeline import make_train_iterator, uint8_to_unit
from sanajax.data.sources import make_source_from_config
from sanajax.models.backbones import build_backbone
from sanajax.models.controlnet import (
  ControlledDiT,
  build_controlnet,
  controlnet_params_from_base,
  encode_control,
  init_controlnet,
)
from sanajax.models.weights_util import put_like
from sanajax.parallel import Plan
from sanajax.resolution import apply_resolution
from sanajax.training import loop as loop_lib
from sanajax.training.dit import make_loss_fn
from sanajax.training.guard import guarded
from sanajax.training.optim import build_optimizer
from sanajax.training.state import apply_gradients, init_run_state, jit_step
from sanajax.workdir.files import ae_workdir, prepare_workdir
from sanajax.workdir.loaders import ae_shift_factor, build_text_encoder, load_ae, load_dit_params, place_frozen


def condition_options(config: ml_collections.ConfigDict) -> dict:
  """The condition's options from config.controlnet (canny_low, canny_high, canny_blur_sigma)."""
  cn = config.controlnet
  return {"low": cn.get("canny_low", 100.0), "high": cn.get("canny_high", 200.0),
          "blur_sigma": cn.get("canny_blur_sigma", 0.0)}


def add_condition(batch: dict, kind: str, options: dict) -> dict:
  """The batch with "control": the condition images of batch["image"] (float [-1, 1] -> same), on the host."""
  images = np.clip(np.round((np.asarray(batch["image"], np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return {**batch, "control": uint8_to_unit(condition_images(kind, images, options))}


def make_controlnet_step(config, model: ControlledDiT, ae_model, text_encoder, tx, schedule, ae_scaling: float, *,
                         plan: Plan, state_shardings, frozen_shardings, ae_shift: float = 0.0):
  """The jitted ControlNet step: (state, frozen {"ae", "text", "base"}, batch {"image", "control",
  "input_ids", "attention_mask"}) -> (state, metrics). Gradients reach only the ControlNet (state.params)."""
  dit_loss = make_loss_fn(config, model, ae_model, text_encoder, ae_scaling, plan, ae_shift)

  def loss_fn(params, frozen, batch, key):
    control = jax.lax.stop_gradient(encode_control(ae_model, frozen["ae"], batch["control"], ae_scaling, ae_shift))
    variables = {"base": frozen["base"], "controlnet": params, "control": control}
    return dit_loss(variables, frozen, {k: v for k, v in batch.items() if k != "control"}, key)

  batch_sh = {k: plan.batch_sharding(n) for k, n in (("image", 4), ("control", 4), ("input_ids", 2),
                                                      ("attention_mask", 2))}

  @jit_step(plan, (state_shardings, frozen_shardings, batch_sh), (state_shardings, plan.replicated))
  def step(state, frozen, batch):
    rng, key = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch, key)
    state, grad_norm = apply_gradients(state, grads, loss, tx, config.train.ema_decay, rng)
    return state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step - 1)}

  return step


@guarded("dit")  # the whole config (its `controlnet` section included) checked, then the workdir locked
def train_controlnet(config: ml_collections.ConfigDict, workdir: str, *,
                     evaluate: Callable[[ml_collections.ConfigDict, str], dict] | None = None) -> dict:
  """Trains (or resumes) a ControlNet on the frozen DiT of config.controlnet.base_workdir.

  evaluate(config, workdir) -> dict runs after the last step (eval.control_fidelity.evaluate_controlnet_run).
  """
  start_time = time.perf_counter()
  config = apply_resolution(config)
  prepare_workdir(workdir, config)
  cn = config.controlnet
  ae_model, ae_params, ae_scaling, ae_config = load_ae(ae_workdir(config, workdir))
  text_encoder = build_text_encoder(config)
  dit = build_backbone(config.model)
  controlnet = build_controlnet(config.model, int(cn.num_layers))
  model = ControlledDiT(dit, controlnet)
  base_params = load_dit_params(cn.base_workdir, ema=True)
  key = jax.random.PRNGKey(config.seed)
  tx, schedule = build_optimizer(config.train, config.train.num_steps)
  plan = Plan.from_config(config)
  state, state_sh, host_batch = init_run_state(lambda k: init_controlnet(controlnet, config.model, k), tx,
                                               jax.random.fold_in(key, 0), jax.random.fold_in(key, 1), plan,
                                               config.train.batch_size)
  # The ControlNet starts as the base's embedders and first blocks with zero Linears (a no-op on the
  # base); a checkpoint of this run, restored by the loop, wins over this.
  copied = put_like(state.params, nn.unbox(controlnet_params_from_base(base_params, jax.device_get(state.params))))
  state = state.replace(params=copied, ema_params=jax.tree.map(jnp.copy, copied))  # optimizer moments: zeros
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"ControlNet: {num_params / 1e6:.2f}M trainable parameters ({cn.num_layers} of {config.model.depth} blocks "
        f"copied from {cn.base_workdir}); condition {cn.condition}.", flush=True)
  source = make_source_from_config(config.data, config.seed)
  data_iter = make_train_iterator(
      source, batch_size=host_batch, seed=config.seed, tokenize_fn=text_encoder.tokenize,
      caption_threshold=config.data.caption_clip_threshold, caption_temperature=config.data.caption_temperature,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.get("num_workers", 0))
  frozen = place_frozen(plan, {"ae": ae_params, "text": text_encoder.params}, text_encoder)
  frozen["base"] = plan.place(base_params)
  step = make_controlnet_step(config, model, ae_model, text_encoder, tx, schedule, ae_scaling, plan=plan,
                              state_shardings=state_sh, frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                              ae_shift=ae_shift_factor(ae_config))
  kind, options = str(cn.condition), condition_options(config)
  step_fn = lambda s, b: step(s, frozen, plan.shard_batch(add_condition(b, kind, options)))
  loop_lib.run_from_config(config.train, workdir, state, step_fn, data_iter, description="controlnet")
  print(f"Training done in {time.perf_counter() - start_time:.0f} s.", flush=True)
  if evaluate is None:
    return {}
  result: dict[str, Any] = evaluate(config, workdir)
  print(f"Total wall time {time.perf_counter() - start_time:.0f} s.", flush=True)
  return result
