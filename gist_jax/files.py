"""Writing files so that a reader or a crash never sees half of one: a text file through
a temporary sibling and a rename, a directory built aside and renamed into place (the
old one set aside first), with the modes the process umask gives ordinary files.

Every writer of results, exports, checkpoints' side files and gist stores goes through
here.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename, so that
    a reader (or a crash) never sees a half-written file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling directory that is renamed to ``out_dir`` on success and
    removed on failure, so ``out_dir`` either does not exist or is complete."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"{out.parent} is not writable")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out)


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would
    have given them under the process umask (0755 / 0644 for umask 0022). ``mkdtemp``
    makes 0700 directories and safetensors writes 0600 files, which would leave an export
    unreadable to the other users a model directory is usually shared with."""
    umask = os.umask(0)
    os.umask(umask)
    root = pathlib.Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def replace_directory(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory ``new`` to ``out``, replacing an existing ``out``.

    A crash at any moment leaves ``out`` absent, the old complete directory or the new
    complete one, never a half-deleted one: the old directory is renamed aside (a hidden
    sibling) before the new one takes its name, and only then deleted.
    """
    new, out = pathlib.Path(new), pathlib.Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
