"""Parameters and FLOPs of a detector / segmentor config, or of a bare MLLA backbone.

Examples::

    python tools/get_flops.py configs/detection/mask_rcnn_mlla_t.py            # 1280x800
    python tools/get_flops.py configs/segmentation/upernet_mlla_b.py           # 2048x512
    python tools/get_flops.py mlla_t --shape 224 224                           # backbone only
    python tools/get_flops.py mlla_t --shape 800 1280 --json flops.json

Bad input (a missing or broken config, an unknown backbone name, a shape or
thread count below 1, a ``--json`` path that cannot be written) is one
``error:`` line on stderr and exit code 2, before anything is measured.

``--shape H W`` is the input height and width (default 800 1280 for
detection and backbones, 512 2048 for segmentation, i.e. the papers'
"1280x800" and "2048x512"). Every convolution and matmul is counted at the
aten level (see ``mlla_mm/utils/flops.py``), including the linear-attention
products. The RoI extractors of the detection configs (``SparseRoIExtractor``,
a sparse matrix product) are counted by their real work, bins x sampling
points x 4 bilinear taps x channels, as mmcv's RoIAlign does it (a dense
count of that product gave 1005.8 GMACs for Mask R-CNN MLLA-T instead of
about 255). The "GFLOPs" column of the papers counts multiply-accumulates, so
this prints MACs, and FLOPs = 2 x MACs next to it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Dict, Optional, Tuple

import torch

from mlla_mm.utils.flops import count_flops, count_params

BACKBONES = {'mlla_t': 'tiny', 'mlla_s': 'small', 'mlla_b': 'base'}
# Published "FLOPs" (GMACs) for whole models, keyed by (model kind, arch letter).
PUBLISHED = {('mask_rcnn', 't'): 255., ('mask_rcnn', 's'): 319., ('mask_rcnn', 'b'): 502.,
             ('upernet', 'b'): 1183.}
# Published backbone GMACs (the spec): MLLA-T at 224x224 and 800x1280.
PUBLISHED_BACKBONE = {('t', 224, 224): 4.13, ('t', 800, 1280): 84.3}


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.cli import ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a config file, or a backbone name: ' + ', '.join(BACKBONES))
    p.add_argument('--shape', type=positive_int, nargs=2, metavar=('H', 'W'),
                   help='input height and width (positive integers)')
    p.add_argument('--json', help='write the numbers to this JSON file')
    p.add_argument('--force', action='store_true',
                   help='overwrite an existing --json file that mlla-mm did not write (never the config)')
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    return p.parse_args(argv)


def check_target(target: str) -> None:
    """A backbone name or an existing config file; else a :class:`~mlla_mm.engine.launch.UsageError`."""
    from mlla_mm.cli import UsageError
    if os.path.basename(target).lower() in BACKBONES:
        return
    if os.path.isdir(target):
        raise UsageError(f'{target} is a directory, not a config file')
    if not os.path.isfile(target):
        raise UsageError(f'{target}: neither a config file nor a backbone name '
                         f'(expected a config file or one of {", ".join(BACKBONES)})')


def kind_and_arch(name: str) -> Tuple[str, Optional[str]]:
    """('mask_rcnn' | 'cascade_mask_rcnn' | 'upernet' | 'backbone' | 'other', 't' | 's' | 'b' | None) from a name."""
    base = os.path.basename(name).lower()
    arch = None
    for letter in 'tsb':
        if f'mlla_{letter}' in base or f'mlla-{letter}' in base:
            arch = letter
    if base in BACKBONES:
        return 'backbone', arch
    if 'cascade' in base:  # no published MLLA figures to compare with
        return 'cascade_mask_rcnn', arch
    if 'mask_rcnn' in base or 'mask-rcnn' in base:
        return 'mask_rcnn', arch
    if 'upernet' in base:
        return 'upernet', arch
    return 'other', arch


def build_from_config(path: str) -> Tuple[torch.nn.Module, str]:
    """Build the model of a config (no weights loaded); returns it and the default scope."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    import mlla_mm  # noqa: F401  (registers MLLA)
    from mlla_mm.cli import UsageError, load_config, one_line
    cfg = load_config(path)  # a config that does not read is a UsageError naming the file
    if not isinstance(cfg.get('model'), dict):
        raise UsageError(f'{path}: the config defines no model')
    scope = cfg.get('default_scope', 'mmdet')
    try:
        init_default_scope(scope)
    except (KeyError, ValueError, ImportError) as err:
        raise UsageError(f'{path}: default_scope {scope!r}: {one_line(err)}') from None
    backbone = cfg.model.get('backbone', {})
    if isinstance(backbone, dict) and 'init_cfg' in backbone:
        backbone['init_cfg'] = None  # FLOPs need no weights
    # SyncBN only runs under DDP: count with plain BN (same FLOPs), as mmengine's Runner does in one process.
    try:
        model = MODELS.build(cfg.model)
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError, ImportError) as err:
        raise UsageError(f'{path}: the model does not build: {type(err).__name__}: {one_line(err)}') from None
    if not hasattr(model, 'backbone'):
        raise UsageError(f'{path}: the model ({type(model).__name__}) has no backbone: expected a detector or '
                         'segmentor config')
    return revert_sync_batchnorm(model), scope


