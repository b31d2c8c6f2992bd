"""`run SERVICE -- COMMAND` against the real test cluster (real Pyxis 0.24 + Enroot 4.1.2 for containers).

Each test submits a one-off job through the real entry point and checks what a user sees: the
service's own output on stdout, its exit code as run's exit code, dependencies started behind their
readiness and stopped when the service ends, and the job tracked for status and logs.
"""
import json
import os
import uuid

import pytest

from slurm_support import (free_port, run_tool_cli, runtime_line, sacct_job, submitted_job_id,
                           wait_for_job)


@pytest.fixture
def marker():
    return "run-e2e-" + uuid.uuid4().hex[:8]


class Project(object):
    """A compose file in a fresh folder, and the tool run there."""

    def __init__(self, folder, text):
        self.folder = str(folder)
        with open(os.path.join(self.folder, "compose.yaml"), "w", encoding="utf-8") as handle:
            handle.write(text)

    def cli(self, *args):
        return run_tool_cli(list(args), cwd=self.folder, timeout=400)

    def run(self, slurm_jobs, *args):
        result = self.cli("run", *args)
        self.job_id = slurm_jobs.add(submitted_job_id(result.err))
        return result

    def state(self):
        path = os.path.join(self.folder, ".hpc-compose", self.job_id, "state.json")
        with open(path, encoding="utf-8") as handle:
            return dict((s["name"], s) for s in json.load(handle)["services"])

    def latest(self):
        with open(os.path.join(self.folder, ".hpc-compose", "latest.json"), encoding="utf-8") as handle:
            return json.load(handle)


PYXIS_STACK = """\
name: run-e2e
x-slurm:
  time: "00:05:00"
  cache_dir: %(cache_dir)s
%(runtime)sservices:
  server:
    image: %(image)s
    command: sleep 2; echo server-up-%(marker)s; exec python3 -m http.server %(port)s --bind 127.0.0.1
    readiness: {type: tcp, port: %(port)s, timeout_seconds: 60}
  client:
    image: %(image)s
    command: echo default-command
    depends_on:
      server: {condition: service_healthy}
"""


def pyxis_project(tmp_path, image, cache_dir, marker, runtime="pyxis"):
    port = free_port()
    project = Project(tmp_path, PYXIS_STACK % {"cache_dir": cache_dir, "image": image,
                                               "marker": marker, "port": port,
                                               "runtime": runtime_line(runtime)})
    project.port = port
    return project


def test_run_streams_the_commands_output_and_exits_with_its_code(slurm, slurm_jobs, image,
                                                                 cache_dir, marker, tmp_path,
                                                                 container_runtime):
    project = pyxis_project(tmp_path, image, cache_dir, marker, container_runtime)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("from-the-host\n")
    # The server sleeps 2 s before it listens: curl answers 200 only if run waited for readiness.
    result = project.run(
        slurm_jobs, "-e", "GREETING=hi 'there' $HOME", "-e", "PORT=%d" % project.port,
        "-v", "./data:/data:ro", "--workdir", "/data", "client", "--", "sh", "-c",
        'curl -s -o /dev/null -w "%{http_code}\\n" "http://127.0.0.1:$PORT/"; '
        'echo "$GREETING|$PWD"; cat in.txt; exit 3')
    assert result.code == 3, result
    # stdout is the service's log alone: no prefix, no dependency's lines, no tool chatter; srun's
    # own report of the failed task (its wording differs between Slurm releases) is part of it,
    # anywhere among the task's lines (srun writes it itself, beside the output it forwards).
    lines = result.out.splitlines()
    assert [l for l in lines if not l.startswith("srun: ")] == [
        "200", "hi 'there' $HOME|/data", "from-the-host"], result
    assert any(line.startswith("srun: ") for line in lines), result
    assert result.err.splitlines()[-1] == ("service 'client' exited with code 3 (job %s FAILED)"
                                           % project.job_id)
    assert wait_for_job(project.job_id) == "FAILED"
    row = sacct_job(project.job_id)
    assert (row["JobName"], row["ExitCode"]) == ("run-e2e-run-client", "3:0")
    state = project.state()
    assert (state["server"]["readiness"]["status"], state["server"]["status"]) == ("ready",
                                                                                   "stopped")
    assert (state["client"]["status"], state["client"]["last_exit_code"]) == ("failed", 3)
    assert "[server] server-up-" + marker in project.cli("logs").out


