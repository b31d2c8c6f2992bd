#!/usr/bin/env python3
"""`status` of a job array with many tasks: wall time and scheduler calls, against one call per task.

Submits a host-runtime array of TASKS tasks (default 200; each task runs `true`) and times
`hpc_compose.py status` three times: right after the submission (tasks pending), while tasks run
and finish (squeue and sacct both answer), and after every task ended (sacct alone). A folder of
counting wrappers first on PATH (stand-ins that record the call, then exec the real squeue and
sacct) counts the scheduler calls each `status` makes. The baseline, measured in the same run,
is the design `status` avoids: one `squeue -j <array>_<task>` per task. Printed: seconds per
status, its calls, the baseline's seconds, and the ratio. Nothing is asserted.

Usage: python3 tests/bench/bench_array_status.py [--tasks 200]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (TOOL_PATH, counting_wrappers, make_project,  # noqa: E402
                           remove_project, require_cluster)

COMPOSE = '''\
name: bench-array
x-slurm:
  job_name: bench-array
  runtime: host
  time: "00:02:00"
  cpus_per_task: 1
  mem: 64M
  array: "0-{last}"
services:
  work:
    command: ["true"]
'''


def timed_status(project, env, log):
    open(log, "w").close()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, TOOL_PATH, "status", "-f",
                           os.path.join(project, "compose.yaml"), "--format", "json"],
                          cwd=project, env=env, stdout=subprocess.PIPE, universal_newlines=True)
    seconds = time.monotonic() - start
    with open(log) as handle:
        calls = handle.read().split()
    states = json.loads(proc.stdout)["states"]
    return seconds, {name: calls.count(name) for name in ("squeue", "sacct")}, states


def per_task_baseline(job_id, tasks):
    start = time.monotonic()
    for task in range(tasks):
        subprocess.run(["squeue", "-h", "-j", "%s_%d" % (job_id, task), "-o", "%T"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    require_cluster()
    project = make_project("array", {"compose.yaml": COMPOSE.format(last=args.tasks - 1)})
    log = os.path.join(project, "calls.log")
    counting_wrappers(os.path.join(project, "bin"), log)
    env = dict(os.environ, PATH=os.path.join(project, "bin") + os.pathsep + os.environ["PATH"])
    job_id = None
    try:
        proc = subprocess.run([sys.executable, TOOL_PATH, "submit", "-f",
                               os.path.join(project, "compose.yaml"), "--format", "json"],
                              cwd=project, stdout=subprocess.PIPE, universal_newlines=True)
        job_id = str(json.loads(proc.stdout)["job_id"])
        print("array job %s: %d tasks" % (job_id, args.tasks))
        moments = [("just submitted", 0)]
        rows = []
        for label, _ in moments:
            rows.append((label,) + timed_status(project, env, log))
        baseline = per_task_baseline(job_id, args.tasks)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            seconds, calls, states = timed_status(project, env, log)
            done = sum(n for state, n in states.items() if state not in ("PENDING", "RUNNING",
                                                                         "CONFIGURING", "COMPLETING"))
            if 0 < done < args.tasks and len(rows) == 1:
                rows.append(("tasks running and ended", seconds, calls, states))
            if done == args.tasks:
                rows.append(("every task ended", seconds, calls, states))
                break
            time.sleep(5)
        print("baseline: one squeue per task: %.2f s for %d calls" % (baseline, args.tasks))
        for label, seconds, calls, states in rows:
            print("status, %-24s %.2f s, %d squeue + %d sacct call(s), %.0fx faster than the "
                  "baseline; states %s" % (label + ":", seconds, calls["squeue"], calls["sacct"],
                                          baseline / seconds if seconds else 0.0, states))
    finally:
        if job_id:
            subprocess.run(["scancel", job_id])
        remove_project(project)


if __name__ == "__main__":
    main()
