"""Training a SANA linear DiT with rectified flow (the library behind `python -m sanajax.train`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.config_check import ConfigError
from sanajax.data.buckets import bucket_ids_of, describe_buckets, table_from_config
from sanajax.data.feature_cache import CacheMismatchError, CacheSource, cache_path, cache_signature
from sanajax.data.latent_cache import build_latent_cache
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import make_source_from_config
from sanajax.diffusion import flow
from sanajax.models.backbones import build_backbone
from sanajax.models.dit_facts import describe
from sanajax.models.sd3_text import drop_encoders, encoder_keep
from sanajax.parallel import Plan
from sanajax.resolution import ae_downsample, apply_resolution
from sanajax.training import frozen_base
from sanajax.training import loop as loop_lib
from sanajax.training.autoencoder import train_ae
from sanajax.training.guard import guarded
from sanajax.training.optim import build_optimizer
from sanajax.training.state import (
  TrainState,
  accumulated_value_and_grad,
  apply_gradients,
  init_run_state,
  jit_step,
  micro_slice,
)
from sanajax.workdir.files import AE_INFO_FILE, CONFIG_FILE, ae_workdir, load_workdir_config, prepare_workdir
from sanajax.workdir.loaders import (
  ae_shift_factor,
  build_text_encoder,
  check_init_source,
  has_checkpoint,
  init_dit_params,
  init_params_from,
  load_ae,
  place_frozen,
)


def ae_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The train_ae config for the AE a DiT config names (same seed and data)."""
  c = ml_collections.ConfigDict()
  c.seed = config.seed
  c.ae = config.ae
  c.train = config.ae_train
  c.data = config.data
  if "mesh" in config:  # the DiT's sharding plan (README "Scaling") trains the AE too.
    c.mesh = config.mesh
  return c


def make_loss_fn(config, dit, ae_model, text_encoder, ae_scaling: float, plan: Plan, ae_shift: float = 0.0,
                 null_text: tuple[Any, Any] | None = None):
  """loss_fn(params, frozen, batch, key) -> scalar flow-matching loss of one global batch.

  The DiT's latents are (raw - ae_shift) * ae_scaling (SD3's VAE: shift_factor, scaling_factor; DC-AE: 0, s).

  AE-encode (unless the batch holds cached "latent"s instead of "image"s), text-encode (with
  caption dropout; unless the batch holds cached "context"s: then `null_text`, the empty caption's
  (context (L, D), mask (L,)), is what a dropped caption becomes and `text_encoder` may be None), noise,
  DiT; the DiT is traced under `plan` (block-boundary constraints, sequence-parallel layers). The batch's
  image size (an aspect-ratio bucket) sets the flow shift (flow.shift_for_size; config.diffusion.resolution_shift).
  SD3's text (text.kind "sd3": {"context", "pooled"} from CLIP-L, bigG and T5) also drops each encoder on its
  own with text.encoder_dropout (SD3: 0.463 each; sd3_text.encoder_dropout), after the whole-caption dropout.
  micro=(i, k): the loss of microbatch i of k (train.grad_accum_steps; state.micro_slice), every random draw
  made for the whole batch and sliced alike, so k microbatches average to the whole batch's loss.
  """
  if text_encoder is not None:
    null_ids, null_mask = (jnp.asarray(a) for a in text_encoder.tokenize([""]))
  dropout = config.train.caption_dropout
  encoder_probs = config.text.get("encoder_dropout", 0.0) if config.text.get("kind") == "sd3" else 0.0
  down, resolution = ae_downsample(config), int(config.data.resolution)

  def loss_fn(params, frozen, batch, key, micro=None):
    k_drop, k_t, k_eps = jax.random.split(key, 3)
    full = jax.tree.leaves(batch)[0].shape[0]  # the whole batch; draws are made for it, then cut to the microbatch
    cut = lambda x: micro_slice(x, micro)
    batch = {k: cut(v) for k, v in batch.items()}
    if "latent" in batch:  # from the latent cache (sanajax.data.latent_cache): already encoded.
      raw = batch["latent"]
    else:
      raw = ae_model.apply({"params": frozen["ae"]}, batch["image"], method=ae_model.encode)
    latents = jax.lax.stop_gradient((raw - ae_shift) * ae_scaling)
    # Caption dropout for classifier-free guidance: a dropped caption becomes the empty prompt,
    # which is also what the unconditional branch sees at sampling time.
    drop = cut(jax.random.bernoulli(k_drop, dropout, (full, 1)))
    if "context" in batch:  # from the text-feature cache (sanajax.data.feature_cache): already encoded.
      cached = batch["context"].astype(jnp.float32)  # stored bfloat16
      context = jnp.where(drop[:, :, None], jnp.asarray(null_text[0], jnp.float32), cached)
      mask = jnp.where(drop, jnp.asarray(null_text[1], jnp.int32), batch["attention_mask"])
    else:
      ids = jnp.where(drop, null_ids, batch["input_ids"])
      mask = jnp.where(drop, null_mask, batch["attention_mask"])
      context = jax.lax.stop_gradient(text_encoder.embed(frozen["text"], ids, mask))
    if isinstance(context, dict) and np.any(np.asarray(encoder_probs) > 0):  # SD3: CLIP-L, bigG, T5 dropped apart
      keep = cut(encoder_keep(jax.random.fold_in(key, 4), full, encoder_probs))
      context = dict(zip(("context", "pooled"), drop_encoders(context["context"], context["pooled"],
                                                                text_encoder.layout, keep)))
    # Static per compiled shape: each aspect-ratio bucket gets its own shift when resolution_shift is on.
    shift = flow.shift_for_size(config.diffusion, raw.shape[1] * down, raw.shape[2] * down, resolution)
    t = cut(flow.sample_time_from_config(k_t, full, config.diffusion, shift=shift))
    eps = cut(jax.random.normal(k_eps, (full, *latents.shape[1:]), latents.dtype))
    x_t = flow.interpolate(latents, eps, t)
    with plan.activate():
      # The DiT's own params, or a frozen base with a trained part (LoRA): training/frozen_base.py.
      pred = frozen_base.apply_model(config, dit, params, frozen, jax.random.fold_in(key, 3), x_t, t, context, mask)
    return flow.flow_matching_loss(pred, flow.velocity_target(latents, eps))

  return loss_fn


