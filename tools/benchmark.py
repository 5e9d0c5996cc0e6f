"""Backbone latency, throughput and memory of MLLA against mmdet's Swin-T and ResNet-50.

Example (the full run of docs/benchmarks.md)::

    python tools/benchmark.py --threads 2 --repeats 5 --json work_dirs/bench.json \\
        --plot work_dirs/bench.png

Everything runs in one process with ``torch.set_num_threads(--threads)``,
fp32, batch 1, ``torch.no_grad()``, backbones only. For each input size all
models run once to warm up, then ``--repeats`` rounds run every model once
each, interleaved, so load from elsewhere on the machine hits all models
alike; the table shows median, min and max. A large fp32 matmul runs in the
same rounds as the reference for FLOP/s. Then, unless switched off:

* train: one Mask R-CNN train iteration (2 images of 512x512, forward,
  backward, AdamW step) with MLLA-T and with Swin-T, interleaved
  (``--train-repeats`` rounds, alternating which model goes first; the
  ratio is the median of the per-round ratios). Both detectors get the same
  head weights and proposals, so they differ only in backbone and FPN
  lateral convolutions (see ``train_iteration_times``);
* memory: peak resident memory of an MLLA-T backbone forward + backward at
  800x1280, batch 2, with and without ``with_cp``; and, per model and size,
  the peak memory of one more inference call run alone (``--no-memory``
  skips both).

Peak memory is the rise of the process's peak RSS (``VmHWM``) over its RSS
before the call: freed heap memory is first handed back to the OS
(``malloc_trim``) and the peak is reset (``/proc/self/clear_refs``), so
every page the call touches counts. Linux only (else reported as missing).

glibc malloc is tuned as the tools tune it (``--malloc default`` leaves it
alone; every model runs under the same setting): large tensors come from
the heap and are reused instead of being page-faulted in anew from fresh
``mmap`` blocks (``mlla_mm/utils/malloc.py``).

``--models mlla_t_compile`` adds ``torch.compile`` of MLLA-T (compiled in
the warm-up call of each size).

The targets of the project are printed with PASS/FAIL at the end (not with
``--quick``: toy sizes say nothing about them; the ratios are printed
alone). The run starts by printing an estimate of how long it will take
(from one MLLA-T call on the machine and the work asked for).

``--against-rev REV`` runs only a comparison of today's MLLA-T with the one
of git revision REV (e.g. before a refactor) in the same process: see
``compare_with_revision``.
``--quick`` (for tests) uses tiny sizes, one repeat, and small train/memory
checks.

Bad arguments (a size that is not ``HxW`` with positive integers, a thread or
repeat count below 1, a ``--json`` / ``--plot`` path that cannot be written)
are one ``error:`` line on stderr and exit code 2, before anything is
measured. The JSON file and the plot are written whole or not at all.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mlla_mm.datasets.synthetic import random_detection_batch
from mlla_mm.deploy.benchmark import paired_ratio, round_ratios, round_spread
from mlla_mm.utils.flops import backbone_flops
from mlla_mm.utils.io import atomic_write
from mlla_mm.utils.malloc import tune_cpu_malloc

ALL_MODELS = ['mlla_t', 'mlla_s', 'mlla_b', 'swin_t', 'r50', 'mlla_t_ref']
OPTIONAL_MODELS = ['mlla_t_compile']  # torch.compile of MLLA-T (inductor); only when asked for
TARGETS = dict(swin_ratio=0.80, scaling=4.4, flops_frac=0.70, train_ratio=0.85, detector_ratio=0.85,
               cp_mem_ratio=0.60)


# --------------------------------------------------------------------------
# Models.
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


# --------------------------------------------------------------------------
# Timing and memory.
# --------------------------------------------------------------------------
def summarize(times: List[float]) -> Dict[str, float]:
    return dict(median=statistics.median(times), min=min(times), max=max(times), n=len(times))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Warm each function up, then time ``repeats`` rounds of all of them in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        # Alternate the order each round, so neither model always runs right after the other.
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(timed(fns[k]))
    return times


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(fn: Callable[[], object]) -> Optional[float]:
    """Rise of peak RSS during ``fn()`` in MiB (see the module docstring), or None."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return None
    before = _proc_status_kib('VmRSS')
    fn()
    peak = _proc_status_kib('VmHWM')
    if before is None or peak is None:
        return None
    return (peak - before) / 1024.


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    swin_path = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'swin',
                             'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    if kind == 'mlla_t':
        path = os.path.join(root, 'configs', 'detection', 'mask_rcnn_mlla_t.py')
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
    return interleaved(fns, repeats, warmup=1)


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
    from mmdet.structures import DetDataSample
    h, w = size
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.)))
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    batch = dict(inputs=[image], data_samples=[sample])

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
        times = interleaved({kind: (lambda m=model: infer(m)) for kind, model in models.items()}, repeats)
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


