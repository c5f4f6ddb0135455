"""The search page's speed as a person sees it: time from pressing Enter in the text box to the results grid on
screen, measured inside headless Chromium with the Performance API (the page records, per search, the ms to
the answer parsed, to the frame that shows the grid, and to the last thumbnail drawn), over the collection
``xmodal demo`` writes, served by ``xmodal serve --model --ui`` with an API key on 127.0.0.1.

    python benchmarks/search_page.py [--demo DIR] [--queries 200] [--write]

--demo: an ``xmodal demo`` output folder (default: run the demo into a temporary folder first). The queries are
captions of the demo's test pictures (different wording from the payload captions). --write saves
benchmarks/results/<date>_search_page_cpu[_<kind>].{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the browser and the server, as the tests start them

from browser_helpers import chromium, missing  # noqa: E402
from serve_helpers import AUTH, KEY, Server  # noqa: E402

from xmodal.bench import environment  # noqa: E402

WARM_UP = 5


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def measure(demo: Path, queries: int) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from xmodal.demo import ShapesDataset

    gallery = ShapesDataset(None, seed=7)
    texts = [gallery.captions[i % len(gallery)][1 + (i // len(gallery)) % 4] for i in range(queries + WARM_UP)]
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_text(KEY)
        server = Server(demo / "collections", "--model", str(demo / "model"), "--ui", "--api-key-file", str(key_file))
        driver = None
        try:
            server.wait_ready(AUTH)
            driver = chromium()
            driver.get(server.url + "/ui/")
            driver.find_element(By.ID, "key").send_keys(KEY + Keys.ENTER)
            wait = WebDriverWait(driver, 60, poll_frequency=0.01)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#collection option"))
            box = driver.find_element(By.ID, "text")
            right = 0
            for n, text in enumerate(texts):
                box.clear()
                box.send_keys(text + Keys.ENTER)
                wait.until(lambda d: d.execute_script("return window.xmodal.timings.length") > n)
                first = driver.find_element(By.CSS_SELECTOR, "#results .card").get_attribute("data-id")
                right += n >= WARM_UP and int(first) == gallery.attributes[(n % len(gallery))].index
            timings = driver.execute_script("return window.xmodal.timings")
            browser = driver.capabilities.get("browserVersion")
        finally:
            if driver is not None:
                driver.quit()
            server.stop()
    measured = timings[WARM_UP:]
    summary = {}
    for part in ("answered", "grid", "thumbnails"):
        values = [t[part] for t in measured]
        summary[part] = {"p50": statistics.median(values), "p90": percentile(values, 90),
                         "p99": percentile(values, 99), "max": max(values)}
    return {"queries": len(measured), "first_query_ms": timings[0], "summary_ms": summary,
            "first_result_right": right / len(measured), "chromium": browser}


def report(result: dict, env: dict) -> str:
    s = result["summary_ms"]
    lines = [f"# The search page: Enter to results grid ({env['date'][:10]})", "",
             f"Machine: {env['cpu']} ({env['threads']} threads), {env['cpu_flags']}; torch {env['torch']}, "
             f"xmodal {env['xmodal']}, Chromium {result['chromium']} (headless, 1280 x 900).", "",
             f"{result['queries']} text queries (captions of the demo's test pictures) typed into the page of "
             "`xmodal serve xmodal-demo/collections --model xmodal-demo/model --ui` (API key set, 127.0.0.1), "
             f"one at a time, after {WARM_UP} warm-up queries; the page's own Performance API timings, ms from "
             "the Enter key:", "",
             "| ms from Enter to | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|"]
    for part, name in (("answered", "the answer parsed (encode + search + JSON)"),
                       ("grid", "the grid on screen (next frame after it is built)"),
                       ("thumbnails", "the last thumbnail drawn")):
        lines.append(f"| {name} | {s[part]['p50']:.1f} | {s[part]['p90']:.1f} | {s[part]['p99']:.1f} | "
                     f"{s[part]['max']:.1f} |")
    lines += ["", f"Target: p50 from Enter to the rendered grid <= 100 ms: **{s['grid']['p50']:.1f} ms**. "
              f"First query (model and page warm-up): {result['first_query_ms']['grid']:.0f} ms to the grid. "
              f"The first result was the query's picture for {result['first_result_right']:.1%} of the queries.",
              "", "Reproduce: `python benchmarks/search_page.py --demo xmodal-demo --write`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="an xmodal demo output folder (default: run the demo first)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (default: 200)")
    parser.add_argument("--write", action="store_true", help="save the report under benchmarks/results/")
    parser.add_argument("--kind", help="a suffix for the report's name, e.g. amd_avx2")
    args = parser.parse_args()
    why = missing()
    if why:
        print(f"search_page.py: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo
        if demo is None:
            demo = Path(tmp) / "xmodal-demo"
            subprocess.run([sys.executable, "-m", "xmodal", "demo", "--out", str(demo), "--no-progress"], check=True)
        started = time.perf_counter()
        result = measure(demo, args.queries)
    env = environment("cpu", faiss=False)
    text = report(result, env)
    print(text)
    print(f"(measured in {time.perf_counter() - started:.0f} s)")
    if args.write:
        stem = f"{datetime.date.today().isoformat()}_search_page_cpu" + (f"_{args.kind}" if args.kind else "")
        out = ROOT / "benchmarks" / "results"
        (out / f"{stem}.json").write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)
        print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
