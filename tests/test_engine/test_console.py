"""The console of a run: mmengine's per-parameter reports reach the log file only."""
import logging
import re

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import BaseModel
from mmengine.registry import MODELS, RUNNERS

from mlla_mm.engine.console import ParameterReportFilter, is_parameter_report, keep_parameter_reports_off_console

#: One line of either report on the console or in a file (mmengine's two per-parameter reports).
REPORT_LINE = re.compile(r'^\S+ - torch\.Size\(\[[\d, ]*\]\): *$|paramwise_options -- ', re.M)


@MODELS.register_module(name='ConsoleTestModel', force=True)
class ConsoleTestModel(BaseModel):
    """A model with linear and norm layers: both reports have a line per parameter."""

    def __init__(self) -> None:
        super().__init__(init_cfg=dict(type='Normal', layer='Linear', std=0.01))
        self.fc1 = nn.Linear(2, 4)
        self.norm = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, inputs, labels=None, mode='loss'):
        out = self.fc2(self.norm(self.fc1(inputs)))
        return {'loss': ((out.squeeze(1) - labels) ** 2).mean()}


def _config(work_dir) -> Config:
    data = [dict(inputs=torch.tensor([float(i), 1.0]), labels=torch.tensor(float(i % 2))) for i in range(4)]
    return Config(dict(
        runner_type='SafeRunner', work_dir=str(work_dir), experiment_name='console_test',
        model=dict(type='ConsoleTestModel'),
        train_dataloader=dict(dataset=data, sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate'), batch_size=2, num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, weight_decay=1e-4),
                           paramwise_cfg=dict(norm_decay_mult=0.0)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1000),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0)))


def test_a_config_run_keeps_the_parameter_reports_in_its_log_file(tmp_path, capsys):
    runner = RUNNERS.build(_config(tmp_path))  # what mmdet's, mmseg's and users' scripts do
    runner.train()
    console = capsys.readouterr()
    log_file = next(tmp_path.glob('*/*.log'))
    log = log_file.read_text()
    names = [name for name, _ in runner.model.named_parameters()]
    for name in names:  # the log file has both reports: every parameter's initialisation ...
        assert re.search(rf'^{re.escape(name)} - torch\.Size', log, re.M), name
    for name in ('norm.weight', 'norm.bias'):  # ... and the parameters with their own settings
        assert f'paramwise_options -- {name}:weight_decay=0.0' in log, name
    assert 'The value is the same before and after calling `init_weights`' in log
    # ... the console neither, but the rest of the run's log.
    assert REPORT_LINE.search(console.out + console.err) is None, (console.out + console.err)[-3000:]
    assert 'Checkpoints will be saved to' in console.out


def test_a_logger_without_a_file_drops_the_init_report_from_the_console(capsys):
    logger = MMLogger.get_instance('console_test_no_file', log_level='INFO')  # the current logger now
    assert MMLogger.get_current_instance() is logger
    keep_parameter_reports_off_console()
    keep_parameter_reports_off_console(logger)  # once
    console = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    assert console and all(sum(isinstance(f, ParameterReportFilter) for f in h.filters) == 1 for h in console)
    ConsoleTestModel().init_weights()
    logger.info('a line that stays')
    out = capsys.readouterr().out
    assert REPORT_LINE.search(out) is None, out
    assert 'a line that stays' in out


def test_what_counts_as_a_parameter_report():
    assert is_parameter_report('\nbackbone.stem.weight - torch.Size([32, 3, 3, 3]): \nThe value is the same ')
    assert is_parameter_report('\nhead.scale - torch.Size([]): \nInitialized by user-defined `init_weights`')
    assert is_parameter_report('paramwise_options -- backbone.norm.bias:weight_decay=0.0')
    assert not is_parameter_report('Iter(train) [1/1]  lr: 1.0e-02  loss: 0.5')
    assert not is_parameter_report('MLLA: pretrained checkpoint x.pth not found; the backbone is RANDOMLY initialised')
