"""The catalog: the folder of collections ``xmodal serve DIR`` serves (open, create, delete, each whole or not
at all), and :func:`write_collection`, which puts an index built in Python into such a folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from typing import Dict, Optional

from .. import FlatIndex, GraphIndex, IVFIndex
from .collection import DEFAULT_SNAPSHOT_BYTES, KIND_OPTIONS, Collection, save_snapshot, write_manifest
from .payloads import Payloads
from .storage import fsync_folder, write_file

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"collection name must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
                         f"digit, got {name!r}")
    return name


def new_collection_folder(parent: str, name: str, config: dict, fill=None) -> str:
    """Create ``parent/name`` whole or not at all: its config (and whatever ``fill(folder)`` writes) go into a
    staging folder that is renamed into place; an interrupted one is removed on the next start."""
    staging = os.path.join(parent, f".new-{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    write_file(os.path.join(staging, "config.json"), json.dumps(config).encode())
    if fill is not None:
        fill(staging)
    final = os.path.join(parent, name)
    os.rename(staging, final)
    fsync_folder(parent)
    return final


class Catalog:
    """The collections in a folder (``xmodal serve DIR``)."""

    def __init__(self, folder: str, encryption_key: Optional[bytes] = None,
                 snapshot_bytes: int = DEFAULT_SNAPSHOT_BYTES):
        self.folder = os.fspath(folder)
        self.key = encryption_key
        self.snapshot_bytes = snapshot_bytes
        self.collections: Dict[str, Collection] = {}
        self.lock = threading.Lock()

    def open_all(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if os.path.exists(os.path.join(self.folder, "shards.json")):
            raise ValueError(f"{self.folder!r} holds the shards of a sharded service (shards.json): serve it with "
                             f"xmodal serve (every shard in one process) or xmodal serve --ray, or open one shard's "
                             f"folder")
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if name.startswith(".deleted-") or name.startswith(".new-"):
                shutil.rmtree(path, ignore_errors=True)  # a create or delete that was interrupted
            elif os.path.isdir(path) and NAME.match(name):
                self.collections[name] = Collection.open(path, self.key, snapshot_bytes=self.snapshot_bytes)

    def get(self, name: str) -> Collection:
        col = self.collections.get(name)
        if col is None:
            raise KeyError(f"no collection {name!r}")
        return col

    def create(self, name: str, config: dict) -> Collection:
        check_name(name)
        config = Collection.check_config(config)
        with self.lock:
            if name in self.collections:
                raise FileExistsError(f"collection {name!r} exists")
            final = new_collection_folder(self.folder, name, config)
            col = Collection(final, config, self.key, self.snapshot_bytes)
            self.collections[name] = col
            return col

    def delete(self, name: str) -> None:
        with self.lock:
            col = self.get(name)
            with col.writer:
                col.removed = True
                col.log.close()
            del self.collections[name]
            doomed = os.path.join(self.folder, f".deleted-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(col.folder, doomed)
            fsync_folder(self.folder)
        shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        for col in list(self.collections.values()):
            col.close()


def write_collection(folder: str, name: str, index, payloads: Optional[Dict[int, dict]] = None,
                     encryption_key: Optional[bytes] = None, media: Optional[str] = None) -> None:
    """Put an index built in Python (a :class:`FlatIndex`, :class:`IVFIndex` or
    :class:`GraphIndex`) into a service folder as
    collection ``name``, with optional ``{id: payload}``; ``xmodal serve folder`` then serves it. The service
    must not be running on the folder. ``media``: a folder copied into the collection as its ``media/``, which
    payloads' ``"image"`` paths are relative to (the search page shows them; not encrypted)."""
    check_name(name)
    if media is not None and not os.path.isdir(media):
        raise ValueError(f"media must be a folder, got {media!r}")
    kind = {FlatIndex: "flat", IVFIndex: "ivf", GraphIndex: "graph"}.get(type(index))
    if kind is None:
        raise TypeError(f"index must be a FlatIndex, IVFIndex or GraphIndex, got {type(index).__name__}")
    config = {"dim": index.dim, "metric": index.metric, "index": kind, "codec": index.codec}
    config.update({field: getattr(index, field) for field in KIND_OPTIONS[kind]})
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, name)
    if os.path.exists(final):
        raise FileExistsError(f"collection {name!r} already exists in {folder!r}")
    store = Payloads()
    for i, p in (payloads or {}).items():
        store.set(int(i), p)

    def fill(staging: str) -> None:
        write_manifest(staging, save_snapshot(staging, 0, index, store, encryption_key), 0)
        if media is not None:
            shutil.copytree(media, os.path.join(staging, "media"), symlinks=False)

    new_collection_folder(folder, name, Collection.check_config(config), fill)
