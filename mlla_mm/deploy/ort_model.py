"""An exported ONNX file as an mmengine model, so tools/test.py evaluates it with the config's pipeline and metrics.

:class:`OnnxRuntimeModel` replaces ``cfg.model``: it runs the config's data
preprocessor (the same module PyTorch runs), then the ONNX Runtime session,
and returns mmdet ``DetDataSample`` / mmseg ``SegDataSample`` objects the
config's evaluators read unchanged:

* a whole detector (:mod:`.detector`): boxes rescaled to the original image
  as mmdet does, masks pasted with mmdet's own ``_do_paste_mask`` and
  binarised at the config's ``mask_thr_binary``;
* a segmentor (``logits`` at the input size): mmseg's ``postprocess_result``
  (padding cropped, resized to the original image, argmax).

:func:`check_onnx_for_config` refuses a file that is not ONNX, is not a
whole-model export, or was exported from another config (the model hash,
the classes, the inputs and outputs recorded in the file).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.model import BaseModel

from ..errors import UsageError
from ..registry import register_everywhere
from .onnx_export import config_classes, make_session, model_config_hash

DETECTOR_OUTPUTS = (['boxes', 'scores', 'labels'], ['boxes', 'scores', 'labels', 'masks'])


def read_onnx_metadata(path: str) -> Dict[str, object]:
    """Inputs, outputs and ``metadata_props`` of an ONNX file, or a :class:`UsageError` when it is not one."""
    if not os.path.isfile(path):
        raise UsageError(f'ONNX file not found: {path}')
    try:
        import onnx
    except ImportError:
        raise UsageError(f"{path}: evaluating an ONNX file needs onnx and onnxruntime (pip install -e '.[deploy]')") \
            from None
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: not an ONNX file
        raise UsageError(f'{path}: not an ONNX file ({" ".join(str(err).split())[:120] or type(err).__name__})') \
            from None
    if not proto.graph.node:
        raise UsageError(f'{path}: not an ONNX model (no graph)')
    init = {i.name for i in proto.graph.initializer}
    return dict(inputs=[i.name for i in proto.graph.input if i.name not in init],
                outputs=[o.name for o in proto.graph.output],
                meta={p.key: p.value for p in proto.metadata_props})


def check_onnx_for_config(path: str, cfg) -> Dict[str, object]:
    """The file's metadata when ``path`` is a whole-model export of ``cfg``'s model; else one :class:`UsageError`."""
    info = read_onnx_metadata(path)
    meta = info['meta']
    kind = meta.get('mlla_mm_kind')
    scope = cfg.get('default_scope', 'mmdet')
    expected = 'segmentor' if scope == 'mmseg' else 'detector'
    if kind != expected:
        what = f'a {kind} export' if kind else 'not written by tools/export_onnx.py (no mlla_mm_kind metadata)'
        hint = ' without --features' if scope != 'mmseg' else ''
        raise UsageError(f'{path}: {what}; tools/test.py evaluates a whole {expected} exported from this config '
                         f'(tools/export_onnx.py CONFIG WEIGHTS --out FILE{hint})')
    if expected == 'detector' and (info['inputs'] != ['img', 'img_shape'] or info['outputs'] not in DETECTOR_OUTPUTS):
        raise UsageError(f'{path}: inputs {info["inputs"]} and outputs {info["outputs"]}, expected img, img_shape in '
                         'and boxes, scores, labels[, masks] out')
    if expected == 'segmentor' and (info['inputs'] != ['img'] or info['outputs'] != ['logits']):
        raise UsageError(f'{path}: inputs {info["inputs"]} and outputs {info["outputs"]}, expected img in, logits out')
    classes = config_classes(cfg)
    if classes and 'classes' in meta and json.loads(meta['classes']) != classes:
        raise UsageError(f'{path}: exported for classes {json.loads(meta["classes"])[:5]}..., the config has '
                         f'{classes[:5]}...: a file of another config')
    want = model_config_hash(cfg.model)
    if meta.get('mlla_mm_model_hash') != want:
        raise UsageError(f'{path}: exported from another model config (model hash '
                         f'{meta.get("mlla_mm_model_hash", "missing")}, this config {want}; source '
                         f'{meta.get("mlla_mm_source", "?")}): export it again from this config')
    return info


@register_everywhere
class OnnxRuntimeModel(BaseModel):
    """``predict`` of an exported whole detector or segmentor with ONNX Runtime (see the module docstring).

    Args:
        onnx_file: The exported file.
        kind: ``'detector'`` or ``'segmentor'``.
        data_preprocessor: The config's ``model.data_preprocessor``.
        mask_thr_binary: Mask threshold (detector with masks).
        align_corners: The decode head's ``align_corners`` (segmentor).
        threshold: The decode head's ``threshold`` (a one-class segmentor).
        threads: ONNX Runtime intra-op threads (0: its default).
        session: An ONNX Runtime session of the file made already (tools/benchmark.py's settings);
            ``onnx_file`` then only names it in messages.
    """

    def __init__(self, onnx_file: str, kind: str, data_preprocessor: Optional[dict] = None,
                 mask_thr_binary: float = 0.5, align_corners: bool = False, threshold: float = 0.3,
                 threads: int = 0, session=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        if kind not in ('detector', 'segmentor'):
            raise ValueError(f'OnnxRuntimeModel: kind must be detector or segmentor, got {kind!r}')
        self.kind = kind
        self.onnx_file = onnx_file
        self.mask_thr_binary = float(mask_thr_binary)
        self.align_corners = bool(align_corners)
        self.threshold = float(threshold)
        try:
            self.session = session if session is not None else make_session(onnx_file, threads)
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 (ORT's Fail/InvalidGraph/...: IR version, ops, external data)
            raise UsageError(f'{onnx_file}: ONNX Runtime cannot load it: {_ort_reason(err)}') from None
        self._dummy = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # a device for mmengine

    def forward(self, inputs: torch.Tensor, data_samples: Optional[list] = None, mode: str = 'predict'):
        if mode != 'predict':
            raise RuntimeError(f'OnnxRuntimeModel only predicts (mode {mode!r})')
        if self.kind == 'segmentor':
            return self._predict_seg(inputs, data_samples)
        return self._predict_det(inputs, data_samples)

    def _run(self, feeds: dict) -> list:
        """``session.run``; a failure inside the graph (a damaged or hand-made file) is one :class:`UsageError`."""
        try:
            return self.session.run(None, feeds)
        except Exception as err:  # noqa: BLE001 (ORT's RuntimeException/InvalidArgument/Fail)
            raise UsageError(f'{self.onnx_file}: ONNX Runtime failed on inputs of shapes '
                             f'{[tuple(v.shape) for v in feeds.values()]}: {_ort_reason(err)}') from None

    def _predict_det(self, inputs: torch.Tensor, data_samples: list) -> list:
        from mmengine.structures import InstanceData
        shapes = np.array([list(s.metainfo['img_shape'][:2]) for s in data_samples], dtype=np.int64)
        outs = self._run({'img': inputs.detach().float().cpu().numpy(), 'img_shape': shapes})
        if len(outs) not in (3, 4) or any(len(o) != len(data_samples) for o in outs):
            raise UsageError(f'{self.onnx_file}: ONNX Runtime gave outputs of shapes {[o.shape for o in outs]} for '
                             f'{len(data_samples)} images, expected boxes, scores, labels[, masks] per image')
        for i, sample in enumerate(data_samples):
            keep = outs[2][i] >= 0
            boxes = torch.from_numpy(outs[0][i][keep]).float()
            res = InstanceData()
            res.scores = torch.from_numpy(outs[1][i][keep]).float()
            res.labels = torch.from_numpy(outs[2][i][keep]).long()
            scale = boxes.new_tensor(sample.metainfo['scale_factor']).repeat((1, 2))
            if len(outs) == 4:
                boxes = boxes / scale  # as mmdet's mask head rescales
                h, w = sample.metainfo['ori_shape'][:2]
                res.masks = paste_masks(torch.from_numpy(outs[3][i][keep]).float(), boxes, h, w, self.mask_thr_binary)
            else:
                boxes = boxes * (1 / scale)  # as mmdet's scale_boxes with 1 / scale_factor
            res.bboxes = boxes
            sample.pred_instances = res
        return data_samples

    def _predict_seg(self, inputs: torch.Tensor, data_samples: list) -> list:
        logits, = self._run({'img': inputs.detach().float().cpu().numpy()})
        return seg_postprocess(torch.from_numpy(logits), data_samples, self.align_corners, self.threshold)


def _ort_reason(err: BaseException) -> str:
    """ONNX Runtime's message without its source location prefix, on one line, at most 300 characters."""
    text = ' '.join(str(err).split()) or type(err).__name__
    for marker in ('failed:', 'FAIL :', 'INVALID_ARGUMENT :', 'INVALID_GRAPH :', 'RUNTIME_EXCEPTION :'):
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    return text[:300]


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int, threshold: float) -> torch.Tensor:
    """mmdet's CPU mask pasting: ``(N, 28, 28)`` probabilities in ``(N, 4)`` boxes -> ``(N, H, W)`` bool masks."""
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    n = probs.shape[0]
    out = torch.zeros(n, img_h, img_w, dtype=torch.bool)
    for i in range(n):  # one chunk per mask, skip_empty: what mmdet does on the CPU
        chunk, spatial = _do_paste_mask(probs[i:i + 1, None], boxes[i:i + 1], img_h, img_w, skip_empty=True)
        out[(slice(i, i + 1), ) + spatial] = chunk >= threshold if threshold >= 0 else chunk > 0
    return out


