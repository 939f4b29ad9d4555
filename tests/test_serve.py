"""sanajax.serve: the request checks, the settings every PNG carries, the Engine (models loaded once,
one request at a time, one compile per compile key), the live mode's debounce, and the page itself:
headless Chromium (Playwright) drives a server on a tiny random workdir, and the image it serves is
the one `python -m sanajax.sample` writes for the same settings.

The workdirs hold random weights drawn with numpy over the models' abstract parameters (no init
compile, ~1 s); the sizes are tests/small_configs.py's at 32 px.
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from small_configs import SMALLEST_MODEL  # tests/small_configs.py (tests/ is on sys.path)

from sanajax import cli, config_utils, serve
from sanajax.generation import Generator
from sanajax.models import dcae
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import checkpoint_dir, load_workdir_config, prepare_workdir
from sanajax.workdir.loaders import init_dit_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32


def _save_random(directory: str, abstract, seed: int) -> None:
  """N(0, 0.05) values for every parameter of `abstract` (boxed ShapeDtypeStructs), saved as `ema_params`
  (what sampling restores), as the trainers and convert save them."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  ckpt = Checkpointer(checkpoint_dir(directory), keep=1, async_save=False)
  ckpt.save(1, {"ema_params": params})
  ckpt.close()


def random_workdir(path: str, *, sprint: bool = False, ae: str | None = None) -> str:
  """A servable workdir (config.json, a checkpoint, an AE workdir) of configs/tiny.py at the tests' sizes;
  sprint: a Sprint student's (model.guidance_embeds, sampled with scm); ae: use another workdir's AE."""
  config = config_utils.load_config("configs/tiny.py", overrides={"data.resolution": RES, **SMALLEST_MODEL})
  with config.unlocked():
    if sprint:
      config.model.guidance_embeds = True
      config.sample.update(sampler="scm", steps=2, cfg=4.5)
    config.ae.workdir = ae or os.path.join(path, "ae")
  if ae is None:
    prepare_workdir(config.ae.workdir, config)
    model = dcae.build_dcae(config.ae)
    _save_random(config.ae.workdir, jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                   jnp.zeros((1, RES, RES, 3)))["params"], 1)
  prepare_workdir(path, config)
  _save_random(path, jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0))), 2)
  return path


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  flow = random_workdir(str(root / "flow"))
  return {"flow": flow, "sprint": random_workdir(str(root / "sprint"), sprint=True, ae=os.path.join(flow, "ae"))}


@pytest.fixture(scope="module")
def models(workdirs):
  return {name: serve.ServedModel.open(path) for name, path in workdirs.items()}


# ------------------------------------------------------------------------------ requests and records


def test_models_take_their_samplers_and_defaults_from_the_workdir(models, tmp_path):
  flow, sprint = models["flow"], models["sprint"]
  assert (flow.name, flow.sprint, flow.samplers, flow.resolutions) == ("flow", False, ("flow_dpm", "flow_euler"),
                                                                       ((RES, RES),))
  assert (sprint.name, sprint.samplers) == ("sprint (Sprint)", ("scm", "flow_dpm", "flow_euler"))
  # configs/tiny.py's sample section: flow_dpm, 20 steps, CFG 4.5 on the flow times (0.5, 1).
  assert flow.defaults == {"sampler": "flow_dpm", "steps": 20, "cfg": 4.5, "cfg_interval": (0.5, 1.0),
                           "resolution": "32x32"}
  assert sprint.defaults["sampler"] == "scm" and sprint.defaults["steps"] == 2
  # With aspect-ratio buckets (data.buckets "sana") the page offers data.resolution, then the buckets' sizes.
  config = config_utils.load_config("configs/tiny.py", overrides={"data.resolution": RES, **SMALLEST_MODEL,
                                                                  "data.buckets": "sana"})
  assert serve.resolution_choices(config) == ((32, 32), (16, 64), (16, 48), (32, 48), (48, 32), (48, 16), (64, 16))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    serve.ServedModel.open(str(tmp_path / "nope"))
  bare = tmp_path / "bare"
  prepare_workdir(str(bare), config_utils.load_config("configs/tiny.py"))
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    serve.ServedModel.open(str(bare))


