"""sanajax's ArrayRecord record format and shard layout (written by `sanajax.data.build`).

One record is one byte string:

    b"SJR1" | uint32 little-endian H | H bytes of UTF-8 JSON header | blob 0 | blob 1 | ...

The header names the blobs' lengths in "blobs" (a list of ints, bytes); everything else in it is
the record's metadata. An image record (`ImageRecord`) has exactly one blob, the image file's
bytes as stored (JPEG / PNG / WebP: never re-encoded), and the header

    {"blobs": [n], "captions": [str, ...], "scores": [float, ...] or [], "size": [h, w], "key": str}

  captions: one or more captions ('' for an uncaptioned image), as the sources give them;
  scores:   one CLIP score per caption, or [] (the caption choice is then uniform);
  size:     the original (height, width) in pixels, after the EXIF orientation is applied, read
            from the image header (so aspect-ratio buckets can be assigned without decoding);
  key:      where the example came from (a folder's relative path, a tar member's key, a TFDS
            index), to name the record when it is skipped.

Other record kinds (the on-disk latent / text caches) use the same envelope (`pack` / `unpack`)
with their own header fields and blobs.

A directory of shards holds
    data-00000-of-00008.array_record   the records, in source order (written as `*.tmp`, renamed when whole)
    data-00000-of-00008.json           that shard's index: num_records, sizes [[h, w], ...], skipped
                                       [[where, reason], ...], the source range; written last, so its
                                       presence means the shard is finished
    build.json                         the build: source, shard count, "complete" when every shard is done
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

MAGIC = b"SJR1"
_LEN = struct.Struct("<I")
SHARD_SUFFIX = ".array_record"
MANIFEST = "build.json"
# group_size:1 makes every record its own compressed chunk, so a random read decodes one record,
# not a group of 65,536 (ArrayRecord's default, for sequential reads). Images are already
# compressed, so ArrayRecord's own compression would only cost time: uncompressed.
WRITER_OPTIONS = "group_size:1,uncompressed"


class RecordError(ValueError):
  """A byte string that is not a sanajax record (wrong magic, truncated header or blobs)."""


def pack(header: dict[str, Any], blobs: Sequence[bytes]) -> bytes:
  """Encodes `header` (JSON-serialisable, without "blobs") and `blobs` into one record."""
  head = dict(header)
  head["blobs"] = [len(b) for b in blobs]
  text = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return b"".join([MAGIC, _LEN.pack(len(text)), text, *blobs])


def unpack(record: bytes, views: bool = False) -> tuple[dict[str, Any], list[bytes | memoryview]]:
  """The inverse of `pack`: (header, blobs). Raises RecordError on anything else.

  views: the blobs as memoryviews into `record` instead of bytes copies (np.frombuffer reads them with no
  copy: a 1024-px cache record is ~0.6-1.5 MB, and copying it twice cost more than reading it).
  """
  record = bytes(record)  # no copy when it is bytes already (what ArrayRecord readers return)
  if record[:4] != MAGIC or len(record) < 8:
    raise RecordError(f"not a sanajax record (starts {record[:8]!r}, expected {MAGIC!r})")
  (n,) = _LEN.unpack_from(record, 4)
  try:
    header = json.loads(record[8:8 + n].decode("utf-8"))
    lengths = [int(x) for x in header["blobs"]]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise RecordError(f"sanajax record with an unreadable header ({type(e).__name__}: {e})") from e
  offset, blobs, data = 8 + n, [], memoryview(record) if views else record
  for length in lengths:
    blobs.append(data[offset:offset + length])
    offset += length
  if offset != len(record):
    raise RecordError(f"sanajax record of {len(record)} bytes, its header says {offset}")
  return header, blobs


@dataclasses.dataclass
class ImageRecord:
  """One image-caption example as stored. image: the encoded file's bytes; size: original (h, w) px."""
  image: bytes
  captions: list[str]
  scores: list[float]
  size: tuple[int, int]
  key: str = ""

  def to_bytes(self) -> bytes:
    header = {"captions": [str(c) for c in self.captions] or [""],
              "scores": [float(s) for s in self.scores],
              "size": [int(self.size[0]), int(self.size[1])], "key": str(self.key)}
    return pack(header, [self.image])

  @classmethod
  def from_bytes(cls, record: bytes) -> ImageRecord:
    header, blobs = unpack(record)
    try:
      (image,) = blobs
      captions = [str(c) for c in header["captions"]] or [""]
      scores = [float(s) for s in header.get("scores", [])]
      h, w = (int(v) for v in header["size"])
    except (KeyError, TypeError, ValueError) as e:
      raise RecordError(f"not an image record ({type(e).__name__}: {e}); header {header}") from e
    return cls(image, captions, scores if len(scores) == len(captions) else [], (h, w), str(header.get("key", "")))


# ---------------------------------------------------------------------------------------
# Shard layout.


def shard_path(directory: str, index: int, count: int, prefix: str = "data") -> str:
  """DIR/data-00003-of-00008.array_record (index 3 of 8)."""
  return os.path.join(directory, f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}")


def index_path(shard: str) -> str:
  """The per-shard index JSON beside a shard file."""
  return shard[:-len(SHARD_SUFFIX)] + ".json"


def read_manifest(directory: str, name: str = MANIFEST) -> dict[str, Any] | None:
  """DIR/build.json (or DIR/`name`: a cache's cache.json), or None when there is none."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to `path` through a temporary file and a rename: readers see all of it or none."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False)
  os.replace(tmp, path)


def list_shards(directory: str, prefix: str = "data") -> list[str]:
  """The finished shard files of DIR in order (each with its index JSON), or a clear error.

  Refuses a directory whose build.json says the build is not complete (rerun the build: it
  resumes), and one with no shards.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"arrayrecord: {directory!r} is not a directory; write the shards with "
                            f"python -m sanajax.data.build --src=... --dst={directory}")
  manifest = read_manifest(directory)
  if manifest is not None and not manifest.get("complete"):
    raise ValueError(f"arrayrecord: the build into {directory!r} is not finished "
                     f"({manifest.get('shards_done', '?')} of {manifest.get('shards', '?')} shards); rerun "
                     f"python -m sanajax.data.build --src={manifest.get('src', 'SRC')} --dst={directory} to finish it.")
  shards = sorted(glob.glob(os.path.join(glob.escape(directory), f"{prefix}-*-of-*{SHARD_SUFFIX}")))
  shards = [s for s in shards if os.path.isfile(index_path(s))]
  if not shards:
    raise FileNotFoundError(f"arrayrecord: no finished shards ({prefix}-*-of-*{SHARD_SUFFIX} with their .json "
                            f"index) in {directory!r}; write them with python -m sanajax.data.build")
  return shards


def read_index(shard: str) -> dict[str, Any]:
  """A shard's index JSON (num_records, sizes, skipped, ...)."""
  with open(index_path(shard), encoding="utf-8") as f:
    return json.load(f)