def make_train_step(config, dit, ae_model, text_encoder, tx, schedule, ae_scaling: float, *,
                    plan: Plan, state_shardings, frozen_shardings=None,
                    with_grads: bool = False, batch_field: str = "image", ae_shift: float = 0.0,
                    null_text: tuple[Any, Any] | None = None):
  """The jitted DiT step: make_loss_fn's loss, its gradient, the guarded update.

  Frozen AE and text-encoder parameters are arguments (not closed-over constants) so they are
  not baked into the compiled program. The step is jitted with the sharding `plan`'s explicit
  shardings (sanajax.parallel; one device by default): the state as `state_shardings`
  (plan.shardings of it), the frozen parameters as `frozen_shardings` (default replicated;
  train() splits them with workdir.loaders.place_frozen), the batch over data x fsdp
  (plan.batch_spec), metrics replicated. with_grads: metrics also hold the step's
  gradients (laid out as the parameters), for inspecting or comparing plans. batch_field:
  "image" (batches of images, AE-encoded in the step) or "latent" (from the latent cache). null_text:
  given, the batches hold cached text features ("context" (B, L, D)) instead of "input_ids" (see
  make_loss_fn). Each batch shape (aspect-ratio bucket) compiles once.
  """
  loss_fn = make_loss_fn(config, dit, ae_model, text_encoder, ae_scaling, plan, ae_shift, null_text)
  accum = int(config.train.get("grad_accum_steps", 1))

  text_field = ("input_ids", 2) if null_text is None else ("context", 3)
  batch_sh = {k: plan.batch_sharding(n) for k, n in ((batch_field, 4), text_field, ("attention_mask", 2))}
  metrics_sh = plan.replicated
  frozen_sh = plan.replicated if frozen_shardings is None else frozen_shardings
  if with_grads:
    metrics_sh = {k: plan.replicated for k in ("loss", "grad_norm", "learning_rate")}
    metrics_sh["grads"] = state_shardings.params
  jit = jit_step(plan, (state_shardings, frozen_sh, batch_sh), (state_shardings, metrics_sh))

  @jit
  def step(state: TrainState, frozen, batch):
    rng, key = jax.random.split(state.rng)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    # train.grad_accum_steps microbatches of the batch, one update (state.accumulated_value_and_grad).
    loss, grads = accumulated_value_and_grad(loss_fn, accum)(state.params, frozen, batch, key)
    state, grad_norm = apply_gradients(state, grads, loss, tx, config.train.ema_decay, rng)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step - 1)}
    if with_grads:
      metrics["grads"] = grads
    return state, metrics

  return step


