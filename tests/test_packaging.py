"""The kernels folder is stableblocks.kernels only; from the repository root, the top-level name
`kernels` belongs to Hugging Face's package (transformers imports it at start-up). A built wheel
holds every file the package reads."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _environ(*drop: str, **add: str) -> dict:
    """This process's environment without `drop`, with `add`: what a subprocess should see."""
    return {k: v for k, v in os.environ.items() if k not in drop} | add


def _run(cwd, *parts: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `parts` as `python -c` does from `cwd`: cwd first on sys.path."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    env = _environ("TRITON_INTERPRET")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 or not check, out.stderr[-3000:]
    return out


def _run_from_root(*parts: str) -> str:
    return _run(ROOT, *parts).stdout


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Any module loaded from our kernels/ folder under a name other than stableblocks.kernels.* means
# the ops were (or could be) registered twice.
_OURS_ONLY_ONCE = """
    ours = os.path.join(os.getcwd(), "kernels")
    stray = sorted(
        name for name, m in list(sys.modules.items())
        if os.path.dirname(os.path.abspath(getattr(m, "__file__", None) or "")).startswith(ours)
        and not name.startswith("stableblocks.kernels")
    )
    assert not stray, stray
"""


@pytest.mark.skipif(not _has_distribution("kernels"), reason="Hugging Face's kernels is not installed")
def test_top_level_kernels_from_the_root_is_hugging_faces(tmp_path):
    elsewhere = _run(tmp_path, "import os, kernels; print(os.path.abspath(kernels.__file__))", check=False)
    if elsewhere.returncode:  # e.g. beside an older huggingface_hub: it fails wherever it is imported from
        pytest.skip(f"Hugging Face's kernels does not import here: {elsewhere.stderr.strip().splitlines()[-1]}")
    out = _run_from_root(
        """
        import os, sys
        import kernels, stableblocks
        assert os.path.abspath(sys.path[0] or os.getcwd()) == os.getcwd()
        print(os.path.abspath(kernels.__file__))
        """,
        _OURS_ONLY_ONCE,
    )
    path = Path(out.strip().splitlines()[-1])
    assert path.parent != ROOT / "kernels"
    assert path == Path(elsewhere.stdout.strip())


def test_transformers_from_the_root_sees_its_kernels_and_ours_register_once():
    pytest.importorskip("transformers")
    out = _run_from_root(
        """
        import os, sys
        import stableblocks
        import transformers
        from transformers import GPT2LMHeadModel
        from transformers.utils.import_utils import is_kernels_available
        import transformers.integrations.hub_kernels
        import torch
        # Our ops are there, once: registering one again would raise.
        assert hasattr(torch.ops.stableblocks, "fused_attention_fwd")
        print(is_kernels_available(), GPT2LMHeadModel.__name__)
        """,
        _OURS_ONLY_ONCE,
    )
    available, name = out.split()[-2:]
    assert name == "GPT2LMHeadModel"
    assert available == str(_has_distribution("kernels"))


def test_without_hugging_faces_kernels_the_folder_stays_inert():
    out = _run_from_root(
        """
        import importlib.metadata, os, sys
        real = importlib.metadata.distribution
        def distribution(name):
            if name == "kernels":
                raise importlib.metadata.PackageNotFoundError(name)
            return real(name)
        importlib.metadata.distribution = distribution
        import stableblocks
        import kernels
        assert os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(os.getcwd(), "kernels")
        assert not hasattr(kernels, "fused_attention") and not hasattr(kernels, "backend")
        assert not any(n.startswith("kernels.") for n in sys.modules), [n for n in sys.modules if n.startswith("kernels.")]
        print("inert")
        """
    )
    assert out.strip().endswith("inert")


def test_the_wheel_holds_what_the_package_reads_and_builds_without_deprecations(tmp_path):
    # A non-editable install sees only what the wheel holds: the bundled corpus, the GPT-2 BPE file
    # and the kernels as stableblocks.kernels. A build-backend deprecation today is a failed build
    # on a fresh machine once setuptools drops it. The build runs without PYTHONPATH: setuptools loads
    # every installed egg_info writer (Hugging Face's kernels ships one) and a side directory holding
    # an older huggingface_hub breaks that import, which says nothing about this package.
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path,
                          ROOT], capture_output=True, text=True, timeout=300, env=_environ("PYTHONPATH"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Deprecat" not in out.stderr and "BuildBackendWarning" not in out.stderr, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("stableblocks-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
                   check=True, capture_output=True, timeout=300)
    assert not (site / "kernels").exists()
    assert (site / "stableblocks" / "kernels" / "fused_attention_triton.py").is_file()
    env = _environ("TRITON_INTERPRET", PYTHONPATH=str(site))
    code = textwrap.dedent("""
        import stableblocks, stableblocks.kernels
        from stableblocks import data, tokenizer
        assert stableblocks.__file__.startswith(%r), stableblocks.__file__
        assert data.bundled_text().startswith("Ge1:1 In the beginning")
        assert list(tokenizer.get_tokenizer("gpt2").encode("Hello world")) == [15496, 995]
    """ % str(site))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
