"""CAME against the authors' PyTorch code and a numpy transcription of Algorithm 1; build_optimizer."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sanajax.training import optim

SHAPES = {"bias": (7,), "matrix": (5, 3), "conv": (2, 4, 3)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(num_steps, seed=1):
  """Per-step gradients; row 0 of the matrix is zero at step 0 (eps1 keeps it finite)."""
  rng = np.random.default_rng(seed)
  steps = [{k: rng.normal(size=s).astype(np.float32) * (1 + i) for k, s in SHAPES.items()} for i in range(num_steps)]
  steps[0]["matrix"][0] = 0.0
  return steps


def _run_optax(tx, params, grads):
  """Params after each step, as numpy dicts."""
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, params))
  return history


def _assert_close(history, ref_history, rtol=1e-5, atol=1e-6):
  for step, (p, r) in enumerate(zip(history, ref_history)):
    for k in SHAPES:
      np.testing.assert_allclose(p[k], r[k], rtol=rtol, atol=atol, err_msg=f"step {step}, {k}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_came_matches_came_pytorch(weight_decay):
  import came_pytorch  # A test extra (setup.py): missing it is an install error, not a skip.
  import torch
  params, grads = _params(), _grads(6)
  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  ref_opt = came_pytorch.CAME(list(torch_params.values()), lr=3e-2, weight_decay=weight_decay,
                              betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
  ref_history = []
  for g in grads:
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(g[k])
    ref_opt.step()
    ref_history.append({k: p.detach().numpy().copy() for k, p in torch_params.items()})
  history = _run_optax(optim.came(3e-2, weight_decay=weight_decay), params, grads)
  _assert_close(history, ref_history)


def _came_algorithm1(theta, grads, lr, b1=0.9, b2=0.999, b3=0.9999, eps1=1e-30, eps2=1e-16, d=1.0):
  """Algorithm 1 of the CAME paper for one n x m matrix, in float64 with the paper's sums."""
  n, m = theta.shape
  r, c, big_r, big_c = np.zeros(n), np.zeros(m), np.zeros(n), np.zeros(m)
  mom = np.zeros((n, m))
  theta = theta.astype(np.float64)
  out = []
  for g in grads:
    g = g.astype(np.float64)
    r = b2 * r + (1 - b2) * (g ** 2 + eps1) @ np.ones(m)
    c = b2 * c + (1 - b2) * np.ones(n) @ (g ** 2 + eps1)
    v = np.outer(r, c) / (np.ones(n) @ r)
    u = g / np.sqrt(v)
    u_hat = u / max(1.0, np.sqrt(np.mean(u ** 2)) / d)
    mom = b1 * mom + (1 - b1) * u_hat
    instability = (u_hat - mom) ** 2
    big_r = b3 * big_r + (1 - b3) * (instability + eps2) @ np.ones(m)
    big_c = b3 * big_c + (1 - b3) * np.ones(n) @ (instability + eps2)
    s = np.outer(big_r, big_c) / (np.ones(n) @ big_r)
    theta = theta - lr * mom / np.sqrt(s)
    out.append(theta)
  return out


def test_came_matches_algorithm_1():
  rng = np.random.default_rng(3)
  theta = rng.normal(size=(6, 4)).astype(np.float32)
  grads = [rng.normal(size=(6, 4)).astype(np.float32) * s for s in (1.0, 0.1, 3.0, 1.0, 0.5)]
  ref = _came_algorithm1(theta, grads, lr=1e-2)
  tx = optim.came(1e-2)
  p, state, update = jnp.asarray(theta), tx.init(jnp.asarray(theta)), jax.jit(tx.update)
  for g, r in zip(grads, ref):
    updates, state = update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-6)


def test_came_update_is_clipped_and_state_is_small():
  params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
  grads = {"w": jnp.full((64, 32), 1e3), "b": jnp.full((32,), -1e-4)}
  tx = optim.came(1.0)
  state = tx.init(params)
  # Factored: O(n + m) second-moment memory for the matrix, a (1,) placeholder for the full v.
  assert state.v_row["w"].shape == (64,) and state.v_col["w"].shape == (32,) and state.v["w"].shape == (1,)
  assert state.v["b"].shape == (32,) and state.r_row["b"].shape == (1,)
  updates, _ = tx.update(grads, state, params)
  # Unfactored (1-D): no confidence step, so the move is (1 - b1) times the clipped update (RMS 1),
  # whatever the gradient's scale.
  np.testing.assert_allclose(updates["b"], 0.1, rtol=1e-3)
  # Factored: the clipped update u^ = 1 everywhere, m = 0.1, instability (u^ - m)^2 = 0.81, so
  # S = (1 - b3) 0.81 and the move is m / sqrt(S) = 0.1 / 0.009 (no bias correction in CAME).
  np.testing.assert_allclose(updates["w"], -0.1 / (0.9 * np.sqrt(1e-4)), rtol=1e-3)


