"""What a workdir holds on disk, by name: config.json, ae_info.json, checkpoints/, the AE folder.

    WORKDIR/config.json        the run's whole config (what sample / eval / resume rebuild it from)
    WORKDIR/checkpoints/STEP/  Orbax checkpoints (sanajax.workdir.checkpoint)
    WORKDIR/ae/                the AE workdir the tiny configs train first (config.ae.workdir overrides)
    WORKDIR/ae_info.json       an AE workdir's latent scaling factor and held-out PSNR
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from sanajax.paths import url_path_problem
from sanajax.workdir.checkpoint import latest_workdir_step

CONFIG_FILE = "config.json"
AE_INFO_FILE = "ae_info.json"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def ae_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The AE workdir a DiT config uses: config.ae.workdir, else WORKDIR/ae."""
  return config.ae.workdir or os.path.join(workdir, "ae")


class WorkdirConfigError(ValueError):
  """The workdir holds checkpoints of a run whose config.model, .ae or .text differs from the given config."""


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates workdir and writes config.json (what sample/eval rebuild the run from).

  A resumed run must use the same config: a changed architecture field would make the restore fail
  later with a much less readable message, so when the workdir holds a checkpoint, the model, ae and
  text sections are checked against its config.json (WorkdirConfigError), and so is the kind of run (a
  model's, an autoencoder's or a converted text encoder's: a DiT run's folder and its ae/ are easily swapped,
  and the restore would fail on the other's state after config.json was overwritten). Without a checkpoint
  there is nothing to resume: a run that stopped before its first one (a missing AE, a bad data path) leaves
  a config.json that the corrected command replaces.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path) and latest_workdir_step(workdir) is not None:
    with open(path) as f:
      old = json.load(f)
    if _kind(old) != _kind(new):  # a DiT run's folder and its AE's are easily swapped on the command line
      raise WorkdirConfigError(_other_kind_of_run(workdir, _kind(old), _kind(new)))
    for section in ("model", "ae", "text"):
      if section in old and section in new and old[section] != new[section]:
        changed = sorted(k for k in set(old[section]) | set(new[section])
                         if old[section].get(k) != new[section].get(k))
        raise WorkdirConfigError(f"{workdir} holds checkpoints of a run with a different config.{section} (fields "
                                 f"{changed}); use a new --workdir or the same config.")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)


# What a workdir's config.json says it holds: a model's run (a `model` section: DiT, MM-DiT, Sprint student,
# LoRA, ControlNet, a converted release), an autoencoder's (`ae`, no model) or a converted text encoder's (only
# `text`, sanajax.convert --from=transformers); the kinds' names as the messages say them.
_KINDS = {"model": "a text-to-image model's", "ae": "an autoencoder's", "text": "a text encoder's"}


def _kind(config: dict) -> str:
  return next((kind for kind in _KINDS if kind in config), "")


def _other_kind_of_run(workdir: str, held: str, new: str) -> str:
  if (held, new) == ("model", "ae"):
    return (f"{workdir} holds checkpoints of a text-to-image model's run, not of an autoencoder's: give the "
            f"autoencoder its own --workdir (a DiT run trains its AE in WORKDIR/ae).")
  if (held, new) == ("ae", "model"):
    owner = _run_owning_ae(workdir)
    where = (f"the model run this AE belongs to is {owner}" if owner else
             f"--config.ae.workdir={workdir} trains the model on this AE")
    return (f"{workdir} holds checkpoints of an autoencoder's run, not of a text-to-image model's: give the model "
            f"its own --workdir ({where}).")
  return (f"{workdir} holds checkpoints of {_KINDS.get(held, 'another kind of')} run, not of "
          f"{_KINDS.get(new, 'this kind of')}: give this run its own --workdir.")


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with; a clear error if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if problem := url_path_problem(workdir):
    raise FileNotFoundError(f"Workdir {workdir} {problem}.")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no {CONFIG_FILE}: it is not a sanajax training workdir.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """load_workdir_config for a workdir that must hold a text-to-image model: a DiT or MM-DiT run, a Sprint
  student, a converted release, a LoRA or ControlNet run (each config has a `model` section). Any other
  workdir, above all the autoencoder's (WORKDIR/ae of the default run), is a FileNotFoundError naming the
  workdir to pass instead, before anything reads a checkpoint."""
  config = load_workdir_config(workdir)
  if "model" in config:
    return config
  if "ae" not in config:
    raise FileNotFoundError(f"{workdir!r} has no model section in its {CONFIG_FILE}: it is not the workdir of a "
                            f"text-to-image model (python -m sanajax.train, sanajax.distill_sprint, sanajax.convert).")
  what = f"{workdir!r} is an autoencoder's workdir, not a text-to-image model's"
  owner = _run_owning_ae(workdir)
  if owner:
    raise FileNotFoundError(f"{what}; the model run it belongs to is {owner}.")
  raise FileNotFoundError(f"{what}: pass a DiT run's workdir (python -m sanajax.train) or a converted model's "
                          f"(python -m sanajax.convert).")


def _run_owning_ae(ae_dir: str) -> str | None:
  """The folder above ae_dir when it holds a model run whose AE workdir is ae_dir (the default layout)."""
  parent = os.path.dirname(os.path.abspath(ae_dir))
  try:
    config = load_workdir_config(parent)
    owns = "model" in config and os.path.abspath(ae_workdir(config, parent)) == os.path.abspath(ae_dir)
  except (OSError, ValueError, AttributeError):  # no readable config.json above, or one without an ae section
    return None
  return parent if owns else None


# What a finished run leaves in its workdir, in the order a user looks for it: (label, path).
RUN_OUTPUTS = (
    ("sample grid", "samples/grid.png"),
    ("GenEval-lite scores", "geneval_lite.json"),
    ("Sprint scores (1/2/4 steps)", "geneval_lite_sprint.json"),
    ("restoration probe", "restoration.json"),
    ("loss curve", "loss.png"),
    ("metrics (one JSON row per log step)", "metrics.jsonl"),
    ("TensorBoard", "tensorboard"),
    ("checkpoints", CHECKPOINT_DIR),
    ("config", CONFIG_FILE),
)


def run_outputs(workdir: str) -> list[tuple[str, str]]:
  """(label, path) of each of RUN_OUTPUTS that exists in workdir (the end-of-run summary)."""
  found = [(label, os.path.join(workdir, name)) for label, name in RUN_OUTPUTS]
  return [(label, path) for label, path in found if os.path.exists(path)]
