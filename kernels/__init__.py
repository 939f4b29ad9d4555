"""Kernels for sanajax, importable as `sanajax.kernels`.

Every kernel has a pure-jnp reference with the same signature; `impl` picks one.
"""
if __name__ == "sanajax.kernels":
  from sanajax.kernels.linear_attention import (linear_attention, linear_attention_reference,
                                                linear_attention_vjp_only)

  __all__ = ["linear_attention", "linear_attention_reference", "linear_attention_vjp_only"]
else:
  # Found as the top-level package `kernels`: the repository root is on sys.path (`python -m ...`
  # or `python -m pytest` in a checkout puts the working directory first). That name belongs to
  # the PyPI package `kernels` (Hugging Face's, which transformers 5.25 requires and imports), so this
  # folder hands the import over to it instead of shadowing it.
  import importlib.machinery as _machinery
  import importlib.util as _util
  import os as _os
  import sys as _sys

  _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
  _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
  _spec = _machinery.PathFinder.find_spec(__name__, _path)
  if _spec is None:
    raise ImportError(f"No module named {__name__!r} outside the sanajax checkout {_root} (sanajax's own kernels "
                      "are `sanajax.kernels`; the PyPI package `kernels` is not installed).")
  _module = _util.module_from_spec(_spec)
  # The import system returns whatever sys.modules holds under the name once this file has run.
  _sys.modules[__name__] = _module
  _spec.loader.exec_module(_module)
