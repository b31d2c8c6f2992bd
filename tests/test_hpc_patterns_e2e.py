"""Signals, requeue and resume on the real Slurm test cluster (tests/cluster/slurm-cluster.sh).

The workload is the shipped stand-in trainer (examples/standin/train_standin.py) on the host
runtime. The warning signal is sent with `scancel --batch --signal=USR1`, which reaches the batch
shell exactly as Slurm's `--signal=B:USR1@N` does, at a moment the test chooses. A requeued job
waits for its begin time (about two minutes on Slurm); the tests move it to now with
`scontrol update StartTime=now` so they take seconds, not minutes.
"""
import json
import os
import shutil
import subprocess
import time

import hpc_compose
from slurm_support import TOOL_PATH, run_tool_cli, wait_for_job, job_state

EXAMPLES = os.path.join(os.path.dirname(TOOL_PATH), "examples")

TRAINING = """\
name: {name}
x-slurm:
  runtime: host
  time: "00:05:00"
  cpus_per_task: 1
  mem: 256M
  resume:
    path: {resume}
  signal:
    before: 2m
    on_signal: {on_signal}
    grace: 30s
    max_attempts: {max_attempts}
services:
  trainer:
    command: ["python3", "standin/train_standin.py", "--steps", "{steps}", "--step-seconds", "0.5",
              "--checkpoint-dir", "{resume}"]
"""


def _run(argv):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def _training(tmp_path, steps=40, on_signal="requeue", max_attempts=3):
    shutil.copytree(os.path.join(EXAMPLES, "standin"), str(tmp_path / "standin"))
    resume = tmp_path / "resume"
    compose = tmp_path / "compose.yaml"
    compose.write_text(TRAINING.format(name=tmp_path.name[-20:].replace("_", "-"), resume=resume,
                                       on_signal=on_signal, max_attempts=max_attempts,
                                       steps=steps))
    return compose, resume


def _submit(compose, tmp_path, slurm_jobs):
    return _submit_args(["submit", "-f", compose], tmp_path, slurm_jobs)


def _submit_args(args, tmp_path, slurm_jobs):
    result = run_tool_cli(args, cwd=tmp_path)
    assert result.code == 0, result
    job_id = [l.split()[3] for l in result.out.splitlines()
              if l.startswith("submitted batch job ")][0]
    return slurm_jobs.add(job_id)


def _wait_for(predicate, timeout=300.0, what="condition"):  # the shared cluster may be busy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out waiting for " + what)


def _trained_steps(job_dir, attempt):
    log = os.path.join(job_dir, "attempts", str(attempt), "logs", "trainer.log")
    try:
        with open(log) as handle:
            return sum(1 for line in handle if line.startswith("step "))
    except OSError:
        return 0


def _attempt_state(job_dir, attempt, statuses):
    state = hpc_compose._load_runtime_state(os.path.join(job_dir, "attempts", str(attempt)))
    return state if state and state["status"] in statuses else None


def _squeue_state(job_id):
    result = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    return result.stdout.strip()


def _start_requeued_now(job_id, job_dir):
    """Skip Slurm's begin-time delay of a requeued job (about two minutes).

    Slurm sets the begin time when the requeue completes, so the update is repeated while the job
    is PENDING. Not at once, though: slurmd refuses a launch whose credential is from the same
    second as the revocation of the previous one ("Killing non-startable batch job: Job credential
    revoked"), which is what the begin-time delay protects against; a few seconds suffice. The
    next attempt has started once its directory exists.
    """
    pending_since = []

    def started():
        if os.path.isdir(os.path.join(job_dir, "attempts", "1")):
            return True
        if _squeue_state(job_id) == "PENDING":
            pending_since.append(time.monotonic())
            if time.monotonic() - pending_since[0] >= 3:
                _run(["scontrol", "update", "JobId=%s" % job_id, "StartTime=now"])
        return False
    _wait_for(started, 300, "requeued job %s to start again" % job_id)