# --------------------------------------------------------------------------
# --against-rev: today's MLLA-T against the one of another git revision.
# --------------------------------------------------------------------------
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RevisionError(Exception):
    """git is missing, or the revision (or its model code) cannot be read."""


def _git(*args: str) -> str:
    if shutil.which('git') is None:
        raise RevisionError('--against-rev needs git, which is not on PATH')
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
        raise RevisionError(f'--against-rev: no commit {rev!r} in the git repository {REPO_ROOT}') from None
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
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # e.g. timm's "overwriting model in registry" of a newer revision
        backbone = 'backbone' if 'mlla_mm/models/backbone.py' in files else 'mlla'  # (the file MLLA is in)
        module = importlib.import_module(f'{pkg}.models.{backbone}')
    return module.MLLA, sha


def cpu_model_name() -> str:
    """The CPU's model name (as ``lscpu`` shows it)."""
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown CPU'


def compare_with_revision(rev: str, repeats: int, train_size: int = 512,
                          sizes: Sequence[Tuple[int, int]] = ((512, 512), (800, 1280))) -> dict:
    """Time today's MLLA-T and the one of git revision ``rev`` with the same weights, interleaved.

    Inference (eval, ``no_grad``, batch 1) at each of ``sizes`` and a train
    step (train mode, forward + backward of batch 2 at ``train_size``,
    seeded identically before each call so drop path drops the same blocks).
    Every round runs both models back to back (alternating which goes first);
    a ratio is the median over rounds of new time / old time in the round.
    """
    from mlla_mm.models import MLLA
    with tempfile.TemporaryDirectory(prefix='mlla_rev_') as folder:
        return _compare(MLLA, *load_mlla_at_revision(rev, folder), rev, repeats, train_size, sizes)


def _compare(new_cls: type, old_cls: type, sha: str, rev: str, repeats: int, train_size: int,
             sizes: Sequence[Tuple[int, int]]) -> dict:
    head = _git('rev-parse', 'HEAD').strip()
    torch.manual_seed(0)
    new = new_cls('tiny')
    old = old_cls('tiny')
    old.load_state_dict(new.state_dict())
    out: dict = dict(rev=rev, rev_commit=sha, head_commit=head, cpu=cpu_model_name(),
                     threads=torch.get_num_threads(), repeats=repeats, ratios={}, times={})
    print(f'# new: working tree at {head[:10]}; old: {rev} = {sha[:10]}; CPU: {out["cpu"]}; '
          f'{out["threads"]} threads; {repeats} interleaved rounds', flush=True)
    new.eval(), old.eval()
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            diff = max(float((a - b).abs().max()) for a, b in zip(new(x), old(x)))
            times = interleaved(dict(new=lambda: new(x), old=lambda: old(x)), repeats)
            key = f'inference {h}x{w}'
            out['ratios'][key] = paired_ratio(times, 'new', 'old')
            out['times'][key] = dict(new=summarize(times['new']), old=summarize(times['old']), max_abs_diff=diff)
            print(f'# {key} done', flush=True)
    new.train(), old.train()
    x = torch.randn(2, 3, train_size, train_size)

    def step(model: torch.nn.Module) -> None:
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        sum(o.mean() for o in model(x)).backward()

    times = interleaved(dict(new=lambda: step(new), old=lambda: step(old)), repeats)
    key = f'train fwd+bwd 2x{train_size}x{train_size}'
    out['ratios'][key] = paired_ratio(times, 'new', 'old')
    out['times'][key] = dict(new=summarize(times['new']), old=summarize(times['old']))
    print(f"\nMLLA-T, working tree / {rev} ({sha[:10]}), {out['cpu']}, {out['threads']} threads")
    print(f"{'':<34}{'new s':>8}{'old s':>8}{'new/old':>9}  (median of per-round ratios)")
    for key, ratio in out['ratios'].items():
        t = out['times'][key]
        extra = f"  max |new-old| {t['max_abs_diff']:.1e}" if 'max_abs_diff' in t else ''
        print(f"{key:<34}{t['new']['median']:8.3f}{t['old']['median']:8.3f}{ratio:9.3f}{extra}")
    return out


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------
def parse_size(s: str) -> Tuple[int, int]:
    """``'800x1280'`` -> ``(800, 1280)``; raises ``argparse.ArgumentTypeError`` unless HxW with positive integers."""
    from mlla_mm.engine.launch import image_size
    return image_size(s)


