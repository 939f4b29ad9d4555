"""SANA-1600M (SanaMS_1600M_P1_D20) text-to-image, as NVlabs/Sana's 1600M configs.

    python -m sanajax.train --config=configs/sana_1600m.py:1024 --workdir=DIR
    python -m sanajax.info --config=configs/sana_1600m.py --config.data.resolution=4096

`arg` is the resolution in pixels ("512", "1024" (default), "2048", "4096"). Values that follow
from it live in `resolution_presets` and are re-applied by `sanajax.resolution.apply_resolution`
after command-line overrides. Numbers: the SANA paper (arXiv:2410.10629) and NVlabs/Sana
configs/sana_config/{1024ms/Sana_1600M_img1024,2048ms/Sana_1600M_img2048_bf16,
4096ms/Sana_1600M_img4096_bf16}.yaml; the DiT has 1,604,462,752 parameters, equal to diffusers'
SanaTransformer2DModel with the same settings (tests/test_info.py).
"""
from sanajax import config_utils

sana_common = config_utils.load_sibling(__file__, "sana_600m")


def get_config(arg=None):
  c = sana_common.base_config(arg)
  m = c.model
  m.depth = 20
  m.hidden_size = 2240
  m.linear_head_dim = 32  # 70 linear-attention heads.
  m.cross_num_heads = 20
  m.cross_head_dim = 112
  # Released 1600M checkpoints at 2K/4K are bf16 (the *_bf16.yaml configs); 1024px was fp16 in
  # SANA, which sanajax replaces by bf16 with fp32 reductions.
  m.dtype = "bfloat16"
  return sana_common.finish(c)
