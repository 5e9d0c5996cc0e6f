"""tools/demo.py: when the demo trains with mixed precision."""
from tests.helpers import load_tool

demo = load_tool('demo')
AMX = (True, 'Intel Xeon (bf16-related flags: amx_bf16, avx512_bf16)')
AVX2 = (False, 'AMD EPYC (bf16-related flags: avx2; no AMX or AVX512-BF16)')


def test_det_trains_in_bf16_only_where_the_cpu_has_it():
    auto = demo.DEMOS['det']['amp_auto']
    on, why = demo.choose_amp(None, auto, cuda=False, bf16_cpu=AMX)
    assert on and 'amx_bf16' in why and '--no-amp' in why
    off, why = demo.choose_amp(None, auto, cuda=False, bf16_cpu=AVX2)
    assert not off and 'slower' in why
    assert demo.choose_amp(None, auto, cuda=True, bf16_cpu=AMX)[0] is False  # a GPU: fp32 unless asked


def test_the_flags_win_and_seg_stays_fp32():
    assert demo.choose_amp(False, True, cuda=False, bf16_cpu=AMX) == (False, 'mixed precision off (--no-amp)')
    assert demo.choose_amp(True, True, cuda=False, bf16_cpu=AVX2)[0] is True
    assert demo.DEMOS['seg']['amp_auto'] is False
    assert demo.choose_amp(None, demo.DEMOS['seg']['amp_auto'], cuda=False, bf16_cpu=AMX)[0] is False


class _Stop(Exception):
    pass


def test_parser_takes_amp_and_no_amp(monkeypatch, tmp_path):
    seen = []

    def record(requested, *args):
        seen.append(requested)
        raise _Stop

    monkeypatch.setattr(demo, 'choose_amp', record)
    for argv in (['det'], ['det', '--amp'], ['det', '--no-amp']):
        try:
            demo.main(argv + ['--work-dir', str(tmp_path)])
        except _Stop:
            pass
    assert seen == [None, True, False]
