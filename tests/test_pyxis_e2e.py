"""Container services on REAL Pyxis 0.24 + Enroot 4.1.2 (`slurm-cluster.sh up --containers`), and
on REAL Apptainer 1.4.5 where the cluster has it (the Slurm 24.11 and 26.05 roots).

The tests that take ``container_runtime`` run once per runtime: the same compose file with one line
changed (`x-slurm.runtime: apptainer`), the same assertions. On the host's 22.05 cluster (Pyxis
only, by design) the apptainer cases are not collected; in the 24.11 and 26.05 roots a missing
apptainer fails them (tests/slurm_support.py).

Every behaviour the unit tests pin by srun/enroot argv is run here for real: the test image
(`slurm_support.TEST_IMAGE`, a Debian minbase squashfs) used in place, `x-enroot.prepare` through
real `enroot create/start/export`, a cache hit that calls enroot zero times, volumes, working
directories, byte-exact environment in both command forms, image entrypoint rules, the
`/hpc-compose/job` mount, the four readiness kinds, restarts, and teardown on scancel and on the
time limit with no container process and no Enroot container left behind.

No stand-in is used: where a test counts enroot calls it puts a recording wrapper in front of the
real `/usr/bin/enroot` (`--enroot-bin`), which runs the real tool.
"""
import json
import os
import subprocess
import time
import uuid

from slurm_support import (CONTAINER_RUNTIMES, cluster_nodes, enroot_containers, free_port,
                           job_processes, processes_with, run_tool_cli, runtime_line,
                           submitted_job_id, wait_for_job, wait_for_state)


# Byte-exact environment: quotes, $, backslashes, a newline, unicode, a comma and '=' in values.
TRICKY = 'a "double" \'single\' $HOME ${X} `tick` \\back\\slash, x=y\nsecond line ünï€ode'


