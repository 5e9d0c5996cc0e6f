"""Does this CPU run bf16 matrix products faster than fp32?

bf16 only pays on x86 CPUs with native bf16 dot-product instructions:
AMX (``amx_bf16``, Intel Sapphire Rapids and later) or AVX512-BF16
(``avx512_bf16``, Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4
and later). Elsewhere (AVX2-only CPUs, AVX-512 without BF16) oneDNN and
ONNX Runtime convert bf16 to fp32 around every kernel, which makes bf16
inference and ``--amp`` training slower than fp32, not faster.

The tools that offer bf16 (``tools/train.py --amp``, the ONNX export and
``tools/benchmark.py``) call :func:`bf16_fast_on_this_cpu` and print a one-line
warning when it returns ``False``. This module is the one reader of
``/proc/cpuinfo`` (:func:`read_cpuinfo`); :func:`cpu_description` names the
CPU and the instruction sets that decide bf16 and INT8 speed (AVX512-BF16,
AVX512-VNNI / AVX-VNNI, AMX).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

CPUINFO = '/proc/cpuinfo'
BF16_FLAGS = ('amx_bf16', 'avx512_bf16')
VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')
#: the flags named in a benchmark's CPU line: vector width, bf16, INT8 dot products (VNNI), AMX
NAMED_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8')


def _parse_cpuinfo(text: str) -> tuple[set[str], str]:
    """Flags and model name of the first processor in ``/proc/cpuinfo`` text.

    Args:
        text: contents of ``/proc/cpuinfo`` (x86 ``flags`` line).

    Returns:
        The set of flags and the model name ('' when absent).
    """
    flags: set[str] = set()
    model = ''
    for line in text.splitlines():
        key, sep, value = line.partition(':')
        if not sep:
            continue
        key = key.strip().lower()
        if key == 'flags' and not flags:
            flags = set(value.split())
        elif key == 'model name' and not model:
            model = value.strip()
    return flags, model


def read_cpuinfo(cpuinfo_text: Optional[str] = None) -> tuple[set[str], str]:
    """Flags and model name of this machine's CPU (``cpuinfo_text`` instead of ``/proc/cpuinfo``, for tests).

    Without ``/proc/cpuinfo`` (macOS, Windows) both are empty.
    """
    if cpuinfo_text is None:
        try:
            with open(CPUINFO, encoding='utf-8', errors='replace') as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ''
    return _parse_cpuinfo(cpuinfo_text)


def bf16_fast_on_this_cpu(cpuinfo_text: Optional[str] = None) -> tuple[bool, str]:
    """Whether the CPU has AMX or AVX512-BF16, with a description.

    Args:
        cpuinfo_text: ``/proc/cpuinfo`` contents to judge (for tests); by
            default the file is read, and where it does not exist or has no
            x86 ``flags`` line PyTorch's own CPU detection is asked.

    Returns:
        ``(fast, description)``: ``fast`` is ``True`` when ``amx_bf16`` or
        ``avx512_bf16`` is present; the description names the CPU and the
        bf16 flags found (or that none of them is present).
    """
    flags, model = read_cpuinfo(cpuinfo_text)
    name = model or 'this CPU'
    if flags:
        found = [f for f in BF16_FLAGS if f in flags]
        source = 'cpuinfo'
    else:  # no /proc/cpuinfo (macOS, Windows) or a non-x86 layout
        found = []
        if torch.cpu._is_amx_tile_supported():
            found.append('amx')
        if torch.cpu._is_avx512_bf16_supported():
            found.append('avx512_bf16')
        source = f'torch CPU capability {torch.backends.cpu.get_cpu_capability()}'
    if found:
        return True, f'{name} has {", ".join(found)} ({source}): bf16 matmuls run natively'
    return False, (f'{name} has neither amx_bf16 nor avx512_bf16 ({source}): bf16 is emulated '
                   'through fp32 and runs slower than fp32 here')


def cpu_description(cpuinfo_text: Optional[str] = None) -> Dict[str, object]:
    """The CPU's model name, the :data:`NAMED_FLAGS` it has, and whether bf16 / INT8 dot products are native.

    Returns:
        ``dict(model_name, flags, native_bf16, bf16_note, vnni)``: ``native_bf16`` and
        ``bf16_note`` as :func:`bf16_fast_on_this_cpu` says; ``vnni`` whether it has
        AVX512-VNNI, AVX-VNNI or AMX-INT8 (fast INT8 products).
    """
    import platform
    flags, model = read_cpuinfo(cpuinfo_text)
    native, note = bf16_fast_on_this_cpu(cpuinfo_text)
    return dict(model_name=model or platform.processor() or 'unknown CPU',
                flags=[f for f in NAMED_FLAGS if f in flags], native_bf16=native, bf16_note=note,
                vnni=any(f in flags for f in VNNI_FLAGS))


def cpu_line(cpuinfo_text: Optional[str] = None) -> str:
    """``'CPU: AMD EPYC 9R14 (avx2 avx512f avx512_bf16 avx512_vnni; bf16 native, VNNI yes, AMX no)'``."""
    cpu = cpu_description(cpuinfo_text)
    amx = any(f.startswith('amx') for f in cpu['flags'])
    return (f"CPU: {cpu['model_name']} ({' '.join(cpu['flags']) or 'no AVX2/AVX-512 flags read'}; "
            f"bf16 {'native' if cpu['native_bf16'] else 'emulated'}, VNNI {'yes' if cpu['vnni'] else 'no'}, "
            f"AMX {'yes' if amx else 'no'})")
