"""Fitting a config's parameter schedule to the length of the run (``tools/train.py --epochs N / --iters N``).

The published recipes are written for COCO and ADE20K: Mask R-CNN 12 epochs
with a 500-iteration warm-up and steps at epochs 8 and 11, UperNet 160k
iterations with a 1500-iteration warm-up. On a small data set the warm-up can
be longer than the whole run, and changing ``train_cfg.max_epochs`` alone
leaves the steps where they were. Here:

- :func:`rescale_schedule` (``--epochs N`` / ``--iters N``) sets the run's
  length and scales every scheduler in the loop's unit to it (begin, end,
  milestones, ``T_max``; in an iteration-based run also the warm-up and the
  validation and checkpoint intervals);
- :func:`schedule_errors` finds what mmengine would stop on with a raw
  ``ValueError`` (a scheduler whose end is not after its begin), for one
  ``error:`` line before anything is built;
- :func:`fit_to_run`, once the train dataloader exists (its length is the
  iterations per epoch): shortens a warm-up counted in iterations to at most
  :data:`WARMUP_SHARE` of the run when the length was set by option, warns in
  one line for each scheduler that does not fit the run, and makes the
  logger print at least once per epoch and about ten times per run.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

#: mmengine's "no end" for a scheduler (``mmengine.optim.scheduler.param_scheduler.INF``).
INF = int(1e9)
#: How the units read in messages.
_ONE = {'epochs': 'epoch', 'iters': 'iteration'}
_MANY = {'epochs': 'epochs', 'iters': 'iterations'}
#: Largest share of a run's iterations that a warm-up counted in iterations keeps after ``--epochs``/``--iters``.
WARMUP_SHARE = 0.1


def _schedulers(cfg: Any) -> List[Dict[str, Any]]:
    sched = cfg.get('param_scheduler')
    if sched is None:
        return []
    return [sched] if isinstance(sched, dict) else [s for s in sched if isinstance(s, dict)]


def _type_name(sched: Dict[str, Any]) -> str:
    kind = sched.get('type', '?')
    return kind.__name__ if isinstance(kind, type) else str(kind).rpartition('.')[2]


def run_unit(cfg: Any) -> Tuple[Optional[str], Optional[int]]:
    """``('epochs', max_epochs)`` or ``('iters', max_iters)`` of the config's training loop (``(None, None)``)."""
    train_cfg = cfg.get('train_cfg') or {}
    if train_cfg.get('max_epochs') is not None:
        return 'epochs', train_cfg['max_epochs']
    if train_cfg.get('max_iters') is not None:
        return 'iters', train_cfg['max_iters']
    return None, None


def sched_unit(sched: Dict[str, Any], loop_unit: Optional[str]) -> Optional[str]:
    """The unit of a scheduler's ``begin``/``end``/milestones: 'epochs', 'iters' or None (unknown)."""
    by_epoch = sched.get('by_epoch', True)  # mmengine's default
    if loop_unit == 'epochs':
        return 'epochs' if by_epoch else 'iters'
    if loop_unit == 'iters':
        return 'iters' if not by_epoch else None
    return None


def _describe(i: int, sched: Dict[str, Any]) -> str:
    return f'param_scheduler[{i}] ({_type_name(sched)})'


def schedule_errors(cfg: Any) -> List[str]:
    """What mmengine would refuse with a ``ValueError`` when it builds the schedulers (one message each)."""
    unit, length = run_unit(cfg)
    problems = []
    for i, sched in enumerate(_schedulers(cfg)):
        begin, end = sched.get('begin', 0), sched.get('end', INF)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (begin, end)):
            problems.append(f'{_describe(i, sched)}: begin and end must be numbers, got begin={begin!r}, end={end!r}')
            continue
        if end <= begin:
            where = sched_unit(sched, unit)
            run = f'; the run has {length} {_MANY[unit]} (train_cfg.max_{unit})' if where == unit and length else ''
            hint = ('--epochs N' if unit == 'epochs' else '--iters N') if unit else ''
            problems.append(f'{_describe(i, sched)}: end={end} is not after begin={begin}{run}'
                            + (f'; tools/train.py {hint} scales the whole schedule to a run of N {_MANY[unit]}'
                               if hint else ''))
    return problems


