"""SANA-Sprint distillation: the JVP tangent, the sCM step, the LADD hinge loss, resume, the CLI."""
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from small_configs import SMALLEST_MODEL  # tests/small_configs.py (tests/ is on sys.path)
from test_training import killed_after_checkpoint, tensorboard_values

from sanajax import config_utils
from sanajax.data.pipeline import make_train_iterator
from sanajax.data.sources import make_source
from sanajax.diffusion import scm, trigflow
from sanajax.generation import Generator, make_grid
from sanajax.models.backbones import build_backbone
from sanajax.models.discriminator import LaddHeads, spectral_normalize
from sanajax.training import dit as train_lib
from sanajax.training import sprint
from sanajax.training.metrics import read_metrics
from sanajax.workdir.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {"data.resolution": 32, **SMALLEST_MODEL, "train.batch_size": 4}  # tests/small_configs.py


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_ae):
  """A tiny teacher (32 px, 1 block, h 64) trained for 4 steps on the shared 2-step AE (tests/tiny_base.py)."""
  d = tmp_path_factory.mktemp("teacher")
  config = config_utils.load_config("configs/tiny.py", overrides={
      **SMALL, "ae.workdir": tiny_ae, "ae_train.num_steps": 2, "ae_train.batch_size": 4,
      "ae_train.log_every": 1, "train.num_steps": 4, "train.log_every": 2, "train.checkpoint_every": 4,
      "train.warmup_steps": 1, "eval.num_prompts": 0, "sample.cfg_interval": (0.5, 1.0)})
  train_lib.train(config, str(d))
  return d


def sprint_config(teacher_dir, **overrides):
  base = {**SMALL, "teacher_workdir": str(teacher_dir), "train.num_steps": 4, "train.log_every": 1,
          "train.checkpoint_every": 2, "train.warmup_steps": 1, "distill.head_block_ids": (0,),
          "distill.tangent_warmup_steps": 2, "eval.num_prompts": 0}
  base.update(overrides)
  return config_utils.load_config("configs/sprint_tiny.py", overrides=base)


def random_student():
  # Dense time embedding (Sprint's timestep_scale 0.001): with the teacher's 1000 t, F oscillates
  # in t on a 1e-3 scale and no float32 difference quotient resolves it.
  config = config_utils.load_config("configs/sprint_tiny.py", overrides={**SMALL, "model.timestep_scale": 0.001})
  dit = build_backbone(config.model)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, config.model.in_channels))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 5, config.model.caption_channels))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
  params = jax.jit(dit.init)(jax.random.PRNGKey(2), x, jnp.full((2,), 0.5), ctx, mask)["params"]
  # A zero CFG-embedder output layer would hide its input from the test: randomise every leaf.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  return dit, params, x, ctx, mask


def check_tangent_against_central_differences(F_fn, x, *, min_gap: float = 50.0, label: str = "") -> None:
  """scm.student_tangent of F_fn (TrigFlow F(x / sigma_d, t)) at x_t = x sigma_d, t = (0.4, 1.2) equals the
  same directional derivative by central differences (float32; h = 3e-3 balances truncation and rounding), and
  dropping the time tangent moves it by more than `min_gap` x the error (the check can fail)."""
  sd = 0.5
  t = jnp.array([0.4, 1.2])
  x_t = x * sd
  dxt_dt = jax.random.normal(jax.random.PRNGKey(4), x.shape) * sd
  F, dF = scm.student_tangent(F_fn, x_t, t, dxt_dt, sd)
  # Tangents (cos t sin t dx_t/dt / sigma_d, cos t sin t).
  cs = jnp.cos(t) * jnp.sin(t)
  vx, vt = cs[:, None, None, None] * dxt_dt / sd, cs
  h = 3e-3
  fd = (F_fn(x_t / sd + h * vx, t + h * vt) - F_fn(x_t / sd - h * vx, t - h * vt)) / (2 * h)
  np.testing.assert_allclose(np.asarray(F), np.asarray(F_fn(x_t / sd, t)), rtol=0, atol=1e-5)  # float32, |F| ~ 2
  err, scale = float(jnp.max(jnp.abs(dF - fd))), float(jnp.max(jnp.abs(fd)))
  fd_x_only = (F_fn(x_t / sd + h * vx, t) - F_fn(x_t / sd - h * vx, t)) / (2 * h)
  off = float(jnp.max(jnp.abs(dF - fd_x_only)))
  print(f"{label}JVP vs central differences: max |diff| {err:.3g} of max |fd| {scale:.3g}; without the time "
        f"tangent {off:.3g}")
  assert err <= 2e-3 * scale, (err, scale)
  assert off > min_gap * err, (off, err)


