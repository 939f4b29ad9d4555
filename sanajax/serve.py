"""A local web app for sampling workdirs (Gradio): prompt in, images out, with the CLI's function underneath.

    python -m sanajax.serve --workdir=DIR [--workdir=DIR2 ...] [--port=7860] [--host=127.0.0.1]

Every image comes from generation.Generator.generate, the call `python -m sanajax.sample` makes, so
the same workdir, prompt, sampler, steps, CFG, guidance interval and seed give the same image as the
CLI (image i of a batch is the CLI's image i of a prompts file repeating the prompt). Each image is
saved as a PNG whose "sanajax" text chunk holds the exact settings that made it (settings_record).

Safe by default: it listens on 127.0.0.1 (--host=0.0.0.0 opens it to the network); requests run one
at a time on the device (Gradio's queue with concurrency 1, and Engine's lock under it); a bad request
(steps 0, a resolution the model cannot take, ...) gets one line in the page and the server goes on;
a prompt is at most MAX_PROMPT_CHARS characters and the text encoder reads its first
text.max_length tokens (the page says when a prompt is cut).

What does not need a browser is plain Python here, tested without one (tests/test_serve.py):
parse_request (validation), settings_record / save_png (the record in each PNG), Engine (models
loaded once, requests serialised, which (sampler, steps, resolution, batch, interval) programs have
compiled and how long that took) and Debouncer (the Sprint live mode). build_app is the Gradio page.
Details: docs/serve.md.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import dataclasses
import json
import math
import os
import random
import shlex
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from PIL import Image, PngImagePlugin

from sanajax import cli, extras
from sanajax.data import buckets
from sanajax.diffusion import samplers
from sanajax.generation import Generator, truncation_warnings
from sanajax.models.text_encoder import TextEncoder
from sanajax.workdir.files import checkpoint_dir, load_model_workdir_config
from sanajax.workdir.loaders import has_checkpoint

FLOW_SAMPLERS = ("flow_dpm", "flow_euler")
SPRINT_SAMPLER = "scm"
# Bounds of one request, so that a typo cannot hold the device for minutes (SANA samples 20 steps,
# Sprint 1-4; the README's largest batch is 64 on one chip): raise them here if you need more.
MAX_STEPS = 100
MAX_BATCH = 8
MAX_SIDE_FACTOR = 2  # a typed size's sides: at most this x data.resolution (SANA's buckets reach ~2x a side)
MAX_PROMPT_CHARS = 2000  # a request-size guard; the text encoder itself reads text.max_length tokens
MAX_SEED = 2**31 - 1
LIVE_STEPS = 1  # the Sprint student's one-step mode
LIVE_DEBOUNCE_S = 0.3  # typing pauses longer than this start a live image


class BadRequest(ValueError):
  """A request the model cannot take, said in one line that names the field and the fix."""


# ------------------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """What the page knows of one workdir before its weights load (config.json only).

  resolutions: the (height, width) pairs the page offers (resolution_choices): data.resolution, then
  the config's aspect-ratio buckets; any other size the model takes can be typed (parse_request).
  """
  workdir: str
  config: ml_collections.ConfigDict
  name: str
  sprint: bool
  samplers: tuple[str, ...]
  resolutions: tuple[tuple[int, int], ...]

  @classmethod
  def open(cls, workdir: str) -> ServedModel:
    """FileNotFoundError (a CLI user error) for a folder that is not a workdir or has no checkpoint."""
    config = load_model_workdir_config(workdir)
    if not has_checkpoint(workdir):
      raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {checkpoint_dir(workdir)}; train or convert "
                              f"a model first (python -m sanajax.train / sanajax.convert).")
    sprint = bool(config.model.get("guidance_embeds", False))
    # scm is for Sprint students only (sample.check_options says why); they sample with the flow ODE too.
    names = (SPRINT_SAMPLER, *FLOW_SAMPLERS) if sprint else FLOW_SAMPLERS
    name = os.path.basename(os.path.normpath(workdir)) + (" (Sprint)" if sprint else "")
    return cls(os.path.abspath(workdir), config, name, sprint, names, resolution_choices(config))

  @property
  def defaults(self) -> dict:
    """The page's starting values: the workdir's sample section (what the CLI uses by default)."""
    s = self.config.sample
    interval = samplers.as_cfg_interval(s.get("cfg_interval")) or (0.0, 1.0)
    return {"sampler": s.sampler if s.sampler in self.samplers else self.samplers[0], "steps": int(s.steps),
            "cfg": float(s.cfg), "cfg_interval": interval, "resolution": format_resolution(self.resolutions[0])}


def resolution_choices(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """(height, width) pairs the page offers for a workdir: data.resolution (square), then the sizes of
  its aspect-ratio buckets (config.data.buckets, sanajax.data.buckets) in table order."""
  r = int(config.data.resolution)
  table = buckets.table_from_config(config)
  return tuple(dict.fromkeys([(r, r), *(table.shapes if table else [])]))


def format_resolution(hw: tuple[int, int]) -> str:
  return f"{hw[1]}x{hw[0]}"  # width x height, as image sizes are usually written


def parse_resolution(text: Any) -> tuple[int, int]:
  """'512x768' (width x height) or '512' -> (height, width); BadRequest otherwise."""
  parts = str(text).lower().replace(" ", "").split("x")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    raise BadRequest(f"resolution {text!r}: write it as WIDTHxHEIGHT, e.g. 512x512.") from None
  if len(sizes) == 1:
    sizes *= 2
  if len(sizes) != 2 or min(sizes) <= 0:
    raise BadRequest(f"resolution {text!r}: write it as WIDTHxHEIGHT, e.g. 512x512.")
  return sizes[1], sizes[0]


# ----------------------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Request:
  """One validated generation request (parse_request); hashable."""
  workdir: str
  prompt: str
  negative_prompt: str
  sampler: str
  steps: int
  cfg: float
  cfg_interval: tuple[float, float] | None  # None: guidance at every step
  seed: int
  batch_size: int
  resolution: tuple[int, int]  # (height, width)

  @property
  def compile_key(self) -> tuple:
    """What one compiled program is specialised to: the jit's static arguments (sampler, steps,
    interval) and shapes (resolution, batch). Prompt, negative prompt, CFG and seed are its inputs."""
    return (self.workdir, self.sampler, self.steps, self.resolution, self.batch_size, self.cfg_interval)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
  """A whole number in [lo, hi] from the page's value (a float, an int or a string); BadRequest otherwise."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
    shown = f"{number:g}" if math.isfinite(number) else repr(value)
    raise BadRequest(f"{name}={shown}: must be a whole number from {lo} to {hi}.")
  return int(number)


