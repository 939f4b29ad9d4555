"""SANA linear DiT (Flax Linen, NHWC), equal in math to diffusers `SanaTransformer2DModel`.

    model = build_dit(config.model)
    params = model.init(key, x, t, context, mask)["params"]
    v = model.apply({"params": params}, x, t, context, mask)   # flow velocity, (B, H, W, C)

Inputs: x (B, H, W, C) latents, t (B,) flow time in [0, 1] (t * 1000 * timestep_scale is embedded,
as diffusers' SanaPipeline feeds `timestep * transformer.config.timestep_scale`), context
(B, L, caption_channels) text-encoder states, context_mask (B, L) of 0/1.

SANA-Sprint student options (SANA-Sprint, arXiv:2503.09641, and diffusers' SanaTransformer2DModel names):
  timestep_scale=0.001   dense time embedding: the embedder sees t in [0, 1] instead of 1000 t.
  qk_norm=True           RMSNorm on q and k in self- and cross-attention ("rms_norm_across_heads").
  guidance_embeds=True   CFG embedding: `guidance` (B,) (the raw CFG scale, e.g. 4.5) times
                         guidance_embeds_scale (0.1) goes through its own sinusoid + MLP and is
                         added to the time embedding; that MLP's last layer starts at zero, so a
                         student initialised from a teacher starts as the teacher.
    v = model.apply({"params": params}, x, t, context, mask, guidance=jnp.full((B,), 4.5))
The sCM adaptive-weight head (`LogVarHead`) is a separate module on the conditioning embedding,
which SanaDiT sows as intermediates["time_embedding"] (see LogVarHead), so the DiT's parameter
tree stays exactly diffusers' SanaTransformer2DModel.

Parameter tree (names mirror diffusers' state-dict keys, '.' -> '/'; see
`params_from_diffusers_state_dict`):
  patch_embed/proj                      conv p x p, in_channels -> h
  time_embed/emb/timestep_embedder/linear_{1,2}, time_embed/linear   adaLN-single (h -> 6h)
  (guidance_embeds: time_embed/{timestep_embedder, guidance_embedder}/linear_{1,2}, time_embed/linear,
   as diffusers' SanaCombinedTimestepGuidanceEmbeddings)
  caption_projection/linear_{1,2}, caption_norm/scale
  transformer_blocks_{i}/{attn1, attn2, ff, scale_shift_table}
    (scan_layers=True: ONE subtree transformer_blocks/{...} whose leaves have a leading (depth,) axis
     with logical name "layers"; stack_layers / unstack_layers convert any tree between the two layouts)
  scale_shift_table (2, h), proj_out     final layer (norm_out has no parameters)
Logical axis names of parameters are listed in sanajax.models.layers; image-token activations
are constrained to ("batch", "length", "embed") at block boundaries, the projected caption to
("batch", "text_length", "embed").
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sanajax.dtypes import dtype_from_name
from sanajax.models.attention import CrossAttention, LinearSelfAttention
from sanajax.models.layers import (
  AdaLNSingle,
  CaptionProjection,
  MixFFN,
  PatchEmbed,
  RMSNorm,
  TimestepEmbedder,
  dense,
  layer_norm_no_affine,
  logical_constraint,
  modulate,
  normal_002,
  remat_policy,
  scale_shift_table_init,
  timestep_sinusoid,
  unpatchify,
)
from sanajax.models.weights_util import set_nested, torch_to_numpy

Dtype = Any
ACT_AXES = ("batch", "length", "embed")
LAYERS_AXIS = "layers"  # logical name of the stacked (depth,) axis under scan_layers (parallel.mesh rules).
STACKED_BLOCKS = "transformer_blocks"  # the scanned blocks' subtree; unrolled: transformer_blocks_{i}.
_BLOCK_KEY = re.compile(r"^transformer_blocks_(\d+)$")


class TimestepGuidanceEmbedding(nn.Module):
  """diffusers `SanaCombinedTimestepGuidanceEmbeddings`: adaLN-single with a CFG embedding.

  timestep (B,) (already scaled for the embedder), guidance (B,) (already times
  guidance_embeds_scale) -> (t6 (B, 6h), conditioning (B, h)); conditioning =
  timestep_embedder(sinusoid(timestep)) + guidance_embedder(sinusoid(guidance)),
  t6 = Linear(SiLU(conditioning)). Same outputs as layers.AdaLNSingle.
  """
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: jax.Array, guidance: jax.Array) -> tuple[jax.Array, jax.Array]:
    emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="timestep_embedder")(timestep_sinusoid(timestep))
    # diffusers' guidance_embedder (SANA-Sprint's cfg_embedder): the timestep MLP with its last
    # layer zero-initialised (SanaMSCM), so a student initialised from its teacher computes the
    # teacher's function until the guidance embedding is trained.
    emb = emb + TimestepEmbedder(self.hidden_size, dtype=self.dtype, last_kernel_init=nn.initializers.zeros,
                                 name="guidance_embedder")(timestep_sinusoid(guidance))
    t6 = dense(6 * self.hidden_size, ("embed", "adaln"), dtype=self.dtype, kernel_init=normal_002,
               name="linear")(nn.silu(emb))
    return t6, emb


class LogVarHead(nn.Module):
  """sCM adaptive loss weight (SANA-Sprint `logvar_linear`): Linear(h, 1) on the DiT's conditioning.

  Input: the (B, h) conditioning embedding (time + guidance) that SanaDiT sows as
  `intermediates["time_embedding"]`; output: (B,) log-variance u(t) of the sCM loss
  (1 / e^u) * ||...||^2 + u. Kept outside SanaDiT so the student's parameters stay exactly a
  diffusers SanaTransformer2DModel (diffusers' converter drops logvar_linear). Init as SANA's
  Linears: xavier_uniform kernel, zero bias, so u starts near 0 (weight 1).

    out, state = dit.apply({"params": p}, x, t, ctx, mask, guidance=g, mutable=["intermediates"])
    logvar = LogVarHead().apply({"params": head_p}, state["intermediates"]["time_embedding"][0])
  """

  @nn.compact
  def __call__(self, time_embedding: jax.Array) -> jax.Array:
    u = dense(1, ("embed", None), name="logvar_linear")(time_embedding.astype(jnp.float32))
    return u[:, 0]


class SanaBlock(nn.Module):
  """One SanaMSBlock / diffusers SanaTransformerBlock: (B, N, h) -> (B, N, h).

  x += gate_msa * LinearAttn(LN(x) * (1 + scale_msa) + shift_msa)
  x += CrossAttn(x, context, mask)                       (no norm, no gate)
  x += gate_mlp * MixFFN(LN(x) * (1 + scale_mlp) + shift_mlp, H, W)
  with (shift, scale, gate) x 2 = scale_shift_table (6, h) + t6 (B, 6h); LN non-affine.
  """
  hidden_size: int
  linear_head_dim: int
  cross_num_heads: int
  cross_head_dim: int
  mlp_ratio: float
  attn_eps: float
  norm_eps: float
  qk_norm: bool
  attn_impl: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array, t6: jax.Array,
               height: int, width: int) -> jax.Array:
    h = self.hidden_size
    table = self.param("scale_shift_table", nn.with_logical_partitioning(scale_shift_table_init, (None, "embed")),
                       (6, h), jnp.float32)
    mods = table[None] + t6.astype(jnp.float32).reshape(-1, 6, h)  # (B, 6, h) in float32.
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mods[:, i:i + 1].astype(self.dtype) for i in range(6))

    y = modulate(layer_norm_no_affine(x, self.norm_eps), shift_msa, scale_msa)
    y = LinearSelfAttention(h, self.linear_head_dim, eps=self.attn_eps, qk_norm=self.qk_norm, impl=self.attn_impl,
                            dtype=self.dtype, name="attn1")(y)
    x = x + gate_msa * y

    x = x + CrossAttention(h, self.cross_num_heads, self.cross_head_dim, qk_norm=self.qk_norm, dtype=self.dtype,
                           name="attn2")(x, context, context_mask)

    y = modulate(layer_norm_no_affine(x, self.norm_eps), shift_mlp, scale_mlp)
    y = MixFFN(h, self.mlp_ratio, dtype=self.dtype, name="ff")(y, height, width)
    x = x + gate_mlp * y
    return logical_constraint(x, ACT_AXES)


class _ScanStep(SanaBlock):
  """SanaBlock as an nn.scan body: (x carry; residual scanned; context, mask, t6 broadcast) ->
  (x, x if emit else None).

  residual: this block's ControlNet residual (B, N, h) added to its output (zeros where none), or
  None. The latent grid (height, width) is a module field because scan carries arrays only; `emit`
  makes the step also output its block output, stacked by scan to (depth, B, N, h) for features_at.
  """
  height: int = 1
  width: int = 1
  emit: bool = False

  def __call__(self, x, residual, context, context_mask, t6):  # pylint: disable=arguments-differ
    x = SanaBlock.__call__(self, x, context, context_mask, t6, self.height, self.width)
    if residual is not None:
      x = x + residual.astype(x.dtype)
    return x, (x if self.emit else None)


class SanaDiT(nn.Module):
  """The SANA linear DiT. See the module docstring for inputs and the parameter tree.

  features_at: block indices whose outputs (B, N, h) are also returned (Sprint's LADD
  discriminator taps teacher blocks); when non-empty, __call__ returns (prediction, [features]).
  scan_layers: the blocks run as one nn.scan over stacked parameters (compile time flat in depth;
  docs/scaling.md#compile-time); with features_at the scan also outputs every block's tokens
  ((depth, B, N, h), then indexed), the activations remat keeps as scan carries anyway; ControlNet
  residuals enter as a scanned (depth, B, N, h) input, zeros for the blocks without one.
  """
  depth: int
  hidden_size: int
  linear_head_dim: int
  cross_num_heads: int
  cross_head_dim: int
  mlp_ratio: float = 2.5
  patch_size: int = 1
  caption_channels: int = 2304
  in_channels: int = 32
  out_channels: int | None = None
  use_pe: bool = False
  pe_interpolation: float = 1.0
  pe_base_size: int | None = None
  attn_eps: float = 1e-15
  norm_eps: float = 1e-6
  y_norm_scale: float = 0.01
  qk_norm: bool = False
  timestep_scale: float = 1.0
  guidance_embeds: bool = False
  guidance_embeds_scale: float = 0.1
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"
  remat: str = "none"
  scan_layers: bool = False
  features_at: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array | None = None, *,
               guidance: jax.Array | None = None, controlnet_residuals: Sequence[jax.Array] | None = None,
               deterministic: bool = True):
    """Flow velocity (B, H, W, C) (and block features if features_at; see the class docstring).

    guidance: (B,) raw CFG scale (e.g. 4.5; the model multiplies it by guidance_embeds_scale),
      required at apply time when guidance_embeds, refused otherwise. `init` without it uses zeros.
    controlnet_residuals: a ControlNet's per-block outputs (sanajax.models.controlnet), N arrays
      (B, H/p * W/p, h); residual k is added to the tokens after block k + 1 (k < N < depth), as
      diffusers' SanaTransformer2DModel adds `controlnet_block_samples`.
    """
    del deterministic  # No dropout in SANA (DropPath 0, attention dropout 0); kept for the trainer API.
    if guidance is not None and not self.guidance_embeds:
      raise ValueError("guidance= was given but this SanaDiT has guidance_embeds=False (model.guidance_embeds).")
    if self.guidance_embeds and guidance is None:
      if not self.is_initializing():
        raise ValueError("This SanaDiT has guidance_embeds=True (a Sprint student): pass guidance=(B,) CFG scales.")
      guidance = jnp.zeros(x.shape[:1], jnp.float32)
    b, hh, ww, _ = x.shape
    p = self.patch_size
    gh, gw = hh // p, ww // p
    h = self.hidden_size
    out_channels = self.out_channels or self.in_channels
    if context_mask is None:
      context_mask = jnp.ones(context.shape[:2], jnp.int32)

    tokens = PatchEmbed(h, p, use_pe=self.use_pe, pe_interpolation=self.pe_interpolation,
                        pe_base_size=self.pe_base_size, dtype=self.dtype, name="patch_embed")(x)
    tokens = logical_constraint(tokens, ACT_AXES)
    # 1000 * timestep_scale is a Python float (exactly 1.0 for Sprint's 0.001), so dense time is t itself.
    timestep = t.astype(jnp.float32) * (1000.0 * self.timestep_scale)
    if self.guidance_embeds:
      g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), x.shape[:1]) * self.guidance_embeds_scale
      t6, t_emb = TimestepGuidanceEmbedding(h, dtype=self.dtype, name="time_embed")(timestep, g)
    else:
      t6, t_emb = AdaLNSingle(h, dtype=self.dtype, name="time_embed")(timestep)
    self.sow("intermediates", "time_embedding", t_emb)  # For LogVarHead; free unless made mutable.

    ctx = CaptionProjection(h, dtype=self.dtype, name="caption_projection")(context)
    ctx = RMSNorm(1e-5, scale_init=self.y_norm_scale, dtype=self.dtype, name="caption_norm")(ctx)
    ctx = logical_constraint(ctx, ("batch", "text_length", "embed"))

    block_fields = (h, self.linear_head_dim, self.cross_num_heads, self.cross_head_dim, self.mlp_ratio,
                    self.attn_eps, self.norm_eps, self.qk_norm, self.attn_impl, self.dtype)
    features = []
    if self.scan_layers:
      residuals = None
      if controlnet_residuals is not None:  # residual k follows block k + 1: zeros before and after them.
        r = jnp.stack([c.astype(tokens.dtype) for c in controlnet_residuals])
        residuals = jnp.pad(r, ((1, self.depth - 1 - len(controlnet_residuals)),) + ((0, 0),) * (r.ndim - 1))
      step_cls = _ScanStep
      if self.remat != "none":
        # prevent_cse=False: scan already keeps XLA from CSE-ing the recomputation (MaxText does the same).
        step_cls = nn.remat(_ScanStep, policy=remat_policy(self.remat), prevent_cse=False)
      scan_cls = nn.scan(step_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                         metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
      tokens, stacked = scan_cls(*block_fields, height=gh, width=gw, emit=bool(self.features_at),
                                 name=STACKED_BLOCKS)(tokens, residuals, ctx, context_mask, t6)
      features = [stacked[i] for i in self.features_at]
    else:
      block_cls = SanaBlock
      if self.remat != "none":
        # static_argnums counts `self` as 0: (x, context, mask, t6, height, width) -> height=5, width=6.
        block_cls = nn.remat(SanaBlock, policy=remat_policy(self.remat), static_argnums=(5, 6))
      for i in range(self.depth):
        tokens = block_cls(*block_fields, name=f"transformer_blocks_{i}")(tokens, ctx, context_mask, t6, gh, gw)
        if controlnet_residuals is not None and 0 < i <= len(controlnet_residuals):
          tokens = tokens + controlnet_residuals[i - 1].astype(tokens.dtype)
        if i in self.features_at:
          features.append(tokens)

    # Final layer (T2IFinalLayer / SanaModulatedNorm): shift, scale from table (2, h) + embedded t.
    table = self.param("scale_shift_table", nn.with_logical_partitioning(scale_shift_table_init, (None, "embed")),
                       (2, h), jnp.float32)
    mods = table[None] + t_emb.astype(jnp.float32)[:, None]
    shift, scale = mods[:, 0:1].astype(self.dtype), mods[:, 1:2].astype(self.dtype)
    tokens = modulate(layer_norm_no_affine(tokens, self.norm_eps), shift, scale)
    out = dense(p * p * out_channels, ("embed", "channels"), dtype=self.dtype, name="proj_out")(tokens)
    out = unpatchify(out, gh, gw, p).astype(x.dtype)
    if self.features_at:
      return out, features
    return out


def build_dit(model_config: Mapping[str, Any], **overrides) -> SanaDiT:
  """SanaDiT from a config's `model` ConfigDict (fields as configs/tiny.py; optional
  pe_interpolation, sample_size (the latent side the PE grid is based on, diffusers'
  `sample_size`; default: the input's), out_channels, scan_layers (False), and the Sprint fields timestep_scale (1.0),
  guidance_embeds (False), guidance_embeds_scale (0.1)). `overrides` replace fields, e.g. features_at."""
  c = dict(model_config)
  if c.get("name", "sana_dit") != "sana_dit":
    raise ValueError(f"build_dit builds model.name='sana_dit', got {c['name']!r}.")
  dtype = dtype_from_name(c.get("dtype", "float32"), "model.dtype")
  kwargs = dict(
      depth=c["depth"], hidden_size=c["hidden_size"], linear_head_dim=c["linear_head_dim"],
      cross_num_heads=c["cross_num_heads"], cross_head_dim=c["cross_head_dim"], mlp_ratio=c["mlp_ratio"],
      patch_size=c["patch_size"], caption_channels=c["caption_channels"], in_channels=c["in_channels"],
      out_channels=c.get("out_channels"), use_pe=c.get("use_pe", False),
      pe_interpolation=float(c.get("pe_interpolation") or 1.0),
      pe_base_size=(c["sample_size"] // c["patch_size"]) if c.get("sample_size") else None,
      attn_eps=c["attn_eps"], norm_eps=c["norm_eps"], y_norm_scale=c["y_norm_scale"], qk_norm=c.get("qk_norm", False),
      timestep_scale=float(c.get("timestep_scale", 1.0)), guidance_embeds=bool(c.get("guidance_embeds", False)),
      guidance_embeds_scale=float(c.get("guidance_embeds_scale", 0.1)),
      dtype=dtype, attn_impl=c.get("attn_impl", "xla"), remat=c.get("remat", "none"),
      scan_layers=bool(c.get("scan_layers", False)))
  kwargs.update(overrides)
  if kwargs["hidden_size"] % kwargs["linear_head_dim"]:
    raise ValueError(f"hidden_size {kwargs['hidden_size']} is not a multiple of linear_head_dim "
                     f"{kwargs['linear_head_dim']}.")
  return SanaDiT(**kwargs)


def dummy_inputs(model_config: Mapping[str, Any], latent_hw: tuple[int, int], text_length: int, batch: int = 1):
  """ShapeDtypeStructs (x, t, context, mask) for jax.eval_shape / init."""
  c = model_config
  return (jax.ShapeDtypeStruct((batch, *latent_hw, c["in_channels"]), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length, c["caption_channels"]), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length), jnp.int32))


def student_params_from_teacher(teacher_params: Mapping[str, Any], student_params: Mapping[str, Any]) -> dict:
  """A Sprint student's initial parameters: every teacher weight copied into a fresh student init.

  Args:
    teacher_params: SanaDiT params (time embedder at time_embed/emb/timestep_embedder, or the
      guidance layout if the teacher already has one).
    student_params: the student's own init (e.g. guidance_embeds=True, qk_norm=True); leaves the
      teacher lacks keep their init: the zero-output guidance embedder, and q/k norm scales (ones)
      when the teacher has no qk_norm.
  Returns:
    A new params dict with the student's structure. Raises ValueError when a teacher leaf has no
    place in the student or the shapes differ (different depth / width).
  """
  teacher_params = to_layout(teacher_params, is_stacked(student_params))  # either block layout.
  flat_student = flatten_dict(student_params, sep="/")
  out = dict(flat_student)
  for name, value in flatten_dict(teacher_params, sep="/").items():
    key = name
    if key.startswith("time_embed/emb/timestep_embedder/") and key not in flat_student:
      key = key.replace("time_embed/emb/", "time_embed/", 1)  # adaLN-single -> the guidance layout.
    if key not in flat_student:
      raise ValueError(f"Teacher parameter {name} has no counterpart in the student.")
    if tuple(np.shape(value)) != tuple(np.shape(flat_student[key])):
      raise ValueError(f"Teacher parameter {name} has shape {np.shape(value)}, the student's "
                       f"{key} {np.shape(flat_student[key])}.")
    out[key] = value
  return unflatten_dict(out, sep="/")


# --- the two block layouts (unrolled transformer_blocks_{i} <-> stacked transformer_blocks) ---------------


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)  # nn.LogicallyPartitioned is a subclass.


def _has_unrolled(node: Any) -> bool:
  return isinstance(node, Mapping) and any(_BLOCK_KEY.match(str(k)) for k in node)


def _has_stacked(node: Any) -> bool:
  return isinstance(node, Mapping) and isinstance(node.get(STACKED_BLOCKS), Mapping)


def _stack_leaf(*xs: Any) -> Any:
  x0 = xs[0]
  if _is_box(x0):  # the stacked axis gets the logical name "layers", as nn.scan's metadata_params gives it.
    return x0.replace(value=_stack_leaf(*[x.value for x in xs]), names=(LAYERS_AXIS,) + tuple(x0.names))
  if isinstance(x0, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(x0.shape), x0.dtype, sharding=_layer_sharding(x0.sharding, 1))
  return jnp.stack([jnp.asarray(x) for x in xs])


def _unstack_leaf(x: Any, i: int) -> Any:
  if _is_box(x):
    return x.replace(value=_unstack_leaf(x.value, i), names=tuple(x.names[1:]))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=_layer_sharding(x.sharding, -1))
  return x[i]


def _layer_sharding(sharding: Any, change: int) -> Any:
  """An abstract leaf's NamedSharding with the (unsharded) layer axis added (change 1) or removed (-1)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec)
  spec = (None,) + spec if change > 0 else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def stack_layers(tree: Any) -> Any:
  """Any pytree (params, boxed params, ShapeDtypeStructs, a train state's optimizer moments) with every
  dict of transformer_blocks_{0..depth-1} subtrees turned into the scan_layers layout: one
  `transformer_blocks` subtree whose leaves are stacked on a new leading (depth,) axis (logical name
  "layers" on boxed leaves). Trees already stacked pass through unchanged."""
  def one(node):
    if not _has_unrolled(node):
      return node
    index = {int(_BLOCK_KEY.match(str(k)).group(1)): k for k in node if _BLOCK_KEY.match(str(k))}
    if sorted(index) != list(range(len(index))):
      raise ValueError(f"Block subtrees {sorted(index)} are not transformer_blocks_0..{len(index) - 1}.")
    out = {k: v for k, v in node.items() if not _BLOCK_KEY.match(str(k))}
    out[STACKED_BLOCKS] = jax.tree.map(_stack_leaf, *[node[index[i]] for i in range(len(index))], is_leaf=_is_box)
    return out
  return jax.tree.map(one, tree, is_leaf=_has_unrolled)


def unstack_layers(tree: Any) -> Any:
  """The inverse of stack_layers: every stacked `transformer_blocks` subtree back to
  transformer_blocks_{i} (depth from the leading axis). Unrolled trees pass through unchanged."""
  def one(node):
    if not _has_stacked(node):
      return node
    blocks = node[STACKED_BLOCKS]
    first = jax.tree.leaves(blocks, is_leaf=_is_box)[0]
    depth = (first.value if _is_box(first) else first).shape[0]
    out = {k: v for k, v in node.items() if k != STACKED_BLOCKS}
    for i in range(depth):
      out[f"transformer_blocks_{i}"] = jax.tree.map(lambda x, i=i: _unstack_leaf(x, i), blocks, is_leaf=_is_box)
    return out
  return jax.tree.map(one, tree, is_leaf=_has_stacked)


def to_layout(tree: Any, scan_layers: bool) -> Any:
  """`tree` in the stacked (scan_layers) or unrolled block layout, whichever it was saved in: how a
  checkpoint or converted weights of one layout load into a model of the other."""
  return stack_layers(tree) if scan_layers else unstack_layers(tree)


def is_stacked(params: Mapping[str, Any]) -> bool:
  """Whether a DiT params tree is in the scan_layers layout."""
  return _has_stacked(params)


# --- diffusers weights --------------------------------------------------------------------------

# 1x1 convs that are Dense layers here: torch (O, I, 1, 1) -> (I, O) (and back in sana_dit_diffusers).
POINTWISE_CONVS = ("conv_inverted", "conv_point")


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Flax params of SanaDiT from a diffusers SanaTransformer2DModel state dict (tensors or arrays).

  Rule: 'transformer_blocks.3.attn1.to_out.0.weight' -> transformer_blocks_3/attn1/to_out/kernel;
  Linear weights transpose, conv weights (O, I, kh, kw) -> (kh, kw, I, O) (1x1 convs -> (I, O)),
  1-D norm weights -> 'scale', scale_shift_table as is. Non-persistent buffers (pos_embed) are
  not in the state dict. A guidance_embeds model's time_embed.{timestep,guidance}_embedder keys map
  by the same rule (SanaDiT mirrors SanaCombinedTimestepGuidanceEmbeddings); size embedders are not
  supported.
  """
  params: dict = {}
  for key, value in state_dict.items():
    arr = torch_to_numpy(value)
    parts = key.split(".")
    if parts[0] == "transformer_blocks":
      parts = [f"transformer_blocks_{parts[1]}"] + parts[2:]
    parts = [q for i, q in enumerate(parts) if not (q == "0" and i > 0 and parts[i - 1] == "to_out")]
    leaf = parts[-1]
    if leaf == "scale_shift_table":
      path, out = parts, arr
    elif leaf == "bias":
      path, out = parts, arr
    elif leaf == "weight" and arr.ndim == 2:
      path, out = parts[:-1] + ["kernel"], arr.T
    elif leaf == "weight" and arr.ndim == 4:
      if parts[-2] in POINTWISE_CONVS:
        out = arr[:, :, 0, 0].T
      else:
        out = arr.transpose(2, 3, 1, 0)
      path = parts[:-1] + ["kernel"]
    elif leaf == "weight" and arr.ndim == 1:
      path, out = parts[:-1] + ["scale"], arr
    else:
      raise KeyError(f"Do not know how to map diffusers key {key!r} of shape {arr.shape}.")
    set_nested(params, path, jnp.asarray(out))
  return params


def diffusers_kwargs(model_config: Mapping[str, Any], sample_size: int | None = None) -> dict:
  """The SanaTransformer2DModel(**kwargs) equal to a `model` config (for parity tests and counts).

  sample_size defaults to the config's (else 32, diffusers' default)."""
  c = model_config
  sample_size = sample_size or c.get("sample_size") or 32
  h = c["hidden_size"]
  return dict(
      in_channels=c["in_channels"], out_channels=c.get("out_channels") or c["in_channels"],
      num_attention_heads=h // c["linear_head_dim"], attention_head_dim=c["linear_head_dim"], num_layers=c["depth"],
      num_cross_attention_heads=c["cross_num_heads"], cross_attention_head_dim=c["cross_head_dim"],
      cross_attention_dim=h, caption_channels=c["caption_channels"], mlp_ratio=c["mlp_ratio"],
      attention_bias=False, sample_size=sample_size, patch_size=c["patch_size"], norm_eps=c["norm_eps"],
      interpolation_scale=(c.get("pe_interpolation") or 1.0) if c.get("use_pe") else None,
      qk_norm="rms_norm_across_heads" if c.get("qk_norm") else None,
      guidance_embeds=bool(c.get("guidance_embeds", False)),
      guidance_embeds_scale=float(c.get("guidance_embeds_scale", 0.1)),
      timestep_scale=float(c.get("timestep_scale", 1.0)))
