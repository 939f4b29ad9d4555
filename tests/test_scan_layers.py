"""model.scan_layers: the scanned DiT equals the unrolled one (forward, features, ControlNet residuals,
training losses under CAME and Muon), checkpoints and diffusers weights move between the two block
layouts, and the stacked axis `layers` stays whole under an 8-device sharding plan."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.models import sana_dit, sana_dit_diffusers
from sanajax.training import loop as loop_lib
from sanajax.training.optim import build_optimizer
from sanajax.training.state import create_train_state
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import checkpoint_dir, prepare_workdir
from sanajax.workdir.loaders import init_params_from, load_dit_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
  c = config_utils.load_config("tiny")
  c.model.update(model)
  return c


def _inputs(c, batch=2, hw=(4, 6), length=5):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, *hw, c.model.in_channels))
  t = jax.random.uniform(keys[1], (batch,))
  ctx = jax.random.normal(keys[2], (batch, length, c.model.caption_channels))
  mask = jnp.ones((batch, length), jnp.int32).at[0, 3:].set(0)
  return x, t, ctx, mask, jax.random.normal(keys[3], x.shape)


@pytest.fixture(scope="module")
def tiny():
  """configs/tiny.py's DiT with 3 blocks (odd, so no layer pairs up by accident), unrolled params."""
  c = _config(depth=3)
  x, t, ctx, mask, noise = _inputs(c)
  params = jax.jit(sana_dit.build_dit(c.model).init)(jax.random.key(1), x, t, ctx, mask)["params"]
  return c, params, (x, t, ctx, mask, noise)


def _close(a, b, rtol=2e-5, atol=0.0):
  """Every leaf of b equals a to rtol of a's largest magnitude plus atol (float32 reassociation only)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    scale = float(jnp.max(jnp.abs(x))) or 1.0
    assert float(jnp.max(jnp.abs(x - y))) <= rtol * scale + atol, (x.shape, float(jnp.max(jnp.abs(x - y))), scale)


def test_layouts_round_trip_and_name_the_layer_axis(tiny):
  c, boxed, _ = tiny
  stacked = sana_dit.stack_layers(boxed)
  assert sana_dit.is_stacked(stacked) and not sana_dit.is_stacked(boxed)
  q = stacked["transformer_blocks"]["attn1"]["to_q"]["kernel"]
  assert q.names == ("layers", "embed", "heads") and q.value.shape == (3, 96, 96)
  np.testing.assert_array_equal(q.value[2], boxed["transformer_blocks_2"]["attn1"]["to_q"]["kernel"].value)
  # The model's own scanned init has the same tree, names and shapes.
  scan_model = sana_dit.build_dit(dict(c.model, scan_layers=True))
  x, t, ctx, mask, _ = tiny[2]
  own = jax.eval_shape(scan_model.init, jax.random.key(1), x, t, ctx, mask)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert [v.shape for v in jax.tree.leaves(own)] == [v.shape for v in jax.tree.leaves(stacked)]
  back = sana_dit.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(boxed)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(boxed)):
    np.testing.assert_array_equal(a, b)
  assert sana_dit.to_layout(stacked, True) is stacked or jax.tree.structure(sana_dit.to_layout(stacked, True)) == \
      jax.tree.structure(stacked)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unrolled_forward_features_and_residuals(tiny, remat):
  c, boxed, (x, t, ctx, mask, _) = tiny
  params = nn.unbox(boxed)
  stacked = sana_dit.stack_layers(params)
  unrolled = sana_dit.build_dit(dict(c.model, remat=remat), features_at=(0, 2))
  scanned = sana_dit.build_dit(dict(c.model, remat=remat, scan_layers=True), features_at=(0, 2))
  residuals = [jax.random.normal(jax.random.key(7), (2, 6, 96))]  # after block 1 (ControlNet)
  out_u, feats_u = unrolled.apply({"params": params}, x, t, ctx, mask, controlnet_residuals=residuals)
  out_s, feats_s = scanned.apply({"params": stacked}, x, t, ctx, mask, controlnet_residuals=residuals)
  _close(out_u, out_s)
  _close(feats_u, feats_s)
  plain = sana_dit.build_dit(dict(c.model, remat=remat)).apply({"params": params}, x, t, ctx, mask)
  assert float(jnp.max(jnp.abs(plain - out_u))) > 1e-2  # the residual changed the output


def _train(c, params, batch, optimizer, steps=2):
  """`steps` flow-matching updates of c.model (its layout given by c.model.scan_layers); the losses."""
  x, t, ctx, mask, noise = batch
  model = sana_dit.build_dit(c.model)
  tx, _ = build_optimizer(ml_collections.ConfigDict(dict(c.train, optimizer=optimizer, warmup_steps=0)), 100)

  def loss_fn(p):
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    return jnp.mean((model.apply({"params": p}, xt, t, ctx, mask) - (noise - x)) ** 2)

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return jax.tree.map(jnp.add, p, u), o, loss

  opt, losses = tx.init(params), []
  for _ in range(steps):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  return losses, params


def test_scan_trains_as_unrolled(tiny):
  """configs/tiny.py's recipe (Muon): the same losses step by step and the same weights after (Muon
  orthogonalises each stacked layer on its own)."""
  c, boxed, batch = tiny
  params = nn.unbox(boxed)
  losses_u, p_u = _train(c, params, batch, c.train.optimizer)
  c_scan = _config(depth=3, scan_layers=True)
  losses_s, p_s = _train(c_scan, sana_dit.stack_layers(params), batch, c.train.optimizer)
  np.testing.assert_allclose(losses_s, losses_u, rtol=2e-5)
  assert losses_u[-1] < losses_u[0]
  # atol: 1% of the 2 steps' movement (lr 4e-3); the cross-attention key bias has a zero gradient
  # (softmax ignores a per-query constant), so Adam moves it by normalised float32 noise in both layouts.
  _close(sana_dit.stack_layers(p_u), p_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["came", "muon", "adamw"])
def test_optimizers_update_each_stacked_layer_as_its_own_parameter(optimizer):
  """Two updates of a stacked tree equal the stacked updates of the unrolled tree: CAME factors and clips
  per layer (a stacked bias stays unfactored), Muon orthogonalises per layer."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  layer = lambda: {"attn": {"kernel": jax.random.normal(next(keys), (6, 5)), "bias": jax.random.normal(next(keys), (5,))},
                   "conv": {"kernel": jax.random.normal(next(keys), (3, 3, 4, 5))}}
  params = {"transformer_blocks_0": layer(), "transformer_blocks_1": layer(), "proj_out": {"kernel": jnp.ones((5, 3))}}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (3 + i)) * (1 + 9 * i), params) for i in range(2)]
  tx, _ = build_optimizer(ml_collections.ConfigDict(dict(optimizer=optimizer, learning_rate=1e-2)), 10)
  out = {}
  for name, convert in (("unrolled", lambda t: t), ("stacked", sana_dit.stack_layers)):
    p, o = convert(params), tx.init(convert(params))
    update = jax.jit(tx.update)
    for g in grads:
      u, o = update(convert(g), o, p)
      p = jax.tree.map(jnp.add, p, u)
    out[name] = p
  _close(sana_dit.stack_layers(out["unrolled"]), out["stacked"], rtol=1e-5)
  assert float(jnp.max(jnp.abs(out["unrolled"]["transformer_blocks_1"]["attn"]["kernel"] -
                               params["transformer_blocks_1"]["attn"]["kernel"]))) > 1e-3


