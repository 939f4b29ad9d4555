"""sanajax.info: the SANA configs have SANA's parameter counts, equal to diffusers', and the CLI runs."""
import os
import subprocess
import sys

import pytest

from sanajax import config_utils, info
from sanajax.models import sana_dit

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
  got = info.describe(config)
  assert abs(got["total_params"] - EXPECTED[name]) <= 5e-4 * EXPECTED[name]
  assert got["total_params"] == _diffusers_count(config.model)
  assert got["params_per_module"]["caption_projection"] == 2304 * config.model.hidden_size + config.model.hidden_size \
      + config.model.hidden_size ** 2 + config.model.hidden_size


def test_resolution_override_is_applied():
  config = config_utils.load_config("sana_1600m", overrides={"data.resolution": 4096})
  got = info.describe(config)
  assert got["latent_shape"] == (128, 128, 32) and got["image_tokens"] == 128 * 128
  assert config.model.use_pe and config.model.pe_interpolation == 2.0 and config.diffusion.flow_shift == 6.0
  assert got["total_params"] == 1604462752  # sin-cos PE adds no parameters.
  # Linear attention: 16x the tokens cost 16x the self-attention FLOPs.
  base = info.describe(config_utils.load_config("sana_1600m"))
  ratio = got["forward_flops_per_image"]["self_attention"] / base["forward_flops_per_image"]["self_attention"]
  assert ratio == pytest.approx(16.0)


def test_cli_last_line():
  out = subprocess.run([sys.executable, "-m", "sanajax.info", "--config=configs/sana_1600m.py"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True).stdout
  last = out.strip().splitlines()[-1]
  key, value = last.split(": ")
  assert key == "total_params" and int(value) == 1604462752


@pytest.mark.parametrize("name,base", [("sprint_600m", 591747872), ("sprint_1600m", 1604462752)])
def test_sprint_param_counts_match_diffusers(name, base):
  """Sprint = SANA + the CFG embedder (an MLP 256 -> h -> h) + q/k RMSNorm scales in both attentions."""
  config = config_utils.load_config(name)
  m = config.model
  assert m.qk_norm and m.guidance_embeds and m.timestep_scale == 0.001 and m.sample_size == 32
  got = info.describe(config)["total_params"]
  assert got == _diffusers_count(m)
  h, depth = m.hidden_size, m.depth
  extra = (256 * h + h + h * h + h) + depth * (2 * h + 2 * m.cross_num_heads * m.cross_head_dim)
  assert got == base + extra  # base: the SANA count tested above (sana_600m / sana_1600m).
