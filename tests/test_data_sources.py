"""The real-format data sources (arrayrecord:, webdataset:, tfds:) and `python -m sanajax.data.build`.

One folder of generated photos (mixed sizes and aspect ratios, JPEG and PNG, sidecar captions with
and without CLIP scores, an EXIF-rotated JPEG, a truncated JPEG and a non-image) is built into
ArrayRecord shards, written as WebDataset tars (with the `webdataset` package's TarWriter) and
prepared as a TFDS data set (a builder defined here); every source must read the folder's examples
(same decoded pixels, captions, scores), resume exactly from its iterator state, shard across hosts
disjointly and completely, and skip, name and count what it cannot read.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import test_data_pipeline  # tests/ is on sys.path
from PIL import Image
from processes import wait_until_gone

from sanajax import config_check, config_utils
from sanajax.data import build as build_lib
from sanajax.data import feature_cache, records
from sanajax.data.buckets import bucket_table
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import (
  ArrayRecordSource,
  FolderSource,
  TfdsSource,
  WebDatasetSource,
  expand_braces,
  make_source,
  parse_tfds,
)

R = 16
L = 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (width, height) of the generated photos: landscape, portrait, square, extreme ratios.
SIZES = [(64, 48), (48, 64), (80, 40), (40, 80), (56, 56), (96, 54), (54, 96), (72, 48), (36, 90), (90, 36),
         (60, 45), (45, 60)]


byte_tokenize = functools.partial(test_data_pipeline.byte_tokenize, length=L)  # UTF-8 bytes + 1, L tokens


def _photo(rng, w, h):
  """A smooth colour gradient plus noise: photo-like statistics, so JPEG behaves as on photos."""
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + rng.integers(0, 128)], -1)
  return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """{folder, captions: {file: (captions, scores)}, good: set of files, bad: {file: why}}."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  captions = {}
  for i, (w, h) in enumerate(SIZES):
    name = f"sub/p{i:02d}.png" if i % 5 == 4 else f"p{i:02d}.jpg"
    path = root / name
    path.parent.mkdir(exist_ok=True)
    img = Image.fromarray(_photo(rng, w, h))
    if name.endswith(".png"):
      img.save(path)
    else:
      img.save(path, quality=90)
    caps, scores = [f"photo {i}"], []
    if i % 3 == 0:  # two scored captions (exact in float32, for TFDS)
      caps, scores = [f"photo {i}", f"alt {i}"], [31.5, 26.25]
    captions[name] = (caps, scores)
    (root / name).with_suffix(".txt").write_text(
        "\n".join(f"{c}\t{s}" for c, s in zip(caps, scores)) if scores else caps[0])
  # EXIF orientation 6 (turn 90 degrees): stored 64 x 32, shown 32 x 64 (h 64, w 32).
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_photo(rng, 64, 32)).save(root / "rot.jpg", quality=90, exif=exif)
  (root / "rot.txt").write_text("rotated")
  captions["rot.jpg"] = (["rotated"], [])
  buf = io.BytesIO()
  Image.fromarray(_photo(rng, 64, 64)).save(buf, format="JPEG", quality=90)
  (root / "trunc.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # a header, half the data
  (root / "trunc.txt").write_text("truncated")
  captions["trunc.jpg"] = (["truncated"], [])
  (root / "junk.png").write_bytes(b"this is not a png at all")  # no header: left out by a build
  (root / "junk.txt").write_text("junk")
  good = {f for f in captions if f != "trunc.jpg"}
  return {"folder": str(root), "captions": captions, "good": good}


def _by_caption(source):
  """{first caption: item} of every item of a source (the captions are unique)."""
  return {source[i]["captions"][0]: source[i] for i in range(len(source))}


def _assert_same_examples(source, folder_source, *, skip=("junk",)):
  got, want = _by_caption(source), _by_caption(folder_source)
  for name in skip:
    want.pop(name, None)
  assert set(got) == set(want)
  for cap, ex in got.items():
    assert ex["captions"] == want[cap]["captions"] and ex["scores"] == want[cap]["scores"], cap
    if want[cap]["image"] is None:
      assert ex["image"] is None and ex["skip_reason"], cap
    else:
      np.testing.assert_array_equal(ex["image"], want[cap]["image"], err_msg=cap)


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
  """The folder built into 3 ArrayRecord shards by the CLI with 2 worker processes."""
  dst = str(tmp_path_factory.mktemp("shards"))
  assert build_lib.main([f"--src=folder:{photos['folder']}", f"--dst={dst}", "--shards=3", "--workers=2"]) == 0
  return dst


@pytest.fixture(scope="module")
def tars(photos, tmp_path_factory):
  """The folder written as 2 WebDataset tars by webdataset's TarWriter: .txt captions for some
  samples, a .json ({"captions", "scores"} or SANA's {"prompt"}) for others."""
  import webdataset  # pylint: disable=g-import-not-at-top  (the 'data' extra, test-only here)
  out = tmp_path_factory.mktemp("wds")
  folder = photos["folder"]
  files = sorted(photos["captions"]) + ["junk.png"]
  for t in range(2):
    with webdataset.TarWriter(str(out / f"shard-{t:03d}.tar")) as sink:
      for k, name in enumerate(files[t::2]):
        stem, ext = os.path.splitext(name)
        sample = {"__key__": stem, ext[1:]: pathlib.Path(folder, name).read_bytes()}
        text = pathlib.Path(folder, stem + ".txt").read_text()
        caps, scores = photos["captions"].get(name, (["junk"], []))
        if k % 3 == 0:
          sample["txt"] = text
        elif scores:
          sample["json"] = {"captions": caps, "scores": scores, "width": 1}
        else:
          sample["json"] = {"prompt": caps[0]}
        sink.write(sample)
      sink.write({"__key__": "lonely", "txt": "a caption without an image"})
  return str(out)


@pytest.fixture(scope="module")
def tfds_dir(photos, tmp_path_factory):
  """The folder prepared as the TFDS data set `sanajax_test_photos` (array_record files)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (the 'data' extra)
  folder, table = photos["folder"], photos["captions"]

  class SanajaxTestPhotos(tfds.core.GeneratorBasedBuilder):
    """Image, captions and their CLIP scores, as a user's own TFDS image-text builder would hold them."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(),
          "texts": tfds.features.FeaturesDict({"captions": tfds.features.Sequence(tfds.features.Text()),
                                               "clip": tfds.features.Sequence(np.float32)})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for name, (caps, scores) in sorted(table.items()):
        # Encoded bytes, as a builder reading files yields them (no TensorFlow needed to write them).
        yield name, {"image": pathlib.Path(folder, name).read_bytes(),
                     "texts": {"captions": caps, "clip": scores}}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SanajaxTestPhotos(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


TFDS_KEYS = {"image_key": "image", "caption_key": "texts/captions", "score_key": "texts/clip"}


def _tfds_source(tfds_dir, split="train"):
  return TfdsSource("sanajax_test_photos", split, R, data_dir=tfds_dir, **TFDS_KEYS)


def _all_sources(photos, shards, tars, tfds_dir):
  return {"folder": FolderSource(photos["folder"], R), "arrayrecord": make_source(f"arrayrecord:{shards}", R, 0),
          "webdataset": make_source(f"webdataset:{tars}/shard-{{000..001}}.tar", R, 0),
          "tfds": _tfds_source(tfds_dir)}


# ---------------------------------------------------------------------------------------
# Build


def test_build_stores_bytes_captions_and_original_sizes(photos, shards):
  folder = photos["folder"]
  manifest = records.read_manifest(shards)
  assert manifest["complete"] and manifest["shards"] == 3 and manifest["num_examples"] == len(photos["good"]) + 2
  assert manifest["num_records"] == len(photos["captions"]) and manifest["num_skipped"] == 1
  indices = [records.read_index(s) for s in records.list_shards(shards)]
  assert [ix["source_range"] for ix in indices] == [[0, 5], [5, 10], [10, 15]]  # contiguous, in source order
  assert indices[0]["skipped"] == [[os.path.join(folder, "junk.png"), "not an image (no readable header)"]]
  src = ArrayRecordSource(shards, R)
  assert len(src) == len(photos["captions"]) and src.skipped == 1
  for i in range(len(src)):
    rec = src.raw(i)
    with open(os.path.join(folder, rec.key), "rb") as f:
      assert rec.image == f.read(), rec.key  # the bytes as stored: no re-encode
    assert (rec.captions, rec.scores) == photos["captions"][rec.key]
    if rec.key == "rot.jpg":
      assert rec.size == (64, 32)  # EXIF orientation applied: shown portrait
    elif rec.key != "trunc.jpg":
      w, h = SIZES[int(os.path.basename(rec.key)[1:3])]
      assert rec.size == (h, w), rec.key
    assert tuple(src.original_sizes()[i]) == rec.size
  _assert_same_examples(src, FolderSource(folder, R))


def test_build_resumes_after_a_kill(photos, shards, tmp_path):
  """A build SIGKILLed in its 3rd shard keeps shards 0-1, is refused as a source, and a rerun of the same
  command writes only the rest; the result equals an uninterrupted build's, byte for byte."""
  dst = str(tmp_path / "killed")
  args = [f"--src=folder:{photos['folder']}", f"--dst={dst}", "--shards=3", "--workers=1"]
  # Records 0-4 are shard 0, 5-9 shard 1: the kill lands mid shard 2, leaving its temporary file.
  child = textwrap.dedent(f"""
      import os, signal, sys
      from sanajax.data import build
      written = [0]
      real = build._write_record
      def write(writer, data):
        written[0] += 1
        if written[0] == 13:
          os.kill(os.getpid(), signal.SIGKILL)
        real(writer, data)
      build._write_record = write
      build.main({args!r})
  """)
  proc = subprocess.run([sys.executable, "-c", child], check=False, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == -9, proc.stderr
  finished = [records.shard_path(dst, k, 3) for k in range(2)]
  assert all(os.path.isfile(records.index_path(s)) for s in finished)
  assert os.path.isfile(records.shard_path(dst, 2, 3) + ".tmp")
  assert not os.path.isfile(records.index_path(records.shard_path(dst, 2, 3)))
  with pytest.raises(ValueError, match="not finished .2 of 3 shards.; rerun"):
    make_source(f"arrayrecord:{dst}", R, 0)
  stamps = {s: os.stat(s) for s in finished}
  err = io.StringIO()
  summary = build_lib.build(f"folder:{photos['folder']}", dst, 3, 1, out=err)
  assert "2 already finished, 1 to write" in err.getvalue() and summary["complete"]
  for s, st in stamps.items():  # finished shards kept as they were
    assert (os.stat(s).st_ino, os.stat(s).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
  assert not os.path.exists(records.shard_path(dst, 2, 3) + ".tmp")
  for k in range(3):
    fresh, resumed = records.shard_path(shards, k, 3), records.shard_path(dst, k, 3)
    a, b = ArrayRecordSource(shards, R), ArrayRecordSource(dst, R)
    assert [a.raw(i).to_bytes() for i in range(len(a))] == [b.raw(i).to_bytes() for i in range(len(b))]
    assert records.read_index(fresh) == records.read_index(resumed)


def test_ctrl_c_stops_a_parallel_build_at_once_in_one_line_and_the_rerun_finishes_it(photos, shards, tmp_path):
  """Ctrl-C in a terminal (SIGINT to the process group) while 2 worker processes write shards: the build exits 130
  with one line and no traceback from any process; the rerun writes what is missing and equals an
  uninterrupted build."""
  dst = str(tmp_path / "interrupted")
  args = [f"--src=folder:{photos['folder']}", f"--dst={dst}", "--shards=3", "--workers=2"]
  # A script file, not -c: the spawned workers import it too (as __mp_main__), so its patch reaches them.
  script = tmp_path / "ctrl_c_build.py"
  script.write_text(textwrap.dedent(f"""
      import os, signal
      from sanajax.data import build
      written = [0]
      real = build._write_record
      def write(writer, data):  # the 3rd record a worker writes: Ctrl-C, to the whole process group
        written[0] += 1
        if written[0] == 3:
          os.killpg(os.getpgid(0), signal.SIGINT)
        real(writer, data)
      build._write_record = write
      if __name__ == "__main__":
        raise SystemExit(build.main({args!r}))
  """))
  proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        start_new_session=True)
  assert proc.returncode == 130, proc.stderr
  assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
      "python -m sanajax.data.build: interrupted (Ctrl-C); the finished shards are kept: run the same command "
      "again to write the rest."), proc.stderr
  assert not records.read_manifest(dst).get("complete")
  assert build_lib.build(f"folder:{photos['folder']}", dst, 3, 1, out=io.StringIO())["complete"]
  assert not [f for f in os.listdir(dst) if ".tmp" in f]
  a, b = ArrayRecordSource(shards, R), ArrayRecordSource(dst, R)
  assert [a.raw(i).to_bytes() for i in range(len(a))] == [b.raw(i).to_bytes() for i in range(len(b))]


def test_a_build_killed_outright_leaves_no_worker_behind(photos, tmp_path):
  """The build's main process SIGKILLed (the OOM killer) while 2 workers write shards: the workers exit within
  seconds (sanajax.data.workers.exit_with_parent). Before, each finished its shard and then waited forever for
  the next one."""
  pids = tmp_path / "worker_pids"
  script = tmp_path / "killed_build.py"  # a file, not -c: the spawned workers import it too, so its patch reaches them
  script.write_text(textwrap.dedent(f"""
      import os, signal, time
      from sanajax.data import build
      written, parent = [0], os.getppid()
      real = build._write_record
      def write(writer, data):  # a worker's 1st record: note its pid; its 3rd: SIGKILL the build once both
        written[0] += 1         # workers are noted (the first worker there does it); then go on slowly
        if written[0] == 1:
          with open({str(pids)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        if written[0] == 3:
          while len(open({str(pids)!r}).read().split()) < 2:
            time.sleep(0.05)
          try:
            os.close(os.open({str(pids) + ".killed"!r}, os.O_CREAT | os.O_EXCL))
            os.kill(parent, signal.SIGKILL)
          except FileExistsError:
            pass
        if written[0] >= 3:
          time.sleep(0.5)
        real(writer, data)
      build._write_record = write
      if __name__ == "__main__":
        raise SystemExit(build.main({[f"--src=folder:{photos['folder']}", f"--dst={tmp_path / 'dst'}", "--shards=3",
                                      "--workers=2"]!r}))
  """))
  proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    assert proc.wait(timeout=120) == -signal.SIGKILL
    workers = [int(line) for line in pids.read_text().split()]
    assert len(workers) == 2, workers
    wait_until_gone(workers, 20, "build workers left without their build")
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)


def test_build_verify_leaves_out_what_does_not_decode(photos, tmp_path):
  dst = str(tmp_path / "verified")
  summary = build_lib.build(f"folder:{photos['folder']}", dst, 1, 1, verify=True, out=io.StringIO())
  assert summary["num_skipped"] == 2 and summary["num_records"] == len(photos["good"])
  assert [why for _, why in records.read_index(records.shard_path(dst, 0, 1))["skipped"]] == [
      "not an image (no readable header)", "truncated, empty or not an image"]


def test_build_errors_are_one_line(photos, shards, tmp_path, capsys):
  folder = photos["folder"]
  cases = [([f"--src=arrayrecord:{shards}", f"--dst={tmp_path / 'a'}"], "already built"),
           ([f"--src={folder}", f"--dst={tmp_path / 'a'}"], re.escape(f"(did you mean folder:{folder}?)")),
           ([f"--src=folder:{tmp_path / 'nope'}", f"--dst={tmp_path / 'b'}"], "is not a directory"),
           ([f"--src=webdataset:{tmp_path}/*.tar", f"--dst={tmp_path / 'c'}"], "matches no file"),
           ([f"--src=folder:{folder}", f"--dst={shards}", "--shards=2"], r"holds another build: shards 3 \(now 2\)"),
           ([f"--src=folder:{folder}", f"--dst={tmp_path / 'd'}", "--shards=99"], "must be between 1 and"),
           ([f"--src=folder:{folder}", f"--dst={os.path.join(folder, 'rot.txt')}"], "is a file"),
           ([f"--src=folder:{folder}", "--dst=gs://b/shards"], r"--dst=gs://b/shards is a URL: .* mount the bucket"),
           (["--src=folder:gs://b/images", f"--dst={tmp_path / 'e'}"], r"the folder or shards is a URL")]
  for argv, message in cases:
    assert build_lib.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m sanajax.data.build: error: "), err
    assert re.search(message, err[0]), (message, err[0])


def test_a_source_given_as_a_bare_folder_is_asked_with_its_kind(photos, shards):
  """data.source=/path (no kind:) is refused by the config check, which names the source it probably means."""
  for folder, kind in ((photos["folder"], "folder"), (shards, "arrayrecord")):
    config = config_utils.load_config("configs/tiny.py", overrides={"data.source": str(folder)})
    with pytest.raises(config_check.ConfigError, match=re.escape(f"(did you mean {kind}:{folder}?)")):
      config_check.validate_config(config, "dit")


# ---------------------------------------------------------------------------------------
# Sources read what the folder holds


def test_webdataset_reads_the_folders_examples(photos, tars, caplog):
  assert expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
  with caplog.at_level(logging.WARNING, logger="sanajax.data.sources"):
    src = WebDatasetSource(f"{tars}/*.tar", R)
  assert len(src.tars) == 2 and src.skipped == 2  # the two image-less "lonely" samples, named
  assert "2 samples have no image" in caplog.text and "shard-000.tar:lonely" in caplog.text
  _assert_same_examples(src, FolderSource(photos["folder"], R), skip=())  # junk.png too: undecodable in both
  bad = [src[i] for i in range(len(src)) if src[i]["captions"] == ["junk"]]
  assert bad[0]["image"] is None and bad[0]["path"] == f"{tars}/shard-000.tar:junk"


def test_tfds_reads_the_folders_examples_and_builds(photos, tfds_dir, tmp_path):
  assert parse_tfds("tfds:coco/2017:1.1.0:train[:10%]") == ("coco/2017:1.1.0", "train[:10%]")
  assert parse_tfds("tfds:x") == ("x", "train")
  src = _tfds_source(tfds_dir)
  _assert_same_examples(src, FolderSource(photos["folder"], R), skip=("junk",))
  # The build reads TFDS too (feature names as flags); the shards hold the same examples.
  dst = str(tmp_path / "from_tfds")
  assert build_lib.main(["--src=tfds:sanajax_test_photos", f"--dst={dst}", "--workers=1", f"--tfds_data_dir={tfds_dir}",
                         "--tfds_caption_key=texts/captions", "--tfds_score_key=texts/clip"]) == 0
  _assert_same_examples(ArrayRecordSource(dst, R), src, skip=())
  with pytest.raises(ValueError, match=r"tfds_caption_key='caption'.*no such feature.*\['image', 'texts'\]"):
    TfdsSource("sanajax_test_photos", "train", R, data_dir=tfds_dir)
  with pytest.raises(ValueError, match="cannot open it.*tfds build"):
    TfdsSource("sanajax_no_such_set", "train", R, data_dir=tfds_dir)


def test_config_check_knows_the_sources(tars, shards, tfds_dir):
  import ml_collections  # pylint: disable=g-import-not-at-top
  def problems(source):
    c = ml_collections.ConfigDict({"data": {"source": source, "resolution": 64}})
    checker = config_check._Checker(c)  # pylint: disable=protected-access
    config_check._check_data(checker)  # pylint: disable=protected-access
    return " ".join(checker.problems)
  assert problems(f"arrayrecord:{shards}") == problems(f"webdataset:{tars}/shard-{{000..001}}.tar") == ""
  assert problems("tfds:sanajax_test_photos:train") == ""
  assert "matches no file" in problems(f"webdataset:{tars}/none-*.tar")
  assert "does not exist" in problems(f"arrayrecord:{tars}/nope")
  assert "names no data set" in problems("tfds:")
  assert "tfds:NAME[:SPLIT]" in problems("hf:foo")


# ---------------------------------------------------------------------------------------
# Every source: exact resume, per-host sharding, skipped records counted


def test_every_source_resumes_exactly(photos, shards, tars, tfds_dir):
  for kind, src in _all_sources(photos, shards, tars, tfds_dir).items():
    it = make_train_iterator(src, batch_size=3, seed=5, tokenize_fn=byte_tokenize)
    for _ in range(4):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]  # crosses an epoch boundary (4 x 3 + 15 > 14 good examples)
    resumed = make_train_iterator(src, batch_size=3, seed=5, tokenize_fn=byte_tokenize)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(5)]
    for a, b in zip(want, got):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind} {key}")
    assert resumed.skipped == it.skipped >= 1, kind  # trunc.jpg (and junk) seen at least once in 27+ reads


