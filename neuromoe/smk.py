"""Glue for the workflow's thin scripts: logs, benchmark records, thread counts, and readable failures.

Inside a rule's ``script:``, ``run(snakemake, fn)`` sends the library's log output and warnings to the
rule's log file, pins BLAS/ITK/torch threads to the rule's ``threads``, and turns a typed error
(``NeuroMoEError``: a bad input, a stage that cannot go on) into a short message that names the subject
and cause on the console *and* in the log, then exits non-zero. Snakemake removes that job's partial
outputs and keeps every other subject's finished outputs.

A rule with a log named ``benchmark`` gets its benchmark record from the job itself (``write_benchmark``):
wall seconds since the process started, CPU seconds and peak RSS of the job and its child processes from
``getrusage``, exact and free. Snakemake's ``benchmark:`` directive polls every running job's process tree
from the main process every 0.5 s for its first 15 s (psutil: a /proc scan for children, smaps of each);
on the 2-core demo that was about 13 % of a core for the whole run, and it missed much of a job's CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

_T0 = time.perf_counter()


def set_threads(n: int) -> None:
    n = max(int(n), 1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
                "NEUROMOE_THREADS"):
        os.environ[var] = str(n)
    # Neither is imported for this (SimpleITK ~0.35 CPU s, torch 2 s, in every job): imported later, each takes
    # its thread count from the variables above (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, OMP_NUM_THREADS).
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


BENCHMARK_COLUMNS = ["s", "h:m:s", "max_rss", "cpu_time", "cpu_user", "cpu_system", "io_in", "io_out", "status"]


def process_seconds() -> float:
    """Wall seconds since this process started (Linux: /proc), so interpreter start-up and imports count."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T0


def write_benchmark(path: str, status: str = "ok") -> dict[str, Any]:
    """Write the benchmark record of this job to ``path`` (TSV, Snakemake's column names where they mean the
    same: ``s``, ``h:m:s``, ``max_rss`` MB, ``cpu_time`` s, ``io_in``/``io_out`` MB) and return it. CPU and I/O
    are this process's plus its waited-for children's (a tool run through subprocess counts); ``max_rss`` is
    the larger of the two peaks."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = process_seconds()
    user, system = me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime
    rec = {"s": round(wall, 4), "h:m:s": time.strftime("%H:%M:%S", time.gmtime(wall)),
           "max_rss": round(max(me.ru_maxrss, kids.ru_maxrss) / 1024, 2),  # KiB on Linux
           "cpu_time": round(user + system, 2), "cpu_user": round(user, 2), "cpu_system": round(system, 2),
           "io_in": round((me.ru_inblock + kids.ru_inblock) * 512 / 2**20, 2),
           "io_out": round((me.ru_oublock + kids.ru_oublock) * 512 / 2**20, 2), "status": status}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\t".join(BENCHMARK_COLUMNS) + "\n" + "\t".join(str(rec[c]) for c in BENCHMARK_COLUMNS) + "\n")
    return rec


def outputs(snakemake: Any) -> dict[str, str]:
    """The rule's named outputs as a plain dict key -> path."""
    return {k: str(v) for k, v in snakemake.output.items()}


def inputs(snakemake: Any) -> dict[str, str]:
    return {k: (str(v) if isinstance(v, str) else [str(x) for x in v]) for k, v in snakemake.input.items()}


def unit(snakemake: Any) -> str:
    """The job's unit label after ``sub-``: ``01``, or ``01_ses-2`` in a dataset with sessions."""
    w = snakemake.wildcards
    return w.subject if w.get("session") is None else f"{w.subject}_ses-{w.session}"


def run(snakemake: Any, fn: Callable[[Any], Any], warm: str = "preproc") -> None:
    """Run ``fn(snakemake)`` with logging to the rule's log and clean error reporting.

    A local job of one thread first offers itself to the worker (``neuromoe.worker``) that keeps the modules of
    its kind (``warm``: "preproc", or "learn" for the jobs that import torch) imported; the worker runs this
    same script in a fork of itself. With no worker it runs here."""
    from neuromoe import worker

    if worker.wanted(snakemake.threads):
        code = worker.delegate(warm)
        if code is not None:
            sys.exit(code)
    from neuromoe.errors import NeuroMoEError

    console = sys.stderr
    log_path = snakemake.log[0] if len(snakemake.log) else None
    bench = dict(snakemake.log.items()).get("benchmark")
    log_fh = open(log_path, "w", buffering=1) if log_path else console  # noqa: SIM115 - lives for the job
    sys.stderr = log_fh
    logging.basicConfig(stream=log_fh, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        force=True)
    set_threads(snakemake.threads)
    label = f"rule {snakemake.rule}" + (f", sub-{unit(snakemake)}" if "subject" in snakemake.wildcards.keys() else "")
    t0 = time.time()
    logging.getLogger("neuromoe").info("%s: start (threads=%s%s)", label, snakemake.threads,
                                       f", a fork of worker {os.getppid()}" if worker.in_fork() else "")
    try:
        fn(snakemake)
    except NeuroMoEError as exc:
        msg = f"\n*** {label} failed: {exc}\n"
        print(msg, file=log_fh)
        if log_fh is not console:
            print(msg + f"    (log: {log_path})", file=console)
        _close(bench, "failed")
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=log_fh)
        if log_fh is not console:
            print(f"\n*** {label} failed with an unexpected error; the traceback is in {log_path}\n",
                  file=console)
        _close(bench, "failed")
        sys.exit(1)
    logging.getLogger("neuromoe").info("%s: done in %.1f s", label, time.time() - t0)
    _close(bench, "ok")


