"""Checks of the data and model a config needs, run before training starts.

:class:`~mlla_mm.engine.runner.SafeRunner` calls :func:`check_data` (through
``mlla_mm.engine.run_checks.check_run``) before it builds anything, so
``tools/train.py``, ``tools/test.py`` and ``RUNNERS.build(cfg)`` in a script
check the same data. It finds
what mmdet and mmseg would otherwise drop without a word, or crash on after
training has started:

- COCO-format (``.json``) annotation files: duplicate image, annotation or
  category ids; annotations naming unknown images or categories; config
  ``classes`` missing from the file or in another order; malformed entries;
  no usable annotation at all; ``width``/``height`` that differ from the
  image; missing and unreadable images; image or category ids mixing
  numbers and strings. When masks are loaded: polygons and RLEs that
  pycocotools would crash on (non-finite or far-off coordinates, an RLE of
  another size than its image or with broken counts). Boxes and polygons that
  mmdet would drop are counted in one warning line per file.
- mmseg folder datasets (``images/`` + ``annotations/`` PNGs): images without
  a label map, unreadable images or label maps, label maps of another size or
  with values that are not classes of the model (``num_classes``, 255 ignored).
- The model: an MLLA backbone's ``out_indices`` must give the channels the
  neck's (or the decode heads') ``in_channels`` expect.

Each image is checked as far as its format needs (:func:`inspect_image`): PIL
reads the header (size, EXIF orientation of every format); a JPEG must end
with its end-of-image marker (the last 1 KiB is read); a PNG goes through
``PIL.Image.verify()`` (the CRC of every chunk) and its pixel data is
inflated (:func:`_png_scan`); other formats are decoded by PIL. Label maps are
decoded in full (:func:`inspect_label_map`). Long checks show a progress line.

Problems are raised as :class:`DataNotFoundError` subclasses with a one-line
message naming the file (the tools print ``error: ...`` and exit 2). With
``skip_bad_images=True`` in the config (``--skip-bad-images``), missing and
unreadable images are left out instead: a filtered copy of the annotation
file (COCO) or a split file (mmseg) is written under
``<work_dir>/data_checks/`` and the dataset (and its evaluator) is pointed
at it.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import BadAnnotationError, BadImageError, DataNotFoundError, UsageError
from ..models.mlla import resolve_arch
from ..utils.io import atomic_write

DEMO_COMMANDS = {'mmdet': 'make demo', 'mmseg': 'make demo-seg'}

LAYOUTS = {
    'CocoDataset': ('COCO 2017 in mmdet\'s standard layout', [
        'data/coco/annotations/instances_train2017.json',
        'data/coco/annotations/instances_val2017.json',
        'data/coco/train2017/*.jpg',
        'data/coco/val2017/*.jpg']),
    'ADE20KDataset': ('ADE20K (ADEChallengeData2016) in mmseg\'s standard layout', [
        'data/ade/ADEChallengeData2016/images/training/*.jpg',
        'data/ade/ADEChallengeData2016/images/validation/*.jpg',
        'data/ade/ADEChallengeData2016/annotations/training/*.png',
        'data/ade/ADEChallengeData2016/annotations/validation/*.png']),
}

#: Where ``--skip-bad-images`` writes the filtered annotation / split files (under the work dir).
CHECKS_DIR = 'data_checks'
_SKIP_HINT = 'fix or remove them, or run with --skip-bad-images to leave them out'


def _datasets(cfg: Any) -> Iterator[Dict]:
    """Yield the leaf dataset configs inside (possibly wrapped) dataset configs."""
    if isinstance(cfg, (list, tuple)):
        for c in cfg:
            yield from _datasets(c)
        return
    if not isinstance(cfg, dict):
        return
    inner = cfg.get('dataset', cfg.get('datasets'))
    if inner is not None:
        yield from _datasets(inner)
    else:
        yield cfg


def _paths(ds: Dict) -> List[Path]:
    root = Path(ds.get('data_root') or '')
    out = [root] if ds.get('data_root') else []
    ann = ds.get('ann_file')
    if ann:
        out.append(root / ann)
    prefix = ds.get('data_prefix') or {}
    for value in prefix.values() if isinstance(prefix, dict) else []:
        if isinstance(value, str) and value:
            out.append(root / value)
    return out


def _few(items: Iterable[Any], n: int = 5) -> str:
    """``'a, b, c'`` or ``'a, b, c, d, e and 7 more'``."""
    items = [str(i) for i in items]
    head = ', '.join(items[:n])
    return head + (f' and {len(items) - n} more' if len(items) > n else '')


def _where(loader_name: str, config_path: str) -> str:
    return f'(needed by {loader_name or "a dataloader"} of {config_path or "the config"})'


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


def _inspect_many(paths: Sequence[str], seen: Dict[str, Tuple[Optional[Tuple[int, int]], str]]
                  ) -> Dict[str, Tuple[Optional[Tuple[int, int]], str]]:
    """:func:`inspect_image` on each path (threads for many files; ``seen`` caches across datasets)."""
    todo = sorted({p for p in paths if p not in seen})
    seen.update(zip(todo, _map_files(inspect_image, todo, 'checking images')))
    return {p: seen[p] for p in paths}


def _inspect_labels(paths: Sequence[str], seen: Dict[str, Any]) -> Dict[str, Tuple[Optional[Tuple[int, int]], str,
                                                                                Tuple[int, ...]]]:
    """:func:`inspect_label_map` on each path (cached in ``seen`` under ``path + '\\0label'``)."""
    todo = sorted({p for p in paths if p + '\0label' not in seen})
    seen.update(zip((p + '\0label' for p in todo), _map_files(inspect_label_map, todo, 'checking label maps')))
    return {p: seen[p + '\0label'] for p in paths}


# ---- COCO-format annotation files -------------------------------------------------------------------------
def _dataset_class(scope: str, type_name: Any) -> Optional[type]:
    """The dataset class a config's ``type`` names (``None`` if it cannot be found)."""
    if isinstance(type_name, type):
        return type_name
    if not isinstance(type_name, str):
        return None
    import importlib
    try:
        registry = importlib.import_module(f'{scope}.registry').DATASETS
        return registry.get(type_name)
    except Exception:  # noqa: BLE001 - no such scope or type: the runner will report it
        return None