def parse_request(model: ServedModel, *, prompt: Any, negative_prompt: Any = "", sampler: Any = None,
                  steps: Any = None, cfg: Any = None, cfg_interval: Any = None, seed: Any = 0, batch_size: Any = 1,
                  resolution: Any = None) -> Request:
  """A Request from the page's raw values (strings, floats, None), checked against the model before
  any work; BadRequest names the first bad field and what it may be. None takes the model's default
  (ServedModel.defaults). cfg_interval: (lo, hi) flow times with 0 <= lo <= hi <= 1; a full [0, 1]
  is None (guidance at every step, as the CLI's --cfg_interval=none)."""
  d = model.defaults
  prompt = "" if prompt is None else str(prompt)
  negative_prompt = "" if negative_prompt is None else str(negative_prompt)
  for field, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
    if len(text) > MAX_PROMPT_CHARS:
      raise BadRequest(f"{field}: {len(text)} characters; at most {MAX_PROMPT_CHARS} (the text encoder reads only "
                       f"its first {model.config.text.max_length} tokens anyway).")
  sampler = d["sampler"] if sampler in (None, "") else str(sampler)
  if sampler not in model.samplers:
    why = (" (scm is SANA-Sprint's sampler: serve a Sprint student, python -m sanajax.distill_sprint)"
           if sampler == SPRINT_SAMPLER else "")
    raise BadRequest(f"sampler {sampler!r}: {model.name} samples with {', '.join(model.samplers)}{why}.")
  steps = _integer("steps", d["steps"] if steps is None else steps, 1, MAX_STEPS)
  try:
    cfg = float(d["cfg"] if cfg is None else cfg)
  except (TypeError, ValueError):
    raise BadRequest(f"CFG {cfg!r}: must be a number (e.g. 4.5).") from None
  if not math.isfinite(cfg):
    raise BadRequest(f"CFG={cfg}: must be a finite number (e.g. 4.5).")
  interval = d["cfg_interval"] if cfg_interval is None else cfg_interval
  try:
    lo, hi = (float(x) for x in interval)
  except (TypeError, ValueError):
    raise BadRequest(f"guidance interval {cfg_interval!r}: two flow times LO, HI.") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise BadRequest(f"guidance interval ({lo:g}, {hi:g}): need 0 <= from <= to <= 1.")
  # A Sprint student embeds its guidance (no unconditional pass), so no interval applies.
  interval = None if model.sprint or samplers.guidance_interval_is_full((lo, hi)) else (lo, hi)
  seed = _integer("seed", seed, 0, MAX_SEED)
  batch_size = _integer("batch size", batch_size, 1, MAX_BATCH)
  hw = parse_resolution(d["resolution"] if resolution in (None, "") else resolution)
  if hw not in model.resolutions:  # a typed size: one the model takes, at most MAX_SIDE_FACTOR x data.resolution
    limit = MAX_SIDE_FACTOR * int(model.config.data.resolution)
    try:
      buckets.check_sample_size(model.config, *hw)
    except ValueError as e:
      raise BadRequest(f"resolution {format_resolution(hw)}: {str(e).split(': ', 1)[-1]}") from None
    if max(hw) > limit:
      raise BadRequest(f"resolution {format_resolution(hw)}: at most {limit} px a side here ({MAX_SIDE_FACTOR} x "
                       f"the model's {model.config.data.resolution}); offered: "
                       f"{', '.join(format_resolution(r) for r in model.resolutions)}.")
  return Request(model.workdir, prompt, negative_prompt, sampler, steps, cfg, interval, seed, batch_size, hw)