def test_jvp_tangent_matches_central_differences():
  dit, params, x, ctx, mask = random_student()
  cfg = jnp.array([4.0, 5.0])
  F_fn = jax.jit(trigflow.flow_to_trigflow(
      lambda x_f, t_f: dit.apply({"params": params}, x_f, t_f, ctx, mask, guidance=cfg)))
  check_tangent_against_central_differences(F_fn, x)


def test_tangent_formula_and_normalisation():
  F_minus = jnp.full((1, 2, 2, 1), 0.3)
  dF = jnp.full((1, 2, 2, 1), -0.2)
  dxt = jnp.full((1, 2, 2, 1), 0.1)
  x_t = jnp.full((1, 2, 2, 1), 0.7)
  t = jnp.array([0.6])
  r = jnp.float32(0.5)
  g, norm = scm.scm_tangent(F_minus, dF, dxt, x_t, t, r, 0.5, 0.1)
  c, s = np.cos(0.6), np.sin(0.6)
  raw = -c * c * (0.5 * 0.3 - 0.1) - 0.5 * (c * s * 0.7 + 0.5 * -0.2)
  np.testing.assert_allclose(float(norm[0]), abs(raw) * 2, rtol=1e-5)  # 4 equal elements: ||g|| = 2 |raw|.
  np.testing.assert_allclose(np.asarray(g), raw / (abs(raw) * 2 + 0.1), rtol=1e-5)
  assert float(scm.tangent_warmup(jnp.int32(1000), 4000)) == 0.25
  assert float(scm.tangent_warmup(jnp.int32(9000), 4000)) == 1.0


def test_trigflow_times():
  t = scm.sample_trigflow_time(jax.random.PRNGKey(0), 20000, mean=0.2, std=1.6, sigma_data=0.5)
  assert float(t.min()) > 0 and float(t.max()) < np.pi / 2
  # tan t * sigma_d is log-normal(0.2, 1.6).
  n = np.log(np.tan(np.asarray(t, np.float64)) * 0.5)
  assert abs(n.mean() - 0.2) < 0.05 and abs(n.std() - 1.6) < 0.05
  mixed = scm.largest_time_mix(jax.random.PRNGKey(1), t, 0.5)
  frac = float(jnp.mean(mixed == jnp.float32(scm.LARGEST_TIME)))
  assert 0.48 < frac < 0.52


def test_hinge_loss_signs_and_discriminator_heads():
  real_good, fake_good = jnp.full((2, 3), 2.0), jnp.full((2, 3), -2.0)
  assert float(scm.hinge_discriminator_loss(real_good, fake_good)[0]) == 0.0
  loss, aux = scm.hinge_discriminator_loss(jnp.full((2, 3), -1.0), jnp.full((2, 3), 1.0))
  assert float(loss) == pytest.approx(2.0) and float(aux["d_loss_real"]) == pytest.approx(2.0)
  g_real, g_fake = jax.grad(lambda r, f: scm.hinge_discriminator_loss(r, f)[0], argnums=(0, 1))(
      jnp.zeros((2, 3)), jnp.zeros((2, 3)))
  assert np.all(np.asarray(g_real) < 0) and np.all(np.asarray(g_fake) > 0)  # D pushes real up, fake down.
  assert np.all(np.asarray(jax.grad(scm.adversarial_generator_loss)(jnp.zeros((2, 3)))) < 0)  # G pushes fake up.
  # Spectral normalisation: the (out, in*k) matrix ends with largest singular value 1.
  k = jax.random.normal(jax.random.PRNGKey(0), (9, 6, 5))
  w = np.asarray(spectral_normalize(k)).transpose(2, 1, 0).reshape(5, -1)
  assert np.linalg.svd(w, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-4)
  # Heads: (B, N, h) features x 2 -> (B, 2N) logits; a few hinge steps separate real from fake.
  heads = LaddHeads(2)
  real = [jax.random.normal(jax.random.PRNGKey(i), (8, 16, 32)) + 1.0 for i in range(2)]
  fake = [jax.random.normal(jax.random.PRNGKey(10 + i), (8, 16, 32)) - 1.0 for i in range(2)]
  params = jax.jit(heads.init)(jax.random.PRNGKey(5), real)["params"]
  assert jax.eval_shape(lambda p: heads.apply({"params": p}, real), params).shape == (8, 32)
  # Jitted: op by op, each of the heads' ops would compile on its own (most of this test's time).
  loss_fn = jax.jit(lambda p: scm.hinge_discriminator_loss(heads.apply({"params": p}, real),
                                                           heads.apply({"params": p}, fake))[0])
  sgd_step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.05 * g, p, jax.grad(loss_fn)(p)))
  before = float(loss_fn(params))
  for _ in range(5):
    params = sgd_step(params)
  assert float(loss_fn(params)) < before


