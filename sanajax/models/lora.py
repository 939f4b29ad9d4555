"""LoRA: low-rank adapters on a frozen DiT's projections, without touching the model code.

An adapter set is a flat dict over flax module paths of the model's Dense layers (2-D kernels):

    lora = {"transformer_blocks_0/attn1/to_q": {"a": (in, r), "b": (r, out), "alpha": ()}, ...}

and adapts the kernel W (in, out) to W + scale * (alpha / r) * a @ b (PEFT's LoRA: lora_A = a.T,
lora_B = b.T, scaling lora_alpha / r; "alpha" absent means alpha = r). Two ways to use it:

    params = merge(params, lora, scale=1.0)        # into the weights (sampling: no cost per step)
    params = unmerge(params, lora, scale=1.0)      # back (up to float rounding)
    with injected([(lora, 1.0)], dropout=0.1, rng=key):   # on the fly, as PEFT's forward:
      v = dit.apply({"params": base}, x, t, ctx, mask)    # y = x W + b + s (dropout(x) a) b

`injected` intercepts the model's nn.Dense calls (flax.linen.intercept_methods), so the same SanaDiT /
Sprint student / MM-DiT code runs with frozen base weights in any dtype (bf16 storage: `cast_kernels`),
the adapters' gradient never forms a full (in, out) matrix, and lora_dropout acts on the layer's input
exactly as PEFT's. Adapters stack: each (lora, scale) adds its term.

Targets (`target_paths`) follow PEFT's LoraConfig.target_modules over diffusers' module names
(sanajax.models.lora_diffusers.module_name): a list entry matches a module whose name equals it or
ends with "." + it ("to_q" matches every attn1.to_q and attn2.to_q; "attn1.to_q" only self-attention);
a single string is a regular expression the whole name must match. Candidates are the model's Dense
layers: SANA's attention to_q / to_k / to_v / to_out.0, Mix-FFN's 1x1 convs conv_inverted /
conv_point, and the embedders' and proj_out's Linears.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from sanajax.dtypes import dtype_from_name
from sanajax.models.lora_diffusers import module_name, short_name

Lora = dict[str, dict[str, Any]]
# The SANA projections adapters go on by default (README "LoRA"): attention q/k/v/out and Mix-FFN's 1x1 convs.
SANA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """PEFT LoraConfig's fields that sanajax reads (config.lora)."""
  r: int
  lora_alpha: float
  lora_dropout: float = 0.0
  target_modules: Sequence[str] | str = SANA_TARGETS

  @classmethod
  def from_config(cls, c: Mapping[str, Any]) -> LoraSpec:
    targets = c.get("target_modules", SANA_TARGETS)
    return cls(r=int(c["r"]), lora_alpha=float(c.get("lora_alpha", c["r"])),
               lora_dropout=float(c.get("lora_dropout", 0.0)),
               target_modules=targets if isinstance(targets, str) else tuple(targets))


def dense_modules(params: Mapping) -> dict[str, tuple[int, int]]:
  """{flax module path: (in, out)} of every Dense layer (a 2-D 'kernel') in a params tree (boxed or not)."""
  flat = flatten_dict(nn.unbox(params), sep="/")
  return {k[:-len("/kernel")]: tuple(v.shape) for k, v in flat.items() if k.endswith("/kernel") and len(v.shape) == 2}


def valid_targets(params: Mapping) -> list[str]:
  """The short diffusers names (PEFT target_modules entries) a model offers: 'to_q', 'to_out.0', ..."""
  return sorted({short_name(module_name(p)) for p in dense_modules(params)})


