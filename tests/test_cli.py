"""The CLIs' promises: a whole config checked before any work, every bad field named at once, and user
errors as one line on stderr with exit code 2 (a traceback only with --verbose); sampling options that
would be silently wrong refused before any model loads.

Most tests run a CLI as a subprocess on a workdir that holds only config.json (sanajax.workdir.files.
prepare_workdir): the checks under test come before any checkpoint is read, so no training is needed.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from small_configs import SMALLEST_MODEL  # tests/small_configs.py (tests/ is on sys.path)
from tiny_base import AE_OVERRIDES

from sanajax import config_utils, convert
from sanajax.config_check import ConfigError, validate_config
from sanajax.generation import Generator
from sanajax.training.sprint import load_teacher
from sanajax.training.sprint_config import check_teacher
from sanajax.workdir.files import load_model_workdir_config, prepare_workdir
from sanajax.workdir.loaders import check_adapter_source, check_init_source, load_adapter, load_dit_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, devices: int | None = None, timeout: int = 120, cwd: str = REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if devices:
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  start = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                     env=env, check=False)
  r.seconds = time.perf_counter() - start
  return r


def error_lines(r) -> list[str]:
  """stderr's non-empty lines (absl may warn on stderr before the error; none is expected here)."""
  return [line for line in r.stderr.splitlines() if line.strip()]


def assert_user_error(r, *needles):
  """Exit code 2, exactly one line on stderr, no traceback, every needle in that line."""
  lines = error_lines(r)
  assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
  assert len(lines) == 1, r.stderr
  assert "Traceback" not in r.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """{"flow": a plain DiT workdir, "sprint": a Sprint student's}, each holding only config.json."""
  root = tmp_path_factory.mktemp("cli")
  small = {"data.resolution": 32, **SMALLEST_MODEL}
  out = {}
  for name, config_file in (("flow", "configs/tiny.py"), ("sprint", "configs/sprint_tiny.py")):
    out[name] = str(root / name)
    prepare_workdir(out[name], config_utils.load_config(config_file, overrides=small))
  return out


# ------------------------------------------------------------------------------ validate_config


def tiny(**overrides):
  return config_utils.load_config("configs/tiny.py", overrides=overrides)


def problems(config, kind):
  with pytest.raises(ConfigError) as info:
    validate_config(config, kind)
  return info.value.problems


def test_the_shipped_configs_are_valid(tmp_path):
  validate_config(tiny(), "dit")
  validate_config(config_utils.load_config("configs/dcae_tiny.py"), "ae")
  validate_config(config_utils.load_config("configs/sprint_tiny.py", overrides={"teacher_workdir": str(tmp_path)}),
                  "sprint")
  validate_config(config_utils.load_config("configs/sana_600m.py:512", overrides={"data.source": f"folder:{tmp_path}"}),
                  "dit")


def test_every_bad_field_is_named_at_once_with_what_it_may_be(tmp_path):
  config = tiny(**{"train.batch_size": 0, "train.checkpoint_every": 0, "train.log_every": -1,
                   "train.learning_rate": float("nan"), "train.ema_decay": 1.0, "train.optimizer": "sgd",
                   "eval.num_prompts": -1, "sample.sampler": "ddim", "sample.steps": 0, "sample.cfg": float("inf"),
                   "data.source": f"folder:{tmp_path / 'nope'}", "model.dtype": "fp8", "mesh.fsdp": 0,
                   "ae_train.keep_checkpoints": 0, "data.max_image_megapixels": 0.0})
  got = problems(config, "dit")
  expected = {
      "train.batch_size=0": "must be a positive integer",
      "train.checkpoint_every=0": "must be a positive integer",
      "train.log_every=-1": "must be a positive integer",
      "train.learning_rate=nan": "> 0",
      "train.ema_decay=1.0": "[0, 1)",
      "train.optimizer='sgd'": "adamw, came, muon",
      "eval.num_prompts=-1": ">= 0",
      "sample.sampler='ddim'": "flow_dpm, flow_euler, scm",
      "sample.steps=0": "must be a positive integer",
      "sample.cfg=inf": "finite",
      "data.source='folder:": "does not exist",
      "model.dtype='fp8'": "bfloat16, float16, float32",
      "mesh.fsdp=0": "-1",
      "ae_train.keep_checkpoints=0": "must be a positive integer",
      "data.max_image_megapixels=0.0": "> 0",
  }
  for field, why in expected.items():
    line = [p for p in got if p.startswith(field)]
    assert len(line) == 1 and why in line[0], (field, got)
  assert len(got) == len(expected), got
  assert "15 bad config fields: train.batch_size=0: must be a positive integer; " in str(ConfigError(got))


