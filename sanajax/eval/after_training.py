"""The evaluation a training run ends with, handed to the trainers as callbacks.

Training (sanajax.training) sits below generation and eval, so it never imports them: the CLIs
(`python -m sanajax.train`, `distill_sprint`), notebooks and experiments pass these in,

    dit.train(config, workdir, evaluate=after_training.evaluate_dit_run,
              make_sample_fn=after_training.make_grid_fn)
    sprint.distill(config, workdir, evaluate=after_training.evaluate_sprint_run)

and a caller that wants no evaluation passes nothing. Each writes its samples and score JSON to
the workdir and prints the GenEval-lite table.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from sanajax.data.shapes import eval_prompt_set
from sanajax.eval import geneval_lite, restoration
from sanajax.generation import Generator, make_grid, write_images
from sanajax.resolution import ae_downsample


def _skip_reason(config: ml_collections.ConfigDict) -> str | None:
  """Why the built-in evaluation cannot run for this config (None: it can)."""
  if not str(config.data.source).startswith("shapes"):
    return f"data.source={config.data.source!r} is not the shapes data GenEval-lite scores"
  if not config.eval.get("num_prompts", 0):
    return "eval.num_prompts=0"
  if jax.process_count() > 1:
    return "a multi-host run samples on one host: run `python -m sanajax.sample` there"
  return None


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, sampler: str | None = None,
             steps: int | None = None, cfg: float | None = None, tag: str = "",
             generator: Generator | None = None) -> dict:
  """Samples the held-out GenEval-lite prompts with the EMA weights; writes WORKDIR/samples{tag}/
  (PNGs, grid.png, prompts.txt) and WORKDIR/geneval_lite{tag}.json; prints the table."""
  sampler = sampler or config.sample.sampler
  steps = steps or config.sample.steps
  cfg = config.sample.cfg if cfg is None else cfg
  prompt_set = eval_prompt_set(config.eval.num_prompts, seed=config.seed)
  prompts = [p for p, _ in prompt_set]
  generator = generator or Generator.from_workdir(workdir)
  start = time.perf_counter()
  images = generator.generate(prompts, sampler=sampler, steps=steps, cfg=cfg, seed=config.seed,
                              progress=f"eval {sampler} x{steps}")
  seconds = time.perf_counter() - start
  result = geneval_lite.evaluate(images, prompts, [c for _, c in prompt_set])
  result.update(sampler=sampler, steps=steps, cfg=cfg, sampling_seconds=seconds)
  out_dir = os.path.join(workdir, f"samples{tag}")
  write_images(images, out_dir)
  geneval_lite.write_prompts_file(os.path.join(out_dir, "prompts.txt"), prompt_set)
  with open(os.path.join(workdir, f"geneval_lite{tag}.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"GenEval-lite ({sampler}, {steps} steps, cfg {cfg}) on {len(prompts)} held-out prompts:", flush=True)
  print(geneval_lite.format_table(result), flush=True)
  return result


def evaluate_restoration(config: ml_collections.ConfigDict, workdir: str, generator: Generator) -> dict:
  """Restoration probe (sanajax.eval.restoration) at config.eval.restoration_t0; writes restoration.json."""
  t0 = float(config.eval.restoration_t0)
  result = restoration.restoration_score(generator, t0=t0, num_prompts=config.eval.num_prompts,
                                         cfg=config.sample.cfg, seed=config.seed)
  with open(os.path.join(workdir, "restoration.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"Restoration (held-out scenes noised to t={t0:g}, Flow-Euler {result['steps']} steps back, "
        f"cfg {result['cfg']:g}), GenEval-lite:", flush=True)
  print(geneval_lite.format_table(result), flush=True)
  return {"overall": result["overall"], "t0": t0}


def evaluate_dit_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """A trained DiT's evaluation: GenEval-lite with the config's sampler, then (when configured)
  Flow-Euler at eval.euler_steps and the restoration probe. {} when it cannot run (says why)."""
  reason = _skip_reason(config)
  if reason:
    print(f"Skipping the built-in evaluation: {reason}.", flush=True)
    return {}
  generator = Generator.from_workdir(workdir)
  result = evaluate(config, workdir, generator=generator)
  if config.eval.get("euler_steps", 0):
    euler = evaluate(config, workdir, sampler="flow_euler", steps=config.eval.euler_steps,
                     tag=f"_flow_euler{config.eval.euler_steps}", generator=generator)
    result["flow_euler"] = {"overall": euler["overall"], "steps": config.eval.euler_steps}
  if config.eval.get("restoration_t0", 0):
    result["restoration"] = evaluate_restoration(config, workdir, generator)
  return result


def evaluate_sprint_run(config: ml_collections.ConfigDict, workdir: str, steps=(1, 2, 4)) -> dict:
  """GenEval-lite of a distilled Sprint student (EMA) with the sCM sampler at 1, 2 and 4 steps;
  writes WORKDIR/geneval_lite_sprint.json. {} when it cannot run (says why)."""
  reason = _skip_reason(config)
  if reason:
    print(f"Skipping the built-in evaluation: {reason}.", flush=True)
    return {}
  generator = Generator.from_workdir(workdir)
  results = {}
  for n in steps:
    r = evaluate(config, workdir, sampler="scm", steps=n, cfg=config.sample.cfg, tag=f"_scm{n}", generator=generator)
    results[f"scm_{n}"] = {"overall": r["overall"], **{k: v for k, v in r.items() if isinstance(v, float)}}
  with open(os.path.join(workdir, "geneval_lite_sprint.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def make_grid_fn(config, ae_model, ae_params, ae_scaling: float, text_encoder, plan, num_prompts: int = 16):
  """state -> uint8 sample grid of the EMA weights on fixed prompts, for TensorBoard every
  train.sample_every steps (the trainer calls this factory with its frozen parts and its sharding
  plan, so the grid samples the state where it lies). The prompts are train.sample_prompts (SANA's
  `validation_prompts`), else `num_prompts` held-out shapes prompts (the tiny configs' data)."""
  prompts = list(config.train.get("sample_prompts") or ()) or [p for p, _ in eval_prompt_set(num_prompts,
                                                                                             seed=config.seed)]
  generator = Generator(config, None, ae_model, ae_params, ae_scaling, text_encoder, ae_downsample(config), plan=plan)

  def grid(state) -> np.ndarray:
    generator.dit_params = state.ema_params
    return make_grid(generator.generate(prompts, sampler=config.sample.sampler, steps=config.sample.steps,
                                        cfg=config.sample.cfg, seed=config.seed))
  return grid
