"""The multi-process harness: results by rank, launcher environment, loopback-only sockets, and
failures (a raising rank, a hanging rank, ranks killed by signals) reported for every rank."""
import ipaddress
import os
import signal
import socket
import struct
import sys
import time

import pytest
import torch
import torch.distributed as dist

from .harness import DistributedRunError, run_distributed, run_distributed_checks

def _environment_and_collectives(rank, world_size):
    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    gathered = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([rank, rank * rank]))
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                      "MASTER_ADDR")}
    return dict(env=env, rank=dist.get_rank(), world=dist.get_world_size(), backend=dist.get_backend(),
                threads=torch.get_num_threads(), total=t.item(), gathered=torch.stack(gathered))


def _proc_net_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    if len(host) == 8:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(host, 16)))
    else:  # /proc/net/tcp6 prints four 32-bit words, each in host (little-endian) order
        ip6 = ipaddress.IPv6Address(struct.pack("<4I", *(int(host[i:i + 8], 16) for i in range(0, 32, 8))))
        # an IPv6 socket talking to an IPv4 peer shows it as ::ffff:a.b.c.d
        ip = str(ip6.ipv4_mapped or ip6)
    return ip, int(port, 16)


def _own_tcp_sockets(rank, world_size):
    """Every TCP socket this rank holds after a collective: (local ip, remote ip, state)."""
    dist.all_reduce(torch.ones(3))  # every Gloo pair is connected by now
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((_proc_net_address(fields[1])[0], _proc_net_address(fields[2])[0], fields[3]))
    return found


@pytest.fixture(scope="module")
def four_ranks_two_nodes():
    # One spawn for the module: 2 simulated nodes x 2 local ranks.
    return run_distributed_checks([_environment_and_collectives, _own_tcp_sockets], world_size=4,
                                  local_world_size=2, timeout=180)


@pytest.mark.slow
@pytest.mark.distributed
def test_results_come_back_per_rank_with_launcher_environment(four_ranks_two_nodes):
    results = four_ranks_two_nodes["_environment_and_collectives"]
    assert len(results) == 4
    for rank, r in enumerate(results):
        assert r["env"] == dict(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                                GROUP_RANK=str(rank // 2), MASTER_ADDR="127.0.0.1")
        assert (r["rank"], r["world"], r["backend"], r["threads"]) == (rank, 4, "gloo", 1)
        assert r["total"] == 1 + 2 + 3 + 4
        assert torch.equal(r["gathered"], torch.tensor([[0, 0], [1, 1], [2, 4], [3, 9]]))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_socket_of_every_rank_is_on_127_0_0_1(four_ranks_two_nodes):
    for rank, sockets in enumerate(four_ranks_two_nodes["_own_tcp_sockets"]):
        # at least the store client and one Gloo pair per peer
        assert len(sockets) >= 1 + 3, (rank, sockets)
        for local, remote, state in sockets:
            assert local == "127.0.0.1", (rank, sockets)
            listening = state == "0A"
            assert remote == ("0.0.0.0" if listening else "127.0.0.1"), (rank, sockets)


def _raise_on_rank_0(rank, world_size):
    if rank == 0:
        raise ValueError("deliberate failure on rank 0")
    return "rank 1 finished its part"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_raising_rank_fails_the_run_with_its_traceback_and_every_rank_status():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_raise_on_rank_0, world_size=2, timeout=60)
    message = str(info.value)
    assert "rank 0 first" in message  # rank 1 may fail too, on the connection rank 0 dropped
    assert "rank 0: raised" in message
    assert "ValueError: deliberate failure on rank 0" in message
    assert "_raise_on_rank_0" in message  # the traceback, not only the exception text
    assert "rank 1: " in message  # the peer is reported too, whatever became of it
    assert [o.status for o in info.value.outcomes][0] == "raised"


def _rank_1_sleeps_forever(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    dist.barrier()  # rank 0 waits here for a peer that never comes


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hanging_run_is_killed_and_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_rank_1_sleeps_forever, world_size=2, timeout=20)
    elapsed = time.monotonic() - start
    assert 20 <= elapsed < 20 + 15, elapsed  # the deadline, plus the stack dump and the kills
    message = str(info.value)
    assert "timed out after 20 s" in message
    assert [o.status for o in info.value.outcomes] == ["timeout", "timeout"]
    # each rank's Python stack when it was killed shows where it was stuck
    rank0, rank1 = (o.detail for o in info.value.outcomes)
    assert "_rank_1_sleeps_forever" in rank0 and "_rank_1_sleeps_forever" in rank1


def _die_by_signals(rank, world_size):
    if rank == 0:
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_killed_by_signals_are_reported_with_exit_codes():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_die_by_signals, world_size=2, timeout=60)
    message = str(info.value)
    assert "rank 0: signal (exit code -6): killed by SIGABRT" in message
    assert "rank 1: signal (exit code -9): killed by SIGKILL" in message
    assert [(o.status, o.exitcode) for o in info.value.outcomes] == [("signal", -6), ("signal", -9)]
    # faulthandler's Python stack at the abort names the function that aborted
    assert "_die_by_signals" in info.value.outcomes[0].detail


def _first_check(rank, world_size):
    return rank * 10


def _second_check_fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise KeyError("missing on rank 1")
    return "ok"


@pytest.mark.slow
@pytest.mark.distributed
def test_checks_in_one_spawn_name_the_failing_check():
    with pytest.raises(DistributedRunError) as info:
        run_distributed_checks([_first_check, _second_check_fails_on_rank_1], world_size=2, timeout=60)
    message = str(info.value)
    assert "rank 1: raised" in message
    assert "check _second_check_fails_on_rank_1 failed on rank 1" in message
    assert "KeyError: 'missing on rank 1'" in message


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "world_size must be an int >= 1"),
    (dict(world_size=4, local_world_size=3), "local_world_size=3 must be an int >= 1 that divides world_size=4"),
    (dict(timeout=0), "timeout must be > 0"),
], ids=["world_size_0", "local_not_dividing", "timeout_0"])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_distributed(_first_check, **kwargs)


def test_checks_need_distinct_names():
    with pytest.raises(ValueError, match="distinct"):
        run_distributed_checks([_first_check, _first_check])
