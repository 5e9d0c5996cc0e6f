"""Deterministic synthetic shape data sets in COCO and ADE20K layouts.

Images hold circles, triangles and rectangles in several colours and sizes,
overlapping, on noisy backgrounds. The same seed always gives the same files.
Each file goes through :func:`mlla_mm.utils.io.atomic_write`, into a
temporary folder that is renamed into place when the data set is complete,
so an interrupted run never leaves half a data set; a finished one carries a
``.complete`` file with the parameters it was made with and is reused.

A folder the toolkit did not make is never deleted: the data set goes only
into a missing or empty folder, or replaces one that carries the toolkit's
own marker (:data:`MARKER`, written first into every data set it makes, or
the ``.complete`` file of an earlier version). Any other existing ``root``
is refused with :class:`ForeignFolderError`, naming it; nothing is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from ..errors import UsageError
from ..utils.io import atomic_write, fsync_dir

SHAPE_CLASSES: Tuple[str, ...] = ('circle', 'triangle', 'rectangle')
#: The file that marks a folder as a synthetic data set of mlla-mm (the only kind of folder it replaces).
MARKER = '.mlla-mm-synthetic'
_KINDS = ('coco-shapes', 'ade-shapes')


class ForeignFolderError(ValueError):
    """``synthetic_data.root`` is an existing folder (or file) that mlla-mm did not make; nothing was changed."""
_COLOURS = [(230, 60, 50), (60, 180, 75), (50, 100, 230), (240, 200, 40), (200, 80, 200), (70, 210, 220),
            (245, 130, 48), (250, 250, 250)]


def _draw_shape(rng: np.random.Generator, size: int) -> Tuple[int, np.ndarray]:
    """Return (class index, binary mask) of one random shape on a size x size canvas."""
    cls = int(rng.integers(len(SHAPE_CLASSES)))
    mask = np.zeros((size, size), np.uint8)
    extent = rng.uniform(0.12, 0.35) * size
    cx, cy = rng.uniform(extent * 0.6, size - extent * 0.6, 2)
    if cls == 0:
        cv2.circle(mask, (int(cx), int(cy)), int(extent / 2), 1, -1)
    elif cls == 1:
        angle = rng.uniform(0, 2 * np.pi)
        corners = [angle + k * 2 * np.pi / 3 for k in range(3)]
        pts = [(cx + extent / 1.6 * np.cos(a), cy + extent / 1.6 * np.sin(a)) for a in corners]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        w, h = extent * rng.uniform(0.6, 1.0), extent * rng.uniform(0.6, 1.0)
        angle = float(rng.uniform(0, 90))
        box = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), angle))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    return cls, mask


def _render(rng: np.random.Generator, size: int, max_objects: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image and its visible instances [(class, mask)], background class excluded."""
    base = rng.integers(40, 140, 3)
    img = np.clip(base[None, None] + rng.normal(0, 18, (size, size, 3)), 0, 255)
    owner = np.full((size, size), -1, np.int32)
    shapes = []
    for k in range(int(rng.integers(1, max_objects + 1))):
        cls, mask = _draw_shape(rng, size)
        colour = np.array(_COLOURS[int(rng.integers(len(_COLOURS)))], np.float64)
        shade = colour * rng.uniform(0.8, 1.0) + rng.normal(0, 10, (size, size, 3))
        m = mask.astype(bool)
        img[m] = np.clip(shade[m], 0, 255)
        owner[m] = k
        shapes.append((cls, mask))
    instances = []
    for k, (cls, mask) in enumerate(shapes):
        visible = owner == k
        if visible.sum() >= max(12, 0.4 * mask.sum()):
            instances.append((cls, visible.astype(np.uint8)))
    return img.astype(np.uint8), instances


