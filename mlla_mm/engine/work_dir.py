"""What a run keeps in its work dir, kept safe: atomic checkpoint writes, auto-resume, one run at a time.

- :class:`AtomicLocalBackend` (``backend_args=dict(backend=ATOMIC_BACKEND)``)
  writes every checkpoint through :func:`mlla_mm.utils.io.atomic_write`, and
  :func:`with_atomic_marker` does the same for mmengine's ``last_checkpoint``.
- :func:`find_resumable_checkpoint` finds what to auto-resume from, skipping
  damaged files and markers; :func:`remove_stale_temp_files` clears what dead
  runs left.
- :class:`WorkDirLock` keeps a second training run out of a work dir.
- :func:`disk_full_is_one_line` turns a full disk into one line naming the work dir.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import os.path as osp
import re
import socket
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.runner import Runner

from ..errors import UsageError
from ..utils.io import TMP_TAG, AtomicWriteError, atomic_write

#: The file backend name for atomic local writes (``backend_args=dict(backend=ATOMIC_BACKEND)``).
ATOMIC_BACKEND = 'mlla_atomic_local'
_CKPT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing every file with :func:`~mlla_mm.utils.io.atomic_write`.

    A kill or a full disk while a checkpoint is written leaves the previous
    file intact; a failed write raises :class:`~mlla_mm.utils.io.AtomicWriteError`
    naming the file.
    """

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        with atomic_write(str(filepath), 'wb') as f:
            f.write(obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike], encoding: str = 'utf-8') -> None:
        with atomic_write(str(filepath), 'wb') as f:
            f.write(obj.encode(encoding))


register_backend(ATOMIC_BACKEND, AtomicLocalBackend)


# --------------------------------------------------------------------------
# Auto-resume.
# --------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str) -> None:
    """Delete temporary checkpoint files that dead runs left behind.

    A temporary file's name ends with its writer's pid (:func:`mlla_mm.utils.io.temp_name`);
    one whose writer still runs on this host is never removed.
    """
    for path in glob.glob(osp.join(glob.escape(folder), f'.*.pth{TMP_TAG}*')):
        pid = path.rpartition(TMP_TAG)[2]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def _is_readable_checkpoint(path: str) -> bool:
    """A cheap check: a complete torch zip archive (its central directory is written last)."""
    if not path or not osp.isfile(path) or osp.getsize(path) == 0:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith('data.pkl') for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_marker(marker: str) -> str:
    """The path a ``last_checkpoint`` file names (``''`` when it is missing, empty or unreadable)."""
    try:
        with open(marker, 'rb') as f:
            return f.read(4096).decode('utf-8').strip()
    except (OSError, UnicodeDecodeError):
        return ''


def checkpoint_candidates(folders: Sequence[str]) -> List[str]:
    """Every ``epoch_N.pth`` / ``iter_N.pth`` in ``folders``, newest first (by modification time, then N)."""
    found = []
    seen = set()
    for folder in folders:
        if not folder or not osp.isdir(folder) or osp.realpath(folder) in seen:
            continue
        seen.add(osp.realpath(folder))
        for name in os.listdir(folder):
            m = _CKPT_NAME.match(name)
            if m:
                path = osp.join(folder, name)
                try:
                    found.append((os.stat(path).st_mtime_ns, int(m.group(2)), path))
                except OSError:
                    pass
    return [path for _, _, path in sorted(found, reverse=True)]


def find_resumable_checkpoint(work_dir: str, logger: Any = None, folders: Sequence[str] = ()) -> Optional[str]:
    """The checkpoint to auto-resume from, or ``None``.

    ``work_dir/last_checkpoint`` is used when it names a readable checkpoint;
    otherwise (missing, empty, unreadable or dangling) the newest readable
    ``epoch_N.pth`` / ``iter_N.pth`` in ``work_dir`` and ``folders`` (where the
    config's checkpoint hook writes, see :func:`checkpoint_folders`), newest
    by modification time, then by N.
    """
    marker = osp.join(work_dir, 'last_checkpoint')
    named = read_marker(marker)
    if _is_readable_checkpoint(named):
        return named
    for path in checkpoint_candidates([work_dir, *folders]):
        if _is_readable_checkpoint(path):
            if logger is not None and osp.isfile(marker):
                logger.warning(f'{marker} names {named!r}, which is missing or unreadable; '
                               f'resuming from {path} instead.')
            return path
    return None


def checkpoint_folders(runner: Runner) -> List[str]:
    """The local folders the runner's ``CheckpointHook`` writes to besides the work dir.

    mmengine writes to ``out_dir/<work dir's name>`` when the hook has an ``out_dir``.
    """
    from mmengine.hooks import CheckpointHook
    folders = []
    work_dir = osp.abspath(runner.work_dir)
    for hook in getattr(runner, '_hooks', []):
        out_dir = getattr(hook, 'out_dir', None) if isinstance(hook, CheckpointHook) else None
        if not isinstance(out_dir, str) or '://' in out_dir:
            continue
        name = osp.basename(work_dir.rstrip(osp.sep))
        folders.append(osp.join(out_dir, name))
        if osp.basename(out_dir.rstrip(osp.sep)) == name:  # before_train already added the name
            folders.append(out_dir)
    return folders


# --------------------------------------------------------------------------
# One run per work dir.
# --------------------------------------------------------------------------
#: The lock file a training run holds in its work dir.
LOCK_NAME = '.mlla-mm-run.lock'


