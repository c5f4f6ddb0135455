"""Every Python block of the README runs as a user would run it (in a fresh process, in a folder holding the
files it reads), with smaller sizes where the README shows big ones, so the examples cannot rot."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
# README text -> the size the test runs instead (each must occur in the README, or the table has rotted)
SMALLER = {"1_000_000": "20_000"}


def _my_data(folder: Path) -> None:
    """my_data/data.csv: 12 small pictures of coloured squares with captions and colour labels."""
    from PIL import Image

    (folder / "my_data").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    lines = ["image,caption,label"]
    for i in range(12):
        name = list(colours)[i % 3]
        image = Image.new("RGB", (32, 32), (20, 20, 20))
        image.paste(colours[name], (4 + i, 4 + i // 2, 16 + i, 16 + i // 2))
        image.save(folder / "my_data" / f"{i}.png")
        lines.append(f"{i}.png,a {name} square number {i},{name}")
    (folder / "my_data" / "data.csv").write_text("\n".join(lines) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_python_blocks_and_the_size_table_applies():
    assert len(BLOCKS) >= 5
    for big in SMALLER:
        assert big in README, f"{big!r} no longer occurs in the README: update SMALLER"


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number, tmp_path):
    code = BLOCKS[number]
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    _my_data(tmp_path)
    # a one-process torch.distributed group for the sharded example (torchrun would set these)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README block {number} failed:\n{code}\n{done.stderr[-3000:]}"
