"""``xmodal serve --ray``: the service on Ray Serve, sharded (needs the ``ray`` extra: ``pip install
"xmodal[ray]"``).

One deployment per shard, each an ``xmodal serve`` app over its own folder (``DIR/shard-000``, ...: its
write-ahead log and snapshots on the disk of the node it runs on), and one ingress deployment that answers the
REST API of :mod:`.app` by routing writes to the shard that owns each id and fanning searches out
(:mod:`.fanout`). Ray restarts a shard replica that dies; it comes back from its snapshot and log, and until it
answers, requests that need it get 503 with Retry-After.

A shard's data lives on one node's disk: on a cluster of several machines, give ``DIR`` on storage every node
mounts at the same path, or keep each shard on its node, so that a restarted replica finds its files.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from ray import serve

from .fanout import create_fanout_app
from .shards import Replicas, ShardUnavailable, replica_folders
from .requests import Limits

__all__ = ["build_app", "run"]


@serve.deployment(name="shard", max_ongoing_requests=256)
class Shard:
    """One shard: the single service's app over ``folder``, called by the ingress through a Ray handle."""

    def __init__(self, folder: str, options: dict, search_threads: int, encryption_key_file: Optional[str]):
        import torch

        from ..encryption import read_key
        from .shards import LocalShard

        torch.set_num_threads(search_threads)
        key = read_key(encryption_key_file) if encryption_key_file else None
        self.shard = LocalShard(folder, encryption_key=key, **options)

    async def request(self, method: str, path: str, body: bytes, content_type: Optional[str]):
        return await self.shard(method, path, body, content_type)

    def __del__(self):
        self.shard.close()


def _caller(handle, timeout: float):
    """A shard call (:data:`.shards.ShardCall`) through a Ray handle: ShardUnavailable when the replica died, or
    gave no answer within ``timeout`` seconds (Ray is restarting it)."""
    import ray

    async def call(method: str, path: str, body: bytes, content_type: Optional[str]):
        try:
            return await asyncio.wait_for(handle.request.remote(method, path, body, content_type), timeout)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
            raise ShardUnavailable(str(e)) from None

    return call


@serve.deployment(name="ingress", max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """The REST API over the shards' handles."""

    def __init__(self, shards: list, api_key_file: Optional[str], limits: Limits, shard_timeout: float, ui: bool):
        from . import read_api_key

        self.shards = shards
        self.api_key = read_api_key(api_key_file) if api_key_file else None
        self.limits = limits
        self.shard_timeout = shard_timeout
        self.ui = ui

    def __serve_build_asgi_app__(self):
        calls = [[_caller(h, self.shard_timeout) for h in replicas] for replicas in self.shards]
        calls = [replicas[0] if len(replicas) == 1 else Replicas(replicas) for replicas in calls]
        return create_fanout_app(calls, api_key=self.api_key, limits=self.limits, ui=self.ui)


def build_app(folder: str, shards: int, *, api_key_file: Optional[str] = None,
              encryption_key_file: Optional[str] = None, model: Optional[str] = None,
              limits: Optional[Limits] = None, snapshot_bytes: Optional[int] = None, search_threads: int = 1,
              media: Optional[str] = None, shard_cpus: float = 1.0, shard_timeout: float = 10.0,
              replicas: int = 1, ui: bool = False):
    """The Ray Serve application: ``shards`` shard deployments over ``folder``'s shard folders and the ingress.
    ``replicas``: deployments per shard, each over its own copy of the shard (:class:`.shards.Replicas`:
    searches share them and go on while one is down; writes reach all). ``shard_cpus``: the CPUs Ray reserves
    for each of them (0 lets them share); ``shard_timeout``: seconds the ingress waits for one before taking it
    for down; ``ui``: serve the search page at ``/ui``."""
    limits = limits or Limits()
    options = {"model_path": model, "limits": limits, "media": media}
    if snapshot_bytes is not None:
        options["snapshot_bytes"] = snapshot_bytes
    handles = [[Shard.options(name=f"shard-{i}" + (f"-replica-{j}" if j else ""),
                              ray_actor_options={"num_cpus": shard_cpus})
                .bind(path, options, search_threads, encryption_key_file) for j, path in enumerate(paths)]
               for i, paths in enumerate(replica_folders(folder, shards, replicas))]
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(handles, api_key_file, limits, shard_timeout, ui)


def run(folder: str, shards: int, *, address: str = "local", host: str = "127.0.0.1", port: int = 8000,
        blocking: bool = True, throughput_optimized: bool = True, **options) -> None:
    """Serve ``folder`` sharded ``shards`` ways on the Ray cluster at ``address`` (``"local"``: start one on
    this machine) at http://host:port, until interrupted when ``blocking``. ``options``: :func:`build_app`'s.

    ``throughput_optimized``: a cluster started here runs Ray Serve's throughput-optimised data path
    (``RAY_SERVE_THROUGHPUT_OPTIMIZED``, unless the environment sets it): on 2 cores it cut the cost of a
    request from 17 to 13 ms with one shard and from 29 to 22 ms with four (``benchmarks/serve_ray.py``), and
    was level at a million rows with one shard. A cluster at an address keeps its own setting."""
    import os

    import ray

    if address == "local" and throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # (read by the processes Ray starts)
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(folder, shards, **options), name="xmodal", route_prefix="/", blocking=blocking)
