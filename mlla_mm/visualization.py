"""One look and one layout for every picture the tools draw, with OpenCV.

Every tool that draws (``tools/test.py --show-dir``, ``tools/demo.py``,
``make demo`` / ``make demo-seg``, ``tools/infer.py``) draws here:

- a picture per image, ``<image stem>.png`` (two images with one stem get
  ``<stem>.png`` and ``<stem>_2.png``), at the image's own size: no enlargement;
- with ground truth (``tools/test.py --show-dir``, the demos): ground truth
  on the left, predictions on the right, each panel the size of the image;
  ``tools/infer.py`` draws the predictions alone;
- detection: masks blended in the class colour, boxes clipped to the image,
  labels ``class 0.49`` (the score as a fraction, two decimals);
  segmentation: the class map blended over the image, each class named once
  at its largest region;
- labels are white or black text on a filled box in the class colour, placed
  inside the picture, and moved down (or up) when they would cover a label
  already drawn.

mmdet's ``DetLocalVisualizer`` renders every picture through a matplotlib
figure (86 ms per 160x160 demo image against 22 ms here on a 2-core AMD EPYC,
``dev/benchmark_visualizer.py``), prints scores as percentages without a
sign and warns "bbox is out of bounds" for boxes that reach past the image.

Use it from a config with ``visualizer = dict(type='mlla_mm.FastDetVisualizer')``
(the registry imports this module on first use); :class:`ShowDirHook` is what
``tools/test.py --show-dir`` adds to the run. Panoptic samples, and
``show=True``, are handed to mmdet's own ``DetLocalVisualizer``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import cv2
import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.visualization import Visualizer

from .registry import VISUALIZERS
from .utils.io import atomic_write

_FALLBACK_KEYS = ('gt_panoptic_seg', 'pred_panoptic_seg')
_FONT = cv2.FONT_HERSHEY_SIMPLEX
Rect = Tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive)


def _as_array(value) -> np.ndarray:
    """A tensor, box structure (``.tensor``), mask structure (``.to_ndarray()``) or PixelData (``.data``)."""
    if hasattr(value, 'to_ndarray'):
        return value.to_ndarray()
    value = getattr(value, 'tensor', value)
    if not isinstance(value, (torch.Tensor, np.ndarray)) and hasattr(value, 'data'):
        value = value.data
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _colour(label: int, palette: Optional[Sequence]) -> Tuple[int, int, int]:
    """RGB colour of a class: the data set's palette, else a fixed colour per label."""
    if palette is not None and 0 <= label < len(palette):
        return tuple(int(c) for c in palette[label])
    rng = np.random.default_rng(label + 1)
    return tuple(int(c) for c in rng.integers(40, 230, 3))


def _class_name(label: int, classes: Optional[Sequence[str]]) -> str:
    return str(classes[label]) if classes is not None and 0 <= label < len(classes) else f'class {label}'


