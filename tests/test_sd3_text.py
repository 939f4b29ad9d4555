"""SD3's text stack: CLIP and T5 encoders against transformers, their loaders, and the prompt embedding
against diffusers' StableDiffusion3Pipeline.encode_prompt (tiny random models, tokenizers built offline)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sd3_helpers import randomize, rel_err, sd3_text_stack, t5_config  # tests/sd3_helpers.py (tests/ on sys.path)

from sanajax.models import clip_transformers, sd3_text, t5_encoder, t5_transformers
from sanajax.safetensors_io import WeightsError, read_state_dict, write_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

def clip_config(hidden_act: str, eos_token_id: int, hidden: int = 30, proj: int = 11, vocab: int = 41):
  return transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3, num_attention_heads=5,
      max_position_embeddings=13, projection_dim=proj, hidden_act=hidden_act, eos_token_id=eos_token_id,
      bos_token_id=0, pad_token_id=1)


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 2), ("gelu", 40)])
def test_clip_matches_transformers(tmp_path, hidden_act, eos_token_id):
  """Both pooling branches: legacy eos_token_id == 2 (argmax of the ids: the EOS has the largest id) and the
  first position of eos_token_id; padding after the EOS (CLIP-L pads with the EOS, bigG with '!')."""
  tm = randomize(transformers.CLIPTextModelWithProjection(clip_config(hidden_act, eos_token_id)).eval(), 0.5)
  tm.save_pretrained(tmp_path)
  model, params = clip_transformers.load_clip_text_encoder(str(tmp_path))
  ids = np.random.default_rng(0).integers(3, 40, (3, 13))
  ids[0, 9:] = 40  # EOS then EOS padding.
  ids[1, 5], ids[1, 6:] = 40, 1  # EOS then '!'-style padding with a small id.
  ids[2, -1] = 40  # No padding.
  with torch.no_grad():
    want = tm(torch.tensor(ids), output_hidden_states=True)
  apply = jax.jit(model.apply)
  got = apply({"params": params}, jnp.asarray(ids, jnp.int32))
  errs = {"last_hidden_state": rel_err(got["last_hidden_state"], want.last_hidden_state),
          "penultimate_hidden_state": rel_err(got["penultimate_hidden_state"], want.hidden_states[-2]),
          "pooled": rel_err(got["pooled"], want.text_embeds)}
  assert max(errs.values()) <= 1e-4, errs
  assert all(rel_err(g, w) <= 1e-4 for g, w in zip(got["hidden_states"], want.hidden_states))
  # The pooled token is the EOS, not the last position: row 1 pools position 5.
  assert rel_err(got["pooled"][1], tm.text_projection(want.last_hidden_state[1, -1]).detach()) > 1e-2
  # Causal: changing a later token leaves earlier positions alone.
  ids2 = ids.copy()
  ids2[0, 7] = 3 if ids[0, 7] != 3 else 4
  got2 = apply({"params": params}, jnp.asarray(ids2, jnp.int32))["last_hidden_state"]
  np.testing.assert_allclose(got2[0, :7], got["last_hidden_state"][0, :7], rtol=0, atol=1e-6)
  assert rel_err(got2[0, 7:], got["last_hidden_state"][0, 7:]) > 1e-2


def test_clip_params_have_logical_axes_and_round_trip(tmp_path):
  tm = transformers.CLIPTextModelWithProjection(clip_config("quick_gelu", 2)).eval()
  tm.save_pretrained(tmp_path)
  model, params = clip_transformers.load_clip_text_encoder(str(tmp_path))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves)
  state = clip_transformers.clip_state_dict_from_params(params)
  ref = read_state_dict(str(tmp_path))
  assert set(state) == set(ref)
  assert all(np.array_equal(np.asarray(state[k]), ref[k]) for k in ref)


def test_clip_loader_names_every_mismatched_tensor(tmp_path):
  tm = transformers.CLIPTextModelWithProjection(clip_config("quick_gelu", 2)).eval()
  tm.save_pretrained(tmp_path)
  state = dict(read_state_dict(str(tmp_path)))
  del state["text_projection.weight"]
  state["text_model.final_layer_norm.bias"] = np.zeros(7, np.float32)
  state["text_model.extra.weight"] = np.zeros(2, np.float32)
  (tmp_path / "model.safetensors").unlink()
  write_safetensors(str(tmp_path / "model.safetensors"), state)
  with pytest.raises(WeightsError) as e:
    clip_transformers.load_clip_text_encoder(str(tmp_path))
  msg = str(e.value)
  assert "missing tensor text_projection.weight" in msg
  assert "tensor text_model.final_layer_norm.bias has shape (7,), expected (30,)" in msg
  assert "unexpected tensor text_model.extra.weight" in msg


def test_t5_matches_transformers(tmp_path):
  """29 tokens span exact and logarithmic buckets and the clipped last one (max_distance 20)."""
  tm = randomize(transformers.T5EncoderModel(t5_config()).eval(), 0.2, norm_mean=1.0)
  with torch.no_grad():  # A bias table big enough that the position buckets matter.
    tm.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5.0)
  tm.save_pretrained(tmp_path)
  model, params = t5_transformers.load_t5_encoder(str(tmp_path))
  ids = np.random.default_rng(1).integers(2, 41, (2, 29))
  mask = np.ones((2, 29), np.int64)
  mask[1, 17:] = 0
  ids[1, 17:] = 0
  with torch.no_grad():
    want = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  apply = jax.jit(model.apply)
  got = np.asarray(apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
  valid = mask.astype(bool)
  err = rel_err(got[valid], want[valid])
  assert err <= 1e-4, err
  # The mask matters: without it row 1 changes (its valid tokens would attend to the padding).
  unmasked = np.asarray(apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.ones((2, 29), jnp.int32)))
  assert rel_err(unmasked[1, :17], want[1, :17]) > 1e-3
  # The state dict round-trips (shared.weight; the tied encoder.embed_tokens copy is not written).
  state = t5_transformers.t5_state_dict_from_params(params)
  ref = read_state_dict(str(tmp_path))
  assert set(state) == set(ref) and all(np.array_equal(np.asarray(state[k]), ref[k]) for k in ref)


def test_t5_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-700, 700)
  for buckets, distance in [(32, 128), (8, 20), (6, 9)]:
    want = bucket(torch.tensor(rel), True, buckets, distance).numpy()
    np.testing.assert_array_equal(t5_encoder.relative_position_bucket(rel, buckets, distance), want)


def test_t5_loader_reads_a_tied_only_export_and_refuses_mismatches(tmp_path):
  tm = transformers.T5EncoderModel(t5_config()).eval()
  tm.save_pretrained(tmp_path)
  state = dict(read_state_dict(str(tmp_path)))
  state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
  (tmp_path / "model.safetensors").unlink()
  write_safetensors(str(tmp_path / "model.safetensors"), state)
  _, params = t5_transformers.load_t5_encoder(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(params["shared"]), state["encoder.embed_tokens.weight"])
  del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
  state["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((3, 3), np.float32)
  write_safetensors(str(tmp_path / "model.safetensors"), state)
  with pytest.raises(WeightsError) as e:
    t5_transformers.load_t5_encoder(str(tmp_path))
  assert "missing tensor encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in str(e.value)
  assert "tensor encoder.block.0.layer.0.SelfAttention.q.weight has shape (3, 3)" in str(e.value)


# --- the pipeline ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
  """A tiny diffusers SD3 pipeline directory: CLIP-L-like (quick_gelu, legacy EOS, EOS padding), bigG-like
  (gelu, first-EOS pooling, '!' padding), T5 v1.1 and a 1-layer transformer; no VAE."""
  diffusers = pytest.importorskip("diffusers")
  root = tmp_path_factory.mktemp("sd3")
  (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = sd3_text_stack(root)
  transformer = diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=40, caption_projection_dim=16, pooled_projection_dim=30, out_channels=4,
      pos_embed_max_size=16)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip_l,
      tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
  for name, module in [("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)]:
    module.save_pretrained(root / name)
  transformer.save_pretrained(root / "transformer")
  return root, pipe


PROMPTS = ["a red cat on the left of a blue square", "big dog",
           "the circle of a red cat on a big blue square a dog left of the big red circle on a square"]


def test_encode_prompt_matches_diffusers(sd3_dir):
  root, pipe = sd3_dir
  enc = sd3_text.load_sd3_text_encoder(str(root), t5_max_length=19)
  assert enc.layout == sd3_text.SD3Layout(13, (12, 20), (12, 18), 19, 40)
  ids_l, ids_g, ids_t5 = enc.tokenize(PROMPTS)
  assert (ids_g == 0).any() and (ids_l[1] == ids_l.max()).sum() > 1  # bigG pads with '!', CLIP-L with the EOS.
  assert (ids_t5[1] == 0).any() and (ids_t5[2] != 0).all()  # T5 padding and truncation (the last prompt).
  with torch.no_grad():
    want = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
                              negative_prompt=["", "red", "a blue dog"], max_sequence_length=19)
  got = enc.encode_prompt(PROMPTS, ["", "red", "a blue dog"])
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  assert got[0].shape == (3, 13 + 19, 40) and got[2].shape == (3, 12 + 18)
  assert max(errs) <= 1e-4, errs
  # The padded channels are zeros and the T5 part is not (so the join is checked, not only the zeros).
  assert float(jnp.max(jnp.abs(got[0][:, :13, 32:]))) == 0.0 and float(jnp.std(got[0][:, 13:])) > 0.1
  # clip_skip picks an earlier layer, as diffusers.
  with torch.no_grad():
    want_skip = pipe.encode_prompt(PROMPTS[:1], None, None, device="cpu", do_classifier_free_guidance=False,
                                   clip_skip=1, max_sequence_length=19)
  got_skip = enc.encode(PROMPTS[:1], clip_skip=1)
  assert rel_err(got_skip[0], want_skip[0]) <= 1e-4 and rel_err(got_skip[1], want_skip[2]) <= 1e-4


def test_encode_prompt_without_t5_matches_diffusers(sd3_dir):
  root, pipe = sd3_dir
  enc = sd3_text.load_sd3_text_encoder(str(root), use_t5=False, t5_max_length=19)
  assert not enc.use_t5 and enc.layout.joint_width == 40  # From transformer/config.json.
  pipe_no_t5 = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
  with torch.no_grad():
    want = pipe_no_t5.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                    max_sequence_length=19)
  context, pooled = enc.encode(PROMPTS)
  assert rel_err(context, want[0]) <= 1e-4 and rel_err(pooled, want[2]) <= 1e-4
  assert float(jnp.max(jnp.abs(context[:, 13:]))) == 0.0


def test_encoder_dropout_drops_each_encoder_independently():
  layout = sd3_text.SD3Layout(clip_length=3, clip_widths=(2, 3), pooled_widths=(4, 2), t5_length=5, joint_width=7)
  b = 4000
  context = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (b, 8, 7)), jnp.float32)
  pooled = jnp.asarray(np.random.default_rng(1).uniform(1.0, 2.0, (b, 6)), jnp.float32)
  ctx, pool = sd3_text.encoder_dropout(jax.random.key(0), context, pooled, layout)
  ctx, pool = np.asarray(ctx), np.asarray(pool)
  kept_l, kept_g, kept_t5 = pool[:, 0] != 0, pool[:, 4] != 0, ctx[:, 3, 0] != 0
  for kept in (kept_l, kept_g, kept_t5):
    assert abs(1 - kept.mean() - sd3_text.SD3_ENCODER_DROPOUT) < 0.03
  assert abs((~kept_l & ~kept_t5).mean() - 0.463 ** 2) < 0.03  # Independent draws.
  # Each encoder's whole contribution goes together, the rest is untouched.
  np.testing.assert_array_equal(ctx[:, :3, :2] != 0, np.broadcast_to(kept_l[:, None, None], (b, 3, 2)))
  np.testing.assert_array_equal(pool[:, :4] != 0, np.broadcast_to(kept_l[:, None], (b, 4)))
  np.testing.assert_array_equal(ctx[:, :3, 2:5] != 0, np.broadcast_to(kept_g[:, None, None], (b, 3, 3)))
  np.testing.assert_array_equal(pool[:, 4:] != 0, np.broadcast_to(kept_g[:, None], (b, 2)))
  np.testing.assert_array_equal(ctx[:, 3:] != 0, np.broadcast_to(kept_t5[:, None, None], (b, 5, 7)))
  np.testing.assert_array_equal(ctx[:, :3, 5:], np.asarray(context)[:, :3, 5:])  # Padding channels: no encoder.
  kept = np.where(ctx != 0)
  np.testing.assert_array_equal(ctx[kept], np.asarray(context)[kept])
  # Per-encoder probabilities: never drop CLIP-L, always drop T5.
  ctx, pool = sd3_text.encoder_dropout(jax.random.key(1), context, pooled, layout, probs=(0.0, 0.5, 1.0))
  assert np.all(np.asarray(pool)[:, :4] != 0) and np.all(np.asarray(ctx)[:, 3:] == 0)
