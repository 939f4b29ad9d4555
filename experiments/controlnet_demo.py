"""The ControlNet demo of docs/controlnet.md: control fidelity with and without the ControlNet on held-out
shapes scenes, at 20-step Flow-DPM and (if a Sprint student is given) 1 and 2 sCM steps.

    nice -n 10 python -m experiments.controlnet_demo --controlnet=workdirs/cn_tiny \
        [--sprint=workdirs/tiny_sprint] [--scenes=64] --json_out=workdirs/cn_demo.json

The Sprint rows use the ControlNet trained on the teacher (the student's base), applied to the student.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import argparse
import json

from sanajax.eval import control_fidelity as cf
from sanajax.generation import Generator
from sanajax.workdir.files import load_workdir_config
from sanajax.workdir.loaders import load_controlnet


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--controlnet", required=True, help="A ControlNet workdir (configs/controlnet_tiny.py).")
  parser.add_argument("--sprint", default="", help="A Sprint student of the ControlNet's base (optional).")
  parser.add_argument("--scenes", type=int, default=64)
  parser.add_argument("--json_out", required=True)
  args = parser.parse_args()
  config = load_workdir_config(args.controlnet)
  cn = config.controlnet
  options = {"low": cn.canny_low, "high": cn.canny_high, "blur_sigma": cn.canny_blur_sigma}
  scenes = cf.control_scenes(args.scenes, int(config.data.resolution), int(config.seed))
  model, params, base = load_controlnet(args.controlnet)
  rows = {}
  runs = [("flow_dpm_20", base, "flow_dpm", 20, float(config.sample.cfg))]
  if args.sprint:
    runs += [(f"sprint_scm_{n}", args.sprint, "scm", n, 4.5) for n in (1, 2)]
  for name, workdir, sampler, steps, cfg in runs:
    plain, steered = Generator.from_workdir(workdir), Generator.from_workdir(workdir)
    steered.attach_controlnet(model, params)
    result = cf.compare(plain, steered, scenes, condition=cn.condition, options=options, sampler=sampler,
                        steps=steps, cfg=cfg, seed=int(config.seed))
    result.pop("with_images")
    result.pop("without_images")
    rows[name] = result
    print(name, json.dumps({k: result[k] for k in ("with", "without")}), flush=True)
  with open(args.json_out, "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
