"""Job tracking against the real Slurm test cluster (tests/cluster/slurm-cluster.sh).

Two kinds of tests:
* the whole product: `up`, `submit`, `status`/`ps`, `logs --follow`, `cancel`/`down` on host-runtime
  compose files (Pyxis is not installed here);
* the tracking pieces on hand-written batch jobs (the metrics sampler block with the real sstat,
  status before/after completion, clean next to a running job), so a failure points at tracking.
"""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import hpc_compose
from slurm_support import (TOOL_PATH, free_port, run_tool_cli, wait_for_job, wait_for_state, sacct_job,
                           job_state)


HOST_COMPOSE = """\
name: {name}
x-slurm:
  job_name: {name}
  runtime: host
  time: "00:05:00"
  cpus_per_task: 1
  mem: 256M
services:
{services}
"""

OK_SERVICES = """\
  server:
    command: >-
      echo server-up && exec python3 -m http.server {port} --bind 127.0.0.1
    readiness:
      type: tcp
      port: {port}
      timeout_seconds: 30
  client:
    depends_on:
      server:
        condition: service_healthy
    command: ["sh", "-c", "for i in 1 2 3; do echo client-line-$$i; sleep 1; done"]
"""

FAILING_SERVICES = """\
  app:
    command: "echo about-to-fail; exit 7"
"""

# String-form commands are not interpolated (list items are), so `$i` reaches the shell as is.
SLOW_SERVICES = """\
  ticker:
    command: "i=0; while [ $i -lt {count} ]; do i=$((i+1)); echo tick-$i; sleep 1; done"
"""


def write_compose(tmp_path, services, name="trk", filename="compose.yaml"):
    path = tmp_path / filename
    path.write_text(HOST_COMPOSE.format(name=name, services=services))
    return path


def submitted_job_id(text):
    for line in text.splitlines():
        if line.startswith("submitted batch job "):
            return line.split()[3]
    raise AssertionError("no 'submitted batch job' line in: %r" % text)


