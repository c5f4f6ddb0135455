"""The service's routes, one router per concept: collections, vectors, search, and operations (health,
readiness, metrics). :func:`xmodal.serve.create_app` includes them in this order."""
from . import collections, operations, search, vectors

ROUTERS = (collections.router, vectors.router, search.router, operations.router)

__all__ = ["ROUTERS"]
