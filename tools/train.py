#!/usr/bin/env python
"""Train a detector (mmdet) or segmentor (mmseg) config with an MLLA backbone.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                 [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

The config's ``default_scope`` (mmdet or mmseg) picks the registries; the rest
is the same for both tasks.
"""
import argparse
import os
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train an mmdet or mmseg config (MLLA backbones).')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT, or from the latest checkpoint in the work dir when CKPT is omitted')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: fp16 on CUDA, bf16 autocast on the CPU')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config entries, e.g. train_cfg.max_epochs=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlla_mm.engine.launch import (DataNotFoundError, check_data, init_cpu_distributed, make_synthetic_data,
                                       prepare_config)
    if not os.path.isfile(args.config):
        print(f'error: config file not found: {args.config}', file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    prepare_config(cfg, work_dir=args.work_dir, config_path=args.config, launcher=args.launcher, amp=args.amp)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if not os.path.isfile(args.resume):
            print(f'error: --resume checkpoint not found: {args.resume}', file=sys.stderr)
            return 2
        cfg.resume, cfg.load_from = True, args.resume
    make_synthetic_data(cfg)
    try:
        check_data(cfg, ('train_dataloader', 'val_dataloader'), args.config)
    except DataNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2

    from mmengine.registry import RUNNERS, init_default_scope
    from mmengine.runner import Runner
    from mlla_mm.checkpoint import CheckpointError
    from mlla_mm.engine.hooks import NonFiniteLossError
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    init_cpu_distributed(args.launcher)
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as err:
        # A bad config (unknown arch, misspelt argument, unknown type): one line, no traceback.
        print(f'error: {args.config}: {one_line(err)}', file=sys.stderr)
        return 2
    try:
        runner.train()
    except (CheckpointError, FileNotFoundError) as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 1
    return 0


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's repr quotes removed)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return ' '.join(str(text).split()) or type(err).__name__


if __name__ == '__main__':
    sys.exit(main())
