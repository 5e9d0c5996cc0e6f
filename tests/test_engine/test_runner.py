"""SafeRunner's build-time settings, the atomic checkpoint backend, the runtime base and the loops' bookkeeping."""

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.model import BaseModel

from mlla_mm.engine.loops import POSITION_KEY, batches_done_in_epoch
from mlla_mm.engine.run_checks import amp_optim_wrapper_cfg
from mlla_mm.engine.distributed import cpu_ddp_wrapper_cfg, end_distributed, end_distributed_at_exit
from mlla_mm.engine.runner import REQUIRED_HOOKS, SafeRunner, with_required_hooks
from mlla_mm.engine.work_dir import AtomicLocalBackend
from mlla_mm.utils.io import AtomicWriteError

from tests.helpers import ROOT, fill_disk_on_fsync, free_port, loop_stub

CONFIGS = sorted(p for d in ('detection', 'segmentation') for p in (ROOT / 'configs' / d).glob('*.py'))


def _types(hooks):
    return [h['type'] for h in hooks]


def test_required_hooks_are_added_once():
    given = [dict(type='EMAHook'), dict(type='mlla_mm.RandomStateHook'), dict(type='FiniteLossHook')]
    hooks = with_required_hooks(given)
    assert hooks[:3] == given
    assert _types(hooks[3:]) == [h for h in REQUIRED_HOOKS if h not in ('RandomStateHook', 'FiniteLossHook')]
    assert with_required_hooks(hooks) == hooks
    assert _types(with_required_hooks(None)) == list(REQUIRED_HOOKS)


def test_the_runtime_base_states_the_run():
    cfg = Config.fromfile(str(ROOT / 'configs' / '_base_' / 'mlla_runtime.py'))
    assert cfg.runner_type == 'SafeRunner'
    assert _types(cfg.custom_hooks) == list(REQUIRED_HOOKS)
    assert cfg.custom_imports.imports == ['mlla_mm']


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_config_inherits_the_runtime_base(path):
    cfg = Config.fromfile(str(path))
    assert cfg.runner_type == 'SafeRunner', path
    assert set(REQUIRED_HOOKS) <= {str(h['type']).rpartition('.')[2] for h in cfg.custom_hooks}, path
    assert 'mlla_mm' in cfg.custom_imports.imports


def test_cpu_ddp_wrapper_keeps_the_users_settings():
    w = cpu_ddp_wrapper_cfg(dict(type='MMDistributedDataParallel', find_unused_parameters=True), False)
    assert w == dict(type='MMDistributedDataParallel', find_unused_parameters=True, device_ids=None)
    w = cpu_ddp_wrapper_cfg(None, True)
    assert w.device_ids is None and w.find_unused_parameters is True and w.broadcast_buffers is False


def test_cuda_amp_wrapper_becomes_cpu_autocast():
    amp = dict(type='AmpOptimWrapper', loss_scale='dynamic', optimizer=dict(type='AdamW', lr=1e-4), clip_grad=None)
    cpu, lines = amp_optim_wrapper_cfg(amp, cuda=False)
    assert cpu == dict(type='CPUAutocastOptimWrapper', dtype='bfloat16', optimizer=amp['optimizer'], clip_grad=None)
    assert amp['type'] == 'AmpOptimWrapper' and lines[0].startswith('No CUDA')  # not changed in place
    plain = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))
    assert amp_optim_wrapper_cfg(plain, cuda=False) == (plain, [])


def test_atomic_backend_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / 'epoch_2.pth'
    backend = AtomicLocalBackend()
    backend.put(b'old checkpoint', str(path))
    fill_disk_on_fsync(monkeypatch, 'epoch_2.pth')
    with pytest.raises(AtomicWriteError, match='No space left') as err:
        backend.put(b'new checkpoint', str(path))
    assert str(path) in str(err.value)
    assert path.read_bytes() == b'old checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_2.pth']


def test_batches_done_in_epoch_from_the_loops_record():
    hub = MessageHub.get_instance('test_batches_done')
    loop = type('Loop', (), dict(epoch=2, iter=7, dataloader=[0] * 3))()
    assert batches_done_in_epoch(loop, hub) == 1  # no record (another loop): from the iteration count
    hub.update_info(POSITION_KEY, [2, 3])
    assert batches_done_in_epoch(loop, hub) == 3  # the last batch of epoch 3 done, epoch not closed yet
    hub.update_info(POSITION_KEY, [1, 3])
    assert batches_done_in_epoch(loop, hub) == 0  # recorded in the epoch before: at a boundary


