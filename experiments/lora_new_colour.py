"""Teach a trained shapes model a colour it never saw, with a LoRA (docs/lora.md#shapes).

    python -m experiments.lora_new_colour --base=workdirs/tiny --out=/tmp/lora_magenta [--images=100]
        [--colour=magenta] [--set train.num_steps=500 --set train.learning_rate=1e-3 ...]

1. Writes OUT/data: `images` shapes scenes (the base's resolution) in which the first object is drawn in
   the new colour (shapes.NOVEL_COLORS), with the data set's scored captions as sidecar .txt files, so
   `--config.data.source=folder:OUT/data` trains on them, plus `replay` ordinary training scenes (the
   base's own data, mixed in against forgetting). The tiny text encoder has no word for the colour:
   prompts reach the DiT with the unknown token there, like DreamBooth's rare identifier.
2. Scores the base: GenEval-lite on the held-out prompts with the first colour replaced by the new one
   ("new"), and on the unchanged held-out prompts ("old"), detecting the new colour beside the palette.
3. Trains the LoRA (configs/lora.py:BASE on OUT/data, `--set` overrides) in OUT/lora, timed.
4. Scores the LoRA (the base with the adapters merged) the same way; writes OUT/lora_new_colour.json
   (scores before/after, training seconds, adapter parameters and file size) and sample grids.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from sanajax import config_utils
from sanajax.cli import quiet_library_logs
from sanajax.data import shapes
from sanajax.eval import geneval_lite
from sanajax.generation import Generator, make_grid
from sanajax.models.lora_diffusers import save_lora
from sanajax.training.dit import train
from sanajax.workdir.loaders import load_lora_workdir


def recolour(prompt: str, colour: str) -> str:
  """The prompt with its first object's colour replaced by `colour` (same grammar, same category)."""
  cap = shapes.parse_caption(prompt)
  items = ((colour, cap.items[0][1]),) + tuple(cap.items[1:])
  return dataclasses.replace(cap, items=items).text


def write_data(directory: str, num: int, colour: str, resolution: int, seed: int = 0, replay: int = 0) -> list[str]:
  """`num` training scenes whose first object is `colour`, then `replay` ordinary training scenes (the base's
  own data, against forgetting): DIR/00000.png + 00000.txt (caption<TAB>score lines)."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  prompts = []
  for i in range(num + replay):
    scene = shapes.sample_scene(rng, resolution)
    prompt = scene.captions[int(np.argmax(scene.scores))]
    if i < num:
      prompt = recolour(prompt, colour)
    new = shapes.scene_for_prompt(prompt, rng, resolution) if i < num else scene
    Image.fromarray(new.image).save(os.path.join(directory, f"{i:05d}.png"))
    with open(os.path.join(directory, f"{i:05d}.txt"), "w") as f:
      f.write("\n".join(f"{c}\t{s:.2f}" for c, s in zip(new.captions, new.scores)) + "\n")
    prompts.append(prompt)
  return prompts


def score(generator: Generator, prompt_set: Sequence[tuple[str, str]], config, colour: str, grid_path: str) -> dict:
  prompts, cats = [p for p, _ in prompt_set], [c for _, c in prompt_set]
  images = generator.generate(prompts, sampler=config.sample.sampler, steps=config.sample.steps,
                              cfg=config.sample.cfg, seed=config.seed)
  Image.fromarray(make_grid(images[:36], columns=6)).save(grid_path)
  result = geneval_lite.evaluate(images, prompts, cats, extra_colors=(colour,))
  return {"overall": result["overall"], "categories": {k: v["rate"] for k, v in result["categories"].items()},
          "failures": {k: v.get("failures", {}) for k, v in result["categories"].items()}}


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, help="trained shapes workdir (read only)")
  p.add_argument("--out", required=True)
  p.add_argument("--colour", default="magenta", choices=sorted(shapes.NOVEL_COLORS))
  p.add_argument("--images", type=int, default=100)
  p.add_argument("--replay", type=int, default=0, help="ordinary training scenes mixed in (against forgetting)")
  p.add_argument("--set", action="append", default=[], help="config override FIELD=VALUE (JSON value)")
  args = p.parse_args(argv)
  quiet_library_logs()
  overrides = {}
  for item in args.set:
    field, _, value = item.partition("=")
    try:
      parsed = json.loads(value)
      overrides[field] = tuple(parsed) if isinstance(parsed, list) else parsed  # config lists are tuples
    except json.JSONDecodeError:
      overrides[field] = value  # a bare string
  base_config = config_utils.load_config("configs/lora.py", args.base)
  data_dir = os.path.join(args.out, "data")
  write_data(data_dir, args.images, args.colour, int(base_config.data.resolution), seed=base_config.seed,
             replay=args.replay)
  old = shapes.eval_prompt_set(base_config.eval.num_prompts, seed=base_config.seed)
  new = [(recolour(prompt, args.colour), cat) for prompt, cat in old]
  out = {"colour": args.colour, "images": args.images, "replay": args.replay, "base": os.path.abspath(args.base), "overrides": overrides}

  generator = Generator.from_workdir(args.base)
  out["before"] = {"new": score(generator, new, base_config, args.colour, os.path.join(args.out, "before_new.png")),
                   "old": score(generator, old, base_config, args.colour, os.path.join(args.out, "before_old.png"))}
  print(json.dumps(out["before"]), flush=True)

  config = config_utils.load_config("configs/lora.py", args.base,
                                    overrides={"data.source": f"folder:{data_dir}", **overrides})
  workdir = os.path.join(args.out, "lora")
  start = time.perf_counter()
  train(config, workdir)
  out["train_seconds"] = time.perf_counter() - start
  adapters = load_lora_workdir(workdir)
  out["adapter_parameters"] = int(sum(e["a"].size + e["b"].size for e in adapters.values()))
  out["adapter_file_bytes"] = os.path.getsize(save_lora(os.path.join(args.out, "diffusers_lora"), adapters))

  generator = Generator.from_workdir(workdir)
  out["after"] = {"new": score(generator, new, base_config, args.colour, os.path.join(args.out, "after_new.png")),
                  "old": score(generator, old, base_config, args.colour, os.path.join(args.out, "after_old.png"))}
  with open(os.path.join(args.out, "lora_new_colour.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2), flush=True)
  return out


if __name__ == "__main__":
  main()
