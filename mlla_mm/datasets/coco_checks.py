"""COCO-format (``.json``) annotation files: the checks a detection run needs before it starts."""
from __future__ import annotations

import json
import math
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..errors import BadAnnotationError, BadImageError
from ..utils.io import atomic_write
from .check_base import CHECKS_DIR, SKIP_HINT, dataset_class, few, needed_by
from .image_files import inspect_images


def _config_classes(ds: Dict, scope: str) -> Optional[Tuple[str, ...]]:
    """The ``classes`` the dataset will use: the config's metainfo, else the dataset class's default."""
    meta = ds.get('metainfo') or {}
    classes = meta.get('classes') if isinstance(meta, dict) else None
    if classes is None:
        cls = dataset_class(scope, ds.get('type', 'CocoDataset'))
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
                  f'x, y numbers) nor an RLE dict (size, counts): annotation ids {few(shape)}')
    coords = _polygon_problems(anns, by_id)
    if coords:
        raise bad(f'{len(coords)} annotations have polygon coordinates that are not finite numbers within one '
                  f'image size of their image (-width <= x <= 2*width, -height <= y <= 2*height), which crash '
                  f'pycocotools: annotation ids {few(f"{i} ({r})" for i, r in coords)}')
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
                  f'annotation ids {few(rles)}')
    if evaluated:
        short = [a['id'] for a in anns if isinstance(a.get('segmentation'), list)
                 and any(len(p) < 6 or len(p) % 2 for p in a['segmentation'])]
        if short:
            raise bad(f'{len(short)} annotations have polygons with fewer than 3 points or an odd number of '
                      f'coordinates, on which COCO mask evaluation (pycocotools) fails or reads a box: '
                      f'annotation ids {few(short)}; a polygon needs at least 6 numbers x1, y1, x2, y2, x3, y3')


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
        raise bad(f'duplicate category ids {few(dup_cats)}')
    classes = _config_classes(ds, scope)
    dup_names = [k for k, n in Counter(c['name'] for c in cats).items()
                 if n > 1 and (classes is None or k in classes)]
    if dup_names:
        raise bad(f'duplicate category names {few(repr(n) for n in dup_names)} (mmdet would give one class '
                  'several labels)')
    file_names = [c['name'] for c in cats]
    if classes is not None:
        absent = [c for c in classes if c not in file_names]
        if absent:
            raise bad(f'the config\'s classes {few(repr(c) for c in absent)} are not categories of the file '
                      f'(it has {few((repr(n) for n in file_names), 8)}); set metainfo=dict(classes=...) '
                      'of the dataset to the file\'s category names')
        order = tuple(n for n in file_names if n in classes)
        if order != classes:
            raise bad(f'the config\'s classes are in another order than the file\'s categories '
                      f'({few((repr(n) for n in order), 8)}); mmdet numbers classes in the file\'s order, '
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
                  f'4 finite numbers or a numeric area (annotations[{few(malformed)}])')
    # corners float32 cannot hold: mmdet keeps such a box (it overlaps its image) and loads it as inf
    huge = [a['id'] for a in anns if not a.get('ignore')
            and not all(abs(v) < _FLOAT32_MAX for v in (a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3],
                                                         *a['bbox']))]
    if huge:
        raise bad(f'{len(huge)} annotations have a bbox whose corners float32 cannot hold (mmdet would load them as '
                  f'inf): annotation ids {few(huge)}')
    dup_anns = [k for k, n in Counter(a['id'] for a in anns).items() if n > 1]
    if dup_anns:
        raise bad(f'duplicate annotation ids {few(dup_anns)} ({len(dup_anns)} ids used more than once)')
    unknown_img = sorted({a['image_id'] for a in anns if a['image_id'] not in by_id}, key=str)
    if unknown_img:
        raise bad(f'annotations name image ids that are not in "images": {few(unknown_img)}')
    unknown_cat = sorted({a['category_id'] for a in anns if a['category_id'] not in cat_ids}, key=str)
    if unknown_cat:
        raise bad(f'annotations name category ids that are not in "categories": {few(unknown_cat)}')

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
                  f'(LoadAnnotations with_mask=True), which fails on them: annotation ids {few(maskless)}')
    if loads_masks:
        _check_segmentations(anns, by_id, bad, evaluated=not train)
    warnings = []
    parts = [f'{n} with {r}' for r, n in sorted(dropped.items())]
    if other_class:
        parts.append(f'{sum(other_class.values())} of categories not in the config\'s classes '
                     f'({few((repr(c) for c in sorted(other_class)), 3)})')
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
    cls = dataset_class(scope, ds.get('type', 'CocoDataset'))
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
            raise BadAnnotationError(f'Annotation file is a folder: {path} {needed_by(loader_name, config_path)}.')
        return []  # reported by check_data
    train = loader_name.startswith('train') if train is None else train
    where = needed_by(loader_name, config_path)
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
                  f'width/height (images[{few(malformed)}]); mmdet needs all four')
    if not images:
        raise bad('has no images (the "images" list is empty)')
    _one_id_type((img['id'] for img in images), 'image', bad)
    dup_imgs = [k for k, n in Counter(img['id'] for img in images).items() if n > 1]
    if dup_imgs:
        raise bad(f'duplicate image ids {few(dup_imgs)} ({len(dup_imgs)} ids used by more than one image; '
                  'mmdet would pair an image with another image\'s annotations)')
    warnings = _check_instances(data, ds, path, bad, train, scope) if _instance_file(ds, scope) else []

    # -- images on disk: present, readable, of the stated size --
    prefix = ds.get('data_prefix') or {}
    img_dir = root / ((prefix.get('img') or prefix.get('img_path') or '') if isinstance(prefix, dict) else '')
    files = {img['id']: str(img_dir / img['file_name']) for img in images}
    found = inspect_images(list(files.values()), {} if seen is None else seen)
    missing = [img['file_name'] for img in images if found[files[img['id']]][1] == 'missing']
    unreadable = [(img['file_name'], found[files[img['id']]][1]) for img in images
                  if found[files[img['id']]][1] not in ('', 'missing')]
    if missing and not skip_bad_images:
        raise BadAnnotationError(
            f'{len(missing)} of {len(images)} images named in {path} are missing under {img_dir} {where}, '
            f'e.g. {", ".join(missing[:3])}. Expected every images[].file_name to exist under {img_dir}.')
    if unreadable and not skip_bad_images:
        raise BadImageError(f'{path}: {len(unreadable)} of {len(images)} images cannot be read {where}: '
                            f'{few((f"{img_dir / n} ({r})" for n, r in unreadable), 10)}; {SKIP_HINT}.')
    wrong = [(img['file_name'], (img['width'], img['height']), found[files[img['id']]][0]) for img in images
             if found[files[img['id']]][0] not in (None, (img['width'], img['height']))]
    if wrong:
        raise BadImageError(
            f'{path}: {len(wrong)} images have another size than their width/height in the file {where}: '
            + few((f'{n} is {s[0]}x{s[1]}, the file says {j[0]}x{j[1]}' for n, j, s in wrong), 5)
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
                        f'{few(reasons, 20)}; {loader_name or "the dataset"} reads the filtered copy {target}.')
    return warnings

