#!/usr/bin/env python
"""Maintainer profiling: where a Mask R-CNN training iteration's time goes: per part and per operator.

    python dev/profile_iteration.py configs/detection/mask_rcnn_mlla_t_demo.py \\
        [CHECKPOINT] [--iters 8] [--threads 2] [--amp] [--ops] [--cfg-options KEY=VALUE ...]

Builds the config's model, optimizer and training data loader (no worker
processes), runs ``--iters`` training iterations after two warm-up ones and
prints seconds per iteration: data loading, forward, backward + optimizer
step, and the forward time of each part of a two-stage detector (backbone,
neck, RPN head, RoI extractors, box and mask heads), plus the number of
positive RoIs the mask head trained on. A CHECKPOINT (e.g. the demo's
``epoch_6.pth``) gives the proposals of a trained model, which is what late
training costs. ``--amp`` runs the iterations as ``tools/train.py --amp`` does
(bf16 autocast on the CPU). ``--ops`` adds torch.profiler's table of the slowest operators.

CHECKPOINT may have any layout the project reads (mmdet/mmseg ``state_dict``,
published ``model``, plain; see :func:`mlla_mm.checkpoint.convert_checkpoint`).
A whole-model checkpoint must fit the config's model (every tensor, same
shapes); backbone-only weights (e.g. published ImageNet ones) go into the
backbone, the neck and heads stay random. Bad input (a count below 1, a
checkpoint that is missing, unreadable or does not fit) is one ``error:`` line
and exit code 2; the file is read before the model is built.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Any, Dict, List

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.cli import CfgOptionsAction, ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', help='weights to start from (e.g. a trained demo checkpoint)')
    p.add_argument('--iters', type=positive_int, default=8, help='timed iterations (after 2 warm-up ones)')
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    p.add_argument('--amp', action='store_true', help='mixed precision, as tools/train.py --amp')
    p.add_argument('--ops', action='store_true', help='also print the slowest operators (torch.profiler)')
    p.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default=None, metavar='KEY=VALUE')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlla_mm.cli import run_main
    return run_main(lambda: profile_iterations(args))


#: MLLA's output norms, which published ImageNet weights do not have (as tools/export_onnx.py allows)
_OUT_NORMS = {'norm0', 'norm1', 'norm2', 'norm3'}


def read_weights(path: str) -> Dict[str, Any]:
    """A checkpoint of any supported layout, converted (``{'state_dict': ..., 'meta': ...}``).

    Raises:
        FileNotFoundError / CheckpointError: The file is missing, a folder, unreadable or holds no weights.
    """
    from mlla_mm.checkpoint import check_file, convert_checkpoint, load_file
    check_file(path, name='checkpoint')
    return convert_checkpoint(load_file(path), source=path)


def load_weights(model: torch.nn.Module, converted: Dict[str, Any], path: str, config: str) -> str:
    """Load :func:`read_weights`' result into ``model``; returns what was loaded, in words.

    A whole-model checkpoint must have every tensor of the model with its
    shape and nothing else; backbone-only weights go into ``model.backbone``
    (the MLLA output norms may be missing from them).

    Raises:
        UsageError: The weights do not fit (names the file, the config and example tensors).
    """
    from mlla_mm.checkpoint import compare_state_dicts
    from mlla_mm.cli import UsageError
    weights = converted['state_dict']
    meta = converted.get('meta') or {}
    backbone_only = bool(weights) and meta.get('mlla_mm_layout') == 'backbone' and hasattr(model, 'backbone')
    target, prefix = (model.backbone, 'backbone.') if backbone_only else (model, '')
    fit = compare_state_dicts(target.state_dict(), weights)
    missing = [k for k in fit.missing if not k.endswith('num_batches_tracked')
               and not (backbone_only and k.split('.')[0] in _OUT_NORMS)]
    if fit.wrong or missing or fit.unexpected or not weights:
        problems = []
        if fit.wrong:
            problems.append(f'{len(fit.wrong)} tensor(s) of another shape (e.g. '
                            + '; '.join(prefix + m for _, m in fit.wrong[:2]) + ')')
        if missing:
            problems.append(f'{len(missing)} missing (e.g. {", ".join(prefix + k for k in missing[:3])})')
        if fit.unexpected:
            problems.append(f'{len(fit.unexpected)} unexpected (e.g. {", ".join(fit.unexpected[:3])})')
        kind = 'backbone-only weights, for model.backbone' if backbone_only else 'whole-model weights'
        raise UsageError(f'{path} does not fit the model of {config} ({kind}): '
                         + ('; '.join(problems) or 'no weights in it')
                         + ': a checkpoint of another config or MLLA size?')
    target.load_state_dict(weights, strict=False)  # num_batches_tracked / output norms may be absent
    if backbone_only:
        return f'{len(weights)} backbone tensors from {path} (backbone-only weights: the neck and heads stay random)'
    return f'{len(weights)} tensors from {path}'


def profile_iterations(args: argparse.Namespace) -> int:
    """Time ``args.iters`` training iterations of ``args.config`` and print where the time went."""
    import mlla_mm  # noqa: F401
    from mlla_mm.cli import UsageError, load_config
    from mlla_mm.engine.launch import apply_amp
    from mlla_mm.engine.runner import SafeRunner
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    converted = read_weights(args.checkpoint) if args.checkpoint else None  # before minutes of building
    cfg.work_dir = cfg.get('work_dir') or 'work_dirs/profile_iteration'
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    if args.amp:
        apply_amp(cfg)
    runner = SafeRunner.from_cfg(cfg)
    model = runner.model.train()
    optim = runner.build_optim_wrapper(cfg.optim_wrapper)
    loader = runner.build_dataloader(cfg.train_dataloader)
    if converted is not None:
        print(f'loaded {load_weights(model, converted, args.checkpoint, args.config)}', flush=True)

    part_times: Dict[str, List[float]] = collections.defaultdict(list)
    parts = {name: getattr(model, name, None) for name in ('backbone', 'neck', 'rpn_head')}
    roi = getattr(model, 'roi_head', None)
    for name in ('bbox_roi_extractor', 'bbox_head', 'mask_roi_extractor', 'mask_head'):
        parts[name] = getattr(roi, name, None)
    for name, module in parts.items():
        if module is None:
            continue
        module.register_forward_pre_hook(lambda m, a: setattr(m, '_t0', time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, name=name: part_times[name].append(time.perf_counter() - m._t0))
    positives: List[int] = []
    if roi is not None and hasattr(roi, 'mask_loss'):
        mask_loss = roi.mask_loss

        def counting_mask_loss(x, sampling_results, *a, **kw):
            positives.append(sum(len(r.pos_priors) for r in sampling_results))
            return mask_loss(x, sampling_results, *a, **kw)

        roi.mask_loss = counting_mask_loss

    batches = iter(loader)
    totals: Dict[str, List[float]] = collections.defaultdict(list)

    def step() -> None:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            raise UsageError(f'the training set of {args.config} has fewer than {args.iters + 2} batches') from None
        t1 = time.perf_counter()
        data = model.data_preprocessor(batch, True)
        with optim.optim_context(model):
            loss, _ = model.parse_losses(model(**data, mode='loss'))
        t2 = time.perf_counter()
        optim.update_params(loss)
        t3 = time.perf_counter()
        for key, value in (('data', t1 - t0), ('forward', t2 - t1), ('backward + step', t3 - t2),
                           ('iteration', t3 - t0)):
            totals[key].append(value)

    for _ in range(2):
        step()
    for store in (totals, part_times):
        store.clear()
    del positives[:]
    prof = None
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        prof.__enter__()
    for _ in range(args.iters):
        step()
    if prof is not None:
        prof.__exit__(None, None, None)

    n = args.iters
    print(f'{args.config}: {n} iterations, {args.threads} threads, {torch.get_num_threads()} torch threads, '
          f'{type(optim).__name__}')
    for key, values in totals.items():
        print(f'  {key:<24}{sum(values) / n:9.4f} s/iter')
    for key, values in part_times.items():
        print(f'  forward {key:<16}{sum(values) / n:9.4f} s/iter')
    if positives:
        print(f'  positive RoIs per iteration (mask head): {positives}')
    if prof is not None:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by='self_cpu_time_total', row_limit=25, max_name_column_width=40, max_shapes_column_width=80))
    return 0


if __name__ == '__main__':
    sys.exit(main())
