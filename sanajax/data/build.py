"""Writes ArrayRecord shards of image-caption records (sanajax.data.records) for `arrayrecord:DIR`.

    python -m sanajax.data.build --src=folder:DIR|webdataset:GLOB|tfds:NAME[:SPLIT] --dst=DIR [--shards=N]

Every record holds the image file's bytes as stored (never re-encoded), its captions, its CLIP
scores when the source has them, and its original (h, w) read from the header. Examples whose
bytes are not an image at all (no readable header) are left out and named in the shard's index
and the summary; with --verify every image is also decoded in full, and those that fail (e.g. a
truncated JPEG, or one over the default 89-megapixel limit) are left out too. Without --verify a
damaged image that still has a header is stored, and training skips, names and counts it when it
reads it, as with a folder.

Shard k of N holds the source's examples [k n / N, (k+1) n / N) in source order. A shard is written
to a temporary file, renamed when whole, and then its index JSON is written: a killed build rerun
with the same command keeps every finished shard and writes only the others; Ctrl-C stops the build
at once, in one line, with the same promise. Shards are written in parallel by worker processes
(--workers, default: the CPU count).

This module is the data layer's own command line (argparse, no absl flags: it imports only
sanajax.data and sanajax.paths), so it stays usable where the training stack is not installed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from array_record.python import array_record_module

from sanajax.data import records
from sanajax.data.sources import (
  DEFAULT_MAX_IMAGE_MEGAPIXELS,
  bare_folder_hint,
  image_size,
  load_image,
  make_source,
)
from sanajax.data.workers import exit_with_parent
from sanajax.paths import url_path_problem

# Source forms a build reads (an arrayrecord: source is already built).
BUILD_SOURCES = ("folder:", "webdataset:", "tfds:")
# Default records per shard when --shards is not given: ~1,000 1024-px JPEGs (200-500 KB each) is a
# 0.2-0.5 GB file, small enough that a killed build loses little and that shards outnumber workers.
RECORDS_PER_SHARD = 1000
# With --verify, images are decoded at this side (PIL's JPEG draft still reads every byte, so a
# truncated file still fails, at a fraction of the full decode's cost).
_VERIFY_RESOLUTION = 64
_SHOW_SKIPPED = 5


class BuildError(ValueError):
  """A mistake in the command line or in the destination (said in one line, exit code 2)."""


def _write_record(writer, data: bytes) -> None:
  """Appends one record (its own function so that a test can stop a build between records)."""
  writer.write(data)


# The source of this worker process, set once by _init_worker (a pickled source, not rebuilt: a
# WebDataset source's tar index is built once, in the main process).
_SOURCE = None


def _init_worker(source, parent_pid: int) -> None:
  global _SOURCE
  _SOURCE = source
  # Ctrl-C in a terminal reaches the workers too: the main process answers it (it stops them; see build).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  exit_with_parent(parent_pid)  # a build killed outright (SIGKILL, the OOM killer) leaves no worker behind


def _check_record(source, i: int, verify: bool) -> tuple[bytes | None, tuple[int, int] | None, str, str]:
  """(record bytes or None, (h, w), where, why skipped) of example i."""
  where = f"index {i}"
  try:
    where = source.where(i)
    rec = source.raw(i)
  except Exception as e:  # pylint: disable=broad-except
    # A damaged tar member or TFDS record raises whatever its reader raises.
    return None, None, where, f"unreadable ({type(e).__name__}: {e})"
  size = image_size(rec.image)
  if size is None:
    return None, None, where, "not an image (no readable header)"
  if verify:
    # The default pixel limit: decoding a larger image here could exhaust memory (PIL's bomb guard).
    image, reason = load_image(rec.image, _VERIFY_RESOLUTION, DEFAULT_MAX_IMAGE_MEGAPIXELS)
    if image is None:
      return None, None, where, reason
  rec.size = size
  return rec.to_bytes(), size, where, ""


def write_shard(dst: str, shard: int, num_shards: int, start: int, stop: int, verify: bool,
                source=None) -> dict[str, Any]:
  """Writes shard `shard` (examples [start, stop) of the source) and its index; returns the index."""
  source = source if source is not None else _SOURCE
  final = records.shard_path(dst, shard, num_shards)
  tmp = f"{final}.tmp"
  sizes, skipped, nbytes = [], [], 0
  writer = array_record_module.ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  try:
    for i in range(start, stop):
      data, size, where, reason = _check_record(source, i, verify)
      if data is None:
        skipped.append([where, reason])
        continue
      _write_record(writer, data)
      sizes.append(list(size))
      nbytes += len(data)
  finally:
    writer.close()
  os.replace(tmp, final)
  index = {"num_records": len(sizes), "sizes": sizes, "skipped": skipped, "source_range": [start, stop],
           "bytes": nbytes}
  records.write_json_atomic(records.index_path(final), index)
  return {"shard": shard, **index}


def _ranges(n: int, num_shards: int) -> list[tuple[int, int]]:
  return [(k * n // num_shards, (k + 1) * n // num_shards) for k in range(num_shards)]


def _open_source(src: str, tfds: dict[str, str]):
  if not src.startswith(BUILD_SOURCES):
    raise BuildError(f"--src={src!r}: a build reads folder:DIR, webdataset:GLOB or tfds:NAME[:SPLIT]"
                     + (" (an arrayrecord: directory is already built)" if src.startswith("arrayrecord:") else
                        bare_folder_hint(src)))
  if not src.startswith("tfds:") and (problem := url_path_problem(src.partition(":")[2])):
    raise BuildError(f"--src={src}: the folder or shards {problem}.")
  try:
    # The resolution is unused: a build stores the bytes and never decodes (except --verify).
    return make_source(src, _VERIFY_RESOLUTION, 0, **tfds)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise BuildError(str(e)) from e


def _prepare(dst: str, src: str, n: int, num_shards: int) -> list[int]:
  """Checks / writes DIR/build.json; returns the shards still to write (their stale temp files removed)."""
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise BuildError(f"--dst={dst!r} is a file; name a directory (it is created if missing).")
  os.makedirs(dst, exist_ok=True)
  want = {"src": src, "shards": num_shards, "num_examples": n}
  manifest = records.read_manifest(dst)
  if manifest is not None:
    have = {k: manifest.get(k) for k in want}
    if have != want:
      diff = ", ".join(f"{k} {have[k]!r} (now {want[k]!r})" for k in want if have[k] != want[k])
      raise BuildError(f"--dst={dst!r} holds another build: {diff}; rerun that build's command to finish it, "
                       f"or write to an empty --dst.")
  else:
    strays = glob.glob(os.path.join(glob.escape(dst), f"*{records.SHARD_SUFFIX}*"))
    if strays:
      raise BuildError(f"--dst={dst!r} holds shards without a build.json ({os.path.basename(strays[0])}, ...); "
                       f"write to an empty --dst.")
  pending = [k for k in range(num_shards)
             if not os.path.isfile(records.index_path(records.shard_path(dst, k, num_shards)))]
  for k in pending:
    for stale in glob.glob(glob.escape(records.shard_path(dst, k, num_shards)) + ".tmp*"):
      os.remove(stale)
  records.write_json_atomic(os.path.join(dst, records.MANIFEST),
                            {**want, "format": "sanajax image records v1 (sanajax/data/records.py)",
                             "complete": not pending, "shards_done": num_shards - len(pending)})
  return pending


def build(src: str, dst: str, num_shards: int | None = None, workers: int | None = None, verify: bool = False,
          tfds: dict[str, str] | None = None, out=sys.stderr) -> dict[str, Any]:
  """Builds (or finishes) the shards of `src` in `dst`; returns the summary (also printed to `out`).

  Raises BuildError (one line) for a bad source, a bad destination or a --dst holding another build.
  """
  if problem := url_path_problem(dst):
    raise BuildError(f"--dst={dst} {problem}.")
  dst = os.path.abspath(os.path.expanduser(dst))
  source = _open_source(src, tfds or {})
  n = len(source)
  if num_shards is None:
    num_shards = max(1, math.ceil(n / RECORDS_PER_SHARD))
  if not 1 <= num_shards <= n:
    raise BuildError(f"--shards={num_shards}: must be between 1 and the number of examples ({n}).")
  pending = _prepare(dst, src, n, num_shards)
  ranges = _ranges(n, num_shards)
  done = num_shards - len(pending)
  todo = sum(ranges[k][1] - ranges[k][0] for k in pending)
  print(f"build: {src} ({n} examples) -> {dst}: {num_shards} shards"
        + (f", {done} already finished, {len(pending)} to write" if done else ""), file=out, flush=True)
  workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
  t0, seen, new = time.time(), 0, []

  def report(result):
    nonlocal done, seen
    done += 1
    seen += result["source_range"][1] - result["source_range"][0]
    new.append(result)
    rate = seen / max(time.time() - t0, 1e-9)
    eta = (todo - seen) / rate if rate > 0 else 0.0
    records.write_json_atomic(os.path.join(dst, records.MANIFEST),
                              {**records.read_manifest(dst), "shards_done": done})
    print(f"build: shard {result['shard']:05d} done ({result['num_records']} records, "
          f"{len(result['skipped'])} skipped, {result['bytes'] / 1e6:.1f} MB) | {done}/{num_shards} shards, "
          f"{seen}/{todo} examples, {rate:.0f} examples/s, ETA {eta:.0f} s", file=out, flush=True)

  if workers == 1:
    for k in pending:
      report(write_shard(dst, k, num_shards, *ranges[k], verify, source=source))
  else:
    # spawn: a fresh interpreter per worker, safe whatever threads this process runs (grain, TFDS).
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(source, os.getpid()))
    try:
      futures = {pool.submit(write_shard, dst, k, num_shards, *ranges[k], verify): k for k in pending}
      for future in concurrent.futures.as_completed(futures):
        report(future.result())
    except BaseException:  # Ctrl-C, or a shard that failed: the shards being written stop now, not when done
      for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()  # a shard in progress leaves a temporary file, which the next build removes
      pool.shutdown(wait=True, cancel_futures=True)
      raise
    pool.shutdown()

  indices = [records.read_index(records.shard_path(dst, k, num_shards)) for k in range(num_shards)]
  skipped = [s for ix in indices for s in ix["skipped"]]
  summary = {**records.read_manifest(dst), "complete": True, "shards_done": num_shards,
             "num_records": sum(ix["num_records"] for ix in indices), "num_skipped": len(skipped),
             "bytes": sum(ix["bytes"] for ix in indices)}
  records.write_json_atomic(os.path.join(dst, records.MANIFEST), summary)
  for where, reason in skipped[:_SHOW_SKIPPED]:
    print(f"build: skipped {where}: {reason}", file=out)
  if len(skipped) > _SHOW_SKIPPED:
    print(f"build: ... and {len(skipped) - _SHOW_SKIPPED} more (listed in each shard's .json)", file=out)
  elapsed = time.time() - t0
  print(f"build: done: {summary['num_records']} records ({summary['num_skipped']} skipped), "
        f"{summary['bytes'] / 1e6:.1f} MB in {num_shards} shards; wrote {len(new)} shards in {elapsed:.1f} s. "
        f"Train with --config.data.source=arrayrecord:{dst}", file=out, flush=True)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sanajax.data.build", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="folder:DIR, webdataset:GLOB or tfds:NAME[:SPLIT]")
  parser.add_argument("--dst", required=True, help="output directory (created; a rerun finishes a killed build)")
  parser.add_argument("--shards", type=int, default=None,
                      help=f"number of shards (default: one per {RECORDS_PER_SHARD} examples)")
  parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPU count)")
  parser.add_argument("--verify", action="store_true",
                      help="decode every image and leave out those that fail or exceed 89 megapixels (slower; default: "
                           "header check only)")
  parser.add_argument("--tfds_image_key", default="image", help="tfds: the image feature (nest with '/')")
  parser.add_argument("--tfds_caption_key", default="caption", help="tfds: the caption feature (nest with '/')")
  parser.add_argument("--tfds_score_key", default="", help="tfds: the CLIP-score feature ('' for none)")
  parser.add_argument("--tfds_data_dir", default="", help="tfds: where the prepared data set lies")
  args = parser.parse_args(argv)
  if args.workers is not None and args.workers < 1:
    parser.error(f"--workers={args.workers}: must be >= 1")
  tfds = {k: getattr(args, k) for k in ("tfds_image_key", "tfds_caption_key", "tfds_score_key", "tfds_data_dir")}
  try:
    build(args.src, args.dst, args.shards, args.workers, args.verify, tfds)
  except (BuildError, OSError) as e:
    print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print(f"{parser.prog}: interrupted (Ctrl-C); the finished shards are kept: run the same command again to "
          f"write the rest.", file=sys.stderr, flush=True)
    return 128 + signal.SIGINT
  return 0


if __name__ == "__main__":
  sys.exit(main())
