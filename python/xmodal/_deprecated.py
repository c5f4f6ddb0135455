"""Deprecation aliases: public names that moved, still found at their old place for one release.

``MOVED[old module][name]`` is the module the name now lives in. An old module installs
``__getattr__ = module_getattr(__name__)``; using an old name imports the new module then (not before: the core's
modules never load the demo just by being imported), warns with a ``DeprecationWarning`` naming the new place and
returns the object itself. The new modules are named by string here on purpose: an alias is no import of the
application by the core (tests/test_layout.py checks that the core imports no application). CHANGELOG.md lists
every move.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, Tuple

_SHAPES = ("KINDS", "COLOURS", "SIZES", "POSITIONS", "ATTRIBUTES", "Attributes", "all_attributes", "render", "caption",
           "modification", "vocabulary_words", "random_modification", "ShapesDataset", "ComposedQueries",
           "composed_triples")

MOVED: Dict[str, Dict[str, str]] = {
    "xmodal.data": {name: "xmodal.demo.shapes" for name in _SHAPES},
    "xmodal.train": {
        **{name: "xmodal.demo.training" for name in ("TrainConfig", "build_model", "train")},
        **{name: "xmodal.demo.multitask" for name in ("train_multitask", "AttributeHeads", "ATTRIBUTE_VALUES",
                                                       "attribute_accuracy", "linear_probe")},
        "evaluate": "xmodal.demo.evaluation",
    },
    "xmodal.evaluation": {"evaluate": "xmodal.demo.evaluation", "rerank_report": "xmodal.demo.evaluation"},
    # renamed: it shared its name with the evaluation module xmodal.metrics
    "xmodal": {"METRICS": "xmodal:SEARCH_METRICS"},
    "xmodal.ops": {"METRICS": "xmodal:SEARCH_METRICS"},
}


def new_place(target: str, name: str) -> Tuple[str, str]:
    """(module, name) of a ``MOVED`` target: ``"module"`` (moved, same name) or ``"module:new_name"`` (renamed)."""
    module, _, new_name = target.partition(":")
    return module, new_name or name


def module_getattr(module: str) -> Callable[[str], object]:
    """The ``__getattr__`` of the old module ``module``: resolves its moved names, else ``AttributeError``."""
    moved = MOVED[module]

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, new_name = new_place(moved[name], name)
        how = "has moved to" if new_name == name else "is now"
        warnings.warn(f"{module}.{name} {how} {new}.{new_name}; the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), new_name)

    return __getattr__
