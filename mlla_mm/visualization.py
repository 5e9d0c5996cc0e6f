"""A detection visualizer that draws with OpenCV instead of matplotlib.

mmdet's ``DetLocalVisualizer`` renders every picture through a matplotlib
figure, most of its time clearing the axes and laying out text: 86 ms per
160x160 demo image (read, draw, write) against 22 ms here on a 2-core AMD
EPYC (``tools/benchmark_visualizer.py``; docs/benchmarks.md, "AMD EPYC, Zen 2
(session 9)").
:class:`FastDetVisualizer` draws the same things (ground truth on the left,
predictions above ``pred_score_thr`` on the right; masks, boxes and
``class score`` labels in the data set's palette) with OpenCV, enlarged to
at least ``min_size`` pixels so that small images stay legible.

Use it from a config with ``visualizer = dict(type='mlla_mm.FastDetVisualizer')``
(the registry imports this module on first use). A sample that carries more
than boxes and masks (semantic or panoptic segmentation), and ``show=True``,
are handed to mmdet's own ``DetLocalVisualizer``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from mmengine.visualization import Visualizer

from .registry import VISUALIZERS
from .utils.io import atomic_write

_FALLBACK_KEYS = ('gt_sem_seg', 'pred_sem_seg', 'gt_panoptic_seg', 'pred_panoptic_seg')


def _as_array(value) -> np.ndarray:
    """A tensor, box structure (``.tensor``) or mask structure (``.to_ndarray()``) as a numpy array."""
    if hasattr(value, 'to_ndarray'):
        return value.to_ndarray()
    value = getattr(value, 'tensor', value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _colour(label: int, palette: Optional[Sequence]) -> Tuple[int, int, int]:
    """RGB colour of a class: the data set's palette, else a fixed colour per label."""
    if palette is not None and 0 <= label < len(palette):
        return tuple(int(c) for c in palette[label])
    rng = np.random.default_rng(label + 1)
    return tuple(int(c) for c in rng.integers(40, 230, 3))


