"""SANA-Sprint 1.6B student (SanaSprint_1600M_P1_D20, Efficient-Large-Model/Sana_Sprint_1.6B_1024px).

    python -m sanajax.info --config=configs/sprint_1600m.py

Sana-1600M (configs/sana_1600m.py: 20 blocks, h 2240, 70x32 linear heads, 20x112 cross heads)
with the Sprint model changes of configs/sprint_600m.py (qk_norm, dense time embedding,
CFG embedding; reference config SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml, model
SanaMSCM_1600M_P1_D20, bf16), at 1024 px, and the distillation settings of that yaml
(configs/sprint_600m.py `distill_fields`; LADD heads on teacher blocks 2, 8, 14, 19).

    python -m sanajax.train --config=configs/sprint_phase1.py:SANA_1600M --workdir=TEACHER   # phase 1
    python -m sanajax.distill_sprint --config=configs/sprint_1600m.py \
        --config.teacher_workdir=TEACHER --config.mesh.fsdp=8 --workdir=DIR                # 8 x 80 GB
"""
from sanajax import config_utils

sana_1600m = config_utils.load_sibling(__file__, "sana_1600m")
sana_common = config_utils.load_sibling(__file__, "sana_600m")
sprint_600m = config_utils.load_sibling(__file__, "sprint_600m")


def get_config(arg=None):
  if arg not in (None, "1024"):
    raise ValueError(f"SANA-Sprint is released at 1024 px only; got resolution {arg!r}.")
  c = sprint_600m.sprint_model_fields(sana_1600m.get_config("1024"))
  c = sprint_600m.distill_fields(c, head_block_ids=(2, 8, 14, 19))
  return sana_common.finish(c)
