"""sanajax.convert and the mappings it re-exports (sanajax/models/*_diffusers.py, gemma2_transformers.py):
directory loaders against diffusers/transformers, round trips, errors, the CLI.

Every model here is a tiny random one built with diffusers/transformers (PyTorch CPU, float32)
and written with save_pretrained; odd sizes on purpose (head dims 12 and 18, 3 heads, non-square
latents, padded text masks).
"""
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import linen as nn

from sanajax import config_utils, convert, safetensors_io
from sanajax.workdir.loaders import build_text_encoder, init_dit_params, init_params_from, load_ae, load_text_encoder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_dcae import _odd_config  # noqa: E402  (the DC-AE parity config; tests/ is on sys.path)

from sanajax.models import dcae  # noqa: E402

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "the", "user", "prompt", ":", "given", "enhanced"]
GEMMA_HIDDEN = 20
LATENT = 4  # _odd_config's latent_channels.
DIT_KW = dict(in_channels=LATENT, out_channels=LATENT, num_attention_heads=3, attention_head_dim=12, num_layers=2,
              num_cross_attention_heads=2, cross_attention_head_dim=18, cross_attention_dim=36,
              caption_channels=GEMMA_HIDDEN, mlp_ratio=2.5, sample_size=6, patch_size=2, interpolation_scale=2.0,
              qk_norm="rms_norm_across_heads")


def _randomise(module, scale=0.2, seed=0):
  """Random values for every parameter (norm scales and biases too), so that all of them are checked."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * scale)
  return module.eval()


def _tokenizer():
  vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>", unk_token="<unk>")


def _gemma_config():
  return transformers.Gemma2Config(
      vocab_size=len(WORDS) + 4, hidden_size=GEMMA_HIDDEN, intermediate_size=28, num_hidden_layers=3,
      num_attention_heads=2, num_key_value_heads=1, head_dim=12, sliding_window=4, query_pre_attn_scalar=10,
      attn_logit_softcapping=3.0, final_logit_softcapping=30.0, max_position_embeddings=64,
      attn_implementation="eager")


SPRINT_KW = dict(DIT_KW, guidance_embeds=True, guidance_embeds_scale=0.1, patch_size=1, interpolation_scale=None)


def save_sana_pipeline(root, *, sprint: bool = False, dit_kw: dict | None = None,
                       ae_config=None) -> types.SimpleNamespace:
  """A diffusers SANA (sprint: SANA-Sprint) pipeline directory under `root` (transformer/ vae/ text_encoder/
  tokenizer/ scheduler/ model_index.json) and its torch models; tests/test_notebooks.py samples these too.
  dit_kw: the transformer's kwargs (default DIT_KW / SPRINT_KW); ae_config: the DC-AE's sanajax config
  (default test_dcae._odd_config("conv", "interpolate")). tests/test_mission_data.py passes both."""
  root = pathlib.Path(root)
  dit_kw = dit_kw if dit_kw is not None else SPRINT_KW if sprint else DIT_KW
  dit = _randomise(diffusers.SanaTransformer2DModel(**dit_kw), seed=3 if sprint else 0)
  dit.save_pretrained(root / "transformer")
  ae_cfg = ae_config if ae_config is not None else _odd_config("conv", "interpolate")
  ae = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(ae_cfg))
  torch.manual_seed(1)
  with torch.no_grad():
    for p in ae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ae.eval().save_pretrained(root / "vae")
  gemma = transformers.Gemma2Model(_gemma_config())
  torch.manual_seed(2)
  with torch.no_grad():
    for name, p in gemma.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.5))
  gemma.eval().save_pretrained(root / "text_encoder")
  tok = _tokenizer()
  tok.save_pretrained(root / "tokenizer")
  os.makedirs(root / "scheduler")
  with open(root / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump({"_class_name": "SCMScheduler"} if sprint else
              {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0}, f)
  with open(root / "model_index.json", "w") as f:
    json.dump({"_class_name": "SanaSprintPipeline" if sprint else "SanaPipeline"}, f)
  return types.SimpleNamespace(root=str(root), dit=dit, ae=ae, gemma=gemma, tok=tok)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A diffusers pipeline directory (transformer/ vae/ text_encoder/ tokenizer/ scheduler/) and the torch models."""
  return save_sana_pipeline(tmp_path_factory.mktemp("sana_pipeline"))


