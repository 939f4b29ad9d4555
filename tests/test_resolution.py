"""resolution.apply_resolution: presets re-derived after overrides, explicit fields kept."""
import subprocess
import sys

from sanajax.config_utils import load_config, record_overrides
from sanajax.resolution import apply_resolution


def test_resolution_override_rederives_unset_fields():
  # sana_600m's 4096 row: batch 4, flow_shift 6, use_pe, pe_interpolation 2 (the default row is 1024).
  config = apply_resolution(load_config("sana_600m", overrides={"data.resolution": 4096}))
  assert (config.train.batch_size, config.diffusion.flow_shift, config.model.use_pe) == (4, 6.0, True)
  assert config.model.pe_interpolation == 2.0
  assert config.model.sample_size == 4096 // 32


def test_explicit_override_wins_over_the_preset():
  config = apply_resolution(load_config("sana_600m", overrides={"data.resolution": 4096, "train.batch_size": 8,
                                                                "diffusion.flow_shift": 4.5}))
  assert (config.train.batch_size, config.diffusion.flow_shift) == (8, 4.5)
  assert config.model.use_pe is True  # not set explicitly: still the 4096 preset's.
  # Also when the resolution is the default one.
  config = apply_resolution(load_config("sana_600m", overrides={"train.batch_size": 8}))
  assert config.train.batch_size == 8


def test_record_overrides_takes_config_flags_keys():
  # The CLIs pass config_flags.get_override_values(FLAGS["config"]): a flat {dotted name: value}.
  config = load_config("sana_600m")
  config.train.batch_size = 8  # as the flag parser sets it
  record_overrides(config, {"train.batch_size": 8})
  assert apply_resolution(config).train.batch_size == 8
  assert config.cli_overrides == ["train.batch_size"]


def test_info_cli_keeps_a_command_line_batch_size():
  out = subprocess.run([sys.executable, "-m", "sanajax.info", "--config=configs/sana_600m.py",
                        "--config.data.resolution=4096", "--config.train.batch_size=8"],
                       capture_output=True, text=True, check=True).stdout
  assert "batch 8)" in out, out
