"""Tiny DC-AE (f8) for 64-px shapes images: the AE of configs/tiny.py, trained on CPU.

    python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir=/tmp/sanajax_ae

Same modules as configs/dcae_f32c32.py; only numbers differ. Numbers marked "measured" were
chosen with /tmp scratch runs on the shared 2-core CPU (timings are noisy: other jobs ran).
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  ae = c.ae = ml_collections.ConfigDict()
  ae.in_channels = 3
  ae.latent_channels = 8
  ae.attention_head_dim = 32  # SANA / DC-AE head dim
  ae.encoder_block_types = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"]
  ae.decoder_block_types = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"]
  ae.encoder_block_out_channels = [16, 32, 64, 64]
  ae.decoder_block_out_channels = [16, 32, 64, 64]
  ae.encoder_layers_per_block = [0, 1, 1, 1]
  ae.decoder_layers_per_block = [0, 1, 1, 1]
  ae.encoder_qkv_multiscales = [[], [], [], [5]]
  ae.decoder_qkv_multiscales = [[], [], [], [5]]
  ae.upsample_block_type = "interpolate"  # as f32c32
  ae.downsample_block_type = "conv"  # as f32c32
  ae.decoder_norm_types = "rms_norm"
  ae.decoder_act_fns = "silu"
  ae.encoder_out_shortcut = True
  ae.decoder_in_shortcut = True
  ae.decoder_conv_act_fn = "relu"
  ae.attn_eps = 1e-15  # SanaMultiscaleLinearAttention default
  ae.scaling_factor = 1.0  # placeholder: 1 / latent std is measured after training
  ae.dtype = "float32"
  ae.attn_impl = "xla"
  ae.workdir = ""  # empty: the trainer's WORKDIR/ae

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 600
  t.batch_size = 32
  t.learning_rate = 2e-3
  t.warmup_steps = 50
  t.optimizer = "adamw"
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.ema_decay = 0.0
  t.log_every = 25
  t.checkpoint_every = 500
  t.keep_checkpoints = 2

  d = c.data = ml_collections.ConfigDict()
  d.source = "shapes"
  d.resolution = 64
  d.num_workers = 0
  return c
