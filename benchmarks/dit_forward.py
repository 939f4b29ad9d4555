"""Benchmark: Sana-1600M DiT forward in bf16, sanajax vs diffusers (eager, torch.compile).

    python benchmarks/dit_forward.py                       # GPU: 1024 px B=1, B=4; 4096 px B=1
    python benchmarks/dit_forward.py --cases=4096x1        # one case
    python benchmarks/dit_forward.py --smoke               # tiny DiT on CPU, seconds

The same random weights in both: diffusers' `SanaTransformer2DModel` (configs/sana_1600m.py via
`sana_dit.diffusers_kwargs`, torch's default init, seed 0) is converted to Flax parameters
(`sana_dit.params_from_diffusers_state_dict`); both run in bf16 (sanajax: bf16 parameters and
compute, float32 norm statistics and attention state, as the model does). Inputs: bf16 latents
(B, res/32, res/32, 32), t ~ U(0, 1), a bf16 caption (B, 300, 2304) whose last quarter is masked.
The sanajax output is checked against diffusers' (relative L2 error, printed beside the time).

Figures: median ms; TFLOP/s = B x `sanajax.info` forward FLOPs (the count that
`python -m sanajax.info --config=configs/sana_1600m.py:RES` prints) / time; the bf16 matmul
throughput that this script measures on an 8192^3 product (same process, same device).
Targets (issue 6): 1024 px B=1 at most 0.4x diffusers eager time; 4096 px B=1 at least 70% of
the measured matmul throughput. Smoke: a 1-block DiT at 512 px; torch runs it in float32 (CPU
bf16 convolutions take seconds), sanajax in bf16.
"""
from __future__ import annotations

import _harness as hx  # first: sets the JAX allocator environment before jax is imported
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax import config_utils
from sanajax.models import dit_facts, sana_dit

EAGER_RATIO_TARGET = 0.4  # at 1024 px, batch 1
MATMUL_FRACTION_TARGET = 0.70  # at 4096 px, batch 1
DEFAULT_CASES = "1024x1,1024x4,4096x1"
SMOKE_CASES = "512x1"
# A tiny DiT with every part of the real one (1 block, 2 linear heads, 2 cross heads, 8 text tokens);
# one block because XLA:CPU compile time, not run time, is what a smoke run costs.
SMOKE_OVERRIDES = {"model.depth": 1, "model.hidden_size": 64, "model.cross_num_heads": 2,
                   "model.cross_head_dim": 32, "text.hidden_size": 32, "text.max_length": 8}


def parse_cases(text: str) -> list[tuple[int, int]]:
  """'1024x1,4096x1' -> [(1024, 1), (4096, 1)] (resolution px, batch)."""
  cases = []
  for item in text.split(","):
    try:
      res, batch = item.strip().lower().split("x")
      cases.append((int(res), int(batch)))
    except ValueError:
      raise ValueError(f"--cases entries are RESxBATCH such as 1024x4, got {item!r}") from None
  return cases


def load_config(resolution: int, smoke: bool, attn_impl: str):
  """configs/sana_1600m.py at `resolution` (the smoke run shrinks the model, same code paths)."""
  overrides = dict(SMOKE_OVERRIDES) if smoke else {}
  overrides["model.attn_impl"] = attn_impl
  return config_utils.load_config(str(hx.CONFIG_DIR / "sana_1600m.py"), str(resolution), overrides)