def test_signal_checkpoints_requeues_and_the_next_attempt_resumes(slurm, slurm_jobs, tmp_path):
    compose, resume = _training(tmp_path)
    job_id = _submit(compose, tmp_path, slurm_jobs)
    job_dir = str(tmp_path / ".hpc-compose" / job_id)
    _wait_for(lambda: _trained_steps(job_dir, 0) >= 3, what="the first training steps")
    assert _run(["scancel", "--batch", "--signal=USR1", job_id]).returncode == 0

    first = _wait_for(lambda: _attempt_state(job_dir, 0, ("requeued", "failed", "completed")),
                      what="attempt 0 to end")
    assert first["status"] == "requeued", first
    assert first["signals"][0]["signal"] == "USR1" and first["signals"][0]["action"] == "requeue"
    assert first["signals"][0]["forwarded_to"] == [{"service": "trainer", "signal": "USR1"}]
    assert first["services"][0]["status"] == "exited" and first["services"][0]["last_exit_code"] == 0
    saved = json.loads((resume / "checkpoint.json").read_text())["step"]
    assert 3 <= saved < 40

    _start_requeued_now(job_id, job_dir)
    assert wait_for_job(job_id, timeout=400) == "COMPLETED"
    second = _wait_for(lambda: _attempt_state(job_dir, 1, hpc_compose._FINAL_RUNTIME_STATUSES),
                       what="attempt 1 to end")
    assert second["status"] == "completed" and second["attempt"] == 1
    with open(os.path.join(job_dir, "attempts", "1", "logs", "trainer.log")) as handle:
        log = handle.read()
    assert "resumed from step %d (attempt 1, HPC_COMPOSE_IS_RESUME=1)" % saved in log
    assert json.loads((resume / "result.json").read_text())["steps"] == 40
    assert _trained_steps(job_dir, 0) + _trained_steps(job_dir, 1) == 40

    status = run_tool_cli(["status", "-f", compose], cwd=tmp_path)
    assert "  attempt 0:  requeued, exit code 0, the job requeued itself after SIGUSR1" in status.out
    assert "  attempt 1:  completed, exit code 0" in status.out
    logs = run_tool_cli(["logs", "-f", compose, "--tail", "1000"], cwd=tmp_path)
    lines = logs.out.splitlines()
    first_marker = lines.index("[trainer] ### hpc-compose: attempt 0 (job %s)" % job_id)
    second_marker = lines.index("[trainer] ### hpc-compose: attempt 1 (job %s)" % job_id)
    assert first_marker < lines.index("[trainer] signal received: checkpoint saved at step %d, "
                                      "exiting" % saved) < second_marker
    assert lines[-1] == "[trainer] done: 40 steps, loss %s" % lines[-1].split()[-1]


def test_a_requeue_from_outside_ends_the_attempt_as_requeued_and_resumes(slurm, slurm_jobs,
                                                                        tmp_path):
    compose, resume = _training(tmp_path, steps=30)
    job_id = _submit(compose, tmp_path, slurm_jobs)
    job_dir = str(tmp_path / ".hpc-compose" / job_id)
    _wait_for(lambda: _trained_steps(job_dir, 0) >= 12, what="the first checkpoint (step 10)")
    assert _run(["scontrol", "requeue", job_id]).returncode == 0   # what preemption does
    first = _wait_for(lambda: _attempt_state(job_dir, 0, ("requeued", "cancelled", "failed")),
                      what="attempt 0 to end")
    assert first["status"] == "requeued", first
    assert "requeued by Slurm" in first["reason"] and "attempt 2 resumes" in first["reason"]
    _start_requeued_now(job_id, job_dir)
    assert wait_for_job(job_id, timeout=400) == "COMPLETED"
    with open(os.path.join(job_dir, "attempts", "1", "logs", "trainer.log")) as handle:
        assert "resumed from step 10 (attempt 1" in handle.read()
    assert json.loads((resume / "result.json").read_text())["steps"] == 30


