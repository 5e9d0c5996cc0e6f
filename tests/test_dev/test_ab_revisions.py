"""dev/ab_revisions.py: another revision's MLLA loaded beside today's, timed in the same rounds; one-line errors."""
import json
import shutil
import subprocess
import tempfile

import pytest
import torch

from tests.helpers import TINY_ARCH, load_dev

ab = load_dev('ab_revisions')


def _in_git_checkout() -> bool:
    return shutil.which('git') is not None and subprocess.run(
        ['git', '-C', ab.REPO_ROOT, 'rev-parse', 'HEAD'], capture_output=True).returncode == 0


needs_git = pytest.mark.skipif(not _in_git_checkout(), reason='needs a git checkout')


@needs_git
def test_the_revisions_mlla_is_loaded_beside_todays_and_not_registered():
    from mlla_mm.models import MLLA
    from mlla_mm.registry import MODELS
    with tempfile.TemporaryDirectory() as folder:
        old_cls, sha = ab.load_mlla_at_revision('HEAD', folder)
    assert old_cls is not MLLA and old_cls.__module__.startswith(f'_mlla_mm_at_{sha[:12]}.')
    assert MODELS.get('MLLA') is MLLA
    torch.manual_seed(0)
    new = MLLA(TINY_ARCH).eval()
    old = old_cls(TINY_ARCH).eval()
    old.load_state_dict(new.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(new(x), old(x)))  # HEAD's code, HEAD's weights


@needs_git
def test_a_comparison_pairs_the_rounds(tmp_path, capsys, monkeypatch):
    """HEAD against itself at toy sizes: every ratio is the median of its rounds, both outputs equal."""
    import mlla_mm.utils.malloc as malloc
    monkeypatch.setattr(malloc, '_state', malloc._state)  # restored after the test
    out = tmp_path / 'ab.json'
    assert ab.main(['HEAD', '--repeats', '2', '--sizes', '32x32', '32x64', '--train-size', '32', '--threads', '1',
                    '--malloc', 'default', '--ops', '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['malloc'] == 'default' == malloc.malloc_state()  # the tools' setting is said and recorded
    assert set(data['ratios']) == {'inference 32x32', 'inference 32x64', 'train fwd+bwd 2x32x32'}
    for key, ratio in data['ratios'].items():
        rounds = data['rounds'][key]
        assert len(rounds) == 2 and min(rounds) <= ratio <= max(rounds)
    assert data['times']['inference 32x64']['max_abs_diff'] == 0
    ops = data['ops']  # the same code: every operator called as often, at the last size
    assert ops['size'] == '32x64' and ops['differ'] == {} and ops['calls']['new'] == ops['calls']['old'] > 100
    stdout = capsys.readouterr().out
    assert 'PASS' not in stdout and 'FAIL' not in stdout and '(rounds ' in stdout and '# malloc: default' in stdout
    assert 'operators at 32x64: calls new' in stdout and 'every operator called as often' in stdout


def test_operators_that_differ_are_named():
    new = {'aten::addmm': (4, 2.0), 'aten::copy_': (3, 1.0)}
    old = {'aten::addmm': (4, 2.5), 'aten::clone': (1, 0.5)}
    found = ab.compare_operators(new, old)
    assert found['differ'] == {'aten::clone': dict(new=0, old=1), 'aten::copy_': dict(new=3, old=0)}
    assert found['calls'] == dict(new=7, old=5) and found['self_cpu_ms'] == dict(new=3.0, old=3.0)


def test_a_bad_malloc_setting_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv('MLLA_MM_MALLOC', 'bogus')
    assert ab.main(['HEAD']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: MLLA_MM_MALLOC') and "'bogus'" in err[0]


@needs_git
def test_an_unknown_revision_is_a_one_line_error(capsys):
    assert ab.main(['no-such-revision-xyz']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and "'no-such-revision-xyz'" in err[0]


def test_missing_git_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(ab.shutil, 'which', lambda name: None)
    assert ab.main(['HEAD']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: dev/ab_revisions.py needs git, which is not on PATH']
