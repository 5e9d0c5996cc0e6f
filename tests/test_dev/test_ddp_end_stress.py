"""dev/ddp_end_stress.py: repeated two-process training runs of a checkout, counted; bad input is one error line."""
import re

import pytest

from tests.helpers import ROOT, one_error_line, run_tool


@pytest.mark.slow
def test_counts_the_runs_of_this_checkout():
    res = run_tool('dev/ddp_end_stress.py', '--runs', '1', timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert re.search(rf'^{re.escape(str(ROOT))}: 0 of 1 runs failed \(0 with a rank aborted\); \d+ s$', res.stdout,
                     re.M), res.stdout


@pytest.mark.parametrize('args, names', [(['--runs', '0'], ['--runs']),
                                         (['--repo', 'nowhere'], ['--repo nowhere', 'tools/dist_train.sh'])])
def test_bad_arguments_are_one_error_line(args, names):
    res = run_tool('dev/ddp_end_stress.py', *args)
    assert res.returncode == 2
    one_error_line(res.stderr, *names)
