"""notebooks/*.ipynb run end to end on CPU with tiny models (the notebooks are executed in tests on CPU).

Each notebook's code cells run in order as one script in a fresh interpreter (the two that install only
sanajax itself see only what that install has: tests/held_site); right after the cell
tagged "parameters" the test adds one cell of its own that points the workdirs at a temporary
directory and shrinks the run (the smallest model of tests/small_configs.py, a few steps). The
checks are on what the notebook leaves on disk and prints, so a cell that silently does nothing
fails too.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from held import held_env  # tests/held.py (tests/ is on sys.path)
from PIL import Image
from small_configs import (
  SMALLEST_MODEL,  # tests/small_configs.py (tests/ is on sys.path)
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))

# 64 px as tests/test_sprint_ablation.py (XLA:CPU compiles 8x8 latents' random draws faster than 4x4).
TINY = {"data.resolution": 64, **SMALLEST_MODEL, "ae_train.num_steps": 2, "ae_train.batch_size": 4,
        "ae_train.log_every": 1, "train.batch_size": 4, "train.num_steps": 2, "train.log_every": 1,
        "train.checkpoint_every": 2, "train.warmup_steps": 1, "eval.num_prompts": 6, "eval.euler_steps": 0,
        "eval.restoration_t0": 0.0}
SPRINT_TINY = {"train.batch_size": 4, "train.log_every": 1, "train.warmup_steps": 1}


def read_notebook(name: str) -> dict:
  with open(os.path.join(NOTEBOOK_DIR, name), encoding="utf-8") as f:
    return json.load(f)


def code_cells(nb: dict) -> list[tuple[str, list[str]]]:
  return [("".join(c["source"]), c.get("metadata", {}).get("tags", [])) for c in nb["cells"]
          if c["cell_type"] == "code"]


def test_there_are_notebooks():
  assert {"tpu_quickstart.ipynb", "pretrained_sampling.ipynb", "own_data.ipynb"} <= set(NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_valid_python_with_a_parameters_cell(name):
  nb = read_notebook(name)
  assert nb["nbformat"] == 4
  cells = code_cells(nb)
  assert sum("parameters" in tags for _, tags in cells) == 1, "exactly one code cell tagged 'parameters'"
  for i, (source, _) in enumerate(cells):
    compile(source, f"{name}:code cell {i}", "exec")  # plain Python: no '!' or '%' lines
  stored = [c for c in nb["cells"] if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
  assert not stored, "commit notebooks without outputs"


def notebook_script(name: str, test_cell: str) -> str:
  parts = []
  for source, tags in code_cells(read_notebook(name)):
    parts.append(source)
    if "parameters" in tags:
      parts.append(test_cell)
  return "\n\n".join(parts) + "\n"


def test_tpu_quickstart_runs_on_cpu(tmp_path):
  teacher, student = tmp_path / "teacher", tmp_path / "sprint"
  test_cell = (f"WORKDIR = {str(teacher)!r}\nSPRINT_WORKDIR = {str(student)!r}\n"
               f"OVERRIDES.update({TINY!r})\nSPRINT_STEPS = 2\nSPRINT_OVERRIDES.update({SPRINT_TINY!r})\n")
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script("tpu_quickstart.ipynb", test_cell))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                        check=False, env=held_env("install"))  # the notebook's own `pip install -e sanajax`
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout

  # The teacher: trained to the requested step, evaluated, the printed score the saved one.
  assert (teacher / "ae").is_dir() and (teacher / "checkpoints" / "2").is_dir(), sorted(os.listdir(teacher))
  result = json.loads((teacher / "geneval_lite.json").read_text())
  assert result["num_images"] == 6
  assert f"GenEval-lite overall: {round(result['overall'], 3)}" in out
  assert "1 cpu device(s)" in out
  assert str(teacher / "samples" / "grid.png") in out

  # Own prompts, from the teacher and from the student at 1, 2 and 4 steps: three images each.
  num_prompts = 3
  for folder in [teacher / "my_prompts"] + [student / f"my_prompts_scm{n}" for n in (1, 2, 4)]:
    images = [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(num_prompts)]
    assert not (folder / f"{num_prompts:05d}.png").exists()
    assert all(im.shape == (64, 64, 3) for im in images) and all(im.std() > 0 for im in images), folder
    assert (folder / "grid.png").exists()

  # The student: distilled for SPRINT_STEPS from this teacher, scored at 1, 2 and 4 steps.
  assert (student / "checkpoints" / "2").is_dir()
  config = json.loads((student / "config.json").read_text())
  assert config["teacher_workdir"] == str(teacher) and config["model"]["guidance_embeds"] is True
  sprint = json.loads((student / "geneval_lite_sprint.json").read_text())
  assert sorted(sprint) == ["scm_1", "scm_2", "scm_4"]
  for name, r in sprint.items():
    assert f"{name}: GenEval-lite {r['overall']:.3f}" in out


def test_own_data_runs_on_cpu(tmp_path):
  """notebooks/own_data.ipynb: its generated captioned pictures (3 aspect ratios) -> ArrayRecord shards ->
  the tiny DiT trained from them with buckets (2 steps) -> a sample at the bucket nearest 16:9."""
  work = tmp_path / "work"
  overrides = {**TINY, "eval.num_prompts": 0}
  test_cell = (f"BASE = {str(tmp_path)!r}\nSHARDS = {str(tmp_path / 'shards')!r}\nWORKDIR = {str(work)!r}\n"
               f"OVERRIDES.update({overrides!r})\n")
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script("own_data.ipynb", test_cell))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                        check=False, env=held_env("install"))  # the notebook's own `pip install -e sanajax`
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  assert "24 images in" in out and "(24 examples)" in out
  build = json.loads((tmp_path / "shards" / "build.json").read_text())
  assert build["complete"] and build["shards"] == 2
  assert (work / "checkpoints" / "2").is_dir()
  config = json.loads((work / "config.json").read_text())
  assert config["data"]["buckets"] == "sana" and config["data"]["source"] == f"arrayrecord:{tmp_path / 'shards'}"
  image = np.asarray(Image.open(work / "own_data_sample" / "00000.png"))
  h, w = image.shape[:2]
  assert w > h and w % 8 == 0 and h % 8 == 0 and image.std() > 0, image.shape
  assert f"sampled {w}x{h} (WxH)" in out


def test_pretrained_sampling_runs_on_cpu(tmp_path):
  """Tiny random SANA and SANA-Sprint pipelines (diffusers' save_pretrained, as tests/test_convert.py
  writes them) stand in for the released ones: converted, sampled at 20 and at 1 and 2 steps, timed."""
  from test_convert import save_sana_pipeline  # needs torch + diffusers (the test extra)
  sana = save_sana_pipeline(tmp_path / "sana_pipeline").root
  sprint = save_sana_pipeline(tmp_path / "sprint_pipeline", sprint=True).root
  work = tmp_path / "work"
  prompts = ["a red circle", "a blue square to the left of a red circle"]
  test_cell = (f"WORKDIRS = {str(work)!r}\nSANA_SRC = {sana!r}\nSPRINT_SRC = {sprint!r}\nDTYPE = 'float32'\n"
               f"PROMPTS = {prompts!r}\n")
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script("pretrained_sampling.ipynb", test_cell))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout

  # Both pipelines converted (the Sprint one samples with scm by default), then sampled and timed.
  assert f"converted {sana} -> {work / 'sana'}" in out and f"converted {sprint} -> {work / 'sprint'}" in out
  configs = {name: json.loads((work / name / "config.json").read_text()) for name in ("sana", "sprint")}
  assert configs["sprint"]["sample"]["sampler"] == "scm" and configs["sprint"]["model"]["guidance_embeds"]
  res = configs["sana"]["data"]["resolution"]
  for name, folder in (("SANA flow_dpm 20 steps", work / "sana" / "samples_notebook"),
                       ("Sprint scm 1 step(s)", work / "sprint" / "samples_notebook_scm1"),
                       ("Sprint scm 2 step(s)", work / "sprint" / "samples_notebook_scm2")):
    images = [np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(len(prompts))]
    assert not (folder / f"{len(prompts):05d}.png").exists() and (folder / "grid.png").exists()
    assert all(im.shape == (res, res, 3) and im.std() > 0 for im in images), folder
    assert not np.array_equal(images[0], images[1]), folder  # two prompts, two images
    line = next(line for line in out.splitlines() if line.startswith(f"{name}: first call (compile + sample) "))
    assert line.endswith(f"s per image ({res}x{res} px)"), line
    assert re.search(rf"^{re.escape(name)} +\d+\.\d +\d+\.\d{{3}}$", out, re.MULTILINE), out  # the timings table
