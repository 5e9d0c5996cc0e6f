"""Export MLLA models to ONNX, check the file against PyTorch with ONNX Runtime, write it atomically.

What can be exported (:func:`build_target`):

* ``mlla_t | mlla_s | mlla_b``: the backbone alone, outputs ``feat0..feat3``
  (strides 4, 8, 16, 32);
* an mmseg config (UperNet, ...): image in, per-pixel class logits out at
  the input size (output ``logits``);
* an mmdet config (Mask R-CNN, ...): backbone + neck, outputs ``fpn0..``;
* any config with ``backbone_only=True``: its backbone alone;
* a config whose ``model`` is a backbone (``dict(type='mlla_mm.MLLA', ...)``):
  that backbone, outputs ``feat0..`` (with or without ``backbone_only``).

Inputs are normalised float images ``(B, 3, H, W)`` named ``img``; the
config's data preprocessor (mean, std, BGR->RGB) is not in the graph, its
settings are stored in the file's metadata. With ``dynamic=True`` batch,
height and width are free: one file serves every size (odd sizes too).

``onnx`` (and ``onnxruntime`` for the check) are imported only when needed,
so ``mlla_mm`` imports without them; a missing one is a :class:`UsageError`
saying what to install.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import convert_checkpoint, load_backbone_weights, load_file
from ..errors import CheckpointError, UsageError
from ..models import MLLA
from ..utils.io import AtomicWriteError, atomic_write
from ..version import __version__
from .detector import MIN_DETECTOR_OPSET, detector_for_export, valid_rows
from .mlla_graph import export_friendly
from .wrappers import (BackboneForExport, DetectorFeaturesForExport, SegmentorForExport, make_shape_agnostic,
                       output_names)

ARCHS = {'mlla_t': 'tiny', 'mlla_s': 'small', 'mlla_b': 'base'}
# The TorchScript exporter only: the dynamo exporter (torch.export) gives correct dynamic graphs of MLLA but
# took 264 s for a tiny MLLA (TorchScript: about 2 s), almost all in symbolic-shape reasoning; see docs/deploy.md.
EXPORTER = 'torchscript'
DEFAULT_OPSET = 18
#: Opsets that export every graph of this project (MLLA in both formulations, UperNet, Mask R-CNN features):
#: below 13 the plain graph's ``aten::unflatten`` has no ONNX op (below 11 not even the padding of odd sizes);
#: above the TorchScript exporter's maximum torch only warns that it does not support the opset.
MIN_OPSET = 13
MAX_OPSET = int(getattr(getattr(torch.onnx, '_constants', None), 'ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET', 20))
TOLERANCE = 1e-4  # max |onnx - torch| relative to max |torch|, per output
FORMULATIONS = ('onnx', 'plain')  # the traced graph: MLLA rearranged for ONNX Runtime, or the model's own code
INSTALL_HINT = ("pip install onnx onnxruntime, or pip install -e '.[deploy]' for the tested versions (pinned in "
                'setup.cfg and tools/setup_env.sh); onnxscript is not needed')


def check_opset(opset: int, option: str = '--opset') -> int:
    """``opset`` when this project's graphs export at it, else a :class:`UsageError` naming ``option`` and the range."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f'{option} {opset}: expected an ONNX opset from {MIN_OPSET} to {MAX_OPSET} (the range the '
                         f'TorchScript exporter of torch {torch.__version__.split("+")[0]} supports for these models; '
                         f'default {DEFAULT_OPSET})')
    return opset


