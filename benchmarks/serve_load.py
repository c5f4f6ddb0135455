"""Load test of ``xmodal serve`` on this machine, loopback only, bounded in time and count.

    python benchmarks/serve_load.py [--n 1000000] [--dim 256] [--clients 64] [--seconds 15]
                                    [--parts throughput,overhead,restart,graph] [--markdown out.md] [--json out.json]

1. Throughput: a collection of N random unit rows (float32, then the int8 codec), ``--clients`` concurrent
   clients (asyncio + httpx, one process) each sending single-vector searches with k = 10 back to back for
   ``--seconds``, against the service with micro-batching on, then off (``--max-batch 1``). Reported: queries
   per second, p50 / p99 latency, and the on/off throughput ratio.
2. Overhead: N = 10,000, one client, sequential single-vector searches: p50 HTTP round trip minus the p50 of
   the same search in-process (``Collection.search``, the function the service calls).
3. Restart: N rows in a snapshot plus ``--log-rows`` added over HTTP (in the write-ahead log), SIGKILL, restart:
   seconds from process start to ``/ready``.
4. Graph collection (``--parts graph``): N rows of ``xmodal bench``'s clustered set in a ``"graph"`` collection
   (GraphIndex, degree 32, ef: the smallest of 32, 64, ... reaching recall@10 0.95 in-process), one client sending
   single-vector searches from the same distribution, k = 10, back to back: p50 / p99 latency, and recall@10 of
   the service's answers against exact search.

The server runs in a subprocess with torch's default threads; the load generator shares the machine with it
(the figures include that cost, as they would for clients on the same host).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import xmodal
from xmodal.bench import environment, publish
from xmodal.serve import default_search_threads, write_collection
from xmodal.serve.collection import Collection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, *args, timeout: float = 600):
    import httpx

    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", folder, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout} s")


def stop(proc, sig=signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):
        block = torch.randn(min(100_000, n - start), dim, generator=g)
        out[start: start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    return out


def build(folder: str, name: str, n: int, dim: int, codec) -> None:
    index = xmodal.FlatIndex(dim, "cosine", codec=codec)
    x = unit_rows(n, dim, seed=0)
    if codec is not None:
        index.train(x[:100_000])
    index.add(x)
    del x
    write_collection(folder, name, index)


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for the load test: a load
    generator in Python must spend far less per request than the server, or it measures itself (httpx's
    async client costs a few milliseconds of CPU per request, on the same two cores)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> int:
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await self.reader.readexactly(length)
        return status

    def close(self):
        self.writer.close()


async def load(url: str, name: str, dim: int, clients: int, seconds: float, k: int = 10, queries=None):
    """Closed loop: each client sends its next search when the last is answered; latency from the request
    being written to the whole answer read. ``queries``: the vectors sent in turn (256 random ones if None)."""
    host, port = url.split("//")[1].split(":")
    if queries is None:
        queries = np.random.default_rng(1).standard_normal((256, dim)).astype(np.float32)
    bodies = [json.dumps({"vectors": [q.tolist()], "k": k}).encode() for q in np.asarray(queries, np.float32)]
    path = f"/collections/{name}/search"
    latencies, errors = [], 0
    connections = [Connection(host, int(port)) for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in connections))
    deadline = time.perf_counter() + seconds
    warm_until = time.perf_counter() + min(2.0, seconds / 5)

    async def client(i: int):
        nonlocal errors
        j = i
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            status = await connections[i].post(path, bodies[j % len(bodies)])
            end = time.perf_counter()
            j += clients
            if status != 200:
                errors += 1
            elif start >= warm_until:
                latencies.append((end, end - start))

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    for c in connections:
        c.close()
    elapsed = deadline - max(began, warm_until)
    counted = [lat for end, lat in latencies if end <= deadline]
    lat = np.array(counted) * 1000
    return {"qps": len(counted) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(counted), "errors": errors}


def run_load(*args):
    try:
        import uvloop

        return uvloop.run(load(*args))
    except ImportError:
        return asyncio.run(load(*args))


def throughput(folder: str, n: int, dim: int, clients: int, seconds: float, codec):
    name = "bench"
    build(folder, name, n, dim, codec)
    out = {}
    for label, args in (("batching on", ()), ("batching off", ("--max-batch", "1"))):
        proc, url, _ = start_server(folder, *args)
        try:
            out[label] = run_load(url, name, dim, clients, seconds)
        finally:
            stop(proc)
        print(f"  {codec or 'float32'} {label}: {out[label]}", flush=True)
    shutil.rmtree(os.path.join(folder, name))
    out["speedup"] = out["batching on"]["qps"] / out["batching off"]["qps"]
    out["p99_over_p50"] = out["batching on"]["p99_ms"] / out["batching on"]["p50_ms"]
    return out


def overhead(folder: str, dim: int, requests: int = 600):
    import httpx

    name = "small"
    build(folder, name, 10_000, dim, None)
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((requests, dim)).astype(np.float32)
    col = Collection.open(os.path.join(folder, name))
    threads = torch.get_num_threads()
    torch.set_num_threads(default_search_threads())  # as the service runs it
    inproc = []
    for q in queries:
        start = time.perf_counter()
        col.search(q[None], 10)
        inproc.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    col.close()
    proc, url, _ = start_server(folder)
    http_times = []
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            for q in queries[:50]:  # warm-up
                http.post(f"/collections/{name}/search", json={"vectors": [q.tolist()], "k": 10})
            for q in queries:
                body = json.dumps({"vectors": [q.tolist()], "k": 10}).encode()
                start = time.perf_counter()
                r = http.post(f"/collections/{name}/search", content=body, headers={"content-type": "application/json"})
                http_times.append(time.perf_counter() - start)
                assert r.status_code == 200
    finally:
        stop(proc)
    shutil.rmtree(os.path.join(folder, name))
    p50_http, p50_inproc = np.percentile(http_times, 50) * 1000, np.percentile(inproc, 50) * 1000
    return {"p50_http_ms": float(p50_http), "p50_in_process_ms": float(p50_inproc),
            "overhead_ms": float(p50_http - p50_inproc), "p99_http_ms": float(np.percentile(http_times, 99) * 1000)}


def restart(folder: str, n: int, dim: int, log_rows: int, batch: int = 1000):
    import httpx

    name = "restart"
    build(folder, name, n, dim, None)
    proc, url, first_start = start_server(folder)
    rng = np.random.default_rng(3)
    with httpx.Client(base_url=url, timeout=300) as http:
        for start in range(0, log_rows, batch):
            rows = rng.standard_normal((min(batch, log_rows - start), dim)).astype(np.float32)
            ids = list(range(n + start, n + start + rows.shape[0]))
            r = http.post(f"/collections/{name}/vectors", json={"ids": ids, "vectors": rows.tolist()})
            assert r.status_code == 200, r.text
    log_bytes = sum(os.path.getsize(os.path.join(folder, name, f)) for f in os.listdir(os.path.join(folder, name))
                    if f.startswith("wal-"))
    stop(proc, signal.SIGKILL)
    proc, url, ready = start_server(folder)
    try:
        size = httpx.get(f"{url}/collections/{name}").json()["size"]
    finally:
        stop(proc)
    shutil.rmtree(os.path.join(folder, name))
    assert size == n + log_rows, size
    return {"snapshot_rows": n, "log_rows": log_rows, "log_mib": log_bytes / 2 ** 20, "ready_seconds": ready,
            "first_start_seconds": first_start}


def graph_collection(folder: str, n: int, dim: int, seconds: float, target: float = 0.95, nq: int = 1000):
    """A graph collection of xmodal bench's clustered set (decaying spectrum, like learnt embeddings), served
    with the smallest ef of a sweep that reaches recall@10 ``target`` in-process; one client's latency."""
    import httpx

    from xmodal.bench.compress_data import clustered_data

    name = "graph"
    x, queries, data = clustered_data(n, dim, nq)
    index = xmodal.GraphIndex(dim, "cosine", degree=32, build_ef=200)
    start = time.perf_counter()
    index.add(x)
    build_seconds = time.perf_counter() - start
    exact = xmodal.topk_search(queries, x, 10, metric="ip")[1]
    del x

    def recall(found):
        return sum(len(set(f) & set(e)) for f, e in zip(found, exact.tolist())) / exact.numel()

    sweep = {}
    for ef in (32, 64, 128, 256, 512):
        sweep[ef] = recall(index.search(queries, 10, ef=ef)[1].tolist())
        if sweep[ef] >= target:
            break
    index.ef = ef
    write_collection(folder, name, index)
    del index
    proc, url, ready = start_server(folder)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(f"/collections/{name}/search", json={"vectors": queries.tolist(), "k": 10})
            served = recall([[hit["id"] for hit in hits] for hits in r.json()["results"]])
        one = run_load(url, name, dim, 1, seconds, 10, queries.numpy())
    finally:
        stop(proc)
    shutil.rmtree(os.path.join(folder, name))
    return {"build_seconds": build_seconds, "ready_seconds": ready, "ef": ef, "sweep": sweep, "recall_at_10": served,
            "data": data, **one}


