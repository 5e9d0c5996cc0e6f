#!/usr/bin/env python
"""bf16 against fp32 on the CPU, in the same run: MLLA-T inference, MLLA-T forward + backward, a Mask R-CNN step.

    python tools/benchmark_bf16.py [--threads 2] [--repeats 5] [--size 800x1280] \\
        [--train-size 512] [--batch 2] [--no-detector] [--json FILE] [--quick]

Three measurements, each fp32 and bf16 interleaved (every round runs both,
alternating which goes first; the ratio is the median of the per-round
ratios, bf16 time over fp32 time):

* inference: the MLLA-T backbone, batch 1 at ``--size``, under
  ``torch.no_grad()`` and ``torch.autocast('cpu', dtype=torch.bfloat16)``
  (the fast inference path in bf16), with the largest difference of the four
  maps, ``max |bf16 - fp32| / max |fp32|``; also the model's autograd code
  under autocast (the fast path switched off), what bf16 inference ran
  before the fast path learnt autocast;
* forward + backward: the MLLA-T backbone in train mode, ``--batch`` images
  of ``--train-size`` squared, loss = mean of the squared maps, under
  autocast (the autograd code in bf16);
* detector step: one Mask R-CNN MLLA-T training step
  (``configs/detection/mask_rcnn_mlla_t.py``, 2 random images of
  ``--train-size`` squared with 3 boxes and masks each), fp32 ``OptimWrapper``
  against ``CPUAutocastOptimWrapper`` (what ``tools/train.py --amp`` uses on
  the CPU): the same model, data and seed, AdamW with learning rate 0.

The CPU's bf16 instruction sets are printed first: on CPUs without AMX or
AVX512-BF16 bf16 is emulated and slower (a warning says so), and the goals
(inference <= 0.5x fp32, detector step >= 1.5x faster) are for CPUs with them.

Bad arguments (a size that is not ``HxW`` with positive integers, a count
below 1, a ``--json`` path that cannot be written) are one ``error:`` line on
stderr and exit code 2, before anything is measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Callable, Dict, Optional

import torch

GOAL_INFERENCE = 0.5  # bf16 / fp32 time, MLLA-T inference (AMX)
GOAL_STEP_SPEEDUP = 1.5  # fp32 / bf16 time, Mask R-CNN training step (AMX)


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.engine.launch import ToolArgumentParser, image_size, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    p.add_argument('--repeats', type=positive_int, default=5, help='interleaved rounds per measurement')
    p.add_argument('--size', type=image_size, default='800x1280', help='HxW of the inference measurement')
    p.add_argument('--train-size', type=positive_int, default=512,
                   help='square image size of the training measurements')
    p.add_argument('--batch', type=positive_int, default=2, help='images per backbone forward + backward')
    p.add_argument('--no-detector', action='store_true', help='skip the Mask R-CNN training step')
    p.add_argument('--json', help='write the numbers to this JSON file')
    p.add_argument('--quick', action='store_true', help='tiny sizes, one round (for tests)')
    args = p.parse_args(argv)
    args.hw = args.size
    return args


def bf16_autocast():
    return torch.autocast('cpu', dtype=torch.bfloat16)


def max_relative_difference(got, ref) -> float:
    """Largest ``max |got - ref| / max |ref|`` over the output maps."""
    from mlla_mm.deploy.benchmark import relative_difference
    return relative_difference([g.float().numpy() for g in got], ref)


def measure(fns: Dict[str, Callable[[], object]], repeats: int) -> dict:
    """Interleaved times of ``fns`` (which include ``'fp32'``): each one's median and, for the others,
    the median per-round ratio to fp32 as ``<name>_over_fp32``."""
    from mlla_mm.deploy.benchmark import interleaved_times, median, paired_ratio
    times = interleaved_times(fns, repeats)
    out = dict(rounds=repeats, **{name: median(t) for name, t in times.items()})
    out.update({f'{name}_over_fp32': paired_ratio(times, name, 'fp32') for name in fns if name != 'fp32'})
    return out


def inference(size, repeats: int) -> dict:
    """MLLA-T backbone inference, fp32 against bf16 autocast."""
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

    out = measure(dict(fp32=fp32, bf16=bf16, bf16_autograd_code=bf16_autograd_code), repeats)
    out.update(size=f'{size[0]}x{size[1]}', max_rel_diff=max_relative_difference(bf16(), fp32()),
               max_rel_diff_autograd_code=max_relative_difference(bf16_autograd_code(), fp32()))
    return out


def forward_backward(size: int, batch: int, repeats: int) -> dict:
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

    out = measure(dict(fp32=lambda: run(False), bf16=lambda: run(True)), repeats)
    out.update(size=f'{batch}x{size}x{size}', max_rel_diff=max_relative_difference(run(True), run(False)))
    return out


def detector_step(size: int, repeats: int) -> dict:
    """One Mask R-CNN MLLA-T training step: fp32 ``OptimWrapper`` against ``CPUAutocastOptimWrapper``."""
    from pathlib import Path

    from mmengine.config import Config
    from mmengine.optim import OptimWrapper
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    import mlla_mm  # noqa: F401
    from mlla_mm.engine import CPUAutocastOptimWrapper
    from mlla_mm.datasets.synthetic import random_detection_batch
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / 'configs/detection/mask_rcnn_mlla_t.py'))
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).train()
    data = random_detection_batch(size, n_images=2, seed=0)
    wrappers = dict(fp32=OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.)),
                    bf16=CPUAutocastOptimWrapper(optimizer=torch.optim.AdamW(model.parameters(), lr=0.)))
    losses: Dict[str, dict] = {}

    def step(kind: str):
        torch.manual_seed(0)  # the same RoI sampling in both
        losses[kind] = model.train_step(copy.copy(data), wrappers[kind])

    out = measure(dict(fp32=lambda: step('fp32'), bf16=lambda: step('bf16')), repeats)
    out.update(size=f'2x{size}x{size}', speedup=out['fp32'] / out['bf16'],
               loss_fp32=float(losses['fp32']['loss'].detach()), loss_bf16=float(losses['bf16']['loss'].detach()))
    return out


def verdict(ok: Optional[bool]) -> str:
    return 'PASS' if ok else 'FAIL'


def main(argv=None) -> int:
    from mlla_mm.engine.launch import run_main
    args = parse_args(argv)
    return run_main(lambda: run(args))  # tunes malloc (MLLA_MM_MALLOC) first; UsageError etc.: one line, exit 2


def run(args: argparse.Namespace) -> int:
    from mlla_mm.deploy.benchmark import cpu_description
    from mlla_mm.engine.launch import check_output
    from mlla_mm.utils.io import atomic_write
    from mlla_mm.utils.malloc import malloc_state
    check_output(args.json, '--json')  # before minutes of measuring
    malloc = malloc_state()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hw, args.train_size, args.batch, args.repeats = (64, 96), 64, 1, 1
    cpu = cpu_description()
    print(f"# CPU: {cpu['model_name']} (bf16-related flags: {', '.join(cpu['bf16_flags']) or 'none'}); "
          f"threads {args.threads}, malloc {malloc}, torch {torch.__version__}", flush=True)
    if not cpu['native_bf16']:
        print(f"warning: {cpu['bf16_note']}", flush=True)
    results = dict(cpu=cpu, threads=args.threads, torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M:%S'))

    r = results['inference'] = inference(args.hw, args.repeats)
    print(f"MLLA-T inference {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
          f"bf16/fp32 {r['bf16_over_fp32']:.3f}, max rel. diff {r['max_rel_diff']:.1e}; the autograd code "
          f"under autocast {r['bf16_autograd_code']:.3f} s, {r['bf16_autograd_code_over_fp32']:.3f}, "
          f"{r['max_rel_diff_autograd_code']:.1e}", flush=True)
    r = results['forward_backward'] = forward_backward(args.train_size, args.batch, args.repeats)
    print(f"MLLA-T forward + backward {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
          f"bf16/fp32 {r['bf16_over_fp32']:.3f}, max rel. diff {r['max_rel_diff']:.1e}", flush=True)
    if not args.no_detector:
        r = results['detector_step'] = detector_step(args.train_size, args.repeats)
        print(f"Mask R-CNN MLLA-T training step {r['size']}: fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
              f"bf16/fp32 {r['bf16_over_fp32']:.3f} ({r['speedup']:.2f}x faster); "
              f"loss fp32 {r['loss_fp32']:.4f}, bf16 {r['loss_bf16']:.4f}", flush=True)

    print(f"\nGoals (CPUs with AMX / AVX512-BF16; this one: {'yes' if cpu['native_bf16'] else 'no'}):")
    v = results['inference']['bf16_over_fp32']
    print(f'  MLLA-T inference bf16 / fp32           {v:.3f}  (<= {GOAL_INFERENCE})  {verdict(v <= GOAL_INFERENCE)}')
    if 'detector_step' in results:
        s = results['detector_step']['speedup']
        print(f'  Mask R-CNN step speed-up fp32 / bf16   {s:.3f}  (>= {GOAL_STEP_SPEEDUP})  '
              f'{verdict(s >= GOAL_STEP_SPEEDUP)}')
    if args.json:
        with atomic_write(args.json, 'w') as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
