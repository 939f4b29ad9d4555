"""Gemma-2 text encoder: parity with transformers, the word tokenizer and SANA's CHI selection."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.models import text_encoder as te

VOCAB = ["a", "red", "blue", "circle", "square", "left", "of", "the", "user", "prompt", ":"]


def test_parity_with_transformers_gemma2():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.Gemma2Config(
      vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
      final_logit_softcapping=30.0, max_position_embeddings=64, attn_implementation="eager")
  torch.manual_seed(0)
  tm = transformers.Gemma2Model(cfg).eval()
  with torch.no_grad():
    for name, prm in tm.named_parameters():  # Big enough weights that soft-capping and norms matter.
      prm.copy_(torch.randn_like(prm) * (0.3 if "norm" in name else 0.5))
  b, l = 2, 13
  ids = np.random.default_rng(0).integers(4, 40, (b, l)).astype(np.int32)
  mask = np.ones((b, l), np.int32)
  mask[1, 9:] = 0  # Right padding.
  with torch.no_grad():
    want = tm(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  text = ml_collections.ConfigDict(dict(
      hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, sliding_window=4,
      attn_logit_softcapping=3.0, query_pre_attn_scalar=24, vocab_size=40))
  model = te.build_gemma2(text)
  params = te.params_from_transformers_state_dict(tm.state_dict())
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  err = np.max(np.abs(got[valid] - want[valid]))
  assert err <= 1e-4 * np.max(np.abs(want[valid])), err
  # The sliding window matters here (window 4 < 13 tokens): without it the last tokens change.
  full = te.build_gemma2(dict(text, sliding_window=None))
  got_full = np.asarray(jax.jit(full.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  assert np.max(np.abs(got_full[0, -1] - want[0, -1])) > 1e-3


def test_word_tokenizer_bos_padding_truncation():
  tok = te.WordTokenizer(VOCAB)
  assert tok.vocab_size == len(VOCAB) + 4
  ids, mask = tok(["A red, circle!", "blue square left of the a red circle zebra"], 6)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  red, circle, blue = VOCAB.index("red") + 4, VOCAB.index("circle") + 4, VOCAB.index("blue") + 4
  a = VOCAB.index("a") + 4
  np.testing.assert_array_equal(ids[0], [te.BOS_ID, a, red, circle, te.PAD_ID, te.PAD_ID])  # ',' '!' not in vocab.
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
  assert ids[1, 0] == te.BOS_ID and ids[1, 1] == blue and mask[1].all()  # Truncated to 6.
  assert tok(["zebra :"], 4)[0][0].tolist() == [te.BOS_ID, te.UNK_ID, VOCAB.index(":") + 4, te.PAD_ID]


def test_chi_keeps_bos_and_last_tokens():
  tok = te.WordTokenizer(VOCAB)
  chi = "the user prompt:"  # 1 BOS + 4 tokens.
  ids, mask = te.chi_tokenize(tok, ["a red circle", "blue"], 6, chi)
  full, full_mask = tok([chi + "a red circle", chi + "blue"], len(tok.encode(chi)) + 6 - 2)
  assert full.shape[1] == 9
  np.testing.assert_array_equal(ids, full[:, [0, 4, 5, 6, 7, 8]])
  np.testing.assert_array_equal(mask, full_mask[:, [0, 4, 5, 6, 7, 8]])
  # The whole user prompt survives after BOS, preceded by the end of the instruction.
  assert ids[0].tolist() == [te.BOS_ID] + [VOCAB.index(w) + 4 for w in [":", "a", "red", "circle"]] + [te.PAD_ID]
  assert mask[1].tolist() == [1, 1, 1, 0, 0, 0]
  # No CHI: plain tokenisation.
  np.testing.assert_array_equal(te.chi_tokenize(tok, ["a red"], 6)[0], tok(["a red"], 6)[0])


def test_text_encoder_tiny_config():
  text = config_utils.load_config("tiny").text
  enc = te.TextEncoder(text, VOCAB)
  ctx, mask = enc.encode(["a red circle", "a blue square left of the red circle"])
  assert ctx.shape == (2, text.max_length, text.hidden_size) and ctx.dtype == jnp.float32
  assert mask.shape == (2, text.max_length)
  assert float(jnp.std(ctx)) > 0.1  # Random init from text.seed gives unit-scale features (final norm).
  assert float(jnp.max(jnp.abs(ctx[0, 2] - ctx[1, 2]))) > 1e-3
  # Frozen: no gradient reaches the encoder parameters.
  ids, m = enc.tokenize(["a red circle"])
  g = jax.jit(jax.grad(lambda p: jnp.sum(enc.embed(p, jnp.asarray(ids), jnp.asarray(m)))))(enc.params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))
