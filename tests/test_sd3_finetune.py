"""Fine-tuning a converted SD3 pipeline and exporting it back (issue 28), and the optimizer items it needs.

A tiny random StableDiffusion3Pipeline (sd3_helpers.sd3_pipeline) is saved with save_pretrained and converted;
`python -m sanajax.train --config=configs/pretrained.py:WORKDIR --config.data.source=folder:DIR` fine-tunes it
(SD3's three tokenizers through the data pipeline, per-encoder caption dropout, the KL VAE's shift and scale,
AdamW with train.adam_eps, two microbatches per step); a run killed after its checkpoint resumes to the same
weights; `python -m sanajax.convert --to=diffusers` writes a directory StableDiffusion3Pipeline.from_pretrained
loads, the transformer bit-identical to the source's after the round trip. Also: gradient accumulation equals
one big batch, the stored position-embedding table neither trains nor decays, adam_eps reaches the update.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from sd3_helpers import converted_sd3, run_module  # tests/sd3_helpers.py (tests/ on sys.path)

from sanajax import config_utils
from sanajax.config_check import ConfigError, validate_config
from sanajax.models.backbones import build_backbone
from sanajax.parallel import Plan
from sanajax.safetensors_io import read_state_dict
from sanajax.training import dit as train_lib
from sanajax.training.metrics import read_metrics
from sanajax.training.optim import build_optimizer
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import load_workdir_config
from sanajax.workdir.loaders import ae_shift_factor, build_text_encoder, load_ae, load_dit_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(REPO, "configs", "pretrained.py")
PE = "pos_embed/pos_embed"  # mmdit.FROZEN_PARAMS: the stored sin-cos table, a diffusers buffer
CAPTIONS = ["a red cat", "big dog on the left", "a blue square", "a circle"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  """{"src": the saved pipeline, "work": its converted workdir (sd3_helpers.converted_sd3), "images": a captioned
  image folder}."""
  src, work = converted_sd3(tmp_path_factory)
  images = tmp_path_factory.mktemp("sd3_ft") / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(8):  # non-square: resized and centre-cropped to 16 px
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / f"{i}.txt").write_text(CAPTIONS[i % 4])
  return {"src": src, "work": work, "images": str(images)}


def overrides(sd3, **more):
  """The fine-tune's --config.* overrides: 6 steps of 2 images, SD3's three tokenizers with 16 T5 tokens."""
  o = {"data.source": f"folder:{sd3['images']}", "data.buckets": "", "data.num_workers": 0, "train.num_steps": 6,
       "train.batch_size": 2, "train.checkpoint_every": 3, "train.log_every": 1, "train.sample_every": 0,
       "train.warmup_steps": 0, "train.learning_rate": 1e-3, "train.weight_decay": 0.1, "train.grad_accum_steps": 2,
       "text.t5_max_length": 16, "text.max_length": 13 + 16}
  o.update(more)
  return o


def flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)): np.asarray(v) for p, v in leaves}


def test_the_converted_workdir_carries_sd3s_recipe(sd3):
  c = load_workdir_config(sd3["work"])
  assert c.train.optimizer == "adamw" and c.train.adam_eps == 1e-15 and c.train.grad_accum_steps == 1
  assert c.text.encoder_dropout == 0.463 and c.train.caption_dropout == 0.0
  assert ae_shift_factor(load_ae(os.path.join(sd3["work"], "ae"))[3]) == 0.0609


@pytest.mark.slow  # ~90 s on the 2 shared cores: the CLI's and two in-process compiles of the whole SD3 step
def test_finetune_cli_trains_and_a_killed_run_resumes_exactly(sd3, tmp_path, monkeypatch):
  """The CLI fine-tunes 6 steps; an in-process run killed after its step-3 checkpoint, then restarted, ends
  with the same weights and logs the same losses; the position-embedding table stays the converted one under
  weight decay 0.1 while every other parameter moves."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  run_module("sanajax.train", f"--config={PRETRAINED}:{sd3['work']}", f"--workdir={straight}",
             *(f"--config.{k}={v}" for k, v in overrides(sd3).items()))
  rows = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in rows.values())

  config = config_utils.load_config(PRETRAINED, sd3["work"], overrides=overrides(sd3))
  real = train_lib.make_train_iterator

  class Killed(BaseException):  # a kill, which nothing answers (an Exception from the data is a data failure: saved)
    pass

  def dying(*args, **kwargs):
    it, count = real(*args, **kwargs), [0]

    class Dying:
      def __iter__(self):
        return self

      def __next__(self):
        count[0] += 1
        if count[0] == 6:  # fetched with step 4's batch (DevicePrefetch: two ahead), after the step-3 checkpoint
          raise Killed()
        return next(it)

      def get_state(self):
        return it.get_state()

      def set_state(self, state):
        it.set_state(state)

    return Dying()

  monkeypatch.setattr(train_lib, "make_train_iterator", dying)
  with pytest.raises(Killed):
    train_lib.train(config, killed)
  assert Checkpointer(os.path.join(killed, "checkpoints"), read_only=True).latest_step() == 3
  monkeypatch.setattr(train_lib, "make_train_iterator", real)
  train_lib.train(config, killed)
  resumed = {r["step"]: r["loss"] for r in read_metrics(killed) if "loss" in r}
  assert all(resumed[s] == rows[s] for s in (4, 5, 6)), (resumed, rows)

  base = flat(load_dit_params(sd3["work"]))
  for ema in (False, True):
    a, b = flat(load_dit_params(straight, ema=ema)), flat(load_dit_params(killed, ema=ema))
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  a = flat(load_dit_params(straight, ema=False))
  np.testing.assert_array_equal(a[PE], base[PE])
  moved = [name for name in a if name != PE and not np.array_equal(a[name], base[name])]
  assert len(moved) == len(a) - 1, sorted(set(a) - set(moved))