def test_bucketed_batches_through_two_grain_workers(photos, shards):
  """Multi-worker decode is grain worker processes: with aspect-ratio buckets and 2 workers every batch is one
  bucket, and the batches equal the in-process ones (mp_prefetch deals whole batches to the workers)."""
  table = bucket_table("sana", 64, 16)
  src = ArrayRecordSource(shards, 64, buckets=table)
  ids = src.bucket_ids(table)
  np.testing.assert_array_equal(ids, table.assign_many(src.original_sizes().astype(np.int64)))
  batches = {}
  for workers in (0, 2):
    it = make_train_iterator(src, batch_size=2, seed=3, tokenize_fn=byte_tokenize, bucket_ids=ids, num_workers=workers)
    try:
      batches[workers] = [next(it) for _ in range(4)]
    finally:
      it.close()
  for a, b in zip(batches[0], batches[2]):
    assert a["image"].shape[1:3] in table.sizes  # one bucket per batch, else the batch could not be stacked
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_every_source_is_sharded_disjointly_and_completely(photos, shards, tars, tfds_dir):
  """3 hosts: each reads its shard's good examples once per epoch; together every good example, once."""
  want = {caps[0] for name, (caps, _) in photos["captions"].items() if name in photos["good"]}
  for kind, src in _all_sources(photos, shards, tars, tfds_dir).items():
    seen = []
    for p in range(3):
      good = sum(src[i]["image"] is not None for i in range(p, len(src), 3))
      it = make_train_iterator(src, batch_size=1, seed=2, tokenize_fn=byte_tokenize, process_index=p, process_count=3)
      names = []
      for _ in range(good):
        next(it)
        names.append(it.last_captions[0].replace("alt ", "photo "))  # either caption names the photo
      assert len(set(names)) == good, (kind, p)  # one epoch: no example twice
      seen.append(set(names))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), kind
    assert set().union(*seen) == want, kind


