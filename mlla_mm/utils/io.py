"""The one atomic file writer of mlla-mm.

Everything that writes a file a later run reads (checkpoints, converted
weights, synthetic data, exported models) goes through :func:`atomic_write`:
the data goes to a hidden temporary file in the destination folder, is
flushed and fsynced, and is renamed into place. A kill or a full disk at any
moment leaves the previous file intact and no temporary file behind.
"""
from __future__ import annotations

import os
import struct
import zlib
from contextlib import contextmanager
from typing import IO, Iterable, Iterator, List, Optional, Sequence

TMP_TAG = '.tmp-'
#: What every file the tools write says about its author (a PNG ``tEXt`` chunk, a JSON key, ONNX metadata).
WRITTEN_BY = 'mlla-mm'
#: Byte strings that mark a file as written by mlla-mm: a PNG ``Software`` text chunk, a JSON
#: ``"written_by"`` key (at the start) and the ONNX exporter's metadata (at the end of the file).
_OWN_MARKS_HEAD = (b'tEXtSoftware\x00' + WRITTEN_BY.encode(), b'"written_by": "' + WRITTEN_BY.encode())
_OWN_MARKS_TAIL = (b'mlla_mm_kind', )
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


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


# --------------------------------------------------------------------------
# Output paths of the tools: never an input, never a file the toolkit did not write, never two alike.
# --------------------------------------------------------------------------
class OutputPathError(ValueError):
    """An output path a tool must not write (an input, a foreign file, a duplicate); the message says which."""


def same_path(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same file (symbolic links and hard links included)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def png_signed(png: bytes) -> bytes:
    """``png`` with a ``tEXt`` chunk ``Software: mlla-mm`` after its header (what :func:`written_by_toolkit` reads)."""
    if not png.startswith(_PNG_SIGNATURE) or len(png) < 33:
        raise ValueError('not a PNG file')
    text = b'Software\x00' + WRITTEN_BY.encode()
    chunk = struct.pack('>I', len(text)) + b'tEXt' + text + struct.pack('>I', zlib.crc32(b'tEXt' + text))
    end_of_header = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    return png[:end_of_header] + chunk + png[end_of_header:]


def written_by_toolkit(path: str, span: int = 1 << 16) -> bool:
    """Whether the regular file ``path`` carries the mark of a file mlla-mm's tools write.

    Reads at most ``span`` bytes at each end: a PNG's ``Software: mlla-mm``
    text chunk (:func:`png_signed`), a JSON file's leading ``"written_by":
    "mlla-mm ..."`` or the ``mlla_mm_kind`` metadata of an exported ONNX model.
    """
    try:
        if not os.path.isfile(path):
            return False
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(span)
            if size > span:
                f.seek(max(span, size - span))
            tail = f.read(span) if size > span else head
    except OSError:
        return False
    return any(m in head for m in _OWN_MARKS_HEAD) or any(m in tail for m in _OWN_MARKS_TAIL)


class _Inputs:
    """The files a tool reads, indexed by real path and by (device, inode): one look-up per output."""

    def __init__(self, inputs: Iterable[str]) -> None:
        self.by_path = {}
        self.by_inode = {}
        for src in inputs:
            if not src:
                continue
            src = os.fspath(src)
            self.by_path.setdefault(os.path.realpath(src), src)
            try:
                st = os.stat(src)
            except OSError:
                continue
            self.by_inode.setdefault((st.st_dev, st.st_ino), src)

    def match(self, path: str) -> Optional[str]:
        """The input that is the same file as ``path`` (symbolic and hard links included), else None."""
        src = self.by_path.get(os.path.realpath(path))
        if src is None and self.by_inode:
            try:
                st = os.stat(path)
            except OSError:
                return None
            src = self.by_inode.get((st.st_dev, st.st_ino))
        return src


def output_conflict(path: str, inputs: Iterable[str], force: bool = False) -> str:
    """Why a tool must not write ``path``; ``''`` when it may.

    ``path`` must not be one of ``inputs`` (the files the tool reads: images,
    weights, config; ``--force`` does not change that). An existing file is
    overwritten only when mlla-mm wrote it (:func:`written_by_toolkit`) or
    with ``force``; a directory is never replaced by a file.
    """
    index = inputs if isinstance(inputs, _Inputs) else _Inputs(inputs)
    src = index.match(path)
    if src is not None:
        return f'{path} is also an input of this command ({src}); it would be overwritten'
    if os.path.isdir(path):
        return f'{path} is a directory'
    if os.path.lexists(path) and not force and not written_by_toolkit(path):
        return f'{path} exists and was not written by mlla-mm (add --force to overwrite it)'
    return ''


def check_outputs(outputs: Sequence[str], inputs: Iterable[str], force: bool = False, option: str = '--out',
                  error: type = OutputPathError) -> None:
    """Fail before any work when one of ``outputs`` must not be written (:func:`output_conflict`) or two are alike.

    Linear in the number of outputs and inputs (a folder of many images).

    Raises:
        OutputPathError (or ``error``, e.g. the tools' ``UsageError``): one line naming ``option`` and the path.
    """
    index = _Inputs(inputs)
    seen = set()
    for out in outputs:
        key = os.path.normcase(os.path.abspath(os.fspath(out)))
        if key in seen:
            raise error(f'{option}: two outputs would be written to {out}')
        seen.add(key)
        problem = output_conflict(os.fspath(out), index, force)
        if problem:
            raise error(f'{option}: {problem}')


def distinct_paths(candidates: Sequence[Sequence[str]]) -> List[str]:
    """One distinct output path per item, from each item's preferred names (first is best).

    An item takes its first name no earlier item took and no later item
    prefers first; when all are taken it gets its first name with ``_2``,
    ``_3``, ... before the extension. Names compare as the file system would
    on this OS (``os.path.normcase``).
    """
    def key(p: str) -> str:
        return os.path.normcase(os.path.normpath(p))

    firsts = {}
    for i, names in enumerate(candidates):
        firsts.setdefault(key(names[0]), i)
    taken = set()
    result: List[str] = []
    for i, names in enumerate(candidates):
        chosen: Optional[str] = None
        for name in names:
            k = key(name)
            if k not in taken and firsts.get(k, i) == i:
                chosen = name
                break
        if chosen is None:
            stem, ext = os.path.splitext(names[0])
            n = 2
            while key(f'{stem}_{n}{ext}') in taken or key(f'{stem}_{n}{ext}') in firsts:
                n += 1
            chosen = f'{stem}_{n}{ext}'
        taken.add(key(chosen))
        result.append(chosen)
    return result


__all__ = ['AtomicWriteError', 'atomic_write', 'fsync_dir', 'temp_name', 'TMP_TAG', 'WRITTEN_BY', 'OutputPathError',
           'same_path', 'png_signed', 'written_by_toolkit', 'output_conflict', 'check_outputs', 'distinct_paths']
