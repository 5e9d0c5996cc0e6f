#!/usr/bin/env python
"""Speed of MLLA against its peers, each pair timed in the same interleaved rounds: one tool, one subcommand a question.

    python tools/benchmark.py [all]     # what `make benchmark` runs: backbone, then train and detector
    python tools/benchmark.py backbone [--sizes 512x512 800x1280] [--models mlla_t swin_t r50] [--plot F]
    python tools/benchmark.py detector [--size 800x1333]
    python tools/benchmark.py train [--size 512]
    python tools/benchmark.py onnx [--models mlla_t swin_t upernet_mlla_t mask_rcnn_mlla_t] [--int8]
    python tools/benchmark.py bf16 [--size 800x1280]

Every subcommand takes ``--threads`` (default 2), ``--repeats`` (interleaved
rounds, default 5), ``--malloc tuned|default``, ``--json FILE`` and
``--quick`` (tiny sizes, one round unless ``--repeats`` says otherwise: for
tests). The first line names the CPU and its bf16 / VNNI / AMX instruction
sets (``mlla_mm.utils.cpu``). All timing goes through
``mlla_mm.utils.timing``: every function runs once to warm up, then each
round runs all of them once, in an order that reverses every round, so load
from elsewhere on the machine hits them alike; a ratio is the median over
rounds of the per-round ratio, printed with the range of the rounds. The
tool prints the measured ratios against the peers it ran (Swin-T, ResNet-50,
PyTorch eager fp32, ...), not verdicts: the project's figures per CPU are in
docs/benchmarks.md.

* ``backbone``: fp32, batch 1, ``torch.no_grad()``, backbones only, at each
  of ``--sizes``; a large fp32 matmul runs in the same rounds for FLOP/s.
  Table of median/min/max, MLLA-T over each peer per size, the slope of log
  latency against log pixels, and (unless ``--no-memory``) each model's peak
  memory of one more call and the peak memory of an MLLA-T forward +
  backward at ``--memory-size``, batch 2, with and without ``with_cp``.
  ``--models mlla_t_compile`` adds ``torch.compile`` of MLLA-T.
* ``detector``: one whole Mask R-CNN inference (mask pasting included),
  MLLA-T against Swin-T with equal head work (see
  :func:`detector_inference_times`), with each detector's parts.
* ``train``: one Mask R-CNN train iteration (2 images, forward, backward,
  AdamW step), MLLA-T against Swin-T (see :func:`train_iteration_times`).
* ``all`` (the default when no subcommand is given): ``backbone``, then
  ``train`` (``--train-size``, ``--no-train``) and ``detector``
  (``--detector-size``, ``--no-detector``), those two with
  ``--train-repeats`` rounds.
* ``onnx``: ONNX Runtime against PyTorch eager fp32 (MLLA-T and Swin-T
  backbones at ``--backbone-size``, an UperNet MLLA-T at ``--seg-size``, the
  whole Mask R-CNN MLLA-T at ``--detector-size``: image in, pasted masks
  out, see :class:`DetectorRuns` and :func:`equal_work_test_cfg`), exported
  with tools/export_onnx.py's code; ``--int8`` adds the INT8 (static QDQ)
  graph of each MLLA model.
* ``bf16``: bf16 autocast against fp32 on the CPU: MLLA-T inference, MLLA-T
  forward + backward, a Mask R-CNN training step (``CPUAutocastOptimWrapper``,
  what ``tools/train.py --amp`` uses).

Peak memory is the rise of the process's peak RSS over its RSS before the
call (``mlla_mm.utils.timing.peak_memory_mib``; Linux only, else missing).
glibc malloc is tuned as the other tools tune it (``--malloc default`` leaves
it alone; every model runs under the same setting).

Bad arguments (a size that is not ``HxW`` with positive integers, a count
below 1, a ``--json`` / ``--plot`` path that cannot be written) are one
``error:`` line on stderr and exit code 2, before anything is measured. The
JSON file and the plot are written whole or not at all.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mlla_mm.datasets.synthetic import random_detection_batch
from mlla_mm.utils.io import atomic_write
from mlla_mm.utils.timing import (header_line, interleaved_times, median, peak_memory_mib, ratio_text,
                                  relative_difference, round_ratios, summarize)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ('all', 'backbone', 'detector', 'train', 'onnx', 'bf16')
ALL_MODELS = ['mlla_t', 'mlla_s', 'mlla_b', 'swin_t', 'r50', 'mlla_t_ref']
OPTIONAL_MODELS = ['mlla_t_compile']  # torch.compile of MLLA-T (inductor); only when asked for
LABELS = dict(mlla_t='MLLA-T', mlla_s='MLLA-S', mlla_b='MLLA-B', swin_t='Swin-T', r50='ResNet-50',
              mlla_t_ref='MLLA-T reference', mlla_t_compile='MLLA-T compiled')


# --------------------------------------------------------------------------
# Backbones.
# --------------------------------------------------------------------------
def build_backbone(name: str, cache: Dict[str, torch.nn.Module]) -> torch.nn.Module:
    """An eval-mode backbone by name (``mlla_t_ref`` shares ``mlla_t``'s weights)."""
    from mlla_mm.models import MLLA
    if name in ('mlla_t', 'mlla_s', 'mlla_b'):
        return MLLA({'mlla_t': 'tiny', 'mlla_s': 'small', 'mlla_b': 'base'}[name]).eval()
    if name == 'mlla_t_ref':
        if REPO_ROOT not in sys.path:  # the reference implementation lives with the tests
            sys.path.insert(0, REPO_ROOT)
        from tests.test_models.mlla_reference import MLLAReference
        ref = MLLAReference('tiny').eval()
        if 'mlla_t' in cache:
            ref.load_state_dict(cache['mlla_t'].state_dict())
        return ref
    if name == 'mlla_t_compile':  # opt-in: compiles once per input size during the warm-up call
        model = MLLA('tiny').eval()
        if 'mlla_t' in cache:
            model.load_state_dict(cache['mlla_t'].state_dict())
        return torch.compile(model, dynamic=False)
    if name == 'swin_t':
        from mmdet.models.backbones import SwinTransformer
        return SwinTransformer(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                               mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                               drop_path_rate=0.2, patch_norm=True, out_indices=(0, 1, 2, 3),
                               with_cp=False, convert_weights=True)
    if name == 'r50':
        from mmdet.models.backbones import ResNet
        return ResNet(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                      norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch')
    raise ValueError(f'unknown model {name!r}; choose from {ALL_MODELS + OPTIONAL_MODELS}')


def matmul_fn(n: int = 2048) -> Tuple[Callable[[], object], float]:
    """A large fp32 matmul and its FLOP count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.mm(a, b)), 2. * n ** 3


# --------------------------------------------------------------------------
# Train iteration and with_cp memory.
# --------------------------------------------------------------------------
def detector_cfg(kind: str):
    """Mask R-CNN config with MLLA-T (the project's config) or Swin-T (mmdet's), no pretrained weights."""
    from mmengine.config import Config
    import mmdet
    swin_path = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'swin',
                             'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    if kind == 'mlla_t':
        path = os.path.join(REPO_ROOT, 'configs', 'detection', 'mask_rcnn_mlla_t.py')
        if os.path.isfile(path):
            cfg = Config.fromfile(path)
        else:  # mmdet's Swin-T config with the backbone swapped
            cfg = Config.fromfile(swin_path)
            cfg.model.backbone = dict(type='MLLA', arch='tiny', drop_path_rate=0.1)
            cfg.model.neck.in_channels = [64, 128, 256, 512]
    else:
        cfg = Config.fromfile(swin_path)
    cfg.model.backbone.init_cfg = None
    return cfg


def build_detector(kind: str):
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    import mlla_mm  # noqa: F401
    cfg = detector_cfg(kind)
    init_default_scope('mmdet')
    return MODELS.build(cfg.model)


#: Proposals and detections per image of the whole-detector runs under ``--quick`` (tests): less head work than
#: the configs' 1000 and 100.
QUICK_DETECTOR_WORK = dict(proposals=100, detections=20)


def detector_batch(size: Tuple[int, int]) -> dict:
    """One random uint8 ``HxW`` image (seed 0) with its metadata, as mmdet's ``test_step`` takes it."""
    from mmdet.structures import DetDataSample
    h, w = size
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.)))
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return dict(inputs=[image], data_samples=[sample])