def _dit_inputs(hw=(6, 10), batch=2, length=7):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, *hw, LATENT)).astype(np.float32)
  t = np.array([0.3, 0.85], np.float32)[:batch]
  ctx = rng.standard_normal((batch, length, GEMMA_HIDDEN)).astype(np.float32)
  mask = np.ones((batch, length), np.int32)
  mask[0, 4:] = 0  # Right padding in the first sample.
  return x, t, ctx, mask


def _torch_dit(tm, x, t, ctx, mask):
  with torch.no_grad():
    return tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(ctx), torch.from_numpy(t) * 1000,
              encoder_attention_mask=torch.from_numpy(mask), return_dict=False)[0].permute(0, 2, 3, 1).numpy()


def _assert_close(got, want):
  err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  assert got.shape == want.shape and err <= 1e-4 * scale, (err, scale)


def _same_state_dict(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_sana_transformer_loads_matches_and_round_trips(models, tmp_path):
  model, params = convert.load_sana_transformer(os.path.join(models.root, "transformer"))
  x, t, ctx, mask = _dit_inputs()
  want = _torch_dit(models.dit, x, t, ctx, mask)
  got = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx, mask))
  _assert_close(got, want)
  # sanajax -> diffusers: the same tensors bit for bit, and diffusers runs them to the same output.
  convert.save_diffusers(str(tmp_path / "out"), model, params)
  _same_state_dict(safetensors_io.read_state_dict(str(tmp_path / "out")),
                   {k: v.numpy() for k, v in models.dit.state_dict().items()})
  back = diffusers.SanaTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
  assert all(back.config[k] == v for k, v in DIT_KW.items())
  np.testing.assert_array_equal(_torch_dit(back, x, t, ctx, mask), want)


def test_sprint_transformer_guidance_and_time_convention(tmp_path):
  """A SANA-Sprint directory (guidance embedding, QK-norm): t is SanaSprintPipeline's `timestep`, guidance raw."""
  tm = _randomise(diffusers.SanaTransformer2DModel(**SPRINT_KW), seed=3)
  tm.save_pretrained(tmp_path / "sprint")
  model, params = convert.load_sana_transformer(str(tmp_path / "sprint"))
  assert model.guidance_embeds and model.timestep_scale == 0.001
  x, t, ctx, mask = _dit_inputs(hw=(3, 5))
  g = np.array([4.5, 2.0], np.float32)
  with torch.no_grad():  # as SanaSprintPipeline calls it: timestep = sCM time, guidance * guidance_embeds_scale
    want = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(ctx), torch.from_numpy(t),
              guidance=torch.from_numpy(g) * 0.1, encoder_attention_mask=torch.from_numpy(mask),
              return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  got = np.asarray(jax.jit(lambda p, *a, guidance: model.apply({"params": p}, *a, guidance=guidance))(
      params, x, t, ctx, mask, guidance=g))
  _assert_close(got, want)
  convert.save_diffusers(str(tmp_path / "out"), model, params)
  _same_state_dict(safetensors_io.read_state_dict(str(tmp_path / "out")), {k: v.numpy() for k, v in tm.state_dict().items()})
  back = diffusers.SanaTransformer2DModel.from_pretrained(str(tmp_path / "out"))
  assert back.config.timestep_scale == 1.0 and back.config.guidance_embeds


def test_dcae_loads_matches_and_round_trips(models, tmp_path):
  model, params = convert.load_dcae(os.path.join(models.root, "vae"))
  assert model.scaling_factor == models.ae.config.scaling_factor
  x = np.random.default_rng(0).uniform(-1, 1, (2, 12, 20, 3)).astype(np.float32)
  with torch.no_grad():
    z_ref = models.ae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
    y_ref = models.ae.decode(torch.from_numpy(z_ref).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    z = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(params, x))
    y = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))(params, z_ref))
  _assert_close(z, z_ref)
  _assert_close(y, y_ref)
  convert.save_diffusers(str(tmp_path / "vae"), model, params)
  _same_state_dict(safetensors_io.read_state_dict(str(tmp_path / "vae")),
                   {k: v.numpy() for k, v in models.ae.state_dict().items()})
  back = diffusers.AutoencoderDC.from_pretrained(str(tmp_path / "vae")).eval()
  assert back.config.scaling_factor == models.ae.config.scaling_factor
  with torch.no_grad():
    z_back = back.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent.permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(z_back, z_ref)


