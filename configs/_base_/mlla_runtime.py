# mlla-mm's runtime: what a run of any of our configs needs, stated in the
# config. Every config of the project lists this file LAST in `_base_`, after
# mmdet's or mmseg's own bases, so these settings are applied on top of them.
#
# With it, `RUNNERS.build(cfg).train()` (mmdet's and mmseg's own tools/train.py,
# mim, a team's own script) is the same run as `python tools/train.py`.
# mmengine's `Runner.from_cfg(cfg)` ignores `runner_type`, but runs the hooks
# below, which give the same run: atomic checkpoints, exact resume (also from
# the middle of an epoch after a preemption checkpoint), the preemption
# checkpoint, the NaN stop, the validation re-run and the checkpoint checks.
# What it lacks is SafeRunner's build-time part: the demo's `synthetic_data` is
# not made, and without CUDA a distributed run or a CUDA-only AmpOptimWrapper
# fails (docs/reliability.md, "The run is the config").
#
# mmengine refuses a key that two files of one `_base_` list both define, so
# this file sets only keys mmdet's and mmseg's bases leave alone (no
# default_hooks, env_cfg, ...). What depends on the machine (CUDA or not,
# one process or several) cannot be in a config anyway: SafeRunner decides it.

# Registers MLLA, SafeRunner, the loops and hooks below, and the safe checkpoint reader.
custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)

# mlla_mm/engine/runner.py. At build time: gloo, BN instead of SyncBN and CPU DDP
# when there is no CUDA; bf16 CPU autocast instead of a CUDA-only AmpOptimWrapper;
# the config's `synthetic_data` made if missing; the hooks below added when a
# child's own custom_hooks list lacks them. (A config cannot know the machine
# it runs on; the runner does.)
runner_type = 'SafeRunner'

# mlla_mm/engine/hooks.py. SafeRunner adds any of these a config's own
# `custom_hooks` list leaves out (a list in a child config replaces this one).
custom_hooks = [
    # exact resume: random state in checkpoints (validation leaves it unchanged), and the
    # train loop switched to mlla_mm/engine/loops.py's (skips the batches already trained)
    dict(type='RandomStateHook'),
    dict(type='PreemptionHook'),  # SIGTERM/SIGINT: checkpoint the iteration, exit 143/130
    dict(type='ValidationResumeHook'),  # resume re-runs a validation a kill interrupted
    dict(type='FiniteLossHook'),  # stop on a NaN/inf loss, never save non-finite weights
    # checkpoints written atomically (temporary file, fsync, rename: mlla_mm/utils/io.py);
    # load_from / resume / test: a checkpoint of another model or MLLA size is an error
    dict(type='CheckpointGuardHook'),
]
