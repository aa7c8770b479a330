"""Atomic file writes: a reader (or a crash) sees the old file or the whole new one, never a
partial one. Every small JSON/text file byol_jax writes beside its results goes through here."""
import json
import os
from typing import Any


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to path.tmp-<pid>, fsyncs it and renames it over `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
  """`text` as UTF-8, written atomically (see `write_bytes_atomic`)."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
  """`obj` as indented, key-sorted JSON, written atomically (see `write_text_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))
