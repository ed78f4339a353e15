"""Run ``python -m <module> ...`` (or ``python <script> ...``) as a real child process, forked from
an interpreter that has already imported torch and transformers.

Most of this suite's subprocess tests check what only a separate process shows (exit codes,
stderr, nothing half-written, files another process reads), and on a 2-core machine each fresh
interpreter pays 4-10 s importing torch and transformers before it runs a line of ours. Here one
"zygote" per (pytest process, environment) imports them once; every call forks it, and the child
changes into ``cwd``, points stdin at /dev/null and stdout/stderr at files, and runs the module or
script as ``__main__`` with ``sys.argv`` set, as ``python -m`` would. An uncaught exception prints
its traceback and exits 1, ``sys.exit(n)`` exits ``n``, atexit handlers run, a signal gives
``-signum``: the result is the ``subprocess.CompletedProcess`` that ``subprocess.run(...,
capture_output=True, text=True)`` returns.

What a fork does not repeat is interpreter start-up and the imports of the preloaded modules, all
made with the same environment (a zygote serves only calls with exactly the environment it was
started with, so module-level reads of variables such as ``HF_HUB_OFFLINE`` agree). Fresh
interpreters are still what the tests of start-up itself use (``tests/test_base_install.py``, the
``torchrun`` jobs, the README commands in ``.ci/run``). ``DRAFTCACHE_TEST_FRESH_PYTHON=1`` runs
every call in a fresh interpreter instead.

The zygote refuses to serve (and calls fall back to fresh interpreters) if importing started a
thread: forking a threaded process is unsafe.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The environment of the suite's subprocesses: one thread each (two busy cores, where OpenMP
#: threads spinning against each other made a forward up to 50x slower), offline (the default
#: tests download nothing), this checkout's ``src`` first. One shared environment also means one
#: prewarmed interpreter per pytest process.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}

#: Variables nothing reads at import time, so a zygote serves calls that differ in them (the child
#: sets them): pytest names the running test in ``PYTEST_CURRENT_TEST``.
PER_CALL = frozenset({"PYTEST_CURRENT_TEST"})

PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "safetensors.torch", "typer", "datasets")

_SERVER = r'''
import gc, importlib, json, os, sys, threading
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
control_in, control_out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "w")  # dups: not inherited
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0), os.dup2(null, 1)
os.close(null)
if threading.active_count() != 1:
    control_out.write("unsafe\n"); control_out.flush(); os._exit(0)
gc.freeze()  # the preloaded objects are never collected: a child's collections do not touch their pages
control_out.write("ready\n"); control_out.flush()

def serve():
    for line in control_in:
        job = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            control_in.close(); control_out.close()
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(path, os.O_WRONLY | os.O_TRUNC)
                os.dup2(f, fd); os.close(f)
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            return job
        control_out.write(f"pid {pid}\n"); control_out.flush()
        _, status = os.waitpid(pid, 0)
        control_out.write(f"rc {os.waitstatus_to_exitcode(status)}\n"); control_out.flush()
    os._exit(0)

job = serve()
import atexit, runpy
argv, code = job["argv"], 0
try:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
except SystemExit as e:  # as the interpreter maps it
    if e.code is None or isinstance(e.code, int):
        code = e.code or 0
    else:
        print(e.code, file=sys.stderr)
        code = 1
except BaseException:
    sys.excepthook(*sys.exc_info())
    code = 1
# what a normal exit does that can be seen from outside (atexit handlers, the child's own garbage,
# flushed streams), without tearing down the preloaded modules: that walks every object of torch
# and transformers, and in a forked child copies their pages (3-5 s here, as long as the run)
atexit._run_exitfuncs()
gc.collect()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except Exception:
        pass
os._exit(code)
'''


class _Zygote:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(PRELOAD)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0)  # unbuffered: select() sees every line readline() has not taken
        self.ok = self._line(timeout=300) == "ready"

    def _line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().decode().strip() or None

    def run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="draftcache-prewarmed-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch(), err.touch()
            job = {"argv": argv, "cwd": cwd, "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            started = self._line(timeout=30)
            if not started or not started.startswith("pid "):
                raise RuntimeError(f"the prewarmed interpreter did not start the job (said {started!r})")
            pid = int(started.split()[1])
            deadline = time.monotonic() + timeout
            done = self._line(timeout=max(0.0, deadline - time.monotonic()))
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._line(timeout=30)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout,
                                                output=out.read_text(errors="replace"),
                                                stderr=err.read_text(errors="replace"))
            returncode = int(done.split()[1])
            return subprocess.CompletedProcess([sys.executable, *argv], returncode,
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_ZYGOTES: dict[tuple, _Zygote] = {}


@atexit.register
def _close_all() -> None:
    for zygote in _ZYGOTES.values():
        zygote.close()


def run_python(argv: list[str], *, env: dict[str, str] = SUBPROCESS_ENV, cwd: str | os.PathLike | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout)``, run in a child forked from a prewarmed interpreter of the same ``env``.

    ``argv``: ``["-m", module, *args]``, ``["-c", code, *args]`` or ``[script_path, *args]``, with or
    without ``sys.executable`` in front.
    """
    if argv and argv[0] == sys.executable:
        argv = argv[1:]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-m", "-c")):
        raise ValueError(f"run_python runs '-m module', '-c code' or a script, without interpreter options; got {argv}")
    env = {**env, **{k: os.environ[k] for k in PER_CALL if k in os.environ and k not in env}}
    cwd = str(cwd or os.getcwd())
    if os.environ.get("DRAFTCACHE_TEST_FRESH_PYTHON") == "1":
        return subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    key = tuple(sorted((k, v) for k, v in env.items() if k not in PER_CALL))
    zygote = _ZYGOTES.get(key)
    if zygote is None or zygote.proc.poll() is not None:
        zygote = _ZYGOTES[key] = _Zygote(env)
    if not zygote.ok:
        return subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    return zygote.run(list(argv), cwd, env, timeout)