def init_train_state(config, tx, key: jax.Array, plan: Plan):
  """(state, state shardings, per-host batch size) for a fresh run of `config` (state.init_run_state:
  laid out by the plan; checks that config.train.batch_size, the global batch, splits over the
  processes and data x fsdp)."""
  init = frozen_base.trainable_init(config) or (lambda k: init_dit_params(config, k))  # LoRA: only the adapters
  return init_run_state(init, tx, jax.random.fold_in(key, 0),
                        jax.random.fold_in(key, 1), plan, config.train.batch_size)


def make_encode_fn(ae_model, ae_params):
  """Jitted images (B, R, R, 3) in [-1, 1] -> raw AE latents (B, h, w, c), for the latent cache."""
  encode = jax.jit(lambda p, x: ae_model.apply({"params": p}, x, method=ae_model.encode))
  return lambda images: encode(ae_params, jnp.asarray(images))


def ae_needs_training(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether the DiT run must train its AE first (its AE workdir holds no trained AE). Reads only, so `train`
  asks before it writes the workdir: no AE and no `ae_train` section to train one with (the SANA configs: their
  DC-AE comes converted) is a FileNotFoundError naming the fix, and the corrected command starts clean."""
  ae_dir = ae_workdir(config, workdir)
  if has_checkpoint(ae_dir):  # listed once: orbax opens the checkpoint folder for it
    if os.path.exists(os.path.join(ae_dir, AE_INFO_FILE)):
      return False
    saved = load_workdir_config(ae_dir) if os.path.exists(os.path.join(ae_dir, CONFIG_FILE)) else {}
    if "model" in saved:  # a DiT run's folder: training an AE there would only be refused later, less clearly
      raise FileNotFoundError(f"ae.workdir={ae_dir!r} is a text-to-image model's workdir, not an autoencoder's; "
                              f"its AE is {ae_workdir(saved, ae_dir)}.")
  if "ae_train" not in config:
    raise FileNotFoundError(
        f"No AE checkpoint in {ae_dir}. Set --config.ae.workdir to a trained AE (sanajax.train_ae) or to "
        f"converted released weights (sanajax.convert).")
  return True


def ensure_ae(config: ml_collections.ConfigDict, workdir: str, *, needs_training: bool | None = None) -> str:
  """Returns the AE workdir, training the AE first when it holds no checkpoint and the config allows.
  needs_training: ae_needs_training's answer where the caller has asked it already (None: asked here)."""
  ae_dir = ae_workdir(config, workdir)
  if ae_needs_training(config, workdir) if needs_training is None else needs_training:
    print(f"No AE checkpoint in {ae_dir}: training the AE first.", flush=True)
    train_ae(ae_train_config(config), ae_dir)
  return ae_dir


@guarded("dit")  # the whole config checked, then the workdir locked, before any work
def train(config: ml_collections.ConfigDict, workdir: str, *,
          evaluate: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
          make_sample_fn: Callable[..., Callable[[Any], np.ndarray]] | None = None) -> dict:
  """Trains (or resumes) the DiT in workdir.

  evaluate(config, workdir) -> dict runs after the last step (sanajax.eval.after_training.
  evaluate_dit_run: GenEval-lite on held-out prompts); its result is returned ({} without one).
  make_sample_fn(config, ae_model, ae_params, ae_scaling, text_encoder, plan) -> (state -> uint8
  grid) gives the TensorBoard grids every train.sample_every steps (after_training.make_grid_fn).
  """
  start_time = time.perf_counter()
  config = apply_resolution(config)
  # config.init_from, or config.train.init_from (a stage of the resolution cascade, docs/data.md#cascade).
  init_from = config.get("init_from") or config.train.get("init_from")
  if init_from:
    check_init_source(init_from)  # before the AE trains or the workdir is written
  train_ae_first = ae_needs_training(config, workdir)  # raises before anything is written when there is no AE
  prepare_workdir(workdir, config)
  ae_model, ae_params, ae_scaling, ae_config = load_ae(ensure_ae(config, workdir, needs_training=train_ae_first))
  cache_dir = cache_path(config.data.source)
  table = table_from_config(config)  # aspect-ratio buckets (config.data.buckets; None: square crops)
  # From the on-disk cache the step runs no text encoder; it loads only if a sample grid is drawn.
  text_encoder = None if cache_dir else build_text_encoder(config)
  dit = build_backbone(config.model)
  key = jax.random.PRNGKey(config.seed)
  tx, schedule = build_optimizer(config.train, config.train.num_steps)
  plan = Plan.from_config(config)
  state, state_sh, host_batch = init_train_state(config, tx, key, plan)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"DiT: {num_params / 1e6:.2f}M parameters; AE scaling factor {ae_scaling:.4f}."
        + (f" Sharding plan: {plan}." if plan.num_devices > 1 else ""), flush=True)

  if init_from:
    # Fine-tuning: start from converted or previously trained weights (sanajax.workdir.loaders.init_params_from);
    # a checkpoint of this run, restored below, still wins, so a resumed fine-tune continues.
    loaded = init_params_from(init_from, state.params)
    state = state.replace(params=loaded, ema_params=jax.tree.map(jnp.copy, loaded))
    print(f"DiT initialised from {init_from}.", flush=True)
  if cache_dir:  # refused, naming the fields, when made with another AE, text encoder, resolution or buckets.
    try:
      source = CacheSource(cache_dir, cache_signature(config, ae_scaling, table))
    except CacheMismatchError as e:
      raise ConfigError([str(e)]) from None
  else:
    source = make_source_from_config(config.data, config.seed, buckets=table)
  process_index, process_count = jax.process_index(), jax.process_count()
  bucket_ids = None if table is None else bucket_ids_of(source, table)
  if bucket_ids is not None:
    print(describe_buckets(table, bucket_ids, int(config.train.batch_size)), flush=True)
  if config.data.get("latent_cache", 0) and not cache_dir:
    if bucket_ids is None:
      # No more images than the run will read (a short run, or a test, encodes only those).
      num_cached = min(int(config.data.latent_cache), int(config.train.num_steps) * int(config.train.batch_size))
      source = build_latent_cache(source, make_encode_fn(ae_model, ae_params), num_cached,
                                  process_index=process_index, process_count=process_count)
      process_index, process_count = 0, 1  # the cache already holds only this host's share.
    else:  # each image encoded at its bucket's size; every host caches all, as every host schedules all.
      # Up to data.latent_cache images, not steps x batch: which images fill a bucket's batches depends on the
      # buckets, and the first steps x batch images may fill none (a short run on a small set).
      source = build_latent_cache(source, make_encode_fn(ae_model, ae_params), int(config.data.latent_cache),
                                  bucket_ids=bucket_ids)
      bucket_ids = source.bucket_ids()
  data_iter = make_train_iterator(
      source, batch_size=host_batch, seed=config.seed, tokenize_fn=None if cache_dir else text_encoder.tokenize,
      caption_threshold=config.data.caption_clip_threshold, caption_temperature=config.data.caption_temperature,
      process_index=process_index, process_count=process_count,
      num_workers=config.data.get("num_workers", 0), bucket_ids=bucket_ids)
  frozen = {"ae": ae_params} if text_encoder is None else {"ae": ae_params, "text": text_encoder.params}
  frozen = place_frozen(plan, frozen, text_encoder)
  frozen.update(frozen_base.frozen_parts(config, plan))  # a frozen base DiT (LoRA), else nothing
  step = make_train_step(config, dit, ae_model, text_encoder, tx, schedule, ae_scaling, plan=plan,
                         state_shardings=state_sh, batch_field=getattr(source, "field", "image"),
                         frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                         ae_shift=ae_shift_factor(ae_config), null_text=source.null_text if cache_dir else None)
  step_fn = lambda s, b: step(s, frozen, plan.shard_batch(b))
  sample_fn = None
  if make_sample_fn is not None:
    if text_encoder is None:  # cache: the text encoder loads when the first grid is drawn, not before.
      made = {}

      def sample_fn(s):
        if "fn" not in made:
          made["fn"] = make_sample_fn(config, ae_model, frozen["ae"], ae_scaling, build_text_encoder(config), plan)
        return made["fn"](s)
    else:
      sample_fn = make_sample_fn(config, ae_model, frozen["ae"], ae_scaling, text_encoder, plan)
  loop_lib.run_from_config(config.train, workdir, state, step_fn, data_iter, description="dit",
                           flops_per_step=describe(config)["train_step_flops"], sample_fn=sample_fn,
                           shard_fn=plan.shard_batch)  # batches on the devices two ahead
  print(f"Training done in {time.perf_counter() - start_time:.0f} s.", flush=True)
  if evaluate is None:
    return {}
  result = evaluate(config, workdir)
  print(f"Total wall time {time.perf_counter() - start_time:.0f} s.", flush=True)
  return result
