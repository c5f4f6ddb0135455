"""The IVF row store: rows grouped by inverted list in one buffer, each list with a little room to append."""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from ._rows import concatenated_ranges

# The room kept for appends: the buffer holds at most about (1 + 1/10) (1 + 1/32) ~ 1.14 slots a row, plus
# about nlist + TAIL_SLOTS (see InvertedLists). More room, fewer rebuilds: small appends spread over the lists
# copy each stored row ~1.4 * LIST_ROOM times, amortised (simulated: 10-22 times with these values, more for
# lists of a few dozen rows)
LIST_ROOM = 10    # a list resized to hold n rows gets ceil(n / LIST_ROOM) spare slots
TAIL_ROOM = 32    # a rebuilt buffer keeps 1 / TAIL_ROOM of its slots (+ TAIL_SLOTS) free at its end
TAIL_SLOTS = 64
SHORT_RUN = 64    # copying lists: one slice copy per list when they average at least this many rows,
COPY_BLOCK = 16384  # else gathers of this many rows at a time (a bounded temporary)


def _exclusive_cumsum(t: Tensor) -> Tensor:
    return t.cumsum(0) - t


def _with_room(sizes: Tensor) -> Tensor:
    """The capacity a list of ``sizes`` rows is given when it is resized."""
    return sizes + (sizes + LIST_ROOM - 1) // LIST_ROOM


