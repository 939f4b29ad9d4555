"""SANA-Sprint distillation (the library behind `python -m sanajax.distill_sprint`): sCM + LADD.

A teacher run (sanajax.train; its config.json + EMA weights) is distilled into a student with the
Sprint options of its backbone (SanaDiT or the MM-DiT: CFG embedding, optionally dense time),
initialised from the teacher so that it starts as the teacher (the CFG embedder's last layer is
zero). The student has the teacher's architecture: a config written for the other backbone (e.g.
configs/sprint_tiny.py, a SANA DiT, with an MM-DiT teacher) takes the teacher's `model` section and
keeps only its Sprint fields (with_teacher_architecture). One optimizer step of this
trainer is, on one batch:

  G (generator) update of the student DiT and the sCM log-variance head, with its own optimizer:
    sCM:  teacher CFG-guided PF-ODE velocity dx_t/dt (frozen, no gradient), the student's F^- and
          cos t sin t dF^-/dt from ONE `jax.jvp` (float32 compute), tangent g (warm-up, normalised),
          loss (sanajax.diffusion.scm.scm_loss), weight scm_lambda;
    LADD: a one-step student sample from t' (pi/2 with probability largest_timestep_prob), re-noised
          at a discriminator time, scored by the heads on frozen-teacher features (gradient flows
          through the teacher into the sample, never into the teacher's weights), -mean D(fake),
          weight adv_lambda;
  D (discriminator) update of the heads, with their own optimizer: hinge loss on real latents
  against samples of the updated student (plus caption-misaligned real pairs as fakes).
The reference (train_scm_ladd.py) alternates G and D phases on consecutive batches; here both
phases of one step see the same batch (with independent noise), so that a step is one pure,
jitted, resumable function. adv_lambda = 0 is sCM only; scm_lambda = 0 is LADD only (the ablation).

The workdir has the training layout (config.json, checkpoints/, metrics.jsonl, tensorboard/), and
`ema_params` of the checkpoint is the student DiT, so sanajax.sample / Generator.from_workdir
load it like any run (the distilled config.json names the teacher's AE as `ae.workdir`).
"""
from __future__ import annotations

import copy
import functools
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sanajax.config_check import host_batch_size
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import make_source_from_config
from sanajax.diffusion import scm, trigflow
from sanajax.diffusion.samplers import as_cfg_interval, guided_velocity
from sanajax.dtypes import dtype_from_name
from sanajax.models.backbones import backbone_name, build_backbone, hidden_size, num_blocks
from sanajax.models.discriminator import LaddHeads
from sanajax.models.sana_dit import LogVarHead, student_params_from_teacher
from sanajax.parallel import Plan
from sanajax.resolution import ae_downsample, apply_resolution
from sanajax.training import loop as loop_lib
from sanajax.training.guard import guarded
from sanajax.training.optim import build_optimizer
from sanajax.training.state import ema_update
from sanajax.workdir.files import ae_workdir, load_model_workdir_config, load_workdir_config, prepare_workdir
from sanajax.workdir.loaders import (
  build_text_encoder,
  init_dit_params,
  load_ae,
  load_dit_params,
  place_frozen,
)

# Model fields a student may change relative to its teacher (the Sprint options); every other
# architecture field must match, or the teacher's weights would not initialise the student.
SPRINT_MODEL_FIELDS = ("guidance_embeds", "guidance_embeds_scale", "timestep_scale", "qk_norm", "dtype", "attn_impl",
                       "remat")
# The Sprint fields both backbones read with the same meaning: what a config written for one backbone
# passes to a student of the other (dtype / attn_impl / remat / qk_norm take per-backbone values).
CROSS_BACKBONE_FIELDS = ("guidance_embeds", "guidance_embeds_scale", "timestep_scale")


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run needs to continue exactly; Orbax saves it as one pytree.

  `params` / `ema_params` are the student DiT (same tree as `init_dit_params(config)`, so sampling
  code restores `ema_params` as for a teacher run); `opt_state` is the generator optimizer over
  {"dit": params, "logvar": logvar_params}; `disc_*` are the LADD heads and their optimizer.
  nan_step / nan_code as TrainState (code 0: a loss, G or D; 1: a gradient norm).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  logvar_params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  rng: jax.Array
  nan_step: jax.Array
  nan_code: jax.Array


