r"""Downloads MNIST and FSDD from their public homes and verifies checksums.

  python -m g2d_jax.data.download [--dest DIR] [--what mnist,fsdd]

writes DIR/mnist/*.gz and DIR/fsdd/recordings/*.wav, the layout that
`G2D_DATA_DIR=DIR` expects (DIR defaults to ~/.local/share/g2d_jax, where
the pipeline looks when G2D_DATA_DIR is unset). Each dataset is fetched
into a temp directory and renamed into place only after its checksums pass
(MNIST: MD5 of each file's uncompressed content; FSDD: sha256 of all 3,000
recordings concatenated in sorted name order), so a failed or interrupted
download leaves nothing that looks valid.

The Speech Commands background noise (needed by AV-MNIST) cannot sensibly be
fetched alone: it only ships inside the 2.3 GB Speech Commands v0.02 archive.
Download that archive yourself (SPEECH_COMMANDS_URL) and pass
`--speech_commands_archive PATH` to extract the six `_background_noise_` WAVs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request

from absl import logging

from g2d_jax import artifacts
from g2d_jax import errors
from g2d_jax.data import audio
from g2d_jax.data import base
from g2d_jax.data import media
from g2d_jax.data import mnist
from g2d_jax.progress import Progress

MNIST_URL_BASES = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FSDD_URL_BASE = ("https://raw.githubusercontent.com/Jakobovski/"
                 "free-spoken-digit-dataset/master/recordings/")
FSDD_SHA256 = "ddb17656a0bca4c5ddace082be188ca630516dc2ef1110afe3c4e9cc71173de4"
FSDD_TAKES = 50
SPEECH_COMMANDS_URL = (
    "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz")


def fsdd_names() -> list[str]:
  """The 3,000 FSDD file names, sorted (10 digits x 6 speakers x 50 takes)."""
  return sorted(f"{d}_{s}_{t}.wav" for d in range(10)
                for s in audio.FSDD_SPEAKERS for t in range(FSDD_TAKES))


def fetch(url: str, timeout: float = 60.0) -> bytes:
  """GETs `url`; DataError naming the URL on any network or HTTP failure."""
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    raise errors.DataError(
        f"download of {url} failed: HTTP {e.code} {e.reason}; check the URL"
        " base (--mnist_url_base / --fsdd_url_base)") from None
  except (urllib.error.URLError, OSError) as e:
    raise errors.DataError(
        f"download of {url} failed ({getattr(e, 'reason', e)}); check the"
        " network connection or pass another URL base") from None


class KeepAliveFetcher:
  """GETs over one persistent HTTP(S) connection per thread and host.

  3,000 small FSDD files cost 3,000 TCP/TLS handshakes with plain urllib;
  reusing connections makes the download several times faster.
  """

  def __init__(self, timeout: float = 60.0):
    self._local = threading.local()
    self._timeout = timeout

  def get(self, url: str) -> bytes:
    """Returns the body of `url`; DataError naming the URL on failure."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
      return fetch(url, self._timeout)
    conns = self._local.__dict__.setdefault("conns", {})
    key = (parts.scheme, parts.netloc)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    for attempt in range(2):
      conn = conns.get(key)
      if conn is None:
        cls = (http.client.HTTPSConnection if parts.scheme == "https"
               else http.client.HTTPConnection)
        conn = conns[key] = cls(parts.netloc, timeout=self._timeout)
      try:
        conn.request("GET", path, headers={"User-Agent": "g2d_jax-download"})
        resp = conn.getresponse()
        body = resp.read()
      except (http.client.HTTPException, OSError) as e:
        conn.close()
        del conns[key]
        if attempt == 0:
          continue  # The server may have closed an idle connection: retry.
        raise errors.DataError(
            f"download of {url} failed ({e}); check the network connection"
            " or pass another URL base") from None
      if resp.will_close:
        conn.close()
        del conns[key]
      if resp.status in (301, 302, 303, 307, 308):
        return fetch(urllib.parse.urljoin(url, resp.getheader("Location", "")),
                     self._timeout)
      if resp.status != 200:
        raise errors.DataError(
            f"download of {url} failed: HTTP {resp.status} {resp.reason};"
            " check the URL base (--mnist_url_base / --fsdd_url_base)")
      return body
    raise AssertionError("unreachable")


def _join(base_url: str, name: str) -> str:
  return base_url if base_url.endswith(name) else (
      base_url.rstrip("/") + "/" + name)