def _write_image(path: Path, img: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode ``img`` (BGR or gray) in the format of ``path``'s suffix and write it atomically."""
    ok, buf = cv2.imencode(path.suffix, img, list(params))
    if not ok:
        raise ValueError(f'cannot encode an image as {path.suffix}: {path}')
    with atomic_write(str(path), 'wb') as f:
        f.write(buf.tobytes())


def _write_text(path: Path, text: str) -> None:
    with atomic_write(str(path), 'w') as f:
        f.write(text)


def _made_by_us(root: Path) -> bool:
    """Whether ``root`` carries the toolkit's marker (or an earlier version's ``.complete`` of a shapes set)."""
    if (root / MARKER).is_file():
        return True
    try:
        params = json.loads((root / '.complete').read_text())
    except (OSError, ValueError):
        return False
    return isinstance(params, dict) and params.get('kind') in _KINDS


def foreign_root_problem(root: Path) -> str:
    """Why the data set must not be written to ``root`` (an existing folder or file not made by mlla-mm); or ``''``."""
    if not os.path.lexists(root):
        return ''
    if root.is_symlink() or not root.is_dir():
        return f'synthetic_data.root {root} exists and is not a folder of synthetic data'
    if _made_by_us(root):
        return ''
    try:
        empty = next(os.scandir(root), None) is None
    except OSError as err:
        return f'synthetic_data.root {root} cannot be read ({err.strerror or err})'
    if empty:
        return ''
    return (f'synthetic_data.root {root} is a folder with files that mlla-mm did not make (no {MARKER} marker); '
            'it is left untouched: point synthetic_data.root at a new or empty folder, or remove '
            'synthetic_data from the config to use the data already there')


def _check_root(root: Path) -> None:
    problem = foreign_root_problem(root)
    if problem:
        raise ForeignFolderError(problem)


def _finish(tmp: Path, final: Path, params: Dict) -> None:
    _write_text(tmp / '.complete', json.dumps(params, sort_keys=True))
    _check_root(final)  # again: the folder may have been filled while the data were made
    if final.is_dir() and not final.is_symlink():
        if _made_by_us(final):
            shutil.rmtree(final)
        else:
            final.rmdir()  # empty (checked); an error, not a deletion, if a file appeared since
    os.replace(tmp, final)
    fsync_dir(str(final.parent))


def _is_complete(root: Path, params: Dict) -> bool:
    marker = root / '.complete'
    try:
        return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(params, sort_keys=True))
    except (OSError, ValueError):  # unreadable or not JSON: not a finished data set of these parameters
        return False