def test_corrupt_records_are_skipped_counted_and_named(photos, shards, tmp_path, caplog):
  """A shard holding a record that is not a sanajax record, and the truncated JPEG: both skipped and named;
  the build's left-out image is counted from the start."""
  dst = tmp_path / "damaged"
  dst.mkdir()
  for k in range(3):
    for path in (records.shard_path(shards, k, 3), records.index_path(records.shard_path(shards, k, 3))):
      os.link(path, dst / os.path.basename(path))
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  extra = str(dst / "data-00003-of-00003.array_record")  # a 4th shard, sorted after the others
  w = array_record_module.ArrayRecordWriter(extra, records.WRITER_OPTIONS)
  w.write(b"GARBAGE: not a record")
  w.write(records.pack({"captions": ["no size"]}, [b"x"]))  # a sanajax envelope but not an image record
  w.close()
  records.write_json_atomic(records.index_path(extra), {"num_records": 2, "sizes": [[0, 0], [0, 0]], "skipped": []})
  src = ArrayRecordSource(str(dst), R)
  n = len(src)
  assert n == len(photos["captions"]) + 2 and src.skipped == 1
  with caplog.at_level(logging.WARNING, logger="sanajax.data.pipeline"):
    it = make_train_iterator(src, batch_size=len(photos["good"]), seed=0, tokenize_fn=byte_tokenize)
    next(it)  # every good example once: the epoch's 3 bad ones are skipped on the way (or right after)
    next(it)
  assert it.skipped >= 1 + 3  # the build's junk.png + this epoch's truncated JPEG and two bad records
  assert "data-00003-of-00003.array_record[0]: unreadable record (RecordError: not a sanajax record" in caplog.text
  assert "data-00003-of-00003.array_record[1]: unreadable record (RecordError: not an image record" in caplog.text
  assert "(trunc.jpg): truncated, empty or not an image" in caplog.text


