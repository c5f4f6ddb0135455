"""The ``xmodal`` command: ``info``, ``bench``, ``demo``."""
from __future__ import annotations

import argparse
import json
import platform
import sys

from ._cli_args import bench_device, output_file, port, positive_int


def _info(args) -> int:
    import torch

    import xmodal

    bi = xmodal.build_info()
    rows = [
        ("xmodal", xmodal.__version__),
        ("torch", torch.__version__),
        ("torch built against", bi["torch_version"]),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("CUDA kernels compiled", "yes" if bi["cuda"] else "no"),
        ("CUDA architectures", bi["cuda_archs"] or "-"),
        ("GPU visible", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"),
        ("CPU threads", str(torch.get_num_threads())),
        ("CPU capability", torch.backends.cpu.get_cpu_capability()),
        ("python", platform.python_version()),
        ("search CPU kind", xmodal._C.device_facts("cpu")["cpu_kind"]),
        ("settings", ", ".join(f"{k}={v}" for k, v in xmodal.settings.get().items())),
        *_search_plans(),
        # the CPU gradient block cache (README, "Bilinear pooling")
        ("CPU block cache held", f"{xmodal._C.cpu_cache_bytes() / 2**20:.1f} MiB of at most "
                                 f"{xmodal.settings.get()['cpu_cache_mb']} MiB"),
    ]
    if args.json:
        print(json.dumps(dict(rows), indent=2))
    else:
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    return 0


def _search_plans():
    """("plan <device> <shape>", what topk_search's strategy="auto" does) for a few typical searches."""
    import torch

    import xmodal

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and xmodal.build_info()["cuda"] else [])
    rows = []
    for device in devices:
        for dtype, q in (("float32", 1), ("float32", 256), ("bfloat16", 1), ("bfloat16", 256), ("float16", 16)):
            # meta-free: tiny tensors of the right dtype stand for the shape; the plan reads Q, D and the dtype
            queries = torch.empty(q, 512, dtype=getattr(torch, dtype), device=device)
            database = torch.empty(16, 512, dtype=queries.dtype, device=device)
            rows.append((f"plan {device} {dtype} Q={q} D=512 k=10", xmodal.search_plan(queries, database, 10, "ip")))
    return rows


def _bench(args) -> int:
    from . import bench

    return bench.main(args)


def _demo(args) -> int:
    if args.demo_task == "recommend":
        from .recommend import demo as recommend_demo

        return recommend_demo.run(args)
    from . import demo

    return demo.run(args)


def _serve(args) -> int:
    from .serve import Limits, run

    for flag, value in (("--batch-wait-ms", args.batch_wait_ms), ("--snapshot-mb", args.snapshot_mb)):
        if not value >= 0:
            raise SystemExit(f"xmodal serve: {flag} must be >= 0, got {value}")
    limits = Limits(max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000)
    if args.ray is not None:
        return _serve_on_ray(args, limits)
    for flag, value in (("--shards", args.shards), ("--replicas", args.replicas)):
        if value is not None:
            raise SystemExit(f"xmodal serve: {flag} needs --ray ADDRESS|local (one process serves one shard)")
    try:
        run(args.dir, host=args.host, port=args.port, api_key_file=args.api_key_file,
            encryption_key_file=args.encryption_key_file, model=args.model, limits=limits,
            snapshot_bytes=int(args.snapshot_mb * (1 << 20)), search_threads=args.search_threads, ui=args.ui,
            media=args.media)
    except (ValueError, OSError) as e:
        print(f"xmodal serve: {e}", file=sys.stderr)
        return 2
    return 0


