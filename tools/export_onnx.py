#!/usr/bin/env python
"""Export an MLLA backbone, an UperNet segmentor or a detector's backbone + FPN to ONNX.

    python tools/export_onnx.py CONFIG_OR_ARCH [WEIGHTS] --out model.onnx [--shape H W] [--dynamic]
                                [--opset N] [--check] [--backbone-only] [--threads N] [--formulation onnx|plain]

CONFIG_OR_ARCH is ``mlla_t``, ``mlla_s``, ``mlla_b`` (the backbone alone,
outputs feat0..feat3), an mmseg config (image -> per-pixel class logits at
the input size) or an mmdet config (backbone + FPN, outputs fpn0..).
WEIGHTS (optional; random weights without it) is read by mlla-mm's safe
checkpoint loader. ``--dynamic`` makes batch, height and width free (one
file for every size, odd sizes too). ``--check`` runs ONNX Runtime at three
sizes (one odd, two not used at export, one with batch 2) and compares with
PyTorch; when an output differs by more than 1e-4 of its largest value the
tool exits 1 and writes nothing. The file is written atomically.

Exit codes: 0 written, 1 check failed (nothing written), 2 bad input (one
``error:`` line; nothing written). See docs/deploy.md.
"""
import argparse
import os
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.deploy.onnx_export import DEFAULT_OPSET
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('model', metavar='CONFIG_OR_ARCH', help='mlla_t | mlla_s | mlla_b, or a config file')
    p.add_argument('weights', nargs='?', metavar='WEIGHTS', help='checkpoint to load (default: random weights)')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=(512, 512),
                   help='example input size for tracing (default 512 512)')
    p.add_argument('--dynamic', action='store_true', help='dynamic batch, height and width')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})')
    p.add_argument('--check', action='store_true', help='compare ONNX Runtime with PyTorch before writing')
    p.add_argument('--backbone-only', action='store_true', help="export only the config's backbone")
    p.add_argument('--threads', type=int, help='torch threads while exporting and checking')
    p.add_argument('--formulation', choices=['onnx', 'plain'], default='onnx',
                   help="'onnx' (default): MLLA's stages rearranged for ONNX Runtime (same numbers, faster); "
                        "'plain': the model's own code traced")
    return p.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    from mlla_mm.deploy.onnx_export import (EXPORTER, TOLERANCE, build_target, check_onnx, check_writable,
                                            default_check_sizes, export_bytes, require, write_onnx)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_writable(args.out)
    require('onnx', *(['onnxruntime'] if args.check else []))
    target = build_target(args.model, args.weights, backbone_only=args.backbone_only,
                          log=lambda msg: print(msg, flush=True))
    shape = tuple(args.shape)
    print(f'exporting {target.kind} of {args.model} ({EXPORTER}, opset {args.opset}, {args.formulation} graph, '
          f'traced at '
          f'{shape[0]}x{shape[1]}, {"dynamic batch/height/width" if args.dynamic else "static shape"})',
          flush=True)
    data = export_bytes(target, shape, dynamic=args.dynamic, opset=args.opset, formulation=args.formulation)
    if args.check:
        sizes = default_check_sizes(shape, args.dynamic)
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
    write_onnx(data, args.out)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): input img (batch, 3, H, W), '
          f'outputs {", ".join(target.output_names)}')
    return 0


def main(argv=None) -> int:
    from mlla_mm.engine.launch import run_main
    args = parse_args(argv)
    return run_main(lambda: export(args))


if __name__ == '__main__':
    sys.exit(main())
