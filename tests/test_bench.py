"""The benchmark harnesses compare like with like: every baseline computes what xmodal computes."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import xmodal
from xmodal import bench


@pytest.mark.parametrize("case", bench.bilinear_grid(quick=True), ids=lambda c: c.name)
def test_bilinear_baselines_agree_with_xmodal(case):
    leaves, calls = bench.make_problem(case, "cpu")
    with torch.no_grad():
        outputs = {name: fn() for name, fn in calls.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["xmodal"], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("case", [bench.BilinearCase("full", 8, 6, 5, 4),
                                  bench.BilinearCase("factorized", 4, 6, 5, 3, "float32", 2, regions=3)],
                         ids=lambda c: c.kind)
def test_bilinear_gradients_agree_with_xmodal(case):
    leaves, calls = bench.make_problem(case, "cpu")
    grads = {}
    for name, fn in calls.items():
        grads[name] = torch.autograd.grad(fn().square().sum(), leaves)
    for name, g in grads.items():
        for a, b in zip(g, grads["xmodal"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_search_baselines_agree_with_xmodal():
    case = bench.SearchCase(3, 2000, 16, 5)
    queries, database = bench.make_data(case)
    values, _ = bench.naive_search(queries, database, case.k, case.metric)
    ours, _ = torch.ops.xmodal.topk_search(queries, database, case.k, case.metric)
    torch.testing.assert_close(ours, values, rtol=1e-5, atol=1e-5)


def test_bench_cli_quick_writes_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "xmodal", "bench", "bilinear", "--quick", "--repeats", "1",
         "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")],
        capture_output=True, text=True, timeout=900,  # about 40 s alone on 2 cores
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speed-up" in out.stdout
    assert (tmp_path / "b.json").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
    assert "| case |" in (tmp_path / "b.md").read_text()


def test_search_bench_times_variants_beside_the_default(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "xmodal", "bench", "search", "--quick", "--repeats", "1", "--no-faiss",
         "--variants", "aten,tiled:widen", "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "s.json").read_text())
    results = data["results"]
    assert results and all(set(r["seconds"]) == {"xmodal", "naive", "xmodal[aten]", "xmodal[tiled:widen]"} for r in results)
    assert data["environment"]["read_bandwidth_GBps"] > 0 and data["environment"]["search_cpu_kind"]
    report = (tmp_path / "s.md").read_text()
    assert "xmodal[aten] vs naive" in report and '`strategy="tiled"` with `settings.cpu_tile_gemm="widen"`' in report
    assert "## Targets, worst case of this run" in report and "never below naive" in report
    bad = subprocess.run([sys.executable, "-m", "xmodal", "bench", "search", "--quick", "--variants", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variant 'nope'" in bad.stdout


def test_variant_calls_force_a_strategy_and_restore_the_settings():
    from xmodal.bench import variant_call

    seen = []

    def search(strategy):
        seen.append((strategy, xmodal.settings.get()["cpu_tile_gemm"]))

    variant_call("aten", search)()
    variant_call("tiled:scan", search)()
    assert seen == [("aten", "auto"), ("tiled", "scan")] and xmodal.settings.get()["cpu_tile_gemm"] == "auto"
    for bad in ("fastest", "aten:scan", "tiled:gpu"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_call(bad, search)


def test_cpu_targets_read_off_one_run():
    from xmodal.bench import SearchCase, SearchResult, cpu_targets

    n = 200_000
    results = [
        # bf16 Q = 1, D = 512: 204.8 MB in 10 ms = 20.5 GB/s = 0.51 of 40; 2.0x naive
        SearchResult(SearchCase(1, n, 512, 10, "bfloat16"), {"xmodal": 0.010, "naive": 0.020, "xmodal[aten]": 0.019}),
        SearchResult(SearchCase(256, n, 512, 10, "float32"), {"xmodal": 0.30, "naive": 0.27, "xmodal[aten]": 0.26}),
    ]
    rows = cpu_targets(results, {"read_bandwidth_GBps": 40.0})
    assert rows[0] == ["target", "goal", "xmodal", "xmodal[aten]"]
    never, bandwidth, bf16 = (row[2:] for row in rows[1:])
    assert never == ["NO (0.90)", "yes (1.04)"]
    assert bandwidth == ["NO (0.51)", "NO (0.27)"]
    assert bf16 == ["yes (2.00)", "NO (1.05)"]


def test_cuda_targets_read_off_one_run():
    from xmodal.bench import SearchCase, SearchResult, cuda_targets

    n = 1_000_000
    results = [
        # Q = 1, fp32, D = 128: 512 MB in 0.2 ms = 2560 GB/s = 0.64 of 4000 (misses 0.70); the fused variant makes it
        SearchResult(SearchCase(1, n, 128, 10, "float32"), {"xmodal": 2e-4, "naive": 3e-4, "xmodal[fused]": 1.5e-4}),
        SearchResult(SearchCase(256, n, 128, 10, "bfloat16"), {"xmodal": 1e-3, "naive": 3.3e-3, "xmodal[fused]": 5e-4}),
        SearchResult(SearchCase(256, n, 128, 256, "bfloat16"), {"xmodal": 1.6e-3, "naive": 3.4e-3, "xmodal[fused]": 6e-4}),
        SearchResult(SearchCase(256, n, 768, 10, "bfloat16"), {"xmodal": 4e-3, "naive": 5e-3}),
        SearchResult(SearchCase(16384, 10_000_000, 128, 10, "bfloat16"), {"xmodal": 2.5, "xmodal[fused]": 0.3}),
    ]
    rows = cuda_targets(results, {"copy_bandwidth_GBps": 4000.0})
    assert rows[0] == ["target", "goal", "xmodal", "xmodal[fused]"]
    assert len(rows) == 7
    bandwidth, d256, d768, never, k256, bounded = (row[2:] for row in rows[1:])
    assert bandwidth == ["NO (0.64)", "yes (0.85)"]
    assert d256 == ["NO (2.12)", "yes (5.67)"]  # worst of 3.3 and 2.125 / 6.6 and 5.67
    assert d768 == ["NO (1.25)", "-"]
    assert never == ["yes (1.50)", "yes (2.00)"]
    assert k256 == ["NO (1.60)", "yes (1.20)"]
    assert bounded == ["yes (2.50)", "yes (0.30)"]


def test_info_reports_versions_settings_and_plans():
    out = subprocess.run([sys.executable, "-m", "xmodal", "info", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__ and info["CUDA kernels compiled"] in ("yes", "no")
    assert info["settings"] == ("bilinear_max_rows=256, bilinear_tile_kib=2048, cpu_cache_mb=1024, cpu_min_thread_us=1000, "
                                "cpu_tile_gemm=auto, cpu_tile_kib=0, cuda_max_tile_rows=0")
    assert info["plan cpu float32 Q=256 D=512 k=10"] == "tiled (BLAS GEMM, 512 KiB tiles, query blocks of 256)"
    assert info["plan cpu bfloat16 Q=1 D=512 k=10"].startswith("tiled (one-pass scan")
    assert info["CPU block cache held"].endswith("MiB")


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], r"argument --repeats: must be a positive integer, got '0'"),
    (["--repeats", "-2"], r"argument --repeats: must be a positive integer, got '-2'"),
    (["--repeats", "many"], r"argument --repeats: must be a positive integer, got 'many'"),
    (["--device", "tpu"], r"argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], r"argument --device: must be cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--json", "/no/such/folder/b.json"], r"argument --json: cannot write '/no/such/folder/b.json': folder "
                                           r"'/no/such/folder' does not exist"),
    (["--markdown", "/"], r"argument --markdown: cannot write '/': it is a folder"),
])
@pytest.mark.parametrize("op", ["search", "bilinear"])
def test_bench_cli_rejects_bad_options_with_a_usage_error(capsys, op, argv, message):
    from xmodal import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["bench", op, "--quick", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: xmodal bench") and err.strip().splitlines()[-1].startswith("xmodal bench: error: ")
    assert re.search(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_cli_cuda_without_a_gpu_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "xmodal", "bench", "search", "--device", "cuda", "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        "xmodal bench: error: argument --device: 'cuda' asked for, but no CUDA GPU is visible to torch")


def test_bench_functions_reject_non_positive_repeats():
    for call in (lambda: bench.time_call(lambda: None, "cpu", 0),
                 lambda: bench.run_search_case(bench.SearchCase(1, 10, 4, 2), repeats=0),
                 lambda: bench.run_bilinear_case(bench.BilinearCase("full", 2, 3, 3, 2), repeats=-1,
                                                          measure_memory=False)):
        with pytest.raises(ValueError, match=r"repeats must be a positive int, got (0|-1)"):
            call()


def test_compress_bench_quick_writes_reports_with_every_method_and_the_targets(tmp_path):
    import importlib.util

    from xmodal import cli
    from xmodal.bench import compress

    has_faiss = importlib.util.find_spec("faiss") is not None
    paths = {ext: tmp_path / f"c.{ext}" for ext in ("json", "md", "png")}
    # N = 20,000, 20 single queries, a 30-step model: about 20 s alone on 2 cores
    assert cli.main(["bench", "compress", "--quick", "--repeats", "1", "--json", str(paths["json"]),
                     "--markdown", str(paths["md"]), "--plot", str(paths["png"])]) == 0
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["threads"] == torch.get_num_threads()
    results = data["results"]
    assert [r["case"]["dataset"] for r in results] == ["clustered", "model"]
    methods = compress.method_names(512, use_faiss=has_faiss)
    assert any(m.startswith("faiss[") for m in methods) == has_faiss
    for r in results:
        assert r["case"]["n"] == 20_000 and r["case"]["d"] == 512 and r["case"]["k"] == 10
        for measure in ("recall", "seconds", "seconds_q1", "build_seconds", "nbytes"):
            assert list(r[measure]) == methods, measure
        assert all(0.0 <= v <= 1.0 for v in r["recall"].values())
        assert r["recall"]["xmodal[float32]"] == 1.0
        assert all(v > 0 for m in ("seconds", "seconds_q1", "nbytes") for v in r[m].values())
        assert r["nbytes"]["xmodal[int8]"] < 0.3 * r["nbytes"]["xmodal[float32]"]
        assert r["pca_fit_seconds"] > 0 and r["data"].startswith(r["case"]["dataset"] + ":")
        targets = {t["target"]: t for t in r["targets"]}
        assert "int8: recall@10 vs exact float32" in targets
        assert all(t["met"] in (True, False, None) for t in targets.values())
        # never judged below 1M rows: the PCA fit time and every speed goal
        fit = [t for name, t in targets.items() if name.startswith("PCA(128).fit")]
        assert len(fit) == 1 and fit[0]["met"] is None
        speeds = [t for name, t in targets.items() if "QPS /" in name and t["goal"] != "report"]
        assert speeds and all(t["met"] is None and "n/a: speed goals are set at 1,000,000 rows" in t["measured"]
                              for t in speeds if t["measured"] != "faiss not run")
    assert any(t["target"].startswith("binary: recall@10 >= 0.95") for t in results[0]["targets"])
    report = paths["md"].read_text()
    assert "## Targets" in report and "| data | target | goal | measured | met |" in report
    assert "xmodal[binary r=10]" in report and ("faiss[sq8]" in report) == has_faiss
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compress_targets_are_read_off_the_measurements():
    from xmodal.bench import CompressCase, CompressResult, compress_targets

    case = CompressCase("clustered", 1_000_000, 512, q_single=100)
    names = ["xmodal[float32]", "xmodal[int8]", "xmodal[binary r=1]", "xmodal[binary r=2]", "xmodal[binary r=4]",
             "xmodal[binary r=10]", "faiss[sq8]", "faiss[binary r=4]"]
    recall = dict(zip(names, [1.0, 0.98, 0.5, 0.8, 0.96, 0.99, 0.97, 0.96]))
    batch = dict(zip(names, [1.0, 0.5, 0.01, 0.02, 0.04, 0.1, 0.6, 0.03]))  # Q = 256 seconds
    single = dict(zip(names, [1e-2, 2e-3, 5e-4, 6e-4, 8e-4, 2e-3, 3e-3, 9e-4]))
    nbytes = dict(zip(names, [2048, 520, 580, 580, 580, 580, 512, 600]))
    result = CompressResult(case, batch, single, {n: 1.0 for n in names}, nbytes, recall, 12.0, "clustered: test")
    rows = {t["target"]: t for t in compress_targets(result)}
    assert rows["int8: index bytes / float32 FlatIndex bytes"]["met"] is True  # 0.254
    assert rows["int8: recall@10 vs exact float32"]["met"] is True
    assert rows["int8: QPS / float32 FlatIndex QPS, Q=1"]["value"] == pytest.approx(5.0)
    assert rows["int8: QPS / float32 FlatIndex QPS, Q=256"]["met"] is True  # 2.0x
    assert rows["int8: QPS / faiss SQ8 QPS at equal or better recall, Q=1"]["met"] is True  # 1.5x, 0.98 >= 0.97
    binary = rows["binary: recall@10 >= 0.95 at some rescore <= 10 (clustered)"]
    assert binary["met"] is True and binary["measured"].endswith("at rescore 4")  # the smallest reaching 0.95
    assert rows["binary: QPS / float32 FlatIndex QPS, Q=1, at rescore 4"]["value"] == pytest.approx(12.5)
    assert rows["binary: QPS / faiss IndexBinaryFlat + same rescoring QPS, Q=1, at rescore 4"]["met"] is True
    assert rows["binary: QPS / faiss IndexBinaryFlat + same rescoring QPS, Q=256, at rescore 4"]["met"] is False
    assert rows["PCA(128).fit of 1M x 512 (this run: 1,000,000 x 512)"]["met"] is False  # 12 s
