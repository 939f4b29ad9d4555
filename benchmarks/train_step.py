"""Benchmark: Sana-1600M training step at 1024 px on one device: MFU and the largest batch per remat policy.

    python benchmarks/train_step.py                                  # GPU: policies none, full, dots_saveable
    python benchmarks/train_step.py --policies=full --start_batch=32 # one policy, from batch 32
    python benchmarks/train_step.py --smoke                          # tiny DiT on CPU, seconds

One step = flow-matching loss (t from the config's logit-normal sampler, x_t = (1 - t) x0 + t eps,
v = eps - x0) -> forward and backward of the DiT -> global-norm clip 0.1 -> AdamW -> EMA update,
with the state donated (sanajax.training.state.apply_gradients with its NaN guard, optimizer from
sanajax.training.optim.build_optimizer). The DiT computes in bf16 with float32 master weights
(configs/sana_1600m.py). Latents (B, 32, 32, 32) float32 and a bf16 caption (B, 300, 2304) are
fixed device arrays: the frozen AE and text encoder are not part of the step.

For each `--policies` entry (model.remat: "none", "full" = recompute each block, or a
jax.checkpoint_policies name) the batch doubles from --start_batch until XLA reports
RESOURCE_EXHAUSTED (caught; the state is rebuilt) or --max_batch; each batch that fits is
timed. "largest batch" is therefore the largest power-of-two multiple of --start_batch that
fits. --time_budget_s stops the search early (the row says so).

MFU = `sanajax.info` train-step FLOPs (3 x forward x batch, the figure that
`python -m sanajax.info --config=configs/sana_1600m.py` prints; remat recomputation is not
counted) / step time / datasheet dense bf16 peak (989.4 TFLOP/s on H100/H200 SXM); the
fraction of the 8192^3 matmul throughput measured here is printed too. Target (issue 6): MFU
at least 45%.

PyTorch reference at --torch_batch: diffusers SanaTransformer2DModel, float32 weights under
bf16 autocast, gradient checkpointing (= remat "full"), clip 0.1, fused AdamW, EMA by
torch._foreach_lerp_; eager and torch.compile'd model. It runs first and frees its memory
before JAX grows into the GPU. Smoke: a 1-block DiT at 512 px, policies none and full, batch 1
to 2; torch in float32.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # let the batch search use the GPU

import functools  # noqa: E402
import time  # noqa: E402

import _harness as hx  # noqa: E402  (sets the JAX allocator environment before jax is imported)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sanajax import config_utils, resolution  # noqa: E402
from sanajax.diffusion import flow  # noqa: E402
from sanajax.models import dit_facts, sana_dit  # noqa: E402
from sanajax.training.optim import build_optimizer  # noqa: E402
from sanajax.training.state import apply_gradients, create_train_state  # noqa: E402

MFU_TARGET = 0.45
RESOLUTION = 1024
SMOKE_RESOLUTION = 512
DEFAULT_POLICIES = "none,full,dots_saveable"
# Same tiny DiT as dit_forward.py's smoke run.
SMOKE_OVERRIDES = {"model.depth": 1, "model.hidden_size": 64, "model.cross_num_heads": 2,
                   "model.cross_head_dim": 32, "text.hidden_size": 32, "text.max_length": 8}


def load_config(res: int, policy: str, batch: int, smoke: bool):
  """configs/sana_1600m.py at `res` with AdamW, model.remat = policy and batch size `batch`.

  The batch goes into the resolution preset (which `apply_resolution`, and so `dit_facts.describe`,
  re-applies), so `dit_facts.describe(config)["train_step_flops"]` counts exactly this batch.
  """
  overrides = dict(SMOKE_OVERRIDES) if smoke else {}
  overrides.update({"model.remat": policy, "train.optimizer": "adamw",
                    f"resolution_presets.{res}.batch_size": batch})
  config = config_utils.load_config(str(hx.CONFIG_DIR / "sana_1600m.py"), str(res), overrides)
  return resolution.apply_resolution(config)


def make_batch(config, key):
  """Fixed device inputs: latents (B, h, w, C) float32, caption (B, L, D) bf16, mask (B, L) int32."""
  d = dit_facts.describe(config)
  b = d["batch_size"]
  length = d["text_tokens"]
  kx, kc = jax.random.split(key)
  latents = jax.random.normal(kx, (b, *d["latent_shape"]), jnp.float32)
  context = jax.random.normal(kc, (b, length, config.model.caption_channels), jnp.bfloat16)
  mask = jnp.broadcast_to(jnp.arange(length) < max(1, (3 * length) // 4), (b, length)).astype(jnp.int32)
  return {"latents": latents, "context": context, "mask": mask}


def make_state_fn(config):
  """jitted key -> fresh TrainState (float32 params, AdamW state, EMA copy)."""
  dit = sana_dit.build_dit(config.model)
  tx, _ = build_optimizer(config.train, config.train.num_steps)
  d = dit_facts.describe(config)
  x = jnp.zeros((1, *d["latent_shape"]), jnp.float32)
  ctx = jnp.zeros((1, d["text_tokens"], config.model.caption_channels), jnp.float32)
  mask = jnp.ones((1, d["text_tokens"]), jnp.int32)

  @jax.jit
  def make_state(key):
    params = nn.unbox(dit.init(key, x, jnp.zeros((1,), jnp.float32), ctx, mask))["params"]
    return create_train_state(params, tx, key)
  return make_state


def make_train_step(config):
  """The donated, jitted DiT-only training step: (state, batch) -> (state, loss)."""
  dit = sana_dit.build_dit(config.model)
  tx, _ = build_optimizer(config.train, config.train.num_steps)

  def loss_fn(params, batch, key):
    k_t, k_eps = jax.random.split(key)
    latents = batch["latents"]
    t = flow.sample_time_from_config(k_t, latents.shape[0], config.diffusion)
    eps = jax.random.normal(k_eps, latents.shape, latents.dtype)
    pred = dit.apply({"params": params}, flow.interpolate(latents, eps, t), t, batch["context"], batch["mask"])
    return flow.flow_matching_loss(pred, flow.velocity_target(latents, eps))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, batch):
    rng, key = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    state, _ = apply_gradients(state, grads, loss, tx, config.train.ema_decay, rng)
    return state, loss

  return step


def _deleted(state) -> bool:
  return any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(state))


class SanajaxTrainer:
  """Holds one train state across trials (same parameter tree for every policy and batch)."""

  def __init__(self, res: int, smoke: bool, timing: dict):
    self.res, self.smoke, self.timing = res, smoke, timing
    self._make_state = make_state_fn(load_config(res, "none", 1, smoke))
    self.state = None

  def time_step(self, policy: str, batch: int) -> float:
    """Median ms of one step at (policy, batch); raises the XLA error on OOM (state rebuilt next time)."""
    config = load_config(self.res, policy, batch, self.smoke)
    if self.state is None or _deleted(self.state):
      self.state = None
      self.state = self._make_state(jax.random.PRNGKey(0))
    step = make_train_step(config)
    data = make_batch(config, jax.random.PRNGKey(batch))

    def call():
      self.state, loss = step(self.state, data)
      return loss

    return hx.median_ms(call, **self.timing)  # `data` goes with this frame


def search_policy(trainer: SanajaxTrainer, policy: str, args, deadline: float) -> tuple[dict, str]:
  """{batch: median ms} for the batches that fit, doubling from start_batch; and how the search ended."""
  fits, batch = {}, args.start_batch
  while batch <= args.max_batch:
    if time.monotonic() > deadline:
      return fits, f"time budget reached before B={batch}"
    try:
      fits[batch] = trainer.time_step(policy, batch)
      print(f"remat={policy} B={batch}: {fits[batch]:.1f} ms", flush=True)
    except Exception as e:  # Only out-of-memory ends the search; anything else is a bug.
      if not hx.is_oom(e):
        raise
      print(f"remat={policy} B={batch}: out of memory", flush=True)
      return fits, f"B={batch} out of memory"
    batch *= 2
  return fits, f"reached --max_batch={args.max_batch}"


def mfu_figure(flops: float, ms: float, batch: int, peak: float | None, matmul: float) -> tuple[str, float | None]:
  achieved = flops / (ms * 1e-3)
  mfu = achieved / peak if peak else None
  parts = [f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (unknown peak)",
           f"{hx.fmt_tflops(achieved)} = {achieved / matmul:.0%} of matmul",
           f"{batch / (ms * 1e-3):.1f} img/s", f"{flops / 1e12:.3g} TFLOP/step (sanajax.info)"]
  return ", ".join(parts), mfu


def torch_reference(config, batch_size: int, args, timing: dict) -> list[tuple[str, float]]:
  """[(label, median ms)] of the diffusers training step, eager and compiled (see the module docstring;
  no compiled entry with --torch_compile_backend=none). The model, optimizer and EMA live in
  _torch_step_times's frame, so they are gone when its cached CUDA memory is released here."""
  out = _torch_step_times(config, batch_size, args, timing)
  hx.release_torch_memory()
  return out


