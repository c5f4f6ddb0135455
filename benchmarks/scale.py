"""How the costs of an IVF index grow to ten million rows on one machine, against faiss-cpu at the largest size.

    python benchmarks/scale.py data  --folder DIR [--rows 10000000] [--dim 256]
    python benchmarks/scale.py run   --folder DIR [--sizes 1000000,3000000,10000000] [--nlist 2048]
                                     [--faiss-at 10000000] [--bf16-at 10000000] [--service-at 10000000]
    python benchmarks/scale.py again --folder DIR --kind KIND --rows N [--service]
    python benchmarks/scale.py report --folder DIR [--markdown out.md] [--json out.json] [--note TEXT]

``data`` writes synthetic embeddings (unit rows: 100 cluster centres, each row its centre plus noise in a
32-dimensional subspace and a little isotropic noise, as real embeddings lie near a low-dimensional set) as a
memory-mapped ``.npy`` of float32, 1,000 queries drawn the same way, and the exact top-10 (inner product) of
every query at each size (a prefix of the rows), computed with ``xmodal.topk_search`` a block at a time.

``run`` builds, in one subprocess per (index kind, size) so memory is measured alone: xmodal ``IVFIndex`` with
``codec="int8"`` at every size; bf16 rows, faiss ``IndexIVFScalarQuantizer`` (SQ8) and faiss
``IndexIVFPQFastScan`` (4-bit PQ, one sub-quantizer per dimension: 128 bytes a row, the most it can store at
D = 256, against SQ8's 256) at the sizes named. Every kind trains on the same 262,144-row sample with the
same ``nlist`` and is added from the memory-mapped rows. Measured: train and add seconds; the peak of the
process's anonymous memory during the add over what it held before (the rows being read are page cache, not
counted: they are the caller's file); ``nbytes``; save seconds and file bytes; load seconds read whole and
memory-mapped, each with the page cache warm and dropped (``/proc/sys/vm/drop_caches``, when allowed); and
recall@10 with queries per second at Q = 1 (200 queries one at a time) and Q = 256 (all 1,000 in blocks of
256) for each nprobe. At ``--service-at``, the saved xmodal index is served (``xmodal serve``): one client's
p50 / p99, 64 clients' queries per second and p99, resident memory, and the restart time after SIGKILL with
1,000 rows in the write-ahead log. ``again`` measures one case's search curve (and service) again on the
index file it saved, e.g. after a change to search; ``report`` writes the tables from the folder's results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch

K = 10
SAMPLE = 262_144
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
TARGETS = (0.9, 0.95, 0.99)
CENTRES, SUBSPACE = 100, 32


# -- data
def make_data(folder: str, rows: int, dim: int, sizes) -> None:
    import xmodal

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(CENTRES, dim, generator=g), dim=1)
    basis = torch.randn(SUBSPACE, dim, generator=g) / SUBSPACE ** 0.5

    def draw(n):
        which = torch.randint(0, CENTRES, (n,), generator=g)
        x = centres[which] + 0.044 * (torch.randn(n, SUBSPACE, generator=g) @ basis) + 0.01 * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    x = np.lib.format.open_memmap(os.path.join(folder, "rows.npy"), mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, 200_000):
        x[start: start + 200_000] = draw(min(200_000, rows - start)).numpy()
    x.flush()
    queries = draw(1000)
    np.save(os.path.join(folder, "queries.npy"), queries.numpy())
    best_v = torch.full((1000, K), -float("inf"))
    best_i = torch.full((1000, K), -1, dtype=torch.int64)
    truth = {}
    cuts = sorted(set(range(0, rows, 500_000)) | {s for s in sizes if s < rows} | {rows})
    for start, end in zip(cuts, cuts[1:]):
        block = torch.from_numpy(np.ascontiguousarray(x[start: end]))
        v, i = xmodal.topk_search(queries, block, K, "ip")
        v, at = torch.cat([best_v, v], 1).topk(K, dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, at)
        best_v = v
        if end in sizes:
            truth[str(end)] = best_i.clone()
    torch.save(truth, os.path.join(folder, "truth.pt"))


def rows_of(folder: str, n: int) -> np.ndarray:
    return np.load(os.path.join(folder, "rows.npy"), mmap_mode="r")[:n]


def queries_and_truth(folder: str, n: int):
    """The queries and their exact 10 best among the first ``n`` rows."""
    queries = torch.from_numpy(np.load(os.path.join(folder, "queries.npy")))
    return queries, torch.load(os.path.join(folder, "truth.pt"))[str(n)]


def sample_of(x: np.ndarray) -> np.ndarray:
    pick = np.sort(np.random.default_rng(0).choice(x.shape[0], min(SAMPLE, x.shape[0]), replace=False))
    return np.ascontiguousarray(x[pick])


# -- measuring
class PeakMemory:
    """The largest anonymous resident memory (RssAnon) of this process while it runs, sampled every 10 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.before = self.now()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    from xmodal.metrics import knn_recall

    return float(knn_recall(found[:, :K], truth[:, :K]))


