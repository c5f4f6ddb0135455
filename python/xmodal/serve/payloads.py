"""Payloads: each id's JSON payload, with an inverted index of (key, scalar value) -> ids so that a search's
payload filter becomes an id set without a scan. Kept in a collection's snapshots as JSON."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple


def _filter_key(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Payloads:
    """Each id's JSON payload, and for payload filters an inverted index of (key, scalar value) -> ids."""

    def __init__(self):
        self.by_id: Dict[int, dict] = {}
        self._postings: Dict[Tuple[str, str], set] = {}

    def _postings_of(self, payload: dict):
        for key, value in payload.items():
            for v in (value if isinstance(value, list) else [value]):
                if not isinstance(v, (dict, list)):
                    yield key, _filter_key(v)

    def set(self, id_: int, payload: Optional[dict]) -> None:
        self.drop(id_)
        if payload:
            self.by_id[id_] = payload
            for posting in self._postings_of(payload):
                self._postings.setdefault(posting, set()).add(id_)

    def drop(self, id_: int) -> None:
        old = self.by_id.pop(id_, None)
        if old:
            for posting in self._postings_of(old):
                ids = self._postings.get(posting)
                if ids is not None:
                    ids.discard(id_)
                    if not ids:
                        del self._postings[posting]

    def matching(self, filter_: dict) -> set:
        """Ids whose payload matches every key of ``filter_``: a scalar value must equal the payload's value
        (or be one of its list's items); a list of scalars matches any of them."""
        result = None
        for key, wanted in filter_.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            ids = set()
            for v in options:
                ids |= self._postings.get((key, _filter_key(v)), set())
            result = ids if result is None else result & ids
            if not result:
                return set()
        return result

    def keys(self, most_values: int = 50) -> List[dict]:
        """``[{"key", "distinct", "values"}]``: every key with scalar values, how many distinct values it has,
        and those values (the most common first), or None when there are more than ``most_values``."""
        by_key: Dict[str, list] = {}
        for (key, value), ids in self._postings.items():
            by_key.setdefault(key, []).append((-len(ids), value))
        out = []
        for key in sorted(by_key):
            values = sorted(by_key[key])
            listed = None if len(values) > most_values else [json.loads(v) for _, v in values]
            out.append({"key": key, "distinct": len(values), "values": listed})
        return out

    def to_json(self) -> bytes:
        return json.dumps({str(k): v for k, v in self.by_id.items()}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Payloads":
        p = cls()
        for k, v in json.loads(data).items():
            p.set(int(k), v)
        return p
