"""The command-line helper shared by sanajax.train, train_ae, distill_sprint and sample.

    _CONFIG = cli.define_config_file("configs/tiny.py", "Config file.")   # --config=FILE --config.a.b=v
    cli.define_flags("Where checkpoints, metrics and samples go (default: workdirs/<config name>).")

    def main(argv):
      train(cli.config_from_flags(), cli.workdir(default=cli.default_workdir()))

    if __name__ == "__main__":
      cli.run(main)

Every CLI gets the same flags (--workdir, --verbose, the multi-host --coordinator / --num_processes /
--process_id / --distributed of sanajax.parallel.distributed), glibc's huge-page malloc tunable (a
re-exec before the flags are parsed, sanajax.hugepage_malloc), quiet library logs, jax.distributed
started before any other JAX call, the --config.* overrides recorded in config.cli_overrides, and
one way to fail: a user error (a bad flag, an unknown config field, a ConfigError listing the bad
fields, a missing workdir) prints ONE line to stderr and exits with code 2, no traceback; with
--verbose the traceback is printed first. Anything else is a bug and keeps its traceback. Ctrl-C
is one line too, exit code 130 (in a training loop: sanajax.training.interrupt).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sanajax import config_utils, hugepage_malloc, parallel
from sanajax.config_check import ConfigError
from sanajax.extras import MissingPackageError
from sanajax.parallel import distributed
from sanajax.paths import url_path_problem
from sanajax.safetensors_io import WeightsError
from sanajax.training.interrupt import RunStopped
from sanajax.workdir.checkpoint import CheckpointSaveError
from sanajax.workdir.files import WorkdirConfigError, run_outputs
from sanajax.workdir.lock import WorkdirLockedError

# What a user can fix by changing the command line, the config, the files it names (a truncated
# weights file) or the machine (another run holds the workdir, the disk is full): one line, exit 2.
USER_ERRORS = (app.UsageError, flags.Error, ConfigError, FileNotFoundError, NotADirectoryError, WorkdirLockedError,
               WeightsError, CheckpointSaveError, MissingPackageError, WorkdirConfigError)
EXIT_USER_ERROR = 2


class UserError(app.UsageError):
  """A mistake in the command line or the files it names, said in one line (exit code 2)."""


def define_flags(workdir_help: str | None = None, *, multihost: bool = True) -> None:
  """--verbose; --workdir when `workdir_help` is given; the multi-host flags
  (sanajax.parallel.distributed.define_flags) unless multihost=False (one-process tools)."""
  if workdir_help is not None:
    flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("verbose", False, "On an error, also print its traceback (by default: one line on stderr).")
  if multihost:
    distributed.define_flags()


def print_run_summary(workdir: str) -> None:
  """Where a finished run left its outputs (workdir.files.run_outputs), one line each, on process 0."""
  if jax.process_index() != 0:
    return
  outputs = run_outputs(workdir)
  width = max((len(label) for label, _ in outputs), default=0)
  print(f"Done. In {os.path.abspath(workdir)}:", flush=True)
  for label, path in outputs:
    print(f"  {label:<{width}}  {path}", flush=True)


def quiet_library_logs() -> None:
  """CLIs show progress bars and results, not Orbax/absl INFO chatter (--verbosity=0 brings it back)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def define_config_file(default: str, help_text: str, name: str = "config") -> Any:
  """config_flags.DEFINE_config_file (locked): --NAME=FILE[:ARG] and --NAME.a.b=v overrides.

  ml_collections applies the overrides on sys.argv while the flag is defined (at import), so an
  override naming no field fails here: one line naming it and the known fields, exit code 2.
  """
  # configs/X.py names the repository's file from any working directory, as config_utils.load_config finds it.
  default = config_utils.resolve_config_file(default)
  for prefix in (f"--{name}=", f"-{name}="):
    sys.argv[1:] = [prefix + config_utils.resolve_config_file(a[len(prefix):]) if a.startswith(prefix) else a
                    for a in sys.argv[1:]]
  define = lambda: config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
  return _define(define, name, lambda: _load_config_file(_argv_value(name) or default))


