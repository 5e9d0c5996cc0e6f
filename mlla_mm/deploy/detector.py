"""A whole mmdet detector as one traceable module: image in; boxes, scores, labels (and masks) out.

:class:`TwoStageForExport` (Mask R-CNN, Faster R-CNN: RPN + one RoI head)
and :class:`SingleStageForExport` (RetinaNet and other anchor heads with
sigmoid scores) re-state mmdet's test-time path with operations the
TorchScript exporter maps to ONNX, on the model's own weights and with the
config's ``test_cfg``:

* proposals / dense detections: per-level top-k, ``DeltaXYWHBBoxCoder``
  decoding clipped to the image, the minimum box size filter, NMS per level
  (RPN) or per class (the RoI head, RetinaNet) as mmcv's ``batched_nms``
  does it (boxes offset by ``index * (max coordinate + 1)``, then one NMS),
  the ``max_per_img`` best;
* NMS is ONNX ``NonMaxSuppression`` (:class:`NMSOp`), RoIAlign is ONNX
  ``RoiAlign`` with ``coordinate_transformation_mode='half_pixel'`` for
  mmcv's ``aligned=True`` (:class:`RoIAlignOp`; opset >= 16). In PyTorch
  they compute the same numbers with torchvision's NMS and mlla-mm's
  RoIAlign (mmcv's numbers);
* the RoI extractor maps RoIs to FPN levels as ``SingleRoIExtractor`` does
  (``floor(log2(sqrt(area) / finest_scale + 1e-6))``) and runs RoIAlign
  per level on the RoIs of that level only.

Inputs: ``img`` ``(B, 3, H, W)``, the image after the data preprocessor
(normalised and padded), and ``img_shape`` ``(B, 2)`` int64, each image's
``(height, width)`` before padding (boxes are clipped to it, as mmdet does).
Outputs, ``K = max_per_img`` rows per image, best first: ``boxes`` ``(B, K,
4)`` x1 y1 x2 y2 in the coordinates of ``img``; ``scores`` ``(B, K)``;
``labels`` ``(B, K)`` int64; for Mask R-CNN ``masks`` ``(B, K, 28, 28)``, the
mask head's probabilities for the detected class inside the box. Rows past
the image's detections have label ``-1`` and score ``0``. See
docs/deploy.md for rescaling to the original image and pasting the masks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..models.roi_align import sparse_roi_align

MIN_DETECTOR_OPSET = 16  # RoiAlign's coordinate_transformation_mode (mmcv's aligned=True)
INVALID = -1.0  # score of a masked candidate (real scores are probabilities >= 0)


def _count(n: Union[int, torch.Tensor], most: int) -> Union[int, torch.Tensor]:
    """``min(n, most)``; ``n`` is a traced 0-d tensor while exporting, so the graph keeps it dynamic."""
    return torch.clamp(n, max=most) if isinstance(n, torch.Tensor) else min(n, most)


def _cfg_get(cfg, key: str, default=None):
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


# --------------------------------------------------------------------------
# Ops with an ONNX symbolic.
# --------------------------------------------------------------------------
class NMSOp(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``: ``boxes (B, N, 4)`` x1y1x2y2, ``scores (B, C, N)`` -> ``(M, 3)`` int64.

    Each row is ``(batch, class, box index)``, per batch and class in
    descending score order; boxes scoring ``<= score_threshold`` are left
    out, a box is suppressed by a kept one when their IoU is ``> iou_threshold``
    (mmcv's and torchvision's rule), at most ``max_boxes`` per batch and class.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_boxes: int, iou_threshold: float,
                score_threshold: float) -> torch.Tensor:
        from torchvision.ops import nms
        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                cand = torch.nonzero(scores[b, c] > score_threshold)[:, 0]
                keep = cand[nms(boxes[b, cand].float(), scores[b, c, cand].float(), iou_threshold)][:max_boxes]
                rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_boxes, iou_threshold, score_threshold):
        return g.op('NonMaxSuppression', boxes, scores,
                    g.op('Constant', value_t=torch.tensor([max_boxes], dtype=torch.long)),
                    g.op('Constant', value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                    g.op('Constant', value_t=torch.tensor([score_threshold], dtype=torch.float)))


class RoIAlignOp(torch.autograd.Function):
    """ONNX ``RoiAlign`` (average): ``features (B, C, H, W)``, ``boxes (R, 4)``, ``batch (R,)`` int64
    -> ``(R, C, PH, PW)``.

    ``aligned`` is mmcv's pixel-centre convention (ONNX ``half_pixel``). In
    PyTorch it is :func:`mlla_mm.models.roi_align.sparse_roi_align`, mmcv's numbers.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, boxes: torch.Tensor, batch: torch.Tensor, out_h: int, out_w: int,
                spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
        rois = torch.cat([batch[:, None].to(boxes.dtype), boxes], 1)
        return sparse_roi_align(features, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def symbolic(g, features, boxes, batch, out_h, out_w, spatial_scale, sampling_ratio, aligned):
        return g.op('RoiAlign', features, boxes, batch, mode_s='avg', output_height_i=out_h, output_width_i=out_w,
                    sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale,
                    coordinate_transformation_mode_s='half_pixel' if aligned else 'output_half_pixel')


# --------------------------------------------------------------------------
# Shared steps.
# --------------------------------------------------------------------------
def grid_anchors(base_anchors: torch.Tensor, stride: Tuple[float, float], height, width) -> torch.Tensor:
    """mmdet's ``AnchorGenerator.single_level_grid_priors``: ``(H * W * A, 4)``, row-major, anchors innermost."""
    dtype, device = base_anchors.dtype, base_anchors.device
    shift_x = torch.arange(width, device=device).to(dtype) * stride[0]
    shift_y = torch.arange(height, device=device).to(dtype) * stride[1]
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    return (base_anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def decode_deltas(priors: torch.Tensor, deltas: torch.Tensor, coder, img_hw: torch.Tensor) -> torch.Tensor:
    """mmdet's ``delta2bbox`` (``DeltaXYWHBBoxCoder``), batched: ``priors``/``deltas`` ``(B, N, 4)``.

    Boxes are clipped to ``img_hw`` ``(B, 2)`` (float height, width) when the coder clips.
    """
    means = deltas.new_tensor(coder.means).view(1, 1, 4)
    stds = deltas.new_tensor(coder.stds).view(1, 1, 4)
    d = deltas * stds + means
    dxy, dwh = d[..., :2], d[..., 2:]
    pxy = (priors[..., :2] + priors[..., 2:]) * 0.5
    pwh = priors[..., 2:] - priors[..., :2]
    dxy_wh = pwh * dxy
    max_ratio = abs(math.log(16 / 1000))  # decode()'s default wh_ratio_clip
    if getattr(coder, 'add_ctr_clamp', False):
        dxy_wh = dxy_wh.clamp(min=-coder.ctr_clamp, max=coder.ctr_clamp)
        dwh = dwh.clamp(max=max_ratio)
    else:
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    x1y1 = gxy - gwh * 0.5
    x2y2 = gxy + gwh * 0.5
    if getattr(coder, 'clip_border', True):
        zero = torch.zeros_like(img_hw[:, None, :1])
        hi_x, hi_y = img_hw[:, None, 1:2], img_hw[:, None, 0:1]
        x1 = torch.min(torch.max(x1y1[..., 0:1], zero), hi_x)
        y1 = torch.min(torch.max(x1y1[..., 1:2], zero), hi_y)
        x2 = torch.min(torch.max(x2y2[..., 0:1], zero), hi_x)
        y2 = torch.min(torch.max(x2y2[..., 1:2], zero), hi_y)
        return torch.cat([x1, y1, x2, y2], -1)
    return torch.cat([x1y1, x2y2], -1)


def size_filter(boxes: torch.Tensor, valid: torch.Tensor, min_size) -> torch.Tensor:
    """mmdet's ``min_bbox_size`` filter (``w > min`` and ``h > min``, when ``min_bbox_size >= 0``)."""
    if min_size is None or min_size < 0:
        return valid
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return valid & (w > min_size) & (h > min_size)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, valid: torch.Tensor,
                iou_threshold: float, max_num: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmcv's ``batched_nms`` then the ``max_num`` best, per image: ``(B, N)`` inputs -> ``(B, K)`` scores,
    indices, kept.

    Boxes of different ``idxs`` (levels, classes) are moved apart by
    ``idxs * (max coordinate + 1)`` (the maximum over the image's valid boxes,
    as mmcv computes it over its candidates), so one NMS treats them
    separately. ``K = min(max_num, N)``; rows past the kept boxes have ``kept`` False.
    """
    neg = torch.full_like(boxes, -1e30)
    top = torch.where(valid[..., None], boxes, neg).amax(dim=(1, 2))  # (B,)
    top = torch.where(top > -1e29, top, torch.zeros_like(top))
    offsets = idxs.to(boxes.dtype) * (top[:, None] + 1)
    masked = torch.where(valid, scores, torch.full_like(scores, INVALID))
    sel = NMSOp.apply(boxes + offsets[..., None], masked[:, None, :], max_num, float(iou_threshold), INVALID / 2)
    b, n = sel[:, 0], sel[:, 2]
    dense = torch.full_like(masked, INVALID)
    dense = dense.index_put((b, n), masked[b, n])
    best, index = dense.topk(_count(dense.shape[1], max_num), dim=1)
    return best, index, best > INVALID / 2


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, N, ...)`` at ``index`` ``(B, K)`` along dim 1."""
    shape = index.shape + t.shape[2:]
    flat = index.reshape(index.shape[0], -1, *([1] * (t.dim() - 2)))
    return torch.gather(t, 1, flat.expand(*index.shape, *t.shape[2:])).reshape(shape)


class ExportRoIExtractor(nn.Module):
    """mmdet's ``SingleRoIExtractor`` with :class:`RoIAlignOp`: ``(R, 4)`` boxes + ``(R,)`` batch
    -> ``(R, C, PH, PW)``."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        layer = extractor.roi_layers[0]
        self.output_size = tuple(layer.output_size) if not isinstance(layer.output_size, int) else \
            (layer.output_size, ) * 2
        self.scales = [float(layer.spatial_scale) for layer in extractor.roi_layers]
        self.sampling_ratio = int(getattr(layer, 'sampling_ratio', 0))
        self.aligned = bool(getattr(layer, 'aligned', True))
        self.finest_scale = extractor.finest_scale
        self.out_channels = extractor.out_channels
        self.num_inputs = len(extractor.featmap_strides)

    def forward(self, feats: Sequence[torch.Tensor], boxes: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        levels = len(self.scales)
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        target = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(min=0, max=levels - 1).long()
        parts, order = [], []
        for i in range(levels):
            inds = torch.nonzero(target == i)[:, 0]
            parts.append(RoIAlignOp.apply(feats[i], boxes[inds], batch[inds], self.output_size[0],
                                          self.output_size[1], self.scales[i], self.sampling_ratio, self.aligned))
            order.append(inds)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]


# --------------------------------------------------------------------------
# Detectors.
# --------------------------------------------------------------------------
def _check_coder(coder, where: str) -> None:
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise ValueError(f'{where}: only DeltaXYWHBBoxCoder boxes can be exported, got {type(coder).__name__}')


def _nms_iou(cfg, where: str) -> float:
    nms = _cfg_get(cfg, 'nms')
    if nms is None or _cfg_get(nms, 'type', 'nms') != 'nms':
        raise ValueError(f'{where}: only test_cfg nms=dict(type="nms", ...) can be exported, got {nms!r}')
    return float(_cfg_get(nms, 'iou_threshold'))


def _anchor_buffers(module: nn.Module, generator, prefix: str) -> List[Tuple[float, ...]]:
    """Register ``generator``'s base anchors on ``module`` as buffers ``{prefix}{level}`` (not saved with the
    weights); return its strides per level, as floats."""
    for i, base in enumerate(generator.base_anchors):
        module.register_buffer(f'{prefix}{i}', base.clone().float(), persistent=False)
    return [tuple(float(v) for v in s) for s in generator.strides]


class TwoStageForExport(nn.Module):
    """Mask R-CNN / Faster R-CNN (RPN + ``StandardRoIHead``) as
    ``(img, img_shape) -> boxes, scores, labels[, masks]``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        rpn, roi = detector.rpn_head, detector.roi_head
        if not getattr(rpn, 'use_sigmoid_cls', True):
            raise ValueError('only an RPN with sigmoid scores can be exported')
        _check_coder(rpn.bbox_coder, 'rpn_head')
        _check_coder(roi.bbox_head.bbox_coder, 'roi_head.bbox_head')
        if type(roi).__name__ != 'StandardRoIHead':
            raise ValueError(f'only StandardRoIHead can be exported, got {type(roi).__name__}')
        self.rpn_cfg = rpn.test_cfg
        self.rcnn_cfg = roi.test_cfg
        self.rpn_iou = _nms_iou(self.rpn_cfg, 'test_cfg.rpn')
        self.rcnn_iou = _nms_iou(self.rcnn_cfg, 'test_cfg.rcnn')
        self.bbox_extractor = ExportRoIExtractor(roi.bbox_roi_extractor)
        self.with_mask = bool(getattr(roi, 'with_mask', False))
        if self.with_mask:
            self.mask_extractor = ExportRoIExtractor(roi.mask_roi_extractor)
        self.num_classes = roi.bbox_head.num_classes
        self.strides = _anchor_buffers(self, rpn.prior_generator, 'rpn_anchors')

    @property
    def output_names(self) -> List[str]:
        return ['boxes', 'scores', 'labels'] + (['masks'] if self.with_mask else [])

    def proposals(self, feats: Sequence[torch.Tensor], img_hw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """RPN proposals ``(B, K, 4)`` and which rows are real, as mmdet's ``RPNHead.predict_by_feat``."""
        rpn = self.detector.rpn_head
        cls_scores, bbox_preds = rpn(feats)
        nms_pre = int(_cfg_get(self.rpn_cfg, 'nms_pre', -1))
        all_scores, all_deltas, all_priors, all_levels = [], [], [], []
        for lvl, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            b = cls.shape[0]
            scores = cls.permute(0, 2, 3, 1).reshape(b, -1).sigmoid()
            deltas = reg.permute(0, 2, 3, 1).reshape(b, -1, 4)
            priors = grid_anchors(getattr(self, f'rpn_anchors{lvl}'), self.strides[lvl], cls.shape[2], cls.shape[3])
            if nms_pre > 0:
                scores, idx = scores.topk(_count(scores.shape[1], nms_pre), dim=1)
                deltas = _gather(deltas, idx)
                priors = priors[idx]
            else:
                priors = priors[None].expand(b, -1, -1)
            all_scores.append(scores)
            all_deltas.append(deltas)
            all_priors.append(priors)
            all_levels.append(torch.full_like(scores, lvl, dtype=torch.long))
        scores = torch.cat(all_scores, 1)
        boxes = decode_deltas(torch.cat(all_priors, 1), torch.cat(all_deltas, 1), rpn.bbox_coder, img_hw)
        valid = size_filter(boxes, torch.ones_like(scores, dtype=torch.bool), _cfg_get(self.rpn_cfg, 'min_bbox_size',
                                                                                        -1))
        best, index, kept = batched_nms(boxes, scores, torch.cat(all_levels, 1), valid, self.rpn_iou,
                                        int(_cfg_get(self.rpn_cfg, 'max_per_img')))
        return _gather(boxes, index) * kept[..., None].to(boxes.dtype), kept

    def forward(self, img: torch.Tensor, img_shape: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        det = self.detector
        feats = det.extract_feat(img)
        img_hw = img_shape.to(img.dtype)
        proposals, real = self.proposals(feats, img_hw)  # (B, K1, 4), (B, K1)
        b, k1 = proposals.shape[0], proposals.shape[1]
        batch = torch.arange(b, device=img.device)[:, None].expand(b, k1).reshape(-1)
        roi_feats = self.bbox_extractor(feats[:self.bbox_extractor.num_inputs], proposals.reshape(-1, 4), batch)
        cls_score, bbox_pred = det.roi_head.bbox_head(roi_feats)
        c = self.num_classes
        scores = torch.softmax(cls_score, dim=-1)[:, :c].reshape(b, -1)  # (B, K1 * C), class fastest
        if det.roi_head.bbox_head.reg_class_agnostic:
            deltas = bbox_pred.reshape(b, k1, 1, 4).expand(b, k1, c, 4)
        else:
            deltas = bbox_pred.reshape(b, k1, c, 4)
        priors = proposals[:, :, None, :].expand(b, k1, c, 4)
        boxes = decode_deltas(priors.reshape(b, -1, 4), deltas.reshape(b, -1, 4), det.roi_head.bbox_head.bbox_coder,
                              img_hw)
        labels = torch.arange(c, device=img.device)[None, None, :].expand(b, k1, c).reshape(b, -1)
        valid = (scores > float(_cfg_get(self.rcnn_cfg, 'score_thr', 0.))) & \
            real[:, :, None].expand(b, k1, c).reshape(b, -1)
        best, index, kept = batched_nms(boxes, scores, labels, valid, self.rcnn_iou,
                                        int(_cfg_get(self.rcnn_cfg, 'max_per_img')))
        out_boxes = _gather(boxes, index) * kept[..., None].to(boxes.dtype)
        out_scores = best * kept.to(best.dtype)
        out_labels = torch.where(kept, torch.gather(labels, 1, index), torch.full_like(index, -1))
        if not self.with_mask:
            return out_boxes, out_scores, out_labels
        k = out_boxes.shape[1]
        batch = torch.arange(b, device=img.device)[:, None].expand(b, k).reshape(-1)
        mask_feats = self.mask_extractor(feats[:self.mask_extractor.num_inputs], out_boxes.reshape(-1, 4), batch)
        logits = det.roi_head.mask_head(mask_feats)  # (B * K, C or 1, 28, 28)
        if logits.shape[1] == 1:
            chosen = logits[:, 0]
        else:
            pick = out_labels.reshape(-1).clamp(min=0)
            chosen = torch.gather(logits, 1, pick[:, None, None, None].expand(-1, 1, *logits.shape[2:]))[:, 0]
        masks = chosen.sigmoid().reshape(b, k, *logits.shape[2:]) * kept[..., None, None].to(chosen.dtype)
        return out_boxes, out_scores, out_labels, masks


class SingleStageForExport(nn.Module):
    """RetinaNet-like detectors (an ``AnchorHead`` with sigmoid class scores) as
    ``(img, img_shape) -> boxes, scores, labels``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        head = detector.bbox_head
        if not getattr(head, 'use_sigmoid_cls', False):
            raise ValueError(f'{type(head).__name__}: only sigmoid class scores can be exported')
        if not hasattr(head, 'prior_generator') or not hasattr(head.prior_generator, 'base_anchors'):
            raise ValueError(f'{type(head).__name__}: only anchor-based heads can be exported')
        _check_coder(head.bbox_coder, 'bbox_head')
        self.cfg = head.test_cfg
        self.iou = _nms_iou(self.cfg, 'test_cfg')
        self.num_classes = head.cls_out_channels
        self.strides = _anchor_buffers(self, head.prior_generator, 'anchors')

    @property
    def output_names(self) -> List[str]:
        return ['boxes', 'scores', 'labels']

    def forward(self, img: torch.Tensor, img_shape: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        head = self.detector.bbox_head
        feats = self.detector.extract_feat(img)
        img_hw = img_shape.to(img.dtype)
        cls_scores, bbox_preds = head(feats)
        c = self.num_classes
        thr = float(_cfg_get(self.cfg, 'score_thr', 0.))
        nms_pre = int(_cfg_get(self.cfg, 'nms_pre', -1))
        all_scores, all_labels, all_deltas, all_priors, all_valid = [], [], [], [], []
        for lvl, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            b = cls.shape[0]
            scores = cls.permute(0, 2, 3, 1).reshape(b, -1).sigmoid()  # (B, N * C), class fastest
            deltas = reg.permute(0, 2, 3, 1).reshape(b, -1, 4)
            priors = grid_anchors(getattr(self, f'anchors{lvl}'), self.strides[lvl], cls.shape[2], cls.shape[3])
            scores = torch.where(scores > thr, scores, torch.full_like(scores, INVALID))
            k = _count(scores.shape[1], nms_pre) if nms_pre > 0 else scores.shape[1]
            scores, idx = scores.topk(k, dim=1)
            anchor = torch.div(idx, c, rounding_mode='floor')
            all_labels.append(idx - anchor * c)
            all_deltas.append(_gather(deltas, anchor))
            all_priors.append(priors[anchor])
            all_scores.append(scores)
            all_valid.append(scores > INVALID / 2)
        scores = torch.cat(all_scores, 1)
        labels = torch.cat(all_labels, 1)
        boxes = decode_deltas(torch.cat(all_priors, 1), torch.cat(all_deltas, 1), head.bbox_coder, img_hw)
        valid = size_filter(boxes, torch.cat(all_valid, 1), _cfg_get(self.cfg, 'min_bbox_size', -1))
        best, index, kept = batched_nms(boxes, scores, labels, valid, self.iou, int(_cfg_get(self.cfg, 'max_per_img')))
        out_boxes = _gather(boxes, index) * kept[..., None].to(boxes.dtype)
        out_labels = torch.where(kept, torch.gather(labels, 1, index), torch.full_like(index, -1))
        return out_boxes, best * kept.to(best.dtype), out_labels


def detector_for_export(detector: nn.Module) -> nn.Module:
    """The export module for an mmdet detector, or ``ValueError`` saying why it cannot be exported whole."""
    if hasattr(detector, 'rpn_head') and hasattr(detector, 'roi_head'):
        if type(detector.roi_head).__name__ != 'StandardRoIHead':
            raise ValueError(f'{type(detector.roi_head).__name__}: only StandardRoIHead (Mask R-CNN, Faster R-CNN) '
                             'is exported whole; use --features for the backbone + neck')
        return TwoStageForExport(detector)
    if hasattr(detector, 'bbox_head') and not hasattr(detector, 'roi_head'):
        return SingleStageForExport(detector)
    raise ValueError(f'{type(detector).__name__}: only two-stage (RPN + StandardRoIHead) and single-stage anchor '
                     'detectors are exported whole; use --features for the backbone + neck')


def valid_rows(outputs: Sequence, image: int = 0) -> Dict[str, object]:
    """The real detections of one image from the outputs (numpy arrays or tensors): rows with ``label >= 0``."""
    names = ['boxes', 'scores', 'labels', 'masks'][:len(outputs)]
    keep = outputs[2][image] >= 0
    return {n: o[image][keep] for n, o in zip(names, outputs)}


__all__ = ['ExportRoIExtractor', 'MIN_DETECTOR_OPSET', 'NMSOp', 'RoIAlignOp', 'SingleStageForExport',
           'TwoStageForExport', 'batched_nms', 'decode_deltas', 'detector_for_export', 'grid_anchors', 'valid_rows']
