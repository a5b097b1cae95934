"""Atomic output directories: a run's results appear whole or not at all.

Everything is written into a temporary directory beside the target
(``.<name>.tmp-<pid>``) and renamed into place only when complete, so an
interrupted or failed run leaves nothing that looks like a result. An existing
target is refused unless ``overwrite`` is set; then it is replaced only after
the new one is complete. The files and directories of the result get the permissions the user's umask gives a
newly created file (0644 and 0755 under umask 022), whatever mode the library that wrote them chose (safetensors
writes through a 0600 temporary file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_target(target: str | os.PathLike, overwrite: bool, protected: list[str | os.PathLike] = (),
                 overwrite_hint: str = "set output.overwrite=true", name: str = "output.dir",
                 probe_replace: bool = True) -> Path:
    """Validate an output directory before any work starts; returns it resolved.

    ``protected`` are inputs (checkpoint, data) the output must not be, contain or lie inside (``~`` is expanded
    in every path). The messages say how to replace an existing target (``overwrite_hint``) and what to choose
    again (``name``): the config's keys unless the caller's user sets them otherwise. ``probe_replace``: an
    existing target (with ``overwrite``) is renamed and renamed back, so that one the final rename cannot move
    (immutable, a mount point) is refused now; one process of a run probes, the others check the rest.
    """
    out = Path(target).expanduser().resolve()
    for p in protected:  # first: overwriting would not help
        q = Path(p).expanduser().resolve()
        if out == q or q.is_relative_to(out) or out.is_relative_to(q):
            raise ValueError(f"output directory {out} overlaps the input {q}; choose another {name}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists ({overwrite_hint} to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and probe_replace:  # replaced at the end by renames: one that would fail fails now
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        try:
            os.rename(out, probe)
        except OSError as e:
            raise PermissionError(f"cannot replace the output directory {out}: {e.strerror}") from None
        os.rename(probe, out)
    # The temporary directory is created beside the target: probe its nearest existing ancestor now (by making
    # and removing a directory, which also catches what permission bits do not: read-only mounts, /proc, root)
    # rather than after hours of pruning.
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write the output directory {out}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError:
        raise PermissionError(f"cannot write the output directory {out}: {parent} is not writable") from None
    return out


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` on success.

    On an exception the temporary directory is removed and ``target`` is left
    exactly as it was.
    """
    out = check_target(target, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}" if out.exists() else None
    try:
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot move the finished output into {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (read from /proc where the kernel reports it, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a new file or directory gets under the umask:
    ``0o666 & ~umask`` for files (``0o777 & ~umask`` for files with an execute bit), ``0o777 & ~umask`` for
    directories. Symbolic links are left alone."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666
        path.chmod(full & ~mask)


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Delete temporary directories that killed runs left beside ``target``."""
    out = Path(target).expanduser().resolve()
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
