"""RandomStateHook turns the train loop that any Runner built into its exact-resume counterpart."""
from types import SimpleNamespace

import pytest
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from mlla_mm.engine import ExactEpochBasedTrainLoop, ExactIterBasedTrainLoop, RandomStateHook


def _runner(loop):
    logs = []
    return SimpleNamespace(_train_loop=loop, logger=SimpleNamespace(info=logs.append, warning=logs.append),
                           logs=logs)


@pytest.mark.parametrize('plain, exact', [(EpochBasedTrainLoop, ExactEpochBasedTrainLoop),
                                          (IterBasedTrainLoop, ExactIterBasedTrainLoop)])
def test_mmengines_loop_becomes_the_exact_one_and_keeps_its_state(plain, exact):
    loop = object.__new__(plain)
    loop.dataloader, loop._iter = object(), 7  # what Runner.train built: kept as it is
    runner = _runner(loop)
    RandomStateHook().before_run(runner)
    assert type(loop) is exact and runner._train_loop is loop
    assert loop._iter == 7 and loop.dataloader is not None
    RandomStateHook().before_run(runner)  # a second before_run (train() called again) changes nothing
    assert type(loop) is exact and not runner.logs


def test_other_loops_are_left_alone():
    class MyLoop(EpochBasedTrainLoop):  # a user's own loop: its run_epoch is not ours to replace
        pass

    loop = object.__new__(MyLoop)
    runner = _runner(loop)
    RandomStateHook().before_run(runner)
    assert type(loop) is MyLoop
    assert len(runner.logs) == 1 and 'MyLoop' in runner.logs[0]


def test_test_and_val_runs_are_left_alone():
    config = dict(type='EpochBasedTrainLoop', max_epochs=2)  # not built: Runner.test() / val()
    runner = _runner(config)
    RandomStateHook().before_run(runner)
    assert runner._train_loop == dict(type='EpochBasedTrainLoop', max_epochs=2) and not runner.logs
    RandomStateHook().before_run(_runner(None))
