"""Does this CPU run bf16 matrix products faster than fp32?

bf16 only pays on x86 CPUs with native bf16 dot-product instructions:
AMX (``amx_bf16``, Intel Sapphire Rapids and later) or AVX512-BF16
(``avx512_bf16``, Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4
and later). Elsewhere (AVX2-only CPUs, AVX-512 without BF16) oneDNN and
ONNX Runtime convert bf16 to fp32 around every kernel, which makes bf16
inference and ``--amp`` training slower than fp32, not faster.

The tools that offer bf16 (``tools/train.py --amp``, the ONNX export and
benchmark tools) call :func:`bf16_fast_on_this_cpu` and print a one-line
warning when it returns ``False``.
"""
from __future__ import annotations

from typing import Optional

import torch

CPUINFO = '/proc/cpuinfo'
BF16_FLAGS = ('amx_bf16', 'avx512_bf16')


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
    if cpuinfo_text is None:
        try:
            with open(CPUINFO, encoding='utf-8', errors='replace') as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ''
    flags, model = _parse_cpuinfo(cpuinfo_text)
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
