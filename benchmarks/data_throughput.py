"""Data-pipeline throughput: images/s per CPU core for decode + resize + crop (or + aspect-ratio bucketing)
of 1024-px JPEGs, from a folder, ArrayRecord shards (`python -m sanajax.data.build`) and WebDataset tars
and samples/s from the on-disk latent + text-feature cache (`cache:DIR`, a 1024-px-shaped one written here
with random features: no AE or text encoder needed; or `--cache=DIR`), in this process and through grain
worker processes (`config.data.num_workers`).

    python benchmarks/data_throughput.py                      # 1024 px, workers 1 and 2, rows to RESULTS.md
    python benchmarks/data_throughput.py --smoke              # 128 px, in-process only, seconds (tests)

Target (issue 27): >= 50 images/s of 1024-px JPEG decode per core, so that a few cores feed a GPU that
trains SANA-1600M at tens of images/s. The photos are generated (multi-scale smooth texture + fine
noise, JPEG quality 90, mixed aspect ratios of ~1 megapixel): the mean file size is in each row, as
decode time follows it. Figures:
  * in-process, one thread: images per CPU-second of source[i] (read + decode + resize/crop), i.e. per
    core, measured with the process's CPU clock; and the wall-clock rate beside it;
  * grain workers W (mp_prefetch, one read thread each): batches of 8 as training gets them (decode in
    the workers; the [-1, 1] float conversion in this process): images/s wall, and images per CPU-second
    of the workers (psutil) = per worker core.
Cache (issue 27 target: >= 2,000 samples/s): records of SANA-1600M at 1024 px, a float32 (32, 32, 32)
DC-AE latent and Gemma-2's bf16 (n, 2304) features of one caption (n = 102: a 100-token prompt; n = 300:
the longest, text.max_length), read as training reads them: batches of 8 through the training iterator
(record read, no-copy decode, the rows padded to (8, 300, 2304) once per batch). In-process: samples per
CPU-second (one read thread; all of the process's threads counted).
On a shared machine the wall figures move with the other load (each row names the load average); the
CPU-second figures much less.
"""
from __future__ import annotations

import os
import statistics
import sys
import tarfile
import tempfile
import time

import _harness as hx
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from sanajax.data import build as build_lib
from sanajax.data import feature_cache, records
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import make_source

try:  # optional: CPU time of grain's worker processes
  import psutil
except ImportError:  # pragma: no cover
  psutil = None
try:  # aspect-ratio buckets (issue 27's other half); square crops only where they are absent.
  from sanajax.data.buckets import bucket_table
except ImportError:  # pragma: no cover
  bucket_table = None

BENCH = "data_throughput"
TARGET = ">= 50 img/s/core (1024-px JPEG)"
TARGET_PER_CORE = 50.0
TARGET_CACHE = ">= 2,000 samples/s (cache)"
# Cache records timed: (name, latent (h, w, c) float32, text length L, width D, rows kept). "shapes": the tiny config's
# 64-px shapes runs (configs/tiny.py: an (8, 8, 8) latent of the tiny DC-AE, tiny Gemma-2 of width 64, max_length 20;
# a 12-token caption); "1024": SANA-1600M at 1024 px (DC-AE f32c32 (32, 32, 32), Gemma-2 2304 wide, max_length
# 300) with a 100-token prompt (102 rows, docs/data.md#cache) and the longest (300 rows).
CACHE_CASES = (("shapes", (8, 8, 8), 20, 64, 12), ("1024", (32, 32, 32), 300, 2304, 102),
               ("1024", (32, 32, 32), 300, 2304, 300))
