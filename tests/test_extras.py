"""Features that need a package beyond `pip install -e .` (sanajax.extras): on a plain install each one is one
line naming the feature and the install command, before any work; with the package present it goes on.

The CLI cases run held to what a plain install has (tests/held_site, HELD_SITE=install); the in-process cases
hide one package with `sys.modules[name] = None` (import raises, importlib.util.find_spec finds nothing).
"""
import os
import re
import subprocess
import sys

import pytest
from held import held_env  # tests/held.py (tests/ is on sys.path)
from test_cli import assert_user_error  # tests/test_cli.py: one-line user errors, exit code 2

from sanajax import config_utils, extras
from sanajax.config_check import ConfigError, validate_config
from sanajax.data.sources import TfdsSource, WebDatasetSource
from sanajax.models import quantize
from sanajax.models.gemma2_transformers import load_tokenizer
from sanajax.safetensors_io import read_state_dict
from sanajax.workdir.files import prepare_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_held(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
  """python ARGS in the repository, seeing only a plain install's distributions."""
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False, env=held_env("install", {**os.environ, "JAX_PLATFORMS": "cpu"}))


def test_a_plain_install_has_none_of_the_optional_packages_and_all_of_the_rest():
  """The held plain install hides exactly what setup.py's extras add: every module of extras.PACKAGES (so each
  is truly optional, and the checks below are what a user meets), pytest; the install's own packages stay."""
  code = ("import importlib.metadata, importlib.util, sys\n"
          "from sanajax import extras\n"
          "for m in [*extras.PACKAGES, 'pytest', 'jax', 'flax', 'optax', 'orbax', 'grain', 'array_record',\n"
          "          'ml_collections', 'tensorboardX', 'matplotlib', 'PIL', 'tqdm']:\n"
          "  print(m, importlib.util.find_spec(m) is not None)\n"
          "try:\n"
          "  importlib.metadata.version('qwix')\n"
          "except importlib.metadata.PackageNotFoundError:\n"
          "  print('qwix-metadata', False)\n")
  r = run_held("-c", code)
  assert r.returncode == 0, r.stderr[-3000:]
  seen = dict(line.split() for line in r.stdout.splitlines())
  assert [m for m, found in seen.items() if found == "False"] == [*extras.PACKAGES, "pytest", "qwix-metadata"]


def test_serve_without_gradio_is_one_line_before_loading(tmp_path):
  r = run_held("-m", "sanajax.serve", f"--workdir={tmp_path / 'not_loaded'}")
  assert assert_user_error(r) == ("sanajax.serve: error: python -m sanajax.serve needs gradio, which is not installed: "
                               "pip install -e '.[serve]'.")


def test_a_tfds_source_without_tensorflow_datasets_fails_the_config_check(tmp_path):
  """Named with the other bad fields before the workdir is made (it used to fail after the AE had started)."""
  workdir = tmp_path / "w"
  r = run_held("-m", "sanajax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
               "--config.data.source=tfds:mnist")
  assert assert_user_error(r) == (
      "sanajax.train: error: 1 bad config field: data.source='tfds:mnist': a tfds: source needs tensorflow-datasets, "
      "which is not installed: pip install -e '.[data]' (TensorFlow itself is not needed).")
  assert not workdir.exists()


def test_each_feature_names_its_package_and_goes_on_when_it_is_there(tmp_path, monkeypatch):
  (tmp_path / "bins").mkdir()
  (tmp_path / "bins" / "pytorch_model.bin").write_bytes(b"")
  config = config_utils.load_config("configs/tiny.py", overrides={"data.source": "tfds:mnist"})
  features = {  # module -> (the feature's call, its error)
      "qwix": (lambda: quantize.check_mode("int8"),
               "quantize=int8 needs qwix, which is not installed: pip install -e '.[quantize]'."),
      "tensorflow_datasets": (lambda: TfdsSource("mnist", "train", 32, data_dir=str(tmp_path / "tfds")),
                              "data source tfds:mnist needs tensorflow-datasets, which is not installed: "
                              "pip install -e '.[data]' (TensorFlow itself is not needed)."),
      "transformers": (lambda: load_tokenizer(str(tmp_path)),
                       f"The tokenizer in {tmp_path} needs transformers, which is not installed: "
                       "pip install -e '.[weights]'."),
      "torch": (lambda: read_state_dict(str(tmp_path / "bins")),
                f"Reading {tmp_path / 'bins'}'s .bin weights (re-saved as safetensors they need nothing) needs "
                "torch, which is not installed: pip install torch (the CPU build is enough)."),
  }
  assert sorted(features) == sorted(set(extras.PACKAGES) - {"gradio"})  # gradio: the serve CLI test above
  for module, (call, message) in features.items():
    with monkeypatch.context() as m:
      m.setitem(sys.modules, module, None)
      with pytest.raises(extras.MissingPackageError, match=f"^{re.escape(message)}$"):
        call()
    try:  # the test extras install every one: the call gets past the check (and may fail later, on the data)
      call()
    except Exception as e:  # noqa: BLE001
      assert not isinstance(e, extras.MissingPackageError), e
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ConfigError, match=re.escape("data.source='tfds:mnist': a tfds: source needs "
                                                    "tensorflow-datasets, which is not installed")):
      validate_config(config, "dit")
  validate_config(config, "dit")


def test_a_webdataset_glob_matching_only_folders_names_the_shards_pattern(tmp_path):
  """`webdataset:/data/shards` (the folder, not its tars) is a config error naming the glob to write; the
  source itself finds no shard in it (it used to open the folder as a tar: IsADirectoryError)."""
  (tmp_path / "shards").mkdir()
  config = config_utils.load_config("configs/tiny.py", overrides={"data.source": f"webdataset:{tmp_path}/shards"})
  with pytest.raises(ConfigError, match=re.escape(f"matches only folders: name the shards in them, e.g. "
                                                  f"webdataset:{tmp_path}/shards/*.tar")):
    validate_config(config, "dit")
  with pytest.raises(FileNotFoundError, match="matches no file"):
    WebDatasetSource(f"{tmp_path}/shards", 32)


def test_a_released_tokenizer_without_transformers_is_asked_for_before_loading(tmp_path, monkeypatch):
  """A converted SANA / SD3 workdir's tokenizer needs transformers: sampling says so before the weights load (the
  workdir here holds only its config.json, so getting as far as loading would be another error), and so does the
  config check of a run."""
  config = config_utils.load_config("configs/tiny.py", overrides={"text.kind": "gemma2"})
  prepare_workdir(str(tmp_path / "converted"), config)
  r = run_held("-m", "sanajax.sample", f"--workdir={tmp_path / 'converted'}", "--prompt=a cat", f"--out={tmp_path / 'o'}")
  assert assert_user_error(r) == ("sanajax.sample: error: text.kind='gemma2' (a released model's tokenizer) needs "
                                  "transformers, which is not installed: pip install -e '.[weights]'.")
  for kind in ("gemma2", "sd3"):
    with monkeypatch.context() as m:
      m.setitem(sys.modules, "transformers", None)
      with pytest.raises(ConfigError, match=re.escape(f"text.kind='{kind}' (a released model's tokenizer) needs "
                                                      "transformers")):
        validate_config(config_utils.load_config("configs/tiny.py", overrides={"text.kind": kind}), "dit")
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "transformers", None)
    validate_config(config_utils.load_config("configs/tiny.py"), "dit")  # the tiny encoder needs no tokenizer package