def final_state(job_dir, timeout=30.0):
    """state.json once it carries a final status (the batch script writes it during teardown)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = hpc_compose._load_runtime_state(str(job_dir))
        if state and state.get("status") in hpc_compose._FINAL_RUNTIME_STATUSES:
            return state
        time.sleep(0.5)
    raise AssertionError("state.json in %s never became final: %r" % (job_dir, state))


def hand_job(tmp_path, body, time_limit="2"):
    """Submit a hand-written batch script from tmp_path; returns the job id."""
    script = tmp_path / "hand.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=%s\n#SBATCH --output=hand-%%j.out\n"
                      "set -euo pipefail\n"
                      'JOB_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/${SLURM_JOB_ID}"\n'
                      'mkdir -p "$JOB_DIR/logs"\n' % time_limit + body)
    result = subprocess.run(["sbatch", "--parsable", str(script)], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return hpc_compose._parse_sbatch_job_id(result.stdout)[0]


# --- the whole product --------------------------------------------------------------------------

def test_up_streams_prefixed_logs_and_exits_zero(slurm, slurm_jobs, tmp_path):
    compose = write_compose(tmp_path, OK_SERVICES.format(port=free_port()))
    result = run_tool_cli(["up", "-f", compose], cwd=tmp_path, timeout=300)
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert "[server] server-up" in lines
    assert ["[client] client-line-%d" % i for i in (1, 2, 3)] == \
        [l for l in lines if l.startswith("[client] client-line")]
    assert "job %s COMPLETED" % job_id in result.out
    record = json.loads((tmp_path / ".hpc-compose" / "jobs" / ("%s.json" % job_id)).read_text())
    assert record["job_id"] == job_id and record["compose_file"] == str(compose)
    assert json.loads((tmp_path / ".hpc-compose" / "latest.json").read_text())["job_id"] == job_id


def test_up_of_the_shipped_host_example_exits_zero_without_an_error_line(slurm, slurm_jobs,
                                                                         tmp_path):
    # The README's first command runs this example: a completed job shows no `error` line.
    example = os.path.join(os.path.dirname(TOOL_PATH), "examples", "host-pipeline.yaml")
    if not os.path.exists(example):
        pytest.fail("examples/host-pipeline.yaml is missing")
    compose = tmp_path / "host-pipeline.yaml"
    # The example's port, 18080, becomes one free now, as its comment tells users to do when
    # 18080 is taken: the suites of two Slurm generations run side by side on one machine.
    text = open(example).read()
    assert text.count("18080") == 4, "the example's port moved; update this test"
    compose.write_text(text.replace("18080", str(free_port())))
    result = run_tool_cli(["up", "-f", compose], cwd=tmp_path, timeout=300)
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert any(l.startswith("[worker] fetched ") for l in lines), result
    # The tool stopped `web` once the worker was done: its own line, not Slurm's error lines...
    stopped = "[web] stopped by hpc-compose after the job's final services ended (SIGTERM)"
    assert stopped in lines, result
    assert lines[-1] == "job %s COMPLETED" % job_id, result
    assert [l for l in (result.out + result.err).splitlines() if "error" in l.lower()] == [], result
    # ... and so does `logs`, while the service's log file keeps Slurm's report of the stop.
    logs = run_tool_cli(["logs", "-f", compose], cwd=tmp_path)
    assert stopped in logs.out.splitlines(), logs
    assert "error" not in logs.out.lower(), logs
    log = _read(tmp_path / ".hpc-compose" / job_id / "logs" / "web.log")
    assert any(l.startswith(("srun: ", "slurmstepd")) for l in log.splitlines()), log


def test_up_of_a_failing_job_exits_one_naming_the_service(slurm, slurm_jobs, tmp_path):
    compose = write_compose(tmp_path, FAILING_SERVICES)
    result = run_tool_cli(["up", "-f", compose], cwd=tmp_path, timeout=300)
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    assert result.code == 1, result
    assert "[app] about-to-fail" in result.out.splitlines()
    error = [l for l in result.err.splitlines() if l.startswith("error: ")]
    assert error and "job %s ended FAILED" % job_id in error[0] and "'app'" in error[0], result


def test_status_reports_squeue_while_running_then_sacct(slurm, slurm_jobs, tmp_path, cli):
    compose = write_compose(tmp_path, SLOW_SERVICES.format(count=8))
    result = run_tool_cli(["submit", "-f", compose], cwd=tmp_path)
    assert result.code == 0, result
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    assert wait_for_state(job_id, ["RUNNING"], timeout=120) == "RUNNING"
    running = run_tool_cli(["ps", "-f", compose, "--format", "json"], cwd=tmp_path)
    assert running.code == 0, running
    status = json.loads(running.out)
    assert status["job_id"] == job_id
    assert (status["scheduler"]["state"], status["scheduler"]["source"]) == ("RUNNING", "squeue")
    assert [s["name"] for s in status["services"]] == ["ticker"]
    assert wait_for_job(job_id, timeout=120) == "COMPLETED"
    done = run_tool_cli(["status", "-f", compose, "--format", "json"], cwd=tmp_path)
    status = json.loads(done.out)
    assert (status["scheduler"]["state"], status["scheduler"]["source"]) == ("COMPLETED", "sacct")
    assert status["scheduler"]["exit_code"] == "0:0"
    assert status["runtime"]["status"] == "completed"
    assert status["services"][0]["log"]["present"]
    text = run_tool_cli(["status", "-f", compose], cwd=tmp_path)
    assert "scheduler:  COMPLETED (sacct)" in text.out
    assert "slurm-%s.out" % job_id in text.out


def test_cancel_of_a_running_job_leaves_a_final_state(slurm, slurm_jobs, tmp_path):
    compose = write_compose(tmp_path, SLOW_SERVICES.format(count=120))
    result = run_tool_cli(["submit", "-f", compose], cwd=tmp_path)
    assert result.code == 0, result
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    job_dir = tmp_path / ".hpc-compose" / job_id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "tick-2" not in _read(job_dir / "logs" / "ticker.log"):
        time.sleep(0.5)
    down = run_tool_cli(["down", "-f", compose], cwd=tmp_path)
    assert down.code == 0, down
    assert "cancelled job: %s" % job_id in down.out
    assert wait_for_job(job_id, timeout=120) == "CANCELLED"
    state = final_state(job_dir)
    assert state["status"] in ("cancelled", "failed")
    assert state["services"][0]["status"] not in ("running", "starting", "waiting")
    # scancel stopped it, not the tool: no note of the tool's, `logs` shows Slurm's own words.
    log = _read(job_dir / "logs" / "ticker.log")
    assert "### hpc-compose: stopping" not in log
    logs = run_tool_cli(["logs", "-f", compose, "--tail", "1000"], cwd=tmp_path)
    assert logs.out.splitlines() == ["[ticker] " + line for line in log.splitlines()], logs


def _read(path):
    try:
        with open(str(path)) as handle:
            return handle.read()
    except OSError:
        return ""


def test_parallel_submits_keep_tracked_metadata_valid(slurm, slurm_jobs, tmp_path):
    compose = write_compose(tmp_path, """\
  quick:
    command: "echo quick"