def _config_classes(ds: Dict, scope: str) -> Optional[Tuple[str, ...]]:
    """The ``classes`` the dataset will use: the config's metainfo, else the dataset class's default."""
    meta = ds.get('metainfo') or {}
    classes = meta.get('classes') if isinstance(meta, dict) else None
    if classes is None:
        cls = _dataset_class(scope, ds.get('type', 'CocoDataset'))
        classes = (getattr(cls, 'METAINFO', None) or {}).get('classes') if cls is not None else None
    return tuple(classes) if classes is not None else None


#: The largest float32 (mmdet loads boxes as float32 arrays).
_FLOAT32_MAX = 3.4028234663852886e38


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _drop_reason(ann: Dict, img: Dict) -> Optional[str]:
    """Why mmdet's ``CocoDataset.parse_data_info`` would drop this annotation's box, or None."""
    x, y, w, h = ann['bbox']
    if w < 1 or h < 1:
        return 'box width or height < 1'
    if max(0, min(x + w, img['width']) - max(x, 0)) * max(0, min(y + h, img['height']) - max(y, 0)) == 0:
        return 'box outside its image'
    if ann['area'] <= 0:
        return 'area <= 0'
    return None


def _loads_masks(ds: Dict) -> bool:
    """Whether the dataset's pipeline loads instance masks (``LoadAnnotations`` with ``with_mask=True``)."""
    return any(isinstance(t, dict) and str(t.get('type', '')).endswith('LoadAnnotations') and t.get('with_mask')
               for t in ds.get('pipeline') or [])


def _hashable(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _one_id_type(ids: Iterable[Any], what: str, bad: Any) -> None:
    """Refuse ids of both types (int and str): pycocotools sorts them when it evaluates, which fails then."""
    first: Dict[type, Any] = {}
    for i in ids:
        first.setdefault(type(i), i)
    if len(first) > 1:
        raise bad(f'{what} ids are both numbers and strings (e.g. {first[int]!r} and {first[str]!r}); COCO '
                  f'evaluation (pycocotools) sorts them and fails after the whole evaluation has run: use one '
                  f'type for every {what} id')


# ---- instance masks: what pycocotools will decode ---------------------------------------------------------------
def _rle_string_counts(counts: str) -> Optional[Any]:
    """The run lengths pycocotools' ``rleFrString`` reads from a compressed RLE string, or None.

    None when the string is not what pycocotools' encoder writes: characters
    outside ``'0'..'o'``, a last value whose continuation bit runs past the end
    (pycocotools then reads past the string), a value of more than 12
    characters, or a run length outside 0..2**32-1 (pycocotools stores them
    as ``uint`` and would write that many pixels).
    """
    try:
        raw = counts.encode('ascii')
    except UnicodeEncodeError:
        return None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if not c.size:
        return c
    if c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        return None
    ends = np.flatnonzero((c & 0x20) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lens = ends - starts + 1
    if lens.max() > 12:
        return None
    k = np.arange(c.size) - np.repeat(starts, lens)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x = np.where(c[ends] & 0x10, x - (np.int64(1) << (5 * lens)), x)  # the sign bit of the last character
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])  # from the fourth value on, pycocotools stores differences to cnts[m-2]
    out[2::2] = np.cumsum(x[2::2])
    if out.min() < 0 or out.max() >= 1 << 32:
        return None
    return out


def _rle_problem(seg: Dict, h: int, w: int) -> Optional[str]:
    """Why pycocotools cannot decode this RLE into an ``h`` x ``w`` mask (None if it can)."""
    size, counts = seg.get('size'), seg.get('counts')
    if not (isinstance(size, list) and len(size) == 2 and all(_hashable(v) and isinstance(v, int) for v in size)):
        return f'RLE "size" {size!r} is not [height, width]'
    if size != [h, w]:
        return f'RLE size {size[0]}x{size[1]} (height x width) is not its image\'s {h}x{w}'
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return 'uncompressed RLE counts are not all non-negative integers'
        total = sum(counts)
    elif isinstance(counts, str):
        runs = _rle_string_counts(counts)
        if runs is None:
            return 'compressed RLE counts are not a valid COCO RLE string'
        total = int(runs.sum())
    else:
        return f'RLE "counts" is a {type(counts).__name__}, not a list or a string'
    if total != h * w:
        return f'RLE counts cover {total} pixels, its {h}x{w} image has {h * w}'
    return None


_POLY_BATCH = 1 << 16  # polygons per numpy pass (about 15 MB of coordinates for COCO's)


def _first_bad_coordinate(p: List[Any], w: float, h: float) -> str:
    """The reason for the first coordinate of ``p`` that is not a finite number within the margin."""
    for j, v in enumerate(p[:len(p) - len(p) % 2]):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return 'a polygon coordinate that is not a number'
        size = w if j % 2 == 0 else h
        if not (math.isfinite(v) and -size <= v <= 2 * size):
            return f'coordinate {v:g}'
    return ''