class WorkDirLock:
    """An advisory lock on a work dir: a file with the owner's pid and host, held with ``flock``.

    :meth:`acquire` refuses (:class:`~mlla_mm.engine.launch.UsageError`, one
    line naming the owner) while another live run holds it; a lock left by a
    run that died (its pid gone on this host, or its ``flock`` released) is
    taken over with a warning. A lock of another host whose ``flock`` cannot
    be seen is refused too (its liveness cannot be checked from here); the
    message says to delete the file when that run is over.
    """

    def __init__(self, work_dir: str) -> None:
        self.path = osp.join(work_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    @staticmethod
    def _owner_text(owner: Dict[str, Any]) -> str:
        return f'pid {owner.get("pid")} on host {owner.get("host")}' + \
            (f', started {owner["started"]}' if owner.get('started') else '')

    def _read_owner(self, fd: int) -> Dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = json.loads(os.read(fd, 4096).decode('utf-8') or '{}')
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self, logger: Any = None) -> None:
        """Take the lock (see the class); raises ``UsageError`` when another live run holds it."""
        import fcntl

        os.makedirs(osp.dirname(self.path), exist_ok=True)
        host = socket.gethostname()
        for _ in range(5):  # the file may be replaced between open and flock by an owner that ends
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                owner = self._read_owner(fd)
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is in use by another training run '
                                 f'({self._owner_text(owner) if owner else "owner unknown"}, lock {self.path}); '
                                 'wait for it to end or choose another --work-dir') from None
            except OSError:  # a file system without flock: the pid decides
                flocked = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            break
        else:
            raise UsageError(f'cannot take the lock {self.path}: it keeps being replaced by another run')
        owner = self._read_owner(fd)
        pid = owner.get('pid')
        if owner and pid != os.getpid():
            alive = isinstance(pid, int) and _pid_alive(pid)
            if owner.get('host') != host and not flocked:
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is locked by a run on another host '
                                 f'({self._owner_text(owner)}, lock {self.path}); if that run is over, delete the '
                                 'lock file and start again')
            if owner.get('host') == host and alive and not flocked:
                os.close(fd)
                raise UsageError(f'work dir {osp.dirname(self.path)} is in use by another training run '
                                 f'({self._owner_text(owner)}, lock {self.path}); wait for it to end or choose '
                                 'another --work-dir')
            if logger is not None:
                logger.warning(f'{self.path}: took over the lock of a run that is no longer running '
                               f'({self._owner_text(owner)}).')
        text = json.dumps(dict(pid=os.getpid(), host=host, started=time.strftime('%Y-%m-%d %H:%M:%S')))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text.encode('utf-8'))
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise _disk_error(err, osp.dirname(self.path), f'writing the lock {self.path}') from None
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (if still ours) and drop the lock."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# --------------------------------------------------------------------------
# A full disk: one line, not a traceback.
# --------------------------------------------------------------------------
_DISK_FULL = (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))


def _disk_error(err: OSError, work_dir: str, doing: str) -> AtomicWriteError:
    """``err`` (disk full, quota, read-only file system, ...) as one line naming the work dir."""
    reason = 'no space left on the device' if err.errno in _DISK_FULL else (err.strerror or str(err))
    return AtomicWriteError(err.errno, f'cannot write in the work dir {work_dir} ({doing}): {reason}; free some '
                            'space (or choose another --work-dir) and run again, with --resume to continue')


@contextmanager
def disk_full_is_one_line(work_dir: Any, doing: str) -> Iterator[None]:
    """Turn a disk-full ``OSError`` raised inside the block into an :class:`AtomicWriteError` naming ``work_dir``."""
    try:
        yield
    except AtomicWriteError:
        raise  # already names its file
    except OSError as err:
        if err.errno not in _DISK_FULL and err.errno != errno.EROFS:
            raise
        raise _disk_error(err, str(work_dir), doing) from None


# --------------------------------------------------------------------------
# mmengine's last_checkpoint marker, written atomically.
# --------------------------------------------------------------------------
def with_atomic_marker(save: Any) -> Any:
    """``CheckpointHook._save_checkpoint_with_step`` writing ``last_checkpoint`` through :func:`atomic_write`.

    mmengine writes the marker with a plain ``open(..., 'w')``: a full disk
    or a kill leaves it empty. While ``save`` runs, the ``open`` its module
    sees sends a write of a file named ``last_checkpoint`` to the atomic
    writer and everything else to the built-in.
    """
    import builtins
    import functools
    import sys

    def marker_open(file: Any, mode: str = 'r', *a: Any, **kw: Any) -> Any:
        if osp.basename(str(file)) == 'last_checkpoint' and mode in ('w', 'wt'):
            return atomic_write(str(file), 'w')
        return builtins.open(file, mode, *a, **kw)

    @functools.wraps(save)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        names = dict.fromkeys([save.__module__, 'mmengine.hooks.checkpoint_hook'])  # a subclass's and mmengine's
        modules = [sys.modules[n] for n in names if n in sys.modules]
        previous = [vars(m).get('open') for m in modules]
        for module in modules:
            module.open = marker_open
        try:
            return save(*args, **kwargs)
        finally:
            for module, prev in zip(modules, previous):
                if prev is None:
                    del module.open
                else:
                    module.open = prev
    return wrapper


def checkpoint_name(runner: Runner) -> str:
    """The file :meth:`SafeRunner.load_checkpoint` is reading (best guess for another Runner)."""
    return getattr(runner, 'checkpoint_being_loaded', None) or runner._load_from or 'the checkpoint'



__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'LOCK_NAME', 'WorkDirLock', 'checkpoint_candidates',
           'checkpoint_folders', 'checkpoint_name', 'disk_full_is_one_line', 'find_resumable_checkpoint',
           'read_marker', 'remove_stale_temp_files', 'with_atomic_marker']
