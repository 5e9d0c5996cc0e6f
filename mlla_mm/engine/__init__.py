"""How a run of mlla-mm is made (registered in mmengine's root registries on import).

- ``runner.py``: :class:`SafeRunner` (machine-dependent settings at build time, the checks, the hooks);
- ``work_dir.py``: what a run keeps in its work dir, kept safe (atomic checkpoints through
  :class:`AtomicLocalBackend`, robust auto-resume, one run per work dir, a full disk as one line);
- ``distributed.py``: torch.distributed through mmengine's launchers, also without CUDA (gloo), and the
  end of the process group; ``rendezvous.py``: the gloo rendezvous with a time limit;
- ``loops.py``: training loops that resume exactly, also mid-epoch;
- ``hooks.py``: the reliability hooks (random state, validation resume,
  preemption, NaN stop, checkpoint guard);
- ``rng.py``: the global random state; ``optim.py``: the CPU autocast optimizer wrapper;
  ``layer_decay.py``: the layer-wise learning-rate decay constructor; ``param_groups.py``: the
  constructor that merges equal parameter groups;
- ``run_checks.py``: what SafeRunner checks from the config before it builds anything (settings, data,
  neck channels, a whole-model checkpoint) and the AMP policy;
- ``config_cache.py``: mmengine's Config formatting its text and finding ``mmdet::`` base configs once, not
  at every read (the lookup is installed on import);
- ``launch.py``: applying a tool's options to a config (``--work-dir``, ``--launcher``, ``--amp``, ...) and
  building its runner; the command-line parsing and error lines are :mod:`mlla_mm.cli`'s (tools only).
"""
from .config_cache import install_metainfo_index
from .optim import CPUAutocastOptimWrapper
from .layer_decay import MLLALayerDecayOptimizerConstructor  # noqa: F401  (registers it in mmengine's root)
from .param_groups import MergedGroupsOptimWrapperConstructor  # noqa: F401  (registers it in mmengine's root)
from .loops import ExactEpochBasedTrainLoop, ExactIterBasedTrainLoop
from .runner import SafeRunner
from .work_dir import AtomicLocalBackend, find_resumable_checkpoint
from .hooks import (CheckpointGuardHook, FiniteLossHook, NonFiniteLossError, PreemptionHook, RandomStateHook,
                    TrainingInterrupted, ValidationResumeHook)

install_metainfo_index()

__all__ = ['CPUAutocastOptimWrapper', 'SafeRunner',
           'AtomicLocalBackend', 'ExactEpochBasedTrainLoop', 'ExactIterBasedTrainLoop', 'RandomStateHook',
           'ValidationResumeHook', 'PreemptionHook', 'FiniteLossHook', 'CheckpointGuardHook', 'NonFiniteLossError',
           'TrainingInterrupted', 'find_resumable_checkpoint']
