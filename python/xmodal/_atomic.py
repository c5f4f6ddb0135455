"""Writing a file so that readers never see it half-written: one helper for every file xmodal writes whole
(checkpoints, saved models, pictures, charts). Index files add an fsync and error rewording (index.py)."""
from __future__ import annotations

import os
from typing import Callable


def write_atomic(path: str, write: Callable[[str], object], suffix: str = "") -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it to ``path``; an interrupted or
    failed write removes the temporary file and leaves any old ``path`` as it was. ``suffix`` ends the
    temporary name (e.g. ``".png"`` for writers that choose the format by extension)."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
