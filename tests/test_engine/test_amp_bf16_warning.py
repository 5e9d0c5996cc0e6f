"""``--amp`` on a CPU without AMX / AVX512-BF16 says, in one line, that bf16 will be slower than fp32.

The AMP policy is the runner's (:func:`mlla_mm.engine.run_checks.amp_optim_wrapper_cfg`, used by
``SafeRunner.build_optim_wrapper``); ``--amp`` only makes the config's wrapper an ``AmpOptimWrapper``.
"""
import pytest
import torch
from mmengine.config import Config

import mlla_mm.utils.cpu as cpu_module
from mlla_mm.engine import launch
from mlla_mm.engine.run_checks import amp_optim_wrapper_cfg


def amp_cfg():
    return Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


def _slow_lines(lines):
    return [line for line in lines if 'slower than fp32' in line]


def test_warns_once_on_a_cpu_without_native_bf16(monkeypatch, no_cuda):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu',
                        lambda: (False, 'Test CPU has neither amx_bf16 nor avx512_bf16'))
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    wrapper, lines = amp_optim_wrapper_cfg(cfg.optim_wrapper)
    assert wrapper.type == 'CPUAutocastOptimWrapper' and wrapper.dtype == 'bfloat16'
    slow = _slow_lines(lines)
    assert len(slow) == 1 and 'neither amx_bf16 nor avx512_bf16' in slow[0], lines


def test_silent_on_a_cpu_with_native_bf16(monkeypatch, no_cuda):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu', lambda: (True, 'Test CPU has amx_bf16'))
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    wrapper, lines = amp_optim_wrapper_cfg(cfg.optim_wrapper)
    assert wrapper.type == 'CPUAutocastOptimWrapper' and _slow_lines(lines) == []


def test_silent_without_amp_and_on_cuda(monkeypatch, capsys):
    monkeypatch.setattr(cpu_module, 'bf16_fast_on_this_cpu', lambda: (False, 'no bf16'))
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=False)
    assert amp_optim_wrapper_cfg(cfg.optim_wrapper) == (cfg.optim_wrapper, [])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = launch.prepare_config(amp_cfg(), config_path='x.py', amp=True)
    wrapper, lines = amp_optim_wrapper_cfg(cfg.optim_wrapper)
    assert wrapper.type == 'AmpOptimWrapper' and lines == []
    assert capsys.readouterr().err == ''