def test_encoder_dropout_zeroes_each_encoder_in_the_loss(sd3):
  """text.encoder_dropout 1: the loss is the one of all-zero context and pooled vectors (every encoder dropped);
  0: the prompt's embedding, a different loss."""
  config = config_utils.load_config(PRETRAINED, sd3["work"], overrides=overrides(sd3))
  text = build_text_encoder(config)
  ae_model, ae_params, scaling, ae_config = load_ae(config.ae.workdir)
  dit = build_backbone(config.model)
  params = load_dit_params(sd3["work"], config)
  ids, mask = text.tokenize(CAPTIONS[:2])
  batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
           "input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  frozen = {"ae": ae_params, "text": text.params}

  class ZeroText:  # the embedding a sample with all three encoders dropped gets
    layout, tokenize = text.layout, text.tokenize

    def embed(self, p, i, m):
      cond = text.embed(p, i, m)
      return {k: jnp.zeros_like(v) for k, v in cond.items()}

  def loss(probs, encoder):
    config.text.encoder_dropout = probs
    fn = train_lib.make_loss_fn(config, dit, ae_model, encoder, scaling, Plan.from_config(config),
                                ae_shift_factor(ae_config))
    return float(jax.jit(fn)(params, frozen, batch, jax.random.key(0)))

  dropped, zeros, kept = loss(1.0, text), loss(0.0, ZeroText()), loss(0.0, text)
  assert dropped == pytest.approx(zeros, rel=1e-6) and abs(kept - dropped) > 1e-3 * dropped


@pytest.mark.slow  # ~70 s on the 2 shared cores: two compiles of the whole SD3 train step
def test_gradient_accumulation_equals_one_big_batch(sd3):
  """Two steps of batch 4 as 2 microbatches of 2 give one batch of 4's parameters (float32 summation order)."""
  config = config_utils.load_config(PRETRAINED, sd3["work"], overrides=overrides(sd3, **{"train.batch_size": 4}))
  text = build_text_encoder(config)
  ae_model, ae_params, scaling, ae_config = load_ae(config.ae.workdir)
  dit = build_backbone(config.model)
  plan = Plan.from_config(config)
  ids, mask = text.tokenize(CAPTIONS)
  batch = {"image": np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32),
           "input_ids": ids, "attention_mask": mask}
  frozen = {"ae": ae_params, "text": text.params}
  config.text.encoder_dropout = 0.463
  result = {}
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    tx, schedule = build_optimizer(config.train, 4)
    state, state_sh, _ = train_lib.init_train_state(config, tx, jax.random.PRNGKey(0), plan)
    step = train_lib.make_train_step(config, dit, ae_model, text, tx, schedule, scaling, plan=plan,
                                     state_shardings=state_sh, ae_shift=ae_shift_factor(ae_config))
    for _ in range(2):
      state, metrics = step(state, frozen, batch)
    result[accum] = (flat(state.params), float(metrics["loss"]))
  (one, loss1), (two, loss2) = result[1], result[2]
  assert loss1 == pytest.approx(loss2, rel=1e-5)
  for name in one:
    scale = max(np.abs(one[name]).max(), 1e-6)
    assert np.abs(one[name] - two[name]).max() <= 1e-5 * scale, name


