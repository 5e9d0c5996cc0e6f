#!/usr/bin/env python
"""Run an embedded demo end to end: data, training, evaluation, pictures.

    python tools/demo.py det   # Mask R-CNN MLLA-T on synthetic COCO-format shapes
    python tools/demo.py seg   # UperNet MLLA-T on synthetic ADE20K-format shapes

It first prints what it does, the precision it trains in and why, and how long
docs/benchmarks.md says it takes on this kind of CPU; mmengine's per-parameter
reports stay in the log files. Steps: generate the synthetic data set (first
run only), evaluate the untrained model as a baseline (seg), train with
tools/train.py (progress and ETA in the log; no validation during training,
since the next step evaluates; det trains in bf16 where the CPU has AMX or
AVX512-BF16, --no-amp for fp32), evaluate the trained model with
tools/test.py and draw its predictions on the held-out images
(``<work dir>/predictions/<image stem>.png``, ground truth | prediction), plot
the loss curve, and write a summary to ``<work dir>/demo_summary.json``.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
# The demo evaluates the trained model with tools/test.py on the held-out split its config
# validates on; the training run's own validation after the last epoch would compute the same
# numbers once more (17-25 s of the det demo on a 2-core AMD EPYC), so training skips it.
SKIP_VALIDATION = 'train_cfg.val_begin=1000000000'
DEMOS = {
    'det': dict(config='configs/detection/mask_rcnn_mlla_t_demo.py', work_dir='work_dirs/demo_det',
                model='Mask R-CNN with an MLLA-T backbone', data='COCO-format shapes', scores='box and mask mAP',
                metrics=('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'),
                # An untrained detector keeps 100 random boxes per image: slow to evaluate, mAP ~0.
                baseline=False,
                # bf16 training where the CPU has AMX / AVX512-BF16: 1.47-1.55x faster at the same box mAP
                # (docs/benchmarks.md, "bf16 on AMX"); --no-amp trains in fp32.
                amp_auto=True),
    'seg': dict(config='configs/segmentation/upernet_mlla_t_demo.py', work_dir='work_dirs/demo_seg',
                model='UperNet with an MLLA-T backbone', data='ADE20K-format shapes', scores='mIoU',
                metrics=('mIoU', 'mAcc', 'aAcc'), baseline=True, amp_auto=False),
}

#: The 2-core CPUs docs/benchmarks.md ("Current figures per CPU") timed a demo on: name, how to recognise one
#: from /proc/cpuinfo (text in the model name, flags it must have, flags it must lack).
CPU_KINDS = {
    'AMD EPYC, Zen 2': ('AMD EPYC', (), ('avx512f',)),
    'AMD EPYC, Zen 4': ('AMD EPYC', ('avx512_bf16',), ()),
    'Intel Xeon with AMX': ('Xeon', ('amx_bf16',), ()),
}
#: Wall time of the whole demo (set-up done) as docs/benchmarks.md records it: (task, precision, CPU kind, time).
DOCUMENTED_TIMES = (
    ('det', 'fp32', 'AMD EPYC, Zen 2', '8 min 36 s to 9 min 38 s'),
    ('det', 'fp32', 'Intel Xeon with AMX', '8 min 49 s to 15 min 31 s'),
    ('det', 'bf16', 'Intel Xeon with AMX', '6 min 3 s to 10 min 26 s'),
    ('seg', 'fp32', 'AMD EPYC, Zen 4', '9 min 26 s'),
)


def cpu_kind(model: str, flags: Set[str]) -> Optional[str]:
    """The :data:`CPU_KINDS` entry a CPU (``model name`` and ``flags`` of /proc/cpuinfo) is, or None."""
    for kind, (text, having, lacking) in CPU_KINDS.items():
        if text in model and all(f in flags for f in having) and not any(f in flags for f in lacking):
            return kind
    return None


def expected_time(task: str, precision: str, kind: Optional[str], cuda: bool) -> str:
    """What docs/benchmarks.md says the demo takes here: this CPU kind's figure, else those of other CPUs."""
    if cuda:
        return 'not measured on a GPU yet (docs/benchmarks.md has 2-core CPU figures only)'
    figures = [(p, k, t) for d, p, k, t in DOCUMENTED_TIMES if d == task]
    for p, k, t in figures:
        if p == precision and k == kind:
            return f'{t} on a 2-core {k} in {p} (docs/benchmarks.md; more cores: less)'
    figures.sort(key=lambda f: f[0] != precision)  # the same precision first
    others = '; '.join(f'{t} in {p} on a 2-core {k}' for p, k, t in figures)
    here = f'this CPU ({kind})' if kind else 'this CPU'
    return f'{precision} not timed on {here} yet; documented: {others} (docs/benchmarks.md)'


