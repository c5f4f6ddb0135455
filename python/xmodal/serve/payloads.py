"""Payloads: each id's JSON payload, with an inverted index of (key, scalar value) -> ids so that a search's
payload filter becomes an id set without a scan. Kept in a collection's snapshots as JSON."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple


def _filter_key(value) -> str:
    if isinstance(value, float) and value.is_integer():  # 2020.0 and 2020 are one JSON number: one posting
        value = int(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _json_type(filter_key: str) -> str:
    """The JSON type of the scalar a filter key holds, read from its first character."""
    return {'"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(filter_key[0], "number")


#: payload_keys lists a key's values while it has at most this many
MOST_VALUES = 50


def key_summary(key: str, counts: Dict[str, int]) -> dict:
    """``{"key", "types", "distinct", "values", "counts"}`` of a key from ``counts`` ({filter key of a value: rows
    holding it}): the JSON types of its values, how many distinct values it has, and the values themselves (the
    most common first) with how many rows hold each, or None when there are more than MOST_VALUES (only listed
    keys have their values sorted and decoded)."""
    listed = counted = None
    if len(counts) <= MOST_VALUES:
        order = sorted(counts, key=lambda v: (-counts[v], v))
        listed, counted = [json.loads(v) for v in order], [counts[v] for v in order]
    return {"key": key, "types": sorted({_json_type(v) for v in counts}), "distinct": len(counts),
            "values": listed, "counts": counted}


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

    def key_summaries(self) -> List[dict]:
        """:func:`key_summary` of every key with scalar values."""
        counts: Dict[str, Dict[str, int]] = {}
        for (key, value), ids in self._postings.items():
            counts.setdefault(key, {})[value] = len(ids)
        return [key_summary(key, counts[key]) for key in sorted(counts)]

    def to_json(self) -> bytes:
        return json.dumps({str(k): v for k, v in self.by_id.items()}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Payloads":
        p = cls()
        for k, v in json.loads(data).items():
            p.set(int(k), v)
        return p
