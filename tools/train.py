#!/usr/bin/env python
"""Train a detector (mmdet) or segmentor (mmseg) config with an MLLA backbone.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--skip-bad-images]
                                 [--epochs N | --iters N] [--cfg-options k=v ...]
                                 [--launcher none|pytorch|slurm]

``--epochs N`` (epoch-based configs, e.g. the detection templates) or
``--iters N`` (iteration-based, e.g. the segmentation template) sets the
length of the run and scales the schedule to it: the learning-rate steps,
the end of the decay, the warm-up (at most a tenth of the run), and for
``--iters`` the validation and checkpoint intervals
(``mlla_mm/engine/schedules.py``). A schedule that does not fit the run is
one ``error:`` line (mmengine could not build it) or one warning line per
scheduler (it would be cut off) before training; the logger prints at least
once per epoch.

The config's ``default_scope`` (mmdet or mmseg) picks the registries; the rest
is the same for both tasks. Everything the run needs is in the config (our
configs inherit ``configs/_base_/mlla_runtime.py``: SafeRunner and the
reliability hooks), so ``RUNNERS.build(cfg).train()`` in a script of your own
is the same run: the runner checks the settings and the data before it builds
anything. This tool only applies its options to the config and turns problems
you can fix into one ``error:`` line (exit code 2).

Exit codes: 0 done; 2 bad input or a failed write (disk full); 1 stopped on a
NaN/inf loss; 143 / 130 stopped by SIGTERM / SIGINT after writing a checkpoint
of the last iteration (continue with ``--resume``).
"""
import os
import sys


def parse_args(argv=None):
    from mlla_mm.cli import CfgOptionsAction, ToolArgumentParser, add_skip_bad_images, parse_with_launcher, positive_int
    parser = ToolArgumentParser(description='Train an mmdet or mmseg config (MLLA backbones).')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT, or from the latest checkpoint in the work dir when CKPT is omitted')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: fp16 on CUDA, bf16 autocast on the CPU')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default=None,
                        help='override config entries, e.g. train_cfg.max_epochs=1')
    add_skip_bad_images(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument('--epochs', type=positive_int, metavar='N',
                        help='train N epochs, with the schedule (warm-up, steps, decay) scaled to them '
                             '(epoch-based configs)')
    length.add_argument('--iters', type=positive_int, metavar='N',
                        help='train N iterations, with the schedule and the validation/checkpoint intervals '
                             'scaled to them (iteration-based configs)')
    return parse_with_launcher(parser, argv)


def main(argv=None) -> int:
    from mlla_mm.cli import run_main
    args = parse_args(argv)
    return run_main(lambda: train(args))


def train(args) -> int:
    from mmengine.logging import print_log

    from mlla_mm.cli import UsageError, load_config
    from mlla_mm.engine.launch import build_runner, fit_schedule, prepare_config
    from mlla_mm.engine.schedules import rescale_schedule
    cfg = load_config(args.config, args.cfg_options)
    if args.epochs or args.iters:  # the length of the run, with the schedule scaled to it
        try:
            for line in rescale_schedule(cfg, epochs=args.epochs, iters=args.iters):
                print_log(line, logger='current')
        except ValueError as err:
            raise UsageError(f'{args.config}: {err}') from None
    if args.skip_bad_images:
        cfg.skip_bad_images = True
    prepare_config(cfg, work_dir=args.work_dir, config_path=args.config, launcher=args.launcher, amp=args.amp)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if os.path.isdir(args.resume):
            raise UsageError(f'--resume {args.resume} is a directory; name a checkpoint file in it, or give '
                             '--resume alone to take the latest checkpoint of the work dir')
        if not os.path.exists(args.resume):  # a device or FIFO: check_file says it is not a regular file
            raise UsageError(f'--resume checkpoint not found: {args.resume}')
        from mlla_mm.checkpoint import check_file
        check_file(args.resume)  # a refused file: one line, before the runner makes its log folder
        cfg.resume, cfg.load_from = True, args.resume
    # The runner checks the settings, the data and the --resume file against the model before it builds anything.
    runner = build_runner(cfg, config_path=args.config)
    fit_schedule(runner, shorten_warmup=bool(args.epochs))  # one line per misfit, before training
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
