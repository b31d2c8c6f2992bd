#!/usr/bin/env python3
"""Latency of `hpc-compose exec` into a running Pyxis service against a bare Pyxis exec step.

  bare    srun --jobid=J --overlap --nodes=1 --ntasks=1 --nodelist=NODE
               --container-name=NAME:exec true     (what Pyxis alone costs: the issue's baseline)
  step    the srun argv `exec` builds, run directly   (bare + the in-step script that copies the
                                                     service's environment and working directory)
  pyz     python3 hpc-compose.pyz exec -T app -- true (the installed form: install.sh installs the
                                                     zipapp, whose bytecode is precompiled)
  script  python3 hpc_compose.py exec -T app -- true  (a checkout run as a script: Python compiles
                                                     the whole source at every run)

All four join the same running container of one job; runs go round-robin, one at a time, and the
figures are medians and their ratios to bare (issue 26 asks for exec within 1.3x). `python -c
pass` and `--version` of both forms are timed too, to show where the difference goes. Nothing is
asserted.

Usage: python3 tests/bench/bench_exec.py [--repeat 15]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (  # noqa: E402
    REPO, build_pyz, end_benchmark, fmt_seconds, make_project, median, require_cluster,
    submit_tool)

sys.path.insert(0, REPO)
import hpc_compose  # noqa: E402  (the srun argv exec builds)

TOOL = os.path.join(REPO, "hpc_compose.py")
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
    env = dict(os.environ)
    python = os.path.realpath(sys.executable)  # not a pyenv shim, whose start-up is a bash script
    project = make_project("exec", {"compose.yaml": COMPOSE % (
        os.path.join(CACHE, "e2e-cache"), node, IMAGE)})
    job_id = None
    try:
        pyz = build_pyz(project)
        job_id = submit_tool(project, env=env)
        log = os.path.join(project, ".hpc-compose", job_id, "logs", "app.log")
        deadline = time.monotonic() + 300
        while not (os.path.exists(log) and "up" in open(log).read()):
            if time.monotonic() > deadline:
                raise RuntimeError("the service never started (%s)" % log)
            time.sleep(0.5)
        with open(os.path.join(project, ".hpc-compose", "jobs", job_id + ".json")) as handle:
            name = json.load(handle)["services"][0]["container_name"]
        target = hpc_compose._ExecTarget(job_id, "app", "pyxis", node, name)
        runs = [
            ("bare", "bare srun --container-name=NAME:exec true",
             ["srun", "--jobid=" + job_id, "--overlap", "--nodes=1", "--ntasks=1",
              "--nodelist=" + node, "--container-name=%s:exec" % name, "true"]),
            ("step", "the srun argv exec builds (+ in-step script)",
             hpc_compose._exec_srun_argv(target, ["true"])),
            ("pyz", "python3 hpc-compose.pyz exec -T app -- true",
             [python, pyz, "exec", "-T", "app", "--", "true"]),
            ("script", "python3 hpc_compose.py exec -T app -- true",
             [python, TOOL, "exec", "-T", "app", "--", "true"]),
            ("python", "python3 -c pass", [python, "-c", "pass"]),
            ("pyz-version", "python3 hpc-compose.pyz --version", [python, pyz, "--version"]),
            ("script-version", "python3 hpc_compose.py --version", [python, TOOL, "--version"]),
        ]
        for _, _, argv in runs:   # warm every path once
            timed(argv, env, project)
        times = {key: [] for key, _, _ in runs}
        for _ in range(args.repeat):
            for key, _, argv in runs:
                times[key].append(timed(argv, env, project))
        medians = {key: median(values) for key, values in times.items()}
        bare = medians["bare"]
        print("exec latency, %d runs each, job %s on %s, %s (median)"
              % (args.repeat, job_id, node, python))
        for key, label, _ in runs:
            ratio = "  %.2fx bare" % (medians[key] / bare) if key in ("step", "pyz", "script") else ""
            print("  %-46s %s%s" % (label, fmt_seconds(medians[key]), ratio))
        print("ratio exec/bare: installed (pyz) %.2fx, script %.2fx (issue 26 asks for <= 1.3x)"
              % (medians["pyz"] / bare, medians["script"] / bare))
    finally:
        end_benchmark(job_id, project)


if __name__ == "__main__":
    main()
