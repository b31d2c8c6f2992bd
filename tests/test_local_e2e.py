"""`up --local` for real: inside a Slurm allocation (the services become steps of it, real Pyxis 0.24
+ Enroot 4.1.2), and without any Slurm at all (a host service and a Pyxis-image service through the
real `enroot create/start`, readiness, the job's exit code, Ctrl-C).

How "without Slurm" is made honest here: the run gets a PATH of its own holding every program of
the machine except the Slurm client commands (the test checks that no srun, sbatch, squeue, sacct,
scontrol or scancel can be found on it), and an environment without any SLURM_* variable
(SLURM_CONF points nowhere). So no Slurm daemon can be reached, whatever runs on this machine.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from slurm_support import (CLUSTER_COMMAND, TEST_IMAGE, TOOL_PATH, cluster_nodes, enroot_containers,
                           free_port, processes_with, pyxis_test_image)

CACHE_ROOT = os.path.join(os.environ.get("HPC_COMPOSE_TEST_CACHE", "/opt/hpc-compose-tests"),
                          "e2e-cache")
SLURM_COMMANDS = frozenset((
    "srun", "sbatch", "salloc", "squeue", "sacct", "sacctmgr", "scontrol", "scancel", "sinfo",
    "sstat", "sattach", "sbcast", "scrontab", "sdiag", "sprio", "sreport", "sshare", "strigger",
    "sview", "sgather", "sh5util", "sjobexitmod", "sjstat", "smail", "seff", "sluid"))


def _state(folder, job_id):
    try:
        with open(os.path.join(folder, ".hpc-compose", job_id, "state.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _job_id_from(output):
    import re
    match = re.search(r"started job (\S+) ", output)
    assert match, output[-3000:]
    return match.group(1)


def _wait(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.3)


# --- (a) inside an allocation: the services are steps of it ----------------------------------------

def test_inside_an_allocation_services_are_steps_and_tracking_works(slurm, tmp_path):
    image = pyxis_test_image()
    port = free_port()
    marker = "local-alloc-" + uuid.uuid4().hex[:8]
    (tmp_path / "compose.yaml").write_text("""\
name: local-alloc
x-slurm: {cache_dir: %s}
services:
  web:
    image: %s
    working_dir: /tmp
    command: ["python3", "-m", "http.server", "%d", "--bind", "127.0.0.1"]
    readiness: {type: tcp, port: %d, timeout_seconds: 60}
  client:
    x-slurm: {runtime: host}
    command: ["python3", "-c", "import sys, urllib.request; print('%s', urllib.request.urlopen('http://127.0.0.1:%d/').status, flush=True); sys.exit(7)"]
    depends_on:
      web: {condition: service_healthy}