def precision_of(amp: bool, cuda: bool) -> str:
    """The precision tools/train.py trains in: ``--amp`` is bf16 on the CPU, fp16 on CUDA."""
    return ('fp16' if cuda else 'bf16') if amp else 'fp32'


def demo_header(task: str, work_dir: Path, synthetic: Optional[dict], precision: str, why: str,
                expected: str) -> List[str]:
    """The demo's first lines: what it does, in which precision and why, how long it takes, where the logs go."""
    demo = DEMOS[task]
    synthetic = synthetic or {}
    data = (f"{synthetic.get('num_train', '?')} synthetic {demo['data']} (made under {synthetic.get('root', '?')} "
            f"on first use), {synthetic.get('num_val', '?')} held out")
    return [
        f"== mlla-mm demo ({task}): {demo['model']}, trained from scratch in {precision} on {data} ==",
        f"steps: {'evaluate the untrained model, ' if demo['baseline'] else ''}train ({demo['config']}), "
        f"evaluate {demo['scores']} on the held-out images, draw them into {work_dir / 'predictions'}, summary",
        f'precision: {precision} ({why})',
        f'time: {expected}',
        f'full logs: {work_dir}/<step>.log; this console shows progress and results',
    ]


def choose_amp(requested: Optional[bool], auto: bool, cuda: bool, bf16_cpu: Tuple[bool, str]) -> Tuple[bool, str]:
    """Whether the demo trains with ``--amp``, and why (one line for the log).

    ``requested``: ``--amp`` (True), ``--no-amp`` (False) or neither (None: the
    demo's ``amp_auto`` decides: bf16 only on a CPU-only machine whose CPU has
    AMX or AVX512-BF16, ``bf16_cpu`` being :func:`mlla_mm.utils.cpu.bf16_fast_on_this_cpu`).
    """
    if requested is not None:
        return requested, 'mixed precision ' + ('on' if requested else 'off') + (' (--amp)' if requested else
                                                                                  ' (--no-amp)')
    fast, description = bf16_cpu
    if auto and not cuda and fast:
        return True, (f'mixed precision on: bf16 training, since this CPU has native bf16 ({description}); '
                      '--no-amp trains in fp32')
    if auto and not cuda:
        return False, f'mixed precision off: fp32 training ({description}: bf16 would be slower here)'
    return False, 'mixed precision off (--amp to turn it on)'


def run(cmd, log_path=None):
    """Run a command, streaming its output (and saving it to ``log_path``)."""
    print('$ ' + ' '.join(str(c) for c in cmd), flush=True)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    view = ConsoleView()
    with open(log_path, 'w') if log_path else open(os.devnull, 'w') as log:
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            if view.shows(line):
                sys.stdout.write(line)
                sys.stdout.flush()
    if proc.wait() != 0:
        raise StepFailed(proc.returncode, f'demo step failed (exit code {proc.returncode}): '
                         f'{" ".join(map(str, cmd))}' + (f'; full log: {log_path}' if log_path else ''))
    return ''.join(lines)


class StepFailed(Exception):
    """A step (tools/train.py or tools/test.py) exited with ``code``; its own error line was shown."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


#: The start of an mmengine log record on the console (``MM/DD HH:MM:SS - mmengine - LEVEL - message``).
_RECORD = re.compile(r'^\d\d/\d\d \d\d:\d\d:\d\d - \S+ - [A-Z]+ - ')
#: mmengine's many-line records at the start of a run: the environment (an empty first line), the config and
#: the hook order. The log files keep them; the demo's console skips them.
_BULK = re.compile(r' - [A-Z]+ - (Config:|Hooks will be executed in the following order:)?\s*$')


class ConsoleView:
    """Which lines of a step's output the demo shows: not :func:`_noise`, not mmengine's many-line records."""

    def __init__(self) -> None:
        self.hiding = False

    def shows(self, line: str) -> bool:
        if _RECORD.match(line):
            self.hiding = _BULK.search(line) is not None
        elif line.startswith(('Traceback', 'error:')):  # a failure is always shown
            self.hiding = False
        return not self.hiding and not _noise(line)


def _noise(line):
    """Lines not worth showing in the demo's console (they stay in the log file)."""
    return any(s in line for s in ('paramwise_options', 'Warning', 'warnings.warn', '_bootstrap', 'pkg_resources',
                                   'loading annotations', 'Done (t=', 'creating index', 'index created'))