def _polygon_batch(ids: List[Any], polys: List[List[Any]], widths: List[Any], heights: List[Any]
                   ) -> List[Tuple[Any, str]]:
    """:func:`_polygon_problems` for one batch: per-polygon min/max of x and y with numpy's reduceat."""
    pairs = np.fromiter((len(p) // 2 for p in polys), np.int64, len(polys))
    keep = np.flatnonzero(pairs)  # a trailing odd number is ignored by pycocotools (and dropped by mmdet)
    if not keep.size:
        return []
    try:
        values = np.fromiter(chain.from_iterable(polys[i] if len(polys[i]) % 2 == 0 else polys[i][:-1]
                                                 for i in keep), np.float64, 2 * int(pairs.sum()))
    except (TypeError, ValueError):  # a coordinate that is not a number: find them one by one
        found = [(ids[i], _first_bad_coordinate(polys[i], widths[i], heights[i])) for i in keep]
        return [(i, r) for i, r in found if r]
    starts = np.cumsum(pairs[keep]) - pairs[keep]
    xs, ys = values[0::2], values[1::2]
    w = np.asarray(widths, np.float64)[keep]
    h = np.asarray(heights, np.float64)[keep]
    with np.errstate(invalid='ignore'):
        lo_x, hi_x = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)  # NaN propagates
        lo_y, hi_y = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
        fine = (lo_x >= -w) & (hi_x <= 2 * w) & (lo_y >= -h) & (hi_y <= 2 * h)  # False for NaN and inf
    found = [(ids[keep[k]], _first_bad_coordinate(polys[keep[k]], widths[keep[k]], heights[keep[k]]))
             for k in np.flatnonzero(~fine)]
    return [(i, r) for i, r in found if r]


def _polygon_problems(anns: List[Dict], images: Dict[Any, Dict]) -> List[Tuple[Any, str]]:
    """(annotation id, reason) for polygons with coordinates that are not finite numbers near their image.

    pycocotools rasterises polygons in C with ``int`` coordinates: NaN, inf or
    1e10 make it allocate and write past what it allocated (a segfault, no
    message). Allowed: ``-width <= x <= 2 * width`` and the same for ``y`` and
    the height (one image size around the image). Numbers in strings pass, as
    pycocotools converts them. Checked with numpy, in batches of polygons.
    """
    ids: List[Any] = []
    polys: List[List[Any]] = []
    widths: List[float] = []
    heights: List[float] = []
    for a in anns:  # plain lists, no tuple per polygon: millions of small containers would wake the GC
        seg = a.get('segmentation')
        if isinstance(seg, list):
            img = images[a['image_id']]
            for p in seg:
                if isinstance(p, list):
                    ids.append(a['id'])
                    polys.append(p)
                    widths.append(img['width'])
                    heights.append(img['height'])
    problems: List[Tuple[Any, str]] = []
    for lo in range(0, len(polys), _POLY_BATCH):
        problems += _polygon_batch(ids[lo:lo + _POLY_BATCH], polys[lo:lo + _POLY_BATCH],
                                   widths[lo:lo + _POLY_BATCH], heights[lo:lo + _POLY_BATCH])
    return problems


def _check_segmentations(anns: List[Dict], by_id: Dict[Any, Dict], bad: Any, evaluated: bool) -> None:
    """Refuse segmentations that pycocotools (mmdet's mask loading and COCO evaluation) would crash on.

    Every annotation with a segmentation is checked (COCO evaluation decodes
    them all, dropped boxes and crowds included). Raises ``bad(message)``.
    """
    shape = [a['id'] for a in anns if a.get('segmentation') and not isinstance(a['segmentation'], (list, dict))]
    shape += [a['id'] for a in anns if isinstance(a.get('segmentation'), list)
              and not all(isinstance(p, list) for p in a['segmentation'])]
    if shape:
        raise bad(f'{len(shape)} annotations have a segmentation that is neither a list of polygons (lists of '
                  f'x, y numbers) nor an RLE dict (size, counts): annotation ids {_few(shape)}')
    coords = _polygon_problems(anns, by_id)
    if coords:
        raise bad(f'{len(coords)} annotations have polygon coordinates that are not finite numbers within one '
                  f'image size of their image (-width <= x <= 2*width, -height <= y <= 2*height), which crash '
                  f'pycocotools: annotation ids {_few(f"{i} ({r})" for i, r in coords)}')
    rles = []
    for a in anns:
        seg = a.get('segmentation')
        if isinstance(seg, dict):
            img = by_id[a['image_id']]
            reason = _rle_problem(seg, img['height'], img['width'])
            if reason:
                rles.append(f'{a["id"]} ({reason})')
    if rles:
        raise bad(f'{len(rles)} annotations have an RLE mask pycocotools cannot decode into their image: '
                  f'annotation ids {_few(rles)}')
    if evaluated:
        short = [a['id'] for a in anns if isinstance(a.get('segmentation'), list)
                 and any(len(p) < 6 or len(p) % 2 for p in a['segmentation'])]
        if short:
            raise bad(f'{len(short)} annotations have polygons with fewer than 3 points or an odd number of '
                      f'coordinates, on which COCO mask evaluation (pycocotools) fails or reads a box: '
                      f'annotation ids {_few(short)}; a polygon needs at least 6 numbers x1, y1, x2, y2, x3, y3')


def _check_instances(data: Dict, ds: Dict, path: Path, bad: Any, train: bool, scope: str) -> List[str]:
    """The checks of an instance annotation file (CocoDataset and subclasses but panoptic ones).

    Returns the warning line about what mmdet drops (if any); raises ``bad(message)``.
    """
    images = data['images']
    by_id = {img['id']: img for img in images}
    anns = data.get('annotations')
    cats = data.get('categories')
    if anns is not None and not isinstance(anns, list):
        raise bad(f'"annotations" is a {type(anns).__name__}, not a list')
    if not isinstance(cats, list):
        raise bad('has no "categories" list (id, name)')

    # -- categories: structure, unique ids and names, the config's classes --
    if any(not isinstance(c, dict) or not _hashable(c.get('id')) or not isinstance(c.get('name'), str)
           for c in cats):
        raise bad('every "categories" entry needs an id and a name')
    _one_id_type((c['id'] for c in cats), 'category', bad)
    dup_cats = [k for k, n in Counter(c['id'] for c in cats).items() if n > 1]
    if dup_cats:
        raise bad(f'duplicate category ids {_few(dup_cats)}')
    classes = _config_classes(ds, scope)
    dup_names = [k for k, n in Counter(c['name'] for c in cats).items()
                 if n > 1 and (classes is None or k in classes)]
    if dup_names:
        raise bad(f'duplicate category names {_few(repr(n) for n in dup_names)} (mmdet would give one class '
                  'several labels)')
    file_names = [c['name'] for c in cats]
    if classes is not None:
        absent = [c for c in classes if c not in file_names]
        if absent:
            raise bad(f'the config\'s classes {_few(repr(c) for c in absent)} are not categories of the file '
                      f'(it has {_few((repr(n) for n in file_names), 8)}); set metainfo=dict(classes=...) '
                      'of the dataset to the file\'s category names')
        order = tuple(n for n in file_names if n in classes)
        if order != classes:
            raise bad(f'the config\'s classes are in another order than the file\'s categories '
                      f'({_few((repr(n) for n in order), 8)}); mmdet numbers classes in the file\'s order, '
                      'so list them in that order')
    used_cats = {c['id'] for c in cats if classes is None or c['name'] in classes}
    cat_ids = {c['id'] for c in cats}

    # -- annotations: structure, unique ids, known images and categories --
    anns = anns or []
    if not anns:
        if 'annotations' in data or train:
            raise bad('has no annotations (the "annotations" list is missing or empty); '
                      'there is nothing to train or evaluate on')
    malformed = [i for i, a in enumerate(anns)
                 if not isinstance(a, dict) or not all(_hashable(a.get(k)) for k in ('id', 'image_id', 'category_id'))
                 or (not a.get('ignore') and (not isinstance(a.get('bbox'), list) or len(a['bbox']) != 4
                                              or not all(_is_number(v) for v in a['bbox'])
                                              or not _is_number(a.get('area'))))]
    if malformed:
        raise bad(f'{len(malformed)} of {len(anns)} annotations lack an id, image_id, category_id, a bbox of '
                  f'4 finite numbers or a numeric area (annotations[{_few(malformed)}])')
    # corners float32 cannot hold: mmdet keeps such a box (it overlaps its image) and loads it as inf
    huge = [a['id'] for a in anns if not a.get('ignore')
            and not all(abs(v) < _FLOAT32_MAX for v in (a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3],
                                                         *a['bbox']))]
    if huge:
        raise bad(f'{len(huge)} annotations have a bbox whose corners float32 cannot hold (mmdet would load them as '
                  f'inf): annotation ids {_few(huge)}')
    dup_anns = [k for k, n in Counter(a['id'] for a in anns).items() if n > 1]
    if dup_anns:
        raise bad(f'duplicate annotation ids {_few(dup_anns)} ({len(dup_anns)} ids used more than once)')
    unknown_img = sorted({a['image_id'] for a in anns if a['image_id'] not in by_id}, key=str)
    if unknown_img:
        raise bad(f'annotations name image ids that are not in "images": {_few(unknown_img)}')
    unknown_cat = sorted({a['category_id'] for a in anns if a['category_id'] not in cat_ids}, key=str)
    if unknown_cat:
        raise bad(f'annotations name category ids that are not in "categories": {_few(unknown_cat)}')

    # -- what mmdet would drop: counted, one warning line --
    dropped: Counter = Counter()
    other_class: Counter = Counter()
    short_polys = no_mask = usable = 0
    loads_masks = _loads_masks(ds)
    maskless = []
    id_to_name = {c['id']: c['name'] for c in cats}
    for a in anns:
        if a.get('ignore'):
            continue
        reason = _drop_reason(a, by_id[a['image_id']])
        if reason:
            dropped[reason] += 1
            continue
        if a['category_id'] not in used_cats:
            other_class[id_to_name[a['category_id']]] += 1
            continue
        seg = a.get('segmentation')
        if loads_masks and not seg:
            maskless.append(a['id'])
        if isinstance(seg, list) and seg:
            bad_polys = sum(1 for p in seg if not isinstance(p, list) or len(p) < 6 or len(p) % 2)
            short_polys += bad_polys
            no_mask += bad_polys == len(seg)
        if not a.get('iscrowd'):
            usable += 1
    if maskless:
        raise bad(f'{len(maskless)} annotations have no segmentation but the pipeline loads masks '
                  f'(LoadAnnotations with_mask=True), which fails on them: annotation ids {_few(maskless)}')
    if loads_masks:
        _check_segmentations(anns, by_id, bad, evaluated=not train)
    warnings = []
    parts = [f'{n} with {r}' for r, n in sorted(dropped.items())]
    if other_class:
        parts.append(f'{sum(other_class.values())} of categories not in the config\'s classes '
                     f'({_few((repr(c) for c in sorted(other_class)), 3)})')
    total = sum(dropped.values()) + sum(other_class.values())
    lines = [f'mmdet will drop {total} of {len(anns)} annotations ({", ".join(parts)})'] if total else []
    if short_polys:
        lines.append(f'{short_polys} polygons with fewer than 3 points or an odd number of coordinates '
                     f'({no_mask} instances left without a mask are ignored)')
    if lines:
        warnings.append(f'{path}: ' + '; '.join(lines) + '.')
    if train and usable == 0:
        raise bad(f'none of its {len(anns)} annotations can be trained on (all are crowd, dropped boxes or '
                  'of categories not in the config\'s classes)')
    return warnings


