"""Holds a Python process to one set of installed distributions, as if the rest were not installed.

With this folder on PYTHONPATH, Python imports this file at start-up (site's `sitecustomize` hook); from then
on, a top-level module that only distributions outside the held set provide is absent. `HELD_SITE` names the set:

- `install`: what `pip install -e .` installs (sanajax's own requirements and theirs, no extra), plus pip and
  setuptools. tests/test_learning.py runs the README's first command so: a module of an extra (qwix, torch,
  gradio) imported on the default's path fails there as it would on a fresh machine.
- `gpu_image`: the lent GPU machines' image (benchmarks/gpu_image/packages.txt and the image's own
  dependencies) plus what the device call carries (benchmarks/wheels.txt). tests/test_benchmarks.py runs the
  prepared call's smoke plan so, so a step that would fail on the GPU for a missing package fails in CI first:

      PYTHONPATH=tests/held_site HELD_SITE=gpu_image bash benchmarks/run_all.sh --budget=420 --smoke --out=/tmp/R.md

Modules of no installed distribution (the standard library, tests/, benchmarks/) and sanajax itself pass.
"""
import importlib.abc
import importlib.metadata
import os
import re
import sys

from packaging.requirements import Requirement  # imported before anything is hidden (the image has it too)

_BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: "ml_collections" and "ML-Collections" are one


def _names(path: str) -> set[str]:
  """The distribution names of a list file: whitespace-separated, '#' comments, '==' pins dropped."""
  with open(path) as f:
    words = " ".join(line.split("#", 1)[0] for line in f).split()
  return {_normalise(word.split("==")[0]) for word in words}


class Hidden(importlib.abc.MetaPathFinder):
  """One of sys.meta_path's finders, blind to the top-level modules in `modules` (and their submodules) and to
  the distributions in `distributions`.

  Every finder is wrapped, so a hidden package is absent as it is on the device: `import` raises
  ModuleNotFoundError, importlib.util.find_spec returns None and importlib.metadata finds no distribution
  (libraries probe optional packages in all three ways)."""

  def __init__(self, inner, modules: frozenset[str], distributions: frozenset[str]):
    self.inner, self.modules, self.distributions = inner, modules, distributions

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in self.modules or not hasattr(self.inner, "find_spec"):
      return None
    return self.inner.find_spec(name, path, target)

  def find_distributions(self, *args, **kwargs):
    if not hasattr(self.inner, "find_distributions"):
      return iter(())
    return (d for d in self.inner.find_distributions(*args, **kwargs)
            if _normalise(d.metadata["Name"] or "") not in self.distributions)

  def invalidate_caches(self):
    if hasattr(self.inner, "invalidate_caches"):
      self.inner.invalidate_caches()


def with_requirements(names: set[str]) -> set[str]:
  """`names` and every installed distribution they require, transitively (extras left out), as found here.

  For the GPU image: it comes with its packages' own dependencies, whose names and versions need not be this
  environment's (huggingface_hub 2.x here needs httpx2, the image's 1.33 does not); those stay visible."""
  installed = {_normalise(d.metadata["Name"] or ""): d for d in importlib.metadata.distributions()}
  seen, todo = set(), [n for n in names if n in installed]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in installed[name].requires or ():
      requirement = Requirement(line)
      if (requirement.marker is None or requirement.marker.evaluate({"extra": ""})) \
          and _normalise(requirement.name) in installed:
        todo.append(_normalise(requirement.name))
  return names | seen


def held_set(name: str) -> set[str]:
  """The distributions HELD_SITE=name leaves visible (normalised names)."""
  if name == "install":  # sanajax's requirements are followed, its extras are not
    return with_requirements({"sanajax"}) | {"pip", "setuptools"}
  if name == "gpu_image":  # only the image's requirements are followed: the wheels go in with --no-deps
    return (with_requirements(_names(os.path.join(_BENCHMARKS, "gpu_image", "packages.txt")))
            | _names(os.path.join(_BENCHMARKS, "wheels.txt")) | {"sanajax"})
  raise SystemExit(f"HELD_SITE={name!r}: must be 'install' or 'gpu_image' (tests/held_site/sitecustomize.py).")


def hide_all_but(allowed: set[str]) -> None:
  """Wraps every finder on sys.meta_path so that only `allowed` distributions (and no-distribution modules) exist."""
  modules = frozenset(module for module, owners in importlib.metadata.packages_distributions().items()
                      if not any(_normalise(owner) in allowed for owner in owners))
  distributions = frozenset(_normalise(d.metadata["Name"] or "") for d in importlib.metadata.distributions()) - allowed
  sys.meta_path[:] = [Hidden(finder, modules, distributions) for finder in sys.meta_path]


hide_all_but(held_set(os.environ.get("HELD_SITE", "")))