def parse_metrics(text):
    for line in reversed(text.splitlines()):
        if line.startswith('metrics: '):
            out = {}
            for item in line[len('metrics: '):].split(', '):
                k, _, v = item.partition('=')
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
            return out
    raise SystemExit('could not find the metrics line in the test output')


def config_seed(config: str):
    """The seed a config fixes (``randomness.seed``), or None."""
    from mmengine.config import Config
    return Config.fromfile(str(ROOT / config)).get('randomness', {}).get('seed')


def build_untrained(cfg):
    """The freshly initialised model of ``cfg`` (with the demo's --cfg-options); a bad config is a UsageError.

    mmengine's per-parameter initialisation report stays off the console (the training log file has it).
    """
    import torch
    from mmengine.registry import MODELS, init_default_scope
    import mlla_mm  # noqa: F401
    from mlla_mm.engine.console import keep_parameter_reports_off_console
    from mlla_mm.cli import UsageError, one_line
    keep_parameter_reports_off_console()
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    try:
        model = MODELS.build(cfg.model)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise UsageError(f'{cfg.filename}: the model does not build: {one_line(err)}') from None
    model.init_weights()
    return model


def save_untrained(model, path):
    """Write a checkpoint of the freshly initialised model (the baseline)."""
    from mlla_mm.checkpoint import save_atomic
    save_atomic({'state_dict': model.state_dict(), 'meta': {'note': 'untrained baseline'}}, path)


def loss_curve(work_dir, out_png):
    """Plot the training loss from mmengine's scalars.json; return (first, last) smoothed loss."""
    files = sorted(Path(work_dir).glob('*/vis_data/scalars.json'), key=os.path.getmtime)
    if not files:
        return None
    its, losses = [], []
    for line in files[-1].read_text().splitlines():
        rec = json.loads(line)
        if 'loss' in rec and 'iter' in rec:
            its.append(rec['iter'])
            losses.append(rec['loss'])
    if len(losses) < 2:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(its, losses, marker='.', lw=1)
    ax.set_xlabel('iteration')
    ax.set_ylabel('total training loss')
    ax.set_title(f'{Path(work_dir).name}: training loss')
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def main(argv=None):
    from mlla_mm.cli import run_main
    return run_main(lambda: demo_main(argv))


