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


@pytest.fixture
def one_thread():
    """Tiny models: one thread (with several, thread hand-offs dominate, badly so on a busy machine). Use with
    ``pytestmark = pytest.mark.usefixtures('one_thread')``: it runs after ``_test_threads``."""
    torch.set_num_threads(1)
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


@pytest.fixture(scope='module')
def det_model(tmp_path_factory):
    """(config, checkpoint, image folder): the tiny detection config of ``tests.helpers.write_tiny_config`` on
    2 + 3 synthetic 64x64 images, a checkpoint of its random weights with 3 class names, and the folder of the 3
    validation images; made once per test module."""
    from mlla_mm.datasets import make_coco_shapes
    from tests.helpers import save_random_checkpoint, write_tiny_config
    tmp = tmp_path_factory.mktemp('det_model')
    data = make_coco_shapes(str(tmp / 'shapes'), seed=0, num_train=2, num_val=3, size=64)
    cfg = write_tiny_config(tmp, data)
    ckpt = save_random_checkpoint(cfg, tmp / 'det.pth', classes=['disc', 'wedge', 'slab'])
    return cfg, ckpt, data / 'val'


@pytest.fixture(scope='module')
def cfg_path(tmp_path_factory, tiny_data):
    """The tiny detection config of ``tests.helpers.write_tiny_config`` (1 epoch) on ``tiny_data``, per module."""
    from tests.helpers import write_tiny_config
    return write_tiny_config(tmp_path_factory.mktemp('cfg'), tiny_data, epochs=1)
