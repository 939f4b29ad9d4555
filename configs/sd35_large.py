"""Stable Diffusion 3.5 Large (stabilityai/stable-diffusion-3.5-large): the 8B MM-DiT (depth 38) with QK RMSNorm.

    python -m sanajax.info --config=configs/sd35_large.py --config.mesh.fsdp=8       # 8 x 80 GB
    python -m sanajax.info --config=configs/sd35_large.py --config.mesh.fsdp=16      # TPU v5e-16

SD3 Medium's stack and recipe (configs/sd3_medium.py: the same VAE and text encoders) with the SD3.5 Large
transformer (sanajax.models.mmdit.SD35_LARGE: 38 blocks of 38 x 64 = 2432 channels, the paper's depth-38
model, arXiv:2403.03206 Sec. 5.3.3 / Table 5). The DiT has 8,056,627,520 parameters, equal to diffusers'
SD3Transformer2DModel with the same settings (tests/test_sd3_configs.py).
"""
from sanajax import config_utils
from sanajax.models import mmdit

sd3 = config_utils.load_sibling(__file__, "sd3_medium")


def get_config(arg=None):
  c = sd3.base_config(mmdit.SD35_LARGE, arg)
  c.sample.steps = 28  # the SD3.5 Large model card's diffusers example: num_inference_steps=28, guidance_scale=3.5.
  c.sample.cfg = 3.5
  return sd3.finish(c)
