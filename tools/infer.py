#!/usr/bin/env python
"""Draw a detector's (mmdet) or segmentor's (mmseg) predictions on images.

    python tools/infer.py CONFIG WEIGHTS IMAGE_OR_FOLDER --out DIR [--score-thr 0.3]
                          [--device cpu|cuda] [--cfg-options k=v ...] [--max-pixels N] [--force]

For every image (a folder is searched recursively for .jpg, .jpeg, .png,
.bmp, .tif, .tiff and .webp files, with a progress bar) it writes
``DIR/<same relative path>.png``: the image, at its own size, with the
predicted boxes, masks and ``class 0.49`` labels or the predicted
segmentation drawn on it (mlla_mm/visualization.py, the look of every
tool). The config's
``default_scope`` decides which. The test pipeline of the config (its
resize, without loading annotations) is used, and the weights are read
through mmengine's checkpoint loader (mlla-mm's safe loader) and must fit
the config's model exactly. Class names come from the checkpoint (mmengine
saves the data set's meta) or else from the config's test data set.

Output names never collide (``a.png``, ``a_jpg.png`` and ``a.jpg`` give
three pictures; a name already taken gets ``_2``, ``_3``, ...). No picture
replaces an input (an image, the weights, the config: refused even with
``--force``) or an existing file the tools did not write (their PNGs carry a
``Software: mlla-mm`` text chunk) unless ``--force`` is given.

An image that cannot be read, or whose header says it has more than
``--max-pixels`` pixels (default 50 million; checked before it is decoded),
is skipped with a ``warning:`` line and the rest continue. Missing
config, weights or images, weights that do not fit the model, a bad
argument (``--device``, ``--cfg-options``) or an ``--out`` that cannot be
written give one ``error:`` line and exit code 2, the last two before the
model is built.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
SCOPES = ('mmdet', 'mmseg')
#: Default ``--max-pixels``: 50 million pixels (about 150 MB decoded, BGR uint8).
DEFAULT_MAX_PIXELS = 50_000_000


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mlla_mm.cli import CfgOptionsAction, ToolArgumentParser, positive_int
    parser = ToolArgumentParser(description='Draw the predictions of an mmdet or mmseg config on images.')
    parser.add_argument('config', help='config file')
    parser.add_argument('weights', help='checkpoint of the whole model (e.g. work_dirs/<name>/epoch_12.pth)')
    parser.add_argument('images', help='an image file, or a folder searched recursively for images')
    parser.add_argument('--out', required=True, help='folder for the pictures (PNG)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes and masks scoring at least this (default 0.3)')
    parser.add_argument('--device', default=None, help='cpu or cuda[:N] (default: cuda when available)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default=None, metavar='KEY=VALUE',
                        help='override config entries')
    parser.add_argument('--max-pixels', type=positive_int, default=DEFAULT_MAX_PIXELS, metavar='N',
                        help='skip (with a warning) an image with more pixels than this, read from its header '
                             f'before decoding (default {DEFAULT_MAX_PIXELS:,})')
    parser.add_argument('--force', action='store_true',
                        help='overwrite existing files in --out that mlla-mm did not write (never an input)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: infer(args))


def find_images(path: str, skip: Optional[str] = None) -> List[Path]:
    """The image file ``path``, or the images under the folder ``path`` (sorted), none under the folder ``skip``.

    ``skip`` is ``--out``: an output folder inside the input folder holds this tool's pictures of an earlier run,
    not images to draw on (read as inputs, a second run would refuse to overwrite them).
    """
    from mlla_mm.cli import UsageError
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        out = os.path.realpath(skip) if skip else None
        if out == os.path.realpath(p):  # --out is the input folder itself: every picture would be an input (refused)
            out = None

        def outside_out(f: Path) -> bool:
            return out is None or os.path.commonpath([os.path.realpath(f), out]) != out

        images = sorted(f for f in p.rglob('*')
                        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and outside_out(f))
        if not images:
            raise UsageError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in folder: {path}')
        return images
    raise UsageError(f'image or folder not found: {path}')


def output_paths(images: List[Path], root: Path, out: Path) -> Dict[Path, Path]:
    """A distinct ``out/<path relative to root>.png`` for each image.

    PNGs keep their names; ``a.jpg`` next to ``a.png`` becomes ``a_jpg.png``,
    and a name still taken gets ``_2``, ``_3``, ... (:func:`mlla_mm.utils.io.distinct_paths`).
    """
    from mlla_mm.utils.io import distinct_paths
    order = sorted(images, key=lambda p: p.suffix.lower() != '.png')  # PNGs keep their names
    candidates = []
    for img in order:
        rel = img.relative_to(root) if root.is_dir() else Path(img.name)
        candidates.append([str(out / rel.with_suffix('.png')),
                           str(out / rel.with_name(f'{rel.stem}_{rel.suffix.lstrip(".").lower()}.png'))])
    return {img: Path(t) for img, t in zip(order, distinct_paths(candidates))}


def dataset_meta(cfg: Any, checkpoint: Dict) -> Dict[str, Any]:
    """Classes and palette: from the checkpoint's meta, else from the config's test data set."""
    from mmengine.registry import DATASETS
    meta = dict((checkpoint.get('meta') or {}).get('dataset_meta') or {})
    if not meta.get('classes'):
        ds = (cfg.get('test_dataloader') or {}).get('dataset') or {}
        while isinstance(ds, dict) and 'dataset' in ds:  # wrappers such as RepeatDataset
            ds = ds['dataset']
        cls = DATASETS.get(ds.get('type')) if isinstance(ds, dict) and ds.get('type') else None
        meta = dict(getattr(cls, 'METAINFO', {}) or {})
        meta.update(ds.get('metainfo') or {})
    return meta


def with_palette(meta: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """``meta`` with classes and a palette for at least ``num_classes`` classes."""
    import numpy as np
    classes = list(meta.get('classes') or [])
    classes += [f'class {i}' for i in range(len(classes), num_classes)]
    palette = [tuple(int(v) for v in c) for c in (meta.get('palette') or [])]
    if len(palette) < len(classes):
        extra = np.random.default_rng(0).integers(0, 256, (len(classes) - len(palette), 3))
        palette += [tuple(int(v) for v in c) for c in extra]
    return dict(meta, classes=classes, palette=palette)


def head_classes(cfg: Any) -> int:
    """Number of classes the model predicts (0 when the config does not say)."""
    model = cfg.model
    for head in ('decode_head', 'bbox_head'):
        if isinstance(model.get(head), dict) and 'num_classes' in model[head]:
            return int(model[head]['num_classes'])
    bbox = (model.get('roi_head') or {}).get('bbox_head')
    bbox = bbox[-1] if isinstance(bbox, (list, tuple)) else bbox
    return int((bbox or {}).get('num_classes', 0))


def build_model(cfg: Any, weights: str, device: Any, config_path: str):
    """Build the config's model, load ``weights`` (strictly), move it to ``device``, eval mode."""
    import torch
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    from mlla_mm.checkpoint import CheckpointError
    from mlla_mm.cli import UsageError, one_line
    backbone = cfg.model.get('backbone')
    if isinstance(backbone, dict) and backbone.get('init_cfg'):
        backbone.init_cfg = None  # the whole model comes from WEIGHTS
    try:
        model = MODELS.build(cfg.model)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f'{config_path}: {one_line(err)}') from None
    model = revert_sync_batchnorm(model)
    try:
        checkpoint = load_checkpoint(model, weights, map_location='cpu', strict=True)
    except CheckpointError:
        raise  # unreadable or refused file: run_main reports it
    except RuntimeError as err:  # mmengine's strict load: missing / unexpected / wrong-shape tensors
        raise UsageError(f'weights {weights} do not fit the model of {config_path}: {one_line(err)[:300]}') from None
    model.to(torch.device(device)).eval()
    return model, checkpoint if isinstance(checkpoint, dict) else {}


