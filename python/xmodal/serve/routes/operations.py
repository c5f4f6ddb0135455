"""Operations: liveness (``/health``), readiness once loading is done (``/ready``), Prometheus ``/metrics``."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..service import Service, service

router = APIRouter()


@router.get("/health")
def health():
    return {"status": "ok"}


@router.get("/ready")
def ready(svc: Service = Depends(service)):
    status = svc.status
    if status["ready"]:
        return {"status": "ready", "collections": len(svc.catalog.collections), "model": status["model"] is not None}
    if status["error"]:
        return JSONResponse({"status": "failed", "error": status["error"]}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics")
def prometheus(svc: Service = Depends(service)):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