""" % (CACHE_ROOT, image, port, port, marker, port))
    command = "%s %s up --local -f compose.yaml" % (sys.executable, TOOL_PATH)
    proc = subprocess.run(["salloc", "--nodes=1", "--time=5", "bash", "-c", command],
                          cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    # salloc passes on the exit code of its command: up --local's, which is the job's (client: 7).
    assert proc.returncode == 7, proc.stdout + proc.stderr
    job_id = _job_id_from(proc.stdout)
    assert job_id.isdigit()
    assert "started job %s as steps of this allocation" % job_id in proc.stdout
    assert "[client] %s 200" % marker in proc.stdout
    # Every service was a step of the allocation, under the batch script's step names.
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobName"],
                           stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout
    names = steps.split()
    deadline = time.monotonic() + 60
    while not {"hpc-compose:web", "hpc-compose:client"} <= set(names) and time.monotonic() < deadline:
        time.sleep(1)
        names = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobName"],
                               stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout.split()
    assert {"hpc-compose:web", "hpc-compose:client"} <= set(names), names
    # status, ps and logs read the run's own files: state.json says it failed with the client's 7.
    status = subprocess.run([sys.executable, TOOL_PATH, "status", "-f", "compose.yaml", "--format",
                             "json"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    status = json.loads(status.stdout)
    assert (status["job_id"], status["scheduler"]["state"], status["scheduler"]["source"]) == (
        job_id, "FAILED", "state.json")
    assert status["runtime"]["exit_code"] == 7
    logs = subprocess.run([sys.executable, TOOL_PATH, "logs", "-f", "compose.yaml", "--service",
                           "client"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    # The client's line, and srun's own word on the step's exit: it was an srun step. (srun writes
    # that line itself, beside the output it forwards, so it may come first.)
    lines = logs.stdout.splitlines()
    assert [l for l in lines if not l.startswith("[client] srun: ")] == [
        "[client] %s 200" % marker], logs.stdout
    assert [l for l in lines if l.startswith("[client] srun: error: ")
            and l.endswith(": task 0: Exited with exit code 7")], logs.stdout
    state = _state(str(tmp_path), job_id)
    assert state["job_id"] == job_id
    assert [s["status"] for s in state["services"]] == ["stopped", "failed"]


# In the allocation: up --local in the background, exec into the host service once both services
# run, a second up --local of the same project (refused: it would share the job directory), then
# SIGTERM to up --local (what it gets when the allocation or the terminal goes away).
# (exec into the Pyxis service is the same `srun --jobid --overlap --container-name=NAME:exec` as
# for a submitted job, which tests/test_exec_e2e.py covers.)
# _UP_IN_BACKGROUND % (OUTPUT, CONDITION): up --local in the background (its pid: $up), until
# CONDITION on the service logs ($logs) holds (2 minutes at most).
_UP_IN_BACKGROUND = r"""
tool="$1"
"$PYTHON" "$tool" up --local -f compose.yaml >%s 2>&1 &
up=$!
logs=".hpc-compose/$SLURM_JOB_ID/logs"
for _ in $(seq 600); do
    %s && break
    sleep 0.2
done
"""
EXEC_IN_ALLOCATION = _UP_IN_BACKGROUND % (
    "up.out", 'grep -qx up "$logs/app.log" 2>/dev/null && grep -qx up "$logs/tool.log" 2>/dev/null'
) + r"""
"$PYTHON" "$tool" exec -T tool -- sh -c 'echo "$COLOR|$PWD"; exit 6' >exec.out 2>exec.err
echo "exec=$?" >>exec.out
"$PYTHON" "$tool" up --local --no-preflight -f compose.yaml >second.out 2>&1
echo "second=$?" >>exec.out
kill -TERM "$up"
wait "$up"
echo "up=$?" >>exec.out
"""


def _in_allocation(tmp_path, script, timeout=300):
    """Run bash ``script`` (its $1: the tool) in a new 1-node allocation, from salloc's shell."""
    proc = subprocess.run(["salloc", "--nodes=1", "--time=5", "bash", "-c", script, "test",
                           TOOL_PATH], cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_inside_an_allocation_exec_joins_a_service_and_sigterm_tears_down(slurm, tmp_path):
    image = pyxis_test_image()
    marker = "local-alloc-exec-" + uuid.uuid4().hex[:8]
    (tmp_path / "compose.yaml").write_text("""\
name: local-alloc-exec
x-slurm: {cache_dir: %s}
services:
  app:
    image: %s
    command: ["python3", "-c", "import time; print('up', flush=True); time.sleep(600)", "%s"]
  tool:
    x-slurm: {runtime: host}
    working_dir: /tmp
    environment: {COLOR: blue}
    command: ["python3", "-c", "import time; print('up', flush=True); time.sleep(600)", "%s"]
""" % (CACHE_ROOT, image, marker, marker))
    _in_allocation(tmp_path, EXEC_IN_ALLOCATION)
    up_out = (tmp_path / "up.out").read_text()
    assert (tmp_path / "exec.out").read_text() == "blue|/tmp\nexec=6\nsecond=2\nup=143\n", up_out
    job_id = _job_id_from(up_out)
    assert "error: a local run of %s is already running in allocation %s" % (
        tmp_path / "compose.yaml", job_id) in (tmp_path / "second.out").read_text()
    assert "job %s cancelled (exit code 143): the job was cancelled (SIGTERM)" % job_id in up_out
    assert _state(str(tmp_path), job_id)["status"] == "cancelled"
    assert processes_with(marker) == []
    # The allocation's keeper step removed the named container of 'app'.
    containers = [name for node in cluster_nodes() for name in enroot_containers(node)
                  if "hpc-compose_%s_" % job_id in name]
    assert containers == []


# In the allocation, from salloc's shell (the batch script is a step of its own): up --local is
# SIGKILLed while the stack runs, and the next up --local of the project stops what it left before
# starting (issue 29).
KILLED_IN_ALLOCATION = _UP_IN_BACKGROUND % (
    "first.out", 'grep -qx waiting "$logs/client.log" 2>/dev/null') + r"""
kill -KILL "$up"
echo ok >mode
"$PYTHON" "$tool" up --local -f compose.yaml >second.out 2>&1
echo "second=$?" >result
"""


def test_inside_an_allocation_the_next_run_stops_what_a_killed_up_local_left(slurm, tmp_path):
    image = pyxis_test_image()
    port = free_port()
    marker = "local-alloc-killed-" + uuid.uuid4().hex[:8]
    _leftover_stack(tmp_path, "image", port, marker, image=image)
    (tmp_path / "mode").write_text("wait\n")
    _in_allocation(tmp_path, KILLED_IN_ALLOCATION, timeout=400)
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "result").read_text() == "second=0\n", second
    job_id = _job_id_from(second)
    assert "stopping the earlier run in allocation %s, whose up --local has gone" % job_id in second
    assert "[client] fetched 200\n" in second
    assert processes_with(marker) == []
    assert _processes_of(str(tmp_path / ".hpc-compose" / job_id)) == []


