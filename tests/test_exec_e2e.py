"""`exec` and `logs` against the real test cluster (real Pyxis 0.24 + Enroot 4.1.2 for containers, and
real Apptainer 1.4.5 where the cluster has it: the tests on ``container_job`` run under both).

CI runs this file on one node; exec on several nodes (`--index`, `--node`, a service on a node that
is not the first) is in test_multinode_e2e.py.
"""
import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from slurm_support import (enroot_containers, job_processes, run_tool_cli, runtime_line,
                           wait_for_job, wait_for_state)

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hpc_compose.py")


class Job(object):
    def __init__(self, folder, job_id, env):
        self.folder = folder
        self.job_id = job_id
        self.env = env
        self.job_dir = os.path.join(folder, ".hpc-compose", job_id)

    def cli(self, *args, **kwargs):
        return run_tool_cli(list(args), cwd=self.folder, env=self.env, **kwargs)

    def service(self, name):
        try:
            with open(os.path.join(self.job_dir, "state.json")) as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            return {}
        return ([s for s in state["services"] if s["name"] == name] or [{}])[0]

    def log(self, name):
        try:
            with open(os.path.join(self.job_dir, "logs", name + ".log")) as handle:
                return handle.read()
        except OSError:
            return ""


def submit(tmp_path, text, slurm_jobs, env=None):
    (tmp_path / "compose.yaml").write_text(text)
    result = run_tool_cli(["submit", "-f", "compose.yaml", "--format", "json"], cwd=str(tmp_path),
                          env=env)
    assert result.code == 0, result
    job_id = str(json.loads(result.out)["job_id"])
    slurm_jobs.add(job_id)
    assert wait_for_state(job_id, ("RUNNING",), timeout=120) == "RUNNING"
    return Job(str(tmp_path), job_id, env)


def wait_for_line(job, name, text, timeout=180):
    deadline = time.monotonic() + timeout
    while text not in job.log(name):
        assert time.monotonic() < deadline, "no %r in %s's log: %r" % (text, name, job.log(name))
        time.sleep(0.5)


def _nodes():
    """The test cluster's node names, in sinfo order."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], stdout=subprocess.PIPE,
                         universal_newlines=True, timeout=30).stdout.split()
    return sorted(set(out), key=out.index)


def in_squeue(job_id):
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30).stdout
    return bool(out.strip())


def job_containers(job_id):
    """``[(node, name)]`` of this job's named containers left on any node."""
    return [(node, name) for node in _nodes() for name in enroot_containers(node)
            if "hpc-compose_%s_" % job_id in name]


def container_compose(image, cache_dir, marker, runtime="pyxis"):
    return """\
name: exec-e2e
x-slurm:
  time: "00:05:00"
  cache_dir: %s
%sservices:
  app:
    image: %s
    working_dir: /tmp
    environment:
      GREETING: "hello 'there' $$HOME"
    command: touch /tmp/%s && exec python3 -c 'import time; print("up", flush=True); time.sleep(600)'
""" % (cache_dir, runtime_line(runtime), image, marker)


@pytest.fixture
def container_job(slurm, slurm_jobs, image, cache_dir, tmp_path, container_runtime):
    marker = "exec-e2e-" + uuid.uuid4().hex[:8]
    job = submit(tmp_path, container_compose(image, cache_dir, marker, container_runtime),
                 slurm_jobs)
    wait_for_line(job, "app", "up")
    job.marker = marker
    job.runtime = container_runtime
    return job


def test_exec_runs_in_the_running_container_with_its_environment_and_exit_code(container_job):
    result = container_job.cli("exec", "-T", "app", "--", "sh", "-c",
                           'echo "$GREETING|$PWD|$HPC_COMPOSE_SERVICE"; exit 3')
    assert result.code == 3, result
    assert result.out == "hello 'there' $HOME|/tmp|app\n"
    # It is inside the same container: it sees the file the service made in its private /tmp.
    result = container_job.cli("exec", "-T", "-e", "EXTRA=a b", "-e", "MARKER=" + container_job.marker,
                           "--workdir", "/", "app", "--",
                           "sh", "-c", 'echo "$EXTRA|$PWD"; ls "/tmp/$MARKER"')
    assert (result.code, result.out) == (0, "a b|/\n/tmp/%s\n" % container_job.marker), result