def _serve_on_ray(args, limits) -> int:
    try:
        from .serve import ray_app
    except ImportError as e:
        raise SystemExit(f"xmodal serve --ray needs Ray: pip install 'xmodal[ray]' ({e})") from None
    from .serve.shards import written_layout

    written = written_layout(args.dir)
    shards = args.shards or written["shards"] or 1
    try:
        ray_app.run(args.dir, shards, address=args.ray, host=args.host, port=args.port,
                    replicas=args.replicas or written["replicas"], ui=args.ui,
                    api_key_file=args.api_key_file, encryption_key_file=args.encryption_key_file, model=args.model,
                    limits=limits, snapshot_bytes=int(args.snapshot_mb * (1 << 20)),
                    search_threads=args.search_threads or 1, media=args.media)
    except (ValueError, OSError) as e:
        print(f"xmodal serve: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal retrieval ops for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, compiled CUDA architectures, GPU, threads")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(func=_info)
    p_bench = sub.add_parser("bench", help="benchmark the fused ops against naive PyTorch (and faiss)")
    p_bench.add_argument("op", choices=["search", "bilinear", "compress"],
                         help="which op to benchmark (compress: compressed FlatIndex search vs exact and faiss, CPU)")
    p_bench.add_argument("--device", type=bench_device, default="cpu", help="cpu or cuda (default: cpu)")
    p_bench.add_argument("--quick", action="store_true", help="a small grid (search: seconds; bilinear: under a minute, its peak memory measured in one fresh process per figure; compress: N = 20,000, 20 single queries, a briefly trained model)")
    p_bench.add_argument("--repeats", type=positive_int, default=3,
                         help="timed runs per case, at least 1 (median reported; default: 3)")
    p_bench.add_argument("--json", metavar="PATH", type=output_file, help="write the results as JSON")
    p_bench.add_argument("--markdown", metavar="PATH", type=output_file, help="write the results as a markdown report")
    p_bench.add_argument("--plot", metavar="PATH", type=output_file, help="write a PNG chart: search, bilinear: the speed-ups; compress: recall@10 against QPS")
    p_bench.add_argument("--no-faiss", action="store_true", help="skip faiss even when installed")
    p_bench.add_argument("--variants", metavar="NAMES",
                         help="search: also time forced strategies beside auto, comma-separated: a strategy name (tiled, aten, filtered, tensor_core, fused_scan) or tiled:<gemm> with a CPU tile GEMM from xmodal.settings.TILE_GEMMS")
    p_bench.add_argument("--n", type=positive_int, metavar="N",
                         help="compress: database rows per data set (default: 1,000,000; --quick: 20,000)")
    p_bench.add_argument("--dim", type=positive_int, metavar="D", help="compress: dimension (default: 512)")
    p_bench.add_argument("--datasets", metavar="NAMES",
                         help="compress: comma-separated data sets, clustered and/or model (default: clustered,model)")
    p_bench.set_defaults(func=_bench)
    p_demo = sub.add_parser("demo", help="train and evaluate cross-modal retrieval on the built-in Shapes data")
    p_demo.add_argument("--steps", type=positive_int, default=800, help="training steps (default: 800)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and batches (default: 0)")
    p_demo.add_argument("--out", default="xmodal-demo", help="folder for the checkpoint and examples.png")
    p_demo.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    p_demo.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_demo.add_argument("--multitask", action="store_true",
                        help="train the contrastive loss together with shape, colour and size classification "
                             "(xmodal.train.MultiTaskLoss, learned uncertainty weights)")
    p_demo.set_defaults(func=_demo, demo_task=None)
    demo_tasks = p_demo.add_subparsers(dest="demo_task", metavar="{recommend}",
                                       help="recommend: MovieLens-100k recommendation on RecBole's protocol "
                                            "(without it: cross-modal retrieval on the Shapes data)")
    from .recommend.demo import add_arguments as recommend_arguments

    recommend_arguments(demo_tasks.add_parser("recommend", help="train and evaluate recommenders on MovieLens-100k"))
    p_serve = sub.add_parser("serve", help="serve the collections in a folder over HTTP (FastAPI; /docs has the API)")
    p_serve.add_argument("dir", help="folder of collections (created if missing)")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p_serve.add_argument("--port", type=port, default=8000, help="port (default: 8000)")
    p_serve.add_argument("--api-key-file", metavar="PATH",
                         help="require 'Authorization: Bearer <key>' on every request, the key read from PATH")
    p_serve.add_argument("--encryption-key-file", metavar="PATH",
                         help="encrypt snapshots and the write-ahead log (AES-256-GCM) with the 32-byte key in PATH")
    p_serve.add_argument("--model", metavar="CHECKPOINT",
                         help="a CrossModalModel folder (xmodal demo writes one to <out>/model): enables search by "
                              "text, image and image + text")
    p_serve.add_argument("--max-batch", type=positive_int, default=256,
                         help="most queries answered by one index search (1 turns micro-batching off; default: 256)")
    p_serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                         help="how long a batch keeps gathering while requests arrive together (default: 2)")
    p_serve.add_argument("--snapshot-mb", type=float, default=256.0,
                         help="snapshot a collection once its write-ahead log holds this many MiB (default: 256)")
    p_serve.add_argument("--search-threads", type=positive_int,
                         help="torch threads for searches (default: one fewer than the cores, leaving one to the "
                              "HTTP event loop)")
    p_serve.add_argument("--ui", action="store_true",
                         help="serve a search page at /ui/ (text, image and composed queries, filters, thumbnails)")
    p_serve.add_argument("--media", metavar="DIR",
                         help="folder the payloads' \"image\" paths are relative to, served read-only (a collection "
                              "written with its own media/ folder uses that instead)")
    p_serve.add_argument("--ray", metavar="ADDRESS",
                         help="serve on a Ray cluster (Ray Serve) at ADDRESS, or 'local' to start one here: one "
                              "deployment per shard and an ingress answering the same API (needs xmodal[ray])")
    p_serve.add_argument("--shards", type=positive_int,
                         help="with --ray: shards to split every collection over, by id (default: the count the "
                              "folder was written with, else 1; a folder keeps its count)")
    p_serve.add_argument("--replicas", type=positive_int,
                         help="with --ray: copies of each shard, searches shared among them and answered while one "
                              "is down, writes sent to all (default: the folder's count, else 1)")
    p_serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