def settings_record(request: Request, index: int) -> dict:
  """The exact settings of image `index` of a request, as stored in its PNG and shown in the page.

  `cli` is the sample command that writes the same image (as OUT/{index:05d}.png: a prompts file
  holding the prompt index + 1 times), given when the CLI can say it (no negative prompt)."""
  record = {"workdir": request.workdir, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "sampler": request.sampler, "steps": request.steps, "cfg": request.cfg,
            "cfg_interval": list(request.cfg_interval) if request.cfg_interval else None, "seed": request.seed,
            "batch_size": request.batch_size, "index": index, "height": request.resolution[0],
            "width": request.resolution[1]}
  h, w = request.resolution
  if not request.negative_prompt and "\n" not in request.prompt:
    interval = "none" if request.cfg_interval is None else f"{request.cfg_interval[0]:g},{request.cfg_interval[1]:g}"
    source = (f"--prompt={shlex.quote(request.prompt)}" if index == 0 else
              f"--prompts_file=PROMPTS  # PROMPTS: the prompt on {index + 1} lines; the image is OUT/{index:05d}.png")
    record["cli"] = (f"python -m sanajax.sample --workdir={shlex.quote(request.workdir)} --sampler={request.sampler} "
                     f"--steps={request.steps} --cfg={request.cfg:g} --cfg_interval={interval} --seed={request.seed} "
                     f"--height={h} --width={w} --out=OUT {source}")
  return record


PNG_KEY = "sanajax"  # the PNG text chunk holding settings_record's JSON


def save_png(path: str, image: np.ndarray, record: dict) -> str:
  """Writes a uint8 (H, W, 3) image as a PNG with its settings (JSON) in the text chunk PNG_KEY."""
  info = PngImagePlugin.PngInfo()
  info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
  Image.fromarray(image).save(path, pnginfo=info)
  return path


def read_png_settings(path_or_file) -> dict:
  """The settings a served PNG carries (settings_record)."""
  with Image.open(path_or_file) as im:
    return json.loads(im.text[PNG_KEY])


# ------------------------------------------------------------------------------------------- engine


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling (its monitoring events), so a call's compile
  time can be told from its sampling time. One listener for the process; read it around a call."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
  seconds = 0.0
  _registered = False

  @classmethod
  def start(cls) -> None:
    if not cls._registered:
      jax.monitoring.register_event_duration_secs_listener(cls._listen)
      cls._registered = True

  @classmethod
  def _listen(cls, event: str, duration: float, **_) -> None:
    if event in cls.EVENTS:
      cls.seconds += duration


