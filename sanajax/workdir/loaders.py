"""Opening what a config or a workdir names: the text encoder, the AE, DiT parameters.

These are the only ways the layers above (training, generation, eval, CLIs) build the frozen
parts of a run, so a converted workdir, a trained one and a random tiny one open alike.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from sanajax.data.shapes import VOCAB
from sanajax.models import dcae
from sanajax.models.sana_dit import build_dit
from sanajax.models.text_encoder import TextEncoder
from sanajax.resolution import ae_downsample
from sanajax.workdir.checkpoint import Checkpointer, latest_workdir_step
from sanajax.workdir.files import AE_INFO_FILE, checkpoint_dir, load_workdir_config


def build_text_encoder(config: ml_collections.ConfigDict, workdir: str | None = None) -> TextEncoder:
  """The frozen text encoder a config names: 'tiny_gemma2' (random, over the shapes vocabulary) or
  'gemma2' with text.pretrained = a converted text workdir or a transformers Gemma-2 directory
  (a relative path is relative to `workdir`; see sanajax.convert)."""
  if config.text.kind == "gemma2":
    path = config.text.get("pretrained", "")
    if not path:
      raise ValueError("config.text.kind='gemma2' needs config.text.pretrained: a Gemma-2 directory converted with "
                       "`python -m sanajax.convert --from=transformers` (or a transformers one).")
    if not os.path.isabs(path) and workdir:
      path = os.path.join(workdir, path)
    from sanajax.convert import (
      load_text_encoder,  # TODO(structure): moves into this layer with the convert split.
    )
    return load_text_encoder(path, config.text)
  if config.text.kind != "tiny_gemma2":
    raise ValueError(f"config.text.kind={config.text.kind!r} is unknown: use 'tiny_gemma2' or 'gemma2'.")
  return TextEncoder(config.text, VOCAB)


def place_frozen(plan, frozen: dict, text_encoder: TextEncoder) -> dict:
  """Frozen parameters {"ae": ..., "text": text_encoder params, ["teacher": ...]} as global
  arrays of `plan` (sanajax.parallel.Plan), split by its logical-axis rules like the DiT (under
  fsdp / tensor), not replicated. The AE and teacher trees carry their boxes; the text encoder's
  names come from its abstract params."""
  like = {k: (text_encoder.abstract_params() if k == "text" else v) for k, v in frozen.items()}
  return plan.place(frozen, like=like)


def latent_shape(config: ml_collections.ConfigDict, downsample: int) -> tuple[int, int, int]:
  """(h, w, C) of the latents of config.data.resolution under an AE that downsamples `downsample`x."""
  res = config.data.resolution
  if res % downsample:
    raise ValueError(f"data.resolution={res} is not a multiple of the AE's downsampling factor {downsample}.")
  return (res // downsample, res // downsample, config.ae.latent_channels)


def init_dit_params(config: ml_collections.ConfigDict, key: jax.Array):
  """DiT parameters (float32) for the config's latent and text shapes."""
  dit = build_dit(config.model)
  h, w, c = latent_shape(config, ae_downsample(config))
  x = jnp.zeros((1, h, w, c), jnp.float32)
  ctx = jnp.zeros((1, config.text.max_length, config.model.caption_channels), jnp.float32)
  mask = jnp.ones((1, config.text.max_length), jnp.int32)
  return dit.init(key, x, jnp.zeros((1,), jnp.float32), ctx, mask)["params"]


def load_dit_params(workdir: str, config: ml_collections.ConfigDict | None = None, *, ema: bool = True):
  """The (EMA) DiT parameters of a training workdir's latest checkpoint; a clear error if it has none."""
  config = config or load_workdir_config(workdir)
  if latest_workdir_step(workdir) is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)}: train first with "
                            f"`python -m sanajax.train --config=... --workdir={workdir}`.")
  abstract = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
  return Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract, ema=ema)


def has_checkpoint(workdir: str) -> bool:
  return latest_workdir_step(workdir) is not None


def load_ae(workdir: str):
  """(model, params, scaling_factor, config) of a trained AE workdir (EMA weights of the latest step)."""
  config = load_workdir_config(workdir)
  if not has_checkpoint(workdir):
    raise FileNotFoundError(f"No AE checkpoint under {workdir}/checkpoints; train one with "
                            f"`python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir={workdir}`.")
  model = dcae.build_dcae(config.ae)
  res = config.data.resolution
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3), jnp.float32))["params"]
  params = Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract)
  info_path = os.path.join(workdir, AE_INFO_FILE)
  scaling = float(config.ae.scaling_factor)
  if os.path.exists(info_path):
    with open(info_path) as f:
      scaling = json.load(f)["scaling_factor"]
  return model, params, scaling, config
