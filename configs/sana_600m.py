"""SANA-600M (SanaMS_600M_P1_D28) text-to-image, as NVlabs/Sana's 600M configs.

    python -m sanajax.train --config=configs/sana_600m.py:512 --workdir=DIR
    python -m sanajax.info --config=configs/sana_600m.py

`arg` is the resolution in pixels ("512", "1024" (default), "2048", "4096"). Values that follow
from it live in `resolution_presets` and are re-applied by `sanajax.resolution.apply_resolution`
after command-line overrides. Numbers: the SANA paper (arXiv:2410.10629), NVlabs/Sana
configs/sana_config/{512ms/Sana_600M_img512,1024ms/Sana_600M_img1024}.yaml and diffusers'
scripts/convert_sana_to_diffusers.py; the DiT has
591,747,872 parameters, equal to diffusers' SanaTransformer2DModel with the same settings
(tests/test_info.py). `base_config` / `finish` are shared with configs/sana_1600m.py.
"""
import ml_collections

from sanajax import config_utils, parallel, resolution

dcae = config_utils.load_sibling(__file__, "dcae_f32c32")

# diffusers pipeline_sana.py `complex_human_instruction` (= the `chi_prompt` of the SANA yamls).
CHI_PROMPT = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])

# Per resolution (px): sin-cos PE and its interpolation (diffusers convert_sana_to_diffusers.py
# interpolation_scale {512: None, 1024: None, 2048: 1.0, 4096: 2.0}; the 2048/4096 yamls'
# use_pe / pe_interpolation), flow_shift (3.0; 6.0 at 4K, same converter and the 4096 yaml; note
# Sana_600M_img1024.yaml itself says 4.0), and SANA's train_batch_size, which is PER GPU in SANA
# (512ms: 128, 1024ms: 64, 2048ms/4096ms: 4); multiply by the device count to match a SANA run.
# SANA's TrainingConfig.validation_prompts (NVlabs/Sana diffusion/utils/config.py): what its sample grids show.
VALIDATION_PROMPTS = (
    "dog",
    "portrait photo of a girl, photograph, highly detailed face, depth of field",
    "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
)

RESOLUTION_PRESETS = {
    "512": dict(use_pe=False, pe_interpolation=1.0, flow_shift=3.0, batch_size=128),
    "1024": dict(use_pe=False, pe_interpolation=1.0, flow_shift=3.0, batch_size=64),
    "2048": dict(use_pe=True, pe_interpolation=1.0, flow_shift=3.0, batch_size=4),
    "4096": dict(use_pe=True, pe_interpolation=2.0, flow_shift=6.0, batch_size=4),
}


