"""Quantized sampling with qwix (sanajax.models.quantize): the quantized DiT stays close to the float one
but is not it, int8 weights are per-output-channel absmax as documented, the parameter bytes shrink by the
counted amount, and `python -m sanajax.sample --quantize=MODE` runs end to end or refuses in one line.

Models are tiny (configs/tiny.py, odd width 40 and 2 blocks; the Sprint student; the tiny MM-DiT) with
random weights: the checks are about the quantization, not about a trained model's quality (that is
docs/quantization.md's GenEval-lite table).
"""
from __future__ import annotations

import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from small_configs import SMALLEST_MODEL  # tests/small_configs.py (tests/ is on sys.path)
from test_cli import assert_user_error, run_cli  # tests/test_cli.py: one-line user errors, exit code 2

from sanajax import config_utils
from sanajax.extras import MissingPackageError
from sanajax.generation import Generator
from sanajax.models import dcae, quantize
from sanajax.models.backbones import build_backbone, init_args
from sanajax.models.weights_util import boxed_abstract_params, put_like
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import checkpoint_dir, prepare_workdir

ODD = {"model.depth": 2, "model.hidden_size": 40, "model.linear_head_dim": 8, "model.cross_num_heads": 5,
       "model.cross_head_dim": 8}


def random_like(boxed_abstract, seed: int = 0):
  """Random weights in the structure of an abstract boxed params tree, drawn with numpy (no init program to
  compile): kernels ~ N(0, 1 / fan_in), norm scales ~ 1, everything else (biases, adaLN tables, the Sprint
  guidance embedder) ~ N(0, 0.02^2), so no part is exactly zero as a fresh init leaves some. Boxed."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(x.shape).astype(np.float32)
    if "kernel" in name:
      return z / np.sqrt(np.prod(x.shape[:-1]))
    return (1.0 if name.endswith("'scale']") else 0.0) + 0.02 * z
  return put_like(boxed_abstract, jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed_abstract)))


def float_model(config_file: str, overrides=ODD, extra=None):
  """(model config, backbone, random unboxed params); `extra`: model fields the config file does not have."""
  c = config_utils.load_config(config_file, overrides=overrides).model
  c.update(extra or {})
  model = build_backbone(c)
  return c, model, nn.unbox(random_like(boxed_abstract_params(model, *init_args(c))))


def inputs(c, batch=2, side=6, length=5):
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(k[0], (batch, side, side, c.in_channels))
  t = jnp.array([0.3, 0.85])[:batch]
  ctx = jax.random.normal(k[1], (batch, length, c.get("caption_channels") or c.joint_attention_dim))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)[:batch]
  kwargs = {"guidance": jnp.full((batch,), 4.5)} if c.get("guidance_embeds") else {}
  return (x, t, ctx, mask), kwargs


def apply(model, params, args, kwargs):
  """model.apply, jitted (eager op-by-op dispatch through qwix's interception is several times slower)."""
  return jax.jit(lambda p, a, kw: model.apply({"params": p}, *a, **kw))(params, args, kwargs)


def rel_error(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_modes_are_close_to_float32_and_int8_is_per_channel_absmax():
  """Relative L2 error of the velocity vs float32: > 0 (a path that silently stays float fails) and under
  a bound a broken scale or layout would exceed (measured here: int8 0.66%, int8_dynamic 1.0%, fp8 4.5%;
  bounds about 2x that). int8 weight-only equals the float model run with each quantized kernel replaced by
  clip(round(w / s), -128, 127) * s, s = max|w| / 127.5 per output channel (qwix's symmetric int8 bound:
  the top bucket covers [126.5, 127.5)), to float32 rounding."""
  c, model, params = float_model("configs/tiny.py")
  args, kwargs = inputs(c)
  ref = apply(model, params, args, kwargs)
  errors = {}
  for mode, bound in (("int8", 0.015), ("int8_dynamic", 0.025), ("fp8", 0.1)):
    qmodel, qparams = quantize.quantize_backbone(model, params, mode, c, check_platform=False)
    errors[mode] = rel_error(apply(qmodel, qparams, args, kwargs), ref)
    assert 0 < errors[mode] < bound, (mode, errors)
  # The hand-dequantized reference: every kernel of the layers the rule names, and no other.
  flat = flatten_dict(params, sep="/")
  quantized = [k for k in flat if k.endswith("/kernel") and
               re.fullmatch(quantize.SANA_LAYERS, k.rsplit("/", 1)[0])]
  assert len(quantized) == 10 * c.depth  # attn1 q/k/v/out, attn2 q/k/v/out, ff conv_inverted/conv_point
  for k in quantized:
    s = jnp.abs(flat[k]).max(axis=0, keepdims=True) / 127.5
    flat[k] = jnp.clip(jnp.round(flat[k] / s), -128, 127) * s
  manual = apply(model, unflatten_dict(flat, sep="/"), args, kwargs)
  qmodel, qparams = quantize.quantize_backbone(model, params, "int8", c)
  out = apply(qmodel, qparams, args, kwargs)
  assert float(jnp.max(jnp.abs(out - manual))) <= 1e-5 * float(jnp.max(jnp.abs(manual))), errors


@pytest.mark.parametrize("config_file, overrides, extra", [
    ("configs/tiny.py", ODD, {"guidance_embeds": True, "qk_norm": True}),
    ("configs/mmdit_tiny.py", {"model.num_layers": 2}, {})])
def test_sprint_student_and_mmdit_quantize(config_file, overrides, extra):
  """The Sprint student (configs/sprint_tiny.py's architecture: the teacher's plus the guidance embedding; here
  with q/k norms too) and the MM-DiT: int8 weights close to float32, every listed layer int8."""
  c, model, params = float_model(config_file, overrides, extra)
  args, kwargs = inputs(c)
  qmodel, qparams = quantize.quantize_backbone(model, params, "int8", c)
  err = rel_error(apply(qmodel, qparams, args, kwargs), apply(model, params, args, kwargs))
  assert 0 < err < 0.015, err  # measured: Sprint student 0.52%, MM-DiT 0.29%
  layers = quantize.LAYERS[c.name]
  expected = [k for k in flatten_dict(params, sep="/") if k.endswith("/kernel") and re.fullmatch(layers, k[:-7])]
  assert len(expected) >= 8 * 2  # per block SANA: 10; MM-DiT: 12 (the last block's text stream: 8)
  assert sum(x.dtype == jnp.int8 for x in jax.tree.leaves(qparams)) == len(expected)


def test_int8_weights_shrink_the_parameter_bytes_by_the_count():
  """float32 kernel (I, O) of a quantized layer -> int8 (I, O) + float32 scale (1, O): bytes fall by
  3 I O - 4 O per layer, everything else unchanged; memory_by_mode (abstract) agrees with the real tree."""
  c, model, params = float_model("configs/tiny.py")
  float_bytes = quantize.param_bytes(params)
  _, qparams = quantize.quantize_backbone(model, params, "int8", c)
  kernels = [v for k, v in flatten_dict(qparams, sep="/").items() if k.endswith("kernel")]
  kernels = [x for x in jax.tree.leaves(kernels) if x.dtype == jnp.int8]
  expected = float_bytes - sum(3 * x.size - 4 * x.shape[-1] for x in kernels)
  assert quantize.param_bytes(qparams) == expected < 0.6 * float_bytes
  memory = quantize.memory_by_mode(c)
  assert memory["float32"]["bytes"] == float_bytes
  assert memory["int8"]["bytes"] == memory["int8_dynamic"]["bytes"] == memory["fp8"]["bytes"] == expected


def test_bad_mode_and_fp8_without_fp8_hardware_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match=r"quantize='int4': choose one of none, int8, int8_dynamic, fp8"):
    quantize.check_mode("int4")
  cpu = jax.devices("cpu")
  assert "compute capability >= 8.9" in quantize.fp8_device_error(cpu)
  with pytest.raises(ValueError, match="quantize=fp8 needs a CUDA GPU"):
    Generator.from_workdir(str(tmp_path / "missing"), quantize="fp8")  # refused before anything loads


@pytest.fixture(scope="module")
def random_workdir(tmp_path_factory):
  """A DiT workdir with random weights (DiT and AE checkpoints as training writes them; no training)."""
  root = tmp_path_factory.mktemp("quantize") / "w"
  config = config_utils.load_config("configs/tiny.py", overrides={"data.resolution": 32, **SMALLEST_MODEL})
  prepare_workdir(str(root), config)
  prepare_workdir(str(root / "ae"), config)
  ae = dcae.build_dcae(config.ae)
  dit_params = random_like(boxed_abstract_params(build_backbone(config.model), *init_args(config.model)), seed=4)
  ae_params = random_like(boxed_abstract_params(ae, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)), seed=3)
  for directory, params in ((root, dit_params), (root / "ae", ae_params)):
    ckpt = Checkpointer(checkpoint_dir(str(directory)), keep=1, async_save=False)
    ckpt.save(0, {"ema_params": params})
    ckpt.close()
  return str(root)


