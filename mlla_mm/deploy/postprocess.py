"""The steps after an exported detector's graph, with numpy only (no torch, no mmdet): rescale boxes, paste masks.

Copy this file next to a deployment that has only ``onnxruntime`` and
``numpy``. :func:`paste_mask` computes what mmdet's ``_do_paste_mask``
computes (bilinear sampling of the 28x28 map at every image pixel centre,
zero outside the map, ``align_corners=False``), written as two small
matrix products; :func:`detections` turns the graph's outputs for one image
into boxes in the original image, scores, labels and binary masks.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def _axis_weights(n: int, lo: float, hi: float, size: int) -> np.ndarray:
    """``(n, size)`` bilinear weights: image pixel ``i`` (centre ``i + 0.5``) sampled in a ``size``-cell map
    spanning ``[lo, hi]``."""
    span = hi - lo
    if not span > 0:
        return np.zeros((n, size), np.float32)
    c = (np.arange(n, dtype=np.float32) + 0.5 - np.float32(lo)) / np.float32(span) * size - 0.5
    k0 = np.floor(c)
    frac = c - k0
    weights = np.zeros((n, size), np.float32)
    rows = np.arange(n)
    for k, w in ((k0, 1 - frac), (k0 + 1, frac)):
        ok = (k >= 0) & (k < size)
        weights[rows[ok], k[ok].astype(np.int64)] += w[ok]
    return weights


def paste_mask(prob: np.ndarray, box: Sequence[float], img_h: int, img_w: int,
               threshold: Optional[float] = 0.5) -> np.ndarray:
    """One ``(M, M)`` mask-probability map pasted into its box ``(x1, y1, x2, y2)`` of an ``img_h x img_w`` image.

    Returns the ``(img_h, img_w)`` bool mask ``>= threshold``, or the
    probabilities when ``threshold`` is None.
    """
    prob = np.asarray(prob, np.float32)
    x1, y1, x2, y2 = (float(v) for v in box)
    wy = _axis_weights(img_h, y1, y2, prob.shape[0])
    wx = _axis_weights(img_w, x1, x2, prob.shape[1])
    full = wy @ prob @ wx.T
    return full if threshold is None else full >= threshold


def detections(outputs: Sequence[np.ndarray], image: int = 0, scale_factor: Tuple[float, float] = (1., 1.),
               ori_shape: Optional[Tuple[int, int]] = None, mask_threshold: float = 0.5) -> Dict[str, np.ndarray]:
    """The detections of one image from a whole-detector graph's outputs ``(boxes, scores, labels[, masks])``.

    Args:
        outputs: What ``session.run(None, ...)`` returned.
        image: Which image of the batch.
        scale_factor: ``(w_scale, h_scale)`` of the resize applied before the graph; boxes are divided by it.
        ori_shape: ``(height, width)`` of the original image, for the masks (default: the boxes' frame).
        mask_threshold: The config's ``mask_thr_binary`` (the file's ``mask_thr_binary`` metadata).

    Returns:
        ``boxes`` ``(N, 4)`` in the original image, ``scores`` ``(N,)``, ``labels`` ``(N,)`` and, for Mask
        R-CNN, ``masks`` ``(N, H, W)`` bool; the padding rows (label -1) are dropped.
    """
    keep = outputs[2][image] >= 0
    scale = np.asarray([scale_factor[0], scale_factor[1]] * 2, np.float32)
    out = dict(boxes=outputs[0][image][keep] / scale, scores=outputs[1][image][keep], labels=outputs[2][image][keep])
    if len(outputs) > 3:
        h, w = ori_shape if ori_shape is not None else (int(np.ceil(out['boxes'][:, 3].max(initial=0))),
                                                         int(np.ceil(out['boxes'][:, 2].max(initial=0))))
        probs = outputs[3][image][keep]
        out['masks'] = np.stack([paste_mask(p, b, h, w, mask_threshold) for p, b in zip(probs, out['boxes'])]) \
            if len(probs) else np.zeros((0, h, w), bool)
    return out


__all__ = ['detections', 'paste_mask']