def _instance_file(ds: Dict, scope: str) -> bool:
    """Whether the dataset reads a COCO instance file (CocoDataset, LVIS, Objects365; not panoptic)."""
    cls = _dataset_class(scope, ds.get('type', 'CocoDataset'))
    if cls is None:
        return str(ds.get('type', 'CocoDataset')).split('.')[-1] == 'CocoDataset'
    names = [c.__name__ for c in cls.__mro__]
    return 'CocoDataset' in names and not any('Panoptic' in n for n in names)


def check_annotations(ds: Dict, loader_name: str = '', config_path: str = '', *, scope: str = 'mmdet',
                      train: Optional[bool] = None, skip_bad_images: bool = False,
                      out_dir: Optional[str] = None,
                      seen: Optional[Dict[str, Tuple[Optional[Tuple[int, int]], str]]] = None) -> List[str]:
    """Check a COCO-format (``.json``) annotation file of a dataset config and its images.

    Args:
        ds: The dataset config (``ann_file``, ``data_root``, ``data_prefix``, ``metainfo``).
        loader_name: Shown in messages; ``train_*`` loaders need usable annotations.
        config_path: Shown in messages.
        scope: ``mmdet`` (where the dataset type is looked up for its default classes).
        train: Whether the data set is trained on; default: ``loader_name`` starts with ``train``.
        skip_bad_images: Leave missing and unreadable images out (filtered copy in ``out_dir``,
            ``ds['ann_file']`` pointed at it) instead of raising.
        out_dir: Folder for the filtered copy (default ``work_dirs/data_checks``).
        seen: Cache of image checks shared between data sets.

    Returns:
        Warning lines (at most two per file: dropped annotations, skipped images).

    Raises:
        BadAnnotationError: The file is not valid JSON or not COCO format, has
            duplicate or unknown ids, classes that do not match the config, no
            usable annotation (training), or names missing images.
        BadImageError: Images cannot be read, or differ in size from the file.
    """
    ann = ds.get('ann_file')
    if not ann or not str(ann).endswith('.json'):
        return []
    root = Path(ds.get('data_root') or '')
    path = root / ann
    if not path.is_file():
        if path.is_dir():
            raise BadAnnotationError(f'Annotation file is a folder: {path} {_where(loader_name, config_path)}.')
        return []  # reported by check_data
    train = loader_name.startswith('train') if train is None else train
    where = _where(loader_name, config_path)
    expected = ('Expected a COCO-format JSON object with "images" (id, file_name, height, width), '
                '"annotations" and "categories" lists.')

    def bad(msg: str) -> BadAnnotationError:
        return BadAnnotationError(f'{path}: {msg} {where}.')

    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BadAnnotationError(f'Annotation file is not valid JSON: {path} {where}: {err}. {expected}') from None
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise BadAnnotationError(f'Annotation file has no "images" list: {path} {where}. {expected}')
    images = data['images']
    # -- images: structure, unique ids --
    malformed = [i for i, img in enumerate(images)
                 if not isinstance(img, dict) or not _hashable(img.get('id'))
                 or not isinstance(img.get('file_name'), str) or not img.get('file_name')
                 or not all(_is_number(img.get(k)) and img.get(k) > 0 for k in ('width', 'height'))]
    if malformed:
        raise bad(f'{len(malformed)} of {len(images)} images lack an id, a file_name or a positive '
                  f'width/height (images[{_few(malformed)}]); mmdet needs all four')
    if not images:
        raise bad('has no images (the "images" list is empty)')
    _one_id_type((img['id'] for img in images), 'image', bad)
    dup_imgs = [k for k, n in Counter(img['id'] for img in images).items() if n > 1]
    if dup_imgs:
        raise bad(f'duplicate image ids {_few(dup_imgs)} ({len(dup_imgs)} ids used by more than one image; '
                  'mmdet would pair an image with another image\'s annotations)')
    warnings = _check_instances(data, ds, path, bad, train, scope) if _instance_file(ds, scope) else []

    # -- images on disk: present, readable, of the stated size --
    prefix = ds.get('data_prefix') or {}
    img_dir = root / ((prefix.get('img') or prefix.get('img_path') or '') if isinstance(prefix, dict) else '')
    files = {img['id']: str(img_dir / img['file_name']) for img in images}
    found = _inspect_many(list(files.values()), {} if seen is None else seen)
    missing = [img['file_name'] for img in images if found[files[img['id']]][1] == 'missing']
    unreadable = [(img['file_name'], found[files[img['id']]][1]) for img in images
                  if found[files[img['id']]][1] not in ('', 'missing')]
    if missing and not skip_bad_images:
        raise BadAnnotationError(
            f'{len(missing)} of {len(images)} images named in {path} are missing under {img_dir} {where}, '
            f'e.g. {", ".join(missing[:3])}. Expected every images[].file_name to exist under {img_dir}.')
    if unreadable and not skip_bad_images:
        raise BadImageError(f'{path}: {len(unreadable)} of {len(images)} images cannot be read {where}: '
                            f'{_few((f"{img_dir / n} ({r})" for n, r in unreadable), 10)}; {_SKIP_HINT}.')
    wrong = [(img['file_name'], (img['width'], img['height']), found[files[img['id']]][0]) for img in images
             if found[files[img['id']]][0] not in (None, (img['width'], img['height']))]
    if wrong:
        raise BadImageError(
            f'{path}: {len(wrong)} images have another size than their width/height in the file {where}: '
            + _few((f'{n} is {s[0]}x{s[1]}, the file says {j[0]}x{j[1]}' for n, j, s in wrong), 5)
            + '; mmdet uses the stated size, so fix width/height in the file.')
    if missing or unreadable:
        skipped = set(missing) | {n for n, _ in unreadable}
        keep = [img for img in images if img['file_name'] not in skipped]
        if not keep:
            raise BadImageError(f'{path}: none of its {len(images)} images can be read {where}.')
        keep_ids = {img['id'] for img in keep}
        copy = dict(data, images=keep)
        if isinstance(data.get('annotations'), list):
            copy['annotations'] = [a for a in data['annotations']
                                   if not isinstance(a, dict) or a.get('image_id') in keep_ids]
        target = Path(out_dir or Path('work_dirs') / CHECKS_DIR) / f'{loader_name or "data"}_{path.name}'
        with atomic_write(str(target), 'w') as f:
            json.dump(copy, f)
        ds['ann_file'] = str(target.resolve())
        reasons = [f'{n} (missing)' for n in missing] + [f'{n} ({r})' for n, r in unreadable]
        warnings.append(f'{path}: --skip-bad-images leaves out {len(skipped)} of {len(images)} images: '
                        f'{_few(reasons, 20)}; {loader_name or "the dataset"} reads the filtered copy {target}.')
    return warnings