def seg_postprocess(logits: torch.Tensor, data_samples: list, align_corners: bool, threshold: float = 0.3) -> list:
    """mmseg's ``postprocess_result`` for whole-image logits: crop the padding, resize to the original size, argmax."""
    import torch.nn.functional as F
    from mmengine.structures import PixelData
    for i, sample in enumerate(data_samples):
        meta = sample.metainfo
        logit = logits[i:i + 1]
        pad = meta.get('img_padding_size', meta.get('padding_size'))
        if pad is not None:
            left, right, top, bottom = pad
            logit = logit[..., top:logit.shape[2] - bottom, left:logit.shape[3] - right]
        if meta.get('flip'):
            dims = (3, ) if meta.get('flip_direction') == 'horizontal' else (2, )
            logit = logit.flip(dims=dims)
        logit = F.interpolate(logit, size=meta['ori_shape'], mode='bilinear', align_corners=align_corners)[0]
        if logit.shape[0] > 1:
            pred = logit.argmax(0, keepdim=True)
        else:  # one class: mmseg's sigmoid and threshold
            logit = logit.sigmoid()
            pred = (logit > threshold).to(logit)
        sample.seg_logits = PixelData(data=logit)
        sample.pred_sem_seg = PixelData(data=pred)
    return data_samples


def onnx_model_config(cfg, path: str, info: Dict[str, object], threads: int = 0) -> dict:
    """``cfg.model`` replaced by :class:`OnnxRuntimeModel` for ``path`` (checked by :func:`check_onnx_for_config`)."""
    meta = info['meta']
    model = cfg.model
    kind = meta['mlla_mm_kind']
    out = dict(type='mlla_mm.OnnxRuntimeModel', onnx_file=os.path.abspath(path), kind=kind,
               data_preprocessor=model.get('data_preprocessor'), threads=threads)
    if kind == 'detector':
        out['mask_thr_binary'] = float(meta.get('mask_thr_binary', 0.5))
    else:
        head = model.get('decode_head') or {}
        out['align_corners'] = bool(head.get('align_corners', False))
        out['threshold'] = float(head.get('threshold') or 0.3)
    return out


__all__ = ['OnnxRuntimeModel', 'check_onnx_for_config', 'onnx_model_config', 'paste_masks', 'read_onnx_metadata',
           'seg_postprocess']
