#!/usr/bin/env python
"""ONNX Runtime against PyTorch eager: MLLA-T and Swin-T backbones, an UperNet MLLA-T, and bf16 autocast.

    python tools/benchmark_onnx.py --threads 2 --repeats 5 --json work_dirs/bench_onnx.json

Each model is exported with tools/export_onnx.py's code (MLLA and UperNet
with dynamic batch/height/width, as users get them; mmdet's Swin-T at the
benchmark size, since its padding is not traced dynamically), its ONNX
Runtime output is compared with PyTorch, then ONNX Runtime (one session per
graph optimisation level in ``--levels``; with ``--formulations onnx plain``
also the graph of the model's own code, before the export-only rearrangement
of mlla_mm/deploy/mlla_graph.py) and PyTorch eager run in the same
interleaved rounds with the same number of threads (``torch.set_num_threads``
and ``intra_op_num_threads``). Medians and per-round ratios are printed; the
two goals of the project are printed with PASS/FAIL:

* MLLA-T at the backbone size: ONNX Runtime <= 0.9 x PyTorch eager;
* (ONNX MLLA-T / ONNX Swin-T) <= (PyTorch MLLA-T / PyTorch Swin-T).

``--bf16`` (default on) also times the MLLA-T backbone under PyTorch bf16
autocast against fp32 and states whether the CPU has native bf16
(AVX512-BF16 / AMX); without it a one-line ``warning:`` goes to stderr
first (``mlla_mm.utils.cpu.bf16_fast_on_this_cpu``). ``--quick`` (for tests): small size, one repeat.

Bad arguments (a size that is not ``HxW`` with positive integers, a thread or
repeat count below 1, a ``--json`` path that cannot be written) are one
``error:`` line on stderr and exit code 2, before anything is exported or timed.
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

MODELS = ['mlla_t', 'swin_t', 'upernet_mlla_t']
LEVELS = ['disable', 'basic', 'extended', 'all']
GOAL_ORT_OVER_TORCH = 0.9
GOAL_INT8_OVER_TORCH = 0.6  # INT8 ONNX Runtime against PyTorch eager fp32 (MLLA-T backbone)


def parse_size(text: str) -> Tuple[int, int]:
    """``'800x1280'`` -> ``(800, 1280)``; raises ``argparse.ArgumentTypeError`` unless HxW with positive integers."""
    from mlla_mm.engine.launch import image_size
    return image_size(text)


def size_arg(text: str) -> str:
    """argparse type: ``HxW`` with positive integers, kept as the text ``'HxW'``."""
    h, w = parse_size(text)
    return f'{h}x{w}'


def build(name: str, size: Tuple[int, int], quick: bool = False):
    """(ExportTarget, export shape, dynamic) for a model name; dynamic ones are traced at another size."""
    from mlla_mm.deploy.onnx_export import ExportTarget, build_target
    from mlla_mm.deploy.wrappers import BackboneForExport, output_names
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch.manual_seed(0)
    if name == 'mlla_t':
        return build_target('mlla_t', log=lambda m: None), size if quick else (224, 224), True
    if name == 'swin_t':
        from mmdet.models.backbones import SwinTransformer
        swin = SwinTransformer(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                               mlp_ratio=4, qkv_bias=True, drop_path_rate=0., out_indices=(0, 1, 2, 3),
                               with_cp=False, convert_weights=True)
        swin.eval()
        return ExportTarget(BackboneForExport(swin).eval(), 'backbone', output_names('backbone', 4), 'swin_t'), \
            size, False
    if name == 'upernet_mlla_t':
        cfg = os.path.join(root, 'configs', 'segmentation', 'upernet_mlla_t.py')
        return build_target(cfg, log=lambda m: None), size if quick else (256, 256), True
    raise ValueError(name)


def int8_bytes(data: bytes, size: Tuple[int, int], calib_dir: Optional[str] = None) -> bytes:
    """The INT8 model of ``data`` (mlla_mm/deploy/quantize.py), calibrated on ``calib_dir`` or 2 random images."""
    import numpy as np

    from mlla_mm.deploy.quantize import folder_calibration, quantize_int8
    if calib_dir:
        feeds = folder_calibration(calib_dir, 8, size)
    else:
        gen = np.random.default_rng(0)
        feeds = [{'img': gen.standard_normal((1, 3, *size), dtype=np.float32)} for _ in range(2)]
    return quantize_int8(data, feeds, log=lambda msg: print(f'# {msg}', flush=True))


def bf16_warning(cpu: dict) -> Optional[str]:
    """The one-line warning printed before a bf16 measurement on a CPU without AMX / AVX512-BF16, else None."""
    if cpu['native_bf16']:
        return None
    return f"warning: bf16 requested, but {cpu['bf16_note']}"


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.engine.launch import ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=positive_int, default=2, help='threads of both runtimes (default 2)')
    p.add_argument('--repeats', type=positive_int, default=5, help='interleaved rounds (default 5)')
    p.add_argument('--backbone-size', type=size_arg, default='800x1280',
                   help='HxW for the backbones (default 800x1280)')
    p.add_argument('--seg-size', type=size_arg, default='512x512', help='HxW for UperNet (default 512x512)')
    p.add_argument('--models', nargs='+', choices=MODELS, default=MODELS)
    p.add_argument('--levels', nargs='+', choices=LEVELS, default=['all', 'extended', 'basic', 'disable'],
                   help='ONNX Runtime graph optimisation levels to time for MLLA-T (others use the first)')
    p.add_argument('--formulations', nargs='+', choices=['onnx', 'plain'], default=['onnx'],
                   help="MLLA graphs to time: 'onnx' (rearranged for ONNX Runtime, what export_onnx.py writes) "
                        "and/or 'plain' (the model's own code traced, timed as <model>:ort-plain-<level>); "
                        'the first one is used for the goals')
    p.add_argument('--no-bf16', action='store_true', help='skip the bf16 autocast measurement')
    p.add_argument('--bf16-size', type=size_arg, help='HxW for the bf16 measurement (default: the backbone size)')
    p.add_argument('--json', help='write all numbers to this JSON file')
    p.add_argument('--malloc', choices=['tuned', 'default'],
                   help="glibc malloc as the tools set it ('tuned', mlla_mm/utils/malloc.py) or left alone "
                        "('default'); the same for both runtimes (default: MLLA_MM_MALLOC, else tuned)")
    p.add_argument('--int8', action='store_true',
                   help='also time INT8 ONNX Runtime (static QDQ quantization, mlla_mm/deploy/quantize.py) of each '
                        'MLLA model, as <model>:int8-<level>; calibrated on --calib-dir or on random images '
                        '(the timing does not depend on the calibration values)')
    p.add_argument('--calib-dir', help='--int8: calibration images (default: 2 random images at the model size)')
    p.add_argument('--quick', action='store_true', help='small sizes, one repeat (for tests)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mlla_mm.deploy.benchmark import (cpu_description, goal_verdict, interleaved_times, median, paired_ratio,
                                          relative_difference, round_ratios, round_spread)
    from mlla_mm.deploy.onnx_export import export_bytes, make_session, require
    from mlla_mm.engine.launch import UsageError, check_output, one_line
    from mlla_mm.utils.io import AtomicWriteError, atomic_write
    args = parse_args(argv)
    try:
        check_output(args.json, '--json')  # before minutes of exporting and timing
        require('onnx', 'onnxruntime')
        if args.calib_dir:
            if not args.int8:
                raise UsageError('--calib-dir needs --int8')
            from mlla_mm.deploy.quantize import folder_images
            folder_images(args.calib_dir, 1)
    except UsageError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    import onnxruntime as ort
    from mlla_mm.utils.malloc import tune_cpu_malloc
    try:
        malloc = tune_cpu_malloc(None if args.malloc is None else args.malloc == 'tuned')
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.quick:
        args.backbone_size, args.seg_size, args.repeats = '64x96', '64x64', 1
    torch.set_num_threads(args.threads)
    bsize, ssize = parse_size(args.backbone_size), parse_size(args.seg_size)
    cpu = cpu_description()
    results: dict = dict(cpu=cpu, malloc=malloc, threads=args.threads, repeats=args.repeats, torch=torch.__version__,
                         onnxruntime=ort.__version__, date=time.strftime('%Y-%m-%d %H:%M:%S'),
                         backbone_size=args.backbone_size, seg_size=args.seg_size, models={}, goals={})
    print(f"# CPU: {cpu['model_name']} (bf16-related flags: {', '.join(cpu['bf16_flags']) or 'none'}); "
          f'{args.threads} threads; malloc {malloc}; torch {torch.__version__}, onnxruntime {ort.__version__}',
          flush=True)
    if not args.no_bf16 and 'mlla_t' in args.models:
        warning = bf16_warning(cpu)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    groups: Dict[Tuple[int, int], Dict[str, object]] = {}
    for name in args.models:
        size = ssize if name.startswith('upernet') else bsize
        try:
            target, shape, dynamic = build(name, size, args.quick)
        except ImportError as err:
            print(f'# skip {name}: {err}')
            continue
        t = time.perf_counter()
        data = export_bytes(target, shape, dynamic=dynamic, formulation=args.formulations[0])
        export_s = time.perf_counter() - t
        others = {}  # the other formulations of an MLLA model, timed at the first level
        if name != 'swin_t':
            for form in args.formulations[1:]:
                others[form] = export_bytes(target, shape, dynamic=dynamic, formulation=form)
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        levels = args.levels if name == 'mlla_t' else args.levels[:1]
        sessions = {}
        for level in levels:
            t = time.perf_counter()
            sessions[level] = make_session(data, threads=args.threads, level=level, spinning=False)
            results.setdefault('session_s', {})[f'{name}:{level}'] = time.perf_counter() - t
        for form, other in others.items():
            sessions[f'{form}-{levels[0]}'] = make_session(other, threads=args.threads, level=levels[0],
                                                          spinning=False)
        int8 = None
        if args.int8 and name != 'swin_t':
            int8 = int8_bytes(data, size, args.calib_dir)
            sessions[f'int8-{levels[0]}'] = make_session(int8, threads=args.threads, level=levels[0], spinning=False)
        with torch.no_grad():
            ref = target.model(x)
        got = sessions[levels[0]].run(None, {'img': x.numpy()})
        diff = relative_difference(got, ref)
        results['models'][name] = dict(size=f'{size[0]}x{size[1]}', export_s=export_s, dynamic=dynamic,
                                       onnx_mib=len(data) / 2**20, max_rel_diff=diff,
                                       formulation='plain' if name == 'swin_t' else args.formulations[0])
        if int8 is not None:
            idiff = relative_difference(sessions[f'int8-{levels[0]}'].run(None, {'img': x.numpy()}), ref)
            results['models'][name].update(int8_mib=len(int8) / 2**20, int8_max_rel_diff=idiff)
            print(f'# {name}: INT8 {len(int8) / 2**20:.0f} MiB, vs PyTorch fp32 max rel. diff {idiff:.1e}',
                  flush=True)
        for form in others:
            odiff = relative_difference(sessions[f'{form}-{levels[0]}'].run(None, {'img': x.numpy()}), ref)
            results['models'][name][f'max_rel_diff_{form}'] = odiff
            print(f'# {name}: formulation {form!r}: ONNX Runtime vs PyTorch max rel. diff {odiff:.1e}', flush=True)
        print(f'# {name}: exported in {export_s:.1f} s ({"dynamic" if dynamic else "static"} shape, '
              f'{len(data) / 2**20:.0f} MiB), ONNX Runtime vs PyTorch max rel. diff {diff:.1e}', flush=True)
        fns = groups.setdefault(size, {})
        model, xn = target.model, x.numpy()

        def run_torch(m=model, inp=x):
            with torch.no_grad():
                return m(inp)

        fns[f'{name}:torch'] = run_torch
        for level, sess in sessions.items():
            fns[f'{name}:ort-{level}'] = (lambda s=sess, inp=xn: s.run(None, {'img': inp}))

    times: Dict[str, List[float]] = {}
    for size, fns in groups.items():
        print(f'# timing {len(fns)} runs at {size[0]}x{size[1]}, {args.repeats} interleaved rounds', flush=True)
        group = interleaved_times(fns, args.repeats)
        times.update(group)
        for key, ts in group.items():  # printed at once: a long run that is stopped keeps its numbers
            print(f'#   {key}: median {median(ts):.3f} s, all {", ".join(f"{t:.3f}" for t in ts)}', flush=True)
    results['latency'] = {k: dict(median=median(v), min=min(v), max=max(v), n=len(v)) for k, v in times.items()}

    print(f"\nLatency (s), {args.threads} threads, fp32, batch 1, median of {args.repeats} interleaved rounds")
    print(f"{'run':<32}{'size':>10}{'median':>9}{'min':>9}{'vs torch':>10}")
    for key, row in results['latency'].items():
        name = key.split(':')[0]
        vs = paired_ratio(times, key, f'{name}:torch')
        row['over_torch'] = vs
        print(f"{key:<32}{results['models'][name]['size']:>10}{row['median']:9.3f}{row['min']:9.3f}{vs:10.3f}")

    goals = results['goals']
    best = args.levels[0]
    rounds = results.setdefault('round_ratios', {})
    if 'mlla_t:torch' in times:
        rounds['mlla_t_ort_over_torch'] = round_ratios(times, f'mlla_t:ort-{best}', 'mlla_t:torch')
        goals['mlla_t_ort_over_torch'] = paired_ratio(times, f'mlla_t:ort-{best}', 'mlla_t:torch')
    if 'mlla_t:torch' in times and 'swin_t:torch' in times:
        for runtime, suffix in (('torch', 'torch'), ('ort', f'ort-{best}')):
            rounds[f'mlla_over_swin_{runtime}'] = round_ratios(times, f'mlla_t:{suffix}', f'swin_t:{suffix}')
            goals[f'mlla_over_swin_{runtime}'] = paired_ratio(times, f'mlla_t:{suffix}', f'swin_t:{suffix}')
        # The second goal compares two ratios: per round, ONNX Runtime's MLLA/Swin over PyTorch's.
        rounds['mlla_over_swin_ort_over_torch'] = [
            a / b for a, b in zip(rounds['mlla_over_swin_ort'], rounds['mlla_over_swin_torch'])]
    if f'mlla_t:ort-int8-{best}' in times:
        rounds['mlla_t_int8_over_torch'] = round_ratios(times, f'mlla_t:ort-int8-{best}', 'mlla_t:torch')
        goals['mlla_t_int8_over_torch'] = paired_ratio(times, f'mlla_t:ort-int8-{best}', 'mlla_t:torch')
        goals['mlla_t_int8_over_ort_fp32'] = paired_ratio(times, f'mlla_t:ort-int8-{best}', f'mlla_t:ort-{best}')
    print(f'\nGoals (ONNX Runtime level {best!r}, ratios are medians of per-round ratios, {args.repeats} rounds):')
    if 'mlla_t_ort_over_torch' in goals:
        v = goals['mlla_t_ort_over_torch']
        print(f'  MLLA-T {args.backbone_size}: ONNX Runtime / PyTorch eager  {v:.3f}  (<= {GOAL_ORT_OVER_TORCH})  '
              f'{goal_verdict(rounds["mlla_t_ort_over_torch"], GOAL_ORT_OVER_TORCH)}')
    if 'mlla_t_int8_over_torch' in goals:
        v = goals['mlla_t_int8_over_torch']
        print(f'  MLLA-T {args.backbone_size}: INT8 ONNX Runtime / PyTorch eager fp32  {v:.3f}  '
              f'(<= {GOAL_INT8_OVER_TORCH})  {goal_verdict(rounds["mlla_t_int8_over_torch"], GOAL_INT8_OVER_TORCH)}')
        print(f'  MLLA-T {args.backbone_size}: INT8 / fp32 ONNX Runtime  {goals["mlla_t_int8_over_ort_fp32"]:.3f}')
    if 'mlla_over_swin_ort' in goals:
        a, b = goals['mlla_over_swin_ort'], goals['mlla_over_swin_torch']
        print(f'  MLLA-T / Swin-T: ONNX Runtime {a:.3f} vs PyTorch {b:.3f}  (ONNX <= PyTorch)  '
              f'{"PASS" if a <= b else "FAIL"} (ONNX / PyTorch per round: '
              f'{round_spread(rounds["mlla_over_swin_ort_over_torch"], 1.0)})')

    if not args.no_bf16 and 'mlla_t' in results['models']:
        from mlla_mm.deploy.onnx_export import build_target
        model = build_target('mlla_t', log=lambda m: None).model
        bf_size = parse_size(args.bf16_size) if args.bf16_size and not args.quick else bsize
        x = torch.randn(1, 3, *bf_size, generator=torch.Generator().manual_seed(0))

        def fp32(m=model, inp=x):
            with torch.no_grad():
                return m(inp)

        def bf16(m=model, inp=x):
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                return m(inp)

        bt = interleaved_times({'fp32': fp32, 'bf16': bf16}, args.repeats)
        diff = relative_difference([o.float().numpy() for o in bf16()], fp32())
        results['bf16'] = dict(size=f'{bf_size[0]}x{bf_size[1]}', fp32=median(bt['fp32']), bf16=median(bt['bf16']),
                               bf16_over_fp32=paired_ratio(bt, 'bf16', 'fp32'), max_rel_diff=diff,
                               native_bf16=cpu['native_bf16'])
        r = results['bf16']
        print(f"\nbf16 autocast, MLLA-T backbone {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
              f"bf16/fp32 {r['bf16_over_fp32']:.3f}; max rel. diff {diff:.1e}; native bf16 on this CPU: "
              f"{'yes' if cpu['native_bf16'] else 'no'}")

    if args.json:
        try:
            with atomic_write(args.json, 'w') as f:
                json.dump(results, f, indent=2)
        except AtomicWriteError as err:  # e.g. the disk filled up meanwhile; nothing half-written is left
            print(f'error: {one_line(err)}', file=sys.stderr)
            return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