def test_came_weight_decay_needs_params():
  tx = optim.came(1e-3, weight_decay=0.1)
  params = {"w": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


def _train_config(**overrides):
  c = ml_collections.ConfigDict(dict(optimizer="adamw", learning_rate=1e-3, warmup_steps=100, schedule="constant",
                                     weight_decay=0.0, grad_clip=1.0))
  c.update(overrides)
  return c


def test_schedule_warmup_constant_and_cosine():
  # lr(count), count = optax's 0-based update count = training step - 1.
  _, lr = optim.build_optimizer(_train_config(), num_steps=1000)
  assert float(lr(0)) == pytest.approx(1e-5, rel=1e-5)  # the first update already moves: peak / warmup_steps.
  assert float(lr(24)) == pytest.approx(2.5e-4)
  assert float(lr(49)) == pytest.approx(5e-4)
  assert float(lr(98)) == pytest.approx(9.9e-4)
  assert float(lr(99)) == pytest.approx(1e-3)  # peak at step warmup_steps.
  assert float(lr(999)) == pytest.approx(1e-3)
  _, lr = optim.build_optimizer(_train_config(schedule="cosine"), num_steps=1100)
  assert float(lr(99)) == pytest.approx(1e-3)
  assert float(lr(599)) == pytest.approx(5e-4, rel=1e-4)  # half way through the decay.
  assert float(lr(1099)) == pytest.approx(0.0, abs=1e-9)  # 0 at the last step.
  _, lr = optim.build_optimizer(_train_config(warmup_steps=0), num_steps=10)
  assert float(lr(0)) == pytest.approx(1e-3)


def test_warmup_scales_the_first_updates():
  tx, _ = optim.build_optimizer(_train_config(grad_clip=0.0, warmup_steps=4), num_steps=10)
  params = {"w": jnp.ones((3,))}
  state, update = tx.init(params), jax.jit(tx.update)
  sizes = []
  for _ in range(5):
    updates, state = update({"w": jnp.ones((3,))}, state, params)
    sizes.append(float(jnp.abs(updates["w"]).max()))
  # Adam's first updates are ~lr(step) in size: 1/4, 2/4, 3/4, 1, 1 of the peak (none wasted at 0).
  np.testing.assert_allclose(sizes, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-4, atol=1e-9)


def test_global_norm_clipping():
  params = {"a": jnp.zeros((4,)), "b": jnp.zeros((2, 2))}
  big = {"a": jnp.full((4,), 5.0), "b": jnp.full((2, 2), -5.0)}  # global norm sqrt(200).
  small = {"a": jnp.array([0.1, 0.0, 0.0, 0.0]), "b": jnp.zeros((2, 2))}  # norm 0.1: untouched.

  def run(grad_clip, grads_seq):
    tx, _ = optim.build_optimizer(_train_config(grad_clip=grad_clip, warmup_steps=0), num_steps=10)
    state, out, update = tx.init(params), [], jax.jit(tx.update)
    for g in grads_seq:
      updates, state = update(g, state, params)
      out.append(updates)
    return out

  scaled = jax.tree.map(lambda g: g / np.sqrt(200.0), big)  # what clip_by_global_norm(1.0) makes of `big`.
  expected = run(0.0, [scaled, small])
  got = run(1.0, [big, small])
  unclipped = run(0.0, [big, small])
  for e, g in zip(expected, got):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), e, g)
  # Adam is scale-free on one step, but the second step sees the clipped history.
  assert not np.allclose(got[1]["a"], unclipped[1]["a"])


def test_adamw_weight_decay_and_came_from_config():
  params = {"w": jnp.full((2, 3), 2.0)}
  zeros = {"w": jnp.zeros((2, 3))}
  tx, _ = optim.build_optimizer(_train_config(weight_decay=0.1, warmup_steps=0, grad_clip=0.0), num_steps=10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-3 * 0.1 * 2.0, rtol=1e-6)
  tx, _ = optim.build_optimizer(_train_config(optimizer="came", warmup_steps=0), num_steps=10)
  history = _run_optax(tx, _params(), _grads(2))
  ref = _run_optax(optax.chain(optax.clip_by_global_norm(1.0), optim.came(1e-3)), _params(), _grads(2))
  _assert_close(history, ref, rtol=1e-6, atol=0)


def test_adam_moment_decays_from_config():
  tx, _ = optim.build_optimizer(_train_config(adam_b1=0.8, adam_b2=0.95, warmup_steps=0, grad_clip=0.0), num_steps=10)
  history = _run_optax(tx, _params(), _grads(3))
  _assert_close(history, _run_optax(optax.adamw(1e-3, b1=0.8, b2=0.95, weight_decay=0.0), _params(), _grads(3)),
                rtol=1e-6, atol=0)
  default, _ = optim.build_optimizer(_train_config(warmup_steps=0, grad_clip=0.0), num_steps=10)
  assert not np.allclose(_run_optax(default, _params(), _grads(3))[-1]["matrix"], history[-1]["matrix"])


