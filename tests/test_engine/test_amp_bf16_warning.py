"""``--amp`` on a CPU without AMX / AVX512-BF16 says, in one line, that bf16 will be slower than fp32."""
import pytest
from mmengine.config import Config

import mlla_mm.utils.cpu as cpu_module
from mlla_mm.engine import launch


def amp_cfg():
    return Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, 'is_available', lambda: False)


def test_warns_once_on_a_cpu_without_native_bf16(monkeypatch, capsys, no_cuda):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu',
                        lambda: (False, 'Test CPU has neither amx_bf16 nor avx512_bf16'))
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    assert cfg.optim_wrapper.type == 'CPUAutocastOptimWrapper'
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith('warning: ') and 'slower than fp32' in lines[0]
    assert 'neither amx_bf16 nor avx512_bf16' in lines[0]


def test_silent_on_a_cpu_with_native_bf16(monkeypatch, capsys, no_cuda):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu', lambda: (True, 'Test CPU has amx_bf16'))
    launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    assert capsys.readouterr().err == ''


def test_silent_without_amp_and_on_cuda(monkeypatch, capsys):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu', lambda: (False, 'no bf16'))
    launch.prepare_config(amp_cfg(), config_path='x.py', amp=False)
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(launch.torch.cuda, 'is_available', lambda: True)
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert capsys.readouterr().err == ''