@dataclasses.dataclass
class Result:
  """What one request made: images (B, H, W, 3) uint8, their PNG paths and settings, timings in seconds."""
  request: Request
  images: np.ndarray
  paths: list[str]
  records: list[dict]
  seconds: float  # sampling, without compiling
  compile_seconds: float  # tracing + compiling on the first call of this compile_key, else 0
  notes: list[str]

  @property
  def per_image(self) -> float:
    return self.seconds / len(self.images)

  def summary(self) -> str:
    text = f"{len(self.images)} image(s) in {self.seconds:.2f} s ({self.per_image:.3f} s per image)"
    if self.compile_seconds:
      text += f"; compiled in {self.compile_seconds:.1f} s (first call of this sampler, steps, size and batch)"
    return text


class Engine:
  """The served models and the one device they share.

  generate() runs one request at a time (a lock, under Gradio's queue), loads each workdir's
  Generator once (on its first request, or with load()), and knows which compile keys
  (Request.compile_key) have run: a Generator keeps one jitted function per (sampler, steps, guidance
  interval), compiled once per shape (resolution, batch) and reused, so only a new key compiles.
  """

  def __init__(self, models: Sequence[ServedModel], out_dir: str,
               load: Callable[[str], Any] = Generator.from_workdir):
    self.models = {m.workdir: m for m in models}
    self.out_dir = out_dir
    self._load = load
    self._generators: dict[str, Any] = {}
    self.compiled: dict[tuple, float] = {}  # compile_key -> compile seconds of its first call
    self.load_seconds: dict[str, float] = {}
    self._lock = threading.Lock()
    self._count = 0
    CompileClock.start()

  def model(self, workdir: str) -> ServedModel:
    try:
      return self.models[workdir]
    except KeyError:
      raise BadRequest(f"model {workdir!r}: not served here; pick one of {list(self.models)}.") from None

  def is_loaded(self, workdir: str) -> bool:
    return workdir in self._generators

  def needs_compile(self, request: Request) -> bool:
    return request.compile_key not in self.compiled

  def load(self, workdir: str) -> Any:
    """The workdir's Generator (loaded on the first call)."""
    with self._lock:
      return self._generator(workdir)

  def _generator(self, workdir: str) -> Any:
    if workdir not in self._generators:
      start = time.perf_counter()
      self._generators[workdir] = self._load(workdir)
      self.load_seconds[workdir] = time.perf_counter() - start
    return self._generators[workdir]

  def generate(self, request: Request) -> Result:
    """Samples a request with Generator.generate (the sample CLI's call) and writes its PNGs."""
    with self._lock:
      generator = self._generator(request.workdir)
      notes = []
      if isinstance(generator.text, TextEncoder):  # SANA's tokenizer; SD3's three are not checked (as the CLI)
        notes = [line.replace("prompt 0", "the prompt").removeprefix("Warning: ")
                 for line in truncation_warnings(generator.text, [request.prompt])]
      generator.cfg_interval = request.cfg_interval
      compile_before, start = CompileClock.seconds, time.perf_counter()
      images = generator.generate([request.prompt] * request.batch_size, sampler=request.sampler,
                                  steps=request.steps, cfg=request.cfg, seed=request.seed,
                                  batch_size=request.batch_size, negative_prompt=request.negative_prompt,
                                  height=request.resolution[0], width=request.resolution[1])
      total = time.perf_counter() - start
      compile_s = CompileClock.seconds - compile_before if self.needs_compile(request) else 0.0
      self.compiled.setdefault(request.compile_key, compile_s)
      self._count += 1
      records = [settings_record(request, i) for i in range(len(images))]
      paths = [save_png(os.path.join(self.out_dir, f"{self._count:05d}-{i}-seed{request.seed}.png"), im, rec)
               for i, (im, rec) in enumerate(zip(images, records))]
      return Result(request, images, paths, records, max(total - compile_s, 0.0), compile_s, notes)


