"""Stable Diffusion 3 Medium (stabilityai/stable-diffusion-3-medium-diffusers): the released MM-DiT with SD3's recipe.

    python -m sanajax.info --config=configs/sd3_medium.py --config.mesh.fsdp=8      # 8 x 80 GB
    python -m sanajax.info --config=configs/sd3_medium.py --config.mesh.fsdp=16     # TPU v5e-16
    python -m sanajax.info --config=configs/sd3_medium.py:256                       # the 256 px pretraining stage

Describes the released architecture (`sanajax.info`: parameters, FLOPs, per-device memory plans;
docs/pretrained.md). The DiT has 2,028,328,000 parameters, equal to diffusers' SD3Transformer2DModel
with the same settings (tests/test_sd3_configs.py). The trainer reads SD3's text (text.kind "sd3", with
text.pretrained = a diffusers SD3 pipeline directory); fine-tuning released weights goes through
`python -m sanajax.convert --from=diffusers` and configs/pretrained.py, whose workdir carries this
config's training section (docs/pretrained.md#sd3-fine-tuning-and-export).
`base_config` is shared with configs/sd35_medium.py and configs/sd35_large.py.

Sources, cited field by field:
  [paper]  Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
           Synthesis", arXiv:2403.03206 (sections and appendices named at each number).
  [vae]    stable-diffusion-3-medium-diffusers vae/config.json (the SD3.5 pipelines ship the same).
  [te]     the same pipeline's text_encoder/, text_encoder_2/, text_encoder_3/ config.json.
  [mmdit]  sanajax.models.mmdit.SD3_MEDIUM etc. (transformer/config.json; parameter totals tested).
  [pipe]   diffusers StableDiffusion3Pipeline (encode_prompt: max_sequence_length 256; CLIP
           tokenizer_max_length 77).
`arg` is the resolution in pixels: "1024" (default; SD3's final resolution) or "256" (its pretraining).
"""
import ml_collections

from sanajax import config_utils, parallel, resolution
from sanajax.models import mmdit
from sanajax.models.autoencoder_kl_diffusers import autoencoder_kl_config_from_diffusers
from sanajax.models.clip_transformers import clip_config_from_transformers
from sanajax.models.sd3_text import SD3_ENCODER_DROPOUT
from sanajax.models.t5_transformers import t5_config_from_transformers

# [vae]: the 16-channel f8 KL autoencoder ([paper] Sec. 5.2.1 / Table 3: d = 16 latent channels, f = 8).
# force_upcast: true there, i.e. diffusers runs it in float32.
VAE_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  latent_channels=16, norm_num_groups=32, act_fn="silu", scaling_factor=1.5305, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

# [te] text_encoder/config.json: OpenAI CLIP ViT-L/14's text tower (CLIPTextModelWithProjection).
CLIP_L_CONFIG = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, projection_dim=768, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
# [te] text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower.
CLIP_G_CONFIG = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=1280, num_hidden_layers=32,
                     num_attention_heads=20, intermediate_size=5120, projection_dim=1280, max_position_embeddings=77,
                     hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2)
# [te] text_encoder_3/config.json: T5 v1.1 XXL's encoder (T5EncoderModel).
T5_XXL_CONFIG = dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)

# Per resolution (px): [paper] Sec. 5.3.2 pretrains every model at 256^2 and finetunes at higher
# resolutions with the shift alpha = sqrt(m/n) of Eq. (23) (1.0 at the base resolution itself), and
# uses alpha = 3.0 "both during training and sampling at resolution 1024 x 1024". Batch: 4096 for the
# 256^2 scaling runs (Sec. 5.3.3); 1024 is the global batch of App. B.3 (the Sec. 5.1 study), the
# paper gives none for its 1024^2 finetuning.
RESOLUTION_PRESETS = {
    "256": dict(flow_shift=1.0, batch_size=4096),
    "1024": dict(flow_shift=3.0, batch_size=1024),
}


