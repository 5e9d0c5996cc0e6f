"""Checks of the data a config needs, run before training starts.

Every problem found is raised as a :class:`DataNotFoundError` (or a subclass)
whose message names the file; the tools print it as ``error: ...`` and exit 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from mmengine.config import Config

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


class DataNotFoundError(FileNotFoundError):
    """A data set the config needs is not on disk; the message says what to do."""


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


def check_data(cfg: Config, which: Tuple[str, ...], config_path: str = '') -> None:
    """Raise :class:`DataNotFoundError` naming the first missing data path.

    COCO-style JSON annotation files are also read: invalid JSON or images
    they name that are missing raise :class:`BadAnnotationError`.

    Args:
        cfg: The config.
        which: Dataloader names to check, e.g. ``('train_dataloader', 'val_dataloader')``.
        config_path: Shown in the message.
    """
    scope = cfg.get('default_scope', 'mmdet')
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
                    lines.append(f'Put the data there (or link it: ln -s /path/to/data {Path(ds.get("data_root") or path)}), '
                                 f'or try the bundled synthetic demo: {DEMO_COMMANDS.get(scope, "make demo")}')
                    raise DataNotFoundError('\n'.join(lines))
            check_annotations(ds, name, config_path)


class BadAnnotationError(DataNotFoundError):
    """An annotation file is not valid JSON or names images that are not on disk."""


def check_annotations(ds: Dict, loader_name: str = '', config_path: str = '') -> None:
    """Check a COCO-style (``.json``) annotation file of a dataset config.

    Raises :class:`BadAnnotationError` naming the file when it is not valid
    JSON, is not a COCO-format dict, or refers to images that do not exist.
    """
    ann = ds.get('ann_file')
    if not ann or not str(ann).endswith('.json'):
        return
    root = Path(ds.get('data_root') or '')
    path = root / ann
    if not path.is_file():
        return  # reported by check_data
    where = f'(needed by {loader_name or "a dataloader"} of {config_path or "the config"})'
    expected = ('Expected a COCO-format JSON object with "images" (id, file_name, height, width), '
                '"annotations" and "categories" lists.')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadAnnotationError(f'Annotation file is not valid JSON: {path} {where}: {err}. {expected}') from None
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise BadAnnotationError(f'Annotation file has no "images" list: {path} {where}. {expected}')
    prefix = ds.get('data_prefix') or {}
    img_dir = root / (prefix.get('img') or prefix.get('img_path') or '' if isinstance(prefix, dict) else '')
    missing = []
    for img in data['images']:
        name = img.get('file_name') if isinstance(img, dict) else None
        if not isinstance(name, str) or not (img_dir / name).is_file():
            missing.append(str(name))
    if missing:
        raise BadAnnotationError(
            f'{len(missing)} of {len(data["images"])} images named in {path} are missing under {img_dir} {where}, '
            f'e.g. {", ".join(missing[:3])}. Expected every images[].file_name to exist under {img_dir}.')
