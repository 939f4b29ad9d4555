"""LoRA (sanajax/models/lora.py, models/lora_diffusers.py): parity with diffusers + PEFT, the file round
trip, merge / unmerge, and the errors a user meets (unknown targets, a rank mismatch, a LoRA for
another model). The trainer and CLIs: tests/test_lora_training.py.

The diffusers model is test_convert's odd-sized SanaTransformer2DModel (head dims 12 and 18, 3 heads,
patch 2, QK norm, non-square latents, a padded text mask), float32, every weight random.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax import convert, safetensors_io
from sanajax.data import shapes
from sanajax.eval import geneval_lite
from sanajax.models import lora as lora_lib
from sanajax.models import lora_diffusers, sana_dit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from test_convert import DIT_KW, _assert_close, _dit_inputs, _randomise, _torch_dit

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _run(model, params, loras, scales, dropout, rng, x, t, ctx, mask):
  """model.apply with `loras` (a tuple of adapter dicts, at `scales`) injected; one compile per layout."""
  with lora_lib.injected(list(zip(loras, scales)), dropout=dropout, rng=rng):
    return model.apply({"params": params}, x, t, ctx, mask)


def _out(model, params, *inputs, loras=(), scales=(), dropout=0.0, rng=None):
  return np.asarray(_run(model, params, tuple(loras), tuple(scales), dropout,
                         jax.random.PRNGKey(0) if rng is None else rng, *inputs))


def _pipeline(tm):
  """A SanaPipeline around a transformer only (the LoRA loader touches nothing else)."""
  return diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm,
                                scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
  """A random PEFT LoRA (r 3, alpha 5, B random too) on a random transformer, saved as diffusers does."""
  root = tmp_path_factory.mktemp("lora")
  tm = _randomise(diffusers.SanaTransformer2DModel(**DIT_KW))
  base = {k: v.clone() for k, v in tm.state_dict().items()}
  tm.add_adapter(peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False))
  torch.manual_seed(7)
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn_like(p) * 0.3)
  layers = peft.get_peft_model_state_dict(tm)
  diffusers.SanaPipeline.save_lora_weights(str(root / "peft"), transformer_lora_layers=layers,
                                           transformer_lora_adapter_metadata=tm.peft_config["default"].to_dict())
  params = sana_dit.params_from_diffusers_state_dict(base)
  model = sana_dit.build_dit(convert.sana_dit_diffusers.sana_config_from_diffusers(tm.config))
  return tm.eval(), base, params, model, str(root / "peft")


def test_peft_lora_matches_diffusers_on_the_fly_and_merged(peft_lora):
  tm, _, params, model, path = peft_lora
  lora = convert.load_lora(path)
  assert len(lora) == 2 * 2 * 4 + 2 * 2  # 2 blocks x (attn1, attn2) x q/k/v/out + 2 x (conv_inverted, conv_point)
  assert {float(e["alpha"]) for e in lora.values()} == {5.0}
  x, t, ctx, mask = _dit_inputs()
  want = _torch_dit(tm, x, t, ctx, mask)
  _assert_close(_out(model, params, x, t, ctx, mask, loras=[lora], scales=[1.0]), want)
  _assert_close(_out(model, lora_lib.merge(params, lora), x, t, ctx, mask), want)
  # The adapter changes the output (so the parity above is not the base's), and unmerge restores the base.
  base_out = _out(model, params, x, t, ctx, mask)
  assert float(np.max(np.abs(base_out - want))) > 0.1 * float(np.max(np.abs(want)))
  back = lora_lib.unmerge(lora_lib.merge(params, lora), lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, params)


def test_round_trip_and_diffusers_loads_sanajax_file(peft_lora, tmp_path):
  tm, base, params, model, path = peft_lora
  lora = convert.load_lora(path)
  out = lora_diffusers.save_lora(str(tmp_path / "ours"), lora)
  again = convert.load_lora(str(tmp_path / "ours"))
  assert sorted(again) == sorted(lora)
  for k in lora:  # sanajax -> diffusers -> sanajax: bit-identical
    for leaf in ("a", "b", "alpha"):
      np.testing.assert_array_equal(again[k][leaf], lora[k][leaf])
  # Our file has PEFT's tensors bit for bit, and diffusers' load_lora_weights runs it to the same output.
  ours, theirs = safetensors_io.read_safetensors(out), safetensors_io.read_safetensors(
      os.path.join(path, lora_diffusers.LORA_WEIGHT_NAME))
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])
  fresh = diffusers.SanaTransformer2DModel(**DIT_KW)
  fresh.load_state_dict(base)
  pipe = _pipeline(fresh.eval())
  pipe.load_lora_weights(str(tmp_path / "ours"))
  x, t, ctx, mask = _dit_inputs()
  np.testing.assert_array_equal(_torch_dit(pipe.transformer, x, t, ctx, mask), _torch_dit(tm, x, t, ctx, mask))
  # Two stacked adapters at scales 0.7 and 0.3 equal one at scale 1.
  stacked = _out(model, params, x, t, ctx, mask, loras=[lora, again], scales=[0.7, 0.3])
  _assert_close(stacked, _torch_dit(tm, x, t, ctx, mask))


def test_errors_unknown_target_rank_mismatch_wrong_model(peft_lora, tmp_path):
  _, _, params, _, path = peft_lora
  with pytest.raises(ValueError, match=r"'to_qq' is not a module of this model; valid names: .*conv_inverted.*"
                                       r"to_out\.0.*to_q"):
    lora_lib.target_paths(params, ["to_q", "to_qq"])
  assert len(lora_lib.target_paths(params, ["attn1.to_q"])) == 2  # a dotted suffix: self-attention only
  assert len(lora_lib.target_paths(params, r".*attn2\.to_(k|v)")) == 4  # a string is a regex, as in PEFT
  with pytest.raises(lora_diffusers.LoraFileError, match="has rank 3, but rank 4 was asked for"):
    convert.load_lora(path, r=4)
  # lora_B of another rank than lora_A: named, with both shapes.
  tensors = dict(safetensors_io.read_safetensors(os.path.join(path, lora_diffusers.LORA_WEIGHT_NAME)))
  key = "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"
  tensors[key] = np.zeros((tensors[key].shape[0], 2), np.float32)
  os.makedirs(tmp_path / "bad")
  safetensors_io.write_safetensors(str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"), tensors)
  with pytest.raises(lora_diffusers.LoraFileError, match=r"transformer_blocks\.0\.attn1\.to_q: rank mismatch"):
    convert.load_lora(str(tmp_path / "bad"))
  # An adapter for a wider model does not merge.
  lora = convert.load_lora(path)
  lora["transformer_blocks_0/attn1/to_q"]["a"] = np.zeros((40, 3), np.float32)
  with pytest.raises(ValueError, match=r"to_q has a \(40, 3\) @ \(3, 36\) adapter but the layer is 36 -> 36"):
    lora_lib.merge(params, lora)


def test_names_metadata_bf16_and_dropout(peft_lora, tmp_path):
  _, _, params, model, path = peft_lora
  assert lora_diffusers.module_name("transformer_blocks_3/attn1/to_out") == "transformer_blocks.3.attn1.to_out.0"
  assert lora_diffusers.flax_path("transformer_blocks.12.ff.net.2") == "transformer_blocks_12/ff/net_2"
  lora = convert.load_lora(path)
  lora["transformer_blocks_1/ff/conv_point"]["alpha"] = np.float32(2.0)  # one alpha differs -> alpha_pattern
  out = lora_diffusers.save_lora(str(tmp_path / "m"), lora)
  meta = json.loads(safetensors_io.read_safetensors_metadata(out)["lora_adapter_metadata"])
  assert meta["transformer.r"] == 3 and meta["transformer.lora_alpha"] == 5.0
  assert meta["transformer.alpha_pattern"] == {"transformer_blocks.1.ff.conv_point": 2.0}
  assert float(convert.load_lora(out)["transformer_blocks_1/ff/conv_point"]["alpha"]) == 2.0
  # bf16 base kernels (the frozen base of a LoRA run): the same output to bf16 precision.
  x, t, ctx, mask = _dit_inputs()
  f32 = _out(model, params, x, t, ctx, mask, loras=[lora], scales=[1.0])
  bf16 = _out(model, lora_lib.cast_kernels(params, "bfloat16"), x, t, ctx, mask, loras=[lora], scales=[1.0])
  assert float(np.max(np.abs(bf16 - f32))) <= 3e-2 * float(np.max(np.abs(f32)))
  # Dropout acts on the adapters' input only: with p -> 1 the output is the base's.
  dropped = _out(model, params, x, t, ctx, mask, loras=[lora], scales=[1.0], dropout=0.999999)
  _assert_close(dropped, _out(model, params, x, t, ctx, mask))


def test_init_starts_at_the_base_and_boxes_like_the_kernel():
  from test_sana_dit import _tiny_model_config
  c = _tiny_model_config()
  model = sana_dit.build_dit(c)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *[jnp.zeros(s.shape, s.dtype) for s in
                                                                    sana_dit.dummy_inputs(c, (2, 2), 3)])["params"])
  paths = lora_lib.target_paths(boxed, TARGETS)
  tree = lora_lib.init(jax.random.PRNGKey(1), boxed, paths, 4, boxed=True)
  a = tree["transformer_blocks_0"]["attn1"]["to_q"]["a"]
  assert a.names == ("embed", None) and tree["transformer_blocks_0"]["ff"]["conv_point"]["b"].names == (None, "embed")
  flat = lora_lib.flat(tree, alpha=8.0)
  assert all(float(np.max(np.abs(e["b"]))) == 0.0 and e["alpha"] == 8.0 for e in flat.values())
  bound = 1 / np.sqrt(a.value.shape[0])
  assert 0.5 * bound < float(np.max(np.abs(a.value))) <= bound


def test_novel_colour_scenes_are_detected_only_with_the_extended_palette():
  """The LoRA demo's new colour (docs/lora.md#shapes): drawn by the shapes renderer, absent from the training
  sampler and the text vocabulary, detected by GenEval-lite only when asked for; palette scenes score the same."""
  assert "magenta" in shapes.NOVEL_COLORS and "magenta" not in shapes.COLORS and "magenta" not in shapes.VOCAB
  rng = np.random.default_rng(0)
  prompts = ["a magenta circle", "two magenta squares", "a magenta triangle above a red circle"]
  old = [p for p, _ in shapes.eval_prompt_set(12, seed=0)]
  images = [shapes.scene_for_prompt(p, rng, 64).image for p in prompts + old]
  cats = ["colors", "counting", "position"] + [shapes.category(p) for p in old]
  plain = geneval_lite.evaluate(images, prompts + old, cats)["per_image"]
  extended = geneval_lite.evaluate(images, prompts + old, cats, extra_colors=("magenta",))["per_image"]
  assert extended == [True] * len(images)  # rendered scenes pass, the new colour included
  assert plain[:3] == [False] * 3 and plain[3:] == extended[3:]
  with pytest.raises(ValueError, match="not in shapes.NOVEL_COLORS"):
    geneval_lite.evaluate(images[:1], prompts[:1], ["colors"], extra_colors=("red-ish",))