def search_curve(search, queries: torch.Tensor, truth: torch.Tensor) -> list:
    """recall@10 and queries per second at Q = 1 and Q = 256 for each nprobe; search(q, nprobe) -> ids."""
    out = []
    for nprobe in NPROBES:
        search(queries[:256], nprobe)  # warm: the lists this nprobe reads come into memory
        t, ids = seconds(lambda: torch.cat([search(queries[s: s + 256], nprobe) for s in range(0, len(queries), 256)]))
        one = []
        for q in queries[:200]:
            start = time.perf_counter()
            search(q[None], nprobe)
            one.append(time.perf_counter() - start)
        out.append({"nprobe": nprobe, "recall": recall(ids, truth), "qps_256": len(queries) / t,
                    "qps_1": len(one) / sum(one), "p50_ms_1": float(np.median(one) * 1000)})
        print(f"    nprobe {nprobe}: {out[-1]}", flush=True)
    return out


# -- one index kind at one size (a subprocess)
def case(folder: str, kind: str, n: int, nlist: int, service: bool) -> dict:
    x = rows_of(folder, n)
    dim = x.shape[1]
    queries, truth = queries_and_truth(folder, n)
    sample = sample_of(x)
    path = os.path.join(folder, f"index-{kind}-{n}.bin")
    result = {"kind": kind, "rows": n, "dim": dim, "nlist": nlist, "threads": torch.get_num_threads()}
    if kind.startswith("xmodal"):
        import xmodal

        options = {"codec": "int8"} if kind == "xmodal-int8" else {"dtype": torch.bfloat16}
        index = xmodal.IVFIndex(dim, nlist, "ip", nprobe=16, **options)
        result["train_s"], _ = seconds(lambda: index.train(torch.from_numpy(sample)))
        del sample
        with PeakMemory() as memory:
            result["add_s"], _ = seconds(lambda: index.add(x))  # the memory-mapped rows, read a chunk at a time
        result["nbytes"] = index.nbytes
        result["save_s"], _ = seconds(lambda: index.save(path))
        load = {"whole": lambda: xmodal.IVFIndex.load(path), "mapped": lambda: xmodal.IVFIndex.load(path, mmap=True)}
    else:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "faiss-sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, dim, 4, faiss.METRIC_INNER_PRODUCT)
        result["train_s"], _ = seconds(lambda: index.train(sample))
        del sample

        def add():
            for start in range(0, n, 1_000_000):  # faiss takes contiguous float32: a million rows at a time
                index.add(np.ascontiguousarray(x[start: start + 1_000_000]))

        with PeakMemory() as memory:
            result["add_s"], _ = seconds(add)
        result["nbytes"] = None  # faiss does not say; the file's size is reported
        result["save_s"], _ = seconds(lambda: faiss.write_index(index, path))
        load = {"whole": lambda: faiss.read_index(path), "mapped": lambda: faiss.read_index(path, faiss.IO_FLAG_MMAP)}
    result["build_s"] = result["train_s"] + result["add_s"]
    result["add_peak_bytes"] = memory.peak - memory.before
    result["file_bytes"] = os.path.getsize(path)
    for how, fn in load.items():
        result[f"load_{how}_warm_s"], loaded = seconds(fn)
        del loaded
        if drop_caches():
            result[f"load_{how}_cold_s"], loaded = seconds(fn)
            del loaded
    print(f"  {kind} {n}: " + ", ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    result["curve"] = search_curve(searcher(kind, index), queries, truth)
    if service:
        del index
        result["service"] = serve(folder, path, queries)
    return result


def searcher(kind: str, index):
    """search(queries, nprobe) -> the ids of the 10 best, for either library."""
    if kind.startswith("xmodal"):
        return lambda q, nprobe: index.search(q, K, nprobe=nprobe)[1]

    def search(q, nprobe):
        index.nprobe = nprobe
        return torch.from_numpy(index.search(q.numpy(), K)[1])
    return search


def again(folder: str, kind: str, n: int, service: bool) -> dict:
    """The search curve (and the service) measured again on the index file a ``case`` saved, read whole."""
    with open(os.path.join(folder, f"result-{kind}-{n}.json")) as f:
        result = json.load(f)
    path = os.path.join(folder, f"index-{kind}-{n}.bin")
    if kind.startswith("xmodal"):
        import xmodal

        index = xmodal.IVFIndex.load(path)
    else:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.read_index(path)
    queries, truth = queries_and_truth(folder, n)
    print(f"{kind} at {n:,} rows, search again", flush=True)
    result["curve"] = search_curve(searcher(kind, index), queries, truth)
    if service:
        del index
        result["service"] = serve(folder, path, queries)
    result["searched_again"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def serve(folder: str, path: str, queries: torch.Tensor) -> dict:
    """The saved index as a collection of ``xmodal serve``: latency, throughput, memory, restart."""
    import shutil
    import signal

    import httpx

    import xmodal
    from xmodal.serve import write_collection

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from serve_load import run_load, start_server, stop

    home = os.path.join(folder, "service")
    shutil.rmtree(home, ignore_errors=True)
    index = xmodal.IVFIndex.load(path, mmap=True)
    write_collection(home, "big", index)
    del index
    out = {"nprobe": 16}
    proc, url, out["start_s"] = start_server(home)
    try:
        out["one_client"] = run_load(url, "big", queries.shape[1], 1, 20)
        out["64_clients"] = run_load(url, "big", queries.shape[1], 64, 20)
        out["memory"] = process_memory(proc.pid)
        rng = np.random.default_rng(5)
        extra = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((1000, queries.shape[1]))
                                                               .astype(np.float32)), dim=1)
        for start in range(0, 1000, 100):
            body = {"ids": list(range(10**9 + start, 10**9 + start + 100)),
                    "vectors": extra[start: start + 100].tolist()}
            httpx.post(f"{url}/collections/big/vectors", json=body, timeout=120).raise_for_status()
        stop(proc, signal.SIGKILL)
        proc, url, out["restart_s"] = start_server(home)
        out["restart_memory"] = process_memory(proc.pid)
        answer = httpx.post(f"{url}/collections/big/search", json={"vectors": [extra[7].tolist()], "k": 1},
                            timeout=120).json()
        out["replayed_row_found"] = str(10**9 + 7) in json.dumps(answer)
    finally:
        stop(proc)
    print(f"  service: {out}", flush=True)
    return out


