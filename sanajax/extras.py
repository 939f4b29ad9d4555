"""Optional packages: what a feature needs beyond `pip install -e .`, and one clear error when it is missing.

A plain install trains, samples, converts and evaluates. A few features need a package of an extra
(setup.py's extras_require) or one the user installs: they ask here before any work starts, and a missing
package is one line naming the feature and the command that installs it (the CLIs print it and exit 2).
tests/test_learning.py runs the README's first command with only the plain install's packages visible
(tests/held_site), so a feature of the default that imports one of these unasked fails there.
"""
from __future__ import annotations

import importlib.util

# Top-level module -> (its distribution, how to install it).
PACKAGES = {
    "qwix": ("qwix", "pip install -e '.[quantize]'"),
    "gradio": ("gradio", "pip install -e '.[serve]'"),
    "tensorflow_datasets": ("tensorflow-datasets", "pip install -e '.[data]' (TensorFlow itself is not needed)"),
    "transformers": ("transformers", "pip install -e '.[weights]'"),
    "torch": ("torch", "pip install torch (the CPU build is enough)"),
}


class MissingPackageError(ImportError):
  """A feature's optional package is not installed; the message names the feature and the install command."""


def missing_package(module: str, feature: str) -> str | None:
  """The one-line error for `feature` when `module` (a key of PACKAGES) cannot be imported here, else None."""
  distribution, install = PACKAGES[module]
  if importlib.util.find_spec(module) is not None:
    return None
  return f"{feature} needs {distribution}, which is not installed: {install}."


def require(module: str, feature: str) -> None:
  """MissingPackageError (see missing_package) when `module` cannot be imported here."""
  if message := missing_package(module, feature):
    raise MissingPackageError(message)
