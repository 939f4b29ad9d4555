"""SANA-Sprint phase 1: fine-tune a SANA teacher to the student's dense time embedding and q/k norms.

    python -m sanajax.train --config=configs/sprint_phase1.py:TEACHER --workdir=TEACHER_P1 \
        [--config.data.source=...]
    python -m sanajax.distill_sprint --config=configs/sprint_1600m.py \
        --config.teacher_workdir=TEACHER_P1 --workdir=SPRINT

`arg` is the teacher: a sanajax training workdir or a converted SANA checkpoint
(`python -m sanajax.convert`). The run starts from its EMA weights (`init_from`, as
configs/pretrained.py), with its config, and changes only what the Sprint student changes in the
DiT (SANA-Sprint, arXiv:2503.09641, Sec. 3.2; the released students' yamls): the time embedder sees
t in [0, 1] (`timestep_norm_scale_factor: 1000`, here model.timestep_scale 0.001) and q / k get RMSNorm
in self- and cross-attention (`qk_norm: true, cross_norm: true`; the new norm scales start at 1).
Training then re-learns the time embedding; the paper's Fig. 3(d) fine-tunes for 5,000 iterations.
The teacher's own learning rate, schedule and batch are kept. On the tiny default this phase is measured
in docs/sprint.md#phase-1-dense-time-embedding.
"""
from sanajax import config_utils

pretrained = config_utils.load_sibling(__file__, "pretrained")


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/sprint_phase1.py needs the teacher workdir: --config=configs/sprint_phase1.py:DIR.")
  c = pretrained.get_config(arg)
  if c.model.get("guidance_embeds", False):
    raise ValueError(f"{arg} is a Sprint student (model.guidance_embeds): phase 1 fine-tunes a SANA teacher.")
  c.model.timestep_scale = 0.001  # dense time: the embedder's input 1000 * 0.001 * t = t.
  c.model.qk_norm = True
  c.train.num_steps = 5000  # Fig. 3(d): 5,000 fine-tuning iterations.
  return c