def test_a_request_is_checked_before_any_work(models):
  flow, sprint = models["flow"], models["sprint"]
  assert serve.parse_request(flow, prompt="a red circle") == serve.Request(
      flow.workdir, "a red circle", "", "flow_dpm", 20, 4.5, (0.5, 1.0), 0, 1, (RES, RES))
  # The page's raw values: floats from number boxes, a full interval is "every step" (the CLI's none).
  got = serve.parse_request(flow, prompt="p", negative_prompt="blue", sampler="flow_euler", steps=3.0, cfg="2",
                            cfg_interval=(0, 1), seed=7.0, batch_size=2.0, resolution="32x32")
  assert got == serve.Request(flow.workdir, "p", "blue", "flow_euler", 3, 2.0, None, 7, 2, (RES, RES))
  # A Sprint student embeds its guidance: no interval applies.
  assert serve.parse_request(sprint, prompt="p", cfg_interval=(0.5, 1)).cfg_interval is None
  assert serve.parse_request(sprint, prompt="p", sampler="scm", steps=1).sampler == "scm"
  # A typed size the model takes (sides multiples of 16 here, at most 2 x 32 px): width x height.
  assert serve.parse_request(flow, prompt="p", resolution="64x48").resolution == (48, 64)


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "steps=0: must be a whole number from 1 to 100."),
    ({"steps": 2.5}, "steps=2.5: must be a whole number from 1 to 100."),
    ({"steps": 101}, "steps=101: must be a whole number from 1 to 100."),
    ({"steps": "many"}, "steps='many': must be a whole number from 1 to 100."),
    ({"cfg": float("nan")}, "CFG=nan: must be a finite number"),
    ({"cfg": "x"}, "CFG 'x': must be a number"),
    ({"cfg_interval": (0.8, 0.2)}, "guidance interval (0.8, 0.2): need 0 <= from <= to <= 1."),
    ({"seed": -1}, "seed=-1: must be a whole number from 0 to 2147483647."),
    ({"batch_size": 0}, "batch size=0: must be a whole number from 1 to 8."),
    ({"batch_size": 9}, "batch size=9: must be a whole number from 1 to 8."),
    ({"resolution": "36x36"}, "resolution 36x36: this model samples sizes whose sides are multiples of 16"),
    ({"resolution": "96x96"}, "resolution 96x96: at most 64 px a side here (2 x the model's 32); offered: 32x32."),
    ({"resolution": "big"}, "resolution 'big': write it as WIDTHxHEIGHT"),
    ({"sampler": "scm"}, "sampler 'scm': flow samples with flow_dpm, flow_euler (scm is SANA-Sprint's sampler"),
    ({"sampler": "ddim"}, "sampler 'ddim': flow samples with flow_dpm, flow_euler."),
    ({"prompt": "a" * 2001}, "prompt: 2001 characters; at most 2000"),
])
def test_each_bad_field_is_named_with_what_it_may_be(models, values, message):
  values = {"prompt": "a red circle", **values}
  with pytest.raises(serve.BadRequest) as info:
    serve.parse_request(models["flow"], **values)
  assert str(info.value).startswith(message), str(info.value)


