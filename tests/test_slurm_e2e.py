"""The rendered batch script on the REAL test cluster: launch order, readiness, failure policies,
the job-end rule, teardown on scancel and on the time limit, and byte-exact values.

Every job uses the host runtime (Pyxis cannot be installed here). Each test renders its compose file
with ``hpc-compose render --output`` and submits the script with ``sbatch`` from the compose folder,
as ``submit`` does.
"""
import json
import os
import random
import subprocess
import time

import pytest

from slurm_support import free_port, run_tool_cli, sacct_job, wait_for_job, wait_for_state

MARKER = "### hpc-compose: restarting service"


class Job(object):
    """A submitted compose job: its id, folder, and readers for what the batch script wrote."""

    def __init__(self, job_id, folder):
        self.id = job_id
        self.folder = folder
        self.job_dir = os.path.join(folder, ".hpc-compose", job_id)

    def state(self):
        with open(os.path.join(self.job_dir, "state.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def service(self, name):
        return [s for s in self.state()["services"] if s["name"] == name][0]

    def log(self, token):
        with open(os.path.join(self.job_dir, "logs", token + ".log"), encoding="utf-8") as handle:
            return handle.read()

    def batch_log(self):
        with open(os.path.join(self.folder, "slurm-%s.out" % self.id), encoding="utf-8") as handle:
            return handle.read()


def submit(tmp_path, slurm_jobs, compose_text):
    """Write compose.yaml, render it through the CLI, sbatch it from its folder; returns a Job."""
    folder = str(tmp_path)
    compose = os.path.join(folder, "compose.yaml")
    with open(compose, "w", encoding="utf-8") as handle:
        handle.write(compose_text)
    script = os.path.join(folder, "hpc-compose.sbatch")
    res = run_tool_cli(["render", "-f", compose, "--output", script], cwd=folder)
    assert res.code == 0, res.err
    proc = subprocess.run(["sbatch", "--parsable", script], cwd=folder, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = slurm_jobs.add(proc.stdout.strip().split(";")[0])
    return Job(job_id, folder)


HEAD = """\
name: e2e
x-slurm:
  runtime: host
  time: "00:05:00"
services:
"""


def test_minimal_job_completes_with_its_output_in_the_log(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  hello:
    command: ["printf", "hello from %s\\n", "hpc-compose"]
""")

    assert wait_for_job(job.id, timeout=120) == "COMPLETED"
    assert sacct_job(job.id)["ExitCode"] == "0:0"
    assert job.log("hello") == "hello from hpc-compose\n"
    state = job.state()
    assert (state["status"], state["exit_code"]) == ("completed", 0)
    assert job.service("hello")["status"] == "exited"
    assert job.service("hello")["last_exit_code"] == 0


SERVERS = {
    "tcp": ("""python3 -c "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); time.sleep(1); s.bind(('127.0.0.1', {port})); s.listen(5); time.sleep(600)\"""",
            "{{type: tcp, port: {port}, timeout_seconds: 30}}"),
    "http": ("python3 -m http.server {port} --bind 127.0.0.1",
             "{{type: http, url: 'http://127.0.0.1:{port}/', status_code: 200, timeout_seconds: 30}}"),
    "log": ("""sleep 1; echo 'not yet'; echo 'server [ready] on {port}'; exec sleep 600""",
            "{{type: log, pattern: '[ready] on {port}', timeout_seconds: 30}}"),
}


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_server_and_client_with_service_healthy_end_completed_when_the_client_finishes(
        slurm, slurm_jobs, tmp_path, kind):
    port = free_port()
    command, readiness = SERVERS[kind]
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  server:
    command: {command}
    readiness: {readiness}
  client:
    command: 'echo "client saw the server"; cat "$HPC_COMPOSE_JOB_DIR/logs/server.log" | wc -l'
    depends_on:
      server:
        condition: service_healthy
""".format(command=json.dumps(command.format(port=port)),
           readiness=readiness.format(port=port)))

    assert wait_for_job(job.id, timeout=120) == "COMPLETED"
    server, client = job.service("server"), job.service("client")
    assert server["readiness"] == {"type": kind, "status": "ready"}
    assert server["status"] == "stopped"
    assert client["status"] == "exited" and client["last_exit_code"] == 0
    assert client["started_at"] >= server["started_at"]
    assert job.log("client").startswith("client saw the server\n")
    assert job.state()["status"] == "completed"


def test_readiness_timeout_fails_the_job_naming_the_service_and_the_probe(slurm, slurm_jobs,
                                                                           tmp_path):
    port = free_port()
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  db:
    command: exec sleep 300
    readiness: {type: tcp, port: %d, timeout_seconds: 3}
  app:
    command: echo never
    depends_on:
      db:
        condition: service_healthy
""" % port)

    assert wait_for_job(job.id, timeout=120) == "FAILED"
    assert sacct_job(job.id)["ExitCode"] == "124:0"
    state = job.state()
    assert state["status"] == "failed" and state["exit_code"] == 124
    assert "'db'" in state["reason"] and "tcp 127.0.0.1:%d" % port in state["reason"]
    assert job.service("db")["readiness"]["status"] == "timeout"
    assert job.service("app")["launches"] == 0
    assert "service 'db': tcp 127.0.0.1:%d readiness did not succeed within 3 s" % port \
        in job.batch_log()


def test_fail_job_stops_the_other_services_and_fails_with_the_exit_code(slurm, slurm_jobs,
                                                                        tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  long:
    command: exec sleep 300
  bad:
    command: sleep 1; exit 7
""")

    assert wait_for_job(job.id, timeout=60) == "FAILED"
    assert sacct_job(job.id)["ExitCode"] == "7:0"
    state = job.state()
    assert (state["status"], state["exit_code"]) == ("failed", 7)
    assert state["reason"] == "service 'bad' exited with code 7"
    assert job.service("long")["status"] == "stopped"
    assert job.service("bad")["status"] == "failed"


def test_ignore_policy_keeps_the_job_going(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  sidecar:
    command: exit 5
    x-slurm:
      failure_policy: {mode: ignore}
  main:
    command: sleep 3; echo main done
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    sidecar = job.service("sidecar")
    assert (sidecar["status"], sidecar["last_exit_code"]) == ("failed", 5)
    assert job.service("main")["status"] == "exited"
    assert job.log("main") == "main done\n"


def test_restart_on_failure_restarts_exactly_max_restarts_times_then_fails(slurm, slurm_jobs,
                                                                           tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  flaky:
    command: echo run; exit 3
    x-slurm:
      failure_policy: {mode: restart_on_failure, max_restarts: 2, backoff_seconds: 1}
""")

    assert wait_for_job(job.id, timeout=60) == "FAILED"
    log = job.log("flaky")
    assert log.count(MARKER) == 2
    assert log.count("run\n") == 3
    flaky = job.service("flaky")
    assert (flaky["launches"], flaky["restarts"], flaky["last_exit_code"]) == (3, 2, 3)
    assert job.state()["exit_code"] == 3


def test_restart_on_failure_stops_restarting_after_a_success(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  flaky:
    command: >-
      n=$(cat "$HPC_COMPOSE_JOB_DIR/n" 2>/dev/null || echo 0); n=$((n + 1));
      echo "$n" > "$HPC_COMPOSE_JOB_DIR/n"; echo "attempt $n"; [ "$n" -ge 2 ]
    x-slurm:
      failure_policy: {mode: restart_on_failure, max_restarts: 5, backoff_seconds: 1}
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    assert job.log("flaky").count(MARKER) == 1
    assert (job.service("flaky")["restarts"], job.service("flaky")["status"]) == (1, "exited")


def test_a_finished_one_shot_satisfies_service_started(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  init:
    command: echo initialized > "$HPC_COMPOSE_JOB_DIR/init.txt"
  app:
    command: sleep 2; cat "$HPC_COMPOSE_JOB_DIR/init.txt"
    depends_on: [init]
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    assert job.log("app") == "initialized\n"


PIPELINE = HEAD + """\
  extract:
    command: sleep 2; echo extracted > "$HPC_COMPOSE_JOB_DIR/stage1"; exit ${EXTRACT_EXIT:-0}
  transform:
    command: cat "$HPC_COMPOSE_JOB_DIR/stage1"; echo transformed > "$HPC_COMPOSE_JOB_DIR/stage2"
    depends_on:
      extract: {condition: service_completed_successfully}
  load:
    command: cat "$HPC_COMPOSE_JOB_DIR/stage1" "$HPC_COMPOSE_JOB_DIR/stage2"
    depends_on:
      transform: {condition: service_completed_successfully}
"""


def test_a_three_stage_pipeline_runs_each_stage_after_the_previous_one_exits_0(slurm, slurm_jobs,
                                                                              tmp_path):
    job = submit(tmp_path, slurm_jobs, PIPELINE)

    assert wait_for_job(job.id, timeout=90) == "COMPLETED"
    state = job.state()
    assert (state["status"], state["exit_code"]) == ("completed", 0)
    assert job.log("transform") == "extracted\n"
    assert job.log("load") == "extracted\ntransformed\n"
    stages = [job.service(name) for name in ("extract", "transform", "load")]
    # A completed stage is "exited" with code 0, never "failed", and did not end the job early.
    assert [(s["status"], s["last_exit_code"]) for s in stages] == [("exited", 0)] * 3
    assert stages[0]["finished_at"] <= stages[1]["started_at"]
    assert stages[1]["finished_at"] <= stages[2]["started_at"]


def test_a_failed_stage_applies_its_policy_and_its_dependents_never_start(slurm, slurm_jobs,
                                                                          tmp_path):
    job = submit(tmp_path, slurm_jobs, PIPELINE.replace("${EXTRACT_EXIT:-0}", "3"))

    assert wait_for_job(job.id, timeout=90) == "FAILED"
    state = job.state()
    assert (state["status"], state["exit_code"]) == ("failed", 3)
    assert state["reason"] == "service 'extract' exited with code 3, so 'transform' never started"
    assert job.service("extract")["status"] == "failed"
    for name in ("transform", "load"):
        assert (job.service(name)["status"], job.service(name)["launches"]) == ("stopped", 0)
    assert "service 'transform' will not start: it waits for 'extract' to complete " \
           "successfully" in job.batch_log()


def test_a_slow_readiness_never_delays_unrelated_services(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  slow:
    command: date +%s.%N > "$HPC_COMPOSE_JOB_DIR/slow.txt"; exec sleep 300
    readiness: {type: sleep, seconds: 6}
  waiter:
    command: date +%s.%N > "$HPC_COMPOSE_JOB_DIR/waiter.txt"
    depends_on: {slow: {condition: service_healthy}}
  quick:
    command: date +%s.%N > "$HPC_COMPOSE_JOB_DIR/quick.txt"
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"

    def ran(name):
        with open(os.path.join(job.job_dir, name + ".txt")) as handle:
            return float(handle.read())

    assert ran("quick") - ran("slow") < 3
    assert ran("waiter") - ran("slow") >= 5.5


def _random_text(rng, length):
    alphabet = (["'", '"', "$", "\\", "`", "\n", "\t", " ", "*", "?", "!", "#", ";", "&", "|", ",",
                 "=", "%", "{", "}", "(", ")", "~", "é", "ß", "€", "日本", "🙂", "\u00a0"]
                + list("abcXYZ019-_./:"))
    return "".join(rng.choice(alphabet) for _ in range(length))


def _yaml_string(value):
    # A YAML double-quoted scalar is JSON's string syntax; "$$" keeps a literal "$" (interpolation).
    return json.dumps(value.replace("$", "$$"), ensure_ascii=False)


def test_random_environment_values_and_exec_arguments_arrive_byte_for_byte(slurm, slurm_jobs,
                                                                           tmp_path):
    rng = random.Random(20261124)
    env = dict(("V_%03d" % i, _random_text(rng, rng.randint(0, 24))) for i in range(200))
    args = [_random_text(rng, rng.randint(0, 24)) for _ in range(200)]
    program = ("import json, os, sys; json.dump({'env': {k: v for k, v in os.environ.items() "
               "if k.startswith('V_')}, 'args': sys.argv[1:]}, "
               "open(os.path.join(os.environ['HPC_COMPOSE_JOB_DIR'], 'seen.json'), 'w'))")
    lines = [HEAD, "  echo:\n", "    command:\n"]
    for item in ["python3", "-c", program] + args:
        lines.append("      - %s\n" % _yaml_string(item))
    lines.append("    environment:\n")
    for key, value in sorted(env.items()):
        lines.append("      %s: %s\n" % (key, _yaml_string(value)))
    job = submit(tmp_path, slurm_jobs, "".join(lines))

    assert wait_for_job(job.id, timeout=120) == "COMPLETED", job.batch_log()
    with open(os.path.join(job.job_dir, "seen.json"), encoding="utf-8") as handle:
        seen = json.load(handle)
    assert seen["args"] == args
    assert seen["env"] == env


def _wait_for_running_service(job, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if job.service(name)["status"] in ("running", "ready"):
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.5)
    raise AssertionError("service %s never ran" % name)


def _wait_for_log(job, name, text, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in job.log(name):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("service %s never wrote %r" % (name, text))


def _final_state(job, timeout=20):
    """state.json once teardown has written its final status (Slurm may report the end first)."""
    deadline = time.monotonic() + timeout
    while job.state()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    return job.state()


def test_scancel_runs_teardown_and_leaves_a_final_state(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  server:
    command: trap 'echo got SIGTERM; exit 0' TERM; echo trap set; while :; do sleep 0.2; done
""")
    assert wait_for_state(job.id, ("RUNNING",), timeout=60) == "RUNNING"
    _wait_for_running_service(job, "server")
    # "running" means its srun was started; on a busy machine (seen on Slurm 24.11) a scancel before
    # the step has launched aborts it before the trap exists.
    _wait_for_log(job, "server", "trap set")

    subprocess.run(["scancel", job.id], check=True, timeout=30)

    assert wait_for_job(job.id, timeout=90) == "CANCELLED"
    state = _final_state(job)
    assert state["status"] == "cancelled"
    assert state["exit_code"] == 143
    assert job.service("server")["status"] == "stopped"
    assert "got SIGTERM" in job.log("server")


def test_time_limit_runs_teardown_and_leaves_a_final_state(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD.replace('"00:05:00"', '"00:01:00"') + """\
  server:
    command: exec sleep 600
""")

    assert wait_for_job(job.id, timeout=240) == "TIMEOUT"
    state = _final_state(job)
    assert state["status"] == "timeout"
    assert job.service("server")["status"] == "stopped"
    assert "time limit" in state["reason"]


def test_resume_writes_the_attempt_directory_and_gives_services_the_resume_variables(
        slurm, slurm_jobs, tmp_path):
    shared = tmp_path / "shared"
    job = submit(tmp_path, slurm_jobs, """\
name: resumable
x-slurm:
  runtime: host
  time: "00:05:00"
  resume: {path: %s}
services:
  app:
    command: env | grep -E '^HPC_COMPOSE_(RESUME_DIR|ATTEMPT|IS_RESUME)=' | sort
""" % shared)

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    assert os.readlink(os.path.join(job.job_dir, "logs")) == "attempts/0/logs"
    assert os.readlink(os.path.join(job.job_dir, "state.json")) == "attempts/0/state.json"
    assert job.log("app") == ("HPC_COMPOSE_ATTEMPT=0\nHPC_COMPOSE_IS_RESUME=0\n"
                              "HPC_COMPOSE_RESUME_DIR=%s\n" % shared)
    with open(str(shared / "_hpc-compose" / "latest.json")) as handle:
        latest = json.load(handle)
    assert (latest["job_id"], latest["attempt"], latest["compose_name"]) == (job.id, 0, "resumable")


def test_a_failing_setup_line_fails_the_job_with_a_final_state(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, """\
name: setup-fails
x-slurm:
  runtime: host
  time: "00:05:00"
  setup:
    - echo "setup runs on $HPC_COMPOSE_PRIMARY_NODE"
    - "false"
services:
  app:
    command: echo never
""")

    assert wait_for_job(job.id, timeout=60) == "FAILED"
    state = job.state()
    assert (state["status"], state["exit_code"]) == ("failed", 1)
    assert job.service("app")["launches"] == 0
    # (on the node the job ran on: the first of the cluster's, or another one of several)
    node = sacct_job(job.id, fields=("JobID", "NodeList"))["NodeList"]
    assert "setup runs on %s" % node in job.batch_log()


def test_readiness_timeout_under_restart_on_failure_relaunches_then_fails(slurm, slurm_jobs,
                                                                        tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  slowready:
    command: echo started; exec sleep 300
    readiness: {type: log, pattern: never printed, timeout_seconds: 2}
    x-slurm:
      failure_policy: {mode: restart_on_failure, max_restarts: 1, backoff_seconds: 1}
""")

    assert wait_for_job(job.id, timeout=60) == "FAILED"
    service = job.service("slowready")
    assert (service["launches"], service["restarts"]) == (2, 1)
    assert service["readiness"] == {"type": "log", "status": "timeout"}
    assert job.log("slowready").count(MARKER) == 1
    assert job.state()["exit_code"] == 124


def test_a_service_ignoring_sigterm_is_killed_after_the_grace_period(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  stubborn:
    command: trap 'echo ignoring TERM' TERM; while :; do sleep 0.1; done
  bad:
    command: sleep 1; exit 2
""")

    assert wait_for_job(job.id, timeout=60) == "FAILED"
    assert "service 'stubborn' did not stop within 10 s: SIGKILL" in job.batch_log()
    assert "ignoring TERM" in job.log("stubborn")
    assert job.service("stubborn")["status"] == "stopped"
    assert job.state()["exit_code"] == 2


def test_quoted_sbatch_values_reach_slurm_as_written(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, """\
name: quoted
x-slurm:
  runtime: host
  job_name: "it's a #1 job"
  time: "00:05:00"
services:
  hello:
    command: ["true"]
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    assert sacct_job(job.id)["JobName"] == "it's a #1 job"


def test_encoded_service_names_get_their_own_log_and_step_name(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  my.app:
    command: echo "$HPC_COMPOSE_SERVICE"
  my_x2e_app:
    command: echo "$HPC_COMPOSE_SERVICE"
""")

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    assert job.log("my_x2e_app") == "my.app\n"
    assert job.log("my_x5f_x2e_app") == "my_x2e_app\n"
    proc = subprocess.run(["sacct", "-n", "-P", "-j", job.id, "--format=JobName"],
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert {"hpc-compose:my_x2e_app", "hpc-compose:my_x5f_x2e_app"} <= set(proc.stdout.split())


def test_usr1_to_the_batch_shell_is_forwarded_to_the_services(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  trainer:
    command: >-
      trap 'echo checkpoint requested; exit 0' USR1;
      echo training; while :; do sleep 0.1; done
""")
    assert wait_for_state(job.id, ("RUNNING",), timeout=60) == "RUNNING"
    _wait_for_log(job, "trainer", "training")  # printed once the USR1 trap is set

    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=30)

    assert wait_for_job(job.id, timeout=60) == "COMPLETED"
    log = job.log("trainer")
    assert log.startswith("training\n") and "checkpoint requested\n" in log
    assert job.service("trainer")["last_exit_code"] == 0
    assert "forwarding SIGUSR1 to 1 running service(s)" in job.batch_log()


def test_scancel_of_a_service_ignoring_sigterm_still_ends_with_a_final_state(slurm, slurm_jobs,
                                                                             tmp_path):
    job = submit(tmp_path, slurm_jobs, HEAD + """\
  stubborn:
    command: trap 'echo ignoring TERM' TERM; echo trap set; while :; do sleep 0.1; done
""")
    assert wait_for_state(job.id, ("RUNNING",), timeout=60) == "RUNNING"
    # "running" is set when srun starts; scancelled before the step has set its trap, the service
    # would simply die of SIGTERM (seen on a loaded machine): wait for the trap itself.
    _wait_for_log(job, "stubborn", "trap set")

    subprocess.run(["scancel", job.id], check=True, timeout=30)

    assert wait_for_job(job.id, timeout=90) == "CANCELLED"
    state = _final_state(job)
    assert state["status"] == "cancelled"
    stubborn = job.service("stubborn")
    assert (stubborn["status"], stubborn["pid"]) == ("stopped", None)
    assert stubborn["finished_at"] is not None
    assert "did not stop within" in job.batch_log()
