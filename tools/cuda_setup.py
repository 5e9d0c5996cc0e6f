#!/usr/bin/env python
"""The CUDA half of tools/setup_env.sh: which mmcv build a machine gets, its toolchain, its patches, a compile check.

Run with the virtual environment's Python (torch installed), by the set-up::

    cuda_setup.py plan                      # shell lines: MMCV_BUILD=cpu|cuda, MMCV_CACHE_TAG, TORCH_CUDA_ARCH_LIST
    cuda_setup.py toolchain --venv .venv    # shell lines: CUDA_HOME=... (an nvcc of torch's CUDA major version)
    cuda_setup.py patch-mmcv SRC            # what mmcv 2.1.0's CUDA sources need for CUDA 13 / torch 2.14
    cuda_setup.py check-toolchain ...       # compile a few of mmcv's .cu files with the build's own flags

``plan`` decides: a usable GPU (``torch.cuda.is_available()``) and no
``SETUP_CPU_ONLY=1`` gives the CUDA build for that GPU's architecture only;
everything else the CPU build, whose wheel cache name (``...-cpuops``) is
unchanged. ``nvidia-smi`` is only asked to explain a GPU that torch cannot use
(a driver too old for torch's CUDA). ``toolchain`` looks for an ``nvcc`` of
torch's CUDA major version (``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda*``,
``PATH``), else installs NVIDIA's compiler packages from the package index into
the environment, and points ``CUDA_HOME`` at a folder of links that torch's
extension builder can use (``include``, ``bin``, ``lib`` with ``libcudart.so``).
Nothing here writes into an installed package except through pip.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: The wheel cache's name for the CPU build (tools/setup_env.sh); kept so cached CPU wheels stay valid.
CPU_TAG = 'cpuops'
#: mmcv's sample files the toolchain check compiles: the two ops Mask R-CNN needs on a GPU.
CHECK_FILES = ('nms_cuda.cu', 'roi_align_cuda.cu')


def log(msg: str) -> None:
    """One ``[setup]`` line on stderr, as tools/setup_env.sh prints."""
    print(f'[setup] {msg}', file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# What the machine has.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class TorchCuda:
    """What torch says about CUDA on this machine."""

    available: bool
    cuda: Optional[str]  # torch.version.cuda, e.g. '13.0' (None: a CPU-only torch)
    capabilities: List[Tuple[int, int]]  # of each visible device
    names: List[str]
    arch_list: List[str]  # torch.cuda.get_arch_list(), e.g. ['sm_75', ..., 'sm_120']
    error: str = ''  # why CUDA is not available, when torch says


def probe_torch() -> TorchCuda:
    """Ask the installed torch (imported here) about CUDA; no exception escapes."""
    import warnings
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return TorchCuda(False, None, [], [], [], error=f'torch does not import: {err}')
    error = ''
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            available = bool(torch.cuda.is_available())
        except Exception as err:  # noqa: BLE001
            available, error = False, str(err)
    if not available and not error:
        error = ' '.join(' '.join(str(w.message) for w in caught).split())[:300]
    caps, names = [], []
    if available:
        for i in range(torch.cuda.device_count()):
            caps.append(tuple(torch.cuda.get_device_capability(i)))
            names.append(torch.cuda.get_device_name(i))
    return TorchCuda(available, torch.version.cuda, caps, names, list(torch.cuda.get_arch_list() or []), error)


def nvidia_smi_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> List[Dict[str, str]]:
    """The GPUs ``nvidia-smi`` lists (name, driver, compute capability); [] without it or when it fails."""
    exe = shutil.which('nvidia-smi')
    if not exe:
        return []
    try:
        proc = run([exe, '--query-gpu=name,driver_version,compute_cap', '--format=csv,noheader'],
                   capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    gpus = []
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split(',')]
        if len(parts) >= 2 and parts[0]:
            gpus.append(dict(name=parts[0], driver=parts[1], compute_cap=parts[2] if len(parts) > 2 else ''))
    return gpus


# --------------------------------------------------------------------------
# The plan: CPU or CUDA build, its architecture and cache name.
# --------------------------------------------------------------------------
def arch_list_for(caps: Sequence[Tuple[int, int]], torch_arches: Sequence[str]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for the present GPUs, e.g. ``'9.0'`` (``'8.6;9.0'`` for two kinds).

    Each capability is clamped to the newest ``sm_XY`` torch was built for (as torch's own
    extension builder does: a GPU newer than torch runs that code).
    """
    built = sorted({(int(a[3:-1]), int(a[-1])) for a in torch_arches if re.fullmatch(r'sm_\d+', a)})
    out = []
    for cap in sorted(set(tuple(c) for c in caps)):
        if built:
            cap = min(cap, built[-1])
        text = f'{cap[0]}.{cap[1]}'
        if text not in out:
            out.append(text)
    return ';'.join(out)