def test_student_starts_as_teacher_and_one_step_lowers_scm_loss(teacher_dir, tmp_path):
  # No lr warm-up (its first step has lr 0, SANA's linear warm-up from 0). Adam's first step moves
  # every weight by ~lr: 1e-3 overshoots (measured: surrogate 0.11 -> 3.6), 1e-5 is a small step.
  config = sprint_config(teacher_dir, **{"distill.adv_lambda": 0.0, "train.optimizer": "adamw",
                                         "train.learning_rate": 1e-5, "train.warmup_steps": 0})
  config, distiller, frozen, state = sprint.setup(config, str(tmp_path / "w"))
  it = make_train_iterator(make_source("shapes", 32, 0), batch_size=4, seed=0, tokenize_fn=distiller.text.tokenize)
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  inp = distiller.prepare(frozen, batch, jax.random.PRNGKey(0))
  # The zero-initialised CFG embedding makes the student the teacher's conditional branch.
  teacher_v = distiller.teacher.apply({"params": frozen["teacher"]}, inp["x0"], jnp.full((4,), 0.3), inp["ctx"],
                                      inp["mask"])
  student_v = distiller.student.apply({"params": state.params}, inp["x0"], jnp.full((4,), 0.3), inp["ctx"],
                                      inp["mask"], guidance=inp["cfg"])
  np.testing.assert_allclose(np.asarray(student_v), np.asarray(teacher_v), rtol=0, atol=1e-6)

  # The sCM surrogate (F - F^- - g targets fixed at the old parameters) over 12 noise draws of one
  # batch (the step's own draw and 11 others) is lower after one step: on the step's own draw, and
  # in the median over the draws. Not the mean: the 1 / (sigma_d tan t) weight makes a draw with a
  # small t dominate it (measured on a 4-step teacher: one draw of six at 1.08 while the others were
  # 0.03-0.10, rising by 0.02 while the five others fell by 0.003-0.004).
  gparams = lambda s: {"dit": s.params, "logvar": s.logvar_params}
  @jax.jit
  def draw(key):
    d_inp = distiller.prepare(frozen, batch, key)
    return d_inp, distiller.scm_targets(state.params, frozen, d_inp, jnp.int32(10))

  loss = jax.jit(lambda g, d_inp, t: distiller.generator_loss(g, state.disc_params, frozen, d_inp, t)[0])
  step_key = jax.random.split(state.rng)[1]  # the key step_fn draws its noise from.
  draws = [draw(k) for k in [step_key] + [jax.random.PRNGKey(100 + i) for i in range(11)]]
  per_draw = lambda s: np.array([float(loss(gparams(s), d, t)) for d, t in draws])
  before = per_draw(state)
  state = state.replace(step=jnp.int32(10))  # past the tangent warm-up: the JVP term is in the target.
  new_state, metrics = jax.jit(distiller.step_fn)(state, frozen, batch)
  after = per_draw(new_state)
  assert np.isfinite(float(metrics["scm_loss"])) and float(metrics["tangent_norm"]) > 0
  print(f"sCM surrogate, own draw {before[0]:.5f} -> {after[0]:.5f}; median of 12 draws {np.median(before):.5f} -> "
        f"{np.median(after):.5f}; {int(np.sum(after < before))} of 12 lower")
  assert after[0] < before[0], (before, after)
  assert np.median(after) < np.median(before), (before, after)


