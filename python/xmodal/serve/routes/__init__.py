"""The service's routes, one router per concept: collections, vectors, search, media, and operations (health,
readiness, metrics), which :func:`xmodal.serve.create_app` includes in this order; and the search page
(:mod:`.ui`), included when asked for."""
from . import collections, media, operations, search, ui, vectors

ROUTERS = (collections.router, vectors.router, search.router, media.router, operations.router)
UI_ROUTER = ui.router

__all__ = ["ROUTERS", "UI_ROUTER"]
