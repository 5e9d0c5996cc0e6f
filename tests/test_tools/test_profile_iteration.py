"""tools/profile_iteration.py: per-part times of real training iterations; bad input is one error line."""
import re

import pytest

from tests.helpers import run_tool, write_tiny_config


@pytest.mark.slow
def test_profiles_parts_and_counts_positives(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    res = run_tool('tools/profile_iteration.py', config, '--iters', '2', '--threads', '1',
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
    res = run_tool('tools/profile_iteration.py', config, '--iters', '5')
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith('error: '), res.stderr[-2000:]
    assert 'fewer than 7 batches' in res.stderr
    import torch
    bad = tmp_path / 'other.pth'
    torch.save({'state_dict': {'head.weight': torch.zeros(2)}}, bad)
    res = run_tool('tools/profile_iteration.py', config, str(bad), '--iters', '1',
                   '--cfg-options', 'train_dataloader.batch_size=1')
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'other.pth does not fit' in last, last
