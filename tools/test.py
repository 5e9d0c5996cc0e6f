#!/usr/bin/env python
"""Evaluate a checkpoint of a detector (mmdet) or segmentor (mmseg) config.

    python tools/test.py CONFIG CKPT|FILE.onnx [--work-dir DIR] [--show-dir DIR] [--tta] [--skip-bad-images]
                                     [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

``--show-dir DIR`` writes ``DIR/<image stem>.png`` for every test image (ground truth | predictions,
each panel at the image's own size; mlla_mm/visualization.py);
``--tta`` uses the config's ``tta_model``/``tta_pipeline`` (multi-scale + flip).
An ``.onnx`` file written by tools/export_onnx.py from the same config (a
whole detector or segmentor) is evaluated with ONNX Runtime instead, through
the same data pipeline, preprocessor and metrics (docs/deploy.md).
Like tools/train.py, it only applies its options to the config, checks the
data and turns problems you can fix into one ``error:`` line (exit code 2).
"""
import os
import sys

from mmengine.config import Config


def parse_args(argv=None):
    from mlla_mm.cli import CfgOptionsAction, ToolArgumentParser, add_skip_bad_images, parse_with_launcher
    parser = ToolArgumentParser(description='Test an mmdet or mmseg config (MLLA backbones).')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go (default: work_dirs/<config name>)')
    parser.add_argument('--show-dir', help='write pictures of the predictions here (PNG)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation from the config')
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default=None,
                        help='override config entries')
    add_skip_bad_images(parser)
    return parse_with_launcher(parser, argv)


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Draw every test image into ``show_dir/<image stem>.png`` (ground truth | predictions, the image's size).

    mlla_mm.visualization.ShowDirHook draws for detection and segmentation alike; the config's own
    visualization hook stays off, so nothing else is drawn or stored under the work dir.
    """
    from mlla_mm.cli import UsageError
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise UsageError('--show-dir needs a "visualization" entry in default_hooks')
    hook.draw = False
    import mlla_mm.visualization  # noqa: F401  (registers ShowDirHook)
    cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
        dict(type='ShowDirHook', out_dir=os.path.abspath(show_dir), score_thr=hook.get('score_thr', 0.3))]


def main(argv=None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: test(args))


def test(args) -> int:
    from mlla_mm.checkpoint import check_file
    from mlla_mm.cli import UsageError, check_output, load_config
    from mlla_mm.engine.launch import build_runner, prepare_config
    from mlla_mm.engine.runner import set_hook_args
    onnx_file = args.checkpoint.lower().endswith('.onnx')  # an exported whole model, run by ONNX Runtime
    if onnx_file and args.tta:
        raise UsageError(f'--tta: not available for an ONNX file ({args.checkpoint}); the graph is one scale')
    if not onnx_file:
        check_file(args.checkpoint, name='checkpoint')  # missing or refused: one line, before any log folder
    if args.out and not args.out.endswith(('.pkl', '.pickle')):
        raise UsageError(f'--out {args.out}: the raw predictions are written as a pickle; name it .pkl')
    check_output(args.out, '--out')
    check_output(args.show_dir, '--show-dir', folder=True)
    cfg = load_config(args.config, args.cfg_options)
    if args.skip_bad_images:
        cfg.skip_bad_images = True
    if onnx_file:  # the file must be a whole-model export of this config: checked before any log folder
        from mlla_mm.deploy.ort_model import check_onnx_for_config, onnx_model_config
        cfg.model = onnx_model_config(cfg, args.checkpoint, check_onnx_for_config(args.checkpoint, cfg))
    prepare_config(cfg, work_dir=args.work_dir, config_path=args.config, launcher=args.launcher)
    if not onnx_file:
        cfg.load_from = args.checkpoint
        set_hook_args(cfg, 'CheckpointGuardHook', whole_model=True)  # every tensor of the model must be in it
    # A test run: the runner checks (and builds) the test data only, not the training set.
    cfg.train_dataloader = cfg.train_cfg = cfg.optim_wrapper = cfg.param_scheduler = None
    # The whole model comes from the checkpoint: do not load the backbone's own weights first.
    if cfg.model.get('backbone', {}).get('init_cfg'):
        cfg.model.backbone.init_cfg = None
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise UsageError(f'--tta needs tta_model and tta_pipeline in {args.config}')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type='DumpResults', out_file_path=args.out))
    runner = build_runner(cfg, config_path=args.config, step='test_step')  # checks the data and the checkpoint
    metrics = runner.test()
    print('metrics: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                  for k, v in (metrics or {}).items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