def _close(bench: str | None, status: str) -> None:
    if bench:
        rec = write_benchmark(str(bench), status)
        logging.getLogger("neuromoe").info("benchmark: %.1f s since the process started, %.1f CPU s, %.0f MB peak",
                                           rec["s"], rec["cpu_time"], rec["max_rss"])


# --- the Snakefile's start-up: what kind of invocation this is ---------------------------------------------------
# Snakemake modes that list, draw, lint, report or clean instead of running the workflow.
NOT_A_RUN = ("lint", "report", "summary", "detailed_summary", "list_rules", "list_target_rules", "list_changes",
             "list_input_changes", "list_params_changes", "list_untracked", "list_conda_envs", "dag", "rulegraph",
             "filegraph", "d3dag", "unlock", "cleanup_metadata", "cleanup_shadow", "delete_all_output",
             "delete_temp_output", "touch", "containerize", "archive", "print_compilation", "conda_create_envs_only",
             "conda_cleanup_envs", "export_cwl", "generate_unit_tests")


def trains(args: Any | None) -> bool:
    """Will this invocation make splits and train? ``args``: Snakemake's own reading of its command line
    (``snakemake.cli.get_argument_parser``; while the Snakefile is read, Snakemake has chosen neither its targets
    nor its executor, so start-up checks ask this). True for the default target or ``all``, in full (no
    ``--until`` or ``--omit-from``), and not a listing, lint, report or clean-up mode; False when unknown."""
    return (args is not None and (not args.targets or "all" in args.targets) and not args.until
            and not args.omit_from and not any(getattr(args, mode, None) for mode in NOT_A_RUN))


def coalesce_scheduler_wakeups(scheduler_cls: Any = None) -> bool:
    """Keep Snakemake's scheduler from waking up once more every second for every job it has finished.

    Snakemake 9's ``JobScheduler.schedule`` ends every pass by arming a ``threading.Timer`` (the timespan of
    ``--max-jobs-per-timespan``, 1 s by default) that re-opens the scheduler; that pass re-arms one, and each
    finished job adds a pass of its own. So every finished job starts a timer chain that never ends: after k
    jobs the main process makes k passes a second (job selection, input sizes, a thread each). On the
    180-subject generality piece (721 jobs) Snakemake's own process used half of one of the 2 cores after 156
    jobs, and the timers are not daemon threads, so a long timespan makes Snakemake hang at exit instead.
    Here a pass arms a timer only when none is pending (one chain, daemon): the re-evaluation the rate
    limiter needs still comes within one timespan. Applied once per process by the Snakefile; returns
    whether the scheduler is patched (False where this Snakemake has no such method: nothing to do)."""
    import threading

    if scheduler_cls is None:
        try:
            from snakemake.scheduling.job_scheduler import JobScheduler as scheduler_cls
        except ImportError:
            return False
    if getattr(scheduler_cls, "_neuromoe_coalesced", False):
        return True
    if not callable(getattr(scheduler_cls, "_schedule_reevalutation", None)):
        return False
    guard = threading.Lock()

    def _schedule_reevalutation(self: Any, delay: float) -> None:
        with guard:
            pending = getattr(self, "_neuromoe_timer", None)
            if pending is not None and pending.is_alive():
                return

            def reopen() -> None:
                with guard:
                    self._neuromoe_timer = None
                self._open_jobs.release()

            timer = threading.Timer(delay, reopen)
            timer.daemon = True
            self._neuromoe_timer = timer
            timer.start()

    scheduler_cls._schedule_reevalutation = _schedule_reevalutation
    scheduler_cls._neuromoe_coalesced = True
    return True
