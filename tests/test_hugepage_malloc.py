"""The CLIs' huge-page malloc tunable (sanajax/hugepage_malloc.py): when it is set, when it is left
alone, and the re-exec itself (same command, flags and pid; the tunable in the new process; once)."""
import os
import subprocess
import sys
import textwrap

import pytest

from sanajax import hugepage_malloc
from sanajax.hugepage_malloc import TUNABLE, hugepage_environ, hugepage_environ_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("thp", ["madvise", "always"])
def test_the_tunable_is_added_on_glibc_2_35_with_huge_pages(thp):
  environ = {"PATH": "/bin", "HOME": "/root"}
  assert hugepage_environ(environ, (2, 35), thp) == {**environ, "GLIBC_TUNABLES": TUNABLE}
  assert hugepage_environ(environ, (3, 0), thp) == {**environ, "GLIBC_TUNABLES": TUNABLE}
  assert environ == {"PATH": "/bin", "HOME": "/root"}  # the caller's mapping is left as it was


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, (2, 36), "madvise"),  # the user's own tunables
    ({"GLIBC_TUNABLES": ""}, (2, 36), "madvise"),  # set empty: the way to opt out
    ({}, (2, 34), "madvise"),  # glibc without glibc.malloc.hugetlb
    ({}, None, "madvise"),  # another libc (musl, macOS)
    ({}, (2, 36), "never"),  # transparent huge pages off: the advice would change nothing
    ({}, (2, 36), None),  # no THP setting to read (not Linux)
])
def test_the_tunable_is_left_alone_where_it_cannot_help_or_is_the_users(environ, glibc, thp):
  assert hugepage_environ(environ, glibc, thp) is None


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hugepage_malloc.thp_mode(str(path)) == mode
  assert hugepage_malloc.thp_mode(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("libc, version", [(("glibc", "2.36"), (2, 36)), (("glibc", "2.39.1"), (2, 39)),
                                           (("", ""), None), (("glibc", "x"), None)])
def test_glibc_version(monkeypatch, libc, version):
  monkeypatch.setattr(hugepage_malloc.platform, "libc_ver", lambda: libc)
  assert hugepage_malloc.glibc_version() == version


PROBE = textwrap.dedent("""
    import os
    from absl import flags
    from sanajax import cli
    flags.DEFINE_string("word", None, "A flag that must survive the re-exec.")
    print("started", os.getpid(), flush=True)

    def main(argv):
      print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flags.FLAGS.word, flush=True)

    if __name__ == "__main__":
      cli.run(main)
""")


def environ_without_tunable(tmp_path, **environ) -> dict[str, str]:
  """The test run's environment without its GLIBC_TUNABLES, plus `environ`, on the CPU, with tmp_path (a
  probe module or a sitecustomize) and the repository importable."""
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  env.update(environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
  return env


def run_probe(tmp_path, **environ):
  """`python -m probe_cli --word=kept` (a CLI built on sanajax.cli.run) with `environ` instead of the
  test run's GLIBC_TUNABLES; its stdout's lines, split."""
  (tmp_path / "probe_cli.py").write_text(PROBE)
  env = environ_without_tunable(tmp_path, **environ)
  r = subprocess.run([sys.executable, "-m", "probe_cli", "--word=kept"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return [line.split() for line in r.stdout.splitlines()]


def test_a_cli_restarts_itself_once_with_the_tunable(tmp_path):
  lines = run_probe(tmp_path)
  helps = hugepage_environ_here({}) is not None
  pid = lines[0][1]
  if helps:  # this machine: glibc >= 2.35 with THP in madvise or always mode
    # The module ran twice in one process (execve keeps the pid); main once, with the tunable and the flags.
    assert lines == [["started", pid], ["started", pid], ["main", pid, TUNABLE, "kept"]]
  else:
    assert lines == [["started", pid], ["main", pid, "None", "kept"]]


def test_a_cli_keeps_the_users_tunables(tmp_path):
  lines = run_probe(tmp_path, GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
  pid = lines[0][1]
  assert lines == [["started", pid], ["main", pid, "glibc.malloc.tcache_count=0", "kept"]]


# Records each interpreter start (pid, GLIBC_TUNABLES), and at a restart whether jax had been imported by then;
# ends a restarted process there, before the script's imports: what is tested is when the script restarts, not
# what it then does.
START_RECORDER = textwrap.dedent("""
    import os, sys
    with open(os.environ["START_LOG"], "a") as f:
      f.write(f"{os.getpid()} {os.environ.get('GLIBC_TUNABLES')}\\n")
    if os.environ.get("GLIBC_TUNABLES"):
      os._exit(0)
    _execve = os.execve
    def execve(*args):
      with open(os.environ["START_LOG"], "a") as f:
        f.write(f"restart {'jax' in sys.modules}\\n")
      _execve(*args)
    os.execve = execve
""")
CLIS = ("train", "train_ae", "distill_sprint", "sample", "convert", "info", "serve", "data.cache")
EXPERIMENTS = ("controlnet_demo", "lora_new_colour", "one_step_probe", "quantization_table", "sprint_ablation",
               "time_sampler_study")


def test_every_cli_and_experiment_restarts_before_its_heavy_imports(tmp_path):
  """`python -m sanajax.X` and `python experiments/X.py` restart with the tunable first thing, before jax and the
  models are imported (done before the restart, that work ran twice: ~1.5 s of every CLI start, measured
  2026-12-07: `python -m sanajax.info --config=configs/tiny.py` 3.3 s against 1.9 s without the restart)."""
  (tmp_path / "sitecustomize.py").write_text(START_RECORDER)
  commands = {**{cli: ["-m", f"sanajax.{cli}", "--help"] for cli in CLIS},
              **{name: [os.path.join(REPO, "experiments", f"{name}.py"), "--help"] for name in EXPERIMENTS}}
  runs = {name: subprocess.Popen([sys.executable, *args], cwd=REPO,
                                 env=environ_without_tunable(tmp_path, START_LOG=str(tmp_path / name)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for name, args in commands.items()}
  helps = hugepage_environ_here({}) is not None
  for name, proc in runs.items():
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (name, err[-3000:])
    starts = [line.split() for line in (tmp_path / name).read_text().splitlines()]
    pid = starts[0][0]
    expected = [[pid, "None"], ["restart", "False"], [pid, TUNABLE]] if helps else [[pid, "None"]]
    assert starts == expected, (name, starts)