SMOKE_CACHE = ("smoke", (4, 4, 32), 16, 64, 16)
# (width, height) at ~1 megapixel: square, 16:9, 4:3, 2:1 and their portraits.
SHAPES_1024 = [(1024, 1024), (1365, 768), (768, 1365), (1182, 886), (886, 1182), (1448, 724), (724, 1448)]


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  """uint8 (h, w, 3): smooth texture at four scales plus fine noise (photo-like JPEG sizes and decode cost)."""
  out = np.zeros((h, w, 3), np.float32)
  for cells, amp in ((4, 90.0), (16, 40.0), (64, 20.0), (256, 10.0)):
    small = rng.normal(0, 1, (max(2, cells * h // max(w, h)), max(2, cells * w // max(w, h)), 3)).astype(np.float32)
    big = np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                    for c in range(3)], -1)
    out += amp * big
  out += rng.normal(0, 4, out.shape).astype(np.float32)
  return np.clip(out + 128, 0, 255).astype(np.uint8)


def write_data(root: str, n: int, resolution: int) -> tuple[str, str, str, float]:
  """A folder of n JPEGs with captions, its ArrayRecord build and WebDataset tars; returns
  (folder, arrayrecord dir, tar glob, mean file KB)."""
  rng = np.random.default_rng(0)
  folder = os.path.join(root, "folder")
  os.makedirs(folder)
  scale = resolution / 1024
  sizes = []
  for i in range(n):
    w, h = SHAPES_1024[i % len(SHAPES_1024)]
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(photo(rng, max(8, round(w * scale)), max(8, round(h * scale)))).save(path, quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
      f.write(f"a generated photo number {i}\n")
    sizes.append(os.path.getsize(path))
  shards = os.path.join(root, "arrayrecord")
  with open(os.devnull, "w") as quiet:
    build_lib.build(f"folder:{folder}", shards, num_shards=2, workers=1, out=quiet)
  tars = os.path.join(root, "wds")
  os.makedirs(tars)
  for t in range(2):
    with tarfile.open(os.path.join(tars, f"{t:05d}.tar"), "w") as tar:
      for i in range(t, n, 2):
        for ext in ("jpg", "txt"):
          tar.add(os.path.join(folder, f"{i:05d}.{ext}"), arcname=f"{i:05d}.{ext}")
  return folder, shards, os.path.join(tars, "*.tar"), statistics.mean(sizes) / 1024


def write_cache(root: str, n: int, case: tuple) -> str:
  """A finished cache:DIR of n records of `case` (CACHE_CASES: name, latent shape, L, D, rows kept), with random
  values: reading costs what it costs for real features. Written with the cache's own record encoder; its
  signature is empty (read unchecked, as make_source does)."""
  name, latent_shape, length, dim, rows = case
  directory = os.path.join(root, f"cache-{name}-{rows}")
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  latent = rng.normal(size=latent_shape).astype(np.float32)
  context = rng.normal(size=(length, dim)).astype(np.float32)
  mask = (np.arange(length) < rows).astype(np.int32)  # right-padded, as the tokenizer gives
  path = records.shard_path(directory, 0, 1, feature_cache.PREFIX)
  writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
  for i in range(n):
    writer.write(feature_cache.encode_record(latent, [context], [mask], [f"photo {i}"], [], f"{i:05d}", 0))
  writer.close()
  records.write_json_atomic(records.index_path(path), {"num_records": n, "buckets": [0] * n, "skipped": []})
  records.write_json_atomic(os.path.join(directory, feature_cache.INFO_FILE),
                            {"format": feature_cache.FORMAT, "signature": {}, "shards": 1, "complete": True})
  np.savez(os.path.join(directory, feature_cache.NULL_TEXT_FILE), context=np.zeros((length, dim), np.float32),
           mask=np.zeros(length, np.int32))
  return directory


def cache_in_process(source, batches: int, batch_size: int = 8) -> tuple[float, float]:
  """(samples/s wall, samples per CPU-second) of the training iterator over a cache in this process (one
  read thread): what one core gives. The best of 3 runs of `batches` after 2 untimed batches."""
  it = make_train_iterator(source, batch_size=batch_size, seed=0, tokenize_fn=_no_text, read_threads=1)
  try:
    for _ in range(2):
      next(it)
    walls, cpus = [], []
    for _ in range(3):
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(batches):
        next(it)
      walls.append(batches * batch_size / (time.perf_counter() - t0))
      cpus.append(batches * batch_size / max(time.process_time() - c0, 1e-9))
    return max(walls), max(cpus)
  finally:
    it.close()


def in_process(source, repeats: int) -> tuple[float, float]:
  """(images/s wall, images per CPU-second) of source[i] over all i in one thread: the best of `repeats`
  passes after one warm pass. CPU time (time.process_time) is what one core spends an image, whatever
  else the machine runs; the wall figure drops when other processes share the core."""
  n = len(source)
  walls, cpus = [], []
  for r in range(repeats + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
      ex = source[i]
      assert ex["image"] is not None, ex.get("path")
    if r:
      walls.append(n / (time.perf_counter() - t0))
      cpus.append(n / max(time.process_time() - c0, 1e-9))
  return max(walls), max(cpus)


def _no_text(captions):
  return np.zeros((len(captions), 1), np.int32), np.ones((len(captions), 1), np.int32)


def _children_cpu_s() -> float | None:
  """CPU seconds used so far by this process's live child processes (grain's workers); None without psutil."""
  if psutil is None:
    return None
  total = 0.0
  for child in psutil.Process().children(recursive=True):
    try:
      t = child.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def with_workers(source, workers: int, batches: int, batch_size: int = 8, bucket_ids=None
                 ) -> tuple[float, float | None]:
  """(images/s wall, images per worker CPU-second or None) of the training iterator with `workers` grain
  worker processes, one read thread each."""
  kwargs = {"bucket_ids": bucket_ids} if bucket_ids is not None else {}
  it = make_train_iterator(source, batch_size=batch_size, seed=0, tokenize_fn=_no_text, num_workers=workers,
                           read_threads=1, **kwargs)
  try:
    for _ in range(2):  # worker start-up and the first decodes
      next(it)
    t0, c0 = time.perf_counter(), _children_cpu_s()
    for _ in range(batches):
      next(it)
    wall = time.perf_counter() - t0
    c1 = _children_cpu_s()
    # Workers keep decoding ahead (prefetch) while timed, so their CPU time covers slightly more images
    # than were taken: the per-CPU-second figure errs low.
    per_cpu = batches * batch_size / (c1 - c0) if c0 is not None and c1 > c0 else None
    return batches * batch_size / wall, per_cpu
  finally:
    it.close()


def cpu_name() -> str:
  """'cpu: <model name>' from /proc/cpuinfo (as the other CPU rows of RESULTS.md name the machine)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return "cpu: " + line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "cpu"


def load_text() -> str:
  return "load avg {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=None, help="generated photos (default 56; smoke 8)")
  p.add_argument("--resolution", type=int, default=None, help="training side in px (default 1024; smoke 128)")
  p.add_argument("--workers", default=None, help="grain worker counts, comma-separated (default 1,2; smoke none)")
  p.add_argument("--batches", type=int, default=12, help="timed batches of 8 per worker count")
  p.add_argument("--sources", default="folder,arrayrecord,webdataset,cache", help="which sources to time")
  p.add_argument("--modes", default="crop,bucket", help="square crop and / or aspect-ratio bucketing")
  p.add_argument("--cache", default=None, help="an on-disk cache:DIR to time instead of the generated ones")
  p.add_argument("--cache_cases", default="all", help="generated caches to time: all, or shapes and / or 1024")
  args = hx.finish_args(p.parse_args(argv), warmup=1, repeats=2)
  n = args.images or (8 if args.smoke else 56)
  res = args.resolution or (128 if args.smoke else 1024)
  workers = [int(w) for w in (args.workers if args.workers is not None else ("" if args.smoke else "1,2")).split(",")
             if w.strip()]
  table = bucket_table("sana", res, 32) if bucket_table is not None else None
  rows = []
  with tempfile.TemporaryDirectory(prefix="sanajax-data-bench-") as root:
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    if any(x != "cache" for x in names):  # the photos take a while to make: only when timed
      folder, shards, tars, kb = write_data(root, n, res)
      specs = {"folder": f"folder:{folder}", "arrayrecord": f"arrayrecord:{shards}", "webdataset": f"webdataset:{tars}"}
    for name in [x for x in names if x != "cache"]:
      for mode in [m.strip() for m in args.modes.split(",") if m.strip() and (m.strip() == "crop" or table)]:
        if mode == "bucket" and name == "cache":
          continue  # a cache holds latents already cut to their bucket
        source = make_source(specs[name], res, 0, buckets=table if mode == "bucket" else None)
        case = f"{name} {res}px {'bucketed' if mode == 'bucket' else 'square crop'}, {kb:.0f} KB JPEGs"
        wall, per_cpu = in_process(source, args.repeats)
        ok = per_cpu >= TARGET_PER_CORE if res == 1024 else None
        rows.append(hx.Row(BENCH, case, "in-process, 1 thread", 1e3 / per_cpu,
                           f"{per_cpu:.1f} img per CPU-s; {wall:.1f} img/s wall ({load_text()})", TARGET, hx.met(ok)))
        ids = source.bucket_ids(table) if mode == "bucket" else None
        for w in workers:
          # A bucketed batch is one bucket: no larger than the fullest bucket (8 of each shape at --images 56).
          batch = 8 if ids is None else int(min(8, np.bincount(ids[ids >= 0]).max()))
          wall, per_cpu = with_workers(source, w, args.batches, batch, bucket_ids=ids)
          ok = per_cpu >= TARGET_PER_CORE if res == 1024 and per_cpu is not None else None
          cpu_text = f"{per_cpu:.1f} img per worker CPU-s; " if per_cpu is not None else ""
          rows.append(hx.Row(BENCH, case, f"grain workers={w}", 1e3 * w / wall,
                             f"{cpu_text}{wall:.1f} img/s wall, {wall / w:.1f} per worker ({load_text()})", TARGET,
                             hx.met(ok)))
        hx.print_rows(rows[-1 - len(workers):])
    if "cache" in names:
      cases = [c for c in CACHE_CASES if args.cache_cases == "all" or c[0] in args.cache_cases.split(",")]
      caches = [args.cache] if args.cache else [write_cache(root, 8 * (args.batches + 2), c)
                                                for c in ([SMOKE_CACHE] if args.smoke else cases)]
      for directory in caches:
        source = make_source(f"cache:{directory}", res, 0)
        ex = source[0]
        record_kb = sum(os.path.getsize(f) for f in source.shards) / len(source) / 1024
        side = 64 if "-shapes-" in directory else res
        case = (f"cache {side}px: latent {tuple(ex['latent'].shape)} f32 + {len(ex['features'].rows(0)[0])} bf16 text "
                f"rows, {record_kb:.0f} KB records")
        wall, per_cpu = cache_in_process(source, args.batches)
        ok = per_cpu >= 2000 if not args.smoke else None
        rows.append(hx.Row(BENCH, case, "in-process, 1 read thread", 1e3 / per_cpu,
                           f"{per_cpu:.0f} samples per CPU-s; {wall:.0f} samples/s wall ({load_text()})", TARGET_CACHE,
                           hx.met(ok)))
        for w in workers:
          wall, per_cpu = with_workers(source, w, args.batches)
          cpu_text = f"{per_cpu:.0f} samples per worker CPU-s; " if per_cpu is not None else ""
          rows.append(hx.Row(BENCH, case, f"grain workers={w}", 1e3 * w / wall,
                             f"{cpu_text}{wall:.0f} samples/s wall ({load_text()})", TARGET_CACHE,
                             hx.met(wall >= 2000 if not args.smoke else None)))
        hx.print_rows(rows[-1 - len(workers):])
  device = f"{cpu_name()} x {os.cpu_count()} cores, shared{' (smoke)' if args.smoke else ''}"
  version = hx._version  # pylint: disable=protected-access
  hx.append_rows(args.results, rows, device=device, versions_text=f"pillow {Image.__version__}, "
                 f"grain {version('grain')}, array_record {version('array_record')}")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
