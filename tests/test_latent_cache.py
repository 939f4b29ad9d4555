"""The latent cache: images encoded once, served through the same resumable pipeline."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image
from test_data_pipeline import FakeSource, R, byte_detokenize, byte_tokenize

from sanajax.data.buckets import bucket_ids_of, bucket_table
from sanajax.data.latent_cache import build_latent_cache
from sanajax.data.pipeline import make_train_iterator, uint8_to_unit
from sanajax.data.sources import FolderSource, make_source


def toy_encode(images):
  """A deterministic stand-in for an AE encoder: (B, R, R, 3) -> (B, R/4, R/4, 3)."""
  assert images.dtype == np.float32 and images.shape[0] == 8, "always full batches of 8"
  return images[:, ::4, ::4, :] * 2.0 + 1.0


def test_cache_holds_encoded_good_images_in_order_and_counts_bad_ones():
  src = FakeSource(n=23)  # items 3, 8, 13, 18 are undecodable; 19 good ones: 2 full batches + 3 padded
  lines = []
  cache = build_latent_cache(src, toy_encode, num_examples=100, batch_size=8, log=lines.append)
  good = [i for i in range(23) if i % 5 != 3]
  assert len(cache) == len(good) == 19 and cache.skipped == 4
  for j, i in enumerate(good):
    image = np.full((1, R, R, 3), i % 256, np.uint8).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(cache[j]["latent"], toy_encode(np.repeat(image, 8, 0))[0])
    assert cache[j]["captions"] == [f"a{i}", f"b{i}", f"low{i}"] and cache[j]["scores"] == [30.0, 29.0, 3.0]
  assert "19 images" in lines[0] and "4 skipped: /fake/3.png, /fake/8.png, /fake/13.png, ...)" in lines[0]


def test_cache_size_and_process_shares():
  src = FakeSource(n=40, bad=False)
  assert len(build_latent_cache(src, toy_encode, num_examples=10, batch_size=8, log=lambda _: None)) == 10
  shares = [build_latent_cache(src, toy_encode, num_examples=30, batch_size=8, process_index=p, process_count=3,
                               log=lambda _: None) for p in range(3)]
  seen = [int(round((float(s[j]["latent"][0, 0, 0]) - 1.0) / 2.0 * 127.5 + 127.5)) for s in shares
          for j in range(len(s))]
  assert sorted(seen) == list(range(30))  # disjoint shares that cover the first 30 items


def test_iterator_over_cache_yields_latents_resumes_and_counts_skipped():
  cache = build_latent_cache(FakeSource(n=23), toy_encode, num_examples=100, batch_size=8, log=lambda _: None)
  make = lambda: make_train_iterator(cache, batch_size=4, seed=3, tokenize_fn=byte_tokenize)
  it = make()
  assert it.skipped == 4  # the cache's undecodable images are in the count from the start
  first = [next(it) for _ in range(3)]
  b = first[0]
  assert set(b) == {"latent", "input_ids", "attention_mask"} and b["latent"].shape == (4, R // 4, R // 4, 3)
  assert b["latent"].dtype == np.float32
  # Each row's caption belongs to the cached item whose latent it carries (an item's captions are
  # "a{i}", "b{i}": the score-30 and score-29 ones; "low{i}" is under the threshold).
  for row in range(4):
    i = int(round((float(b["latent"][row, 0, 0, 0]) - 1.0) / 2.0 * 127.5 + 127.5))
    assert byte_detokenize(b["input_ids"][row]) in (f"a{i}", f"b{i}")
  state = it.get_state()
  rest = [next(it) for _ in range(6)]  # crosses an epoch of 19
  resumed = make()
  resumed.set_state(state)
  for x in rest:
    y = next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert resumed.skipped == 4


def _skip_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping image")]


def test_cache_names_skipped_images_as_the_iterator_does(tmp_path, caplog):
  """With the cache on, each skipped file is named with its reason and counted, as without it."""
  for i in range(4):
    Image.new("RGB", (20, 30), (i, i, i)).save(tmp_path / f"ok{i}.png")
  (tmp_path / "broken.png").write_bytes(b"not a png at all")
  Image.new("RGB", (40, 48)).save(tmp_path / "big.png")  # 1,920 px, over a 0.001-megapixel limit
  src = FolderSource(str(tmp_path), R, max_image_megapixels=0.001)
  expected = [(f"skipping image {tmp_path / 'big.png'}: 40x48 px, larger than the 0.001-megapixel limit "
               "(config.data.max_image_megapixels)"),
              f"skipping image {tmp_path / 'broken.png'}: truncated, empty or not an image"]
  # Without the cache: 8 good images span two epochs, so the iterator meets both files (once or twice).
  with caplog.at_level(logging.WARNING, logger="sanajax.data.pipeline"):
    it = make_train_iterator(src, batch_size=4, seed=0, tokenize_fn=byte_tokenize)
    next(it), next(it)
  warned = _skip_warnings(caplog)
  assert sorted(set(warned)) == expected and it.skipped == len(warned) >= 2
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="sanajax.data.pipeline"):
    cache = build_latent_cache(src, toy_encode, num_examples=100, batch_size=8, log=lambda _: None)
    it = make_train_iterator(cache, batch_size=4, seed=0, tokenize_fn=byte_tokenize)
    next(it)
  assert sorted(_skip_warnings(caplog)) == expected and it.skipped == cache.skipped == 2
  assert sorted(f"skipping image {p}: {why}" for p, why in cache.skipped_images) == expected


def test_cache_caps_its_skip_warnings_and_lists_every_skipped_image(caplog):
  with caplog.at_level(logging.WARNING, logger="sanajax.data.pipeline"):
    cache = build_latent_cache(FakeSource(n=40), toy_encode, num_examples=100, batch_size=8, log=lambda _: None)
  bad = [f"/fake/{i}.png" for i in range(40) if i % 5 == 3]
  warned = _skip_warnings(caplog)
  assert warned == [f"skipping image {p}: truncated, empty or not an image" for p in bad[:4]] + [
      f"skipping image {bad[4]}: truncated, empty or not an image; further ones are only counted"]
  assert cache.skipped == 8 and [p for p, _ in cache.skipped_images] == bad


def test_cache_build_shows_a_progress_bar_on_process_0(capsys):
  build_latent_cache(FakeSource(n=23), toy_encode, num_examples=100, batch_size=8, log=lambda _: None)
  err = capsys.readouterr().err
  assert "latent cache" in err and "23/23" in err
  build_latent_cache(FakeSource(n=23), toy_encode, num_examples=100, batch_size=8, process_index=1, process_count=2,
                     log=lambda _: None)
  assert capsys.readouterr().err == ""


def test_empty_cache_is_a_clear_error():
  class AllBad(FakeSource):
    def __getitem__(self, i):
      return {"image": None, "captions": ["x"], "scores": [], "path": f"/bad/{i}.png"}
  with pytest.raises(ValueError, match="no examples"):
    build_latent_cache(AllBad(n=5), toy_encode, num_examples=5, batch_size=8, log=lambda _: None)


def pooled_encode(images):
  """A per-image stand-in for an AE encoder at any size: (B, H, W, 3) -> (B, H/8, W/8, 4), 8x8 mean pooling then a
  non-linear channel mix (so a latent depends on its own image only, at its own size)."""
  b, h, w, _ = images.shape
  pooled = images.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
  return np.tanh(pooled @ np.asarray([[1.0, -0.5, 0.3, 2.0], [0.2, 1.5, -1.0, 0.1], [-0.7, 0.4, 0.9, 1.1]], np.float32))


def test_bucketed_cache_encodes_each_image_at_its_bucket_and_batches_stay_one_bucket(tmp_path):
  """data.latent_cache with data.buckets: every image encoded at its bucket's size in batches of one bucket, equal
  to encoding it alone; the iterator over the cache, scheduled by the cache's bucket ids, gives batches of one
  bucket (each batch's latents all cached latents of that bucket)."""
  rng = np.random.default_rng(0)
  for i in range(15):  # 5 each of 24x48, 48x24, 32x32
    Image.fromarray(rng.integers(0, 255, [(24, 48, 3), (48, 24, 3), (32, 32, 3)][i % 3], np.uint8)).save(
        tmp_path / f"{i:03d}.png")
    (tmp_path / f"{i:03d}.txt").write_text(f"caption {i}\n")
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (24, 48, 3), np.uint8)).save(buf, "PNG")
  (tmp_path / "broken.png").write_bytes(buf.getvalue()[:60])  # a header (so a bucket) over truncated data
  (tmp_path / "unreadable.png").write_bytes(b"not an image")  # no header: no bucket
  table = bucket_table("sana", 32, 8)
  source = make_source(f"folder:{tmp_path}", 32, 0, buckets=table)
  ids = bucket_ids_of(source, table)
  shapes = []
  cache = build_latent_cache(source, lambda x: shapes.append(x.shape) or pooled_encode(x), num_examples=100,
                             batch_size=4, bucket_ids=ids, log=lambda _: None)
  assert len(cache) == 15 and cache.skipped == 2  # broken.png (bucketed, undecodable), unreadable.png (no bucket)
  cached_ids = cache.bucket_ids()
  assert sorted(set(cached_ids.tolist())) == sorted(set(ids[ids >= 0].tolist())) and len(set(cached_ids)) == 3
  # One bucket a batch: 2 batches of 4 (the second padded) for each bucket of 5.
  assert len(shapes) == 6 and all(s[0] == 4 for s in shapes)
  assert sorted(s[1:3] for s in shapes) == sorted(2 * [table.sizes[b] for b in set(cached_ids.tolist())])
  index_of = {source[k]["path"]: k for k in range(len(source))}
  for j in range(len(cache)):
    i = index_of[cache[j]["path"]]
    image = source[i]["image"]
    assert image.shape[:2] == table.sizes[cached_ids[j]] and cached_ids[j] == ids[i]
    assert cache[j]["captions"] == [f"caption {int(os.path.basename(cache[j]['path'])[:3])}"]
    alone = pooled_encode(uint8_to_unit(image[None]))[0]  # encoded alone, not in a batch of its bucket
    np.testing.assert_allclose(cache[j]["latent"], alone, rtol=1e-6, atol=1e-6)
  bucket_of = {cache[j]["latent"].tobytes(): int(cached_ids[j]) for j in range(len(cache))}
  it = make_train_iterator(cache, batch_size=2, seed=0, tokenize_fn=byte_tokenize, bucket_ids=cached_ids)
  seen = set()
  for _ in range(12):  # 2 epochs (6 batches of 2 from 5 + 5 + 5)
    latents = next(it)["latent"]
    (bucket,) = {bucket_of[x.tobytes()] for x in latents}  # every latent one of the cache's, all of one bucket
    assert latents.shape[1:3] == (table.sizes[bucket][0] // 8, table.sizes[bucket][1] // 8)
    seen.add(bucket)
  assert seen == set(cached_ids.tolist())
  it.close()
