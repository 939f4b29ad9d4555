"""Tiny SD3 text stacks for tests, built offline: random CLIP / T5 weights and byte-level BPE / Unigram
tokenizers over a few words (tests/ is on sys.path: `from sd3_helpers import ...`), and a whole tiny
StableDiffusion3Pipeline. Used by tests/test_sd3_text.py, tests/test_sd3_pipeline.py and tests/test_sd3_finetune.py."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tiny_base import build_once, run_dir  # tests/tiny_base.py (tests/ is on sys.path)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "red", "blue", "cat", "dog", "square", "circle", "on", "the", "left", "of", "big"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def rel_err(got, want) -> float:
  """max |got - want| / max |want| (float64)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def randomize(module, scale: float, norm_scale: float = 0.3, norm_mean: float = 0.0):
  """Weights big enough that every part matters (default inits leave layers near identity)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, prm in module.named_parameters():
      is_norm = "norm" in name
      prm.copy_(torch.randn_like(prm) * (norm_scale if is_norm else scale) + (norm_mean if is_norm else 0.0))
  return module


def t5_config(d_model: int = 22, vocab: int = 41):
  return transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=7, d_ff=33, num_layers=3, num_heads=3,
                               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                               relative_attention_max_distance=20, pad_token_id=0, eos_token_id=1)


def clip_tokenizer(path, pad_token: str):
  """A byte-level BPE CLIPTokenizer over WORDS, saved to `path`: letters, then each word merged letter by
  letter; <|startoftext|> and <|endoftext|> take the two largest ids, as in CLIP's vocabulary."""
  vocab, merges = {}, []
  for token in ["!"] + list(LETTERS) + [c + "</w>" for c in LETTERS]:
    vocab.setdefault(token, len(vocab))
  for word in WORDS:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      merges.append((parts[0], parts[1]))
      parts = [parts[0] + parts[1]] + parts[2:]
      vocab.setdefault(parts[0], len(vocab))
  merges = list(dict.fromkeys(merges))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=13, pad_token=pad_token)
  tok.save_pretrained(path)
  return tok, len(vocab)


def t5_tokenizer(path):
  """A Unigram T5 tokenizer (pad 0, </s> 1, unk 2) over WORDS and letters, saved to `path`."""
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
  pieces += [("\u2581" + w, -3.0) for w in WORDS] + [(c, -6.0) for c in LETTERS]
  tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
  tok.save_pretrained(path)
  return tok, len(pieces)


def sd3_text_stack(root):
  """(tokenizers (CLIP-L, bigG, T5), encoders (CLIP-L, bigG, T5)) of a tiny SD3: CLIP-L-like (quick_gelu, legacy
  EOS, EOS padding, width 12, projection 12), bigG-like (gelu, first-EOS pooling, '!' padding, width 20,
  projection 18) and T5 v1.1 (d_model 40); the tokenizers are saved under root/tokenizer, tokenizer_2,
  tokenizer_3 (clip length 13). Pooled width 30, joint width 40."""
  tok_l, n_clip = clip_tokenizer(root / "tokenizer", "<|endoftext|>")
  tok_g, _ = clip_tokenizer(root / "tokenizer_2", "!")
  tok_t5, n_t5 = t5_tokenizer(root / "tokenizer_3")
  eos = n_clip - 1
  clip_l = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=n_clip, hidden_size=12, intermediate_size=19, num_hidden_layers=2, num_attention_heads=3,
      max_position_embeddings=13, projection_dim=12, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=eos - 1,
      pad_token_id=eos)).eval(), 0.4)
  clip_g = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=n_clip, hidden_size=20, intermediate_size=27, num_hidden_layers=3, num_attention_heads=4,
      max_position_embeddings=13, projection_dim=18, hidden_act="gelu", eos_token_id=eos, bos_token_id=eos - 1,
      pad_token_id=0)).eval(), 0.4)
  t5 = randomize(transformers.T5EncoderModel(t5_config(d_model=40, vocab=n_t5)).eval(), 0.15, norm_mean=1.0)
  return (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5)


def sd3_pipeline(root, shift: float = 3.0):
  """A tiny random StableDiffusion3Pipeline: a 2-block SD3Transformer2DModel (QK RMSNorm, a dual-attention
  block, pos_embed_max_size 16, sample_size 8), a 16-channel AutoencoderKL downsampling 2x (scaling 1.5305,
  shift 0.0609, SD3's), sd3_text_stack's encoders (tokenizers under root/tokenizers) and
  FlowMatchEulerDiscreteScheduler(shift)."""
  diffusers = pytest.importorskip("diffusers")
  (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = sd3_text_stack(root / "tokenizers")
  torch.manual_seed(0)
  transformer = randomize(diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=40, caption_projection_dim=16, pooled_projection_dim=30, out_channels=16,
      pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)).eval(), 0.15, norm_mean=1.0)
  vae = randomize(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
      norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
      use_post_quant_conv=False).eval(), 0.1, norm_mean=1.0)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
      text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5,
      tokenizer_3=tok_t5)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def run_module(*args, timeout: int = 300) -> subprocess.CompletedProcess:
  """python -m ARGS in the repository on the CPU; asserts it succeeded (its output in the message)."""
  r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  return r


SHIFT = 3.0  # the shared pipeline's FlowMatchEulerDiscreteScheduler shift


def converted_sd3(tmp_path_factory) -> tuple[str, str]:
  """(pipeline, workdir): sd3_pipeline(shift SHIFT) saved with save_pretrained, and its conversion by
  `python -m sanajax.convert --from=diffusers`. Built once per test run and shared by tests/test_sd3_pipeline.py
  and tests/test_sd3_finetune.py (tests/tiny_base.build_once: also across xdist workers); both only read it."""
  def build(path):
    src, work = os.path.join(path, "pipeline"), os.path.join(path, "workdir")
    sd3_pipeline(pathlib.Path(path), SHIFT).save_pretrained(src)
    run_module("sanajax.convert", "--from=diffusers", f"--src={src}", f"--dst={work}")

  path = build_once(run_dir(tmp_path_factory), "sd3", {"shift": SHIFT}, build)
  return os.path.join(path, "pipeline"), os.path.join(path, "workdir")
