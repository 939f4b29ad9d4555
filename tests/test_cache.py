"""The on-disk latent / text-feature cache (python -m sanajax.data.cache, data.source=cache:DIR) and the
resolution cascade (train.init_from=WORKDIR of the previous stage): built per bucket, resumable, refused
for another config, trained from with no AE encoder and no text encoder in the step, resumed exactly."""
import os

import jax
import numpy as np
import pytest
from test_buckets import _mixed_folder  # tests/ is on sys.path
from test_training import killed_after_checkpoint
from tiny_base import AE_OVERRIDES

from sanajax import config_utils
from sanajax.config_check import ConfigError
from sanajax.data import feature_cache
from sanajax.data.buckets import bucket_table
from sanajax.models import text_encoder as text_encoder_lib
from sanajax.training import cache_build
from sanajax.training import dit as train_lib
from sanajax.training.metrics import read_metrics
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.loaders import load_dit_params

pytestmark = pytest.mark.slow  # cache builds and 5 short DiT runs: 7-13 min on the shared 2-core machine (load ~14)


def small_config(ae_dir, **overrides):
  base = {**AE_OVERRIDES, "ae.workdir": str(ae_dir), "train.batch_size": 2, "train.num_steps": 4,
          "train.log_every": 1, "train.checkpoint_every": 2, "train.warmup_steps": 1, "eval.num_prompts": 0,
          "data.latent_cache": 0, "data.buckets": "sana"}
  base.update(overrides)
  return config_utils.load_config("configs/tiny.py", overrides=base)


def test_cache_build_resume_refusal_and_training(tmp_path, tiny_ae, monkeypatch):
  folder = tmp_path / "images"
  folder.mkdir()
  _mixed_folder(folder)
  config = small_config(tiny_ae)
  cache = str(tmp_path / "cache")

  # Killed after the first of two shards: the rerun keeps it and writes only the second.
  real = cache_build._write_shard
  calls = []

  def dies_on_second(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(cache_build, "_write_shard", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    cache_build.build_cache(config, f"folder:{folder}", cache, shards=2, batch_size=4)
  monkeypatch.setattr(cache_build, "_write_shard", real)
  with pytest.raises(ValueError, match="not finished"):
    feature_cache.CacheSource(cache)
  info = cache_build.build_cache(config, f"folder:{folder}", cache, batch_size=4)
  assert info["complete"] and info["shards"] == 2

  ae_scaling = info["signature"]["ae_scaling"]
  table = bucket_table("sana", 32, 16)
  source = feature_cache.CacheSource(cache, feature_cache.cache_signature(config, ae_scaling, table))
  assert len(source) == 18 and source.skipped == 2  # the unreadable and the truncated image: named, counted
  # Every record: a latent of its bucket's size, features of its caption equal to the encoder's (bf16).
  text = train_lib.build_text_encoder(config)
  for i in range(len(source)):
    ex = source[i]
    h, w = table.sizes[ex["bucket"]]
    assert ex["latent"].shape == (h // 8, w // 8, config.ae.latent_channels)
  ex = source[0]
  context, mask = ex["features"](0)
  want, want_mask = text.encode(ex["captions"])
  np.testing.assert_array_equal(mask, np.asarray(want_mask[0]))
  np.testing.assert_allclose(context[mask == 1], np.asarray(want[0])[mask == 1], rtol=1e-2, atol=1e-2)
  assert not context[mask == 0].any()

  # Another CHI prompt, resolution or bucket table: refused, naming the field.
  for field, value in (("text.chi_prompt", "Describe: "), ("data.buckets", "")):
    other = small_config(tiny_ae, **{field: value, "data.source": f"cache:{cache}"})
    with pytest.raises(ConfigError, match=field.split(".")[1] if field != "data.buckets" else "buckets"):
      train_lib.train(other, str(tmp_path / f"refused_{field}"))

  # Training from the cache runs no text encoder (nor AE encode), and a killed run resumes exactly.
  def no_text(*a, **k):
    raise AssertionError("the text encoder ran while training from the cache")

  monkeypatch.setattr(text_encoder_lib.TextEncoder, "embed", no_text)
  monkeypatch.setattr(train_lib, "build_text_encoder", no_text)
  cached = small_config(tiny_ae, **{"data.source": f"cache:{cache}", "diffusion.resolution_shift": True})
  train_lib.train(cached, str(tmp_path / "straight"))

  with killed_after_checkpoint(tmp_path / "killed", 2):
    train_lib.train(cached, str(tmp_path / "killed"))
  train_lib.train(cached, str(tmp_path / "killed"))  # resumes from step 2
  a, b = (load_dit_params(str(tmp_path / run)) for run in ("straight", "killed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  straight = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "straight"))}
  resumed = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "killed"))}
  assert straight[3] == resumed[3] and straight[4] == resumed[4]


def test_cascade_32_to_64_starts_from_the_previous_stage_ema(tmp_path, tiny_ae):
  """Stage 2 at 64 px starts from stage 1's (32 px) EMA weights: train.init_from=WORKDIR."""
  stage1 = str(tmp_path / "s32")
  train_lib.train(small_config(tiny_ae, **{"data.buckets": "", "train.num_steps": 2}), stage1)
  stage2 = str(tmp_path / "s64")
  config = small_config(tiny_ae, **{"data.buckets": "", "data.resolution": 64, "train.num_steps": 1,
                                   "train.init_from": stage1, "train.checkpoint_every": 1, "train.ema_decay": 0.0})
  seen = {}
  real = train_lib.init_params_from

  def spy(path, like):
    params = real(path, like)
    seen["params"] = jax.tree.map(np.array, params)  # a copy: the train step donates (deletes) its inputs
    return params

  train_lib.init_params_from = spy
  try:
    train_lib.train(config, stage2)
  finally:
    train_lib.init_params_from = real
  ema1 = load_dit_params(stage1)
  for x, y in zip(jax.tree.leaves(ema1), jax.tree.leaves(seen["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # stage 2 began at stage 1's EMA
  assert Checkpointer(os.path.join(stage2, "checkpoints"), read_only=True).latest_step() == 1
