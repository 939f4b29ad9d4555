"""Training a DC-AE (the library behind `python -m sanajax.train_ae`).

Writes WORKDIR/checkpoints (Orbax), WORKDIR/config.json, WORKDIR/metrics.jsonl and
WORKDIR/ae_info.json with the latent scaling factor (1 / std of the latents, SANA's
`scale_factor` convention) and the reconstruction PSNR on held-out shapes images.

`config.mesh` picks a sharding plan as for the DiT (README "Scaling"; all 1, the default, is the
single-device code): the state is laid out by the parameters' logical names (sanajax.models.dcae:
output channels over `fsdp` under the default rules), the batch is split over data x fsdp and
each process reads its own share of the data.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import make_source_from_config
from sanajax.models import dcae
from sanajax.parallel import Plan
from sanajax.training import loop as loop_lib
from sanajax.training.guard import guarded
from sanajax.training.optim import build_optimizer
from sanajax.training.state import TrainState, apply_gradients, init_run_state, jit_step
from sanajax.workdir.files import AE_INFO_FILE, prepare_workdir


def _no_text(captions):
  """The AE needs no captions: one dummy token per example."""
  return np.zeros((len(captions), 1), np.int32), np.ones((len(captions), 1), np.int32)


def make_ae_step(model, tx, schedule, ema_decay: float, *, plan: Plan, state_shardings):
  """The jitted AE step: L1 + MSE reconstruction, the guarded update.

  Jitted with the sharding `plan`'s explicit shardings (sanajax.parallel; one device by default):
  the state as `state_shardings` (init_ae_state's), the batch {"image"} over data x fsdp
  (plan.batch_sharding; pass plan.shard_batch of the host batch), metrics replicated. The state
  is donated.
  """
  def loss_fn(params, images):
    recon = model.apply({"params": params}, images)
    return dcae.reconstruction_loss(recon, images), recon

  jit = jit_step(plan, (state_shardings, {"image": plan.batch_sharding(4)}), (state_shardings, plan.replicated))

  @jit
  def step(state: TrainState, batch):
    images = jnp.asarray(batch["image"])
    (loss, recon), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images)
    state, grad_norm = apply_gradients(state, grads, loss, tx, ema_decay, state.rng)
    return state, {"loss": loss, "grad_norm": grad_norm, "psnr": dcae.psnr(recon, images),
                   "learning_rate": schedule(state.step - 1)}

  return step


def evaluate_ae(model, params, config: ml_collections.ConfigDict, *, num_images: int = 256,
                batch_size: int = 64) -> dict:
  """PSNR on held-out shapes images and the latent std (for the scaling factor)."""
  source = make_source_from_config(config.data, config.seed + 1, split="eval")
  it = make_train_iterator(source, batch_size=batch_size, seed=config.seed + 1, tokenize_fn=_no_text)

  @jax.jit
  def apply(p, x):
    """(raw latent, reconstruction) of images x."""
    z = model.apply({"params": p}, x, method=model.encode)
    return z, model.apply({"params": p}, z, method=model.decode)

  psnrs, latents = [], []
  for _ in range(max(1, num_images // batch_size)):
    images = jnp.asarray(next(it)["image"])
    z, recon = apply(params, images)
    psnrs.append(float(dcae.psnr(recon, images)))
    latents.append(np.asarray(z))
  latents = np.concatenate(latents)
  return {"psnr": float(np.mean(psnrs)), "latent_std": float(latents.std()), "latent_mean": float(latents.mean()),
          "scaling_factor": float(1.0 / max(latents.std(), 1e-6)), "num_images": int(latents.shape[0])}


def init_ae_state(config: ml_collections.ConfigDict, model, tx, plan: Plan):
  """(state, state shardings, per-process batch) of a fresh AE run (state.init_run_state, as the
  DiT's: laid out by the plan, with the batch checks)."""
  res = config.data.resolution
  key = jax.random.PRNGKey(config.seed)
  init = lambda k: model.init(k, jnp.zeros((1, res, res, 3), jnp.float32))["params"]
  return init_run_state(init, tx, key, jax.random.fold_in(key, 1), plan, config.train.batch_size)


@guarded("ae")  # the whole config checked, then the workdir locked, before any work
def train_ae(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the AE in workdir; returns the evaluation dict also saved in ae_info.json.

  Under a sharding plan (config.mesh) config.train.batch_size is the global batch; evaluation
  runs on one device of every process, on the gathered EMA weights.
  """
  prepare_workdir(workdir, config)
  model = dcae.build_dcae(config.ae)
  tx, schedule = build_optimizer(config.train, config.train.num_steps)
  plan = Plan.from_config(config)
  state, state_sh, host_batch = init_ae_state(config, model, tx, plan)
  if plan.num_devices > 1:
    print(f"DC-AE sharding plan: {plan}.", flush=True)
  source = make_source_from_config(config.data, config.seed)
  data_iter = make_train_iterator(source, batch_size=host_batch, seed=config.seed, tokenize_fn=_no_text,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  num_workers=config.data.get("num_workers", 0))
  step = make_ae_step(model, tx, schedule, config.train.ema_decay, plan=plan, state_shardings=state_sh)
  step_fn = lambda s, b: step(s, plan.shard_batch(b))
  info = {}

  def evaluate(state, writer):
    """The EMA weights' held-out PSNR (logged at the last step) and latent statistics."""
    ema = plan.gather(state.ema_params)
    info.update(evaluate_ae(model, ema, config))
    writer.scalars(config.train.num_steps, {"eval_psnr": info["psnr"]})

  loop_lib.run_from_config(config.train, workdir, state, step_fn, data_iter, description="dcae", on_done=evaluate,
                           shard_fn=lambda b: plan.shard_batch({"image": b["image"]}))  # two batches ahead
  if jax.process_index() == 0:
    with open(os.path.join(workdir, AE_INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
  print(f"DC-AE: held-out PSNR {info['psnr']:.2f} dB on {info['num_images']} images; "
        f"latent std {info['latent_std']:.4f} -> scaling factor {info['scaling_factor']:.4f}", flush=True)
  return info
