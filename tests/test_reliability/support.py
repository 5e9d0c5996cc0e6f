"""Test-only hooks and a test-only checkpoint writer (never imported by mlla_mm).

A test config imports this module with
``custom_imports = dict(imports=['mlla_mm', 'tests.test_reliability.support'])``
(the tools run with ``PYTHONPATH`` at the repository root). What the pieces do
is chosen by environment variables, so a test can pause only one run of a
config:

- ``MLLA_MM_TEST_SAVE_PAUSE=FILENAME:SECONDS`` (with
  ``default_hooks.checkpoint.backend_args = dict(backend='test_pausing_local')``):
  half-write the temporary file of checkpoint FILENAME through
  ``mlla_mm.utils.io.atomic_write``, print a line, sleep, then finish it.
- ``MLLA_MM_TEST_PAUSE=val:N`` (with ``TestPauseHook`` in ``custom_hooks``):
  inside the validation after epoch N, print a line and wait (up to 120 s)
  until the PreemptionHook has received a signal (or the test kills the run).
- ``MLLA_MM_TEST_PAUSE=train:K``: the same before training iteration K
  (1-based), waiting up to 60 s.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from mmengine.fileio import register_backend

from mlla_mm.engine.hooks import PreemptionHook
from mlla_mm.engine.work_dir import AtomicLocalBackend
from mlla_mm.utils.io import atomic_write

SAVE_PAUSE_ENV = 'MLLA_MM_TEST_SAVE_PAUSE'
PAUSE_ENV = 'MLLA_MM_TEST_PAUSE'


class PausingAtomicBackend(AtomicLocalBackend):
    """The atomic checkpoint writer, pausing half-way through one file (``MLLA_MM_TEST_SAVE_PAUSE``)."""

    def put(self, obj: bytes, filepath: Any) -> None:
        name, _, seconds = os.environ.get(SAVE_PAUSE_ENV, '').rpartition(':')
        if not name or os.path.basename(str(filepath)) != name:
            return super().put(obj, filepath)
        with atomic_write(str(filepath), 'wb') as f:
            f.write(obj[:len(obj) // 2])
            f.flush()
            print(f'[{SAVE_PAUSE_ENV}] {f.name} half written; pausing {seconds} s', flush=True)
            time.sleep(float(seconds))
            f.write(obj[len(obj) // 2:])


register_backend('test_pausing_local', PausingAtomicBackend, force=True)


@HOOKS.register_module(force=True)
class InjectNaNHook(Hook):
    """Make the loss NaN from iteration ``at_iter`` (1-based) on, by filling a parameter with NaN."""

    priority = 'VERY_HIGH'

    def __init__(self, at_iter: int) -> None:
        self.at_iter = int(at_iter)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if runner.iter + 1 == self.at_iter:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            param = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float('nan'))


@HOOKS.register_module(force=True)
class TestPauseHook(Hook):
    """Pause in a validation or before an iteration (``MLLA_MM_TEST_PAUSE``), so a test can signal the run."""

    def _spec(self) -> tuple:
        where, _, n = os.environ.get(PAUSE_ENV, '').partition(':')
        return where, int(n) if n.isdigit() else -1

    @staticmethod
    def _wait(runner: Any, message: str, seconds: float) -> None:
        """Print ``message``, then wait ``seconds`` or until the PreemptionHook has received a signal."""
        preemption = next(h for h in runner.hooks if isinstance(h, PreemptionHook))
        print(f'[{PAUSE_ENV}] {message}', flush=True)
        end = time.time() + seconds
        while preemption.received is None and time.time() < end:
            time.sleep(0.05)

    def after_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        where, n = self._spec()
        if where == 'val' and runner.epoch == n:
            self._wait(runner, f'paused in the validation after epoch {n}', 120)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        where, n = self._spec()
        if where == 'train' and runner.iter + 1 == n:
            self._wait(runner, f'paused before iteration {n}', 60)
