"""Restarting the workers of an iteration-based loop's dataloader (``guard_dataloader_workers``) with
mmengine's ``InfiniteSampler``: the batches go on, in the order an unguarded loader gives them."""
import torch
from mmengine.dataset.sampler import InfiniteSampler
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader

from mlla_mm.engine.workers import SignalSafeWorkerInit, guard_dataloader_workers


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


def loader_and_iterator(workers: int):
    loader = DataLoader(Numbers(), batch_size=2, sampler=InfiniteSampler(Numbers(), shuffle=True, seed=3),
                        num_workers=workers, persistent_workers=workers > 0)
    return loader, _InfiniteDataloaderIterator(loader)  # as IterBasedTrainLoop builds it: workers started


def batches(iterator, n: int):
    return [next(iterator).tolist() for _ in range(n)]


def test_restarted_workers_of_an_infinite_sampler_keep_delivering_in_order():
    reference_loader, reference = loader_and_iterator(workers=1)
    expected = batches(reference, 8)  # more than the two batches the first worker prefetched
    loader, iterator = loader_and_iterator(workers=1)
    first = iterator._iterator
    assert guard_dataloader_workers(loader, iterator)
    assert isinstance(loader.worker_init_fn, SignalSafeWorkerInit) and iterator._iterator is not first
    got = batches(iterator, 8)  # before the fix: StopIteration after the prefetched batches
    assert got == expected
    assert sorted(sum(got[:5], [])) == list(range(10))  # one pass over the data set first