@pytest.mark.parametrize("field,value,match", [("optimizer", "sgd", "optimizer"), ("schedule", "linear", "schedule")])
def test_build_optimizer_errors(field, value, match):
  with pytest.raises(ValueError, match=match):
    optim.build_optimizer(_train_config(**{field: value}), num_steps=10)
  del_cfg = dict(_train_config())
  del del_cfg["learning_rate"]
  with pytest.raises(ValueError, match="learning_rate"):
    optim.build_optimizer(del_cfg, num_steps=10)


def _newton_schulz5(g):
  """Keller Jordan's quintic Newton-Schulz orthogonalisation (5 steps), in numpy."""
  a, b, c = 3.4445, -4.775, 2.0315
  x = g / (np.linalg.norm(g) + 1e-8)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  for _ in range(5):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def test_muon_orthogonalises_kernels_with_adamw_rms_and_adam_for_the_rest():
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
            "conv": {"kernel": rng.normal(size=(1, 1, 5, 3))},        # a 1x1 conv: (in 5, out 3)
            "depthwise": {"kernel": rng.normal(size=(3, 3, 1, 4))},   # in = 1: not a matrix map
            "scale_shift_table": rng.normal(size=(6, 4))}              # 2-D but not a kernel
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  lr = 1e-2
  tx, _ = optim.build_optimizer(_train_config(optimizer="muon", learning_rate=lr, warmup_steps=0, grad_clip=0.0),
                                num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First step: the momentum is the gradient, orthogonalised and scaled to RMS 0.2 (0.2 sqrt(max(n, m))
  # times a semi-orthogonal n x m matrix), times -lr.
  dense = -lr * optim.MUON_MATCHED_RMS * np.sqrt(6) * _newton_schulz5(np.asarray(grads["dense"]["kernel"]))
  np.testing.assert_allclose(updates["dense"]["kernel"], dense, rtol=1e-4, atol=1e-7)
  conv = -lr * optim.MUON_MATCHED_RMS * np.sqrt(5) * _newton_schulz5(np.asarray(grads["conv"]["kernel"]).reshape(5, 3))
  np.testing.assert_allclose(np.asarray(updates["conv"]["kernel"]).reshape(5, 3), conv, rtol=1e-4, atol=1e-7)
  # Everything else takes optax's (Nesterov) AdamW step with the same learning rate.
  adam = optax.nadamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  adam_updates, _ = adam.update(grads, adam.init(params), params)
  for path in (("dense", "bias"), ("depthwise", "kernel"), ("scale_shift_table",)):
    got, want = updates, adam_updates
    for k in path:
      got, want = got[k], want[k]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=str(path))
  assert not np.allclose(updates["dense"]["kernel"], adam_updates["dense"]["kernel"], atol=1e-5)


def test_grouped_muon_equals_optax_muon_in_updates_and_state():
  # Same-shaped kernels (grouped into one batched Newton-Schulz), a tall one (iterated transposed), a stacked
  # scan_layers kernel (its layers join the group of their shape), a 1x1 conv, and AdamW leaves.
  rng = np.random.default_rng(1)
  params = {"a": {"kernel": rng.normal(size=(7, 5))}, "b": {"kernel": rng.normal(size=(7, 5))},
            "tall": {"kernel": rng.normal(size=(9, 4)), "bias": rng.normal(size=(4,))},
            "transformer_blocks": {"q": {"kernel": rng.normal(size=(3, 7, 5))}},
            "conv": {"kernel": rng.normal(size=(1, 1, 7, 5))}, "table": rng.normal(size=(2, 5))}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  kwargs = dict(beta=0.95, eps=1e-8, weight_decay=0.01)
  ref = optax.contrib.muon(1e-2, adam_b1=0.9, adam_b2=0.999, adam_weight_decay=0.01, consistent_rms=0.2,
                           muon_weight_dimension_numbers=optim.muon_dimension_numbers, **kwargs)
  ours = optim.muon(1e-2, b1=0.9, b2=0.999, **kwargs)
  ref_state, state = ref.init(params), ours.init(params)
  assert jax.tree.structure(ref_state) == jax.tree.structure(state)  # checkpoints restore either way
  p_ref = p = params
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u_ref, ref_state = ref.update(grads, ref_state, p_ref)
    u, state = jax.jit(ours.update)(grads, state, p)
    for got, want in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=f"step {step}")
    p_ref, p = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p, u)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  # One batched product per shape: the three 7x5 matrices (a, b, the stacked layers and the conv: 1+1+3+1 = 6)
  # share the Newton-Schulz matmuls, so the update holds far fewer dots than one set per matrix.
  dots = lambda tx: len(re.findall(r"= f32\[[^\]]*\]\S* dot\(", jax.jit(tx.update).lower(grads, tx.init(params), params).compile().as_text()))
  assert dots(ours) < dots(ref) / 2, (dots(ours), dots(ref))
