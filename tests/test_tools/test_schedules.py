"""Schedules that fit the run (issue 30, item 4): ``tools/train.py --epochs N / --iters N`` scales the schedule of
the own-data templates, a schedule that does not fit is one line before training, short runs log often."""
import json
import types

import pytest

from tests.helpers import ROOT, run_tool, write_tiny_config

DET = ROOT / 'configs' / 'detection'
SEG = ROOT / 'configs' / 'segmentation'


def load(path):
    from mlla_mm.cli import load_config
    return load_config(str(path))


def by_type(cfg, name):
    return next(s for s in cfg.param_scheduler if s['type'] == name)


@pytest.mark.parametrize('template', ['custom_instance_mlla_t', 'custom_boxes_faster_rcnn_mlla_t'])
def test_epochs_scales_the_steps_and_the_end_of_the_detection_templates(template):
    from mlla_mm.engine.schedules import rescale_schedule
    cfg = load(DET / f'{template}.py')
    assert cfg.train_cfg.max_epochs == 12 and by_type(cfg, 'MultiStepLR')['milestones'] == [8, 11]
    lines = rescale_schedule(cfg, epochs=24)
    step = by_type(cfg, 'MultiStepLR')
    assert cfg.train_cfg.max_epochs == 24 and step['end'] == 24 and step['milestones'] == [16, 22]
    assert len(lines) == 1 and 'milestones [8, 11] -> [16, 22]' in lines[0]
    warmup = by_type(cfg, 'LinearLR')
    assert warmup['end'] == 500  # in iterations: fitted once the data (iterations per epoch) is known

    cfg = load(DET / f'{template}.py')
    rescale_schedule(cfg, epochs=3)
    step = by_type(cfg, 'MultiStepLR')
    assert (step['end'], step['milestones']) == (3, [2, 3])


def test_iters_scales_warmup_decay_and_intervals_of_the_segmentation_template():
    from mlla_mm.engine.schedules import rescale_schedule
    cfg = load(SEG / 'custom_seg_mlla_t.py')
    old = cfg.train_cfg.max_iters
    warm, poly = by_type(cfg, 'LinearLR'), by_type(cfg, 'PolyLR')
    w0, v0, c0 = warm['end'], cfg.train_cfg.val_interval, cfg.default_hooks.checkpoint.interval
    assert poly['begin'] == w0 and poly['end'] == old
    rescale_schedule(cfg, iters=2000)
    f = 2000 / old
    assert cfg.train_cfg.max_iters == 2000
    assert warm['end'] == poly['begin'] == round(w0 * f) and poly['end'] == 2000
    assert cfg.train_cfg.val_interval == round(v0 * f) and cfg.default_hooks.checkpoint.interval == round(c0 * f)

    cfg = load(SEG / 'custom_seg_mlla_t.py')
    rescale_schedule(cfg, iters=20)  # a warm-up of at least 2 iterations (LinearLR reaches its value at end - 1)
    warm, poly = by_type(cfg, 'LinearLR'), by_type(cfg, 'PolyLR')
    assert warm['end'] == poly['begin'] == 2 and poly['end'] == 20


@pytest.mark.parametrize('template,kwargs,match', [
    ('segmentation/custom_seg_mlla_t.py', dict(epochs=4), r'--epochs: the config trains by iterations; use --iters'),
    ('detection/custom_instance_mlla_t.py', dict(iters=400), r'--iters: the config trains by epochs; use --epochs'),
])
def test_the_option_of_the_other_unit_is_refused(template, kwargs, match):
    from mlla_mm.engine.schedules import rescale_schedule
    with pytest.raises(ValueError, match=match):
        rescale_schedule(load(ROOT / 'configs' / template), **kwargs)


def test_the_issues_short_segmentation_schedule_is_one_line_before_anything_runs(tmp_path):
    """docs' old advice: max_iters=20 and the PolyLR end=20 left its begin at 1500: mmengine's raw ValueError."""
    proc = run_tool('tools/train.py', SEG / 'custom_seg_mlla_t.py', '--work-dir', tmp_path / 'w',
                    '--cfg-options', 'train_cfg.max_iters=20', 'param_scheduler.1.end=20')
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith('error: ') and 'param_scheduler[1] (PolyLR): end=20 is not after begin=1500' in lines[0]
    assert 'the run has 20 iterations (train_cfg.max_iters)' in lines[0] and '--iters N' in lines[0]
    assert not (tmp_path / 'w').exists()


