"""tools/benchmark_onnx.py --int8: INT8 ONNX Runtime timed in the same rounds as PyTorch eager; bad options."""
import json

import pytest

from tests.helpers import assert_one_error_line, exit_code, load_tool


def _never(*args, **kwargs):
    raise AssertionError('exported or timed although the arguments are bad')


@pytest.mark.slow
def test_quick_int8_benchmark(tmp_path):
    out = tmp_path / 'bench.json'
    tool = load_tool('benchmark_onnx')
    assert tool.main(['--quick', '--models', 'mlla_t', '--levels', 'all', '--threads', '1', '--no-bf16', '--int8',
                      '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data['latency']) == {'mlla_t:torch', 'mlla_t:ort-all', 'mlla_t:ort-int8-all'}
    goal = data['goals']['mlla_t_int8_over_torch']
    assert goal == pytest.approx(data['latency']['mlla_t:ort-int8-all']['over_torch'])
    assert data['round_ratios']['mlla_t_int8_over_torch'] == [pytest.approx(goal)]
    model = data['models']['mlla_t']
    assert model['int8_mib'] < 0.5 * model['onnx_mib']  # int8 weights
    assert 1e-4 < model['int8_max_rel_diff'] < 0.5  # quantized, not fp32, yet related


@pytest.mark.parametrize('argv, name', [
    (['--calib-dir', 'x'], '--calib-dir needs --int8'),
    (['--int8', '--calib-dir', 'MISSING'], 'not a directory'),
])
def test_bad_int8_arguments_are_one_error_line(argv, name, capsys, monkeypatch, tmp_path):
    tool = load_tool('benchmark_onnx')
    monkeypatch.setattr(tool, 'build', _never)
    argv = [str(tmp_path / 'missing') if a == 'MISSING' else a for a in argv]
    assert exit_code(tool.main, ['--quick'] + argv) == 2
    assert_one_error_line(capsys, name)