# --------------------------------------------------------------------------
# Optional dependencies.
# --------------------------------------------------------------------------
def require(*names: str) -> None:
    """Import the named packages or raise one :class:`UsageError` naming what to install."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f'ONNX export needs {", ".join(missing)}, which is not installed: {INSTALL_HINT}')


# --------------------------------------------------------------------------
# What to export.
# --------------------------------------------------------------------------
@dataclass
class ExportTarget:
    """A model ready to export: ``model(img)`` returns a tuple of tensors named ``output_names``.

    ``model`` is the reference (eval mode, exactly what PyTorch runs); the
    graph is traced from :meth:`exportable`, a copy made shape-agnostic.
    """
    model: nn.Module
    kind: str  # 'backbone' | 'segmentor' | 'detector-features' | 'detector'
    output_names: List[str]
    source: str
    metadata: Dict[str, str] = field(default_factory=dict)
    input_names: List[str] = field(default_factory=lambda: ['img'])

    def example_inputs(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The graph's inputs for ``img``: ``(img, )``, and for a whole detector its ``img_shape`` too
        (every image unpadded: its full height and width)."""
        if self.kind != 'detector':
            return (img, )
        shape = torch.tensor([list(img.shape[2:])], dtype=torch.long).expand(img.shape[0], 2).contiguous()
        return (img, shape)

    def exportable(self, formulation: str = 'onnx') -> nn.Module:
        """The copy to trace: ``'onnx'`` rearranges MLLA's stages for ONNX Runtime (:mod:`.mlla_graph`,
        same numbers); ``'plain'`` traces the model's own code."""
        if formulation not in FORMULATIONS:
            raise UsageError(f'unknown formulation {formulation!r}; choose one of {", ".join(FORMULATIONS)}')
        model = make_shape_agnostic(self.model)
        if formulation == 'onnx':
            model = export_friendly(model)
        return model.eval()


def _mlla_backbone(arch: str) -> nn.Module:
    return MLLA(arch, drop_path_rate=0.).eval()


def _load_whole_model(model: nn.Module, path: str, log: Callable[[str], None]) -> None:
    """Strictly load a detector/segmentor checkpoint; a backbone-only file goes into ``model.backbone``."""
    raw = convert_checkpoint(load_file(path), source=path)['state_dict']
    if not any(k.startswith('backbone.') for k in raw):
        load_backbone_weights(model.backbone, path, log=log,
                              optional=lambda k: k.split('.')[0] in {'norm0', 'norm1', 'norm2', 'norm3'})
        log(f'{path} holds backbone weights only: the neck and heads keep their random initialisation')
        return
    own = model.state_dict()
    wrong = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in raw.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in raw and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in raw if k not in own]
    if wrong:
        raise CheckpointError(f'{path}: {len(wrong)} tensor(s) have the wrong shape, e.g. {"; ".join(wrong[:2])}: '
                              'a checkpoint of another arch or config?')
    if missing or unexpected:
        raise CheckpointError(f'{path}: does not match the config: {len(missing)} tensor(s) missing '
                              f'(e.g. {", ".join(missing[:3]) or "-"}), {len(unexpected)} unexpected '
                              f'(e.g. {", ".join(unexpected[:3]) or "-"})')
    model.load_state_dict(raw, strict=False)  # num_batches_tracked may be absent
    log(f'loaded {len(raw)} tensors from {path}')


def _preprocess_metadata(cfg_model: dict) -> Dict[str, str]:
    pre = cfg_model.get('data_preprocessor') or {}
    meta = {}
    for key in ('mean', 'std', 'bgr_to_rgb', 'rgb_to_bgr'):
        if key in pre:
            meta[f'input_{key}'] = json.dumps(list(pre[key]) if isinstance(pre[key], (list, tuple)) else pre[key])
    return meta


def build_target(spec: str, weights: Optional[str] = None, backbone_only: bool = False,
                 log: Callable[[str], None] = print, features: bool = False) -> ExportTarget:
    """Build what ``spec`` names (an arch such as ``mlla_t``, or a config file) and load ``weights``.

    An mmdet config gives the whole detector (:mod:`.detector`: boxes, scores,
    labels, masks); ``features=True`` its backbone + neck (``fpn0..``).

    Raises:
        UsageError: Unknown arch, missing or unbuildable config.
        CheckpointError / FileNotFoundError: ``weights`` is missing, unreadable
            or does not fit the model (another arch, another config).
    """
    if weights is not None and not os.path.exists(weights):  # a folder, device or FIFO: the loader says so
        raise UsageError(f'weights file not found: {weights}')
    name = spec.lower()
    if name in ARCHS and features:
        raise UsageError(f'--features: {spec} is a backbone; --features is for an mmdet config (backbone + neck)')
    if name in ARCHS:
        backbone = _mlla_backbone(ARCHS[name])
        if weights:
            load_backbone_weights(backbone, weights, log=log,
                                  optional=lambda k: k.split('.')[0] in {'norm0', 'norm1', 'norm2', 'norm3'})
        return ExportTarget(BackboneForExport(backbone).eval(), 'backbone', output_names('backbone', 4), spec,
                            {'strides': '4,8,16,32'})
    if not spec.endswith('.py'):
        raise UsageError(f'unknown model {spec!r}: give one of {", ".join(ARCHS)} or a config file (.py)')
    if not os.path.isfile(spec):
        raise UsageError(f'config file not found: {spec}')
    return _build_from_config(spec, weights, backbone_only, log, features)


