"""Benchmark: DC-AE f32c32 decode in bf16, sanajax vs diffusers AutoencoderDC (eager, torch.compile).

    python benchmarks/dcae_decode.py                     # GPU: 1024 px and 2048 px, batch 1
    python benchmarks/dcae_decode.py --smoke             # the tiny f8c16 AE on CPU, seconds

The same random weights in both: diffusers' `AutoencoderDC` built from configs/dcae_f32c32.py
(`dcae.diffusers_kwargs`, torch's default init, seed 0) is converted to Flax parameters
(`dcae.params_from_diffusers_state_dict`). sanajax decodes with bf16 parameters and compute
(float32 RMSNorm statistics and linear-attention state) and its multi-scale linear attention
through `sanajax.kernels.linear_attention` with `--attn_impl` (the config's `ae.attn_impl`);
diffusers decodes in bf16. Input: a latent (1, res/32, res/32, 32) ~ N(0, 1). The sanajax
image is checked against diffusers' (relative L2 error beside the time).
Target (issue 6): at most 0.5x diffusers eager time, at 1024 and 2048 px.
Smoke: configs/dcae_tiny.py (f8, 16 latent channels) at 64 px; torch in float32 on CPU.
"""
from __future__ import annotations

import _harness as hx  # first: sets the JAX allocator environment before jax is imported
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax import config_utils
from sanajax.models import dcae

EAGER_RATIO_TARGET = 0.5


def load_ae_config(smoke: bool, attn_impl: str):
  name = "dcae_tiny.py" if smoke else "dcae_f32c32.py"
  return config_utils.load_config(str(hx.CONFIG_DIR / name), overrides={"ae.attn_impl": attn_impl,
                                                                        "ae.dtype": "bfloat16"}).ae


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.splitlines()[0])
  p.add_argument("--resolutions", default=None, help="comma-separated px (default 1024,2048; smoke 64)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--attn_impl", default="auto", help="sanajax linear attention impl: auto, xla, pallas, ...")
  args = hx.finish_args(p.parse_args(argv))
  resolutions = [int(r) for r in (args.resolutions or ("64" if args.smoke else "1024,2048")).split(",")]
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  ae_config = load_ae_config(args.smoke, args.attn_impl)
  model = dcae.build_dcae(ae_config)
  f = dcae.downsample_factor(ae_config)
  decode = jax.jit(lambda params, z: model.apply({"params": params}, z, method=model.decode))

  if args.skip_torch:
    images = jnp.zeros((1, 2 * f, 2 * f, ae_config.in_channels))
    init = jax.jit(lambda key: nn.unbox(model.init(key, images))["params"])
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init(jax.random.PRNGKey(0)))
  else:
    import diffusers
    import torch
    device = hx.torch_device(args.smoke)
    torch_dtype = "float32" if args.smoke else "bfloat16"  # CPU bf16 convs take seconds.
    torch.manual_seed(0)
    ref_model = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(ae_config)).eval()
    params = dcae.params_from_diffusers_state_dict(ref_model.state_dict(), ae_config)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    ref_model = ref_model.to(device, getattr(torch, torch_dtype))
    compiled = hx.torch_compile(ref_model.decode, args.torch_compile_backend)

  rows = []
  for res in resolutions:
    if res % f:
      raise ValueError(f"resolution {res} is not a multiple of the AE's downsampling factor {f}")
    case = f"{res}px B={args.batch}" + (" (tiny f8c16 AE)" if args.smoke else "")
    z = jax.random.normal(jax.random.PRNGKey(res), (args.batch, res // f, res // f, ae_config.latent_channels),
                          jnp.float32)
    ms = hx.median_ms(lambda: decode(params, z), **timing)
    hx.profile_calls(args.profile, f"dcae_decode_{res}", lambda: decode(params, z))
    figure, target, ok, torch_rows = [], "", None, []
    if not args.skip_torch:
      tz = hx.to_torch(z, device, torch_dtype).permute(0, 3, 1, 2).contiguous()
      with torch.inference_mode():
        ref = ref_model.decode(tz, return_dict=False)[0].float().permute(0, 2, 3, 1).cpu().numpy()
        err = hx.rel_l2(np.asarray(jax.device_get(decode(params, z)), np.float32), ref)
        eager_ms = hx.torch_median_ms(lambda: ref_model.decode(tz, return_dict=False), device=device, **timing)
        compiled_ms = hx.compiled_median_ms(compiled, lambda: compiled(tz, return_dict=False), device=device, **timing)
      figure = [hx.vs_torch(ms, eager_ms, compiled_ms), f"rel err vs diffusers {err:.1e}"]
      target, ok = f"<= {EAGER_RATIO_TARGET}x diffusers eager", ms / eager_ms <= EAGER_RATIO_TARGET
      torch_rows = hx.torch_rows("dcae_decode", case, torch_dtype, args.torch_compile_backend, eager_ms, compiled_ms)
    rows.extend(hx.case_rows("dcae_decode", case, args.attn_impl, ms, figure, target, ok, torch_rows))
  hx.report(args, rows)
  return rows


if __name__ == "__main__":
  main()
