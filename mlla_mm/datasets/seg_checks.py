"""mmseg folder datasets (``images/`` + ``annotations/``): the checks a segmentation run needs."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import BadAnnotationError, BadImageError
from ..utils.io import atomic_write
from .check_base import CHECKS_DIR, SKIP_HINT, dataset_class, few, needed_by
from .image_files import inspect_images, inspect_label_maps


def _suffixes(ds: Dict, scope: str) -> Tuple[str, str]:
    """``img_suffix`` and ``seg_map_suffix`` of a segmentation dataset config (class defaults if unset)."""
    defaults = {'img_suffix': '.jpg', 'seg_map_suffix': '.png'}
    cls = dataset_class(scope, ds.get('type', 'BaseSegDataset'))
    if cls is not None:
        try:
            params = inspect.signature(cls.__init__).parameters
            for key in defaults:
                if key in params and isinstance(params[key].default, str):
                    defaults[key] = params[key].default
        except (TypeError, ValueError):
            pass
    return ds.get('img_suffix') or defaults['img_suffix'], ds.get('seg_map_suffix') or defaults['seg_map_suffix']


def _seg_label_transform(ds: Dict, scope: str) -> Tuple[bool, Optional[Dict[int, int]]]:
    """``reduce_zero_label`` and the ``label_map`` mmseg applies to a data set's label values.

    ``label_map`` as mmseg's ``BaseSegDataset.get_label_map``: set when the
    config's ``metainfo.classes`` differ from the data set type's classes.
    """
    cls = dataset_class(scope, ds.get('type', 'BaseSegDataset'))
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
        cls = dataset_class(scope, ds.get('type', 'BaseSegDataset'))
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
    where = needed_by(loader_name, config_path)
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
    found = inspect_images([img for img, _ in pairs.values()], seen)
    labels = inspect_label_maps([seg for _, seg in pairs.values() if seg], seen)
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
                values.append(f'{seg} ({few(bad_values, 3)})')
    if problems and not skip_bad_images:
        raise BadImageError(f'{source}: {len(problems)} of {len(names)} image/label pairs are missing or cannot '
                            f'be read {where}: {few((p for _, p in problems), 10)}; {SKIP_HINT}.')
    if wrong:
        raise BadImageError(f'{source}: {len(wrong)} label maps differ in size from their image {where}: '
                            f'{few(wrong, 5)}.')
    if values:
        how = ' (after reduce_zero_label: 0 becomes 255, the others minus 1)' if reduce_zero_label else ''
        how += ' (after the label_map of metainfo.classes)' if label_map else ''
        raise BadImageError(
            f'{source}: {len(values)} of {len(names)} label maps hold values that are not classes of the model '
            f'{where}: {few(values, 5)}; with num_classes={num_classes} a label must be 0..{num_classes - 1} or '
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
            f'{few((p for _, p in problems), 20)}; {loader_name or "the dataset"} reads the split file {target}.']

