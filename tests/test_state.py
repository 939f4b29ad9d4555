"""Train-state pieces: the EMA and its warm-up, the non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sanajax.training import state as state_lib


def test_ema_decay_warms_up_then_saturates():
  np.testing.assert_allclose(float(state_lib.ema_decay_at(0, 0.999)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(state_lib.ema_decay_at(90, 0.999)), 91 / 100, rtol=1e-6)
  assert float(state_lib.ema_decay_at(100_000, 0.999)) == np.float32(0.999)


def test_ema_update_values():
  ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  out = state_lib.ema_update(ema, params, 0.999, jnp.asarray(90))
  np.testing.assert_allclose(np.asarray(out["w"]), 1 - 0.91, rtol=1e-6)
  assert state_lib.ema_update(ema, params, 0.0, jnp.asarray(5)) is params


def test_non_finite_update_is_skipped_and_recorded():
  tx = optax.sgd(0.1)
  st = state_lib.create_train_state({"w": jnp.ones(2)}, tx, jax.random.PRNGKey(0))
  st, _ = state_lib.apply_gradients(st, {"w": jnp.ones(2)}, jnp.float32(1.0), tx, 0.0, st.rng)
  np.testing.assert_allclose(np.asarray(st.params["w"]), 0.9)
  bad, _ = state_lib.apply_gradients(st, {"w": jnp.array([jnp.nan, 1.0])}, jnp.float32(1.0), tx, 0.0, st.rng)
  np.testing.assert_array_equal(np.asarray(bad.params["w"]), np.asarray(st.params["w"]))
  assert int(bad.step) == 2 and int(bad.nan_step) == 2
  assert state_lib.NAN_QUANTITIES[int(bad.nan_code)] == "grad_norm"
  worse, _ = state_lib.apply_gradients(bad, {"w": jnp.ones(2)}, jnp.float32(jnp.inf), tx, 0.0, bad.rng)
  assert int(worse.nan_step) == 2  # the first bad step is kept


def test_host_batch_size_splits_the_global_batch_or_says_why_not(monkeypatch):
  from sanajax import config_check  # its home (validate_config checks the split before any work)

  class FakePlan:  # only what host_batch_size reads: data x fsdp = 4 batch shards
    def batch_shards(self):
      return 4

  assert config_check.host_batch_size(FakePlan(), 8) == 8
  with pytest.raises(ValueError, match=r"multiple of the batch shards \(4"):
    config_check.host_batch_size(FakePlan(), 6)
  monkeypatch.setattr(config_check.jax, "process_count", lambda: 2)
  assert config_check.host_batch_size(FakePlan(), 8) == 4  # each of the 2 processes reads half
  monkeypatch.setattr(config_check.jax, "process_count", lambda: 8)
  with pytest.raises(ValueError, match=r"process count \(8\)"):
    config_check.host_batch_size(FakePlan(), 4)  # splits over the 4 shards, not over 8 processes