class InvertedLists:
    """Rows of ``nlist`` lists in one buffer of slots: list ``l`` holds the rows at
    ``starts[l] .. starts[l] + sizes[l]`` and owns the slots up to ``starts[l] + capacities[l]``. A row is
    one entry of each column (``columns``: name -> (dtype, width; 0 for one value)) and an id.

    Before rows are appended, :meth:`reserve` makes room for the rows each list will get (one ``add``
    reserves for all its rows, then appends them a chunk at a time, each chunk written straight to its
    slots). Lists with room keep their place; lists that would overflow get capacity ``n + ceil(n / 10)`` for
    their ``n`` rows, at the free end of the buffer if it has room for all of them (their old slots are left
    behind as gaps), else in a rebuilt buffer: every list packed in list order with that room, and 1/32 of
    the slots (+ 64) free at the end. So the buffer holds at most ~1.14 slots a row (+ about ``nlist`` + 64;
    :meth:`max_slots`) however rows arrive, a rebuild happens only once the rows appended since the last one
    outgrow the room it left (a row is copied O(1) times, amortised: ~14 times under small appends spread
    over the lists), and a large add copies each stored row at most once. A rebuild holds the old and new
    buffers at once. :meth:`adopt` takes rows already in list order as the buffer, without a copy (a loaded
    or memory-mapped file); ``keep`` rebuilds it when removals leave more than :meth:`max_slots`. The
    bookkeeping tensors live on the CPU; ``data`` (the columns) and ``ids`` on the index's device. (The scan
    op reads each list as one range of rows of one tensor per column, so the lists share a buffer rather
    than one tensor each.)
    """

    def __init__(self, nlist: int, columns: Dict[str, Tuple[torch.dtype, int]], device: torch.device):
        self.nlist, self.columns, self.device = nlist, columns, device
        self.clear()

    def _empty(self, slots: int) -> Dict[str, Tensor]:
        return {name: torch.empty((slots, width) if width else (slots,), dtype=dtype, device=self.device)
                for name, (dtype, width) in self.columns.items()}

    def clear(self) -> None:
        self.data = self._empty(0)  # per slot; unused slots: garbage
        self.ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.starts = torch.zeros(self.nlist, dtype=torch.int64)
        self.sizes = torch.zeros(self.nlist, dtype=torch.int64)
        self.capacities = torch.zeros(self.nlist, dtype=torch.int64)
        self.end = 0  # slots handed out to lists (in use or left behind)
        self.count = 0
        self._ranges = None  # (starts, sizes, their versions, ranges())

    def __len__(self) -> int:
        return self.count

    @property
    def slots(self) -> int:
        return self.ids.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (every slot: rows, room and gaps)."""
        return sum(t.nbytes for t in self.data.values()) + self.ids.nbytes

    def ranges(self) -> Tensor:
        """``[nlist, 2]`` (begin, end) slot of each list: the scan op's list layout. Kept while ``starts`` and
        ``sizes`` stay the same tensors, unchanged in place (their versions): two ops, 7 us of a 130 us query."""
        made = (self.starts, self.sizes, self.starts._version, self.sizes._version)
        held = self._ranges
        if held is None or held[0] is not made[0] or held[1] is not made[1] or held[2:4] != made[2:]:
            held = self._ranges = made + (torch.stack([self.starts, self.starts + self.sizes], dim=1),)
        return held[4]

    def lists(self) -> Tensor:
        """The list of each row, in list order (CPU)."""
        return torch.repeat_interleave(torch.arange(self.nlist), self.sizes)

    def positions(self) -> Tensor:
        """The slot of each row, in list order (CPU): the order ``ids``, ``vectors`` and masks follow."""
        return concatenated_ranges(self.starts, self.sizes)

    # -- copies
    def _tensors(self, data: Dict[str, Tensor], ids: Tensor) -> List[Tuple[Tensor, Tensor]]:
        return [(data[name], self.data[name]) for name in self.columns] + [(ids, self.ids)]

    def _copy_runs(self, data: Dict[str, Tensor], ids: Tensor, src: Tensor, dst: Tensor, sizes: Tensor) -> None:
        """Copy the rows at ``src[i] .. src[i] + sizes[i]`` of the buffer to ``dst[i] ..`` of ``data``/``ids``
        (the buffer itself or a new one; the runs must not overlap)."""
        rows = int(sizes.sum())
        if not rows:
            return
        pairs = self._tensors(data, ids)
        if sizes.numel() * SHORT_RUN <= rows:  # long runs: one slice copy each (memcpy)
            for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist()):
                if n:
                    for new, old in pairs:
                        new[d: d + n].copy_(old[s: s + n])
            return
        # short runs: gathers, over groups of runs of ~8 blocks (so the slot indices stay small too)
        ends = sizes.cumsum(0)
        step = torch.tensor(range(8 * COPY_BLOCK, rows, 8 * COPY_BLOCK), dtype=torch.int64)
        cuts = sorted(set(torch.searchsorted(ends, step, right=True).tolist()) - {0, sizes.numel()})
        for lo, hi in zip([0] + cuts, cuts + [sizes.numel()]):
            self._gather(pairs, concatenated_ranges(src[lo:hi], sizes[lo:hi]),
                         concatenated_ranges(dst[lo:hi], sizes[lo:hi]))

    def _gather(self, pairs: List[Tuple[Tensor, Tensor]], src: Tensor, dst: Tensor) -> None:
        """``new[dst] = old[src]`` for each (new, old) pair, a block of rows at a time (a bounded temporary).
        In place, safe when no block's destinations hold a later block's sources (as when every row moves
        down, or to slots not read)."""
        for b in range(0, src.numel(), COPY_BLOCK):
            s, d = src[b: b + COPY_BLOCK].to(self.device), dst[b: b + COPY_BLOCK].to(self.device)
            for new, old in pairs:
                new.index_copy_(0, d, old.index_select(0, s))

    def _packed(self, capacities: Tensor, tail: bool) -> Tuple[Dict[str, Tensor], Tensor, Tensor, int]:
        """(data, ids, starts, end) of an empty new buffer with the lists packed in list order, list ``l``
        owning ``capacities[l]`` slots from ``starts[l]``, and (``tail``) free slots after ``end``."""
        starts = _exclusive_cumsum(capacities)
        end = int(capacities.sum())
        slots = end + (end // TAIL_ROOM + TAIL_SLOTS if tail else 0)
        return self._empty(slots), torch.empty(slots, dtype=torch.int64, device=self.device), starts, end

    def _rebuild(self, capacities: Tensor, tail: bool) -> None:
        """A new buffer (:meth:`_packed`) with the rows copied over."""
        data, ids, starts, end = self._packed(capacities, tail)
        self._copy_runs(data, ids, self.starts, starts, self.sizes)
        self.data, self.ids, self.starts, self.capacities, self.end = data, ids, starts, capacities.clone(), end

    # -- appends
    def reserve(self, counts: Tensor) -> None:
        """Make room for ``counts[l]`` more rows in each list ``l`` (CPU int64; see the class docstring)."""
        need = self.sizes + counts
        grow = need > self.capacities
        if not bool(grow.any()):
            return
        room = _with_room(need)
        moved = int(room[grow].sum())
        if self.end + moved <= self.slots:  # the grown lists fit in the free end: move just them
            grown = torch.nonzero(grow).flatten()
            starts = self.end + _exclusive_cumsum(room[grown])
            self._copy_runs(self.data, self.ids, self.starts[grown], starts, self.sizes[grown])
            self.starts[grown], self.capacities[grown] = starts, room[grown]
            self.end += moved
        else:
            self._rebuild(room, tail=True)

    def append(self, rows: Dict[str, Tensor], ids: Tensor, lists: Tensor) -> None:
        """Add rows (one tensor per column, on the device) with ``ids`` to ``lists`` (CPU int64, one per row),
        each after its list's rows, in order."""
        counts = torch.bincount(lists, minlength=self.nlist)
        self.reserve(counts)
        order = torch.argsort(lists, stable=True)
        sorted_lists = lists[order]
        rank = torch.arange(lists.numel()) - _exclusive_cumsum(counts)[sorted_lists]
        slots = torch.empty_like(lists)
        slots[order] = (self.starts + self.sizes)[sorted_lists] + rank
        slots = slots.to(self.device)
        for name, t in self.data.items():
            t.index_copy_(0, slots, rows[name])
        self.ids.index_copy_(0, slots, ids)
        self.sizes = self.sizes + counts
        self.count += int(lists.numel())

    def truncate(self, sizes: Tensor) -> None:
        """Let go of the rows appended since the lists had ``sizes`` rows (an add that failed part way)."""
        self.sizes = sizes.clone()
        self.count = int(sizes.sum())

    def adopt(self, rows: Dict[str, Tensor], ids: Tensor, sizes: Tensor) -> None:
        """Take rows already in list order (list ``l`` holding ``sizes[l]`` of them) as the buffer, exactly
        (no room, no copy)."""
        self.clear()
        self.data, self.ids = dict(rows), ids
        self.sizes, self.capacities = sizes.clone(), sizes.clone()
        self.starts = _exclusive_cumsum(sizes)
        self.end = self.count = int(sizes.sum())

    # -- removals
    def keep(self, keep: Tensor) -> None:
        """Keep the rows where ``keep`` (CPU bool, list order) is True, in order: in place, lists keeping their
        room, unless the buffer would then hold more slots than :meth:`max_slots` of the rows kept: then they
        are copied to a rebuilt buffer."""
        kept_lists = self.lists()[keep]
        sizes = torch.bincount(kept_lists, minlength=self.nlist)
        src = self.positions()[keep]
        if self.slots > self.max_slots(int(kept_lists.numel())):
            room = _with_room(sizes)
            data, ids, starts, end = self._packed(room, tail=True)
            self._gather(self._tensors(data, ids), src, concatenated_ranges(starts, sizes))
            self.data, self.ids, self.starts, self.capacities, self.end = data, ids, starts, room, end
        else:  # every kept row moves down within its list's slots
            self._gather(self._tensors(self.data, self.ids), src, concatenated_ranges(self.starts, sizes))
        self.sizes = sizes
        self.count = int(kept_lists.numel())

    def max_slots(self, rows: int) -> int:
        """The most slots a buffer holding ``rows`` rows should have: what a rebuild gives at most (room
        ``ceil(n / 10)`` for a list of ``n`` rows, 1/32 + 64 slots free at the end) with a little to spare:
        ~1.15 slots a row, + about ``nlist`` + 64."""
        return rows + (rows * 15 + 99) // 100 + self.nlist + self.nlist // 16 + TAIL_SLOTS

    def rows(self) -> Dict[str, Tensor]:
        """Every column's rows, in list order (copies)."""
        slots = self.positions().to(self.device)
        return {name: t[slots] for name, t in self.data.items()}

    def chunks(self, name: str, rows: int = 1 << 16) -> Iterator[Tensor]:
        """Column ``name`` (or "ids") in list order, about ``rows`` rows at a time (whole lists; copies)."""
        column = self.ids if name == "ids" else self.data[name]
        ends = self.sizes.cumsum(0)
        lo = 0
        while lo < self.nlist:
            hi = max(lo + 1, int(torch.searchsorted(ends, int(ends[lo] - self.sizes[lo]) + rows, right=True)))
            yield column[concatenated_ranges(self.starts[lo:hi], self.sizes[lo:hi]).to(self.device)]
            lo = hi

    def move(self, device: torch.device) -> None:
        self.data = {name: t.to(device) for name, t in self.data.items()}
        self.ids, self.device = self.ids.to(device), device