def test_checkpoints_restore_in_the_other_layout(tiny, tmp_path):
  """A workdir trained unrolled opens as stacked params (sampling, init_from) and resumes into a stacked
  train state (optimizer moments included), and back."""
  c, boxed, _ = tiny
  c.train.optimizer = "came"
  tx, _ = build_optimizer(c.train, 10)
  prepare_workdir(str(tmp_path), c)
  state = create_train_state(boxed, tx, jax.random.PRNGKey(3))
  state = state.replace(opt_state=jax.tree.map(lambda v: v + (0.5 if v.dtype == jnp.float32 else 1), state.opt_state))
  ckpt = Checkpointer(checkpoint_dir(str(tmp_path)))
  ckpt.save(1, state)
  ckpt.wait()

  c_scan = _config(depth=3, scan_layers=True)
  got = load_dit_params(str(tmp_path), c_scan)
  assert sana_dit.is_stacked(nn.unbox(got))
  _close(sana_dit.stack_layers(nn.unbox(boxed)), nn.unbox(got), rtol=0)
  like = jax.eval_shape(sana_dit.build_dit(c_scan.model).init, jax.random.key(1), *tiny[2][:4])["params"]
  like = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like)
  _close(nn.unbox(got), nn.unbox(init_params_from(str(tmp_path), like)), rtol=0)

  stacked_init = create_train_state(sana_dit.stack_layers(boxed), tx, jax.random.PRNGKey(4))
  restored, _ = loop_lib._restore_any_layout(ckpt, stacked_init)  # pylint: disable=protected-access
  assert jax.tree.structure(restored) == jax.tree.structure(stacked_init)
  _close(sana_dit.stack_layers(state.opt_state), restored.opt_state, rtol=0)
  _close(sana_dit.unstack_layers(restored.params), state.params, rtol=0)
  ckpt.close()


