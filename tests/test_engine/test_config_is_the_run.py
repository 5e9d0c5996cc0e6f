"""The run is the config: tools/train.py and a plain script with mmengine's Runner train the same weights,
and both write atomic checkpoints that hold the random state."""
import json
import subprocess
import textwrap

import pytest

from mlla_mm.checkpoint import load_file

from tests.helpers import PY, ROOT, assert_same_weights, tool_env, write_tiny_config

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


#: The demo config on a tiny synthetic data set whose training annotations are a copy with a duplicated image id.
DUPLICATE_ID_CONFIG = '''
_base_ = [{demo!r}]
data_root = {root!r}
synthetic_data = dict(kind='coco-shapes', root=data_root, seed=0, num_train=4, num_val=2, size=64)
train_cfg = dict(max_epochs=1)  # (a run that did not check its data would train one short epoch)
train_dataloader = dict(num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, ann_file={ann!r}))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
'''


def _config_with_a_duplicate_image_id(tmp_path):
    from mlla_mm.datasets.synthetic import make_coco_shapes
    root = tmp_path / 'shapes'
    make_coco_shapes(str(root), seed=0, num_train=4, num_val=2, size=64)  # what the runner would make, reused
    data = json.loads((root / 'annotations' / 'instances_train.json').read_text())
    data['images'][1]['id'] = data['images'][0]['id']
    ann = tmp_path / 'copied' / 'instances_train.json'
    ann.parent.mkdir()
    ann.write_text(json.dumps(data))
    config = tmp_path / 'demo_duplicate_id.py'
    config.write_text(DUPLICATE_ID_CONFIG.format(demo=str(ROOT / 'configs/detection/mask_rcnn_mlla_t_demo.py'),
                                                 root=f'{root}/', ann=str(ann)))
    return config


def test_a_plain_runner_script_stops_on_bad_data_with_the_tool_s_error(tmp_path, capsys, monkeypatch):
    """``RUNNERS.build(Config.fromfile(cfg)).train()`` checks the data as tools/train.py does: a duplicate image id
    in the annotation file stops it before anything is built (no work dir, no iteration), with the tool's line."""
    from mmengine.config import Config
    from mmengine.registry import RUNNERS, init_default_scope

    from mlla_mm.errors import BadAnnotationError
    from tests.helpers import load_tool
    config = _config_with_a_duplicate_image_id(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(tmp_path / 'script')
    init_default_scope(cfg.default_scope)
    with pytest.raises(BadAnnotationError) as stop:
        RUNNERS.build(cfg).train()
    assert not (tmp_path / 'script').exists()  # stopped before the runner made anything
    message = str(stop.value)
    assert 'duplicate' in message.lower() and 'instances_train.json' in message, message

    rc = load_tool('train').main([str(config), '--work-dir', str(tmp_path / 'tool')])
    err = capsys.readouterr().err
    assert rc == 2 and f'error: {message}' in err, err[-2000:]
    assert not (tmp_path / 'tool').exists()
