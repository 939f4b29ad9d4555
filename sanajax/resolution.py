"""Per-resolution settings of the SANA configs, re-derived after command-line overrides.

`--config.data.resolution=4096` is applied after `get_config` ran, so every value that follows
from the resolution (latent size, positional embedding, flow shift, batch size) must be derived
again: the config carries the table (`config.resolution_presets`, keyed by the resolution as a
string) and `apply_resolution(config)` writes the row of `config.data.resolution` into the
fields that use it. A field set explicitly (named in `config.cli_overrides`, see
config_utils.record_overrides) keeps its value. Configs without `resolution_presets` (tiny) are
returned unchanged.
"""
from __future__ import annotations

import ml_collections

from sanajax.models import autoencoder_kl, dcae

# Where each preset key is written: preset field -> (section, field).
_TARGETS = {
    "use_pe": ("model", "use_pe"),
    "pe_interpolation": ("model", "pe_interpolation"),
    "flow_shift": ("diffusion", "flow_shift"),
    "batch_size": ("train", "batch_size"),
}


def ae_downsample(config: ml_collections.ConfigDict) -> int:
  """Spatial compression of the config's autoencoder: the DC-AE (32 for f32c32, 8 for the tiny one), or SD3's
  KL VAE when ae.name == "autoencoder_kl" (8: one halving per block_out_channels entry after the first)."""
  if config.ae.get("name") == "autoencoder_kl":
    return autoencoder_kl.build_autoencoder_kl(config.ae).downsample_factor  # a module description, no params
  return dcae.downsample_factor(config.ae)


def apply_resolution(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Writes the preset of `config.data.resolution` into model / diffusion / train (in place).

  Fields named in config.cli_overrides (set on the command line) are not replaced. Also sets
  model.sample_size = resolution / AE downsampling (the latent side; with patch
  size p, the sin-cos PE base grid is sample_size / p, as diffusers' `sample_size`).
  Returns `config` for chaining.
  """
  if "resolution_presets" not in config:
    return config
  key = str(int(config.data.resolution))
  if key not in config.resolution_presets:
    raise ValueError(f"No preset for data.resolution={key}; known: {sorted(config.resolution_presets, key=int)}. "
                     "Add a row to config.resolution_presets.")
  preset = config.resolution_presets[key]
  explicit = set(config.get("cli_overrides", ()))
  with config.unlocked():
    for name, value in preset.items():
      if name not in _TARGETS:
        raise KeyError(f"resolution_presets[{key}] has unknown field {name!r}; known: {sorted(_TARGETS)}.")
      section, field = _TARGETS[name]
      if f"{section}.{field}" not in explicit:
        config[section][field] = value
    down = ae_downsample(config)
    if int(config.data.resolution) % down:
      raise ValueError(f"data.resolution={config.data.resolution} is not a multiple of the AE downsampling {down}.")
    config.model.sample_size = int(config.data.resolution) // down
  return config

