"""LoRA training end to end on the smallest model (configs/lora.py): only the adapters train and are
checkpointed, a killed run resumes exactly, the workdir exports to the diffusers layout and samples
with --lora; bad targets are refused before any work."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from test_training import killed_after_checkpoint  # tests/ is on sys.path
from tiny_base import AE_OVERRIDES

from sanajax import config_utils, convert
from sanajax.config_check import ConfigError
from sanajax.models import lora as lora_lib
from sanajax.training import dit as train_lib
from sanajax.workdir.files import prepare_workdir
from sanajax.workdir.loaders import init_dit_params, load_dit_params, load_lora_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {"train.num_steps": 4, "train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 2,
       "train.learning_rate": 1e-2, "lora.r": 2, "lora.lora_alpha": 3.0, "lora.lora_dropout": 0.1,
       "eval.num_prompts": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_ae):
  """A base workdir: the smallest model at 32 px with the shared 2-step AE and random DiT weights (step 0)."""
  root = tmp_path_factory.mktemp("lora_base")
  config = config_utils.load_config("configs/tiny.py", overrides={**AE_OVERRIDES, "ae.workdir": tiny_ae})
  prepare_workdir(str(root / "base"), config)
  params = init_dit_params(config, jax.random.PRNGKey(3))  # boxed, as the trainers save them
  convert._save_params(str(root / "base"), params)
  return str(root / "base"), nn.unbox(params)


def lora_config(base_dir, **overrides):
  return config_utils.load_config("configs/lora.py", base_dir, overrides={**RUN, **overrides})


@pytest.mark.slow  # ~45 s of CPU (3 training runs, 2 CLI subprocesses): over the new-tests budget (tests/conftest.py)
def test_lora_trains_resumes_exports_and_samples(base, tmp_path):
  base_dir, base_params = base
  config = lora_config(base_dir)
  train_lib.train(config, str(tmp_path / "straight"))
  with killed_after_checkpoint(tmp_path / "killed", 2):
    train_lib.train(config, str(tmp_path / "killed"))
  train_lib.train(config, str(tmp_path / "killed"))  # resumes from step 2

  a, b = (load_lora_workdir(str(tmp_path / d)) for d in ("straight", "killed"))
  assert sorted(a) == sorted(lora_lib.target_paths(base_params, lora_lib.SANA_TARGETS)) and len(a) == 10
  for k in a:  # the resumed run's adapters equal the straight run's, bit for bit; and they trained (b != 0)
    np.testing.assert_array_equal(a[k]["a"], b[k]["a"])
    np.testing.assert_array_equal(a[k]["b"], b[k]["b"])
    assert a[k]["alpha"] == 3.0
  assert max(float(np.abs(e["b"]).max()) for e in a.values()) > 0
  # The checkpoint holds the adapters four times (params, EMA, AdamW's two moments) and a few scalars, none of
  # the base's weights. Counted from the arrays orbax stored, not its files: those are mostly metadata at this
  # size, and their total varied with orbax's write timing (543,600 bytes against the base's 537,088 once).
  state_dir = tmp_path / "straight" / "checkpoints" / "4" / "state"
  stored = jax.tree.leaves(ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata)
  stored_bytes = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in stored)
  base_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(base_params))
  adapter_bytes = sum((e["a"].size + e["b"].size) * 4 for e in a.values())
  assert 4 * adapter_bytes <= stored_bytes <= 4 * adapter_bytes + 256 < base_bytes, (stored_bytes, adapter_bytes)
  # The base never changed, and the workdir's DiT is the base with the adapters merged.
  merged = load_dit_params(str(tmp_path / "straight"))
  jax.tree.map(np.testing.assert_array_equal, merged, lora_lib.merge(base_params, a))

  # CLIs: export to the diffusers layout, then sample the base with that file stacked with the workdir.
  out, png = str(tmp_path / "export"), str(tmp_path / "png")
  proc = subprocess.run(
      f"{sys.executable} -m sanajax.convert --to=diffusers-lora --src={tmp_path / 'straight'} --dst={out} && "
      f"{sys.executable} -m sanajax.sample --workdir={base_dir} --lora={out}:0.5 --lora={tmp_path / 'straight'}:0.5 "
      f"--prompt='a red circle' --out={png} --steps=1",
      shell=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert sorted(os.listdir(png)) == ["00000.png", "grid.png"]
  exported = convert.load_lora(out, r=2)
  for k in a:
    for leaf in ("a", "b", "alpha"):
      np.testing.assert_array_equal(exported[k][leaf], a[k][leaf])


def test_bad_targets_and_fields_are_refused_before_any_work(base, tmp_path):
  base_dir, _ = base
  bad = lora_config(base_dir, **{"lora.target_modules": ("to_q", "to_qkv"), "lora.r": 0})
  with pytest.raises(ConfigError) as e:
    train_lib.train(bad, str(tmp_path / "w"))
  text = str(e.value)
  assert "lora.r=0: must be a positive integer" in text
  assert not os.path.exists(tmp_path / "w" / "config.json")
  bad = lora_config(base_dir, **{"lora.target_modules": ("to_q", "to_qkv")})
  with pytest.raises(ConfigError, match=r"'to_qkv' is not a module of this model; valid names: .*conv_point.*to_v"):
    train_lib.train(bad, str(tmp_path / "w"))
  proc = subprocess.run([sys.executable, "-m", "sanajax.convert", "--to=diffusers-lora", f"--src={base_dir}",
                         f"--dst={tmp_path / 'x'}"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "is not a LoRA workdir" in proc.stderr and "Traceback" not in proc.stderr