def format_score(score: float) -> str:
    """A detection score as the labels show it: a fraction with two decimals (``0.49``)."""
    return f'{float(score):.2f}'


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class LabelPlacer:
    """Draws filled text labels on one picture, inside it, without covering labels drawn before.

    Args:
        img: The picture (HxWx3 uint8, drawn on in place).
        font_scale: OpenCV font scale; ``None`` picks one from the picture's size.
    """

    def __init__(self, img: np.ndarray, font_scale: Optional[float] = None) -> None:
        self.img = img
        self.height, self.width = img.shape[:2]
        self.font_scale = font_scale or float(np.clip(min(self.height, self.width) / 500.0, 0.35, 0.8))
        self.placed: List[Rect] = []

    def size(self, text: str) -> Tuple[int, int]:
        """Width and height of the label box of ``text``."""
        (tw, th), base = cv2.getTextSize(text, _FONT, self.font_scale, 1)
        return tw + 4, th + base + 3

    def position(self, text: str, x: int, y: int) -> Rect:
        """Where the label of ``text`` anchored at (x, y) (its box's top-left corner) goes."""
        w, h = self.size(text)
        x = int(min(max(x, 0), max(self.width - w, 0)))
        top = y - h if y - h >= 0 else y  # above the anchor when it fits, else just below it
        top = int(min(max(top, 0), max(self.height - h, 0)))
        candidates = [top + k * h for k in range(0, self.height // max(h, 1) + 1)]
        candidates += [top - k * h for k in range(1, self.height // max(h, 1) + 1)]
        for t in candidates:  # nudged down first, then up, in steps of one label's height
            if 0 <= t <= max(self.height - h, 0):
                rect = (x, t, x + w, t + h)
                if not any(_overlaps(rect, r) for r in self.placed):
                    return rect
        return (x, top, x + w, top + h)  # no free place: where it belongs

    def draw(self, text: str, x: int, y: int, colour: Tuple[int, int, int]) -> Rect:
        """Draw ``text`` on a box of ``colour`` near (x, y); returns the box."""
        rect = self.position(text, x, y)
        x1, y1, x2, y2 = rect
        cv2.rectangle(self.img, (x1, y1), (x2 - 1, y2 - 1), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        (_, th), _ = cv2.getTextSize(text, _FONT, self.font_scale, 1)
        cv2.putText(self.img, text, (x1 + 2, y1 + th + 1), _FONT, self.font_scale,
                    (0, 0, 0) if luminance > 150 else (255, 255, 255), 1, cv2.LINE_AA)
        self.placed.append(rect)
        return rect


def _fit(mask: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """``mask`` (N, h, w) cropped or zero-padded to (N, *shape)."""
    fitted = np.zeros((mask.shape[0], ) + tuple(shape), mask.dtype)
    h, w = min(mask.shape[1], shape[0]), min(mask.shape[2], shape[1])
    fitted[:, :h, :w] = mask[:, :h, :w]
    return fitted


def draw_instances(image: np.ndarray, instances, meta: Optional[Dict[str, Any]] = None,
                   alpha: float = 0.45) -> np.ndarray:
    """``image`` (RGB HxWx3 uint8) with the masks, boxes and labels of ``instances`` (mmdet InstanceData)."""
    meta = meta or {}
    classes, palette = meta.get('classes'), meta.get('palette')
    out = np.ascontiguousarray(image.copy())
    n = len(instances) if instances is not None else 0
    if n == 0:
        return out
    height, width = out.shape[:2]
    labels = (_as_array(instances.labels).astype(np.int64).reshape(-1) if 'labels' in instances
              else np.zeros(n, np.int64))
    colours = [_colour(int(k), palette) for k in labels]
    masks = None
    if 'masks' in instances:
        masks = _as_array(instances.masks).astype(bool)
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f'FastDetVisualizer: expected masks of shape ({n}, H, W) for {n} instances, '
                             f'got {masks.shape}')
        masks = _fit(masks, (height, width))
        blended = out.astype(np.float32)
        for mask, colour in zip(masks, colours):
            blended[mask] = blended[mask] * (1 - alpha) + np.asarray(colour, np.float32) * alpha
        out = np.ascontiguousarray(blended.round().clip(0, 255).astype(np.uint8))
        for mask, colour in zip(masks, colours):
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, 1)
    boxes = _as_array(instances.bboxes).reshape(-1, 4).astype(np.float64) if 'bboxes' in instances else None
    if boxes is not None:  # clipped to the picture: a box past the edge is drawn along it
        boxes[:, 0::2] = np.nan_to_num(boxes[:, 0::2]).clip(0, width - 1)
        boxes[:, 1::2] = np.nan_to_num(boxes[:, 1::2]).clip(0, height - 1)
    scores = _as_array(instances.scores).reshape(-1) if 'scores' in instances else None
    thickness = max(1, int(round(min(height, width) / 300)))
    anchors = []
    for i in range(n):
        text = _class_name(int(labels[i]), classes)
        if scores is not None:
            text = f'{text} {format_score(scores[i])}'
        if boxes is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
            cv2.rectangle(out, (x1, y1), (x2, y2), colours[i], thickness)
        elif masks is not None and masks[i].any():
            ys, xs = np.nonzero(masks[i])
            x1, y1 = int(xs.min()), int(ys.min())
        else:
            continue
        anchors.append((text, x1, y1, colours[i]))
    placer = LabelPlacer(out)
    for text, x, y, colour in anchors:  # labels last, so no box or mask is drawn over them
        placer.draw(text, x, y, colour)
    return out


def draw_sem_seg(image: np.ndarray, sem_seg, meta: Optional[Dict[str, Any]] = None, alpha: float = 0.5,
                 ignore_index: int = 255) -> np.ndarray:
    """``image`` (RGB HxWx3 uint8) with the class map ``sem_seg`` (HxW or 1xHxW) blended over it, classes named."""
    meta = meta or {}
    classes, palette = meta.get('classes'), meta.get('palette')
    out = np.ascontiguousarray(image.copy())
    seg = _as_array(sem_seg)
    seg = seg.reshape(seg.shape[-2:]).astype(np.int64)
    if seg.shape != out.shape[:2]:  # a map of another size: cropped, or padded with "ignore"
        fitted = np.full(out.shape[:2], ignore_index, np.int64)
        h, w = min(seg.shape[0], fitted.shape[0]), min(seg.shape[1], fitted.shape[1])
        fitted[:h, :w] = seg[:h, :w]
        seg = fitted
    labels = [int(k) for k in np.unique(seg) if k != ignore_index and k >= 0]
    blended = out.astype(np.float32)
    for k in labels:
        m = seg == k
        blended[m] = blended[m] * (1 - alpha) + np.asarray(_colour(k, palette), np.float32) * alpha
    out = np.ascontiguousarray(blended.round().clip(0, 255).astype(np.uint8))
    placer = LabelPlacer(out)
    for k in labels:  # one label per class, at the centre of its largest region
        count, comp, stats, centroids = cv2.connectedComponentsWithStats((seg == k).astype(np.uint8), 8)
        if count < 2:
            continue
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        text = _class_name(k, classes)
        w, h = placer.size(text)
        cx, cy = centroids[biggest]
        placer.draw(text, int(cx - w / 2), int(cy + h / 2), _colour(k, palette))
    return out


def draw_panel(image: np.ndarray, data_sample, which: str, meta: Optional[Dict[str, Any]] = None,
               score_thr: float = 0.3, alpha: float = 0.45) -> Optional[np.ndarray]:
    """One panel, ``which`` = ``'gt'`` or ``'pred'``, of ``data_sample``; ``None`` when it has nothing of that kind."""
    seg = data_sample.get(f'{which}_sem_seg') if data_sample is not None else None
    if seg is not None:
        return draw_sem_seg(image, seg, meta, alpha=max(alpha, 0.5))
    instances = data_sample.get(f'{which}_instances') if data_sample is not None else None
    if instances is None:
        return None
    if which == 'pred' and 'scores' in instances:
        instances = instances[instances.scores > score_thr]
    return draw_instances(image, instances, meta, alpha=alpha)


def draw_sample(image: np.ndarray, data_sample, meta: Optional[Dict[str, Any]] = None, draw_gt: bool = True,
                draw_pred: bool = True, score_thr: float = 0.3, alpha: float = 0.45) -> np.ndarray:
    """The picture of one sample: [ground truth |] predictions, each panel the size of ``image`` (RGB)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'FastDetVisualizer: expected an HxWx3 RGB image, got shape {image.shape}')
    image = image.clip(0, 255).astype(np.uint8)
    if data_sample is not None and hasattr(data_sample, 'cpu'):
        data_sample = data_sample.cpu()
    panels: List[np.ndarray] = []
    if draw_gt:
        gt = draw_panel(image, data_sample, 'gt', meta, score_thr, alpha)
        if gt is not None:
            panels.append(gt)
    if draw_pred:
        pred = draw_panel(image, data_sample, 'pred', meta, score_thr, alpha)
        panels.append(pred if pred is not None else image.copy())
    return np.concatenate(panels, axis=1) if panels else image.copy()


def write_picture(path: str, rgb: np.ndarray) -> None:
    """Encode ``rgb`` in memory (format from the extension, default PNG) and write it atomically."""
    ext = os.path.splitext(path)[1] or '.png'
    try:
        ok, encoded = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f'cannot encode a picture as {ext!r} for {path}')
    with atomic_write(path) as f:  # (makes the folder if needed)
        f.write(encoded.tobytes())


def picture_name(img_path: str, taken: Set[str]) -> str:
    """``<stem>.png`` of ``img_path``; ``<stem>_2.png``, ``<stem>_3.png`` ... when taken (as io.distinct_paths)."""
    stem = os.path.splitext(os.path.basename(str(img_path)))[0] or 'image'
    name, k = f'{stem}.png', 1
    while name in taken:
        k += 1
        name = f'{stem}_{k}.png'
    taken.add(name)
    return name


@VISUALIZERS.register_module()
class FastDetVisualizer(Visualizer):
    """mmdet's / mmseg's ``add_datasample`` for boxes, masks and class maps, drawn with OpenCV (see the module).

    Args:
        name: Instance name (mmengine's ``ManagerMixin``).
        image: Optional image to start from (as mmengine's ``Visualizer``).
        vis_backends: Storage backends (as mmengine's ``Visualizer``).
        save_dir: Directory of the backends.
        alpha: Opacity of the masks.
        min_size: Pictures whose short side is smaller are enlarged to it (nearest neighbour) before
            drawing; 0 (the default) draws every image at its own size, as the tools do.
    """

    def __init__(self, name: str = 'visualizer', image: Optional[np.ndarray] = None, vis_backends=None,
                 save_dir: Optional[str] = None, alpha: float = 0.45, min_size: int = 0) -> None:
        super().__init__(name=name, image=image, vis_backends=vis_backends, save_dir=save_dir)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'FastDetVisualizer: alpha must be in [0, 1], got {alpha!r}')
        if not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f'FastDetVisualizer: min_size must be a non-negative int, got {min_size!r}')
        self.alpha = alpha
        self.min_size = min_size
        self._mmdet_visualizer = None
        self._drawn: Optional[np.ndarray] = None

    def _scale(self, image: np.ndarray) -> int:
        short = min(image.shape[:2])
        return 1 if short == 0 or short >= self.min_size else -(-self.min_size // short)

    def _enlarged(self, image: np.ndarray, data_sample):
        """``image`` and ``data_sample`` enlarged to ``min_size`` (nothing to do at the default 0)."""
        scale = self._scale(image)
        if scale == 1 or data_sample is None:
            return (image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale,
                                                       interpolation=cv2.INTER_NEAREST)), data_sample
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        data_sample = data_sample.clone()
        for key in ('gt_instances', 'pred_instances'):
            inst = data_sample.get(key)
            if inst is None:
                continue
            if 'bboxes' in inst:
                inst.bboxes = torch.as_tensor(_as_array(inst.bboxes), dtype=torch.float32) * scale
            if 'masks' in inst:
                m = _as_array(inst.masks).astype(bool)
                inst.masks = m.repeat(scale, axis=-2).repeat(scale, axis=-1)
        for key in ('gt_sem_seg', 'pred_sem_seg'):
            seg = data_sample.get(key)
            if seg is not None:
                from mmengine.structures import PixelData
                arr = _as_array(seg).reshape((1, ) + _as_array(seg).shape[-2:])
                data_sample.set_field(PixelData(data=torch.from_numpy(
                    arr.repeat(scale, axis=-2).repeat(scale, axis=-1))), key)
        return image, data_sample

    def add_datasample(self, name: str, image: np.ndarray, data_sample=None, draw_gt: bool = True,
                       draw_pred: bool = True, show: bool = False, wait_time: float = 0,
                       out_file: Optional[str] = None, pred_score_thr: float = 0.3, step: int = 0) -> None:
        """Draw ground truth (left) and predictions (right) of one sample; save to ``out_file`` or the backends.

        The arguments are those of mmdet's ``DetLocalVisualizer.add_datasample``.
        """
        if show or (data_sample is not None and any(k in data_sample for k in _FALLBACK_KEYS)):
            mmdet = self._mmdet()
            mmdet.add_datasample(name, image, data_sample, draw_gt=draw_gt, draw_pred=draw_pred, show=show,
                                 wait_time=wait_time, out_file=out_file, pred_score_thr=pred_score_thr, step=step)
            self._drawn = mmdet.get_image()
            return
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'FastDetVisualizer: expected an HxWx3 RGB image, got shape {image.shape}')
        if data_sample is not None:
            data_sample = data_sample.cpu()
        image, data_sample = self._enlarged(image.clip(0, 255).astype(np.uint8), data_sample)
        drawn = draw_sample(image, data_sample, self.dataset_meta, draw_gt=draw_gt, draw_pred=draw_pred,
                            score_thr=pred_score_thr, alpha=self.alpha)
        self._drawn = drawn
        if out_file is not None:  # encoded in memory, then written atomically: never a half-written PNG
            try:
                write_picture(out_file, drawn)
            except ValueError as err:
                raise ValueError(f'FastDetVisualizer: {err}') from None
        else:
            self.add_image(name, drawn, step)

    def get_image(self) -> np.ndarray:
        """The last picture :meth:`add_datasample` drew (RGB), else mmengine's canvas."""
        return self._drawn if self._drawn is not None else super().get_image()

    def _mmdet(self):
        """mmdet's ``DetLocalVisualizer`` with this one's data set and backends, made on first use."""
        if self._mmdet_visualizer is None:
            from mmdet.visualization import DetLocalVisualizer
            self._mmdet_visualizer = DetLocalVisualizer(name=f'{self.instance_name}-mmdet', alpha=0.8)
            self._mmdet_visualizer._vis_backends = self._vis_backends
        self._mmdet_visualizer.dataset_meta = self.dataset_meta
        return self._mmdet_visualizer


# The same drawing for segmentation configs, under a name that says so.
VISUALIZERS.register_module(name='FastSegVisualizer', module=FastDetVisualizer)


@HOOKS.register_module()
class ShowDirHook(Hook):
    """Draw every test image into ``out_dir/<image stem>.png``: ground truth | predictions (``--show-dir``).

    Args:
        out_dir: The folder of the pictures (made on first use).
        score_thr: Detection: predictions scoring at most this are not drawn.
        draw_gt: Draw the ground truth panel on the left where the sample has one.
    """

    priority = 'LOW'

    def __init__(self, out_dir: str, score_thr: float = 0.3, draw_gt: bool = True) -> None:
        self.out_dir = str(out_dir)
        self.score_thr = float(score_thr)
        self.draw_gt = bool(draw_gt)
        self._taken: Set[str] = set()
        self._meta: Dict[str, Any] = {}

    def before_test(self, runner) -> None:
        """Read the data set's classes and palette; start a fresh set of names."""
        self._taken = set()
        dataset = runner.test_dataloader.dataset
        self._meta = dict(getattr(dataset, 'metainfo', None) or {})

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Draw the samples of one batch."""
        import mmcv
        from mmengine.fileio import get
        for sample in outputs or []:
            img_path = sample.get('img_path')
            if img_path is None:
                continue
            image = mmcv.imfrombytes(get(img_path), channel_order='rgb')
            drawn = draw_sample(image, sample, self._meta, draw_gt=self.draw_gt, score_thr=self.score_thr)
            write_picture(os.path.join(self.out_dir, picture_name(img_path, self._taken)), drawn)
