"""Shared helpers of the Slurm benchmarks in tests/bench/ (not a test module; pytest ignores it).

They need the test cluster up (tests/cluster/slurm-cluster.sh up) and print figures; nothing here
asserts on time. Job wall times come from slurmctld's own log (millisecond timestamps of
"sched: Allocate JobId=N" and "_job_complete: JobId=N done"), so both sides of a comparison are
measured by the same clock and no polling interval leaks into them; sacct's whole-second
Start/End is the fallback when the log cannot be read.
"""
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from slurm_support import (  # noqa: E402
    cluster_problem, run_tool_cli, sacct_job, wait_for_job, TOOL_PATH)

__all__ = ["REPO", "TOOL_PATH", "require_cluster", "free_port", "make_project", "submit_tool",
           "sbatch", "wait_for_job", "job_times", "median", "run_tool_cli", "fmt_seconds",
           "build_pyz", "end_benchmark"]


def require_cluster():
    """Exit with a message when the test cluster is not usable."""
    reason = cluster_problem()
    if reason:
        sys.exit("benchmark needs the test cluster (bash tests/cluster/slurm-cluster.sh up): %s"
                 % reason)


def free_port():
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(prefix, files):
    """A fresh temporary folder holding ``files`` ({relative path: text}); returns its path."""
    root = tempfile.mkdtemp(prefix="hc-bench-%s-" % prefix)
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
    return root


def submit_tool(project, compose_name="compose.yaml", env=None, extra=()):
    """``hpc_compose.py submit --format json`` from ``project``; returns the job id."""
    res = run_tool_cli(["submit", "-f", os.path.join(project, compose_name), "--format", "json"]
                       + list(extra), cwd=project, env=env)
    if res.code != 0:
        raise RuntimeError("submit failed (%d): %s%s" % (res.code, res.out, res.err))
    return str(json.loads(res.out)["job_id"])


def sbatch(script_path, cwd):
    """Submit a batch script with ``sbatch --parsable`` from ``cwd``; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", script_path], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError("sbatch failed: %s" % proc.stderr.strip())
    return proc.stdout.strip().split(";")[0]


def _ctld_log_path():
    proc = subprocess.run(["scontrol", "show", "config"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
    match = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", proc.stdout, re.M)
    return match.group(1) if match else "/var/log/slurm/slurmctld.log"


def _log_stamp(line):
    # "[2026-11-24T12:30:30.365] ..." in the controller's local time.
    import datetime
    stamp = line[1:line.index("]")]
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def job_times(job_id):
    """(start, end, source) of a finished job: slurmctld log (ms) or sacct (whole seconds)."""
    start = end = None
    started = re.compile(r"(sched: Allocate|_start_job: Started) JobId=%s\b" % re.escape(str(job_id)))
    done = "_job_complete: JobId=%s done" % job_id
    try:
        with open(_ctld_log_path(), errors="replace") as handle:
            for line in handle:
                if started.search(line):
                    start = _log_stamp(line)
                elif done in line:
                    end = _log_stamp(line)
    except (OSError, ValueError):
        start = end = None
    if start is not None and end is not None:
        return start, end, "slurmctld.log"
    import datetime
    row = sacct_job(job_id, fields=("JobID", "Start", "End"))
    parse = lambda text: datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    return parse(row["Start"]), parse(row["End"]), "sacct (1 s resolution)"


def median(values):
    """Median of a non-empty list of numbers."""
    return statistics.median(values)


def fmt_seconds(value):
    """'1.234 s'."""
    return "%.3f s" % value


def remove_project(path):
    """Remove a benchmark project folder (best effort)."""
    shutil.rmtree(path, ignore_errors=True)


def build_pyz(project):
    """``hpc-compose.pyz`` as `make -f zipapp.mk` builds it (bytecode for this Python), in a fresh
    folder of ``project``: the installed form of the tool."""
    folder = tempfile.mkdtemp(prefix="dist-", dir=project)
    subprocess.run(["make", "-s", "-f", "zipapp.mk", "DIST=" + folder,
                    "PYTHONS=" + os.path.realpath(sys.executable)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(folder, "hpc-compose.pyz")


def end_benchmark(job_id, project):
    """scancel the benchmark's job (if it got one), give its teardown a moment, remove its folder."""
    if job_id:
        subprocess.run(["scancel", job_id], timeout=30)
        time.sleep(5)
    remove_project(project)


COUNTING_WRAPPER = '''#!/bin/sh
# Counting stand-in: records the call, then runs the real {name}.
echo {name} >> {log}
exec {real} "$@"
'''


def counting_wrappers(folder, log, names=("squeue", "sacct")):
    """Put a stand-in for each of ``names`` into ``folder`` that appends its name to ``log`` and
    then runs the real tool (put ``folder`` first on PATH to count a command's scheduler calls)."""
    os.makedirs(folder)
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "w") as handle:
            handle.write(COUNTING_WRAPPER.format(name=name, log=log, real=shutil.which(name)))
        os.chmod(path, 0o755)