def test_the_last_attempt_is_not_requeued_and_says_why(slurm, slurm_jobs, tmp_path):
    compose, resume = _training(tmp_path, steps=30, max_attempts=1)
    job_id = _submit(compose, tmp_path, slurm_jobs)
    job_dir = str(tmp_path / ".hpc-compose" / job_id)
    _wait_for(lambda: _trained_steps(job_dir, 0) >= 3, what="the first training steps")
    assert _run(["scancel", "--batch", "--signal=USR1", job_id]).returncode == 0
    # The trainer checkpoints and exits 0; nothing is requeued, so the job completes.
    assert wait_for_job(job_id, timeout=300) == "COMPLETED"
    state = _wait_for(lambda: _attempt_state(job_dir, 0, hpc_compose._FINAL_RUNTIME_STATUSES),
                      what="the final state")
    assert [s["action"] for s in state["signals"]] == ["last_attempt"]
    assert not os.path.exists(os.path.join(job_dir, "attempts", "1"))
    with open(os.path.join(job_dir, "..", "..", "slurm-%s.out" % job_id)) as handle:
        assert "not requeueing: attempt 1 is the last of 1 (x-slurm.signal.max_attempts)" \
            in handle.read()


# --- chains ------------------------------------------------------------------------------------------

CHAIN = """\
name: {name}
x-slurm: {{runtime: host, time: "00:02:00"}}
services:
  {name}:
    command: "{command}"
"""


def _chain_file(tmp_path, folder, name, command):
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "compose.yaml"
    path.write_text(CHAIN.format(name=name, command=command))
    return path


def test_a_chain_runs_after_its_parent_and_the_record_keeps_it(slurm, slurm_jobs, tmp_path):
    prep = _chain_file(tmp_path, "prep", "prep", "sleep 2; date +%s.%N > ../prep-ended")
    train = _chain_file(tmp_path, "train", "train", "date +%s.%N > ../train-started")
    parent = _submit(prep, tmp_path / "prep", slurm_jobs)
    waiting = run_tool_cli(["status", "-f", train], cwd=tmp_path)   # nothing tracked yet
    assert waiting.code == 2
    result = run_tool_cli(["up", "-f", train, "--after-file", prep], cwd=tmp_path / "train",
                          timeout=240)
    assert result.code == 0, result
    child = [l.split()[3] for l in result.out.splitlines()
             if l.startswith("submitted batch job ")][0]
    slurm_jobs.add(child)
    record = json.loads((tmp_path / "train" / ".hpc-compose" / "jobs" / (child + ".json"))
                        .read_text())
    assert record["dependency"] == "afterok:%s" % parent
    assert record["after"]["compose_file"] == str(prep) and record["after"]["job_id"] == parent
    assert float((tmp_path / "train-started").read_text()) > \
        float((tmp_path / "prep-ended").read_text())


def test_a_chain_whose_parent_failed_is_reported_as_never_able_to_run(slurm, slurm_jobs,
                                                                      tmp_path):
    prep = _chain_file(tmp_path, "prep", "prep", "exit 3")
    train = _chain_file(tmp_path, "train", "train", "echo never")
    parent = _submit(prep, tmp_path / "prep", slurm_jobs)
    child = _submit_args(["submit", "-f", train, "--after", "latest", "--after-file", prep],
                         tmp_path, slurm_jobs)
    assert wait_for_job(parent, timeout=300) == "FAILED"

    def explained():
        status = run_tool_cli(["status", "-f", train, "--format", "json"], cwd=tmp_path)
        dependency = json.loads(status.out).get("dependency")
        return dependency if dependency and dependency["never_satisfied"] else None
    dependency = _wait_for(explained, 60, "DependencyNeverSatisfied")
    assert dependency["parents"] == [{"job_id": parent, "where": " of %s" % prep,
                                      "state": "FAILED", "exit_code": "3:0"}]
    text = run_tool_cli(["status", "-f", train], cwd=tmp_path).out
    assert ("  dependency: never able to run (DependencyNeverSatisfied): job %s of %s ended "
            "FAILED (exit code 3:0)" % (parent, prep)) in text
    assert run_tool_cli(["cancel", "-f", train], cwd=tmp_path).code == 0
    assert child


def test_after_an_unknown_job_is_refused_before_sbatch(slurm, tmp_path):
    train = _chain_file(tmp_path, "train", "train", "echo never")
    result = run_tool_cli(["submit", "-f", train, "--after", "99999999"], cwd=tmp_path)
    assert result.code == 2
    assert "names job 99999999, which neither squeue nor sacct knows" in result.err
    assert not (tmp_path / "train" / ".hpc-compose" / "jobs").exists()