# ---- mmseg folder datasets ----------------------------------------------------------------------------------
def _suffixes(ds: Dict, scope: str) -> Tuple[str, str]:
    """``img_suffix`` and ``seg_map_suffix`` of a segmentation dataset config (class defaults if unset)."""
    defaults = {'img_suffix': '.jpg', 'seg_map_suffix': '.png'}
    cls = _dataset_class(scope, ds.get('type', 'BaseSegDataset'))
    if cls is not None:
        try:
            params = inspect.signature(cls.__init__).parameters
            for key in defaults:
                if key in params and isinstance(params[key].default, str):
                    defaults[key] = params[key].default
        except (TypeError, ValueError):
            pass
    return ds.get('img_suffix') or defaults['img_suffix'], ds.get('seg_map_suffix') or defaults['seg_map_suffix']


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


def _seg_label_transform(ds: Dict, scope: str) -> Tuple[bool, Optional[Dict[int, int]]]:
    """``reduce_zero_label`` and the ``label_map`` mmseg applies to a data set's label values.

    ``label_map`` as mmseg's ``BaseSegDataset.get_label_map``: set when the
    config's ``metainfo.classes`` differ from the data set type's classes.
    """
    cls = _dataset_class(scope, ds.get('type', 'BaseSegDataset'))
    reduce_zero_label = ds.get('reduce_zero_label')
    if reduce_zero_label is None:
        reduce_zero_label = False
        if cls is not None:
            try:
                param = inspect.signature(cls.__init__).parameters.get('reduce_zero_label')
                reduce_zero_label = bool(param.default) if param is not None and isinstance(param.default, bool) \
                    else False
            except (TypeError, ValueError):
                pass
    meta = ds.get('metainfo') or {}
    new = meta.get('classes') if isinstance(meta, dict) else None
    old = (getattr(cls, 'METAINFO', None) or {}).get('classes') if cls is not None else None
    if new is None or old is None or list(new) == list(old) or not set(new) <= set(old):
        return bool(reduce_zero_label), None
    return bool(reduce_zero_label), {i: (list(new).index(c) if c in new else 255) for i, c in enumerate(old)}