""")
    procs = [subprocess.Popen([sys.executable, TOOL_PATH, "submit", "-f", str(compose),
                               "--format", "json"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for _ in range(6)]
    job_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        job_ids.append(slurm_jobs.add(json.loads(out)["job_id"]))
    assert len(set(job_ids)) == 6
    for job_id in job_ids:
        record = json.loads((tmp_path / ".hpc-compose" / "jobs" / ("%s.json" % job_id)).read_text())
        assert record["job_id"] == job_id and record["services"][0]["name"] == "quick"
    latest = json.loads((tmp_path / ".hpc-compose" / "latest.json").read_text())
    assert latest["job_id"] in job_ids
    for job_id in job_ids:
        wait_for_job(job_id, timeout=240)


def test_logs_follow_sees_lines_as_they_appear(slurm, slurm_jobs, tmp_path):
    compose = write_compose(tmp_path, SLOW_SERVICES.format(count=6))
    result = run_tool_cli(["submit", "-f", compose], cwd=tmp_path)
    assert result.code == 0, result
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    follower = subprocess.Popen([sys.executable, TOOL_PATH, "logs", "-f", str(compose), "--follow",
                                 "--tail", "0"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                                universal_newlines=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(
        (time.monotonic(), line.rstrip("\n")) for line in follower.stdout))
    reader.start()
    assert wait_for_job(job_id, timeout=120) == "COMPLETED"
    follower.wait(timeout=120)                          # it stops by itself once the job ended
    reader.join(10)
    lines = [line for _, line in seen]
    ticks = [l for l in lines if l.startswith("[ticker] tick-")]
    assert ticks[-1] == "[ticker] tick-6"
    assert ticks == sorted(ticks, key=lambda l: int(l.rsplit("-", 1)[1]))
    times = [t for t, line in seen if line.startswith("[ticker] tick-")]
    # Lines arrived over the job's lifetime, not all at once at the end.
    assert times[-1] - times[0] >= 2.0
    assert follower.returncode == 0


def test_dry_run_writes_the_script_and_does_not_submit(tmp_path, cli):
    compose = write_compose(tmp_path, FAILING_SERVICES)
    result = cli(["submit", "--dry-run", "-f", str(compose)])
    assert result.code == 0, result
    assert "dry run: skipping sbatch" in result.out
    assert (tmp_path / "hpc-compose.sbatch").exists()
    assert not (tmp_path / ".hpc-compose" / "latest.json").exists()


# --- tracking pieces on hand-written jobs -------------------------------------------------------

def test_sampler_block_records_real_sstat_steps_for_stats(slurm, slurm_jobs, tmp_path, cli):
    block = hpc_compose.render_metrics_block(__import__("types").SimpleNamespace(
        plan=__import__("types").SimpleNamespace(slurm=hpc_compose.SlurmSpec(
            metrics=hpc_compose.MetricsSpec(interval_seconds=1, collectors=("slurm",))))))
    job_id = slurm_jobs.add(hand_job(tmp_path, hpc_compose._JSON_STRING_TEMPLATE + block + (
        "metrics_start\n"
        "srun --overlap -n1 python3 -c 'import time\nt=time.time()\nwhile time.time()-t<6: pass'\n"
        "metrics_stop\n")))
    assert wait_for_job(job_id, timeout=120) == "COMPLETED"
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    metrics = tmp_path / ".hpc-compose" / job_id / "metrics"
    rows = [json.loads(l) for l in (metrics / "slurm.jsonl").read_text().splitlines()]
    assert rows and all(r["step_id"] == "%s.0" % job_id for r in rows)
    csv_out = cli(["stats", "-f", str(tmp_path / "compose.yaml"), "--job-id", job_id,
                   "--format", "csv"])
    assert csv_out.code == 0, csv_out
    lines = csv_out.out.splitlines()
    assert lines[0].startswith('"job_id","scheduler_state"')
    assert lines[1].startswith('"%s","COMPLETED","sacct","sampler","%s.0","1"' % (job_id, job_id))
    jsonl = cli(["stats", "-f", str(tmp_path / "compose.yaml"), "--job-id", job_id,
                 "--format", "jsonl"])
    types_seen = [json.loads(l)["type"] for l in jsonl.out.splitlines()]
    assert types_seen[0] == "summary" and "step" in types_seen and "collector" in types_seen


def test_stats_falls_back_to_live_sstat_for_a_running_job(slurm, slurm_jobs, tmp_path, cli):
    job_id = slurm_jobs.add(hand_job(tmp_path, "srun --overlap -n1 sleep 30\n"))
    assert wait_for_state(job_id, ["RUNNING"], timeout=120) == "RUNNING"
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    deadline = time.monotonic() + 30
    stats = None
    while time.monotonic() < deadline:
        out = cli(["stats", "-f", str(tmp_path / "compose.yaml"), "--job-id", job_id,
                   "--format", "json"])
        stats = json.loads(out.out)
        if stats["steps"]:
            break
        time.sleep(2)
    assert stats["source"] == "sstat"
    assert stats["steps"][0]["step_id"] == "%s.0" % job_id
    subprocess.run(["scancel", job_id])


def test_watch_of_a_hand_job_follows_logs_and_reports_exit(slurm, slurm_jobs, tmp_path):
    job_id = slurm_jobs.add(hand_job(tmp_path, (
        'for i in 1 2 3; do echo "line $i" >> "$JOB_DIR/logs/app.log"; sleep 1; done\n'
        "exit 3\n")))
    record = {"job_id": job_id, "project_dir": str(tmp_path),
              "job_dir": str(tmp_path / ".hpc-compose" / job_id),
              "services": [{"name": "app", "log_path": str(tmp_path / ".hpc-compose" / job_id /
                                                           "logs" / "app.log")}]}
    import io
    out = io.StringIO()
    outcome = hpc_compose.watch_job(record, out=out)
    assert not outcome.ok
    assert outcome.scheduler.state == "FAILED"
    assert "exit 3:0" in outcome.reason
    assert [l for l in out.getvalue().splitlines() if l.startswith("[app]")] == \
        ["[app] line 1", "[app] line 2", "[app] line 3"]
    # Sparse: a job of a few seconds costs a handful of scheduler calls, not one per log poll.
    assert outcome.scheduler_calls <= 2 + outcome.seconds / 2.0


def test_clean_keeps_the_directory_of_a_running_job(slurm, slurm_jobs, tmp_path):
    old = hand_job(tmp_path, "srun --overlap -n1 sleep 60\n")
    slurm_jobs.add(old)
    assert wait_for_state(old, ["RUNNING"], timeout=120) == "RUNNING"
    # RUNNING in the scheduler comes a moment before the batch script has made its directory.
    job_dir = tmp_path / ".hpc-compose" / old
    deadline = time.time() + 30
    while not job_dir.is_dir() and time.time() < deadline:
        time.sleep(0.2)
    newer = "999999"                                   # the latest record names another job
    hpc_compose._record_job(str(tmp_path), {"job_id": newer, "submitted_at": time.time(),
                                           "services": []})
    hpc_compose._record_job(str(tmp_path), {"job_id": newer, "submitted_at": time.time(),
                                           "services": []})
    removed, kept = hpc_compose._clean_jobs(str(tmp_path), remove_all=True)
    assert old not in removed
    assert kept[old].startswith("still in the queue")
    assert os.path.isdir(str(tmp_path / ".hpc-compose" / old))
    subprocess.run(["scancel", old])


def test_ctrl_c_stops_watching_but_not_the_job(slurm, slurm_jobs, tmp_path):
    import signal
    compose = write_compose(tmp_path, SLOW_SERVICES.format(count=60))
    proc = subprocess.Popen([sys.executable, TOOL_PATH, "up", "-f", str(compose)],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    log = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = list((tmp_path / ".hpc-compose" / "jobs").glob("*.json")) \
            if (tmp_path / ".hpc-compose" / "jobs").exists() else []
        if records:
            record = json.loads(records[0].read_text())
            slurm_jobs.add(record["job_id"])
            log = record["services"][0]["log_path"]
            if "tick-2" in _read(log):
                break
        time.sleep(0.5)
    assert log and "tick-2" in _read(log)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopped watching job %s; it keeps running." % record["job_id"] in err
    assert "[ticker] tick-1" in out.splitlines()
    # squeue, not sacct: slurmdbd may not have recorded the start yet.
    assert hpc_compose._squeue_state(record["job_id"]).state == "RUNNING"


def test_status_of_a_pending_job_shows_the_reason_and_cancel_ends_it(slurm, slurm_jobs, tmp_path):
    compose = tmp_path / "later.yaml"
    compose.write_text(HOST_COMPOSE.format(name="later", services=FAILING_SERVICES).replace(
        "  mem: 256M\n", "  mem: 256M\n  submit_args:\n    - --begin=now+3600\n"))
    result = run_tool_cli(["submit", "-f", compose], cwd=tmp_path)
    assert result.code == 0, result
    job_id = slurm_jobs.add(submitted_job_id(result.out))
    # Until the scheduler's next pass evaluates --begin, the reason may still read None/Resources.
    deadline = time.time() + 60
    while True:
        pending = run_tool_cli(["status", "-f", compose], cwd=tmp_path)
        assert pending.code == 0, pending
        if "reason BeginTime" in pending.out or time.time() > deadline:
            break
        time.sleep(1)
    assert "scheduler:  PENDING (squeue), reason BeginTime" in pending.out
    assert "runtime:    no state.json yet" in pending.out
    cancelled = run_tool_cli(["cancel", "-f", compose], cwd=tmp_path)
    assert cancelled.code == 0, cancelled
    assert "cancelled job: %s" % job_id in cancelled.out
    assert wait_for_job(job_id, timeout=60) == "CANCELLED"
    after = json.loads(run_tool_cli(["status", "-f", compose, "--format", "json"],
                                    cwd=tmp_path).out)
    assert after["scheduler"]["state"] == "CANCELLED" and after["scheduler"]["failed"]
    assert after["runtime"] is None
