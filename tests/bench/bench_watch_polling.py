#!/usr/bin/env python3
"""Scheduler calls per minute made by `hpc_compose.py submit --watch` while it follows a job.

A folder of counting wrappers is put first on PATH: `squeue`, `sacct`, `sstat`, `scontrol`,
`sinfo` and `sbatch` there each append one line (tool, time, caller) to a counter file and then
exec the real binary, so the tool runs exactly as it would. Calls made from inside the job (the
batch script inherits PATH) are counted apart from the client's: the wrapper sees SLURM_JOB_ID.

The job is one host-runtime service that prints a line every few seconds for DURATION seconds
and exits 0. Printed: calls per tool, per minute of the watch, the overall rate, the gaps
between consecutive client squeue/sacct calls (the back-off), and the count `--format json`
itself reports (`scheduler_calls`) as a cross-check. Nothing is asserted.

Usage: python3 tests/bench/bench_watch_polling.py [--duration 150]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import TOOL_PATH, make_project, remove_project, require_cluster  # noqa: E402

TOOLS = ("squeue", "sacct", "sstat", "scontrol", "sinfo", "sbatch", "scancel")

WRAPPER = '''#!/bin/sh
# Counting stand-in: records the call, then runs the real {name}.
printf '%s %s %s\\n' {name} "$(date +%s.%N)" "${{SLURM_JOB_ID:+job}}${{SLURM_JOB_ID:-client}}" >> {log}
exec {real} "$@"
'''

COMPOSE = '''\
name: bench-polling
x-slurm:
  job_name: bench-polling
  runtime: host
  time: "00:{minutes:02d}:00"
  nodes: 1
services:
  ticker:
    command: 'for i in $(seq 1 {ticks}); do echo "tick $i"; sleep {every}; done'
'''


def make_wrappers(folder, log):
    os.makedirs(folder)
    found = []
    for name in TOOLS:
        real = shutil.which(name)
        if real is None:
            continue
        path = os.path.join(folder, name)
        with open(path, "w") as handle:
            handle.write(WRAPPER.format(name=name, log=log, real=real))
        os.chmod(path, 0o755)
        found.append(name)
    return found


def read_calls(log):
    calls = []
    if os.path.exists(log):
        with open(log) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3:
                    calls.append((parts[0], float(parts[1]), "job" if parts[2].startswith("job") else "client"))
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=150, help="seconds the job runs (default 150)")
    parser.add_argument("--every", type=int, default=5, help="seconds between the job's log lines")
    args = parser.parse_args()
    require_cluster()
    ticks = max(1, args.duration // args.every)
    root = make_project("polling", {"compose.yaml": COMPOSE.format(
        minutes=min(59, args.duration // 60 + 5), ticks=ticks, every=args.every)})
    log = os.path.join(root, "calls.log")
    try:
        make_wrappers(os.path.join(root, "bin"), log)
        env = dict(os.environ)
        env["PATH"] = os.path.join(root, "bin") + os.pathsep + env.get("PATH", "")
        started = time.time()
        proc = subprocess.run([sys.executable, TOOL_PATH, "submit", "--watch", "--format", "json",
                               "-f", os.path.join(root, "compose.yaml")],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=args.duration + 600)
        finished = time.time()
        try:
            reported = json.loads(proc.stdout)
        except ValueError:
            reported = {}
        calls = read_calls(log)
    finally:
        remove_project(root)

    elapsed = finished - started
    client = [c for c in calls if c[2] == "client"]
    inside = [c for c in calls if c[2] == "job"]
    print("submit --watch of a %d s job: exit %d, watched %.1f s, job %s %s"
          % (args.duration, proc.returncode, elapsed, reported.get("job_id", "?"),
             (reported.get("scheduler") or {}).get("state", reported.get("reason", ""))))
    if proc.returncode != 0:
        print("  stderr tail: %s" % proc.stderr[-800:])
    print("client calls by tool: %s" % (", ".join(
        "%s %d" % (name, sum(1 for c in client if c[0] == name)) for name in TOOLS
        if any(c[0] == name for c in client)) or "none"))
    if inside:
        print("calls from inside the job (batch script): %s" % ", ".join(
            "%s %d" % (name, sum(1 for c in inside if c[0] == name)) for name in TOOLS
            if any(c[0] == name for c in inside)))
    polls = sorted(c[1] for c in client if c[0] in ("squeue", "sacct", "sstat", "scontrol"))
    minutes = int(elapsed // 60) + 1
    per_minute = [sum(1 for t in polls if started + 60 * m <= t < started + 60 * (m + 1))
                  for m in range(minutes)]
    print("client status queries (squeue/sacct/sstat/scontrol) per minute of the watch: %s"
          % ", ".join("min %d: %d" % (m + 1, n) for m, n in enumerate(per_minute)))
    if elapsed > 0:
        print("overall: %d queries in %.1f s = %.1f per minute"
              % (len(polls), elapsed, 60.0 * len(polls) / elapsed))
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    if gaps:
        print("gaps between consecutive queries (s): %s" % " ".join("%.1f" % g for g in gaps))
    if "scheduler_calls" in reported:
        print("the tool's own count (--format json scheduler_calls): %s" % reported["scheduler_calls"])
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