# --- (b) without Slurm: this machine, host runtime and enroot ----------------------------------------

@pytest.fixture
def no_slurm(tmp_path):
    """An environment in which no Slurm can be reached (see the module docstring)."""
    if not os.path.isfile(TEST_IMAGE):
        pytest.skip("the test image %s is missing (`%s` builds it)" % (TEST_IMAGE, CLUSTER_COMMAND))
    if shutil.which("enroot") is None:
        pytest.skip("enroot is not installed here (`%s` installs it)" % CLUSTER_COMMAND)
    bin_dir = tmp_path / "bin-without-slurm"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if name in SLURM_COMMANDS or (bin_dir / name).exists() or not os.access(path, os.X_OK):
                continue
            os.symlink(path, str(bin_dir / name))
    environment = dict((key, value) for key, value in os.environ.items()
                       if not key.startswith("SLURM_"))
    environment.update(PATH=str(bin_dir), SLURM_CONF="/nonexistent/slurm.conf",
                       ENROOT_DATA_PATH=str(tmp_path / "enroot-data"),
                       ENROOT_RUNTIME_PATH=str(tmp_path / "enroot-run"),
                       ENROOT_CACHE_PATH=str(tmp_path / "enroot-cache"))
    for command in sorted(SLURM_COMMANDS):
        assert shutil.which(command, path=environment["PATH"]) is None, command
    return environment


def _enroot_list(environment):
    return subprocess.run(["enroot", "list"], stdout=subprocess.PIPE, universal_newlines=True,
                          env=environment, check=True, timeout=60).stdout.split()


def _up(tmp_path, environment):
    return subprocess.Popen([sys.executable, TOOL_PATH, "up", "--local", "-f", "compose.yaml"],
                            cwd=str(tmp_path), env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            start_new_session=True)


