"""``xmodal serve``: a retrieval service over xmodal indexes (FastAPI + uvicorn).

- :func:`create_app` -- the ASGI app (see :mod:`.app` for the paths and fields);
- :func:`run` -- serve a folder of collections (what ``xmodal serve DIR`` calls);
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

    ``search_threads``: torch's threads for searches and writes (default: one fewer than the cores, at least
    one). The event loop that parses requests and writes answers needs a core of its own: when torch's
    worker threads fill every core they spin-wait on each other while it runs, and a 2-core machine then
    searches several times slower than with one worker thread."""
    import uvicorn
    import torch

    from ..encryption import read_key

    api_key = read_api_key(api_key_file) if api_key_file else None
    key = read_key(encryption_key_file) if encryption_key_file else None
    torch.set_num_threads(search_threads if search_threads else default_search_threads())
    app = create_app(folder, api_key=api_key, encryption_key=key, model_path=model, limits=limits,
                     snapshot_bytes=snapshot_bytes, ui=ui, media=media)
    if ui:
        print(f"xmodal serve: the search page is at http://{host}:{port}/ui/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
