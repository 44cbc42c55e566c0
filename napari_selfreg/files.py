"""Writing files so that nothing of the user's is lost or left half-written.

* :func:`temporary_path` - a short hidden name beside the target that carries the
  writer's PID, so a target name of any allowed length still fits, and
  :func:`clear_stale` can later remove what a killed process left behind (once it
  has not changed for ten minutes: another host's PIDs are not ours to check);
* :func:`publish` - move a finished temporary file into place atomically, without
  replacing a file that appeared meanwhile (unless told to);
* :func:`follow_umask` - files get the mode the user's umask gives new files
  (``mkstemp`` makes them 0600);
* :func:`write_text_atomic`, :func:`write_json_atomic` - small files through a
  temporary file and a rename;
* :class:`RunLock` - one process at a time writes a run folder; the lock of a dead
  process is taken over;
* :func:`full_disk_named` - a write that failed on a full disk says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path

PREFIX = ".selfreg-"
_HELD: set[Path] = set()  # run locks this process holds (a second run in it is refused too)
STALE_AFTER_S = 600.0  # a dead writer's temporary is removed once it is this old
_STALE = re.compile(r"^\.selfreg-[a-z]+-(\d+)-[0-9a-f]{6}")


def temporary_path(target: str | os.PathLike, kind: str = "tmp", keep_suffix: bool = True) -> Path:
    """``.selfreg-<kind>-<pid>-<random>[suffix]`` in ``target``'s folder (at most ~45 chars).

    ``keep_suffix`` keeps ``.nii.gz`` / ``.nii`` (writers pick the format from it).
    """
    target = Path(target)
    name = target.name.lower()
    suffix = ""
    if keep_suffix:
        suffix = ".nii.gz" if name.endswith(".nii.gz") else "".join(target.suffixes[-1:])
    return target.parent / f"{PREFIX}{kind}-{os.getpid()}-{secrets.token_hex(3)}{suffix}"


def pid_alive(pid: int) -> bool:
    """True if a process with this PID runs (or runs under another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(folder: str | os.PathLike, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries in ``folder`` left by processes that no longer run.

    A PID names a process only on this machine (and in this container), so a temporary
    is also left alone until it has not changed for ``min_age_s``: another host writing
    to a shared folder keeps its file fresh while it writes.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        match = _STALE.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if now - entry.stat().st_mtime < min_age_s:
                continue
        except OSError:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode new files get under the user's umask."""
    with contextlib.suppress(OSError):
        os.chmod(path, default_mode(Path(path).is_dir()))


def publish(tmp: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> None:
    """Move the finished file ``tmp`` to ``target`` atomically.

    Without ``overwrite`` an existing ``target`` (one that appeared while ``tmp`` was
    written, say by a second run) is never replaced: :class:`FileExistsError`.
    """
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if target exists, atomically
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise FileExistsError(
                errno.EEXIST,
                "exists (another run wrote it meanwhile); it is not replaced",
                str(target),
            ) from err
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(target):  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists; it is not replaced", str(target)) from err
        os.rename(tmp, target)
        return
    os.unlink(tmp)


class RunLock:
    """An exclusive lock on a run folder: the file ``.lock`` holding the owner's PID.

    Args:
        folder: the folder one process at a time may write (created if needed).
        what: how to name the owner in the refusal, e.g. ``"training run"``.

    Raises (on enter):
        RunLockedError: a live process holds the lock.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.what = what
        self.held = False

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                ours = owner == os.getpid() and self.path.resolve() in _HELD
                if ours or (owner is not None and owner != os.getpid() and pid_alive(owner)):
                    raise RunLockedError(
                        f"another {self.what} (process {owner}) is writing {self.folder}; "
                        "wait for it to finish or choose another output"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # the owner died: take the lock over
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            _HELD.add(self.path.resolve())
            return self
        raise RunLockedError(f"could not lock {self.folder}; try again")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held and self._owner() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.held:
            _HELD.discard(self.path.resolve())
        self.held = False


class RunLockedError(ValueError):
    """Another live process writes the same run folder (one sentence)."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(path: str | Path, data) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    import json

    return write_text_atomic(path, json.dumps(data, indent=2))


@contextlib.contextmanager
def full_disk_named(folder: str | os.PathLike, room: int = 16 * 2**20):
    """Turn a failed write into ``OSError(ENOSPC)`` naming ``folder`` when the disk there
    has under ``room`` bytes left: torch's writers raise RuntimeError on a full disk
    ("unexpected pos ..."), zip writers a short-write error that does not say why."""
    try:
        yield
    except (RuntimeError, OSError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            raise err from None
        if free >= room:
            raise
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free)", str(folder)) from err  # fmt: skip
