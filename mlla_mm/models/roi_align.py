"""RoIAlign as one sparse-times-dense matrix product: mmcv's numbers, multi-threaded, in plain PyTorch.

mmcv's CPU ``RoIAlign`` (forward and backward) runs on one thread and reads
NCHW features one channel at a time; in a Mask R-CNN training step on 2
cores it took 40% of the time (docs/benchmarks.md, "RoIAlign"). Here every
output bin of every RoI is a weighted sum of feature pixels (the bilinear
weights of its sampling points, averaged), so the whole layer is
``A @ F``: ``A`` a sparse ``(RoIs * bins, B * H * W)`` matrix of those
weights, ``F`` the features as a ``(B * H * W, C)`` matrix. PyTorch runs the
product on all threads, and its backward (``A^T @ grad``) too; ``A`` needs
no gradient.

The sampling follows mmcv's ``RoIAlign`` (``pool_mode='avg'``) exactly:
``aligned`` shifts the box by half a pixel; ``sampling_ratio=0`` takes
``ceil(roi_size / output_size)`` points per bin and direction for each RoI;
a point more than one pixel outside the map contributes zero, one within a
pixel of the edge is clamped to it; the bin is the mean over its points
(``tests/test_models/test_roi_align.py`` compares with mmcv).

Only torch is needed. :func:`SparseRoIExtractor` (registered for mmdet
configs) builds mmdet's ``SingleRoIExtractor`` with this layer.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..registry import register_everywhere


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f'RoIAlign: {name} must be a positive int or a pair of them, got {value!r}')
    return value


def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, points: torch.Tensor, bins: int,
                  most: int, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel indices and bilinear weights along one axis, ``(R, bins, most)`` each for the low and high pixel.

    ``points`` (R,) is the number of sampling points per bin of each RoI;
    sample ``i < points`` of bin ``p`` sits at ``start + p * bin + (i + .5) * bin / points``.
    Points beyond ``points`` and those more than one pixel outside ``[0, size]`` get weight 0.
    """
    i = torch.arange(most, dtype=start.dtype, device=start.device)
    p = torch.arange(bins, dtype=start.dtype, device=start.device)
    step = bin_size / points.clamp_min(1).to(start.dtype)
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
           + (i[None, None, :] + 0.5) * step[:, None, None])
    valid = (i[None, None, :] < points[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(0.0, size - 1.0)  # within one pixel outside: the edge pixel (mmcv's rule)
    low = pos.floor().clamp_max(max(size - 2, 0))
    frac = (pos - low) * valid
    w_low = valid.to(pos.dtype) - frac
    low = low.long()
    high = (low + 1).clamp_max(size - 1)
    return low, high, w_low, frac


MAX_ENTRIES = 1 << 24  # matrix entries built at once (a chunk of RoIs); about 200 MB of indices and weights


def sparse_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int], spatial_scale: float,
                     sampling_ratio: int = 0, aligned: bool = True) -> torch.Tensor:
    """mmcv's ``roi_align`` (average pooling) as a sparse matrix product.

    Args:
        features: ``(B, C, H, W)`` feature maps.
        rois: ``(R, 5)`` boxes ``(batch index, x1, y1, x2, y2)`` in image pixels.
        output_size: ``(PH, PW)`` bins per RoI.
        spatial_scale: Feature pixels per image pixel (1 / stride).
        sampling_ratio: Points per bin and direction; 0: ``ceil(roi_size / bins)`` per RoI.
        aligned: Shift boxes by -0.5 pixel (the pixel-centre convention).

    Returns:
        ``(R, C, PH, PW)`` features in ``features``' dtype.

    RoIs are taken in chunks of similar sampling grids (sorted by points
    per bin) of at most :data:`MAX_ENTRIES` matrix entries, so one long thin
    box does not pad every other RoI's grid to its size.
    """
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f'roi_align: expected features (B, C, H, W) and rois (R, 5), '
                         f'got {tuple(features.shape)} and {tuple(rois.shape)}')
    b, c, h, w = features.shape
    ph, pw = output_size
    r = rois.shape[0]
    if r == 0 or h == 0 or w == 0:
        return features.new_zeros(r, c, ph, pw)
    boxes = rois.detach().to(torch.float32)
    index = boxes[:, 0]
    if not bool(((index >= 0) & (index < b) & (index == index.floor())).all()):
        raise ValueError(f'roi_align: RoI batch indices must be whole numbers in [0, {b}), got '
                         f'{sorted(set(index.tolist()))[:8]}')
    boxes = torch.nan_to_num(boxes, nan=-1e6)  # a NaN box samples nothing (more than a pixel outside)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
    if bool((roi_h > (1 << 20)).any() or (roi_w > (1 << 20)).any()):  # (inf included)
        raise ValueError(f'roi_align: a RoI is more than 2^20 feature pixels wide or high '
                         f'(spatial_scale {spatial_scale}); check the boxes')
    if sampling_ratio > 0:
        n_h = n_w = torch.full((r, ), sampling_ratio, dtype=torch.long, device=boxes.device)
    else:  # empty or inverted boxes: no points (mmcv's loops run zero times)
        n_h, n_w = torch.ceil(roi_h / ph).long(), torch.ceil(roi_w / pw).long()
    compute = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    flat = features.to(compute).permute(0, 2, 3, 1).reshape(b * h * w, c)
    per_roi = (ph * pw * 4 * n_h.clamp_min(1) * n_w.clamp_min(1)).tolist()
    # One chunk in the given order when everything fits; else sorted by grid size, chunked, put back in order.
    order = list(range(r)) if r * max(per_roi) <= MAX_ENTRIES else sorted(range(r), key=per_roi.__getitem__)
    outs, taken, start = [], [], 0
    while start < r:
        stop, most = start, 0
        while stop < r and (stop == start or (stop - start + 1) * max(most, per_roi[order[stop]]) <= MAX_ENTRIES):
            most = max(most, per_roi[order[stop]])
            stop += 1
        part = torch.tensor(order[start:stop], device=boxes.device)
        outs.append(_roi_chunk(flat, part, boxes, x1, y1, roi_w, roi_h, n_h, n_w, (b, h, w), (ph, pw))
                    .view(part.numel(), ph * pw, c))
        taken.append(part)
        start = stop
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if len(outs) > 1 or order != list(range(r)):
        out = out[torch.argsort(torch.cat(taken))]
    return out.view(r, ph, pw, c).permute(0, 3, 1, 2).to(features.dtype)


