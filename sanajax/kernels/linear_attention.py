"""ReLU linear attention (SANA's LiteLA), O(N) in the number of tokens.

    out = relu(q) (relu(k)^T v) / (relu(q) relu(k)^T 1 + eps)

The K^T V state (D x Dv per head) and the normaliser (D per head) are accumulated in
float32 whatever the input dtype, as SANA does (`fp32_attention`), and the division is
done in float32; the output is cast back to v's dtype.

One reference (`linear_attention_reference`), one module per Pallas backend:
  linear_attention_pallas_triton  Triton backend: any GPU; CPU via interpret=True
  linear_attention_mosaic_gpu     Mosaic GPU: Hopper (sm_90+); state pass only, unverified on a GPU
  linear_attention_tpu            Mosaic TPU; CPU via interpret=True
All three pack G heads side by side into one lane-dense block (sanajax.kernels._common). Without
a device, every backend is checked by lowering it for "cuda" / "tpu" from a CPU machine (the
explicit impls trace anywhere; only compiling them for the CPU is an error).
Each backend module has `forward(q, k, v, *, eps, interpret) -> (out, kv, ksum)` and
`backward(q, k, v, kv, ksum, g, *, eps, interpret) -> (dq, dk, dv)`.

Autodiff: `_la_vjp` is a `jax.custom_vjp` whose backward is the backend's backward
kernels. The public path wraps it in a `jax.custom_jvp` (forward mode is what sCM
distillation needs, and custom_vjp alone rejects `jax.jvp`); the JVP rule's tangent is a
`jax.custom_derivatives.linear_call` of a jnp tangent map whose *declared transpose* is
the backward kernels. So `jax.jvp` evaluates the jnp tangent map, and `jax.grad` /
`jax.vjp` (linearize, then transpose) call the backward kernels, not an XLA transpose.
Limit: a `jax.grad` of a function that itself calls `jax.jvp` (second order, with
tangents flowing through q/k/v) is not supported by `linear_call`; stop_gradient the
jvp's primal inputs (as sCM's teacher/target branch does) or use impl="xla" there.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import linear_call
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

_LOG = logging.getLogger(__name__)

_BACKEND_MODULES = {
    "triton": "sanajax.kernels.linear_attention_pallas_triton",
    "mosaic_gpu": "sanajax.kernels.linear_attention_mosaic_gpu",
    "tpu": "sanajax.kernels.linear_attention_tpu",
}
# impl names: "auto", "xla", "pallas", or a specific Pallas backend.
_EXPLICIT_IMPLS = {"pallas_triton": "triton", "pallas_mosaic_gpu": "mosaic_gpu",
                   "pallas_tpu": "tpu"}
IMPLS = ("auto", "xla", "pallas", *_EXPLICIT_IMPLS)


def linear_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15) -> jax.Array:
  """Pure-jnp reference. q, k: (B, N, H, D), v: (B, N, H, Dv) -> (B, N, H, Dv) in v's dtype.

  Computed as diffusers' SanaLinearAttnProcessor does, in (B, H, N, D) with v padded by a column
  of ones, so the normaliser relu(k)^T 1 rides in the K^T V matmul and each step is one batched
  matmul over (B, H). On CPU this form ran 2.0x faster than three einsums in (B, N, H, D)
  (N = 4096, H = 70, D = 32, float32; benchmarks/RESULTS.md) and is as fast as torch.
  """
  f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # (B, H, N, D)
  qf, kf, vf = jax.nn.relu(f32(q)), jax.nn.relu(f32(k)), f32(v)
  v1 = jnp.concatenate([vf, jnp.ones(vf.shape[:-1] + (1,), jnp.float32)], axis=-1)  # (B, H, N, Dv + 1)
  kv = jnp.einsum("bhnd,bhne->bhde", kf, v1)  # (B, H, D, Dv + 1): the K^T V state | relu(k)^T 1.
  out = jnp.einsum("bhnd,bhde->bhne", qf, kv)  # (B, H, N, Dv + 1): num | den.
  out = out[..., :-1] / (out[..., -1:] + eps)
  return jnp.swapaxes(out, 1, 2).astype(v.dtype)


# ------------------------------------------------------------------------------ autodiff


class _Config(NamedTuple):
  """Static (hashable) kernel settings carried through the custom derivatives."""
  backend: str  # key of _BACKEND_MODULES
  eps: float
  interpret: bool


def _module(backend: str):
  return importlib.import_module(_BACKEND_MODULES[backend])


# The Pallas kernels compile only for their accelerator, but must trace and lower for it on a CPU-only
# machine (jit(...).trace(...).lower(lowering_platforms=("cuda",)) checks them in CI). So the platform
# is not checked at trace time: this identity primitive passes the kernel's inputs through and its
# CPU lowering raises, i.e. compiling such a call for the CPU fails with one clear line, and
# lowering it for "cuda" / "tpu" emits nothing.
_device_only_p = Primitive("linear_attention_device_only")
_device_only_p.multiple_results = True
_device_only_p.def_abstract_eval(lambda *avals, backend: avals)
# Eager calls compile it on their own (so an eager CPU call raises the same clear error).
_device_only_p.def_impl(lambda *xs, backend: jax.jit(functools.partial(_device_only_p.bind, backend=backend))(*xs))
batching.primitive_batchers[_device_only_p] = lambda args, dims, backend: (_device_only_p.bind(*args, backend=backend),
                                                                           dims)
mlir.register_lowering(_device_only_p, lambda ctx, *args, backend: list(args))


def _device_only_cpu_lowering(ctx, *args, backend):
  impl = {v: k for k, v in _EXPLICIT_IMPLS.items()}[backend]
  raise ValueError(f"linear_attention: the {impl!r} kernel is being compiled for the CPU, where it cannot run; "
                   "run it on its accelerator, lower it for one (jit(f).trace(...).lower(lowering_platforms=...)), "
                   "or use impl='xla' (or interpret=True) on CPU.")


mlir.register_lowering(_device_only_p, _device_only_cpu_lowering, platform="cpu")


def _device_only(cfg: _Config, *xs):
  return xs if cfg.interpret else tuple(_device_only_p.bind(*xs, backend=cfg.backend))


def _forward(cfg: _Config, q, k, v):
  q, k, v = _device_only(cfg, q, k, v)
  return _module(cfg.backend).forward(q, k, v, eps=cfg.eps, interpret=cfg.interpret)


def _backward(cfg: _Config, q, k, v, kv, ksum, g):
  q, k, v = _device_only(cfg, q, k, v)
  # The Mosaic GPU module has no backward kernels; Hopper uses the Triton ones.
  backend = "triton" if cfg.backend == "mosaic_gpu" else cfg.backend
  return _module(backend).backward(q, k, v, kv, ksum, g, eps=cfg.eps, interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _la_vjp(q, k, v, cfg: _Config):
  """Reverse-mode-only kernel path: (B, N, H, D) x3 -> (B, N, H, Dv)."""
  return _forward(cfg, q, k, v)[0]


def _la_vjp_fwd(q, k, v, cfg):
  out, kv, ksum = _forward(cfg, q, k, v)
  return out, (q, k, v, kv, ksum)


def _la_vjp_bwd(cfg, res, g):
  return _backward(cfg, *res, g)


_la_vjp.defvjp(_la_vjp_fwd, _la_vjp_bwd)


def _tangent_map(eps, res, tangents):
  """The JVP of linear attention at res = (q, k, v, kv, ksum), linear in (dq, dk, dv).

  With qr = relu(q), kr = relu(k): d kv = dkr^T v + kr^T dv, d ksum = dkr^T 1,
  d out = (dqr kv + qr dkv - out (dqr ksum + qr dksum)) / den. All fp32, O(N D Dv).
  """
  q, k, v, kv, ksum = res
  dq, dk, dv = tangents
  f32 = lambda x: x.astype(jnp.float32)
  qr, kr = jax.nn.relu(f32(q)), jax.nn.relu(f32(k))
  dqr = jnp.where(q > 0, f32(dq), 0.0)
  dkr = jnp.where(k > 0, f32(dk), 0.0)
  d_kv = jnp.einsum("bnhd,bnhe->bhde", dkr, f32(v)) + jnp.einsum("bnhd,bnhe->bhde", kr, f32(dv))
  d_ksum = jnp.sum(dkr, axis=1)
  den = jnp.einsum("bnhd,bhd->bnh", qr, ksum)[..., None] + eps
  out = jnp.einsum("bnhd,bhde->bnhe", qr, kv) / den
  d_num = jnp.einsum("bnhd,bhde->bnhe", dqr, kv) + jnp.einsum("bnhd,bhde->bnhe", qr, d_kv)
  d_den = jnp.einsum("bnhd,bhd->bnh", dqr, ksum) + jnp.einsum("bnhd,bhd->bnh", qr, d_ksum)
  return ((d_num - out * d_den[..., None]) / den).astype(v.dtype)


def _transpose_map(cfg, res, g):
  """Transpose of `_tangent_map` in (dq, dk, dv): the backward kernels."""
  return tuple(_backward(cfg, *res, g))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _la(q, k, v, cfg: _Config):
  return _la_vjp(q, k, v, cfg)


@_la.defjvp
def _la_jvp(cfg, primals, tangents):
  q, k, v = primals
  out, kv, ksum = _forward(cfg, q, k, v)
  res = (q, k, v, kv, ksum)
  t_out = linear_call(functools.partial(_tangent_map, cfg.eps),
                      functools.partial(_transpose_map, cfg), res, tuple(tangents))
  return out, t_out


# ------------------------------------------------------------------------------ dispatch


@functools.cache
def _log_once(message: str) -> None:
  _LOG.warning(message)


def _platform() -> str:
  return jax.default_backend()  # "cpu", "gpu" or "tpu" ("cuda"/"rocm" read as "gpu").


@functools.cache
def _compiles(backend: str, shapes: tuple, eps: float) -> str | None:
  """Lowers and compiles forward and backward kernels for these shapes; the error or None.

  Run outside any trace (jit(...).lower on abstract shapes), so a Mosaic/Triton lowering
  failure is caught here rather than deep inside the caller's jit.
  """
  cfg = _Config(backend, eps, False)
  structs = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda *a: _la_vjp(*a, cfg), q, k, v)
    return out, vjp(out)

  try:
    jax.jit(fwd_bwd).lower(*structs).compile()
  except Exception as e:  # Any lowering/compile error means "not usable here".
    return f"{type(e).__name__}: {e}"
  return None


def _select_backend(impl: str, interpret: bool, q, k, v, eps: float) -> str | None:
  """Maps impl to a Pallas backend name, or None for the XLA reference."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown linear attention impl {impl!r}; expected one of {IMPLS}.")
  if impl == "xla":
    return None
  if impl in _EXPLICIT_IMPLS:
    # No platform check here: the call must trace (and lower for its accelerator) on any machine;
    # compiling it for the CPU raises (_device_only_p).
    return _EXPLICIT_IMPLS[impl]
  platform = _platform()
  if platform == "cpu":
    if impl == "auto":
      return None  # XLA's fused einsums beat an interpreted kernel on CPU.
    if not interpret:
      raise ValueError("impl='pallas' has no CPU kernel; pass interpret=True to run the "
                       "Triton-backend kernel in the Pallas interpreter, or use impl='xla'.")
    return "triton"
  if platform == "tpu":
    candidates = ["tpu"]
  elif platform == "gpu":
    # Triton on every GPU, Hopper included: a static choice, no compile tried per shape. The Mosaic
    # GPU state kernel (impl="pallas_mosaic_gpu") is chosen explicitly until a GPU run measures it
    # faster (docs/benchmarks.md, "Kernels: what a GPU must measure").
    candidates = ["triton"]
  else:
    raise ValueError(f"impl={impl!r}: no Pallas linear-attention kernel for platform {platform!r}.")
  if interpret:
    return candidates[-1]
  shapes = tuple((x.shape, jnp.dtype(x.dtype)) for x in (q, k, v))
  for backend in candidates:
    error = _compiles(backend, shapes, eps)
    if error is None:
      return backend
    _log_once(f"linear_attention: Pallas {backend} kernel failed to compile for {shapes}; "
              f"trying the next option. {error[:500]}")
  if impl == "pallas":
    raise RuntimeError(f"linear_attention: no Pallas kernel compiles on {platform} for {shapes}; "
                       "see the warnings above, or use impl='xla'.")
  _log_once(f"linear_attention: impl='auto' falls back to XLA on {platform} for {shapes}.")
  return None


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15, impl: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Fused ReLU linear attention. q, k, v: (B, N, H, D); returns (B, N, H, D) in v's dtype.

  impl: "xla" (the jnp reference), "pallas" (the platform's Pallas kernel: Triton on any GPU,
  Mosaic TPU on TPU, the Triton kernel interpreted on CPU when interpret=True), "auto" (Pallas
  on GPU/TPU, logging once and using XLA if the kernel does not compile; XLA on CPU), or a
  specific backend: "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu" (no fallback; these
  trace on any machine and lower for their platform, e.g. lowering_platforms=("cuda",) on a CPU
  machine, inside `abstract_gpu()` for the GPU kernels; compiling one for the CPU raises unless
  interpret=True). interpret: run the Pallas
  kernel in the interpreter. Differentiable in forward (jax.jvp) and reverse (jax.grad) mode.
  """
  backend = _select_backend(impl, interpret, q, k, v, eps)
  if backend is None:
    return linear_attention_reference(q, k, v, eps=eps)
  return _la(q, k, v, _Config(backend, float(eps), bool(interpret)))


@contextlib.contextmanager
def abstract_gpu(device_kind: str = "NVIDIA H100 80GB HBM3"):
  """Names the GPU that `jit(f).trace(...).lower(lowering_platforms=("cuda",))` targets on a machine without one.

  jax >= 0.11 lowers a Pallas Triton kernel for the compute capability of the device it finds, and on a
  CPU-only machine finds none ("No supported GPU devices found, please specify an abstract GPU device");
  an abstract mesh carrying an abstract device of `device_kind` (a jax GPU device_kind string, e.g. "NVIDIA
  A100-SXM4-80GB") supplies it. jax 0.10 needs no device but accepts the context, so lowering code can
  use it on both. Lowering only: on a machine with a GPU, leave it out.
  """
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    yield


def linear_attention_vjp_only(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
                              backend: str = "triton", interpret: bool = False) -> jax.Array:
  """The bare custom_vjp kernel path (no jax.jvp); for tests and for reverse-only users."""
  return _la_vjp(q, k, v, _Config(backend, float(eps), bool(interpret)))