def test_throughput_benchmark_smoke(tmp_path):
  """benchmarks/data_throughput.py --smoke: every source and mode timed, one row each, written to --results."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the script imports its sibling _harness
  spec = importlib.util.spec_from_file_location("bench_data_throughput", os.path.join(ROOT, "benchmarks",
                                                                                      "data_throughput.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "R.md"
  rows = module.main(["--smoke", "--results", str(out), "--images", "7"])
  assert [(r.case.split()[0], r.impl) for r in rows] == [
      (s, "in-process, 1 thread") for s in ("folder", "arrayrecord", "webdataset") for _ in range(2)] + [
      ("cache", "in-process, 1 read thread")]
  assert [("bucketed" in r.case) for r in rows] == [False, True] * 3 + [False]
  for r in rows[:-1]:
    per_cpu = float(r.figure.split(" img per CPU-s")[0])
    assert per_cpu > 0 and abs(1e3 / r.ms - per_cpu) < 1e-6 * per_cpu + 0.05, r
  per_cpu = float(rows[-1].figure.split(" samples per CPU-s")[0])
  assert "latent (4, 4, 32) f32 + 16 bf16 text rows" in rows[-1].case and abs(1e3 / rows[-1].ms - per_cpu) < 1, rows[-1]
  table = [line for line in out.read_text().splitlines() if "| data_throughput |" in line]
  assert len(table) == 7 and all("(smoke)" in line for line in table)


def _write_cache(directory, contexts, masks, latents):
  """A finished cache:DIR (one shard, one caption a record) of the given features, with the cache's own encoder."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  directory.mkdir()
  path = records.shard_path(str(directory), 0, 1, feature_cache.PREFIX)
  writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
  for i, (context, mask, latent) in enumerate(zip(contexts, masks, latents)):
    writer.write(feature_cache.encode_record(latent, [context], [mask], [f"c{i}"], [], f"k{i}", 0))
  writer.close()
  n = len(latents)
  records.write_json_atomic(records.index_path(path), {"num_records": n, "buckets": [0] * n, "skipped": []})
  records.write_json_atomic(str(directory / feature_cache.INFO_FILE), {"format": feature_cache.FORMAT,
                                                                       "signature": {}, "complete": True})
  np.savez(directory / feature_cache.NULL_TEXT_FILE, context=np.zeros(contexts[0].shape, np.float32),
           mask=np.zeros(len(masks[0]), np.int32))


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_features_padded_per_batch(tmp_path, workers):
  """Cached text features travel as their stored rows and are padded once per batch (through grain workers:
  in shared memory): every batch's context equals its records' features, zeros where masked, for right-padded
  masks of every length (0 included) and a mask with holes; latents as stored."""
  rng = np.random.default_rng(0)
  n, length, dim = 12, 7, 5
  masks = [(np.arange(length) < i % (length + 1)).astype(np.int32) for i in range(n - 1)]
  masks.append(np.array([1, 0, 1, 1, 0, 0, 1], np.int32))  # not right-padded: a gather
  contexts = [rng.normal(size=(length, dim)).astype(np.float32) for _ in range(n)]
  latents = [np.full((2, 3, 4), i, np.float32) for i in range(n)]
  _write_cache(tmp_path / "cache", contexts, masks, latents)
  source = make_source(f"cache:{tmp_path / 'cache'}", 64, 0)
  want = {i: np.where(masks[i][:, None] == 1, contexts[i], 0).astype(feature_cache.BF16) for i in range(n)}
  np.testing.assert_array_equal(source[n - 1]["features"](0)[0], want[n - 1])  # the padded per-example reader
  it = make_train_iterator(source, batch_size=4, seed=0, tokenize_fn=None, num_workers=workers)
  seen = set()
  try:
    for _ in range(6):  # two epochs
      b = next(it)
      assert b["context"].dtype == feature_cache.BF16 and b["context"].shape == (4, length, dim)
      for latent, context, mask in zip(b["latent"], b["context"], b["attention_mask"]):
        i = int(latent[0, 0, 0])
        np.testing.assert_array_equal(context, want[i])
        np.testing.assert_array_equal(mask, masks[i])
        seen.add(i)
  finally:
    it.close()
  assert seen == set(range(n))
