"""Running tools/train.py on the tiny config in subprocesses, stopping them at chosen points."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from mlla_mm.checkpoint import load_file

from tests.helpers import PY, ROOT, tool_env, write_tiny_config

#: Validation after every epoch (on the 2 held-out images), the test-only hooks and checkpoint writer
#: (replacing the tiny config's default_hooks: a later assignment in the same file wins).
WITH_VALIDATION = '''
custom_imports = dict(imports=['mlla_mm', 'tests.test_reliability.support'], allow_failed_imports=False)
custom_hooks = [dict(type='TestPauseHook')]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=1, max_keep_ckpts=3, backend_args=dict(backend='test_pausing_local')))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=_test))
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox'])
val_cfg = dict(type='ValLoop')
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
'''


def tiny_config_with_validation(folder: Path, data_root: Path, epochs: int) -> Path:
    return write_tiny_config(folder, data_root, epochs=epochs, extra=WITH_VALIDATION)


def start(config, work_dir, log, *extra, **env):
    """Start tools/train.py; stdout and stderr go to ``log``."""
    return subprocess.Popen([PY, 'tools/train.py', str(config), '--work-dir', str(work_dir), *map(str, extra)],
                            cwd=ROOT, env=tool_env(**env), stdout=open(log, 'w'), stderr=subprocess.STDOUT)


def wait_for(text, log, proc, timeout=600):
    """Wait until ``text`` appears in the log file (the process must still run; generous for busy CI machines)."""
    end = time.time() + timeout
    while time.time() < end:
        if text in Path(log).read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f'training ended (rc={proc.returncode}) before {text!r}:\n'
                                 + Path(log).read_text()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f'timed out waiting for {text!r}')


def finish(proc, timeout=300):
    proc.wait(timeout)
    return proc.returncode


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def weights(path):
    return load_file(path)['state_dict']


def assert_same_weights(a_path, b_path):
    a, b = weights(a_path), weights(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}'


def val_metrics(log_text, epoch):
    """The ``coco/...`` metrics of the validation after ``epoch`` in an mmengine log."""
    lines = [line for line in log_text.splitlines() if f'Epoch(val) [{epoch}]' in line and 'coco/bbox_mAP' in line]
    assert lines, f'no metrics of the validation after epoch {epoch} in the log'
    return dict(re.findall(r'(coco/\w+): (-?[0-9.]+)', lines[-1]))