def test_resolution_must_fit_the_ae_and_the_patch():
  assert problems(tiny(**{"data.resolution": 40}), "dit") == [
      "data.resolution=40: must be a multiple of the AE downsampling 8 x model.patch_size 2 = 16"]
  validate_config(tiny(**{"data.resolution": 40, "model.patch_size": 1}), "dit")
  # A preset table without the resolution (SANA's configs) says which ones it has.
  sana = config_utils.load_config("configs/sana_600m.py:512", overrides={"data.source": "shapes"})
  with sana.unlocked():
    sana.data.resolution = 333
  assert "No preset for data.resolution=333" in problems(sana, "dit")[0]


def test_profile_steps_and_sample_prompts_are_checked():
  validate_config(tiny(**{"train.profile_steps": (11, 13), "ae_train.profile_steps": (1, 1),
                          "train.sample_prompts": ("a red circle",)}), "dit")
  for bad in [(0, 3), (5, 4), (9_999, 10_001), (1, 2, 3), ("a", "b")]:
    assert problems(tiny(**{"train.profile_steps": bad}), "dit") == [
        f"train.profile_steps={bad!r}: must be () or (first, last) with 1 <= first <= last <= train.num_steps, "
        f"e.g. (11, 13)"], bad
  assert problems(tiny(**{"train.sample_prompts": ("a red circle", " ")}), "dit") == [
      "train.sample_prompts=('a red circle', ' '): must be a tuple of non-empty prompts, or () for the held-out "
      "shapes prompts"]


def test_a_url_where_a_folder_goes_is_refused_with_the_mount_to_use_instead(tmp_path):
  """gs://... as a workdir or data folder became a local folder named gs: (os.makedirs), silently: each host
  of a pod wrote its own. Refused wherever sanajax takes such a path, before anything is written."""
  why = ("is a URL: sanajax reads and writes its folders through the file system; mount the bucket (e.g. gcsfuse, "
         "/gcs/BUCKET/...) or use a shared file system, and give that path")
  got = problems(tiny(**{"ae.workdir": "gs://b/ae", "train.init_from": "s3://b/base",
                         "data.source": "folder:gs://b/img"}), "dit")
  assert got == [f"ae.workdir='gs://b/ae': {why}", f"train.init_from='s3://b/base': {why}",
                 f"data.source='folder:gs://b/img': names a folder that {why} (tfds: sets read gs:// themselves: "
                 f"data.tfds_data_dir)"], got
  for args in (("sanajax.train", "--workdir=gs://b/run"), ("sanajax.convert", "--from=diffusers", "--src=x",
                                                          "--dst=gs://b/run")):
    line = assert_user_error(run_cli(*args, cwd=str(tmp_path)), f"{args[-1]} {why}.")
    assert line.startswith(f"{args[0]}: error: "), line
  assert os.listdir(tmp_path) == []  # no local gs: folder
  from sanajax.sample import check_out_dir
  with pytest.raises(Exception, match=re.escape(f"--out=gs://b/png {why}.")):
    check_out_dir("gs://b/png")
  with pytest.raises(FileNotFoundError, match=re.escape(f"Workdir gs://b/run {why}.")):  # sample, serve, ...
    load_model_workdir_config("gs://b/run")


def test_zero_evaluation_prompts_means_no_evaluation():
  validate_config(tiny(**{"eval.num_prompts": 0}), "dit")  # after_training skips it


def test_the_mesh_is_checked_against_the_devices():
  got = problems(tiny(**{"mesh.fsdp": 2}), "dit")
  assert len(got) == 1 and "needs 2 devices; 1 are available" in got[0], got