def detector_pair(zeroed: Sequence[str]) -> Dict[str, torch.nn.Module]:
    """MLLA-T and Swin-T Mask R-CNNs that differ only in backbone and FPN lateral convolutions.

    Both get Swin-T's (random) FPN output convolutions, RPN and RoI heads,
    with the layers named in ``zeroed`` (attribute paths such as
    ``'rpn_head.rpn_cls'``) zeroed first.
    """
    models = {}
    for kind in ('mlla_t', 'swin_t'):
        torch.manual_seed(0)
        models[kind] = build_detector(kind)
    mlla, swin = models['mlla_t'], models['swin_t']
    with torch.no_grad():
        for path in zeroed:
            layer = swin.get_submodule(path)
            layer.weight.zero_()
            layer.bias.zero_()
    mlla.neck.fpn_convs.load_state_dict(swin.neck.fpn_convs.state_dict())
    mlla.rpn_head.load_state_dict(swin.rpn_head.state_dict())
    mlla.roi_head.load_state_dict(swin.roi_head.state_dict())
    return models


def train_iteration_times(size: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per Mask R-CNN train iteration for MLLA-T and Swin-T, interleaved.

    The cost of the RoI heads depends on the proposals (RoIAlign samples more
    points in larger boxes), and with random weights those follow the noise of
    each backbone. So both detectors get the same head weights, the RPN's
    output convolutions are zeroed (both propose the same boxes: the anchors),
    the random RoI sampling is seeded before every iteration, and AdamW runs
    with a learning rate of 0: the step is computed in full, but every repeat
    does the same work and the two detectors differ only in backbone and FPN
    lateral convolutions.
    """
    from mmengine.optim import OptimWrapper
    models = detector_pair(('rpn_head.rpn_cls', 'rpn_head.rpn_reg'))
    for model in models.values():
        model.train()

    def step(model, wrapper, data):
        torch.manual_seed(0)
        return model.train_step(data, wrapper)

    fns = {}
    for kind, model in models.items():
        wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0., weight_decay=0.05))
        fns[kind] = (lambda m=model, w=wrapper, d=random_detection_batch(size): step(m, w, d))
    return interleaved_times(fns, repeats, warmup=1)


def detector_inference_times(size: Tuple[int, int], repeats: int, proposals: int = 1000, detections: int = 100,
                              parts: Optional[Dict[str, Dict[str, float]]] = None) -> Dict[str, List[float]]:
    """Seconds per whole Mask R-CNN inference (one image) for MLLA-T and Swin-T, interleaved.

    Backbone, FPN, RPN, RoI box head and mask head, with the masks pasted at
    the image size (mmdet's ``predict`` with ``rescale=True``). So that both
    detectors do the same head work, they share the FPN output convolutions,
    RPN and RoI heads (Swin-T's random init), the RPN's and the box head's
    output layers are zeroed (every image gets the same proposals: anchors,
    and the same boxes: those proposals), and there is no suppression
    (``proposals`` per image go to the box head, ``detections`` masked ones
    come out). The MLLA-T side is our config (``configs/detection/
    mask_rcnn_mlla_t.py``), the Swin-T side mmdet's own. ``parts``, if given,
    receives each detector's median seconds per call of backbone, neck, RPN
    head and RoI head (their timed forward/predict; the rest is pre/post-processing).
    """
    models = detector_pair(('rpn_head.rpn_cls', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_cls',
                            'roi_head.bbox_head.fc_reg'))
    for model in models.values():
        model.eval()
        rpn, rcnn = model.rpn_head.test_cfg, model.roi_head.test_cfg
        rpn.nms_pre, rpn.max_per_img, rpn.nms.iou_threshold = proposals, proposals, 1.0
        rcnn.score_thr, rcnn.nms.iou_threshold, rcnn.max_per_img = 0.0, 1.0, detections
    batch = detector_batch(size)

    def infer(model):
        out = model.test_step(batch)[0].pred_instances
        if len(out) != detections:
            raise RuntimeError(f'expected {detections} detections, got {len(out)}: the equal-work setup broke')
        return out

    part_times: Dict[str, Dict[str, List[float]]] = {kind: {} for kind in models}

    def timed_method(method: Callable, record: List[float]) -> Callable:
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            record.append(time.perf_counter() - t0)
            return out
        return timed_call

    for kind, model in models.items():
        # The detector calls backbone/neck through forward(), the heads through predict().
        for name, method in (('backbone', 'forward'), ('neck', 'forward'), ('rpn_head', 'predict'),
                             ('roi_head', 'predict')):
            module = getattr(model, name)
            setattr(module, method, timed_method(getattr(module, method), part_times[kind].setdefault(name, [])))
    with torch.no_grad():
        times = interleaved_times({kind: (lambda m=model: infer(m)) for kind, model in models.items()}, repeats)
    if parts is not None:
        for kind, named in part_times.items():
            parts[kind] = {name: statistics.median(v[1:] or v) for name, v in named.items()}  # [0]: warm-up
    return times


def cp_memory(size: Tuple[int, int], batch: int = 2) -> Dict[str, Optional[float]]:
    """Peak memory (MiB) of an MLLA-T backbone forward+backward with and without ``with_cp``."""
    from mlla_mm.models import MLLA
    out = {}
    x = torch.randn(batch, 3, *size)
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = MLLA('tiny', with_cp=with_cp).train()

        def step(m=model):
            loss = sum(o.float().mean() for o in m(x))
            loss.backward()

        out['with_cp' if with_cp else 'no_cp'] = peak_memory_mib(step)
        del model
    return out


def slope(points: List[Tuple[float, float]]) -> float:
    """Least-squares slope of log(latency) against log(pixels)."""
    if len(points) < 2:
        return float('nan')
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float('nan')


def make_plot(results: dict, path: str) -> None:
    """A log-log plot of median latency against pixels per model, written whole or not at all."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in results['latency'].items():
        pts = sorted((r['pixels'], r['median']) for r in rows.values())
        if pts:
            ax.plot([p for p, _ in pts], [t for _, t in pts], marker='o',
                    label=f"{name} (slope {results['slopes'].get(name, float('nan')):.2f})")
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('input pixels (H x W)')
    ax.set_ylabel('latency, median (s)')
    ax.set_title(f"Backbone latency, {results['threads']} threads, fp32, batch 1")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path, 'wb') as f:
            fig.savefig(f, format='png', dpi=100)
    finally:
        plt.close(fig)


def write_json(path: str, results: dict) -> None:
    """Write ``results`` to ``path`` whole or not at all (a run stopped mid-write leaves the old file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, 'w') as f:
        json.dump(results, f, indent=2)


#: Work per pixel of each backbone relative to MLLA-T (published GMACs at 224x224; the reference code ~3x slower).
RELATIVE_COST = dict(mlla_t=1.0, mlla_s=2.0, mlla_b=3.9, swin_t=1.1, r50=1.0, mlla_t_ref=3.0, mlla_t_compile=1.0)


def estimate_seconds(args: argparse.Namespace, sizes: List[Tuple[int, int]], names: List[str],
                     seconds_per_pixel: float) -> float:
    """Rough length of this run from one MLLA-T call (``seconds_per_pixel``, measured here) and the work asked for.

    Backbone calls scale with pixels and :data:`RELATIVE_COST`; a Mask R-CNN inference counts as 3 backbone
    calls (255 of its GMACs vs 84 for the backbone at 800x1280), a train iteration (2 images, forward and
    backward) as 18, the with_cp memory check (batch 2, fwd + bwd, with and without) as 12, compiling as 60 s.
    """
    calls = args.repeats + 1 + (0 if args.no_memory else 1)  # rounds, warm-up, peak-memory call
    total = 0.0
    for h, w in sizes:
        for n in names:
            if n == 'mlla_t_ref' and h * w > args.ref_max_pixels:
                continue
            total += calls * RELATIVE_COST.get(n, 1.0) * h * w * seconds_per_pixel
            total += 60.0 if n == 'mlla_t_compile' else 0.0
    if args.do_train:
        total += 2 * (args.train_repeats + 1) * 18 * args.train_size ** 2 * seconds_per_pixel
    if args.do_detector:
        dh, dw = parse_size(args.detector_size)
        total += 2 * (args.train_repeats + 1) * 3 * dh * dw * seconds_per_pixel
    if args.do_backbone and not args.no_memory:
        mh, mw = parse_size(args.memory_size)
        total += 12 * mh * mw * seconds_per_pixel
    return total


def print_estimate(args: argparse.Namespace, sizes: List[Tuple[int, int]], models: Dict[str, torch.nn.Module]) -> None:
    """MLLA-T at 224x224 here, then the work asked for: how long this run will take."""
    from mlla_mm.models import MLLA
    probe_model = models.get('mlla_t') or MLLA('tiny').eval()
    with torch.no_grad():
        probe = torch.randn(1, 3, 224, 224)
        probe_model(probe)
        calls = []
        for _ in range(2):
            t0 = time.perf_counter()
            probe_model(probe)
            calls.append(time.perf_counter() - t0)
    minutes = estimate_seconds(args, sizes, list(models), min(calls) / (224 * 224)) / 60
    print(f'# estimated run time: about {max(1, round(minutes)) if minutes >= 1 else "<1"} min '
          f'(from MLLA-T at 224x224 on this machine now; --quick for a short check, fewer --sizes / --models '
          f'or one subcommand to do less)', flush=True)


# --------------------------------------------------------------------------
# backbone, detector, train, all.
# --------------------------------------------------------------------------
def ratio_line(label: str, ratios: Sequence[float], results: dict, key: str) -> None:
    """Print ``label`` with the median of per-round ``ratios`` and their range; keep both in ``results``."""
    results['ratios'][key] = statistics.median(ratios)
    results['round_ratios'][key] = list(ratios)
    print(f'  {label:<52} {ratio_text(ratios)}')


def run_backbones(args: argparse.Namespace, results: dict) -> None:
    """Latency (and peak memory) of each backbone at each size, in interleaved rounds with a matmul."""
    from mlla_mm.utils.flops import backbone_flops
    sizes = [parse_size(s) for s in args.sizes]
    models: Dict[str, torch.nn.Module] = {}
    for name in args.models:
        try:
            models[name] = build_backbone(name, models)
            models[name].eval()  # mmdet's backbones' train() returns None: do not chain it
        except ImportError as e:
            results['skipped'][name] = f'not available: {e}'
            print(f'# skip {name}: not available: {e}')
    print_estimate(args, sizes, models)
    results.update(latency={n: {} for n in models}, matmul={}, slopes={})
    mm, mm_flops = matmul_fn()
    per_size: Dict[str, Dict[str, List[float]]] = {}
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            fns = {n: (lambda m=m: m(x)) for n, m in models.items()
                   if not (n == 'mlla_t_ref' and h * w > args.ref_max_pixels)}
            fns['matmul'] = mm
            times = per_size[f'{h}x{w}'] = interleaved_times(fns, args.repeats)
            mm_times = times['matmul']
            results['matmul'][f'{h}x{w}'] = dict(summarize(mm_times), gflops_per_s=mm_flops / median(mm_times) / 1e9)
            for n, ts in times.items():
                if n == 'matmul':
                    continue
                row = dict(summarize(ts), pixels=h * w, height=h, width=w)
                row['images_per_s'] = 1. / row['median']
                row['mpix_per_s'] = h * w / row['median'] / 1e6
                row['peak_mib'] = None if args.no_memory else peak_memory_mib(fns[n])  # one more call, alone
                results['latency'][n][f'{h}x{w}'] = row
            print(f'# {h}x{w} done', flush=True)
            if args.json:  # partial results survive an interrupted long run
                write_json(args.json, results)
    lat = results['latency']
    for n, rows in lat.items():
        results['slopes'][n] = slope([(r['pixels'], r['median']) for r in rows.values()])

    print(f"\nBackbone latency (s), {args.threads} threads, fp32, batch 1, {args.repeats} interleaved rounds")
    print(f"{'model':<15}{'size':>11}{'median':>9}{'min':>9}{'max':>9}{'img/s':>8}{'MPix/s':>8}{'peak MiB':>10}")
    for n, rows in lat.items():
        for key, r in rows.items():
            peak = '-' if r['peak_mib'] is None else f"{r['peak_mib']:.0f}"
            print(f"{n:<15}{key:>11}{r['median']:9.3f}{r['min']:9.3f}{r['max']:9.3f}"
                  f"{r['images_per_s']:8.2f}{r['mpix_per_s']:8.2f}{peak:>10}")
    print('slopes of log latency vs log pixels: ' + ', '.join(f'{n} {s:.2f}' for n, s in results['slopes'].items()))

    print('\nRatios (median of per-round ratios, range of the rounds):')
    if 'mlla_t' in models:
        for key, times in per_size.items():
            for peer in times:
                if peer not in ('mlla_t', 'matmul') and 'mlla_t' in times:
                    ratio_line(f'MLLA-T / {LABELS.get(peer, peer)} latency at {key}',
                               round_ratios(times, 'mlla_t', peer), results, f'mlla_t_over_{peer}_{key}')
        if '1024x1024' in per_size and '2048x2048' in per_size:  # different rounds: a ratio of medians
            value = lat['mlla_t']['2048x2048']['median'] / lat['mlla_t']['1024x1024']['median']
            ratio_line(f'MLLA-T t(2048^2) / t(1024^2), malloc {results["malloc"]}', [value], results,
                       'mlla_t_2048_over_1024')
        key = '800x1280' if '800x1280' in lat['mlla_t'] else max(lat['mlla_t'],
                                                                 key=lambda k: lat['mlla_t'][k]['pixels'])
        h, w = lat['mlla_t'][key]['height'], lat['mlla_t'][key]['width']
        flops = backbone_flops(models['mlla_t'], h, w).flops
        times = per_size[key]
        # FLOP/s fraction per round: (flops / t_mlla) / (mm_flops / t_matmul).
        fractions = [flops / mm_flops / r for r in round_ratios(times, 'mlla_t', 'matmul')]
        ratio_line(f'MLLA-T FLOP/s / matmul FLOP/s at {key}', fractions, results, 'flops_fraction_of_matmul')
        results['ratios'].update(mlla_t_flops_size=key, mlla_t_gflops_per_s=flops / lat['mlla_t'][key]['median'] / 1e9,
                                 matmul_gflops_per_s=results['matmul'][key]['gflops_per_s'])
        print(f"  (MLLA-T {results['ratios']['mlla_t_gflops_per_s']:.1f} GFLOP/s, "
              f"matmul {results['ratios']['matmul_gflops_per_s']:.1f} GFLOP/s)")
    if not args.no_memory:
        mem = cp_memory(parse_size(args.memory_size))
        results['memory'] = dict(mem, size=args.memory_size, batch=2)
        if mem.get('no_cp') and mem.get('with_cp') is not None:
            ratio_line(f'MLLA-T fwd+bwd peak memory with_cp / without, {args.memory_size}',
                       [mem['with_cp'] / mem['no_cp']], results, 'with_cp_memory_ratio')
            print(f"  (peak MiB at {args.memory_size} batch 2: no_cp {mem['no_cp']:.0f}, "
                  f"with_cp {mem['with_cp']:.0f})")
    if args.plot:
        make_plot(results, args.plot)


def run_train(args: argparse.Namespace, results: dict) -> None:
    """One Mask R-CNN train iteration, MLLA-T against Swin-T, ``args.train_repeats`` rounds."""
    try:
        tr = train_iteration_times(args.train_size, args.train_repeats)
    except ImportError as e:
        print(f'# skip train: {e}')
        return
    results['train'] = dict({k: summarize(v) for k, v in tr.items()}, size=args.train_size)
    print(f"\nMask R-CNN train iteration, 2 images of {args.train_size}x{args.train_size} (s): "
          + ', '.join(f"{k} {median(v):.2f}" for k, v in tr.items()))
    ratio_line('Mask R-CNN train iteration MLLA-T / Swin-T', round_ratios(tr, 'mlla_t', 'swin_t'), results,
               'train_mlla_t_over_swin_t')


def run_detector(args: argparse.Namespace, results: dict) -> None:
    """One whole Mask R-CNN inference, MLLA-T against Swin-T, ``args.train_repeats`` rounds (``--quick``:
    :data:`QUICK_DETECTOR_WORK` proposals and detections per image instead of 1000 and 100)."""
    parts: Dict[str, Dict[str, float]] = {}
    work = dict(QUICK_DETECTOR_WORK) if args.quick else dict(proposals=1000, detections=100)
    try:
        dt = detector_inference_times(parse_size(args.detector_size), args.train_repeats, parts=parts, **work)
    except ImportError as e:
        print(f'# skip detector: {e}')
        return
    results['detector_inference'] = dict({k: summarize(v) for k, v in dt.items()}, size=args.detector_size,
                                         parts=parts, **work)
    print(f"\nMask R-CNN inference at {args.detector_size}, {work['proposals']} proposals and {work['detections']} "
          f"detections per image (s): " + ', '.join(f"{k} {median(v):.2f}" for k, v in dt.items()))
    for kind, named in parts.items():
        print(f'    {kind} parts (median s): ' + ', '.join(f'{n} {v:.2f}' for n, v in named.items()))
    ratio_line('Mask R-CNN inference MLLA-T / Swin-T', round_ratios(dt, 'mlla_t', 'swin_t'), results,
               'detector_inference_mlla_t_over_swin_t')


def run_backbone_family(args: argparse.Namespace, results: dict) -> None:
    """``all``, ``backbone``, ``detector``, ``train``: what ``args.do_*`` asks for."""
    results.update(ratios={}, round_ratios={}, skipped={})
    if args.do_backbone:
        run_backbones(args, results)
    elif args.do_train or args.do_detector:
        print_estimate(args, [], {})
    if args.do_train:
        run_train(args, results)
    if args.do_detector:
        run_detector(args, results)


# --------------------------------------------------------------------------
# bf16: autocast against fp32 on the CPU.
# --------------------------------------------------------------------------
def bf16_autocast():
    return torch.autocast('cpu', dtype=torch.bfloat16)


def measure_against_fp32(fns: Dict[str, Callable[[], object]], repeats: int) -> dict:
    """Interleaved times of ``fns`` (which include ``'fp32'``): each one's median and, for the others,
    the median per-round ratio to fp32 as ``<name>_over_fp32`` and the rounds as ``<name>_rounds``."""
    times = interleaved_times(fns, repeats)
    out = dict(rounds=repeats, **{name: median(t) for name, t in times.items()})
    for name in fns:
        if name != 'fp32':
            out[f'{name}_rounds'] = round_ratios(times, name, 'fp32')
            out[f'{name}_over_fp32'] = statistics.median(out[f'{name}_rounds'])
    return out


def bf16_inference(size: Tuple[int, int], repeats: int) -> dict:
    """MLLA-T backbone inference, fp32 against bf16 autocast (fast path, and the autograd code)."""
    from mlla_mm.models import MLLA
    torch.manual_seed(0)
    model = MLLA('tiny').eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))

    def fp32():
        with torch.no_grad():
            return model(x)

    def bf16():
        with torch.no_grad(), bf16_autocast():
            return model(x)

    plain = copy.deepcopy(model).set_fast_inference(False)  # the same weights, always the autograd code

    def bf16_autograd_code():  # the model's plain code under autocast: what bf16 ran before the fast path did
        with torch.no_grad(), bf16_autocast():
            return plain(x)

    out = measure_against_fp32(dict(fp32=fp32, bf16=bf16, bf16_autograd_code=bf16_autograd_code), repeats)
    out.update(size=f'{size[0]}x{size[1]}', max_rel_diff=relative_difference(bf16(), fp32()),
               max_rel_diff_autograd_code=relative_difference(bf16_autograd_code(), fp32()))
    return out


def bf16_forward_backward(size: int, batch: int, repeats: int) -> dict:
    """MLLA-T backbone forward + backward in train mode, fp32 against bf16 autocast."""
    from mlla_mm.models import MLLA
    torch.manual_seed(0)
    model = MLLA('tiny', drop_path_rate=0.).train()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def run(cast: bool):
        model.zero_grad(set_to_none=True)
        if cast:
            with bf16_autocast():
                outs = model(x)
        else:
            outs = model(x)
        sum(o.float().square().mean() for o in outs).backward()
        return [o.detach() for o in outs]

    out = measure_against_fp32(dict(fp32=lambda: run(False), bf16=lambda: run(True)), repeats)
    out.update(size=f'{batch}x{size}x{size}', max_rel_diff=relative_difference(run(True), run(False)))
    return out


def bf16_detector_step(size: int, repeats: int, images: int = 2) -> dict:
    """One Mask R-CNN MLLA-T training step of ``images`` images: fp32 ``OptimWrapper`` against
    ``CPUAutocastOptimWrapper``."""
    from mmengine.optim import OptimWrapper
    from mlla_mm.engine import CPUAutocastOptimWrapper
    torch.manual_seed(0)
    model = build_detector('mlla_t').train()
    data = random_detection_batch(size, n_images=images, seed=0)
    wrappers = dict(fp32=OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.)),
                    bf16=CPUAutocastOptimWrapper(optimizer=torch.optim.AdamW(model.parameters(), lr=0.)))
    losses: Dict[str, dict] = {}

    def step(kind: str):
        torch.manual_seed(0)  # the same RoI sampling in both
        losses[kind] = model.train_step(copy.copy(data), wrappers[kind])

    out = measure_against_fp32(dict(fp32=lambda: step('fp32'), bf16=lambda: step('bf16')), repeats)
    out.update(size=f'{images}x{size}x{size}', speedup=out['fp32'] / out['bf16'],
               loss_fp32=float(losses['fp32']['loss'].detach()), loss_bf16=float(losses['bf16']['loss'].detach()))
    return out


def run_bf16(args: argparse.Namespace, results: dict) -> None:
    """The three bf16 / fp32 pairs."""
    from mlla_mm.utils.cpu import cpu_description
    cpu = results['cpu'] = cpu_description()
    if not cpu['native_bf16']:
        print(f"warning: {cpu['bf16_note']}", file=sys.stderr, flush=True)
    r = results['inference'] = bf16_inference(args.size, args.repeats)
    print(f"MLLA-T inference {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
          f"max rel. diff {r['max_rel_diff']:.1e}; the autograd code under autocast {r['bf16_autograd_code']:.3f} s, "
          f"max rel. diff {r['max_rel_diff_autograd_code']:.1e}", flush=True)
    r = results['forward_backward'] = bf16_forward_backward(args.train_size, args.batch, args.repeats)
    print(f"MLLA-T forward + backward {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
          f"max rel. diff {r['max_rel_diff']:.1e}", flush=True)
    if not args.no_detector:
        r = results['detector_step'] = bf16_detector_step(args.train_size, args.repeats, 1 if args.quick else 2)
        print(f"Mask R-CNN MLLA-T training step {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s; "
              f"loss fp32 {r['loss_fp32']:.4f}, bf16 {r['loss_bf16']:.4f}", flush=True)
    print(f"\nRatios bf16 / fp32 (median of per-round ratios, range of the rounds; native bf16 on this CPU: "
          f"{'yes' if cpu['native_bf16'] else 'no'}):")
    r = results['inference']
    print(f"  {'MLLA-T inference':<52} {ratio_text(r['bf16_rounds'])}")
    print(f"  {'MLLA-T inference, the autograd code':<52} {ratio_text(r['bf16_autograd_code_rounds'])}")
    print(f"  {'MLLA-T forward + backward':<52} {ratio_text(results['forward_backward']['bf16_rounds'])}")
    if 'detector_step' in results:
        r = results['detector_step']
        print(f"  {'Mask R-CNN training step':<52} {ratio_text(r['bf16_rounds'])} ({r['speedup']:.2f}x faster)")


# --------------------------------------------------------------------------
# onnx: ONNX Runtime (fp32, INT8) against PyTorch eager fp32.
# --------------------------------------------------------------------------
ONNX_MODELS = ['mlla_t', 'swin_t', 'upernet_mlla_t', 'mask_rcnn_mlla_t']
ONNX_LABELS = dict(mlla_t='MLLA-T', swin_t='Swin-T', upernet_mlla_t='UperNet MLLA-T',
                   mask_rcnn_mlla_t='Mask R-CNN MLLA-T')
LEVELS = ['disable', 'basic', 'extended', 'all']
DETECTOR_CONFIG = os.path.join(REPO_ROOT, 'configs', 'detection', 'mask_rcnn_mlla_t.py')


def onnx_size(name: str, args: argparse.Namespace) -> Tuple[int, int]:
    """The image size ``name`` is timed at: ``--seg-size``, ``--detector-size`` or ``--backbone-size``."""
    if name.startswith('upernet'):
        return parse_size(args.seg_size)
    if name.startswith('mask_rcnn'):
        return parse_size(args.detector_size)
    return parse_size(args.backbone_size)


def onnx_target(name: str, size: Tuple[int, int], quick: bool = False):
    """(ExportTarget, export shape, dynamic) for a model name; dynamic ones are traced at another size.

    MLLA, UperNet and the whole Mask R-CNN (``configs/detection/mask_rcnn_mlla_t.py``, random weights) are
    exported with dynamic batch/height/width, as users get them; mmdet's Swin-T at the benchmark size, since
    its padding is not traced dynamically. ``size``: the image size timed (a detector's graph is traced at it
    padded as its data preprocessor pads it).
    """
    from mlla_mm.deploy.onnx_export import ExportTarget, build_target
    from mlla_mm.deploy.wrappers import BackboneForExport, output_names
    torch.manual_seed(0)
    if name == 'mlla_t':
        return build_target('mlla_t', log=lambda m: None), size if quick else (224, 224), True
    if name == 'swin_t':
        swin = build_backbone('swin_t', {})
        swin.eval()  # not chained: mmdet's SwinTransformer.train() returns None
        return ExportTarget(BackboneForExport(swin).eval(), 'backbone', output_names('backbone', 4), 'swin_t'), \
            size, False
    if name == 'upernet_mlla_t':
        cfg = os.path.join(REPO_ROOT, 'configs', 'segmentation', 'upernet_mlla_t.py')
        return build_target(cfg, log=lambda m: None), size if quick else (256, 256), True
    if name == 'mask_rcnn_mlla_t':
        target = build_target(DETECTOR_CONFIG, log=lambda m: None)
        div = int(getattr(target.model.detector.data_preprocessor, 'pad_size_divisor', 1) or 1)
        return target, tuple(-(-v // div) * div for v in size) if quick else (320, 320), True
    raise ValueError(name)


def int8_bytes(data: bytes, size: Tuple[int, int], calib_dir: Optional[str] = None, detector: bool = False) -> bytes:
    """The INT8 model of ``data`` (mlla_mm/deploy/quantize.py), calibrated on ``calib_dir`` or 2 random images
    of ``size``; a whole detector's feeds carry its ``img_shape`` too."""
    import numpy as np

    from mlla_mm.deploy.quantize import folder_calibration, quantize_int8
    if calib_dir:
        feeds = list(folder_calibration(calib_dir, 8, size))
    else:
        gen = np.random.default_rng(0)
        feeds = [{'img': gen.standard_normal((1, 3, *size), dtype=np.float32)} for _ in range(2)]
    if detector:
        feeds = [dict(f, img_shape=np.array([list(size)], np.int64)) for f in feeds]
    return quantize_int8(data, feeds, log=lambda msg: print(f'# {msg}', flush=True))


def check_onnx_args(args: argparse.Namespace) -> None:
    """ONNX Runtime is installed, ``--calib-dir`` goes with ``--int8`` and holds images (before any export)."""
    from mlla_mm.deploy.onnx_export import require
    from mlla_mm.cli import UsageError
    require('onnx', 'onnxruntime')
    if args.calib_dir:
        if not args.int8:
            raise UsageError('--calib-dir needs --int8')
        from mlla_mm.deploy.quantize import folder_images
        folder_images(args.calib_dir, 1)


def equal_work_test_cfg(detector: torch.nn.Module, quick: bool = False) -> dict:
    """Set the RoI head's score threshold to 0 and return the test settings both sides run with.

    With random weights every class scores about 1/81 (or at least nowhere near trained scores), so at the
    config's threshold (0.05) few or no boxes would reach NMS and the mask head; at 0 each image gets
    ``max_per_img`` detections, as a busy image does with trained weights. mmdet's ``predict`` and the
    exported graph read the same ``test_cfg`` objects (the export is traced after this), so PyTorch and
    ONNX Runtime run the same settings on the same weights. ``quick`` (tests): :data:`QUICK_DETECTOR_WORK`
    proposals and detections per image instead of the config's 1000 and 100.
    """
    rpn, rcnn = detector.rpn_head.test_cfg, detector.roi_head.test_cfg
    config_thr = float(rcnn.score_thr)
    rcnn.score_thr = 0.0
    if quick:
        rpn.max_per_img, rcnn.max_per_img = QUICK_DETECTOR_WORK['proposals'], QUICK_DETECTOR_WORK['detections']
    return dict(rpn_nms_pre=int(rpn.nms_pre), rpn_max_per_img=int(rpn.max_per_img),
                rpn_iou=float(rpn.nms.iou_threshold), score_thr=0.0, config_score_thr=config_thr,
                iou=float(rcnn.nms.iou_threshold), max_per_img=int(rcnn.max_per_img),
                mask_thr_binary=float(rcnn.mask_thr_binary))


class TensorRuns:
    """A backbone's or segmentor's PyTorch forward and its ONNX Runtime sessions on one random image."""

    def __init__(self, target, size: Tuple[int, int]) -> None:
        self.model = target.model
        self.input_size = size
        self.x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.ref = self.model(self.x)

    def torch_fn(self, key: str) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return self.model(self.x)
        return run

    def session_fn(self, sess, key: str) -> Tuple[Callable[[], object], Optional[float]]:
        """The session's run and its largest relative difference from PyTorch."""
        feed = {'img': self.x.numpy()}
        return (lambda: sess.run(None, feed)), relative_difference(sess.run(None, feed), self.ref)


class DetectorRuns:
    """A whole detector as a user runs it: image in; boxes, scores, labels and pasted masks out.

    PyTorch: mmdet's ``test_step`` in eval mode under ``torch.no_grad()`` (what tools/test.py's runner does:
    data preprocessor, the model as the config builds it, with its fast inference path, rescaling and mask
    pasting). ONNX Runtime: the same data preprocessor and post-processing around each session
    (:class:`mlla_mm.deploy.ort_model.OnnxRuntimeModel`, what ``tools/test.py CONFIG F.onnx`` runs). Every
    call's number of detections goes into ``row['detections']`` under the run's key.
    """

    def __init__(self, target, size: Tuple[int, int], row: dict) -> None:
        self.target, self.size = target, size
        self.detector = target.model.detector
        self.detections: Dict[str, List[int]] = row.setdefault('detections', {})
        switches = [m.fast_inference for m in self.detector.backbone.modules()
                    if isinstance(getattr(m, 'fast_inference', None), bool)]  # MLLA's layers, as they were built
        row['fast_inference'] = bool(switches) and all(switches)
        with torch.no_grad():
            self.img = self.detector.data_preprocessor(detector_batch(size), False)['inputs'].float()
        self.input_size = tuple(self.img.shape[2:])  # padded by the data preprocessor

    def counted(self, key: str, step: Callable[[dict], list]) -> Callable[[], list]:
        batch = detector_batch(self.size)  # one per run: each call writes its predictions into the samples

        def run():
            with torch.no_grad():
                out = step(batch)
            self.detections.setdefault(key, []).append(len(out[0].pred_instances))
            return out
        return run

    def torch_fn(self, key: str) -> Callable[[], object]:
        return self.counted(key, self.detector.test_step)

    def session_fn(self, sess, key: str) -> Tuple[Callable[[], object], Optional[float]]:
        """The session's run (pre- and post-processing included) and, when it finds the same labels in the
        same order as PyTorch, its largest relative difference in boxes, scores and 28x28 masks (else None)."""
        from mlla_mm.deploy.onnx_export import check_detector_onnx
        from mlla_mm.deploy.ort_model import OnnxRuntimeModel
        model = OnnxRuntimeModel(key, 'detector', data_preprocessor=self.detector.data_preprocessor,
                                 mask_thr_binary=float(self.detector.roi_head.test_cfg.mask_thr_binary), session=sess)
        rows = check_detector_onnx(None, self.target, [], session=sess, images=[self.img])
        diff = None if not all(math.isfinite(r.max_abs_diff) for r in rows) else \
            max((r.max_abs_diff / r.scale if r.scale > 0 else 0.) for r in rows)
        return self.counted(key, model.test_step), diff


def export_sessions(name: str, args: argparse.Namespace, results: dict):
    """Export ``name``, check ONNX Runtime against PyTorch; return (size, {run key: function}) to time together."""
    from mlla_mm.deploy.onnx_export import export_bytes, make_session
    size = onnx_size(name, args)
    target, shape, dynamic = onnx_target(name, size, args.quick)
    row = results['models'][name] = dict(size=f'{size[0]}x{size[1]}', dynamic=dynamic,
                                         formulation='plain' if name == 'swin_t' else args.formulations[0])
    if target.kind == 'detector':
        row['test_cfg'] = equal_work_test_cfg(target.model.detector, args.quick)  # before the export: traced with them
        runner = DetectorRuns(target, size, row)
        row['input_size'] = '{}x{}'.format(*runner.input_size)
    else:
        runner = TensorRuns(target, size)
    t = time.perf_counter()
    data = export_bytes(target, shape, dynamic=dynamic, formulation=args.formulations[0])
    row.update(export_s=time.perf_counter() - t, onnx_mib=len(data) / 2**20)
    graphs = {level: data for level in (args.levels if name == 'mlla_t' else args.levels[:1])}
    if name != 'swin_t':  # the other formulations of an MLLA model and its INT8 graph, at the first level
        for form in args.formulations[1:]:
            graphs[f'{form}-{args.levels[0]}'] = export_bytes(target, shape, dynamic=dynamic, formulation=form)
        if args.int8:
            graphs[f'int8-{args.levels[0]}'] = int8_bytes(data, runner.input_size, args.calib_dir,
                                                          detector=target.kind == 'detector')
    runs = {}
    for key, graph in graphs.items():
        level = key.rsplit('-', 1)[-1]
        sess = make_session(graph, threads=args.threads, level=level, spinning=False)
        runs[f'{name}:ort-{key}'], diff = runner.session_fn(sess, f'{name}:ort-{key}')
        if key == args.levels[0]:
            row['max_rel_diff'] = diff
        elif key.startswith('int8-'):
            row.update(int8_mib=len(graph) / 2**20, int8_max_rel_diff=diff)
        elif key not in LEVELS:
            row[f'max_rel_diff_{key.rsplit("-", 1)[0]}'] = diff
    diffs = ', '.join(f'{k}: ' + ('labels differ' if v is None else f'{v:.1e}') for k, v in row.items()
                      if k.endswith('max_rel_diff') or k.startswith('max_rel_diff'))
    print(f'# {name}: exported in {row["export_s"]:.1f} s ({"dynamic" if dynamic else "static"} shape, '
          f'{row["onnx_mib"]:.0f} MiB); ONNX Runtime vs PyTorch max rel. diff {diffs}', flush=True)
    return size, {f'{name}:torch': runner.torch_fn(f'{name}:torch'), **runs}


def print_detections(results: dict) -> None:
    """Each whole detector's detections per image in every call of every run, and the test settings they used."""
    for name, row in results['models'].items():
        if 'detections' not in row:
            continue
        cfg = row['test_cfg']
        counts = ', '.join(f'{key.split(":", 1)[1]} {"/".join(str(n) for n in sorted(set(v)))}'
                           for key, v in row['detections'].items())
        print(f"# {name}: detections per image, every call: {counts} (score_thr {cfg['score_thr']:g} instead of "
              f"the config's {cfg['config_score_thr']:g}, NMS IoU {cfg['iou']:g}, max_per_img {cfg['max_per_img']}; "
              f"RPN nms_pre {cfg['rpn_nms_pre']}, IoU {cfg['rpn_iou']:g}, max_per_img {cfg['rpn_max_per_img']}); "
              f"PyTorch: mmdet's test_step, MLLA's fast inference path {'on' if row['fast_inference'] else 'off'}",
              flush=True)


def run_onnx(args: argparse.Namespace, results: dict) -> None:
    """Every model's ONNX Runtime sessions and its PyTorch eager fp32 run, timed in the same rounds."""
    import onnxruntime as ort
    results.update(onnxruntime=ort.__version__, backbone_size=args.backbone_size, seg_size=args.seg_size,
                   detector_size=args.detector_size, models={}, ratios={}, round_ratios={})
    groups: Dict[Tuple[str, Tuple[int, int]], Dict[str, Callable[[], object]]] = {}
    for name in args.models:
        try:
            size, fns = export_sessions(name, args, results)
        except ImportError as err:
            print(f'# skip {name}: {err}')
            continue
        # a whole detector in rounds of its own: its runs are seconds, a backbone's at the same size less
        groups.setdefault(('detector' if name.startswith('mask_rcnn') else 'tensor', size), {}).update(fns)
    times: Dict[str, List[float]] = {}
    for (_, size), fns in groups.items():
        print(f'# timing {len(fns)} runs at {size[0]}x{size[1]}, {args.repeats} interleaved rounds', flush=True)
        group = interleaved_times(fns, args.repeats)
        times.update(group)
        for key, ts in group.items():  # printed at once: a long run that is stopped keeps its numbers
            print(f'#   {key}: median {median(ts):.3f} s, all {", ".join(f"{t:.3f}" for t in ts)}', flush=True)
    print_detections(results)
    results['latency'] = {k: summarize(v) for k, v in times.items()}

    print(f"\nLatency (s), {args.threads} threads, batch 1, {args.repeats} interleaved rounds; vs PyTorch eager fp32 "
          f"(median of per-round ratios, range of the rounds)")
    print(f"{'run':<32}{'size':>10}{'median':>9}{'min':>9}  vs torch")
    for key, row in results['latency'].items():
        name = key.split(':')[0]
        rounds = round_ratios(times, key, f'{name}:torch')
        row['over_torch'] = statistics.median(rounds)
        print(f"{key:<32}{results['models'][name]['size']:>10}{row['median']:9.3f}{row['min']:9.3f}  "
              f"{ratio_text(rounds)}")
        if key != f'{name}:torch':
            results['ratios'][f'{key}_over_torch'] = row['over_torch']
            results['round_ratios'][f'{key}_over_torch'] = rounds
    best = args.levels[0]
    lines = [(f'{ONNX_LABELS[name]} INT8 / fp32, both ONNX Runtime', f'{name}:ort-int8-{best}', f'{name}:ort-{best}',
              f'{name}_int8_over_ort_fp32') for name in results['models'] if f'{name}:ort-int8-{best}' in times]
    if 'mlla_t:torch' in times and 'swin_t:torch' in times:
        lines += [('MLLA-T / Swin-T, PyTorch eager', 'mlla_t:torch', 'swin_t:torch', 'mlla_over_swin_torch'),
                  ('MLLA-T / Swin-T, ONNX Runtime', f'mlla_t:ort-{best}', f'swin_t:ort-{best}', 'mlla_over_swin_ort')]
    if lines:
        print(f'\nRatios (ONNX Runtime level {best!r}):')
    for label, num, den, key in lines:
        rounds = round_ratios(times, num, den)
        results['ratios'][key], results['round_ratios'][key] = statistics.median(rounds), rounds
        print(f'  {label:<52} {ratio_text(rounds)}')


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------
def parse_size(text: str) -> Tuple[int, int]:
    """``'800x1280'`` -> ``(800, 1280)``; raises ``argparse.ArgumentTypeError`` unless HxW with positive integers."""
    from mlla_mm.cli import image_size
    return image_size(text)


def size_arg(text: str) -> str:
    """argparse type: ``HxW`` with positive integers, kept as the text ``'HxW'`` (the key in the results)."""
    h, w = parse_size(text)
    return f'{h}x{w}'


def build_parser() -> argparse.ArgumentParser:
    """The parser: shared options on every subcommand, then each subcommand's own."""
    from mlla_mm.cli import ToolArgumentParser, image_size, non_negative_int, positive_int
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument('--threads', type=positive_int, default=2, help='torch (and ONNX Runtime) threads (default 2)')
    shared.add_argument('--repeats', type=positive_int, help='interleaved rounds (default 5; 1 with --quick)')
    shared.add_argument('--json', help='write all numbers to this JSON file')
    shared.add_argument('--malloc', choices=['tuned', 'default'],
                        help="glibc malloc as the tools set it ('tuned', see mlla_mm/utils/malloc.py) or left alone "
                             "('default'); applies to every run alike (default: MLLA_MM_MALLOC, else tuned)")
    shared.add_argument('--quick', action='store_true', help='tiny sizes, one round (for tests)')
    p = ToolArgumentParser(description=__doc__.split('\n')[0],
                           epilog='Without a subcommand: all (what make benchmark runs).')
    sub = p.add_subparsers(dest='command', metavar='{' + ','.join(SUBCOMMANDS) + '}')

    def backbone_options(q: argparse.ArgumentParser) -> None:
        q.add_argument('--sizes', nargs='+', type=size_arg,
                       help='HxW sizes (default 512x512 800x1280 1024x1024 2048x2048)')
        q.add_argument('--models', nargs='+', choices=ALL_MODELS + OPTIONAL_MODELS, metavar='MODEL',
                       help=f'models among {ALL_MODELS} (default all) and {OPTIONAL_MODELS}')
        q.add_argument('--ref-max-pixels', type=non_negative_int, default=1024 * 1024,
                       help='skip mlla_t_ref above this many pixels (it is slow)')
        q.add_argument('--plot', help='write a log-log latency plot (PNG) here')
        q.add_argument('--no-memory', action='store_true',
                       help='skip the with_cp memory check and the per-size inference peak memory')
        q.add_argument('--memory-size', type=size_arg, default='800x1280', help='HxW of the with_cp memory check')

    q = sub.add_parser('all', parents=[shared], help='backbone, then train and detector (the default)')
    backbone_options(q)
    q.add_argument('--no-train', action='store_true', help='skip the Mask R-CNN train iteration')
    q.add_argument('--train-size', type=positive_int, default=512, help='square image size of the train iteration')
    q.add_argument('--train-repeats', type=int, help='rounds of the train and detector runs (default --repeats)')
    q.add_argument('--detector', action=argparse.BooleanOptionalAction, default=True,
                   help='whole Mask R-CNN inference, MLLA-T vs Swin-T with equal head work')
    q.add_argument('--detector-size', type=size_arg, default='800x1333', help='HxW of the whole-detector inference')
    q = sub.add_parser('backbone', parents=[shared], help='backbone latency and memory against Swin-T and ResNet-50')
    backbone_options(q)
    q = sub.add_parser('detector', parents=[shared], help='whole Mask R-CNN inference, MLLA-T against Swin-T')
    q.add_argument('--size', type=size_arg, default='800x1333', help='HxW of the image (default 800x1333)')
    q = sub.add_parser('train', parents=[shared], help='one Mask R-CNN train iteration, MLLA-T against Swin-T')
    q.add_argument('--size', type=positive_int, default=512, help='square image size (default 512)')
    q = sub.add_parser('onnx', parents=[shared], help='ONNX Runtime (fp32, --int8) against PyTorch eager fp32')
    q.add_argument('--backbone-size', type=size_arg, default='800x1280',
                   help='HxW for the backbones (default 800x1280)')
    q.add_argument('--seg-size', type=size_arg, default='512x512', help='HxW for UperNet (default 512x512)')
    q.add_argument('--detector-size', type=size_arg, default='800x1333',
                   help='HxW of the image for the whole Mask R-CNN (default 800x1333; its data preprocessor pads it '
                        'to a multiple of 32)')
    q.add_argument('--models', nargs='+', choices=ONNX_MODELS, default=ONNX_MODELS)
    q.add_argument('--levels', nargs='+', choices=LEVELS, default=['all', 'extended', 'basic', 'disable'],
                   help='ONNX Runtime graph optimisation levels to time for MLLA-T (others use the first)')
    q.add_argument('--formulations', nargs='+', choices=['onnx', 'plain'], default=['onnx'],
                   help="MLLA graphs to time: 'onnx' (rearranged for ONNX Runtime, what export_onnx.py writes) "
                        "and/or 'plain' (the model's own code traced, timed as <model>:ort-plain-<level>)")
    q.add_argument('--int8', action='store_true',
                   help='also time INT8 ONNX Runtime (static QDQ quantization, mlla_mm/deploy/quantize.py) of each '
                        'MLLA model, as <model>:ort-int8-<level>; calibrated on --calib-dir or on random images '
                        '(the timing does not depend on the calibration values)')
    q.add_argument('--calib-dir', help='--int8: calibration images (default: 2 random images at the model size)')
    q.add_argument('--no-bf16', action='store_true', help=argparse.SUPPRESS)  # bf16 is its own subcommand now
    q = sub.add_parser('bf16', parents=[shared], help='bf16 autocast against fp32 on the CPU')
    q.add_argument('--size', type=image_size, default='800x1280', help='HxW of the inference (default 800x1280)')
    q.add_argument('--train-size', type=positive_int, default=512, help='square image size of the training runs')
    q.add_argument('--batch', type=positive_int, default=2, help='images per backbone forward + backward')
    q.add_argument('--no-detector', action='store_true', help='skip the Mask R-CNN training step')
    top_help = p.format_help
    # --help shows every subcommand's options too: one page for the one tool.
    p.format_help = lambda: top_help() + ''.join(f'\n{"-" * 20} {name} {"-" * 20}\n{q.format_help()}'
                                                 for name, q in sub.choices.items())
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv``; without a subcommand, ``all``. Fills in what ``--quick`` and the defaults imply."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ('-h', '--help')):
        argv = ['all'] + argv
    args = build_parser().parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    cmd = args.command
    args.do_backbone, args.do_train, args.do_detector = cmd in ('all', 'backbone'), cmd == 'train', cmd == 'detector'
    if cmd == 'all':
        args.do_train, args.do_detector = not args.no_train, args.detector
        if args.train_repeats is None:
            args.train_repeats = args.repeats
    elif cmd in ('detector', 'train'):
        args.train_repeats, args.no_memory, args.plot = args.repeats, True, None
        args.memory_size, args.ref_max_pixels = '1x1', 0
        if cmd == 'detector':
            args.detector_size = '96x128' if args.quick else args.size
        else:
            args.train_size = 128 if args.quick else args.size
    if cmd in ('all', 'backbone'):
        if args.quick:
            args.sizes = args.sizes or ['64x64', '96x128']
            args.models = args.models or ['mlla_t', 'mlla_t_ref']
            args.memory_size = '64x96'
            if cmd == 'all':
                args.train_size, args.detector_size = 128, '96x128'
        args.sizes = args.sizes or ['512x512', '800x1280', '1024x1024', '2048x2048']
        args.models = args.models or list(ALL_MODELS)
    if cmd == 'bf16' and args.quick:
        args.size, args.train_size, args.batch = (64, 96), 64, 1
    if cmd == 'onnx' and args.quick:
        args.backbone_size, args.seg_size, args.detector_size = '64x96', '64x64', '64x96'
    return args


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check, before minutes of measuring: counts, outputs that cannot be written, ONNX input."""
    from mlla_mm.cli import UsageError, check_output
    if getattr(args, 'train_repeats', None) is not None and args.train_repeats < 1:
        raise UsageError(f'--train-repeats must be at least 1, got {args.train_repeats}')
    check_output(args.json, '--json')
    check_output(getattr(args, 'plot', None), '--plot')
    if args.command == 'onnx':
        check_onnx_args(args)


def run(args: argparse.Namespace) -> int:
    """Measure what ``args.command`` asks for, print it, write ``--json``."""
    from mlla_mm.cli import UsageError
    from mlla_mm.utils.malloc import tune_cpu_malloc
    check_args(args)
    try:
        malloc = tune_cpu_malloc(None if args.malloc is None else args.malloc == 'tuned')
    except ValueError as err:  # a bad MLLA_MM_MALLOC
        raise UsageError(str(err)) from None
    torch.set_num_threads(args.threads)
    versions = {}
    if args.command == 'onnx':
        import onnxruntime
        versions['onnxruntime'] = onnxruntime.__version__
    print(header_line(args.threads, malloc, **versions), flush=True)
    results: dict = dict(command=args.command, threads=args.threads, repeats=args.repeats, malloc=malloc,
                         torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M:%S'))
    if args.command == 'onnx':
        run_onnx(args, results)
    elif args.command == 'bf16':
        run_bf16(args, results)
    else:
        run_backbone_family(args, results)
    if args.json:
        write_json(args.json, results)
    return 0


def main(argv=None) -> int:
    from mlla_mm.cli import UsageError, one_line
    from mlla_mm.utils.io import AtomicWriteError
    args = parse_args(argv)
    try:
        return run(args)  # not run_main: it would tune malloc before --malloc applies
    except (UsageError, AtomicWriteError) as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
