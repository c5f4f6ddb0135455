"""Every Python block of the README runs as a user would run it (in a fresh process, in a folder holding the
files it reads), with smaller sizes where the README shows big ones, so the examples cannot rot. Blocks that
start processes or write files run twice in one folder (a user runs an example again), and no process a block
started may outlive it. Every line of the bash blocks can be pasted as it is."""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
# README text -> the size the test runs instead (each must occur in the README, or the table has rotted)
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


def _run_block(code: str, folder: Path, number: int, attempt: str) -> None:
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
    assert proc.returncode == 0, f"README block {number} failed ({attempt} run):\n{code}\n{stderr[-3000:]}"
    assert not left_over, f"README block {number} left a process running after it ended ({attempt} run):\n{code}"


def test_the_readme_has_python_blocks_and_the_size_table_applies():
    assert len(BLOCKS) >= 5
    for big in SMALLER:
        assert big in README, f"{big!r} no longer occurs in the README: update SMALLER"
    # the service example starts a server: it is one of the blocks run twice
    assert any("xmodal.client" in b and "subprocess." in b for b in BLOCKS)


def test_every_bash_line_can_be_pasted():
    """No usage-line brackets (``[--flag VALUE]``) in what a reader copies: argparse would get them."""
    assert BASH_BLOCKS
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            command = re.split(r"\s#", line, maxsplit=1)[0]  # the command, not its comment
            assert not re.search(r"\[\s*-", command), f"a README bash line has an optional flag in brackets: {line}"


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number, tmp_path):
    code = BLOCKS[number]
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    _my_data(tmp_path)
    _run_block(code, tmp_path, number, "first")
    if any(marker in code for marker in RERUN_MARKERS):
        _run_block(code, tmp_path, number, "second")
