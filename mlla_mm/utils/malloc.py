"""glibc malloc settings that keep large CPU tensors off fresh ``mmap`` pages.

PyTorch's CPU allocator asks the C library for every tensor. glibc serves
blocks above its mmap threshold (at most 32 MiB, adjusted at run time) with a
fresh ``mmap`` and returns them with ``munmap`` when freed, so every large
tensor is page-faulted and zeroed by the kernel again on each use. At
2048x2048 the first MLLA stages make activations of 33-134 MB in every
block: that kernel work made the backbone's forward 1.3x slower there
(4.90 s vs 3.84 s) and its cost grow faster than the pixel count
(docs/benchmarks.md). Serving large blocks from the heap and keeping freed
memory for reuse, as a caching allocator does, removes it.

The setting is process-wide, so the package never applies it on import: the
tools (``tools/train.py``, ``test.py``, ``demo.py``, ``benchmark.py``) call
:func:`tune_cpu_malloc` at start-up. ``MLLA_MM_MALLOC=default`` switches it
off. Own scripts can call it, or start Python with the environment
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` for the same effect.
The price: memory freed by the process is kept for reuse (up to 2 GiB above
what is in use) instead of being handed back to the OS at once.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
ENV = 'MLLA_MM_MALLOC'

_state: Optional[str] = None


def _libc() -> Optional[ctypes.CDLL]:
    """The running glibc, or None on other C libraries and systems."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_malloc(enable: Optional[bool] = None) -> str:
    """Serve large allocations from the heap and keep freed memory for reuse.

    Args:
        enable: True or False to force; None reads ``MLLA_MM_MALLOC``
            (``tuned``, the default, or ``default`` to leave malloc alone).

    Returns:
        ``'tuned'``, ``'default'`` (switched off) or ``'unsupported'`` (not
        glibc), also kept for :func:`malloc_state`.

    Raises:
        ValueError: ``MLLA_MM_MALLOC`` holds something else.
    """
    global _state
    if enable is None:
        value = os.environ.get(ENV, 'tuned').strip().lower()
        if value not in ('tuned', 'default'):
            raise ValueError(f"{ENV} must be 'tuned' or 'default', got {os.environ[ENV]!r}")
        enable = value == 'tuned'
    if not enable:
        _state = 'default'
        return _state
    libc = _libc()
    if libc is None:
        _state = 'unsupported'
        return _state
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state = 'tuned' if ok else 'unsupported'
    return _state


def malloc_state() -> str:
    """What :func:`tune_cpu_malloc` did in this process (``'untouched'`` if never called)."""
    return _state or 'untouched'


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
        'keepcost')]


def mmapped_bytes() -> Optional[int]:
    """Bytes glibc currently holds in separately ``mmap``-ed blocks (``mallinfo2().hblkhd``)."""
    libc = _libc()
    if libc is None or not hasattr(libc, 'mallinfo2'):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


__all__ = ['tune_cpu_malloc', 'malloc_state', 'mmapped_bytes']
