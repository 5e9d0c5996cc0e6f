"""The run is the config: tools/train.py and a plain script with mmengine's Runner train the same weights,
and both write atomic checkpoints that hold the random state."""
import json
import subprocess
import textwrap

import pytest

from mlla_mm.checkpoint import load_file

from tests.helpers import PY, ROOT, tool_env, write_tiny_config
from tests.test_reliability.runs import assert_same_weights

EPOCHS = 2

#: Runs tools/train.py (mode "tool") or the plain mmengine way (mode "plain") in a fresh process and
#: records every rename, to show that each checkpoint arrived complete from a temporary file.
SCRIPT = textwrap.dedent('''
    import json, os, sys
    mode, config, work = sys.argv[1:4]
    renames = []
    _replace = os.replace

    def spy(src, dst, *args, **kwargs):
        renames.append([os.fspath(src), os.fspath(dst)])
        return _replace(src, dst, *args, **kwargs)

    os.replace = spy
    if mode == 'tool':
        import runpy
        sys.argv = ['tools/train.py', config, '--work-dir', work]
        try:
            runpy.run_path('tools/train.py', run_name='__main__')
        except SystemExit as stop:
            assert not stop.code, stop.code
        runner_class = 'SafeRunner (tools/train.py)'
    else:
        from mmengine.config import Config
        from mmengine.runner import Runner
        cfg = Config.fromfile(config)
        cfg.work_dir = work
        runner = Runner.from_cfg(cfg)
        runner_class = type(runner).__name__
        runner.train()
    with open(os.path.join(work, 'run.json'), 'w') as f:
        json.dump(dict(renames=renames, runner_class=runner_class), f)
''')


@pytest.mark.slow
def test_tools_train_and_a_plain_runner_script_give_the_same_run(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=EPOCHS)
    script = tmp_path / 'run_it.py'
    script.write_text(SCRIPT)
    runs = {}
    for mode in ('tool', 'plain'):
        work = tmp_path / mode
        res = subprocess.run([PY, str(script), mode, str(config), str(work)], cwd=ROOT, env=tool_env(),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = json.loads((work / 'run.json').read_text())
        for epoch in range(1, EPOCHS + 1):
            path = work / f'epoch_{epoch}.pth'
            # The checkpoint was renamed into place from a complete temporary file in the same folder ...
            sources = [src for src, dst in runs[mode]['renames'] if dst == str(path)]
            assert len(sources) == 1, (mode, runs[mode]['renames'])
            assert sources[0].startswith(str(work / f'.epoch_{epoch}.pth.tmp-')), (mode, sources)
            # ... and holds the random state a resume needs.
            ckpt = load_file(path)
            assert {'rng_state', 'message_hub', 'optimizer'} <= set(ckpt), mode
    assert runs['plain']['runner_class'] == 'Runner'  # mmengine's own, not ours: the config does it
    assert_same_weights(tmp_path / 'tool' / f'epoch_{EPOCHS}.pth', tmp_path / 'plain' / f'epoch_{EPOCHS}.pth')
