#!/usr/bin/env python3
"""Readiness latency: time from a server's port opening to the launch of the service waiting on it.

Each run is one hpc-compose job (host runtime) with two services:
  server     sleeps DELAY seconds (so the first probes fail), then listens on a free port, writes
             time.time() to $HPC_COMPOSE_JOB_DIR/port_open (the instant listen() returned), prints
             "server listening" and serves HTTP
  dependent  depends_on server: service_healthy; its first instruction writes `date +%s.%N` to
             $HPC_COMPOSE_JOB_DIR/dependent_start, then it exits 0 (which ends the job)

latency = dependent_start - port_open, for each readiness type of the server (tcp, http, log).
It includes the probe interval, the supervisor noticing, and the `srun` step launch of the
dependent. The step launch alone is measured in the same run by a plain sbatch job timing
`srun --overlap sh -c 'date +%s.%N'` from the line before it ("srun launch" below), so
latency - srun launch is what the tool's probing costs. Nothing is asserted.

Usage: python3 tests/bench/bench_readiness_latency.py [--repeat 3] [--delay 1.5] [--types tcp,http,log]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (  # noqa: E402
    free_port, make_project, median, remove_project, require_cluster, sbatch, submit_tool,
    wait_for_job)

SERVER = r'''
import http.server
import os
import sys
import time

port, delay = int(sys.argv[1]), float(sys.argv[2])
job_dir = os.environ["HPC_COMPOSE_JOB_DIR"]
time.sleep(delay)
server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
opened = time.time()
with open(os.path.join(job_dir, "port_open.tmp"), "w") as handle:
    handle.write("%.6f\n" % opened)
os.rename(os.path.join(job_dir, "port_open.tmp"), os.path.join(job_dir, "port_open"))
print("server listening on %d" % port, flush=True)
server.serve_forever()
'''

READINESS = {
    "tcp": "      type: tcp\n      host: 127.0.0.1\n      port: {port}\n",
    "http": "      type: http\n      url: http://127.0.0.1:{port}/\n",
    "log": "      type: log\n      pattern: server listening\n",
}

COMPOSE = '''\
name: bench-readiness
x-slurm:
  job_name: bench-readiness-{kind}
  runtime: host
  time: "00:05:00"
  nodes: 1
services:
  server:
    command: ["{python}", "{root}/server.py", "{port}", "{delay}"]
    readiness:
{readiness}      timeout_seconds: 60
  dependent:
    depends_on:
      server:
        condition: service_healthy
    command: 'date +%s.%N > "$HPC_COMPOSE_JOB_DIR/dependent_start"'
'''

SRUN_BASELINE = '''\
#!/bin/bash
#SBATCH --job-name=bench-srun-launch
#SBATCH --time=00:05:00
#SBATCH --output=/dev/null
for i in 1 2 3 4 5; do
    before=$(date +%s.%N)
    inside=$(srun --overlap --ntasks=1 sh -c 'date +%s.%N')
    echo "$before $inside" >> {root}/srun_launch.txt
done
'''


def _read_float(path):
    with open(path) as handle:
        return float(handle.read().strip())


def job_dir_of(root, job_id):
    return os.path.join(root, ".hpc-compose", str(job_id))


def one_run(kind, delay):
    port = free_port()
    root = make_project("ready-" + kind, {"server.py": SERVER})
    try:
        with open(os.path.join(root, "compose.yaml"), "w") as handle:
            handle.write(COMPOSE.format(kind=kind, python=sys.executable, root=root, port=port,
                                        delay=delay, readiness=READINESS[kind].format(port=port)))
        job_id = submit_tool(root)
        state = wait_for_job(job_id, timeout=300)
        job_dir = job_dir_of(root, job_id)
        try:
            latency = _read_float(os.path.join(job_dir, "dependent_start")) - \
                _read_float(os.path.join(job_dir, "port_open"))
        except (OSError, ValueError) as exc:
            return job_id, state, None, str(exc)
        return job_id, state, latency, ""
    finally:
        remove_project(root)


def srun_launch_times():
    root = make_project("srun-launch", {})
    try:
        path = os.path.join(root, "baseline.sbatch")
        with open(path, "w") as handle:
            handle.write(SRUN_BASELINE.format(root=root))
        job_id = sbatch(path, root)
        wait_for_job(job_id, timeout=300)
        with open(os.path.join(root, "srun_launch.txt")) as handle:
            pairs = [line.split() for line in handle if line.strip()]
        return [float(inside) - float(before) for before, inside in pairs]
    finally:
        remove_project(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="jobs per readiness type (default 3)")
    parser.add_argument("--delay", type=float, default=1.5,
                        help="seconds the server waits before listening (default 1.5)")
    parser.add_argument("--types", default="tcp,http,log", help="readiness types (default tcp,http,log)")
    args = parser.parse_args()
    require_cluster()
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    launch = srun_launch_times()
    print("readiness latency: port open -> dependent's first instruction (%d jobs per type)" % args.repeat)
    print("  srun launch (plain sbatch, `srun --overlap` to first instruction): median %.3f s  "
          "(min %.3f, max %.3f, %d steps)" % (median(launch), min(launch), max(launch), len(launch)))
    summary = []
    for kind in kinds:
        values = []
        for index in range(args.repeat):
            job_id, state, latency, problem = one_run(kind, args.delay)
            if latency is None:
                print("  %-4s run %d job %s %s: no measurement (%s)" % (kind, index + 1, job_id, state, problem))
                continue
            print("  %-4s run %d job %-6s %-10s latency %.3f s" % (kind, index + 1, job_id, state, latency))
            values.append(latency)
        if values:
            summary.append((kind, median(values), min(values), max(values)))
    print("summary (median, min, max; 'probe' = median latency - median srun launch):")
    for kind, med, low, high in summary:
        print("  %-4s %.3f s  (%.3f .. %.3f)  probe %.3f s" % (kind, med, low, high, med - median(launch)))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
