"""A local worker that keeps the jobs' heavy modules imported: each job is a fork of it, not a new interpreter.

Every job of a local run is a fresh Python process that imports numpy, scipy, pandas, nibabel, SimpleITK,
matplotlib and dipy before it computes anything: 0.7-1.3 CPU s per job, about 4 of a subject's ~21 CPU s of
preprocessing. With the worker, the job's script (Snakemake's ``python .snakemake/scripts/tmp*.py``) connects to
a server that imported those modules once, hands it its command line, working directory, environment and its
stdin/stdout/stderr, and waits: the server forks, the fork runs the same script as ``__main__`` (preamble and
all) and exits with the job's exit status, which the script then exits with. Logs, benchmark records, outputs
and error messages are the job's own, as without the worker (the benchmark's CPU seconds are the fork's, which
start at zero; its peak RSS counts the pages it shares with the server, as a fresh job counts its imports).

Who uses it (``wanted``): the Snakefile sets ``NEUROMOE_WORKER=1`` for runs whose jobs execute on this machine
(not on a cluster, where a job must stay inside its allocation) unless the user set ``NEUROMOE_WORKER=0``; a
job asks only when it runs one thread (the server's BLAS is loaded with one). The first job that finds no
server starts one in the background (``python -m neuromoe.worker SOCKET KIND``, its log next to the socket)
and runs itself as before; so does every job the server refuses. One server per kind of job (``PRELOAD``),
environment and checkout (``socket_path``): a ``--use-conda`` job's server runs the conda environment's Python.

Safety: the server forks only while it is one thread (checked before every fork: OpenBLAS, ITK and OpenMP
thread pools start on first use, never in the server); it refuses jobs once any of the package's own source
files changed since it imported them (it then stops; the next job starts a fresh one); a job killed by
Snakemake (SIGTERM/SIGINT to the script) passes the signal to its fork, and a script that dies outright has its
fork killed by the server. It exits after ``NEUROMOE_WORKER_IDLE`` seconds (default 60) without a job.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ENV = "NEUROMOE_WORKER"
PACKAGE = Path(__file__).resolve().parent
# What each kind of job imports (a thin script names its kind: ``smk.run(snakemake, main, warm=...)``). Two servers,
# not one: a fork's peak RSS counts every page it shares with its server, so a preprocessing job's record would
# carry torch's ~0.4 GB. Snakemake's preamble (snakemake.iocontainers) in both.
PRELOAD = {
    "preproc": ("numpy", "scipy.ndimage", "scipy.signal", "pandas", "nibabel", "SimpleITK", "matplotlib.pyplot",
                "matplotlib.backends.backend_agg", "PIL.PngImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin",
                "PIL.JpegImagePlugin", "snakemake.iocontainers", "snakemake.logging", "neuromoe.errors", "neuromoe.smk",
                "neuromoe.inputs.templates", "neuromoe.preproc", "neuromoe.preproc.anat", "neuromoe.preproc.dwi",
                "neuromoe.preproc.func", "neuromoe.preproc.qc", "neuromoe.preproc.sidecars", "neuromoe.cache.store"),
    "learn": ("numpy", "pandas", "torch", "snakemake.iocontainers", "snakemake.logging", "neuromoe.errors",
              "neuromoe.smk", "neuromoe.learn.train", "neuromoe.learn.baseline", "neuromoe.results.evaluate",
              "neuromoe.results.explain", "neuromoe.results.predict"),
}
_MAX_MSG = 1 << 20
REFUSED_S = 600  # how long a server that cannot serve keeps others from starting
_JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_in_fork = False  # True in a job the server forked: it runs itself


def enabled(local_exec: bool, main_process: bool, environ: dict | None = None, containers: bool = False) -> str:
    """The value the Snakefile gives ``NEUROMOE_WORKER`` for its jobs: "1" when they run on this machine (a
    local run's main process) and not in containers, unless the user set it to "0"; "0" otherwise (cluster
    jobs, their own Snakemake processes; a job's container, whose /tmp may be the host's, must not serve
    the next job)."""
    environ = os.environ if environ is None else environ
    return "1" if local_exec and main_process and not containers and environ.get(ENV, "1") != "0" else "0"


def in_fork() -> bool:
    """Is this process a job the worker forked?"""
    return _in_fork


def wanted(threads: int) -> bool:
    """Should this job hand itself to the worker? Only a script Snakemake wrote for a job
    (``.snakemake/scripts/tmp*.py``, run as ``__main__``) of one thread, with the worker turned on."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return (not _in_fork and os.environ.get(ENV) == "1" and int(threads) == 1 and sys.platform == "linux"
            and script is not None and script.parent.parts[-2:] == (".snakemake", "scripts") and script.is_file())