def _gemma_inputs(b=2, l=13):
  ids = np.random.default_rng(0).integers(4, len(WORDS) + 4, (b, l)).astype(np.int32)
  mask = np.ones((b, l), np.int32)
  mask[1, 9:] = 0  # Right padding.
  return ids, mask


def test_gemma2_model_and_causal_lm_load_and_match(models, tmp_path):
  ids, mask = _gemma_inputs()
  with torch.no_grad():
    want = models.gemma(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  valid = mask.astype(bool)
  # Gemma2ForCausalLM holding the same weights ("model." prefix, tied lm_head), saved in shards
  # so that the *.safetensors.index.json path is read too.
  causal = transformers.Gemma2ForCausalLM(_gemma_config()).eval()
  causal.model.load_state_dict(models.gemma.state_dict())
  causal.save_pretrained(tmp_path / "causal", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "causal" / "model.safetensors.index.json")
  for path in (os.path.join(models.root, "text_encoder"), str(tmp_path / "causal")):
    model, params = convert.load_gemma2(path)
    got = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    _assert_close(got[valid], want[valid])


def test_text_encoder_with_chi_prompt_matches_sana_pipeline(models):
  """Tokenizer from the directory, SANA's complex-human-instruction selection, Gemma-2: vs diffusers' SanaPipeline."""
  chi = ["given a user prompt :", "enhanced : the"]
  max_length = 6
  text_config = {"max_length": max_length, "chi_prompt": "\n".join(chi)}
  enc = load_text_encoder(os.path.join(models.root, "text_encoder"), text_config)
  prompts = ["a red circle left of the blue square", "blue"]
  ctx, mask = enc.encode(prompts)
  pipe = types.SimpleNamespace(tokenizer=_tokenizer(), text_encoder=models.gemma,
                               _text_preprocessing=lambda t, clean_caption: [p.lower().strip() for p in t])
  with torch.no_grad():
    embeds, want_mask = diffusers.SanaPipeline._get_gemma_prompt_embeds(
        pipe, prompts, "cpu", torch.float32, max_sequence_length=max_length, complex_human_instruction=chi)
  select = [0] + list(range(-max_length + 1, 0))  # diffusers encode_prompt's select_index.
  embeds, want_mask = embeds[:, select].numpy(), want_mask[:, select].numpy()
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  assert want_mask[1].sum() < max_length  # The short prompt is padded, the long one truncated.
  valid = want_mask.astype(bool)
  _assert_close(np.asarray(ctx)[valid], embeds[valid])


def test_missing_unexpected_and_misshaped_tensors_are_named(models, tmp_path):
  src = os.path.join(models.root, "transformer")
  state = dict(safetensors_io.read_state_dict(src))
  del state["transformer_blocks.1.attn2.to_k.weight"]
  state["proj_out.weight"] = np.zeros((3, 36), np.float32)
  state["pos_embed.extra"] = np.zeros((2,), np.float32)
  os.makedirs(tmp_path / "bad")
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "bad")
  safetensors_io.write_safetensors(str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"), state)
  with pytest.raises(ValueError) as err:
    convert.load_sana_transformer(str(tmp_path / "bad"))
  msg = str(err.value)
  assert "missing tensor transformer_blocks.1.attn2.to_k.weight (expected shape (36, 36))" in msg
  assert "tensor proj_out.weight has shape (3, 36), expected (16, 36)" in msg
  assert "unexpected tensor pos_embed.extra of shape (2,)" in msg
  # A config that does not match its weights (a wider AE) names every tensor that differs.
  os.makedirs(tmp_path / "bad_vae")
  shutil.copy(os.path.join(models.root, "vae", "diffusion_pytorch_model.safetensors"), tmp_path / "bad_vae")
  cfg = json.load(open(os.path.join(models.root, "vae", "config.json")))
  cfg["latent_channels"] = 8
  json.dump(cfg, open(tmp_path / "bad_vae" / "config.json", "w"))
  with pytest.raises(ValueError, match=r"tensor encoder\.conv_out\.weight has shape \(4, 32, 3, 3\), expected "
                                       r"\(8, 32, 3, 3\)"):
    convert.load_dcae(str(tmp_path / "bad_vae"))
  # Gemma with a layer missing.
  gstate = {k: v for k, v in safetensors_io.read_state_dict(os.path.join(models.root, "text_encoder")).items()
            if not k.startswith("layers.2.")}
  os.makedirs(tmp_path / "bad_gemma")
  shutil.copy(os.path.join(models.root, "text_encoder", "config.json"), tmp_path / "bad_gemma")
  safetensors_io.write_safetensors(str(tmp_path / "bad_gemma" / "model.safetensors"), gstate)
  with pytest.raises(ValueError) as err:
    convert.load_gemma2(str(tmp_path / "bad_gemma"))
  assert "missing tensor layers.2.self_attn.q_proj.weight (expected shape (24, 20))" in str(err.value)
  assert str(err.value).count("missing tensor layers.2.") == 11  # 4 attention, 3 MLP, 4 norms.


def test_safetensors_reader_writer_bf16(tmp_path):
  import ml_dtypes
  import safetensors.torch
  a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16), "b": np.ones(3, np.float16)}
  safetensors_io.write_safetensors(str(tmp_path / "x.safetensors"), a)
  t = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
  assert t["w"].dtype == torch.bfloat16 and t["w"].float().numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
  back = safetensors_io.read_safetensors(str(tmp_path / "x.safetensors"))
  assert back["w"].dtype == ml_dtypes.bfloat16 and back["b"].dtype == np.float16
  np.testing.assert_array_equal(back["w"].astype(np.float32), a["w"].astype(np.float32))


