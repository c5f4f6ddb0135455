"""Embed and index a Ray Dataset into a sharded service folder, for ``xmodal serve --ray`` (needs the ``ray``
extra).

:func:`build_collection` embeds the rows on an actor pool (each actor holds its own copy of the model; GPUs
where Ray has them), trains one index (its IVF quantizer and codec) on a sample, and adds the rows to one copy
of that trained index per shard in parallel, each row to the shard its id hashes to (as the service routes
writes). Every shard then searches with the same centroids and codes, so the sharded service answers as one
index of all the rows would. The trained, empty index is kept beside the shards (``DIR/<name>.trained.xmodal``):
load it and add the rows to reproduce those answers on one machine.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from .shards import shard_folders, shard_of

__all__ = ["build_collection"]


class _Embedder:
    """One actor of the embedding pool: ``embed`` applied to a batch's ``input_column``."""

    def __init__(self, embed: Callable, input_column: str, vector_column: str):
        self.embed, self.input_column, self.vector_column = embed, input_column, vector_column

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.embed(batch[self.input_column])
        out = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
        batch = {k: v for k, v in batch.items() if k != self.input_column}
        batch[self.vector_column] = out
        return batch


class _ShardWriter:
    """One shard's copy of the trained index: rows added as they come, written as a collection at the end."""

    def __init__(self, index_kind, trained: bytes, threads: int):
        import torch

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trained.xmodal")
            with open(path, "wb") as f:
                f.write(trained)
            self.index = index_kind.load(path)
        self.payloads: Dict[int, dict] = {}

    def add(self, ids: np.ndarray, vectors: np.ndarray, payloads: Optional[list]) -> int:
        import torch

        self.index.add(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)), torch.from_numpy(ids))
        if payloads is not None:
            self.payloads.update((int(i), p) for i, p in zip(ids.tolist(), payloads) if p is not None)
        return len(ids)

    def write(self, folder: str, name: str) -> int:
        from .catalog import write_collection

        write_collection(folder, name, self.index, self.payloads)
        return len(self.index)


def build_collection(dataset, folder: str, name: str, shards: int, index, *, id_column: str = "id",
                     vector_column: str = "vector", embed: Optional[Callable] = None, input_column: str = "text",
                     payload_columns: Sequence[str] = (), batch_size: int = 1024, concurrency: int = 1,
                     num_gpus: float = 0.0, sample_rows: int = 65_536, writer_cpus: float = 1.0,
                     progress: bool = True) -> dict:
    """Write collection ``name`` of ``dataset`` (a ``ray.data.Dataset``) into ``folder`` split over ``shards``.

    ``index``: an empty xmodal index (``FlatIndex``, ``IVFIndex`` or ``GraphIndex``) whose settings every
    shard takes; it is trained on the first ``sample_rows`` rows when it needs training. Rows carry an int64
    ``id_column`` and either a ``vector_column`` or, with ``embed``, an ``input_column`` that ``embed`` (any
    callable from a batch of inputs to ``[B, D]`` vectors, e.g. a ``CrossModalModel``'s ``encode_text``) maps
    to vectors, on ``concurrency`` actors of ``batch_size`` rows (``num_gpus`` each). ``payload_columns``
    become each row's payload. ``writer_cpus``: the CPUs Ray reserves for each shard's writer. Returns what
    was written: ``{"name", "shards", "rows": [per shard], "trained": path}``."""
    import ray
    import torch
    from tqdm import tqdm

    if index is None or len(index):
        raise ValueError("index must be an empty xmodal index (its settings are copied to every shard)")
    folders = shard_folders(folder, shards)
    for path in folders:
        if os.path.exists(os.path.join(path, name)):
            raise FileExistsError(f"collection {name!r} already exists in {path!r}")
    if embed is not None:
        dataset = dataset.map_batches(_Embedder, fn_constructor_args=(embed, input_column, vector_column),
                                      batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                                      batch_format="numpy")
        dataset = dataset.materialize()  # (embedded once: the sample and the rows are read from it)
    if not index.is_trained:
        sample = dataset.limit(sample_rows).take_batch(sample_rows, batch_format="numpy")[vector_column]
        index.train(torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)))
    trained_path = os.path.join(folder, f"{name}.trained.xmodal")
    index.save(trained_path)
    with open(trained_path, "rb") as f:
        trained = ray.put(f.read())
    writer = ray.remote(num_cpus=writer_cpus)(_ShardWriter)
    writers = [writer.remote(type(index), trained, max(1, int(writer_cpus))) for _ in range(shards)]
    pending = []
    batches = dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
    for batch in tqdm(batches, desc=f"adding {name}", unit="batch", disable=not progress):
        ids = np.asarray(batch[id_column], dtype=np.int64)
        vectors = np.asarray(batch[vector_column], dtype=np.float32)
        payloads = None
        if payload_columns:
            payloads = [{c: _plain(batch[c][r]) for c in payload_columns} for r in range(len(ids))]
        owners = shard_of(ids, shards)
        for s in np.unique(owners).tolist():
            rows = np.flatnonzero(owners == s)
            part = None if payloads is None else [payloads[r] for r in rows]
            pending.append(writers[s].add.remote(ids[rows], vectors[rows], part))
        if len(pending) > 4 * shards:  # (bounded: the driver reads no faster than the shards add)
            done, pending = ray.wait(pending, num_returns=len(pending) - 2 * shards)
            ray.get(done)
    ray.get(pending)
    rows = ray.get([w.write.remote(path, name) for w, path in zip(writers, folders)])
    return {"name": name, "shards": shards, "rows": rows, "trained": trained_path}


def _plain(value):
    """A NumPy scalar as the Python value JSON takes."""
    return value.item() if isinstance(value, np.generic) else value
