"""Tiny DC-AE (f8) for 64-px shapes images: the AE of configs/tiny.py, trained on CPU.

    python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir=/tmp/sanajax_ae

Same modules as configs/dcae_f32c32.py; only numbers differ. The latent width and the training
length were chosen by measurements on a 2-core CPU (docs/results.md#autoencoder); the block types,
head dim and shortcuts follow the released DC-AE (diffusers AutoencoderDC).
"""
import ml_collections

from sanajax import parallel


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  ae = c.ae = ml_collections.ConfigDict()
  ae.in_channels = 3
  # 8x8x8 latents (24x compression of a 64x64x3 image). c8 reconstructs as well as c16 and gives the
  # better DiT; c4 falls under the 28 dB bar. As in the DC-AE paper, fewer latent channels make the
  # latent easier for the diffusion model at equal reconstruction (docs/results.md#autoencoder).
  ae.latent_channels = 8
  ae.attention_head_dim = 32  # SANA / DC-AE head dim
  ae.encoder_block_types = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"]
  ae.decoder_block_types = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"]
  # Widths picked for CPU cost, not tuned (~0.49M params). Stage 0's 16 is unused (no layers
  # there) but the four stages set f = 2**3 = 8, as in diffusers.
  ae.encoder_block_out_channels = [16, 32, 64, 64]
  ae.decoder_block_out_channels = [16, 32, 64, 64]
  # Stage 0 has no blocks (as the dc-ae-*-in-1.0 AEs): conv_in is a stride-2 conv straight to
  # 32 channels, which keeps 64x64 activations out of the model (the costliest part on CPU).
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

  # L1 + MSE, warm-up then cosine. At this size more updates beat bigger batches (batch 16 x 800
  # steps beat 32 x 400 by 1 dB), and 1,000 steps reach 28.01-28.05 dB held-out PSNR, over the
  # 28 dB bar that 800 steps miss (docs/results.md#autoencoder). ~150-280 s on 2 cores.
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 1000
  t.batch_size = 16
  t.learning_rate = 2e-3  # picked in the runs above, not swept.
  t.warmup_steps = 25
  t.schedule = "cosine"  # to 0 at num_steps; the measurements above used it
  t.optimizer = "adamw"  # Muon reaches 30 dB but gives a worse DiT (docs/results.md#autoencoder).
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.ema_decay = 0.0  # 0: no EMA (ema_params is a copy of the weights); not tuned.
  t.log_every = 25
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  # A jax.profiler trace of steps (first, last), e.g. (11, 13), into WORKDIR/tensorboard; () none
  # (docs/scaling.md#profiling).
  t.profile_steps = ()

  d = c.data = ml_collections.ConfigDict()
  d.source = "shapes"
  d.resolution = 64
  d.num_workers = 0
  d.max_image_megapixels = 89.0  # larger images are skipped and named; PIL's own limit, rounded down.

  # Sharding plan (docs/scaling.md): all 1 is one device; e.g. --config.mesh.fsdp=8.
  c.mesh = parallel.mesh_config()
  return c