def check_mnist_file(stem: str, data: bytes) -> bytes:
  """Returns uncompressed bytes of an MNIST file after checking its MD5.

  Raises:
    DataError: not decompressible, wrong length or wrong MD5.
  """
  _, _, size, md5 = mnist.FILES[stem]
  if data[:2] == b"\x1f\x8b":
    raw, complete, err = mnist.gunzip(data)
    if not complete:
      raise errors.DataError(
          f"{stem}.gz is {'corrupt (' + err + ')' if err else 'truncated'};"
          " download it again")
  else:
    raw = data
  if len(raw) != size or hashlib.md5(raw).hexdigest() != md5:
    raise errors.DataError(
        f"{stem} failed its checksum: {len(raw):,} bytes with MD5"
        f" {hashlib.md5(raw).hexdigest()}, expected {size:,} bytes with MD5"
        f" {md5}; the mirror served a different file, try another"
        " --mnist_url_base")
  return raw


def _existing_ok(path: str, check) -> bool:
  """Whether `path` exists and passes `check` (DataError -> False)."""
  if not os.path.exists(path):
    return False
  try:
    check()
  except errors.DataError as e:
    logging.warning("%s", e)
    return False
  return True


def _verify_mnist_dir(mnist_dir: str) -> None:
  for stem in mnist.FILES:
    path = mnist.find_file(mnist_dir, stem)
    if not os.path.exists(path):
      raise errors.DataError(f"{path} is missing")
    with open(path, "rb") as f:
      check_mnist_file(stem, f.read())


def _refuse_invalid(final_dir: str, force: bool) -> None:
  """Fails early if an invalid `final_dir` exists and --force is not given."""
  if os.path.exists(final_dir) and not force:
    raise errors.DataError(
        f"{final_dir} exists but is incomplete or corrupt: delete it or"
        " pass --force to replace it")


def download_mnist(dest: str, url_bases: tuple[str, ...] = MNIST_URL_BASES,
                   force: bool = False) -> str:
  """Fetches the four MNIST IDX files into DEST/mnist; returns that path.

  Each file is tried on each URL base in turn. Nothing is written to
  DEST/mnist unless all four pass their MD5.
  """
  final = os.path.join(os.path.abspath(dest), "mnist")
  if _existing_ok(final, lambda: _verify_mnist_dir(final)):
    logging.info("%s already holds verified MNIST files.", final)
    return final
  _refuse_invalid(final, force)
  # Renamed into place only once every file passed (replacing an invalid
  # folder only with --force, checked above).
  with artifacts.atomic_directory(final, replace=True) as tmp:
    for stem in mnist.FILES:
      failures = []
      for base_url in url_bases:
        url = _join(base_url, stem + ".gz")
        try:
          data = fetch(url)
          check_mnist_file(stem, data)
          break
        except errors.DataError as e:
          failures.append(str(e))
          logging.warning("%s", e)
      else:
        raise errors.DataError(
            f"could not get a valid {stem}.gz from any of {list(url_bases)}:"
            f" {' | '.join(failures)}; nothing was written to {final}")
      if data[:2] != b"\x1f\x8b":
        data = gzip.compress(data)
      with open(os.path.join(tmp, stem + ".gz"), "wb") as f:
        f.write(data)
      logging.info("MNIST: %s.gz verified (%s)", stem, url)
  return final


def fsdd_checksum(recordings_dir: str, names: list[str]) -> str:
  """sha256 of the named files concatenated in sorted name order."""
  return artifacts.sha256_files(
      [os.path.join(recordings_dir, n) for n in sorted(names)])


def _verify_fsdd_dir(fsdd_dir: str) -> None:
  rec = os.path.join(fsdd_dir, "recordings")
  names = sorted(os.listdir(rec)) if os.path.isdir(rec) else []
  if names != fsdd_names():
    raise errors.DataError(
        f"{rec} holds {len(names)} files, expected the 3,000 FSDD recordings")
  got = fsdd_checksum(rec, names)
  if got != FSDD_SHA256:
    raise errors.DataError(f"{rec} fails the FSDD checksum ({got})")


def download_fsdd(dest: str, url_base: str = FSDD_URL_BASE,
                  force: bool = False, workers: int = 8,
                  expected_sha256: str = FSDD_SHA256) -> str:
  """Fetches the 3,000 FSDD recordings into DEST/fsdd/recordings.

  Returns the DEST/fsdd path. Nothing is written there unless the combined
  sha256 matches.
  """
  final = os.path.join(os.path.abspath(dest), "fsdd")
  if _existing_ok(final, lambda: _verify_fsdd_dir(final)):
    logging.info("%s already holds verified FSDD recordings.", final)
    return final
  _refuse_invalid(final, force)
  names = fsdd_names()
  fetcher = KeepAliveFetcher()
  with artifacts.atomic_directory(final, replace=True) as tmp:
    rec_dir = os.path.join(tmp, "recordings")
    os.makedirs(rec_dir)

    def get(name):
      data = fetcher.get(_join(url_base, name))
      with open(os.path.join(rec_dir, name), "wb") as f:
        f.write(data)

    progress = Progress("FSDD", len(names), unit="recordings", every=500)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      for i, _ in enumerate(pool.map(get, names), 1):
        progress.update(i)
    got = fsdd_checksum(rec_dir, names)
    if got != expected_sha256:
      raise errors.DataError(
          f"FSDD recordings from {url_base} fail the checksum: sha256 {got},"
          f" expected {expected_sha256}; the repository may have changed."
          f" Nothing was written to {final}; try again or pin --fsdd_url_base"
          " to the release that matches")
  return final