def _seg_num_classes(ds: Dict, scope: str) -> Optional[int]:
    """The number of classes of a segmentation data set (its ``metainfo.classes``, else its type's)."""
    meta = ds.get('metainfo') or {}
    classes = meta.get('classes') if isinstance(meta, dict) else None
    if classes is None:
        cls = _dataset_class(scope, ds.get('type', 'BaseSegDataset'))
        classes = (getattr(cls, 'METAINFO', None) or {}).get('classes') if cls is not None else None
    return len(classes) if classes else None


def _wrong_labels(values: Sequence[int], num_classes: int, ignore_index: int, reduce_zero_label: bool,
                  label_map: Optional[Dict[int, int]]) -> List[int]:
    """The values of a label map (as stored) that are no class index 0..num_classes-1 nor ignore_index once
    mmseg has applied ``reduce_zero_label`` and ``label_map``."""
    wrong = []
    for raw in values:
        v = raw
        if reduce_zero_label:
            v = 255 if v in (0, 255) else v - 1
        if label_map is not None:
            v = label_map.get(v, v)
        if not (0 <= v < num_classes or v == ignore_index):
            wrong.append(raw)
    return wrong


def check_seg_folder(ds: Dict, loader_name: str = '', config_path: str = '', *, scope: str = 'mmseg',
                     skip_bad_images: bool = False, out_dir: Optional[str] = None,
                     seen: Optional[Dict[str, Any]] = None, num_classes: Optional[int] = None,
                     ignore_index: int = 255) -> List[str]:
    """Check an mmseg folder dataset: every image has a readable label map of its size and valid values.

    The images are those mmseg lists: the names in ``ann_file`` (a split file)
    when given, else every file ending in ``img_suffix`` under the image folder.
    Every label map is decoded in full (:func:`inspect_label_map`): its values,
    after the data set's ``reduce_zero_label`` and ``label_map``, must be class
    indices ``0..num_classes-1`` or ``ignore_index`` (another value is an
    IndexError in the loss). All files, not a sample: one bad file fails
    the run whenever it comes, and the decode is what finds damaged files too.

    Args:
        num_classes: The model's (decode head's) class count; default: the data set's classes.
        ignore_index: The label value the loss ignores.

    Returns:
        Warning lines (skipped images).

    Raises:
        BadAnnotationError: No images, or images without their label map.
        BadImageError: Unreadable images or label maps, label maps of another size or with
            values that are not classes.
    """
    prefix = ds.get('data_prefix') or {}
    if not isinstance(prefix, dict) or not prefix.get('img_path'):
        return []
    root = Path(ds.get('data_root') or '')
    img_dir = root / prefix['img_path']
    seg_dir = root / prefix['seg_map_path'] if prefix.get('seg_map_path') else None
    if not img_dir.is_dir() or (seg_dir is not None and not seg_dir.is_dir()):
        return []  # reported by check_data
    where = _where(loader_name, config_path)
    img_suffix, seg_suffix = _suffixes(ds, scope)
    split = root / ds['ann_file'] if ds.get('ann_file') else None
    if split is not None and split.is_file():
        names = [line.strip() for line in split.read_text(encoding='utf-8', errors='replace').splitlines()
                 if line.strip()]
        source = str(split)
    else:
        names = sorted(str(p.relative_to(img_dir))[:-len(img_suffix)] for p in img_dir.rglob(f'*{img_suffix}')
                       if p.is_file())
        source = str(img_dir)
    if not names:
        raise BadAnnotationError(f'{source}: no images ending in {img_suffix} {where}; nothing to '
                                 f'{"train" if loader_name.startswith("train") else "evaluate"} on.')
    pairs = {n: (str(img_dir / (n + img_suffix)), str(seg_dir / (n + seg_suffix)) if seg_dir else None)
             for n in names}
    seen = {} if seen is None else seen
    found = _inspect_many([img for img, _ in pairs.values()], seen)
    labels = _inspect_labels([seg for _, seg in pairs.values() if seg], seen)
    if num_classes is None:
        num_classes = _seg_num_classes(ds, scope)
    reduce_zero_label, label_map = _seg_label_transform(ds, scope)
    problems = []
    wrong = []
    values = []
    for n, (img, seg) in pairs.items():
        isize, ireason = found[img]
        if ireason:
            problems.append((n, f'{img} ({ireason})'))
            continue
        if seg is None:
            continue
        ssize, sreason, present = labels[seg]
        if sreason:
            problems.append((n, f'label map {seg} ({sreason})'))
            continue
        if ssize != isize:
            wrong.append(f'{seg} is {ssize[0]}x{ssize[1]}, {Path(img).name} is {isize[0]}x{isize[1]}')
        if num_classes is not None:
            bad_values = _wrong_labels(present, num_classes, ignore_index, reduce_zero_label, label_map)
            if bad_values:
                values.append(f'{seg} ({_few(bad_values, 3)})')
    if problems and not skip_bad_images:
        raise BadImageError(f'{source}: {len(problems)} of {len(names)} image/label pairs are missing or cannot '
                            f'be read {where}: {_few((p for _, p in problems), 10)}; {_SKIP_HINT}.')
    if wrong:
        raise BadImageError(f'{source}: {len(wrong)} label maps differ in size from their image {where}: '
                            f'{_few(wrong, 5)}.')
    if values:
        how = ' (after reduce_zero_label: 0 becomes 255, the others minus 1)' if reduce_zero_label else ''
        how += ' (after the label_map of metainfo.classes)' if label_map else ''
        raise BadImageError(
            f'{source}: {len(values)} of {len(names)} label maps hold values that are not classes of the model '
            f'{where}: {_few(values, 5)}; with num_classes={num_classes} a label must be 0..{num_classes - 1} or '
            f'{ignore_index} (ignored){how}, else the loss fails (IndexError): fix the label maps or the '
            'decode head\'s num_classes / the data set\'s reduce_zero_label.')
    if not problems:
        return []
    bad_names = {n for n, _ in problems}
    keep = [n for n in names if n not in bad_names]
    if not keep:
        raise BadImageError(f'{source}: none of its {len(names)} image/label pairs can be read {where}.')
    target = Path(out_dir or Path('work_dirs') / CHECKS_DIR) / f'{loader_name or "data"}_split.txt'
    with atomic_write(str(target), 'w') as f:
        f.write(''.join(n + '\n' for n in keep))
    ds['ann_file'] = str(target.resolve())
    return [f'{source}: --skip-bad-images leaves out {len(problems)} of {len(names)} images: '
            f'{_few((p for _, p in problems), 20)}; {loader_name or "the dataset"} reads the split file {target}.']


