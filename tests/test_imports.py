"""The layering of docs/architecture.md, checked on the source: imports run one way, with no cycles.

Every `import` / `from ... import` in sanajax/ and experiments/ is read with `ast`, including those
inside function bodies (a lazy import hides a cycle, it does not remove it). Layers, bottom to top:

  0 foundation   sanajax/kernels, sanajax/parallel, dtypes, safetensors_io, config_utils, hugepage_malloc,
                 extras, paths
  1 building     sanajax/models, sanajax/diffusion, sanajax/data, resolution, config_check
  2 workdir      sanajax/workdir
  3 training     sanajax/training
  4 using        generation, sanajax/eval
  5 CLIs         cli, train, train_ae, distill_sprint, sample, convert, info, serve; experiments/

A module may import its own layer or lower ones; within a layer the imports must not form a cycle.
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("sanajax", "experiments")

LAYERS = (
    ("foundation", ("sanajax.kernels", "sanajax.parallel", "sanajax.dtypes", "sanajax.safetensors_io",
                    "sanajax.config_utils", "sanajax")),
    ("building", ("sanajax.models", "sanajax.diffusion", "sanajax.data", "sanajax.resolution",
                  "sanajax.config_check")),
    ("workdir", ("sanajax.workdir",)),
    ("training", ("sanajax.training",)),
    ("using", ("sanajax.generation", "sanajax.eval")),
    ("cli", ("sanajax.cli", "sanajax.train", "sanajax.train_ae", "sanajax.distill_sprint", "sanajax.sample",
             "sanajax.convert", "sanajax.info", "sanajax.serve", "experiments",
             # `python -m sanajax.data.cache` (the name issue 27 gives it): a CLI beside the data code it writes
             # for; it loads models, so it sits in this layer, and nothing below imports it.
             "sanajax.data.cache")),
)


def module_files() -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module of the packages (a package's name is its __init__)."""
  out = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, int, bool]]:
  """(imported project module, line, inside a function) for every import statement in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  found = []

  def resolve(dotted: str) -> str | None:
    while dotted and dotted not in known:
      dotted = dotted.rpartition(".")[0]
    return dotted or None

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      targets = []
      if isinstance(child, ast.Import):
        targets = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # relative: from the module's package
          package = name if is_package else name.rpartition(".")[0]
          for _ in range(child.level - 1):
            package = package.rpartition(".")[0]
          base = f"{package}.{base}" if base else package
        targets = [f"{base}.{a.name}" for a in child.names]  # a submodule, or a name resolve() trims off
      for target in targets:
        if target.split(".")[0] in PACKAGES:
          module = resolve(target)
          if module and module != name:
            found.append((module, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return found


def layer_of(module: str) -> int:
  best, best_len = None, -1
  for i, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
        best, best_len = i, len(prefix)
  if best is None:
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and docs/architecture.md).")
  return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return out


@pytest.fixture(scope="module")
def edges():
  files = module_files()
  known = set(files)
  return {name: imports_of(name, path, known) for name, path in files.items()}


def test_the_cycle_finder_finds_a_hidden_loop():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions(edges):
  graph = {name: {m for m, _, _ in found} for name, found in edges.items()}
  assert cycles(graph) == []


def test_imports_run_down_the_layers(edges):
  upward = [f"{name} (layer {LAYERS[layer_of(name)][0]}) imports {module} (layer {LAYERS[layer_of(module)][0]}) "
            f"at line {line}"
            for name, found in edges.items() for module, line, _ in found if layer_of(module) > layer_of(name)]
  assert upward == []


def test_project_imports_sit_at_the_top_of_their_file(edges):
  inside = [f"{name}:{line} imports {module} inside a function" for name, found in edges.items()
            for module, line, in_function in found if in_function]
  assert inside == []


def test_every_module_has_a_layer(edges):
  for name in edges:
    layer_of(name)


def test_the_pypi_kernels_name_is_free():
  """sanajax's kernels live in the package: no top-level `kernels` folder shadows the PyPI package
  of that name (transformers imports it) when the checkout is the working directory."""
  assert not (ROOT / "kernels").exists()
  assert (ROOT / "sanajax" / "kernels" / "__init__.py").exists()
  assert not any(p.name == "kernels" for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
  assert os.path.isdir(ROOT / "sanajax" / "kernels")
