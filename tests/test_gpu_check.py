"""scripts/gpu_check.sh must be able to fail: a wrong interpreter, a failed or timed-out step, each ends in a
non-zero exit and a verdict that says "not verified" instead of deciding. The script runs here with stub
interpreters (small shell scripts), so each test takes seconds; the real dry run takes minutes and is not run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def stub(path, body):
    """An executable shell script standing in for python; gpu_verdict.py (stdlib only) runs for real."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\ncase "$*" in *gpu_verdict.py*) exec "{sys.executable}" "$@" ;; esac\n{body}\n')
    path.chmod(0o755)
    return path


def gpu_check(out, *args, python=None, script=SCRIPTS / "gpu_check.sh", timeout=60, **env):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT", "DEADLINE_S")} | env
    if python is not None:
        env["PYTHON"] = str(python)
    return subprocess.run(["bash", str(script), *args, str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_an_interpreter_without_torch_is_named_up_front(tmp_path):
    python = stub(tmp_path / "bin" / "python", "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1")
    r = gpu_check(tmp_path / "out", python=python)
    assert r.returncode != 0
    assert f"{python} cannot 'import torch'" in r.stderr
    assert "No module named 'torch'" in r.stderr
    assert not (tmp_path / "out" / "verdict.json").exists()


def test_the_dry_run_also_needs_xmodal(tmp_path):
    python = stub(tmp_path / "bin" / "python", 'case "$*" in *xmodal*) exit 1 ;; esac; exit 0')
    r = gpu_check(tmp_path / "out", "--dry-run", python=python)
    assert r.returncode != 0
    assert f"{python} cannot 'import torch, xmodal'" in r.stderr


def test_a_relative_python_is_the_callers(tmp_path):
    stub(tmp_path / "bin" / "python", "exit 1")
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "out"], cwd=tmp_path, capture_output=True, text=True,
                       env=os.environ | {"PYTHON": "bin/python"}, timeout=60)
    assert r.returncode != 0
    assert f"{tmp_path}/bin/python cannot" in r.stderr


