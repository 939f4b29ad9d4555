"""Loading configs: `configs/*.py` files with `get_config(arg)`, as big_vision does.

CLIs use `ml_collections.config_flags` (`--config=configs/tiny.py:ARG --config.train.num_steps=10`);
tests and notebooks call `load_config(path, arg, overrides)`, which goes through the same code.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

REPO_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_sibling(config_file: str, name: str):
  """Imports configs/NAME.py next to `config_file` (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py")
  spec = importlib.util.spec_from_file_location(f"sanajax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_path(name_or_path: str) -> str:
  """Accepts 'tiny', 'configs/tiny.py' (from any working directory) or any path to a config file."""
  if os.path.exists(name_or_path):
    return name_or_path
  file = name_or_path if name_or_path.endswith(".py") else name_or_path + ".py"
  for candidate in (os.path.join(REPO_CONFIG_DIR, file), os.path.join(os.path.dirname(REPO_CONFIG_DIR), file)):
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(f"No config file {name_or_path!r} (looked in the working directory and {REPO_CONFIG_DIR}).")


def resolve_config_file(value: str) -> str:
  """A --config value FILE[:ARG] with FILE found as config_path finds it (the working directory, then the
  repository's configs/), so `--config=configs/tiny.py` works from any directory; unchanged when FILE is
  nowhere (the caller says so)."""
  path, sep, arg = value.partition(":")
  try:
    return os.path.abspath(config_path(path)) + sep + arg if not os.path.exists(path) else value
  except FileNotFoundError:
    return value


def load_config(name_or_path: str, arg: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads a config file and applies dotted overrides, e.g. {"train.num_steps": 10}.

  An override naming a field the config does not have is an error, as on the command line.
  """
  if ":" in name_or_path and arg is None and not os.path.exists(name_or_path):
    name_or_path, arg = name_or_path.split(":", 1)
  path = config_path(name_or_path)
  spec = importlib.util.spec_from_file_location("sanajax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  for key, value in (overrides or {}).items():
    set_field(config, key, value)
  return record_overrides(config, overrides or {})


def record_overrides(config: ml_collections.ConfigDict, dotted_keys) -> ml_collections.ConfigDict:
  """Notes the fields set on the command line (or by load_config's overrides) in config.cli_overrides.

  Fields derived later from other fields (resolution.apply_resolution's presets) leave the ones
  named here alone, so an explicit `--config.train.batch_size=8` wins over the preset's. CLIs pass
  `config_flags.get_override_values(FLAGS["config"])` (a flat {dotted name: value}); only its keys
  are used. Returns `config` (in place) for chaining.
  """
  with config.unlocked():
    config.cli_overrides = sorted(set(config.get("cli_overrides", ())) | set(dotted_keys))
  return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets config.a.b.c = value, refusing unknown fields with the list of known ones."""
  node, leaf = field_parent(config, dotted)
  node[leaf] = value


def field_parent(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config.a.b, "c") for "a.b.c"; a KeyError naming the unknown field and the known ones (what
  set_field and the CLIs' override check say)."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise KeyError(f"Unknown config field {'.'.join(parents[:i + 1])!r}; known: {sorted(node.keys())}")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"Unknown config field {dotted!r}; known fields of {'.'.join(parents) or 'config'}: "
                   f"{sorted(node.keys())}")
  return node, leaf
