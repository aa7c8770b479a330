"""Every user path is a URL: local paths and `gs://bucket/...` through one filesystem layer.

All reads and writes of byol_jax's files (config.json, metrics.jsonl, manifests, results,
exports, sweep tables, plots, previews, `--pretrained=` inputs) go through this module,
which is built on `etils.epath` (what orbax and tfds use; `gs://` goes through
`tf.io.gfile`, or through fsspec/gcsfs when EPATH_USE_TF=false). No other module calls
`open`/`os.path`/`os.replace` on a user path.

A URL whose scheme no backend handles is refused with a ValueError naming it; it never
falls back to a local folder named after the scheme (`./gs:/...`).

Atomic writes: on a local filesystem `write_bytes_atomic` writes a temporary sibling,
fsyncs it and renames it over the target, so a reader or a crash sees the old file or the
new one. On an object store (gs://) one upload creates an object whole or not at all, so
the object is written directly: readers never see half an object either, but there is
no rename, and a crash mid-upload leaves the previous version.
"""
import hashlib
import json
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike
# URL schemes a workdir may use: orbax writes checkpoints to local paths and gs:// only.
SCHEMES = ("gs",)


def scheme(url: PathLike) -> str | None:
  """'gs' for 'gs://b/x', None for a local path."""
  text = os.fspath(url)
  head, sep, _ = text.partition("://")
  return head if sep and "/" not in head else None


def is_local(url: PathLike) -> bool:
  """True for a path on the local filesystem (no URL scheme)."""
  return scheme(url) is None


def as_path(url: PathLike) -> epath.Path:
  """`url` as an epath.Path; raises ValueError unless it is local or its scheme in SCHEMES.

  Raises:
    ValueError: another scheme (named, with the supported ones).
  """
  kind = scheme(url)
  if kind is not None and kind not in SCHEMES:
    raise ValueError(
        f"{os.fspath(url)}: the scheme '{kind}://' is not supported (byol_jax reads and "
        f"writes local paths and {', '.join(s + '://' for s in SCHEMES)} URLs); use one of those.")
  return epath.Path(url)


def check_url(url: PathLike) -> str:
  """Validates `url` (see `as_path`) and returns it as a string, unchanged."""
  as_path(url)
  return os.fspath(url)


def absolute(url: PathLike) -> str:
  """A local path made absolute (orbax refuses relative ones); a URL unchanged."""
  return os.path.abspath(url) if is_local(url) else check_url(url)


def join(url: PathLike, *parts: str) -> str:
  """URL-aware `os.path.join`: join('gs://b/run', 'x') == 'gs://b/run/x'."""
  return os.fspath(as_path(url).joinpath(*parts))


def parent(url: PathLike) -> str:
  return os.fspath(as_path(url).parent)


def exists(url: PathLike) -> bool:
  return as_path(url).exists()


def is_dir(url: PathLike) -> bool:
  return as_path(url).is_dir()


def is_file(url: PathLike) -> bool:
  path = as_path(url)
  return path.exists() and not path.is_dir()


def listdir(url: PathLike) -> list[str]:
  """Names (not paths) of the entries of a directory, sorted; [] if it does not exist."""
  path = as_path(url)
  if not path.is_dir():
    return []
  return sorted(child.name for child in path.iterdir())


def files_under(url: PathLike) -> list[str]:
  """Relative '/'-separated paths of every file below a directory, sorted."""
  # By iterdir, not walk: epath's fsspec backend walks with paths stripped of 'gs://'.
  found = []

  def visit(path: epath.Path, prefix: str) -> None:
    for child in path.iterdir():
      if child.is_dir():
        visit(child, f"{prefix}{child.name}/")
      else:
        found.append(prefix + child.name)

  visit(as_path(url), "")
  return sorted(found)


def sha256(url: PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 8 MiB chunks."""
  digest = hashlib.sha256()
  with as_path(url).open("rb") as f:
    for chunk in iter(lambda: f.read(8 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def makedirs(url: PathLike) -> None:
  as_path(url).mkdir(parents=True, exist_ok=True)


def read_bytes(url: PathLike) -> bytes:
  return as_path(url).read_bytes()


def read_text(url: PathLike) -> str:
  return as_path(url).read_text()


def read_json(url: PathLike) -> Any:
  return json.loads(read_text(url))


def size(url: PathLike) -> int:
  return as_path(url).stat().length


def remove(url: PathLike) -> None:
  """Removes a file, or a directory with everything under it; nothing if missing."""
  path = as_path(url)
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves src to dst (a directory moves whole; on an object store, copy + delete)."""
  as_path(src).rename(as_path(dst))


def write_bytes_atomic(url: PathLike, data: bytes) -> None:
  """Writes `data` to `url`, whole or not at all (see the module docstring).

  Locally: url.tmp-<pid>, fsynced, renamed over `url`; the parent directory is created.
  """
  if not is_local(url):
    path = as_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return
  path = os.fspath(url)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


def write_text_atomic(url: PathLike, text: str) -> None:
  """`text` as UTF-8, written atomically (see `write_bytes_atomic`)."""
  write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: PathLike, obj: Any) -> None:
  """`obj` as indented, key-sorted JSON, written atomically (see `write_text_atomic`)."""
  write_text_atomic(url, json.dumps(obj, indent=1, sort_keys=True))


class AppendFile:
  """A text file that grows by whole lines (metrics.jsonl), locally or in a bucket.

  Locally the file is opened in append mode and flushed after every `append`. An object
  store cannot append, so there the text so far (what the file held when opened, plus every
  append) is kept and the whole object rewritten on each `append`: a reader sees the file
  as of the last complete `append`.
  """

  def __init__(self, url: PathLike):
    self._url = check_url(url)
    self._local = None
    self._text = None
    if is_local(url):
      os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
      self._local = open(url, "a")
    else:
      self._text = read_text(url) if exists(url) else ""

  def append(self, text: str) -> None:
    if self._local is not None:
      self._local.write(text)
      self._local.flush()
    else:
      self._text += text
      write_text_atomic(self._url, self._text)

  def close(self) -> None:
    if self._local is not None:
      self._local.close()
      self._local = None
