#!/usr/bin/env python3
"""Latency of `hpc-compose exec` into a running Pyxis service against a bare Pyxis exec step.

  bare  srun --jobid=J --overlap --nodes=1 --ntasks=1 --nodelist=NODE
             --container-name=NAME:exec true          (what Pyxis alone costs)
  tool  python3 hpc_compose.py exec -T app -- true    (record and state.json reads, one
                                                      squeue call, the same srun, and the in-step
                                                      script that copies the service's environment)

Both join the same running container of one job; runs alternate bare/tool, one at a time, and the
figures are the medians and their ratio (the issue asks for at most 1.5x). Nothing is asserted.

The job gets its own Enroot data path through XDG_DATA_HOME and one node (see the note at the top
of tests/test_exec_e2e.py: the multi-node test cluster's bind-mounted data paths hide container
names from `enroot list -f`).

Usage: python3 tests/bench/bench_exec.py [--repeat 15]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (  # noqa: E402
    fmt_seconds, make_project, median, remove_project, require_cluster, submit_tool)

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "hpc_compose.py")
CACHE = os.path.join(os.environ.get("HPC_COMPOSE_TEST_CACHE", "/opt/hpc-compose-tests"))
IMAGE = os.path.join(CACHE, "test-image.sqsh")

COMPOSE = """\
name: bench-exec
x-slurm: {time: "00:10:00", cache_dir: %s, submit_args: ["--nodelist=%s"]}
services:
  app:
    image: %s
    environment: {GREETING: hello}
    command: echo up && exec sleep 600
"""


def timed(argv, env, cwd):
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (argv[:3], proc.returncode, proc.stderr))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    require_cluster()
    if not os.path.isfile(IMAGE):
        sys.exit("benchmark needs the test image %s (slurm-cluster.sh up --containers)" % IMAGE)
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.split()[0]
    data_home = os.path.join(CACHE, "e2e-cache", "bench-exec-%d" % os.getpid())
    os.makedirs(os.path.join(data_home, "enroot"))
    env = dict(os.environ, XDG_DATA_HOME=data_home)
    project = make_project("exec", {"compose.yaml": COMPOSE % (
        os.path.join(CACHE, "e2e-cache"), node, IMAGE)})
    job_id = None
    try:
        job_id = submit_tool(project, env=env)
        log = os.path.join(project, ".hpc-compose", job_id, "logs", "app.log")
        deadline = time.monotonic() + 300
        while not (os.path.exists(log) and "up" in open(log).read()):
            if time.monotonic() > deadline:
                raise RuntimeError("the service never started (%s)" % log)
            time.sleep(0.5)
        with open(os.path.join(project, ".hpc-compose", "jobs", job_id + ".json")) as handle:
            name = json.load(handle)["services"][0]["container_name"]
        bare = ["srun", "--jobid=" + job_id, "--overlap", "--nodes=1", "--ntasks=1",
                "--nodelist=" + node, "--container-name=%s:exec" % name, "true"]
        tool = [sys.executable, TOOL, "exec", "-T", "app", "--", "true"]
        timed(bare, env, project)   # warm both paths once
        timed(tool, env, project)
        bare_times, tool_times = [], []
        for _ in range(args.repeat):
            bare_times.append(timed(bare, env, project))
            tool_times.append(timed(tool, env, project))
        b, t = median(bare_times), median(tool_times)
        print("exec latency, %d runs each, job %s on %s (median)" % (args.repeat, job_id, node))
        print("  bare srun --container-name=NAME:exec true  %s" % fmt_seconds(b))
        print("  hpc-compose exec -T app -- true            %s" % fmt_seconds(t))
        print("  ratio tool/bare                            %.2fx" % (t / b))
    finally:
        if job_id:
            subprocess.run(["scancel", job_id], timeout=30)
            time.sleep(5)
        remove_project(project)
        shutil.rmtree(data_home, ignore_errors=True)


if __name__ == "__main__":
    main()
