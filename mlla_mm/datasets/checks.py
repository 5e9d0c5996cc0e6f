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

Where each check lives: :mod:`.coco_checks` (annotation files),
:mod:`.seg_checks` (mmseg folders), :mod:`.image_files` (what one image or
label map holds: each image is checked as far as its format needs, label maps
are decoded in full; long checks show a progress line) and :mod:`.check_base`
(what they share). This module checks the model and runs them all for a config
(:func:`check_data`).

Problems are raised as :class:`DataNotFoundError` subclasses with a one-line
message naming the file (the tools print ``error: ...`` and exit 2). With
``skip_bad_images=True`` in the config (``--skip-bad-images``), missing and
unreadable images are left out instead: a filtered copy of the annotation
file (COCO) or a split file (mmseg) is written under
``<work_dir>/data_checks/`` and the dataset (and its evaluator) is pointed
at it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import BadAnnotationError, BadImageError, DataNotFoundError, UsageError
from ..models.mlla import resolve_arch
from .check_base import CHECKS_DIR
from .coco_checks import check_annotations
from .image_files import inspect_image, inspect_label_map
from .seg_checks import check_seg_folder

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