def test_fit_shortens_a_warmup_longer_than_the_run_and_logs_every_epoch():
    from mlla_mm.engine.schedules import fit_to_run
    scheds = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
              dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[16, 22])]
    logger = types.SimpleNamespace(interval=50)
    lines = fit_to_run(scheds, loop_unit='epochs', length=24, iters_per_epoch=6, shorten_warmup=True,
                       logger_hooks=(logger, ))
    assert scheds[0]['end'] == 15  # a tenth of 144 iterations, rounded up
    assert scheds[1]['end'] == 24 and scheds[1]['milestones'] == [16, 22]
    assert logger.interval == 6
    assert any('warm-up shortened from 500 to 15 iterations' in line for line in lines)
    assert not any(line.startswith('warning:') for line in lines)


def test_a_schedule_that_does_not_fit_is_one_warning_line_each():
    from mlla_mm.engine.schedules import fit_to_run
    scheds = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
              dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11])]
    lines = fit_to_run(scheds, loop_unit='epochs', length=2, iters_per_epoch=6, shorten_warmup=False)
    assert scheds[0]['end'] == 500  # not changed without --epochs
    warnings = [line for line in lines if line.startswith('warning:')]
    assert len(warnings) == 2
    assert 'LinearLR) ends at iteration 500, but the run has 2 epochs of 6 iterations' in warnings[0]
    assert 'never reaches its set value' in warnings[0] and '--epochs 2' in warnings[0]
    assert 'MultiStepLR) ends at epoch 12' in warnings[1] and 'milestones [8, 11] never reached' in warnings[1]
    # a schedule that fits: nothing
    scheds = [dict(type='LinearLR', by_epoch=False, begin=0, end=10), dict(type='MultiStepLR', end=2, milestones=[1])]
    assert fit_to_run(scheds, loop_unit='epochs', length=2, iters_per_epoch=6, shorten_warmup=False) == []


def test_schedule_errors_name_what_mmengine_would_refuse():
    from mmengine.config import Config

    from mlla_mm.engine.schedules import schedule_errors
    cfg = Config(dict(train_cfg=dict(max_epochs=2), param_scheduler=[
        dict(type='LinearLR', by_epoch=False, begin=0, end=5), dict(type='MultiStepLR', begin=3, end=3)]))
    problems = schedule_errors(cfg)
    assert problems == ['param_scheduler[1] (MultiStepLR): end=3 is not after begin=3; the run has 2 epochs '
                        '(train_cfg.max_epochs); tools/train.py --epochs N scales the whole schedule to a run of N '
                        'epochs']


#: The published detection schedule (12 epochs, 500-iteration warm-up, steps at 8 and 11) on the tiny data set
#: (2 iterations per epoch), with mmdet's logger interval.
PUBLISHED_SCHEDULE = '''
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=1000)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=1, max_keep_ckpts=1))
'''


@pytest.mark.slow
def test_train_with_epochs_runs_the_scaled_schedule(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, epochs=12, extra=PUBLISHED_SCHEDULE)
    work = tmp_path / 'work'
    proc = run_tool('tools/train.py', config, '--work-dir', work, '--epochs', '2', timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert '--epochs 2: train_cfg.max_epochs 12 -> 2' in log
    assert 'warm-up shortened from 500 to 2 iterations' in log
    assert 'logging every 1 iterations instead of 50' in log
    records = [json.loads(line) for line in next(work.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    lrs = [r['lr'] for r in records if 'lr' in r]
    base = 4e-4  # the demo config's AdamW lr
    # warm-up over 2 iterations (0.001x, then 1x), the step at epoch 1 of 2 (8 of 12 scaled)
    assert lrs == pytest.approx([base * 0.001, base, base * 0.1, base * 0.1], rel=1e-6)