class ComposeRun(object):
    """One `up` (or `submit`) of a compose file written into a fresh project folder."""

    def __init__(self, folder, result, job_id=None):
        self.folder = folder
        self.result = result
        self.job_id = job_id or submitted_job_id(result.out + result.err)
        self.job_dir = os.path.join(folder, ".hpc-compose", self.job_id)

    def state(self):
        with open(os.path.join(self.job_dir, "state.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def service(self, name):
        return [s for s in self.state()["services"] if s["name"] == name][0]

    def log(self, name):
        with open(os.path.join(self.job_dir, "logs", name + ".log"), encoding="utf-8") as handle:
            return handle.read()

    def file(self, *parts):
        with open(os.path.join(self.folder, *parts), encoding="utf-8") as handle:
            return handle.read()


def compose_run(folder, text, slurm_jobs, verb="up", extra=(), timeout=300):
    folder = str(folder)
    with open(os.path.join(folder, "compose.yaml"), "w", encoding="utf-8") as handle:
        handle.write(text)
    result = run_tool_cli([verb, "-f", "compose.yaml"] + list(extra), cwd=folder, timeout=timeout)
    run = ComposeRun(folder, result)
    slurm_jobs.add(run)
    return run


def head(image, cache_dir, time_limit="00:05:00", runtime="pyxis"):
    return ("name: pyxis-e2e\nx-slurm:\n  time: \"%s\"\n  cache_dir: %s\n%sservices:\n"
            % (time_limit, cache_dir, runtime_line(runtime)))


def job_containers(job_id, data_paths=()):
    """``[(node, name)]`` of the Enroot containers a job left on any node: Pyxis names a step's
    container ``pyxis_<job>.<step>``, a service's named one (see `exec`) is
    ``pyxis_hpc-compose_<job>_<token>``; ``data_paths`` (a test's own prepare data path) count whole."""
    prefixes = ("pyxis_%s." % job_id, "pyxis_hpc-compose_%s_" % job_id)
    left = []
    for node in cluster_nodes():
        left += [(node, name) for name in enroot_containers(node)
                 if job_id is not None and name.startswith(prefixes)]
        for path in data_paths:
            left += [(node, name) for name in enroot_containers(node, path)]
    return left


def assert_nothing_left(marker, run, data_paths=()):
    """No process with ``marker``, no process of the run's job and no container of the job on any
    node, once Pyxis (which removes a step's container filesystem as the step ends, taking a few
    seconds) is done."""
    deadline = time.monotonic() + 60
    while (processes_with(marker) or job_processes(run.job_id, run.folder)
           or job_containers(run.job_id, data_paths)) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with(marker) == []
    assert job_processes(run.job_id, run.folder) == []
    assert job_containers(run.job_id, data_paths) == []


# --- image, volumes, working directory, job mount ------------------------------------------------

def test_local_sqsh_image_runs_with_volumes_working_dir_and_job_mount(slurm, slurm_jobs, image,
                                                                      cache_dir, tmp_path,
                                                                      container_runtime):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("from the host\n")
    (tmp_path / "config.txt").write_text("read-only config\n")
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  app:
    image: %s
    volumes:
      - ./data:/data
      - ./config.txt:/etc/app.txt:ro
    working_dir: /data
    command: >-
      pwd; cat in.txt /etc/app.txt; echo written > /data/out.txt;
      (echo x >> /etc/app.txt) 2>/dev/null && echo ro-broken || echo ro-holds;
      grep -q PRETTY_NAME /etc/os-release && echo image-is-debian;
      ls /hpc-compose/job/allocation; echo "dir=$HPC_COMPOSE_JOB_DIR";
      echo "node=$(hostname) listed=$(cat "$HPC_COMPOSE_NODELIST_FILE")"
""" % image, slurm_jobs)

    assert run.result.code == 0, run.result
    lines = run.log("app").splitlines()
    assert lines[:3] == ["/data", "from the host", "read-only config"]
    assert "ro-holds" in lines and "image-is-debian" in lines
    assert "dir=/hpc-compose/job" in lines
    node = [line for line in lines if line.startswith("node=")][0]
    assert node.split()[0][len("node="):] in cluster_nodes()
    assert node.split()[1] == "listed=" + node.split()[0][len("node="):]
    assert run.file("data", "out.txt") == "written\n"
    assert run.file("config.txt") == "read-only config\n"
    assert_nothing_left(run.job_dir, run)


def test_default_working_dir_is_the_images(slurm, slurm_jobs, image, cache_dir, tmp_path):
    # No working_dir: Pyxis keeps the image's (enroot: the user's home when the image sets none).
    run = compose_run(tmp_path, head(image, cache_dir) + """\
  app:
    image: %s
    command: ["pwd"]
""" % image, slurm_jobs)

    assert run.result.code == 0, run.result
    assert run.log("app") in ("/\n", "/root\n")


# --- environment, byte-exact, in both command forms ------------------------------------------------

def test_environment_reaches_containers_byte_exact_in_both_command_forms(slurm, slurm_jobs, image,
                                                                         cache_dir, tmp_path,
                                                                         container_runtime):
    # A YAML double-quoted scalar is a JSON string; values are interpolated, so `$` is `$$`.
    value = json.dumps(TRICKY).replace("$", "$$")
    dump = "import json, os; print(json.dumps(os.environ['TRICKY']))"
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  shellform:
    image: %s
    environment:
      TRICKY: %s
    command: python3 -c "%s"
  execform:
    image: %s
    environment:
      TRICKY: %s
    command: ["python3", "-c", "%s"]
""" % (image, value, dump, image, value, dump), slurm_jobs)

    assert run.result.code == 0, run.result
    assert json.loads(run.log("shellform")) == TRICKY
    assert json.loads(run.log("execform")) == TRICKY


# --- image entrypoint (Compose rules) on an image that has one ----------------------------------

# enroot import writes /etc/rc this way for an image with ENTRYPOINT ["/entry.sh"] and CMD
# ["echo", "default-cmd"]; Pyxis's --no-container-entrypoint works through the /etc/rc.local it
# sources. Like a docker-entrypoint.sh, the entrypoint does its setup (here: it leaves a note in the
# job directory) and execs its arguments: Pyxis starts the container through the entrypoint with a
# placeholder command of its own and runs the step's command beside it.
ENTRY_SH = '#!/bin/sh\necho "entry ran" >> /hpc-compose/job/entry-$HPC_COMPOSE_SERVICE.txt\nexec "$@"\n'
ENTRY_RC = ('if [ -s /etc/rc.local ]; then . /etc/rc.local; fi\n'
            'if [ $# -gt 0 ]; then exec /entry.sh "$@"; else exec /entry.sh echo default-cmd; fi\n')
ENTRY_PREPARE = """\
    x-enroot:
      prepare:
        commands:
          - %s
          - %s
""" % (json.dumps("printf '" + ENTRY_SH.replace("\n", "\\n") + "' > /entry.sh && chmod +x /entry.sh"),
       json.dumps("printf '" + ENTRY_RC.replace("\n", "\\n") + "' > /etc/rc"))


def test_image_entrypoint_follows_compose_rules(slurm, slurm_jobs, image, cache_dir, tmp_path):
    run = compose_run(tmp_path, head(image, cache_dir) + """\
  neither:
    image: %s
%s  command-only:
    image: %s
%s    command: ["echo", "from-command"]
  own-entrypoint:
    image: %s
%s    entrypoint: ["echo", "own"]
    command: ["args"]
""" % (image, ENTRY_PREPARE, image, ENTRY_PREPARE, image, ENTRY_PREPARE), slurm_jobs)

    assert run.result.code == 0, run.result
    # Neither: the image's ENTRYPOINT + CMD.
    assert run.log("neither") == "default-cmd\n"
    assert os.path.exists(os.path.join(run.job_dir, "entry-neither.txt"))
    # Only command: the image's ENTRYPOINT runs, then the command.
    assert run.log("command-only") == "from-command\n"
    assert os.path.exists(os.path.join(run.job_dir, "entry-command-only.txt"))
    # Own entrypoint: the image's ENTRYPOINT does not run.
    assert run.log("own-entrypoint") == "own args\n"
    assert not os.path.exists(os.path.join(run.job_dir, "entry-own-entrypoint.txt"))


# --- x-enroot.prepare through the real enroot, then a cache hit with zero enroot calls ----------

def _recording_enroot(folder, tool="enroot"):
    """A wrapper that appends its argv to calls.log and runs the REAL tool (not a stand-in)."""
    log = os.path.join(str(folder), "calls.log")
    wrapper = os.path.join(str(folder), "%s-recorder" % tool)
    with open(wrapper, "w") as handle:
        handle.write('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\nexec /usr/bin/%s "$@"\n' % (log, tool))
    os.chmod(wrapper, 0o755)
    return wrapper, log


def _recorder_option(runtime):
    # --enroot-bin for Pyxis's images, --apptainer-bin for the .sif an apptainer service runs.
    return "--enroot-bin" if runtime == "pyxis" else "--apptainer-bin"


def _tool(runtime):
    return "enroot" if runtime == "pyxis" else "apptainer"


def _calls(log):
    """The recorded calls but `--version` (preflight's look at which apptainer it has)."""
    if not os.path.exists(log):
        return []
    with open(log) as handle:
        return [call for call in handle.read().splitlines() if call != "--version"]


def test_prepare_commands_env_and_mounts_run_through_the_real_tool(slurm, slurm_jobs, image,
                                                                     cache_dir, tmp_path,
                                                                     container_runtime):
    (tmp_path / "setup").mkdir()
    (tmp_path / "setup" / "tool.sh").write_text("#!/bin/sh\necho tool-ran \"$PREP_GREETING\"\n")
    wrapper, log = _recording_enroot(tmp_path, _tool(container_runtime))
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  app:
    image: %s
    x-enroot:
      prepare:
        mounts:
          - ./setup:/setup:ro
        env:
          PREP_GREETING: hello-from-prepare
        commands:
          - cp /setup/tool.sh /usr/local/bin/tool && chmod +x /usr/local/bin/tool
          - echo "$PREP_GREETING" > /prepared.txt
          - (echo x > /setup/written) 2>/dev/null && echo mount-writable > /mount.txt || echo mount-ro > /mount.txt
    command: cat /prepared.txt /mount.txt; PREP_GREETING=at-run-time tool
""" % image, slurm_jobs, extra=[_recorder_option(container_runtime), wrapper])

    assert run.result.code == 0, run.result
    assert run.log("app") == "hello-from-prepare\nmount-ro\ntool-ran at-run-time\n"
    assert not (tmp_path / "setup" / "written").exists()
    if container_runtime == "apptainer":
        # One build of the prepared .sif from a definition file; the .sqsh base runs as it is.
        assert [call.split()[0] for call in _calls(log)] == ["build"]
        built = [name for _, _, names in os.walk(cache_dir) for name in names]
        assert [name for name in built if name.endswith("-prepared.sif")], built
        assert_nothing_left(run.job_dir, run)
        return
    assert [call.split()[0] for call in _calls(log)] == [
        "create", "start", "start", "start", "export", "remove"]
    # The container's own name, not the bare prefix: the suite of another Slurm generation may be
    # preparing the same image on this machine at the same time.
    prep_name = [word for word in _calls(log)[0].split() if word.startswith("hpc-compose-prep-")][0]
    assert_nothing_left(prep_name, run, [os.path.join(cache_dir, "enroot", "data")])


def test_a_prepared_image_cache_hit_calls_the_tool_zero_times(slurm, slurm_jobs, image, cache_dir,
                                                              tmp_path, container_runtime):
    wrapper, log = _recording_enroot(tmp_path, _tool(container_runtime))
    option = _recorder_option(container_runtime)
    text = head(image, cache_dir, runtime=container_runtime) + """\
  app:
    image: %s
    x-enroot:
      prepare:
        commands:
          - echo baked-in > /baked.txt
    command: cat /baked.txt
""" % image
    first = compose_run(tmp_path, text, slurm_jobs, extra=[option, wrapper])
    assert first.result.code == 0, first.result
    assert [call.split()[0] for call in _calls(log)] == (
        ["create", "start", "export", "remove"] if container_runtime == "pyxis" else ["build"])
    os.remove(log)

    second = compose_run(tmp_path, text, slurm_jobs, extra=[option, wrapper])

    assert second.result.code == 0, second.result
    assert "cache hit" in second.result.out + second.result.err
    assert _calls(log) == []
    assert second.log("app") == "baked-in\n"


# --- readiness of all four kinds, from services in containers --------------------------------

def test_readiness_of_all_four_kinds_gates_dependents(slurm, slurm_jobs, image, cache_dir, tmp_path,
                                                    container_runtime):
    ports = {"image": image, "http": free_port(), "tcp": free_port()}
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  web:
    image: %(image)s
    command: sleep 1; exec python3 -m http.server %(http)s --bind 127.0.0.1
    readiness: {type: http, url: "http://127.0.0.1:%(http)s/", timeout_seconds: 60}
  port:
    image: %(image)s
    command: sleep 1; exec nc -lk 127.0.0.1 %(tcp)s
    readiness: {type: tcp, port: %(tcp)s, timeout_seconds: 60}
  logger:
    image: %(image)s
    command: sleep 1; echo "warming up"; echo "READY now"; exec sleep 600
    readiness: {type: log, pattern: "READY now", timeout_seconds: 60}
  waiter:
    image: %(image)s
    command: exec sleep 600
    readiness: {type: sleep, seconds: 2}
  client:
    image: %(image)s
    depends_on:
      web: {condition: service_healthy}
      port: {condition: service_healthy}
      logger: {condition: service_healthy}
      waiter: {condition: service_healthy}
    command: curl -s -o /dev/null -w '%%{http_code}\\n' http://127.0.0.1:%(http)s/ && nc -z 127.0.0.1 %(tcp)s && echo tcp-open
""" % ports, slurm_jobs)

    assert run.result.code == 0, run.result
    assert run.log("client") == "200\ntcp-open\n"
    for name in ("web", "port", "logger", "waiter"):
        assert run.service(name)["readiness"]["status"] == "ready", name
    assert_nothing_left("http.server %d" % ports["http"], run)