def socket_path(warm: str, executable: str | None = None) -> Path:
    """The socket of the server for jobs of kind ``warm`` of this environment (interpreter, prefix and
    ``PYTHONPATH``: a venv's python links to the same binary as another's) and this checkout of the package
    (``NEUROMOE_WORKER_DIR`` moves the folder)."""
    key = "\0".join([executable or sys.executable, sys.prefix, os.environ.get("PYTHONPATH", ""), str(PACKAGE)])
    key = key.encode()
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    base = Path(os.environ.get("NEUROMOE_WORKER_DIR") or Path(runtime) / f"neuromoe-worker-{os.getuid()}")
    return base / f"{hashlib.sha1(key).hexdigest()[:12]}-{warm}.sock"


# --- the job's side ---------------------------------------------------------------------------------------------
def delegate(warm: str = "preproc") -> int | None:
    """Run this job (``sys.argv``) in a fork of the server for jobs of kind ``warm``; return its exit status, or
    None where there is no server to take it (one is started for the next job) or it refused: the caller then
    runs the job itself."""
    if warm not in PRELOAD:
        raise ValueError(f"unknown kind of job {warm!r}; one of {sorted(PRELOAD)}")
    path = socket_path(warm)
    if not _private_folder(path.parent):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        start_server(path, warm)
        return None
    with sock:
        request = {"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            reply = json.loads(sock.recv(_MAX_MSG) or b"{}")
        except (OSError, ValueError):
            return None
        pid = reply.get("pid")
        if not pid:
            return None  # refused (stale code, not one thread): run here

        def forward(signum: int, frame: object) -> None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, forward)
        try:
            msg = sock.recv(_MAX_MSG)
        except OSError:
            msg = b""
        if not msg:
            print(f"\n*** the neuromoe worker ({path}) stopped before this job ended; rerun it "
                  f"(NEUROMOE_WORKER=0 runs every job in its own interpreter)\n", file=sys.stderr)
            return 1
        return int(json.loads(msg)["exit"])


def start_server(path: Path, warm: str) -> bool:
    """Start a server in the background unless one holds ``path``'s lock (running, or starting). Returns
    whether one was started."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private_folder(path.parent):
            return False
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # a race with another job's start: the second server finds the lock taken and exits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    with open(f"{path}.log", "a") as log:
        subprocess.Popen([sys.executable, "-m", "neuromoe.worker", str(path), warm], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True,
                         cwd="/")  # not the job's folder, which may be gone before the server is
    return True


def _private_folder(folder: Path) -> bool:
    """Is ``folder`` ours alone (or not there yet)? A job hands its environment and stdio to whatever listens
    in it, so a folder another user made or can write (a shared /tmp) is never used."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


# --- the server -----------------------------------------------------------------------------------------------
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _sources(root: Path) -> dict[str, int]:
    """mtime (ns) of each loaded module's source file under ``root``."""
    out = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(root):
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
    return out


def _stale(sources: dict[str, int]) -> bool:
    for f, mtime in sources.items():
        try:
            if os.stat(f).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


