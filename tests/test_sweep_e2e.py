"""Sweeps (x-sweep) on the real Slurm test cluster: one array, parameters per task, sweep status,
sweep retry of a failed task, diff of two tasks. Runs on one node (CI also runs it on the Slurm
24.11 and 26.05 generation clusters): host runtime, tiny commands, at most 5 tasks at once.
"""
import json

import time

from slurm_support import run_tool_cli, submitted_job_id

# 3 x 2 matrix, one exclude, 2 replicates: 10 tasks. Task 3 fails until the marker file exists.
# `main` (string command) and `check` (list command) both report what they see: the placeholders,
# the variables and params.json; main writes result.json (loss = 10 - index) when check is done.
SWEEP = """\
name: {name}
x-slurm:
  runtime: host
  time: "00:03:00"
  cpus_per_task: 1
  mem: 64M
x-sweep:
  matrix:
    lr: [0.1, 0.01, 0.001]
    model: [small, "large one"]
  exclude:
    - {{lr: 0.001, model: large one}}
  replicates: 2
  max_parallel: 5
services:
  check:
    environment:
      SEEN_LR: "lr=((param.lr))"
    command: ["/bin/sh", "-c", "printf '%s|%s|%s|%s\\\\n' \\"$$1\\" \\"$$2\\" \\"$$SEEN_LR\\" \\"$$HPC_COMPOSE_PARAM_MODEL\\" > \\"$$HPC_COMPOSE_JOB_DIR/check.txt\\"", "check", "((param.lr))", "((param.model))"]
  main:
    depends_on:
      check: {{condition: service_completed_successfully}}
    command: >-
      printf '%s|%s|%s|%s|%s\\n' ((param.lr)) ((param.model)) "$HPC_COMPOSE_PARAM_LR"
      "$HPC_COMPOSE_REPLICATE" "$HPC_COMPOSE_SWEEP_INDEX" > "$HPC_COMPOSE_JOB_DIR/main.txt";
      printf '{{"loss": %d, "model": "%s"}}' $((10 - HPC_COMPOSE_SWEEP_INDEX)) ((param.model))
      > "$HPC_COMPOSE_JOB_DIR/result.json";
      test "$HPC_COMPOSE_SWEEP_INDEX" != 3 || test -e {marker}
"""

EXPECTED = [("0.1", "small"), ("0.1", "large one"), ("0.01", "small"), ("0.01", "large one"),
            ("0.001", "small")]


def _sweep_status_when_ended(compose, tmp_path, index, timeout=120.0):
    """``sweep status --format json`` once task ``index``'s latest attempt has ended."""
    deadline = time.monotonic() + timeout
    while True:
        data = json.loads(run_tool_cli(["sweep", "status", "-f", compose, "--format", "json"],
                                       cwd=tmp_path).out)
        row = [row for row in data["tasks"] if row["index"] == index][0]
        if row["attempt"] > 1 and row["state"] in ("COMPLETED", "FAILED", "CANCELLED",
                                                   "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return data
        assert time.monotonic() < deadline, "task %d still %s" % (index, row["state"])
        time.sleep(1.0)


def test_a_sweep_runs_as_one_array_and_is_read_retried_and_compared(slurm, slurm_jobs, tmp_path):
    compose = tmp_path / "compose.yaml"
    marker = tmp_path / "retry-ok"
    compose.write_text(SWEEP.format(name="sweep-e2e", marker=marker))
    valid = run_tool_cli(["validate", "-f", compose], cwd=tmp_path)
    assert "sweep: 10 tasks (5 combinations x 2 replicates) of lr, model; array 0-9%5" in valid.out

    up = run_tool_cli(["up", "-f", compose], cwd=tmp_path, timeout=300)
    job_id = slurm_jobs.add(submitted_job_id(up.out))
    assert up.code == 1, up          # task 3 failed
    assert "error: 1 of 10 tasks of job %s did not complete: 3" % job_id in up.err

    # Every task saw exactly its parameters: placeholders, variables, params.json, in both services.
    for index in range(10):
        lr, model = EXPECTED[index // 2]
        job_dir = tmp_path / ".hpc-compose" / ("%s_%d" % (job_id, index))
        assert json.loads((job_dir / "params.json").read_text()) == {
            "index": index, "replicate": index % 2, "params": {"lr": lr, "model": model}}
        assert (job_dir / "check.txt").read_text() == "%s|%s|lr=%s|%s\n" % (lr, model, lr, model)
        assert (job_dir / "main.txt").read_text() == "%s|%s|%s|%d|%d\n" % (
            lr, model, lr, index % 2, index)

    status = run_tool_cli(["sweep", "status", "-f", compose, "--format", "json"], cwd=tmp_path)
    data = json.loads(status.out)
    assert data["task_count"] == 10 and len(data["tasks"]) == 10
    assert data["result_columns"] == ["loss", "model"] and data["failed"] == [3]
    failed = [row for row in data["tasks"] if row["index"] == 3][0]
    assert failed["state"] == "FAILED" and failed["failure"]["service"] == "main"

    text = run_tool_cli(["sweep", "status", "-f", compose, "--sort", "loss"], cwd=tmp_path).out
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["index", "lr", "model"] and lines[1].split()[-2:] == [
        "loss", "results.model"]
    assert [line.split()[0] for line in lines[2:12]] == [str(i) for i in range(9, -1, -1)]
    assert "retry them: hpc-compose sweep retry --failed" in text

    marker.write_text("")
    retry = run_tool_cli(["sweep", "retry", "--failed", "-f", compose], cwd=tmp_path)
    retry_id = slurm_jobs.add(submitted_job_id(retry.out))
    assert "tasks 3 of sweep %s again" % job_id in retry.out, retry
    again = _sweep_status_when_ended(compose, tmp_path, 3)
    assert again["states"] == {"COMPLETED": 10} and again["failed"] == []
    row = [row for row in again["tasks"] if row["index"] == 3][0]
    assert row["job_id"] == "%s_3" % retry_id and row["attempt"] == 2
    assert row["results"] == {"loss": 7, "model": "large one"}
    assert again["attempts"] == [job_id, retry_id]

    diff = run_tool_cli(["diff", "%s_0" % job_id, "%s_4" % job_id, "-f", compose,
                         "--format", "json"], cwd=tmp_path)
    fields = dict((item["field"], (item["left"], item["right"]))
                  for item in json.loads(diff.out)["differences"])
    assert fields["params.lr"] == ("0.1", "0.01")
    assert fields["results.loss"] == (10, 6)
    assert "params.model" not in fields
    text = run_tool_cli(["diff", "%s_1" % job_id, "%s_3" % job_id, "-f", compose],
                        cwd=tmp_path).out
    assert "params.model" in text and "results.loss" in text and "%s_3" % retry_id in text
