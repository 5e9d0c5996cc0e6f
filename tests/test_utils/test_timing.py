"""mlla_mm.utils.timing: interleaved rounds, paired ratios with their spread, peak memory, the header line."""
import numpy as np
import pytest
import torch

from mlla_mm.utils.timing import (header_line, interleaved_times, paired_ratio, peak_memory_mib, ratio_text,
                                  relative_difference, round_ratios, summarize)


def test_interleaved_times_warms_up_then_alternates_the_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    times = interleaved_times(fns, repeats=3, warmup=1)
    assert calls == list('abc') + list('abc') + list('cba') + list('abc')  # warm-up, then a-b-c, c-b-a, a-b-c
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3, 'c': 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_times_refuses_zero_rounds():
    with pytest.raises(ValueError, match='repeats >= 1'):
        interleaved_times({'a': lambda: None}, repeats=0)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    times = {'x': [1.0, 4.0, 3.0], 'y': [2.0, 2.0, 2.0]}
    assert round_ratios(times, 'x', 'y') == [0.5, 2.0, 1.5]
    assert paired_ratio(times, 'x', 'y') == pytest.approx(1.5)
    # Load that hits one round slows both runs of that round: the ratio is unaffected (a ratio of medians is not).
    loaded = {'x': [1.0, 10.0, 1.0], 'y': [2.0, 20.0, 2.0]}
    assert paired_ratio(loaded, 'x', 'y') == pytest.approx(0.5)
    assert summarize(loaded['x']) == dict(median=1.0, min=1.0, max=10.0, n=3)


def test_ratio_text_gives_the_median_and_the_range_of_the_rounds():
    assert ratio_text([0.87, 0.95, 0.89, 0.93, 0.88]) == '0.890 (rounds 0.870-0.950)'
    assert ratio_text([0.5]) == '0.500'  # one round: no range to show


def test_relative_difference_takes_arrays_or_tensors():
    ref = [torch.tensor([1.0, -4.0]), torch.tensor([2.0])]
    assert relative_difference([np.array([1.0, -3.0]), np.array([2.0])], ref) == pytest.approx(0.25)
    assert relative_difference([torch.tensor([1.0, -4.0]).bfloat16(), torch.tensor([1.0])], ref) == pytest.approx(0.5)


def test_peak_memory_sees_a_large_allocation():
    mib = peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum())
    if mib is None:
        pytest.skip('no /proc/self/clear_refs here')
    assert 50 < mib < 200


def test_header_line_names_the_cpu_threads_malloc_and_versions():
    from mlla_mm.utils.cpu import cpu_description
    line = header_line(3, 'tuned', onnxruntime='1.2.3')
    cpu = cpu_description()
    assert line.startswith(f"# CPU: {cpu['model_name']} (") and '; 3 threads; malloc tuned; torch ' in line
    assert line.endswith(', onnxruntime 1.2.3') and '\n' not in line
    assert ('bf16 native' in line) == cpu['native_bf16']
