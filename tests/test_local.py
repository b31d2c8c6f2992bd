"""up --local: the launcher in the rendered script (srun, or local_step on this machine), the enroot
argv local_step makes of a Pyxis step, the ids and records of local runs, what status/ps/exec make of
them without a scheduler, preflight --local, and the errors of up --local.

Where enroot is needed, tests/standins/enroot (a STAND-IN that records its argv) is first on PATH;
the real enroot and the real runs are in tests/test_local_e2e.py.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import hpc_compose as hc
from test_render import runtime_plan, service

TESTS = os.path.dirname(os.path.abspath(__file__))
STANDINS = os.path.join(TESTS, "standins")


# --- render: one script, two launchers -------------------------------------------------------------

def test_every_service_starts_through_the_launch_array():
    script = hc.render_script(runtime_plan(service(), service("db", runtime="host",
                                                              execution=hc.Execution("exec", ("true",)))))
    for index in (0, 1):
        body = script[script.index("run_service_%d() {" % index):]
        body = body[:body.index("\n}\n")]
        assert '"${LAUNCH[@]}" \\\n' in body
        assert "$SRUN" not in body


def test_the_launcher_of_a_batch_script_is_srun_alone():
    script = hc.render_script(runtime_plan(service()))
    assert "LAUNCH=(\"$SRUN\")\n" in script
    assert "LAUNCHER" not in script and "local_step" not in script
    assert script.index("LAUNCH=(") < script.index("allocation_nodes=()")


def test_the_launcher_is_srun_unless_up_local_asks_for_this_machine():
    script = hc.render_script(runtime_plan(service()), local=True)
    assert "LAUNCHER=${HPC_COMPOSE_LAUNCHER:-srun}\n" in script
    assert "unset -v HPC_COMPOSE_LAUNCHER\n" in script
    assert "LAUNCH=(\"$SRUN\")" in script
    # Outside Slurm every service starts in a session of its own (setsid keeps its pid).
    assert "LAUNCH=(setsid \"$BASH\" -c 'local_step \"$@\"' hpc-compose-local \"$RUN_DIR/local\")" \
        in script
    # The launcher is chosen before the allocation facts and the first launch.
    assert script.index("LAUNCHER=${HPC_COMPOSE_LAUNCHER") < script.index("allocation_nodes=()")


def _local_step(script, tmp_path, *words, **env):
    """Run the script's local_step function with bash, the enroot STAND-IN first on PATH."""
    start = script.index("local_step() {")
    body = script[start:script.index("\n}\n", start) + 3]
    log = tmp_path / "enroot.jsonl"
    environment = dict(os.environ, PATH=STANDINS + os.pathsep + os.environ["PATH"],
                       ENROOT_STANDIN_LOG=str(log), ENROOT_DATA_PATH=str(tmp_path / "data"),
                       SLURM_JOB_ID="local-x", **env)
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "image.sqsh").write_text("an image file for the stand-in\n")
    words = [word.replace("/cache/base/redis.sqsh", str(tmp_path / "image.sqsh")) for word in words]
    proc = subprocess.run(["bash", "-c", body + 'local_step "$@"', "test", str(tmp_path / "conf")]
                          + list(words), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=environment, cwd=str(tmp_path))
    calls = [json.loads(line)["argv"] for line in log.read_text().splitlines()] \
        if log.exists() else []
    return proc, [call for call in calls if call != ["list"]]


def test_local_step_makes_enroot_create_and_start_of_the_pyxis_step(tmp_path):
    plan = runtime_plan(service(working_dir="/work", mounts=(hc.Mount("/data", "/in", "ro"),),
                                environment=(("GREETING", "hi"),)))
    words = [word.replace("${JOB_DIR}", "/jobs/7").replace("${SLURM_JOB_ID}", "local-x")
             for word in hc.service_srun_argv(plan, 0)]
    proc, calls = _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    assert proc.returncode == 0, proc.stderr
    name = "pyxis_hpc-compose_local-x_app"
    conf = str(tmp_path / "conf" / "hpc-compose_local-x_app.conf")
    assert calls[0] == ["create", "--name", name, str(tmp_path / "image.sqsh")]
    assert calls[1] == (["start", "--conf", conf,
                         "--mount", "/jobs/7:/hpc-compose/job:none:x-create=auto,rbind",
                         "--mount", "/data:/in:none:x-create=auto,rbind,ro"]
                        + sum((["--env", n] for n in hc._env_names(plan, plan.plan.services[0])), [])
                        + ["--env", "HPC_COMPOSE_LOCAL_RUN", name, "/bin/sh", "-c", 'exec "$@"', "hpc-compose",
                           "redis-server", "--port", "6380"])


