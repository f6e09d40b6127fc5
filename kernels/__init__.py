"""Functional ops of stableblocks: Triton kernels with plain-PyTorch references beside them.

Every op checks its arguments, then runs its Triton kernel or its reference as the backend
switch decides (see backend.py).
"""

if __name__ == "stableblocks.kernels":
    from .backend import get_backend, load_kernels, set_backend
    from .fused_add_norm import fused_add_norm
    from .fused_attention import fused_attention
    from .fused_embedding import fused_embedding
    from .fused_linear_cross_entropy import fused_linear_cross_entropy
    from .layer_norm import layer_norm

    load_kernels()

    __all__ = ["fused_add_norm", "fused_attention", "fused_embedding", "fused_linear_cross_entropy", "get_backend", "layer_norm", "set_backend"]
else:
    # This folder is installed as stableblocks.kernels only. From a checkout's root (`python -m`,
    # plain `pytest`, a script beside it) it is also found as a top-level `kernels`: the name of
    # Hugging Face's package, which transformers imports at start-up. Loading our ops under that
    # name would register them a second time, and transformers would miss its own package. So
    # the folder hands the name to the installed `kernels` distribution when there is one (the
    # import system returns whatever sys.modules holds once this file has run), and otherwise
    # stays empty.
    def _install_distribution_package(name: str) -> None:
        import importlib.metadata
        import importlib.util
        import sys
        from pathlib import Path

        try:
            init = Path(importlib.metadata.distribution(name).locate_file(f"{name}/__init__.py"))
        except importlib.metadata.PackageNotFoundError:
            return
        if not init.is_file() or init.resolve() == Path(__file__).resolve():
            return
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        ours = sys.modules[name]
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules[name] = ours
            raise

    _install_distribution_package(__name__)
    del _install_distribution_package
