"""Every Python block of the README and of the documentation (docs/**/*.md) runs as a user would run it (in a
fresh process, in a folder holding the files it reads), with smaller sizes where a page shows big ones, so the
examples cannot rot. Blocks that start processes or write files run twice in one folder (a user runs an example
again), and no process a block started may outlive it. Every line of the bash blocks can be pasted as it is."""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
# every page whose code blocks run: the README, then the documentation site's pages
PAGES = {"README.md": README}
PAGES.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))})


def _blocks(language: str) -> list:
    """``(page, number on that page, code)`` for every ```language block of every page."""
    found = []
    for page, text in PAGES.items():
        for number, code in enumerate(re.findall(rf"```{language}\n(.*?)```", text, re.S)):
            found.append((page, number, code))
    return found


def _block_id(page: str, number: int) -> str:
    """A test id -k can select: ``README-0``, ``docs-search-1``."""
    return f"{Path(page).with_suffix('').as_posix().replace('/', '-')}-{number}"


BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")
README_BLOCKS = [code for page, _, code in BLOCKS if page == "README.md"]
# page text -> the size the test runs instead (each must occur on some page, or the table has rotted)
SMALLER = {"1_000_000": "20_000"}
# a block with one of these starts a process or writes files: it must work a second time in the same folder
RERUN_MARKERS = ("subprocess.", ".save(", "checkpoint=")


def _my_data(folder: Path) -> None:
    """my_data/data.csv: 30 small pictures of coloured squares with captions and colour labels (enough for
    the README's 80 / 20 split: 24 to train on, 6 held out)."""
    from PIL import Image

    (folder / "my_data").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    lines = ["image,caption,label"]
    for i in range(30):
        name = list(colours)[i % 3]
        image = Image.new("RGB", (32, 32), (20, 20, 20))
        x, y = i % 15, (i // 2) % 15
        image.paste(colours[name], (2 + x, 2 + y, 14 + x, 14 + y))
        image.save(folder / "my_data" / f"{i}.png")
        lines.append(f"{i}.png,a {name} square number {i},{name}")
    (folder / "my_data" / "data.csv").write_text("\n".join(lines) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user took the id: not ours
        return False
    return True


def _run_block(code: str, folder: Path, name: str, attempt: str) -> None:
    """Runs ``code`` in ``folder`` in a new session; fails if it fails or leaves a process of its session
    running (a server it started and did not stop), and kills such processes."""
    # a one-process torch.distributed group for the sharded example (torchrun would set these)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    # output into a file, not a pipe: a process left running would hold a pipe open, and reading it would wait
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        left_over = False
        try:
            proc.wait(timeout=600)
            left_over = _group_alive(proc.pid)
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(30)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    assert proc.returncode == 0, f"block {name} failed ({attempt} run):\n{code}\n{stderr[-3000:]}"
    assert not left_over, f"block {name} left a process running after it ended ({attempt} run):\n{code}"


def test_the_pages_have_python_blocks_and_the_size_table_applies():
    assert len(BLOCKS) >= 5
    for big in SMALLER:
        assert any(big in text for text in PAGES.values()), f"{big!r} no longer occurs on any page: update SMALLER"
    # the README's three examples: drop-in search, a served index (a block that starts a server, so one of the
    # blocks run twice), training on your own pairs
    assert len(README_BLOCKS) >= 3
    assert any("xmodal.client" in b and "subprocess." in b for b in README_BLOCKS)
    assert any("train_pairs" in b for b in README_BLOCKS)


def test_the_readme_is_a_front_page():
    """The README says what xmodal is, how to set it up and where the docs are; the manual is docs/."""
    assert len(README.splitlines()) <= 160
    assert "bash scripts/setup.sh && .venv/bin/xmodal demo" in README
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q tests" in README  # what .ci/run calls


def test_every_bash_line_can_be_pasted():
    """No usage-line brackets (``[--flag VALUE]``) in what a reader copies: argparse would get them."""
    assert BASH_BLOCKS
    for page, _, block in BASH_BLOCKS:
        for line in block.splitlines():
            command = re.split(r"\s#", line, maxsplit=1)[0]  # the command, not its comment
            assert not re.search(r"\[\s*-", command), f"a bash line of {page} has an optional flag in brackets: {line}"


@pytest.mark.parametrize("page, number", [(page, number) for page, number, _ in BLOCKS],
                         ids=[_block_id(page, number) for page, number, _ in BLOCKS])
def test_block_runs(page, number, tmp_path):
    code = next(c for p, n, c in BLOCKS if (p, n) == (page, number))
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    _my_data(tmp_path)
    name = f"{page} #{number}"
    _run_block(code, tmp_path, name, "first")
    if any(marker in code for marker in RERUN_MARKERS):
        _run_block(code, tmp_path, name, "second")