class _SyncBNModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.SyncBatchNorm(4)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.bn(self.conv(inputs))


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU fallbacks')
@pytest.mark.parametrize('launcher', ['none', 'pytorch'])
def test_saferunner_without_cuda_uses_bn_gloo_and_cpu_ddp(tmp_path, monkeypatch, launcher):
    import torch.distributed as dist
    for k, v in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    import atexit

    from mlla_mm.engine import distributed as dist_module
    monkeypatch.setattr(dist_module, '_RUN_FAILED', False)  # another test's failed run in this process
    at_exit = []
    monkeypatch.setattr(atexit, 'register', lambda fn, *a, **k: at_exit.append(fn))
    try:
        runner = SafeRunner(model=_SyncBNModel(), work_dir=str(tmp_path), launcher=launcher,
                            env_cfg=dict(dist_cfg=dict(backend='nccl')),  # what mmdet's and mmseg's bases say
                            experiment_name=f'cpu_{launcher}')
        model = runner.model
        if launcher == 'pytorch':
            assert dist.get_backend() == 'gloo'
            assert isinstance(model, nn.parallel.DistributedDataParallel) and model.device_ids is None
            model = model.module
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        assert isinstance(model.bn, nn.modules.batchnorm._BatchNorm)
        assert model.bn.weight is not None
        # A distributed run ends its process group at exit (a gloo group left to interpreter shutdown can
        # abort the process); one process alone registers nothing.
        assert at_exit == ([end_distributed_at_exit] if launcher == 'pytorch' else [])
        if launcher == 'pytorch':
            end_distributed_at_exit()
            assert not dist.is_initialized()
        end_distributed()  # nothing running: nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize('outcome', ['returns', 'raises'])
def test_run_main_ends_the_process_group(tmp_path, outcome, capsys, monkeypatch):
    """The tools destroy a distributed run's process group however main() ends (no runner run failed)."""
    import torch.distributed as dist
    from mlla_mm.engine import distributed as dist_module
    from mlla_mm.cli import run_main
    from mlla_mm.errors import UsageError
    monkeypatch.setattr(dist_module, '_RUN_FAILED', False)  # another test's failed run in this process

    def main():
        dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
        assert dist.is_initialized()
        if outcome == 'raises':
            raise UsageError('bad option')
        return 0

    try:
        assert run_main(main) == (0 if outcome == 'returns' else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_no_destroy_after_a_failed_run(tmp_path, monkeypatch):
    """A failed run leaves the group to the process exit (gloo's destroy would wait for a pending collective)."""
    import torch.distributed as dist
    from mlla_mm.engine import distributed as dist_module
    from mlla_mm.engine.hooks import TrainingInterrupted
    monkeypatch.setattr(dist_module, '_RUN_FAILED', False)
    with pytest.raises(TrainingInterrupted):  # a signal stop, made by every rank at the same iteration
        dist_module.run_noting_failure(lambda: (_ for _ in ()).throw(TrainingInterrupted(143)))
    assert dist_module._RUN_FAILED is False
    assert dist_module.run_noting_failure(lambda: 7) == 7 and dist_module._RUN_FAILED is False
    with pytest.raises(RuntimeError, match='boom'):
        dist_module.run_noting_failure(lambda: (_ for _ in ()).throw(RuntimeError('boom')))
    assert dist_module._RUN_FAILED is True
    assert dist_module.run_noting_failure(lambda: 7) == 7 and dist_module._RUN_FAILED is False  # the last run counts
    dist_module._RUN_FAILED = True
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        end_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_validation_due_follows_the_loops_rule():
    from types import SimpleNamespace

    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

    from mlla_mm.engine.loops import validation_due
    hub = MessageHub.get_instance('test_validation_due')
    runner = SimpleNamespace(val_loop=object(), message_hub=hub)
    epochs = dict(_max_epochs=6, _iter=0, dataloader=[0, 0], val_interval=2)
    assert validation_due(loop_stub(EpochBasedTrainLoop, runner, _epoch=4, **dict(epochs, _iter=8)))
    assert not validation_due(loop_stub(EpochBasedTrainLoop, runner, _epoch=3, **dict(epochs, _iter=6)))
    assert validation_due(loop_stub(EpochBasedTrainLoop, runner, _epoch=6, **dict(epochs, _iter=12)))  # the last one
    assert not validation_due(loop_stub(EpochBasedTrainLoop, runner, _epoch=0, **epochs))
    assert not validation_due(loop_stub(EpochBasedTrainLoop, runner, _epoch=4, **dict(epochs, _iter=9)))  # mid-epoch
    iters = dict(_max_iters=100, _epoch=0, val_interval=40)
    assert validation_due(loop_stub(IterBasedTrainLoop, runner, _iter=80, **iters))
    assert validation_due(loop_stub(IterBasedTrainLoop, runner, _iter=100, **iters))
    assert not validation_due(loop_stub(IterBasedTrainLoop, runner, _iter=81, **iters))
    assert not validation_due(loop_stub(EpochBasedTrainLoop, SimpleNamespace(val_loop=None, message_hub=hub),
                                    _epoch=4, **dict(epochs, _iter=8)))


def test_fast_forward_leaves_the_random_state_alone():
    from mlla_mm.engine.loops import _FastForward
    batches = _FastForward(iter(lambda: torch.rand(1), None), 3)  # each batch draws from torch's generator
    torch.manual_seed(0)
    first = torch.rand(1)
    torch.manual_seed(0)
    skipped = [next(batches) for _ in range(3)]
    assert torch.equal(torch.rand(1), first)  # the three skipped batches did not move the generator
    assert all(torch.equal(s, first) for s in skipped)
    torch.manual_seed(0)
    assert torch.equal(next(batches), first)  # afterwards batches draw as usual
    assert not torch.equal(torch.rand(1), first)