def copy_of_scripts(root):
    (root / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_verdict.py"):
        shutil.copy(SCRIPTS / name, root / "scripts" / name)
    return root / "scripts" / "gpu_check.sh"


def test_without_PYTHON_the_repositorys_venv_is_used(tmp_path):
    script = copy_of_scripts(tmp_path / "repo")
    venv_python = stub(tmp_path / "repo" / ".venv" / "bin" / "python", "exit 1")
    r = gpu_check(tmp_path / "out", script=script)
    assert r.returncode != 0
    assert f"{venv_python} cannot 'import torch'" in r.stderr


def test_without_a_venv_python3_is_used(tmp_path):
    script = copy_of_scripts(tmp_path / "repo")
    stub(tmp_path / "bin" / "python3", "exit 1")
    r = gpu_check(tmp_path / "out", script=script, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert r.returncode != 0
    assert "python3 cannot 'import torch'" in r.stderr


def verdict(out):
    return json.loads((out / "verdict.json").read_text())


def test_failed_steps_are_not_verified_and_exit_non_zero(tmp_path):
    # the interpreter passes the up-front check, then every step fails
    python = stub(tmp_path / "bin" / "python", 'case "$1" in -c) exit 0 ;; esac; echo "stub fails: $*"; exit 1')
    r = gpu_check(tmp_path / "out", "--dry-run", python=python)
    assert r.returncode == 1, r.stdout + r.stderr
    v = verdict(tmp_path / "out")
    assert v["verified"] is False
    assert v["failed_steps"] == ["info (exit 1)", "tests (exit 1)", "benchmark (exit 1)"]
    assert v["verified_rows"] == [] and v["auto_never_slower"] is None
    assert "not verified: info (exit 1); tests (exit 1); benchmark (exit 1)" in r.stdout
    # strategies failing their own tests (exit 1) are a result, not a failed step
    assert all(not s["tests_passed"] for s in v["strategies"].values())


def test_a_failed_build_skips_to_a_verdict_that_is_not_verified(tmp_path):
    python = stub(tmp_path / "bin" / "python", 'case "$1" in -c) exit 0 ;; esac; echo "stub fails: $*"; exit 1')
    r = gpu_check(tmp_path / "out", python=python)
    assert r.returncode == 1
    assert verdict(tmp_path / "out")["failed_steps"] == ["build (exit 1)"]
    assert not (tmp_path / "out" / "tests.log").exists()
    assert r.stdout.rstrip().endswith("gpu_check: not verified: build (exit 1)")


def test_a_step_that_times_out_is_not_verified(tmp_path):
    # the main test step hangs; with the deadline spent it gets the script's minimum of 5 s
    python = stub(tmp_path / "bin" / "python",
                  'case "$*" in *"not via_"*) exec sleep 60 ;; *tiny_search.py*) echo ok ;; esac; exit 0')
    r = gpu_check(tmp_path / "out", "--dry-run", python=python, DEADLINE_S="1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert verdict(tmp_path / "out")["failed_steps"] == ["tests (exit 124)"]
    assert "not verified: tests (exit 124)" in r.stdout


def test_an_earlier_runs_outputs_do_not_count(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tests_filtered.log").write_text("10 passed in 1.0s\n")
    python = stub(tmp_path / "bin" / "python", 'case "$1" in -c) exit 0 ;; esac; exit 1')
    gpu_check(out, python=python)
    assert not (out / "tests_filtered.log").exists()


def fake_run(out, failed_steps):
    """The files of a run where "filtered" passed its tests and the sanitizer, and beats naive 2x."""
    out.mkdir()
    if failed_steps is not None:
        (out / "failed_steps.txt").write_text("".join(f"{s}\n" for s in failed_steps))
    (out / "strategies_passed.txt").write_text("filtered\n")
    (out / "tests_filtered.log").write_text("10 passed in 1.0s\n")
    (out / "sanitizer_filtered.log").write_text("ok\n========= ERROR SUMMARY: 0 errors\n")
    case = {"q": 64, "dtype": "float32"}
    seconds = {"naive": 2.0, "xmodal": 1.5, "xmodal[filtered]": 1.0}
    (out / "bench_search.json").write_text(json.dumps({"results": [{"case": case, "seconds": seconds}]}))
    return subprocess.run([sys.executable, str(SCRIPTS / "gpu_verdict.py"), str(out)], capture_output=True,
                          text=True, check=True, timeout=60)


def test_the_verdict_decides_only_for_a_complete_run(tmp_path):
    fake_run(tmp_path / "ok", [])
    v = verdict(tmp_path / "ok")
    assert v["verified"] is True and v["auto_never_slower"] is True
    assert len(v["verified_rows"]) == 1 and "Strategy::Filtered" in v["verified_rows"][0]

    r = fake_run(tmp_path / "timed_out", ["tests_tiled (exit 124)"])
    v = verdict(tmp_path / "timed_out")
    assert v["verified"] is False and v["verified_rows"] == [] and v["auto_never_slower"] is None
    assert v["strategies"]["filtered"]["vs_naive"]  # the measurements stay, for diagnosis
    assert r.stdout.rstrip().endswith("not verified: tests_tiled (exit 124)")

    fake_run(tmp_path / "no_list", None)
    assert verdict(tmp_path / "no_list")["verified"] is False


def test_a_strategy_whose_tiny_search_did_not_finish_is_not_adopted(tmp_path):
    out = tmp_path / "out"
    fake_run(out, [])
    (out / "sanitizer_filtered.log").write_text("Traceback ...\n========= ERROR SUMMARY: 0 errors\n")
    subprocess.run([sys.executable, str(SCRIPTS / "gpu_verdict.py"), str(out)], capture_output=True, check=True)
    assert verdict(out)["verified_rows"] == []
