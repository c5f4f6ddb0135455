"""ShardedIndex over 2 and 3 CPU processes (gloo): the merged answer equals one FlatIndex over all data."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmodal import FlatIndex, ShardedIndex


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 8, generator=g), torch.randn(300, 8, generator=g)


def _worker(rank, world, port, shard_sizes, metric, route, tmpdir, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        queries, database = _data()
        index = ShardedIndex(FlatIndex(8, metric))
        if route:
            index.add(database, route=True)  # every rank passes everything; each keeps the ids it owns
            assert len(index.local) == len([i for i in range(300) if i % world == rank])
        else:
            bounds = [sum(shard_sizes[:r]) for r in range(world + 1)]
            index.add(database[bounds[rank]: bounds[rank + 1]])  # uneven (possibly empty) shards
            assert len(index.local) == shard_sizes[rank]
        assert len(index) == 300
        flat = FlatIndex(8, metric)
        flat.add(database)
        want_v, want_i = flat.search(queries, 15)
        got_v, got_i = index.search(queries, 15)
        torch.testing.assert_close(got_v, want_v)
        assert torch.equal(got_i, want_i)
        # remove is collective and global
        index.remove([0, 150, 299])
        flat.remove([0, 150, 299])
        assert len(index) == 297
        got_v, got_i = index.search(queries[0], 400)  # k > N: padding
        want_v, want_i = flat.search(queries[0], 400)
        assert torch.equal(got_i, want_i)
        with pytest.raises(KeyError, match=r"ids not in the index: \[150\]"):
            index.remove([150])
        with pytest.raises(ValueError, match="already in the index"):  # only rank 0 adds; id 5 exists
            index.add(database[:1] if rank == 0 else database[:0], [5] if rank == 0 else [])
        with pytest.raises(ValueError, match=r"ids must be unique, got duplicates \[1000\]"):  # every rank adds 1000
            index.add(database[:1], [1000])
        assert len(index) == 297
        # save / load per rank
        path = os.path.join(tmpdir, "sharded")
        index.save(path)
        loaded = ShardedIndex.load(path)
        assert torch.equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])
        dist.barrier()
    except BaseException as e:  # report to the parent, which fails the test
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world,shard_sizes,metric,route", [
    (2, [120, 180], "cosine", False),
    (3, [0, 200, 100], "l2", False),
    (3, [300, 0, 0], "ip", False),
    (3, None, "cosine", True),
])
def test_sharded_equals_flat(tmp_path, world, shard_sizes, metric, route):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), shard_sizes, metric, route, str(tmp_path), errors),
                       nprocs=world, join=True, start_method="spawn")
    assert errors.empty(), errors.get()


def test_sharded_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        ShardedIndex(FlatIndex(4))


def _lonely_len_worker(rank, world, port, done, errors):
    """Rank 0 calls len(index) alone; the others only wait until it has seen the error."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=2))
        index = ShardedIndex(FlatIndex(4))
        if rank == 0:
            try:
                collective = (r"^ShardedIndex.__len__ is a collective: every rank of the group must call it, .* "
                              r"failed on rank 0 of 2, most likely because another rank did not call it")
                with pytest.raises(RuntimeError, match=collective) as info:
                    len(index)
                assert isinstance(info.value.__cause__, RuntimeError)  # the backend's own error, chained
            finally:
                done.set()
        else:
            assert done.wait(60), "rank 0 never reported"
    except BaseException as e:
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_collective_called_on_one_rank_says_so_when_it_times_out():
    ctx = mp.get_context("spawn")
    done, errors = ctx.Event(), ctx.Queue()
    mp.start_processes(_lonely_len_worker, args=(2, _free_port(), done, errors), nprocs=2, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()