def extract_noise(dest: str, archive: str, force: bool = False) -> str:
  """Extracts Speech Commands' `_background_noise_/*.wav` from its tarball.

  Returns DEST/speech_commands_noise.
  """
  final = os.path.join(os.path.abspath(dest), "speech_commands_noise")
  if not force and os.path.isdir(final) and all(
      os.path.exists(os.path.join(final, n + ".wav"))
      for n in audio.NOISE_FILES):
    logging.info("%s already holds the noise files.", final)
    return final
  _refuse_invalid(final, force)
  if not os.path.exists(archive):
    raise errors.DataError(
        f"{archive} does not exist; download {SPEECH_COMMANDS_URL} first")
  with artifacts.atomic_directory(final, replace=True) as tmp:
    found = []
    with tarfile.open(archive, "r:*") as tar:
      for member in tar:
        parts = os.path.normpath(member.name).split(os.sep)
        if (member.isfile() and len(parts) >= 2
            and parts[-2] == "_background_noise_"
            and parts[-1].endswith(".wav")):
          src = tar.extractfile(member)
          with open(os.path.join(tmp, parts[-1]), "wb") as f:
            shutil.copyfileobj(src, f)
          found.append(parts[-1][:-4])
    missing = sorted(set(audio.NOISE_FILES) - set(found))
    if missing:
      raise errors.DataError(
          f"{archive} lacks _background_noise_/{missing}.wav; is it the"
          f" Speech Commands v0.02 archive ({SPEECH_COMMANDS_URL})?")
    for name in found:
      media.read_wav(os.path.join(tmp, name + ".wav"))
  return final


def main(argv: list[str] | None = None) -> int:
  """Command-line entry; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m g2d_jax.data.download", description=__doc__.split(
          "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dest", default=base.default_data_dir(),
                      help="data directory to fill (default: where the "
                      "pipeline looks when G2D_DATA_DIR is unset, "
                      f"{base.default_data_dir()}; else set G2D_DATA_DIR=DEST)")
  parser.add_argument("--what", default="mnist,fsdd",
                      help="comma list of mnist, fsdd")
  parser.add_argument("--mnist_url_base", action="append", default=None,
                      help="MNIST mirror, tried in order (repeatable);"
                      f" default {', '.join(MNIST_URL_BASES)}")
  parser.add_argument("--fsdd_url_base", default=FSDD_URL_BASE,
                      help="folder URL holding the FSDD recordings")
  parser.add_argument("--speech_commands_archive", default="",
                      help="local speech_commands_v0.02.tar.gz to extract the"
                      " background noise from")
  parser.add_argument("--workers", type=int, default=8,
                      help="parallel FSDD downloads")
  parser.add_argument("--force", action="store_true",
                      help="replace an existing but invalid dataset folder")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  what = {w.strip() for w in args.what.split(",") if w.strip()}
  unknown = what - {"mnist", "fsdd"}
  try:
    if unknown:
      raise errors.ConfigError(
          f"--what has unknown entries {sorted(unknown)}; use mnist and/or"
          " fsdd (noise: --speech_commands_archive)")
    if "mnist" in what:
      download_mnist(args.dest, tuple(args.mnist_url_base or MNIST_URL_BASES),
                     args.force)
    if "fsdd" in what:
      download_fsdd(args.dest, args.fsdd_url_base, args.force, args.workers)
    noise_dir = os.path.join(os.path.abspath(args.dest),
                             "speech_commands_noise")
    if args.speech_commands_archive:
      extract_noise(args.dest, args.speech_commands_archive, args.force)
    elif not os.path.isdir(noise_dir):
      logging.warning(
          "Speech Commands background noise is not downloaded: it only ships"
          " inside the 2.3 GB archive %s. Download it, then rerun with"
          " --speech_commands_archive PATH (or copy its _background_noise_/"
          "*.wav files to %s). AV-MNIST needs it unless"
          " config.data.noise_files=().", SPEECH_COMMANDS_URL, noise_dir)
  except errors.G2DError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
