"""argparse ``type=`` functions shared by the ``xmodal`` commands (``xmodal.cli``) and the applications that add
their own options to it (``xmodal demo recommend``): a bad value ends in the usage line and one error line
naming the option (exit 2)."""
from __future__ import annotations

import argparse
import os


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def bench_device(text: str) -> str:
    """cpu, or cuda / cuda:N where this process sees that GPU and xmodal was built with CUDA kernels."""
    if text == "cpu":
        return text
    kind, _, number = text.partition(":")
    if kind != "cuda" or not (number == "" or number.isdigit()):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    import torch

    import xmodal

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA GPU is visible to torch")
    if number and int(number) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    if not xmodal.build_info()["cuda"]:
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but xmodal was built without CUDA kernels")
    return text


def output_file(text: str) -> str:
    """A path to write a report to: its folder must exist (else the run would fail after its first case)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {folder!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a folder")
    return text


def existing_folder(text: str) -> str:
    """A folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text