def model_config_hash(model_cfg) -> str:
    """A short hash of a config's ``model`` (``init_cfg``/``pretrained`` left out: the weights come from the
    checkpoint): an exported file records it, tools/test.py compares it with the config it evaluates."""
    import hashlib

    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                    if k not in ('init_cfg', 'pretrained')}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, type):
            return f'{value.__module__}.{value.__qualname__}'
        return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)

    text = json.dumps(clean(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_classes(cfg) -> Optional[List[str]]:
    """The class names a config evaluates with (``test_dataloader.dataset.metainfo.classes``, or ``classes``)."""
    try:
        meta = cfg.test_dataloader.dataset.get('metainfo') or {}
        classes = meta.get('classes') or cfg.get('classes')
    except AttributeError:
        classes = cfg.get('classes')
    return [str(c) for c in classes] if classes else None


def _build_from_config(path: str, weights: Optional[str], backbone_only: bool,
                       log: Callable[[str], None], features: bool = False) -> ExportTarget:
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    import mlla_mm  # noqa: F401  (registers MLLA and the safe checkpoint reader)
    try:
        cfg = Config.fromfile(path)
    except Exception as err:  # syntax errors, missing bases, ...: the message names the problem
        raise UsageError(f'{path}: cannot read the config: {" ".join(str(err).split())[:300]}') from None
    if 'model' not in cfg:
        raise UsageError(f'{path}: the config has no model')
    model_cfg = cfg.model
    if not isinstance(model_cfg, dict):
        raise UsageError(f'{path}: model must be a dict such as model = dict(type=...), got {type(model_cfg).__name__}')
    if isinstance(model_cfg.get('backbone'), dict):
        model_cfg.backbone.init_cfg = None  # the weights come from WEIGHTS only
    model_hash = model_config_hash(model_cfg)  # before building: mmdet's detectors update their cfg in place
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    try:
        model = MODELS.build(model_cfg)
    except (KeyError, ValueError, TypeError, ImportError) as err:
        raise UsageError(f'{path}: the model does not build: {" ".join(str(err).split())[:300]}') from None
    model = revert_sync_batchnorm(model)
    model.eval()  # not chained: some modules' train() (mmdet's ResNet) returns None
    meta = _preprocess_metadata(model_cfg)
    meta['mlla_mm_model_hash'] = model_hash
    classes = config_classes(cfg)
    if classes:
        meta['classes'] = json.dumps(classes)
    is_detector = scope == 'mmdet' and hasattr(model, 'extract_feat') and getattr(model, 'with_neck', False)
    if features and (backbone_only or not is_detector):
        raise UsageError(f'{path}: --features exports an mmdet detector\'s backbone + neck'
                         + (', not with --backbone-only' if backbone_only else
                            f'; this model ({type(model).__name__}) is not one'))
    if _is_bare_backbone(model):
        # The config's model is a backbone (e.g. model = dict(type='mlla_mm.MLLA', ...)): it is what is exported,
        # with or without backbone_only; its weights may come from a backbone or a whole-model checkpoint.
        if weights:
            load_backbone_weights(model, weights, log=log,
                                  optional=lambda k: k.split('.')[0] in {'norm0', 'norm1', 'norm2', 'norm3'})
        n = len(getattr(model, 'out_indices', ())) or 4
        return ExportTarget(BackboneForExport(model).eval(), 'backbone', output_names('backbone', n), path, meta)
    if backbone_only and not isinstance(getattr(model, 'backbone', None), nn.Module):
        raise UsageError(f'{path}: --backbone-only: the model ({type(model).__name__}) has no backbone to export '
                         '(expected a detector or segmentor with a backbone, or a backbone such as '
                         "model = dict(type='mlla_mm.MLLA', arch='tiny'))")
    if weights:
        _load_whole_model(model, weights, log)
    if backbone_only:
        n = len(getattr(model.backbone, 'out_indices', ())) or 4
        return ExportTarget(BackboneForExport(model.backbone).eval(), 'backbone', output_names('backbone', n), path,
                            meta)
    if hasattr(model, 'decode_head'):
        return ExportTarget(SegmentorForExport(model).eval(), 'segmentor', output_names('segmentor', 1), path, meta)
    if hasattr(model, 'extract_feat') and not features and scope == 'mmdet':
        try:
            whole = detector_for_export(model).eval()
        except ValueError as err:
            raise UsageError(f'{path}: {err}') from None
        rcnn = getattr(getattr(model, 'roi_head', None), 'test_cfg', None)
        if rcnn is not None and rcnn.get('mask_thr_binary') is not None:
            meta['mask_thr_binary'] = str(float(rcnn.get('mask_thr_binary')))
        return ExportTarget(whole, 'detector', whole.output_names, path, meta, ['img', 'img_shape'])
    if hasattr(model, 'extract_feat') and getattr(model, 'with_neck', False):
        with torch.no_grad():
            count = len(model.extract_feat(torch.zeros(1, 3, 64, 64)))
        return ExportTarget(DetectorFeaturesForExport(model).eval(), 'detector-features',
                            output_names('detector-features', count), path, meta)
    raise UsageError(f'{path}: {type(model).__name__} is neither an mmseg segmentor with a decode_head nor a '
                     'detector with a neck; use --backbone-only to export its backbone')


def _is_bare_backbone(model: nn.Module) -> bool:
    """Whether the config's model is a backbone alone (MLLA, or one of mmdet's / mmseg's backbones)."""
    return isinstance(model, MLLA) or ('.backbones.' in type(model).__module__ and not hasattr(model, 'backbone'))


# --------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------
def export_bytes(target: ExportTarget, shape: Tuple[int, int] = (512, 512), dynamic: bool = True,
                 opset: int = DEFAULT_OPSET, formulation: str = 'onnx') -> bytes:
    """Trace ``target`` at ``shape`` and return the serialised, checked ONNX model.

    With ``dynamic`` the input's batch, height and width (and every output's)
    are symbolic; the example batch is 2 so nothing specialises on batch 1.
    ``formulation``: see :meth:`ExportTarget.exportable`.
    """
    require('onnx')
    import onnx
    h, w = shape
    if h < 1 or w < 1:
        raise UsageError(f'--shape must be positive, got {h} {w}')
    check_opset(opset)
    if target.kind == 'detector' and opset < MIN_DETECTOR_OPSET:
        raise UsageError(f'--opset {opset}: a whole detector needs opset {MIN_DETECTOR_OPSET} or more (ONNX RoiAlign '
                         "with coordinate_transformation_mode='half_pixel', mmcv's aligned=True)")
    model = target.exportable(formulation)
    example = torch.randn(2 if dynamic else 1, 3, h, w, generator=torch.Generator().manual_seed(0))
    names = target.output_names
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notice and tracer notes
        axes = None
        if dynamic:
            axes = {'img': {0: 'batch', 2: 'height', 3: 'width'}}
            if target.kind == 'detector':
                axes['img_shape'] = {0: 'batch'}
                axes.update({n: {0: 'batch', 1: 'detections'} for n in names})
            else:
                axes.update({n: {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'} for n in names})
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(model, target.example_inputs(example), buf, dynamo=False,
                              input_names=target.input_names, output_names=names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        proto = onnx.load_from_string(buf.getvalue())
    props = dict(target.metadata, mlla_mm_kind=target.kind, mlla_mm_source=os.path.basename(target.source),
                 mlla_mm_exporter=EXPORTER, mlla_mm_dynamic=str(dynamic).lower(), mlla_mm_formulation=formulation)
    props['mlla_mm_version'] = __version__
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def write_onnx(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` atomically; a failure is a :class:`UsageError` naming the file."""
    try:
        with atomic_write(path) as f:
            f.write(data)
    except AtomicWriteError as err:  # its message without the '[Errno N]' prefix
        raise UsageError(err.strerror or str(err)) from None


def check_writable(path: str) -> None:
    """Fail early (before a long export) when ``path`` cannot be written."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UsageError(f'output path is a directory: {path}')
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f'cannot write {path}: {existing} is not a directory')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'cannot write {path}: no permission to write in {existing}')


# --------------------------------------------------------------------------
# Check with ONNX Runtime.
# --------------------------------------------------------------------------
@dataclass
class CheckRow:
    """One output at one input size: ``passed`` when ``max_abs_diff <= tolerance * scale``."""
    batch: int
    height: int
    width: int
    output: str
    max_abs_diff: float
    scale: float
    passed: bool
    note: str = ''

    def line(self, tolerance: float = TOLERANCE) -> str:
        size = f'{self.batch}x3x{self.height}x{self.width}'
        rel = self.max_abs_diff / self.scale if self.scale > 0 else float('inf')
        return (f'{size:>16} {self.output:<10} max|diff| {self.max_abs_diff:.3e}  max|ref| {self.scale:.3e}  '
                f'rel {rel:.2e}  {"PASS" if self.passed else "FAIL"}' + (f'  ({self.note})' if self.note else ''))


def make_session(model: Union[bytes, str], threads: int = 0, level: str = 'all', spinning: bool = True):
    """An ONNX Runtime CPU session.

    Args:
        model: The serialised model or a path.
        threads: Intra-op threads (0: ONNX Runtime's default, one per core).
        level: Graph optimisation: ``disable``, ``basic``, ``extended`` or ``all``.
        spinning: Let idle worker threads spin (ONNX Runtime's default); switch
            it off when other work (e.g. PyTorch in a benchmark) shares the cores.
    """
    require('onnxruntime')
    import onnxruntime as ort
    levels = dict(disable=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  basic=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  extended=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  all=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if level not in levels:
        raise UsageError(f'unknown graph optimisation level {level!r}; choose one of {", ".join(levels)}')
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.log_severity_level = 4  # failures are reported by the caller, not logged twice
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(model, sess_options=opts, providers=['CPUExecutionProvider'])


def default_check_sizes(shape: Tuple[int, int], dynamic: bool = True) -> List[Tuple[int, int, int]]:
    """``(batch, H, W)`` for ``--check``: the export size; odd sizes it was not exported at; batch 2.

    A static export is checked at its own size only.
    """
    h, w = shape
    if not dynamic:
        return [(1, h, w)]

    def odd(v: int) -> int:
        return max(1, v | 1)

    return [(1, h, w), (1, odd(h * 3 // 4), odd(w * 5 // 4 + 2)), (2, h // 2 + 2, max(1, w // 2 + 10))]


def check_onnx(model: Union[bytes, str], reference: nn.Module, output_names_: Sequence[str],
               sizes: Sequence[Tuple[int, int, int]], tolerance: float = TOLERANCE, seed: int = 0,
               session=None) -> List[CheckRow]:
    """Run the ONNX model and ``reference`` on the same random images; one :class:`CheckRow` per output and size.

    A row fails when the shapes differ, a value is not finite, or
    ``max |onnx - torch| > tolerance * max |torch|``.
    """
    sess = session or make_session(model)
    input_name = sess.get_inputs()[0].name
    rows: List[CheckRow] = []
    reference.eval()
    gen = torch.Generator().manual_seed(seed)
    for b, h, w in sizes:
        img = torch.randn(b, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = [t.float().numpy() for t in reference(img)]
        try:
            got = sess.run(None, {input_name: img.numpy()})
        except Exception as err:  # ONNX Runtime raises its own error types: a failure at this size
            rows.append(CheckRow(b, h, w, '*', math.inf, 0., False,
                                 f'ONNX Runtime failed: {" ".join(str(err).split())[:300]}'))
            continue
        if len(got) != len(ref):
            rows.append(CheckRow(b, h, w, '*', math.inf, 0., False, f'{len(got)} outputs, PyTorch has {len(ref)}'))
            continue
        for name, r, o in zip(output_names_, ref, got):
            scale = float(np.abs(r).max()) if r.size else 0.
            if o.shape != r.shape:
                rows.append(CheckRow(b, h, w, name, math.inf, scale, False,
                                     f'shape {tuple(o.shape)} vs PyTorch {tuple(r.shape)}'))
                continue
            diff = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.
            finite = bool(np.isfinite(o).all())
            passed = finite and diff <= tolerance * max(scale, 1e-12)
            rows.append(CheckRow(b, h, w, name, diff, scale, passed, '' if finite else 'non-finite values'))
    return rows


def ties_in_one_order(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray],
                      tolerance: float = TOLERANCE) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Both detection lists (``valid_rows`` of one image, same length) with each run of tied scores in one order.

    Detections are sorted by score, and the order of equal scores is not
    defined: PyTorch and ONNX Runtime may give two tied detections in either
    order (seen with random weights: two boxes of score 0.3087112 swapped).
    A tie is a run of consecutive detections of PyTorch whose scores are
    within ``tolerance * max |score|`` of the run's first; within each run,
    both lists are put in the order of (label, box corners).
    """
    scores = np.asarray(ref['scores'], dtype=np.float64)
    n = len(scores)
    if n < 2:
        return ref, got
    eps = tolerance * max(float(np.abs(scores).max()), 1e-12)
    orders = {id(ref): np.arange(n), id(got): np.arange(n)}
    start = 0
    while start < n:
        end = start + 1
        while end < n and abs(scores[end] - scores[start]) <= eps:
            end += 1
        if end - start > 1:
            for rows in (ref, got):
                boxes = np.asarray(rows['boxes'])[start:end]
                keys = [boxes[:, k] for k in reversed(range(boxes.shape[1]))] + [np.asarray(rows['labels'])[start:end]]
                orders[id(rows)][start:end] = start + np.lexsort(keys)
        start = end
    return tuple({k: np.asarray(v)[orders[id(rows)]] for k, v in rows.items()} for rows in (ref, got))


def check_detector_onnx(model: Union[bytes, str], target: ExportTarget, sizes: Sequence[Tuple[int, int, int]],
                        tolerance: float = TOLERANCE, seed: int = 0, session=None,
                        images: Optional[Sequence[torch.Tensor]] = None) -> List[CheckRow]:
    """A whole detector's file against ``target.model`` in PyTorch, image by image.

    For every image the real detections (``label >= 0``) must agree: the same
    number and the same labels in the same order (detections whose scores
    tie may come in either order: :func:`ties_in_one_order`), and boxes,
    scores and masks within ``tolerance * max |torch|``. ``images``: given
    ``(B, 3, H, W)`` tensors instead of random ones at ``sizes``.
    """
    sess = session or make_session(model)
    rows: List[CheckRow] = []
    reference = target.model.eval()
    gen = torch.Generator().manual_seed(seed)
    batches = list(images) if images is not None else [torch.randn(b, 3, h, w, generator=gen) for b, h, w in sizes]
    for img in batches:
        b, _, h, w = img.shape
        inputs = target.example_inputs(img)
        with torch.no_grad():
            ref = [t.numpy() for t in reference(*inputs)]
        try:
            got = sess.run(None, {n: t.numpy() for n, t in zip(target.input_names, inputs)})
        except Exception as err:  # ONNX Runtime raises its own error types
            rows.append(CheckRow(b, h, w, '*', math.inf, 0., False,
                                 f'ONNX Runtime failed: {" ".join(str(err).split())[:300]}'))
            continue
        for i in range(b):
            r, o = valid_rows(ref, i), valid_rows(got, i)
            if len(r['labels']) == len(o['labels']):
                r, o = ties_in_one_order(r, o, tolerance)
            if len(r['labels']) != len(o['labels']) or not np.array_equal(r['labels'], o['labels']):
                rows.append(CheckRow(b, h, w, f'labels[{i}]', math.inf, 0., False,
                                     f'{len(o["labels"])} detections, PyTorch {len(r["labels"])}; labels differ'))
                continue
            for name in target.output_names:
                if name == 'labels':
                    continue
                ref_v, got_v = r[name].astype(np.float64), o[name].astype(np.float64)
                scale = float(np.abs(ref_v).max()) if ref_v.size else 0.
                diff = float(np.abs(got_v - ref_v).max()) if ref_v.size else 0.
                finite = bool(np.isfinite(got_v).all())
                rows.append(CheckRow(b, h, w, f'{name}[{i}]', diff, scale,
                                     finite and diff <= tolerance * max(scale, 1e-12),
                                     f'{len(r["labels"])} detections' if finite else 'non-finite values'))
    return rows


__all__ = ['ARCHS', 'CheckRow', 'DEFAULT_OPSET', 'EXPORTER', 'ExportTarget', 'FORMULATIONS', 'MAX_OPSET', 'MIN_OPSET',
           'TOLERANCE', 'build_target', 'check_detector_onnx', 'check_onnx', 'check_opset', 'check_writable',
           'config_classes', 'default_check_sizes', 'export_bytes', 'make_session', 'model_config_hash', 'require',
           'ties_in_one_order', 'write_onnx']
