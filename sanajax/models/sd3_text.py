"""SD3's prompt embedding: CLIP-L + OpenCLIP bigG + T5, as diffusers' StableDiffusion3Pipeline.encode_prompt.

    enc = load_sd3_text_encoder("stable-diffusion-3-medium-diffusers")  # or use_t5=False: T5 states are zeros
    context, pooled = enc.encode(["a red cat"])   # (B, 77 + 256, 4096), (B, 2048) float32
    ids = enc.tokenize(prompts); context, pooled = jax.jit(enc.embed)(enc.params, *ids)   # the pure part

context = concat_seq(pad_channels(concat_ch(clip_l_penultimate, bigG_penultimate), t5_width), t5_states): the
two CLIPs' hidden_states[-2] (B, 77, 768 + 1280), zero-padded on channels to the T5 width, then the T5 states
(B, 256, 4096) after them on the sequence axis; pooled = concat_ch(clip_l_text_embeds, bigG_text_embeds). T5
runs without an attention mask, and without T5 its states are zeros (B, t5_length, joint_attention_dim), both as
diffusers does. `encoder_dropout` is SD3's training-time per-encoder caption dropout.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sanajax.models.clip_transformers import load_clip_text_encoder
from sanajax.models.gemma2_transformers import load_tokenizer
from sanajax.models.t5_transformers import load_t5_encoder
from sanajax.safetensors_io import read_json

# SD3 trains with each of its three text encoders dropped independently with this probability (Esser et al.
# 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206,
# Sec. 5.3.3 "Flexible Text Encoders": "an individual drop-out rate of 46.3%"), so that at inference any
# subset works, e.g. without the 4.7B-parameter T5.
SD3_ENCODER_DROPOUT = 0.463


class SD3Layout(NamedTuple):
  """Where each encoder sits in SD3's (context, pooled): widths and lengths, all ints."""
  clip_length: int   # CLIP tokens (77): context[:, :clip_length]
  clip_widths: tuple  # (CLIP-L hidden, bigG hidden): channels [0, l) and [l, l + g) of the CLIP tokens
  pooled_widths: tuple  # (CLIP-L projection, bigG projection): pooled channels [0, l) and [l, l + g)
  t5_length: int  # T5 tokens (256): context[:, clip_length:]
  joint_width: int  # the T5 width (4096) = context's channels


def combine_prompt_embeds(clip_l: jax.Array, clip_g: jax.Array, t5: jax.Array, pooled_l: jax.Array,
                          pooled_g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """diffusers' encode_prompt joining: clip_l (B, Lc, Dl), clip_g (B, Lc, Dg), t5 (B, Lt, Dt) with Dl + Dg <= Dt,
  pooled_l (B, Pl), pooled_g (B, Pg) -> (context (B, Lc + Lt, Dt), pooled (B, Pl + Pg))."""
  clip = jnp.concatenate([clip_l, clip_g], axis=-1)
  if clip.shape[-1] > t5.shape[-1]:
    raise ValueError(f"SD3 pads the CLIP states ({clip.shape[-1]} channels) to the T5 width, which is smaller "
                     f"({t5.shape[-1]}).")
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
  return (jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1),
          jnp.concatenate([pooled_l, pooled_g], axis=-1))


def encoder_dropout(key: jax.Array, context: jax.Array, pooled: jax.Array, layout: SD3Layout,
                    probs: float | Sequence[float] = SD3_ENCODER_DROPOUT) -> tuple[jax.Array, jax.Array]:
  """SD3's per-encoder caption dropout: each sample drops CLIP-L, bigG and T5 independently.

  probs: one drop probability for all three, or (p_clip_l, p_clip_g, p_t5). A dropped encoder's
  contribution becomes zeros: CLIP-L's channels of the CLIP tokens and of pooled, bigG's likewise, T5's
  tokens (as the SD3 training code zeroes a dropped embedding; the T5 zeros are also what inference
  without T5 feeds). context (B, Lc + Lt, D), pooled (B, Pl + Pg) -> the same shapes and dtypes.
  """
  return drop_encoders(context, pooled, layout, encoder_keep(key, context.shape[0], probs))


def encoder_keep(key: jax.Array, batch: int, probs: float | Sequence[float] = SD3_ENCODER_DROPOUT) -> jax.Array:
  """(batch, 3) bool: whether each sample keeps CLIP-L, bigG and T5 (each dropped with its prob in `probs`)."""
  p = np.broadcast_to(np.asarray(probs, np.float32), (3,))
  return jax.random.uniform(key, (3, batch)).T >= jnp.asarray(p)[None, :]