# --- job arrays --------------------------------------------------------------------------------------

ARRAY = """\
name: {name}
x-slurm: {{runtime: host, time: "00:02:00", array: "{array}"}}
services:
  work:
    command: "{command}"
"""


def _array_file(tmp_path, array, command):
    path = tmp_path / "compose.yaml"
    path.write_text(ARRAY.format(name="arr", array=array, command=command))
    return path


def test_the_parameter_sweep_example_runs_every_task_in_its_own_directory(slurm, slurm_jobs,
                                                                         tmp_path):
    shutil.copytree(os.path.join(EXAMPLES, "standin"), str(tmp_path / "standin"))
    shutil.copy(os.path.join(EXAMPLES, "parameter-sweep.yaml"), str(tmp_path / "compose.yaml"))
    result = run_tool_cli(["up", "-f", tmp_path / "compose.yaml"], cwd=tmp_path, timeout=300)
    job_id = slurm_jobs.add([l.split()[3] for l in result.out.splitlines()
                             if l.startswith("submitted batch job ")][0])
    assert result.code == 0, result
    assert sorted(l for l in result.out.splitlines() if l.startswith("task ")) == \
        ["task %d COMPLETED" % task for task in range(4)]
    rates = []
    for task in range(4):
        job_dir = tmp_path / ".hpc-compose" / ("%s_%d" % (job_id, task))
        assert json.loads((job_dir / "state.json").read_text())["status"] == "completed"
        rates.append(json.loads((job_dir / "run" / "result.json").read_text())["learning_rate"])
        assert (tmp_path / ("slurm-%s_%d.out" % (job_id, task))).exists()
    assert rates == [0.4, 0.2, 0.1, 0.05]
    logs = run_tool_cli(["logs", "-f", tmp_path / "compose.yaml", "--task", "3", "--tail", "1"],
                        cwd=tmp_path)
    assert logs.out.startswith("[train] done: 10 steps")
    exported = run_tool_cli(["artifacts", "-f", tmp_path / "compose.yaml", "--task", "1"],
                            cwd=tmp_path)
    assert exported.code == 0, exported
    result_file = tmp_path / "results" / ("%s_1" % job_id) / "run" / "result.json"
    assert json.loads(result_file.read_text())["learning_rate"] == 0.2


def test_up_of_an_array_with_a_failing_task_exits_one_and_status_lists_it(slurm, slurm_jobs,
                                                                         tmp_path):
    compose = _array_file(tmp_path, "0-2", "test $HPC_COMPOSE_ARRAY_TASK_ID != 1 || exit 3")
    result = run_tool_cli(["up", "-f", compose], cwd=tmp_path, timeout=240)
    job_id = slurm_jobs.add([l.split()[3] for l in result.out.splitlines()
                             if l.startswith("submitted batch job ")][0])
    assert result.code == 1, result
    assert "error: 1 of 3 tasks of job %s did not complete: 1" % job_id in result.err
    status = run_tool_cli(["status", "-f", compose, "--format", "json"], cwd=tmp_path)
    data = json.loads(status.out)
    assert data["states"] == {"COMPLETED": 2, "FAILED": 1} and data["failed"] == [1]
    text = run_tool_cli(["status", "-f", compose], cwd=tmp_path).out
    assert "  task 1:     FAILED, exit code 3:0, service 'work' exited with code 3" in text


def test_cancel_task_ends_one_task_and_leaves_the_others(slurm, slurm_jobs, tmp_path):
    compose = _array_file(tmp_path, "0-1", "sleep 60")
    job_id = _submit(compose, tmp_path, slurm_jobs)

    def both_running():
        states = hpc_compose._array_task_states(job_id)
        return all(states.get(t) and states[t].state == "RUNNING" for t in (0, 1))
    _wait_for(both_running, 300, "both tasks to run")
    assert run_tool_cli(["cancel", "-f", compose, "--task", "0"], cwd=tmp_path).code == 0
    assert wait_for_job("%s_0" % job_id, timeout=60) == "CANCELLED"
    assert hpc_compose._array_task_states(job_id, tasks=())[1].state == "RUNNING"
    assert run_tool_cli(["cancel", "-f", compose], cwd=tmp_path).code == 0
