"""The state one app serves from, shared by every router: the catalog of collections, whether loading is
done (and the model, if any), the micro-batcher of each collection, the media, the metrics and the limits."""
from __future__ import annotations

import sys
from typing import Dict, Optional

from fastapi import Request

from .batcher import MicroBatcher
from .catalog import Catalog
from .collection import Collection
from .media import Media
from .middleware import Metrics
from .requests import Limits, NotFound, NotReady


class Service:
    def __init__(self, catalog: Catalog, limits: Limits, model_path: Optional[str] = None,
                 media: Optional[Media] = None):
        self.catalog = catalog
        self.limits = limits
        self.model_path = model_path
        self.media = media or Media()
        self.status = {"ready": False, "error": None, "model": None}
        self.batchers: Dict[int, MicroBatcher] = {}
        self.metrics = Metrics(lambda: catalog)

    def load(self, raise_errors: bool) -> None:
        """Load the model (if any) and open every collection; ready only when all of it succeeded."""
        try:
            if self.model_path is not None:
                from ..encoders import CrossModalModel

                self.status["model"] = CrossModalModel.load(self.model_path)
            self.catalog.open_all()
            self.status["ready"] = True
        except Exception as e:  # reported by /ready and on stderr; the service never serves a partial state
            self.status["error"] = f"{type(e).__name__}: {e}"
            print(f"xmodal serve: loading failed: {self.status['error']}", file=sys.stderr, flush=True)
            if raise_errors:
                raise

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
        self.catalog.close()

    def check_ready(self) -> None:
        if not self.status["ready"]:
            raise NotReady()

    def collection(self, name: str) -> Collection:
        self.check_ready()
        try:
            return self.catalog.get(name)
        except KeyError:
            raise NotFound(f"no collection {name!r}") from None

    def batcher(self, col: Collection) -> MicroBatcher:
        b = self.batchers.get(id(col))
        if b is None:
            limits = self.limits
            b = self.batchers[id(col)] = MicroBatcher(
                col.search, max_batch=limits.max_batch, max_wait=limits.batch_wait, max_queue=limits.max_queue,
                on_batch=self.metrics.batch.labels(col.name).observe)
        return b

    def drop_batcher(self, col: Collection) -> None:
        b = self.batchers.pop(id(col), None)
        if b is not None:
            b.close()

    @staticmethod
    def describe(col: Collection) -> dict:
        return {"name": col.name, "size": len(col), **col.config, "trained": col.index.is_trained}


async def service(request: Request) -> Service:
    """The app's :class:`Service`, for routes (``Depends(service)``; async, so it costs no thread hop)."""
    return request.app.state.service
