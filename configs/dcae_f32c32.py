"""DC-AE f32c32 as released for SANA 1.0 (`mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`).

Every number is diffusers' `scripts/convert_dcae_to_diffusers.py::convert_ae` (the
AutoencoderDC(...) it loads the released weights into); tests/test_dcae.py checks that the
Flax model has exactly as many parameters as `diffusers.AutoencoderDC(**this)`.
32x spatial compression: 1024 px -> a 32x32x32 latent.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  ae = c.ae = ml_collections.ConfigDict()
  ae.in_channels = 3
  ae.latent_channels = 32
  ae.attention_head_dim = 32
  # Tuples, not lists: ml_collections overrides tuples from the command line (--config.ae.X='(8, 16)') but no lists.
  ae.encoder_block_types = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  ae.decoder_block_types = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  ae.encoder_block_out_channels = (128, 256, 512, 512, 1024, 1024)
  ae.decoder_block_out_channels = (128, 256, 512, 512, 1024, 1024)
  ae.encoder_layers_per_block = (2, 2, 2, 3, 3, 3)
  ae.decoder_layers_per_block = (3, 3, 3, 3, 3, 3)
  ae.encoder_qkv_multiscales = ((), (), (), (5,), (5,), (5,))
  ae.decoder_qkv_multiscales = ((), (), (), (5,), (5,), (5,))
  ae.upsample_block_type = "interpolate"  # efficientvit "InterpolateConv"
  ae.downsample_block_type = "conv"  # efficientvit "Conv": 3x3 stride-2 conv
  ae.decoder_norm_types = "rms_norm"  # efficientvit "trms2d"
  ae.decoder_act_fns = "silu"
  ae.encoder_out_shortcut = True  # diffusers defaults, used by the released model
  ae.decoder_in_shortcut = True
  ae.decoder_conv_act_fn = "relu"
  ae.attn_eps = 1e-15  # SanaMultiscaleLinearAttention default
  ae.scaling_factor = 0.41407  # released `scaling_factor`; SANA's `vae.scale_factor`
  ae.dtype = "float32"  # compute dtype; parameters stay float32
  ae.attn_impl = "xla"  # sanajax.kernels.linear_attention impl
  ae.workdir = ""  # where converted weights live (empty: none yet)
  # Decoding/encoding in overlapping tiles above this side (sanajax.models.dcae_tiling): SANA's
  # reference decodes 2K/4K with tile 1024 px, stride 896 px (model_zoo.md). 0 = never tile.
  ae.tile_size_px = 1024
  ae.tile_stride_px = 896
  return c
