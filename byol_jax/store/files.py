"""Every user path is a URL: local paths and `gs://bucket/...` through one filesystem layer.

All reads and writes of byol_jax's files (config.json, metrics, manifests, results,
exports, sweep tables, plots, previews, `--pretrained=` inputs) go through this module,
which is built on `etils.epath` (what orbax and tfds use). No other module calls
`open`/`os.path`/`os.replace` on a user path.

One gs:// client, the tested one: epath would route `gs://` through `tf.io.gfile` whenever
TensorFlow is installed (it always is here), a client the tests cannot point at their
emulator.
Importing this module sets EPATH_USE_TF=false for the process (and the processes it
starts), so epath, and orbax's checkpoint files through it, use fsspec/gcsfs (a runtime
dependency), which tests run against a GCS emulator. epath reads the variable whenever it
resolves a path's backend; every byol_jax entry point imports this module before it makes a
path. (Orbax writes the arrays through TensorStore's own GCS client; TensorBoard events
are written in memory and uploaded through this module.) gcsfs finds credentials as
Google's libraries do (application default credentials, the VM's metadata server), and
honours STORAGE_EMULATOR_HOST, which the tests set to their emulator.

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

# Before any path is made: see the module docstring. Set, not defaulted: a gs:// job must
# not depend on an inherited variable to use the client its tests prove. The second one
# (read when gcsfs is imported, at the first gs:// path) keeps gcsfs's plain GCS client:
# its experimental zonal/hierarchical-bucket layer would add a control-plane call per bucket
# on a code path the emulator cannot exercise.
os.environ["EPATH_USE_TF"] = "false"
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

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


# Parts of an appended file on an object store (see `AppendFile`): each part holds at most
# PART_LINES lines and PART_BYTES bytes (a single larger append gets a part of its own).
PARTS_SUFFIX = ".d"
PART_LINES = 100
PART_BYTES = 64 << 10


def parts_dir(url: PathLike) -> str:
  """The folder of `url`'s parts: 'gs://b/run/metrics.jsonl' -> '.../metrics.jsonl.d'."""
  return check_url(url) + PARTS_SUFFIX


def _part_names(url: PathLike) -> list[tuple[int, str]]:
  """(number, name) of `url`'s parts in order; other names in the folder are ignored."""
  extension = os.path.splitext(os.fspath(url))[1]
  found = []
  for name in listdir(parts_dir(url)):
    number, ext = os.path.splitext(name)
    if ext == extension and number.isdigit():  # Not a local write's temporary file.
      found.append((int(number), name))
  return sorted(found)


def appends_to_parts(url: PathLike) -> bool:
  """Whether `AppendFile(url)` writes numbered parts (an object store, or a folder of parts
  already there) rather than appending to `url` itself (a local file)."""
  return not is_local(url) or is_dir(parts_dir(url))


def read_appended(url: PathLike) -> str:
  """Everything appended to `url` through `AppendFile`, in order: the file itself (a local
  one, or one written whole before parts existed), then its parts by number."""
  texts = [read_text(url)] if is_file(url) else []
  texts += [read_text(join(parts_dir(url), name)) for _, name in _part_names(url)]
  return "".join(texts)


class AppendFile:
  """A text file that grows by whole lines (metrics), locally or in a bucket, at a cost per
  append that does not grow with the file.

  A local file is opened in append mode and flushed after every `append`. An object store
  cannot append, so there the lines go to numbered parts in the folder `parts_dir(url)`
  (`metrics.jsonl.d/000000.jsonl`, ...): each `append` uploads the current part whole, and a
  part full (PART_LINES lines or PART_BYTES bytes) is never written again: the next append
  starts the next part. Opening an AppendFile whose parts exist (a resumed run) starts a
  new part after the last one, so nothing written earlier is rewritten. Locally, once a
  folder of parts exists (a workdir copied from a bucket), parts are written there too, so
  the file itself always holds the oldest lines. `read_appended` reads both back as one.
  """

  def __init__(self, url: PathLike):
    self._url = check_url(url)
    self._local = None
    self._part = self._lines = None
    self._text = ""
    if appends_to_parts(url):
      names = _part_names(url)
      self._part = names[-1][0] + 1 if names else 0
      self._lines = 0
    else:
      os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
      self._local = open(url, "a")

  def append(self, text: str) -> None:
    """Appends `text` (whole lines: it ends with a newline)."""
    if not text.endswith("\n"):
      raise ValueError(f"AppendFile takes whole lines; {text[-40:]!r} does not end with one.")
    if self._local is not None:
      self._local.write(text)
      self._local.flush()
      return
    if self._lines and (self._lines >= PART_LINES or
                        len((self._text + text).encode("utf-8")) > PART_BYTES):
      self._part, self._lines, self._text = self._part + 1, 0, ""
    self._text += text
    self._lines += text.count("\n")
    extension = os.path.splitext(self._url)[1]
    write_text_atomic(join(parts_dir(self._url), f"{self._part:06d}{extension}"), self._text)

  def close(self) -> None:
    if self._local is not None:
      self._local.close()
      self._local = None