def _load_config_file(value: str) -> ml_collections.ConfigDict:
  """The config of a --config value FILE[:ARG], without its command-line overrides."""
  path, _, arg = value.partition(":")
  return config_utils.load_config(path, arg or None)


def define_config_dict(config: ml_collections.ConfigDict, help_text: str, name: str = "config") -> Any:
  """config_flags.DEFINE_config_dict (locked): --NAME.a.b=v overrides of `config`; errors as define_config_file."""
  define = lambda: config_flags.DEFINE_config_dict(name, config, help_text, lock_config=True)
  return _define(define, name, lambda: config)


def _define(define: Callable[[], Any], name: str, load: Callable[[], Any]) -> Any:
  try:
    return define()
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    fail(e, message=_unknown_override(sys.argv, {name: load}) or f"a --{name}.* override: {_one_line(e)}")


def _argv_value(name: str) -> str | None:
  """The last --NAME=VALUE of sys.argv (before absl has parsed it)."""
  value = None
  for arg in sys.argv[1:]:
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
  return value


def config_from_flags(name: str = "config") -> ml_collections.ConfigDict:
  """The --config file's config with its --config.a.b=v overrides, the overridden fields noted in
  config.cli_overrides (config_utils.record_overrides: presets derived later leave them alone)."""
  flag = flags.FLAGS[name]
  config = flag.value
  if not isinstance(config, ml_collections.ConfigDict):
    # ml_collections leaves a placeholder that raises the load error on first use.
    filename = getattr(flag, "config_filename", "") or ""
    path = filename.split(":", 1)[0] if not os.path.exists(filename) else filename
    if path and not os.path.exists(path):
      raise UserError(f"--{name}={filename}: no such config file (e.g. --{name}=configs/tiny.py).")
    try:
      config.keys()
    except Exception as e:  # whatever the user's config file raised
      raise UserError(_did_not_load(name, filename, e)) from e
  config = config_utils.record_overrides(config, config_flags.get_override_values(flag))
  if "mesh" in config:  # before anything starts JAX's devices: a CPU host split as the config asks
    try:
      note = parallel.use_cpu_devices(config.mesh)
    except ValueError as e:
      raise UserError(str(e)) from e
    if note:
      print(note, flush=True)
  return config


def default_workdir(name: str = "config") -> str:
  """workdirs/<config file name without .py>, e.g. workdirs/tiny for --config=configs/tiny.py."""
  return os.path.join("workdirs", os.path.splitext(os.path.basename(flags.FLAGS[name].config_filename))[0])


def workdir(default: str | None = None, *, announce: bool = True) -> str:
  """--workdir, else `default`; a UserError when neither is given. Prints the absolute path once."""
  path = flags.FLAGS.workdir or default
  if not path:
    raise UserError("--workdir is required.")
  if problem := url_path_problem(path):
    raise UserError(f"--workdir={path} {problem}.")
  if announce:
    print(f"Workdir: {os.path.abspath(path)}", flush=True)
  return path


def _verbose(argv: list[str] | None = None) -> bool:
  """--verbose, also before the flags are parsed (a flag-parsing error)."""
  if flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose) if "verbose" in flags.FLAGS else False
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in (argv or sys.argv))


