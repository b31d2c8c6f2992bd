#!/usr/bin/env python3
"""Where a job's time goes: a timestamped trace of the batch script of a server + client stack.

The stack is the one of bench_job_walltime.py (host runtime): `web` (python -m http.server,
readiness tcp or http) and `worker` (depends on web healthy; fetches a file, hashes it, exits).
The script `hpc_compose.py render` writes is submitted with `set -x` switched on right after its
`set -euo pipefail` line, each trace line stamped with $EPOCHREALTIME (the trace costs a few
microseconds a line, so the figures are a little above those of an untraced job). Printed: the
milestones of the job relative to slurmctld's "Allocate" of it (launch, probe attempts, ready, exit
noticed, teardown steps, script end, job complete), the medians over --repeat runs. Nothing is
asserted; docs/performance.md shows a run.

Usage: python3 tests/bench/trace_job.py [--repeat 3] [--readiness tcp|http] [--keep]
"""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (  # noqa: E402
    REPO, free_port, job_times, make_project, median, remove_project, require_cluster, sbatch,
    wait_for_job)
from bench_job_walltime import COMPOSE, WORKER  # noqa: E402

TRACE_ON = ('exec {TRACE_FD}>>"${SLURM_SUBMIT_DIR:-$PWD}/trace.${SLURM_JOB_ID:-0}"; '
            "BASH_XTRACEFD=$TRACE_FD; PS4='+$EPOCHREALTIME '; set -x\n")

# (label, regular expression on a trace line's command, which occurrence: first or last)
MILESTONES = [
    ("script starts", r"^set -euo pipefail$|^exec \{TRACE_FD\}", "first"),
    ("KillWait read (scontrol show config)", r"^KILL_WAIT=\$|^KILL_WAIT=[0-9]", "first"),
    ("event loop starts", r"^say 'supervising", "first"),
    ("web launched", r"^launch 0$", "first"),
    ("first readiness probe", r"run_probe 0$|exec \{?[A-Z_0-9]*\}?<>/dev/tcp/|^curl ", "first"),
    ("web ready", r"^mark_ready 0$", "first"),
    ("worker launched", r"^launch 1$", "first"),
    ("worker exit noticed", r"^service_exited 1 ", "first"),
    ("teardown starts", r"^finish completed ", "first"),
    ("web's step signalled (scancel)", r"^scancel ", "first"),
    ("web's exit noticed", r"^wait [0-9]+$", "last"),
    ("final state.json written", r"^mv -f .*state\.json", "last"),
    ("script exits", r"^exit [0-9]+$", "last"),
]
LINE = re.compile(r"^\++(\d+\.\d+) (.*)$")


def milestones(trace_text):
    """{label: epoch seconds} of the MILESTONES found in a trace."""
    found = {}
    for raw in trace_text.splitlines():
        match = LINE.match(raw)
        if not match:
            continue
        stamp, command = float(match.group(1)), match.group(2)
        for label, pattern, which in MILESTONES:
            if re.search(pattern, command) and (which == "last" or label not in found):
                found[label] = stamp
    return found


def one_run(readiness, iterations, keep):
    port = free_port()
    files = {"worker.py": WORKER, "www/message.txt": "hello from the benchmark\n" * 100}
    root = make_project("trace", files)
    values = {"root": root, "python": sys.executable, "port": port, "iterations": iterations}
    compose = COMPOSE.format(**values)
    if readiness == "tcp":
        compose = re.sub(r"type: http\n\s+url: \S+", "type: tcp\n      port: %d" % port, compose)
    try:
        with open(os.path.join(root, "compose.yaml"), "w") as handle:
            handle.write(compose)
        script = subprocess.run([sys.executable, os.path.join(REPO, "hpc_compose.py"), "render", "-f",
                                 os.path.join(root, "compose.yaml")], cwd=root, check=True,
                                stdout=subprocess.PIPE, universal_newlines=True).stdout
        script = script.replace("set -euo pipefail\n", "set -euo pipefail\n" + TRACE_ON, 1)
        path = os.path.join(root, "traced.sbatch")
        with open(path, "w") as handle:
            handle.write(script)
        job_id = sbatch(path, root)
        state = wait_for_job(job_id, timeout=600)
        start, end, _ = job_times(job_id)
        with open(os.path.join(root, "trace.%s" % job_id), errors="replace") as handle:
            found = milestones(handle.read())
        found["job complete (slurmctld)"] = end
        if keep:
            print("  kept %s" % root)
        return job_id, state, {label: stamp - start for label, stamp in found.items()}
    finally:
        if not keep:
            remove_project(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--readiness", choices=("tcp", "http"), default="tcp")
    parser.add_argument("--iterations", type=int, default=2000000)
    parser.add_argument("--keep", action="store_true", help="keep the project folders and traces")
    args = parser.parse_args()
    require_cluster()
    runs = []
    for _ in range(args.repeat):
        job_id, state, offsets = one_run(args.readiness, args.iterations, args.keep)
        print("  job %s %s" % (job_id, state))
        runs.append(offsets)
    labels = [label for label, _, _ in MILESTONES] + ["job complete (slurmctld)"]
    print("milestones of the batch script, seconds after slurmctld's Allocate (median of %d, %s "
          "readiness):" % (len(runs), args.readiness))
    previous = None
    for label in labels:
        values = [run[label] for run in runs if label in run]
        if not values:
            continue
        value = median(values)
        step = "" if previous is None else "(+%.3f)" % (value - previous)
        print("  %7.3f %-9s %s" % (value, step, label))
        previous = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
