"""SANA linear DiT: values of its parts against naive versions, and parity with diffusers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.kernels import depthwise_conv2d
from sanajax.models import attention, layers, sana_dit


def _tiny_model_config(**overrides):
  c = dict(config_utils.load_config("tiny").model)
  c.update(overrides)
  return c


def _inputs(c, key, batch=2, hw=(4, 6), length=7):
  kx, kt, kc = jax.random.split(key, 3)
  x = jax.random.normal(kx, (batch, *hw, c["in_channels"]))
  t = jax.random.uniform(kt, (batch,))
  ctx = jax.random.normal(kc, (batch, length, c["caption_channels"]))
  mask = np.ones((batch, length), np.int32)
  mask[0, 4:] = 0  # Right padding in the first sample.
  return x, t, ctx, jnp.asarray(mask)


@pytest.fixture(scope="module")
def tiny():
  c = _tiny_model_config(depth=2, hidden_size=64, cross_num_heads=2)  # Small: tests run on 2 shared cores.
  model = sana_dit.build_dit(c)
  x, t, ctx, mask = _inputs(c, jax.random.key(0))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), x, t, ctx, mask)["params"])
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return c, model, params, apply, (x, t, ctx, mask)


def test_forward_is_deterministic_and_conditioned(tiny):
  c, _, params, apply, (x, t, ctx, mask) = tiny
  out = apply(params, x, t, ctx, mask)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, apply(params, x, t, ctx, mask))
  # It depends on t, on the valid context and on the mask ...
  assert float(jnp.max(jnp.abs(out - apply(params, x, t * 0.5, ctx, mask)))) > 1e-3
  assert float(jnp.max(jnp.abs(out[0] - apply(params, x, t, ctx.at[0, 1].add(1.0), mask)[0]))) > 1e-4
  assert float(jnp.max(jnp.abs(out[0] - apply(params, x, t, ctx, jnp.ones_like(mask))[0]))) > 1e-5
  # ... but not on the masked-out text tokens.
  noisy = ctx.at[0, 4:].set(jax.random.normal(jax.random.key(5), (3, c["caption_channels"])) * 10)
  np.testing.assert_allclose(apply(params, x, t, noisy, mask), out, rtol=0, atol=1e-6)


def test_param_tree_and_logical_axes(tiny):
  c, model, params, _, (x, t, ctx, mask) = tiny
  assert {"patch_embed", "time_embed", "caption_projection", "caption_norm", "transformer_blocks_0",
          "transformer_blocks_1", "scale_shift_table", "proj_out"} == set(params)
  assert set(params["transformer_blocks_0"]) == {"attn1", "attn2", "ff", "scale_shift_table"}
  np.testing.assert_allclose(params["caption_norm"]["scale"], c["y_norm_scale"])
  boxed = jax.eval_shape(model.init, jax.random.key(1), x, t, ctx, mask)["params"]
  axes = nn_axes(boxed)
  assert axes["transformer_blocks_0"]["attn1"]["to_q"]["kernel"] == ("embed", "heads")
  assert axes["transformer_blocks_0"]["ff"]["conv_inverted"]["kernel"] == ("embed", "mlp")
  assert axes["caption_projection"]["linear_1"]["kernel"] == ("caption", "embed")


def nn_axes(boxed):
  return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned))


def test_linear_attention_module_equals_naive():
  h, hd, n = 64, 16, 10
  mod = attention.LinearSelfAttention(h, hd, eps=1e-15)
  x = jax.random.normal(jax.random.key(0), (2, n, h))
  p = nn.meta.unbox(jax.jit(mod.init)(jax.random.key(1), x)["params"])
  got = jax.jit(mod.apply)({"params": p}, x)
  q = np.asarray(x @ p["to_q"]["kernel"]).reshape(2, n, h // hd, hd)
  k = np.asarray(x @ p["to_k"]["kernel"]).reshape(2, n, h // hd, hd)
  v = np.asarray(x @ p["to_v"]["kernel"]).reshape(2, n, h // hd, hd)
  q, k = np.maximum(q, 0).astype(np.float64), np.maximum(k, 0).astype(np.float64)
  scores = np.einsum("bnhd,bmhd->bhnm", q, k)  # The O(N^2) form: relu(q) relu(k)^T.
  out = np.einsum("bhnm,bmhd->bnhd", scores, v) / (scores.sum(-1).transpose(0, 2, 1)[..., None] + 1e-15)
  want = out.reshape(2, n, h) @ np.asarray(p["to_out"]["kernel"], np.float64) + np.asarray(p["to_out"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mix_ffn_equals_numpy():
  h, ratio, hh, ww = 8, 2.5, 3, 5
  f = int(h * ratio)
  mod = layers.MixFFN(h, ratio)
  x = jax.random.normal(jax.random.key(0), (1, hh * ww, h))
  p = nn.meta.unbox(jax.jit(mod.init, static_argnums=(2, 3))(jax.random.key(1), x, hh, ww)["params"])
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)  # Non-zero biases.
  got = jax.jit(mod.apply, static_argnums=(2, 3))({"params": p}, x, hh, ww)
  silu = lambda a: a / (1 + np.exp(-a))
  a = silu(np.asarray(x[0]) @ np.asarray(p["conv_inverted"]["kernel"]) + np.asarray(p["conv_inverted"]["bias"]))
  a = np.pad(a.reshape(hh, ww, 2 * f), ((1, 1), (1, 1), (0, 0)))
  kern, bias = np.asarray(p["conv_depth"]["kernel"])[:, :, 0, :], np.asarray(p["conv_depth"]["bias"])
  dw = np.zeros((hh, ww, 2 * f))
  for i in range(hh):
    for j in range(ww):
      dw[i, j] = (a[i:i + 3, j:j + 3] * kern).sum((0, 1)) + bias
  y = dw[..., :f] * silu(dw[..., f:])
  want = y.reshape(hh * ww, f) @ np.asarray(p["conv_point"]["kernel"])
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,hw", [(3, (4, 6)), (5, (3, 2)), (1, (2, 3))])
def test_depthwise_conv_equals_grouped_conv_in_value_and_gradient(k, hw):
  # k=5 on a 3x2 grid: the padding is wider than the grid, so some windows see only zeros.
  c = 6
  x = jax.random.normal(jax.random.key(0), (2, *hw, c))
  w = jax.random.normal(jax.random.key(1), (k, k, 1, c))
  r = jax.random.normal(jax.random.key(2), (2, *hw, c))

  def grouped(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision="highest")

  np.testing.assert_allclose(depthwise_conv2d(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * r), (0, 1))(x, w)
  for got, want in zip(grad(depthwise_conv2d), grad(grouped)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="odd square kernel"):
    depthwise_conv2d(x, jnp.ones((2, 2, 1, c)))


def test_timestep_sinusoid_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0.0, 1.5, 999.0, 421.25], np.float32)
  want = get_timestep_embedding(torch.tensor(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  np.testing.assert_allclose(layers.timestep_sinusoid(jnp.asarray(t)), want, atol=2e-4)


def test_sincos_pe_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  want = get_2d_sincos_pos_embed(16, (3, 5), base_size=4, interpolation_scale=2.0, output_type="pt").numpy()
  np.testing.assert_allclose(layers.sincos_pos_embed_2d(16, 3, 5, 4, 2.0), want, atol=1e-6)


def test_remat_and_features_match_plain(tiny):
  c, _, params, apply, args = tiny
  out = apply(params, *args)
  model = sana_dit.build_dit(dict(c, remat="dots_saveable"), features_at=(0,))
  got, feats = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)
  np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-6)
  tokens = (args[0].shape[1] // c["patch_size"]) * (args[0].shape[2] // c["patch_size"])
  assert len(feats) == 1 and feats[0].shape == (2, tokens, c["hidden_size"])
  loss = lambda p: jnp.sum(model.apply({"params": p}, *args)[0] ** 2)
  g = jax.jit(jax.grad(loss))(params)
  assert np.isfinite(float(jnp.sum(g["transformer_blocks_1"]["attn1"]["to_q"]["kernel"] ** 2)))


def test_bfloat16_compute_keeps_float32_params():
  c = _tiny_model_config(depth=1, hidden_size=64, cross_num_heads=2, dtype="bfloat16")
  model = sana_dit.build_dit(c)
  x, t, ctx, mask = _inputs(c, jax.random.key(0))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), x, t, ctx, mask)["params"])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  out = jax.jit(model.apply)({"params": params}, x, t, ctx, mask)
  ref = jax.jit(sana_dit.build_dit(dict(c, dtype="float32")).apply)({"params": params}, x, t, ctx, mask)
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("variant", ["p1", "p2_pe_qknorm"])
def test_parity_with_diffusers(variant):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  if variant == "p1":
    c = _tiny_model_config(depth=2, hidden_size=64, linear_head_dim=16, cross_num_heads=4, cross_head_dim=8,
                           caption_channels=24, in_channels=6)
    hw, sample_size = (4, 6), 4
  else:
    c = _tiny_model_config(depth=2, hidden_size=64, linear_head_dim=16, cross_num_heads=2, cross_head_dim=24,
                           caption_channels=24, in_channels=6, patch_size=2, use_pe=True, pe_interpolation=2.0,
                           sample_size=6, qk_norm=True)
    hw, sample_size = (6, 10), 6
  torch.manual_seed(0)
  tm = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(c, sample_size=sample_size)).eval()
  with torch.no_grad():
    for prm in tm.parameters():  # Randomise everything (biases, norm scales) so that all of it is checked.
      prm.copy_(torch.randn_like(prm) * 0.2)
  x, t, ctx, mask = _inputs(c, jax.random.key(3), hw=hw)
  with torch.no_grad():
    want = tm(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), torch.tensor(np.asarray(ctx)),
              torch.tensor(np.asarray(t)) * 1000, encoder_attention_mask=torch.tensor(np.asarray(mask)),
              return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  params = sana_dit.params_from_diffusers_state_dict(tm.state_dict())
  model = sana_dit.build_dit(c)
  ref_shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, mask)["params"]
  ref_shapes = jax.tree.map(lambda b: b.value.shape, ref_shapes, is_leaf=lambda b: hasattr(b, "names"))
  assert jax.tree.map(jnp.shape, params) == ref_shapes
  got = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx, mask))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


# --- SANA-Sprint student options --------------------------------------------------------------

def _sprint_config(**overrides):
  # Odd sizes on purpose: 5 linear heads of 8, 3 cross heads of 12, 5 latent channels, 3x5 latents.
  c = _tiny_model_config(depth=2, hidden_size=40, linear_head_dim=8, cross_num_heads=3, cross_head_dim=12,
                         caption_channels=20, in_channels=5, qk_norm=True, guidance_embeds=True,
                         guidance_embeds_scale=0.1, timestep_scale=0.001, patch_size=1)
  c.update(overrides)
  return c


def test_sprint_parity_with_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  c = _sprint_config()
  kwargs = sana_dit.diffusers_kwargs(c, sample_size=3)
  assert kwargs["guidance_embeds"] and kwargs["qk_norm"] == "rms_norm_across_heads"
  assert kwargs["timestep_scale"] == 0.001 and kwargs["guidance_embeds_scale"] == 0.1
  torch.manual_seed(0)
  tm = diffusers.SanaTransformer2DModel(**kwargs).eval()
  with torch.no_grad():
    for prm in tm.parameters():  # Everything random, the guidance embedder's last layer included.
      prm.copy_(torch.randn_like(prm) * 0.2)
  x, t, ctx, mask = _inputs(c, jax.random.key(4), hw=(3, 5), length=5)
  g = jnp.array([4.0, 5.0])  # Teacher CFG scales, as Sprint samples them.
  # diffusers' pipelines do the scaling outside the transformer: SanaPipeline multiplies the
  # 0..1000 timestep by config.timestep_scale, SanaSprintPipeline the guidance by guidance_embeds_scale.
  with torch.no_grad():
    want = tm(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), torch.tensor(np.asarray(ctx)),
              torch.tensor(np.asarray(t)) * 1000 * kwargs["timestep_scale"],
              guidance=torch.tensor(np.asarray(g)) * kwargs["guidance_embeds_scale"],
              encoder_attention_mask=torch.tensor(np.asarray(mask)), return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  params = sana_dit.params_from_diffusers_state_dict(tm.state_dict())
  assert set(params["time_embed"]) == {"timestep_embedder", "guidance_embedder", "linear"}
  model = sana_dit.build_dit(c)
  ref_shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, mask)["params"]
  ref_shapes = jax.tree.map(lambda b: b.value.shape, ref_shapes, is_leaf=lambda b: hasattr(b, "names"))
  assert jax.tree.map(jnp.shape, params) == ref_shapes
  apply = jax.jit(lambda p, g: model.apply({"params": p}, x, t, ctx, mask, guidance=g))
  got = np.asarray(apply(params, g))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
  # The guidance input matters (the embedding is not ignored).
  assert np.max(np.abs(np.asarray(apply(params, g + 1.0)) - got)) > 1e-3 * np.max(np.abs(got))


@pytest.fixture(scope="module")
def sprint():
  """A tiny dense-time, qk-norm teacher and a guidance-embeds student of the same size, both initialised."""
  teacher, student = sana_dit.build_dit(_sprint_config(guidance_embeds=False)), sana_dit.build_dit(_sprint_config())
  x, t, ctx, mask = _inputs(_sprint_config(), jax.random.key(0), hw=(3, 5), length=5)
  sp = nn.meta.unbox(jax.jit(student.init)(jax.random.key(2), x, t, ctx, mask)["params"])
  # The teacher's tree is the student's without the CFG embedder (one init compile instead of two);
  # its values are perturbed so that copying them into the student is visible.
  tp = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), dict(sp))
  tp["time_embed"] = {"emb": {"timestep_embedder": tp["time_embed"]["timestep_embedder"]},
                      "linear": tp["time_embed"]["linear"]}
  assert jax.tree.map(jnp.shape, tp) == jax.tree.map(
      jnp.shape, nn.meta.unbox(jax.eval_shape(teacher.init, jax.random.key(1), x, t, ctx, mask)["params"]))
  return teacher, tp, student, sp, (x, t, ctx, mask)


def test_sprint_student_from_teacher_starts_as_teacher(sprint):
  teacher, tp, student, sp, (x, t, ctx, mask) = sprint
  gl = sp["time_embed"]["guidance_embedder"]["linear_2"]
  assert not np.any(gl["kernel"]) and not np.any(gl["bias"])  # Zero-init last layer.
  sp = sana_dit.student_params_from_teacher(tp, sp)
  want = jax.jit(teacher.apply)({"params": tp}, x, t, ctx, mask)
  got = jax.jit(lambda p, g: student.apply({"params": p}, x, t, ctx, mask, guidance=g))(sp, jnp.array([4.0, 4.5]))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  wider = jax.tree.map(lambda a: jnp.zeros(a.shape[:-1] + (a.shape[-1] + 1,)), tp)
  with pytest.raises(ValueError, match="shape"):
    sana_dit.student_params_from_teacher(wider, sp)


def test_sprint_dense_time_and_guidance_errors(sprint):
  teacher, tp, student, sp, (x, t, ctx, mask) = sprint
  # timestep_scale 0.001 embeds t itself: the same as the 1000-scale model fed t / 1000.
  plain = sana_dit.build_dit(_sprint_config(guidance_embeds=False, timestep_scale=1.0))
  both = jax.jit(lambda p: (teacher.apply({"params": p}, x, t, ctx, mask),
                            plain.apply({"params": p}, x, t / 1000.0, ctx, mask)))
  dense_out, plain_out = both(tp)
  np.testing.assert_allclose(dense_out, plain_out, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="guidance_embeds=False"):
    jax.eval_shape(lambda p: teacher.apply({"params": p}, x, t, ctx, mask, guidance=jnp.ones(2)), tp)
  with pytest.raises(ValueError, match="pass guidance"):
    jax.eval_shape(lambda p: student.apply({"params": p}, x, t, ctx, mask), sp)


def test_logvar_head_reads_the_sown_time_embedding(sprint):
  _, _, model, params, (x, t, ctx, mask) = sprint
  g = jnp.array([4.0, 5.0])
  run = jax.jit(lambda p: (model.apply({"params": p}, x, t, ctx, mask, guidance=g, mutable=["intermediates"]),
                           model.apply({"params": p}, x, t, ctx, mask, guidance=g)))
  (out, state), plain_out = run(params)
  np.testing.assert_array_equal(out, plain_out)
  emb = state["intermediates"]["time_embedding"][0]
  assert emb.shape == (2, model.hidden_size)
  head = sana_dit.LogVarHead()
  hp = nn.meta.unbox(head.init(jax.random.key(2), emb)["params"])
  u = head.apply({"params": hp}, emb)
  assert u.shape == (2,)
  want = np.asarray(emb) @ np.asarray(hp["logvar_linear"]["kernel"])[:, 0] + np.asarray(hp["logvar_linear"]["bias"])
  np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(u[0] - u[1])) > 0  # Depends on the sample's t.
