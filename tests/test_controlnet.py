"""SANA ControlNet: parity with diffusers' SanaControlNetPipeline, weight round trip, canny, errors.

The parity test builds a tiny random SanaTransformer2DModel, SanaControlNetModel and AutoencoderDC
(odd sizes: non-square latents, patch 2, 3 heads of 16, 2 cross heads of 24), saves the ControlNet
with save_pretrained and loads it with sanajax.convert.load_sana_controlnet, then compares 10-step
latents with CFG 4.5 and conditioning scale 0.7: the pipeline encodes the control image with its
DC-AE (times the scaling factor), sanajax with the same AE converted.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.convert import load_sana_controlnet
from sanajax.data import conditions
from sanajax.diffusion import samplers
from sanajax.generation import sample_latents
from sanajax.models import controlnet, controlnet_diffusers, dcae, sana_dit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

NUM_STEPS, CFG, SHIFT, SCALE = 10, 4.5, 3.0, 0.7
B, IMAGE_HW, L, NUM_LAYERS = 2, (24, 40), 7, 2  # AE f4 -> latents 6 x 10
AE_SCALING = 0.8


def _base_config():
  c = dict(config_utils.load_config("tiny").model)
  c.update(depth=3, hidden_size=48, linear_head_dim=16, cross_num_heads=2, cross_head_dim=24, caption_channels=20,
           in_channels=4, patch_size=2)
  return c


def _ae_config():
  return ml_collections.ConfigDict(dict(
      in_channels=3, latent_channels=4, attention_head_dim=8,
      encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
      decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
      encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
      encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
      encoder_qkv_multiscales=[[], [], [3]], decoder_qkv_multiscales=[[], [], [3]],
      upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
      decoder_act_fns="silu", scaling_factor=AE_SCALING))


def _randomize(module, scale):
  with torch.no_grad():  # every parameter random (zero Linears, norm scales, tables) at a moderate size
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  c = _base_config()
  torch.manual_seed(0)
  tm = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(c, sample_size=IMAGE_HW[0] // 4)).eval()
  _randomize(tm, 0.2)
  cn_cfg = controlnet_diffusers.controlnet_diffusers_config(c, NUM_LAYERS)
  cn_kwargs = {k: v for k, v in cn_cfg.items() if not k.startswith("_")}
  tcn = diffusers.SanaControlNetModel(**cn_kwargs).eval()
  _randomize(tcn, 0.2)
  ae_cfg = _ae_config()
  tae = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(ae_cfg)).eval()
  with torch.no_grad():
    for p in tae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp("controlnet"))
  tcn.save_pretrained(directory)  # the real format: config.json + diffusion_pytorch_model.safetensors
  cn_model, cn_params = load_sana_controlnet(directory)
  rng = np.random.default_rng(0)
  inputs = dict(
      noise=rng.normal(size=(B, IMAGE_HW[0] // 4, IMAGE_HW[1] // 4, 4)).astype(np.float32),
      ctx=rng.normal(size=(B, L, c["caption_channels"])).astype(np.float32),
      mask=np.ones((B, L), np.int64), null_ctx=rng.normal(size=(B, L, c["caption_channels"])).astype(np.float32),
      null_mask=np.ones((B, L), np.int64), control=rng.uniform(-1, 1, (B, *IMAGE_HW, 3)).astype(np.float32))
  inputs["mask"][1, 4:] = 0
  inputs["null_mask"][:, 2:] = 0
  ours = dict(dit=sana_dit.build_dit(c), dit_params=sana_dit.params_from_diffusers_state_dict(tm.state_dict()),
              cn=cn_model, cn_params=cn_params, ae=dcae.build_dcae(ae_cfg),
              ae_params=dcae.params_from_diffusers_state_dict(tae.state_dict(), ae_cfg))
  return (tm, tcn, tae), ours, inputs, directory


def _pipeline_latents(torch_models, inputs, sampler):
  tm, tcn, tae = torch_models
  if sampler == "flow_euler":
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
  else:
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=SHIFT)
  pipe = diffusers.SanaControlNetPipeline(tokenizer=None, text_encoder=None, vae=tae, transformer=tm, controlnet=tcn,
                                          scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
  t = lambda a: torch.from_numpy(a)
  with torch.no_grad():
    # height / width only pass the pipeline's multiple-of-32 check: a tensor control image sets the size.
    out = pipe(negative_prompt=None, prompt_embeds=t(inputs["ctx"]), prompt_attention_mask=t(inputs["mask"]),
               negative_prompt_embeds=t(inputs["null_ctx"]), negative_prompt_attention_mask=t(inputs["null_mask"]),
               latents=nchw(inputs["noise"]), control_image=nchw(inputs["control"]),
               controlnet_conditioning_scale=SCALE, num_inference_steps=NUM_STEPS, guidance_scale=CFG, height=32,
               width=32, use_resolution_binning=False, output_type="latent", return_dict=False)[0]
  scheduler.set_timesteps(NUM_STEPS)
  return out.permute(0, 2, 3, 1).numpy(), scheduler.timesteps.numpy().astype(np.float32) / 1000.0


def test_controlnet_sample_equals_sana_controlnet_pipeline(models, sampler="flow_dpm"):
  """The whole controlled CFG sampling loop, as tests/test_pipeline_parity.py does for the DiT alone (the
  DPM pipeline feeds int64(1000 sigma) / 1000 to the models, so sanajax's models get those times)."""
  torch_models, m, inputs, _ = models
  want, times = _pipeline_latents(torch_models, inputs, sampler)
  sigmas = jnp.asarray(samplers.timestep_grid(NUM_STEPS, SHIFT, sampler)[:-1])

  def run(noise, ctx, mask, null_ctx, null_mask, control, scale):
    latents = controlnet.encode_control(m["ae"], m["ae_params"], control, AE_SCALING)

    def apply_fn(x, t, c, msk):
      t = jnp.asarray(times)[jnp.argmin(jnp.abs(t[:, None] - sigmas[None, :]), axis=1)]
      return controlnet.controlled_apply(m["dit"], m["dit_params"], m["cn"], m["cn_params"], x, t, c, msk,
                                         latents, scale)

    return sample_latents(apply_fn, False, noise, ctx, mask, null_ctx, null_mask, sampler=sampler,
                          steps=NUM_STEPS, cfg=CFG, shift=SHIFT, key=jax.random.PRNGKey(0))

  args = [inputs[k] for k in ("noise", "ctx", "mask", "null_ctx", "null_mask", "control")]
  run = jax.jit(run)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(run(*args, SCALE))
    off = np.asarray(run(*args, 0.0))
  scale = np.abs(want).max()
  assert got.shape == want.shape == (B, 6, 10, 4)
  assert np.abs(got - want).max() <= 1e-4 * scale
  assert np.abs(off - got).max() > 1e-2 * scale  # the control really enters (scale 0: the base alone)


def test_weights_round_trip_and_fresh_controlnet_is_the_base(models, tmp_path):
  torch_models, m, inputs, directory = models
  out = str(tmp_path / "out")
  base_config = _base_config()
  controlnet_diffusers.save_diffusers(out, base_config, NUM_LAYERS, m["cn_params"])
  again = diffusers.SanaControlNetModel.from_pretrained(out).state_dict()
  for k, v in torch_models[1].state_dict().items():
    assert np.array_equal(again[k].numpy(), v.numpy()), k  # bit-identical float32 round trip
  # A fresh ControlNet (zero Linears, blocks copied from the base) leaves the base's velocity unchanged.
  cn = controlnet.build_controlnet(base_config, NUM_LAYERS)
  fresh = controlnet.controlnet_params_from_base(
      m["dit_params"], controlnet.init_controlnet(cn, base_config, jax.random.PRNGKey(1)))
  fresh = nn.unbox(fresh)
  assert np.array_equal(fresh["transformer_blocks_1"]["attn1"]["to_q"]["kernel"],
                        m["dit_params"]["transformer_blocks_1"]["attn1"]["to_q"]["kernel"])
  # A base in the scan_layers layout (model.scan_layers, on in the SANA configs) gives the same copy.
  from_stacked = nn.unbox(controlnet.controlnet_params_from_base(
      sana_dit.to_layout(m["dit_params"], True), controlnet.init_controlnet(cn, base_config, jax.random.PRNGKey(1))))
  for a, b in zip(jax.tree.leaves(from_stacked), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x, ctx, mask = inputs["noise"], inputs["ctx"], inputs["mask"]
  t = jnp.full((B,), 0.6)
  control = jnp.ones_like(x)
  v_base = m["dit"].apply({"params": m["dit_params"]}, x, t, ctx, mask)
  v_fresh = controlnet.controlled_apply(m["dit"], m["dit_params"], cn, fresh, x, t, ctx, mask, control)
  np.testing.assert_array_equal(np.asarray(v_fresh), np.asarray(v_base))


def test_controlnet_refusals(models):
  c = _base_config()
  with pytest.raises(ValueError, match="num_layers=3"):
    controlnet.build_controlnet(c, 3)  # needs a base block after each residual
  with pytest.raises(ValueError, match="guidance_embeds"):
    controlnet.build_controlnet({**c, "guidance_embeds": True}, 1)
  _, m, inputs, _ = models
  with pytest.raises(ValueError, match="control latents"):
    m["cn"].apply({"params": m["cn_params"]}, inputs["noise"], jnp.zeros((B,)), inputs["ctx"], inputs["mask"],
                  inputs["noise"][:, :4])


def test_canny_finds_a_square_outline_one_pixel_wide_and_hysteresis_keeps_only_connected_weak_edges():
  image = np.full((20, 24, 3), 245, np.uint8)
  image[5:15, 6:16] = (220, 40, 40)  # a red square: a strong step on every side
  edges = conditions.canny(image)
  ys, xs = np.nonzero(edges)
  assert edges.sum() > 0 and ys.min() >= 4 and ys.max() <= 15 and xs.min() >= 5 and xs.max() <= 16
  assert not edges[7:13, 8:14].any()  # nothing inside, nothing far outside
  for row in range(6, 14):  # non-maximum suppression: one pixel per side of each row
    assert edges[row].sum() == 2, (row, np.nonzero(edges[row]))
  # A faint bar (magnitude between low and high) survives only when it touches a strong edge.
  faint = np.full((20, 24, 3), 200, np.uint8)
  faint[:, 12:] = 180  # a grey step of 20: Sobel L1 80 (weak for low=50, high=100)
  assert not conditions.canny(faint, low=50, high=100).any()
  faint[8:12, 10:14] = 30  # a dark block on the faint line: strong edges connected to it
  kept = conditions.canny(faint, low=50, high=100)
  assert kept[:, 11:13].sum() > kept[8:12, 11:13].sum()  # the faint line grows out of the block
  assert conditions.edge_image(image).dtype == np.uint8 and set(np.unique(conditions.edge_image(image))) == {0, 255}


def test_control_image_is_resized_with_a_note_and_bad_files_are_named(tmp_path):
  from PIL import Image
  path = tmp_path / "edges.png"
  Image.fromarray(np.zeros((40, 30), np.uint8)).save(path)  # greyscale, wrong size and ratio
  image, note = conditions.load_control_image(str(path), 32)
  assert image.shape == (32, 32, 3) and "30x40" in note and "resized" in note and "aspect ratio" in note
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
  assert conditions.load_control_image(str(path), 32)[1] == ""
  with pytest.raises(ValueError, match="does not exist"):
    conditions.load_control_image(str(tmp_path / "missing.png"), 32)
  (tmp_path / "bad.png").write_text("not an image")
  with pytest.raises(ValueError, match="not a readable image"):
    conditions.load_control_image(str(tmp_path / "bad.png"), 32)