def test_sprint_fields(tmp_path):
  student = config_utils.load_config("configs/sprint_tiny.py", overrides={
      "teacher_workdir": str(tmp_path / "nope"), "distill.head_block_ids": (0, 4), "distill.scm_lambda": 0.0,
      "distill.adv_lambda": 0.0, "distill.teacher_dtype": "fp8", "model.guidance_embeds": False})
  got = problems(student, "sprint")
  head_ids = "distill.head_block_ids=(0, 4): must be a non-empty tuple of distinct block indices >= 0 < model.depth=4"
  for field in ("teacher_workdir=", head_ids, "distill.scm_lambda=0 and distill.adv_lambda=0",
                "distill.teacher_dtype='fp8'", "model.guidance_embeds=False"):
    assert any(p.startswith(field) for p in got), (field, got)
  assert len(got) == 5, got
  assert problems(config_utils.load_config("configs/sprint_tiny.py"), "sprint") == [
      "teacher_workdir='': must be the workdir of a trained teacher (python -m sanajax.train)"]


def test_ae_fields():
  ae = config_utils.load_config("configs/dcae_tiny.py", overrides={"train.batch_size": -4, "data.resolution": 36,
                                                                    "ae.dtype": "float64"})
  assert problems(ae, "ae") == [
      "train.batch_size=-4: must be a positive integer",
      "ae.dtype='float64': must be one of bfloat16, float16, float32",
      "data.resolution=36: must be a multiple of the AE downsampling 8 = 8"]


# ------------------------------------------------------------------------------ training CLIs


def test_train_fails_in_seconds_naming_every_bad_field_before_the_ae_trains(tmp_path):
  """The review's repro: train.batch_size=0 on a fresh workdir failed after ~11 minutes of AE training,
  blaming the latent cache; checkpoint_every=0 was a ZeroDivisionError after compiling."""
  workdir = tmp_path / "w"
  r = run_cli("sanajax.train", "--config=configs/tiny.py", f"--workdir={workdir}", "--config.train.batch_size=0",
              "--config.train.checkpoint_every=0", "--config.data.resolution=60", "--config.sample.cfg=nan")
  line = assert_user_error(r, "4 bad config fields", "train.batch_size=0: must be a positive integer",
                           "train.checkpoint_every=0", "data.resolution=60", "sample.cfg=nan")
  assert line.startswith("sanajax.train: error: ")
  assert not (workdir / "ae").exists() and not (workdir / "checkpoints").exists()  # nothing was trained
  assert r.seconds < 60, r.seconds


