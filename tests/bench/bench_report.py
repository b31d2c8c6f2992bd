#!/usr/bin/env python3
"""Cost of `report` (and of `status --timeline`) for a large job, against reading its files.

A synthetic job directory: SERVICES services, a timeline.jsonl of LINES state changes (each
service restarting now and then), and a metrics sampler that ran for HOURS hours every 5 s
(slurm.jsonl, one row per service step per sample; the last 16 MB are read). Measured in one run,
best of ROUNDS:

- baseline: reading and json-parsing every line of timeline.jsonl and slurm.jsonl (the floor any
  reader of these files pays);
- timeline: building the timeline and drawing it as text (`status --timeline`);
- report: the whole page (timeline, charts, logs) as `report` writes it, without the scheduler.

It prints the seconds and the ratios to the baseline, and the page's size. Nothing is asserted.

Usage: python3 tests/bench/bench_report.py [--services 20] [--lines 5000] [--hours 8] [--rounds 3]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

import hpc_compose  # noqa: E402

STATUSES = ("starting", "ready", "running", "restarting")


def make_job(root, services, lines, hours):
    job_dir = os.path.join(root, ".hpc-compose", "777")
    os.makedirs(os.path.join(job_dir, "logs"))
    os.makedirs(os.path.join(job_dir, "metrics"))
    names = ["service-%02d" % i for i in range(services)]
    start = 1796559267000
    launches = [0] * services
    with open(os.path.join(job_dir, "timeline.jsonl"), "w") as handle:
        for line in range(lines):
            row = []
            for index in range(services):
                if (line + index) % 97 == 0:
                    launches[index] += 1
                row.append([STATUSES[(line // 7 + index) % 4], launches[index], None])
            handle.write(json.dumps({"at_ms": start + line * 2000, "status": "running",
                                     "exit_code": None, "services": row}) + "\n")
    with open(os.path.join(job_dir, "metrics", "slurm.jsonl"), "w") as handle:
        for sample in range(hours * 720):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000 + sample * 5))
            for index in range(services):
                handle.write(json.dumps({
                    "sampled_at": stamp, "step_id": "777.%d" % index, "ntasks": "1",
                    "ave_cpu": "%02d:%02d:%02d" % (sample // 720, sample // 12 % 60, sample % 60),
                    "ave_rss": str(1048576 * (10 + index + sample % 50)), "max_rss": "1",
                    "tres_usage_in_ave": ""}) + "\n")
    for name in names:
        with open(os.path.join(job_dir, "logs", name + ".log"), "w") as handle:
            handle.write("".join("line %d of %s\n" % (i, name) for i in range(2000)))
    with open(os.path.join(job_dir, "state.json"), "w") as handle:
        json.dump({"status": "running", "services": [{"name": n, "token": n} for n in names]},
                  handle)
    return {"job_id": "777", "job_dir": job_dir, "local": "machine", "job_name": "bench",
            "project_dir": root, "submitted_at": start / 1000.0,
            "services": [{"name": n, "token": n, "log_path": os.path.join(job_dir, "logs",
                                                                         n + ".log")}
                         for n in names]}


def best(rounds, work):
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - began)
    return min(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--hours", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-report-")
    try:
        record = make_job(root, args.services, args.lines, args.hours)
        job_dir = record["job_dir"]

        def baseline():
            count = 0
            for name in ("timeline.jsonl", os.path.join("metrics", "slurm.jsonl")):
                with open(os.path.join(job_dir, name)) as handle:
                    count += sum(1 for line in handle if json.loads(line))
            return count

        def timeline():
            state = hpc_compose._load_runtime_state(job_dir)
            built = hpc_compose._build_timeline(hpc_compose._load_timeline_records(job_dir), state,
                                                int(time.time() * 1000))
            return hpc_compose._format_timeline_text(built)

        def report():
            return hpc_compose._format_report_html(*hpc_compose._collect_report(record))

        floor, rows = best(args.rounds, baseline)
        text_seconds, _ = best(args.rounds, timeline)
        page_seconds, page = best(args.rounds, report)
        print("job: %d services, %d timeline lines, %d sampler rows (%.1f MB)" % (
            args.services, args.lines, rows - args.lines,
            os.path.getsize(os.path.join(job_dir, "metrics", "slurm.jsonl")) / 1e6))
        print("baseline (parse every line): %.3f s" % floor)
        print("status --timeline:           %.3f s  (%.2fx baseline)" % (
            text_seconds, text_seconds / floor))
        print("report:                      %.3f s  (%.2fx baseline), page %.0f KB" % (
            page_seconds, page_seconds / floor, len(page.encode("utf-8")) / 1e3))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