def make_inputs(config, batch: int, key):
  """bf16 latents (B, h, w, C), t (B,) float32, bf16 caption (B, L, D), mask (B, L) int32."""
  d = dit_facts.describe(config)
  h, w, c = d["latent_shape"]
  length = d["text_tokens"]
  kx, kt, kc = jax.random.split(key, 3)
  x = jax.random.normal(kx, (batch, h, w, c), jnp.bfloat16)
  t = jax.random.uniform(kt, (batch,), jnp.float32)
  ctx = jax.random.normal(kc, (batch, length, config.model.caption_channels), jnp.bfloat16)
  valid = max(1, (3 * length) // 4)
  mask = jnp.broadcast_to(jnp.arange(length) < valid, (batch, length)).astype(jnp.int32)
  return x, t, ctx, mask


def torch_model(config, device: str, dtype: str):
  """diffusers SanaTransformer2DModel for the config (seed 0, torch's init) in `dtype`, and its Flax
  params (bf16)."""
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(config.model)).eval()
  # diffusers' per-block keys, stacked when the config scans over layers (model.scan_layers).
  params = sana_dit.to_layout(sana_dit.params_from_diffusers_state_dict(model.state_dict()), config.model.scan_layers)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  return model.to(device, getattr(torch, dtype)), params


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.splitlines()[0])
  p.add_argument("--cases", default=None, help=f"RESxBATCH list (default {DEFAULT_CASES}; smoke {SMOKE_CASES})")
  p.add_argument("--attn_impl", default="auto", help="sanajax linear attention impl: auto, xla, pallas, ...")
  p.add_argument("--matmul_n", type=int, default=None, help="side of the bf16 matmul (default 8192; smoke 256)")
  args = hx.finish_args(p.parse_args(argv))
  cases = parse_cases(args.cases or (SMOKE_CASES if args.smoke else DEFAULT_CASES))
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  matmul_n = args.matmul_n or (256 if args.smoke else 8192)
  matmul_ms, matmul_flops = hx.matmul_flops_per_s(matmul_n, **timing)
  rows = [hx.Row("dit_forward", f"{matmul_n}^3 bf16 matmul", "jax", matmul_ms, hx.fmt_tflops(matmul_flops))]
  if not args.skip_torch:
    import torch
    device = hx.torch_device(args.smoke)
    # bf16 convs and matmuls on CPU torch take seconds even for the tiny DiT: smoke runs torch in float32.
    torch_dtype = "float32" if args.smoke else "bfloat16"

  built = {}  # resolution -> (torch model or None, params): cases of one resolution share the weights
  for res, batch in cases:
    config = load_config(res, args.smoke, args.attn_impl)
    case = f"{res}px B={batch}" + (" (tiny DiT)" if args.smoke else "")
    flops = batch * dit_facts.describe(config)["forward_flops"]
    dit = sana_dit.build_dit(config.model)
    x, t, ctx, mask = make_inputs(config, batch, jax.random.PRNGKey(res + batch))
    if res not in built:
      built.clear()  # one model in memory at a time
      hx.release_torch_memory()
      if args.skip_torch:
        init = jax.jit(lambda key: nn.unbox(dit.init(key, x, t, ctx, mask))["params"])
        built[res] = None, jax.tree.map(lambda a: a.astype(jnp.bfloat16), init(jax.random.PRNGKey(0)))
      else:
        built[res] = torch_model(config, device, torch_dtype)
    model, params = built[res]
    fwd = jax.jit(lambda p, x, t, ctx, mask: dit.apply({"params": p}, x, t, ctx, mask))
    ms = hx.median_ms(lambda: fwd(params, x, t, ctx, mask), **timing)
    hx.profile_calls(args.profile, f"dit_forward_{res}_b{batch}", lambda: fwd(params, x, t, ctx, mask))
    tflops = flops / (ms * 1e-3)
    frac = tflops / matmul_flops
    figure = [f"{hx.fmt_tflops(tflops)} = {frac:.0%} of matmul"]
    target, ok = "", None
    if (res, batch) == (4096, 1):
      target, ok = f">= {MATMUL_FRACTION_TARGET:.0%} of matmul", frac >= MATMUL_FRACTION_TARGET
    torch_rows = []
    if not args.skip_torch:
      tx = hx.to_torch(x, device, torch_dtype).permute(0, 3, 1, 2).contiguous()  # NCHW
      tt = hx.to_torch(t * 1000.0, device, "float32")
      tctx = hx.to_torch(ctx, device, torch_dtype)
      tmask = hx.to_torch(mask, device, "int64")
      call = lambda m: m(hidden_states=tx, encoder_hidden_states=tctx, timestep=tt, encoder_attention_mask=tmask,
                         return_dict=False)[0]
      compiled = hx.torch_compile(model, args.torch_compile_backend)
      with torch.inference_mode():
        ref = call(model).float().permute(0, 2, 3, 1).cpu().numpy()
        err = hx.rel_l2(np.asarray(jax.device_get(fwd(params, x, t, ctx, mask)), np.float32), ref)
        figure.append(f"rel err vs diffusers {err:.1e}")
        eager_ms = hx.torch_median_ms(lambda: call(model), device=device, **timing)
        compiled_ms = hx.compiled_median_ms(compiled, lambda: call(compiled), device=device, **timing)
      figure.insert(0, hx.vs_torch(ms, eager_ms, compiled_ms))
      if (res, batch) == (1024, 1):
        target, ok = f"<= {EAGER_RATIO_TARGET}x diffusers eager", ms / eager_ms <= EAGER_RATIO_TARGET
      torch_rows = hx.torch_rows("dit_forward", case, torch_dtype, args.torch_compile_backend, eager_ms, compiled_ms,
                                 figure=lambda t_ms: hx.fmt_tflops(flops / (t_ms * 1e-3)))
      del compiled
    figure.append(f"{flops / batch / 1e9:.3f} GFLOP/image (sanajax.info)")
    rows.extend(hx.case_rows("dit_forward", case, args.attn_impl, ms, figure, target, ok, torch_rows))
  hx.report(args, rows)
  return rows


if __name__ == "__main__":
  main()
