"""Shards and their replicas: where an id lives (:func:`shard_of`), the folders a sharded service keeps
(:func:`shard_folders`, :func:`replica_folders`), and the shard calls the sharded front (:mod:`.fanout`)
sends requests through: :class:`LocalShard` (an app in this process) and :class:`Replicas` (one shard kept
by several replicas)."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Answer", "LocalShard", "Replicas", "ShardCall", "ShardUnavailable", "replica_folders", "shard_folders",
           "shard_of", "written_layout", "written_shards"]

#: (status, headers, body) of one shard's answer
Answer = Tuple[int, Dict[str, str], bytes]
#: a shard: (method, path with query, body, content type) -> its answer; raises ShardUnavailable when it cannot
ShardCall = Callable[[str, str, bytes, Optional[str]], Awaitable[Answer]]


class ShardUnavailable(Exception):
    """A shard did not answer (down, restarting or unreachable)."""


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard that owns each id: splitmix64 of the id, modulo ``shards``. Fixed forever: files written by one
    version are routed alike by every later one."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def written_layout(folder: str) -> dict:
    """What ``folder``'s ``shards.json`` says: ``shards`` (None for a folder without one) and ``replicas``."""
    path = os.path.join(folder, "shards.json")
    if not os.path.exists(path):
        return {"shards": None, "replicas": 1}
    with open(path, encoding="utf-8") as f:
        layout = json.load(f)
    return {"shards": layout.get("shards"), "replicas": int(layout.get("replicas", 1))}


def written_shards(folder: str) -> Optional[int]:
    """The shard count ``folder`` was written with, or None for a folder without one."""
    return written_layout(folder)["shards"]


def shard_folders(folder: str, shards: int) -> List[str]:
    """The shards' folders under ``folder`` (created if missing), after checking that ``folder`` was not written
    with another shard count (ids would then be looked for on the wrong shards)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    os.makedirs(folder, exist_ok=True)
    written = written_shards(folder)
    if written is None:
        from .storage import write_file

        write_file(os.path.join(folder, "shards.json"),
                   json.dumps({"shards": shards, "routing": "splitmix64(id) % shards"}).encode())
    elif written != shards:
        raise ValueError(f"{folder!r} holds {written} shards, got shards={shards} (ids are routed by the count)")
    return [os.path.join(folder, f"shard-{i:03d}") for i in range(shards)]


class LocalShard:
    """A shard served in this process: an ``xmodal serve`` app over ``folder``, called without an HTTP hop.
    ``options``: :func:`.app.create_app`'s keyword arguments."""

    def __init__(self, folder: str, **options):
        import httpx

        from .app import create_app

        guarded = create_app(folder, load_in_background=False, **options)
        self.service = guarded.app.state.service
        self.service.load(raise_errors=True)
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://shard")

    async def __call__(self, method: str, path: str, body: bytes = b"", content_type: Optional[str] = None) -> Answer:
        headers = {"content-type": content_type} if content_type else {}
        r = await self._client.request(method, path, content=body, headers=headers)
        return r.status_code, {k: v for k, v in r.headers.items() if k in ("retry-after", "content-type")}, r.content

    def close(self) -> None:
        self.service.close()


def replica_folders(folder: str, shards: int, replicas: int) -> List[List[str]]:
    """Each shard's replicas' folders: the shard's own (:func:`shard_folders`) and ``<shard>.replica-<j>`` for
    the others. A replica new to the folder starts as a copy of the first one (so call this while nothing
    serves ``folder``); the count is kept in ``shards.json``, so that a replica dropped and later added again
    is copied afresh rather than served stale."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    firsts = shard_folders(folder, shards)
    had = written_layout(folder)["replicas"]
    out = [[first] + [f"{first}.replica-{j}" for j in range(1, replicas)] for first in firsts]
    for first, *others in out:
        for j, copy in enumerate(others, start=1):
            if j >= had or not os.path.isdir(copy):
                shutil.rmtree(copy, ignore_errors=True)
                if os.path.isdir(first):
                    shutil.copytree(first, copy)
    if replicas != had:
        from .storage import write_file

        path = os.path.join(folder, "shards.json")
        with open(path, encoding="utf-8") as f:
            layout = json.load(f)
        write_file(path, json.dumps({**layout, "replicas": replicas}).encode())
    return out


class Replicas:
    """One shard kept by several replicas, each over its own copy: a write goes to every replica and is
    acknowledged when all have made it durable (ShardUnavailable while one cannot answer: send it again; the
    replicas that took it answer alike), a read goes to the next replica in turn, and to the others while it
    cannot answer. Reads are GET requests and searches."""

    def __init__(self, replicas: Sequence[ShardCall]):
        if not replicas:
            raise ValueError("replicas must hold at least one shard call")
        self.replicas = list(replicas)
        self._turn = itertools.count()

    async def __call__(self, method: str, path: str, body: bytes = b"", content_type: Optional[str] = None) -> Answer:
        route = path.split("?", 1)[0].split("/")  # ["", "collections", name, "search", ...]
        if method == "GET" or (method == "POST" and route[3:4] == ["search"]):
            first = next(self._turn) % len(self.replicas)
            for r in self.replicas[first:] + self.replicas[:first]:
                try:
                    return await r(method, path, body, content_type)
                except ShardUnavailable:
                    continue
            raise ShardUnavailable("no replica of the shard can answer")
        answers = await asyncio.gather(*(r(method, path, body, content_type) for r in self.replicas),
                                       return_exceptions=True)
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        # a write sent again after it stopped part way: replicas that had it answer 409 (create) or 404 (delete);
        # the others' success is the answer, as the write is now on every replica
        return next((a for a in answers if 200 <= a[0] < 300), answers[0])