def _say(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", flush=True)


def serve(path: str | Path, preload: tuple[str, ...] = PRELOAD["preproc"], idle_s: float | None = None,
          watch: Path = PACKAGE) -> None:
    """Serve jobs on the socket ``path`` until idle for ``idle_s`` seconds or ``watch``'s sources change."""
    import importlib

    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server has it
    idle_s = float(os.environ.get("NEUROMOE_WORKER_IDLE", 60)) if idle_s is None else idle_s
    # before the imports: BLAS and OpenMP size their pools when loaded (jobs of one thread only). The variables of
    # smk.set_threads, not a call to it: smk imports this module (no import cycle between the two).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    t0 = time.perf_counter()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module this environment lacks: its jobs import what they can themselves
            _say(f"preload {name}: {type(exc).__name__}: {exc}")
    sources = _sources(watch)
    if _threads() != 1:
        _say(f"not serving: {_threads()} threads after the imports (a fork would copy them half-way); holding the "
             f"lock for {REFUSED_S} s so that jobs run themselves without starting another")
        time.sleep(REFUSED_S)
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(64)
    _say(f"serving {path} ({time.perf_counter() - t0:.1f} s of imports, {len(sources)} watched sources)")
    jobs: dict[int, tuple[socket.socket, int]] = {}  # fork pid -> (its job's connection, end of its done pipe)
    orphans: set[int] = set()  # forks whose script hung up: ended with SIGTERM, their exit awaited
    stopping, last = False, time.monotonic()
    served = 0

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            listener.close()
            try:
                if path.exists() and path.is_socket():
                    path.unlink()
            finally:
                os.close(lock)  # after the unlink: the next server binds a fresh socket

    signal.signal(signal.SIGTERM, lambda *a: stop())
    try:
        while not stopping or jobs:
            conns = {conn.fileno(): pid for pid, (conn, _) in jobs.items() if pid not in orphans}
            dones = {done: pid for pid, (_, done) in jobs.items()}
            watch_fds = list(conns) + list(dones) + ([] if stopping else [listener.fileno()])
            try:
                ready, _, _ = select.select(watch_fds, [], [], 1.0)
            except (OSError, ValueError):  # SIGTERM closed the listener while select waited on it: look again
                continue
            for fd in ready:
                if not stopping and fd == listener.fileno():
                    conn, _ = listener.accept()
                    job = _accept(conn, sources, jobs, listener)
                    if job is None:
                        conn.close()
                        if _stale(sources):
                            _say("sources changed since the imports: stopping")
                            stop()
                    else:
                        jobs[job[0]] = (conn, job[1])
                        served += 1
                elif fd in dones and dones[fd] in jobs:  # the fork ended: its exit status to its script
                    pid = dones[fd]
                    conn, done = jobs.pop(pid)
                    orphans.discard(pid)
                    try:
                        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                        conn.send(json.dumps({"exit": code if code >= 0 else 128 - code}).encode())
                    except (OSError, ValueError):
                        pass  # the script is gone (killed): nobody to tell
                    conn.close()
                    os.close(done)
                    last = time.monotonic()
                elif fd in conns and conns[fd] in jobs:  # the script hung up (killed) while its fork runs: end it
                    pid = conns[fd]
                    try:
                        if not jobs[pid][0].recv(16):
                            orphans.add(pid)
                            os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
            if not jobs and not stopping and time.monotonic() - last > idle_s:
                _say(f"idle for {idle_s:.0f} s after {served} jobs: stopping")
                stop()
    finally:
        for pid in jobs:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop()


def _accept(conn: socket.socket, sources: dict[str, int], jobs: dict, listener: socket.socket) -> tuple | None:
    """Read one job's request and fork it; return (pid, read end of its done pipe), or None if refused."""
    conn.settimeout(10)
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_MSG, 3)
        request = json.loads(data)
    except (OSError, ValueError):
        return None
    reason = "sources changed" if _stale(sources) else (None if _threads() == 1 else "threads")
    if reason or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        try:
            conn.send(json.dumps({"refused": reason or "no stdio"}).encode())
        except OSError:
            pass
        return None
    conn.settimeout(None)
    done_r, done_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Signals wait until the fork has a job's handlers (the server's SIGTERM handler would remove its socket).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
    pid = os.fork()
    if pid == 0:  # the job
        code = 1
        try:
            for sig in _JOB_SIGNALS:  # as in a fresh interpreter (SIGPIPE stays ignored, as Python sets it)
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            listener.close()
            for other, other_done in jobs.values():
                other.close()
                os.close(other_done)
            conn.close()
            os.close(done_r)  # done_w stays open until this process ends: the server's signal that it did
            code = _run_job(request, fds)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for fd in (*fds, done_w):
        os.close(fd)
    try:
        conn.send(json.dumps({"pid": pid}).encode())
    except OSError:
        os.kill(pid, signal.SIGTERM)
    return pid, done_r


def _run_job(request: dict, fds: list[int]) -> int:
    """In the fork: become the job (stdio, directory, environment, argv) and run its script as __main__."""
    global _in_fork
    import random
    import runpy

    _in_fork = True  # the script's own run() then runs the job here
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    random.seed()  # a fresh interpreter's unseeded generators differ between jobs; a fork's would not
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code: int = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter's exit would run (log handlers' flush)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in PRELOAD:
        raise SystemExit(f"usage: python -m neuromoe.worker SOCKET {{{','.join(PRELOAD)}}}")
    from neuromoe import worker  # the package's module, not this __main__ copy: a fork's flag lives there

    worker.serve(sys.argv[1], worker.PRELOAD[sys.argv[2]])
