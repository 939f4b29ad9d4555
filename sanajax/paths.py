"""What a path argument may be: a folder of this machine (local, or a mount every host sees), never a URL.

    if problem := url_path_problem(path):      # "is a URL: ... mount the bucket ..."
      raise UserError(f"--workdir={path} {problem}.")
"""
from __future__ import annotations

import re
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def url_path_problem(path: Any) -> str | None:
  """Why `path` cannot be a sanajax workdir or data folder, when it is a URL (gs://, s3://, ...), else None.

  Workdirs are plain files (config.json, metrics.jsonl appended each log step, the lock, sample PNGs) written
  through the file system, which would turn gs://b/x into a local folder gs:/b/x without a word."""
  if isinstance(path, str) and _URL.match(path):
    return ("is a URL: sanajax reads and writes its folders through the file system; mount the bucket (e.g. "
            "gcsfuse, /gcs/BUCKET/...) or use a shared file system, and give that path")
  return None