def test_diffusers_conversion_with_scan(tiny, tmp_path):
  """A stacked tree exports to diffusers (SanaTransformer2DModel loads it and computes the scanned model's
  output) and imports back stacked, bit-identical."""
  torch = pytest.importorskip("torch")
  from diffusers import SanaTransformer2DModel
  c, boxed, (x, t, ctx, mask, _) = tiny
  model_config = dict(c.model, scan_layers=True)
  model = sana_dit.build_dit(model_config)
  stacked = sana_dit.stack_layers(nn.unbox(boxed))
  out = model.apply({"params": stacked}, x, t, ctx, mask)
  # The PE's base grid is the input's (no model.sample_size): diffusers' sample_size says it, as in test_sana_dit.
  sana_dit_diffusers.save_diffusers(str(tmp_path / "transformer"), model, stacked, sample_size=x.shape[1])
  ref = SanaTransformer2DModel.from_pretrained(str(tmp_path / "transformer")).eval()
  with torch.no_grad():
    got = ref(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(
        np.asarray(ctx)), encoder_attention_mask=torch.from_numpy(np.asarray(mask)),
        timestep=torch.from_numpy(np.asarray(t) * 1000)).sample.permute(0, 2, 3, 1).numpy()
  assert float(np.max(np.abs(got - np.asarray(out)))) <= 1e-4 * float(np.max(np.abs(got)))
  loaded_model, loaded = sana_dit_diffusers.load_sana_transformer(str(tmp_path / "transformer"), scan_layers=True)
  assert loaded_model.scan_layers and sana_dit.is_stacked(loaded)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)


_SHARDED = textwrap.dedent("""
  import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
  from sanajax import config_utils
  from sanajax.models import sana_dit
  from sanajax.parallel import Plan
  c = config_utils.load_config("tiny")
  c.model.update(depth=3, hidden_size=64, cross_num_heads=2, scan_layers=True, remat="full")
  c.mesh.fsdp, c.mesh.tensor = 4, 2
  plan = Plan.from_config(c)
  model = sana_dit.build_dit(c.model)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, c.model.in_channels)); t = jnp.linspace(0.1, 0.9, 8)
  ctx = jax.random.normal(jax.random.key(2), (8, 5, c.model.caption_channels)); mask = jnp.ones((8, 5), jnp.int32)
  boxed = model.init(jax.random.key(1), x, t, ctx, mask)["params"]
  loss = lambda p, *a: jnp.sum(model.apply({"params": p}, *a) ** 2)
  one = jax.jit(jax.value_and_grad(loss))(nn.unbox(boxed), x, t, ctx, mask)
  placed = nn.unbox(plan.place(boxed))
  print("SPEC", tuple(placed["transformer_blocks"]["attn1"]["to_q"]["kernel"].sharding.spec))
  batch = plan.shard_global_batch(dict(x=x, t=t, c=ctx, m=mask))
  with plan.activate():
    many = jax.jit(jax.value_and_grad(loss), out_shardings=(plan.replicated, nn.unbox(plan.shardings(boxed))))(
        placed, batch["x"], batch["t"], batch["c"], batch["m"])
  # Relative to each leaf's scale, floored at 1e-3 of the largest (the key bias's gradient is ~0).
  top = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(one))
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(a))), 1e-3 * top))
  print("DIFF", max(rel(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many))))
""")


def test_layers_axis_under_an_8_device_plan():
  """fsdp=4 x tensor=2: a stacked kernel (layers, embed, heads) is split (None, fsdp, tensor), and the
  sharded scanned loss and gradients equal the one-device ones."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in ("SPEC", "DIFF"))
  assert lines["SPEC"] == "(None, 'fsdp', 'tensor')"
  assert float(lines["DIFF"]) <= 1e-4


@pytest.mark.slow  # four XLA compiles of a train step: ~60 s of one core
def test_compile_time_table_on_a_tiny_stand_in():
  """sanajax.info --compile's table, on configs/tiny.py at 2 and 5 blocks (the real sizes take minutes)."""
  from sanajax.training import compile_time
  lines = []
  rows = compile_time.compile_table((("tiny 2", "tiny", {"depth": 2}), ("tiny 5", "tiny", {"depth": 5})),
                                    progress=lines.append, latent_side=4, text_length=5)
  assert [r["depth"] for r in rows] == [2, 5]
  # A line as each step starts and as it ends, with its own seconds (the real sizes take minutes each).
  steps = [f"[{i + 1}/4] tiny {d}, {kind} blocks" for i, (d, kind) in
           enumerate([(2, "unrolled"), (2, "scanned"), (5, "unrolled"), (5, "scanned")])]
  assert lines[0::2] == [f"{s}: lowering and compiling the train step ..." for s in steps]
  key = lambda i: f"{'scan' if i % 2 else 'unrolled'}"
  assert lines[1::2] == [f"{s}: lowered in {rows[i // 2][key(i) + '_lower_s']:.1f} s, compiled in "
                         f"{rows[i // 2][key(i) + '_compile_s']:.1f} s" for i, s in enumerate(steps)]
  assert all(r[f"{k}{unit}"] > 0 for r in rows for k in ("unrolled_lower", "unrolled_compile", "scan_lower", "scan_compile")
             for unit in ("_s", "_cpu_s"))
  table = compile_time.format_compile_table(rows)
  assert "| tiny 5 | 5 |" in table and table.count("\n") == 4
