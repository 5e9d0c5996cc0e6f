"""A user's own script with mmengine's ``Runner.from_cfg`` (not SafeRunner): SIGTERM in the middle of an
epoch, resumed by the same script, ends with the weights of an uninterrupted run (the config's hooks make
mmengine's loop resume exactly)."""
import os
import signal
import subprocess
import textwrap

import pytest

from mlla_mm.checkpoint import load_file
from mlla_mm.engine.runner import REQUIRED_HOOKS

from tests.helpers import PY, ROOT, assert_same_weights, finish, tool_env, wait_for, write_tiny_config

EPOCHS = 2  # 2 iterations per epoch; iteration 3 is the first batch of epoch 2

#: The hooks of the runtime base plus the test-only pause (a child's custom_hooks replaces the base's list,
#: and mmengine's Runner does not add the missing ones as SafeRunner does).
EXTRA = f'''
custom_imports = dict(imports=['mlla_mm', 'tests.test_reliability.support'], allow_failed_imports=False)
custom_hooks = {[dict(type=name) for name in REQUIRED_HOOKS] + [dict(type='TestPauseHook')]!r}
'''

SCRIPT = textwrap.dedent('''
    import sys
    from mmengine.config import Config
    from mmengine.runner import Runner
    config, work, resume = sys.argv[1], sys.argv[2], sys.argv[3] == 'resume'
    cfg = Config.fromfile(config)
    cfg.work_dir = work
    cfg.resume = resume
    runner = Runner.from_cfg(cfg)
    assert type(runner) is Runner, type(runner)
    runner.train()
''')


def _start(script, config, work, log, resume=False, **env):
    return subprocess.Popen([PY, str(script), str(config), str(work), 'resume' if resume else 'new'], cwd=ROOT,
                            env=tool_env(**env), stdout=open(log, 'w'), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_plain_runner_preempted_mid_epoch_resumes_exactly(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=EPOCHS, extra=EXTRA)
    script = tmp_path / 'my_train.py'
    script.write_text(SCRIPT)
    ref, work = tmp_path / 'ref', tmp_path / 'work'
    logs = [tmp_path / f'run{i}.log' for i in range(3)]

    proc = _start(script, config, ref, logs[0])
    assert finish(proc) == 0, logs[0].read_text()[-3000:]

    # SIGTERM before iteration 3 (epoch 2, batch 1 of 2): it completes, iter_3.pth is written, exit 143.
    proc = _start(script, config, work, logs[1], MLLA_MM_TEST_PAUSE='train:3')
    wait_for('paused before iteration 3', logs[1], proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc) == 143, logs[1].read_text()[-3000:]
    ckpt = load_file(work / 'iter_3.pth')
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (1, 3)
    assert not (work / f'epoch_{EPOCHS}.pth').exists()

    # Resumed by the same plain script: epoch 2 continues with its second batch (mmengine's own loop
    # would train epoch 2 from its first batch again, 5 iterations in all, other weights).
    proc = _start(script, config, work, logs[2], resume=True)
    assert finish(proc) == 0, logs[2].read_text()[-3000:]
    log = logs[2].read_text()
    assert 'skipped its first 1 batches' in log, log[-3000:]
    assert load_file(work / f'epoch_{EPOCHS}.pth')['meta']['iter'] == 2 * EPOCHS
    assert_same_weights(ref / f'epoch_{EPOCHS}.pth', work / f'epoch_{EPOCHS}.pth')
