#!/usr/bin/env python
"""Maintainer stress test: how often a two-process CPU training run fails at its end.

    python dev/ddp_end_stress.py [--runs 40] [--repo DIR] [--run-timeout 600]

Trains the tests' tiny Mask R-CNN (synthetic 64x64 shapes, 1 epoch of one
iteration) ``--runs`` times with ``tools/dist_train.sh CONFIG 2`` (torchrun,
two gloo processes) of the checkout ``--repo`` (default: this one; a
``git worktree`` of an older revision gives the before figure) and counts the
runs that did not exit 0 (a run still going after ``--run-timeout`` seconds
is stopped with all its processes and counted), and of those, the ones where a
rank aborted (SIGABRT, "terminate called without an active exception": the end-of-run race
that :func:`mlla_mm.engine.distributed.end_distributed` closes by letting the
ranks meet). Exit code 1 if any run failed; the last failing run's output is
kept in the printed folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.cli import ToolArgumentParser, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=positive_int, default=40, help='training runs (default 40)')
    p.add_argument('--run-timeout', type=positive_int, default=600, metavar='S',
                   help='a run still going after S seconds (about 10 is usual) is stopped and counted as failed '
                        '(default 600)')
    p.add_argument('--repo', type=Path, default=ROOT, help='the checkout whose tools/dist_train.sh and mlla_mm run '
                                                           '(default: this one)')
    args = p.parse_args(argv)
    if not (args.repo / 'tools' / 'dist_train.sh').is_file() or not (args.repo / 'mlla_mm').is_dir():
        p.error(f'--repo {args.repo}: expected a checkout of mlla-mm (tools/dist_train.sh and mlla_mm/ in it)')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlla_mm.datasets import make_coco_shapes
    spec = importlib.util.spec_from_file_location('mlla_mm_test_helpers', ROOT / 'tests' / 'helpers.py')
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)  # the tests' tiny detection config
    folder = Path(tempfile.mkdtemp(prefix='ddp_end_stress_'))
    data = make_coco_shapes(str(folder / 'shapes'), seed=0, num_train=4, num_val=2, size=64)
    config = helpers.write_tiny_config(folder, Path(data), epochs=1)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(args.repo))
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'  # torchrun of this Python
    failed = aborted = hung = 0
    start = time.monotonic()
    for i in range(args.runs):
        work = folder / 'work'
        shutil.rmtree(work, ignore_errors=True)
        proc = subprocess.Popen(['bash', str(args.repo / 'tools' / 'dist_train.sh'), str(config), '2', '--work-dir',
                                 str(work)], cwd=args.repo, env=dict(env, PORT=str(helpers.free_port())),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:  # a hang at the end is a failure too: stop torchrun and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            hung += 1
        if proc.returncode != 0:
            failed += 1
            text = out + err
            aborted += 'SIGABRT' in text or 'terminate called' in text
            (folder / 'last_failure.txt').write_text(text)
        print(f'\rrun {i + 1}/{args.runs}: {failed} failed', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f'{args.repo}: {failed} of {args.runs} runs failed ({aborted} with a rank aborted, {hung} stopped after '
          f'{args.run_timeout} s); {time.monotonic() - start:.0f} s'
          + (f'; output of the last failure: {folder}/last_failure.txt' if failed else ''))
    if not failed:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    from mlla_mm.cli import run_main
    sys.exit(run_main(main))
