#!/usr/bin/env python3
"""`sweep status` of a 200-task sweep: scheduler calls and wall time, against one call per task.

Submits a host-runtime x-sweep of TASKS tasks (default 200: a 50 x 2 matrix with 2 replicates;
each task writes a one-line result.json), then, once every task has ended, retries 20 of them with
`sweep retry --tasks`, so the table reads two array jobs. `hpc_compose.py sweep status` is timed
right after the submission (tasks pending), while tasks run and end, after every task ended, and
after the retry ended. A folder of counting wrappers first on PATH (stand-ins that record the
call, then exec the real squeue and sacct) counts the scheduler calls each `sweep status` makes.
The baseline, measured in the same run, is the design `sweep status` avoids: one
`sacct -j <array>_<task>` per task. Printed: seconds per status, its calls, the baseline's
seconds, and the ratio. Nothing is asserted.

Usage: python3 tests/bench/bench_sweep_status.py [--tasks 200]
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
name: bench-sweep
x-slurm:
  job_name: bench-sweep
  runtime: host
  time: "00:02:00"
  cpus_per_task: 1
  mem: 64M
x-sweep:
  matrix:
    lr: [{values}]
    model: [small, large]
  replicates: 2
services:
  work:
    command: >-
      printf '{{"loss": %s}}' "$HPC_COMPOSE_SWEEP_INDEX" > "$HPC_COMPOSE_JOB_DIR/result.json"
'''

ENDED = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN")


def timed_status(project, env, log):
    open(log, "w").close()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, TOOL_PATH, "sweep", "status", "-f",
                           os.path.join(project, "compose.yaml"), "--format", "json"],
                          cwd=project, env=env, stdout=subprocess.PIPE, universal_newlines=True)
    seconds = time.monotonic() - start
    with open(log) as handle:
        calls = handle.read().split()
    data = json.loads(proc.stdout)
    return seconds, {name: calls.count(name) for name in ("squeue", "sacct")}, data


def per_task_baseline(job_id, tasks):
    start = time.monotonic()
    for task in range(tasks):
        subprocess.run(["sacct", "-n", "-X", "-P", "-j", "%s_%d" % (job_id, task),
                        "--format=JobID,State,ExitCode,Elapsed,NodeList"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def wait_until_ended(project, env, log, rows, label, deadline):
    while time.monotonic() < deadline:
        seconds, calls, data = timed_status(project, env, log)
        done = sum(n for state, n in data["states"].items() if state not in ENDED)
        if 0 < done < data["task_count"] and not any(r[0] == "tasks running and ended"
                                                     for r in rows):
            rows.append(("tasks running and ended", seconds, calls, data["states"]))
        if done == data["task_count"] and all(
                row["state"] not in ENDED for row in data["tasks"]):
            rows.append((label, seconds, calls, data["states"]))
            return data
        time.sleep(5)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    require_cluster()
    values = ", ".join("%g" % (0.001 * (n + 1)) for n in range(max(1, args.tasks // 4)))
    project = make_project("sweep", {"compose.yaml": COMPOSE.format(values=values)})
    log = os.path.join(project, "calls.log")
    counting_wrappers(os.path.join(project, "bin"), log)
    env = dict(os.environ, PATH=os.path.join(project, "bin") + os.pathsep + os.environ["PATH"])
    job_ids = []
    try:
        proc = subprocess.run([sys.executable, TOOL_PATH, "submit", "-f",
                               os.path.join(project, "compose.yaml"), "--format", "json"],
                              cwd=project, stdout=subprocess.PIPE, universal_newlines=True)
        job_ids.append(str(json.loads(proc.stdout)["job_id"]))
        seconds, calls, data = timed_status(project, env, log)
        tasks = data["task_count"]
        print("sweep job %s: %d tasks" % (job_ids[0], tasks))
        rows = [("just submitted", seconds, calls, data["states"])]
        deadline = time.monotonic() + 900
        wait_until_ended(project, env, log, rows, "every task ended", deadline)
        retry = subprocess.run([sys.executable, TOOL_PATH, "sweep", "retry", "--tasks",
                                "0-19", "-f", os.path.join(project, "compose.yaml"),
                                "--format", "json"], cwd=project, stdout=subprocess.PIPE,
                               universal_newlines=True)
        job_ids.append(str(json.loads(retry.stdout)["job_id"]))
        wait_until_ended(project, env, log, rows, "after a 20-task retry", deadline)
        baseline = per_task_baseline(job_ids[0], tasks)
        print("baseline: one sacct per task: %.2f s for %d calls" % (baseline, tasks))
        for label, seconds, calls, states in rows:
            print("sweep status, %-24s %.2f s, %d squeue + %d sacct call(s), %.0fx faster than "
                  "the baseline; states %s" % (label + ":", seconds, calls["squeue"],
                                              calls["sacct"], baseline / seconds if seconds
                                              else 0.0, states))
    finally:
        for job_id in job_ids:
            subprocess.run(["scancel", job_id])
        remove_project(project)


if __name__ == "__main__":
    main()