def _tmpdir(root: Path) -> Path:
    """A new temporary folder beside ``root``, the toolkit's marker written first."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
    _write_text(tmp / MARKER, 'A synthetic data set made by mlla-mm (mlla_mm/datasets/synthetic.py); '
                'it is replaced when its parameters change.\n')
    return tmp


def _make(root: str, params: Dict, write: Callable[[Path], None]) -> Path:
    """The data set ``params`` describes at ``root``: reused when complete, else ``write(tmp)`` fills a new
    temporary folder (marker first) that replaces ``root`` once finished. Returns ``root``.

    Raises:
        ForeignFolderError: ``root`` exists, is not empty and was not made by mlla-mm (nothing is changed).
    """
    root = Path(root)
    if _is_complete(root, params):
        return root
    _check_root(root)
    tmp = _tmpdir(root)
    try:
        write(tmp)
        _finish(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_coco_shapes(root: str, seed: int = 0, num_train: int = 240, num_val: int = 60, size: int = 160,
                     max_objects: int = 4) -> Path:
    """Write (or reuse) a COCO-format instance segmentation data set.

    Layout: ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``
    with RLE masks. Returns ``root``.

    Raises:
        ForeignFolderError: ``root`` exists, is not empty and was not made by mlla-mm (nothing is changed).
    """
    from pycocotools import mask as mask_utils

    def write(tmp: Path) -> None:
        (tmp / 'annotations').mkdir()
        categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(SHAPE_CLASSES)]
        for split, count, split_seed in [('train', num_train, seed), ('val', num_val, seed + 10_000)]:
            rng = np.random.default_rng(split_seed)
            (tmp / split).mkdir()
            images, anns = [], []
            for i in range(count):
                img, instances = _render(rng, size, max_objects)
                name = f'{split}_{i:05d}.png'
                _write_image(tmp / split / name, img[:, :, ::-1])
                images.append(dict(id=i + 1, file_name=name, height=size, width=size))
                for cls, m in instances:
                    rle = mask_utils.encode(np.asfortranarray(m))
                    x, y, w, h = mask_utils.toBbox(rle).tolist()
                    rle['counts'] = rle['counts'].decode('ascii')
                    anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cls + 1, segmentation=rle,
                                     area=float(mask_utils.area(rle)), bbox=[x, y, w, h], iscrowd=0))
            _write_text(tmp / 'annotations' / f'instances_{split}.json',
                        json.dumps(dict(images=images, annotations=anns, categories=categories)))

    return _make(root, dict(kind='coco-shapes', seed=seed, num_train=num_train, num_val=num_val, size=size,
                            max_objects=max_objects, version=1), write)


def make_ade_shapes(root: str, seed: int = 0, num_train: int = 200, num_val: int = 50, size: int = 128,
                    max_objects: int = 4) -> Path:
    """Write (or reuse) a semantic segmentation data set in ADE20K layout.

    Layout: ``root/images/{training,validation}/*.jpg`` and
    ``root/annotations/{training,validation}/*.png``. Label values: 0 is
    background, 1..3 are ``SHAPE_CLASSES`` (use ``reduce_zero_label=False``).
    Returns ``root``.

    Raises:
        ForeignFolderError: ``root`` exists, is not empty and was not made by mlla-mm (nothing is changed).
    """
    def write(tmp: Path) -> None:
        for split, count, split_seed in [('training', num_train, seed), ('validation', num_val, seed + 10_000)]:
            rng = np.random.default_rng(split_seed)
            (tmp / 'images' / split).mkdir(parents=True)
            (tmp / 'annotations' / split).mkdir(parents=True)
            for i in range(count):
                img, instances = _render(rng, size, max_objects)
                label = np.zeros((size, size), np.uint8)
                for cls, m in instances:
                    label[m.astype(bool)] = cls + 1
                name = f'{split}_{i:05d}'
                _write_image(tmp / 'images' / split / f'{name}.jpg', img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                _write_image(tmp / 'annotations' / split / f'{name}.png', label)

    return _make(root, dict(kind='ade-shapes', seed=seed, num_train=num_train, num_val=num_val, size=size,
                            max_objects=max_objects, version=1), write)


def random_detection_batch(size: int, n_images: int = 2, seed: int = 0) -> dict:
    """``n_images`` random ``size`` x ``size`` images with 3 boxes and masks each, in mmdet's packed-input form.

    For the speed benchmarks (``tools/benchmark.py train``, ``detector``, ``bf16``); needs mmdet.
    """
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n_images):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        k = 3
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = torch.rand(k, 2, generator=g) * size * 0.3 + 16
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        inst = InstanceData(bboxes=boxes, labels=torch.randint(0, 80, (k, ), generator=g),
                            masks=BitmapMasks(masks.numpy(), size, size))
        s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1., 1.),
                                        pad_shape=(size, size), flip=False))
        s.gt_instances = inst
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def make_synthetic_data(cfg: Any) -> None:
    """Create the synthetic data set a demo config names in ``synthetic_data`` (reused when complete).

    The one place synthetic data is made for a run: :class:`~mlla_mm.engine.runner.SafeRunner` calls it
    before the data checks (in the main process; the others wait).

    Raises:
        UsageError: ``synthetic_data.root`` is a non-empty folder that mlla-mm did not make (nothing is deleted).
        ValueError: ``synthetic_data.kind`` is unknown.
    """
    spec = cfg.get('synthetic_data') if cfg is not None else None
    if not spec:
        return
    spec = dict(spec)
    kind = spec.pop('kind', None)
    makers = {'coco-shapes': make_coco_shapes, 'ade-shapes': make_ade_shapes}
    if kind not in makers:
        raise ValueError(f'synthetic_data.kind must be one of {sorted(makers)}, got {kind!r}')
    try:
        makers[kind](**spec)
    except ForeignFolderError as err:  # a folder of the user's: one line, nothing deleted
        raise UsageError(str(err)) from None