def size_arg(text: str) -> str:
    """argparse type: ``HxW`` with positive integers, kept as the text ``'HxW'`` (the key in the results)."""
    h, w = parse_size(text)
    return f'{h}x{w}'


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
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in results['latency'].items():
        pts = sorted((r['pixels'], r['median']) for r in rows.values())
        if not pts:
            continue
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
        with atomic_write(path, 'wb') as f:  # whole or not at all
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
    if not args.no_train:
        total += 2 * (args.train_repeats + 1) * 18 * args.train_size ** 2 * seconds_per_pixel
    if args.detector:
        dh, dw = parse_size(args.detector_size)
        total += 2 * (args.train_repeats + 1) * 3 * dh * dw * seconds_per_pixel
    if not args.no_memory:
        mh, mw = parse_size(args.memory_size)
        total += 12 * mh * mw * seconds_per_pixel
    return total


def verdict(value: Optional[float], limit: float, higher_is_better: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'SKIP'
    ok = value >= limit if higher_is_better else value <= limit
    return 'PASS' if ok else 'FAIL'


def parse_args(argv=None) -> argparse.Namespace:
    from mlla_mm.engine.launch import ToolArgumentParser, non_negative_int, positive_int
    p = ToolArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', nargs='+', type=size_arg,
                   help='HxW sizes (default 512x512 800x1280 1024x1024 2048x2048)')
    p.add_argument('--models', nargs='+', choices=ALL_MODELS + OPTIONAL_MODELS, metavar='MODEL',
                   help=f'models among {ALL_MODELS} (default all) and {OPTIONAL_MODELS}')
    p.add_argument('--threads', type=positive_int, default=2, help='torch threads (default 2)')
    p.add_argument('--repeats', type=positive_int, default=5, help='interleaved rounds (default 5)')
    p.add_argument('--ref-max-pixels', type=non_negative_int, default=1024 * 1024,
                   help='skip mlla_t_ref above this many pixels (it is slow)')
    p.add_argument('--json', help='write all numbers to this JSON file')
    p.add_argument('--plot', help='write a log-log latency plot (PNG) here')
    p.add_argument('--no-train', action='store_true', help='skip the Mask R-CNN train-iteration check')
    p.add_argument('--no-memory', action='store_true',
                   help='skip the with_cp memory check and the per-size inference peak memory')
    p.add_argument('--train-size', type=positive_int, default=512,
                   help='square image size of the train check and of --against-rev\'s train step')
    p.add_argument('--train-repeats', type=int,
                   help='interleaved rounds of the train and detector checks (default 5; 1 with --quick)')
    p.add_argument('--memory-size', type=size_arg, default='800x1280', help='HxW of the with_cp memory check')
    p.add_argument('--detector', action=argparse.BooleanOptionalAction, default=True,
                   help='whole Mask R-CNN inference, MLLA-T vs Swin-T with equal head work (--train-repeats rounds)')
    p.add_argument('--detector-size', type=size_arg, default='800x1333',
                   help='HxW of the whole-detector inference check')
    p.add_argument('--malloc', choices=['tuned', 'default'],
                   help="glibc malloc as the tools set it ('tuned', see mlla_mm/utils/malloc.py) "
                        "or left alone ('default'); applies to every model alike (default: "
                        "MLLA_MM_MALLOC, else tuned, as in the other tools)")
    p.add_argument('--quick', action='store_true', help='tiny sizes, one repeat (for tests)')
    p.add_argument('--against-rev', metavar='REV',
                   help='only compare MLLA-T of the working tree with that of git revision REV (same weights, '
                        'interleaved): inference at 512x512 and 800x1280 and a train step at --train-size '
                        '(--repeats rounds; --json writes the numbers)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mlla_mm.engine.launch import UsageError, one_line
    from mlla_mm.utils.io import AtomicWriteError
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, AtomicWriteError) as err:  # not run_main: it would tune malloc before --malloc applies
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check: the output paths can be written (before hours of measuring)."""
    from mlla_mm.engine.launch import UsageError, check_output
    if args.train_repeats is not None and args.train_repeats < 1:
        raise UsageError(f'--train-repeats must be at least 1, got {args.train_repeats}')
    check_output(args.json, '--json')
    check_output(args.plot, '--plot')


def run(args: argparse.Namespace) -> int:
    check_args(args)
    torch.set_num_threads(args.threads)
    try:
        malloc = tune_cpu_malloc(None if args.malloc is None else args.malloc == 'tuned')
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'# malloc: {malloc}, threads: {args.threads}', flush=True)
    if args.against_rev is not None:
        try:
            found = compare_with_revision(args.against_rev, args.repeats, args.train_size)
        except RevisionError as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        if args.json:
            write_json(args.json, dict(found, malloc=malloc, torch=torch.__version__))
        return 0
    if args.quick:
        args.sizes = args.sizes or ['64x64', '96x128']
        args.models = args.models or ['mlla_t', 'mlla_t_ref']
        args.repeats = 1
        args.memory_size = '64x96'
        args.train_size = 128
        args.detector_size = '96x128'
    if args.train_repeats is None:
        args.train_repeats = 1 if args.quick else 5
    sizes = [parse_size(s) for s in (args.sizes or ['512x512', '800x1280', '1024x1024', '2048x2048'])]
    names = args.models or list(ALL_MODELS)
    models: Dict[str, torch.nn.Module] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            models[name] = build_backbone(name, models)
            models[name].eval()  # mmdet's backbones' train() returns None: do not chain it
        except ImportError as e:
            skipped[name] = f'not available: {e}'
    for name, why in skipped.items():
        print(f'# skip {name}: {why}')

    if 'mlla_t' in models:  # MLLA-T at 224x224 here, then the work asked for: how long this will take
        with torch.no_grad():
            probe = torch.randn(1, 3, 224, 224)
            models['mlla_t'](probe)
            calls = []
            for _ in range(2):
                t0 = time.perf_counter()
                models['mlla_t'](probe)
                calls.append(time.perf_counter() - t0)
            per_pixel = min(calls) / (224 * 224)
        minutes = estimate_seconds(args, sizes, list(models), per_pixel) / 60
        print(f'# estimated run time: about {max(1, round(minutes)) if minutes >= 1 else "<1"} min '
              f'(from MLLA-T at 224x224 on this machine now; --quick for a short check, --no-train / --no-detector / '
              f'--no-memory / --sizes to do less)', flush=True)

    results: dict = dict(threads=args.threads, repeats=args.repeats, torch=torch.__version__, malloc=malloc,
                         date=time.strftime('%Y-%m-%d %H:%M:%S'), latency={n: {} for n in models},
                         matmul={}, slopes={}, targets={}, skipped=skipped)
    mm, mm_flops = matmul_fn()
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            fns = {n: (lambda m=m: m(x)) for n, m in models.items()
                   if not (n == 'mlla_t_ref' and h * w > args.ref_max_pixels)}
            fns['matmul'] = mm
            times = interleaved(fns, args.repeats)
            mm_times = times.pop('matmul')
            results['matmul'][f'{h}x{w}'] = dict(summarize(mm_times), gflops_per_s=mm_flops / statistics.median(
                mm_times) / 1e9)
            for n, ts in times.items():
                row = dict(summarize(ts), pixels=h * w, height=h, width=w)
                row['images_per_s'] = 1. / row['median']
                row['mpix_per_s'] = h * w / row['median'] / 1e6
                # One more call, alone: the peak memory of an inference at this size.
                row['peak_mib'] = None if args.no_memory else peak_memory_mib(fns[n])
                results['latency'][n][f'{h}x{w}'] = row
            print(f'# {h}x{w} done', flush=True)
            if args.json:  # partial results survive an interrupted long run
                write_json(args.json, results)
    for n, rows in results['latency'].items():
        results['slopes'][n] = slope([(r['pixels'], r['median']) for r in rows.values()])

    # Table.
    print(f"\nBackbone latency (s), {args.threads} threads, fp32, batch 1, {args.repeats} interleaved repeats")
    print(f"{'model':<15}{'size':>11}{'median':>9}{'min':>9}{'max':>9}{'img/s':>8}{'MPix/s':>8}{'peak MiB':>10}")
    for n, rows in results['latency'].items():
        for key, r in rows.items():
            peak = '-' if r['peak_mib'] is None else f"{r['peak_mib']:.0f}"
            print(f"{n:<15}{key:>11}{r['median']:9.3f}{r['min']:9.3f}{r['max']:9.3f}"
                  f"{r['images_per_s']:8.2f}{r['mpix_per_s']:8.2f}{peak:>10}")
    print('slopes of log latency vs log pixels: '
          + ', '.join(f'{n} {s:.2f}' for n, s in results['slopes'].items()))

    # Targets.
    lat = results['latency']
    t = results['targets']
    rounds = results.setdefault('round_ratios', {})  # per-round ratios of the paired measurements
    ref_key = '800x1280' if '800x1280' in lat.get('mlla_t', {}) else None
    if ref_key and 'swin_t' in lat and ref_key in lat['swin_t']:
        t['mlla_t_over_swin_t_800x1280'] = lat['mlla_t'][ref_key]['median'] / lat['swin_t'][ref_key]['median']
    if 'mlla_t' in lat and '1024x1024' in lat['mlla_t'] and '2048x2048' in lat['mlla_t']:
        t['mlla_t_2048_over_1024'] = lat['mlla_t']['2048x2048']['median'] / lat['mlla_t']['1024x1024']['median']
    # The same ratios from the fastest repeat: less sensitive to load from other processes.
    if ref_key and 'swin_t' in lat and ref_key in lat['swin_t']:
        t['min_based_mlla_t_over_swin_t_800x1280'] = lat['mlla_t'][ref_key]['min'] / lat['swin_t'][ref_key]['min']
    if 'mlla_t' in lat and '1024x1024' in lat['mlla_t'] and '2048x2048' in lat['mlla_t']:
        t['min_based_mlla_t_2048_over_1024'] = lat['mlla_t']['2048x2048']['min'] / lat['mlla_t']['1024x1024']['min']
    if 'mlla_t' in lat and lat['mlla_t']:
        key = ref_key or max(lat['mlla_t'], key=lambda k: lat['mlla_t'][k]['pixels'])
        h, w = lat['mlla_t'][key]['height'], lat['mlla_t'][key]['width']
        flops = backbone_flops(models['mlla_t'], h, w).flops
        gfs = flops / lat['mlla_t'][key]['median'] / 1e9
        t['mlla_t_flops_size'] = key
        t['mlla_t_gflops_per_s'] = gfs
        t['matmul_gflops_per_s'] = results['matmul'][key]['gflops_per_s']
        t['flops_fraction_of_matmul'] = gfs / results['matmul'][key]['gflops_per_s']
        t['min_based_flops_fraction_of_matmul'] = (flops / lat['mlla_t'][key]['min']) / (
            2. * 2048**3 / results['matmul'][key]['min'])
    if not args.no_train:
        try:
            tr = train_iteration_times(args.train_size, args.train_repeats)
            results['train'] = {k: summarize(v) for k, v in tr.items()}
            results['train']['size'] = args.train_size
            # Ratio within each round (both models ran back to back), then the median over rounds.
            t['train_mlla_t_over_swin_t'] = paired_ratio(tr, 'mlla_t', 'swin_t')
            rounds['train_mlla_t_over_swin_t'] = round_ratios(tr, 'mlla_t', 'swin_t')
            t['min_based_train_mlla_t_over_swin_t'] = results['train']['mlla_t']['min'] / results['train'][
                'swin_t']['min']
        except ImportError as e:
            print(f'# skip train check: {e}')
    if args.detector:
        try:
            dsize = parse_size(args.detector_size)
            parts: Dict[str, Dict[str, float]] = {}
            dt = detector_inference_times(dsize, args.train_repeats, parts=parts)
            results['detector_inference'] = {k: summarize(v) for k, v in dt.items()}
            results['detector_inference']['size'] = args.detector_size
            t['detector_inference_mlla_t_over_swin_t'] = paired_ratio(dt, 'mlla_t', 'swin_t')
            rounds['detector_inference_mlla_t_over_swin_t'] = round_ratios(dt, 'mlla_t', 'swin_t')
            results['detector_inference']['parts'] = parts
        except ImportError as e:
            print(f'# skip detector inference check: {e}')
    if not args.no_memory:
        mem = cp_memory(parse_size(args.memory_size))
        results['memory'] = dict(mem, size=args.memory_size, batch=2)
        if mem.get('no_cp') and mem.get('with_cp') is not None:
            t['with_cp_memory_ratio'] = mem['with_cp'] / mem['no_cp']

    # --quick runs toy sizes: its ratios say nothing about the project's targets, so no PASS/FAIL for them.
    print('\nRatios (--quick: toy sizes, not comparable with the targets, so no verdicts):' if args.quick
          else '\nTargets:')
    lines = [
        ('MLLA-T / Swin-T latency at 800x1280', t.get('mlla_t_over_swin_t_800x1280'), TARGETS['swin_ratio'], False),
        # The malloc mode is process-wide: run once with --malloc tuned and once with --malloc default.
        (f'MLLA-T t(2048^2) / t(1024^2), malloc {malloc}', t.get('mlla_t_2048_over_1024'),
         TARGETS['scaling'], False),
        ('MLLA-T FLOP/s / matmul FLOP/s', t.get('flops_fraction_of_matmul'), TARGETS['flops_frac'], True),
        ('Mask R-CNN train iter MLLA-T / Swin-T', t.get('train_mlla_t_over_swin_t'), TARGETS['train_ratio'], False,
         'train_mlla_t_over_swin_t'),
        ('Mask R-CNN inference MLLA-T / Swin-T', t.get('detector_inference_mlla_t_over_swin_t'),
         TARGETS['detector_ratio'], False, 'detector_inference_mlla_t_over_swin_t'),
        ('MLLA-T fwd+bwd peak memory with_cp / without', t.get('with_cp_memory_ratio'), TARGETS['cp_mem_ratio'],
         False),
    ]
    if not args.quick:
        t['verdicts'] = {}
    for label, value, limit, higher, *paired in lines:
        shown = f'{value:.3f}' if value is not None else '-'
        spread = rounds.get(paired[0], []) if paired else []
        if args.quick:
            extra = f'  (rounds {min(spread):.3f}-{max(spread):.3f})' if len(spread) > 1 else ''
            print(f"  {label:<48} {shown:>7}{extra}")
            continue
        v = verdict(value, limit, higher)
        t['verdicts'][label] = v
        # Paired ratios also say how their rounds spread around the goal (a median near it is noise).
        text = f'{v} ({round_spread(spread, limit, higher)})' if len(spread) > 1 else v
        print(f"  {label:<48} {shown:>7}  ({'>=' if higher else '<='} {limit})  {text}")
    mins = {k[len('min_based_'):]: v for k, v in t.items() if k.startswith('min_based_')}
    if mins:
        print('  (from the fastest repeat instead of the median: '
              + ', '.join(f'{k} {v:.3f}' for k, v in mins.items()) + ')')
    if 'mlla_t_gflops_per_s' in t:
        print(f"  (MLLA-T {t['mlla_t_gflops_per_s']:.1f} GFLOP/s at {t['mlla_t_flops_size']}, "
              f"matmul {t['matmul_gflops_per_s']:.1f} GFLOP/s)")
    if 'train' in results:
        print('  (train iteration s: ' + ', '.join(
            f"{k} {v['median']:.2f}" for k, v in results['train'].items() if isinstance(v, dict)) + ')')
    if 'detector_inference' in results:
        d = results['detector_inference']
        print(f"  (Mask R-CNN inference at {d['size']}, s: " + ', '.join(
            f"{k} {v['median']:.2f}" for k, v in d.items() if isinstance(v, dict) and 'median' in v) + ')')
        for kind, named in d.get('parts', {}).items():
            print(f'    {kind} parts (median s): ' + ', '.join(f'{n} {v:.2f}' for n, v in named.items()))
    if 'memory' in results:
        m = results['memory']
        print(f"  (peak MiB at {m['size']} batch 2: no_cp {m['no_cp']}, with_cp {m['with_cp']})")

    if args.json:
        write_json(args.json, results)
    if args.plot:
        make_plot(results, args.plot)
    return 0


if __name__ == '__main__':
    sys.exit(main())