def process_memory(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


# -- the orchestration and the report
def run(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    jobs = [("xmodal-int8", n) for n in sizes]
    jobs += [(kind, args.faiss_at) for kind in ("faiss-sq8", "faiss-pqfs") if args.faiss_at]
    jobs += [("xmodal-bf16", args.bf16_at)] if args.bf16_at else []
    for kind, n in jobs:
        out = os.path.join(args.folder, f"result-{kind}-{n}.json")
        if os.path.exists(out) and not args.again:
            continue
        print(f"{kind} at {n:,} rows", flush=True)
        command = [sys.executable, __file__, "case", "--folder", args.folder, "--kind", kind, "--rows", str(n),
                   "--nlist", str(args.nlist)] + (["--service"] if kind == "xmodal-int8" and n == args.service_at else [])
        subprocess.run(command, check=True)  # (the index file stays, for the `curve` step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["data", "run", "case", "again", "report"])
    p.add_argument("--folder", required=True)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--sizes", default="1000000,3000000,10000000")
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--faiss-at", type=int, default=10_000_000)
    p.add_argument("--bf16-at", type=int, default=10_000_000)
    p.add_argument("--service-at", type=int, default=10_000_000)
    p.add_argument("--kind")
    p.add_argument("--service", action="store_true")
    p.add_argument("--again", action="store_true", help="rerun cases whose results are in the folder")
    p.add_argument("--note", default="", help="report: a line on how the run was made")
    p.add_argument("--markdown")
    p.add_argument("--json")
    args = p.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    if args.step == "data":
        make_data(args.folder, args.rows, args.dim, {int(s) for s in args.sizes.split(",")})
    elif args.step == "run":
        run(args)
    elif args.step in ("case", "again"):
        if args.step == "case":
            result = case(args.folder, args.kind, args.rows, args.nlist, args.service)
        else:
            result = again(args.folder, args.kind, args.rows, args.service)
        with open(os.path.join(args.folder, f"result-{args.kind}-{args.rows}.json"), "w") as f:
            json.dump(result, f, indent=2)
    else:
        from scale_report import report

        report(args.folder, args.markdown, args.json, args.note)


if __name__ == "__main__":
    main()