def test_outside_slurm_readiness_gates_the_host_client_and_its_exit_code_is_up_s(no_slurm, tmp_path):
    port = free_port()
    marker = "local-machine-" + uuid.uuid4().hex[:8]
    (tmp_path / "compose.yaml").write_text("""\
name: local-machine
x-slurm: {cache_dir: %s}
services:
  web:
    image: %s
    working_dir: /tmp
    environment: {GREETING: "hello 'there'"}
    command: ["python3", "-c", "import http.server, os; print(os.environ['GREETING'], os.getcwd(), os.environ.get('SLURM_JOB_ID', 'no job id'), flush=True); http.server.HTTPServer(('127.0.0.1', %d), http.server.SimpleHTTPRequestHandler).serve_forever()"]
    readiness: {type: tcp, port: %d, timeout_seconds: 60}
  client:
    x-slurm: {runtime: host}
    working_dir: %s
    command: ["python3", "-c", "import os, sys, urllib.request; print('%s', urllib.request.urlopen('http://127.0.0.1:%d/').status, os.getcwd(), flush=True); sys.exit(5)"]
    depends_on:
      web: {condition: service_healthy}
""" % (CACHE_ROOT, TEST_IMAGE, port, port, tmp_path, marker, port))
    up = _up(tmp_path, no_slurm)
    out, err = up.communicate(timeout=300)
    assert up.returncode == 5, out + err
    job_id = _job_id_from(out)
    assert job_id.startswith("local-")
    assert "[web] hello 'there' /tmp no job id\n" in out
    assert "[client] %s 200 %s\n" % (marker, tmp_path) in out
    assert "error: job %s failed (exit code 5): service 'client' exited with code 5" % job_id in err
    state = _state(str(tmp_path), job_id)
    assert (state["status"], state["exit_code"]) == ("failed", 5)
    # The container of 'web' is gone with the job, and so is every process.
    assert [name for name in _enroot_list(no_slurm) if job_id in name] == []
    assert processes_with(marker) == []
    status = subprocess.run([sys.executable, TOOL_PATH, "ps", "-f", "compose.yaml"],
                            cwd=str(tmp_path), env=no_slurm, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert "scheduler:  FAILED (state.json)" in status.stdout


def test_outside_slurm_exec_joins_both_services_and_ctrl_c_removes_everything(no_slurm, tmp_path):
    marker = "local-ctrl-c-" + uuid.uuid4().hex[:8]
    (tmp_path / "compose.yaml").write_text("""\
name: local-ctrl-c
x-slurm: {cache_dir: %s}
services:
  box:
    image: %s
    working_dir: /tmp
    environment: {COLOR: green}
    command: ["python3", "-c", "import time; print('up', flush=True); time.sleep(600)", "%s"]
  tool:
    x-slurm: {runtime: host}
    environment: {COLOR: blue}
    command: ["python3", "-c", "import time; print('up', flush=True); time.sleep(600)", "%s"]
""" % (CACHE_ROOT, TEST_IMAGE, marker, marker))
    up = _up(tmp_path, no_slurm)
    try:
        def running():
            state = _state(str(tmp_path), _latest_job_id(tmp_path))
            return [s.get("status") for s in state.get("services", [])] == ["running", "running"]
        _wait(lambda: (tmp_path / ".hpc-compose" / "latest.json").exists(), "the job record")
        _wait(running, "both services running")
        job_id = _latest_job_id(tmp_path)
        # "up" is printed by the service's own process, inside its container.
        for name in ("box", "tool"):
            log = tmp_path / ".hpc-compose" / job_id / "logs" / (name + ".log")
            _wait(lambda: log.exists() and "up\n" in log.read_text(), name + "'s first line")
        assert [n for n in _enroot_list(no_slurm) if job_id in n] == [
            "pyxis_hpc-compose_%s_box" % job_id]
        for name, expected in (("box", "green|/tmp"), ("tool", "blue|%s" % tmp_path)):
            result = subprocess.run(
                [sys.executable, TOOL_PATH, "exec", "-T", "-f", "compose.yaml", name, "--", "sh",
                 "-c", 'echo "$COLOR|$PWD"; exit 6'], cwd=str(tmp_path), env=no_slurm,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
            assert (result.returncode, result.stdout) == (6, expected + "\n"), result.stderr
        # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
        os.killpg(up.pid, signal.SIGINT)
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    assert up.returncode == 130, out + err
    assert "job %s cancelled (exit code 130): the job was cancelled (SIGINT)" % job_id in err
    assert processes_with(marker) == []
    assert [n for n in _enroot_list(no_slurm) if job_id in n] == []
    state = _state(str(tmp_path), job_id)
    assert state["status"] == "cancelled"
    assert [s["status"] for s in state["services"]] == ["stopped", "stopped"]


def _latest_job_id(folder):
    try:
        with open(os.path.join(str(folder), ".hpc-compose", "latest.json")) as handle:
            return json.load(handle)["job_id"]
    except (OSError, ValueError, KeyError):
        return "none"


# --- (c) without Slurm, however a run ends, nothing of it stays (issue 29) ---------------------------
# The server is started the way that leaked before: a shell that does not exec its last command, so
# the process given the signal (sh) is not the one holding the port (python3), and a child of it in
# a session of its own (setsid sleep). The client, on this machine, ends the run as the test asks
# (the mode file): completed, failed, or it waits for Ctrl-C, SIGTERM or SIGKILL of up --local.

ENDINGS = ("completed", "failed", "ctrl-c", "sigterm", "sigkill-then-next-run", "sigkill-then-clean")


def _leftover_stack(tmp_path, runtime, port, marker, image=TEST_IMAGE):
    server = {"image": "image: %s\n    working_dir: /tmp" % image,
              "host": "x-slurm: {runtime: host}\n    working_dir: %s" % tmp_path}[runtime]
    (tmp_path / "compose.yaml").write_text("""\
name: local-leftovers
x-slurm: {cache_dir: %(cache)s}
services:
  server:
    %(server)s
    command: "setsid sleep 600 %(marker)s & python3 -m http.server %(port)d --bind 127.0.0.1; echo %(marker)s"
    readiness: {type: tcp, port: %(port)d, timeout_seconds: 60}
  client:
    x-slurm: {runtime: host}
    working_dir: %(folder)s
    command: ["sh", "-c", "python3 -c 'import urllib.request; print(\\"fetched\\", urllib.request.urlopen(\\"http://127.0.0.1:%(port)d/\\").status, flush=True)' || exit 9; case $(cat mode) in fail) exit 3 ;; wait) echo waiting; exec sleep 600 ;; esac", "%(marker)s"]
    depends_on:
      server: {condition: service_healthy}
""" % {"cache": CACHE_ROOT, "server": server, "marker": marker, "port": port,
       "folder": tmp_path})


def _processes_of(job_dir):
    """``[(pid, command line)]`` of the live processes whose environment names ``job_dir``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as handle:
                environment = handle.read()
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if job_dir.encode() in environment and command:
            found.append((int(pid), command))
    return found


def _listening(port):
    import socket
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _nothing_left(tmp_path, environment, job_id, port, marker):
    job_dir = str(tmp_path / ".hpc-compose" / job_id)
    assert _processes_of(job_dir) == []
    assert processes_with(marker) == []
    assert not _listening(port)
    assert [name for name in _enroot_list(environment) if job_id in name] == []


@pytest.mark.parametrize("runtime", ["image", "host"])
@pytest.mark.parametrize("ending", ENDINGS)
def test_outside_slurm_nothing_of_a_run_stays_however_it_ends(no_slurm, tmp_path, runtime, ending):
    port = free_port()
    marker = "local-leftover-" + uuid.uuid4().hex[:8]
    _leftover_stack(tmp_path, runtime, port, marker)
    mode = {"completed": "ok", "failed": "fail"}.get(ending, "wait")
    (tmp_path / "mode").write_text(mode + "\n")
    up = _up(tmp_path, no_slurm)
    try:
        if mode == "wait":
            client_log = lambda: tmp_path / ".hpc-compose" / _latest_job_id(tmp_path) / "logs" / "client.log"
            _wait(lambda: client_log().exists() and "waiting\n" in client_log().read_text(),
                  "the client waiting")
            assert _listening(port)
            if ending == "ctrl-c":
                os.killpg(up.pid, signal.SIGINT)
            elif ending == "sigterm":
                up.send_signal(signal.SIGTERM)
            else:
                up.kill()
        out, err = up.communicate(timeout=180)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    job_id = _job_id_from(out)
    expected = {"completed": 0, "failed": 3, "ctrl-c": 130, "sigterm": 143}.get(ending, -9)
    assert up.returncode == expected, out + err
    (tmp_path / "mode").write_text("ok\n")
    if ending == "sigkill-then-clean":
        clean = subprocess.run([sys.executable, TOOL_PATH, "clean", "-f", "compose.yaml", "--age",
                                "30"], cwd=str(tmp_path), env=no_slurm, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        assert clean.returncode == 0, clean.stdout + clean.stderr
    if ending != "sigkill-then-next-run":
        _nothing_left(tmp_path, no_slurm, job_id, port, marker)
    # The same stack runs again at once, and leaves nothing either.
    again = _up(tmp_path, no_slurm)
    try:
        out, err = again.communicate(timeout=180)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    assert again.returncode == 0, out + err
    assert "[client] fetched 200\n" in out
    _nothing_left(tmp_path, no_slurm, job_id, port, marker)
    _nothing_left(tmp_path, no_slurm, _job_id_from(out), port, marker)


@pytest.mark.parametrize("runtime", ["image", "host"])
def test_outside_slurm_what_a_killed_batch_script_left_is_named_then_clean_stops_it(
        no_slurm, tmp_path, runtime):
    # The batch script itself SIGKILLed (no teardown at all): its services live on, orphaned.
    port = free_port()
    marker = "local-orphans-" + uuid.uuid4().hex[:8]
    _leftover_stack(tmp_path, runtime, port, marker)
    (tmp_path / "mode").write_text("wait\n")
    up = _up(tmp_path, no_slurm)
    try:
        client_log = lambda: tmp_path / ".hpc-compose" / _latest_job_id(tmp_path) / "logs" / "client.log"
        _wait(lambda: client_log().exists() and "waiting\n" in client_log().read_text(),
              "the client waiting")
        job_id = _latest_job_id(tmp_path)
        with open(str(tmp_path / ".hpc-compose" / "jobs" / (job_id + ".json"))) as handle:
            os.kill(json.load(handle)["local_pid"], signal.SIGKILL)
        up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    assert _listening(port)
    (tmp_path / "mode").write_text("ok\n")
    refused = subprocess.run([sys.executable, TOOL_PATH, "up", "--local", "-f", "compose.yaml"],
                             cwd=str(tmp_path), env=no_slurm, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    # (python3 may be a wrapper's full path: the command line is matched by its arguments)
    server = [pid for pid, command in _processes_of(str(tmp_path / ".hpc-compose" / job_id))
              if "-m http.server %d " % port in command and not command.startswith("/bin/sh ")]
    assert len(server) == 1
    assert ("job %s, which no up --local follows any more, left " % job_id) in refused.stderr
    assert "pid %d (service 'server': " % server[0] in refused.stderr
    assert ("port %d, which the readiness of service 'server' checks, is taken by pid %d (service "
            "'server': " % (port, server[0])) in refused.stderr
    assert ") of job %s" % job_id in refused.stderr
    clean = subprocess.run([sys.executable, TOOL_PATH, "clean", "-f", "compose.yaml", "--age", "30"],
                           cwd=str(tmp_path), env=no_slurm, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "stopped what job %s left running: " % job_id in clean.stdout
    if runtime == "image":
        assert "removed the container pyxis_hpc-compose_%s_server\n" % job_id in clean.stdout
    _nothing_left(tmp_path, no_slurm, job_id, port, marker)
    again = _up(tmp_path, no_slurm)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, out + err
    _nothing_left(tmp_path, no_slurm, _job_id_from(out), port, marker)
