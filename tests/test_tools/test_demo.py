"""tools/demo.py: when the demo trains with mixed precision, and what it passes to train.py and test.py."""
import argparse

import pytest

from tests.helpers import load_tool

demo = load_tool('demo')
AMX = (True, 'Intel Xeon (bf16-related flags: amx_bf16, avx512_bf16)')
AVX2 = (False, 'AMD EPYC (bf16-related flags: avx2; no AMX or AVX512-BF16)')


def test_det_trains_in_bf16_only_where_the_cpu_has_it():
    auto = demo.DEMOS['det']['amp_auto']
    on, why = demo.choose_amp(None, auto, cuda=False, bf16_cpu=AMX)
    assert on and 'amx_bf16' in why and '--no-amp' in why
    off, why = demo.choose_amp(None, auto, cuda=False, bf16_cpu=AVX2)
    assert not off and 'slower' in why
    assert demo.choose_amp(None, auto, cuda=True, bf16_cpu=AMX)[0] is False  # a GPU: fp32 unless asked


def test_the_flags_win_and_seg_stays_fp32():
    assert demo.choose_amp(False, True, cuda=False, bf16_cpu=AMX) == (False, 'mixed precision off (--no-amp)')
    assert demo.choose_amp(True, True, cuda=False, bf16_cpu=AVX2)[0] is True
    assert demo.DEMOS['seg']['amp_auto'] is False
    assert demo.choose_amp(None, demo.DEMOS['seg']['amp_auto'], cuda=False, bf16_cpu=AMX)[0] is False


class _Stop(Exception):
    pass


def test_parser_takes_amp_and_no_amp(monkeypatch, tmp_path):
    seen = []

    def record(requested, *args):
        seen.append(requested)
        raise _Stop

    monkeypatch.setattr(demo, 'choose_amp', record)
    for argv in (['det'], ['det', '--amp'], ['det', '--no-amp']):
        try:
            demo.main(argv + ['--work-dir', str(tmp_path)])
        except _Stop:
            pass
    assert seen == [None, True, False]


