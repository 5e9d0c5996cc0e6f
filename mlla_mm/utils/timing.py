"""Timing for benchmarks: interleaved rounds, paired ratios with their spread, peak memory, the run's header line.

Every function is warmed up, then each round calls all of them once, in an
order that reverses every round, so load from other processes hits them
alike. A ratio of two runs is the median over rounds of their per-round
ratio (both ran back to back), printed with the range of the rounds so that
a difference inside the noise shows as one. Used by ``tools/benchmark.py``
(every subcommand) and the maintainer scripts under ``dev/``.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .cpu import cpu_line

Times = Dict[str, List[float]]


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Times:
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
    times: Times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def median(times: Sequence[float]) -> float:
    """The median of ``times``."""
    return statistics.median(times)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """``dict(median, min, max, n)`` of ``times``."""
    return dict(median=statistics.median(times), min=min(times), max=max(times), n=len(times))


def round_ratios(times: Times, num: str, den: str) -> List[float]:
    """``num``'s time over ``den``'s time in each round (rounds where both ran)."""
    return [a / b for a, b in zip(times[num], times[den])]


def paired_ratio(times: Times, num: str, den: str) -> float:
    """Median over rounds of ``num``'s time over ``den``'s time in the same round."""
    return statistics.median(round_ratios(times, num, den))


def ratio_text(ratios: Sequence[float]) -> str:
    """``'0.876 (rounds 0.850-0.901)'``: the median of per-round ratios and their range (one round: the value)."""
    value = f'{statistics.median(ratios):.3f}'
    return value if len(ratios) < 2 else f'{value} (rounds {min(ratios):.3f}-{max(ratios):.3f})'


def relative_difference(got: Sequence[np.ndarray], ref: Sequence[torch.Tensor]) -> float:
    """Largest ``max |got - ref| / max |ref|`` over the outputs (``got`` numpy arrays or tensors)."""
    worst = 0.
    for g, r in zip(got, ref):
        g = g.float().numpy() if isinstance(g, torch.Tensor) else g
        r = r.float().numpy()
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


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
    """Rise of the process's peak RSS during ``fn()`` in MiB, or None where it cannot be measured (not Linux).

    Freed heap memory is first handed back to the OS (``malloc_trim``) and the
    peak is reset (``/proc/self/clear_refs``), so every page the call touches counts.
    """
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


def header_line(threads: int, malloc: str, **versions: str) -> str:
    """``'# CPU: ... (flags; bf16 native, VNNI yes, AMX no); 2 threads; malloc tuned; torch 2.x'``."""
    extra = ''.join(f', {k} {v}' for k, v in versions.items())
    return f'# {cpu_line()}; {threads} threads; malloc {malloc}; torch {torch.__version__}{extra}'


__all__ = ['header_line', 'interleaved_times', 'median', 'paired_ratio', 'peak_memory_mib', 'ratio_text',
           'relative_difference', 'round_ratios', 'summarize']
