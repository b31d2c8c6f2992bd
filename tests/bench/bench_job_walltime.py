#!/usr/bin/env python3
"""Job wall time of a host-runtime hpc-compose stack against a hand-written sbatch doing the same work.

The work, identical on both sides and run by the same interpreter:
  web     python -m http.server serving a file (readiness: HTTP 200 on that file)
  worker  waits for web, fetches the file, hashes it ITERATIONS times (CPU work), prints the digest

  tool    hpc_compose.py submit of a compose file (host runtime, service_healthy, http readiness):
          the supervisor, state.json, probes and teardown the tool generates
  hand    a minimal sbatch script: srun --overlap the server in the background, a curl loop until
          it answers, srun the worker, kill the server (no state, no logs per service, no teardown
          logic beyond one kill)

Wall time = slurmctld's "Allocate" to "_job_complete done" of each job (millisecond log stamps), so
scheduler queueing and client polling are left out. Runs alternate tool/hand, one job at a time;
the figures are the medians and their ratio. Nothing is asserted.

Usage: python3 tests/bench/bench_job_walltime.py [--repeat 5] [--iterations 2000000]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster_bench import (  # noqa: E402
    fmt_seconds, free_port, job_times, make_project, median, remove_project, require_cluster,
    sbatch, submit_tool, wait_for_job)

WORKER = r'''
import hashlib
import sys
import urllib.request

url, iterations = sys.argv[1], int(sys.argv[2])
with urllib.request.urlopen(url, timeout=30) as response:
    data = response.read()
digest = data
for _ in range(iterations):
    digest = hashlib.sha256(digest).digest()
print("fetched %d bytes, digest %s" % (len(data), digest.hex()), flush=True)
'''

COMPOSE = '''\
name: bench-walltime
x-slurm:
  job_name: bench-tool
  runtime: host
  time: "00:10:00"
  nodes: 1
services:
  web:
    working_dir: {root}/www
    command: ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    readiness:
      type: http
      url: http://127.0.0.1:{port}/message.txt
      timeout_seconds: 60
  worker:
    depends_on:
      web:
        condition: service_healthy
    command: ["{python}", "{root}/worker.py", "http://127.0.0.1:{port}/message.txt", "{iterations}"]
'''

HAND = '''\
#!/bin/bash
#SBATCH --job-name=bench-hand
#SBATCH --time=00:10:00
#SBATCH --nodes=1
#SBATCH --output=hand-%j.out
url=http://127.0.0.1:{port}/message.txt
srun --overlap --ntasks=1 --chdir={root}/www {python} -m http.server {port} --bind 127.0.0.1 \\
    > {root}/web.log 2>&1 &
web=$!
for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "$url" && break
    sleep 0.1
done
srun --overlap --ntasks=1 {python} {root}/worker.py "$url" {iterations} > {root}/worker.log 2>&1
rc=$?
kill "$web" 2>/dev/null
wait "$web" 2>/dev/null
exit "$rc"
'''


def one_run(kind, iterations):
    port = free_port()
    files = {"worker.py": WORKER, "www/message.txt": "hello from the benchmark\n" * 100}
    root = make_project(kind, files)
    values = {"root": root, "python": sys.executable, "port": port, "iterations": iterations}
    try:
        if kind == "tool":
            with open(os.path.join(root, "compose.yaml"), "w") as handle:
                handle.write(COMPOSE.format(**values))
            job_id = submit_tool(root)
        else:
            path = os.path.join(root, "hand.sbatch")
            with open(path, "w") as handle:
                handle.write(HAND.format(**values))
            job_id = sbatch(path, root)
        state = wait_for_job(job_id, timeout=600)
        start, end, source = job_times(job_id)
        return job_id, state, end - start, source
    finally:
        remove_project(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="pairs of runs (default 5)")
    parser.add_argument("--iterations", type=int, default=2000000,
                        help="sha256 rounds of the worker (default 2000000, about 1 s)")
    args = parser.parse_args()
    require_cluster()
    times = {"tool": [], "hand": []}
    print("job wall time: hpc-compose host stack vs hand-written sbatch (%d pairs, %d rounds)"
          % (args.repeat, args.iterations))
    for index in range(args.repeat):
        # Alternate who goes first so a slow spell of the machine hits both sides alike.
        order = ("tool", "hand") if index % 2 == 0 else ("hand", "tool")
        for kind in order:
            job_id, state, seconds, source = one_run(kind, args.iterations)
            print("  run %d %-4s job %-6s %-10s %s  (%s)" % (index + 1, kind, job_id, state,
                                                            fmt_seconds(seconds), source))
            if state != "COMPLETED":
                print("  !! %s job %s ended %s: its time is left out" % (kind, job_id, state))
                continue
            times[kind].append(seconds)
    if not times["tool"] or not times["hand"]:
        print("not enough completed runs to compare")
        return 1
    tool, hand = median(times["tool"]), median(times["hand"])
    print("median wall time  tool %s   hand %s" % (fmt_seconds(tool), fmt_seconds(hand)))
    print("overhead of the tool per job: %+.3f s; ratio tool/hand: %.2f" % (tool - hand, tool / hand))
    return 0


if __name__ == "__main__":
    sys.exit(main())
