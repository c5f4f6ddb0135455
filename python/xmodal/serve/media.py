"""Media: the images a collection's payloads name (``{"image": "cats/001.jpg"}``), served read-only from the
collection's own ``media/`` folder (what :func:`~xmodal.serve.write_collection` copies in) or else from the
service's ``--media`` folder, with small thumbnails made once and kept in memory.

A path from a request never leaves its folder: absolute paths, ``..`` segments, and links that lead outside are
refused, and only regular files are served."""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from typing import Optional

from .requests import NotFound, Unprocessable

#: thumbnail edge lengths a request may ask for (pixels)
THUMBNAIL_SIZES = range(16, 1025)
#: the largest picture a thumbnail is made of (pixels): a bigger one is refused before it is decoded
MAX_PIXELS = 64 << 20
#: at most this many pictures are decoded at once, whatever the number of requests asking
DECODES_AT_ONCE = 2
#: what a response may call itself; anything else is served as bytes the browser will not render
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}


class Media:
    """Where each collection's media live, and an in-memory LRU of the thumbnails made from them (bounded by
    ``cache_bytes``; a changed file makes a new entry, as its size and modification time are in the key)."""

    def __init__(self, root: Optional[str] = None, cache_bytes: int = 64 << 20):
        if root is not None and not os.path.isdir(root):
            raise ValueError(f"the media folder {root!r} is not a folder")
        self.root = None if root is None else os.path.realpath(root)
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[tuple, bytes]" = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(DECODES_AT_ONCE)

    def folder(self, collection_folder: str) -> Optional[str]:
        """The collection's own ``media/`` folder when it has one, else the service's media folder (or None)."""
        own = os.path.join(collection_folder, "media")
        return os.path.realpath(own) if os.path.isdir(own) else self.root

    def resolve(self, collection_folder: str, path: str) -> str:
        """The real path of ``path`` inside the collection's media folder; 404 for anything that is not a
        regular file there, 422 for a path that tries to leave it."""
        folder = self.folder(collection_folder)
        if folder is None:
            raise NotFound("this collection has no media folder (write_collection(..., media=...) or --media)")
        parts = path.replace("\\", "/").split("/")
        if not path or path.startswith(("/", "\\")) or "\0" in path or ".." in parts:
            raise Unprocessable("path", "a media path is relative to the media folder, without '..'", path)
        full = os.path.realpath(os.path.join(folder, *parts))
        if os.path.commonpath([full, folder]) != folder:
            raise Unprocessable("path", "the media path leads outside the media folder", path)
        if not os.path.isfile(full):
            raise NotFound(f"no media file {path!r}")
        return full

    def thumbnail(self, full: str, size: int) -> bytes:
        """PNG bytes of the image at ``full`` scaled to fit ``size`` x ``size`` (never enlarged)."""
        if size not in THUMBNAIL_SIZES:
            raise Unprocessable("size", f"a thumbnail size in [{THUMBNAIL_SIZES.start}, {THUMBNAIL_SIZES.stop - 1}]",
                                size)
        stat = os.stat(full)
        key = (full, stat.st_size, stat.st_mtime_ns, size)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        with self._decoding:
            data = _scaled_png(full, size)
        with self._lock:
            if key not in self._cache and len(data) <= self.cache_bytes:
                self._cache[key] = data
                self._cached += len(data)
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data


def media_type(full: str) -> str:
    return IMAGE_TYPES.get(os.path.splitext(full)[1].lower(), "application/octet-stream")


def _scaled_png(full: str, size: int) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(full) as im:  # reads the header only: the size is known before any pixel is decoded
            if im.width * im.height > MAX_PIXELS:
                raise Unprocessable("path", f"a picture of at most {MAX_PIXELS} pixels for a thumbnail",
                                    f"{os.path.basename(full)} ({im.width} x {im.height})")
            im.thumbnail((size, size))
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA")
            out = io.BytesIO()
            im.save(out, format="PNG")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise Unprocessable("path", f"not a readable image ({e})", os.path.basename(full)) from None
    return out.getvalue()