def demo_main(argv=None):
    from mlla_mm.cli import CfgOptionsAction, ToolArgumentParser, check_output, load_config
    parser = ToolArgumentParser(description='Run an embedded mlla-mm demo end to end.')
    parser.add_argument('task', choices=sorted(DEMOS), help='det: Mask R-CNN; seg: UperNet')
    parser.add_argument('--work-dir', help='default: work_dirs/demo_<task>')
    parser.add_argument('--baseline', action=argparse.BooleanOptionalAction, default=None,
                        help='also evaluate the untrained model (default: on for seg, off for det)')
    parser.add_argument('--seed', type=int,
                        help="training seed (default: the config's randomness.seed, 0, so that a run repeats)")
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='train with mixed precision (tools/train.py --amp: bf16 on the CPU, fp16 on CUDA); '
                             'default for det: on when the CPU has AMX or AVX512-BF16 and no GPU is used')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='passed on to train.py and test.py')
    args = parser.parse_args(argv)
    demo = DEMOS[args.task]
    config = demo['config']
    work_dir = ROOT / (args.work_dir or demo['work_dir'])
    # Everything the steps will be given is checked first: the options parse and apply, the model builds.
    check_output(str(work_dir), '--work-dir', folder=True)
    probe = ToolArgumentParser(prog=parser.prog)
    probe.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction, default=None)
    options = probe.parse_args(['--cfg-options', *args.cfg_options]).cfg_options if args.cfg_options else None
    cfg = load_config(str(ROOT / config), options)
    import torch
    from mlla_mm.utils.cpu import CPUINFO, _parse_cpuinfo  # (the model name and flags of /proc/cpuinfo)
    cuda = torch.cuda.is_available()
    try:
        flags, model = _parse_cpuinfo(Path(CPUINFO).read_text(errors='replace'))
    except OSError:
        flags, model = set(), ''
    from mlla_mm.utils.cpu import bf16_fast_on_this_cpu
    amp, why = choose_amp(args.amp, demo['amp_auto'], cuda, bf16_fast_on_this_cpu())
    precision = precision_of(amp, cuda)
    for line in demo_header(args.task, work_dir, cfg.get('synthetic_data'), precision, why,
                            expected_time(args.task, precision, cpu_kind(model, flags), cuda)):
        print(line, flush=True)
    untrained = build_untrained(cfg)
    work_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    opts = ['--cfg-options', *args.cfg_options] if args.cfg_options else []
    seed = args.seed if args.seed is not None else config_seed(config)
    train_options = [SKIP_VALIDATION, *args.cfg_options] + (
        [f'randomness.seed={args.seed}'] if args.seed is not None else [])
    train_opts = ['--cfg-options', *train_options] if train_options else []
    start = time.time()
    summary = {'task': args.task, 'config': config, 'work_dir': str(work_dir), 'seed': seed, 'amp': amp}
    if args.seed is not None:
        print(f'seed {seed} (--seed)', flush=True)
    elif seed is not None:
        print(f'seed {seed} (fixed in the config, so the demo repeats; --seed N for another run)', flush=True)
    else:
        print('seed: drawn at random by mmengine (the config fixes none; --seed N to repeat a run)', flush=True)

    if demo['baseline'] if args.baseline is None else args.baseline:
        print('== evaluating the untrained model (baseline) ==', flush=True)
        save_untrained(untrained, work_dir / 'untrained.pth')
        out = run([py, 'tools/test.py', config, work_dir / 'untrained.pth', '--work-dir', work_dir / 'baseline',
                   *opts], work_dir / 'baseline.log')
        summary['untrained'] = {k: v for k, v in parse_metrics(out).items() if k in demo['metrics']}

    print('== training ==', flush=True)
    t0 = time.time()
    run([py, 'tools/train.py', config, '--work-dir', work_dir, *(['--amp'] if amp else []), *train_opts],
        work_dir / 'train.log')
    summary['train_seconds'] = round(time.time() - t0, 1)
    ckpt = (work_dir / 'last_checkpoint').read_text().strip()

    print('== evaluating the trained model and drawing its predictions ==', flush=True)
    vis_dir = work_dir / 'predictions'
    out = run([py, 'tools/test.py', config, ckpt, '--work-dir', work_dir / 'eval', '--show-dir', vis_dir, *opts],
              work_dir / 'test.log')
    summary['trained'] = {k: v for k, v in parse_metrics(out).items() if k in demo['metrics']}
    summary['checkpoint'] = ckpt
    summary['pictures'] = str(vis_dir)
    summary['num_pictures'] = len(list(vis_dir.rglob('*.png')))
    curve = loss_curve(work_dir, work_dir / 'loss_curve.png')
    if curve:
        summary['loss_first_10pct'], summary['loss_last_10pct'] = (round(v, 4) for v in curve)
        summary['loss_curve'] = str(work_dir / 'loss_curve.png')
    summary['total_seconds'] = round(time.time() - start, 1)
    (work_dir / 'demo_summary.json').write_text(json.dumps(summary, indent=2))

    print('\n== demo summary ==')
    for key in ('untrained', 'trained'):
        if key in summary:
            print(f'{key:>9}: ' + ', '.join(f'{k}={v:.3f}' for k, v in summary[key].items()))
    if curve:
        print(f'     loss: {curve[0]:.3f} (first 10% of logged iterations) -> {curve[1]:.3f} (last 10%)')
    print(f' pictures: {summary["num_pictures"]} PNGs in {vis_dir}')
    print(f'     time: {summary["train_seconds"]:.0f} s training, {summary["total_seconds"]:.0f} s in all')
    print(f'  summary: {work_dir / "demo_summary.json"}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except StepFailed as failed:
        if failed.code != 2:  # (exit code 2: the step's own one-line error was shown)
            print(f'error: {failed}', file=sys.stderr)
        sys.exit(failed.code)