def target_paths(params: Mapping, target_modules: Sequence[str] | str) -> list[str]:
  """Flax module paths of the Dense layers that `target_modules` names (PEFT's matching, see the module
  docstring). Raises ValueError (one line, naming the valid names) for an entry that matches nothing."""
  modules = dense_modules(params)
  names = {p: module_name(p) for p in modules}
  if isinstance(target_modules, str):
    chosen = [p for p, n in names.items() if re.fullmatch(target_modules, n)]
    if not chosen:
      raise ValueError(f"lora.target_modules={target_modules!r} matches no module of this model; valid names: "
                       f"{', '.join(valid_targets(params))}.")
    return sorted(chosen)
  if not target_modules:
    raise ValueError(f"lora.target_modules is empty; valid names: {', '.join(valid_targets(params))}.")
  unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names.values())]
  if unknown:
    raise ValueError(f"lora.target_modules: {', '.join(map(repr, unknown))} "
                     f"{'is' if len(unknown) == 1 else 'are'} not a module of this model; valid names: "
                     f"{', '.join(valid_targets(params))}.")
  return sorted(p for p, n in names.items() if any(n == t or n.endswith("." + t) for t in target_modules))


def init(key: jax.Array, params: Mapping, paths: Iterable[str], r: int, *, boxed: bool = False) -> dict:
  """Fresh adapters as a NESTED tree (the train state's layout; `flat` makes the public dict) on `paths`:
  a = kaiming_uniform(a=sqrt(5)) as PEFT's lora_A (uniform +-1/sqrt(in)), b = 0, so the adapted model
  starts as the base. boxed: a and b carry the kernel's logical axis names (a: (in_axis, None), b:
  (None, out_axis)) so a sharding plan splits them as the kernel."""
  flat_params = flatten_dict(params, sep="/", is_leaf=lambda k, x: isinstance(x, nn.Partitioned))
  out = {}
  for i, path in enumerate(sorted(paths)):
    kernel = flat_params[f"{path}/kernel"]
    names = kernel.names if isinstance(kernel, nn.Partitioned) else (None, None)
    fan_in, fan_out = kernel.value.shape if isinstance(kernel, nn.Partitioned) else kernel.shape
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, r), jnp.float32, -bound, bound)
    b = jnp.zeros((r, fan_out), jnp.float32)
    if boxed:
      a, b = nn.LogicallyPartitioned(a, (names[0], None)), nn.LogicallyPartitioned(b, (None, names[1]))
    out[f"{path}/a"], out[f"{path}/b"] = a, b
  return unflatten_dict(out, sep="/")


def flat(tree: Mapping, alpha: float | None = None) -> Lora:
  """Nested adapter tree (train state) -> the flat {path: {"a", "b"[, "alpha"]}} dict (unboxed);
  alpha: set every entry's alpha (config.lora.lora_alpha)."""
  leaves = flatten_dict(nn.unbox(tree), sep="/")
  out: Lora = {}
  for key, value in leaves.items():
    path, leaf = key.rsplit("/", 1)
    out.setdefault(path, {})[leaf] = value
  if alpha is not None:
    for entry in out.values():
      entry["alpha"] = alpha
  return out


def nested(lora: Mapping[str, Mapping[str, Any]]) -> dict:
  """The flat dict -> the nested {a, b} tree (alpha dropped: it is configuration, not a trained value)."""
  return unflatten_dict({f"{p}/{k}": e[k] for p, e in lora.items() for k in ("a", "b")}, sep="/")


def _scaling(entry: Mapping[str, Any]) -> Any:
  r = entry["a"].shape[1]
  return entry["alpha"] / r if "alpha" in entry else 1.0


def delta(entry: Mapping[str, Any]) -> jax.Array:
  """The kernel change (in, out) of one adapter at scale 1: (alpha / r) a @ b, float32."""
  a, b = jnp.asarray(entry["a"], jnp.float32), jnp.asarray(entry["b"], jnp.float32)
  return (a @ b) * jnp.asarray(_scaling(entry), jnp.float32)


def check_fits(params: Mapping, lora: Mapping[str, Mapping[str, Any]], source: str = "the LoRA") -> None:
  """Every adapter names a Dense layer of `params` with matching (in, out); else one-line ValueError."""
  modules = dense_modules(params)
  for path, entry in lora.items():
    if path not in modules:
      raise ValueError(f"{source}: module {module_name(path)} is not in this model (its Dense layers include "
                       f"{', '.join(valid_targets(params))}); was it trained for another model?")
    want = modules[path]
    got = (entry["a"].shape[0], entry["b"].shape[1])
    if got != want or entry["a"].shape[1] != entry["b"].shape[0]:
      raise ValueError(f"{source}: module {module_name(path)} has a {tuple(entry['a'].shape)} @ "
                       f"{tuple(entry['b'].shape)} adapter but the layer is {want[0]} -> {want[1]}.")


