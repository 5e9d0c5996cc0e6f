"""The one atomic file writer of mlla-mm.

Everything that writes a file a later run reads (checkpoints, converted
weights, synthetic data, exported models) goes through :func:`atomic_write`:
the data goes to a hidden temporary file in the destination folder, is
flushed and fsynced, and is renamed into place. A kill or a full disk at any
moment leaves the previous file intact and no temporary file behind.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import IO, Iterator

TMP_TAG = '.tmp-'


class AtomicWriteError(OSError):
    """Writing a file failed (e.g. disk full); the message names the file.

    The previous content of the file, if any, is unchanged and the temporary
    file has been removed.
    """


def output_path_problem(path: str, folder: bool = False) -> str:
    """Why ``path`` cannot be created as a file (or, ``folder``, as a directory); ``''`` when it can be.

    Walks up to the first part of the path that exists: it must be a directory
    that can be written; a file in the way, a directory where a file is wanted
    (or the other way round) and missing write permission each get their reason.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            return f'{path} exists and is not a directory'
        if not folder and os.path.isdir(path):
            return f'{path} is a directory'
        target = path if folder else os.path.dirname(path)
        return '' if os.access(target, os.W_OK) else f'no permission to write in {target}'
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f'{parent} is a file, not a directory'
    return '' if os.access(parent, os.W_OK) else f'no permission to write in {parent}'


def temp_name(path: str) -> str:
    """The temporary file :func:`atomic_write` uses for ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}{TMP_TAG}{os.getpid()}')


def fsync_dir(folder: str) -> None:
    """fsync a folder so a rename in it is durable (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str, mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file for writing; rename it to ``path`` when the block succeeds.

    Raises:
        AtomicWriteError: The write, flush, fsync or rename failed (disk full,
            no permission, ...). It names ``path``; the temporary file is gone.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except OSError as err:
        _remove(tmp)
        reason = output_path_problem(path) or err.strerror or str(err)
        raise AtomicWriteError(err.errno, f'cannot write {path}: {reason} '
                               '(any previous version of the file is unchanged)') from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ['AtomicWriteError', 'atomic_write', 'fsync_dir', 'temp_name', 'TMP_TAG']