def drop_encoders(context: jax.Array, pooled: jax.Array, layout: SD3Layout, keep: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """encoder_dropout with the draws given: keep (B, 3) bool from encoder_keep; a dropped encoder's part -> zeros."""
  keep = keep.T  # (3, B): CLIP-L, bigG, T5.
  wl, wg = layout.clip_widths
  pl, pg = layout.pooled_widths
  ch = jnp.arange(context.shape[-1])
  clip_keep = jnp.where(ch < wl, keep[0][:, None], jnp.where(ch < wl + wg, keep[1][:, None], True))  # (B, D)
  pos = jnp.arange(context.shape[1])
  ctx_keep = jnp.where((pos < layout.clip_length)[None, :, None], clip_keep[:, None, :], keep[2][:, None, None])
  pch = jnp.arange(pooled.shape[-1])
  pooled_keep = jnp.where(pch < pl, keep[0][:, None], jnp.where(pch < pl + pg, keep[1][:, None], True))
  return (jnp.where(ctx_keep, context, jnp.zeros((), context.dtype)),
          jnp.where(pooled_keep, pooled, jnp.zeros((), pooled.dtype)))


class SD3TextEncoder:
  """SD3's three frozen text encoders with their tokenizers; encode() equals diffusers' encode_prompt.

  clip_l, clip_g: (model, params) of clip_text.CLIPTextModelWithProjection; t5: (model, params) of
  t5_encoder.T5Encoder, or None to drop T5 (then joint_attention_dim gives the zeros' width). tokenizers:
  (CLIP-L, bigG, T5) objects with __call__(texts, max_length) -> (ids, mask) int32 numpy, e.g.
  gemma2_transformers.HFTokenizer (the T5 one may be None without T5). clip_max_length: diffusers takes the
  first tokenizer's model_max_length (77); t5_max_length: encode_prompt's max_sequence_length (256).
  """

  def __init__(self, clip_l: tuple, clip_g: tuple, t5: tuple | None, tokenizers: Sequence[Any], *,
               clip_max_length: int = 77, t5_max_length: int = 256, joint_attention_dim: int | None = None):
    self.models = {"clip_l": clip_l[0], "clip_g": clip_g[0]}
    self.params = {"clip_l": clip_l[1], "clip_g": clip_g[1]}
    if t5 is not None:
      self.models["t5"], self.params["t5"] = t5
      joint_attention_dim = joint_attention_dim or t5[0].d_model
    if not joint_attention_dim:
      raise ValueError("SD3TextEncoder without T5 needs joint_attention_dim (the transformer's) for the zeros.")
    self.tokenizers = tuple(tokenizers)
    self.layout = SD3Layout(int(clip_max_length), (clip_l[0].hidden_size, clip_g[0].hidden_size),
                            (clip_l[0].projection_dim, clip_g[0].projection_dim), int(t5_max_length),
                            int(joint_attention_dim))
    self._embed = jax.jit(self.embed, static_argnames=("clip_skip",))

  @property
  def use_t5(self) -> bool:
    return "t5" in self.models

  def tokenize(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
               prompts_3: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(CLIP-L ids, bigG ids (B, clip_length), T5 ids (B, t5_length) or None) int32: each padded to max_length
    and truncated, as diffusers; prompts_2 / prompts_3 default to prompts (encode_prompt's prompt_2 / _3)."""
    prompts = list(prompts)
    ids_l = self.tokenizers[0](prompts, self.layout.clip_length)[0]
    ids_g = self.tokenizers[1](list(prompts_2 or prompts), self.layout.clip_length)[0]
    ids_t5 = self.tokenizers[2](list(prompts_3 or prompts), self.layout.t5_length)[0] if self.use_t5 else None
    return ids_l, ids_g, ids_t5

  def embed(self, params, ids_l: jax.Array, ids_g: jax.Array, ids_t5: jax.Array | None = None,
            clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Pure: token ids (from `tokenize`) -> (context (B, clip_length + t5_length, joint_width), pooled
    (B, Pl + Pg)) float32, no gradient to params. clip_skip: diffusers' option, hidden_states[-(clip_skip + 2)]."""
    params = jax.lax.stop_gradient(params)
    out_l = self.models["clip_l"].apply({"params": params["clip_l"]}, ids_l)
    out_g = self.models["clip_g"].apply({"params": params["clip_g"]}, ids_g)
    pick = -2 if clip_skip is None else -(clip_skip + 2)
    b = ids_l.shape[0]
    if self.use_t5:
      t5 = self.models["t5"].apply({"params": params["t5"]}, ids_t5)  # diffusers passes no attention mask.
    else:
      t5 = jnp.zeros((b, self.layout.t5_length, self.layout.joint_width), jnp.float32)
    context, pooled = combine_prompt_embeds(out_l["hidden_states"][pick].astype(jnp.float32),
                                            out_g["hidden_states"][pick].astype(jnp.float32), t5.astype(jnp.float32),
                                            out_l["pooled"].astype(jnp.float32), out_g["pooled"].astype(jnp.float32))
    return context, pooled

  def encode(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
             prompts_3: Sequence[str] | None = None, clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (context, pooled) float32: encode_prompt's (prompt_embeds, pooled_prompt_embeds)."""
    ids = self.tokenize(prompts, prompts_2, prompts_3)
    return self._embed(self.params, *(None if i is None else jnp.asarray(i) for i in ids), clip_skip=clip_skip)

  def encode_prompt(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                    clip_skip: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """diffusers' encode_prompt with classifier-free guidance: (prompt_embeds, negative_prompt_embeds,
    pooled_prompt_embeds, negative_pooled_prompt_embeds); negatives default to "" (clip_skip not applied to
    them, as diffusers)."""
    context, pooled = self.encode(prompts, clip_skip=clip_skip)
    negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    neg_context, neg_pooled = self.encode(negative)
    return context, neg_context, pooled, neg_pooled


def load_sd3_text_encoder(path: str, dtype: str = "float32", use_t5: bool = True,
                          t5_max_length: int = 256) -> SD3TextEncoder:
  """SD3TextEncoder of a diffusers SD3 / SD3.5 pipeline directory: text_encoder, text_encoder_2,
  text_encoder_3 (skipped, and may be absent, with use_t5=False) and tokenizer, tokenizer_2, tokenizer_3.

  Without T5 the zeros' width is transformer/config.json's joint_attention_dim (else text_encoder_3's d_model).
  """
  clip_l = load_clip_text_encoder(os.path.join(path, "text_encoder"), dtype)
  clip_g = load_clip_text_encoder(os.path.join(path, "text_encoder_2"), dtype)
  tok_l = load_tokenizer(os.path.join(path, "tokenizer"))
  tok_g = load_tokenizer(os.path.join(path, "tokenizer_2"))
  t5, tok_t5, joint = None, None, None
  if use_t5:
    t5 = load_t5_encoder(os.path.join(path, "text_encoder_3"), dtype)
    tok_t5 = load_tokenizer(os.path.join(path, "tokenizer_3"))
  elif os.path.exists(os.path.join(path, "transformer", "config.json")):
    joint = read_json(os.path.join(path, "transformer", "config.json"))["joint_attention_dim"]
  elif os.path.exists(os.path.join(path, "text_encoder_3", "config.json")):
    joint = read_json(os.path.join(path, "text_encoder_3", "config.json"))["d_model"]
  clip_max_length = int(getattr(tok_l.tokenizer, "model_max_length", 77))  # diffusers' tokenizer_max_length.
  return SD3TextEncoder(clip_l, clip_g, t5, (tok_l, tok_g, tok_t5), clip_max_length=clip_max_length,
                        t5_max_length=t5_max_length, joint_attention_dim=joint)


class SD3PromptEncoder:
  """An SD3TextEncoder behind the text-encoder interface of the Generator and the DiT trainer
  (sanajax.models.text_encoder.TextEncoder: tokenize, embed, params, abstract_params).

    ids, mask = enc.tokenize(prompts)      # ids (B, 2 clip_length [+ t5_length]) int32: CLIP-L | bigG | T5
                                           # mask (B, clip_length + t5_length) int32 ones: the DiT's text mask
    cond = enc.embed(enc.params, ids, mask)  # {"context": (B, clip_length + t5_length, joint), "pooled": (B, P)}

SD3 has three tokenizers; their ids travel as one array, cut apart again by `embed` (the lengths are
static). SD3's joint attention sees every text token (diffusers passes no mask to the transformer), so
the mask is all ones. The conditioning is a dict, not one array: the MM-DiT also reads the pooled CLIP
vector (backbones.apply_conditioned passes it as `pooled=`; the samplers' CFG batching takes any pytree).
"""

  def __init__(self, encoder: SD3TextEncoder):
    self.encoder = encoder
    self.params = encoder.params
    self.layout = encoder.layout
    self.tokenizer = encoder.tokenizers[0]
    self.max_length = self.layout.clip_length + self.layout.t5_length  # the context length the DiT reads

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = [i for i in self.encoder.tokenize(prompts) if i is not None]
    ids = np.concatenate([np.asarray(i, np.int32) for i in ids], axis=1)
    return ids, np.ones((ids.shape[0], self.max_length), np.int32)

  def embed(self, params, ids: jax.Array, mask: jax.Array | None = None) -> dict:
    """Pure: tokenize's ids -> {"context": (B, L, joint_width), "pooled": (B, Pl + Pg)} float32 (mask unused)."""
    del mask  # SD3 attends to every token, padding included.
    lc = self.layout.clip_length
    ids_t5 = ids[:, 2 * lc:] if self.encoder.use_t5 else None
    context, pooled = self.encoder.embed(params, ids[:, :lc], ids[:, lc:2 * lc], ids_t5)
    return {"context": context, "pooled": pooled}

  def abstract_params(self) -> Any:
    """ShapeDtypeStructs of `params` in their logical-axis boxes (what sanajax.parallel.Plan.place splits by)."""
    lengths = {"clip_l": self.layout.clip_length, "clip_g": self.layout.clip_length, "t5": self.layout.t5_length}
    return {name: jax.eval_shape(model.init, jax.random.key(0),
                                 jax.ShapeDtypeStruct((1, lengths[name]), jnp.int32))["params"]
            for name, model in self.encoder.models.items()}
