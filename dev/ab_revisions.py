#!/usr/bin/env python
"""Maintainer A/B: MLLA-T of the working tree against MLLA-T of another git revision, in one process.

    python dev/ab_revisions.py REV [--threads 2] [--repeats 5] [--sizes 512x512 800x1280] [--train-size 512] \\
        [--malloc tuned|default] [--ops] [--json FILE]

For checking that a refactor did not slow the model down: the revision's
``mlla_mm/models/*.py`` is imported beside today's package (see
:func:`load_mlla_at_revision`), both get the same weights and run in the same
interleaved rounds (``mlla_mm.utils.timing``): inference at ``--sizes``
(default 512x512 and 800x1280) and a train step (forward + backward, batch 2, ``--train-size``).
glibc's malloc is tuned first as the tools tune it (``--malloc default``
leaves it alone: a revision before 7030d94 then runs its fast path in bands
of rows). Prints new / old as the median of per-round ratios with the range of the
rounds. ``--ops`` also runs both once at the last size under torch's profiler
and prints what each executed: the operators whose call counts differ, and
the summed self CPU time of all operators (equal counts and equal sums: the
same work, so a ratio away from 1 is the machine's noise). Not a user tool (it rewrites ``sys.modules``): users run
``tools/benchmark.py``.

An unknown revision, a missing git or a revision without the model file is
one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from typing import Dict, Sequence, Tuple

import torch

from mlla_mm.utils.cpu import cpu_description
from mlla_mm.utils.timing import interleaved_times, paired_ratio, ratio_text, round_ratios, summarize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RevisionError(Exception):
    """git is missing, or the revision (or its model code) cannot be read."""


def _git(*args: str) -> str:
    if shutil.which('git') is None:
        raise RevisionError('dev/ab_revisions.py needs git, which is not on PATH')
    res = subprocess.run(['git', '-C', REPO_ROOT, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RevisionError(f"git {' '.join(args)} failed in {REPO_ROOT}: "
                            + (res.stderr.strip().splitlines() or ['no output'])[-1])
    return res.stdout


def load_mlla_at_revision(rev: str, folder: str) -> Tuple[type, str]:
    """The ``MLLA`` class of git revision ``rev``, imported from a copy in ``folder``, and the full commit hash.

    The revision's ``mlla_mm/models/*.py`` (the backbone and what it imports
    from its own folder) is written to ``folder`` and imported as
    package ``_mlla_mm_at_<hash>.models``. Its imports from the rest of
    ``mlla_mm`` (checkpoint reader, registry: not timed) get today's modules,
    and nothing of the revision is registered (``register_everywhere`` is a
    no-op there), so today's ``MLLA`` stays the one in the registries.
    """
    import mlla_mm.models  # noqa: F401 (today's modules, which the revision's code is given)
    import mlla_mm.registry
    _git('rev-parse', '--git-dir')  # a clear error outside a git checkout
    try:
        sha = _git('rev-parse', '--verify', '--quiet', f'{rev}^{{commit}}').strip()
    except RevisionError:
        raise RevisionError(f'REV: no commit {rev!r} in the git repository {REPO_ROOT}') from None
    files = [f for f in _git('ls-tree', '--name-only', sha, 'mlla_mm/models/').split()
             if f.endswith('.py')]
    if 'mlla_mm/models/mlla.py' not in files:
        raise RevisionError(f'revision {rev} ({sha[:10]}) has no mlla_mm/models/mlla.py')
    pkg = f'_mlla_mm_at_{sha[:12]}'
    models_dir = os.path.join(folder, 'models')
    os.makedirs(models_dir)
    for f in files:
        if f.endswith('/__init__.py'):
            continue  # the package stays empty: only what mlla.py imports is loaded
        with open(os.path.join(models_dir, os.path.basename(f)), 'w', encoding='utf-8') as out:
            out.write(_git('show', f'{sha}:{f}'))
    root = types.ModuleType(pkg)
    root.__path__ = []
    models = types.ModuleType(f'{pkg}.models')
    models.__path__ = [models_dir]
    registry = types.ModuleType(f'{pkg}.registry')
    registry.__dict__.update({k: v for k, v in vars(mlla_mm.registry).items() if not k.startswith('__')})
    registry.register_everywhere = lambda cls: cls
    aliases = {f'{pkg}.{name[len("mlla_mm."):]}': mod for name, mod in list(sys.modules.items())
               if name.startswith('mlla_mm.') and not name.startswith('mlla_mm.models') and mod is not None}
    sys.modules.update(aliases)
    sys.modules.update({pkg: root, f'{pkg}.models': models, f'{pkg}.registry': registry})
    # The revision's timm family registers mlla_tiny/small/base in timm again (with its own classes):
    # timm's registry tables are put back afterwards, so today's models stay the registered ones.
    import timm.models._registry as timm_registry
    tables = {name: table for name, table in vars(timm_registry).items()
              if name.startswith('_model') or name.startswith('_module') or name.startswith('_deprecated')}
    saved = {name: copy.deepcopy(table) for name, table in tables.items() if isinstance(table, (dict, set))}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # e.g. timm's "overwriting model in registry" of a newer revision
            backbone = 'backbone' if 'mlla_mm/models/backbone.py' in files else 'mlla'  # (the file MLLA is in)
            module = importlib.import_module(f'{pkg}.models.{backbone}')
    finally:
        for name, table in saved.items():
            tables[name].clear()
            tables[name].update(table)
    return module.MLLA, sha


def operator_profile(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Tuple[int, float]]:
    """Operator name -> (calls, self CPU ms) of one inference call of ``model`` on ``x`` (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return {e.key: (int(e.count), e.self_cpu_time_total / 1e3) for e in prof.key_averages()}


def compare_operators(new: Dict[str, Tuple[int, float]], old: Dict[str, Tuple[int, float]]) -> dict:
    """The operators whose call counts differ, and each side's number of calls and summed self CPU ms."""
    differ = {name: dict(new=new.get(name, (0, 0.0))[0], old=old.get(name, (0, 0.0))[0])
              for name in sorted(set(new) | set(old)) if new.get(name, (0,))[0] != old.get(name, (0,))[0]}
    return dict(differ=differ, calls=dict(new=sum(c for c, _ in new.values()), old=sum(c for c, _ in old.values())),
                self_cpu_ms=dict(new=sum(t for _, t in new.values()), old=sum(t for _, t in old.values())))


def compare_with_revision(rev: str, repeats: int, train_size: int = 512,
                          sizes: Sequence[Tuple[int, int]] = ((512, 512), (800, 1280)), ops: bool = False) -> dict:
    """Time today's MLLA-T and the one of git revision ``rev`` with the same weights, interleaved.

    Inference (eval, ``no_grad``, batch 1) at each of ``sizes`` and a train
    step (train mode, forward + backward of batch 2 at ``train_size``,
    seeded identically before each call so drop path drops the same blocks).
    Every round runs both models back to back (alternating which goes first);
    a ratio is the median over rounds of new time / old time in the round.
    ``ops``: also the operators both execute at the last size (:func:`compare_operators`).
    """
    from mlla_mm.models import MLLA
    with tempfile.TemporaryDirectory(prefix='mlla_rev_') as folder:
        return _compare(MLLA, *load_mlla_at_revision(rev, folder), rev, repeats, train_size, sizes, ops)


def _compare(new_cls: type, old_cls: type, sha: str, rev: str, repeats: int, train_size: int,
             sizes: Sequence[Tuple[int, int]], ops: bool = False) -> dict:
    head = _git('rev-parse', 'HEAD').strip()
    torch.manual_seed(0)
    new = new_cls('tiny')
    old = old_cls('tiny')
    old.load_state_dict(new.state_dict())
    out: dict = dict(rev=rev, rev_commit=sha, head_commit=head, cpu=cpu_description()['model_name'],
                     threads=torch.get_num_threads(), repeats=repeats, ratios={}, rounds={}, times={})
    print(f'# new: working tree at {head[:10]}; old: {rev} = {sha[:10]}; CPU: {out["cpu"]}; '
          f'{out["threads"]} threads; {repeats} interleaved rounds', flush=True)
    new.eval(), old.eval()
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            diff = max(float((a - b).abs().max()) for a, b in zip(new(x), old(x)))
            times = interleaved_times(dict(new=lambda: new(x), old=lambda: old(x)), repeats)
            key = f'inference {h}x{w}'
            out['rounds'][key] = round_ratios(times, 'new', 'old')
            out['ratios'][key] = paired_ratio(times, 'new', 'old')
            out['times'][key] = dict(new=summarize(times['new']), old=summarize(times['old']), max_abs_diff=diff)
            print(f'# {key} done', flush=True)
        if ops:
            out['ops'] = dict(size=f'{h}x{w}', **compare_operators(operator_profile(new, x), operator_profile(old, x)))
    new.train(), old.train()
    x = torch.randn(2, 3, train_size, train_size)

    def step(model: torch.nn.Module) -> None:
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        sum(o.mean() for o in model(x)).backward()

    times = interleaved_times(dict(new=lambda: step(new), old=lambda: step(old)), repeats)
    key = f'train fwd+bwd 2x{train_size}x{train_size}'
    out['rounds'][key] = round_ratios(times, 'new', 'old')
    out['ratios'][key] = paired_ratio(times, 'new', 'old')
    out['times'][key] = dict(new=summarize(times['new']), old=summarize(times['old']))
    print(f"\nMLLA-T, working tree / {rev} ({sha[:10]}), {out['cpu']}, {out['threads']} threads")
    print(f"{'':<34}{'new s':>8}{'old s':>8}  new/old (median of per-round ratios)")
    for key, ratios in out['rounds'].items():
        t = out['times'][key]
        extra = f"  max |new-old| {t['max_abs_diff']:.1e}" if 'max_abs_diff' in t else ''
        print(f"{key:<34}{t['new']['median']:8.3f}{t['old']['median']:8.3f}  {ratio_text(ratios)}{extra}")
    if ops:
        o = out['ops']
        print(f"operators at {o['size']}: calls new {o['calls']['new']} / old {o['calls']['old']}, summed self CPU "
              f"new {o['self_cpu_ms']['new']:.1f} ms / old {o['self_cpu_ms']['old']:.1f} ms; "
              + (f"calls differ for {len(o['differ'])}: " + ', '.join(
                  f"{name} {c['new']}/{c['old']}" for name, c in o['differ'].items()) if o['differ']
                 else 'every operator called as often'))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.cli import ToolArgumentParser, image_size, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('rev', help='the git revision to compare with (e.g. HEAD~3, a tag, a commit)')
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    p.add_argument('--repeats', type=positive_int, default=5, help='interleaved rounds (default 5)')
    p.add_argument('--sizes', nargs='+', type=image_size, default=[(512, 512), (800, 1280)],
                   help='HxW sizes of the inference (default 512x512 800x1280)')
    p.add_argument('--train-size', type=positive_int, default=512, help='square image size of the train step')
    p.add_argument('--ops', action='store_true',
                   help="also profile one call of each at the last size: operators whose call counts differ and the "
                        "summed self CPU time (is it the same work?)")
    p.add_argument('--json', help='write the numbers to this JSON file')
    p.add_argument('--malloc', choices=['tuned', 'default'],
                   help="glibc malloc as the tools set it ('tuned', mlla_mm/utils/malloc.py) or left alone "
                        "('default'); the old revision's fast path may band its maps by it (default: "
                        'MLLA_MM_MALLOC, else tuned)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mlla_mm.cli import UsageError, check_output, one_line
    from mlla_mm.utils.io import AtomicWriteError, atomic_write
    from mlla_mm.utils.malloc import tune_cpu_malloc
    args = parse_args(argv)
    try:
        check_output(args.json, '--json')
        torch.set_num_threads(args.threads)
        try:
            malloc = tune_cpu_malloc(None if args.malloc is None else args.malloc == 'tuned')
        except ValueError as err:  # a bad MLLA_MM_MALLOC
            raise UsageError(str(err)) from None
        print(f'# malloc: {malloc}', flush=True)
        found = compare_with_revision(args.rev, args.repeats, args.train_size, args.sizes, ops=args.ops)
        if args.json:
            with atomic_write(args.json, 'w') as f:
                json.dump(dict(found, torch=torch.__version__, malloc=malloc), f, indent=2)
    except (RevisionError, UsageError, AtomicWriteError) as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
