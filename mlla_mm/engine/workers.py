"""Dataloader worker processes and signals: preemption of a whole process group, a worker that died.

``timeout``, ``kill -TERM -- -PGID``, Slurm at the end of a job and Ctrl-C in
a terminal signal every process of the job, the dataloader workers included.
A worker that dies of it makes the main process fail (torch raises
``DataLoader worker ... killed by signal``) before the
:class:`~mlla_mm.engine.hooks.PreemptionHook` can write its checkpoint.
:class:`SignalSafeWorkerInit` wraps a dataloader's ``worker_init_fn`` (the
user's, or mmengine's seeding) so that its workers ignore SIGTERM and SIGINT
the main process finishes the iteration, saves and exits with 143 / 130, and
the workers end when the main process stops them (:func:`stop_workers_at_exit`
at the latest) or, should it die, when torch's watchdog sees their parent
gone (within 5 s).
:func:`guard_dataloader_workers` installs it on a built dataloader, restarting
worker processes that were already started without it (mmengine's
iteration-based loop starts them when it is built; persistent workers).

:func:`worker_death_message` turns the chain of exceptions a worker killed
by something else (SIGKILL, the out-of-memory killer) leaves into one line
naming the worker and the command that resumes.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import types
from typing import Any, Callable, Iterator, Optional, Sequence

from .rng import preserved_random_state

#: Signals the workers ignore: the main process handles them (PreemptionHook).
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalSafeWorkerInit:
    """A DataLoader ``worker_init_fn``: SIGTERM and SIGINT ignored in the worker, then the wrapped function.

    Picklable (a module-level class), so it also works with the ``spawn``
    start method. ``inner`` (may be ``None``) is called with the worker id as
    before, so mmengine's worker seeding and a user's function keep working.
    The main process stops such workers the way torch does when an iterator
    ends (a sentinel on their queue), also at interpreter exit
    (:func:`stop_workers_at_exit`), since ``Process.terminate`` (SIGTERM) no
    longer ends them.
    """

    def __init__(self, inner: Optional[Callable[[int], Any]] = None,
                 signals: Sequence[int] = WORKER_IGNORED_SIGNALS) -> None:
        self.inner = inner
        self.signals = tuple(int(s) for s in signals)

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)

    def __repr__(self) -> str:
        return f'SignalSafeWorkerInit({self.inner!r})'


_AT_EXIT_REGISTERED = False


def stop_workers_at_exit() -> None:
    """Shut down the worker processes of every live multi-process dataloader iterator of this process.

    Registered with ``atexit`` when workers are first guarded: it runs before
    torch's and multiprocessing's exit handlers (``atexit`` runs the last
    registered first). Without it, an iterator still alive at exit (persistent
    workers; one held by a traceback) is left to multiprocessing, which
    ``terminate()``s its daemon processes and waits for them without a
    timeout: workers that ignore SIGTERM would keep the process from ending.
    Each iterator is stopped as torch stops it (the sentinel on each worker's
    queue); a worker still alive after that is killed (SIGCHLD reset first, so
    that torch's handler reports nothing during exit).
    """
    import gc
    import multiprocessing

    from torch.utils.data import dataloader as torch_dataloader
    kind = torch_dataloader._MultiProcessingDataLoaderIter
    for obj in gc.get_objects():
        # type(), not isinstance(): the latter reads __class__, which some module objects answer with a warning
        if issubclass(type(obj), kind) and not getattr(obj, '_shutdown', True):
            try:
                obj._shutdown_workers()
            except Exception:  # noqa: BLE001 (exiting anyway; the kill below is the fallback)
                pass
    from torch.utils.data._utils.worker import _worker_loop
    left = [p for p in multiprocessing.active_children() if getattr(p, '_target', None) is _worker_loop]
    if left:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for p in left:
            p.kill()
            p.join(5)


def _register_stop_at_exit() -> None:
    global _AT_EXIT_REGISTERED
    if not _AT_EXIT_REGISTERED:
        import atexit
        atexit.register(stop_workers_at_exit)
        _AT_EXIT_REGISTERED = True


def unwrap_worker_init(fn: Any) -> Any:
    """The worker_init_fn inside :class:`SignalSafeWorkerInit` (``fn`` itself when not wrapped)."""
    return fn.inner if isinstance(fn, SignalSafeWorkerInit) else fn


def _live_iterators(loader: Any, owner: Any) -> Iterator[Any]:
    persistent = getattr(loader, '_iterator', None)
    if persistent is not None:
        yield persistent
    inner = getattr(owner, '_iterator', None) if owner is not None else None
    if inner is not None and inner is not persistent and getattr(inner, '_workers', None):
        yield inner


def _close_index_stream(iterator: Any) -> None:
    """Close a stopped iterator's stream of sampler indices now rather than whenever it is collected."""
    stream = getattr(iterator, '_sampler_iter', None)
    if isinstance(stream, types.GeneratorType):
        stream.close()


def _restart_sampler(loader: Any) -> None:
    """Give a sampler that keeps one index generator for all its iterations (mmengine's ``InfiniteSampler``:
    ``indices``, made once) a new one, from the start of its seeded sequence.

    Closing a stopped iterator's index stream closes that shared generator too
    (``yield from`` passes ``close`` on); an iterator started afterwards would
    then end after the batches it prefetched (``StopIteration`` in the third
    iteration of the UperNet demo). Starting the sequence again also gives the
    restarted workers the batches the first workers had prefetched, in order.
    """
    batch_sampler = getattr(loader, 'batch_sampler', None)
    sampler = getattr(batch_sampler, 'sampler', None) or getattr(loader, 'sampler', None)
    if isinstance(getattr(sampler, 'indices', None), types.GeneratorType) and hasattr(sampler, '_indices_of_rank'):
        sampler.indices = sampler._indices_of_rank()


def guard_dataloader_workers(loader: Any, infinite_iterator: Any = None,
                             signals: Sequence[int] = WORKER_IGNORED_SIGNALS) -> bool:
    """Make the workers of ``loader`` ignore ``signals`` (SIGTERM, SIGINT) (:class:`SignalSafeWorkerInit`).

    Workers are started by ``iter(loader)``; the wrapper applies to workers
    started afterwards. Workers already running (a persistent iterator of
    ``loader``, or ``infinite_iterator``: mmengine's
    ``_InfiniteDataloaderIterator``, which starts them when the
    iteration-based loop is built) are shut down and started again with it;
    the batches come in the same order (sampler and worker seeding are
    seeded), and the main process' random state is left as it was.

    Returns:
        Whether ``loader`` uses worker processes (and is now guarded).
    """
    if not int(getattr(loader, 'num_workers', 0) or 0) > 0 or not hasattr(loader, 'worker_init_fn'):
        return False
    if isinstance(loader.worker_init_fn, SignalSafeWorkerInit):
        return True
    loader.worker_init_fn = SignalSafeWorkerInit(loader.worker_init_fn, signals)
    _register_stop_at_exit()
    started = list(_live_iterators(loader, infinite_iterator))
    if not started:
        return True
    for it in started:
        shutdown = getattr(it, '_shutdown_workers', None)
        if callable(shutdown):
            shutdown()
        _close_index_stream(it)
    _restart_sampler(loader)
    if getattr(loader, '_iterator', None) is not None:
        loader._iterator = None  # a persistent iterator: the next iter() starts new workers
    if infinite_iterator is not None and getattr(infinite_iterator, '_iterator', None) is not None:
        with preserved_random_state():  # iter() draws the workers' base seed from torch's generator
            infinite_iterator._iterator = iter(loader)
    return True


# --------------------------------------------------------------------------
# A worker that died.
# --------------------------------------------------------------------------
class WorkerDied(RuntimeError):
    """A dataloader worker died; the message is :func:`worker_death_message`'s line."""


_WORKER_DIED = re.compile(r'DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)\s*(.*)', re.S)
_KILLED_BY = re.compile(r'killed by signal: ([^.]+)')
_EXIT_CODE = re.compile(r'exit code (-?\d+)')


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _signal_name(text: str) -> str:
    """``SIGKILL (Killed)`` for torch's ``strsignal`` text ``Killed``."""
    text = text.strip()
    for sig in signal.Signals:
        try:
            if signal.strsignal(sig) == text:
                return f'{sig.name} ({text})'
        except ValueError:
            continue
    return text


def resume_command(argv: Optional[list] = None) -> str:
    """The command line that continues the run of ``argv`` (default ``sys.argv``) with ``--resume``.

    A ``--resume CKPT`` already there becomes ``--resume`` alone (the newest
    checkpoint of the work dir); for a tool other than ``tools/train.py`` it
    is the same command again.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return 'the same command again'
    tool, args = argv[0], argv[1:]
    if os.path.basename(tool) == 'train.py':
        kept, skip = [], False
        for i, arg in enumerate(args):
            if skip:
                skip = False
                continue
            if arg == '--resume':
                nxt = args[i + 1] if i + 1 < len(args) else ''
                skip = bool(nxt) and not nxt.startswith('-')  # argparse's nargs='?': its CKPT
                continue
            if arg.startswith('--resume='):
                continue
            kept.append(arg)
        args = kept + ['--resume']
    return shlex.join(['python', tool, *args])


def worker_death_message(err: BaseException, last_checkpoint: Optional[str] = None,
                         argv: Optional[list] = None) -> Optional[str]:
    """One line for an exception chain that a dead dataloader worker caused, or ``None``.

    torch raises ``DataLoader worker (pid N) is killed by signal: Killed``
    from its SIGCHLD handler wherever the main process is (inside a
    checkpoint write or mmengine's config formatting, which then raise their
    own errors on top of it); the line names the worker, the signal (or exit
    code) and the command that resumes from ``last_checkpoint``.
    """
    found = []
    for e in _chain(err):
        m = _WORKER_DIED.search(str(e))
        if m:
            found.append(m)
    if not found:
        return None
    # torch's own "killed by signal" / "exit code" message is more precise than the loader's "exited unexpectedly"
    best = next((m for m in found if _KILLED_BY.search(m.group(2)) or _EXIT_CODE.search(m.group(2))), found[0])
    pids = ', '.join(p.strip() for p in best.group(1).split(',') if p.strip())
    killed, code = _KILLED_BY.search(best.group(2)), _EXIT_CODE.search(best.group(2))
    how = (f'was killed by signal {_signal_name(killed.group(1))}' if killed
           else f'exited with code {code.group(1)}' if code else 'exited unexpectedly')
    plural = 's' if ',' in pids else ''
    argv = list(sys.argv if argv is None else argv)
    if not (argv and os.path.basename(argv[0]) == 'train.py'):
        return f'dataloader worker{plural} (pid{plural} {pids}) {how}; run it again: {resume_command(argv)}'
    where = (f'the last checkpoint is {last_checkpoint}' if last_checkpoint
             else 'no checkpoint of this run was written yet, so it starts again from the beginning')
    return (f'dataloader worker{plural} (pid{plural} {pids}) {how}; the run stopped ({where}); '
            f'continue with: {resume_command(argv)}')


__all__ = ['SignalSafeWorkerInit', 'WorkerDied', 'stop_workers_at_exit', 'WORKER_IGNORED_SIGNALS',
           'guard_dataloader_workers', 'unwrap_worker_init', 'worker_death_message', 'resume_command']
