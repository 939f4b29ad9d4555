"""LoRA fine-tuning of a trained or converted DiT (docs/lora.md): only the adapters train and are checkpointed.

    python -m sanajax.train --config=configs/lora.py:BASE --config.data.source=folder:/data/imgs --workdir=/runs/lora
    python -m sanajax.convert --to=diffusers-lora --src=/runs/lora --dst=/out/my_lora   # SanaPipeline.load_lora_weights
    python -m sanajax.sample --workdir=BASE --lora=/runs/lora:0.8 --prompt="..." --out=png

`arg` (BASE) is the model the adapters go on: a converted workdir (sanajax.convert --from=diffusers), a
finished sanajax run (e.g. configs/tiny.py's workdir), or a diffusers pipeline directory converted first.
Its config.json is the run's config, as in configs/pretrained.py (model, AE, text encoder, sampling);
`lora` holds PEFT LoraConfig's fields and `train` the LoRA recipe below. The base's weights stay frozen
(stored as lora.base_dtype); the TrainState, and so every checkpoint, holds only the adapters and their
AdamW moments (training/frozen_base.py).
"""
import ml_collections

from sanajax import config_utils

pretrained = config_utils.load_sibling(__file__, "pretrained")


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/lora.py needs the base model: --config=configs/lora.py:WORKDIR (a converted or "
                     "trained sanajax workdir).")
  c = pretrained.get_config(arg)
  base, c.init_from = c.init_from, ""  # the DiT state is the adapters (lora.init: b = 0, the run starts at the base)
  return with_lora(c, base)


def with_lora(c, base=""):
  """`c` (a full DiT config) with configs/lora.py's `lora` section (base: the absolute base path) and recipe;
  also what docs/lora.md#memory sizes for the released configs."""
  c.lora = ml_collections.ConfigDict()
  c.lora.base = base
  # PEFT LoraConfig fields. Rank 4 and alpha = rank: the reference's LoRA script (NVlabs/Sana
  # train_scripts/train_dreambooth_lora_sana.py, --rank 4, lora_alpha=args.rank); dropout 0 as there.
  c.lora.r = 4
  c.lora.lora_alpha = 4.0
  c.lora.lora_dropout = 0.0
  # Diffusers module names (PEFT target_modules). The reference script adapts to_k, to_q, to_v; sanajax's
  # default adds to_out.0 and Mix-FFN's 1x1 convs, which a new colour needs (docs/lora.md#targets).
  c.lora.target_modules = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")
  c.lora.base_dtype = "bfloat16"  # frozen kernels' storage (float32 | bfloat16); compute is model.dtype.

  # NVlabs/Sana train_scripts/train_lora.sh: AdamW at 1e-4, constant, no warm-up, 500 steps.
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-4
  c.train.schedule = "constant"
  c.train.warmup_steps = 0
  c.train.num_steps = 500
  c.train.weight_decay = 1e-4  # the reference script's --adam_weight_decay default.
  c.train.ema_decay = 0.0  # no EMA in the reference LoRA script (ema_params is a copy of the adapters).
  c.train.sample_every = 0  # sample grids read full DiT params: the final evaluation samples the merged model.
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  return c