def test_verbose_shows_the_traceback(tmp_path):
  r = run_cli("sanajax.train", f"--workdir={tmp_path}", "--config.train.batch_size=0", "--verbose")
  assert r.returncode == 2
  assert "Traceback" in r.stderr and "ConfigError" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("sanajax.train: error: 1 bad config field: train.batch_size=0")


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130():
  """A CLI built on cli.run interrupted by Ctrl-C (KeyboardInterrupt: sampling, loading, a second Ctrl-C in a
  training loop) says so in one line and exits 130, as a shell reports it; --verbose adds the traceback."""
  script = ("from sanajax import cli\n"
            "def main(argv):\n  raise KeyboardInterrupt\n"
            "cli.define_flags()\ncli.run(main)\n")
  for verbose in (False, True):
    r = subprocess.run([sys.executable, "-c", script, *(["--verbose"] if verbose else [])], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 130 and ("Traceback" in r.stderr) == verbose, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(": interrupted (Ctrl-C)."), r.stderr


def test_bad_flags_and_unknown_fields_are_one_line(tmp_path):
  assert_user_error(run_cli("sanajax.train", "--no_such_flag=1"), "Unknown command line flag 'no_such_flag'")
  assert_user_error(run_cli("sanajax.train", "--config.train.no_such_field=3", f"--workdir={tmp_path}"),
                    "--config.train.no_such_field", "known fields of train:", "batch_size")
  # With --config given the override fails at parse time, not at import: the same line.
  assert_user_error(run_cli("sanajax.train", "--config=configs/tiny.py", "--config.train.no_such_field=3"),
                    "--config.train.no_such_field", "known fields of train:", "batch_size")
  assert_user_error(run_cli("sanajax.train", "--config.train.batch_size=abc"), "--config.train.batch_size=abc")
  assert_user_error(run_cli("sanajax.train", "--config=configs/no_such_config.py"), "no such config file")
  # A config whose get_config(ARG) raises: its own words, without ml_collections' wrapper around them.
  for overrides in ((), ("--config.train.num_steps=3",)):  # with an override it failed elsewhere (a traceback)
    line = assert_user_error(run_cli("sanajax.train", f"--config=configs/lora.py:{tmp_path / 'no_base'}", *overrides))
    assert line.endswith(f"the config file did not load: {tmp_path / 'no_base'} holds no config.json: pass a workdir "
                         "written by `python -m sanajax.convert` (released weights) or `python -m sanajax.train`."), line
  assert_user_error(run_cli("sanajax.train", "stray"), "Unexpected arguments: ['stray']")


def test_configs_are_found_from_any_working_directory(tmp_path, monkeypatch):
  """--config=configs/X.py (and the CLIs' defaults) name the repository's file from another directory too, as
  config_utils.load_config finds it; a file in the working directory comes first."""
  assert config_utils.resolve_config_file("configs/pretrained.py:/ckpt") == "configs/pretrained.py:/ckpt"  # here
  monkeypatch.chdir(tmp_path)
  assert config_utils.resolve_config_file("configs/pretrained.py:/ckpt") == os.path.join(REPO, "configs",
                                                                                          "pretrained.py:/ckpt")
  r = run_cli("sanajax.info", "--config=configs/sana_600m.py", cwd=str(tmp_path))
  assert r.returncode == 0 and "depth: 28  hidden: 1152" in r.stdout, r.stderr[-2000:]
  r = run_cli("sanajax.info", cwd=str(tmp_path))  # the default, configs/tiny.py
  assert r.returncode == 0 and "depth: 4  hidden: 96" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "sana_600m.py").write_text(
      "import ml_collections\ndef get_config():\n  raise ValueError('the local file')\n")
  assert_user_error(run_cli("sanajax.info", "--config=configs/sana_600m.py", cwd=str(tmp_path)), "the local file")
  assert_user_error(run_cli("sanajax.info", "--config=configs/no_such.py", cwd=str(tmp_path)), "no such config file")


def test_multihost_batch_split_is_checked_up_front(tmp_path):
  """The global batch must split over the batch shards (data x fsdp): both the DiT's and the AE's."""
  r = run_cli("sanajax.train", f"--workdir={tmp_path}", "--config.mesh.fsdp=4", "--config.train.batch_size=6",
              "--config.ae_train.batch_size=10", devices=4)
  assert_user_error(r, "train.batch_size=6: must be a multiple of the batch shards (4",
                    "ae_train.batch_size=10: must be a multiple")


def test_train_ae_and_distill_sprint_check_their_configs(tmp_path):
  assert_user_error(run_cli("sanajax.train_ae", f"--workdir={tmp_path / 'ae'}", "--config.train.ema_decay=1.5"),
                    "train.ema_decay=1.5: must be a number in [0, 1)")
  assert not (tmp_path / "ae" / "checkpoints").exists() and not (tmp_path / "ae" / "config.json").exists()
  assert_user_error(run_cli("sanajax.distill_sprint", f"--workdir={tmp_path / 's'}"), "--config.teacher_workdir")
  assert_user_error(run_cli("sanajax.distill_sprint", f"--workdir={tmp_path / 's'}",
                            f"--config.teacher_workdir={tmp_path / 'nope'}", "--config.distill.head_block_ids=(9,)"),
                    "teacher_workdir=", "distill.head_block_ids=(9,)")
  # A teacher folder that is not a workdir: the loader's FileNotFoundError, as one line.
  (tmp_path / "empty").mkdir()
  assert_user_error(run_cli("sanajax.distill_sprint", f"--workdir={tmp_path / 's'}",
                            f"--config.teacher_workdir={tmp_path / 'empty'}"), "config.json")


