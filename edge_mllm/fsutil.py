"""Output folders that lose nothing: checked before any work, written into a temporary sibling, then
renamed into place; and the file digests bundles list."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_mllm.errors import OutputError

# Whether an existing folder is an earlier output of the same kind, which a new one may replace.
Replaceable = Callable[[Path], bool]


def sha256(path: Path) -> str:
    """The file's sha256, hex (what bundle manifests list)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(path: str | Path, replaceable: Replaceable | None = None, inputs: Iterable[str | Path] = ()
                     ) -> Path:
    """``path`` as an absolute folder path, or an :class:`OutputError` saying why nothing may be
    written there: it is a file or a symlink, has no name (``/``), is or holds one of ``inputs``, its
    parent cannot be written, or it is a folder with files in it that is not an
    earlier output ``replaceable`` recognises (a user's folder is never deleted)."""
    given = path
    path = Path(os.path.abspath(path))
    if not path.name:
        raise OutputError(f"output folder {given}: not a folder name")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"output folder {given} exists and is not a folder")
    for source in inputs:
        source = Path(os.path.abspath(source))
        if path == source or path in source.parents:  # replacing it would delete the input
            raise OutputError(f"output folder {given} would overwrite the input {source}: choose another folder")
    if path.is_dir() and any(path.iterdir()) and not (replaceable and replaceable(path)):
        raise OutputError(f"output folder {given} holds other files; edge-mllm replaces only its own earlier "
                          "output of this kind: choose a new or empty folder")
    writable = path.parent if path.exists() else next(p for p in path.parents if p.exists())
    if not writable.is_dir() or not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {given}: cannot write in {writable}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(path: str | Path, replaceable: Replaceable | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on any error nothing is left.
    ``path`` is checked first (:func:`check_output_dir`): an existing folder is replaced only if it is
    empty or ``replaceable`` recognises it."""
    given, path = path, check_output_dir(path, replaceable)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"output folder {given}: cannot write there ({exc.strerror})") from exc
    try:
        yield tmp
        # mkdtemp's folder is private (0700): give the output the modes the user's umask gives
        mask = _umask()
        for folder, _, files in os.walk(tmp):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
        if path.exists():
            old = tmp.with_name(f"{tmp.name}.old")  # unique, as tmp is
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
