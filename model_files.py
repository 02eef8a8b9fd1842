"""The model file's safe handling for notebook 01: the course's HDF5 file downloaded whole or not at all and checked,
and a model version written whole into TF Serving's layout (<base>/<version>/) or not at all.

    download_model(url, "models/model.h5", expected_sha256)  # a .part file renamed into place once complete
    with staged_version("models/clothing-model", 1) as staging:  # renamed to models/clothing-model/1 on success
        tf.saved_model.save(module, str(staging), signatures=signatures)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path, expected_sha256=""):
    """Raise ValueError unless `path` is an HDF5 file (and has the expected digest, when one is given)."""
    with open(path, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise ValueError(f"{path} is not an HDF5 file (it starts with {head!r}); delete it and download again")
    digest = sha256_of(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ValueError(f"{path} has SHA-256 {digest}, expected {expected_sha256}; delete it and download again")
    return digest


def download_model(url, dest, expected_sha256="", timeout=30):
    """Download `url` to `dest` with a progress bar, atomically: `dest` exists only if the download is complete."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{url}: the model is downloaded over http or https only")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        size = Path(tmp).stat().st_size
        if total is not None and size != total:
            raise ValueError(f"download of {url} stopped at {size} of {total} bytes; run again to retry")
        digest = check_model_file(tmp, expected_sha256)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"saved {dest} ({size / 2**20:.1f} MiB, sha256 {digest})")
    return dest


@contextlib.contextmanager
def staged_version(base, version):
    """A staging folder beside `<base>/<version>/`, renamed into place when the block ends without an error (an old
    version of that number is replaced), removed when it fails. A model server watching `base` loads only
    integer-named folders, so it never sees a half-written version."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    target = base / str(int(version))
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".staging-{version}-"))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=base, prefix=f".replaced-{version}-"))
            os.replace(target, old / "version")
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