def test_every_png_carries_its_exact_settings_and_the_cli_command(models, tmp_path):
  request = serve.parse_request(models["flow"], prompt="a red circle's edge", steps=2, seed=3, batch_size=3)
  record = serve.settings_record(request, 0)
  wd = models["flow"].workdir
  assert record == {
      "workdir": wd, "prompt": "a red circle's edge", "negative_prompt": "", "sampler": "flow_dpm", "steps": 2,
      "cfg": 4.5, "cfg_interval": [0.5, 1.0], "seed": 3, "batch_size": 3, "index": 0, "height": RES, "width": RES,
      "cli": (f"python -m sanajax.sample --workdir={wd} --sampler=flow_dpm --steps=2 --cfg=4.5 --cfg_interval=0.5,1 "
              "--seed=3 --height=32 --width=32 --out=OUT --prompt='a red circle'\"'\"'s edge'")}
  assert serve.settings_record(request, 2)["cli"].endswith(
      "--prompts_file=PROMPTS  # PROMPTS: the prompt on 3 lines; the image is OUT/00002.png")
  negative = serve.parse_request(models["flow"], prompt="p", negative_prompt="blue")
  assert "cli" not in serve.settings_record(negative, 0)  # the CLI has no negative prompt
  image = np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
  path = serve.save_png(str(tmp_path / "x.png"), image, record)
  assert serve.read_png_settings(path) == record
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_a_negative_prompt_is_an_input_of_the_same_compiled_program(workdirs):
  """Generator.generate(negative_prompt=): CFG's unconditional half reads it; "" is the plain CFG the CLI
  runs; one compiled program serves both (the negative prompt is an argument, not a static)."""
  generator = Generator.from_workdir(workdirs["flow"])
  generator.cfg_interval = None  # guidance at both steps, strong: the random model's text effect is weak
  kw = {"sampler": "flow_euler", "steps": 2, "cfg": 20.0, "seed": 0, "batch_size": 2}
  plain = generator.generate(["a red circle"] * 2, **kw)
  np.testing.assert_array_equal(generator.generate(["a red circle"] * 2, negative_prompt="", **kw), plain)
  negative = generator.generate(["a red circle"] * 2, negative_prompt="a blue square", **kw)
  other_prompt = generator.generate(["a blue square"] * 2, **kw)
  change = lambda images: np.abs(images.astype(int) - plain.astype(int)).mean()
  # It steers the image about as much as the prompt does (the random model's text effect is small:
  # at CFG s the prompt moves the velocity by s dv_c, the negative prompt by (s - 1) dv_u).
  print(f"mean |change| from the negative prompt {change(negative):.3f}, from the prompt {change(other_prompt):.3f}")
  assert change(negative) > 0.25 * change(other_prompt) > 0
  assert len(generator._jitted) == 1


# ------------------------------------------------------------------------------ engine and debounce


class FakeGenerator:
  """Generator's interface as Engine uses it: generate() compiles a small program once per (sampler,
  steps, interval, batch), as Generator's jit does, and records its calls and how many ran at once."""

  text = None  # not a TextEncoder: no truncation check
  running = max_running = 0

  def __init__(self, workdir):
    self.workdir, self.calls, self.cfg_interval, self._jitted = workdir, [], None, {}

  def generate(self, prompts, **kwargs):
    FakeGenerator.running += 1
    FakeGenerator.max_running = max(FakeGenerator.max_running, FakeGenerator.running)
    self.calls.append((list(prompts), kwargs, self.cfg_interval))
    key = (kwargs["sampler"], kwargs["steps"], self.cfg_interval)
    fn = self._jitted.setdefault(key, jax.jit(lambda x, s=kwargs["steps"]: jnp.tanh(x * s) + x.sum()))
    out = np.asarray(fn(jnp.full((len(prompts), RES, RES, 3), kwargs["seed"], jnp.float32)))
    time.sleep(0.05)
    FakeGenerator.running -= 1
    return (np.abs(out) % 256).astype(np.uint8)


