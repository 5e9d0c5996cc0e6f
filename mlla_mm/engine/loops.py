"""mmengine's training loops with an exact resume from any iteration.

:func:`make_exact` turns the ``EpochBasedTrainLoop`` or ``IterBasedTrainLoop``
that mmengine's Runner (or SafeRunner) built from the config into its
counterpart here; :class:`~mlla_mm.engine.hooks.RandomStateHook` does it in
``before_run``, so every Runner that runs the config's hooks gets it (the
config's loop settings are unchanged). Both fast-forward the data of a resumed run
without touching the random state, so that the restored state
(:class:`~mlla_mm.engine.hooks.RandomStateHook`) is the one the next batch is
drawn with, as in an uninterrupted run:

- :class:`ExactEpochBasedTrainLoop` also resumes in the middle of an epoch
  (a checkpoint written on SIGTERM, or an iteration-interval checkpoint):
  it skips the batches of that epoch that were already trained, where
  mmengine's loop would start the epoch again.
- :class:`ExactIterBasedTrainLoop`: mmengine's loop already skips the trained
  batches; with ``num_workers=0`` that skip consumed the random state.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from mmengine.logging import print_log
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from .rng import preserved_random_state

#: message-hub key (saved in checkpoints): ``[epoch, batches of that epoch done]``.
POSITION_KEY = 'mlla_mm.train_position'


def batches_done_in_epoch(loop: Any, message_hub: Any) -> int:
    """How many batches of the current epoch an epoch-based loop has already trained.

    0 at an epoch boundary. Read from what :class:`ExactEpochBasedTrainLoop`
    records; for other loops, derived from the iteration count.
    """
    info = message_hub.get_info(POSITION_KEY)
    if isinstance(info, (list, tuple)) and len(info) == 2:
        return int(info[1]) if int(info[0]) == loop.epoch else 0
    return max(0, loop.iter - loop.epoch * len(loop.dataloader))


def validation_due(loop: Any) -> bool:
    """Whether the loop validates right after the position it is at (the loop's own rule)."""
    runner = loop.runner
    if runner.val_loop is None:
        return False
    loop._decide_current_val_interval()
    if isinstance(loop, EpochBasedTrainLoop):
        if batches_done_in_epoch(loop, runner.message_hub):
            return False
        step, last = loop.epoch, loop.max_epochs
    elif isinstance(loop, IterBasedTrainLoop):
        step, last = loop.iter, loop.max_iters
    else:
        return False
    return step > 0 and step >= loop.val_begin and (step % loop.val_interval == 0 or step == last)


@LOOPS.register_module()
class ExactEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that resumes exactly, also from the middle of an epoch."""

    _skip = 0

    def run(self) -> Any:
        self._skip = self._resume_skip()
        return super().run()

    def _resume_skip(self) -> int:
        done = batches_done_in_epoch(self, self.runner.message_hub)
        if not done:
            return 0
        expected = self._iter - self._epoch * len(self.dataloader)
        if done != expected or done > len(self.dataloader):
            self.runner.logger.warning(
                f'The checkpoint was written after batch {done} of epoch {self._epoch + 1}, but its iteration '
                f'count ({self._iter}) does not fit {len(self.dataloader)} batches per epoch (another batch '
                'size, data set or number of processes?): epoch starts again from its first batch.')
            return 0
        return done

    def run_epoch(self) -> None:
        skip, self._skip = self._skip, 0
        if not skip:
            return super().run_epoch()
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        with preserved_random_state():  # the restored state is the one batch `skip` is drawn with
            batches = iter(self.dataloader)
            for _ in range(skip):
                next(batches)
        print_log(f'Resumed in epoch {self._epoch + 1}: skipped its first {skip} batches, already trained.',
                  logger='current')
        for idx, data_batch in enumerate(batches, start=skip):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    def run_iter(self, idx: int, data_batch: Sequence[dict]) -> None:
        # Recorded before the iteration so that a checkpoint taken after it carries it.
        self.runner.message_hub.update_info(POSITION_KEY, [self._epoch, idx + 1])
        super().run_iter(idx, data_batch)


class _FastForward:
    """Wraps a data iterator: the first ``count`` batches are drawn without changing the random state."""

    def __init__(self, iterator: Iterator, count: int) -> None:
        self.iterator = iterator
        self.count = count

    def __iter__(self) -> '_FastForward':
        return self

    def __next__(self) -> Any:
        if self.count <= 0:
            return next(self.iterator)
        self.count -= 1
        with preserved_random_state():
            return next(self.iterator)


@LOOPS.register_module()
class ExactIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` whose resume skip leaves the restored random state alone."""

    def run(self) -> Optional[Any]:
        if self._iter > 0:
            self.dataloader_iterator = _FastForward(self.dataloader_iterator, self._iter)
        return super().run()


#: mmengine loop -> its exact counterpart (what :func:`make_exact` turns it into).
EXACT_LOOPS = {EpochBasedTrainLoop: ExactEpochBasedTrainLoop, IterBasedTrainLoop: ExactIterBasedTrainLoop}


def make_exact(loop: Any) -> bool:
    """Turn a built mmengine ``EpochBasedTrainLoop`` / ``IterBasedTrainLoop`` into its exact counterpart.

    ``Runner.train`` builds the loop from the config before any hook runs,
    and a config of ours cannot name these loops (``train_cfg`` is set by
    mmdet's and mmseg's bases; a second base setting it is an error). The
    exact loops only override methods and keep no state of their own, so the
    built loop (dataloader, counters) stays as it is and only its class
    changes. Another loop class (a subclass of mmengine's, or a custom one)
    is left alone.

    Returns:
        Whether the loop now resumes exactly.
    """
    if isinstance(loop, tuple(EXACT_LOOPS.values())):
        return True
    exact = EXACT_LOOPS.get(type(loop))
    if exact is None:
        return False
    # The one class swap of the package: no public hook point lets a hook choose the train loop's class, and a
    # Runner builds it from train_cfg (mmdet's and mmseg's bases) before any hook runs.
    loop.__class__ = exact
    return True

__all__ = ['ExactEpochBasedTrainLoop', 'ExactIterBasedTrainLoop', 'EXACT_LOOPS', 'POSITION_KEY', 'make_exact',
           'batches_done_in_epoch', 'validation_due']
