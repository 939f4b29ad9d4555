"""sanajax.info: the SANA configs have SANA's parameter counts, equal to diffusers', and the CLI runs."""
import os
import subprocess
import sys

import pytest

from sanajax import config_utils
from sanajax.models import dit_facts, sana_dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SANA's sizes (the paper's 0.6B / 1.6B, counted exactly from diffusers SanaTransformer2DModel).
EXPECTED = {"sana_600m": 591.7e6, "sana_1600m": 1604.5e6}


def _diffusers_count(model_config):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):  # Shapes only: no memory, no init time.
    model = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(model_config))
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_counts_match_sana_and_diffusers(name):
  config = config_utils.load_config(name)
  got = dit_facts.describe(config)
  assert abs(got["total_params"] - EXPECTED[name]) <= 5e-4 * EXPECTED[name]
  assert got["total_params"] == _diffusers_count(config.model)
  assert got["params_per_module"]["caption_projection"] == 2304 * config.model.hidden_size + config.model.hidden_size \
      + config.model.hidden_size ** 2 + config.model.hidden_size


def test_resolution_override_is_applied():
  config = config_utils.load_config("sana_1600m", overrides={"data.resolution": 4096})
  got = dit_facts.describe(config)
  assert got["latent_shape"] == (128, 128, 32) and got["image_tokens"] == 128 * 128
  assert config.model.use_pe and config.model.pe_interpolation == 2.0 and config.diffusion.flow_shift == 6.0
  assert got["total_params"] == 1604462752  # sin-cos PE adds no parameters.
  # Linear attention: 16x the tokens cost 16x the self-attention FLOPs.
  base = dit_facts.describe(config_utils.load_config("sana_1600m"))
  ratio = got["forward_flops_per_image"]["self_attention"] / base["forward_flops_per_image"]["self_attention"]
  assert ratio == pytest.approx(16.0)


