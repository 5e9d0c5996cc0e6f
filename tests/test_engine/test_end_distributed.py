"""How a distributed run ends: the ranks meet, then the process group is destroyed (two gloo processes on the CPU).

A rank that ended straight after its last collective, while its peer still
wrote the last checkpoint, aborted in CI (SIGABRT, "terminate called without
an active exception": a gloo worker thread took the GIL during interpreter
shutdown). ``end_distributed`` now waits for every rank first; these tests
start two real processes and time that wait, and check the bounded wait and
the error path (no waiting when this process stops on an error).
"""
import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, free_port, tool_env

#: Each rank: join a gloo group, all-reduce like a training step, let rank 0 dawdle (writing its checkpoint), then
#: time end_distributed and report as one JSON line. ``peer_never_ends``: rank 0 leaves without ending.
SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch, torch.distributed as dist
    from mlla_mm.engine.distributed import end_distributed
    port, rank, rank0_delay, meet, peer_never_ends = sys.argv[1:6]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=int(rank), world_size=2)
    flag = torch.ones(1)
    dist.all_reduce(flag)
    if rank == '0':
        time.sleep(float(rank0_delay))
        if peer_never_ends == '1':
            os._exit(0)
    t0 = time.monotonic()
    end_distributed(meet=meet == '1')
    print(json.dumps(dict(rank=int(rank), waited=time.monotonic() - t0, still_up=dist.is_initialized())), flush=True)
    os._exit(0)  # a group left up (the timeout case) is not torn down at exit
''')


def _two_ranks(tmp_path, rank0_delay: float, meet: bool = True, peer_never_ends: bool = False, **env):
    """Run SCRIPT as ranks 0 and 1; returns rank 1's report and its output (stdout and stderr)."""
    script = tmp_path / 'ranks.py'
    script.write_text(SCRIPT)
    port = str(free_port())
    flags = ['1' if meet else '0', '1' if peer_never_ends else '0']
    procs = [subprocess.Popen([sys.executable, str(script), port, str(rank), str(rank0_delay), *flags], cwd=ROOT,
                              env=tool_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    report = json.loads(outs[1][0].strip().splitlines()[-1])
    assert report['rank'] == 1
    return report, outs[1][0] + outs[1][1]


def test_a_rank_waits_for_its_peer_before_the_group_ends(tmp_path):
    # Rank 1 reaches the end at once; rank 0 comes 2 s later. Rank 1 leaves end_distributed only then.
    report, out = _two_ranks(tmp_path, rank0_delay=2.0)
    assert report['waited'] > 1.5, report
    assert report['still_up'] is False  # destroyed after the meeting
    assert 'did not reach the end' not in out


def test_a_peer_that_never_comes_is_waited_for_at_most_the_rendezvous_timeout(tmp_path):
    # Rank 0 hangs for 6 s and then leaves without ending; rank 1 gives up after 1.5 s with one warning.
    report, out = _two_ranks(tmp_path, rank0_delay=6.0, peer_never_ends=True, MLLA_MM_RENDEZVOUS_TIMEOUT='1.5')
    assert 1.2 < report['waited'] < 5.5, report
    assert report['still_up'] is True  # a barrier is pending: destroying would wait for it
    assert ('warning: rank 1: the other processes did not reach the end of the run (waited 1.5 s; '
            'MLLA_MM_RENDEZVOUS_TIMEOUT sets the wait); the process group is left to the launcher') in out


def test_a_bad_timeout_setting_is_a_warning_at_the_end_not_a_traceback(tmp_path):
    # A group started elsewhere (CUDA, a script) never had MLLA_MM_RENDEZVOUS_TIMEOUT checked: the run is done, so
    # one warning line and the default wait, and the ranks still meet.
    report, out = _two_ranks(tmp_path, rank0_delay=2.0, MLLA_MM_RENDEZVOUS_TIMEOUT='soon')
    assert report['waited'] > 1.5 and report['still_up'] is False, report
    assert ("warning: MLLA_MM_RENDEZVOUS_TIMEOUT='soon': expected a number of seconds > 0 (default 300); the end of "
            'the run waits at most 300 s') in out
    assert 'Traceback' not in out


def test_a_peer_that_is_gone_is_not_waited_for(tmp_path):
    # Rank 0 exits without ending (its connection closes): rank 1 does not wait the timeout out.
    report, out = _two_ranks(tmp_path, rank0_delay=0.0, peer_never_ends=True)
    assert report['waited'] < 30, report
    assert report['still_up'] is True
    line = next(line for line in out.splitlines() if line.startswith('warning: rank 1: '))
    assert 'did not reach the end of the run (' in line and 'waited' not in line  # gloo's reason, not a timeout
    assert 'Connection' in line and '.cc:' not in line, line


def test_after_an_error_a_rank_does_not_wait(tmp_path):
    # meet=False (main() raised): the peer may be anywhere; the group is destroyed at once.
    report, _ = _two_ranks(tmp_path, rank0_delay=3.0, meet=False)
    assert report['waited'] < 1.5, report
    assert report['still_up'] is False


@pytest.mark.parametrize('outcome, meets', [('returns', True), ('interrupted', True), ('usage', False),
                                            ('bug', False)])
def test_run_main_lets_the_ranks_meet_only_when_main_finished(monkeypatch, capsys, outcome, meets):
    from mlla_mm import cli
    from mlla_mm.errors import TrainingInterrupted, UsageError
    calls = []
    monkeypatch.setattr(cli, 'end_distributed', lambda meet=True: calls.append(meet))

    def main():
        if outcome == 'interrupted':
            raise TrainingInterrupted(143)
        if outcome == 'usage':
            raise UsageError('bad option')
        if outcome == 'bug':
            raise ZeroDivisionError('a bug')
        return 0

    if outcome == 'bug':
        with pytest.raises(ZeroDivisionError):
            cli.run_main(main)
    else:
        assert cli.run_main(main) == {'returns': 0, 'interrupted': 143, 'usage': 2}[outcome]
    assert calls == [meets]


def test_scripts_meet_at_exit_unless_they_died_of_an_exception(monkeypatch):
    from mlla_mm.engine import distributed
    calls = []
    monkeypatch.setattr(distributed, 'end_distributed', lambda meet=True: calls.append(meet))
    monkeypatch.delattr(sys, 'last_value', raising=False)
    distributed.end_distributed_at_exit()
    monkeypatch.setattr(sys, 'last_value', RuntimeError('uncaught'), raising=False)
    distributed.end_distributed_at_exit()
    assert calls == [True, False]
