"""Rectified-flow helpers: interpolant, target, shift, training-time samplers, loss."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sanajax.diffusion import flow

N = 200_000  # draws for moment checks: standard errors ~1e-3.


def test_interpolate_and_target():
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k0, (3, 4, 4, 2))
  eps = jax.random.normal(k1, (3, 4, 4, 2))
  t = jnp.array([0.0, 0.25, 1.0])
  xt = flow.interpolate(x0, eps, t)
  np.testing.assert_allclose(xt[0], x0[0], atol=0)
  np.testing.assert_allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
  np.testing.assert_allclose(xt[2], eps[2], atol=0)
  v = flow.velocity_target(x0, eps)
  # v is the time derivative of the interpolant: a finite difference agrees.
  dt = 1e-3
  fd = (flow.interpolate(x0, eps, t * 0 + 0.5 + dt) - flow.interpolate(x0, eps, t * 0 + 0.5)) / dt
  np.testing.assert_allclose(fd, v, atol=2e-3)


def test_shift_time_properties():
  t = jnp.linspace(0, 1, 101)
  for a in (0.5, 1.0, 3.0, 6.0):
    s = flow.shift_time(t, a)
    assert float(s[0]) == 0.0 and float(s[-1]) == pytest.approx(1.0, abs=1e-7)
    assert bool(jnp.all(jnp.diff(s) > 0))
    assert float(flow.shift_time(0.5, a)) == pytest.approx(a / (1 + a))
  np.testing.assert_allclose(flow.shift_time(t, 1.0), t, atol=1e-7)
  # A shift > 1 moves every interior time towards noise.
  assert bool(jnp.all(flow.shift_time(t[1:-1], 3.0) > t[1:-1]))


def test_resolution_shift():
  assert flow.resolution_shift(1024 ** 2, 256 ** 2) == pytest.approx(4.0)
  assert flow.resolution_shift(512 ** 2, 512 ** 2) == pytest.approx(1.0)
  assert flow.resolution_shift(256 ** 2, 1024 ** 2) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    flow.resolution_shift(0, 1)


@pytest.mark.parametrize("weighting", flow.WEIGHTINGS)
def test_sample_time_range_and_dtype(weighting):
  t = flow.sample_time(jax.random.key(1), 4096, weighting=weighting, shift=3.0)
  assert t.shape == (4096,) and t.dtype == jnp.float32
  assert float(t.min()) > 0.0 and float(t.max()) < 1.0


def test_logit_normal_moments():
  t = np.asarray(flow.sample_time(jax.random.key(2), N, weighting="logit_normal"))
  assert np.median(t) == pytest.approx(0.5, abs=5e-3)
  logit = np.log(t / (1 - t))
  assert logit.mean() == pytest.approx(0.0, abs=1e-2)
  assert logit.std() == pytest.approx(1.0, abs=1e-2)
  t2 = np.asarray(flow.sample_time(jax.random.key(2), N, weighting="logit_normal", logit_mean=0.5, logit_std=0.8))
  logit2 = np.log(t2 / (1 - t2))
  assert logit2.mean() == pytest.approx(0.5, abs=1e-2) and logit2.std() == pytest.approx(0.8, abs=1e-2)


def test_shift_moves_median():
  # The median commutes with a monotone map: shift a sends median 0.5 to a / (1 + a).
  t = np.asarray(flow.sample_time(jax.random.key(3), N, weighting="logit_normal", shift=3.0))
  assert np.median(t) == pytest.approx(0.75, abs=5e-3)


def test_alt_shift_mixes_two_shifted_densities():
  # P(t <= x) of the mixture = (1 - p) P3(x) + p P1(x); logit-normal(0, 1) shifted by a has
  # P(t <= x) = Phi(logit(x / (a - (a - 1) x))), the inverse shift of x.
  p, key = 0.3, jax.random.key(6)
  t = np.asarray(flow.sample_time(key, N, shift=3.0, alt_shift=1.0, alt_shift_fraction=p))
  cdf = lambda x, a: 0.5 * (1 + math.erf(math.log((x / (a - (a - 1) * x)) / (1 - x / (a - (a - 1) * x))) / math.sqrt(2)))
  for x in (0.2, 0.5, 0.8):
    assert np.mean(t <= x) == pytest.approx((1 - p) * cdf(x, 3.0) + p * cdf(x, 1.0), abs=6e-3)
  # Fraction 0 draws exactly the unmixed times (old runs reproduce); out of range is refused.
  np.testing.assert_array_equal(flow.sample_time(key, 64, shift=3.0, alt_shift_fraction=0.0),
                                flow.sample_time(key, 64, shift=3.0))
  with pytest.raises(ValueError, match="alt_shift_fraction"):
    flow.sample_time(key, 4, alt_shift_fraction=1.5)


def test_uniform_mode_cosmap_moments():
  key = jax.random.key(4)
  t = np.asarray(flow.sample_time(key, N, weighting="uniform"))
  assert t.mean() == pytest.approx(0.5, abs=5e-3)
  assert t.var() == pytest.approx(1 / 12, abs=2e-3)
  # Mode and CosMap are symmetric about 1/2; mode with scale > 0 concentrates there.
  tm = np.asarray(flow.sample_time(key, N, weighting="mode", mode_scale=1.29))
  assert tm.mean() == pytest.approx(0.5, abs=5e-3)
  assert tm.var() < 1 / 12
  # Mode with scale 0 is uniform.
  t0 = np.asarray(flow.sample_time(key, N, weighting="mode", mode_scale=0.0))
  assert t0.var() == pytest.approx(1 / 12, abs=2e-3)
  tc = np.asarray(flow.sample_time(key, N, weighting="cosmap"))
  assert np.median(tc) == pytest.approx(0.5, abs=5e-3)
  # CosMap: P(t <= x) = (2/pi) atan(x / (1 - x)); at x = 0.25 that is ~0.2048.
  assert np.mean(tc <= 0.25) == pytest.approx(2 / math.pi * math.atan(1 / 3), abs=5e-3)


def test_sample_time_unknown_weighting():
  with pytest.raises(ValueError, match="weighting"):
    flow.sample_time(jax.random.key(0), 4, weighting="lognorm")


def test_sample_time_from_config_matches_direct_call():
  c = ml_collections.ConfigDict(dict(weighting="mode", logit_mean=0.0, logit_std=1.0, mode_scale=1.0, flow_shift=2.0))
  key = jax.random.key(5)
  np.testing.assert_array_equal(flow.sample_time_from_config(key, 16, c),
                                flow.sample_time(key, 16, weighting="mode", mode_scale=1.0, shift=2.0))
  c.update(alt_shift=0.5, alt_shift_fraction=0.25)
  np.testing.assert_array_equal(flow.sample_time_from_config(key, 16, c),
                                flow.sample_time(key, 16, weighting="mode", mode_scale=1.0, shift=2.0, alt_shift=0.5,
                                                 alt_shift_fraction=0.25))


def test_flow_matching_loss_values():
  pred = jnp.arange(8.0, dtype=jnp.bfloat16).reshape(2, 2, 2, 1)
  target = jnp.zeros((2, 2, 2, 1), jnp.float32)
  loss = flow.flow_matching_loss(pred, target)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert float(loss) == pytest.approx(np.mean(np.arange(8.0) ** 2))
  # A per-sample mask keeps the mean over the counted samples only.
  masked = flow.flow_matching_loss(pred, target, mask=jnp.array([0.0, 1.0]))
  assert float(masked) == pytest.approx(np.mean(np.arange(4.0, 8.0) ** 2))
  assert float(flow.flow_matching_loss(pred, target, mask=jnp.zeros(2))) == 0.0