class Debouncer:
  """The live mode's debounce. Every keystroke notes the prompt (`note`, with the browser's clock in
  ms, as soon as it reaches the server); a live request samples only if, once the session has not
  typed for `delay` seconds, its prompt is the latest noted one (`settled`). The browser's stamps
  order keystrokes whose notes arrive out of order; a live request never notes, so a late request
  carrying an old prompt cannot pass for the newest."""

  def __init__(self, delay: float = LIVE_DEBOUNCE_S, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    self.delay, self._clock, self._sleep = delay, clock, sleep
    self._latest: dict[str, tuple[float, str, float]] = {}  # session -> (stamp, prompt, server time of the note)
    self._lock = threading.Lock()

  def note(self, session: str, text: str, stamp: float) -> None:
    """A keystroke: `text` typed at browser time `stamp`; one older than the latest noted is ignored."""
    with self._lock:
      if session not in self._latest or stamp >= self._latest[session][0]:
        self._latest[session] = (stamp, text, self._clock())

  def settled(self, session: str, text: str) -> bool:
    """Waits `delay` (so that this keystroke's own note has arrived) and until the session has not
    typed for `delay`; then whether `text` is its latest prompt. A session with no note: True."""
    wake = self._clock() + self.delay
    while True:
      with self._lock:
        latest = self._latest.get(session)
      if latest is None:
        return True
      wake = max(wake, latest[2] + self.delay)
      if self._clock() >= wake:
        return latest[1] == text
      self._sleep(wake - self._clock())


# --------------------------------------------------------------------------------------------- page


def build_app(engine: Engine):
  """The Gradio Blocks page over `engine` (serve it with launch())."""
  import gradio as gr  # optional dependency (pip install -e ".[serve]"): the rest of this module works without it

  models = list(engine.models.values())
  first = models[0]
  debouncer = Debouncer()

  def model_updates(workdir: str):
    m = engine.model(workdir)
    d = m.defaults
    return (gr.update(choices=list(m.samplers), value=d["sampler"]), gr.update(value=d["steps"]),
            gr.update(value=d["cfg"], label=_cfg_label(m)),
            gr.update(value=d["cfg_interval"][0], visible=not m.sprint),
            gr.update(value=d["cfg_interval"][1], visible=not m.sprint),
            gr.update(choices=[format_resolution(r) for r in m.resolutions], value=d["resolution"]),
            gr.update(visible=m.sprint, value=False), gr.update(info=_negative_info(m)),
            gr.update(info=_prompt_info(m)))

  def parse(workdir, prompt, negative, sampler, steps, cfg, lo, hi, seed, batch, resolution) -> Request:
    return parse_request(engine.model(workdir), prompt=prompt, negative_prompt=negative, sampler=sampler,
                         steps=steps, cfg=cfg, cfg_interval=(lo, hi), seed=seed, batch_size=batch,
                         resolution=resolution)

  def run(request: Request) -> Result:
    try:
      return engine.generate(request)
    except BadRequest:
      raise
    except Exception as e:  # the page reports it (the traceback goes to the log); the server keeps serving
      traceback.print_exc()
      raise BadRequest(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e

  def on_generate(gallery_items, workdir, prompt, negative, sampler, steps, cfg, lo, hi, seed, batch, resolution):
    """Generate: validates, says when it loads or compiles, samples, adds the images to the session's gallery."""
    skip = (gr.skip(),) * 3
    try:
      request = parse(workdir, prompt, negative, sampler, steps, cfg, lo, hi, seed, batch, resolution)
      message = waiting_message(engine, request)
      if message:
        yield *skip, message, gr.skip()
      result = run(request)
    except BadRequest as e:
      yield *skip, f"**Error:** {e}", gr.skip()
      return
    items = list(gallery_items) + [{"path": p, "record": r} for p, r in zip(result.paths, result.records)]
    status = result.summary() + "".join(f"  \n*{n}*" for n in result.notes)
    yield (result.paths[0], [(it["path"], _caption(it["record"])) for it in items], items, status,
           result.records[0])

  def on_keystroke(live, prompt, typed_at, request: gr.Request):
    if live:
      debouncer.note(request.session_hash, prompt, float(typed_at or 0))

  def on_live(live, workdir, prompt, negative, sampler, steps, cfg, lo, hi, seed, batch, resolution,
              request: gr.Request):
    """Typing in live mode (a Sprint student): one step, one image, once typing pauses; not added to the gallery."""
    del sampler, steps, batch  # live mode is scm, LIVE_STEPS steps, one image
    if not live or not str(prompt).strip() or not debouncer.settled(request.session_hash, prompt):
      return gr.skip(), gr.skip(), gr.skip()
    try:
      result = run(parse(workdir, prompt, negative, SPRINT_SAMPLER, LIVE_STEPS, cfg, lo, hi, seed, 1, resolution))
    except BadRequest as e:
      return gr.skip(), f"**Error:** {e}", gr.skip()
    return result.paths[0], f"Live ({LIVE_STEPS} step): {result.summary()}", result.records[0]

  def on_select(gallery_items, evt: gr.SelectData):
    return gallery_items[evt.index]["record"] if 0 <= evt.index < len(gallery_items) else gr.skip()

  # Gradio finds its special arguments by type hint; under `from __future__ import annotations` the hints
  # are strings naming this function's local `gr`, which typing.get_type_hints cannot resolve.
  on_live.__annotations__ = on_keystroke.__annotations__ = {"request": gr.Request}
  on_select.__annotations__ = {"evt": gr.SelectData}

  d = first.defaults
  with gr.Blocks(title="sanajax", analytics_enabled=False) as demo:
    gr.Markdown("## sanajax: text to image")
    with gr.Row():
      with gr.Column(scale=2):
        model = gr.Dropdown([(m.name, m.workdir) for m in models], value=first.workdir, label="Model",
                            elem_id="model", interactive=len(models) > 1)
        prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                            placeholder="a red circle to the left of a blue square", info=_prompt_info(first))
        negative = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS, elem_id="negative",
                              info=_negative_info(first))
        live = gr.Checkbox(label=f"Live: regenerate as you type (Sprint, {LIVE_STEPS} step)", value=False,
                           elem_id="live", visible=first.sprint)
        with gr.Row():
          sampler = gr.Dropdown(list(first.samplers), value=d["sampler"], label="Sampler", elem_id="sampler")
          steps = gr.Number(d["steps"], label=f"Steps (1-{MAX_STEPS})", precision=0, elem_id="steps")
          cfg = gr.Number(d["cfg"], label=_cfg_label(first), elem_id="cfg")
        with gr.Row():
          cfg_lo = gr.Slider(0.0, 1.0, d["cfg_interval"][0], step=0.05, label="Guidance from flow time",
                             elem_id="cfg_lo", visible=not first.sprint)
          cfg_hi = gr.Slider(0.0, 1.0, d["cfg_interval"][1], step=0.05, label="Guidance to flow time",
                             elem_id="cfg_hi", visible=not first.sprint)
        with gr.Row():
          seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
          dice = gr.Button("Random seed", elem_id="random_seed", scale=0)
          batch = gr.Number(1, label=f"Batch size (1-{MAX_BATCH})", precision=0, elem_id="batch")
          resolution = gr.Dropdown([format_resolution(r) for r in first.resolutions], value=d["resolution"],
                                   label="Resolution (width x height)", allow_custom_value=True,
                                   elem_id="resolution")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("Ready.", elem_id="status")
      with gr.Column(scale=3):
        latest = gr.Image(label="Latest image", type="filepath", format="png", elem_id="latest", height=320,
                          buttons=["download"], interactive=False)
        settings = gr.JSON(label="Its settings (also in the PNG's 'sanajax' text chunk)", elem_id="settings")
    gallery = gr.Gallery(label="Made since this page opened (select one for its settings; download: the PNG with them)",
                         columns=8, height=200, preview=False, fit_columns=False, object_fit="contain",
                         elem_id="gallery",
                         buttons=["download"], format="png", interactive=False)
    items = gr.State([])
    typed_at = gr.Number(visible=False)  # the browser's clock at a keystroke (ms), set by the events' js

    controls = [model, prompt, negative, sampler, steps, cfg, cfg_lo, cfg_hi, seed, batch, resolution]
    model.change(model_updates, inputs=model, outputs=[sampler, steps, cfg, cfg_lo, cfg_hi, resolution, live,
                                                       negative, prompt], queue=False)
    dice.click(lambda: random.randint(0, MAX_SEED), outputs=seed, queue=False)
    # One request at a time on the device (Engine's lock holds this too, for any other caller).
    device = {"concurrency_id": "device", "concurrency_limit": 1}
    outputs = [latest, gallery, items, status, settings]
    # The progress overlay (queue position, seconds) covers the image, not the status line's messages.
    generate.click(on_generate, inputs=[items, *controls], outputs=outputs, show_progress_on=latest, **device)
    prompt.submit(on_generate, inputs=[items, *controls], outputs=outputs, show_progress_on=latest, **device)
    # Live mode: each keystroke is noted at once, outside the queue, with the browser's clock (typed_at);
    # a live request waits out the debounce and samples only if its prompt is the latest noted (Debouncer).
    # While one runs, Gradio keeps just the newest keystroke's request (always_last).
    stamp = "(live, prompt, typed_at) => [live, prompt, Date.now()]"
    prompt.input(on_keystroke, inputs=[live, prompt, typed_at], queue=False, js=stamp)
    prompt.input(on_live, inputs=[live, *controls], outputs=[latest, status, settings], show_progress="hidden",
                 trigger_mode="always_last", concurrency_limit=None)
    gallery.select(on_select, inputs=items, outputs=settings, queue=False)
  return demo