# --- restart policy in a container ---------------------------------------------------------------

def test_restart_on_failure_relaunches_the_container_until_it_succeeds(slurm, slurm_jobs, image,
                                                                       cache_dir, tmp_path,
                                                                       container_runtime):
    (tmp_path / "count").mkdir()
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  flaky:
    image: %s
    volumes: ["./count:/count"]
    command: echo run >> /count/runs; [ "$(wc -l < /count/runs)" -ge 3 ]
    x-slurm:
      failure_policy: {mode: restart_on_failure, max_restarts: 3, backoff_seconds: 1}
""" % image, slurm_jobs)

    assert run.result.code == 0, run.result
    assert run.file("count", "runs") == "run\nrun\nrun\n"
    flaky = run.service("flaky")
    assert (flaky["launches"], flaky["restarts"], flaky["status"]) == (3, 2, "exited")


def test_a_failing_container_fails_the_job_with_its_exit_code_and_stops_the_others(
        slurm, slurm_jobs, image, cache_dir, tmp_path, container_runtime):
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    run = compose_run(tmp_path, head(image, cache_dir, runtime=container_runtime) + """\
  long:
    image: %s
    command: exec python3 -c 'import time; time.sleep(900)' %s
    readiness: {type: sleep, seconds: 1}
  bad:
    image: %s
    depends_on: {long: {condition: service_healthy}}
    command: exit 7
