"""Issue 27's mission, as a new user runs it, every step a command line:

  72 generated photos of mixed sizes and aspect ratios with sidecar captions
  -> python -m sanajax.data.build (ArrayRecord shards)
  -> python -m sanajax.convert (a tiny random SanaPipeline saved with save_pretrained: tests/test_convert.py)
  -> python -m sanajax.data.cache (DC-AE latents per bucket + Gemma-2 features)
  -> python -m sanajax.train --config=configs/sana_1600m.py:512 shrunk by overrides (the converted model's
     sizes), buckets on, from the cache: on 1 device, on 8 fake devices (data 2 x fsdp 4), killed after a
     checkpoint and resumed
  -> python -m sanajax.sample --height --width (a non-square bucket; a size the model cannot take is refused).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from test_convert import DIT_KW, WORDS, save_sana_pipeline  # tests/ is on sys.path (needs torch, diffusers)
from test_dcae import _odd_config

from sanajax import config_utils
from sanajax.training.metrics import read_metrics
from sanajax.workdir.loaders import load_dit_params

pytestmark = pytest.mark.slow  # nine CLI runs: 10 min on the shared 2-core machine (load ~13)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (height, width) of the photos: three aspect ratios (h / w 1.33, 0.75, 0.56), each at several sizes.
SIZES = [(400, 300), (480, 360), (600, 450), (300, 400), (360, 480), (450, 600), (270, 480), (216, 384), (360, 640)]
# 8 of each size: 24 per aspect ratio, 3 batches of 8 in each of the 3 buckets the test trains on (the encode
# and build time grows with the count; the 200 used before checked nothing more).
N_PHOTOS = 72


def _photos(folder, n=N_PHOTOS):
  """JPEG "photos": a smooth gradient with a coloured rectangle, and a sidecar caption saying which."""
  rng = np.random.default_rng(0)
  colours = {"red": (220, 40, 40), "blue": (40, 60, 220)}
  folder.mkdir()
  for i in range(n):
    h, w = SIZES[i % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, int(rng.integers(0, 255)))], -1).astype(np.uint8)
    name = ("red", "blue")[i % 2]
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    image[y0:y0 + h // 3, x0:x0 + w // 3] = colours[name]
    Image.fromarray(image).save(folder / f"photo{i:03d}.jpg", quality=90)
    (folder / f"photo{i:03d}.txt").write_text(f"a {name} square\n")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """A tiny random SanaPipeline directory saved with save_pretrained (as tests/test_convert.py's models), shaped
  as SANA-1600M is: a 32x DC-AE (6 stages, ResBlocks, 8-32 channels, one decoder activation as the config's
  ae.decoder_act_fns) and a patch-1 DiT, so 512 px is 16 x 16 latents and SANA's 512 buckets fit as they are."""
  root = tmp_path_factory.mktemp("sana_pipeline")
  ae_cfg = _odd_config("conv", "interpolate")
  with ae_cfg.ignore_type():
    for side in ("encoder", "decoder"):
      ae_cfg[f"{side}_block_types"] = ["ResBlock"] * 6
      ae_cfg[f"{side}_block_out_channels"] = [8, 8, 16, 16, 32, 32]
      ae_cfg[f"{side}_layers_per_block"] = [1] * 6
      ae_cfg[f"{side}_qkv_multiscales"] = [[]] * 6
    ae_cfg.decoder_act_fns = "silu"
  return save_sana_pipeline(root, dit_kw=dict(DIT_KW, patch_size=1, sample_size=16), ae_config=ae_cfg).root


def _flag_value(value) -> str:
  """A config value as ml_collections parses it from the command line (lists as tuples)."""
  as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v
  return repr(as_tuple(value)) if isinstance(value, list) else str(value)


def _shrink_overrides(work):
  """--config.SECTION.FIELD=VALUE making configs/sana_1600m.py the converted pipeline's model, AE and text
  encoder (every field the two configs share that differs), as a user would read them off config.json."""
  with open(os.path.join(work, "config.json")) as f:
    converted = json.load(f)
  base = config_utils.load_config("configs/sana_1600m.py", "512")
  flags = []
  for section in ("model", "ae", "text"):
    for field, value in converted[section].items():
      if field in base[section] and field not in ("workdir", "pretrained", "sample_size") and \
          json.loads(json.dumps(base[section][field])) != value:
        flags.append(f"--config.{section}.{field}={_flag_value(value)}")
  return flags + [f"--config.ae.workdir={work}/ae", f"--config.text.pretrained={work}/text_encoder"]


def _run(args, env=None, timeout=1500, expect=0):
  proc = subprocess.run([sys.executable, "-m", *args], check=False, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  assert proc.returncode == expect, " ".join(args) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_photos_to_shards_to_cache_to_buckets_training_to_non_square_sample(pipeline, tmp_path):
  assert {"a", "red", "blue", "square"} <= set(WORDS)  # the captions are words the tiny tokenizer knows
  _photos(tmp_path / "photos")
  shards, work, cache = (str(tmp_path / d) for d in ("shards", "work", "cache"))
  _run(["sanajax.data.build", f"--src=folder:{tmp_path / 'photos'}", f"--dst={shards}", "--shards=2"])
  _run(["sanajax.convert", "--from=diffusers", f"--src={pipeline}", f"--dst={work}"])
  config = ["--config=configs/sana_1600m.py:512", *_shrink_overrides(work), "--config.data.buckets=sana"]
  out = _run(["sanajax.data.cache", *config, f"--src=arrayrecord:{shards}", f"--dst={cache}", "--batch_size=8"]).stdout
  assert f"{N_PHOTOS} images written (0 skipped)" in out, out
  with open(os.path.join(cache, "cache.json")) as f:
    info = json.load(f)
  assert info["complete"] and info["signature"]["text"]["chi_prompt"].startswith("Given a user prompt")

  train = ["sanajax.train", *config, f"--config.data.source=cache:{cache}", "--config.train.batch_size=8",
           "--config.train.num_steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
           "--config.train.sample_every=0", "--config.eval.num_prompts=0", "--config.sample.steps=2",
           "--config.data.num_workers=0", "--config.model.remat=none"]
  one = _run([*train, f"--workdir={tmp_path / 'one'}"]).stdout
  assert "Aspect-ratio buckets (sana, 512 px): 3 of 40 sizes" in one, one
  eight = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
  _run([*train, *mesh, f"--workdir={tmp_path / 'eight'}"], env=eight)
  losses = [{r["step"]: r["loss"] for r in read_metrics(str(tmp_path / run))} for run in ("one", "eight")]
  assert sorted(losses[0]) == [1, 2, 3, 4]
  np.testing.assert_allclose([losses[1][s] for s in range(1, 5)], [losses[0][s] for s in range(1, 5)], rtol=2e-3)

  # Killed (SIGKILL) once its step-2 checkpoint is on disk, then the same command resumes it to the end.
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-m", *train, *mesh, f"--workdir={killed}"], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **eight}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 1200
  while not os.path.isdir(os.path.join(killed, "checkpoints", "2")) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL  # killed mid-run (steps 3-4 and the end-of-run grid were still to come)
  _run([*train, *mesh, f"--workdir={killed}"], env=eight)
  for x, y in zip(jax.tree.leaves(load_dit_params(str(tmp_path / "eight"))), jax.tree.leaves(load_dit_params(killed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # A non-square bucket of the 512 table (0.57: 384 x 672), and a size the model cannot take.
  png = str(tmp_path / "png")
  _run(["sanajax.sample", f"--workdir={tmp_path / 'one'}", "--prompt=a red square", f"--out={png}",
        "--height=384", "--width=672", "--steps=2"])
  assert Image.open(os.path.join(png, "00000.png")).size == (672, 384)
  bad = _run(["sanajax.sample", f"--workdir={tmp_path / 'one'}", "--prompt=a red square", f"--out={png}",
              "--height=385", "--width=672"], expect=2)
  assert "nearest: 384x672, 416x672" in bad.stderr and "Traceback" not in bad.stderr
