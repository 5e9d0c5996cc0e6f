"""Latency of exported models under ONNX Runtime against PyTorch eager, measured in the same rounds.

Every function is warmed up, then each round calls all of them once, in an
order that reverses every round, so load from other processes hits them
alike. Ratios are the median over rounds of the per-round ratio. Used by
``tools/benchmark_onnx.py``.
"""
from __future__ import annotations

import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from ..utils.cpu import bf16_fast_on_this_cpu


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function over ``repeats`` interleaved rounds (after ``warmup`` rounds).

    Raises:
        ValueError: ``repeats`` < 1 (no times to take a median of) or ``warmup`` < 0; the tools'
            arguments are checked before (``positive_int``), this is the net.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f'interleaved_times needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}')
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    order = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def round_ratios(times: Dict[str, List[float]], num: str, den: str) -> List[float]:
    """``num``'s time over ``den``'s time in each round (rounds where both ran)."""
    return [a / b for a, b in zip(times[num], times[den])]


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time over ``den``'s time in the same round."""
    return statistics.median(round_ratios(times, num, den))


def round_spread(ratios: Sequence[float], limit: float, higher_is_better: bool = False) -> str:
    """``'rounds 0.866-0.951, 3 of 5 meet it: within the noise'``: the range of per-round ratios and their agreement."""
    meet = sum(1 for r in ratios if (r >= limit if higher_is_better else r <= limit))
    agreement = 'every round meets it' if meet == len(ratios) else 'no round meets it' if meet == 0 else \
        f'{meet} of {len(ratios)} rounds meet it: within the noise'
    return f'rounds {min(ratios):.3f}-{max(ratios):.3f}, {agreement}'


def goal_verdict(ratios: Sequence[float], limit: float, higher_is_better: bool = False) -> str:
    """PASS/FAIL of the median of per-round ratios against ``limit``, with how far the rounds agree.

    On a shared machine a median just inside or outside a goal says little, so with
    more than one round the verdict adds :func:`round_spread`, e.g.
    ``'PASS (rounds 0.866-0.951, 3 of 5 meet it: within the noise)'``. ``'SKIP'`` without rounds.
    """
    if not ratios:
        return 'SKIP'
    value = statistics.median(ratios)
    verdict = 'PASS' if (value >= limit if higher_is_better else value <= limit) else 'FAIL'
    return verdict if len(ratios) == 1 else f'{verdict} ({round_spread(ratios, limit, higher_is_better)})'


def relative_difference(got: Sequence[np.ndarray], ref: Sequence[torch.Tensor]) -> float:
    """Largest ``max |got - ref| / max |ref|`` over the outputs."""
    worst = 0.
    for g, r in zip(got, ref):
        r = r.float().numpy()
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def cpu_description() -> Dict[str, object]:
    """The CPU model name, its bf16-related instruction sets (lscpu, /proc/cpuinfo) and whether bf16 is native.

    ``native_bf16`` and ``bf16_note`` come from
    :func:`mlla_mm.utils.cpu.bf16_fast_on_this_cpu` (AMX or AVX512-BF16).
    """
    name = ''
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r'Model name:\s*(.+)', out)
        name = m.group(1).strip() if m else ''
    except (OSError, subprocess.SubprocessError):
        pass
    flags: List[str] = []
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = line.split(':', 1)[1].split()
                    break
    except OSError:
        pass
    wanted = [f for f in flags if f.startswith('amx') or f in ('avx512_bf16', 'avx512f', 'avx2', 'avx_vnni',
                                                                'avx512_vnni')]
    native, note = bf16_fast_on_this_cpu()
    return dict(model_name=name or 'unknown', bf16_flags=sorted(wanted), native_bf16=native, bf16_note=note)


__all__ = ['cpu_description', 'goal_verdict', 'interleaved_times', 'median', 'paired_ratio',
           'relative_difference', 'round_ratios', 'round_spread']
