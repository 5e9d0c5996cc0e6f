#!/usr/bin/env python
"""Export an MLLA backbone, an UperNet segmentor or a whole detector to ONNX (optionally INT8).

    python tools/export_onnx.py CONFIG_OR_ARCH [WEIGHTS] --out model.onnx [--shape H W] [--dynamic]
                                [--opset N] [--check] [--backbone-only | --features] [--threads N]
                                [--formulation onnx|plain] [--int8 [--calib-images N | --calib-dir DIR]]

CONFIG_OR_ARCH is ``mlla_t``, ``mlla_s``, ``mlla_b`` (the backbone alone,
outputs feat0..feat3), an mmseg config (image -> per-pixel class logits at
the input size), an mmdet config (the whole detector: inputs img and
img_shape, outputs boxes, scores, labels[, masks]; ``--features``: backbone
+ FPN, outputs fpn0..) or a config whose ``model`` is a backbone
(``dict(type='mlla_mm.MLLA', ...)``). ``--int8`` writes a statically
quantized model (ONNX Runtime, QDQ), calibrated on ``--calib-images N``
training images of the config or the images of ``--calib-dir DIR``.
``--opset`` is 13 (the lowest that exports every graph of this project) up
to the TorchScript exporter's maximum (20 with torch 2.14); default 18.
WEIGHTS (optional; random weights without it) is read by mlla-mm's safe
checkpoint loader. ``--dynamic`` makes batch, height and width free (one
file for every size, odd sizes too). ``--check`` runs ONNX Runtime at three
sizes (one odd, two not used at export, one with batch 2) and compares with
PyTorch; when an output differs by more than 1e-4 of its largest value the
tool exits 1 and writes nothing. The file is written atomically; it never
replaces the config or the weights, nor (without ``--force``) an existing
file that mlla-mm did not write.

Exit codes: 0 written, 1 check failed (nothing written), 2 bad input (one
``error:`` line; nothing written). See docs/deploy.md.
"""
import argparse
import os
import sys

import torch

CALIB_DIR_MAX = 100  # --calib-dir: at most this many images (sorted by name) are used


def opset_type(text: str) -> int:
    """argparse type: an ONNX opset this project's graphs export at (MIN_OPSET..MAX_OPSET)."""
    from mlla_mm.deploy.onnx_export import MAX_OPSET, MIN_OPSET
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f'expected an ONNX opset from {MIN_OPSET} to {MAX_OPSET}, got {text!r}')
    return value


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.deploy.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
    from mlla_mm.cli import ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('model', metavar='CONFIG_OR_ARCH', help='mlla_t | mlla_s | mlla_b, or a config file')
    p.add_argument('weights', nargs='?', metavar='WEIGHTS', help='checkpoint to load (default: random weights)')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=(512, 512),
                   help='example input size for tracing (default 512 512)')
    p.add_argument('--dynamic', action='store_true', help='dynamic batch, height and width')
    p.add_argument('--opset', type=opset_type, default=DEFAULT_OPSET, metavar='N',
                   help=f'ONNX opset, {MIN_OPSET} to {MAX_OPSET} (the TorchScript exporter\'s range for these '
                        f'models; default {DEFAULT_OPSET})')
    p.add_argument('--check', action='store_true', help='compare ONNX Runtime with PyTorch before writing')
    p.add_argument('--features', action='store_true',
                   help='mmdet config: export the backbone + neck (outputs fpn0..) instead of the whole detector')
    p.add_argument('--backbone-only', action='store_true',
                   help="export only the config's backbone (a config whose model is a backbone exports it anyway)")
    p.add_argument('--threads', type=positive_int, metavar='N',
                   help="torch threads (>= 1) while exporting and checking (default: torch's own)")
    p.add_argument('--formulation', choices=['onnx', 'plain'], default='onnx',
                   help="'onnx' (default): MLLA's stages rearranged for ONNX Runtime (same numbers, faster); "
                        "'plain': the model's own code traced")
    p.add_argument('--force', action='store_true',
                   help='overwrite an existing --out file that mlla-mm did not write (never the config or weights)')
    p.add_argument('--int8', action='store_true',
                   help='write an INT8 model: static post-training quantization (ONNX Runtime, QDQ, per-channel)')
    p.add_argument('--calib-images', type=positive_int, metavar='N',
                   help="--int8 with a config: calibrate on the first N images of the config's training set, "
                        'through its test pipeline (default 16)')
    p.add_argument('--calib-dir', metavar='DIR',
                   help=f'--int8: calibrate on the images of DIR instead (needed for an arch such as mlla_t; the '
                        f'first {CALIB_DIR_MAX} by name, resized to --shape, normalised as the config or ImageNet)')
    args = p.parse_args(argv)
    if min(args.shape) < 1:
        p.error(f'--shape must be positive, got {args.shape[0]} {args.shape[1]}')
    if (args.calib_images or args.calib_dir) and not args.int8:
        p.error(f'{"--calib-images" if args.calib_images else "--calib-dir"} needs --int8')
    if args.calib_images and args.calib_dir:
        p.error('--calib-images and --calib-dir: give one (N images of the config\'s training set, or a folder)')
    if args.int8 and not args.calib_dir and not args.model.endswith('.py'):
        p.error(f'--int8 of {args.model}: give --calib-dir DIR of calibration images (an arch has no training set)')
    return args