def test_teacher_guidance_interval(teacher_dir, tmp_path):
  """distill.teacher_cfg_interval limits the teacher's CFG to the flow times it samples with (its
  sample.cfg_interval, here (0.5, 1); t_f = sin t / (sin t + cos t)): a row at trig time 1.3 (t_f 0.78)
  is guided, one at 0.2 (t_f 0.17) gets the conditional F."""
  t = jnp.array([1.3, 0.2])
  outs = {}
  for name, use_interval in [("full", False), ("interval", True)]:
    config = sprint_config(teacher_dir, **{"distill.teacher_cfg_interval": use_interval})
    config, distiller, frozen, state = sprint.setup(config, str(tmp_path / name))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, config.model.in_channels))
    ids, mask = distiller.text.tokenize(["a red circle", "two blue squares"])
    null_ids, null_mask = distiller.text.tokenize(["", ""])
    embed = lambda i, m: distiller.text.embed(frozen["text"], jnp.asarray(i), jnp.asarray(m))
    run = lambda cfg: np.asarray(distiller.teacher_F(frozen["teacher"], x, t, embed(ids, mask), jnp.asarray(mask),
                                                     embed(null_ids, null_mask), jnp.asarray(null_mask),
                                                     jnp.full((2,), cfg)))
    outs[name] = run(4.5)
    outs["cond"] = run(1.0)
  np.testing.assert_allclose(outs["interval"][0], outs["full"][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs["interval"][1], outs["cond"][1], rtol=1e-5, atol=1e-5)
  assert np.abs(outs["full"][1] - outs["cond"][1]).max() > 1e-3


def test_a_student_with_another_time_embedding_than_its_teacher_is_pointed_to_phase_1(teacher_dir, tmp_path,
                                                                                     capsys):
  sprint.setup(sprint_config(teacher_dir), str(tmp_path / "same"))
  assert "timestep_scale" not in capsys.readouterr().out
  sprint.setup(sprint_config(teacher_dir, **{"model.timestep_scale": 0.001}), str(tmp_path / "dense"))
  out = capsys.readouterr().out
  assert "student's model.timestep_scale=0.001 differs from the teacher's 1.0" in out and "phase 1" in out, out
  sprint.setup(sprint_config(teacher_dir, **{"model.qk_norm": True}), str(tmp_path / "qk"))
  out = capsys.readouterr().out
  assert "student's model.qk_norm=True differs from the teacher's False" in out and "phase 1" in out, out


def test_phase_1_fine_tune_starts_from_a_teacher_without_qk_norm(teacher_dir):
  """init_from a workdir whose model lacks the q/k norms (Sprint phase 1): every saved weight is
  copied, the new norm scales keep their init (ones); an architecture change beyond that raises."""
  import flax.linen as nn
  from flax import traverse_util

  from sanajax.workdir.files import load_workdir_config
  from sanajax.workdir.loaders import init_dit_params, init_params_from
  teacher_config = load_workdir_config(str(teacher_dir))
  _, teacher = sprint.load_teacher(str(teacher_dir))
  teacher = traverse_util.flatten_dict(nn.unbox(teacher), sep="/")
  config = load_workdir_config(str(teacher_dir))
  config.model.qk_norm = True
  like = init_dit_params(config, jax.random.PRNGKey(5))
  got = traverse_util.flatten_dict(nn.unbox(init_params_from(str(teacher_dir), like)), sep="/")
  new = sorted(set(got) - set(teacher))
  assert new and all("norm_q" in k or "norm_k" in k for k in new), new
  for k in new:
    np.testing.assert_array_equal(got[k], np.ones_like(got[k]))
  for k, v in teacher.items():
    np.testing.assert_array_equal(got[k], v)
  assert teacher_config.model.qk_norm is False
  config.model.hidden_size *= 2
  with pytest.raises(ValueError, match="shape"):
    init_params_from(str(teacher_dir), init_dit_params(config, jax.random.PRNGKey(5)))


def test_killed_distillation_resumes_exactly(teacher_dir, tmp_path):
  config = sprint_config(teacher_dir)
  sprint.distill(config, str(tmp_path / "straight"))

  with killed_after_checkpoint(tmp_path / "killed", 2):
    sprint.distill(sprint_config(teacher_dir), str(tmp_path / "killed"))
  assert Checkpointer(str(tmp_path / "killed" / "checkpoints"), read_only=True).latest_step() == 2
  sprint.distill(sprint_config(teacher_dir), str(tmp_path / "killed"))

  _, _, _, abstract = sprint.setup(sprint_config(teacher_dir), str(tmp_path / "abstract"))
  a, _ = Checkpointer(str(tmp_path / "straight" / "checkpoints"), read_only=True).restore(abstract)
  b, _ = Checkpointer(str(tmp_path / "killed" / "checkpoints"), read_only=True).restore(abstract)
  for name in ("params", "ema_params", "logvar_params", "disc_params", "opt_state", "disc_opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  straight = {r["step"]: r for r in read_metrics(str(tmp_path / "straight"))}
  resumed = {r["step"]: r for r in read_metrics(str(tmp_path / "killed"))}
  assert set(straight) == {1, 2, 3, 4}
  for s in (3, 4):
    for key in ("loss", "scm_loss", "adv_loss", "d_loss"):
      assert straight[s][key] == resumed[s][key]
  # The student moved away from the teacher init and every logged number is finite.
  assert all(np.isfinite(v) for r in straight.values() for v in r.values())


def test_cli_distills_and_writes_a_training_layout(teacher_dir, tiny_ae, tmp_path):
  """The CLI distils, writes a workdir that samples like a training run, and draws the student's grid of
  train.sample_prompts every train.sample_every steps (before, distill_sprint drew none whatever the config)."""
  out = tmp_path / "cli"
  prompts = ("a red circle", "two blue squares")
  r = subprocess.run([sys.executable, "-m", "sanajax.distill_sprint", "--config=configs/sprint_tiny.py",
                      f"--config.teacher_workdir={teacher_dir}", f"--workdir={out}", "--config.data.resolution=32",
                      "--config.model.depth=1", "--config.model.hidden_size=64", "--config.text.num_layers=1",
                      "--config.train.batch_size=4", "--config.train.num_steps=2", "--config.train.log_every=1",
                      "--config.eval.num_prompts=0", "--config.distill.head_block_ids=(0,)",
                      # sprint_config's warm-ups: the same programs as the runs above, which the
                      # suite's compilation cache (tests/conftest.py) then serves to this process.
                      "--config.train.warmup_steps=1", "--config.distill.tangent_warmup_steps=2",
                      "--config.train.sample_every=2", f"--config.train.sample_prompts={prompts!r}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  cfg = json.load(open(out / "config.json"))
  assert cfg["model"]["guidance_embeds"] is True and cfg["ae"]["workdir"] == os.path.realpath(tiny_ae)
  rows = read_metrics(str(out))
  assert [x["step"] for x in rows] == [1, 2]
  assert Checkpointer(str(out / "checkpoints"), read_only=True).latest_step() == 2
  # The distilled workdir samples like a training run (sanajax.sample --sampler=scm uses this).
  generator = Generator.from_workdir(str(out))
  images = generator.generate(["a red circle"], sampler="scm", steps=1)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
  # The grid at step 2 is the student's EMA weights sampled as the config samples (sCM, 2 steps, guidance 4.5).
  (step, value), = tensorboard_values(out / "tensorboard" / "train", "samples")
  grid = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
  want = make_grid(generator.generate(list(prompts), sampler="scm", steps=cfg["sample"]["steps"],
                                      cfg=cfg["sample"]["cfg"], seed=cfg["seed"]))
  assert step == 2 and grid.shape == want.shape == (32, 64, 3)
  assert np.abs(grid.astype(int) - want).max() <= 2, np.abs(grid.astype(int) - want).max()
  # No teacher: a clear error.
  r = subprocess.run([sys.executable, "-m", "sanajax.distill_sprint", "--config=configs/sprint_tiny.py",
                      f"--workdir={tmp_path / 'x'}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and "teacher_workdir" in r.stdout + r.stderr


def test_frechet_distance_on_known_gaussians_and_ae_features(tiny_ae):
  from sanajax.eval import fid_lite
  from sanajax.workdir.loaders import load_ae
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  b = rng.normal(size=(4000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
  # Closed form for N(0, I) vs N(m, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2) = 1 + 3 = 4.
  assert fid_lite.frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
  assert abs(fid_lite.frechet_distance(a, a)) < 1e-8
  ae_model, ae_params, _, _ = load_ae(tiny_ae)
  images = fid_lite.data_images("shapes", 32, 6)
  feats = fid_lite.encoder_features(ae_model, ae_params, images, pool=2)
  assert feats.shape == (6, 2 * 2 * config_utils.load_config("configs/dcae_tiny.py").ae.latent_channels) and np.all(np.isfinite(feats))
  with pytest.raises(ValueError, match="uint8"):
    fid_lite.encoder_features(ae_model, ae_params, images.astype(np.float32))


def test_one_step_probe_regresses_the_teacher_onto_its_own_samples(teacher_dir, tmp_path):
  """experiments.one_step_probe: the pairs are the teacher's own Flow-DPM-Solver samples of their
  noise, the regression lowers its loss on them, and the run writes its score."""
  from experiments import one_step_probe
  from sanajax.generation import sample_latents
  g = Generator.from_workdir(str(teacher_dir))
  pairs = one_step_probe.teacher_pairs(g, 6, batch=3)
  assert pairs["z"].shape == pairs["x0"].shape == (6, *g.latent_shape) and pairs["input_ids"].shape[0] == 6
  # Row 4 redrawn alone from its noise and caption: the same latents (what the probe regresses onto).
  ids, mask = jnp.asarray(pairs["input_ids"][4:5]), jnp.asarray(pairs["attention_mask"][4:5])
  null_ids, null_mask = g.text.tokenize([""])
  x0 = sample_latents(lambda *a, **k: g.dit.apply({"params": g.dit_params}, *a, **k), False,
                      jnp.asarray(pairs["z"][4:5]), g.text.embed(g.text_params, ids, mask), mask,
                      g.text.embed(g.text_params, jnp.asarray(null_ids), jnp.asarray(null_mask)), jnp.asarray(null_mask),
                      sampler="flow_dpm", steps=20, cfg=4.5, shift=g.config.diffusion.flow_shift,
                      key=jax.random.PRNGKey(0), cfg_interval=g.cfg_interval)
  np.testing.assert_allclose(x0[0], pairs["x0"][4], rtol=1e-4, atol=1e-4)
  assert g.cfg_interval == (0.5, 1.0)
  _, losses = one_step_probe.regress(g, pairs, steps=30, learning_rate=3e-3, batch=6, log_every=0)
  assert losses[-5:].mean() < 0.8 * losses[0], losses
  summary = one_step_probe.run(str(teacher_dir), str(tmp_path), num_pairs=6, steps=3, learning_rate=1e-3,
                               num_prompts=4)
  with open(tmp_path / "one_step_probe.json") as f:
    assert json.load(f) == summary
  assert summary["pairs"] == 6 and 0.0 <= summary["overall"] <= 1.0 and set(summary["geneval"]) >= {"single"}


def test_scale_commands_phase_1_then_distillation_on_a_tiny_stand_in(teacher_dir, tmp_path):
  """The 600M / 1600M commands' code paths on the tiny teacher: `train --config=configs/sprint_phase1.py:TEACHER`
  (dense time, q/k norms, from the teacher's EMA weights), then a distillation with configs/sprint_1600m.py's
  distill and train sections (CAME 2e-6, a bfloat16 teacher, heads spread over the depth) and the teacher's
  architecture (sprint_config.student_config(base="sprint_1600m"), the shapes the 1600M model would have
  are the teacher's)."""
  import flax.linen as nn
  from flax import traverse_util

  from sanajax.training import sprint_config
  from sanajax.workdir.files import load_workdir_config
  phase1_dir = tmp_path / "phase1"
  phase1 = config_utils.load_config(f"configs/sprint_phase1.py:{teacher_dir}", overrides={
      "train.num_steps": 2, "train.checkpoint_every": 2, "train.log_every": 1, "eval.num_prompts": 0})
  assert phase1.init_from == str(teacher_dir) and phase1.model.timestep_scale == 0.001 and phase1.model.qk_norm
  train_lib.train(phase1, str(phase1_dir))
  _, teacher = sprint.load_teacher(str(teacher_dir))
  _, tuned = sprint.load_teacher(str(phase1_dir))
  teacher = traverse_util.flatten_dict(nn.unbox(teacher), sep="/")
  tuned = traverse_util.flatten_dict(nn.unbox(tuned), sep="/")
  assert set(tuned) > set(teacher) and all("norm_q" in k or "norm_k" in k for k in set(tuned) - set(teacher))
  assert any(not np.array_equal(np.asarray(tuned[k]), np.asarray(teacher[k])) for k in teacher)  # it trained

  reference = config_utils.load_config("configs/sprint_1600m.py")
  config = sprint_config.student_config(
      load_workdir_config(str(phase1_dir)), str(phase1_dir), 2,
      {"train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 2, "eval.num_prompts": 0},
      base="sprint_1600m")
  for field in ("optimizer", "learning_rate", "warmup_steps", "grad_clip"):
    assert config.train[field] == reference.train[field], field
  assert config.distill.to_dict() == {**reference.distill.to_dict(), "head_block_ids": (0,),
                                      "teacher_dtype": "bfloat16"}
  assert config.model.timestep_scale == 0.001 and config.model.qk_norm and config.model.depth == 1
  sprint.distill(config, str(tmp_path / "student"))
  rows = read_metrics(str(tmp_path / "student"))
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "scm_loss", "adv_loss", "d_loss"))
