"""The kernels folder is stableblocks.kernels only: a top-level `kernels` import must stay inert."""

import importlib
import sys
from pathlib import Path

import stableblocks.kernels


def test_top_level_kernels_import_is_inert(monkeypatch):
    # transformers imports any top-level `kernels` (Hugging Face's package) it can find; from a
    # checkout's root that is this folder, which must not load and register the ops a second time.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    top = importlib.import_module("kernels")
    assert Path(top.__file__).parent == Path(stableblocks.kernels.__file__).parent
    assert not hasattr(top, "fused_attention") and not hasattr(top, "backend")
    assert not any(name.startswith("kernels.") for name in sys.modules)


def test_transformers_does_not_take_it_for_hugging_faces_kernels(monkeypatch):
    transformers = __import__("pytest").importorskip("transformers")
    from transformers.utils.import_utils import is_kernels_available

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    assert not is_kernels_available()
    assert transformers.GPT2LMHeadModel is not None
