"""tools/benchmark.py --against-rev: another revision's MLLA loaded beside today's, and its one-line errors."""
import shutil
import subprocess
import tempfile

import pytest
import torch

from tests.helpers import load_tool

bench = load_tool('benchmark')
TINY = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])


def _in_git_checkout() -> bool:
    return shutil.which('git') is not None and subprocess.run(
        ['git', '-C', bench.REPO_ROOT, 'rev-parse', 'HEAD'], capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason='needs a git checkout')
def test_the_revisions_mlla_is_loaded_beside_todays_and_not_registered():
    from mlla_mm.models import MLLA
    from mlla_mm.registry import MODELS
    with tempfile.TemporaryDirectory() as folder:
        old_cls, sha = bench.load_mlla_at_revision('HEAD', folder)
    assert old_cls is not MLLA and old_cls.__module__.startswith(f'_mlla_mm_at_{sha[:12]}.')
    assert MODELS.get('MLLA') is MLLA
    torch.manual_seed(0)
    new = MLLA(TINY).eval()
    old = old_cls(TINY).eval()
    old.load_state_dict(new.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(new(x), old(x)))  # HEAD's code, HEAD's weights


@pytest.mark.skipif(not _in_git_checkout(), reason='needs a git checkout')
def test_an_unknown_revision_is_a_one_line_error(capsys):
    assert bench.main(['--against-rev', 'no-such-revision-xyz']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and "'no-such-revision-xyz'" in err[0]


def test_missing_git_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(bench.shutil, 'which', lambda name: None)
    assert bench.main(['--against-rev', 'HEAD']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --against-rev needs git, which is not on PATH']