def _apply_delta(params: Mapping, lora: Mapping[str, Mapping[str, Any]], sign: float) -> dict:
  check_fits(params, lora)
  flat_params = flatten_dict(params, sep="/", is_leaf=lambda k, x: isinstance(x, nn.Partitioned))
  out = dict(flat_params)
  for path, entry in lora.items():
    kernel = out[f"{path}/kernel"]
    value = kernel.value if isinstance(kernel, nn.Partitioned) else kernel
    new = (jnp.asarray(value, jnp.float32) + sign * delta(entry)).astype(value.dtype)
    out[f"{path}/kernel"] = kernel.replace_boxed(new) if isinstance(kernel, nn.Partitioned) else new
  return unflatten_dict(out, sep="/")


def merge(params: Mapping, lora: Mapping[str, Mapping[str, Any]], scale: float = 1.0) -> dict:
  """params with every adapted kernel W -> W + scale (alpha / r) a @ b (in float32, back to W's dtype).
  Boxed params stay boxed. Raises ValueError when an adapter does not fit the model (check_fits)."""
  return _apply_delta(params, lora, float(scale))


def unmerge(params: Mapping, lora: Mapping[str, Mapping[str, Any]], scale: float = 1.0) -> dict:
  """The inverse of merge (W -> W - scale (alpha / r) a @ b; equal up to float rounding)."""
  return _apply_delta(params, lora, -float(scale))


def cast_kernels(params: Mapping, dtype: str) -> dict:
  """Frozen base storage: every 2-D / 4-D 'kernel' as `dtype` (float32 | bfloat16 | float16); norms,
  biases and tables stay float32. The Dense layers cast to the compute dtype as they read them."""
  target = dtype_from_name(dtype, "lora.base_dtype")
  flat_params = flatten_dict(params, sep="/", is_leaf=lambda k, x: isinstance(x, nn.Partitioned))

  def cast(key, x):
    if not key.endswith("/kernel"):
      return x
    if isinstance(x, nn.Partitioned):
      return x.replace_boxed(x.value.astype(target))
    return x.astype(target)

  return unflatten_dict({k: cast(k, v) for k, v in flat_params.items()}, sep="/")


@contextlib.contextmanager
def injected(adapters: Sequence[tuple[Mapping[str, Mapping[str, Any]], float]], *, dropout: float = 0.0,
             rng: jax.Array | None = None):
  """Within the block, every nn.Dense whose module path has an adapter returns
  x W + b + sum_i scale_i (alpha_i / r_i) (dropout(x) a_i) b_i  (PEFT's LoRA forward; computed in the
  layer's compute dtype). dropout needs rng (one mask per module and adapter, folded from rng);
  dropout=0 or rng=None: no dropout (sampling). Trace model.apply inside the block (also under jit)."""
  table: dict[str, list] = {}
  for i, (lora, scale) in enumerate(adapters):
    for path, entry in lora.items():
      table.setdefault(path, []).append((i, entry, float(scale)))

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    y = next_fun(*args, **kwargs)
    if path not in table:
      return y
    x = args[0]
    dtype = module.dtype or x.dtype
    for i, entry, scale in table[path]:
      xi = x
      if dropout > 0.0 and rng is not None:
        key = jax.random.fold_in(jax.random.fold_in(rng, i), zlib.crc32(path.encode()))
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        xi = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
      a, b = jnp.asarray(entry["a"]).astype(dtype), jnp.asarray(entry["b"]).astype(dtype)
      y = y + ((xi.astype(dtype) @ a) @ b * jnp.asarray(scale * _scaling(entry), dtype)).astype(y.dtype)
    return y

  with nn.intercept_methods(interceptor):
    yield