# ---- model: backbone outputs against the neck / decode heads -------------------------------------------------
def _model_cfg(cfg: Config) -> Optional[Dict]:
    model = cfg.get('model')
    if isinstance(model, dict) and 'backbone' not in model and isinstance(model.get('module'), dict):
        model = model['module']  # a TTA wrapper (tools/test.py --tta)
    return model if isinstance(model, dict) else None


def backbone_channels(backbone: Dict) -> Optional[Tuple[List[int], Tuple[int, ...]]]:
    """Channels of the maps an MLLA backbone config returns, and its ``out_indices``.

    ``None`` when ``backbone`` is not MLLA or its arch is invalid (the model
    reports that when it is built).

    Raises:
        ValueError: ``out_indices`` holds something other than stage indices 0..3.
    """
    if not isinstance(backbone, dict) or backbone.get('type') not in ('MLLA', 'mlla_mm.MLLA'):
        return None
    try:
        settings = resolve_arch(backbone.get('arch', 'tiny'))
    except (ValueError, TypeError):
        return None
    stages = len(settings['depths'])
    oi = backbone.get('out_indices', (0, 1, 2, 3))
    oi = tuple(oi) if isinstance(oi, (list, tuple)) else (oi, )
    if not oi or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < stages for i in oi):
        raise ValueError(f'model.backbone.out_indices must be stage indices in 0..{stages - 1}, got {oi}')
    return [settings['embed_dims'] * 2**i for i in range(stages) if i in oi], oi