def test_a_workdir_held_by_another_run_is_one_line(tmp_path):
  """sanajax.workdir.lock's refusal reaches the user as the one line naming the holder."""
  from sanajax.workdir.lock import hold_workdir
  with hold_workdir(str(tmp_path / "w")):  # this test process holds it
    r = run_cli("sanajax.train_ae", f"--workdir={tmp_path / 'w'}", "--config.train.num_steps=1")
  assert_user_error(r, f"pid {os.getpid()}")


def test_the_helper_records_overrides_and_derives_the_workdir(tmp_path):
  """cli.config_from_flags / default_workdir, as each CLI calls them (train_ae recorded nothing before)."""
  script = ("import sys\nfrom sanajax import cli\n"
            "C = cli.define_config_file('configs/dcae_tiny.py', 'c')\ncli.define_flags('w')\n"
            "def main(argv):\n  print(cli.config_from_flags().cli_overrides, cli.default_workdir(), cli.workdir('d'))\n"
            "cli.run(main)\n")
  r = subprocess.run([sys.executable, "-c", script, "--config.train.num_steps=3", "--config.data.resolution=32"],
                     cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                     check=False)
  assert r.returncode == 0, r.stderr
  assert "['data.resolution', 'train.num_steps'] workdirs/dcae_tiny d" in r.stdout


# ------------------------------------------------------------------------------ sample


def sample(workdir, *args, out=None, **kwargs):
  return run_cli("sanajax.sample", f"--workdir={workdir}", "--prompt=a red circle", f"--out={out}", *args, **kwargs)


@pytest.mark.parametrize("args, needles", [
    (("--cfg=nan",), ("--cfg=nan", "finite")),
    (("--cfg=inf",), ("--cfg=inf", "finite")),
    (("--cfg=-inf",), ("--cfg=-inf", "finite")),
    (("--steps=0",), ("--steps=0", ">= 1")),
    (("--steps=-2", "--sampler=flow_euler"), ("--steps=-2", ">= 1")),
    (("--sampler=scm", "--steps=2"), ("--sampler=scm needs a SANA-Sprint student", "--sampler=flow_dpm",
                                      "distill_sprint")),
    (("--batch_size=0",), ("--batch_size=0",)),
    (("--mesh=fsdp=8",), ("Unknown command line flag 'mesh'",)),
    (("--config.mesh.model=2",), ("--config.mesh.model", "known fields of mesh")),
])
def test_sample_refuses_silently_wrong_options_before_loading(workdirs, tmp_path, args, needles):
  out = tmp_path / "out"
  r = sample(workdirs["flow"], *args, out=out)
  assert_user_error(r, *needles)
  assert not out.exists()  # refused before anything was written


def test_sample_takes_the_mesh_as_training_does(workdirs, tmp_path):
  """--config.mesh.AXIS=SIZE, laid over the workdir's config: 8 devices asked on a 1-device machine."""
  r = sample(workdirs["flow"], "--config.mesh.fsdp=4", "--config.mesh.tensor=2", out=tmp_path / "o")
  assert_user_error(r, "--config.mesh", "needs 8 devices; 1 are available")


