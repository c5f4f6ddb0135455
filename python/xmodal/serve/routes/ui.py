"""The search page (``/ui``; ``xmodal serve --ui``): plain HTML, JavaScript and CSS shipped in the package, no
build step. The page's own files hold no data, so they answer without the API key (the guard lets ``/ui``
through); everything the page shows it fetches from the API with the key the user gives it."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from ..requests import NotFound

router = APIRouter()

PAGE_FOLDER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ui")
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
#: the page runs only its own script and style and fetches only from this service; it shows images from here,
#: from the blob: URLs it makes of fetched media, and from the http(s) URLs payloads name (the browser loads
#: those itself, without the API key)
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' blob: http: https:; form-action 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@router.get("/ui", include_in_schema=False)
def page():
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/{file:path}", include_in_schema=False)
def ui_file(file: str):
    file = file or "index.html"
    if file not in PAGE_FILES:
        raise NotFound(f"no page file {file!r}")
    with open(os.path.join(PAGE_FOLDER, file), "rb") as f:
        return Response(f.read(), media_type=PAGE_FILES[file], headers=PAGE_HEADERS)