@VISUALIZERS.register_module()
class FastDetVisualizer(Visualizer):
    """mmdet's ``DetLocalVisualizer.add_datasample`` for boxes and masks, drawn with OpenCV.

    Args:
        name: Instance name (mmengine's ``ManagerMixin``).
        image: Optional image to start from (as mmengine's ``Visualizer``).
        vis_backends: Storage backends (as mmengine's ``Visualizer``).
        save_dir: Directory of the backends.
        alpha: Opacity of the masks.
        min_size: Pictures whose short side is smaller are enlarged to it
            (nearest neighbour) before drawing, so labels stay readable.
    """

    def __init__(self, name: str = 'visualizer', image: Optional[np.ndarray] = None, vis_backends=None,
                 save_dir: Optional[str] = None, alpha: float = 0.45, min_size: int = 320) -> None:
        super().__init__(name=name, image=image, vis_backends=vis_backends, save_dir=save_dir)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'FastDetVisualizer: alpha must be in [0, 1], got {alpha!r}')
        if not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f'FastDetVisualizer: min_size must be a non-negative int, got {min_size!r}')
        self.alpha = alpha
        self.min_size = min_size
        self._mmdet_visualizer = None
        self._drawn: Optional[np.ndarray] = None

    # -- drawing ------------------------------------------------------------
    def draw_instance_panel(self, image: np.ndarray, instances, scale: int) -> np.ndarray:
        """One panel: ``image`` (RGB, HxWx3 uint8) enlarged ``scale`` times, with ``instances`` drawn on it."""
        meta = self.dataset_meta or {}
        classes, palette = meta.get('classes'), meta.get('palette')
        out = image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        out = np.ascontiguousarray(out)
        n = len(instances) if instances is not None else 0
        if n == 0:
            return out
        if 'labels' in instances:
            labels = _as_array(instances.labels).astype(np.int64).reshape(-1)
        else:
            labels = np.zeros(n, np.int64)
        colours = [_colour(int(k), palette) for k in labels]
        masks = None
        if 'masks' in instances:
            masks = _as_array(instances.masks).astype(bool)
            if masks.ndim != 3 or masks.shape[0] != n:
                raise ValueError(f'FastDetVisualizer: expected masks of shape ({n}, H, W) for {n} instances, '
                                 f'got {masks.shape}')
            if scale != 1:
                masks = masks.repeat(scale, axis=1).repeat(scale, axis=2)
            fitted = np.zeros((n, ) + out.shape[:2], bool)  # masks of another size: cropped or padded
            h, w = min(masks.shape[1], out.shape[0]), min(masks.shape[2], out.shape[1])
            fitted[:, :h, :w] = masks[:, :h, :w]
            masks = fitted
            blended = out.astype(np.float32)
            for mask, colour in zip(masks, colours):
                blended[mask] = blended[mask] * (1 - self.alpha) + np.asarray(colour, np.float32) * self.alpha
            out = np.ascontiguousarray(blended.round().clip(0, 255).astype(np.uint8))
            for mask, colour in zip(masks, colours):
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(out, contours, -1, colour, 1)
        boxes = _as_array(instances.bboxes).reshape(-1, 4) * scale if 'bboxes' in instances else None
        scores = _as_array(instances.scores).reshape(-1) if 'scores' in instances else None
        thickness = max(1, scale // 2 + 1)
        height, width = out.shape[:2]
        for i in range(n):
            colour = colours[i]
            name = (classes[labels[i]] if classes is not None and 0 <= labels[i] < len(classes)
                    else f'class {labels[i]}')
            text = name if scores is None else f'{name} {scores[i]:.2f}'
            if boxes is not None:
                x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
                cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
            elif masks is not None:
                ys, xs = np.nonzero(masks[i])
                if len(xs) == 0:
                    continue
                x1, y1 = int(xs.min()), int(ys.min())
            else:
                continue
            self._label(out, text, x1, y1, colour, width, height)
        return out

    @staticmethod
    def _label(img: np.ndarray, text: str, x: int, y: int, colour: Tuple[int, int, int], width: int,
               height: int) -> None:
        """A filled label with ``text`` above (x, y), kept inside the picture."""
        font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.4
        (tw, th), base = cv2.getTextSize(text, font, size, 1)
        x = min(max(x, 0), max(width - tw - 2, 0))
        top = y - th - base - 2
        if top < 0:
            top = min(max(y, 0), max(height - th - base - 2, 0))
        cv2.rectangle(img, (x, top), (x + tw + 2, top + th + base + 2), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        cv2.putText(img, text, (x + 1, top + th + 1), font, size, (0, 0, 0) if luminance > 150 else (255, 255, 255),
                    1, cv2.LINE_AA)

    def _scale(self, image: np.ndarray) -> int:
        short = min(image.shape[:2])
        return 1 if short == 0 or short >= self.min_size else -(-self.min_size // short)

    # -- mmdet's interface ----------------------------------------------------
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
        image = image.clip(0, 255).astype(np.uint8)
        scale = self._scale(image)
        panels: List[np.ndarray] = []
        if data_sample is not None:
            data_sample = data_sample.cpu()
            if draw_gt:
                panels.append(self.draw_instance_panel(image, data_sample.get('gt_instances'), scale))
            if draw_pred:
                pred = data_sample.get('pred_instances')
                if pred is not None and 'scores' in pred:
                    pred = pred[pred.scores > pred_score_thr]
                panels.append(self.draw_instance_panel(image, pred, scale))
        drawn = np.concatenate(panels, axis=1) if panels else image
        self._drawn = drawn
        if out_file is not None:  # encoded in memory, then written atomically: never a half-written PNG
            ext = os.path.splitext(out_file)[1] or '.png'
            try:
                ok, encoded = cv2.imencode(ext, np.ascontiguousarray(drawn[..., ::-1]))
            except cv2.error:
                ok = False
            if not ok:
                raise ValueError(f'FastDetVisualizer: cannot encode a picture as {ext!r} for {out_file}')
            with atomic_write(out_file) as f:
                f.write(encoded.tobytes())
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
