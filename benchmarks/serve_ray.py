"""The sharded service on Ray Serve against one ``xmodal serve``, on this machine, loopback only.

    python benchmarks/serve_ray.py [--n 1000000] [--dim 256] [--shards 1,2,4] [--clients 1,16] [--seconds 10]
                                   [--markdown out.md] [--json out.json]

The same N random unit rows (float32, cosine, flat: exact answers whatever the sharding) are served by one
``xmodal serve`` process and by ``xmodal.serve.ray_app`` with 1, 2 and 4 shards, with Ray Serve's default and
its throughput-optimised data path (``RAY_SERVE_THROUGHPUT_OPTIMIZED``) (a local Ray cluster each time; one search
thread per shard, as ``xmodal serve`` takes one on 2 cores), each shard's rows written by the service's own
routing. Clients send single-vector searches (k = 10) back to back (the closed loop of serve_load.py): queries/s
and p50 / p99 latency. The same at 10,000 rows, one client, gives the cost of the Ray hop and of the fan-out and
merge per request: p50 of each sharded service minus p50 of one ``xmodal serve``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import xmodal
from xmodal.bench import environment, publish
from xmodal.serve import write_collection
from xmodal.serve.shards import shard_folders, shard_of

sys.path.insert(0, os.path.dirname(__file__))
from serve_load import free_port, run_load, start_server, stop, unit_rows  # noqa: E402

NAME = "bench"


def write_shards(folder: str, x: torch.Tensor, shards: int) -> None:
    """The rows as ``shards`` shards' collections, each row on the shard the service routes its id to."""
    owners = torch.from_numpy(shard_of(np.arange(x.shape[0]), shards))
    for s, path in enumerate(shard_folders(folder, shards)):
        ids = torch.nonzero(owners == s).flatten()
        index = xmodal.FlatIndex(x.shape[1], "cosine")
        index.add(x[ids], ids)
        write_collection(path, NAME, index)


def ray_service(folder: str, shards: int, optimized: bool):
    """(url, stop) of the sharded service over ``folder`` on a local Ray cluster; ``optimized``: with Ray Serve's
    throughput-optimised data path (what ``xmodal serve --ray local`` starts)."""
    import httpx
    import ray
    from ray import serve

    from xmodal.serve.ray_app import build_app

    port = free_port()
    if optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # (read by the processes ray.init starts)
    else:
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    ray.init(num_cpus=max(4, shards + 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(folder, shards, shard_cpus=0, search_threads=1), name="xmodal", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while httpx.get(url + "/ready", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the Ray service did not get ready in 300 s")
        time.sleep(0.2)

    def stop_ray():
        serve.shutdown()
        ray.shutdown()

    return url, stop_ray


def measure(n: int, dim: int, shard_counts, clients, seconds: float, root: str) -> dict:
    x = unit_rows(n, dim, seed=0)
    queries = unit_rows(256, dim, seed=1).numpy()
    out = {}
    single = os.path.join(root, f"single-{n}")
    index = xmodal.FlatIndex(dim, "cosine")
    index.add(x)
    write_collection(single, NAME, index)
    del index
    proc, url, _ = start_server(single, "--search-threads", "1")
    try:
        out["xmodal serve"] = {c: run_load(url, NAME, dim, c, seconds, 10, queries) for c in clients}
    finally:
        stop(proc)
    print(f"  {n:,} rows, xmodal serve: {out['xmodal serve']}", flush=True)
    for shards in shard_counts:
        folder = os.path.join(root, f"ray-{n}-{shards}")
        write_shards(folder, x, shards)
        for optimized in (False, True):
            url, stop_ray = ray_service(folder, shards, optimized)
            try:
                label = (f"Ray Serve, {shards} shard{'s' if shards > 1 else ''}"
                         + (", throughput-optimised" if optimized else ""))
                out[label] = {c: run_load(url, NAME, dim, c, seconds, 10, queries) for c in clients}
            finally:
                stop_ray()
            print(f"  {n:,} rows, {label}: {out[label]}", flush=True)
    return out


def markdown(report: dict) -> str:
    lines = ["# The sharded service on Ray Serve against one `xmodal serve`", ""]
    lines += [f"- {k}: {v}" for k, v in report["environment"].items()]
    lines += [f"- {report['setup']}", ""]
    for n, results in report["results"].items():
        clients = list(next(iter(results.values())))
        lines += [f"## {int(n):,} rows", "", "| service | " + " | ".join(
            f"{c} client{'s' if int(c) > 1 else ''}: q/s, p50 / p99 ms" for c in clients) + " |",
            "|---|" + "---|" * len(clients)]
        for label, by_clients in results.items():
            cells = [f"{r['qps']:,.0f}, {r['p50_ms']:.2f} / {r['p99_ms']:.2f}" + (f" ({r['errors']} errors)"
                                                                                  if r["errors"] else "")
                     for r in by_clients.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    base = report["results"].get(str(report["small_n"]))
    if base:
        one = base["xmodal serve"][list(base["xmodal serve"])[0]]["p50_ms"]
        lines += [f"Cost per request of the Ray hop, fan-out and merge ({report['small_n']:,} rows, one client, p50 "
                  "minus one `xmodal serve`'s):", ""]
        for label, by_clients in base.items():
            if label != "xmodal serve":
                lines.append(f"- {label}: {next(iter(by_clients.values()))['p50_ms'] - one:+.2f} ms")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--small-n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--clients", default="1,16")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--markdown")
    p.add_argument("--json")
    args = p.parse_args()
    shard_counts = [int(s) for s in args.shards.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    report = {"environment": environment("cpu"), "small_n": args.small_n,
              "setup": f"D = {args.dim}, float32 unit rows, cosine, flat collections, k = 10, {args.seconds:g} s per "
                       f"load, clients {clients} (one closed-loop client sends its next search when answered); "
                       f"xmodal {xmodal.__version__}, torch {torch.__version__}", "results": {}}
    with tempfile.TemporaryDirectory() as root:
        report["results"][str(args.small_n)] = measure(args.small_n, args.dim, shard_counts, clients[:1],
                                                       args.seconds, root)
        report["results"][str(args.n)] = measure(args.n, args.dim, shard_counts, clients, args.seconds, root)
    text = markdown(report)
    print(text)
    publish(text, report, args.markdown, args.json)


if __name__ == "__main__":
    main()