def test_engine_loads_once_runs_one_at_a_time_and_compiles_once_per_key(models, tmp_path):
  loads = []
  engine = serve.Engine(list(models.values()), str(tmp_path), load=lambda w: loads.append(w) or FakeGenerator(w))
  flow = models["flow"]
  first = serve.parse_request(flow, prompt="a red circle", steps=2, seed=3, batch_size=2, negative_prompt="blue")
  assert not engine.is_loaded(flow.workdir) and engine.needs_compile(first)
  assert serve.waiting_message(engine, first).startswith("Loading flow")
  result = engine.generate(first)
  # The sample CLI's call: the prompt batch, the sampler settings, seed and batch size; the interval set first.
  generator = engine.load(flow.workdir)
  assert generator.calls == [(["a red circle"] * 2, {"sampler": "flow_dpm", "steps": 2, "cfg": 4.5, "seed": 3,
                                                     "batch_size": 2, "negative_prompt": "blue", "height": RES,
                                                     "width": RES}, (0.5, 1.0))]
  assert result.compile_seconds > 0 and len(result.paths) == 2
  assert [serve.read_png_settings(p) for p in result.paths] == result.records == [
      serve.settings_record(first, i) for i in range(2)]
  np.testing.assert_array_equal(np.asarray(Image.open(result.paths[1])), result.images[1])
  # Another prompt, seed and CFG reuse the compiled program; other steps compile a new one.
  again = engine.generate(serve.parse_request(flow, prompt="x", steps=2, seed=4, cfg=3, batch_size=2))
  assert again.compile_seconds == 0 and serve.waiting_message(engine, again.request) is None
  other = serve.parse_request(flow, prompt="x", steps=3, batch_size=2)
  assert serve.waiting_message(engine, other).startswith("Compiling flow_dpm, 3 steps, 32x32, batch 2")
  assert engine.generate(other).compile_seconds > 0
  assert loads == [flow.workdir] and set(engine.compiled) == {first.compile_key, other.compile_key}
  assert "compiled in" not in again.summary() and "compiled in" in result.summary()
  # Requests from several threads (Gradio's workers) never run at once.
  FakeGenerator.max_running = 0
  threads = [threading.Thread(target=engine.generate, args=(serve.parse_request(flow, prompt="y", steps=2,
                                                                                  seed=s, batch_size=2),))
             for s in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert FakeGenerator.max_running == 1 and len(generator.calls) == 7
  with pytest.raises(serve.BadRequest, match="not served here"):
    engine.model("/elsewhere")


def test_live_mode_draws_only_the_last_keystroke():
  now = [0.0]
  sleeps = []

  def sleep(seconds):
    sleeps.append(seconds)
    now[0] += seconds

  d = serve.Debouncer(0.3, clock=lambda: now[0], sleep=sleep)
  d.note("s", "a", 1)
  d.note("s", "a bl", 3)
  d.note("s", "a b", 2)  # arrived late: an older keystroke
  assert not d.settled("s", "a") and not d.settled("s", "a b")  # superseded
  assert d.settled("s", "a bl") and sleeps == [pytest.approx(0.3)] * 3  # each waited out the pause once
  def typed_during_wait(text, stamp):
    """A Debouncer whose first wait sees `text` typed (its note arrives while a live request waits)."""
    pending = [(text, stamp)]

    def sleep_typing(seconds):
      while pending:
        debouncer.note("s", *pending.pop())
      sleep(seconds)

    debouncer = serve.Debouncer(0.3, clock=lambda: now[0], sleep=sleep_typing)
    return debouncer

  d2 = typed_during_wait("abc", 9)  # a keystroke during the wait supersedes it
  d2.note("s", "ab", 8)
  assert not d2.settled("s", "ab")
  d3 = typed_during_wait("abcd", 10)  # a live request that reaches the server before its keystroke's note
  d3.note("s", "abc", 9)
  assert d3.settled("s", "abcd")
  assert d.settled("t", "a session that never noted")


def test_serve_cli_user_errors_are_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "sanajax.serve", f"--workdir={tmp_path / 'nope'}"], cwd=REPO, check=False,
                     capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0].startswith("sanajax.serve: error: Workdir") and "does not exist" in lines[0]
  with socket.socket() as taken:  # a port in use is refused before any model loads
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(cli.UserError, match=rf"--host=127.0.0.1 --port={port}: cannot listen there"):
      serve.check_port("127.0.0.1", port)


# ------------------------------------------------------------------------------ the page, in a browser


