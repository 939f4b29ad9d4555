"""Fine-tuning from converted released weights (a workdir written by `python -m sanajax.convert`).

    python -m sanajax.convert --from=diffusers --src=Sana_1600M_1024px_diffusers --dst=/ckpt/sana1600m
    python -m sanajax.train --config=configs/pretrained.py:/ckpt/sana1600m \
        --config.data.source=folder:/data/imgs --config.train.num_steps=2000 --workdir=/runs/ft

`arg` is the converted workdir. Its config.json (model, ae and text sections read from the
diffusers/transformers config.json files, training and sampling sections from
configs/sana_600m.py) is the run's config; `init_from` points at it so that training starts from
its weights instead of a random init, and the AE and text encoder are read from it (absolute
paths, so the new run's workdir can be anywhere).
"""
import os

from sanajax.workdir.files import load_model_workdir_config


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/pretrained.py needs the converted workdir: --config=configs/pretrained.py:DIR.")
  workdir = os.path.abspath(arg)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no config.json: pass a workdir written by `python -m sanajax.convert` "
                            f"(released weights) or `python -m sanajax.train`.")
  c = load_model_workdir_config(workdir)  # an autoencoder's workdir is refused, naming the run it belongs to
  c.init_from = workdir
  c.ae.workdir = c.ae.workdir if os.path.isabs(c.ae.workdir or "") else os.path.join(workdir, c.ae.workdir or "ae")
  pretrained = c.text.get("pretrained", "")
  if pretrained and not os.path.isabs(pretrained):
    c.text.pretrained = os.path.join(workdir, pretrained)
  return c