def waiting_message(engine: Engine, request: Request) -> str | None:
  """What the page shows while a request waits on loading or compiling (None: neither)."""
  m = engine.model(request.workdir)
  if not engine.is_loaded(request.workdir):
    return f"Loading {m.name} and compiling its sampler (its first request) ..."
  if engine.needs_compile(request):
    h, w = request.resolution
    return (f"Compiling {request.sampler}, {request.steps} steps, {w}x{h}, batch {request.batch_size} "
            f"(the first call; later ones reuse it) ...")
  return None


def _cfg_label(model: ServedModel) -> str:
  return "Guidance (embedded in the student)" if model.sprint else "CFG scale"


def _negative_info(model: ServedModel) -> str:
  return ("Not used by a Sprint student (it runs no unconditional pass)." if model.sprint else
          "What CFG steers away from (empty: the model's null prompt).")


def _prompt_info(model: ServedModel) -> str:
  return f"The text encoder reads its first {model.config.text.max_length} tokens."


def _caption(record: dict) -> str:
  return (f"{record['prompt'][:60]} | {record['sampler']} {record['steps']} steps, cfg {record['cfg']:g}, "
          f"seed {record['seed']} #{record['index']}")


# The latest image fills its box (a 32 px test model too, pixels kept sharp).
CSS = "#latest img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"