def test_sample_cli_quantized_end_to_end(random_workdir, tmp_path):
  """--quantize=int8_dynamic writes the images; they are the float Generator's to within a few levels
  (same seed) but not equal to them; a bad mode is refused in one line before anything is written."""
  from PIL import Image
  out = tmp_path / "int8"
  r = run_cli("sanajax.sample", f"--workdir={random_workdir}", "--prompt=a red circle", f"--out={out}", "--steps=2",
              "--quantize=int8_dynamic", timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  quantized = np.asarray(Image.open(out / "00000.png")).astype(int)
  reference = Generator.from_workdir(random_workdir).generate(["a red circle"], steps=2).astype(int)[0]
  diff = np.abs(quantized - reference)
  assert quantized.shape == reference.shape == (32, 32, 3)
  assert 0 < diff.mean() < 4.0, diff.mean()
  bad = tmp_path / "bad"
  r = run_cli("sanajax.sample", f"--workdir={random_workdir}", "--prompt=a red circle", f"--out={bad}",
              "--quantize=int4")
  assert_user_error(r, "--quantize='int4'", "none, int8, int8_dynamic, fp8")
  assert not bad.exists()


def test_without_qwix_the_float_model_samples_and_a_quantized_mode_is_one_clear_error(monkeypatch):
  """A plain install (`pip install -e .`, no "quantize" extra) has no qwix: the training run's sampling
  (mode none) must not import it, and asking for a quantized mode names the missing extra before any work."""
  monkeypatch.setitem(sys.modules, "qwix", None)  # `import qwix` raises, find_spec finds nothing
  with pytest.raises(ImportError):
    import qwix  # noqa: F401  (the hiding works)
  model, params = object(), {"kernel": 1}
  assert quantize.quantize_backbone(model, params, "none", {}) == (model, params)
  with pytest.raises(MissingPackageError, match=re.escape("quantize=int8 needs qwix, which is not installed: "
                                                          "pip install -e '.[quantize]'.")):
    quantize.quantize_backbone(model, params, "int8", {})
