"""Tests of the downloader against a local HTTP server on 127.0.0.1."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest
import scipy.io.wavfile

from g2d_jax import errors
from g2d_jax.data import download
from g2d_jax.data import mnist
from tests.conftest import DATA_DIR


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, as real file hosts offer
  # Headers and body go out in separate writes; without TCP_NODELAY each
  # response waits ~40 ms for a delayed ACK.
  disable_nagle_algorithm = True

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def serve(directory):
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


def _visible(path):
  return sorted(n for n in os.listdir(path)) if os.path.isdir(path) else []


def test_downloads_real_files_and_verifies(tmp_path):
  dest = tmp_path / "data"
  with serve(DATA_DIR) as url:
    rc = download.main(["--dest", str(dest),
                        "--mnist_url_base", url + "/mnist/",
                        "--fsdd_url_base", url + "/fsdd/recordings/"])
  assert rc == 0
  assert _visible(dest) == ["fsdd", "mnist"]
  for stem, (_, _, size, md5) in mnist.FILES.items():
    raw = gzip.decompress((dest / "mnist" / (stem + ".gz")).read_bytes())
    assert len(raw) == size and hashlib.md5(raw).hexdigest() == md5
  names = sorted(os.listdir(dest / "fsdd" / "recordings"))
  assert names == download.fsdd_names() and len(names) == 3000
  h = hashlib.sha256()
  for n in names:
    h.update((dest / "fsdd" / "recordings" / n).read_bytes())
  assert h.hexdigest() == download.FSDD_SHA256
  # A second run finds verified data and needs no server at all.
  assert download.main(["--dest", str(dest), "--mnist_url_base",
                        "http://127.0.0.1:9/", "--fsdd_url_base",
                        "http://127.0.0.1:9/"]) == 0


def test_mnist_bad_checksum_leaves_nothing(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  for stem in mnist.FILES:
    os.symlink(os.path.join(DATA_DIR, "mnist", stem + ".gz"),
               served / (stem + ".gz"))
  os.remove(served / "t10k-labels-idx1-ubyte.gz")
  raw = gzip.decompress(open(os.path.join(
      DATA_DIR, "mnist", "t10k-labels-idx1-ubyte.gz"), "rb").read())
  corrupt = raw[:-1] + bytes([(raw[-1] + 1) % 256])
  (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(corrupt))
  dest = tmp_path / "dest"
  with serve(served) as url:
    with pytest.raises(errors.DataError) as e:
      download.download_mnist(str(dest), (url,))
  msg = str(e.value)
  assert "t10k-labels-idx1-ubyte failed its checksum" in msg
  assert ("expected 10,008 bytes with MD5 27ae3e4e09519cfbb04c329615203637"
          in msg)
  assert _visible(dest) == []


def test_fsdd_bad_checksum_leaves_nothing(tmp_path):
  served = tmp_path / "rec"
  served.mkdir()
  for n in download.fsdd_names():
    (served / n).write_bytes(n.encode())
  dest = tmp_path / "dest"
  with serve(served) as url:
    rc = download.main(["--dest", str(dest), "--what", "fsdd",
                        "--fsdd_url_base", url])
  assert rc == 1
  assert _visible(dest) == []


def test_http_error_names_url(tmp_path):
  with serve(tmp_path) as url:
    with pytest.raises(errors.DataError, match=r"download of .*/x.wav failed:"
                       " HTTP 404"):
      download.fetch(url + "/x.wav")
    with pytest.raises(errors.DataError, match=r"download of .*/y.wav failed:"
                       " HTTP 404"):
      download.KeepAliveFetcher().get(url + "/y.wav")
    (tmp_path / "z").write_bytes(b"zz")
    fetcher = download.KeepAliveFetcher()
    assert [fetcher.get(url + "/z") for _ in range(3)] == [b"zz"] * 3


def test_existing_invalid_folder_needs_force(tmp_path):
  dest = tmp_path / "dest"
  (dest / "mnist").mkdir(parents=True)
  (dest / "mnist" / "junk").write_text("x")
  with serve(DATA_DIR) as url:
    with pytest.raises(errors.DataError, match="exists but is incomplete or"
                       " corrupt: delete it or pass --force"):
      download.download_mnist(str(dest), (url + "/mnist",))
    download.download_mnist(str(dest), (url + "/mnist",), force=True)
  assert sorted(os.listdir(dest / "mnist")) == sorted(
      s + ".gz" for s in mnist.FILES)


def test_extract_noise_from_archive(tmp_path):
  archive = tmp_path / "sc.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for name in download.audio.NOISE_FILES + ("README",):
      buf = io.BytesIO()
      scipy.io.wavfile.write(buf, 16000, np.zeros(100, np.int16))
      data = buf.getvalue()
      suffix = ".md" if name == "README" else ".wav"
      info = tarfile.TarInfo(f"./_background_noise_/{name}{suffix}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo("./yes/0a7c2a8d_nohash_0.wav")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  out = download.extract_noise(str(tmp_path / "dest"), str(archive))
  assert sorted(os.listdir(out)) == sorted(
      n + ".wav" for n in download.audio.NOISE_FILES)


def test_bad_what_exit_code(tmp_path, capsys):
  assert download.main(["--dest", str(tmp_path), "--what", "esc50"]) == 1
  assert "unknown entries ['esc50']" in capsys.readouterr().err
