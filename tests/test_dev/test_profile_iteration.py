"""dev/profile_iteration.py: per-part times of real training iterations; bad input is one error line."""
import re

import pytest

from tests.helpers import TINY_ARCH, assert_one_error_line, run_tool, write_tiny_config


@pytest.mark.slow
def test_profiles_parts_and_counts_positives(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    res = run_tool('dev/profile_iteration.py', config, '--iters', '2', '--threads', '1',
                   '--cfg-options', 'train_dataloader.batch_size=1', f'work_dir={tmp_path / "w"}')
    assert res.returncode == 0, res.stderr[-3000:]
    times = {m.group(1).strip(): float(m.group(2))
             for m in re.finditer(r'^  ([a-z_ +]+?)\s+([0-9.]+) s/iter$', res.stdout, re.M)}
    for part in ('iteration', 'forward', 'backward + step', 'forward backbone', 'forward neck',
                 'forward rpn_head', 'forward mask_head'):
        assert times.get(part, 0) > 0, (part, res.stdout)
    # The parts are inside the forward pass, which is inside the iteration.
    assert times['forward backbone'] + times['forward mask_head'] < times['forward'] < times['iteration']
    counts = re.search(r'positive RoIs per iteration \(mask head\): \[(\d+), (\d+)\]', res.stdout)
    assert counts and all(int(c) > 0 for c in counts.groups()), res.stdout


@pytest.mark.slow
def test_too_few_batches_and_a_wrong_checkpoint_are_one_line_errors(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    res = run_tool('dev/profile_iteration.py', config, '--iters', '5')
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith('error: '), res.stderr[-2000:]
    assert 'fewer than 7 batches' in res.stderr
    import torch
    bad = tmp_path / 'other.pth'
    torch.save({'state_dict': {'head.weight': torch.zeros(2)}}, bad)
    res = run_tool('dev/profile_iteration.py', config, str(bad), '--iters', '1',
                   '--cfg-options', 'train_dataloader.batch_size=1')
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'other.pth does not fit' in last, last


# --------------------------------------------------------------------------
# Fast checks (in-process): arguments and checkpoints, before anything is built or run.
# --------------------------------------------------------------------------
def _tool():
    from tests.helpers import load_dev
    return load_dev('profile_iteration')


@pytest.mark.parametrize('argv, name', [
    (['--threads', '0'], '--threads'), (['--threads', '-1'], '--threads'), (['--iters', '0'], '--iters')])
def test_counts_below_one_are_one_error_line(argv, name, capsys):
    with pytest.raises(SystemExit) as stop:
        _tool().parse_args(['configs/detection/mask_rcnn_mlla_t_demo.py', *argv])
    assert stop.value.code == 2
    assert_one_error_line(capsys, name)


def test_a_missing_checkpoint_is_reported_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import mlla_mm.engine.runner as runner_module
    monkeypatch.setattr(runner_module.SafeRunner, 'from_cfg', classmethod(lambda cls, cfg: pytest.fail('built')))
    missing = tmp_path / 'none.pth'
    assert _tool().main(['configs/detection/mask_rcnn_mlla_t_demo.py', str(missing), '--threads', '1']) == 2
    assert_one_error_line(capsys, missing)


def _tiny_detector():
    """A stand-in for a detector: a tiny MLLA as ``backbone`` and a neck."""
    import torch
    from mlla_mm.models import MLLA
    model = torch.nn.Module()
    torch.manual_seed(0)
    model.backbone = MLLA(TINY_ARCH)
    model.neck = torch.nn.Linear(4, 3)
    return model


def test_published_backbone_weights_load_into_the_backbone(tmp_path):
    """A published-layout file ({'model': ...} of backbone weights, no output norms) goes into model.backbone."""
    import torch
    tool = _tool()
    source = _tiny_detector()
    for p in source.parameters():
        torch.nn.init.normal_(p)
    published = {k: v for k, v in source.backbone.state_dict().items() if not k.startswith('norm')}
    path = tmp_path / 'published.pth'
    torch.save({'model': published}, path)
    model = _tiny_detector()
    said = tool.load_weights(model, tool.read_weights(str(path)), str(path), 'cfg.py')
    assert 'backbone' in said and str(path) in said
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in published.items())


def test_a_checkpoint_with_a_wrongly_shaped_tensor_is_one_clear_error(tmp_path):
    import torch
    from mlla_mm.errors import UsageError
    tool = _tool()
    model = _tiny_detector()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights['neck.weight'] = torch.zeros(5, 4)
    path = tmp_path / 'wrong.pth'
    torch.save({'state_dict': weights}, path)
    before = model.neck.weight.clone()
    with pytest.raises(UsageError) as err:
        tool.load_weights(model, tool.read_weights(str(path)), str(path), 'cfg.py')
    msg = str(err.value)
    assert f'{path} does not fit the model of cfg.py' in msg and 'neck.weight: file (5, 4) vs model (3, 4)' in msg
    assert '\n' not in msg and torch.equal(model.neck.weight, before)  # nothing loaded
    # A whole-model file (mmdet layout or published {'model': ...}) that fits loads.
    del weights['neck.weight']
    weights['neck.weight'] = torch.ones(3, 4)
    torch.save({'model': weights}, path)
    assert tool.load_weights(model, tool.read_weights(str(path)), str(path), 'cfg.py').startswith(
        f'{len(weights)} tensors')
    assert torch.equal(model.neck.weight, torch.ones(3, 4))


def test_a_checkpoint_folder_is_one_clear_error(tmp_path):
    from mlla_mm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=f'^checkpoint {tmp_path} is a directory, not a checkpoint file$'):
        _tool().read_weights(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f'^checkpoint not found: {tmp_path / "x.pth"}$'):
        _tool().read_weights(str(tmp_path / 'x.pth'))
