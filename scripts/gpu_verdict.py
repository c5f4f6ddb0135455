"""The GPU check's verdict (scripts/gpu_check.sh): per strategy, did its tests pass and how fast is it
against naive PyTorch per shape class; is "auto" at least as fast as naive everywhere; and the rows of the
planner's table of verified shape classes (csrc/search/planner.cpp, kVerifiedCuda) the run supports.
Decides nothing when a step of the run failed or timed out (OUTDIR/failed_steps.txt, written by the script):
then "verified" is false, "failed_steps" lists them, and the summary ends "not verified: <steps>".
Writes OUTDIR/verdict.json and prints a compact summary as its last lines."""
import json
import os
import re
import sys

out = sys.argv[1]
STRATEGIES = ["tiled", "aten", "filtered", "tensor_core", "fused_scan"]


def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""


def test_summary(log):
    last = log.strip().splitlines()[-1] if log.strip() else "no output"
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    return last, counts


# shape classes: few queries or batches, 16-bit or fp32
def shape_class(case):
    size = "few" if case["q"] <= 16 else "batch"
    return f"{size}-{'16bit' if case['dtype'] in ('bfloat16', 'float16') else case['dtype']}"


# a missing list means the run did not get that far (or this is not gpu_check.sh's OUTDIR): no decision
if os.path.exists(os.path.join(out, "failed_steps.txt")):
    failed = [line.strip() for line in read("failed_steps.txt").splitlines() if line.strip()]
else:
    failed = ["failed_steps.txt missing (run scripts/gpu_check.sh)"]
verdict = {"verified": not failed, "failed_steps": failed, "strategies": {}, "auto": {}, "verified_rows": []}
passed = [s for s in read("strategies_passed.txt").strip().split(",") if s]
try:
    bench = json.loads(read("bench_search.json") or '{"results": []}')
except json.JSONDecodeError:  # a benchmark cut short: its step is in failed_steps, the verdict still gets written
    bench = {"results": []}
for s in STRATEGIES:
    last, counts = test_summary(read(f"tests_{s}.log"))
    sanitizer = re.findall(r"ERROR SUMMARY: (\d+) error", read(f"sanitizer_{s}.log"))
    # the tiny search ends with "ok" when it ran to the end (an error or a crash under the sanitizer does not)
    tiny_ok = re.search(r"^ok$", read(f"sanitizer_{s}.log"), re.M) is not None
    # passed = the process exited cleanly and ran tests (all skipped, as without a GPU, verifies nothing)
    verdict["strategies"][s] = {"tests_passed": s in passed and counts.get("passed", 0) > 0, "tests": counts, "tests_summary": last,
                                "sanitizer_errors": int(sanitizer[-1]) if sanitizer else None, "tiny_search_ok": tiny_ok,
                                "vs_naive": {}}
for r in bench["results"]:
    sec = r["seconds"]
    if "naive" not in sec:
        continue
    cls = shape_class(r["case"])
    for name, t in sec.items():
        if not name.startswith("xmodal"):
            continue
        target = verdict["auto"] if name == "xmodal" else verdict["strategies"].get(name[7:-1], {}).get("vs_naive")
        if target is None:
            continue
        lo, hi = target.get(cls, (float("inf"), 0.0))
        ratio = sec["naive"] / t
        target[cls] = (round(min(lo, ratio), 3), round(max(hi, ratio), 3))
auto_worst = min((lo for lo, _ in verdict["auto"].values()), default=None)
# measurements from a run with a failed step are kept for diagnosis, but decide nothing (None: undecided)
verdict["auto_never_slower"] = (auto_worst is not None and auto_worst >= 1.0) if not failed else None
# a strategy earns a class when the run had no failed step, its tests passed, its tiny search ran with the
# sanitizer finding nothing, and its worst case there beats naive by 5% (a margin for run-to-run noise)
for s, v in verdict["strategies"].items():
    if failed or s == "aten" or not v["tests_passed"] or not v["tiny_search_ok"] or (v["sanitizer_errors"] or 0) > 0:
        continue
    for cls, (lo, _) in v["vs_naive"].items():
        if lo >= 1.05:
            size, bits = cls.split("-")
            q = "1, 16" if size == "few" else "17, INT64_MAX"
            verdict["verified_rows"].append(f"{{Strategy::{''.join(p.title() for p in s.split('_'))}, 8, "
                                            f"{16 if bits == '16bit' else 32}, {q}, {'192' if s == 'fused_scan' else '2048'}}}")
with open(os.path.join(out, "verdict.json"), "w") as f:
    json.dump(verdict, f, indent=2)

print("\nVERDICT")
for s, v in verdict["strategies"].items():
    ranges = ", ".join(f"{c} {lo:.2f}-{hi:.2f}x" for c, (lo, hi) in sorted(v["vs_naive"].items())) or "not benchmarked"
    print(f"  {s:12} tests {'PASS' if v['tests_passed'] else 'FAIL'} ({v['tests_summary'][:60]}); "
          f"sanitizer {v['sanitizer_errors']}{'' if v['tiny_search_ok'] else ' (tiny search did not finish)'}; "
          f"vs naive: {ranges}")
ranges = ", ".join(f"{c} {lo:.2f}-{hi:.2f}x" for c, (lo, hi) in sorted(verdict["auto"].items()))
print(f"  auto         vs naive: {ranges or 'not benchmarked'}; never slower: {verdict['auto_never_slower']}")
print("  verified rows for kVerifiedCuda: " + ("; ".join(verdict["verified_rows"]) or "none"))
if failed:
    print("  not verified: " + "; ".join(failed))
