"""ShardedIndex: one index shard per rank of a torch.distributed process group."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import SEARCH_METRICS
from .arrays import as_ids, as_rows, from_torch
from .._checks import check_non_negative_ids, check_positive
from ._rows import duplicates, merge_best, non_finite_rows
from .base import Index
from .flat import FlatIndex


class ShardedIndex:
    """One shard per rank of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    ``len(index)``, ``add``, ``remove``, ``search`` and ``load`` are collectives: every rank of the group must
    call them, in the same order, with arguments that pass their checks on every rank. A rank that calls one
    alone waits for the others until the process group's timeout (``init_process_group(timeout=...)``; 30
    minutes by default) and then raises a RuntimeError that says so. ``reset`` and ``save`` do not communicate
    but must be called on every rank too (each rank resets or writes its own shard). ``local``, ``dim`` and
    ``metric`` are this rank's, free to use alone.

    ``search`` is a local top-k on every rank, an ``all_gather`` and a merge, so every rank gets the answer
    one FlatIndex over all the data would give.
    ``add`` either keeps each rank's own rows (``route=False``: ranks may pass different batches) or, with
    ``route=True``, takes the same batch on every rank and keeps the rows whose id the rank owns
    (``id % world_size == rank``). Ids are global: by default a running counter over all ranks.
    """

    def __init__(self, local_index: Index, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs an initialised torch.distributed process group")
        self.local = local_index
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._next_id = 0
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def metric(self) -> str:
        return self.local.metric

    @property
    def nbytes(self) -> int:
        """This rank's shard's bytes (see :attr:`Index.nbytes`)."""
        return self.local.nbytes

    def _all_gather(self, t: Tensor, method: str) -> list:
        """all_gather for the collective ``method``: on failure, an error that says what the method is."""
        import torch.distributed as dist

        t = t.to(self._comm_device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, t, group=self.group)
        except RuntimeError as e:  # a timeout or a lost peer (DistBackendError is a RuntimeError)
            # the backend's own message says only that a receive timed out or a connection closed
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(
                f"ShardedIndex.{method} is a collective: every rank of the group must call it, in the same order "
                f"as the other collective methods (len, add, remove, search, load). Its all_gather failed on rank "
                f"{self.rank} of {self.world_size}, most likely because another rank did not call it (the wait "
                f"ends at the process group's timeout) or exited. The backend said: {said}"
            ) from e
        return out

    def _sum(self, value: int, method: str) -> int:
        return int(sum(int(t.item()) for t in self._all_gather(torch.tensor([value], dtype=torch.int64), method)))

    def _max(self, value: int, method: str) -> int:
        return max(int(t.item()) for t in self._all_gather(torch.tensor([value], dtype=torch.int64), method))

    def __len__(self) -> int:
        """The number of vectors over all shards. Collective: every rank must call it (``len(index)`` on one
        rank alone waits for the others until the process group times out, then raises RuntimeError)."""
        return self._sum(len(self.local), "__len__")

    def add(self, vectors, ids=None, *, route: bool = False) -> Tensor:
        """Add rows (see the class docstring for ``route``); returns the ids this rank keeps. Collective:
        every rank must call it; either every rank adds or, with an error on every rank, none does."""
        rows, _, _ = as_rows(vectors, self.dim, "vectors")
        n = rows.shape[0]
        if route:
            new_ids = torch.arange(self._next_id, self._next_id + n) if ids is None else as_ids(ids, n)
            mine = (new_ids % self.world_size) == self.rank
            local_rows, local_ids = rows[mine.to(rows.device)], new_ids[mine]
            all_ids = new_ids
        else:
            counts = [int(t.item()) for t in self._all_gather(torch.tensor([n], dtype=torch.int64), "add")]
            if ids is None:
                start = self._next_id + sum(counts[: self.rank])
                local_ids = torch.arange(start, start + n)
            else:
                local_ids = as_ids(ids, n)
            local_rows = rows
            width = max(counts) if counts else 0
            padded = torch.full((width,), -1, dtype=torch.int64)
            padded[:n] = local_ids
            gathered = self._all_gather(padded, "add")
            all_ids = torch.cat([g.cpu()[:c] for g, c in zip(gathered, counts)])
        # global checks, so that either every rank adds or none does
        check_non_negative_ids(all_ids)
        non_finite = self._sum(int(non_finite_rows(local_rows).numel()), "add")
        dup = duplicates(all_ids)
        problem = f"ids must be unique, got duplicates {dup}" if dup else ""
        if non_finite:
            problem = f"vectors must be finite, found NaN or inf in {non_finite} rows"
        if not problem:
            clash = self._sum(int(torch.isin(all_ids, self.local.ids.cpu()).sum()), "add")
            if clash:
                problem = f"{clash} of the ids are already in the index"
        if problem:
            raise ValueError(problem)
        self.local.add(local_rows, local_ids)
        if all_ids.numel():
            top = int(all_ids.max()) + 1
            self._next_id = max(self._next_id, self._max(top, "add"))
        return local_ids

    def remove(self, ids) -> int:
        """Remove these ids wherever they are stored (every rank passes the same ids; each must be present on
        some rank); returns how many were removed over all ranks. Collective: every rank must call it."""
        gone = as_ids(ids, -1)
        held = torch.isin(gone, self.local.ids.cpu()).to(torch.int64)
        total_held = torch.stack([g.cpu() for g in self._all_gather(held, "remove")]).sum(0) if gone.numel() else held
        missing = gone[total_held == 0]
        if missing.numel():
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        local = gone[held.bool()]
        return self._sum(self.local.remove(local), "remove")

    def reset(self) -> None:
        """Empty every shard. Call it on every rank: it does not communicate, but the ranks' id counters must
        stay equal."""
        self.local.reset()
        self._next_id = 0

    def search(self, queries, k: int, mask=None):
        """As :meth:`FlatIndex.search` over all shards. Every rank passes the same queries and k; ``mask``
        (optional) is this rank's mask over its shard. Collective: every rank must call it."""
        q, kind, squeeze = as_rows(queries, self.dim, "queries")
        k = check_positive(k, "k")
        values, ids = self.local.search(q, k, mask)  # an empty shard answers with padding
        all_values = torch.cat([v.to(values.device) for v in self._all_gather(values, "search")], dim=1)
        all_ids = torch.cat([i.to(values.device) for i in self._all_gather(ids, "search")], dim=1)
        larger = SEARCH_METRICS[self.metric]
        values, ids = merge_best(all_values, all_ids, k, larger, float("-inf") if larger else float("inf"))
        if squeeze:
            values, ids = values[0], ids[0]
        return from_torch(values, kind), from_torch(ids, kind)

    def save(self, path) -> None:
        """Each rank writes its shard to ``{path}.rank{r}-of-{world}`` (call it on every rank)."""
        self.local.save(f"{path}.rank{self.rank}-of-{self.world_size}")

    @classmethod
    def load(cls, path, index_class=FlatIndex, group=None, device="cpu", *, verify: bool = True) -> "ShardedIndex":
        """Each rank reads its shard written by :meth:`save` (``verify``: as :meth:`FlatIndex.load`).
        Collective: every rank must call it."""
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        sharded = cls(index_class.load(f"{path}.rank{rank}-of-{world}", device=device, verify=verify), group)
        sharded._next_id = sharded._max(sharded.local._next_id, "load")
        return sharded
