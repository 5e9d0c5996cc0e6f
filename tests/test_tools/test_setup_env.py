"""tools/setup_env.sh: the compile settings of the one-time mmcv build (issue 15, target 5)."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / 'tools' / 'setup_env.sh').read_text()


def _build_flags_value() -> str:
    """The value of ``MMCV_BUILD_CPPFLAGS`` in tools/setup_env.sh."""
    match = re.search(r'^MMCV_BUILD_CPPFLAGS="([^"]*)"$', SCRIPT, re.M)
    assert match, 'tools/setup_env.sh does not set MMCV_BUILD_CPPFLAGS'
    return match.group(1)


def _mmcv_build_command() -> str:
    """The command that builds the mmcv wheel (from ``MMCV_WITH_OPS=1`` to ``pip wheel``)."""
    match = re.search(r'MMCV_WITH_OPS=1.*?-m pip wheel', SCRIPT, re.S)
    assert match, 'no mmcv build command in tools/setup_env.sh'
    return match.group(0)


def _cppflags_seen_by_the_build(user_cppflags: str | None) -> str:
    """Expand the build command's ``CPPFLAGS=...`` assignment with bash, as the script does."""
    assignment = re.search(r'CPPFLAGS="([^"\n]*)"', _mmcv_build_command())
    assert assignment, 'the mmcv build command does not set CPPFLAGS'
    env = {k: v for k, v in os.environ.items() if k != 'CPPFLAGS'}
    if user_cppflags is not None:
        env['CPPFLAGS'] = user_cppflags
    code = (f'MMCV_BUILD_CPPFLAGS={shlex.quote(_build_flags_value())}\n'
            f'printf %s "{assignment.group(1)}"')
    return subprocess.run(['bash', '-c', code], env=env, capture_output=True, text=True, check=True).stdout


def test_mmcv_build_turns_debug_info_off_and_keeps_user_cppflags():
    assert '-g0' in _build_flags_value().split()
    assert _cppflags_seen_by_the_build(None).split() == ['-g0']
    assert _cppflags_seen_by_the_build('-I/opt/x -DFOO').split() == ['-I/opt/x', '-DFOO', '-g0']


def test_build_flags_reach_the_compile_line_after_pythons_cflags(monkeypatch):
    """setuptools puts CPPFLAGS after Python's CFLAGS: -O3 stays, the last -g flag is -g0."""
    import sysconfig

    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
    if sysconfig.get_config_var('CC') is None:
        pytest.skip('Python has no compiler configuration (not a unix build)')
    monkeypatch.delenv('CFLAGS', raising=False)
    monkeypatch.setenv('CPPFLAGS', _cppflags_seen_by_the_build(None))
    compiler = new_compiler(compiler='unix')
    customize_compiler(compiler)
    line = compiler.compiler_so
    python_cflags = (sysconfig.get_config_var('CFLAGS') or '').split()
    # Python's own flags (optimisation level included) are all kept, in order, before ours.
    assert line[1:1 + len(python_cflags)] == python_cflags
    debug = [flag for flag in line if re.fullmatch(r'-g\d?|-ggdb\d?', flag)]
    assert debug[-1] == '-g0', line
    assert [flag for flag in line if flag.startswith('-O')] == [f for f in python_cflags if f.startswith('-O')]