def test_cli_names_the_truncated_file_and_tensor(models, tmp_path):
  """A diffusers pipeline whose transformer weights were cut short (an interrupted download): the CLI
  prints one line naming the file and the tensor that was cut, exits 2, and writes nothing."""
  src = str(tmp_path / "pipeline")
  shutil.copytree(models.root, src)
  weights = os.path.join(src, "transformer", "diffusion_pytorch_model.safetensors")
  with open(weights, "rb") as f:  # The header, read here independently of the reader under test.
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][1])
  start, end = (8 + n + offset for offset in info["data_offsets"])
  cut = (start + end) // 2  # Half of the last tensor's bytes are gone.
  with open(weights, "r+b") as f:
    f.truncate(cut)
  dst = str(tmp_path / "work")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "sanajax.convert", "--from=diffusers", f"--src={src}", f"--dst={dst}"],
                        cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("sanajax.convert: error:")]
  assert errors == [f"sanajax.convert: error: {weights}: tensor {name!r} needs bytes {start}..{end} but the file "
                    f"has {cut} bytes (truncated?)."], proc.stderr
  assert not os.path.exists(dst)


def test_a_source_that_is_no_pipeline_nor_transformer_is_named(tmp_path):
  """--src pointing at the wrong folder (say, the one above the pipeline) says what it should hold; writes nothing."""
  (tmp_path / "downloads").mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"{tmp_path / 'downloads'} is neither a diffusers pipeline (model_index.json, transformer/, vae/, ...) nor a "
      f"transformer directory (config.json + safetensors)")):
    convert.convert_diffusers(str(tmp_path / "downloads"), str(tmp_path / "work"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'absent'} does not exist.")):
    convert.convert_diffusers(str(tmp_path / "absent"), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_a_destination_another_run_is_writing_is_refused_before_anything_is_written(models, tmp_path):
  """One writer per workdir: a --dst (or its ae/ or text_encoder/) whose lock a live run holds is refused with
  the lock's one-line message before any part is converted; convert's own locks are gone after a refusal
  and after a success."""
  from test_workdir import start_holder  # tests/test_workdir.py: another process holding a workdir's lock

  from sanajax.workdir.lock import WorkdirLockedError
  for held in ("", "ae", "text_encoder"):
    dst = tmp_path / f"work_{held or 'root'}"
    holder = start_holder(dst / held)
    try:
      with pytest.raises(WorkdirLockedError, match=rf"{re.escape(str(dst / held))} is in use by another run: "
                                                   rf".*pid {holder.pid}"):
        convert.convert_diffusers(models.root, str(dst))
    finally:
      holder.kill()
      holder.wait()
    assert [p for p in dst.rglob("*") if p.is_file()] == [dst / held / ".lock"]  # the holder's, nothing else
  dst = tmp_path / "work_root"
  with pytest.warns(UserWarning, match=r"stale lock .*is not running"):  # the killed holder's lock is taken over
    convert.convert_diffusers(models.root, str(dst))
  assert not any(p.name == ".lock" for p in dst.rglob("*"))

  # A bare transformer directory needs the AE and text encoder as converted workdirs: said before anything is
  # created; given both, the workdir points at them and holds the same DiT weights.
  bare, ae, text = os.path.join(models.root, "transformer"), str(dst / "ae"), str(dst / "text_encoder")
  for kwargs, missing in (({}, "give --ae=AE_WORKDIR"), ({"ae_workdir": ae}, "give --text_encoder=TEXT_WORKDIR too")):
    with pytest.raises(ValueError, match=f"{re.escape(bare)} is a bare transformer directory: {missing}"):
      convert.convert_diffusers(bare, str(tmp_path / "dit_only"), **kwargs)
    assert not (tmp_path / "dit_only").exists()
  c = convert.convert_diffusers(bare, str(tmp_path / "dit_only"), ae_workdir=ae, text_workdir=text)
  assert (c.ae.workdir, c.text.pretrained) == (ae, text)
  assert sorted(os.listdir(tmp_path / "dit_only")) == ["checkpoints", "config.json"]
  like = jax.eval_shape(lambda: init_dit_params(c, jax.random.PRNGKey(0)))
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(init_params_from(str(tmp_path / "dit_only"), like)),
               nn.unbox(init_params_from(str(dst), like)))


def test_cli_pipeline_to_workdir_sample_finetune_init_and_export(models, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work, out, dst = str(tmp_path / "work"), str(tmp_path / "png"), str(tmp_path / "export")
  # The CLIs in one shell: diffusers pipeline -> workdir -> PNGs, and workdir -> diffusers.
  proc = subprocess.run(
      f"{sys.executable} -m sanajax.convert --from=diffusers --src={models.root} --dst={work} && "
      f"{sys.executable} -m sanajax.sample --workdir={work} --prompt='a red circle' --out={out} --steps=2 && "
      f"{sys.executable} -m sanajax.convert --to=diffusers --src={work} --dst={dst}",
      shell=True, cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=3000)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert sorted(os.listdir(work)) == ["ae", "checkpoints", "config.json", "text_encoder"]
  assert sorted(os.listdir(out)) == ["00000.png", "grid.png"]
  # Fine-tuning config (configs/pretrained.py:WORKDIR): init_from reads exactly the diffusers weights,
  # from the converted workdir or from the diffusers pipeline directory itself.
  cfg = config_utils.load_config("pretrained", work)
  assert cfg.init_from == work and os.path.isabs(cfg.text.pretrained) and cfg.diffusion.flow_shift == 3.0
  _, want = convert.load_sana_transformer(os.path.join(models.root, "transformer"))
  like = jax.eval_shape(lambda: init_dit_params(cfg, jax.random.PRNGKey(0)))  # boxed, as the trainer holds it
  for source in (cfg.init_from, models.root):
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(init_params_from(source, like)), want)
  # The AE and the text encoder the sampler and trainer build from the workdir.
  _, ae_params, scaling, _ = load_ae(os.path.join(work, "ae"))
  assert scaling == models.ae.config.scaling_factor
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(ae_params), convert.load_dcae(os.path.join(models.root,
                                                                                                "vae"))[1])
  text = build_text_encoder(cfg)
  jax.tree.map(np.testing.assert_array_equal, text.params,
               convert.load_gemma2(os.path.join(models.root, "text_encoder"))[1])
  assert text.max_length == 300 and text.chi_prompt.startswith("Given a user prompt")  # SANA's.
  # The export: diffusers loads it and gives the original outputs.
  back = diffusers.SanaTransformer2DModel.from_pretrained(os.path.join(dst, "transformer")).eval()
  x, t, c, m = _dit_inputs()
  np.testing.assert_array_equal(_torch_dit(back, x, t, c, m), _torch_dit(models.dit, x, t, c, m))
  _same_state_dict(safetensors_io.read_state_dict(os.path.join(dst, "vae")),
                   {k: v.numpy() for k, v in models.ae.state_dict().items()})