def test_sample_mesh_builds_the_plan_with_the_workdirs_rules(workdirs):
  # ml_collections registers the --config.* override flags it finds in sys.argv when the flag is defined.
  script = ("import sys\nsys.argv = ['sample', '--config.mesh.fsdp=4', '--config.mesh.tensor=-1']\n"
            "from absl import flags\nfrom sanajax import sample\n"
            "from sanajax.workdir.files import load_workdir_config\n"
            "flags.FLAGS(sys.argv)\n"
            f"plan = sample.sampling_plan(load_workdir_config({workdirs['flow']!r}))\n"
            "print(dict(plan.mesh.shape), plan.rules[0])\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                     env={**os.environ, "JAX_PLATFORMS": "cpu",
                          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "{'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 2} ('batch', ('data', 'fsdp'))" in r.stdout


def test_sample_scm_is_accepted_for_a_sprint_student(workdirs, tmp_path):
  """The option check passes for a Sprint workdir; what stops this one is its missing checkpoint."""
  r = sample(workdirs["sprint"], "--sampler=scm", "--steps=2", out=tmp_path / "o")
  assert_user_error(r, "No checkpoint")


def test_sample_refuses_an_out_it_cannot_write(workdirs, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert_user_error(sample(workdirs["flow"], out=blocker / "sub"), f"--out='{blocker / 'sub'}' cannot be written")
  if os.geteuid() == 0:  # root writes into a chmod 0555 folder (CI runs as root); sysfs refuses it a new folder
    assert_user_error(sample(workdirs["flow"], out="/sys/sanajax_out"), "--out='/sys/sanajax_out' cannot be written")
    return
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    assert_user_error(sample(workdirs["flow"], out=ro), "cannot be written", "Permission denied")
  finally:
    ro.chmod(0o755)


def test_sample_missing_workdir_is_one_line(tmp_path):
  assert_user_error(sample(tmp_path / "nope", out=tmp_path / "o"), "does not exist")


def test_an_autoencoders_workdir_is_refused_where_a_model_is_wanted_naming_its_run(tmp_path):
  """WORKDIR/ae of the default run (or a train_ae workdir) passed where a model goes: the sampler, the web app,
  distillation's teacher, a fine-tune's init_from and the export each say so in one line, before any weight or
  the AE's training; the run that owns the AE is named."""
  run, solo = tmp_path / "run", tmp_path / "solo_ae"
  prepare_workdir(str(run), config_utils.load_config("configs/tiny.py", overrides={"data.resolution": 32,
                                                                                    **SMALLEST_MODEL}))
  for ae_dir in (run / "ae", solo):
    prepare_workdir(str(ae_dir), config_utils.load_config("configs/dcae_tiny.py"))
    (ae_dir / "checkpoints").mkdir()  # a trained AE's layout (its checkpoints are not read)
  owned = (f"'{run / 'ae'}' is an autoencoder's workdir, not a text-to-image model's; the model run it belongs to "
           f"is {run}.")
  alone = (f"'{solo}' is an autoencoder's workdir, not a text-to-image model's: pass a DiT run's workdir (python -m "
           f"sanajax.train) or a converted model's (python -m sanajax.convert).")
  for call in (Generator.from_workdir, check_teacher, load_teacher, check_init_source, load_dit_params,
               export_diffusers_with_dst(tmp_path / "export")):
    for ae_dir, message in ((run / "ae", owned), (solo, alone)):
      with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        call(str(ae_dir))
  assert not (tmp_path / "export").exists()
  for config_file in ("pretrained", "lora", "controlnet_tiny", "sprint_phase1"):  # configs taking a base workdir
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(alone)}$"):
      config_utils.load_config(f"configs/{config_file}.py", str(solo))
  # Given as a LoRA: a model's or an autoencoder's workdir holds no adapters (it was "expected
  # pytorch_lora_weights.safetensors ..., found none", after the model had loaded).
  (run / "checkpoints").mkdir()
  for folder in (run, run / "ae"):
    for call in (check_adapter_source, load_adapter):
      with pytest.raises(FileNotFoundError, match=f"^LoRA {re.escape(repr(str(folder)))} is a sanajax workdir of "
                                                   f"another kind of run \\(its config has no lora section\\): pass a"):
        call(str(folder))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text('{"seed": 0}')
  with pytest.raises(FileNotFoundError, match="has no model section in its config.json: it is not the workdir of a"):
    load_model_workdir_config(str(tmp_path / "other"))
  # The CLIs: one line each, exit 2; train refuses the init_from before its AE trains or its workdir is written.
  assert assert_user_error(sample(run / "ae", out=tmp_path / "o")) == f"sanajax.sample: error: {owned}"
  assert assert_user_error(run_cli("sanajax.serve", f"--workdir={solo}")) == f"sanajax.serve: error: {alone}"
  assert_user_error(run_cli("sanajax.distill_sprint", f"--workdir={tmp_path / 's'}",
                            f"--config.teacher_workdir={run / 'ae'}"), owned)
  assert_user_error(run_cli("sanajax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 't'}",
                            f"--config.train.init_from={run / 'ae'}"), owned)
  assert os.listdir(tmp_path / "t") == []  # the lock's folder only: no config.json, no AE trained
  assert_user_error(sample(run, "--lora=" + str(run / "ae") + ":0.5", out=tmp_path / "o"), "is a sanajax workdir of "
                    "another kind of run")
  line = assert_user_error(run_cli("sanajax.train", f"--config=configs/lora.py:{run / 'ae'}",
                                   f"--workdir={tmp_path / 'l'}"))
  assert line.endswith(f"the config file did not load: {owned}"), line


def export_diffusers_with_dst(dst):
  return lambda workdir: convert.export_diffusers(workdir, str(dst))


def test_long_prompts_warn_which_end_is_kept(tmp_path):
  """A prompt past text.max_length is read from its start (the tokenizer cuts the end, as before);
  the sample CLI says so instead of cutting silently."""
  from sanajax.models.text_encoder import TextEncoder
  from sanajax.sample import truncation_warnings
  from sanajax.workdir.loaders import VOCAB
  config = tiny(**{"text.num_layers": 1})
  encoder = TextEncoder(config.text, VOCAB)
  long_prompt = " ".join(["a red circle to the left of a blue square"] * 1100)  # ~10k characters
  assert len(long_prompt) > 10_000
  words = len(encoder.tokenizer.encode(long_prompt)) - 1
  assert truncation_warnings(encoder, ["a red circle", long_prompt]) == [
      (f"Warning: prompt 1 has {words} tokens; the text encoder reads only its first 19 (text.max_length=20 with "
       "BOS): the rest is ignored.")]
  ids, _ = encoder.tokenize([long_prompt])  # the model's input is unchanged: BOS + the first 19 tokens
  assert list(ids[0]) == encoder.tokenizer.encode(long_prompt)[:20]
  # With a CHI instruction (SANA's) the prompt gets max_length - 2 positions, still from its start.
  with config.unlocked():
    config.text.chi_prompt = "draw exactly what is asked: "
  chi = TextEncoder(config.text, VOCAB)
  (line,) = truncation_warnings(chi, [long_prompt])
  assert "reads only its first 18 " in line
  assert truncation_warnings(chi, ["a red circle"]) == []


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tiny_ae):
  """A DiT trained for 1 step on the shared 2-step AE (tests/tiny_base.py): what sample needs to run."""
  from sanajax.training.dit import train
  root = tmp_path_factory.mktemp("trained")
  config = config_utils.load_config("configs/tiny.py", overrides={
      **AE_OVERRIDES, "ae.workdir": tiny_ae, "train.batch_size": 4, "train.num_steps": 1, "train.log_every": 1,
      "data.latent_cache": 0, "eval.num_prompts": 0})
  train(config, str(root / "w"))
  return str(root / "w")


