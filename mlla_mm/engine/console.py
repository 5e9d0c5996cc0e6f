"""What a run's console shows: mmengine's per-parameter reports go to the log file only.

mmengine logs two reports with one record per parameter, at INFO:

- ``BaseModule.init_weights`` (``_dump_init_info``): ``<name> - torch.Size([...]):``
  and how the parameter was initialised ("The value is the same before and
  after calling `init_weights` of ..."). When the current :class:`MMLogger`
  has a file handler mmengine writes it straight into that file; otherwise
  every parameter is a logged record (about 490 records, 2,000 console lines
  for Mask R-CNN MLLA-T: what a newcomer's ``make demo`` showed first);
- ``DefaultOptimWrapperConstructor``: ``paramwise_options -- <name>:<key>=<value>``,
  one record per parameter and setting.

:func:`keep_parameter_reports_off_console` adds :class:`ParameterReportFilter`
to a logger's console handlers only, so its file handlers keep both reports.
:class:`~mlla_mm.engine.runner.SafeRunner` calls it on its logger when it is
built, so a config's run (``tools/train.py`` or ``RUNNERS.build(cfg).train()``)
shows neither report on the console and has both in its log file. A logger
without a file handler (a script that builds and initialises a model outside
a runner) drops them: the training run's log file holds the same report.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

from mmengine.logging import MMLogger

#: The first line of a per-parameter record of either report.
PARAMETER_REPORT = re.compile(r'\s*[\w.]+ - torch\.Size\(\[[\d, ]*\]\):|paramwise_options -- ')


def is_parameter_report(message: str) -> bool:
    """Whether ``message`` is one parameter's line of mmengine's initialisation or ``paramwise_options`` report."""
    return PARAMETER_REPORT.match(message) is not None


class ParameterReportFilter(logging.Filter):
    """A handler filter that drops the records of mmengine's per-parameter reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report, not ours
            return True
        return not is_parameter_report(message)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def keep_parameter_reports_off_console(logger: Optional[logging.Logger] = None) -> logging.Logger:
    """Filter mmengine's per-parameter reports out of ``logger``'s console handlers, once.

    Args:
        logger: by default mmengine's current :class:`MMLogger` (the runner's while one runs).

    Returns:
        The logger. File handlers are left as they are; calling again adds nothing.
    """
    if logger is None:
        logger = MMLogger.get_current_instance()
    for handler in logger.handlers:
        if _is_console(handler) and not any(isinstance(f, ParameterReportFilter) for f in handler.filters):
            handler.addFilter(ParameterReportFilter())
    return logger