def test_the_position_table_neither_trains_nor_decays():
  """Every optimizer (weight decay 0.5) leaves FROZEN_PARAMS leaves, boxed or not, exactly as they were."""
  params = {"pos_embed": {"pos_embed": jnp.ones((1, 4, 3)), "proj": {"kernel": jnp.ones((2, 2, 3, 3))}},
            "proj_out": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones((5,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  for name in ("adamw", "came", "muon"):
    for tree, g in ((params, grads), (nn.LogicallyPartitioned(params, ()), nn.LogicallyPartitioned(grads, ()))):
      tx, _ = build_optimizer({"optimizer": name, "learning_rate": 0.1, "weight_decay": 0.5}, 10)
      updates, _ = tx.update(g, tx.init(tree), tree)
      new = flat(nn.unbox(optax.apply_updates(tree, updates)))
      assert np.array_equal(new[PE], np.ones((1, 4, 3))), name
      assert all(not np.array_equal(new[k], np.ones_like(new[k])) for k in new if k != PE), name


def test_adam_eps_reaches_the_update():
  """AdamW's first update is -lr g / (|g| + eps): with g = 1e-9, eps 1e-8 gives 0.0909 lr, SD3's 1e-15 lr."""
  g = {"w": jnp.full((3,), 1e-9)}
  for eps, want in ((None, 1e-9 / (1e-9 + 1e-8)), (1e-15, 1e-9 / (1e-9 + 1e-15))):
    c = {"optimizer": "adamw", "learning_rate": 1.0, **({} if eps is None else {"adam_eps": eps})}
    tx, _ = build_optimizer(c, 10)
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(np.asarray(updates["w"]), -want, rtol=1e-4)  # float32 bias corrections


def test_grad_accum_steps_must_divide_the_batch(sd3):
  config = config_utils.load_config(PRETRAINED, sd3["work"], overrides=overrides(sd3, **{"train.batch_size": 6,
                                                                                        "train.grad_accum_steps": 4}))
  with pytest.raises(ConfigError, match="train.grad_accum_steps=4: must divide train.batch_size=6"):
    validate_config(config, "dit")
  config = config_utils.load_config(PRETRAINED, sd3["work"], overrides={"text.encoder_dropout": 1.5,
                                                                          "train.adam_eps": 0.0})
  with pytest.raises(ConfigError, match="text.encoder_dropout=1.5") as e:
    validate_config(config, "dit")
  assert "train.adam_eps=0.0" in str(e.value)


def test_export_round_trips_and_loads_in_the_sd3_pipeline(sd3, tmp_path):
  """diffusers -> sanajax -> diffusers: the transformer's tensors bit for bit, the VAE's too; the directory
  loads in StableDiffusion3Pipeline (the CLI export) with the source's scheduler shift and text encoders."""
  out = tmp_path / "export"
  run_module("sanajax.convert", "--to=diffusers", f"--src={sd3['work']}", f"--dst={out}")
  for part in ("transformer", "vae"):
    want = read_state_dict(os.path.join(sd3["src"], part))
    got = read_state_dict(str(out / part))
    assert sorted(got) == sorted(want), part
    for name in want:
      assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), f"{part}: {name}"
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out))
  src = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3["src"])
  assert pipe.scheduler.config.shift == 3.0 and pipe.vae.config.shift_factor == 0.0609
  assert pipe.transformer.config.dual_attention_layers == src.transformer.config.dual_attention_layers
  for a, b in zip(pipe.text_encoder_3.parameters(), src.text_encoder_3.parameters()):
    assert torch.equal(a, b)