def test_detached_run_is_tracked_for_status_and_logs(slurm, slurm_jobs, image, cache_dir, marker,
                                                     tmp_path):
    project = pyxis_project(tmp_path, image, cache_dir, marker)
    result = project.run(slurm_jobs, "--detach", "--no-deps", "--name", marker, "client", "--",
                         "sh", "-c", "echo detached-%s; sleep 2" % marker)
    assert result.code == 0, result
    assert result.out == ""
    status = project.cli("status")
    assert status.code == 0, status
    assert "job %s\n" % project.job_id in status.out
    assert "  run:        service client, command sh -c 'echo detached-%s; sleep 2'\n" % marker \
        in status.out
    assert wait_for_job(project.job_id) == "COMPLETED"
    assert sacct_job(project.job_id)["JobName"] == marker
    logs = project.cli("logs", "--no-prefix")
    assert (logs.code, logs.out) == (0, "detached-%s\n" % marker), logs
    status = json.loads(project.cli("status", "--format", "json").out)
    assert status["run"] == {"service": "client",
                             "command": ["sh", "-c", "echo detached-%s; sleep 2" % marker]}
    assert [(s["name"], s["status"], s["last_exit_code"]) for s in status["services"]] == [
        ("client", "exited", 0)]
    assert project.latest()["job_id"] == project.job_id


def test_run_with_an_entrypoint_and_compose_habits(slurm, slurm_jobs, image, cache_dir, marker,
                                                   tmp_path):
    project = pyxis_project(tmp_path, image, cache_dir, marker)
    # --entrypoint 'sh -c' takes the command as its one argument; --rm and -T change nothing.
    result = project.run(slurm_jobs, "--rm", "-T", "--no-deps", "--entrypoint", "sh -c", "client",
                         "--", "echo entry-%s; exit 4" % marker)
    assert result.code == 4, result
    assert [l for l in result.out.splitlines() if not l.startswith("srun: ")] == [
        "entry-" + marker], result
    assert wait_for_job(project.job_id) == "FAILED"


HOST_STACK = """name: run-host
x-slurm:
  runtime: host
  time: "00:05:00"
services:
  server:
    command: sleep 2; exec python3 -m http.server %(port)s --bind 127.0.0.1
    readiness: {type: tcp, port: %(port)s, timeout_seconds: 60}
  broken:
    command: echo broken-%(marker)s; exit 5
    readiness: {type: tcp, port: %(unused)s, timeout_seconds: 30}
  task:
    command: ["echo", "default"]
    depends_on:
      server: {condition: service_healthy}
  blocked:
    command: ["echo", "never"]
    depends_on:
      broken: {condition: service_healthy}
"""


def host_project(tmp_path, marker):
    port = free_port()
    project = Project(tmp_path, HOST_STACK % {"port": port, "unused": free_port(),
                                              "marker": marker})
    project.port = port
    return project


def test_host_runtime_run_in_the_dependencys_environment(slurm, slurm_jobs, marker, tmp_path):
    project = host_project(tmp_path, marker)
    (tmp_path / "sub").mkdir()
    result = project.run(
        slurm_jobs, "-e", "X=%s" % marker, "--workdir", "sub", "task", "--", "python3", "-c",
        "import os, urllib.request; print(os.environ['X'], os.getcwd(), "
        "os.environ['HPC_COMPOSE_SERVICE']); "
        "print(urllib.request.urlopen('http://127.0.0.1:%d/').status)" % project.port)
    assert result.code == 0, result
    assert result.out == "%s %s task\n200\n" % (marker, tmp_path / "sub"), result
    assert result.err.splitlines()[-1] == "job %s COMPLETED" % project.job_id
    state = project.state()
    assert sorted(state) == ["server", "task"]
    assert state["server"]["status"] == "stopped"


def test_run_whose_dependency_fails_exits_1_as_up_does(slurm, slurm_jobs, marker, tmp_path):
    project = host_project(tmp_path, marker)
    result = project.run(slurm_jobs, "blocked", "--", "echo", "should-not-run")
    assert result.code == 1, result
    assert result.out == ""
    assert "error: job %s ended FAILED" % project.job_id in result.err
    assert "service 'broken' exited with code 5" in result.err
    assert project.state()["blocked"]["status"] == "stopped"
    # --no-deps leaves the broken dependency out: the command runs.
    result = project.run(slurm_jobs, "--no-deps", "blocked", "--", "echo", "ran-%s" % marker)
    assert (result.code, result.out) == (0, "ran-%s\n" % marker), result