def test_local_step_conf_changes_to_the_workdir_and_skips_the_entrypoint_as_pyxis(tmp_path):
    plan = runtime_plan(service(working_dir="/it's here"))
    words = [w.replace("${JOB_DIR}", "/j").replace("${SLURM_JOB_ID}", "local-x")
             for w in hc.service_srun_argv(plan, 0)]
    proc, _ = _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    assert proc.returncode == 0, proc.stderr
    conf = (tmp_path / "conf" / "hpc-compose_local-x_app.conf").read_text()
    # What enroot's hooks() writes, run here with ENROOT_ROOTFS pointing at an empty root.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["bash", "-c", conf + "\nhooks"], check=True, env=dict(os.environ,
                                                                         ENROOT_ROOTFS=str(root)))
    assert (root / "etc" / "rc.local").read_text() == "cd -- '/it'\\''s here' || exit 1\nexec \"$@\"\n"
    assert (root / "etc" / "rc").read_text() == '. /etc/rc.local\nexec "$@"\n'
    # The rc.local runs under the image's /bin/sh: it reaches the directory and runs the command.
    os.makedirs(str(tmp_path / "it's here"))
    rc_local = (root / "etc" / "rc.local").read_text().replace("/it", str(tmp_path) + "/it", 1)
    out = subprocess.run(["sh", "-c", rc_local, "sh", "pwd"], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    assert out == str(tmp_path / "it's here") + "\n"


def test_local_step_keeps_the_image_entrypoint_when_asked(tmp_path):
    plan = runtime_plan(service(execution=hc.Execution("exec", ("serve",), use_image_entrypoint=True)))
    words = [w.replace("${JOB_DIR}", "/j").replace("${SLURM_JOB_ID}", "local-x")
             for w in hc.service_srun_argv(plan, 0)]
    proc, calls = _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    assert proc.returncode == 0, proc.stderr
    assert "--conf" not in calls[-1]  # no workdir, entrypoint kept: /etc/rc as the image made it
    assert calls[-1][-2:] == ["pyxis_hpc-compose_local-x_app", "serve"]


def test_local_step_reuses_an_existing_container_as_a_named_pyxis_container(tmp_path):
    plan = runtime_plan(service())
    words = [w.replace("${JOB_DIR}", "/j").replace("${SLURM_JOB_ID}", "local-x")
             for w in hc.service_srun_argv(plan, 0)]
    _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    (tmp_path / "enroot.jsonl").unlink()
    _, calls = _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    assert [call[0] for call in calls] == ["start"]


def test_local_step_runs_a_host_service_directly_without_the_slurm_job_id(tmp_path):
    plan = runtime_plan(service(runtime="host", working_dir=str(tmp_path),
                                execution=hc.Execution("shell", script='echo "$PWD|${SLURM_JOB_ID-unset}"')))
    words = hc.service_srun_argv(plan, 0)
    proc, calls = _local_step(hc.render_script(plan, local=True), tmp_path, *words)
    assert (proc.returncode, proc.stdout) == (0, "%s|unset\n" % tmp_path)
    assert calls == []


def test_local_step_skips_the_scheduling_options(tmp_path):
    plan = runtime_plan(service(runtime="host", execution=hc.Execution("exec", ("echo", "ran")),
                                cpus_per_task=4, gres="gpu:1", extra_srun_args=("--mpi=pmix",)))
    proc, _ = _local_step(hc.render_script(plan, local=True), tmp_path,
                          *hc.service_srun_argv(plan, 0))
    assert (proc.returncode, proc.stdout) == (0, "ran\n")


# --- ids, plan checks, state ---------------------------------------------------------------------

def test_a_local_run_outside_slurm_is_named_by_utc_time_and_pid():
    job_id = hc._local_job_id("machine", {}, now=0, pid=42)
    assert job_id == "local-19700101T000000Z-42"
    assert hc._is_job_id(job_id) and hc._is_job_id("123")
    assert not hc._is_job_id("local-x") and not hc._is_job_id("12a")


def test_inside_an_allocation_the_run_takes_its_job_id():
    assert hc._local_mode({"SLURM_JOB_ID": "77"}) == "allocation"
    assert hc._local_mode({}) == "machine"
    assert hc._local_job_id("allocation", {"SLURM_JOB_ID": "77"}) == "77"


def test_slurm_jobs_sort_by_number_before_local_runs_by_time():
    ids = ["local-20260101T000000Z-9", "10", "9", "local-20250101T000000Z-1"]
    assert sorted(ids, key=hc._job_id_order) == ["9", "10", "local-20250101T000000Z-1",
                                                 "local-20260101T000000Z-9"]


def test_what_cannot_run_outside_slurm_is_named():
    plan = runtime_plan(service(placement=hc.Placement("distributed", 2, None)),
                        service("b", runtime="host", execution=hc.Execution("exec", ("true",)),
                                extra_srun_args=("--export", "ALL")), nodes=2).plan
    problems = hc._local_plan_problems(plan, "machine")
    assert problems[0].startswith("x-slurm.nodes is 2, but outside Slurm there is one machine")
    assert problems[1].startswith("service 'app' runs several tasks")
    assert problems[2].startswith("service 'b' has x-slurm srun_args with a separate value (ALL)")
    assert hc._local_plan_problems(plan, "allocation") == []


def _record(tmp_path, job_id="local-20260101T000000Z-1", state=None, pid=None, runtime="host"):
    job_dir = tmp_path / ".hpc-compose" / job_id
    (job_dir / "logs").mkdir(parents=True)
    record = {"job_id": job_id, "job_dir": str(job_dir), "project_dir": str(tmp_path),
              "compose_file": str(tmp_path / "compose.yaml"), "local": "machine",
              "local_host": socket.gethostname(), "local_pid": pid, "submitted_at": 1,
              "services": [{"name": "app", "token": "app", "runtime": runtime,
                            "log_path": str(job_dir / "logs" / "app.log")}]}
    (tmp_path / ".hpc-compose" / "jobs").mkdir()
    for path in (tmp_path / ".hpc-compose" / "jobs" / (job_id + ".json"),
                 tmp_path / ".hpc-compose" / "latest.json"):
        path.write_text(json.dumps(record))
    if state is not None:
        (job_dir / "state.json").write_text(json.dumps(state))
    return record


def _state(status, service_status="running", pid=None, exit_code=None):
    return {"schema_version": 2, "job_id": "x", "status": status, "exit_code": exit_code,
            "reason": "because" if exit_code else None, "attempt": 0,
            "services": [{"name": "app", "token": "app", "status": service_status, "pid": pid,
                          "last_exit_code": None, "placement": {"nodelist": "here"}}]}


def test_a_local_run_state_comes_from_its_state_json(tmp_path):
    record = _record(tmp_path, state=_state("failed", "failed", exit_code=3))
    assert hc._local_run_state(record) == hc.SchedulerState(
        "FAILED", "state.json", reason="because", exit_code="3:0")


def test_a_running_local_run_whose_script_is_gone_has_failed(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    record = _record(tmp_path, state=_state("running"), pid=proc.pid)
    state = hc._local_run_state(record)
    assert (state.state, state.reason) == (
        "FAILED", "its batch script (pid %d) ended without a final state.json" % proc.pid)
    record["local_pid"] = os.getpid()
    assert hc._local_run_state(record).state == "RUNNING"


def test_status_of_a_local_run_never_asks_the_scheduler(tmp_path, cli):
    _record(tmp_path, state=_state("completed", "exited", exit_code=0))
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    result = cli(["status", "-f", str(tmp_path / "compose.yaml"), "--squeue-bin", "/nonexistent",
                  "--sacct-bin", "/nonexistent", "--format", "json"])
    assert result.code == 0, result
    status = json.loads(result.out)
    assert status["scheduler"]["state"] == "COMPLETED"
    assert status["scheduler"]["source"] == "state.json"
    assert status["scheduler_warning"] is None
    result = cli(["logs", "--follow", "-f", str(tmp_path / "compose.yaml"),
                  "--squeue-bin", "/nonexistent"])
    assert (result.code, result.err) == (0, "")


def test_job_id_option_takes_a_local_run_id(tmp_path, cli):
    _record(tmp_path, state=_state("completed", "exited", exit_code=0))
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    result = cli(["ps", "-f", str(tmp_path / "compose.yaml"), "--job-id", "local-20260101T000000Z-1"])
    assert result.code == 0 and "COMPLETED (state.json)" in result.out, result
    result = cli(["ps", "-f", str(tmp_path / "compose.yaml"), "--job-id", "local-nope"])
    assert result.code == 2
    assert "--job-id must be a numeric Slurm job id (or the local-... id" in result.err


# --- exec into a local run outside Slurm ------------------------------------------------------------

def _wait_for_exec(pid, variable, timeout=10.0):
    """Wait until ``pid`` runs its new program: between fork and exec, /proc/PID/environ is still
    the parent's (a loaded machine showed the test reading it there)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            if variable in handle.read().split(b"\0"):
                return
        time.sleep(0.01)
    raise AssertionError("process %d did not exec within %g s" % (pid, timeout))


def test_exec_into_a_local_host_service_takes_its_environment_and_directory(tmp_path, cli):
    service_process = subprocess.Popen(["sleep", "60"], cwd=str(tmp_path),
                                       env={"PATH": os.environ["PATH"], "COLOR": "blue"})
    try:
        _wait_for_exec(service_process.pid, b"COLOR=blue")
        _record(tmp_path, state=_state("running", pid=service_process.pid), pid=os.getpid())
        (tmp_path / "compose.yaml").write_text("services: {}\n")
        out = tmp_path / "out.txt"
        result = cli(["exec", "-T", "-e", "EXTRA=a b", "-f", str(tmp_path / "compose.yaml"), "app",
                      "--", "sh", "-c", 'echo "$COLOR|$EXTRA|$PWD" >%s; exit 4' % out])
        assert result.code == 4, result
        assert out.read_text() == "blue|a b|%s\n" % tmp_path
    finally:
        service_process.kill()
        service_process.wait()


def test_exec_into_a_local_run_that_ended_says_so(tmp_path, cli):
    _record(tmp_path, state=_state("cancelled", "stopped", exit_code=130))
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    result = cli(["exec", "-T", "-f", str(tmp_path / "compose.yaml"), "app", "true"])
    assert (result.code, result.err) == (
        1, "error: job local-20260101T000000Z-1 is not running (CANCELLED)\n")


def test_exec_into_a_local_container_is_enroot_exec_of_its_pid():
    argv = hc._local_exec_argv(123, ["ls"], [("A", "1")], "/w", "enroot")
    assert argv[:3] == ["enroot", "exec", "123"]
    assert argv[3:5] == ["/bin/sh", "-c"]
    assert argv[6:] == ["hpc-compose-exec", "", "/w", "env", "A=1", "ls"]


# --- up --local and preflight --local: refusals and checks --------------------------------------------

HOST_COMPOSE = """\
name: local-unit
services:
  app:
    x-slurm: {runtime: host}
    command: ["true"]
"""


def test_up_local_refuses_after(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE)
    result = cli(["up", "--local", "-f", path, "--after", "12"])
    assert (result.code, result.err) == (2, "error: --after waits for another job in the queue; up "
                                            "--local starts at once and never uses sbatch\n")


def test_up_local_refuses_a_job_array(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE.replace("services:", "x-slurm: {array: 1-3}\nservices:"))
    result = cli(["up", "--local", "-f", path], env={"SLURM_JOB_ID": ""})
    assert result.code == 2, result
    assert result.err.startswith("error: up --local cannot run %s outside Slurm: x-slurm.array "
                                 "makes a job array, which only sbatch can start" % path)


def test_up_local_warns_of_the_settings_only_sbatch_acts_on(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE.replace(
        "services:", "x-slurm:\n  dependency: afterok:12\n  submit_args: [--hold]\n  requeue: true\n"
                     "services:"))
    result = cli(["up", "--local", "--dry-run", "--no-preflight", "-f", path],
                 env={"SLURM_JOB_ID": ""})
    assert result.code == 0, result
    assert "warning: up --local does not use x-slurm dependency, submit_args, requeue: only sbatch " \
           "acts on them (the job starts at once, on this machine)\n" in result.err
    plain = cli(["up", "--local", "--dry-run", "--no-preflight", "-f",
                 project.write("plain.yaml", HOST_COMPOSE)], env={"SLURM_JOB_ID": ""})
    assert plain.code == 0 and "warning" not in plain.err, plain



@pytest.mark.parametrize("job_id, has_local_step", [("", True), ("4242", False)],
                         ids=["outside-slurm", "in-an-allocation"])
def test_up_local_writes_local_step_only_into_a_script_that_runs_outside_slurm(
        project, cli, job_id, has_local_step):
    path = project.write("compose.yaml", HOST_COMPOSE)
    result = cli(["up", "--local", "--dry-run", "--no-preflight", "-f", path],
                 env={"SLURM_JOB_ID": job_id})
    assert result.code == 0, result
    script = (project.root / "hpc-compose.sbatch").read_text()
    assert ("\nlocal_step() {\n" in script) is has_local_step
    assert ("LAUNCHER=${HPC_COMPOSE_LAUNCHER:-srun}\n" in script) is has_local_step

def test_a_second_up_local_of_a_project_in_the_same_allocation_is_refused(project, cli):
    import fcntl
    path = project.write("compose.yaml", HOST_COMPOSE)
    root = project.root / ".hpc-compose"
    root.mkdir()
    with open(str(root / ".4242.local-lock"), "a") as held:  # the first run's lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = cli(["up", "--local", "--no-preflight", "-f", path], env={"SLURM_JOB_ID": "4242"})
    assert result.code == 2, result
    assert result.err.startswith("error: a local run of %s is already running in allocation 4242; "
                                 "a second one would share its job directory\n  hint: wait for it "
                                 "to end" % path), result
    assert not (root / "jobs").exists() and not (project.root / "slurm-4242.out").exists()


def test_preflight_local_outside_slurm_needs_no_sbatch_nor_srun(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE)
    result = cli(["preflight", "--local", "--verbose", "-f", path, "--sbatch-bin", "/no/sbatch",
                  "--srun-bin", "/no/srun", "--format", "json"], env={"SLURM_JOB_ID": ""})
    assert result.code == 0, result
    checks = dict((f["check"], f["level"]) for f in json.loads(result.out)["findings"])
    assert "binary.sbatch" not in checks and "binary.srun" not in checks
    assert checks["local.mode"] == "ok" and checks["binary.bash"] == "ok"


def test_preflight_local_reports_an_enroot_that_cannot_list(project, cli, tmp_path):
    broken = tmp_path / "enroot"
    broken.write_text("#!/bin/sh\necho 'enroot: cannot create /runtime: Permission denied' >&2\nexit 1\n")
    broken.chmod(0o755)
    (tmp_path / "app.sqsh").write_text("an image file\n")
    path = project.write("compose.yaml", "services:\n  app:\n    image: %s\n" % (tmp_path / "app.sqsh"))
    result = cli(["preflight", "--local", "-f", path, "--enroot-bin", str(broken), "--format",
                  "json"], env={"SLURM_JOB_ID": ""})
    assert result.code == 1
    finding = [f for f in json.loads(result.out)["findings"] if f["check"] == "local.enroot"][0]
    assert finding["level"] == "error"
    assert finding["message"] == "'%s list' failed: enroot: cannot create /runtime: Permission denied" % broken


def test_up_local_flag_is_in_the_completions():
    table = hc._completion_table()
    assert "--local" in table["up"] and "--local" in table["preflight"]


def test_exec_into_a_container_still_starting_says_so(tmp_path, cli):
    # A process in our own mount namespace is not inside a container yet (enroot start runs).
    starting = subprocess.Popen(["sleep", "60"])
    try:
        _record(tmp_path, state=_state("running", pid=starting.pid), pid=os.getpid(), runtime="pyxis")
        (tmp_path / "compose.yaml").write_text("services: {}\n")
        result = cli(["exec", "-T", "-f", str(tmp_path / "compose.yaml"), "app", "true"])
        assert (result.code, result.err) == (
            1, "error: service 'app' of job local-20260101T000000Z-1 is still starting its "
               "container (enroot create/start); try again in a moment\n")
    finally:
        starting.kill()
        starting.wait()


def test_a_sigterm_to_up_local_is_passed_on_to_the_batch_script_once(tmp_path):
    import io
    import signal
    import threading
    script = subprocess.Popen(["bash", "-c", 'trap "echo got TERM; exit 42" TERM; '
                               'while :; do sleep 0.1; done'], stdout=subprocess.PIPE,
                              universal_newlines=True)
    follower = hc._LogFollower([])
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert hc._follow_local_run(script, follower, io.StringIO()) == 42
    assert script.stdout.read() == "got TERM\n"
    assert signal.getsignal(signal.SIGTERM) == before  # our own handling ends with the run


# --- where the batch script of a run inside an allocation runs --------------------------------------

def test_outside_slurm_the_batch_script_runs_here_with_bash():
    assert hc._local_batch_argv("machine", "/p/job.sbatch") == (["bash", "/p/job.sbatch"], False)


def test_in_a_shell_that_is_a_step_the_batch_script_runs_here_after_the_prelude():
    argv, in_step = hc._local_batch_argv("allocation", "/p/job.sbatch", "srun",
                                         {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n2"})
    assert argv == ["bash", "-c", hc._ALLOCATION_PRELUDE, "hpc-compose-batch", "/p/job.sbatch", ""]
    assert in_step is False


def test_in_salloc_s_shell_the_batch_script_is_a_step_on_the_first_node():
    argv, in_step = hc._local_batch_argv("allocation", "/p/job.sbatch", "/opt/srun",
                                         {"SLURM_JOB_ID": "7"}, pid_file="/p/.7.batch-pid")
    assert argv == ["/opt/srun", "--overlap", "--nodes=1", "--ntasks=1", "--relative=0",
                    "--job-name=hpc-compose-batch", "--kill-on-bad-exit=1", "--quiet",
                    "bash", "-c", hc._ALLOCATION_PRELUDE, "hpc-compose-batch", "/p/job.sbatch",
                    "/p/.7.batch-pid"]
    assert in_step is True


class _Process(object):
    terminated = False

    def terminate(self):
        self.terminated = True


def _recording_srun(tmp_path):
    """A STAND-IN srun that records its arguments (the real one: tests/test_multinode_e2e.py and
    tests/test_local_e2e.py); returns its path and the file of its calls."""
    log = tmp_path / "calls"
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/sh\necho "srun $*" >> %s\n' % log)
    os.chmod(str(srun), 0o755)
    return srun, log


def test_the_batch_step_gets_sigterm_at_its_pid_through_a_step_on_its_node(tmp_path):
    srun, log = _recording_srun(tmp_path)
    pid_file = tmp_path / "pid"
    process = _Process()
    pass_on = hc._batch_step_pass_on("7", str(pid_file), process, str(srun))
    pass_on(2)  # before the script wrote its pid: srun itself is stopped
    assert process.terminated and not log.exists()
    pid_file.write_text("4242\n")
    process = _Process()
    hc._batch_step_pass_on("7", str(pid_file), process, str(srun))(2)
    assert not process.terminated
    assert log.read_text() == ("srun --jobid=7 --overlap --nodes=1 --ntasks=1 --relative=0 "
                               "--job-name=hpc-compose-batch-signal --quiet kill -TERM 4242\n")


def test_the_prelude_gives_the_script_the_allocation_s_variables_not_the_step_s(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text('for v in SLURM_NTASKS SLURM_STEP_ID SLURM_STEPID SLURM_NNODES SLURM_NODELIST '
                      'SLURM_PROCID SLURM_PTY_PORT SLURM_CPU_BIND_TYPE SLURM_JOB_ID; do '
                      'echo "$v=${!v-unset}"; done\n')
    step = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "n[1-3]",
            "SLURM_NNODES": "1", "SLURM_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEPID": "0", "SLURM_PROCID": "0", "SLURM_PTY_PORT": "4242",
            "SLURM_CPU_BIND_TYPE": "mask_cpu:", "PATH": os.environ["PATH"]}
    result = subprocess.run(["bash", "-c", hc._ALLOCATION_PRELUDE, "hpc-compose-batch", str(script),
                             str(tmp_path / "pid")],
                            env=step, stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert (tmp_path / "pid").read_text().strip().isdigit()
    assert result.stdout.splitlines() == [
        "SLURM_NTASKS=unset", "SLURM_STEP_ID=unset", "SLURM_STEPID=unset", "SLURM_NNODES=3",
        "SLURM_NODELIST=n[1-3]", "SLURM_PROCID=unset", "SLURM_PTY_PORT=unset",
        "SLURM_CPU_BIND_TYPE=unset", "SLURM_JOB_ID=7"]


def test_a_signal_is_passed_on_by_the_forwarder_given(tmp_path):
    import io
    import signal
    import threading
    script = subprocess.Popen(["bash", "-c", 'trap "echo got TERM; exit 43" TERM; '
                               'while :; do sleep 0.1; done'], stdout=subprocess.PIPE,
                              universal_newlines=True)
    received = []

    def forward(number):
        received.append(number)
        script.terminate()
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    assert hc._follow_local_run(script, hc._LogFollower([]), io.StringIO(), forward) == 43
    assert script.stdout.read() == "got TERM\n"
    assert received == [signal.SIGINT]


# --- outside Slurm nothing of a run stays (issue 29) -----------------------------------------------

def _function(script, name):
    start = script.index("%s() {" % name)
    return script[start:script.index("\n}\n", start) + 3]


def _sleeper(environment, seconds="300"):
    """A process of our own with ``environment`` added to ours (killed by the test if still alive)."""
    return subprocess.Popen(["sleep", seconds], env=dict(os.environ, **environment))


def test_outside_slurm_a_service_is_signalled_as_its_whole_session():
    script = hc.render_script(runtime_plan(service()), local=True)
    body = _function(script, "signal_service")
    assert 'kill -"$1" "${PID[$2]}" 2>/dev/null' in body            # srun
    assert 'kill -"$1" -- "-${PID[$2]}" 2>/dev/null' in body        # local_step's session
    # What a service leaves ends with it, before its first process is reaped.
    watch = _function(script, "watch_service")
    assert watch.index('end_service "$i"') < watch.index('wait "${PID[i]}"')


def test_stop_leftovers_kills_the_run_s_processes_and_spares_the_script_and_other_runs(tmp_path):
    script = hc.render_script(runtime_plan(service()), local=True)
    run = {"HPC_COMPOSE_LOCAL_RUN": str(tmp_path / "run-1")}
    service_one = _sleeper(dict(run, HPC_COMPOSE_SERVICE="one"))
    service_two = _sleeper(dict(run, HPC_COMPOSE_SERVICE="two"))
    other_run = _sleeper({"HPC_COMPOSE_LOCAL_RUN": str(tmp_path / "run-2")})
    try:
        def stop(*words):
            proc = subprocess.run(["bash", "-c", _function(script, "stop_leftovers")
                                   + 'stop_leftovers "$@"; echo script alive', "test"] + list(words),
                                  env=dict(os.environ, **run), stdout=subprocess.PIPE,
                                  universal_newlines=True, timeout=60)
            assert proc.stdout == "script alive\n"
        stop("one")
        assert service_one.wait(timeout=10) == -9 and service_two.poll() is None
        stop()
        assert service_two.wait(timeout=10) == -9 and other_run.poll() is None
    finally:
        for process in (service_one, service_two, other_run):
            process.kill()
            process.wait()


def test_a_run_s_processes_are_found_by_its_variable_with_their_service(tmp_path):
    job_dir = str(tmp_path / ".hpc-compose" / "local-20260101T000000Z-1")
    server = _sleeper({"HPC_COMPOSE_LOCAL_RUN": job_dir, "HPC_COMPOSE_SERVICE": "web"}, "301")
    script = _sleeper({"HPC_COMPOSE_LOCAL_RUN": job_dir}, "302")
    elsewhere = _sleeper({"HPC_COMPOSE_LOCAL_RUN": "/elsewhere/.hpc-compose/local-x"})
    try:
        found = hc._local_run_processes(str(tmp_path))
        assert sorted(found) == sorted([
            hc._RunProcess(server.pid, "local-20260101T000000Z-1", "web", "sleep 301"),
            hc._RunProcess(script.pid, "local-20260101T000000Z-1", None, "sleep 302")])
        assert sorted(hc._format_run_process(process) for process in found) == sorted([
            "pid %d (service 'web': sleep 301)" % server.pid, "pid %d (sleep 302)" % script.pid])
    finally:
        for process in (server, script, elsewhere):
            process.kill()
            process.wait()


def test_a_run_its_up_local_still_follows_is_no_leftover(tmp_path):
    import fcntl
    root = tmp_path / ".hpc-compose"
    root.mkdir()
    sleeper = _sleeper({"HPC_COMPOSE_LOCAL_RUN": str(root / "local-20260101T000000Z-1")})
    try:
        with open(str(root / ".local-20260101T000000Z-1.local-lock"), "a") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            assert hc._local_leftovers(str(tmp_path)) == {}
            # ... unless it is the run whose lock the caller holds (a new run in the same allocation)
            assert list(hc._local_leftovers(str(tmp_path), ours="local-20260101T000000Z-1")) == [
                "local-20260101T000000Z-1"]
        assert [p.pid for p in hc._local_leftovers(str(tmp_path))["local-20260101T000000Z-1"]] == [
            sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_up_local_names_what_an_earlier_run_left_instead_of_starting(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE)
    left = _sleeper({"HPC_COMPOSE_LOCAL_RUN": str(project.root / ".hpc-compose" / "local-1"),
                     "HPC_COMPOSE_SERVICE": "app"})
    try:
        result = cli(["up", "--local", "--no-preflight", "-f", path], env={"SLURM_JOB_ID": ""})
    finally:
        left.kill()
        left.wait()
    assert result.code == 1, result
    assert result.err.startswith(
        "error: cannot start %s here: job local-1, which no up --local follows any more, left pid "
        "%d (service 'app': sleep 300) running\n  hint: 'hpc-compose clean -f %s --age DAYS' (or "
        "--all) stops what earlier local runs of it left" % (path, left.pid, path)), result
    assert not (project.root / ".hpc-compose" / "jobs").exists()


def test_up_local_names_the_process_on_a_port_a_readiness_checks(project, cli):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        path = project.write("compose.yaml", HOST_COMPOSE.replace(
            'command: ["true"]', 'command: ["true"]\n    readiness: {type: tcp, port: %d}' % port))
        result = cli(["up", "--local", "--no-preflight", "-f", path], env={"SLURM_JOB_ID": ""})
    assert result.code == 1, result
    assert result.err.startswith(
        "error: cannot start %s here: port %d, which the readiness of service 'app' checks, is "
        "taken by pid %d (" % (path, port, os.getpid())), result


def test_clean_stops_what_a_local_run_left(project, cli):
    path = project.write("compose.yaml", HOST_COMPOSE)
    left = _sleeper({"HPC_COMPOSE_LOCAL_RUN": str(project.root / ".hpc-compose" / "local-1")})
    try:
        result = cli(["clean", "-f", path, "--age", "30", "--format", "json"])
        assert left.wait(timeout=10) == -9
    finally:
        left.kill()
        left.wait()
    assert result.code == 0, result
    report = json.loads(result.out)
    assert (report["stopped"], report["containers_removed"]) == ({"local-1": [left.pid]}, [])


def test_the_batch_script_gets_sigterm_when_up_local_dies(tmp_path):
    # A stand-in for up --local: it starts the "batch script" as _run_local does, then is SIGKILLed.
    code = ("import subprocess, sys, os, signal, time; sys.path.insert(0, %r); import hpc_compose as hc\n"
            "subprocess.Popen(['bash', '-c', 'trap \"echo got TERM >%s; exit\" TERM; echo started >%s; "
            "while :; do sleep 0.1; done'], start_new_session=True, "
            "preexec_fn=hc._local_batch_preexec(tied=True))\n"
            "while not os.path.exists(%r): time.sleep(0.05)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n") % (
        os.path.dirname(TESTS), tmp_path / "got", tmp_path / "started", str(tmp_path / "started"))
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    deadline = time.monotonic() + 10
    while not (tmp_path / "got").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "got").read_text() == "got TERM\n"


def test_in_an_allocation_the_batch_script_an_up_local_left_gets_sigterm_first(tmp_path):
    srun, log = _recording_srun(tmp_path)
    pid_file = tmp_path / ".7.batch-pid"
    pid_file.write_text("4242\n")
    said = []
    hc._stop_orphaned_batch_script("7", str(pid_file), str(tmp_path / "7"), str(srun), said.append,
                                   timeout=0.2)
    assert log.read_text() == ("srun --jobid=7 --overlap --nodes=1 --ntasks=1 --relative=0 "
                               "--job-name=hpc-compose-batch-signal --quiet kill -TERM 4242\n")
    assert said == ["stopping the earlier run in allocation 7, whose up --local has gone (its "
                    "batch script, pid 4242, tears down)"]
    assert not pid_file.exists()
    # One whose state.json is final has ended: nothing to stop.
    log.unlink()
    pid_file.write_text("4242\n")
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "state.json").write_text('{"status": "completed"}')
    hc._stop_orphaned_batch_script("7", str(pid_file), str(tmp_path / "7"), str(srun), said.append,
                                   timeout=0.2)
    assert not log.exists() and not pid_file.exists()