def cache_tag(cuda: str, arch_list: str) -> str:
    """The wheel cache suffix of a CUDA build, e.g. ``cuda13.0-sm90`` (``cuda13.0-sm86-sm90``)."""
    arches = '-'.join('sm' + a.replace('.', '') for a in arch_list.split(';') if a)
    return f'cuda{cuda}-{arches}'


@dataclasses.dataclass
class Plan:
    """Which mmcv build the set-up makes."""

    build: str  # 'cpu' or 'cuda'
    tag: str  # wheel cache suffix: 'cpuops' or e.g. 'cuda13.0-sm90'
    arch_list: str = ''  # TORCH_CUDA_ARCH_LIST for a CUDA build
    cuda: str = ''  # torch's CUDA version for a CUDA build
    note: str = ''  # one line for the user (why this build)


def make_plan(info: TorchCuda, smi: List[Dict[str, str]], env: Dict[str, str]) -> Plan:
    """Decide the build from torch's answer, nvidia-smi's list and ``SETUP_CPU_ONLY``."""
    if env.get('SETUP_CPU_ONLY', '0') not in ('', '0'):
        return Plan('cpu', CPU_TAG, note='SETUP_CPU_ONLY is set: building the CPU ops only')
    if info.available and info.cuda and info.capabilities:
        arch = arch_list_for(info.capabilities, info.arch_list)
        names = ', '.join(sorted(set(info.names))) or 'a GPU'
        return Plan('cuda', cache_tag(info.cuda, arch), arch, info.cuda,
                    note=f'CUDA build for {names} (TORCH_CUDA_ARCH_LIST={arch}, CUDA {info.cuda})')
    if smi:
        gpu = smi[0]
        why = info.error or 'torch.cuda.is_available() is False'
        need = f' (torch {info.cuda} needs a driver for CUDA {info.cuda})' if info.cuda else ''
        return Plan('cpu', CPU_TAG, note=f'nvidia-smi lists {gpu["name"]} (driver {gpu["driver"]}) but torch cannot '
                                         f'use it: {why}{need}; building the CPU ops only')
    return Plan('cpu', CPU_TAG, note='')


def shell_lines(values: Dict[str, str]) -> str:
    """``NAME=value`` lines, quoted for bash's ``eval``."""
    return ''.join(f'{k}={shlex.quote(str(v))}\n' for k, v in values.items())


# --------------------------------------------------------------------------
# The toolchain: an nvcc of torch's CUDA major version.
# --------------------------------------------------------------------------
def nvcc_version(nvcc: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[str]:
    """``'13.0'`` from ``nvcc --version`` ("release 13.0"), or None when it does not run."""
    try:
        proc = run([nvcc, '--version'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'release (\d+)\.(\d+)', proc.stdout or '')
    return f'{match.group(1)}.{match.group(2)}' if proc.returncode == 0 and match else None


def nvcc_candidates(env: Dict[str, str], usr_local: str = '/usr/local') -> List[str]:
    """Where to look for nvcc, in order: ``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda``,
    ``/usr/local/cuda-*`` (newest first), ``PATH``."""
    homes = [env.get('CUDA_HOME', ''), env.get('CUDA_PATH', ''), os.path.join(usr_local, 'cuda')]

    def version_key(path: str) -> Tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r'\d+', os.path.basename(path)))
    homes += sorted(glob.glob(os.path.join(usr_local, 'cuda-*')), key=version_key, reverse=True)
    found = [os.path.join(h, 'bin', 'nvcc') for h in homes if h]
    on_path = shutil.which('nvcc', path=env.get('PATH', ''))
    if on_path:
        found.append(on_path)
    out = []
    for path in found:
        if path not in out and os.path.isfile(path) and os.access(path, os.X_OK):
            out.append(path)
    return out


def cuda_home_of(nvcc: str) -> Optional[Path]:
    """The toolkit folder of an nvcc (``.../bin/nvcc`` -> ``...``) when it has the CUDA headers, else None
    (e.g. a ``/usr/local/bin/nvcc`` wrapper script)."""
    home = Path(nvcc).resolve().parent.parent
    return home if (home / 'include' / 'cuda_runtime.h').is_file() else None