def check_model_config(cfg: Config, config_path: str = '') -> None:
    """Check that an MLLA backbone's outputs are what the neck (or the decode heads) expect.

    With a neck (mmdet, mmseg's FPN): the first neck's list ``in_channels``
    must equal the backbone's channels. mmseg without a neck: each decode and
    auxiliary head's ``in_channels`` must equal the channels of the outputs
    its ``in_index`` picks (without ``in_index``: a list must match all
    outputs, a number the last one). The channels of stage ``i`` are
    ``embed_dims * 2**i``.

    Raises:
        mlla_mm.errors.UsageError: One line naming the config key and both values.
    """
    model = _model_cfg(cfg)
    if model is None:
        return
    name = config_path or 'the config'
    try:
        found = backbone_channels(model.get('backbone'))
    except ValueError as err:
        raise UsageError(f'{name}: {err}') from None
    if found is None:
        return
    channels, oi = found
    gives = f'the backbone (MLLA, out_indices={oi}) returns {len(channels)} maps with channels {channels}'
    neck = model.get('neck')
    neck = neck[0] if isinstance(neck, (list, tuple)) and neck else neck
    if isinstance(neck, dict):
        ic = neck.get('in_channels')
        if isinstance(ic, (list, tuple)) and list(ic) != channels:
            raise UsageError(f'{name}: model.neck.in_channels is {list(ic)} but {gives}; make them match')
        return
    for key in ('decode_head', 'auxiliary_head'):
        heads = model.get(key)
        many = isinstance(heads, (list, tuple))
        for k, head in enumerate(heads if many else [heads]):
            if not isinstance(head, dict) or head.get('in_channels') is None:
                continue
            where = f'model.{key}[{k}]' if many else f'model.{key}'
            ic = head['in_channels']
            if 'in_index' in head:
                idx = head['in_index']
            else:  # BaseDecodeHead's default -1; heads without in_index (Mask2Former) take every map
                idx = list(range(len(channels))) if isinstance(ic, (list, tuple)) else -1
            idx_list = list(idx) if isinstance(idx, (list, tuple)) else [idx]
            if any(not isinstance(i, int) or not -len(channels) <= i < len(channels) for i in idx_list):
                raise UsageError(f'{name}: {where}.in_index is {idx} but {gives}')
            want = [channels[i] for i in idx_list]
            have = list(ic) if isinstance(ic, (list, tuple)) else [ic]
            if have != want:
                show = want if isinstance(idx, (list, tuple)) else want[0]
                raise UsageError(f'{name}: {where}.in_channels is {ic} but in_index={idx} picks maps with '
                                 f'channels {show}: {gives}; make them match')


# ---- everything a run needs ------------------------------------------------------------------------------
def _is_seg_folder(ds: Dict, scope: str) -> bool:
    prefix = ds.get('data_prefix')
    return scope == 'mmseg' and isinstance(prefix, dict) and bool(prefix.get('img_path')) \
        and not str(ds.get('ann_file') or '').endswith('.json')


def _redirect_evaluator(cfg: Config, loader_name: str, old: Path, new: str) -> None:
    """Point the loader's evaluator at the filtered annotation copy when it read the same file."""
    evaluator = cfg.get(loader_name.replace('_dataloader', '_evaluator'))
    for ev in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]:
        ann = ev.get('ann_file') if isinstance(ev, dict) else None
        if isinstance(ann, str) and os.path.abspath(ann) == os.path.abspath(old):
            ev['ann_file'] = new


def _decode_head_classes(cfg: Config) -> Dict[str, int]:
    """``num_classes`` and ``ignore_index`` of the model's decode head(s) (the smallest count of a list)."""
    model = _model_cfg(cfg)
    heads = model.get('decode_head') if model is not None else None
    heads = [h for h in (heads if isinstance(heads, (list, tuple)) else [heads]) if isinstance(h, dict)]
    counts = [h['num_classes'] for h in heads if isinstance(h.get('num_classes'), int)]
    if not counts:
        return {}
    ignore = heads[0].get('ignore_index', 255)
    fewest = min(counts)
    # A one-output binary head (num_classes 1) still takes labels 0 and 1.
    return dict(num_classes=2 if fewest == 1 else fewest, ignore_index=ignore if isinstance(ignore, int) else 255)


def check_data(cfg: Config, which: Tuple[str, ...], config_path: str = '') -> List[str]:
    """Check the model config and the data of the ``which`` dataloaders before a run.

    Raises :class:`DataNotFoundError` naming the first missing data path, and
    the errors of :func:`check_model_config`, :func:`check_annotations` and
    :func:`check_seg_folder`. With ``skip_bad_images=True`` in the config,
    missing and unreadable images are left out (see the module docstring).
    Warnings are logged (mmengine's current logger) and returned.

    Args:
        cfg: The config (``work_dir`` set: the filtered copies go there).
        which: Dataloader names to check, e.g. ``('train_dataloader', 'val_dataloader')``.
        config_path: Shown in the message.
    """
    check_model_config(cfg, config_path)
    scope = cfg.get('default_scope', 'mmdet')
    skip = bool(cfg.get('skip_bad_images', False))
    out_dir = str(Path(cfg.get('work_dir') or 'work_dirs') / CHECKS_DIR)
    seen: Dict[str, Tuple[Optional[Tuple[int, int]], str]] = {}
    warnings: List[str] = []
    for name in which:
        loader = cfg.get(name)
        if not loader:
            continue
        for ds in _datasets(loader.get('dataset')):
            for path in _paths(ds):
                if not path.exists():
                    kind, layout = LAYOUTS.get(ds.get('type'), (f'the data of {ds.get("type")}', []))
                    lines = [f'Data not found: {path} (needed by {name} of {config_path or "the config"}).',
                             f'Expected {kind}:'] + [f'    {p}' for p in layout]
                    link_to = Path(ds.get('data_root') or path)
                    lines.append(f'Put the data there (or link it: ln -s /path/to/data {link_to}), '
                                 f'or try the bundled synthetic demo: {DEMO_COMMANDS.get(scope, "make demo")}')
                    raise DataNotFoundError('\n'.join(lines))
            ann = ds.get('ann_file')
            if _is_seg_folder(ds, scope):
                warnings += check_seg_folder(ds, name, config_path, scope=scope, skip_bad_images=skip,
                                             out_dir=out_dir, seen=seen, **_decode_head_classes(cfg))
            elif ann and str(ann).endswith('.json'):
                old = Path(ds.get('data_root') or '') / ann
                warnings += check_annotations(ds, name, config_path, scope=scope, skip_bad_images=skip,
                                              out_dir=out_dir, seen=seen)
                if ds.get('ann_file') != ann:
                    _redirect_evaluator(cfg, name, old, ds['ann_file'])
    for line in warnings:
        print_log(line, logger='current', level=logging.WARNING)
    return warnings


__all__ = ['DataNotFoundError', 'BadAnnotationError', 'BadImageError', 'LAYOUTS', 'DEMO_COMMANDS', 'CHECKS_DIR',
           'check_data', 'check_annotations', 'check_seg_folder', 'check_model_config', 'backbone_channels',
           'inspect_image', 'inspect_label_map']