def test_exec_without_a_command_reads_a_shell_script_from_a_pipe(container_job):
    proc = subprocess.run(["python3", TOOL, "exec", "app"], cwd=container_job.folder,
                          input="echo from $0 in $PWD; exit 5\n", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "from bash in /tmp\n"


def test_exec_gives_a_terminal_with_pty(container_job):
    if shutil.which("script") is None:
        pytest.skip("script(1) is needed to run exec on a terminal")
    command = "python3 %s exec --pty app -- sh -c 'test -t 0 && echo tty:yes'" % TOOL
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=container_job.folder,
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0 and "tty:yes" in proc.stdout, proc.stdout


def test_named_containers_are_removed_when_the_job_is_cancelled(container_job):
    # Pyxis names the service's container (exec joins it); an apptainer service has none.
    assert (job_containers(container_job.job_id) != []) == (container_job.runtime == "pyxis")
    subprocess.run(["scancel", container_job.job_id], check=True, timeout=30)
    assert wait_for_job(container_job.job_id, timeout=120) == "CANCELLED"
    deadline = time.monotonic() + 60
    while job_containers(container_job.job_id) and time.monotonic() < deadline:
        time.sleep(1)
    assert job_containers(container_job.job_id) == []
    while job_processes(container_job.job_id, container_job.folder) and time.monotonic() < deadline:
        time.sleep(1)
    assert job_processes(container_job.job_id, container_job.folder) == []
    # Until its steps are gone squeue shows the job COMPLETING, and exec names that state.
    while in_squeue(container_job.job_id) and time.monotonic() < deadline + 60:
        time.sleep(0.5)
    result = container_job.cli("exec", "-T", "app", "true")
    assert result.code == 1
    assert result.err == "error: job %s is not running (CANCELLED)\n" % container_job.job_id


def test_named_containers_are_removed_when_the_job_completes(slurm, slurm_jobs, image, cache_dir,
                                                             tmp_path):
    job = submit(tmp_path, """\
name: exec-e2e-done
x-slurm: {time: "00:05:00", cache_dir: %s}
services:
  app:
    image: %s
    command: echo done
""" % (cache_dir, image), slurm_jobs)
    assert wait_for_job(job.job_id, timeout=240) == "COMPLETED"
    assert "done" in job.log("app")
    assert job_containers(job.job_id) == []


def test_exec_into_a_service_that_exited_names_its_exit_and_log(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, """\
name: exec-e2e-host
x-slurm: {time: "00:05:00", runtime: host}
services:
  quick:
    command: sh -c 'exit 4'
    x-slurm: {failure_policy: {mode: ignore}}
  main:
    command: sleep 300
""", slurm_jobs)
    deadline = time.monotonic() + 60
    while job.service("quick").get("status") != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    result = job.cli("exec", "-T", "quick", "true")
    assert result.code == 1
    assert result.err == ("error: service 'quick' is not running in job %s (status failed, last "
                          "exit code 4); its log: %s\n"
                          % (job.job_id, os.path.join(job.job_dir, "logs", "quick.log")))


def test_exec_on_the_host_runtime_uses_the_services_node_environment_and_directory(
        slurm, slurm_jobs, tmp_path):
    nodes = _nodes()
    (tmp_path / "work").mkdir()
    job = submit(tmp_path, """\
name: exec-e2e-host
x-slurm: {time: "00:05:00", runtime: host, nodes: %d}
services:
  app:
    working_dir: %s
    environment: {GREETING: "hi there"}
    command: sh -c 'echo up; exec sleep 300'
    x-slurm: {nodes: %d}
""" % (len(nodes), tmp_path / "work", len(nodes)), slurm_jobs)
    wait_for_line(job, "app", "up")
    index = len(nodes)
    result = job.cli("exec", "-T", "--index", str(index), "app", "--", "sh", "-c",
                     'echo "$GREETING|$PWD|$(hostname)"; exit 6')
    assert result.code == 6, result
    assert result.out == "hi there|%s|%s\n" % (tmp_path / "work", nodes[index - 1])


def test_logs_interleave_two_services_in_write_order(slurm, slurm_jobs, tmp_path):
    job = submit(tmp_path, """\
name: logs-e2e
x-slurm: {time: "00:05:00", runtime: host}
services:
  ping:
    command: sh -c 'echo ping 1; sleep 2.4; echo ping 2; sleep 2.4; echo ping 3'
  pong:
    command: sh -c 'sleep 1.2; echo pong 1; sleep 2.4; echo pong 2; sleep 2.4; echo pong 3'
""", slurm_jobs)
    assert wait_for_job(job.job_id, timeout=120) == "COMPLETED"
    result = job.cli("logs")
    assert result.code == 0, result
    assert result.out.splitlines() == ["[ping] ping 1", "[pong] pong 1", "[ping] ping 2",
                                       "[pong] pong 2", "[ping] ping 3", "[pong] pong 3"]
    stamped = job.cli("logs", "--timestamps", "--no-prefix", "--service", "pong").out.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["pong 1", "pong 2", "pong 3"]
    assert all(line.endswith("Z") for line in (s.split(" ", 1)[0] for s in stamped))