def find_nvcc(cuda: str, env: Dict[str, str], usr_local: str = '/usr/local',
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Tuple[Optional[str], List[str]]:
    """The first nvcc whose major version is ``cuda``'s (in a toolkit folder with the CUDA headers), and notes
    on those that were not."""
    major = cuda.split('.')[0]
    notes = []
    for nvcc in nvcc_candidates(env, usr_local):
        if cuda_home_of(nvcc) is None:
            notes.append(f'{nvcc}: no include/cuda_runtime.h beside its bin/')
            continue
        version = nvcc_version(nvcc, run)
        if version and version.split('.')[0] == major:
            return nvcc, notes
        notes.append(f'{nvcc}: CUDA {version or "? (does not run)"}, not {major}.x')
    return None, notes


def toolchain_packages(cuda: str) -> List[str]:
    """NVIDIA's compiler packages for torch's CUDA ``major.minor`` (pip requirement strings)."""
    major, minor = cuda.split('.')[:2]
    if int(major) >= 13:  # one package per component, all installing into nvidia/cu13/
        names = ('nvidia-cuda-nvcc', 'nvidia-cuda-crt', 'nvidia-nvvm', 'nvidia-cuda-cccl', 'nvidia-cuda-runtime')
        return [f'{n}=={major}.{minor}.*' for n in names]
    return [f'{n}-cu{major}=={major}.{minor}.*' for n in ('nvidia-cuda-nvcc', 'nvidia-cuda-cccl',
                                                           'nvidia-cuda-runtime')]


def pip_cuda_roots(site: Path, cuda: str) -> List[Path]:
    """The folders pip's NVIDIA packages install into under ``site`` (``nvidia/cu13``; for 12: one per package)."""
    major = cuda.split('.')[0]
    if int(major) >= 13:
        root = site / 'nvidia' / f'cu{major}'
        return [root] if root.is_dir() else []
    return [p for p in sorted((site / 'nvidia').glob('cuda_*')) if p.is_dir()]


def merge_links(view: Path, roots: Sequence[Path]) -> None:
    """Make ``view`` a tree of symbolic links to the union of ``roots`` (the first root wins a name)."""
    view.mkdir(parents=True, exist_ok=True)
    names: Dict[str, List[Path]] = {}
    for root in roots:
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            names.setdefault(entry.name, []).append(entry)
    for name, entries in names.items():
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) > 1:
            merge_links(view / name, dirs)
        elif not (view / name).exists():
            os.symlink(entries[0].resolve(), view / name)


def make_cuda_home(view: Path, roots: Sequence[Path]) -> Path:
    """A ``CUDA_HOME`` for torch's extension builder: the union of ``roots`` (a toolkit with nvcc first, then
    the environment's pip NVIDIA folder, whose cuBLAS / cuSPARSE / cuSOLVER headers torch's CUDA headers include).

    Links only, the first root winning a name, with one real ``lib`` folder (no ``lib64``) that also has
    ``libcudart.so`` (pip ships only ``libcudart.so.13``; the build links ``-lcudart``). Made anew each time.
    """
    if view.is_symlink() or view.is_file():
        view.unlink()
    elif view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for root in roots:  # everything but the libraries
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            if entry.name in ('lib', 'lib64'):
                continue
            if entry.is_dir() and (view / entry.name).is_dir() and not (view / entry.name).is_symlink():
                merge_links(view / entry.name, [entry])
            elif entry.is_dir() and (view / entry.name).is_symlink():
                first = (view / entry.name).resolve()
                (view / entry.name).unlink()
                merge_links(view / entry.name, [first, entry])
            elif not (view / entry.name).exists():
                os.symlink(entry.resolve(), view / entry.name)
    lib = view / 'lib'
    lib.mkdir()
    for root in roots:
        for folder in (root / 'lib64', root / 'lib'):
            for so in sorted(folder.glob('*')) if folder.is_dir() else []:
                if not (lib / so.name).exists():
                    os.symlink(so.resolve(), lib / so.name)
    versioned = sorted(lib.glob('libcudart.so.*'))
    if versioned and not (lib / 'libcudart.so').exists():
        os.symlink(versioned[0].name, lib / 'libcudart.so')
    return view


