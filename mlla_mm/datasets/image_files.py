"""Image and label-map files: what each one holds and whether it decodes, checked before a run.

Each image is checked as far as its format needs (:func:`inspect_image`): PIL
reads the header (size, EXIF orientation of every format); a JPEG must end
with its end-of-image marker (the last 1 KiB is read); a PNG goes through
``PIL.Image.verify()`` (the CRC of every chunk) and its pixel data is
inflated (:func:`_png_scan`); other formats are decoded by PIL. Label maps are
decoded in full (:func:`inspect_label_map`). Long checks show a progress line.
"""
from __future__ import annotations

import os
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# ---- one image -----------------------------------------------------------------------------------------------
#: Checks of more files than this show a progress line on stderr once they have run for PROGRESS_AFTER_S.
PROGRESS_AFTER_S = 2.0

_ROTATED = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees when it is loaded
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _exif_orientation(raw: bytes) -> int:
    """The orientation tag of raw EXIF data (1 if absent or unreadable)."""
    from PIL import Image
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = exif.get(0x0112)
    except Exception:  # noqa: BLE001 - damaged EXIF: the loaders ignore it too
        return 1
    return value if isinstance(value, int) else 1


def _png_pixel_bytes(width: int, height: int, depth: int, colour: int, interlace: int) -> Tuple[int, int]:
    """(bytes of the decompressed pixel data, row length with its filter byte; 0 when interlaced)."""
    bits = _PNG_CHANNELS.get(colour, 0) * depth
    if not interlace:
        row = 1 + (width * bits + 7) // 8
        return height * row, row
    total = 0
    for x0, y0, dx, dy in _PNG_PASSES:
        pw, ph = max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)
        if pw and ph:
            total += ph * (1 + (pw * bits + 7) // 8)
    return total, 0


def _png_scan(path: str) -> Tuple[int, str]:
    """Inflate a PNG's pixel data (without unfiltering it) and read its ``eXIf`` orientation.

    ``verify()`` checks each chunk's CRC but not what the ``IDAT`` chunks hold:
    a garbage (or short) zlib stream with valid CRCs passes it and fails in the
    loader mid-epoch. This decompresses the stream in pieces of 1 MiB (memory
    does not grow with the image), checks that it holds every row and that each
    row's filter byte is valid (0-4).

    Returns:
        ``(orientation, '')`` or ``(1, reason)``.
    """
    with open(path, 'rb') as f:
        data = f.read()
    view = memoryview(data)
    pos, orientation, expected, row = 8, 1, -1, 0
    inflate = zlib.decompressobj()
    done = 0
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack_from('>I4s', data, pos)
            body = view[pos + 8:pos + 8 + length]
            pos += 12 + length
            if kind == b'IHDR' and length >= 13:
                width, height, depth, colour, _, _, interlace = struct.unpack_from('>IIBBBBB', body)
                expected, row = _png_pixel_bytes(width, height, depth, colour, interlace)
            elif kind == b'eXIf':
                orientation = _exif_orientation(bytes(body))
            elif kind == b'IDAT':
                if expected < 0:
                    return 1, 'damaged image file (PNG pixel data before its header)'
                while body and done < expected and not inflate.eof:
                    out = inflate.decompress(body, 1 << 20)
                    body = inflate.unconsumed_tail
                    if row and out:
                        start = (-done) % row
                        filters = np.frombuffer(out, np.uint8)[start::row]
                        bad = np.flatnonzero(filters > 4)
                        if bad.size and done + start + int(bad[0]) * row < expected:
                            return 1, f'damaged image file (PNG row filter type {int(filters[bad[0]])}; valid: 0-4)'
                    done += len(out)
            elif kind == b'IEND':
                break
    except zlib.error as err:
        return 1, f'damaged image file (PNG pixel data: zlib {err})'
    if done < expected:
        return 1, f'damaged image file (PNG pixel data holds {done} of {expected} bytes)'
    return orientation, ''


def inspect_image(path: str) -> Tuple[Optional[Tuple[int, int]], str]:
    """Check an image file without decoding more than its format needs.

    JPEG (and MPO, a JPEG with more pictures): the header, and the end-of-image
    marker in the last 1 KiB. PNG: ``verify()`` (every chunk's CRC) and the
    pixel data inflated without unfiltering it (:func:`_png_scan`). Other
    formats (WebP, TIFF, BMP, GIF, ...), which have no cheaper check: a full
    decode by PIL (bounded by PIL's decompression-bomb limit, checked first).

    Returns:
        ``((width, height), '')`` with the size the image has once loaded (the
        EXIF orientation of every format applied, as mmcv's loaders do: a
        rotation by 90 degrees swaps width and height), or ``(None, reason)``
        when the file is missing or cannot be read.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        nbytes = os.path.getsize(path)
    except OSError:
        return None, 'missing'
    if nbytes == 0:
        return None, 'empty file (0 bytes)'
    try:
        with Image.open(path) as im:
            (w, h), fmt = im.size, im.format
            if fmt in ('JPEG', 'MPO'):
                orientation = im.getexif().get(0x0112)
                if not _jpeg_has_end(path, nbytes):
                    return None, 'truncated JPEG (no end-of-image marker)'
            elif fmt == 'PNG':
                im.verify()
                orientation, reason = _png_scan(path)  # PIL's getexif() of a PNG would decode it
                if reason:
                    return None, reason
            else:  # decoded in full; PIL's TIFF plugin applies (and drops) the orientation when it loads
                im.load()
                (w, h), orientation = im.size, im.getexif().get(0x0112)
    except UnidentifiedImageError:
        return None, 'not an image file'
    except Image.DecompressionBombError:
        return None, 'more pixels than PIL allows (decompression-bomb limit)'
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as err:
        return None, f'damaged image file ({" ".join(str(err).split()) or type(err).__name__})'
    if w < 1 or h < 1:
        return None, f'image of size {w}x{h}'
    if orientation in _ROTATED:
        w, h = h, w
    return (w, h), ''


def _jpeg_has_end(path: str, nbytes: int) -> bool:
    """A complete JPEG ends with FF D9 (trailing bytes after it are tolerated within the last 1 KiB).

    Inside the compressed data a 0xFF byte is always followed by 0x00 or a restart
    marker, so FF D9 in the tail means the file was not cut short.
    """
    with open(path, 'rb') as f:
        f.seek(max(0, nbytes - 1024))
        return b'\xff\xd9' in f.read()


class _Progress:
    """A progress line on stderr for long checks: shown once a check has run for ``PROGRESS_AFTER_S``."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.start = self.first = self.last = time.monotonic()
        self.shown = False

    def update(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done == 1:
            self.first = now  # the rate is taken from here on (the first file pays for imports and start-up)
        if not self.shown and (now - self.start < PROGRESS_AFTER_S or self.done >= self.total):
            return
        if self.shown and now - self.last < 0.5 and self.done < self.total:
            return
        self.last, self.shown = now, True
        left = ''
        if 1 < self.done < self.total:
            left = f', about {(now - self.first) / (self.done - 1) * (self.total - self.done):.0f} s left'
        sys.stderr.write(f'\r{self.what}: {self.done}/{self.total} files, {now - self.start:.0f} s{left} ')
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write('\n')
            sys.stderr.flush()


def _map_files(fn: Callable[[str], Any], paths: Sequence[str], what: str) -> List[Any]:
    """``[fn(p) for p in paths]``, in a thread pool for many files, with a progress line when it takes long."""
    progress = _Progress(len(paths), what)
    out: List[Any] = []
    try:
        if len(paths) > 64:
            with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
                for result in pool.map(fn, paths, chunksize=16):
                    out.append(result)
                    progress.update()
        else:
            for p in paths:
                out.append(fn(p))
                progress.update()
    finally:
        progress.close()
    return out


def inspect_images(paths: Sequence[str], seen: Dict[str, Tuple[Optional[Tuple[int, int]], str]]
                  ) -> Dict[str, Tuple[Optional[Tuple[int, int]], str]]:
    """:func:`inspect_image` on each path (threads for many files; ``seen`` caches across datasets)."""
    todo = sorted({p for p in paths if p not in seen})
    seen.update(zip(todo, _map_files(inspect_image, todo, 'checking images')))
    return {p: seen[p] for p in paths}


def inspect_label_maps(paths: Sequence[str], seen: Dict[str, Any]) -> Dict[str, Tuple[Optional[Tuple[int, int]], str,
                                                                                Tuple[int, ...]]]:
    """:func:`inspect_label_map` on each path (cached in ``seen`` under ``path + '\\0label'``)."""
    todo = sorted({p for p in paths if p + '\0label' not in seen})
    seen.update(zip((p + '\0label' for p in todo), _map_files(inspect_label_map, todo, 'checking label maps')))
    return {p: seen[p + '\0label'] for p in paths}


def inspect_label_map(path: str) -> Tuple[Optional[Tuple[int, int]], str, Tuple[int, ...]]:
    """Decode a label map as mmseg's ``LoadAnnotations`` does (PIL, no EXIF rotation, values as 8 bits).

    The full decode also finds damage a header check cannot see (a garbage
    ``IDAT`` with valid CRCs).

    Returns:
        ``((width, height), '', values present)`` or ``(None, reason, ())``.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        if os.path.getsize(path) == 0:
            return None, 'empty file (0 bytes)', ()
    except OSError:
        return None, 'missing', ()
    try:
        with Image.open(path) as im:
            im.load()
            bands, mode = len(im.getbands()), im.mode
            arr = np.asarray(im)
    except UnidentifiedImageError:
        return None, 'not an image file', ()
    except Image.DecompressionBombError:
        return None, 'more pixels than PIL allows (decompression-bomb limit)', ()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, MemoryError) as err:
        return None, f'damaged image file ({" ".join(str(err).split()) or type(err).__name__})', ()
    h, w = arr.shape[:2]
    if w < 1 or h < 1:
        return None, f'image of size {w}x{h}', ()
    if bands != 1:
        return None, (f'label map with {bands} channels (mode {mode}); mmseg needs one class index per pixel '
                      '(a gray or palette image)'), ()
    if arr.dtype != np.uint8 and arr.size and (int(arr.max()) > 255 or int(arr.min()) < 0):
        return None, (f'label values {int(arr.min())}..{int(arr.max())}; mmseg reads label maps as 8-bit '
                      'values (0..255) and would wrap the others'), ()
    counts = np.bincount(arr.astype(np.uint8, copy=False).ravel(), minlength=256)
    return (w, h), '', tuple(int(v) for v in np.flatnonzero(counts))
