#!/usr/bin/env python
"""Evaluate a checkpoint of a detector (mmdet) or segmentor (mmseg) config.

    python tools/test.py CONFIG CKPT [--work-dir DIR] [--show-dir DIR] [--tta]
                                     [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

``--show-dir`` writes a PNG of the predictions for every test image;
``--tta`` uses the config's ``tta_model``/``tta_pipeline`` (multi-scale + flip).
"""
import argparse
import os
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test an mmdet or mmseg config (MLLA backbones).')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go (default: work_dirs/<config name>)')
    parser.add_argument('--show-dir', help='write pictures of the predictions here (PNG)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation from the config')
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Make the visualization hook draw every test image into ``show_dir``."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show-dir needs a "visualization" entry in default_hooks')
    hook.draw = True
    hook.interval = 1
    show_dir = os.path.abspath(show_dir)
    if cfg.get('default_scope') == 'mmseg':
        cfg.visualizer.save_dir = show_dir
        cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    else:
        hook.test_out_dir = show_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlla_mm.engine.launch import (DataNotFoundError, check_data, init_cpu_distributed, make_synthetic_data,
                                       prepare_config)
    for path, what in [(args.config, 'config file'), (args.checkpoint, 'checkpoint')]:
        if not os.path.isfile(path):
            print(f'error: {what} not found: {path}', file=sys.stderr)
            return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    prepare_config(cfg, work_dir=args.work_dir, config_path=args.config, launcher=args.launcher)
    cfg.load_from = args.checkpoint
    # The whole model comes from the checkpoint: do not load the backbone's own weights first.
    if cfg.model.get('backbone', {}).get('init_cfg'):
        cfg.model.backbone.init_cfg = None
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            print(f'error: --tta needs tta_model and tta_pipeline in {args.config}', file=sys.stderr)
            return 2
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type='DumpResults', out_file_path=args.out))
    make_synthetic_data(cfg)
    try:
        check_data(cfg, ('test_dataloader', ), args.config)
    except DataNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2

    from mmengine.registry import RUNNERS, init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    init_cpu_distributed(args.launcher)
    from mlla_mm.checkpoint import CheckpointError
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f'error: {args.config}: {" ".join(str(msg).split())}', file=sys.stderr)
        return 2
    try:
        metrics = runner.test()
    except CheckpointError as err:
        print(f'error: {" ".join(str(err).split())}', file=sys.stderr)
        return 2
    print('metrics: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                  for k, v in (metrics or {}).items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