def site_packages(python: str) -> Path:
    """The purelib folder of the environment of ``python``."""
    out = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def pip_install(python: str, packages: Sequence[str], target: Optional[Path] = None) -> None:
    """``pip install`` the packages into ``python``'s environment, or into ``target`` (a folder, all at once)."""
    cmd = [python, '-m', 'pip', 'install', '--disable-pip-version-check', '--no-deps']
    if target is not None:
        cmd += ['--target', str(target), '--upgrade']  # (--target replaces top-level folders: one call for all)
    subprocess.run(cmd + list(packages), check=True, stdout=sys.stderr)


def toolchain(cuda: str, python: str, view: Path, env: Dict[str, str], target: Optional[Path] = None,
              usr_local: str = '/usr/local') -> Dict[str, str]:
    """``CUDA_HOME`` (and how it was found) for compiling against torch's CUDA ``cuda``.

    An installed nvcc of the same major version is used as it is; else the
    packages of :func:`toolchain_packages` are installed (into ``python``'s
    environment, or ``target``) and ``view`` is made from them and the
    environment's own NVIDIA headers (cuBLAS, cuSPARSE, ... that torch's
    headers include).
    """
    nvcc, notes = find_nvcc(cuda, env, usr_local)
    for note in notes:
        log(f'not using {note}')
    site = site_packages(python)
    if nvcc:  # with the environment's own NVIDIA headers where torch brought them (a toolkit may lack cuSPARSE's)
        home = cuda_home_of(nvcc)
        extra = pip_cuda_roots(site, cuda)
        if extra:
            home = make_cuda_home(view, [home] + extra)
        return dict(CUDA_HOME=str(home), CUDA_TOOLCHAIN=f'nvcc {nvcc_version(nvcc)} at {nvcc}')
    packages = toolchain_packages(cuda)
    roots = pip_cuda_roots(target, cuda) if target is not None else []
    if not any((r / 'bin' / 'nvcc').is_file() for r in roots + pip_cuda_roots(site, cuda)):
        log(f'no nvcc for CUDA {cuda.split(".")[0]}.x on this machine: installing {" ".join(packages)}'
            f' into {target or "the environment"}')
        pip_install(python, packages, target)
    roots = (pip_cuda_roots(target, cuda) if target is not None else []) + pip_cuda_roots(site, cuda)
    home = make_cuda_home(view, roots)
    nvcc = str(home / 'bin' / 'nvcc')
    version = nvcc_version(nvcc)
    if not version or version.split('.')[0] != cuda.split('.')[0]:
        raise RuntimeError(f'the installed packages give no working nvcc for CUDA {cuda} ({nvcc}: {version})')
    return dict(CUDA_HOME=str(home), CUDA_TOOLCHAIN=f'nvcc {version} from pip packages ({" ".join(packages)})')


# --------------------------------------------------------------------------
# mmcv 2.1.0's sources: patched in the unpacked source folder, never in site-packages.
# --------------------------------------------------------------------------
#: (file relative to the source root, old text, new text, why). Applied by :func:`patch_mmcv`.
MMCV_PATCHES: List[Tuple[str, str, str, str]] = [
    ('setup.py', "'-std=c++17'", "'-std=c++20'", 'torch >= 2.10 headers need C++20'),
]


def patch_mmcv(src: Path) -> List[str]:
    """Apply :data:`MMCV_PATCHES` to the unpacked mmcv source ``src``; returns what was changed (idempotent)."""
    done = []
    for rel, old, new, why in MMCV_PATCHES:
        path = src / rel
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
            done.append(f'{rel}: {why}')
    return done


# --------------------------------------------------------------------------
# The toolchain check: compile a few .cu files with the build's own flags.
# --------------------------------------------------------------------------
def mmcv_extension(src: Path):
    """mmcv's own ``CUDAExtension`` (sources, include dirs, macros, flags), read by running its setup.py
    with ``setuptools.setup`` replaced (with ``FORCE_CUDA=1`` it builds the CUDA extension)."""
    import setuptools
    captured: Dict[str, object] = {}
    saved_setup, saved_cwd, saved_argv = setuptools.setup, os.getcwd(), sys.argv
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        os.chdir(src)
        sys.argv = ['setup.py']
        code = compile((src / 'setup.py').read_text(), str(src / 'setup.py'), 'exec')
        exec(code, {'__name__': '__main__', '__file__': str(src / 'setup.py')})  # noqa: S102 (mmcv's own setup.py)
    finally:
        setuptools.setup, sys.argv = saved_setup, saved_argv
        os.chdir(saved_cwd)
    exts = captured.get('ext_modules') or []
    if not exts:
        raise RuntimeError(f'{src}/setup.py defines no extension (MMCV_WITH_OPS=0?)')
    return exts[0]