def base_config(arg=None) -> ml_collections.ConfigDict:
  """Everything shared by the SANA 600M and 1600M configs; the model size is set by the caller."""
  res = int(arg or "1024")
  c = ml_collections.ConfigDict()
  c.seed = 1  # SANA yamls: train.seed 1.
  c.resolution_presets = ml_collections.ConfigDict({k: dict(v) for k, v in RESOLUTION_PRESETS.items()})

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder:"  # folder:/path/to/images (SANA trains on its own web-scale set).
  c.data.resolution = res
  c.data.num_workers = 10  # SANA yamls: num_workers 10.
  c.data.max_image_megapixels = 89.0  # larger images are skipped and named; PIL's own limit, rounded down.
  c.data.latent_cache = 0  # images AE-encoded once before training (sanajax.data.latent_cache); 0: off.
  # SANA's multi-scale training (the *ms yamls: SanaWebDatasetMS, aspect_ratio_type ASPECT_RATIO_<res>): "sana"
  # buckets; "" square crops (docs/data.md#buckets).
  c.data.buckets = "sana"
  c.data.caption_clip_threshold = 25.0  # SANA `clip_thr`.
  c.data.caption_temperature = 0.1  # SANA `clip_thr_temperature`.
  # tfds:NAME[:SPLIT] sources: feature names (nest with '/', e.g. "captions/text") and where the prepared set
  # lies ("": TFDS's default); TFDS's own image-text convention (docs/data.md#tfds).
  c.data.tfds_image_key = "image"
  c.data.tfds_caption_key = "caption"
  c.data.tfds_score_key = ""  # a feature of per-caption CLIP scores; "": none (uniform caption choice).
  c.data.tfds_data_dir = ""

  c.ae = dcae.get_config().ae  # DC-AE f32c32: 32x downsampling, 32 latent channels.
  if "train" in dcae.get_config():
    c.ae_train = dcae.get_config().train

  # Gemma-2-2B-it (transformers Gemma2Config of google/gemma-2-2b-it), frozen.
  t = c.text = ml_collections.ConfigDict()
  t.kind = "gemma2"
  t.pretrained = ""  # directory of converted Gemma-2-2B-it weights; empty: random from `seed`.
  t.max_length = 300  # SANA model_max_length: BOS + the last 299 tokens are kept.
  t.chi_prompt = CHI_PROMPT
  t.vocab_size = 256000
  t.hidden_size = 2304
  t.num_layers = 26
  t.num_heads = 8
  t.num_kv_heads = 4
  t.head_dim = 256
  t.intermediate_size = 9216
  t.sliding_window = 4096
  t.final_logit_softcapping = 30.0
  t.attn_logit_softcapping = 50.0
  t.query_pre_attn_scalar = 256
  t.rope_theta = 10000.0
  t.rms_norm_eps = 1e-6
  t.dtype = "bfloat16"  # Gemma-2 was released in bf16.
  t.seed = 1234

  m = c.model = ml_collections.ConfigDict()
  m.name = "sana_dit"
  m.depth = 28
  m.hidden_size = 1152
  m.linear_head_dim = 32  # self-attn heads = hidden / 32, as in SANA.
  m.cross_num_heads = 16
  m.cross_head_dim = 72
  m.mlp_ratio = 2.5
  m.patch_size = 1
  m.caption_channels = t.get_ref("hidden_size")
  m.in_channels = c.ae.get_ref("latent_channels")
  m.sample_size = res // 32  # latent side; re-derived by apply_resolution.
  m.use_pe = False
  m.pe_interpolation = 1.0
  m.attn_eps = 1e-15  # diffusers; the original code uses 1e-8.
  m.norm_eps = 1e-6
  m.y_norm_scale = 0.01  # SANA y_norm_scale_factor.
  m.qk_norm = False  # Sana 1.0; SANA-1.5 / Sprint set it.
  m.dtype = "bfloat16"  # compute dtype; parameters stay float32 (SANA: fp16 / bf16 mixed precision).
  m.attn_impl = "auto"
  m.remat = "full"  # SANA: grad_checkpointing true (every block).
  # The blocks run as one nn.scan: AOT compile time flat in depth (docs/scaling.md#compile-time).
  m.scan_layers = True

  # Sharding plan (docs/scaling.md): all 1 is one device; e.g. --config.mesh.fsdp=8 on 8 GPUs.
  c.mesh = parallel.mesh_config()

  d = c.diffusion = ml_collections.ConfigDict()
  d.weighting = "logit_normal"  # SANA weighting_scheme.
  d.logit_mean = 0.0
  d.logit_std = 1.0
  d.mode_scale = 1.29  # SD3's default for the "mode" scheme (unused with logit_normal).
  d.flow_shift = 3.0
  d.resolution_shift = False  # SANA keeps flow_shift per resolution; True scales it per bucket (docs/data.md#buckets).

  tr = c.train = ml_collections.ConfigDict()
  tr.num_steps = 100_000  # Not in SANA (it counts 100 epochs of its data set); set for your data.
  tr.batch_size = 64
  tr.optimizer = "came"  # CAMEWrapper, betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16).
  tr.learning_rate = 1e-4
  tr.warmup_steps = 2000
  tr.schedule = "constant"
  tr.weight_decay = 0.0
  tr.grad_clip = 0.1
  tr.ema_decay = 0.9999  # SANA ema_rate (its train.py loop does not apply it).
  tr.init_from = ""  # the previous resolution stage's workdir, as SANA's load_from (docs/data.md#cascade).
  tr.caption_dropout = 0.1  # class_dropout_prob.
  tr.log_every = 20  # log_interval.
  tr.checkpoint_every = 500  # save_model_steps.
  tr.keep_checkpoints = 2
  tr.sample_every = 500  # eval_sampling_steps.
  tr.sample_prompts = VALIDATION_PROMPTS  # the sample grid's prompts.
  # A jax.profiler trace of steps (first, last), e.g. (11, 13), into WORKDIR/tensorboard; () none
  # (docs/scaling.md#profiling).
  tr.profile_steps = ()

  s = c.sample = ml_collections.ConfigDict()
  s.sampler = "flow_dpm"  # SANA vis_sampler flow_dpm-solver: 20 steps, cfg 4.5.
  s.steps = 20
  s.cfg = 4.5

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 553  # GenEval's prompt count.
  return c


def finish(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the resolution preset (again after any override: see sanajax.resolution)."""
  return resolution.apply_resolution(c)


def get_config(arg=None):
  return finish(base_config(arg))