def _roi_chunk(flat: torch.Tensor, part: torch.Tensor, boxes: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor,
               roi_w: torch.Tensor, roi_h: torch.Tensor, n_h: torch.Tensor, n_w: torch.Tensor,
               bhw: Tuple[int, int, int], bins: Tuple[int, int]) -> torch.Tensor:
    """``(len(part) * PH * PW, C)`` RoI features of the RoIs ``part`` (one sparse product)."""
    b, h, w = bhw
    ph, pw = bins
    r = part.numel()
    boxes, x1, y1, roi_w, roi_h, n_h, n_w = (t[part] for t in (boxes, x1, y1, roi_w, roi_h, n_h, n_w))
    most_h, most_w = max(int(n_h.max()), 1), max(int(n_w.max()), 1)
    yl, yh, wyl, wyh = _axis_weights(y1, roi_h / ph, n_h, ph, most_h, h)  # (R, PH, most_h)
    xl, xh, wxl, wxh = _axis_weights(x1, roi_w / pw, n_w, pw, most_w, w)  # (R, PW, most_w)
    inv_count = 1.0 / (n_h * n_w).clamp_min(1).to(torch.float32)
    # Entries ordered (RoI, bin row, bin column, sample row, sample column, corner), so they are
    # already grouped by output row: CSR without sorting. Zero weights (padding samples, points
    # outside the map, exact pixel hits) are dropped: 3.4x fewer entries and a 5x faster backward
    # on a stride-4 level; repeated columns in a row add up in the product.
    base = boxes[:, 0].long() * (h * w)
    cols, vals = [], []
    for yy, wy in ((yl, wyl), (yh, wyh)):
        for xx, wx in ((xl, wxl), (xh, wxh)):
            cols.append(base.view(r, 1, 1, 1, 1) + (yy * w).view(r, ph, 1, most_h, 1)
                        + xx.view(r, 1, pw, 1, most_w))
            vals.append(wy.view(r, ph, 1, most_h, 1) * wx.view(r, 1, pw, 1, most_w))
    col = torch.stack(cols, dim=-1).reshape(-1)
    val = (torch.stack(vals, dim=-1) * inv_count.view(r, 1, 1, 1, 1, 1)).reshape(-1)
    keep = val != 0
    crow = torch.zeros(r * ph * pw + 1, dtype=torch.long, device=boxes.device)
    torch.cumsum(keep.view(r * ph * pw, -1).sum(1), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is tested
        warnings.simplefilter('ignore', UserWarning)
        matrix = torch.sparse_csr_tensor(crow, col[keep], val[keep].to(flat.dtype), (r * ph * pw, b * h * w))
    return matrix @ flat


def use_mmcv_kernel(features: torch.Tensor) -> bool:
    """Whether :class:`SparseRoIAlign` hands ``features`` to mmcv's kernel: on CUDA devices."""
    return features.is_cuda


class SparseRoIAlign(nn.Module):
    """Drop-in for ``mmcv.ops.RoIAlign`` (``pool_mode='avg'``), computed by :func:`sparse_roi_align`.

    On CUDA tensors it calls mmcv's own kernel (:func:`use_mmcv_kernel`).

    Args:
        output_size: Bins per RoI, an int or ``(PH, PW)``.
        spatial_scale: Feature pixels per image pixel.
        sampling_ratio: Points per bin and direction (0: adaptive, as mmcv).
        pool_mode: Only ``'avg'``.
        aligned: The pixel-centre convention (mmcv's default ``True``).
        use_torchvision: Only ``False`` (accepted so mmcv configs carry over).
    """

    def __init__(self, output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0,
                 sampling_ratio: int = 0, pool_mode: str = 'avg', aligned: bool = True,
                 use_torchvision: bool = False) -> None:
        super().__init__()
        if pool_mode != 'avg':
            raise ValueError(f"SparseRoIAlign: only pool_mode='avg' is supported, got {pool_mode!r}")
        if use_torchvision:
            raise ValueError('SparseRoIAlign: use_torchvision=True is not supported (it is its own implementation)')
        if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
            raise ValueError(f'SparseRoIAlign: sampling_ratio must be an int >= 0, got {sampling_ratio!r}')
        if not spatial_scale > 0:
            raise ValueError(f'SparseRoIAlign: spatial_scale must be > 0, got {spatial_scale!r}')
        self.output_size = _pair(output_size, 'output_size')
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.pool_mode = pool_mode
        self.aligned = bool(aligned)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if use_mmcv_kernel(features):  # mmcv's CUDA kernel: the same numbers, faster on a GPU
            from mmcv.ops import roi_align
            return roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, 'avg',
                             self.aligned)
        return sparse_roi_align(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f'output_size={self.output_size}, spatial_scale={self.spatial_scale}, '
                f'sampling_ratio={self.sampling_ratio}, aligned={self.aligned}')


@register_everywhere
def SparseRoIExtractor(roi_layer: dict, out_channels: int, featmap_strides: Sequence[int], finest_scale: int = 56,
                       init_cfg: Optional[dict] = None) -> nn.Module:
    """mmdet's ``SingleRoIExtractor`` with :class:`SparseRoIAlign` for its ``roi_layer`` ``type='RoIAlign'``.

    Registered (``type='SparseRoIExtractor'``) for mmdet configs: swap it in
    with ``bbox_roi_extractor=dict(type='SparseRoIExtractor')`` on top of
    mmdet's own settings. Builds (and so imports) mmdet only when called.
    """
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    layer = dict(roi_layer)
    kind = layer.pop('type', None)
    if kind not in ('RoIAlign', SparseRoIAlign):
        raise ValueError(f"SparseRoIExtractor: roi_layer type must be 'RoIAlign', got {kind!r}")
    return SingleRoIExtractor(roi_layer=dict(type=SparseRoIAlign, **layer), out_channels=out_channels,
                              featmap_strides=list(featmap_strides), finest_scale=finest_scale, init_cfg=init_cfg)


__all__ = ['sparse_roi_align', 'SparseRoIAlign', 'SparseRoIExtractor']