def compile_sample(src: Path, files: Sequence[str], build: Path) -> Dict[str, object]:
    """Compile ``files`` (names under mmcv/ops/csrc/pytorch/cuda) as mmcv's build would, without linking.

    Uses torch's ``BuildExtension`` on mmcv's own extension with only those
    sources, so every flag (torch's, mmcv's, the architecture's) is the build's.
    Returns the objects, the nvcc command line of the first file and the time.
    """
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension
    ext = mmcv_extension(src)
    wanted = {os.path.basename(f) for f in files}
    ext.sources = [s for s in ext.sources if os.path.basename(s) in wanted]
    missing = wanted - {os.path.basename(s) for s in ext.sources}
    if missing:
        raise RuntimeError(f'not among mmcv\'s CUDA sources: {sorted(missing)}')
    result: Dict[str, object] = {}

    class CompileOnly(BuildExtension):
        def build_extension(self, extension) -> None:  # setuptools' compile step, no link
            result['objects'] = self.compiler.compile(
                extension.sources, output_dir=self.build_temp, macros=extension.define_macros,
                include_dirs=extension.include_dirs, debug=self.debug,
                extra_postargs=extension.extra_compile_args, depends=extension.depends)

    dist = Distribution(dict(name='mmcv-cuda-check', ext_modules=[ext]))
    cmd = CompileOnly(dist)
    cmd.build_temp = str(build / 'temp')
    cmd.build_lib = str(build / 'lib')
    cmd.ensure_finalized()
    start = time.monotonic()
    old = os.getcwd()
    os.chdir(src)
    try:
        cmd.run()
    finally:
        os.chdir(old)
    result['seconds'] = time.monotonic() - start
    ninja = next(iter(sorted(Path(cmd.build_temp).rglob('build.ninja'))), None)
    result['ninja'] = str(ninja) if ninja else ''
    result['nvcc_flags'] = ninja_cuda_flags(ninja.read_text()) if ninja else ''
    return result


def ninja_cuda_flags(text: str) -> str:
    """The nvcc command of a torch ``build.ninja`` with its variables filled in (one line)."""
    variables = dict(re.findall(r'^(\w+) = (.*)$', text, re.M))
    rule = re.search(r'^rule cuda_compile\n(?:  .*\n)*?  command = (.*)$', text, re.M)
    if not rule:
        return ''
    command = rule.group(1)
    for _ in range(3):
        command = re.sub(r'\$(\w+)', lambda m: variables.get(m.group(1), '$' + m.group(1))
                         if m.group(1) not in ('in', 'out') else m.group(0), command)
    return ' '.join(command.split())


