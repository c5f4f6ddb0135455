"""The IVF row store: rows grouped by inverted list in one buffer, with room to append to each list."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor


def _exclusive_cumsum(t: Tensor) -> Tensor:
    return t.cumsum(0) - t


class InvertedLists:
    """Rows of ``nlist`` lists in one buffer of slots: list ``l`` holds the rows at
    ``starts[l] .. starts[l] + sizes[l]`` and owns the slots up to ``starts[l] + capacities[l]``. A row is
    one entry of each column (``columns``: name -> (dtype, width; 0 for one value)) and an id.

    Appending to a full list moves it to the end of the buffer with at least twice its room, so an append
    costs O(rows added), amortised (the first append to a list loaded tight moves it once). The slots left
    behind are reclaimed by compaction once they outnumber the slots in use; lists keep their room. The
    bookkeeping tensors live on the CPU; ``data`` (the columns) and ``ids`` on the index's device.
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

    def __len__(self) -> int:
        return self.count

    @property
    def slots(self) -> int:
        return self.ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.data.values()) + self.ids.nbytes

    def ranges(self) -> Tensor:
        """``[nlist, 2]`` (begin, end) slot of each list: the scan op's list layout."""
        return torch.stack([self.starts, self.starts + self.sizes], dim=1)

    def lists(self) -> Tensor:
        """The list of each row, in list order (CPU)."""
        return torch.repeat_interleave(torch.arange(self.nlist), self.sizes)

    def positions(self) -> Tensor:
        """The slot of each row, in list order (CPU): the order ``ids``, ``vectors`` and masks follow."""
        return self._slots(self.starts, self.sizes)

    @staticmethod
    def _slots(starts: Tensor, sizes: Tensor) -> Tensor:
        """Concatenated ``arange(starts[i], starts[i] + sizes[i])``."""
        first = torch.repeat_interleave(starts - _exclusive_cumsum(sizes), sizes)
        return first + torch.arange(int(sizes.sum()))

    def _reserve(self, slots: int) -> None:
        have = self.slots
        if slots <= have:
            return
        capacity = max(slots, have + have // 2, 1024)  # geometric, so moves stay O(1) per slot amortised
        data, ids = self._empty(capacity), torch.empty(capacity, dtype=torch.int64, device=self.device)
        for name, t in data.items():
            t[: self.end] = self.data[name][: self.end]
        ids[: self.end] = self.ids[: self.end]
        self.data, self.ids = data, ids

    def _copy(self, src: Tensor, dst: Tensor) -> None:
        src, dst = src.to(self.device), dst.to(self.device)
        for t in self.data.values():
            t[dst] = t[src]  # the gather copies first, so overlapping moves are safe
        self.ids[dst] = self.ids[src]

    def append(self, rows: Dict[str, Tensor], ids: Tensor, lists: Tensor) -> None:
        """Add rows (one tensor per column) with ``ids`` to ``lists`` (CPU int64, one per row)."""
        counts = torch.bincount(lists, minlength=self.nlist)
        need = self.sizes + counts
        grow = torch.nonzero(need > self.capacities).flatten()
        if grow.numel():  # move each full list to the end of the buffer with room to spare
            room = torch.maximum(need[grow], 2 * self.capacities[grow])
            new_starts = self.end + _exclusive_cumsum(room)
            self._reserve(self.end + int(room.sum()))
            self._copy(self._slots(self.starts[grow], self.sizes[grow]),
                        self._slots(new_starts, self.sizes[grow]))
            self.starts[grow], self.capacities[grow] = new_starts, room
            self.end += int(room.sum())
        order = torch.argsort(lists, stable=True)
        sorted_lists = lists[order]
        rank = torch.arange(lists.numel()) - _exclusive_cumsum(counts)[sorted_lists]
        slots = (self.starts[sorted_lists] + self.sizes[sorted_lists] + rank).to(self.device)
        order = order.to(self.device)
        for name, t in self.data.items():
            t[slots] = rows[name][order]
        self.ids[slots] = ids[order]
        self.sizes += counts
        self.count += int(lists.numel())
        if self.end - int(self.capacities.sum()) > self.end // 2:
            self._compact()

    def _compact(self) -> None:
        """Close the gaps left by moved lists (each list keeps its room)."""
        starts = _exclusive_cumsum(self.capacities)
        total = int(self.capacities.sum())
        data, ids = self._empty(total), torch.empty(total, dtype=torch.int64, device=self.device)
        src = self.positions().to(self.device)
        dst = self._slots(starts, self.sizes).to(self.device)
        for name, t in data.items():
            t[dst] = self.data[name][src]
        ids[dst] = self.ids[src]
        self.data, self.ids, self.starts, self.end = data, ids, starts, total

    def keep(self, keep: Tensor) -> None:
        """Keep the rows where ``keep`` (CPU bool, list order) is True, in order; lists keep their room."""
        kept_lists = self.lists()[keep]
        sizes = torch.bincount(kept_lists, minlength=self.nlist)
        rank = torch.arange(kept_lists.numel()) - _exclusive_cumsum(sizes)[kept_lists]
        self._copy(self.positions()[keep], self.starts[kept_lists] + rank)
        self.sizes = sizes
        self.count = int(kept_lists.numel())

    def rows(self) -> Dict[str, Tensor]:
        """Every column's rows, in list order (copies)."""
        slots = self.positions().to(self.device)
        return {name: t[slots] for name, t in self.data.items()}

    def move(self, device: torch.device) -> None:
        self.data = {name: t.to(device) for name, t in self.data.items()}
        self.ids, self.device = self.ids.to(device), device
