"""The embedded default: a tiny linear DiT on the procedural shapes data, on CPU.

    python -m sanajax.train --config=configs/tiny.py --workdir=/tmp/sanajax_tiny

Trains the tiny DC-AE first (configs/dcae_tiny.py) when `config.ae.workdir` holds no
checkpoint, then the DiT, then writes a sample grid and the GenEval-lite table.
Same modules, trainer and checkpoint format as configs/sana_1600m.py; only numbers differ.
Sizes and training settings were chosen by measurements on a 2-core CPU: docs/results.md, which
each comment below links to by section. Values without a link follow SANA (NVlabs/Sana configs).
"""
import ml_collections

from sanajax import config_utils, parallel

dcae_tiny = config_utils.load_sibling(__file__, "dcae_tiny")


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "shapes"  # or "folder:/path/to/images"
  c.data.resolution = 64
  c.data.num_workers = 0  # grain worker processes; 0 reads in the main process.
  # A folder's images over this many megapixels (W x H / 1e6) are skipped and named; 89 is PIL's own
  # decompression-bomb limit (89.5 MP, 256 MiB decoded) rounded down, so PIL's limit stays unchanged.
  c.data.max_image_megapixels = 89.0
  # Images encoded once by the frozen AE before DiT training (sanajax.data.latent_cache; 0: encode
  # in every step). Takes the AE encode out of the step; 20,000 images are ~14 epochs of 9,000 x 32
  # and encode in well under a minute (docs/results.md#latent-cache).
  c.data.latent_cache = 20000
  # Aspect-ratio buckets (docs/data.md#buckets): "" square crops (the shapes set is square), "sana" SANA's ratios.
  c.data.buckets = ""
  c.data.caption_clip_threshold = 25.0  # SANA `clip_thr`.
  c.data.caption_temperature = 0.1  # SANA `clip_thr_temperature`.
  # tfds:NAME[:SPLIT] sources: feature names (nest with '/', e.g. "captions/text") and where the prepared set
  # lies ("": TFDS's default); TFDS's own image-text convention (docs/data.md#tfds).
  c.data.tfds_image_key = "image"
  c.data.tfds_caption_key = "caption"
  c.data.tfds_score_key = ""  # a feature of per-caption CLIP scores; "": none (uniform caption choice).
  c.data.tfds_data_dir = ""

  # Autoencoder: a config of sanajax.models.dcae plus where its checkpoint lives.
  c.ae = dcae_tiny.get_config().ae
  c.ae.workdir = ""  # empty: WORKDIR/ae, trained first if it holds no checkpoint.
  c.ae_train = dcae_tiny.get_config().train

  # Text encoder: a tiny Gemma-2-architecture encoder, random from the seed, frozen. Sizes are picked for
  # CPU cost, not tuned; the soft-caps are Gemma-2's (transformers Gemma2Config).
  c.text = ml_collections.ConfigDict()
  c.text.kind = "tiny_gemma2"
  c.text.max_length = 20  # tokens kept: BOS + the last max_length - 1.
  c.text.chi_prompt = ""  # SANA's complex-human-instruction prefix (empty for tiny).
  c.text.hidden_size = 64
  c.text.num_layers = 2
  c.text.num_heads = 4
  c.text.num_kv_heads = 2
  c.text.head_dim = 16
  c.text.intermediate_size = 128
  c.text.sliding_window = 8
  c.text.final_logit_softcapping = 30.0
  c.text.attn_logit_softcapping = 50.0
  c.text.seed = 1234

  c.model = ml_collections.ConfigDict()
  c.model.name = "sana_dit"
  # Width and depth chosen at equal CPU time: 4 blocks of 96 run 2.2x the steps/s of 6 blocks of 128,
  # and hidden 64 scores lower at equal time (docs/results.md#width-and-depth).
  c.model.depth = 4
  c.model.hidden_size = 96
  c.model.linear_head_dim = 32  # self-attn heads = hidden / 32, as in SANA.
  c.model.cross_num_heads = 3  # x 32 = hidden, as the larger configs keep heads x head_dim = hidden.
  c.model.cross_head_dim = 32
  c.model.mlp_ratio = 2.5  # SANA's Mix-FFN expansion.
  # 8x8 latents -> 16 tokens (p=1: 64 tokens, ~2.5x slower steps). p=1 scores higher at equal steps,
  # p=2 as high at equal time, and keeps the first command near 10 minutes (docs/results.md#patch-size).
  c.model.patch_size = 2
  c.model.caption_channels = c.text.get_ref("hidden_size")
  c.model.in_channels = c.ae.get_ref("latent_channels")
  # SANA's 512/1024-px configs drop the absolute sin-cos position embedding (the Mix-FFN conv carries
  # position; its 2K/4K configs keep it). On the 4x4 token grid it raises position prompts 0.375 -> 0.600
  # and overall 0.763 -> 0.812 at 10,000 steps (0.754 -> 0.782 over 960 prompts; docs/results.md#position-embedding).
  c.model.use_pe = True
  c.model.attn_eps = 1e-15  # diffusers; the original code uses 1e-8.
  c.model.norm_eps = 1e-6  # SANA / diffusers.
  # SANA starts the caption RMSNorm scale at 0.01 for stability at scale; a short CPU run
  # cannot wait the ~1,000 Adam steps it takes such a scale to reach ~1, so text
  # conditioning starts at full strength here.
  c.model.y_norm_scale = 1.0
  c.model.qk_norm = False
  # The embedder sees 1000 * timestep_scale * t: 1.0 is SANA's 0..1000 time; 0.001 is SANA-Sprint's
  # dense time embedding, which a teacher is fine-tuned to before distillation
  # (docs/sprint.md#phase-1-dense-time-embedding: --config.model.timestep_scale=0.001).
  c.model.timestep_scale = 1.0
  c.model.dtype = "float32"  # compute dtype; parameters stay float32.
  c.model.attn_impl = "xla"
  c.model.remat = "none"

  # Sharding plan (docs/scaling.md): all 1 is one device; e.g. --config.mesh.fsdp=8.
  c.mesh = parallel.mesh_config()
  # The batch over every device (-1). On a CPU-only host the cores become 2 JAX devices: the AE and DiT
  # train 1.17x and 1.06x faster than on one (docs/results.md#two-cpu-devices).
  c.mesh.data = -1
  c.mesh.cpu_devices = 2

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.weighting = "logit_normal"  # logit_normal | mode | cosmap | uniform
  c.diffusion.logit_mean = 0.0  # SANA weighting_scheme logit_normal, N(0, 1).
  c.diffusion.logit_std = 1.0  # 1.5 scores lower (docs/results.md#flow-shift).
  c.diffusion.mode_scale = 1.29  # SD3's default for "mode" (unused with logit_normal).
  # Shift of the training times and of the sampling grid (t' = a t / (1 + (a - 1) t)); SANA uses
  # 3.0 at 1024 px, and 3.0 beats 0.5, 1 and 5 here too (docs/results.md#flow-shift).
  c.diffusion.flow_shift = 3.0
  # Training only: this fraction of the times is shifted by alt_shift instead (0: off). Half and half
  # helps restoration, not generation (docs/results.md#flow-shift).
  c.diffusion.alt_shift = 1.0
  c.diffusion.alt_shift_fraction = 0.0
  # SD3's resolution-dependent shift on top of flow_shift per bucket / sampled size (docs/data.md#buckets); off as SANA.
  c.diffusion.resolution_shift = False

  c.train = ml_collections.ConfigDict()
  # The run is compute-bound, so the step count is what a ~15-minute first command allows: 10,000 steps
  # at ~14 steps/s on 2 idle cores after the ~3.5 min AE; without the position embedding 7,000 scored
  # 0.633, 9,000 0.704, 10,000 0.763 and 16,000 0.829 (docs/results.md#steps-and-ema). At equal time
  # batch 64 scores as batch 32 (docs/results.md#width-and-depth).
  c.train.num_steps = 10000
  c.train.batch_size = 32
  # Muon (optim.muon: orthogonalised momentum on the dense / conv kernels, update RMS matched to
  # AdamW's, AdamW on the rest) beats AdamW at the same rate (docs/results.md#optimizer).
  c.train.optimizer = "muon"  # adamw | came | muon
  c.train.adam_b1 = 0.9  # AdamW moments (Muon's AdamW half too)
  c.train.adam_b2 = 0.999
  # Peak rate; 2e-3 and 8e-3 score lower, with Muon and with AdamW (docs/results.md#learning-rate-and-schedule).
  c.train.learning_rate = 4e-3
  c.train.warmup_steps = 100  # short for a 9,000-step run (SANA: 2,000); not tuned.
  # Cosine decay to 0 at num_steps beats a constant rate (docs/results.md#learning-rate-and-schedule).
  c.train.schedule = "cosine"  # constant | cosine
  c.train.weight_decay = 0.0  # as SANA.
  c.train.grad_clip = 1.0  # not tuned (SANA: 0.1, with CAME at lr 1e-4).
  c.train.ema_decay = 0.999  # 0.995 measured level (docs/results.md#steps-and-ema).
  c.train.init_from = ""  # a previous stage's workdir: start from its EMA weights (docs/data.md#cascade).
  c.train.caption_dropout = 0.1  # SANA class_dropout_prob: the empty prompt that CFG needs.
  c.train.log_every = 25
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0  # 0: only at the end.
  c.train.sample_prompts = ()  # the TensorBoard grid's prompts; (): 16 held-out shapes prompts.
  # A jax.profiler trace of steps (first, last), e.g. (11, 13), into WORKDIR/tensorboard; () none
  # (docs/scaling.md#profiling).
  c.train.profile_steps = ()

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "flow_dpm"  # SANA vis_sampler flow_dpm-solver: 20 steps, cfg 4.5.
  c.sample.steps = 20
  c.sample.cfg = 4.5
  # CFG only at flow times t in [lo, hi] (None: every step): SANA's `interval_guidance` of its
  # flow_dpm-solver (NVlabs/Sana scripts/inference_geneval.py; samplers.guided_velocity), "guidance
  # in a limited interval" (Kynkaanniemi et al. 2024). Muon-trained tiny models are over-guided at
  # 4.5 near the data (squares come out four-pointed); the interval lifts every seed by 0.1-0.27,
  # and any lo in 0.3-0.7 scores the same (docs/results.md#guidance-interval).
  c.sample.cfg_interval = (0.5, 1.0)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 240  # 40 per GenEval-lite category: about +-0.03 of noise (docs/results.md).
  # Also score Flow-Euler with this many steps (0: skip), to compare with the 20-step DPM-Solver.
  c.eval.euler_steps = 50
  # Also score restoration (sanajax.eval.restoration): held-out scenes noised to this flow time and
  # denoised with their prompt; sensitive long before full generation passes (0: skip).
  c.eval.restoration_t0 = 0.5
  return c
