"""A SANA ControlNet on the tiny default: canny edges of the shapes scenes steer a trained configs/tiny.py DiT.

    python -m sanajax.train --config=configs/tiny.py --workdir=workdirs/tiny            # the base (frozen)
    python -m sanajax.train --config=configs/controlnet_tiny.py:workdirs/tiny --workdir=workdirs/cn_tiny
    python -m sanajax.sample --workdir=workdirs/cn_tiny --control=edges.png --prompt="a red circle" --out=out

`arg` is the base's workdir (as configs/pretrained.py takes a converted one): its config.json is the
run's model, AE, text encoder, data and sampling config, and its EMA weights stay frozen; only the
`controlnet` section and the training numbers below are new (docs/controlnet.md). Numbers follow the
reference ControlNet recipe (NVlabs/Sana configs/sana_controlnet_config/Sana_600M_img1024_controlnet.yaml)
except where marked "tiny:" with the reason.
"""
import ml_collections

from sanajax import config_utils

pretrained = config_utils.load_sibling(__file__, "pretrained")


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/controlnet_tiny.py needs the trained base DiT's workdir: "
                     "--config=configs/controlnet_tiny.py:DIR.")
  c = pretrained.get_config(arg)  # the base's config, its AE and text encoder as absolute paths
  if c.model.get("guidance_embeds", False):
    raise ValueError(f"{arg} is a Sprint student: train the ControlNet on its teacher, then sample the student "
                     f"with it (sanajax.sample --controlnet=...; docs/controlnet.md#sprint).")
  base = c.init_from
  del c["init_from"]  # the base is not fine-tuned: it is loaded frozen from controlnet.base_workdir

  c.controlnet = ml_collections.ConfigDict()
  c.controlnet.base_workdir = base
  # Blocks copied from the base. The reference copies 7 of 28 (a quarter); tiny: 2 of 4, not tuned
  # (a quarter of 4 is 1, and residuals can go after blocks 2..4: docs/controlnet.md#tiny-run).
  c.controlnet.num_layers = 2
  c.controlnet.condition = "canny"  # the reference trains scribble / HED maps; the shapes' edges are canny
  c.controlnet.canny_low = 100.0  # cv2.Canny(100, 200) as the ControlNet canny examples; finds every
  c.controlnet.canny_high = 200.0  # shapes boundary, yellow on the background included (docs/controlnet.md#canny)
  c.controlnet.canny_blur_sigma = 0.0  # cv2.Canny blurs nothing
  c.controlnet.conditioning_scale = 1.0  # SanaControlNetPipeline's default controlnet_conditioning_scale

  c.data.latent_cache = 0  # the condition is computed from each batch's images, so images are read
  c.train.caption_dropout = 0.1  # reference class_dropout_prob 0.1 (CFG still needs the empty prompt)
  # tiny: the base's optimizer family (Muon beats AdamW on this model, docs/results.md#optimizer) at
  # 1e-3 (the base's 4e-3 trains from scratch; the reference's CAME 1e-4 suits 0.6-1.6B models and
  # ~10^5 steps), cosine as the base; not tuned.
  c.train.optimizer = "muon"
  c.train.learning_rate = 1e-3
  c.train.schedule = "cosine"
  c.train.warmup_steps = 30  # reference num_warmup_steps
  c.train.grad_clip = 1.0  # the base's (reference 0.1 with CAME)
  c.train.batch_size = 32  # the base's (reference 16 at 1024 px)
  c.train.num_steps = 1500  # tiny: a CPU run of minutes; docs/controlnet.md#tiny-run
  c.train.checkpoint_every = 250
  c.train.log_every = 25
  c.train.sample_every = 0
  c.eval.control_scenes = 64  # held-out scenes scored for control fidelity after training (docs/controlnet.md)
  return c
