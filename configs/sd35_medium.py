"""Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium): MMDiT-X with QK RMSNorm and dual attention.

    python -m sanajax.info --config=configs/sd35_medium.py --config.mesh.fsdp=8

SD3 Medium's stack and recipe (configs/sd3_medium.py: the same VAE and text encoders, whose config.json files
the SD3.5 pipelines ship unchanged) with the SD3.5 Medium transformer (sanajax.models.mmdit.SD35_MEDIUM:
the first 13 blocks carry the extra image-only attention, q/k RMSNorm, a 384-wide position grid). The DiT
has 2,243,171,520 parameters, equal to diffusers' SD3Transformer2DModel with the same settings
(tests/test_sd3_configs.py).
"""
from sanajax import config_utils
from sanajax.models import mmdit

sd3 = config_utils.load_sibling(__file__, "sd3_medium")


def get_config(arg=None):
  c = sd3.base_config(mmdit.SD35_MEDIUM, arg)
  c.sample.steps = 40  # the SD3.5 Medium model card's diffusers example: num_inference_steps=40, guidance_scale=4.5.
  c.sample.cfg = 4.5
  return sd3.finish(c)