def inference_pipeline(cfg: Any, scope: str):
    """The config's test pipeline reading an array instead of a file, without annotations."""
    from mmcv.transforms import Compose
    ds = cfg.test_dataloader.dataset
    while 'pipeline' not in ds and 'dataset' in ds:
        ds = ds.dataset
    steps = [copy.deepcopy(t) for t in ds.pipeline if 'LoadAnnotations' not in str(t.get('type'))]
    if not steps or 'LoadImageFromFile' not in str(steps[0].get('type')):
        from mlla_mm.cli import UsageError
        raise UsageError('infer: the test pipeline must start with LoadImageFromFile')
    steps[0] = dict(type=f'{scope}.LoadImageFromNDArray')
    return Compose(steps)


def make_visualizer(scope: str, meta: Dict[str, Any]):
    """mlla-mm's OpenCV visualizer for ``meta``: the look of every tool (mlla_mm/visualization.py)."""
    from mlla_mm.visualization import FastDetVisualizer
    vis = FastDetVisualizer(name=f'mlla_mm_infer_{os.getpid()}')
    vis.dataset_meta = dict(classes=meta.get('classes'), palette=meta.get('palette'))
    return vis


def image_size(path: Path) -> Optional[tuple]:
    """(width, height) from the image's header (PIL, nothing decoded), or None when PIL cannot tell."""
    import warnings

    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size is what we want to know; PIL's bomb check would refuse to say it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(path) as img:
                return tuple(img.size)
    except Exception:  # noqa: BLE001 (any unreadable header: cv2 gets its turn)
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def too_large(path: Path, max_pixels: int) -> str:
    """Why ``path`` is not decoded (its header says more than ``max_pixels`` pixels); ``''`` otherwise."""
    size = image_size(path)
    if size and size[0] * size[1] > max_pixels:
        return (f'{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over --max-pixels {max_pixels:,} '
                '(raise it to draw this image)')
    return ''