def launch(engine: Engine, host: str, port: int) -> None:
  """Serves the page until interrupted (Gradio's queue: one device request at a time)."""
  import gradio as gr  # optional dependency, as in build_app

  demo = build_app(engine)
  demo.queue(default_concurrency_limit=1)
  # Local fonts only: the page must render with no network (Gradio's default theme loads Google Fonts).
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
  demo.launch(server_name=host, server_port=port, ssr_mode=False, share=False, theme=theme, css=CSS)


def check_port(host: str, port: int) -> None:
  """A UserError (one line, exit 2) when nothing can listen on host:port, e.g. a port already taken."""
  try:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.bind((host, port))
  except OSError as e:
    raise cli.UserError(f"--host={host} --port={port}: cannot listen there ({e.strerror or e}); "
                        f"pick another --port.") from e


def main(argv):
  del argv  # cli.run refuses positional arguments.
  workdirs, host, port = flags.FLAGS.workdir, flags.FLAGS.host, flags.FLAGS.port
  extras.require("gradio", "python -m sanajax.serve")  # before minutes of loading
  if not workdirs:
    raise cli.UserError("--workdir is required (repeat it to serve several models).")
  models = [ServedModel.open(w) for w in workdirs]
  if len({m.workdir for m in models}) != len(models):
    raise cli.UserError("--workdir: the same workdir is given twice.")
  if host not in ("127.0.0.1", "localhost", "::1"):
    print(f"Warning: --host={host}: the page is open to anyone who can reach this machine.", file=sys.stderr,
          flush=True)
  check_port(host, port)  # before minutes of loading
  engine = Engine(models, tempfile.mkdtemp(prefix="sanajax-serve-"))
  print(f"Loading {models[0].name} ({models[0].workdir}) ...", flush=True)
  engine.load(models[0].workdir)  # ready when the URL is printed; the others load on their first request
  print(f"Serving {len(models)} model(s); images are written to {engine.out_dir}", flush=True)
  try:
    launch(engine, host, port)
  except OSError as e:
    raise cli.UserError(f"--host={host} --port={port}: cannot listen there ({e}); pick another --port.") from e


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: absl flags are global, and the tests import
  this module beside sanajax.sample (which defines its own --workdir)."""
  cli.define_flags(multihost=False)
  flags.DEFINE_multi_string("workdir", None, "A workdir to serve (config.json + checkpoints: a training, Sprint or "
                            "converted one); repeat it to serve several, with a model picker.")
  flags.DEFINE_integer("port", 7860, "TCP port of the page.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 127.0.0.1 keeps the page on this machine "
                      "(0.0.0.0: anyone who can reach it can use the accelerator).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