def _chromium() -> str | None:
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  return found or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_page(url: str, server: subprocess.Popen, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise AssertionError(f"the server exited ({server.returncode}): {server.stdout.read()[-3000:]}")
    try:
      with urllib.request.urlopen(url, timeout=2):
        return
    except OSError:
      time.sleep(0.1)  # connection refused returns at once: poll often, the page is served as soon as it is up
  raise AssertionError(f"no page at {url} after {timeout} s")


SRC = "document.querySelector('#latest img') && document.querySelector('#latest img').src"


def _next_image(page, old: str) -> str:
  page.wait_for_function(f"{SRC} && {SRC} !== {old!r}", timeout=180_000)
  return page.locator("#latest img").get_attribute("src")


def test_the_page_in_chromium_serves_the_clis_image_and_survives_a_bad_request(workdirs, tmp_path):
  chromium = _chromium()
  if chromium is None:
    why = "no Chromium found (shutil.which('chromium'), /usr/bin/chromium): apt-get install chromium"
    if os.environ.get("SANAJAX_REQUIRE_BROWSER"):  # .ci/run: CI must run this test
      pytest.fail(why)
    pytest.skip(why)
  sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
  pytest.importorskip("gradio", reason="pip install gradio (the serve / test extras)")
  # docs/images/serve.png: SANAJAX_SERVE_WORKDIR=<a trained workdir> SANAJAX_SERVE_SCREENSHOT=docs/images/serve.png
  # (the same steps on a trained model, sampled with its own step count).
  workdir = os.environ.get("SANAJAX_SERVE_WORKDIR") or workdirs["flow"]
  config = load_workdir_config(workdir)
  res, steps = config.data.resolution, 2 if workdir == workdirs["flow"] else config.sample.steps
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
  server = subprocess.Popen([sys.executable, "-m", "sanajax.serve", f"--workdir={workdir}",
                             f"--workdir={workdirs['sprint']}", f"--port={port}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # The sample CLI's image for the same settings, made meanwhile (the second core).
  cli_out = tmp_path / "cli"
  cli = subprocess.Popen([sys.executable, "-m", "sanajax.sample", f"--workdir={workdir}",
                          "--prompt=a red circle", f"--steps={steps}", "--seed=3", f"--out={cli_out}"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}/"
    _wait_for_page(url, server, timeout=240)
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
      page = browser.new_page(viewport={"width": 1280, "height": 1000})
      page.goto(url)
      options = page.locator("#model input")
      assert options.input_value() == os.path.basename(workdir)
      page.locator("#prompt textarea").fill("a red circle")
      page.locator("#steps input").fill(str(steps))
      page.locator("#seed input").fill("3")
      page.locator("#generate").click()
      src = _next_image(page, "")
      status = page.locator("#status").inner_text()
      assert "1 image(s) in" in status and "per image" in status and "compiled in" in status, status
      png = page.request.get(src).body()
      assert png[:8] == b"\x89PNG\r\n\x1a\n"
      image = Image.open(io.BytesIO(png))
      assert image.size == (res, res) and image.mode == "RGB"
      settings = json.loads(image.text[serve.PNG_KEY])
      assert {k: settings[k] for k in ("prompt", "sampler", "steps", "cfg", "seed", "index")} == {
          "prompt": "a red circle", "sampler": "flow_dpm", "steps": steps, "cfg": 4.5, "seed": 3, "index": 0}

      # A bad value: one line in the page, nothing drawn; the next request is served (compiled once).
      page.locator("#steps input").fill("0")
      page.locator("#generate").click()
      page.wait_for_function("document.querySelector('#status').innerText.includes('Error')")
      assert page.locator("#status").inner_text().strip() == "Error: steps=0: must be a whole number from 1 to 100."
      assert page.locator("#latest img").get_attribute("src") == src
      page.locator("#steps input").fill(str(steps))
      page.locator("#seed input").fill("4")
      page.locator("#generate").click()
      second = _next_image(page, src)
      status = page.locator("#status").inner_text()
      assert "per image" in status and "compiled" not in status, status
      assert json.loads(Image.open(io.BytesIO(page.request.get(second).body())).text[serve.PNG_KEY])["seed"] == 4
      assert page.locator("#gallery img").count() == 2
      page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
      if os.environ.get("SANAJAX_SERVE_SCREENSHOT"):  # docs/images/serve.png is taken this way
        shutil.copy(tmp_path / "serve.png", os.environ["SANAJAX_SERVE_SCREENSHOT"])
      browser.close()
    assert Image.open(tmp_path / "serve.png").size[0] == 1280
    # The same function underneath: the served image is the CLI's, pixel for pixel.
    assert cli.wait(timeout=240) == 0, cli.stdout.read()[-3000:]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(cli_out / "00000.png")))
  finally:
    for proc in (server, cli):
      if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