def fail(error: BaseException | str, *, message: str | None = None, verbose: bool | None = None) -> None:
  """Prints one line on stderr (`message`, else the error's text), after the error's traceback with
  --verbose, and exits with code 2."""
  if (verbose if verbose is not None else _verbose()) and isinstance(error, BaseException):
    traceback.print_exception(error)
  if message is None:
    message = _one_line(error) if isinstance(error, BaseException) else str(error)
  print(f"{_program()}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _did_not_load(name: str, value: str | None, error: BaseException) -> str:
  """--NAME=VALUE's config file raised `error` (ml_collections wraps what it raised: the __cause__)."""
  return f"--{name}={value}: the config file did not load: {_one_line(error.__cause__ or error)}"


def _one_line(error: BaseException) -> str:
  # KeyError's str() is the repr of its message (quoted); the message itself reads better.
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = " ".join(str(text).split())
  if isinstance(error, (FileNotFoundError, NotADirectoryError)) and not text:
    text = type(error).__name__
  return text or type(error).__name__


def _program() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


_OVERRIDE = re.compile(r"^--?([A-Za-z_]\w*)\.([\w.]+)(=|$)")


def _unknown_override(argv: list[str], configs: dict[str, Callable[[], Any]]) -> str | None:
  """The --NAME.a.b=v override (NAME a key of `configs`, which maps it to a loader of its config)
  naming a field the config has not, said as config_utils.set_field says it (with the known
  fields); None when there is none or the config itself does not load."""
  for arg in argv[1:]:
    m = _OVERRIDE.match(arg)
    if not m or m.group(1) not in configs:
      continue
    try:
      config_utils.field_parent(configs[m.group(1)](), m.group(2))
    except KeyError as e:
      return f"{arg.split('=', 1)[0]}: {_one_line(e)}"
    except Exception:  # noqa: BLE001 (the config did not load: the caller says what the parser said)
      return None
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser), with its errors as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # a config file's get_config raised: its last line says why
      head, _, trace = text.partition("Traceback (most recent call last)")
      text = head.rstrip(": \n") + ": " + [line for line in trace.splitlines() if line.strip()][-1].strip()
    fail(e, message=f"{text} (--helpshort lists the flags)", verbose=_verbose(argv))
  except (AttributeError, KeyError, ValueError, TypeError) as e:  # a --NAME.* override ml_collections refused
    # A config file flag holds no value yet when its overrides fail at parse time (an explicit --config=FILE):
    # its file is loaded again; a config dict flag's default is the config itself.
    def load(name: str) -> Any:
      flag = flags.FLAGS[name]
      if isinstance(flag.value, ml_collections.ConfigDict):
        return flag.value
      source = _argv_value(name) or flag.default
      return source if isinstance(source, ml_collections.ConfigDict) else _load_config_file(source)
    loaders = {name: functools.partial(load, name) for name in flags.FLAGS}
    fail(e, message=_unknown_override(argv, loaders) or f"a --config.* override: {_one_line(e)}",
         verbose=_verbose(argv))
  except OSError as e:  # an override applied to a config file that did not load (ml_collections' placeholder)
    name = next((m.group(1) for a in argv[1:] if (m := _OVERRIDE.match(a)) and _argv_value(m.group(1))), "config")
    fail(e, message=_did_not_load(name, _argv_value(name), e), verbose=_verbose(argv))
  raise AssertionError("unreachable")


def run(main: Callable[[list[str]], Any]) -> None:
  """app.run(main) with the shared start-up (the huge-page tunable, quiet logs, jax.distributed) and the
  one-line user errors."""
  # Each CLI module restarts itself with GLIBC_TUNABLES set at its top, before its imports; this call is for a
  # program built on cli.run that does not (nothing before it may have started devices or done work).
  hugepage_malloc.reexec_with_hugepage_malloc()

  def wrapped(argv: list[str]) -> Any:
    try:
      if len(argv) > 1:
        raise UserError(f"Unexpected arguments: {argv[1:]} (flags are written --name=value).")
      quiet_library_logs()
      if "distributed" in flags.FLAGS:
        try:
          distributed.initialize_from_flags()  # before any other JAX call; a no-op for single-process runs.
        except ValueError as e:
          raise UserError(f"multi-host flags: {e}") from e
      return main(argv)
    except USER_ERRORS as e:
      fail(e)
    except RunStopped as e:  # SIGTERM / Ctrl-C in a training loop, or its data stopped: the steps done were saved
      if _verbose():
        traceback.print_exception(e)
      print(f"{_program()}: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop, or a second one inside it
      if _verbose():
        traceback.print_exception(e)
      print(f"{_program()}: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
      sys.exit(128 + signal.SIGINT)

  app.run(wrapped, flags_parser=parse_flags)