def _torch_step_times(config, batch_size: int, args, timing: dict) -> list[tuple[str, float]]:
  import diffusers
  import torch
  device = hx.torch_device(args.smoke)
  use_bf16 = not args.smoke  # CPU bf16 autocast convs take seconds: smoke runs float32.
  torch.manual_seed(0)
  model = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(config.model)).to(device).train()
  model.enable_gradient_checkpointing()
  params = [p for p in model.parameters()]
  opt = torch.optim.AdamW(params, lr=config.train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=config.train.weight_decay, fused=device == "cuda")
  ema = [p.detach().clone() for p in params]
  data = make_batch(config, jax.random.PRNGKey(batch_size))
  x0 = hx.to_torch(data["latents"], device, "float32").permute(0, 3, 1, 2).contiguous()
  ctx = hx.to_torch(data["context"], device, "bfloat16" if use_bf16 else "float32")
  mask = hx.to_torch(data["mask"], device, "int64")
  t = torch.rand(batch_size, device=device)
  eps = torch.randn_like(x0)
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
  target = eps - x0
  decay = float(config.train.ema_decay)

  def step(m):
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
      pred = m(hidden_states=x_t, encoder_hidden_states=ctx, timestep=t * 1000, encoder_attention_mask=mask,
               return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)
    return loss

  out = [("eager", hx.torch_median_ms(lambda: step(model), device=device, **timing))]
  compiled = hx.torch_compile(model, args.torch_compile_backend)
  if compiled is not None:
    out.append((f"torch.compile {args.torch_compile_backend}",
                hx.torch_median_ms(lambda: step(compiled), device=device, **timing)))
  return out


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.splitlines()[0])
  p.add_argument("--policies", default=None, help=f"comma-separated model.remat values (default {DEFAULT_POLICIES}; "
                                                  "smoke none,full)")
  p.add_argument("--start_batch", type=int, default=None, help="first batch tried (default 8; smoke 1)")
  p.add_argument("--max_batch", type=int, default=None, help="last batch tried (default 512; smoke 2)")
  p.add_argument("--torch_batch", type=int, default=None, help="batch of the diffusers step (default 8; smoke 1)")
  p.add_argument("--time_budget_s", type=float, default=None,
                 help="start no new trial after this many seconds (default 480, inside the device tool's 10-minute "
                      "call; smoke: no limit)")
  p.add_argument("--matmul_n", type=int, default=None, help="side of the bf16 matmul (default 8192; smoke 256)")
  # A step is long (seconds at large batches): fewer repeats than the other scripts by default.
  args = hx.finish_args(p.parse_args(argv), warmup=2, repeats=5)
  start = time.monotonic()
  smoke = args.smoke
  policies = (args.policies or ("none,full" if smoke else DEFAULT_POLICIES)).split(",")
  args.start_batch = args.start_batch or (1 if smoke else 8)
  args.max_batch = args.max_batch or (2 if smoke else 512)
  torch_batch = args.torch_batch or (1 if smoke else 8)
  res = SMOKE_RESOLUTION if smoke else RESOLUTION
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  matmul_n = args.matmul_n or (256 if smoke else 8192)
  peak = hx.peak_bf16_flops()
  matmul_ms, matmul = hx.matmul_flops_per_s(matmul_n, warmup=3, repeats=10)
  rows = [hx.Row("train_step", f"{matmul_n}^3 bf16 matmul", "jax", matmul_ms,
                 f"{hx.fmt_tflops(matmul)}" + (f" = {matmul / peak:.0%} of datasheet peak" if peak else ""))]
  tag = " (tiny DiT)" if smoke else ""
  target = f"MFU >= {MFU_TARGET:.0%}"

  torch_times = []
  if not args.skip_torch:
    torch_times = torch_reference(load_config(res, "full", torch_batch, smoke), torch_batch, args, timing)

  trainer = SanajaxTrainer(res, smoke, timing)
  budget = args.time_budget_s if args.time_budget_s is not None else (float("inf") if smoke else 480.0)
  deadline = start + budget
  measured = {}
  for policy in policies:
    fits, ending = search_policy(trainer, policy, args, deadline)
    measured[policy] = fits
    for batch, ms in fits.items():
      flops = dit_facts.describe(load_config(res, policy, batch, smoke))["train_step_flops"]
      figure, mfu = mfu_figure(flops, ms, batch, peak, matmul)
      rows.append(hx.Row("train_step", f"{res}px B={batch} remat={policy}{tag}", "sanajax adamw bf16", ms, figure,
                         target, hx.met(None if mfu is None else mfu >= MFU_TARGET)))
    largest = max(fits) if fits else None
    rows.append(hx.Row("train_step", f"{res}px remat={policy}{tag}", "sanajax largest batch", None,
                       f"largest batch that fits: {largest if largest else 'none measured'} ({ending})",
                       "largest batch per remat policy"))
    print(f"remat={policy}: largest batch {largest} ({ending})", flush=True)

  if torch_times:
    sanajax_ms = measured.get("full", {}).get(torch_batch)
    if sanajax_ms is None:  # the search did not time torch_batch with remat=full: time it now.
      try:
        sanajax_ms = trainer.time_step("full", torch_batch)
      except Exception as e:
        if not hx.is_oom(e):
          raise
    flops = dit_facts.describe(load_config(res, "full", torch_batch, smoke))["train_step_flops"]
    for label, ms in torch_times:
      figure, _ = mfu_figure(flops, ms, torch_batch, peak, matmul)
      if sanajax_ms is not None:
        figure = f"sanajax remat=full takes {sanajax_ms / ms:.2f}x this time, " + figure
      rows.append(hx.Row("train_step", f"{res}px B={torch_batch} gradient checkpointing{tag}",
                         f"diffusers {label} {'fp32' if smoke else 'bf16 autocast'}", ms, figure))
  hx.report(args, rows)
  return rows


if __name__ == "__main__":
  main()
