"""Shared fixtures: where the golden data lives and small model builders."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get('MLLA_MM_SHARED')
    candidates = [Path(env)] if env else []
    candidates += [ROOT.parent / 'shared', ROOT / 'shared']
    for c in candidates:
        if (c / 'golden' / 'golden_small.pt').is_file():
            return c
    raise FileNotFoundError(
        'golden data not found: expected shared/golden/golden_small.pt beside the repository '
        f'({ROOT.parent / "shared"}) or MLLA_MM_SHARED=/path/to/shared')


@pytest.fixture(scope='session')
def golden_dir() -> Path:
    return _shared_dir() / 'golden'


@pytest.fixture(scope='session')
def golden(golden_dir):
    return torch.load(golden_dir / 'golden_small.pt', weights_only=True)


@pytest.fixture(scope='session')
def golden_arch(golden):
    a = golden['arch']
    return dict(embed_dims=a['embed_dim'], depths=list(a['depths']), num_heads=list(a['num_heads']))


#: Torch threads per test process: 2 (the machine's cores), 1 under pytest-xdist (``make test`` runs two
#: workers; subprocess tools get OMP_NUM_THREADS=1 from tests.helpers.tool_env). More threads than cores
#: makes OpenMP's spin-waiting threads stall each other.
TEST_THREADS = 1 if os.environ.get('PYTEST_XDIST_WORKER') else 2


@pytest.fixture(autouse=True)
def _test_threads():
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield


def _drop_dead_log_handlers() -> None:
    """Remove mmengine logger handlers whose stream has been closed.

    Tools run in-process under ``capsys`` leave mmengine's (global) loggers
    with handlers on that test's capture stream; once it is closed, a later
    test's log line would print a logging error instead.
    """
    import sys
    if 'mmengine.logging' not in sys.modules:
        return
    from mmengine.logging import MMLogger
    for logger in list(MMLogger._instance_dict.values()):
        for handler in list(logger.handlers):
            if getattr(getattr(handler, 'stream', None), 'closed', False):
                logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    _drop_dead_log_handlers()
    yield
    _drop_dead_log_handlers()


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """The tiny synthetic COCO data set, made once per session."""
    from mlla_mm.datasets import make_coco_shapes
    root = tmp_path_factory.mktemp('data') / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=4, num_val=2, size=64)
    return root