""" % (image, marker, image), slurm_jobs)

    assert run.result.code == 1, run.result
    assert wait_for_job(run.job_id, timeout=60) == "FAILED"
    assert run.service("bad")["last_exit_code"] == 7
    assert_nothing_left(marker, run)


# --- teardown: scancel and time limit leave nothing on any node -----------------------------------

def long_running(head_text, image, marker, worker_placement=""):
    """A server and a worker (``worker_placement``: its x-slurm line) that run until stopped."""
    return head_text + """\
  server:
    image: %s
    command: exec python3 -c 'import time; time.sleep(900)' %s
    readiness: {type: sleep, seconds: 1}
  worker:
    image: %s
    depends_on: {server: {condition: service_healthy}}
%s    command: exec python3 -c 'import time; time.sleep(901)' %s
""" % (image, marker, image, worker_placement, marker)


def wait_running(run, names, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(run.service(n)["status"] in ("running", "ready") for n in names):
                return
        except (OSError, ValueError, IndexError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError("services %s never ran" % (names,))


def test_scancel_leaves_no_container_process_and_no_container(slurm, slurm_jobs, image, cache_dir,
                                                              tmp_path, container_runtime):
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    run = compose_run(tmp_path, long_running(head(image, cache_dir, runtime=container_runtime),
                                             image, marker),
                      slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    assert wait_for_state(run.job_id, ("RUNNING",), timeout=60) == "RUNNING"
    wait_running(run, ["server", "worker"])
    assert len(processes_with(marker)) >= 2

    subprocess.run(["scancel", run.job_id], check=True, timeout=30)

    assert wait_for_job(run.job_id, timeout=90) == "CANCELLED"
    assert_nothing_left(marker, run)


def test_time_limit_leaves_no_container_process_and_no_container(slurm, slurm_jobs, image,
                                                                 cache_dir, tmp_path):
    # Waiting for a time limit costs more than a minute, so one job covers every runtime under
    # test: where Apptainer is (CONTAINER_RUNTIMES), the worker runs under it beside the Pyxis
    # server (a per-service runtime).
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    worker = ("    x-slurm: {runtime: apptainer}\n" if "apptainer" in CONTAINER_RUNTIMES else "")
    run = compose_run(tmp_path, long_running(head(image, cache_dir, "00:01:00"), image, marker,
                                             worker),
                      slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    if worker:
        assert "apptainer --quiet" in run.file("hpc-compose.sbatch")

    assert wait_for_job(run.job_id, timeout=240) == "TIMEOUT"
    assert_nothing_left(marker, run)


# --- a shipped example on either runtime, by one line ----------------------------------------------

def test_the_restart_policy_example_runs_on_either_runtime_by_one_line(slurm, slurm_jobs, image,
                                                                      cache_dir, tmp_path,
                                                                      container_runtime):
    # The example as shipped but for the cluster's offline test image and the test's cache folder
    # (this machine reaches no registry) and, for Apptainer, the one runtime line.
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    with open(os.path.join(examples, "restart-policy.yaml"), encoding="utf-8") as handle:
        text = handle.read()
    text = text.replace("image: alpine:3.20", "image: " + image).replace(
        "cache_dir: /shared/$USER/hpc-compose-cache", "cache_dir: " + cache_dir)
    text = text.replace("x-slurm:\n", "x-slurm:\n" + runtime_line(container_runtime), 1)
    run = compose_run(tmp_path, text, slurm_jobs)

    assert run.result.code == 0, run.result
    assert run.log("flaky").splitlines()[-1] == "flaky: done"
    assert run.service("flaky")["launches"] == 3
    assert run.service("heartbeat")["last_exit_code"] == 1
    assert run.log("checker") == "checker finished\n"
    assert_nothing_left(run.job_dir, run)