def _scaled(value: float, factor: float, least: int = 1) -> int:
    """``value * factor`` rounded; a positive value stays >= ``least`` (or its own value when that is smaller)."""
    return 0 if value <= 0 else max(min(least, int(value)), 1, int(round(value * factor)))


def rescale_schedule(cfg: Any, *, epochs: Optional[int] = None, iters: Optional[int] = None) -> List[str]:
    """Set the run's length to ``epochs`` (epoch-based loop) or ``iters`` (iteration-based) and scale the schedule.

    Schedulers counted in the loop's unit get ``begin``, ``end``,
    ``milestones`` and ``T_max`` scaled by ``new / old`` (an ``end`` at or
    past the old length becomes the new length); in an iteration-based run
    the validation interval and an iteration-based checkpoint interval are
    scaled too. A warm-up counted in iterations in an epoch-based run is left
    to :func:`fit_to_run` (the iterations per epoch are known only once the
    data is). Returns lines saying what changed.

    Raises:
        ValueError: The option does not fit the loop (``--epochs`` for an iteration-based config or the
            reverse), or the value is below 1.
    """
    unit, old = run_unit(cfg)
    new, option = (epochs, '--epochs') if epochs is not None else (iters, '--iters')
    if new is None:
        return []
    want = 'epochs' if epochs is not None else 'iters'
    if not isinstance(new, int) or new < 1:
        raise ValueError(f'{option} must be a whole number >= 1, got {new!r}')
    if unit != want:
        other = {'epochs': '--epochs (train_cfg.max_epochs)', 'iters': '--iters (train_cfg.max_iters)'}
        raise ValueError(f'{option}: the config trains by {_MANY.get(unit, "neither epochs nor iterations")}'
                         + (f'; use {other[unit]}' if unit else ''))
    factor = new / old
    cfg.train_cfg[f'max_{unit}'] = new
    changes = [f'train_cfg.max_{unit} {old} -> {new}']
    for i, sched in enumerate(_schedulers(cfg)):
        if sched_unit(sched, unit) != unit:
            continue
        before = {k: sched.get(k) for k in ('begin', 'end', 'milestones', 'T_max') if k in sched}
        begin, end = sched.get('begin', 0), sched.get('end', INF)
        # In iterations at least 2: a LinearLR warm-up reaches its full value only at its last step (end - 1).
        least = 2 if unit == 'iters' else 1
        if 'begin' in sched:
            sched['begin'] = _scaled(begin, factor, least)
        if 'end' in sched and end < INF:
            sched['end'] = new if end >= old else min(new, _scaled(end, factor, least))
            if sched['end'] <= sched.get('begin', 0):
                sched['end'] = sched.get('begin', 0) + least
        if isinstance(sched.get('milestones'), (list, tuple)):
            sched['milestones'] = sorted({_scaled(m, factor) for m in sched['milestones']})
        if isinstance(sched.get('T_max'), (int, float)):
            sched['T_max'] = _scaled(sched['T_max'], factor)
        after = {k: sched.get(k) for k in before}
        if after != before:
            changes.append(f'{_describe(i, sched)} ' + ', '.join(f'{k} {before[k]} -> {after[k]}' for k in before
                                                                  if before[k] != after[k]))
    if unit == 'iters':
        train_cfg = cfg.train_cfg
        if isinstance(train_cfg.get('val_interval'), int) and train_cfg['val_interval'] > 0:
            value = min(new, _scaled(train_cfg['val_interval'], factor))
            changes.append(f'train_cfg.val_interval {train_cfg["val_interval"]} -> {value}')
            train_cfg['val_interval'] = value
        ckpt = (cfg.get('default_hooks') or {}).get('checkpoint')
        if isinstance(ckpt, dict) and ckpt.get('by_epoch', True) is False and isinstance(ckpt.get('interval'), int) \
                and ckpt['interval'] > 0:
            value = min(new, _scaled(ckpt['interval'], factor))
            changes.append(f'default_hooks.checkpoint.interval {ckpt["interval"]} -> {value}')
            ckpt['interval'] = value
    return [f'{option} {new}: ' + '; '.join(changes)]


