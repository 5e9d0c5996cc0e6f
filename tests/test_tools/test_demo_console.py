"""tools/demo.py's console: its header comes first (what, precision, documented time); no per-parameter report."""
import re

import pytest
from mmengine.logging import MMLogger

from tests.helpers import ROOT, load_tool, write_tiny_config

demo = load_tool('demo')
ZEN4 = ('AMD EPYC 9R14 96-Core Processor', {'avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni'})
ZEN2 = ('AMD EPYC 7R32', {'avx2', 'fma'})
XEON_AMX = ('Intel(R) Xeon(R) Platinum 8488C', {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'})
#: One line of mmengine's per-parameter initialisation report.
INIT_REPORT = re.compile(r'^\S+ - torch\.Size\(\[[\d, ]*\]\): *$|The value is the same before and after', re.M)


def test_cpu_kinds_are_recognised_from_cpuinfo():
    assert demo.cpu_kind(*ZEN4) == 'AMD EPYC, Zen 4'
    assert demo.cpu_kind(*ZEN2) == 'AMD EPYC, Zen 2'
    assert demo.cpu_kind(*XEON_AMX) == 'Intel Xeon with AMX'
    assert demo.cpu_kind('Intel(R) Core(TM) i7-8700', {'avx2'}) is None


def test_the_documented_times_are_those_of_docs_benchmarks():
    """Every figure the header can print is in docs/benchmarks.md, next to its CPU kind's name."""
    text = (ROOT / 'docs' / 'benchmarks.md').read_text()
    for task, precision, kind, figure in demo.DOCUMENTED_TIMES:
        assert kind in demo.CPU_KINDS, kind
        for time in re.findall(r'\d+ min \d+ s', figure):
            assert time in text, (task, precision, kind, time)
        assert kind.split(',')[0] in text


def test_the_expected_time_is_this_cpus_figure_or_says_it_was_not_timed():
    bf16 = demo.expected_time('det', 'bf16', demo.cpu_kind(*XEON_AMX), cuda=False)
    assert bf16.startswith('6 min 3 s to 10 min 26 s on a 2-core Intel Xeon with AMX in bf16')
    fp32 = demo.expected_time('det', 'fp32', demo.cpu_kind(*ZEN2), cuda=False)
    assert fp32.startswith('8 min 36 s to 9 min 38 s on a 2-core AMD EPYC, Zen 2 in fp32')
    untimed = demo.expected_time('det', 'bf16', demo.cpu_kind(*ZEN4), cuda=False)
    assert untimed.startswith('bf16 not timed on this CPU (AMD EPYC, Zen 4) yet; documented: 6 min 3 s')
    assert 'in fp32 on a 2-core AMD EPYC, Zen 2' in untimed  # the other figures follow
    assert demo.expected_time('seg', 'fp32', demo.cpu_kind(*ZEN4), cuda=False).startswith('9 min 26 s on')
    assert 'not measured on a GPU' in demo.expected_time('det', 'fp16', None, cuda=True)


def test_the_header_says_what_in_which_precision_and_how_long(tmp_path):
    synthetic = dict(root='data/shapes_coco/', num_train=240, num_val=60)
    amp, why = demo.choose_amp(None, True, False, (True, 'X has avx512_bf16'))
    precision = demo.precision_of(amp, cuda=False)
    assert precision == 'bf16' and demo.precision_of(True, cuda=True) == 'fp16'
    assert demo.precision_of(False, cuda=False) == 'fp32'
    lines = demo.demo_header('det', tmp_path, synthetic, precision, why, 'TIME')
    assert lines[0].startswith('== mlla-mm demo (det): Mask R-CNN with an MLLA-T backbone, trained from scratch '
                               'in bf16 on 240 synthetic COCO-format shapes')
    assert '60 held out' in lines[0]
    assert any(line == f'precision: bf16 ({why})' for line in lines)
    assert 'time: TIME' in lines
    assert any(str(tmp_path / 'predictions') in line and 'box and mask mAP' in line for line in lines)
    seg = demo.demo_header('seg', tmp_path, synthetic, 'fp32', 'off', 'TIME')
    assert 'UperNet' in seg[0] and 'evaluate the untrained model' in seg[1]


def test_the_demo_prints_its_header_first_and_no_init_report(monkeypatch, tmp_path, tiny_data, capsys):
    """The demo's own first part (options, config, header, the untrained model built and initialised) with a
    tiny config: the header is the first output, and mmengine's per-parameter report is not on the console."""
    config = write_tiny_config(tmp_path, tiny_data, epochs=1)
    monkeypatch.setitem(demo.DEMOS['det'], 'config', str(config))  # (absolute: ROOT / config is config)
    steps = []

    def stop(cmd, log_path=None):
        steps.append(cmd)
        raise demo.StepFailed(2, 'stopped before training')

    monkeypatch.setattr(demo, 'run', stop)
    logger = MMLogger.get_instance('test_demo_console', log_level='INFO')  # a fresh process's logger: no file
    assert MMLogger.get_current_instance() is logger
    with pytest.raises(demo.StepFailed):
        demo.demo_main(['det', '--no-amp', '--work-dir', str(tmp_path / 'work')])
    out = capsys.readouterr().out
    assert len(steps) == 1 and 'tools/train.py' in map(str, steps[0])  # the model was built and initialised
    lines = out.splitlines()
    assert lines[0].startswith('== mlla-mm demo (det): Mask R-CNN with an MLLA-T backbone, trained from scratch in '
                               'fp32 on 4 synthetic COCO-format shapes'), out[:2000]
    assert 'precision: fp32 (mixed precision off (--no-amp))' in lines[:5]
    assert any(line.startswith('time: ') for line in lines[:5])
    assert INIT_REPORT.search(out) is None, out[:3000]


def test_the_console_skips_mmengines_many_line_records_but_never_a_failure():
    """The environment, config and hook-order records of a step stay in its log file; what follows them (the
    next record, a tool's own lines, a traceback or an error line) is shown."""
    output = [
        '12/07 01:26:56 - mmengine - INFO - \n', '------\n', 'System environment:\n', '    Python: 3.11\n',
        '12/07 01:26:57 - mmengine - INFO - Config:\n', "_scales = [\n", "model = dict(\n",
        '12/07 01:27:03 - mmengine - INFO - Distributed training is not used\n',
        '12/07 01:27:03 - mmengine - INFO - Hooks will be executed in the following order:\n',
        'before_run:\n', '(VERY_HIGH   ) RuntimeInfoHook\n',
        '12/07 01:27:09 - mmengine - INFO - Epoch(train) [1][10/120]  loss: 3.1\n',
        'metrics: coco/bbox_mAP=0.5\n',
        '12/07 01:28:00 - mmengine - INFO - Config:\n', 'a = 1\n',
        'Traceback (most recent call last):\n', '  File "tools/train.py", line 1\n', 'RuntimeError: boom\n',
        '12/07 01:28:01 - mmengine - INFO - Config:\n', 'error: data/x.json: not found\n',
    ]
    view = demo.ConsoleView()
    shown = [line for line in output if view.shows(line)]
    assert shown == ['12/07 01:27:03 - mmengine - INFO - Distributed training is not used\n',
                     '12/07 01:27:09 - mmengine - INFO - Epoch(train) [1][10/120]  loss: 3.1\n',
                     'metrics: coco/bbox_mAP=0.5\n',
                     'Traceback (most recent call last):\n', '  File "tools/train.py", line 1\n',
                     'RuntimeError: boom\n', 'error: data/x.json: not found\n']
