"""``xmodal serve``: a retrieval service over xmodal indexes (FastAPI + uvicorn).

- :func:`create_app` -- the ASGI app (see :mod:`.app` for the paths and fields);
- :func:`run` -- serve a folder of collections (what ``xmodal serve DIR`` calls), or a folder written for the
  sharded service (:mod:`.ray_app`, :mod:`.ray_build`) with every shard in this process;
- :func:`write_collection` -- put an index built in Python into a folder the service will serve.

Writes are durable when acknowledged (:mod:`.catalog`, :mod:`.collection`, :mod:`.storage`); concurrent
searches are micro-batched (:mod:`.batcher`); the routes are :mod:`.routes`.
"""
from __future__ import annotations

import os
from typing import Optional

from .app import Limits, create_app
from .catalog import Catalog, write_collection
from .collection import Collection
from .storage import CorruptLogError

__all__ = ["Limits", "create_app", "default_search_threads", "run", "write_collection", "Catalog", "Collection", "CorruptLogError"]


def read_api_key(path: str) -> str:
    """The API key in a file (surrounding whitespace ignored); it must be 16 or more printable characters."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {path!r}: {e}") from None
    if len(key) < 16 or not key.isprintable() or " " in key:
        raise ValueError(f"the API key in {path!r} must be 16 or more printable characters without spaces, "
                         f"got {len(key)} characters")
    return key


def default_search_threads() -> int:
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) - 1)


def run(folder: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_file: Optional[str] = None,
        encryption_key_file: Optional[str] = None, model: Optional[str] = None,
        limits: Optional[Limits] = None, snapshot_bytes: Optional[int] = None, search_threads: Optional[int] = None,
        ui: bool = False, media: Optional[str] = None, log_level: str = "warning") -> None:
    """Serve the collections in ``folder`` until interrupted (``ui`` and ``media``: see :func:`create_app`).
    A folder written for the sharded service (its ``shards.json``) is served whole: every shard in this
    process behind the front of :mod:`.fanout`, the same API and answers as ``xmodal serve --ray``.

    ``search_threads``: torch's threads for searches and writes (default: one fewer than the cores, at least
    one). The event loop that parses requests and writes answers needs a core of its own: when torch's
    worker threads fill every core they spin-wait on each other while it runs, and a 2-core machine then
    searches several times slower than with one worker thread."""
    import uvicorn
    import torch

    from ..encryption import read_key

    from .shards import LocalShard, replica_folders, written_shards

    api_key = read_api_key(api_key_file) if api_key_file else None
    key = read_key(encryption_key_file) if encryption_key_file else None
    torch.set_num_threads(search_threads if search_threads else default_search_threads())
    options = {"encryption_key": key, "model_path": model, "limits": limits, "snapshot_bytes": snapshot_bytes,
               "media": media}
    shards = written_shards(folder)
    local = []
    if shards is None:
        app = create_app(folder, api_key=api_key, ui=ui, **options)
    else:  # a folder written for the sharded service: every shard in this process, behind the same front
        from .fanout import create_fanout_app

        # (one replica here: the folder then records one, so replicas served later are copied afresh)
        local = [LocalShard(paths[0], **options) for paths in replica_folders(folder, shards, 1)]
        app = create_fanout_app(local, api_key=api_key, limits=limits, ui=ui)
    if ui:
        print(f"xmodal serve: the search page is at http://{host}:{port}/ui/", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        for shard in local:
            shard.close()
