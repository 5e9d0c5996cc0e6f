"""Device-aware defaults on a CUDA machine (issue 29), with torch's CUDA answers faked on this CPU machine."""
import pytest
import torch
from mmengine.config import Config

from mlla_mm.engine import device, launch
from mlla_mm.engine.run_checks import amp_optim_wrapper_cfg
from mlla_mm.errors import UsageError
from tests.helpers import TINY_ARCH


def _cfg(**optim_wrapper):
    return Config(dict(model=dict(type='Nothing'), default_scope='mmdet',
                       optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01), **optim_wrapper)))


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)


def _amp(cfg):
    """``--amp`` applied to ``cfg``, then what the runner's AMP policy builds from it on this (faked) machine."""
    launch.apply_amp(cfg)
    wrapper, _ = amp_optim_wrapper_cfg(cfg.optim_wrapper)
    return wrapper


def test_amp_on_cuda_is_fp16_with_a_dynamic_loss_scale(on_cuda):
    wrapper = _amp(_cfg())
    assert wrapper.type == 'AmpOptimWrapper'
    assert wrapper.loss_scale == 'dynamic' and wrapper.dtype == 'float16'


def test_amp_on_cuda_gives_bf16_by_option_and_refuses_it_where_the_gpu_lacks_it(on_cuda, monkeypatch):
    wrapper = _amp(_cfg(dtype='bfloat16'))  # --cfg-options optim_wrapper.dtype=bfloat16
    assert (wrapper.type, wrapper.dtype) == ('AmpOptimWrapper', 'bfloat16')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    with pytest.raises(UsageError, match='does not support bf16'):
        _amp(_cfg(dtype='bfloat16'))
    with pytest.raises(UsageError, match='float16 or bfloat16'):
        _amp(_cfg(dtype='float64'))


def test_amp_without_cuda_stays_bf16_cpu_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    wrapper = _amp(_cfg())
    assert (wrapper.type, wrapper.dtype) == ('CPUAutocastOptimWrapper', 'bfloat16')


def test_a_cpu_only_mmcv_is_found_by_asking_mmcv_itself():
    """This machine's mmcv is the set-up's CPU build: on a GPU machine it is the one clear problem."""
    assert device.mmcv_compiling_cuda_version() == 'not available'
    problem = device.mmcv_cuda_problem('mmdet', cuda_available=True)
    assert problem and 'without CUDA kernels' in problem and 'make setup' in problem
    assert device.mmcv_cuda_problem('mmdet', cuda_available=False) is None  # a CPU run uses the CPU ops
    assert device.mmcv_cuda_problem('mmseg', cuda_available=True) is None  # UperNet needs no mmcv op


def test_mmcv_built_for_another_cuda_major_or_not_loading_is_a_problem(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    assert device.mmcv_cuda_problem('mmdet', True, compiled=lambda: '13.0') is None
    assert 'built for CUDA 12.8' in device.mmcv_cuda_problem('mmdet', True, compiled=lambda: '12.8')

    def broken():
        raise ModuleNotFoundError("No module named 'mmcv._ext'")
    assert "mmcv._ext" in device.mmcv_cuda_problem('mmdet', True, compiled=broken)


def test_a_detector_run_on_a_gpu_machine_with_a_cpu_only_mmcv_stops_before_any_work(on_cuda, tmp_path):
    from mlla_mm.engine.runner import SafeRunner
    cfg = Config(dict(_cfg().to_dict(), work_dir=str(tmp_path / 'work')), cfg_text='# c.py', filename='c.py')
    with pytest.raises(UsageError, match='c.py: this machine has a GPU but mmcv was built without CUDA'):
        SafeRunner.from_cfg(cfg)  # the runner checks it, before it makes the work dir (or a logger)
    assert not (tmp_path / 'work').exists()


def test_cpu_malloc_tuning_stays_off_on_a_gpu_machine(on_cuda, monkeypatch):
    from mlla_mm.utils import malloc
    monkeypatch.delenv(malloc.ENV, raising=False)
    monkeypatch.setattr(malloc, '_state', None)
    from mlla_mm.cli import run_main
    assert run_main(lambda: 0) == 0
    assert malloc.malloc_state() == 'default'


def test_the_fast_inference_path_runs_on_the_cpu_only_unless_allowed(monkeypatch):
    """Designed and measured on CPUs: other devices (here the meta device for a GPU) get the autograd code."""
    from mlla_mm.models import MLLA, ops
    model = MLLA(TINY_ARCH).eval()
    with torch.no_grad():
        assert ops.use_fast_inference(model.layers[0], torch.zeros(1, 4, 4, 16)) is True
        assert ops.use_fast_inference(model.layers[0], torch.zeros(1, 4, 4, 16, device='meta')) is False
        monkeypatch.setattr(ops, 'FAST_INFERENCE_DEVICES', ('cpu', 'meta'))  # what gpu_check measures with
        assert ops.use_fast_inference(model.layers[0], torch.zeros(1, 4, 4, 16, device='meta')) is True
