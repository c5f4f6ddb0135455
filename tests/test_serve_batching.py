"""xmodal serve's micro-batcher: concurrent searches answered by one index search, a bounded queue (503
with Retry-After past it), errors and closing."""
import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from xmodal.serve import Limits, create_app  # noqa: E402
from xmodal.serve.batcher import MicroBatcher, Overloaded  # noqa: E402
from xmodal.serve.collection import Collection  # noqa: E402

from serve_helpers import add  # noqa: E402


# -- micro-batching
def test_the_batcher_answers_concurrent_requests_with_one_search():
    calls = []

    def search(q, k):
        calls.append(q.shape[0])
        time.sleep(0.05)
        return q[:, :1].repeat(k, 1) * 1.0, np.tile(np.arange(k), (q.shape[0], 1))

    async def main():
        b = MicroBatcher(search, max_batch=64, max_wait=0.01)
        queries = [np.full((1, 4), i, np.float32) for i in range(20)]
        results = await asyncio.gather(*(b.submit(q, 3 + i % 2) for i, q in enumerate(queries)))
        b.close()
        return results

    results = asyncio.run(main())
    assert sum(calls) == 20 and len(calls) <= 3, calls  # the first alone, the rest gathered while it ran
    for i, (scores, ids) in enumerate(results):
        assert scores.shape == (1, 3 + i % 2) and float(scores[0, 0]) == i
        assert ids.tolist() == [list(range(3 + i % 2))]


def test_the_batcher_refuses_past_its_queue_and_runs_masked_searches_alone():
    calls = []
    release = threading.Event()

    def search(q, k):
        calls.append(q.shape[0])
        release.wait(5)
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search, max_batch=64, max_queue=5)
        first = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.05)  # the first is running; the next ones queue
        queued = [asyncio.ensure_future(b.submit(np.zeros((2, 2), np.float32), 1)) for _ in range(2)]
        masked = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1, run_alone=lambda: "alone"))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(np.zeros((1, 2), np.float32), 1)
        release.set()
        done = await asyncio.gather(first, *queued, masked)
        b.close()
        return done

    done = asyncio.run(main())
    assert calls == [1, 4] and done[-1] == "alone"


def test_search_errors_reach_the_caller_and_the_batcher_goes_on():
    def search(q, k):
        if q[0, 0] < 0:
            raise RuntimeError("boom")
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(-np.ones((1, 2), np.float32), 1)
        result = await b.submit(np.ones((1, 2), np.float32), 2)
        b.close()
        return result

    assert asyncio.run(main())[1].shape == (1, 2)


def test_a_full_queue_is_503_with_retry_after(tmp_path, monkeypatch):
    release = threading.Event()
    original = Collection.search

    def slow_search(self, queries, k, allow_ids=None, filter_=None):
        release.wait(10)  # holds the first search while the others arrive
        return original(self, queries, k, allow_ids, filter_)

    monkeypatch.setattr(Collection, "search", slow_search)
    app = create_app(str(tmp_path), load_in_background=False, limits=Limits(max_queue=2))
    with TestClient(app) as c:
        c.put("/collections/v", json={"dim": 2})
        add(c, "v", [1], [[1, 0]])
        answers = []

        def search():
            answers.append(c.post("/collections/v/search", json={"vectors": [[1, 0]], "k": 1}))

        threads = [threading.Thread(target=search) for _ in range(5)]
        for t in threads:  # one runs, two queue, two are refused
            t.start()
            time.sleep(0.2)
        release.set()
        for t in threads:
            t.join(30)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 503, 503], codes
    refused = [r for r in answers if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue full" in r.json()["detail"] for r in refused)



def test_closing_the_batcher_answers_every_waiting_search():
    from xmodal.serve.batcher import Closed

    release = threading.Event()

    def search(q, k):
        release.wait(5)
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)

    async def main():
        b = MicroBatcher(search)
        running = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(b.submit(np.zeros((1, 2), np.float32), 1))
        await asyncio.sleep(0.01)
        b.close()
        release.set()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(Closed):
            await b.submit(np.zeros((1, 2), np.float32), 1)
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(o, Closed) for o in outcomes), outcomes