def fit_to_run(cfg_schedulers: Any, *, loop_unit: Optional[str], length: int, iters_per_epoch: int,
               shorten_warmup: bool, logger_hooks: Tuple[Any, ...] = ()) -> List[str]:
    """Check (and, with ``shorten_warmup``, fit) the schedulers against the run; set the logger interval.

    Args:
        cfg_schedulers: The scheduler configs (a list of dicts, or one dict) the runner will build; changed
            in place.
        loop_unit: 'epochs' or 'iters' (:func:`run_unit`).
        length: ``max_epochs`` or ``max_iters``.
        iters_per_epoch: Length of the train dataloader.
        shorten_warmup: A scheduler counted in iterations in an epoch-based run that ends after
            :data:`WARMUP_SHARE` of the run's iterations ends there (the length was set by ``--epochs``).
        logger_hooks: mmengine ``LoggerHook`` objects: their interval becomes at most the iterations per
            epoch and a tenth of the run.

    Returns:
        One line per change or problem (the caller logs them; problems start with ``warning:``).
    """
    lines: List[str] = []
    scheds = [cfg_schedulers] if isinstance(cfg_schedulers, dict) else [
        s for s in (cfg_schedulers or []) if isinstance(s, dict)]
    total = length * iters_per_epoch if loop_unit == 'epochs' else length
    run_text = (f'{length} epochs of {iters_per_epoch} iterations' if loop_unit == 'epochs'
                else f'{length} iterations')
    hint = f'tools/train.py --{"epochs" if loop_unit == "epochs" else "iters"} {length} fits the schedule to it'
    for i, sched in enumerate(scheds):
        unit = sched_unit(sched, loop_unit)
        if unit is None:
            continue
        begin, end = sched.get('begin', 0), sched.get('end', INF)
        run_len = length if unit == loop_unit else total
        if unit == 'iters' and loop_unit == 'epochs' and shorten_warmup and end < INF and begin == 0:
            cap = max(2, int(math.ceil(total * WARMUP_SHARE)))  # a LinearLR reaches its value at step end - 1
            if end > cap:
                sched['end'] = cap
                lines.append(f'{_describe(i, sched)}: warm-up shortened from {end} to {cap} iterations '
                             f'({WARMUP_SHARE:.0%} of the run: {run_text})')
                continue
        if begin >= run_len:
            lines.append(f'warning: {_describe(i, sched)} starts at {_ONE[unit]} {begin}, but the run has {run_text}: '
                         f'it never takes effect; {hint}')
        elif INF > end > run_len:
            what = ('the learning rate never reaches its set value' if begin == 0 and unit == 'iters'
                    and loop_unit == 'epochs' else 'it is cut off')
            extra = ''
            if isinstance(sched.get('milestones'), (list, tuple)):
                missed = [m for m in sched['milestones'] if m >= run_len]
                extra = f' (milestones {missed} never reached)' if missed else ''
            lines.append(f'warning: {_describe(i, sched)} ends at {_ONE[unit]} {end}, but the run has {run_text}: '
                         f'{what}{extra}; {hint}')
    for hook in logger_hooks:
        interval = getattr(hook, 'interval', None)
        if not isinstance(interval, int):
            continue
        enough = max(1, min(interval, iters_per_epoch, int(math.ceil(total / 10))))
        if enough < interval:
            hook.interval = enough
            lines.append(f'logging every {enough} iterations instead of {interval} (the run has {run_text})')
    return lines


__all__ = ['rescale_schedule', 'schedule_errors', 'fit_to_run', 'run_unit', 'sched_unit', 'WARMUP_SHARE', 'INF']