def test_sample_shows_a_progress_bar_past_one_batch(trained_workdir, tmp_path):
  """More prompts than --batch_size: a bar on stderr counts the images (none for a single batch)."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\na blue square\na green triangle\n")
  bars = {}
  for batch in (2, 3):
    r = run_cli("sanajax.sample", f"--workdir={trained_workdir}", f"--prompts_file={prompts}",
                f"--out={tmp_path / str(batch)}", "--steps=1", f"--batch_size={batch}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    bars[batch] = re.findall(r"Sampling: +100%.*? 3/3 ", r.stderr.replace("\r", "\n"))
  assert bars[2] and not bars[3], bars


def test_sample_warns_on_a_long_prompt_and_samples_under_the_mesh_flag(trained_workdir, tmp_path):
  """End to end: a long prompt is sampled (from its first tokens) with one warning line naming it, the
  nested --out is created, and --config.mesh.fsdp=2 on 2 devices gives the one-device images."""
  from PIL import Image
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n" + " ".join(["a blue square"] * 50) + "\n")
  images = {}
  for name, mesh in (("one", ()), ("fsdp2", ("--config.mesh.fsdp=2",))):
    out = tmp_path / name / "nested"
    r = run_cli("sanajax.sample", f"--workdir={trained_workdir}", f"--prompts_file={prompts}", f"--out={out}",
                "--steps=2", *mesh, devices=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [("Warning: prompt 1 has 150 tokens; the text encoder reads only its first 19 "
                         "(text.max_length=20 with BOS): the rest is ignored.")], r.stderr
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid.png"]
    images[name] = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(2)]
  for a, b in zip(images["one"], images["fsdp2"]):
    assert np.mean(np.abs(a.astype(int) - b.astype(int)) > 1) < 0.01