def read_image(path: Path):
    """BGR uint8 array, or None when the file is not a readable image."""
    import cv2
    import mmcv
    try:
        img = mmcv.imread(str(path), flag='color', channel_order='bgr')
    except (OSError, ValueError, cv2.error):
        return None
    return img if img is not None and img.size else None


def infer(args: argparse.Namespace) -> int:
    import cv2
    import torch
    from mmengine.registry import init_default_scope
    from mmengine.utils import ProgressBar

    from mlla_mm.checkpoint import check_file
    from mlla_mm.cli import UsageError, check_device, check_output, load_config
    from mlla_mm.utils.io import atomic_write, check_outputs, output_path_problem, png_signed

    # Everything the user gave is checked before the model is built.
    device = check_device(args.device) if args.device else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    check_output(args.out, '--out', folder=True)
    if not 0 <= args.score_thr <= 1:  # NaN too: no box would be drawn, with exit 0
        raise UsageError(f'--score-thr: expected a score from 0 to 1, got {args.score_thr}')
    cfg = load_config(args.config, args.cfg_options)
    check_file(args.weights, name='weights')  # missing, a folder or refused: before the model is built
    images = find_images(args.images, skip=args.out)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise UsageError(f'{args.config}: default_scope must be one of {list(SCOPES)}, got {scope!r}')
    root = Path(args.images)
    targets = output_paths(images, root, Path(args.out))
    for target in targets.values():
        problem = output_path_problem(str(target))
        if problem:
            raise UsageError(f'--out {args.out}: cannot write {target}: {problem}')
    # never an input (images, weights, config), nor a file the tools did not write unless --force
    check_outputs([str(t) for t in targets.values()], [args.config, args.weights, *map(str, images)],
                  force=args.force, option='--out', error=UsageError)
    init_default_scope(scope)
    model, checkpoint = build_model(cfg, args.weights, device, args.config)
    meta = with_palette(dataset_meta(cfg, checkpoint), head_classes(cfg))
    pipeline = inference_pipeline(cfg, scope)
    vis = make_visualizer(scope, meta)

    bar = ProgressBar(len(images), file=sys.stdout) if root.is_dir() else None
    written, skipped = 0, []
    for img_path in images:
        oversize = too_large(img_path, args.max_pixels)
        img = None if oversize else read_image(img_path)
        if img is None:
            skipped.append(img_path)
            print(f'\nwarning: skipped {img_path}: {oversize or "not a readable image"}', file=sys.stderr)
        else:
            data = pipeline(dict(img=img, img_id=0) if scope == 'mmdet' else dict(img=img))
            with torch.no_grad():
                sample = model.test_step(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]))[0]
            rgb = img[:, :, ::-1].copy()
            if scope == 'mmdet':
                vis.add_datasample('prediction', rgb, data_sample=sample.cpu(), draw_gt=False,
                                   pred_score_thr=args.score_thr)
            else:
                vis.add_datasample('prediction', rgb, data_sample=sample.cpu(), draw_gt=False)
            ok, png = cv2.imencode('.png', vis.get_image()[:, :, ::-1])
            if not ok:
                raise RuntimeError(f'could not encode the picture of {img_path}')
            target = targets[img_path]
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(str(target), 'wb') as f:
                f.write(png_signed(png.tobytes()))
            written += 1
        if bar is not None:
            bar.update()
    if bar is not None:
        print()
    if not written:
        raise UsageError(f'none of the {len(images)} image(s) under {args.images} could be read (or all are over '
                         f'--max-pixels {args.max_pixels:,})')
    note = f', skipped {len(skipped)} unreadable or too large' if skipped else ''
    print(f'infer: wrote {written} picture(s) to {args.out}{note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
