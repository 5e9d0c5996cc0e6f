"""mlla_mm.utils.malloc: large CPU tensors stay off fresh mmap pages once tuned."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_tool, tool_env

PROBE = r'''
import json, resource, sys
import torch
from mlla_mm.utils.malloc import malloc_state, mmapped_bytes, tune_cpu_malloc
state = tune_cpu_malloc()
n = 64 << 20
before = mmapped_bytes()
a = torch.empty(n, dtype=torch.uint8).fill_(1)
held = mmapped_bytes() - before
del a
faults = []
for _ in range(10):  # allocate, fill and free the same size again and again
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n, dtype=torch.uint8).fill_(2)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
faults = sum(faults[4:])  # after the first few, once the heap has settled
print(json.dumps(dict(state=state, seen=malloc_state(), mmapped=held, faults=faults)))
'''


def probe(env_value):
    env = dict(os.environ)
    env.pop('MLLA_MM_MALLOC', None)
    if env_value is not None:
        env['MLLA_MM_MALLOC'] = env_value
    res = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')


@needs_glibc
def test_tuned_keeps_large_tensors_on_the_heap_and_reuses_them():
    out = probe(None)  # tuned is the default
    assert out['state'] == out['seen'] == 'tuned'
    assert out['mmapped'] < (1 << 20), out  # 64 MiB came from the heap, not a separate mmap
    pages = (64 << 20) // 4096
    assert out['faults'] < pages // 2, out  # 6 more rounds: freed blocks reused, not faulted in again


@needs_glibc
def test_default_leaves_malloc_alone():
    out = probe('default')
    assert out['state'] == 'default'
    assert out['mmapped'] >= (64 << 20), out
    assert out['faults'] >= 5 * (64 << 20) // 4096, out  # each round's fresh mmap faults in anew


def test_bad_setting_is_a_clear_tool_error(tmp_path):
    res = run_tool('tools/train.py', tmp_path / 'missing.py', env=tool_env(MLLA_MM_MALLOC='fast'), timeout=120)
    assert res.returncode == 2
    assert "MLLA_MM_MALLOC must be 'tuned' or 'default', got 'fast'" in res.stderr
    assert 'Traceback' not in res.stderr
