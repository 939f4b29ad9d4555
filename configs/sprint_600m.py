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
The distillation settings (`distill`, and the Sprint train hyper-parameters) are not set here: they
live with the distillation code (configs/sprint_tiny.py names them with their reference values);
`train` below is still SANA's pre-training section.
"""
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


def get_config(arg=None):
  if arg not in (None, "1024"):
    raise ValueError(f"SANA-Sprint is released at 1024 px only; got resolution {arg!r}.")
  c = sprint_model_fields(sana_common.base_config("1024"))
  return sana_common.finish(c)
