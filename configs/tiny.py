"""The embedded default: a tiny linear DiT on the procedural shapes data, on CPU.

    python -m sanajax.train --config=configs/tiny.py --workdir=/tmp/sanajax_tiny

Trains the tiny DC-AE first (configs/dcae_tiny.py) when `config.ae.workdir` holds no
checkpoint, then the DiT, then writes a sample grid and the GenEval-lite table.
Same modules, trainer and checkpoint format as configs/sana_1600m.py; only numbers differ.
Sizes were chosen by measuring step time on a 2-core CPU (see README, "Results").
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
  # in every step). Measured on 2 cores: the AE encode was 0.11 s of a 0.35 s step at batch 32;
  # 20,000 images (5,600 x 32 = 9 epochs) take 26-47 s to encode once.
  c.data.latent_cache = 20000
  c.data.caption_clip_threshold = 25.0  # SANA `clip_thr`.
  c.data.caption_temperature = 0.1  # SANA `clip_thr_temperature`.

  # Autoencoder: a config of sanajax.models.dcae plus where its checkpoint lives.
  c.ae = dcae_tiny.get_config().ae
  c.ae.workdir = ""  # empty: WORKDIR/ae, trained first if it holds no checkpoint.
  c.ae_train = dcae_tiny.get_config().train

  # Text encoder: a tiny Gemma-2-architecture encoder, random from the seed, frozen.
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
  # Width and depth measured at equal CPU time (README "Results", 2026-12-02): 4 blocks of 96 run
  # 2.2x the steps/s of 6 blocks of 128, and 2,800 of their steps scored 0.229 against 0.113 for
  # 1,400 of the larger model's (both with flow_shift 3, lr 4e-3); hidden 64 at 4,200 steps, 0.208.
  c.model.depth = 4
  c.model.hidden_size = 96
  c.model.linear_head_dim = 32  # self-attn heads = hidden / 32, as in SANA.
  c.model.cross_num_heads = 3  # x 32 = hidden, as the larger configs keep heads x head_dim = hidden.
  c.model.cross_head_dim = 32
  c.model.mlp_ratio = 2.5
  # 8x8 latents -> 16 tokens: 3.4x faster steps than p=1 (measured, 2 cores, 6-block model). The
  # default's 7,000 steps with p=1 (64 tokens; README "SANA-Sprint distillation", 2026-12-05): 0.817
  # in 1,189 s of DiT training (6.5 steps/s) against 0.633 in ~450 s; p=2 for 16,000 steps scores
  # 0.829 in 944 s, so at equal time p=2 is as good, and it keeps the first command near 10 minutes.
  c.model.patch_size = 2
  c.model.caption_channels = c.text.get_ref("hidden_size")
  c.model.in_channels = c.ae.get_ref("latent_channels")
  c.model.use_pe = False
  c.model.attn_eps = 1e-15  # diffusers; the original code uses 1e-8.
  c.model.norm_eps = 1e-6
  # SANA starts the caption RMSNorm scale at 0.01 for stability at scale; a short CPU run
  # cannot wait the ~1,000 Adam steps it takes such a scale to reach ~1, so text
  # conditioning starts at full strength here.
  c.model.y_norm_scale = 1.0
  c.model.qk_norm = False
  # The embedder sees 1000 * timestep_scale * t: 1.0 is SANA's 0..1000 time; 0.001 is SANA-Sprint's
  # dense time embedding, which a teacher is fine-tuned to before distillation (README "SANA-Sprint
  # distillation", phase 1: --config.model.timestep_scale=0.001).
  c.model.timestep_scale = 1.0
  c.model.dtype = "float32"  # compute dtype; parameters stay float32.
  c.model.attn_impl = "xla"
  c.model.remat = "none"

  # Sharding plan (README "Scaling"): all 1 is one device; e.g. --config.mesh.fsdp=8.
  c.mesh = parallel.mesh_config()

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.weighting = "logit_normal"  # logit_normal | mode | cosmap | uniform
  c.diffusion.logit_mean = 0.0
  c.diffusion.logit_std = 1.0
  c.diffusion.mode_scale = 1.29
  # Shift of the training times and of the sampling grid (t' = a t / (1 + (a - 1) t)); SANA uses
  # 3.0 at 1024 px. Measured on the 6x128 model at 1,400 steps: 0.5 -> 0.054, 1.0 -> 0.067, 3.0 -> 0.088
  # GenEval-lite (more single prompts with exactly one object: 0.45 vs 0.35).
  c.diffusion.flow_shift = 3.0
  # Training only: this fraction of the times is shifted by alt_shift instead (0: off).
  c.diffusion.alt_shift = 1.0
  c.diffusion.alt_shift_fraction = 0.0

  c.train = ml_collections.ConfigDict()
  # The run is compute-bound, so the step count is what the ~15-minute budget allows: 7,000 steps at
  # 14-17 steps/s alone on 2 cores (latent cache on), ~7.5 min after the ~2.5-4.6 min AE. Measured on
  # one AE with the guidance interval below (README "Results", 2026-12-05): 5,600 steps 0.583 (single
  # 0.950, colors 0.900), 7,000 steps 0.633 (0.925, 0.925); with EMA 0.995 0.617 at 5,600 and 0.638
  # (single 0.875) at 7,000. At equal time batch 64 scored the same as batch 32 (AdamW: 0.300 vs 0.304).
  c.train.num_steps = 7000
  c.train.batch_size = 32
  # Muon (optim.muon: orthogonalised momentum on the dense / conv kernels, update RMS matched to
  # AdamW's, AdamW on the rest) against AdamW, the rest of this config unchanged, on one AE
  # (README "Results", 2026-12-05): GenEval-lite 0.479 against 0.321 at lr 4e-3; Muon at lr 2e-3
  # 0.375, at 8e-3 0.367.
  c.train.optimizer = "muon"  # adamw | came | muon
  c.train.adam_b1 = 0.9  # AdamW moments (Muon's AdamW half too)
  c.train.adam_b2 = 0.999
  # AdamW: 2e-3 -> 4e-3: 0.088 -> 0.113 (6x128, shift 3, 1,400 steps); 8e-3 on 4x96 at 2,800 steps:
  # 0.121 against 0.229 at 4e-3. Muon: see above.
  c.train.learning_rate = 4e-3
  c.train.warmup_steps = 100
  # Measured on one AE (README "Results", 2026-12-03): 4,200 steps constant 0.279, cosine 0.304;
  # 5,600 steps constant 0.304 (2026-12-02), cosine 0.321.
  c.train.schedule = "cosine"  # constant | cosine
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.999
  c.train.caption_dropout = 0.1
  c.train.log_every = 25
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0  # 0: only at the end.

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "flow_dpm"
  c.sample.steps = 20
  c.sample.cfg = 4.5
  # CFG only at flow times t in [lo, hi] (None: every step): SANA's `interval_guidance` of its
  # flow_dpm-solver (NVlabs/Sana scripts/inference_geneval.py; samplers.guided_velocity), "guidance
  # in a limited interval" (Kynkaanniemi et al. 2024). Muon-trained tiny models are over-guided at
  # 4.5 near the data (squares come out four-pointed); measured on the 5,600-step default and two
  # other seeds (README "Results", 2026-12-05), DPM-20 GenEval-lite at CFG 4.5, every step ->
  # [0.5, 1]: 0.479 -> 0.583, 0.304 -> 0.571, 0.425 -> 0.592; lo 0.3-0.7 all within +-0.03 of 0.5's.
  c.sample.cfg_interval = (0.5, 1.0)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 240
  # Also score Flow-Euler with this many steps (0: skip), to compare with the 20-step DPM-Solver.
  c.eval.euler_steps = 50
  # Also score restoration (sanajax.eval.restoration): held-out scenes noised to this flow time and
  # denoised with their prompt; sensitive long before full generation passes (0: skip).
  c.eval.restoration_t0 = 0.5
  return c
