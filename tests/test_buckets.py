"""Aspect-ratio buckets (sanajax.data.buckets): SANA's table lookup, one bucket per global batch on every
host, exact resume of the bucketed stream, the per-bucket flow shift, and sample sizes the model can take."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sanajax import config_utils
from sanajax.config_check import ConfigError, validate_config
from sanajax.data.buckets import (
  SANA_ASPECT_RATIOS,
  BucketSchedule,
  bucket_ids_of,
  bucket_table,
  check_sample_size,
)
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import load_image, make_source
from sanajax.diffusion import flow
from sanajax.models.sana_dit import build_dit
from sanajax.parallel import Plan
from sanajax.training import dit as train_lib


def sana_get_closest_ratio(height, width, ratios):
  """NVlabs/Sana diffusion/data/transforms.py get_closest_ratio, as written there."""
  aspect_ratio = float(height / width)
  closest_ratio = min(ratios.keys(), key=lambda ratio: abs(float(ratio) - aspect_ratio))
  return ratios[closest_ratio], float(closest_ratio)


def test_assignment_equals_sana_table_lookup():
  # Spot checks against the literal rows of SANA's ASPECT_RATIO_512 / 1024 / 2048 / 4096 ([h, w]).
  assert SANA_ASPECT_RATIOS[512]["3.62"] == (928, 256)
  assert SANA_ASPECT_RATIOS[1024]["0.57"] == (768, 1344)
  assert SANA_ASPECT_RATIOS[2048]["1.46"] == (2432, 1664)
  assert SANA_ASPECT_RATIOS[4096]["2.89"] == (6656, 2304)
  rng = np.random.default_rng(0)
  sizes = np.concatenate([rng.integers(16, 6000, (3000, 2)),
                          [[1, 1], [3, 4], [4, 3], [1080, 1920], [1920, 1080], [100, 2000], [2000, 100]]])
  for res in (512, 1024, 2048, 4096):
    table = bucket_table("sana", res, 32)
    ref = SANA_ASPECT_RATIOS[res]
    for h, w in sizes:
      size, _ = sana_get_closest_ratio(h, w, ref)
      assert table.sizes[table.assign(h, w)] == size, (res, h, w)
    ids = table.assign_many(sizes)
    assert [table.sizes[i] for i in ids] == [sana_get_closest_ratio(h, w, ref)[0] for h, w in sizes]


def test_other_resolutions_scale_the_sana_ratios_to_the_model_multiple():
  # The scaled route reproduces SANA's own 512 table (each side of the 1024 one halved, multiples of 32).
  scaled = bucket_table("sana", 512, 64)  # a multiple SANA's 512 sizes miss, so the table is scaled from 1024
  assert all(h % 64 == 0 and w % 64 == 0 for h, w in scaled.sizes)
  table = bucket_table("sana", 64, 16)
  assert table.sizes[table.square()] == (64, 64)
  assert all(h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16 for h, w in table.sizes)
  wide = table.sizes[table.keys.index("0.5")]
  assert wide == (48, 96)  # SANA's 704 x 1408 x 64 / 1024 = 44 x 88, each side rounded to a multiple of 16
  assert bucket_table("", 64, 16) is None
  with pytest.raises(ValueError, match="config.data.buckets='sd3'"):
    bucket_table("sd3", 64, 16)


def test_one_bucket_per_global_batch_on_every_host():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 5, 301).astype(np.int32)
  ids[:7] = -1  # unreadable: never scheduled
  hosts, b = 8, 2
  schedules = [BucketSchedule(ids, b, seed=3, process_index=p, process_count=hosts) for p in range(hosts)]
  epoch_steps = schedules[0].batches_per_epoch
  assert epoch_steps == sum(c // (b * hosts) for c in np.bincount(ids[ids >= 0]))
  seen = []
  for step in range(2 * epoch_steps):
    rows = [[s.lookup(step * b + slot) for slot in range(b)] for s in schedules]
    buckets = {bucket for row in rows for _, bucket in row}
    indices = [idx for row in rows for idx, _ in row]
    assert len(buckets) == 1 and len(set(indices)) == b * hosts  # one bucket; every host a different slice
    (bucket,) = buckets
    assert all(ids[i] == bucket for i in indices)
    seen.append(indices)
  first, second = ([i for batch in seen[e * epoch_steps:(e + 1) * epoch_steps] for i in batch] for e in range(2))
  assert len(set(first)) == len(first) and sorted(first) != first  # each example at most once an epoch, shuffled
  assert first != second  # reshuffled each epoch


def _mixed_folder(folder, n=18):
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = [(24, 48), (48, 24), (32, 32)][i % 3]
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / f"{i:03d}.txt").write_text(f"caption {i}\n")
  # A readable header (so it has a bucket) over truncated data: decoding fails, another image stands in.
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (24, 48, 3), dtype=np.uint8)).save(buf, "PNG")
  (folder / "broken.png").write_bytes(buf.getvalue()[:60])
  (folder / "unreadable.png").write_bytes(b"not an image")  # no header: no bucket, counted as skipped


def _tokenize(captions):
  return np.zeros((len(captions), 3), np.int32), np.ones((len(captions), 3), np.int32)


def test_bucketed_folder_batches_resume_exactly_and_replace_bad_images(tmp_path):
  _mixed_folder(tmp_path)
  table = bucket_table("sana", 32, 8)
  source = make_source(f"folder:{tmp_path}", 32, 0, buckets=table)
  ids = bucket_ids_of(source, table)
  assert (ids == -1).sum() == 1 and len(set(ids[ids >= 0])) == 3
  make = lambda: make_train_iterator(source, batch_size=2, seed=0, tokenize_fn=_tokenize, bucket_ids=ids)
  it = make()
  batches = [next(it) for _ in range(14)]  # > 1 epoch (9 batches of 2 from 19 usable images)
  shapes = {b["image"].shape[1:3] for b in batches}
  assert shapes == {table.sizes[i] for i in set(ids[ids >= 0])}
  assert it.skipped >= 2  # the unreadable one at start, the broken one each time it comes up
  resumed = make()
  first = make()
  for _ in range(5):
    next(first)
  resumed.set_state(first.get_state())
  for b in batches[5:]:
    r = next(resumed)
    np.testing.assert_array_equal(r["image"], b["image"])
  # Each image comes out at its bucket's size: cover-resize and centre-crop of the original.
  image, _ = load_image(str(tmp_path / "001.png"), 32, buckets=table)
  assert image.shape[:2] == table.sizes[table.assign(48, 24)]


def test_flow_shift_per_bucket():
  small = config_utils.load_config("configs/tiny.py", overrides={"data.resolution": 64})
  d = small.diffusion
  assert flow.shift_for_size(d, 32, 128, 64) == d.flow_shift  # off: the config's shift for every bucket
  d.resolution_shift = True
  assert flow.shift_for_size(d, 64, 64, 64) == pytest.approx(3.0)
  assert flow.shift_for_size(d, 32, 96, 64) == pytest.approx(3.0 * np.sqrt(32 * 96 / 64 ** 2))
  assert flow.shift_for_size(d, 128, 128, 64) == pytest.approx(6.0)

  # The loss uses its batch's shift: trace it (no compile) on two bucket shapes and record the shift.
  small.diffusion.resolution_shift = True
  dit = build_dit(small.model)
  seen = []
  real = flow.sample_time_from_config

  def spy(key, batch, config, shift=None):
    seen.append(shift)
    return real(key, batch, config, shift=shift)

  length, dim = small.text.max_length, small.text.hidden_size
  null = (np.zeros((length, dim), np.float32), np.ones((length,), np.int32))
  loss_fn = train_lib.make_loss_fn(small, dit, None, None, 1.0, Plan.single_device(), null_text=null)
  params = jax.eval_shape(lambda: train_lib.init_dit_params(small, jax.random.PRNGKey(0)))
  flow.sample_time_from_config, old = spy, flow.sample_time_from_config
  try:
    for h, w in ((4, 12), (8, 8)):  # latents of a 32x96 and a 64x64 px bucket (AE downsampling 8)
      batch = {"latent": jnp.zeros((2, h, w, small.ae.latent_channels)), "context": jnp.zeros((2, length, dim)),
               "attention_mask": jnp.ones((2, length), jnp.int32)}
      jax.eval_shape(loss_fn, params, {}, batch, jax.random.PRNGKey(0))
  finally:
    flow.sample_time_from_config = old
  assert seen == pytest.approx([3.0 * np.sqrt(32 * 96 / 64 ** 2), 3.0])


def test_sample_size_the_model_cannot_take_names_the_nearest():
  config = config_utils.load_config("configs/tiny.py", overrides={"data.resolution": 64})  # multiple 8 x 2 = 16
  assert check_sample_size(config, 32, 96) == (32, 96)
  with pytest.raises(ValueError) as e:
    check_sample_size(config, 40, 100)
  msg = str(e.value)
  assert "multiples of 16" in msg and "32x96" in msg and "48x112" in msg and "buckets" in msg


def test_config_check_knows_buckets_and_cache_sources(tmp_path):
  bad = config_utils.load_config("configs/tiny.py", overrides={"data.buckets": "square",
                                                               "data.source": f"cache:{tmp_path}/none"})
  with bad.diffusion.ignore_type():
    bad.diffusion.resolution_shift = 1  # as a config.json edited by hand would hold it
  with pytest.raises(ConfigError) as e:
    validate_config(bad, "dit")
  text = str(e.value)
  assert "data.buckets='square'" in text and "diffusion.resolution_shift=1" in text and "no cache folder" in text
  os.makedirs(tmp_path / "c")
  validate_config(config_utils.load_config("configs/tiny.py", overrides={
      "data.buckets": "sana", "data.source": f"cache:{tmp_path}/c"}), "dit")
