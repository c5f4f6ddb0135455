"""Media of a collection (``/collections/{name}/media/{path}``): the file, or with ``?size=`` a PNG thumbnail.
Behind the API key like every other path; the search page fetches them with it."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from ..media import media_type
from ..service import Service, service

router = APIRouter()

#: what a media answer may do in a browser that opens it directly: nothing (an SVG or HTML file runs no script)
MEDIA_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox",
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}


# a plain def: FastAPI runs it in its thread pool, so file checks and decoding stay off the event loop
@router.get("/collections/{name}/media/{path:path}")
def media(name: str, path: str, size: Optional[int] = None, svc: Service = Depends(service)):
    col = svc.collection(name)
    full = svc.media.resolve(col.folder, path)
    if size is None:
        return FileResponse(full, media_type=media_type(full), headers=MEDIA_HEADERS)
    return Response(svc.media.thumbnail(full, size), media_type="image/png", headers=MEDIA_HEADERS)
