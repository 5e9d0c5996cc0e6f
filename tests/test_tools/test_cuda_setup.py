"""tools/cuda_setup.py: the CUDA half of the set-up (issue 29), with fake torch answers, nvidia-smi and nvcc."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'tools' / 'cuda_setup.py'
_spec = importlib.util.spec_from_file_location('cuda_setup', SCRIPT)
cs = importlib.util.module_from_spec(_spec)
sys.modules['cuda_setup'] = cs  # (dataclasses look their module up)
_spec.loader.exec_module(cs)

TORCH_ARCHES = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']  # torch 2.14.1+cu130's list


def _gpu(*caps, names=None):
    return cs.TorchCuda(True, '13.0', list(caps), names or ['NVIDIA H100'] * len(caps), TORCH_ARCHES)


NO_GPU = cs.TorchCuda(False, '13.0', [], [], TORCH_ARCHES, error='')


def _exe(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/usr/bin/env bash\n' + body)
    path.chmod(0o755)
    return path


def _fake_nvcc(home: Path, release: str, headers: bool = True) -> Path:
    if headers:
        (home / 'include').mkdir(parents=True, exist_ok=True)
        (home / 'include' / 'cuda_runtime.h').write_text(f'// {release}')
    return _exe(home / 'bin' / 'nvcc', f'echo "Cuda compilation tools, release {release}, V{release}.88"\n')


# ---------------------------------------------------------------- the plan
def test_a_usable_gpu_gets_the_cuda_build_for_its_architecture_only():
    plan = cs.make_plan(_gpu((9, 0)), [], {})
    assert (plan.build, plan.arch_list, plan.tag, plan.cuda) == ('cuda', '9.0', 'cuda13.0-sm90', '13.0')
    assert 'H100' in plan.note and 'TORCH_CUDA_ARCH_LIST=9.0' in plan.note
    two = cs.make_plan(_gpu((8, 6), (9, 0), (8, 6), names=['A', 'B', 'A']), [], {})
    assert (two.arch_list, two.tag) == ('8.6;9.0', 'cuda13.0-sm86-sm90')


def test_a_gpu_newer_than_torch_is_clamped_to_torchs_newest_architecture():
    assert cs.arch_list_for([(12, 1)], TORCH_ARCHES) == '12.0'
    assert cs.arch_list_for([(7, 5)], TORCH_ARCHES) == '7.5'


def test_cpu_machines_and_setup_cpu_only_keep_the_cpu_build_and_its_cache_name():
    assert (cs.make_plan(NO_GPU, [], {}).build, cs.make_plan(NO_GPU, [], {}).tag) == ('cpu', 'cpuops')
    assert cs.make_plan(NO_GPU, [], {}).note == ''  # a CPU machine: nothing new printed
    forced = cs.make_plan(_gpu((9, 0)), [], {'SETUP_CPU_ONLY': '1'})
    assert (forced.build, forced.tag) == ('cpu', 'cpuops') and 'SETUP_CPU_ONLY' in forced.note
    assert cs.make_plan(_gpu((9, 0)), [], {'SETUP_CPU_ONLY': '0'}).build == 'cuda'


def test_a_gpu_that_torch_cannot_use_is_explained_and_built_for_the_cpu(tmp_path, monkeypatch):
    _exe(tmp_path / 'bin' / 'nvidia-smi', 'echo "NVIDIA A100-SXM4-80GB, 535.104.05, 8.0"\n')
    monkeypatch.setenv('PATH', f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}')
    gpus = cs.nvidia_smi_gpus()
    assert gpus == [dict(name='NVIDIA A100-SXM4-80GB', driver='535.104.05', compute_cap='8.0')]
    plan = cs.make_plan(cs.TorchCuda(False, '13.0', [], [], TORCH_ARCHES, error='driver too old'), gpus, {})
    assert plan.build == 'cpu' and plan.tag == 'cpuops'
    assert 'A100' in plan.note and '535.104.05' in plan.note and 'driver too old' in plan.note


def test_nvidia_smi_missing_or_failing_lists_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    assert cs.nvidia_smi_gpus() == []
    _exe(tmp_path / 'nvidia-smi', 'echo "NVIDIA-SMI has failed" >&2; exit 9\n')
    assert cs.nvidia_smi_gpus() == []


def test_plan_on_this_machine_prints_shell_lines_for_bash(monkeypatch):
    """The real torch of the environment, read back through bash as tools/setup_env.sh does."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', SETUP_CPU_ONLY='1')
    out = subprocess.run([sys.executable, str(SCRIPT), 'plan'], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    shown = subprocess.run(['bash', '-c', out + 'echo "$MMCV_BUILD|$MMCV_CACHE_TAG|$MMCV_BUILD_NOTE"'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown.startswith('cpu|cpuops|SETUP_CPU_ONLY'), shown


def test_shell_lines_survive_quotes():
    line = cs.shell_lines({'NOTE': "it's a GPU; $HOME `x`"})
    assert subprocess.run(['bash', '-c', line + 'printf %s "$NOTE"'], capture_output=True, text=True).stdout \
        == "it's a GPU; $HOME `x`"


# ---------------------------------------------------------------- the toolchain
def test_find_nvcc_takes_the_first_of_torchs_major_version(tmp_path):
    usr = tmp_path / 'usr_local'
    old = _fake_nvcc(tmp_path / 'old-cuda', '12.4')
    _fake_nvcc(usr / 'cuda-12.8', '12.8')
    new = _fake_nvcc(usr / 'cuda-13.0', '13.0')
    _fake_nvcc(usr / 'cuda-13.1', '13.1')
    env = {'CUDA_HOME': str(old.parent.parent), 'PATH': ''}
    nvcc, notes = cs.find_nvcc('13.0', env, usr_local=str(usr))
    assert nvcc == str(usr / 'cuda-13.1' / 'bin' / 'nvcc')  # newest 13.x first; CUDA_HOME's 12.4 refused
    assert any('12.4' in n for n in notes)
    env = {'PATH': str(new.parent)}
    assert cs.find_nvcc('13.0', env, usr_local=str(tmp_path / 'none'))[0] == str(new)
    # a wrapper script on PATH (like /usr/local/bin/nvcc) has no toolkit beside it: not a CUDA_HOME
    wrapper = _fake_nvcc(tmp_path / 'wrap', '13.0', headers=False)
    nvcc, notes = cs.find_nvcc('13.0', {'PATH': str(wrapper.parent)}, usr_local=str(tmp_path / 'none'))
    assert nvcc is None and 'no include/cuda_runtime.h' in notes[0]
    assert cs.find_nvcc('13.0', {'PATH': ''}, usr_local=str(tmp_path / 'none')) == (None, [])


def test_toolchain_packages_match_torchs_cuda():
    assert cs.toolchain_packages('13.0') == ['nvidia-cuda-nvcc==13.0.*', 'nvidia-cuda-crt==13.0.*',
                                             'nvidia-nvvm==13.0.*', 'nvidia-cuda-cccl==13.0.*',
                                             'nvidia-cuda-runtime==13.0.*']
    assert cs.toolchain_packages('12.8')[0] == 'nvidia-cuda-nvcc-cu12==12.8.*'


def _pip_layout(root: Path, release: str, files=('include/cuda_runtime.h', 'lib/libcudart.so.13')) -> Path:
    cu = root / 'nvidia' / 'cu13'
    _fake_nvcc(cu, release)
    for rel in files:
        (cu / rel).parent.mkdir(parents=True, exist_ok=True)
        (cu / rel).write_text(rel)
    return cu


def test_cuda_home_view_merges_the_pip_folders_and_adds_libcudart_so(tmp_path):
    tool = _pip_layout(tmp_path / 'tool', '13.0')
    site = _pip_layout(tmp_path / 'site', '13.0', files=('include/cublas_v2.h', 'lib/libcublas.so.13'))
    (tool / 'lib64').symlink_to('lib')  # as /usr/local/cuda has it: the view has one real lib/ and no lib64
    view = cs.make_cuda_home(tmp_path / 'home', [tool, site])
    assert (view / 'include' / 'cuda_runtime.h').read_text() == 'include/cuda_runtime.h'
    assert (view / 'include' / 'cublas_v2.h').read_text() == 'include/cublas_v2.h'
    assert (view / 'lib').is_dir() and not (view / 'lib').is_symlink()
    assert os.readlink(view / 'lib' / 'libcudart.so') == 'libcudart.so.13'
    assert (view / 'lib' / 'libcublas.so.13').exists() and not (view / 'lib64').exists()
    assert cs.nvcc_version(str(view / 'bin' / 'nvcc')) == '13.0'
    # made again from scratch: the links only, nothing in the pip folders changed
    cs.make_cuda_home(view, [tool, site])
    assert sorted(p.name for p in (tool / 'lib').iterdir()) == ['libcudart.so.13']


def test_toolchain_installs_the_pip_compiler_when_no_nvcc_matches(tmp_path, monkeypatch):
    site = _pip_layout(tmp_path / 'site', '13.0', files=('include/cublas_v2.h', 'lib/libcudart.so.13'))
    (site / 'bin' / 'nvcc').unlink()  # torch's packages: headers and libraries, no compiler
    monkeypatch.setattr(cs, 'site_packages', lambda python: tmp_path / 'site')
    installed = []

    def fake_pip(python, packages, target=None):
        installed.append((list(packages), target))
        _pip_layout(target, '13.0')
    monkeypatch.setattr(cs, 'pip_install', fake_pip)
    usr = tmp_path / 'usr_local'
    _fake_nvcc(usr / 'cuda-12.4', '12.4')
    found = cs.toolchain('13.0', sys.executable, tmp_path / 'view', {'PATH': ''}, target=tmp_path / 'tc',
                         usr_local=str(usr))
    assert installed == [(cs.toolchain_packages('13.0'), tmp_path / 'tc')]
    assert found['CUDA_HOME'] == str(tmp_path / 'view')
    assert (tmp_path / 'view' / 'include' / 'cublas_v2.h').exists()  # torch's own headers are in the view
    assert 'pip packages' in found['CUDA_TOOLCHAIN']
    # a second time: already installed, nothing downloaded
    cs.toolchain('13.0', sys.executable, tmp_path / 'view', {'PATH': ''}, target=tmp_path / 'tc',
                 usr_local=str(usr))
    assert len(installed) == 1


def test_toolchain_uses_a_matching_system_nvcc_with_torchs_own_headers(tmp_path, monkeypatch):
    """A system toolkit may lack the cuSPARSE / cuBLAS headers that torch's CUDA headers include (this
    machine's /usr/local/cuda-13.0 does): the environment's pip NVIDIA folder supplies them."""
    monkeypatch.setattr(cs, 'pip_install', lambda *a, **k: pytest.fail('nothing should be installed'))
    nvcc = _fake_nvcc(tmp_path / 'usr_local' / 'cuda-13.0', '13.0')
    monkeypatch.setattr(cs, 'site_packages', lambda python: tmp_path / 'bare_site')
    found = cs.toolchain('13.0', sys.executable, tmp_path / 'view', {'PATH': ''}, usr_local=str(tmp_path / 'usr_local'))
    assert found['CUDA_HOME'] == str(nvcc.parent.parent.resolve())  # nothing to add: the toolkit as it is
    _pip_layout(tmp_path / 'site', '13.0', files=('include/cusparse.h', 'include/cuda_runtime.h'))
    monkeypatch.setattr(cs, 'site_packages', lambda python: tmp_path / 'site')
    found = cs.toolchain('13.0', sys.executable, tmp_path / 'view', {'PATH': ''}, usr_local=str(tmp_path / 'usr_local'))
    home = Path(found['CUDA_HOME'])
    assert home == tmp_path / 'view' and (home / 'include' / 'cusparse.h').exists()
    assert (home / 'include' / 'cuda_runtime.h').read_text() == '// 13.0'  # the toolkit's own header first
    assert 'at ' + str(nvcc) in found['CUDA_TOOLCHAIN']


# ---------------------------------------------------------------- patches and the compile check's parts
def test_patch_mmcv_changes_the_source_folder_once(tmp_path):
    (tmp_path / 'setup.py').write_text("args = ['-std=c++17']\n")
    assert len(cs.patch_mmcv(tmp_path)) == 1
    assert "'-std=c++20'" in (tmp_path / 'setup.py').read_text()
    assert cs.patch_mmcv(tmp_path) == []


def test_mmcv_extension_is_read_from_setup_py_without_building(tmp_path, monkeypatch):
    (tmp_path / 'setup.py').write_text(
        'import os\nfrom setuptools import setup, Extension\n'
        "srcs = ['a.cu'] if os.getenv('FORCE_CUDA') == '1' else ['a.cpp']\n"
        "setup(name='x', ext_modules=[Extension('x._ext', srcs)])\n")
    monkeypatch.setenv('FORCE_CUDA', '1')
    ext = cs.mmcv_extension(tmp_path)
    assert ext.name == 'x._ext' and ext.sources == ['a.cu']
    assert not (tmp_path / 'build').exists()


def test_ninja_cuda_flags_fills_in_the_variables():
    text = ('cuda_cflags = -DMMCV_WITH_CUDA -I/inc\ncuda_post_cflags = -std=c++20 '
            '-gencode=arch=compute_90,code=sm_90\nnvcc = /h/bin/nvcc\n\n'
            'rule cuda_compile\n  depfile = $out.d\n  deps = gcc\n'
            '  command = $nvcc  $cuda_cflags -c $in -o $out $cuda_post_cflags\n')
    assert cs.ninja_cuda_flags(text) == ('/h/bin/nvcc -DMMCV_WITH_CUDA -I/inc -c $in -o $out -std=c++20 '
                                         '-gencode=arch=compute_90,code=sm_90')
    assert cs.ninja_cuda_flags('rule compile\n  command = g++\n') == ''


def test_check_cuda_toolchain_mode_is_wired_to_the_compile_check():
    """``tools/setup_env.sh --check-cuda-toolchain`` runs ``cuda_setup.py check-toolchain``, time-bounded."""
    text = (ROOT / 'tools' / 'setup_env.sh').read_text()
    block = text[text.index('"--check-cuda-toolchain" ]]'):]
    block = block[:block.index('\nfi\n')]
    assert 'exec timeout' in block and 'cuda_setup.py" check-toolchain' in block
    assert 'check-cuda-toolchain:' in (ROOT / 'Makefile').read_text()
