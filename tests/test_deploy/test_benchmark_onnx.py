"""The ONNX Runtime benchmark: interleaving, paired ratios, and a quick run of tools/benchmark_onnx.py."""
import json

import pytest

from mlla_mm.deploy.benchmark import (cpu_description, goal_verdict, interleaved_times, paired_ratio,
                                      round_ratios, round_spread)
from tests.helpers import assert_one_error_line, exit_code, load_tool


def test_interleaved_times_warms_up_then_alternates_the_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    times = interleaved_times(fns, repeats=3, warmup=1)
    assert calls == list('abc') + list('abc') + list('cba') + list('abc')
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3, 'c': 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    times = {'x': [1.0, 4.0, 3.0], 'y': [2.0, 2.0, 2.0]}
    assert paired_ratio(times, 'x', 'y') == pytest.approx(1.5)
    # Load that hits one round slows both runs of that round: the ratio is unaffected.
    assert paired_ratio({'x': [1.0, 10.0, 1.0], 'y': [2.0, 20.0, 2.0]}, 'x', 'y') == pytest.approx(0.5)


def test_round_ratios_pair_each_round():
    times = {'x': [1.0, 4.0, 3.0], 'y': [2.0, 2.0, 2.0]}
    assert round_ratios(times, 'x', 'y') == [0.5, 2.0, 1.5]


def test_goal_verdict_says_when_the_rounds_straddle_the_goal():
    # Median 0.89 meets 0.9, but two of five rounds do not: the verdict says it is within the noise.
    mixed = [0.87, 0.95, 0.89, 0.93, 0.88]
    assert goal_verdict(mixed, 0.9) == 'PASS (rounds 0.870-0.950, 3 of 5 rounds meet it: within the noise)'
    assert goal_verdict([0.91, 0.95, 0.92], 0.9) == 'FAIL (rounds 0.910-0.950, no round meets it)'
    assert goal_verdict([0.80, 0.85, 0.83], 0.9) == 'PASS (rounds 0.800-0.850, every round meets it)'
    # A median outside the goal fails even when some rounds meet it.
    assert goal_verdict([0.89, 0.95, 0.93], 0.9).startswith('FAIL (rounds 0.890-0.950, 1 of 3')
    # Higher is better: the comparison turns round.
    assert goal_verdict([1.6, 1.4, 1.7], 1.5, higher_is_better=True).startswith('PASS (rounds 1.400-1.700, 2 of 3')
    assert goal_verdict([0.95], 0.9) == 'FAIL' and goal_verdict([], 0.9) == 'SKIP'
    assert round_spread([0.9, 1.0], 0.9) == 'rounds 0.900-1.000, 1 of 2 rounds meet it: within the noise'


def test_cpu_description_names_the_cpu_and_its_bf16_support():
    cpu = cpu_description()
    assert isinstance(cpu['model_name'], str) and cpu['model_name']
    assert cpu['native_bf16'] == any(f in cpu['bf16_flags'] for f in ('avx512_bf16', 'amx_bf16'))


@pytest.mark.slow
def test_quick_benchmark_writes_consistent_numbers(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    tool = load_tool('benchmark_onnx')
    assert tool.main(['--quick', '--models', 'mlla_t', '--levels', 'all', 'disable', '--threads', '1',
                      '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data['latency']) == {'mlla_t:torch', 'mlla_t:ort-all', 'mlla_t:ort-disable'}
    for row in data['latency'].values():
        assert 0 < row['min'] <= row['median'] <= row['max'] and row['n'] == 1
    assert data['latency']['mlla_t:torch']['over_torch'] == pytest.approx(1.0)
    assert data['goals']['mlla_t_ort_over_torch'] == pytest.approx(data['latency']['mlla_t:ort-all']['over_torch'])
    rounds = data['round_ratios']['mlla_t_ort_over_torch']
    assert len(rounds) == 1 and rounds[0] == pytest.approx(data['goals']['mlla_t_ort_over_torch'])
    assert data['models']['mlla_t']['max_rel_diff'] < 1e-4 and data['models']['mlla_t']['dynamic']
    assert data['bf16']['bf16_over_fp32'] > 0 and data['bf16']['max_rel_diff'] < 0.1
    assert data['cpu']['model_name']
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith('warning: bf16')]
    assert len(err) == (0 if data['cpu']['native_bf16'] else 1), err


def test_bf16_warning_only_without_amx_or_avx512_bf16():
    tool = load_tool('benchmark_onnx')
    slow = dict(native_bf16=False, bf16_note='AMD EPYC has neither amx_bf16 nor avx512_bf16 (cpuinfo): slower')
    line = tool.bf16_warning(slow)
    assert line.startswith('warning: ') and '\n' not in line and 'AMD EPYC' in line and 'avx512_bf16' in line
    assert tool.bf16_warning(dict(native_bf16=True, bf16_note='Xeon has amx_bf16')) is None
    # On this machine the description agrees with mlla_mm.utils.cpu.
    from mlla_mm.utils.cpu import bf16_fast_on_this_cpu
    cpu = cpu_description()
    assert (cpu['native_bf16'], cpu['bf16_note']) == bf16_fast_on_this_cpu()
    assert (tool.bf16_warning(cpu) is None) == cpu['native_bf16']


# --------------------------------------------------------------------------
# Bad input: one ``error:`` line naming the argument, exit code 2, before anything is exported or timed.
# --------------------------------------------------------------------------


def _never(*args, **kwargs):
    raise AssertionError('exported or timed although the arguments are bad')


@pytest.mark.parametrize('argv, name', [
    (['--quick', '--threads', '0'], '--threads'),
    (['--threads', '-3'], '--threads'),
    (['--repeats', '0'], '--repeats'),
    (['--backbone-size', 'abc'], '--backbone-size'),
    (['--backbone-size', '0x64'], '--backbone-size'),
    (['--seg-size', '64'], '--seg-size'),
    (['--bf16-size', '64by64'], '--bf16-size'),
])
def test_bad_arguments_are_one_error_line(argv, name, capsys, monkeypatch):
    tool = load_tool('benchmark_onnx')
    monkeypatch.setattr(tool, 'build', _never)
    assert exit_code(tool.main, argv) == 2
    assert_one_error_line(capsys, name)


def test_json_that_cannot_be_written_fails_before_exporting(tmp_path, capsys, monkeypatch):
    tool = load_tool('benchmark_onnx')
    monkeypatch.setattr(tool, 'build', _never)
    plain = tmp_path / 'plain'
    plain.write_text('x')
    for out in (plain / 'x.json', tmp_path):
        assert exit_code(tool.main, ['--quick', '--models', 'mlla_t', '--json', out]) == 2
        assert_one_error_line(capsys, '--json', out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['plain']


def test_parse_size_rejects_what_is_not_hxw():
    import argparse
    tool = load_tool('benchmark_onnx')
    for text in ('abc', '64', '0x0', '64x-2'):
        with pytest.raises(argparse.ArgumentTypeError, match='HxW'):
            tool.parse_size(text)
    assert tool.parse_size('64x96') == (64, 96)


def test_interleaved_times_refuses_zero_rounds():
    with pytest.raises(ValueError, match='repeats >= 1'):
        interleaved_times({'a': lambda: None}, repeats=0)
