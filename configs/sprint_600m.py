"""SANA-Sprint 0.6B student (SanaSprint_600M_P1_D28): Sana-600M + Sprint's model changes, 1024 px.

    python -m sanajax.info --config=configs/sprint_600m.py
    python -m sanajax.sample --workdir=DIR --sampler=scm --steps=2 --cfg=4.5 --prompt="..." --out=OUT

Architecture: configs/sana_600m.py plus, from NVlabs/Sana
configs/sana_sprint_config/1024ms/SanaSprint_*_allqknorm_bf16_scm_ladd.yaml and diffusers'
scripts/convert_sana_to_diffusers.py (model_type SanaSprint_600M_P1_D28), and the SANA-Sprint paper
(arXiv:2503.09641):
  * qk_norm: RMSNorm on q/k in self- and cross-attention (`qk_norm: true, cross_norm: true`;
    diffusers qk_norm="rms_norm_across_heads");
  * dense time embedding (`timestep_norm_scale_factor: 1000`: the embedder sees t in [0, 1]):
    timestep_scale 0.001 here, because sanajax embeds 1000 * timestep_scale * t. diffusers'
    released Sprint transformer config leaves timestep_scale at 1.0 since SanaSprintPipeline feeds
    the flow time t_f in [0, 1] directly; both embed the same number;
  * CFG embedding (`cfg_embed: true`, `cfg_embed_scale: 0.1`; diffusers guidance_embeds,
    guidance_embeds_scale 0.1); the sCM log-variance head is sana_dit.LogVarHead (not counted:
    diffusers drops logvar_linear, and so does the DiT parameter count).
Sprint is released at 1024 px only (sample_size 32). The AE is Sprint's dc-ae-f32c32-sana-1.1,
the same architecture as configs/dcae_f32c32.py (1.1 retrains weights). Sampling: sCM, 2 steps,
guidance 4.5 (SanaSprintPipeline / asset/docs/sana_sprint.md defaults).
Distillation (`distill_fields`, shared with configs/sprint_1600m.py): sCM + LADD with the reference's
numbers (SanaSprint_{600M,1600M}_1024px_allqknorm_bf16_scm_ladd.yaml, train_scripts/train_scm_ladd.py):

    python -m sanajax.train --config=configs/sprint_phase1.py:TEACHER --workdir=TEACHER_P1   # phase 1
    python -m sanajax.distill_sprint --config=configs/sprint_600m.py \
        --config.teacher_workdir=TEACHER_P1 --workdir=DIR                                   # phase 2

Memory per device (student, EMA, teacher, LADD heads): `python -m sanajax.info --config=...`
(docs/sprint.md#sprint-at-scale).
"""
import ml_collections

from sanajax import config_utils

sana_common = config_utils.load_sibling(__file__, "sana_600m")


def sprint_model_fields(c):
  """The Sprint student's model changes on a SANA config (shared with configs/sprint_1600m.py)."""
  m = c.model
  m.qk_norm = True
  m.timestep_scale = 0.001  # dense time: embedder input 1000 * 0.001 * t = t.
  m.guidance_embeds = True
  m.guidance_embeds_scale = 0.1  # reference cfg_embed_scale.
  s = c.sample
  s.sampler = "scm"
  s.steps = 2  # SanaSprintPipeline default (1, 2 and 4 are the trained step counts).
  s.cfg = 4.5  # embedded guidance value (SanaSprintPipeline guidance_scale default).
  return c


def distill_fields(c, head_block_ids):
  """The reference's distillation (`distill`) and training (`train`) settings on a Sprint config.

  head_block_ids: the teacher blocks the LADD heads read (the yamls' head_block_ids).
  """
  c.teacher_workdir = ""  # required: a (phase-1) teacher workdir, e.g. converted with sanajax.convert.
  d = c.distill = ml_collections.ConfigDict()
  d.sigma_data = 0.5  # TrigFlow data scale.
  d.logit_mean = 0.2  # generator times t = atan(exp(N(0.2, 1.6)) / sigma_d) (logit_normal_trigflow).
  d.logit_std = 1.6
  d.logit_mean_discriminator = -0.6  # the discriminator's noise times.
  d.logit_std_discriminator = 1.0
  d.tangent_warmup_steps = 4000
  d.tangent_norm_constant = 0.1  # train_scm_ladd.py: g / (||g|| + 0.1).
  d.cfg_scales = (4.0, 4.5, 5.0)  # scm_cfg_scale: the teacher's CFG scale per sample.
  d.teacher_cfg_interval = False  # the reference guides its teacher at every step.
  d.scm_lambda = 1.0
  d.adv_lambda = 0.5
  d.head_block_ids = tuple(head_block_ids)
  d.train_largest_timestep = True
  d.largest_timestep = 1.5708  # pi / 2: pure noise, the 1-step case.
  d.largest_timestep_prob = 0.5
  d.misaligned_pairs_D = True
  d.teacher_dtype = "bfloat16"  # mixed_precision bf16.
  d.disc_learning_rate = 0.0  # optimizer_D: the student's rate (2e-6).
  tr = c.train
  tr.optimizer = "came"  # CAMEWrapper (optimizer and optimizer_D), betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16).
  tr.learning_rate = 2e-6
  tr.warmup_steps = 5000  # lr_schedule constant, num_warmup_steps 5000.
  tr.schedule = "constant"
  tr.weight_decay = 0.0
  tr.grad_clip = 0.1  # gradient_clip.
  # train_batch_size 16, per GPU in the reference as SANA's (configs/sana_600m.py RESOLUTION_PRESETS);
  # on a SANA config also the 1024-px preset row, which apply_resolution writes into train.batch_size.
  tr.batch_size = 16
  if "resolution_presets" in c:
    c.resolution_presets["1024"].batch_size = 16
  tr.caption_dropout = 0.0  # class_dropout_prob 0: the teacher's CFG does the guidance.
  tr.log_every = 20  # log_interval.
  tr.checkpoint_every = 500  # save_model_steps.
  tr.sample_every = 500  # eval_sampling_steps.
  return c


def get_config(arg=None):
  if arg not in (None, "1024"):
    raise ValueError(f"SANA-Sprint is released at 1024 px only; got resolution {arg!r}.")
  c = sprint_model_fields(sana_common.base_config("1024"))
  # SanaSprint_600M_1024px_allqknorm_bf16_scm_ladd.yaml taps blocks [2, 8, 14, 19] of the 28 (as the
  # 1600M yaml does of its 20).
  c = distill_fields(c, head_block_ids=(2, 8, 14, 19))
  return sana_common.finish(c)
