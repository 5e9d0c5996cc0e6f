"""dev/ddp_end_stress.py: repeated two-process training runs of a checkout, counted; bad input is one error line."""
import re
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, one_error_line, run_tool


@pytest.mark.slow
def test_counts_the_runs_of_this_checkout():
    res = run_tool('dev/ddp_end_stress.py', '--runs', '1', timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = r': 0 of 1 runs failed \(0 with a rank aborted, 0 stopped after 600 s\); \d+ s$'
    assert re.search(f'^{re.escape(str(ROOT))}{summary}', res.stdout, re.M), res.stdout


@pytest.mark.slow
def test_a_run_that_hangs_is_stopped_and_counted(tmp_path):
    # A checkout whose dist_train.sh never ends (and starts a child that would outlive a plain kill).
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'mlla_mm').mkdir()
    (tmp_path / 'tools' / 'dist_train.sh').write_text('sleep 300 &\necho "$!" > "$(dirname "$0")/child"\nsleep 300\n')
    start = time.monotonic()
    res = run_tool('dev/ddp_end_stress.py', '--runs', '1', '--run-timeout', '2', '--repo', tmp_path, timeout=120)
    assert time.monotonic() - start < 60
    assert res.returncode == 1, res.stderr[-3000:]
    assert ': 1 of 1 runs failed (0 with a rank aborted, 1 stopped after 2 s)' in res.stdout, res.stdout
    status = Path(f"/proc/{int((tmp_path / 'tools' / 'child').read_text())}/status")
    deadline = time.monotonic() + 10  # the whole process group was stopped: the child is gone (or a zombie)
    while status.exists() and 'State:\tZ' not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.exists() or 'State:\tZ' in status.read_text()


@pytest.mark.parametrize('args, names', [(['--runs', '0'], ['--runs']),
                                         (['--repo', 'nowhere'], ['--repo nowhere', 'tools/dist_train.sh'])])
def test_bad_arguments_are_one_error_line(args, names):
    res = run_tool('dev/ddp_end_stress.py', *args)
    assert res.returncode == 2
    one_error_line(res.stderr, *names)