def export(args: argparse.Namespace) -> int:
    from mlla_mm.deploy.onnx_export import (EXPORTER, TOLERANCE, build_target, check_onnx, default_check_sizes,
                                            export_bytes, require, write_onnx)
    from mlla_mm.cli import check_output
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output(args.out, '--out')
    # never the config or the weights, nor a file the tools did not write unless --force
    from mlla_mm.cli import UsageError
    from mlla_mm.utils.io import check_outputs
    check_outputs([args.out], [args.model, args.weights], force=args.force, option='--out', error=UsageError)
    require('onnx', *(['onnxruntime'] if args.check or args.int8 else []))
    if args.weights and not os.path.exists(args.weights):  # where to get the published file and where to put it
        from mlla_mm.models.timm_mlla import MissingWeightsError, missing_weights_message
        raise MissingWeightsError(missing_weights_message(args.weights, args.model))
    if args.calib_dir:
        from mlla_mm.deploy.quantize import folder_images
        folder_images(args.calib_dir, 1)  # a folder with images, before the export
    if not args.weights:
        print(f'warning: no WEIGHTS given: the exported model has RANDOM weights (give a checkpoint after '
              f'{args.model} to export trained ones)', flush=True)
    target = build_target(args.model, args.weights, backbone_only=args.backbone_only,
                          log=lambda msg: print(msg, flush=True), features=args.features)
    shape = tuple(args.shape)
    print(f'exporting {target.kind} of {args.model} ({EXPORTER}, opset {args.opset}, {args.formulation} graph, '
          f'traced at '
          f'{shape[0]}x{shape[1]}, {"dynamic batch/height/width" if args.dynamic else "static shape"})',
          flush=True)
    data = export_bytes(target, shape, dynamic=args.dynamic, opset=args.opset, formulation=args.formulation)
    if args.check:
        sizes = default_check_sizes(shape, args.dynamic)
        if target.kind == 'detector':
            from mlla_mm.deploy.onnx_export import check_detector_onnx
            rows = check_detector_onnx(data, target, sizes)
        else:
            rows = check_onnx(data, target.model, target.output_names, sizes)
        print(f'check: ONNX Runtime vs PyTorch, tolerance {TOLERANCE:g} x max|ref| per output')
        for row in rows:
            print('  ' + row.line())
        failed = [r for r in rows if not r.passed]
        if failed:
            print(f'error: ONNX Runtime differs from PyTorch in {len(failed)} of {len(rows)} checks; '
                  f'{args.out} not written', file=sys.stderr)
            return 1
        print(f'check: all {len(rows)} PASS')
    if args.int8:
        data = int8_model(args, target, data, shape)
    write_onnx(data, args.out)
    inputs = 'inputs img (batch, 3, H, W), img_shape (batch, 2)' if target.kind == 'detector' else \
        'input img (batch, 3, H, W)'
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {inputs}, '
          f'outputs {", ".join(target.output_names)}')
    return 0


def int8_model(args: argparse.Namespace, target, data: bytes, shape) -> bytes:
    """The INT8 model of ``data``, calibrated as the options say (see mlla_mm/deploy/quantize.py)."""
    import json

    import numpy as np

    from mlla_mm.deploy.quantize import IMAGENET_MEAN, IMAGENET_STD, config_calibration, folder_calibration, \
        quantize_int8
    if args.calib_dir:
        mean = json.loads(target.metadata.get('input_mean', 'null')) or IMAGENET_MEAN
        std = json.loads(target.metadata.get('input_std', 'null')) or IMAGENET_STD
        feeds = folder_calibration(args.calib_dir, CALIB_DIR_MAX, shape, mean, std)
        if target.kind == 'detector':
            feeds = (dict(f, img_shape=np.array([list(f['img'].shape[2:])], np.int64)) for f in feeds)
    else:
        feeds = config_calibration(args.model, args.calib_images or 16, target.kind)
    print(f'int8: static quantization (ONNX Runtime, QDQ, u8 activations, s8 per-channel weights), calibrating on '
          f'{args.calib_dir or f"{args.calib_images or 16} training images of {args.model}"}', flush=True)
    return quantize_int8(data, feeds, log=lambda msg: print(msg, flush=True))


def main(argv=None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: export(args))


if __name__ == '__main__':
    sys.exit(main())