def whole_model_call(model: torch.nn.Module, scope: str, h: int, w: int):
    """A closure running the model's tensor-mode forward on one (1, 3, h, w) image."""
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1., 1.))
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        samples = [SegDataSample(metainfo=meta)]
        head = getattr(model, 'decode_head', None)
        if head is not None and 'batch_data_samples' in inspect.signature(head.forward).parameters:
            # mmseg's tensor mode calls decode_head.forward(x) alone; Mask2Former's head needs the samples.
            return lambda: head.forward(model.extract_feat(torch.randn(1, 3, h, w)), samples)
    else:
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=meta)]
    return lambda: model(torch.randn(1, 3, h, w), samples, mode='tensor')


def measure(target: str, shape: Optional[Tuple[int, int]] = None) -> Dict[str, object]:
    """Params and FLOPs of a config's model and its backbone (or of a bare backbone)."""
    kind, arch = kind_and_arch(target)
    if kind == 'backbone':
        from mlla_mm.models import MLLA
        h, w = shape or (800, 1280)
        model, backbone, scope = None, MLLA(BACKBONES[os.path.basename(target).lower()]), None
    else:
        model, scope = build_from_config(target)
        h, w = shape or ((512, 2048) if scope == 'mmseg' else (800, 1280))
        backbone = model.backbone
    res: Dict[str, object] = dict(target=target, kind=kind, arch=arch, height=h, width=w)
    backbone.eval()
    # the input is made inside the count: a --shape too large to allocate is the one-line error below
    bb = _count(lambda: backbone(torch.randn(1, 3, h, w)), target, h, w)
    res.update(backbone_params=count_params(backbone), backbone_macs=bb.macs, backbone_flops=bb.flops,
               backbone_by_op={k: v // 2 for k, v in bb.by_op.items()})
    if model is not None:
        model.eval()
        whole = _count(whole_model_call(model, scope, h, w), target, h, w)
        res.update(params=count_params(model), macs=whole.macs, flops=whole.flops,
                   by_op={k: v // 2 for k, v in whole.by_op.items()})
        pub = PUBLISHED.get((kind, arch))
        if pub is not None:
            res['published_gmacs'] = pub
    pub_bb = PUBLISHED_BACKBONE.get((arch, h, w)) if kind == 'backbone' else None
    if pub_bb is not None:
        res['published_backbone_gmacs'] = pub_bb
    return res


def _count(fn, target: str, h: int, w: int):
    """:func:`count_flops` of ``fn``; a model that cannot run at this input size is a UsageError."""
    from mlla_mm.cli import UsageError, one_line
    try:
        return count_flops(fn)
    except (RuntimeError, ValueError, IndexError) as err:
        raise UsageError(f'{target} does not run on a {h}x{w} (HxW) input (--shape {h} {w}): '
                         f'{one_line(err)[:300]}') from None


def report(res: Dict[str, object]) -> str:
    """Human-readable lines for one measurement."""
    lines = [f"{res['target']}  input {res['height']}x{res['width']} (HxW)"]
    if 'macs' in res:
        lines.append(f"  whole model: {res['params'] / 1e6:.2f} M params, {res['macs'] / 1e9:.1f} GMACs "
                     f"(= published-convention GFLOPs), {res['flops'] / 1e9:.1f} GFLOPs (2 x MACs)")
        if 'published_gmacs' in res:
            lines.append(f"  published: {res['published_gmacs']:.0f}G; ratio "
                         f"{res['macs'] / 1e9 / res['published_gmacs']:.3f}")
        lines.append('  by op (GMACs): ' + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in res['by_op'].items()))
    lines.append(f"  backbone:    {res['backbone_params'] / 1e6:.2f} M params, {res['backbone_macs'] / 1e9:.2f} "
                 f"GMACs, {res['backbone_flops'] / 1e9:.2f} GFLOPs")
    if 'published_backbone_gmacs' in res:
        lines.append(f"  published backbone: {res['published_backbone_gmacs']}G; ratio "
                     f"{res['backbone_macs'] / 1e9 / res['published_backbone_gmacs']:.4f}")
    lines.append('  backbone by op (GMACs): '
                 + ', '.join(f'{k} {v / 1e9:.2f}' for k, v in res['backbone_by_op'].items()))
    return '\n'.join(lines)


def main(argv=None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Measure and print (and write ``--json``); bad input raises before anything is measured."""
    from mlla_mm.cli import UsageError, check_output
    from mlla_mm.utils.io import WRITTEN_BY, atomic_write, check_outputs
    check_target(args.config)
    check_output(args.json, '--json')
    # never the config itself, nor a file mlla-mm did not write unless --force
    check_outputs([args.json] if args.json else [], [args.config], force=args.force, option='--json',
                  error=UsageError)
    torch.set_num_threads(args.threads)
    res = measure(args.config, tuple(args.shape) if args.shape else None)
    print(report(res))
    if args.json:
        with atomic_write(args.json, 'w') as f:  # whole or not at all
            json.dump(dict(written_by=f'{WRITTEN_BY} get_flops', **res), f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
