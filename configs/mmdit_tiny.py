"""A tiny MM-DiT (SD3's two-stream joint-attention backbone) on the procedural shapes data, on CPU.

    python -m sanajax.train --config=configs/mmdit_tiny.py --workdir=workdirs/mmdit_tiny
    python -m sanajax.train --config=configs/mmdit_tiny.py --config.model.joint_attention=linear ...

Everything but the denoiser is configs/tiny.py's (its DC-AE, tiny Gemma-2 text encoder, data,
optimizer, schedule, samplers, evaluation), so the two backbones compare on equal terms. The
MM-DiT (sanajax.models.mmdit; SD3, arXiv:2403.03206) is sized to the linear default's parameter
count, and its pooled text vector is the masked mean of the encoder states (model.pooled_text).
"""
import ml_collections

from sanajax import config_utils

tiny = config_utils.load_sibling(__file__, "tiny")


def get_config(arg=None):
  del arg
  c = tiny.get_config()
  m = ml_collections.ConfigDict()
  m.name = "mmdit"
  # 5 joint blocks of width 64 (2 heads x 32): 0.73M parameters, the linear default's 0.71M.
  m.num_layers = 5
  m.num_attention_heads = 2
  m.attention_head_dim = 32  # SANA's linear head size, as configs/tiny.py.
  m.caption_projection_dim = 64  # = heads x head dim (SD3Transformer2DModel's text-stream width).
  m.joint_attention_dim = c.text.get_ref("hidden_size")  # the text encoder's states
  m.pooled_projection_dim = c.text.get_ref("hidden_size")  # masked mean of those states
  m.pooled_text = "masked_mean"
  m.patch_size = 2  # SD3's; 8x8 latents -> 16 image tokens, as configs/tiny.py.
  m.in_channels = c.ae.get_ref("latent_channels")
  m.out_channels = c.ae.get_ref("latent_channels")
  m.sample_size = 8  # the latent side at 64 px (f8 AE): the sin-cos PE grid.
  m.pos_embed_max_size = None  # no stored table to crop: square images of one size.
  m.dual_attention_layers = ()
  m.qk_norm = "rms_norm"  # SD3.5's q/k RMSNorm.
  m.joint_attention = "softmax"  # softmax (SD3) | linear (SANA's ReLU linear attention over the joint sequence)
  m.dtype = "float32"
  m.attn_impl = "xla"
  m.remat = "none"
  c.model = m
  # The text stream runs every token position in every block (the linear DiT only cross-attends to them):
  # 16 positions hold the longest shapes caption (14 tokens with BOS over 9,771 training captions) and run
  # 1.12x the steps/s of the default's 20 (docs/results.md#mm-dit-at-the-defaults-wall-time).
  c.text.max_length = 16
  # The linear default's DiT training time: 9,500 MM-DiT steps took 693 s against its 10,000 steps' 700 s
  # on the same 2 cores (docs/results.md#mm-dit-at-the-defaults-wall-time).
  c.train.num_steps = 9500
  return c