def test_training_skips_its_final_validation_and_the_test_step_evaluates(monkeypatch, tmp_path):
    """train.py gets the option that turns its validation off (first, so the user's own options and --seed come
    after it and can override it); test.py does not; and with that option the demo config's loop validates at no
    epoch, not even the last."""
    from types import SimpleNamespace

    from mmengine.config import Config, DictAction
    from mmengine.logging import MessageHub
    from mmengine.runner import EpochBasedTrainLoop

    from mlla_mm.engine.loops import validation_due
    from tests.helpers import loop_stub
    cmds = []

    def fake_run(cmd, log_path=None):
        cmds.append([str(c) for c in cmd])
        if 'tools/train.py' in cmds[-1]:
            (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_6.pth'))
            return ''
        return 'metrics: coco/bbox_mAP=0.5\n'

    monkeypatch.setattr(demo, 'run', fake_run)
    monkeypatch.setattr(demo, 'loss_curve', lambda *a: None)
    demo.main(['det', '--no-amp', '--seed', '3', '--work-dir', str(tmp_path), '--cfg-options', 'a.b=1'])
    train, test = cmds
    opts = train[train.index('--cfg-options') + 1:]
    assert opts == [demo.SKIP_VALIDATION, 'a.b=1', 'randomness.seed=3']
    assert demo.SKIP_VALIDATION not in test and 'a.b=1' in test
    cfg = Config.fromfile(str(demo.ROOT / demo.DEMOS['det']['config']))
    parsed = argparse.Namespace()
    DictAction(option_strings=['--cfg-options'], dest='o')(None, parsed, [demo.SKIP_VALIDATION])
    cfg.merge_from_dict(parsed.o)
    # the loop's own rule (mlla_mm.engine.loops.validation_due), at the end of every epoch
    hub = MessageHub.get_instance('test_demo_skip_validation')
    runner = SimpleNamespace(val_loop=object(), message_hub=hub)
    epochs = cfg.train_cfg.max_epochs

    def due(epoch: int, val_begin: int) -> bool:
        loop = loop_stub(EpochBasedTrainLoop, runner, val_interval=cfg.train_cfg.val_interval, _epoch=epoch,
                     _max_epochs=epochs, _iter=2 * epoch, dataloader=[0, 0])
        loop.val_begin = val_begin
        return validation_due(loop)

    assert due(epochs, 1)  # without the option the last epoch validates
    assert not any(due(e, cfg.train_cfg.val_begin) for e in range(1, epochs + 1))


@pytest.mark.slow
def test_the_demo_command_runs_end_to_end_on_a_few_images(tmp_path):
    """tools/demo.py det itself (the README's main job), cut to 4 training and 2 test images: it trains, evaluates
    the untrained and the trained model, draws the test images, plots the loss and writes its summary."""
    import json
    from tests.helpers import run_tool
    work = tmp_path / 'demo'
    res = run_tool('tools/demo.py', 'det', '--work-dir', work, '--baseline', '--no-amp', '--cfg-options',
                   'train_dataloader.dataset.indices=4', 'test_dataloader.dataset.indices=2',
                   'train_cfg.max_epochs=1', 'default_hooks.logger.interval=1', timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert 'mixed precision off (--no-amp)' in out
    assert 'seed 0 (fixed in the config, so the demo repeats; --seed N for another run)' in out
    summary = json.loads((work / 'demo_summary.json').read_text())
    for key in ('untrained', 'trained'):
        assert set(summary[key]) == {'coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'}, \
            summary[key]
        assert all(0 <= v <= 1 for v in summary[key].values())
    assert summary['num_pictures'] == 2 and summary['seed'] == 0 and summary['amp'] is False
    assert (work / 'loss_curve.png').read_bytes()[:4] == b'\x89PNG'
    assert summary['checkpoint'] == str(work / 'epoch_1.pth')
    assert f"pictures: 2 PNGs in {work / 'predictions'}" in out


@pytest.mark.slow
def test_the_segmentation_demo_command_runs_end_to_end_on_a_few_images(tmp_path):
    """tools/demo.py seg (make demo-seg), cut to 2 iterations on 4 training images and 2 test images."""
    import json
    from tests.helpers import run_tool
    work = tmp_path / 'demo'
    res = run_tool('tools/demo.py', 'seg', '--work-dir', work, '--cfg-options', 'train_dataloader.dataset.indices=4',
                   'test_dataloader.dataset.indices=2', 'train_cfg.max_iters=2', 'default_hooks.logger.interval=1',
                   timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'mixed precision off (--amp to turn it on)' in res.stdout
    summary = json.loads((work / 'demo_summary.json').read_text())
    for key in ('untrained', 'trained'):  # the segmentation demo evaluates the untrained model by default
        assert set(summary[key]) == {'mIoU', 'mAcc', 'aAcc'} and all(0 <= v <= 100 for v in summary[key].values())
    assert summary['num_pictures'] == 2 and summary['checkpoint'] == str(work / 'iter_2.pth')
    assert (work / 'loss_curve.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('options, word', [(['foo'], 'foo'), (['model.backbone.arch=huge'], 'huge'),
                                           (['model.backbone.arch=[1,2'], 'arch')])
def test_bad_options_stop_before_any_step(monkeypatch, tmp_path, capsys, options, word):
    """Options that would make train.py or test.py fail are one error line (exit 2) before the demo writes
    anything (no untrained checkpoint, no logs) or runs a step."""
    steps = []
    monkeypatch.setattr(demo, 'run', lambda cmd, log_path=None: steps.append(cmd))
    work = tmp_path / 'work'
    for task in ('det', 'seg'):
        try:
            rc = demo.main([task, '--baseline', '--work-dir', str(work), '--cfg-options', *options])
        except SystemExit as stop:  # argparse-level parse errors exit from the parser
            rc = stop.code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith('error: ')]
        assert rc == 2 and len(errors) == 1 and word in errors[0] and 'Traceback' not in err, err[-1500:]
    assert not steps and not work.exists()


def test_work_dir_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert demo.main(['det', '--work-dir', str(blocker / 'w')]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith('error: --work-dir') and 'is a file, not a directory' in err


def test_a_failed_step_passes_its_exit_code_on_without_a_second_error_line(tmp_path):
    """A step that fails on bad input (exit 2) already printed its one error line; the demo exits 2 too."""
    from tests.helpers import run_tool
    res = run_tool('tools/demo.py', 'det', '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                   'train_dataloader.batch_size=0')
    errors = [line for line in res.stderr.splitlines() + res.stdout.splitlines() if line.startswith('error: ')]
    assert res.returncode == 2 and len(errors) == 1 and 'batch_size' in errors[0], res.stdout[-2000:] + res.stderr