def _run_cli(*overrides: str) -> str:
  return subprocess.run([sys.executable, "-m", "sanajax.info", "--config=configs/sana_1600m.py", *overrides],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.fixture(scope="module")
def cli_one_device():
  """The CLI's output for Sana-1600M without a mesh (~2 s)."""
  return _run_cli()


def test_cli_last_line(cli_one_device):
  last = cli_one_device.strip().splitlines()[-1]
  key, value = last.split(": ")
  assert key == "total_params" and int(value) == 1604462752


def _plan_memory_gib(out: str) -> tuple[str, dict[str, float]]:
  """(the header line, {row: GiB}) of the CLI's per-device memory table."""
  lines = out.splitlines()
  i = next(i for i, line in enumerate(lines) if line.startswith("per-device memory under mesh"))
  rows = {}
  for line in lines[i + 1:i + 7]:
    name, value = line.split()
    rows[name] = float(value)
  return lines[i], rows


def test_cli_fsdp8_prints_an_eighth_per_device(cli_one_device):
  """`python -m sanajax.info --config=configs/sana_1600m.py --config.mesh.fsdp=8` (the README's
  command): parameters, gradients, optimizer state (CAME, the config's) and EMA per device are an
  eighth of the one-device figures the same CLI prints (plus the ~1.1% no rule splits: depthwise
  kernels, biases; and CAME's small factored statistics, replicated), and the one-device
  parameters are the 1,604,462,752 float32 it counts.

  Runs on this one-device machine: fixed mesh axes describe the target cluster (sanajax.parallel.
  memory sizes shards from the mesh shape), so no fake devices are needed. ~2 s.
  """
  import jax
  assert jax.device_count() == 1
  head1, one = _plan_memory_gib(cli_one_device)
  out = _run_cli("--config.mesh.fsdp=8")
  head8, f8 = _plan_memory_gib(out)
  assert head1.startswith("per-device memory under mesh one device (1 devices)"), head1
  assert head8.startswith("per-device memory under mesh fsdp=8 (8 devices)"), head8
  assert int(out.strip().splitlines()[-1].split(": ")[1]) == 1604462752
  gib = 2 ** 30
  assert abs(one["parameters"] - 4 * 1604462752 / gib) <= 0.005  # float32, whole
  # The table has 2 decimals (+-0.005 GiB each): fsdp=8 is within [1/8, 1.02/8] of one device's.
  # CAME's factored second moments (row / column statistics, 0.02 GiB) stay whole on every device.
  factored = one["optimizer_state"] - one["parameters"]
  assert 0 <= factored <= 0.03
  for row in ("parameters", "gradients", "optimizer_state", "ema"):
    whole = factored if row == "optimizer_state" else 0.0
    assert one[row] / 8 - 0.01 <= f8[row] <= 1.02 * one[row] / 8 + whole + 0.01, (row, one[row], f8[row])
  assert abs(f8["activations"] - one["activations"] / 8) <= 0.01  # batch 64 over 8 devices
  assert abs(f8["total"] - sum(f8[k] for k in ("parameters", "gradients", "optimizer_state", "ema",
                                                 "activations"))) <= 0.03


@pytest.mark.parametrize("name,base", [("sprint_600m", 591747872), ("sprint_1600m", 1604462752)])
def test_sprint_param_counts_match_diffusers(name, base):
  """Sprint = SANA + the CFG embedder (an MLP 256 -> h -> h) + q/k RMSNorm scales in both attentions."""
  config = config_utils.load_config(name)
  m = config.model
  assert m.qk_norm and m.guidance_embeds and m.timestep_scale == 0.001 and m.sample_size == 32
  got = dit_facts.describe(config)["total_params"]
  assert got == _diffusers_count(m)
  h, depth = m.hidden_size, m.depth
  extra = (256 * h + h + h * h + h) + depth * (2 * h + 2 * m.cross_num_heads * m.cross_head_dim)
  assert got == base + extra  # base: the SANA count tested above (sana_600m / sana_1600m).


def test_sprint_1600m_distillation_memory_fits_8_x_80_gb():
  """distill_plan_memory of configs/sprint_1600m.py at 16 per device on 8 devices (docs/sprint.md#sprint-at-scale):
  the bf16 teacher is half the float32 student less the CFG embedder; the teacher's activations up to its
  last tapped block (19 of 20, the last) equal the student's in the same dtype; the total is every row."""
  from sanajax.training import memory
  config = config_utils.load_config("sprint_1600m", overrides={"mesh.fsdp": 8, "train.batch_size": 128})
  mem = memory.distill_plan_memory(config)
  h = config.model.hidden_size
  cfg_embedder = 256 * h + h + h * h + h
  assert mem["teacher"] * 2 == mem["parameters"] - 4 * cfg_embedder // 8
  assert mem["teacher_activations"] == mem["activations"] and mem["heads_gradients"] == mem["heads"] > 0
  rows = ("parameters", "gradients", "optimizer_state", "ema", "activations") + memory.DISTILL_ROWS
  assert mem["total"] == sum(mem[k] for k in rows)
  assert mem["total"] < 0.2 * 80 * 2 ** 30, mem["total"] / 2 ** 30  # 10.5 GiB of an 80 GB device
  assert "teacher" not in memory.plan_memory(config)


def test_cli_refuses_a_bad_model_in_one_line_and_sizes_any_plan():
  """info checks the fields it reads before describing them: model.depth=0 gave a table of zeros. It checks no
  more: the mesh is not held against this machine's devices (fsdp=8 is sized on one CPU, above)."""
  r = subprocess.run([sys.executable, "-m", "sanajax.info", "--config=configs/tiny.py", "--config.model.depth=0",
                      "--config.data.resolution=60"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
  assert r.stderr.strip().splitlines()[-1] == (
      "sanajax.info: error: 2 bad config fields: model.depth=0: must be a positive integer; data.resolution=60: must "
      "be a multiple of the AE downsampling 8 x model.patch_size 2 = 16"), r.stderr