def check_toolchain(args: argparse.Namespace) -> int:
    """``check-toolchain``: FORCE_CUDA=1, pip's nvcc in a cache folder, compile the sample files; one report."""
    import tarfile
    import tempfile

    import torch
    cuda = torch.version.cuda
    if not cuda:
        print('error: check-toolchain: this torch has no CUDA (torch.version.cuda is None)', file=sys.stderr)
        return 2
    cache = Path(args.cache)
    env = dict(os.environ)
    if args.pip_nvcc:  # the pip packages even where a system nvcc exists (what a machine without one gets)
        env.pop('CUDA_HOME', None)
        env.pop('CUDA_PATH', None)
        env['PATH'] = ''
    target = cache / f'cuda-toolchain-{cuda}'
    found = toolchain(cuda, sys.executable, cache / f'cuda-home-{cuda}', env, target=target,
                      usr_local='/nonexistent' if args.pip_nvcc else '/usr/local')
    os.environ['CUDA_HOME'] = found['CUDA_HOME']  # before torch.utils.cpp_extension reads it (on import)
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME != found['CUDA_HOME']:  # (imported earlier: it found another toolkit)
        cpp_extension.CUDA_HOME = found['CUDA_HOME']
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():  # (the set-up installs ninja only when it builds mmcv itself)
        tool = cache / 'ninja-tool'
        if not list(tool.glob('ninja/data/bin/ninja')):
            pip_install(sys.executable, ['ninja'], tool)
        os.environ['PATH'] = f'{tool / "ninja" / "data" / "bin"}{os.pathsep}{os.environ.get("PATH", "")}'
    info = probe_torch()
    arch = args.arch or (arch_list_for(info.capabilities, info.arch_list) if info.available else '9.0')
    os.environ.update(CUDA_HOME=found['CUDA_HOME'], FORCE_CUDA='1', MMCV_WITH_OPS='1', TORCH_CUDA_ARCH_LIST=arch,
                      MAX_JOBS=str(args.jobs))
    os.environ['CPPFLAGS'] = (os.environ.get('CPPFLAGS', '') + ' -g0').strip()  # as tools/setup_env.sh builds
    sdist = Path(args.sdist)
    work = Path(tempfile.mkdtemp(prefix='cuda-check.', dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter='data')
        src = next(work.glob('mmcv-*'))
        changes = patch_mmcv(src)
        log(f'toolchain check: {found["CUDA_TOOLCHAIN"]}; TORCH_CUDA_ARCH_LIST={arch}; compiling '
            f'{", ".join(args.files)} from {sdist.name} with FORCE_CUDA=1 ({args.jobs} job(s))')
        try:
            result = compile_sample(src, args.files, work / 'build')
        except Exception as err:  # noqa: BLE001 (a compile error: nvcc's output is above)
            print(f'error: check-toolchain: compiling {", ".join(args.files)} failed: '
                  f'{" ".join(str(err).split())[:500]}', file=sys.stderr)
            return 1
        print(f'cuda toolchain check: OK, {len(result["objects"])} file(s) compiled in {result["seconds"]:.0f} s')
        print(f'  toolchain: {found["CUDA_TOOLCHAIN"]} (CUDA_HOME={found["CUDA_HOME"]})')
        print(f'  torch {torch.__version__} (CUDA {cuda}), TORCH_CUDA_ARCH_LIST={arch}')
        print(f'  patches applied: {"; ".join(changes) or "none"}')
        for obj in result['objects']:
            print(f'  compiled: {os.path.relpath(obj, work / "build")} ({os.path.getsize(obj)} bytes)')
        print(f'  nvcc command: {result["nvcc_flags"]}')
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    sub.add_parser('plan', help='shell lines: MMCV_BUILD, MMCV_CACHE_TAG, TORCH_CUDA_ARCH_LIST, MMCV_BUILD_NOTE')
    p = sub.add_parser('toolchain', help='shell lines: CUDA_HOME, CUDA_TOOLCHAIN')
    p.add_argument('--venv', required=True, help='the virtual environment (its cuda-home/ is made there)')
    p = sub.add_parser('patch-mmcv', help='patch an unpacked mmcv source folder for this torch / CUDA')
    p.add_argument('src')
    p = sub.add_parser('check-toolchain', help='compile a few of mmcv\'s .cu files with the build\'s flags')
    p.add_argument('--sdist', required=True, help='mmcv-2.1.0.tar.gz')
    p.add_argument('--cache', required=True, help='where the pip toolchain and the temporary build go')
    p.add_argument('--files', nargs='+', default=list(CHECK_FILES))
    p.add_argument('--arch', default='', help='TORCH_CUDA_ARCH_LIST (default: the GPU\'s, or 9.0 without one)')
    p.add_argument('--jobs', type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument('--system-nvcc', dest='pip_nvcc', action='store_false',
                   help='use an installed nvcc when there is one (default: always the pip packages)')
    args = parser.parse_args(argv)
    if args.cmd == 'plan':
        plan = make_plan(probe_torch(), nvidia_smi_gpus(), dict(os.environ))
        sys.stdout.write(shell_lines(dict(MMCV_BUILD=plan.build, MMCV_CACHE_TAG=plan.tag,
                                          MMCV_CUDA_ARCH=plan.arch_list, MMCV_CUDA=plan.cuda,
                                          MMCV_BUILD_NOTE=plan.note)))
        return 0
    if args.cmd == 'toolchain':
        import torch
        if not torch.version.cuda:
            print('error: toolchain: this torch has no CUDA', file=sys.stderr)
            return 2
        venv = Path(args.venv)
        try:
            found = toolchain(torch.version.cuda, sys.executable, venv / 'cuda-home', dict(os.environ))
        except (RuntimeError, subprocess.CalledProcessError) as err:
            print(f'error: toolchain: {err}', file=sys.stderr)
            return 1
        sys.stdout.write(shell_lines(found))
        return 0
    if args.cmd == 'patch-mmcv':
        for change in patch_mmcv(Path(args.src)):
            log(f'patched mmcv: {change}')
        return 0
    return check_toolchain(args)


if __name__ == '__main__':
    sys.exit(main())
