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


def _arch_kwargs(arch: dict, timm_names: bool) -> dict:
    """A golden file's ``arch`` (``embed_dim`` or ``embed_dims``, ``depths``, ``num_heads``) as the keyword
    arguments of MLLA (``embed_dims``, lists) or of timm's ``mlla_*`` models (``embed_dim``, tuples)."""
    dims = arch['embed_dims'] if 'embed_dims' in arch else arch['embed_dim']
    if timm_names:
        return dict(embed_dim=dims, depths=tuple(arch['depths']), num_heads=tuple(arch['num_heads']))
    return dict(embed_dims=dims, depths=list(arch['depths']), num_heads=list(arch['num_heads']))


@pytest.fixture(scope='session')
def golden(golden_dir):
    """The published backbone's golden features (shared/golden/golden_small.pt)."""
    return torch.load(golden_dir / 'golden_small.pt', weights_only=True)


@pytest.fixture(scope='session')
def golden_arch(golden):
    return _arch_kwargs(golden['arch'], timm_names=False)


@pytest.fixture(scope='session')
def golden_cls(golden_dir):
    """The published classifier's golden logits (shared/golden/golden_cls_logits.pt)."""
    return torch.load(golden_dir / 'golden_cls_logits.pt', weights_only=True)


@pytest.fixture(scope='session')
def golden_cls_kwargs(golden_cls):
    """timm's keyword arguments for the published classifier of ``golden_cls``."""
    return dict(_arch_kwargs(golden_cls['arch'], timm_names=True), num_classes=golden_cls['num_classes'])


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


def pytest_collection_modifyitems(config, items):
    """Test files with slow tests (end-to-end runs of the tools) first, those with the most first; then the other
    files, those with the most tests first; each file's tests together and in their order.

    ``make test`` hands whole files to its two pytest-xdist workers in this order (``--dist loadfile
    --no-loadscope-reorder``), so the files handed out last are short and neither worker idles long at the end.
    (xdist's own order, files with the most tests first, put the few-test end-to-end files last.)
    """
    def file_of(item) -> str:
        return item.nodeid.split('::', 1)[0]

    slow, count, first = {}, {}, {}
    for index, item in enumerate(items):
        name = file_of(item)
        first.setdefault(name, index)
        count[name] = count.get(name, 0) + 1
        slow[name] = slow.get(name, 0) + (item.get_closest_marker('slow') is not None)
    items.sort(key=lambda item: (-slow[file_of(item)], -count[file_of(item)], first[file_of(item)]))
