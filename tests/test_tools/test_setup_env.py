"""tools/setup_env.sh: the compile settings of the one-time mmcv build (issue 15, target 5)."""
import os
import platform
import re
import shlex
import subprocess
import time
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


FAKE_PYTHON = r'''#!/usr/bin/env bash
# A stand-in for .venv/bin/python: records its arguments, fakes what the set-up asks of pip.
echo "$*" >> "$(dirname "$0")/calls.log"
if [[ "$1" == "-c" && "$2" == *"import mmcv"* ]]; then exit 1; fi   # no mmcv yet: build it
if [[ "$1" == "-c" && "$2" == *"version_info"* ]]; then echo cp311; exit 0; fi
# tools/cuda_setup.py: the plan is what plan.txt beside this file says (none: no answer, the CPU build)
if [[ "$1" == *cuda_setup.py && "$2" == plan ]]; then cat "$(dirname "$0")/plan.txt" 2>/dev/null; exit 0; fi
if [[ "$1" == *cuda_setup.py && "$2" == toolchain ]]; then
  printf 'CUDA_HOME=/fake/cuda-home\nCUDA_TOOLCHAIN=%q\n' 'nvcc 13.0 from pip packages'; exit 0
fi
if [[ "$1" == "-m" && "$2" == "pip" && "$3" == "download" ]]; then
  while [[ $# -gt 0 ]]; do [[ "$1" == "-d" ]] && dest="$2"; shift; done
  work="$(mktemp -d)"; mkdir -p "$work/mmcv-2.1.0" "$dest"
  echo "extra_compile_args = ['-std=c++17']" > "$work/mmcv-2.1.0/setup.py"
  tar -czf "$dest/mmcv-2.1.0.tar.gz" -C "$work" mmcv-2.1.0; exit 0
fi
if [[ "$1" == "-m" && "$2" == "pip" && "$3" == "wheel" ]]; then
  grep -q 'c++20' setup.py || exit 3          # run in the unpacked source, patched to C++20
  echo "build env: FORCE_CUDA=${FORCE_CUDA:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-}" \
    >> "$(dirname "$0")/calls.log"
  while [[ $# -gt 0 ]]; do [[ "$1" == "-w" ]] && dest="$2"; shift; done
  mkdir -p "$dest"; sleep 1; touch "$dest/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"; exit 0
fi
exit 0
'''


def _project_with_fake_python(tmp_path: Path) -> Path:
    """A copy of the script in a project folder whose .venv/bin/python is :data:`FAKE_PYTHON`."""
    root = tmp_path / 'project'
    (root / 'tools').mkdir(parents=True)
    (root / 'tools' / 'setup_env.sh').write_text(SCRIPT)
    for name in ('setup.cfg', 'pyproject.toml'):  # part of the stamp
        (root / name).write_text(f'# {name}\n')
    py = root / '.venv' / 'bin' / 'python'
    py.parent.mkdir(parents=True)
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return root


def _cached_cpu_wheel(cache: Path) -> Path:
    """A CPU (``cpuops``) mmcv wheel in the wheel cache ``cache``, as an earlier set-up leaves it; its folder."""
    cpu = cache / f'mmcv-2.1.0-torch2.14.1-cp311-{platform.machine()}-cpuops'
    cpu.mkdir(parents=True)
    (cpu / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl').touch()
    return cpu


def _run_setup(root: Path, cache: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``root``'s tools/setup_env.sh with the wheel cache ``cache``."""
    return subprocess.run(['bash', str(root / 'tools' / 'setup_env.sh')],
                          env=dict(os.environ, MLLA_MM_CACHE=str(cache)), capture_output=True, text=True,
                          timeout=timeout)


def test_a_gpu_machine_builds_cuda_kernels_for_its_architecture_under_their_own_cache_name(tmp_path):
    """The CUDA branch (issue 29): toolchain, patches, FORCE_CUDA / TORCH_CUDA_ARCH_LIST / CUDA_HOME in the
    build, the wheel cached as ``...-cuda13.0-sm90``; a CPU wheel already in the cache is not used."""
    root = _project_with_fake_python(tmp_path)
    bindir = root / '.venv' / 'bin'
    (bindir / 'plan.txt').write_text("MMCV_BUILD=cuda\nMMCV_CACHE_TAG=cuda13.0-sm90\nMMCV_CUDA_ARCH=9.0\n"
                                     "MMCV_CUDA=13.0\nMMCV_BUILD_NOTE='CUDA build for NVIDIA H100'\n")
    cache = tmp_path / 'cache'
    _cached_cpu_wheel(cache)
    proc = _run_setup(root, cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'CUDA build for NVIDIA H100' in proc.stderr
    assert 'CUDA kernels for TORCH_CUDA_ARCH_LIST=9.0 with nvcc 13.0 from pip packages' in proc.stderr
    wheels = list(cache.glob('mmcv-2.1.0-torch*-cuda13.0-sm90/mmcv-*.whl'))
    assert len(wheels) == 1, list(cache.rglob('*'))
    calls = (bindir / 'calls.log').read_text()
    assert 'build env: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/fake/cuda-home' in calls
    assert 'cuda_setup.py patch-mmcv' in calls and f'--venv {root / ".venv"}' in calls
    assert str(wheels[0]) in calls and 'cpuops' not in calls.split('--force-reinstall')[1]


def test_a_cpu_machine_reuses_the_cached_cpuops_wheel(tmp_path):
    """No plan answer (a CPU machine, or cuda_setup.py failing): the same cache name as before, no rebuild."""
    root = _project_with_fake_python(tmp_path)
    cache = tmp_path / 'cache'
    cpu = _cached_cpu_wheel(cache)
    proc = _run_setup(root, cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'using cached mmcv wheel from {cpu}' in proc.stderr
    calls = (root / '.venv' / 'bin' / 'calls.log').read_text()
    assert 'pip wheel' not in calls and 'toolchain' not in calls and 'build env' not in calls


def test_first_run_builds_mmcv_and_exits_0(tmp_path):
    """The whole first-run path (build mmcv, cache the wheel, write the stamp) ends with exit code 0.

    Run on a copy of the script with a fake interpreter: a failing command in an EXIT trap (kill of
    the progress ticker after it ended) used to turn a successful set-up into exit 1, which stopped
    ``make test`` on every machine without a cached wheel.
    """
    root = _project_with_fake_python(tmp_path)
    cache = tmp_path / 'cache'
    start = time.monotonic()
    proc = _run_setup(root, cache)
    # The progress ticker (a line a minute) ends with the build: nothing holds the output open.
    assert time.monotonic() - start < 30
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'environment ready' in proc.stderr
    assert (root / '.venv' / '.mlla-mm-setup').is_file()
    wheels = list(cache.glob('mmcv-2.1.0-torch*-cpuops/mmcv-*.whl'))
    assert len(wheels) == 1, list(cache.rglob('*'))
    assert not list(cache.glob('tmp.*')), 'the build directory was left behind'
    calls = (root / '.venv' / 'bin' / 'calls.log').read_text()
    assert '--force-reinstall --no-deps' in calls and wheels[0].name in calls
    # A second run finds the stamp and only checks mmcv's ops.
    again = _run_setup(root, cache, timeout=60)
    assert again.returncode == 0 and 'environment up to date' in again.stderr, again.stderr