def markdown(report: dict) -> str:
    env, a = report["environment"], report["args"]
    lines = [f"# xmodal serve: load test ({env.get('date', '')})", "",
             f"Machine: {env.get('cpu')} ({env.get('threads')} threads); flags: {env.get('cpu_flags')}",
             f"torch {env.get('torch')}, xmodal {env.get('xmodal')}, Python {sys.version.split()[0]}; "
             f"server and load generator on the same 2 cores, loopback."]
    if report.get("throughput"):
        lines += ["", f"## Throughput: N = {a['n']:,}, D = {a['dim']}, {a['clients']} concurrent clients, "
                      f"single-vector searches, k = 10, {a['seconds']} s each; the service's default "
                      f"{report['search_threads']} search thread(s); the clients: one asyncio process, one "
                      f"keep-alive connection each", "",
                  "| rows | batching | QPS | p50 ms | p99 ms | p99 / p50 | requests |", "|---|---|---|---|---|---|---|"]
    for codec, t in report.get("throughput", {}).items():
        for label in ("batching on", "batching off"):
            r = t[label]
            lines.append(f"| {codec} | {label.split()[1]} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['p99_ms'] / r['p50_ms']:.2f} | {r['requests']} |")
        lines.append(f"| {codec} | **on / off** | **{t['speedup']:.1f}x** | | | | |")
    if "overhead" in report:
        o = report["overhead"]
        lines += ["", "## Service overhead: N = 10,000, one client, sequential", "",
                  f"p50 HTTP round trip {o['p50_http_ms']:.2f} ms (p99 {o['p99_http_ms']:.2f} ms); p50 of the same "
                  f"search in-process {o['p50_in_process_ms']:.2f} ms; **overhead {o['overhead_ms']:.2f} ms**."]
    if "restart" in report:
        r = report["restart"]
        lines += ["", "## Restart after SIGKILL", "",
                  f"{r['snapshot_rows']:,} rows in the snapshot + {r['log_rows']:,} in the write-ahead log "
                  f"({r['log_mib']:.0f} MiB): **ready {r['ready_seconds']:.1f} s** after the process started "
                  f"(first start, snapshot only: {r['first_start_seconds']:.1f} s)."]
    if "graph" in report:
        g = report["graph"]
        lines += ["", f"## Graph collection: N = {a['n']:,}, D = {a['dim']}, degree 32, ef {g['ef']}, one client, "
                      f"sequential, {a['seconds']} s", "", f"Data: {g['data']}", "",
                  "In-process recall@10 by ef (the collection uses the first reaching 0.95): "
                  + ", ".join(f"{ef}: {r:.3f}" for ef, r in g["sweep"].items()), "",
                  f"p50 **{g['p50_ms']:.2f} ms**, p99 **{g['p99_ms']:.2f} ms**, {g['qps']:.0f} queries/s "
                  f"({g['requests']} requests, {g['errors']} errors); recall@10 of the answers against exact "
                  f"search {g['recall_at_10']:.3f}. Build {g['build_seconds']:.0f} s (2 threads); the server was "
                  f"ready {g['ready_seconds']:.1f} s after it started."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--log-rows", type=int, default=100_000)
    parser.add_argument("--codecs", default="float32,int8")
    parser.add_argument("--parts", default="throughput,overhead,restart", help="any of these and graph")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="xmodal-serve-bench-")
    try:
        report = {"environment": environment("cpu", faiss=False), "args": vars(args), "throughput": {},
                  "search_threads": default_search_threads()}
        parts = args.parts.split(",")
        for codec in args.codecs.split(",") if "throughput" in parts else ():
            report["throughput"][codec] = throughput(folder, args.n, args.dim, args.clients, args.seconds,
                                                     None if codec == "float32" else codec)
        if "overhead" in parts:
            report["overhead"] = overhead(folder, args.dim)
            print(f"  overhead: {report['overhead']}", flush=True)
        if "restart" in parts:
            report["restart"] = restart(folder, args.n, args.dim, args.log_rows)
            print(f"  restart: {report['restart']}", flush=True)
        if "graph" in parts:
            report["graph"] = graph_collection(folder, args.n, args.dim, args.seconds)
            print(f"  graph: {report['graph']}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    publish(markdown(report), report, args.markdown, args.json)


if __name__ == "__main__":
    main()
