"""What a config builds: the text encoder, the DiT parameters, shapes and where the AE lives."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from sanajax.data.shapes import VOCAB
from sanajax.models.sana_dit import build_dit
from sanajax.models.text_encoder import TextEncoder
from sanajax.resolution import ae_downsample


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
    from sanajax.convert import load_text_encoder  # Lazy: convert imports the model modules.
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
  res = config.data.resolution
  if res % downsample:
    raise ValueError(f"data.resolution={res} is not a multiple of the AE's downsampling factor {downsample}.")
  return (res // downsample, res // downsample, config.ae.latent_channels)


def ae_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.ae.workdir or os.path.join(workdir, "ae")


def init_dit_params(config: ml_collections.ConfigDict, key: jax.Array):
  """DiT parameters (float32) for the config's latent and text shapes."""
  dit = build_dit(config.model)
  h, w, c = latent_shape(config, ae_downsample(config))
  x = jnp.zeros((1, h, w, c), jnp.float32)
  ctx = jnp.zeros((1, config.text.max_length, config.model.caption_channels), jnp.float32)
  mask = jnp.ones((1, config.text.max_length), jnp.int32)
  return dit.init(key, x, jnp.zeros((1,), jnp.float32), ctx, mask)["params"]