# --- teacher -> student ---------------------------------------------------------------------------

def spread_blocks(depth: int, n: int) -> tuple[int, ...]:
  """n block indices spread over [0, depth), the last block included (the reference taps 2, 8, 14,
  19 of 20; configs/sprint_tiny.py 0, 2, 3 of 4)."""
  n = max(1, min(n, depth))
  return tuple(sorted({int(round(depth - 1 - i * depth / n)) for i in range(n)}))


def student_model_section(student_model: ml_collections.ConfigDict, teacher_model: ml_collections.ConfigDict,
                          fields: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A copy of the teacher's `model` section with the `fields` that `student_model` sets (its Sprint options)."""
  model = ml_collections.ConfigDict(teacher_model.to_dict())
  for field in fields:
    if field in student_model:
      model[field] = student_model[field]
  return model


def fit_head_blocks(config: ml_collections.ConfigDict) -> None:
  """distill.head_block_ids respread over the student's blocks (spread_blocks) when one is past its
  last block (a teacher shallower than the config's 4 blocks); in place."""
  ids = tuple(config.distill.head_block_ids)
  depth = num_blocks(config.model)
  if ids and max(ids) >= depth:
    config.distill.head_block_ids = spread_blocks(depth, len(ids))


def with_teacher_architecture(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config unchanged when its model is the teacher's backbone (check_student_config then asks for the
  same architecture); otherwise a copy whose model section is the teacher's with config.model's
  CROSS_BACKBONE_FIELDS (the CFG embedding, the time scale), head blocks fitted to its depth. So
  `--config=configs/sprint_tiny.py` (a SANA DiT) distils an MM-DiT teacher. A teacher_workdir without
  a readable config.json is left to config_check / load_teacher to report."""
  try:
    teacher = load_workdir_config(config.get("teacher_workdir") or "")
    if backbone_name(teacher.model) == backbone_name(config.model):
      return config
  except (OSError, ValueError, KeyError, AttributeError):
    return config
  config = copy.deepcopy(config)
  config.model = student_model_section(config.model, teacher.model, CROSS_BACKBONE_FIELDS)
  config.text = ml_collections.ConfigDict(teacher.text.to_dict())  # the frozen encoder the teacher was trained with
  fit_head_blocks(config)
  print(f"Note: the teacher is a model.name={backbone_name(teacher.model)!r}; the student takes its architecture "
        f"and text encoder (config.model = the teacher's + {CROSS_BACKBONE_FIELDS}), LADD heads on blocks "
        f"{list(config.distill.head_block_ids)}.", flush=True)
  return config


def check_student_config(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict) -> None:
  """Refuses a student whose architecture (or text encoder / data resolution) differs from the teacher's."""
  for field in sorted(set(teacher_config.model) | set(config.model)):
    if field in SPRINT_MODEL_FIELDS:
      continue
    a, b = teacher_config.model.get(field), config.model.get(field)
    if a != b:
      raise ValueError(f"config.model.{field}={b!r} differs from the teacher's {a!r} (teacher_workdir config.json); "
                       f"the student must have the teacher's architecture (only {SPRINT_MODEL_FIELDS} may differ).")
  if dict(config.text) != dict(teacher_config.text):
    raise ValueError("config.text differs from the teacher's text encoder; use the teacher's (configs/sprint_tiny.py "
                     "inherits configs/tiny.py).")
  if config.data.resolution != teacher_config.data.resolution:
    raise ValueError(f"config.data.resolution={config.data.resolution} differs from the teacher's "
                     f"{teacher_config.data.resolution}.")
  if not config.model.get("guidance_embeds", False):
    raise ValueError("A Sprint student needs config.model.guidance_embeds=True (the CFG embedding).")


def init_student_from_teacher(student_init: Any, teacher_params: Any) -> Any:
  """sana_dit.student_params_from_teacher on the unboxed trees, re-boxed with the student's logical
  axes (the checkpoint layout of init_dit_params, which sampling code restores)."""
  values = student_params_from_teacher(nn.meta.unbox(teacher_params), nn.meta.unbox(student_init))
  # jnp.array copies: the step donates the student's buffers, which must not be the teacher's.
  return jax.tree.map(lambda box, v: box.replace_boxed(jnp.array(v, jnp.float32))
                      if isinstance(box, nn.meta.AxisMetadata) else jnp.array(v, jnp.float32),
                      student_init, values, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def load_teacher(teacher_workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(teacher config, teacher EMA DiT params float32) from a training workdir."""
  if not teacher_workdir:
    raise ValueError("Set --config.teacher_workdir to the workdir of a trained teacher (python -m sanajax.train).")
  teacher_config = load_model_workdir_config(teacher_workdir)
  params = load_dit_params(teacher_workdir, teacher_config, ema=True)
  return teacher_config, params


# --- the step -------------------------------------------------------------------------------------

class SprintDistiller:
  """The pure pieces of a Sprint step, jitted as `step(state, frozen, batch) -> (state, metrics)`.

  frozen = {"ae": AE params, "text": text-encoder params, "teacher": teacher DiT params (in
  distill.teacher_dtype)}; passed as arguments so they are not baked into the compiled program.

  plan (sanajax.parallel.Plan; default one device): every DiT pass (teacher, student, the JVP, the
  heads' teacher features) is traced under it, and `make_step` jits the step with the plan's in/out
  shardings (init_sharded_state lays the state out, workdir.loaders.place_frozen the frozen weights).
  """

  def __init__(self, config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict, ae_model,
               ae_scaling: float, text_encoder, tx_g: optax.GradientTransformation,
               tx_d: optax.GradientTransformation, schedule, plan: Plan | None = None):
    d = config.distill
    self.config, self.d, self.plan = config, d, plan or Plan.single_device()
    self._teacher_json = teacher_config.to_json_best_effort(sort_keys=True)
    self.sigma_data = float(d.sigma_data)
    # Flow times where the teacher's CFG applies (samplers.guided_velocity): those it samples with
    # (distill.teacher_cfg_interval; absent in configs written before the field: every t).
    interval = teacher_config.get("sample", {}).get("cfg_interval") if d.get("teacher_cfg_interval") else None
    self.cfg_interval = as_cfg_interval(interval)
    self.scm_lambda, self.adv_lambda = float(d.scm_lambda), float(d.adv_lambda)
    if self.scm_lambda <= 0 and self.adv_lambda <= 0:
      raise ValueError("distill.scm_lambda and distill.adv_lambda are both 0: nothing to train.")
    teacher_dtype = dtype_from_name(d.teacher_dtype, "distill.teacher_dtype")
    blocks = tuple(int(i) for i in d.head_block_ids)
    depth = num_blocks(teacher_config.model)
    if not blocks or min(blocks) < 0 or max(blocks) >= depth:
      raise ValueError(f"distill.head_block_ids={list(blocks)} must be non-empty block indices < depth {depth}.")
    self.teacher = build_backbone(teacher_config.model, dtype=teacher_dtype)
    self.teacher_features = build_backbone(teacher_config.model, dtype=teacher_dtype, features_at=blocks)
    self.student = build_backbone(config.model)
    # The JVP runs in float32 whatever the compute dtype: the tangent is a small difference of large terms.
    self.student_f32 = build_backbone(config.model, dtype=jnp.float32)
    self.logvar_head = LogVarHead()
    self.heads = LaddHeads(len(blocks))
    self.ae_model, self.ae_scaling, self.text = ae_model, ae_scaling, text_encoder
    self.tx_g, self.tx_d, self.schedule = tx_g, tx_d, schedule
    null_ids, null_mask = text_encoder.tokenize([""])
    self._null = (jnp.asarray(null_ids), jnp.asarray(null_mask))

  def _traced(self):
    """DiT passes are traced under the plan (constraints, sequence-parallel layers); the frozen AE
    and text encoder are not (their layers are not written for the sequence split)."""
    return self.plan.activate()

  def _apply(self, model, params, *args, **kwargs):
    with self._traced():
      return model.apply({"params": params}, *args, **kwargs)

  # Models in the TrigFlow view: F(x_t / sigma_d, t) with t the trig time (B,).
  def teacher_F(self, tparams, x_scaled, t, ctx, mask, null_ctx, null_mask, cfg):
    """CFG-guided teacher TrigFlow prediction (B, H, W, C) float32; cfg (B,) scales. The transform
    is affine in v, so guiding the velocity guides F."""
    model_fn = lambda x, tt, c, m: self._apply(self.teacher, tparams, x, tt, c, m)
    guided = lambda x_f, t_f: guided_velocity(model_fn, x_f, t_f, ctx, mask, null_ctx, null_mask,
                                              cfg[:, None, None, None], self.cfg_interval)
    return trigflow.flow_to_trigflow(guided)(x_scaled.astype(jnp.float32), t)

  def student_F(self, params, x_scaled, t, ctx, mask, cfg, *, f32: bool = False):
    model = self.student_f32 if f32 else self.student
    flow_fn = lambda x_f, t_f: self._apply(model, params, x_f, t_f, ctx, mask, guidance=cfg)
    return trigflow.flow_to_trigflow(flow_fn)(x_scaled, t)

  def student_F_logvar(self, params, logvar_params, x_scaled, t, ctx, mask, cfg):
    """(F, logvar (B,)): the log-variance head reads the student's conditioning embedding."""
    x_f, t_f = trigflow.matched_flow_state(x_scaled, t, 1.0)
    v, state = self._apply(self.student, params, x_f, t_f, ctx, mask, guidance=cfg, mutable=["intermediates"])
    emb = state["intermediates"]["time_embedding"][0]
    return trigflow.trigflow_output(x_f, t_f, v), self.logvar_head.apply({"params": logvar_params}, emb)

  def disc_logits(self, dparams, tparams, x_noised, t, ctx, mask):
    """Heads on frozen-teacher features of x_noised (sigma_d units) at trig time t: (B, N * heads)."""
    x_f, t_f = trigflow.matched_flow_state(x_noised, t, self.sigma_data)
    _, feats = self._apply(self.teacher_features, tparams, x_f, t_f, ctx, mask)
    return self.heads.apply({"params": dparams}, feats)

  # Pieces of the step.
  def prepare(self, frozen, batch, key) -> dict:
    """Latents (sigma_d units), text, teacher CFG scales and every noise draw of one step."""
    d, sd = self.d, self.sigma_data
    latents = self.ae_model.apply({"params": frozen["ae"]}, batch["image"], method=self.ae_model.encode)
    x0 = jax.lax.stop_gradient(latents * self.ae_scaling) * sd
    b = x0.shape[0]
    ctx = self.text.embed(frozen["text"], batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    null_ids = jnp.broadcast_to(self._null[0], batch["input_ids"].shape)
    null_mask = jnp.broadcast_to(self._null[1], mask.shape)
    null_ctx = self.text.embed(frozen["text"], null_ids, null_mask)
    k = jax.random.split(key, 13)
    normal = lambda kk: jax.random.normal(kk, x0.shape, jnp.float32)  # unit; add_noise scales by sigma_d.
    t_gen = lambda kk: scm.sample_trigflow_time(kk, b, mean=d.logit_mean, std=d.logit_std, sigma_data=sd)
    t_disc = lambda kk: scm.sample_trigflow_time(kk, b, mean=d.logit_mean_discriminator,
                                                 std=d.logit_std_discriminator, sigma_data=sd)
    t = t_gen(k[0])
    t_adv = t_gen(k[1])
    t_d_gen = t
    if d.train_largest_timestep:
      t_adv = scm.largest_time_mix(k[2], t_adv, d.largest_timestep_prob, d.largest_timestep)
      t_d_gen = scm.largest_time_mix(k[3], t, d.largest_timestep_prob, d.largest_timestep)
    z = normal(k[4])
    return dict(x0=x0, ctx=ctx, mask=mask, null_ctx=null_ctx, null_mask=null_mask,
                cfg=scm.cfg_scale_choices(k[5], b, d.cfg_scales), t=t, x_t=trigflow.add_noise(x0, z, t, sd),
                t_adv=t_adv, z_adv=normal(k[6]), t_D=t_disc(k[7]), z_D=normal(k[8]),
                t_d_gen=t_d_gen, z_d_gen=normal(k[9]), t_D_fake=t_disc(k[10]), z_D_fake=normal(k[11]),
                z_D_real=normal(k[12]),
                key_d=jax.random.fold_in(key, 1))

  def scm_targets(self, params, frozen, inp, step) -> dict:
    """F^- and the normalised tangent g (constants of the G loss), from the teacher and one JVP."""
    sd = self.sigma_data
    dxt_dt = sd * self.teacher_F(frozen["teacher"], inp["x_t"] / sd, inp["t"], inp["ctx"], inp["mask"],
                                 inp["null_ctx"], inp["null_mask"], inp["cfg"])
    dxt_dt = jax.lax.stop_gradient(dxt_dt)
    params = jax.lax.stop_gradient(params)
    F_fn = lambda xs, tt: self.student_F(params, xs, tt, inp["ctx"], inp["mask"], inp["cfg"], f32=True)
    F_minus, dF = scm.student_tangent(F_fn, inp["x_t"], inp["t"], dxt_dt, sd)
    r = scm.tangent_warmup(step, int(self.d.tangent_warmup_steps))
    g, g_norm = scm.scm_tangent(F_minus, dF, dxt_dt, inp["x_t"], inp["t"], r, sd, float(self.d.tangent_norm_constant))
    return {"F_minus": F_minus, "g": g, "g_norm": jnp.mean(g_norm), "r": r}

  def generator_loss(self, gparams, disc_params, frozen, inp, targets):
    """scm_lambda * sCM + adv_lambda * (-mean D(fake)); returns (total, metrics)."""
    sd = self.sigma_data
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    if self.scm_lambda > 0:
      F, logvar = self.student_F_logvar(gparams["dit"], gparams["logvar"], inp["x_t"] / sd, inp["t"], inp["ctx"],
                                        inp["mask"], inp["cfg"])
      loss, aux = scm.scm_loss(F, targets["F_minus"], targets["g"], inp["t"], logvar, sd)
      total = total + self.scm_lambda * loss
      metrics.update(aux, scm_loss=loss, logvar=jnp.mean(logvar))
    if self.adv_lambda > 0:
      x_t = trigflow.add_noise(inp["x0"], inp["z_adv"], inp["t_adv"], sd)
      F = self.student_F(gparams["dit"], x_t / sd, inp["t_adv"], inp["ctx"], inp["mask"], inp["cfg"])
      x0_pred = trigflow.denoised_from_F(x_t, inp["t_adv"], F, sd)
      noised = trigflow.add_noise(x0_pred, inp["z_D"], inp["t_D"], sd)
      logits = self.disc_logits(disc_params, frozen["teacher"], noised, inp["t_D"], inp["ctx"], inp["mask"])
      adv = scm.adversarial_generator_loss(logits)
      total = total + self.adv_lambda * adv
      metrics["adv_loss"] = adv
    return total, metrics

  def discriminator_inputs(self, params, frozen, inp):
    """(fake, t_fake, ctx_fake, mask_fake, real, t_real): fake = re-noised samples of the (updated)
    student, plus, with misaligned_pairs_D, real latents paired with another sample's caption."""
    sd, d = self.sigma_data, self.d
    x_t = trigflow.add_noise(inp["x0"], inp["z_d_gen"], inp["t_d_gen"], sd)
    F = self.student_F(params, x_t / sd, inp["t_d_gen"], inp["ctx"], inp["mask"], inp["cfg"])
    x0_pred = jax.lax.stop_gradient(trigflow.denoised_from_F(x_t, inp["t_d_gen"], F, sd))
    fake = trigflow.add_noise(x0_pred, inp["z_D_fake"], inp["t_D_fake"], sd)
    real = trigflow.add_noise(inp["x0"], inp["z_D_real"], inp["t_D_fake"], sd)
    t_fake, ctx, mask = inp["t_D_fake"], inp["ctx"], inp["mask"]
    if d.misaligned_pairs_D and fake.shape[0] > 1:
      k1, k2 = jax.random.split(inp["key_d"])
      t_shift = scm.sample_trigflow_time(k1, fake.shape[0], mean=d.logit_mean_discriminator,
                                         std=d.logit_std_discriminator, sigma_data=sd)
      shifted = trigflow.add_noise(jnp.roll(inp["x0"], 1, axis=0), jax.random.normal(k2, fake.shape, jnp.float32),
                                   t_shift, sd)
      fake = jnp.concatenate([fake, shifted])
      t_fake = jnp.concatenate([t_fake, t_shift])
      ctx, mask = jnp.concatenate([ctx, ctx]), jnp.concatenate([mask, mask])
    return fake, t_fake, ctx, mask, real, inp["t_D_fake"]

  def discriminator_loss(self, disc_params, frozen, inp, d_inputs):
    fake, t_fake, ctx_f, mask_f, real, t_real = d_inputs
    logits_fake = self.disc_logits(disc_params, frozen["teacher"], fake, t_fake, ctx_f, mask_f)
    logits_real = self.disc_logits(disc_params, frozen["teacher"], real, t_real, inp["ctx"], inp["mask"])
    return scm.hinge_discriminator_loss(logits_real, logits_fake)

  def step_fn(self, state: DistillState, frozen, batch):
    """One G update then one D update (see the module docstring); pure, for jax.jit."""
    rng, key = jax.random.split(state.rng)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    inp = self.prepare(frozen, batch, key)
    targets = self.scm_targets(state.params, frozen, inp, state.step) if self.scm_lambda > 0 else {}
    gparams = {"dit": state.params, "logvar": state.logvar_params}
    (g_loss, metrics), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
        gparams, state.disc_params, frozen, inp, targets)
    new_g, g_opt, g_ok, g_loss_ok, g_grad_norm = _guarded_update(gparams, state.opt_state, grads, g_loss, self.tx_g)
    ema = ema_update(state.ema_params, new_g["dit"], float(self.config.train.ema_decay), state.step)
    ema = jax.tree.map(lambda n, o: jnp.where(g_ok, n, o), ema, state.ema_params)
    metrics.update(loss=g_loss, grad_norm=g_grad_norm, learning_rate=self.schedule(state.step))
    if "g_norm" in targets:
      metrics.update(tangent_norm=targets["g_norm"], tangent_warmup=targets["r"])
    disc_params, d_opt, d_ok, d_loss_ok = state.disc_params, state.disc_opt_state, True, True
    if self.adv_lambda > 0:
      d_inputs = self.discriminator_inputs(new_g["dit"], frozen, inp)
      (d_loss, d_aux), d_grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(
          state.disc_params, frozen, inp, d_inputs)
      disc_params, d_opt, d_ok, d_loss_ok, d_grad_norm = _guarded_update(
          state.disc_params, state.disc_opt_state, d_grads, d_loss, self.tx_d)
      metrics.update(d_aux, d_loss=d_loss, d_grad_norm=d_grad_norm)
    ok = g_ok & d_ok
    loss_ok = g_loss_ok & d_loss_ok
    first_bad = (~ok) & (state.nan_step < 0)
    # A non-finite G or D update leaves the whole state (both networks) as it was.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_g["dit"], state.params), logvar_params=keep(new_g["logvar"], state.logvar_params),
        opt_state=keep(g_opt, state.opt_state), ema_params=keep(ema, state.ema_params),
        disc_params=keep(disc_params, state.disc_params), disc_opt_state=keep(d_opt, state.disc_opt_state),
        rng=rng,
        nan_step=jnp.where(first_bad, state.step + 1, state.nan_step),
        nan_code=jnp.where(first_bad, jnp.where(loss_ok, 1, 0), state.nan_code))
    return new_state, metrics

  def make_step(self, frozen, state: DistillState):
    """step(state, host batch) -> (state, metrics) with `frozen` bound, jitted with the plan's explicit
    shardings: the state as the plan lays out `state` (parameters, EMA, both optimizers and the heads
    by their logical names), frozen weights as placed, the batch split over data x fsdp
    (plan.shard_batch of each host's part), metrics replicated; the state is donated."""
    plan = self.plan
    state_sh = plan.shardings(state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    batch_sh = {k: plan.batch_sharding(n) for k, n in (("image", 4), ("input_ids", 2), ("attention_mask", 2))}
    step = jax.jit(self.step_fn, donate_argnums=(0,), in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, plan.replicated))
    return lambda s, b: step(s, frozen, plan.shard_batch(b))

  def init_state(self, student_params, key: jax.Array, batch: int = 1) -> DistillState:
    """Fresh state: the student (from the teacher), a fresh log-variance head and fresh heads."""
    k_logvar, k_heads, k_rng = jax.random.split(key, 3)
    h = hidden_size(self.config.model)
    logvar_params = self.logvar_head.init(k_logvar, jnp.zeros((1, h), jnp.float32))["params"]
    c = self.config
    side = c.data.resolution // ae_downsample(c) // c.model.patch_size
    feats = [jnp.zeros((1, side * side, h), jnp.float32)] * self.heads.num_heads
    disc_params = self.heads.init(k_heads, feats)["params"]
    gparams = {"dit": student_params, "logvar": logvar_params}
    return DistillState(
        step=jnp.zeros((), jnp.int32), params=student_params, ema_params=jax.tree.map(jnp.copy, student_params),
        logvar_params=logvar_params, opt_state=self.tx_g.init(gparams), disc_params=disc_params,
        disc_opt_state=self.tx_d.init(disc_params), rng=jnp.asarray(k_rng, jnp.uint32),
        nan_step=jnp.full((), -1, jnp.int32), nan_code=jnp.zeros((), jnp.int32))

  def init_sharded_state(self, student_params, key: jax.Array) -> DistillState:
    """init_state laid out by the plan: one jit whose out_shardings follow the logical names, so
    no device holds more than its shard of the student, EMA, heads or optimizer moments."""
    student = self.plan.place(student_params)
    abstract = jax.eval_shape(self.init_state, student, key)
    # A numpy key: a jit input every process passes identically.
    return jax.jit(self.init_state, out_shardings=self.plan.shardings(abstract))(
        student, np.asarray(jax.device_get(key)))

  # jit's static `self`: two distillers built from the same configs and AE scaling trace the same
  # program (every model and optimizer is a function of them), so a resumed run in the same
  # process reuses the compiled step.
  def _fingerprint(self):
    return (self.config.to_json_best_effort(sort_keys=True), self._teacher_json, self.ae_scaling, repr(self.plan))

  def __hash__(self):
    return hash(self._fingerprint())

  def __eq__(self, other):
    return isinstance(other, SprintDistiller) and self._fingerprint() == other._fingerprint()


def _guarded_update(params, opt_state, grads, loss, tx):
  """An optimizer update that is dropped when the loss or the gradient norm is not finite (the
  NaN guard of state.apply_gradients). Returns (params, opt_state, ok, loss_ok, grad_norm)."""
  grad_norm = optax.tree.norm(grads)
  loss_ok = jnp.isfinite(loss)
  ok = loss_ok & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), ok, loss_ok, grad_norm


# --- the run --------------------------------------------------------------------------------------

def setup(config: ml_collections.ConfigDict, workdir: str):
  """Loads the teacher, AE and text encoder; returns (config, distiller, frozen, initial state)."""
  teacher_config, teacher_params = load_teacher(config.teacher_workdir)
  config = apply_resolution(config)
  check_student_config(config, teacher_config)
  for field, default in (("timestep_scale", 1.0), ("qk_norm", False)):
    student_value, teacher_value = config.model.get(field, default), teacher_config.model.get(field, default)
    if student_value != teacher_value:
      # Allowed (the released Sprint students embed dense time and normalise q / k), but then the
      # student starts from the teacher's weights, not from its function: SANA-Sprint fine-tunes
      # the teacher with them first (phase 1).
      print(f"Note: the student's model.{field}={student_value} differs from the teacher's {teacher_value}, so it "
            f"does not start as the teacher; fine-tune the teacher with the student's setting first "
            f"(README \"SANA-Sprint distillation\", phase 1).", flush=True)
  # The distilled workdir must sample on its own: point it at the teacher's AE.
  if not config.ae.workdir:
    config.ae.workdir = os.path.abspath(ae_workdir(teacher_config, config.teacher_workdir))
  config.diffusion.flow_shift = teacher_config.diffusion.flow_shift
  prepare_workdir(workdir, config)
  ae_model, ae_params, ae_scaling, _ = load_ae(config.ae.workdir)
  distiller, frozen, state = build_distiller(config, teacher_config, teacher_params, ae_model, ae_params, ae_scaling,
                                             build_text_encoder(config))
  return config, distiller, frozen, state


def discriminator_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The heads' optimizer settings: config.train (as the reference builds optimizer_D from the
  student's settings) with the peak rate replaced by distill.disc_learning_rate when that is > 0."""
  train = ml_collections.ConfigDict(config.train.to_dict())
  disc_lr = float(config.distill.get("disc_learning_rate", 0.0) or 0.0)
  if disc_lr > 0:
    train.learning_rate = disc_lr
  return train


def build_distiller(config, teacher_config, teacher_params, ae_model, ae_params, ae_scaling: float, text_encoder):
  """(distiller, frozen, fresh state) from loaded parts. With config.mesh a plan: the state laid
  out by it (init_sharded_state) and the frozen AE, text encoder and teacher split by its rules
  (builders.place_frozen); config.train.batch_size is the global batch."""
  tx_g, schedule = build_optimizer(config.train, config.train.num_steps)
  tx_d, _ = build_optimizer(discriminator_train_config(config), config.train.num_steps)
  plan = Plan.from_config(config)
  host_batch_size(plan, config.train.batch_size)  # clear errors before anything is built
  distiller = SprintDistiller(config, teacher_config, ae_model, ae_scaling, text_encoder, tx_g, tx_d, schedule,
                              plan=plan)
  key = jax.random.PRNGKey(config.seed)
  student_init = jax.jit(functools.partial(init_dit_params, config))(jax.random.fold_in(key, 0))
  student = init_student_from_teacher(student_init, teacher_params)
  teacher_dtype = dtype_from_name(config.distill.teacher_dtype, "distill.teacher_dtype")
  frozen = {"ae": ae_params, "text": text_encoder.params,
            "teacher": jax.tree.map(lambda x: jnp.asarray(x, teacher_dtype), teacher_params)}
  state = distiller.init_sharded_state(student, jax.random.fold_in(key, 1))
  frozen = place_frozen(plan, frozen, text_encoder)
  return distiller, frozen, state


def distill(config: ml_collections.ConfigDict, workdir: str, *,
            evaluate: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
            make_sample_fn: Callable[..., Callable[[Any], np.ndarray]] | None = None) -> dict:
  """Distils (or resumes) a Sprint student in workdir. evaluate(config, workdir) -> dict runs after the
  last step (sanajax.eval.after_training.evaluate_sprint_run: GenEval-lite at 1, 2 and 4 sCM steps);
  its result is returned ({} without one). make_sample_fn as sanajax.training.dit.train's: the
  TensorBoard grid of the student's EMA weights every train.sample_every steps, sampled with
  config.sample (sCM, its steps and embedded guidance). The student takes the teacher's backbone
  (with_teacher_architecture) before the config is checked."""
  return _distill(with_teacher_architecture(config), workdir, evaluate=evaluate, make_sample_fn=make_sample_fn)


@guarded("sprint")  # the whole config checked, then the workdir locked, before any work
def _distill(config: ml_collections.ConfigDict, workdir: str, *,
             evaluate: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
             make_sample_fn: Callable[..., Callable[[Any], np.ndarray]] | None = None) -> dict:
  start_time = time.perf_counter()
  config, distiller, frozen, state = setup(config, workdir)
  n_student = sum(x.size for x in jax.tree.leaves(state.params))
  n_heads = sum(x.size for x in jax.tree.leaves(state.disc_params))
  print(f"Sprint student: {n_student / 1e6:.2f}M parameters; LADD heads {n_heads / 1e6:.2f}M on teacher blocks "
        f"{list(config.distill.head_block_ids)}; scm_lambda {distiller.scm_lambda}, adv_lambda {distiller.adv_lambda}."
        + (f" Sharding plan: {distiller.plan}." if distiller.plan.num_devices > 1 else ""), flush=True)
  source = make_source_from_config(config.data, config.seed)
  data_iter = make_train_iterator(
      source, batch_size=host_batch_size(distiller.plan, config.train.batch_size), seed=config.seed,
      tokenize_fn=distiller.text.tokenize,
      caption_threshold=config.data.caption_clip_threshold, caption_temperature=config.data.caption_temperature,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.get("num_workers", 0))
  sample_fn = None if make_sample_fn is None else make_sample_fn(
      config, distiller.ae_model, frozen["ae"], distiller.ae_scaling, distiller.text, distiller.plan)
  loop_lib.run_from_config(config.train, workdir, state, distiller.make_step(frozen, state), data_iter,
                           description="sprint", sample_fn=sample_fn,
                           shard_fn=distiller.plan.shard_batch)  # two batches ahead
  print(f"Distillation done in {time.perf_counter() - start_time:.0f} s.", flush=True)
  return evaluate(config, workdir) if evaluate is not None else {}