def base_config(arch: dict, arg=None) -> ml_collections.ConfigDict:
  """A released MM-DiT (`arch`: mmdit.SD3_MEDIUM / SD35_MEDIUM / SD35_LARGE) with SD3's stack and recipe."""
  res = int(arg or "1024")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.resolution_presets = ml_collections.ConfigDict({k: dict(v) for k, v in RESOLUTION_PRESETS.items()})

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder:"  # folder:/path/to/images (SD3 trained on its own filtered set, [paper] Sec. 5.3.1).
  c.data.resolution = res
  c.data.num_workers = 10
  c.data.max_image_megapixels = 89.0  # PIL's own limit, rounded down (as configs/sana_600m.py).
  c.data.latent_cache = 0
  c.data.caption_clip_threshold = 25.0  # SANA's caption sampling (unused with one caption per image).
  c.data.caption_temperature = 0.1

  # [vae], through the diffusers-config reader the SD3 loader uses; `name` selects it (sanajax.resolution).
  c.ae = autoencoder_kl_config_from_diffusers(VAE_CONFIG, dtype="float32")
  c.ae.name = "autoencoder_kl"

  # SD3's three frozen encoders ([paper] Sec. 4 / App. B.2; [pipe] for the released lengths): context =
  # CLIP-L and bigG penultimate states (77 tokens, 768 + 1280 channels zero-padded to 4096), then T5-XXL's
  # 256 tokens; pooled = the two CLIP projections, 768 + 1280 = 2048 (sanajax.models.sd3_text).
  t = c.text = ml_collections.ConfigDict()
  t.kind = "sd3"  # CLIP-L + bigG + T5 (workdir.loaders.build_text_encoder: sd3_text.SD3PromptEncoder).
  t.pretrained = ""  # an SD3 / SD3.5 diffusers pipeline directory (sd3_text.load_sd3_text_encoder).
  t.clip_l = clip_config_from_transformers(CLIP_L_CONFIG, dtype="bfloat16")
  t.clip_g = clip_config_from_transformers(CLIP_G_CONFIG, dtype="bfloat16")
  t.t5 = t5_config_from_transformers(T5_XXL_CONFIG, dtype="bfloat16")
  t.clip_max_length = 77  # [pipe] tokenizer_max_length (= CLIP's max_position_embeddings).
  t.t5_max_length = 256  # [pipe] max_sequence_length default ([paper] App. B.2 used 77 T5 tokens).
  t.max_length = 77 + 256  # the MM-DiT's text tokens: CLIP then T5 ([pipe]'s prompt_embeds length 333).
  t.use_t5 = True  # False: T5 states are zeros ([paper] Sec. 5.3.3 "Flexible Text Encoders").
  t.encoder_dropout = SD3_ENCODER_DROPOUT  # 0.463 per encoder, independently ([paper] Sec. 5.3.3).
  t.dtype = "bfloat16"

  m = c.model = ml_collections.ConfigDict({"name": "mmdit", **arch})  # [mmdit]
  m.dual_attention_layers = tuple(arch["dual_attention_layers"])
  m.qk_norm = arch["qk_norm"] or ""  # "" = None (ConfigDict fields keep their type); build_mmdit maps it
  m.pooled_text = "clip"  # SD3's pooled CLIP pair, passed as `pooled=` (2048 wide, not the states' mean).
  m.joint_attention = "softmax"
  m.dtype = "bfloat16"  # [paper] Sec. 5.3.2: bf16-mixed precision (with QK-norm); parameters stay float32.
  m.attn_impl = "auto"  # cuDNN flash attention on GPU where available (sanajax.models.mmdit).
  m.remat = "full"  # every block recomputed in the backward pass: the 8 x 80 GB plan needs it (docs/pretrained.md).

  # Sharding plan (docs/scaling.md): e.g. --config.mesh.fsdp=8 on 8 GPUs, --config.mesh.fsdp=16 on a v5e-16.
  c.mesh = parallel.mesh_config()

  d = c.diffusion = ml_collections.ConfigDict()
  d.weighting = "logit_normal"  # rf/lognorm(0.00, 1.00): best-ranked of 61 formulations ([paper] Table 1).
  d.logit_mean = 0.0
  d.logit_std = 1.0
  d.mode_scale = 1.29  # rf/mode(1.29), the best mode(s) of Table 1 (unused with logit_normal).
  d.flow_shift = 3.0  # [paper] Sec. 5.3.2 at 1024 px; re-set per resolution by the presets above.

  tr = c.train = ml_collections.ConfigDict()
  tr.num_steps = 500_000  # [paper] Sec. 5.3.3: 500k steps at 256^2; the 1024^2 finetune's length is not given.
  tr.batch_size = 1024  # re-set per resolution by the presets above.
  tr.optimizer = "adamw"  # [paper] App. B.3.
  tr.adam_eps = 1e-15  # [paper] Sec. 5.3.2: AdamW's epsilon with QK-norm for the high-resolution finetune.
  # Microbatches per step (training.state.accumulated_value_and_grad): the paper's batch 1024 in
  # pieces that fit (docs/pretrained.md); 1 = none, the released recipe gives no accumulation.
  tr.grad_accum_steps = 1
  tr.learning_rate = 1e-4  # [paper] App. B.3.
  tr.warmup_steps = 1000  # [paper] App. B.3: 1000 linear warmup steps.
  tr.schedule = "constant"  # no decay is described ([paper] Fig. 8: lr adjusted by hand for depth 38 only).
  tr.weight_decay = 0.0  # not given in the paper.
  tr.grad_clip = 0.0  # not given in the paper.
  # The paper keeps and evaluates EMA weights (Sec. 5.1); its decay is not legible in the copy we could
  # read, so this is sanajax's SANA value (configs/sana_600m.py).
  tr.ema_decay = 0.9999
  # No whole-caption dropout: text.encoder_dropout's three independent 46.3% drops already leave no text in
  # 0.463^3 = 9.9% of the steps ("roughly ... an unconditional model in 10% of all steps", [paper] App. B.3).
  tr.caption_dropout = 0.0
  tr.log_every = 20
  tr.checkpoint_every = 1000
  tr.keep_checkpoints = 2
  tr.sample_every = 1000
  # The sample grid's prompts: the SANA reference's validation_prompts (configs/sana_600m.py); SD3's paper gives none.
  tr.sample_prompts = config_utils.load_sibling(__file__, "sana_600m").VALIDATION_PROMPTS
  # A jax.profiler trace of steps (first, last), e.g. (11, 13), into WORKDIR/tensorboard; () none
  # (docs/scaling.md#profiling).
  tr.profile_steps = ()

  s = c.sample = ml_collections.ConfigDict()
  s.sampler = "flow_euler"  # the released scheduler/: FlowMatchEulerDiscreteScheduler, shift 3.0.
  s.steps = 28  # the SD3 Medium model card's diffusers example: num_inference_steps=28, guidance_scale=7.0.
  s.cfg = 7.0

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 553  # GenEval's prompt count ([paper] Table 5 scores on GenEval).
  return c


def finish(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the resolution preset (again after any override: see sanajax.resolution)."""
  return resolution.apply_resolution(c)


def get_config(arg=None):
  return finish(base_config(mmdit.SD3_MEDIUM, arg))
