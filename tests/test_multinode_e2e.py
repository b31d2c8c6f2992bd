"""Multi-node jobs on the 3-node test cluster with REAL Pyxis (`slurm-cluster.sh up --containers
--nodes 3`): three slurmd "hosts" n1..n3, each in its own network, UTS and mount namespace.

The placement model (helpers on the primary node, one distributed service over the allocation),
the allocation facts on every node and in every container, a rendezvous by the primary node's name,
a task failing on one node, scancel and the time limit on every node, a node lost mid-job
(NODE_FAIL), every log line before the verdict, requeue with resume, the offline copies of the
multi-node examples under tests/multinode/ (the MPI ones real MPI over PMIx), a C MPI allreduce with
the host runtime and in Pyxis containers, and environment modules (Lmod). Open MPI, PMIx and Lmod
exist only on this host's cluster, not in the other Slurm generations' roots: MPI and module tests
belong in this file.
"""
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from slurm_support import (CLUSTER_COMMAND, CLUSTER_SCRIPT, REPO_ROOT, TOOL_PATH, cluster_nodes,
                           enroot_containers, free_port, on_node, processes_with, pyxis_test_image,
                           require_nodes, run_tool_cli, submitted_job_id, wait_for_job)
from test_pyxis_e2e import (ComposeRun, assert_nothing_left, compose_run, long_running,
                            wait_running)

NODES = 3
COPIES = os.path.join(REPO_ROOT, "tests", "multinode")


@pytest.fixture(scope="module")
def three_nodes(slurm):
    """The cluster's nodes; every test here needs three (a skip, a failure under CI, without)."""
    return require_nodes(NODES, "every test of this file", CLUSTER_COMMAND)


@pytest.fixture(scope="module")
def image(three_nodes):
    return pyxis_test_image()


def head(cache_dir, time_limit="00:05:00", extra=""):
    return ("name: multinode-e2e\nx-slurm:\n  time: \"%s\"\n  nodes: %d\n  cache_dir: %s\n%s"
            "services:\n" % (time_limit, NODES, cache_dir, extra))


def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


# --- placement and allocation facts -------------------------------------------------------------

def test_allocation_facts_are_right_on_every_node_and_in_every_container(slurm, slurm_jobs, image,
                                                                         cache_dir, tmp_path):
    facts = ("echo \"$(hostname)|$HPC_COMPOSE_PRIMARY_NODE|$HPC_COMPOSE_NODE_COUNT|"
             "$HPC_COMPOSE_NODELIST|$HPC_COMPOSE_NODELIST_FILE|$(cat /hpc-compose/job/allocation/"
             "nodes.txt | tr '\\n' ' ')|$(cat /hpc-compose/job/allocation/primary_node)\"")
    run = compose_run(tmp_path, head(cache_dir) + """\
  helper:
    image: %s
    command: %s
    readiness: {type: sleep, seconds: 1}
  everywhere:
    image: %s
    depends_on: {helper: {condition: service_healthy}}
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: %s
""" % (image, json.dumps(facts + "; exec sleep 300"), image, NODES, json.dumps(facts)), slurm_jobs)

    assert run.result.code == 0, run.result
    nodes = cluster_nodes()
    expected_tail = "|%s|%d|%s|/hpc-compose/job/allocation/nodes.txt|%s |%s" % (
        nodes[0], NODES, " ".join(nodes), " ".join(nodes), nodes[0])
    # (the helper's log then goes on with Slurm's note that its step was cancelled at the end)
    assert lines_of(run.log("helper"))[0] == nodes[0] + expected_tail
    assert sorted(lines_of(run.log("everywhere"))) == [n + expected_tail for n in nodes]


def test_a_helper_on_the_primary_node_is_reached_from_every_node(slurm, slurm_jobs, image,
                                                                 cache_dir, tmp_path):
    run = compose_run(tmp_path, head(cache_dir) + """\
  server:
    image: %s
    command: exec python3 -m http.server 18500
    readiness: {type: tcp, port: 18500, timeout_seconds: 60}
  workers:
    image: %s
    depends_on: {server: {condition: service_healthy}}
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: echo "$(hostname) $(curl -s -o /dev/null -w '%%{http_code}' "http://$HPC_COMPOSE_PRIMARY_NODE:18500/")"
""" % (image, image, NODES), slurm_jobs)

    assert run.result.code == 0, run.result
    assert sorted(lines_of(run.log("workers"))) == ["%s 200" % n for n in cluster_nodes()]


def test_readiness_of_a_distributed_service_gates_its_dependent(slurm, slurm_jobs, image,
                                                                cache_dir, tmp_path):
    # Rank 0 (on the primary node) listens and says so once every rank is up; tcp readiness
    # against localhost is refused for a distributed service (which localhost?), log readiness
    # reads the merged log of all ranks.
    run = compose_run(tmp_path, head(cache_dir) + """\
  cluster:
    image: %s
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: if [ "$SLURM_PROCID" = 0 ]; then (sleep 2; echo "rank 0 listening") & exec nc -lk 0.0.0.0 18510; else exec sleep 300; fi
    readiness: {type: log, pattern: "rank 0 listening", timeout_seconds: 60}
  client:
    image: %s
    depends_on: {cluster: {condition: service_healthy}}
    command: nc -z "$HPC_COMPOSE_PRIMARY_NODE" 18510 && echo reached
""" % (image, NODES, image), slurm_jobs)

    assert run.result.code == 0, run.result
    assert run.log("client") == "reached\n"
    assert run.service("cluster")["readiness"]["status"] == "ready"


# --- the offline copies of the multi-node examples -------------------------------------------

def _run_copy(name, slurm_jobs, image, cache_dir, tmp_path):
    import shutil
    folder = os.path.join(str(tmp_path), "copy")  # the job writes .hpc-compose/ beside the file
    shutil.copytree(COPIES, folder)
    env = {"HPC_COMPOSE_TEST_IMAGE": image, "HPC_COMPOSE_TEST_CACHE_DIR": cache_dir,
           "HPC_COMPOSE_TEST_MPI_IMAGE": os.path.join(os.path.dirname(image),
                                                      "test-image-mpi.sqsh")}
    result = run_tool_cli(["up", "-f", name], cwd=folder, env=env, timeout=300)
    run = ComposeRun(folder, result)
    slurm_jobs.add(run.job_id)
    return run


def test_torchrun_copy_meets_at_the_rendezvous_on_the_primary_node(slurm, slurm_jobs, image,
                                                                   cache_dir, tmp_path):
    run = _run_copy("multi-node-torchrun.yaml", slurm_jobs, image, cache_dir, tmp_path)

    assert run.result.code == 0, run.result
    nodes = cluster_nodes()
    lines = lines_of(run.log("trainer"))
    assert "rendezvous complete: 3 ranks on 3 nodes (%s), total 3" % " ".join(nodes) in lines
    joined = sorted(line for line in lines if " joined " in line)
    assert joined == ["rank %d on %s joined %s:29500, total 3" % (i, nodes[i], nodes[0])
                      for i in (1, 2)]


def test_mpi_copy_reduces_across_every_node_with_mpi4py(slurm, slurm_jobs, image, cache_dir,
                                                        tmp_path):
    import random
    rng = random.Random(7)
    expected = sum(rng.randrange(1000) for _ in range(6000))
    _mpi_image(image)

    run = _run_copy("multi-node-mpi.yaml", slurm_jobs, image, cache_dir, tmp_path)

    assert run.result.code == 0, run.result
    lines = lines_of(run.log("solver"))
    assert "total = %d over 3 nodes" % expected in lines
    nodes = cluster_nodes()
    # Slurm's block distribution: ranks 0-1 on the first node, 2-3 on the second...
    assert sorted(line for line in lines if line.startswith("rank ")) == sorted(
        "rank %d/6 on %s summed 1000 numbers" % (rank, nodes[rank // 2]) for rank in range(6))


def test_mpi_hello_copy_prints_every_rank(slurm, slurm_jobs, image, cache_dir, tmp_path):
    _mpi_image(image)
    run = _run_copy("mpi-hello.yaml", slurm_jobs, image, cache_dir, tmp_path)

    assert run.result.code == 0, run.result
    with open(os.path.join(run.job_dir, "allocation", "primary_node")) as handle:
        primary = handle.read().strip()  # the one node Slurm chose for this 1-node job
    assert sorted(lines_of(run.log("hello"))) == [
        "hello from rank %d of 2 on %s" % (rank, primary) for rank in range(2)]


# --- real MPI (Open MPI over PMIx) and environment modules ------------------------------------
# Only the host's 3-node cluster has Open MPI, PMIx and Lmod (tests/cluster/slurm-cluster.sh), so
# these live here, not in the files the other Slurm generations run.

ALLREDUCE_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int rank, size, mine, total = 0, length;
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &length);
    if (argc > 1 && rank == atoi(argv[1])) {
        fprintf(stderr, "rank %d gives up\n", rank);
        return 3;
    }
    mine = 10 * (rank + 1);
    MPI_Allreduce(&mine, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s: total %d\n", rank, size, host, total);
    MPI_Finalize();
    return 0;
}
"""
MPI_TOTAL = 10 + 20 + 30


def _allreduce_program(folder):
    """The allreduce compiled with the machine's mpicc into ``folder`` (which every node sees)."""
    import shutil
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        pytest.fail("mpicc is missing: `%s` installs Open MPI" % CLUSTER_COMMAND, pytrace=False)
    source = os.path.join(folder, "allreduce.c")
    with open(source, "w") as handle:
        handle.write(ALLREDUCE_C)
    program = os.path.join(folder, "allreduce")
    subprocess.run([mpicc, "-O1", "-o", program, source], check=True, timeout=120)
    return program


def _mpi_image(image):
    path = os.path.join(os.path.dirname(image), "test-image-mpi.sqsh")
    if not os.path.isfile(path):
        pytest.fail("the Open MPI test image %s is missing: `%s` builds it"
                    % (path, CLUSTER_COMMAND), pytrace=False)
    return path


def _expected_ranks():
    return ["rank %d of %d on %s: total %d" % (rank, NODES, node, MPI_TOTAL)
            for rank, node in enumerate(cluster_nodes()[:NODES])]


def test_mpi_allreduce_runs_over_pmix_on_every_node_with_the_host_runtime(slurm, slurm_jobs, image,
                                                                          cache_dir, tmp_path):
    program = _allreduce_program(str(tmp_path))
    run = compose_run(tmp_path, head(cache_dir, extra="  runtime: host\n") + """\
  ranks:
    command: [%s]
    x-slurm: {nodes: %d, ntasks_per_node: 1, mpi: pmix}
""" % (json.dumps(program), NODES), slurm_jobs)

    assert run.result.code == 0, run.result
    assert sorted(lines_of(run.log("ranks"))) == _expected_ranks()


def test_mpi_allreduce_runs_over_pmix_in_pyxis_containers_on_every_node(slurm, slurm_jobs, image,
                                                                        cache_dir, tmp_path):
    program = _allreduce_program(str(tmp_path))
    run = compose_run(tmp_path, head(cache_dir) + """\
  ranks:
    image: %s
    volumes: ["%s:/mpi:ro"]
    command: [/mpi/allreduce]
    x-slurm: {nodes: %d, ntasks_per_node: 1, mpi: {type: pmix}}
""" % (_mpi_image(image), os.path.dirname(program), NODES), slurm_jobs)

    assert run.result.code == 0, run.result
    assert sorted(lines_of(run.log("ranks"))) == _expected_ranks()


def test_an_mpi_rank_failing_ends_the_step_on_every_node(slurm, slurm_jobs, image, cache_dir,
                                                        tmp_path):
    program = _allreduce_program(str(tmp_path))
    run = compose_run(tmp_path, head(cache_dir, extra="  runtime: host\n") + """\
  ranks:
    command: [%s, "1"]
    x-slurm: {nodes: %d, ntasks_per_node: 1, mpi: pmix}
""" % (json.dumps(program), NODES), slurm_jobs)

    # The other ranks wait in MPI_Allreduce for rank 1 forever: only srun's --kill-on-bad-exit
    # ends them, and the job fails at once instead of at its time limit.
    assert run.result.code == 1, run.result
    assert wait_for_job(run.job_id, timeout=60) == "FAILED"
    log = run.log("ranks")
    assert "rank 1 gives up" in log
    assert "total" not in log
    assert run.state()["status"] == "failed"


LUA_MODULE = """\
setenv("HC_E2E_MODULE_HOME", "%s")
prepend_path("PATH", "%s")
"""


def _write_module(folder):
    """An Lmod modulefile hc-e2e/1.0 under folder/modules that sets a variable and puts a tool
    (hc-e2e-tool) on PATH."""
    tools = os.path.join(folder, "module-bin")
    os.makedirs(tools)
    tool = os.path.join(tools, "hc-e2e-tool")
    with open(tool, "w") as handle:
        handle.write("#!/bin/sh\necho \"tool from the module on $(hostname)\"\n")
    os.chmod(tool, 0o755)
    modules = os.path.join(folder, "modules", "hc-e2e")
    os.makedirs(modules)
    with open(os.path.join(modules, "1.0.lua"), "w") as handle:
        handle.write(LUA_MODULE % (folder, tools))
    return os.path.join(folder, "modules")


def test_a_service_loading_a_module_sees_its_variable_and_path(slurm, slurm_jobs, image, cache_dir,
                                                              tmp_path):
    modules = _write_module(str(tmp_path))
    run = compose_run(tmp_path, head(cache_dir, extra="  runtime: host\n  modules_path: [%s]\n"
                                     % modules) + """\
  plain:
    command: echo "plain sees ${HC_E2E_MODULE_HOME:-nothing}"
  loaded:
    command: echo "home $HC_E2E_MODULE_HOME"; hc-e2e-tool
    x-slurm: {nodes: %d, ntasks_per_node: 1, modules: [hc-e2e/1.0]}
  contained:
    image: %s
    command: echo "container sees $HC_E2E_MODULE_HOME"
    x-slurm: {runtime: pyxis, modules: [hc-e2e/1.0]}
""" % (NODES, image), slurm_jobs)

    assert run.result.code == 0, run.result
    assert lines_of(run.log("plain")) == ["plain sees nothing"]
    # A Pyxis service inherits the variables the modules set on the node (not PATH: the image's).
    assert lines_of(run.log("contained")) == ["container sees %s" % tmp_path]
    assert sorted(lines_of(run.log("loaded"))) == sorted(
        ["home %s" % tmp_path] * NODES
        + ["tool from the module on %s" % node for node in cluster_nodes()[:NODES]])


def test_submit_refuses_a_missing_module_and_submits_nothing(slurm, slurm_jobs, image, cache_dir,
                                                            tmp_path):
    modules = _write_module(str(tmp_path))
    with open(os.path.join(str(tmp_path), "compose.yaml"), "w") as handle:
        handle.write(head(cache_dir, extra="  runtime: host\n  modules_path: [%s]\n" % modules)
                     + "  app:\n    command: echo hi\n    x-slurm:\n"
                       "      modules: [hc-e2e/1.0, hc-e2e-missing/2.0]\n")
    result = run_tool_cli(["submit", "-f", "compose.yaml"], cwd=str(tmp_path), timeout=120)

    assert result.code != 0, result
    assert "module 'hc-e2e-missing/2.0' (" in result.err
    assert "compose.yaml:12) is not available" in result.err
    assert "hc-e2e/1.0' " not in result.err
    assert "submitted batch job" not in result.out + result.err
    assert not os.path.exists(os.path.join(str(tmp_path), ".hpc-compose", "jobs"))


# --- failures, teardown, lost nodes -------------------------------------------------------------

def test_a_task_failing_on_one_node_fails_the_service_at_once(slurm, slurm_jobs, image, cache_dir,
                                                              tmp_path):
    last = cluster_nodes()[-1]
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    run = compose_run(tmp_path, head(cache_dir) + """\
  workers:
    image: %s
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: if [ "$(hostname)" = %s ]; then sleep 3; exit 3; fi; exec python3 -c 'import time; time.sleep(600)' %s
""" % (image, NODES, last, marker), slurm_jobs)

    # Without srun --kill-on-bad-exit the other tasks would sleep out their 600 s (and the 5-minute
    # limit end the job as TIMEOUT); the failure policy (fail_job) applies at once instead.
    assert run.result.code == 1, run.result
    assert wait_for_job(run.job_id, timeout=60) == "FAILED"
    log = run.log("workers")
    assert "%s: task %d: Exited with exit code 3" % (last, NODES - 1) in log
    assert run.state()["status"] == "failed"
    assert_nothing_left(marker, run)


def _long_running(image, cache_dir, marker, time_limit="00:05:00"):
    return long_running(head(cache_dir, time_limit), image, marker,
                        "    x-slurm: {nodes: %d, ntasks_per_node: 1}\n" % NODES)


def _container_nodes(marker):
    """The nodes (UTS names) where a container process (python3 ... MARKER) runs."""
    from slurm_support import _run
    nodes = set()
    for pid, cmdline in processes_with(marker):
        if cmdline.startswith("python3 "):
            code, out, _ = _run(["nsenter", "--target", str(pid), "--uts", "hostname"])
            if code == 0:
                nodes.add(out.strip())
    return nodes


def _wait_containers_everywhere(marker, timeout=120):
    deadline = time.monotonic() + timeout
    while _container_nodes(marker) != set(cluster_nodes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _container_nodes(marker)


def test_scancel_leaves_nothing_on_any_node(slurm, slurm_jobs, image, cache_dir, tmp_path):
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    run = compose_run(tmp_path, _long_running(image, cache_dir, marker), slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    assert _wait_containers_everywhere(marker) == set(cluster_nodes())

    subprocess.run(["scancel", run.job_id], check=True, timeout=30)

    assert wait_for_job(run.job_id, timeout=120) == "CANCELLED"
    assert_nothing_left(marker, run)


def test_time_limit_leaves_nothing_on_any_node(slurm, slurm_jobs, image, cache_dir, tmp_path):
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    run = compose_run(tmp_path, _long_running(image, cache_dir, marker, "00:01:00"), slurm_jobs,
                      verb="submit")
    assert run.result.code == 0, run.result

    assert wait_for_job(run.job_id, timeout=240) == "TIMEOUT"
    assert_nothing_left(marker, run)


def _kill_node(node):
    """Kill a node as a crash would: its slurmd and every process in its namespaces, at once."""
    pids = subprocess.run(["ip", "netns", "pids", "hc-" + node], stdout=subprocess.PIPE,
                          universal_newlines=True, timeout=30).stdout.split()
    assert pids, "node %s has no process to kill" % node
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except OSError:
            pass


def _wait_job_id(folder, timeout=60):
    jobs = os.path.join(str(folder), ".hpc-compose")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [d for d in os.listdir(jobs) if d.isdigit()] if os.path.isdir(jobs) else []
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError("no job directory under %s" % jobs)


def _revive_nodes(job_id):
    """Bring the killed node back (its slurmd; Slurm returns it to service) and clear what the
    crash left of the job in its Enroot data directory (the step containers, and the named ones
    that the node's keeper, killed with it, could not remove), as a real node's reboot would."""
    # Without --containers: the tools are installed already, and their source archives need not
    # be at hand where the tests run.
    proc = subprocess.run(["bash", CLUSTER_SCRIPT, "up", "--nodes", str(NODES)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for node in cluster_nodes():
        for name in enroot_containers(node):
            if name.startswith(("pyxis_%s." % job_id, "pyxis_hpc-compose_%s_" % job_id)):
                on_node(node, ["enroot", "remove", "--force", name], timeout=120)


def test_a_lost_node_ends_the_job_node_fail_and_says_which_node(slurm, slurm_jobs, image, cache_dir,
                                                                tmp_path):
    lost = cluster_nodes()[-1]
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    with open(os.path.join(str(tmp_path), "compose.yaml"), "w") as handle:
        # Slurm requeues a batch job after a node failure unless told not to: this one must end.
        handle.write(_long_running(image, cache_dir, marker).replace(
            "services:\n", "  submit_args: [\"--no-requeue\"]\nservices:\n", 1))
    up = subprocess.Popen([sys.executable, TOOL_PATH, "up", "-f", "compose.yaml"], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    run = None
    try:
        run = ComposeRun(str(tmp_path), None, job_id=slurm_jobs.add(_wait_job_id(tmp_path)))
        assert _wait_containers_everywhere(marker) == set(cluster_nodes())

        _kill_node(lost)

        out, err = up.communicate(timeout=240)
    finally:
        if up.poll() is None:
            up.kill()
        _revive_nodes(run.job_id if run else "none")

    assert up.returncode == 1, (out, err)
    assert "ended NODE_FAIL" in err
    assert "node %s is down" % lost in err
    # The node is back by now: status finds the failure in the accounting's node events.
    status = run_tool_cli(["status", "-f", "compose.yaml"], cwd=tmp_path)
    assert "progress:   ended NODE_FAIL: a node of the job failed (node %s was down from " % lost \
        in status.out
    # On the nodes that stayed up, Slurm ended the job's steps and Pyxis removed their containers
    # (the lost node's own leftovers were cleared when it came back, as a reboot would).
    assert_nothing_left(marker, run)


# --- exec on the node of a service ---------------------------------------------------------------

def _wait_for_lines(run, name, count, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = lines_of(run.log(name))
        except OSError:
            lines = []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, "%s logged %r" % (name, lines)
        time.sleep(0.5)


def _exec(run, *args):
    return run_tool_cli(["exec", "-f", "compose.yaml", "-T"] + list(args), cwd=run.folder,
                        timeout=120)


def test_exec_index_and_node_pick_that_task_of_a_distributed_service(slurm, slurm_jobs, image,
                                                                     cache_dir, tmp_path):
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    # Each task leaves a file in its own container's /tmp: exec must see only its node's.
    run = compose_run(tmp_path, head(cache_dir) + """\
  ranks:
    image: %s
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: touch "/tmp/%s-$(hostname)" && echo "up $(hostname)" && exec sleep 300
""" % (image, NODES, marker), slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    _wait_for_lines(run, "ranks", NODES)
    nodes = cluster_nodes()
    probe = 'echo "$(hostname) rank=$SLURM_PROCID $(ls /tmp | grep %s)"; exit 7' % marker

    for args, node in ((["--index", "2"], nodes[1]), (["--node", nodes[2]], nodes[2]),
                       ([], nodes[0])):
        result = _exec(run, *(args + ["ranks", "--", "sh", "-c", probe]))
        assert result.code == 7, result
        assert result.out == "%s rank=%d %s-%s\n" % (node, nodes.index(node), marker, node)

    result = _exec(run, "--index", str(NODES + 1), "ranks", "true")
    assert (result.code, result.err) == (1, "error: service 'ranks' has %d node(s): --index must "
                                            "be 1 to %d, got %d\n" % (NODES, NODES, NODES + 1))
    subprocess.run(["scancel", run.job_id], check=True, timeout=30)
    assert wait_for_job(run.job_id, timeout=120) == "CANCELLED"
    assert_nothing_left(marker, run)  # the named container is gone from every node


def test_exec_reaches_a_service_pinned_to_a_node_that_is_not_the_first(slurm, slurm_jobs, image,
                                                                       cache_dir, tmp_path):
    last = cluster_nodes()[-1]
    run = compose_run(tmp_path, """\
name: multinode-e2e
x-slurm: {time: "00:05:00", cache_dir: %s, submit_args: ["--nodelist=%s"]}
services:
  app:
    image: %s
    working_dir: /tmp
    environment: {GREETING: hello}
    command: echo up && exec sleep 300
""" % (cache_dir, last, image), slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    _wait_for_lines(run, "app", 1)

    result = _exec(run, "app", "--", "sh", "-c", 'echo "$(hostname) $GREETING $PWD"')
    assert (result.code, result.out) == (0, "%s hello /tmp\n" % last), result
    result = _exec(run, "--node", cluster_nodes()[0], "app", "true")
    assert (result.code, result.err) == (1, "error: service 'app' does not run on node %s (its "
                                            "nodes: %s)\n" % (cluster_nodes()[0], last))


def test_exec_on_the_host_runtime_runs_on_the_chosen_node_in_the_services_environment(
        slurm, slurm_jobs, three_nodes, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run = compose_run(tmp_path, """\
name: multinode-e2e
x-slurm: {time: "00:05:00", runtime: host, nodes: %d}
services:
  app:
    working_dir: %s
    environment: {GREETING: "hi there"}
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: sh -c 'echo "up $(hostname)"; exec sleep 300'
""" % (NODES, work, NODES), slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    _wait_for_lines(run, "app", NODES)
    nodes = cluster_nodes()

    result = _exec(run, "--index", "3", "app", "--", "sh", "-c",
                   'echo "$(hostname)|$GREETING|$PWD|$SLURM_PROCID"; exit 6')
    assert (result.code, result.out) == (6, "%s|hi there|%s|2\n" % (nodes[2], work)), result
    logs = run_tool_cli(["logs", "-f", "compose.yaml", "--no-prefix"], cwd=run.folder)
    assert sorted(lines_of(logs.out)) == ["up %s" % node for node in nodes]


# --- every log line before the verdict ----------------------------------------------------------

def test_up_prints_every_log_line_of_every_node_before_its_verdict(slurm, slurm_jobs, image,
                                                                   cache_dir, tmp_path):
    run = compose_run(tmp_path, head(cache_dir) + """\
  chatty:
    image: %s
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: for i in $(seq 1 300); do echo "$(hostname) line $i"; done
""" % (image, NODES), slurm_jobs)

    assert run.result.code == 0, run.result
    out = run.result.out
    verdict = out.index("job %s COMPLETED\n" % run.job_id)
    printed = [line for line in out[:verdict].splitlines() if line.startswith("[chatty] ")]
    assert sorted(printed) == sorted("[chatty] %s line %d" % (node, i)
                                     for node in cluster_nodes() for i in range(1, 301))


# --- requeue with resume --------------------------------------------------------------------------

def test_a_requeued_job_resumes_as_attempt_one_and_status_says_so(slurm, slurm_jobs, image,
                                                                  cache_dir, tmp_path):
    shared = tmp_path / "resume"
    run = compose_run(tmp_path, head(cache_dir, extra="  resume: {path: %s}\n  submit_args: [\"--requeue\"]\n"
                                     % shared) + """\
  app:
    image: %s
    command: echo "attempt $HPC_COMPOSE_ATTEMPT resume=$HPC_COMPOSE_IS_RESUME"; if [ "$HPC_COMPOSE_ATTEMPT" = 0 ]; then exec sleep 600; fi
""" % image, slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    wait_running(run, ["app"])

    subprocess.run(["scontrol", "requeue", run.job_id], check=True, timeout=30)
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = run_tool_cli(["status", "-f", "compose.yaml"], cwd=tmp_path).out
        if "requeued: attempt 0 ended" in status:
            break
        time.sleep(1)
    assert "attempt 1 starts when it runs" in status
    # Slurm 22.05 holds a requeued job for about two minutes (BeginTime); the test need not wait,
    # but a launch in the same second as the old credential's revocation is refused by slurmd
    # ("Job credential revoked"), so it lets a few seconds pass first.
    time.sleep(3)
    subprocess.run(["scontrol", "update", "JobId=" + run.job_id, "StartTime=now"], check=True,
                   timeout=30)

    assert wait_for_job(run.job_id, timeout=300) == "COMPLETED"
    state = run.state()
    assert (state["attempt"], state["status"]) == (1, "completed")
    # The only service spans the three nodes: one line per node.
    assert lines_of(run.log("app")) == ["attempt 1 resume=1"] * NODES
    with open(os.path.join(str(shared), "_hpc-compose", "latest.json")) as handle:
        assert json.load(handle)["attempt"] == 1


# --- run and up --local on several nodes ---------------------------------------------------------

def _stack(image, cache_dir, port, workers_command):
    """A server on the primary node, ready when 127.0.0.1:PORT answers there, and a worker on every
    node that reaches it by the primary node's name."""
    return head(cache_dir) + """\
  server:
    image: %s
    command: exec python3 -m http.server %d
    readiness: {type: tcp, port: %d, timeout_seconds: 60}
  workers:
    image: %s
    depends_on: {server: {condition: service_healthy}}
    x-slurm: {nodes: %d, ntasks_per_node: 1}
    command: %s
""" % (image, port, port, image, NODES, json.dumps(workers_command))


REACH = ('echo "$(hostname) $(curl -s -o /dev/null -w %%{http_code} '
         'http://$HPC_COMPOSE_PRIMARY_NODE:%d/)"')


def test_run_of_a_distributed_service_streams_every_node_and_passes_its_exit_code(
        slurm, slurm_jobs, image, cache_dir, tmp_path):
    port = free_port()
    (tmp_path / "compose.yaml").write_text(_stack(image, cache_dir, port, "echo not this"))
    # Task 2 fails once every task has reached the server (each leaves a file in the job folder):
    # sooner, --kill-on-bad-exit would stop a task whose container is still being set up.
    command = REACH % port + (
        '; touch /hpc-compose/job/reached.$SLURM_PROCID; [ "$SLURM_PROCID" = 2 ] || exit 0; n=0; '
        'while [ "$(ls /hpc-compose/job/reached.* | wc -l)" -lt %d ] && [ $n -lt 240 ]; do '
        'sleep 0.5; n=$((n + 1)); done; exit 4' % NODES)
    result = run_tool_cli(["run", "-f", "compose.yaml", "workers", "--", "sh", "-c", command],
                          cwd=tmp_path, timeout=600)
    slurm_jobs.add(submitted_job_id(result.out + result.err))
    assert result.code == 4, result
    # stdout is the service's own output: a line from every node (then srun's report of task 2).
    lines = [line for line in result.out.splitlines() if not line.startswith("srun: ")]
    assert sorted(lines) == ["%s 200" % node for node in cluster_nodes()], result


def _up_local_in_allocation(tmp_path, image, cache_dir, step=()):
    """``salloc`` of every node, running ``up --local`` in its shell (``step``: in a step of it)."""
    port = free_port()
    (tmp_path / "compose.yaml").write_text(_stack(image, cache_dir, port, REACH % port))
    command = "%s %s up --local -f compose.yaml" % (sys.executable, TOOL_PATH)
    proc = subprocess.run(["salloc", "--nodes=%d" % NODES, "--time=5"] + list(step)
                          + ["bash", "-c", command], cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"started job (\d+) as steps of this allocation", proc.stdout).group(1)
    workers = sorted(line for line in proc.stdout.splitlines() if line.startswith("[workers] "))
    assert workers == ["[workers] %s 200" % node for node in cluster_nodes()], proc.stdout
    return job_id


def _steps(job_id):
    """``{step name: node list}`` of a job, from sacct (which may lag the job's end a little)."""
    steps = {}
    deadline = time.monotonic() + 60
    while "hpc-compose:workers" not in steps and time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "--format=JobName,NodeList"],
                             stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout
        steps = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        time.sleep(1)
    return steps


def test_up_local_in_salloc_s_shell_runs_the_batch_script_on_the_first_node(slurm, image,
                                                                            cache_dir, tmp_path):
    # salloc's shell is this machine, outside every node's network: the server's readiness (its
    # 127.0.0.1, probed by the batch script) is only met because the script runs on the first node.
    job_id = _up_local_in_allocation(tmp_path, image, cache_dir)
    steps = _steps(job_id)
    nodes = cluster_nodes()
    assert steps["hpc-compose-batch"] == nodes[0], steps
    assert steps["hpc-compose:server"] == nodes[0], steps
    assert steps["hpc-compose:workers"] == "%s[1-%d]" % (nodes[0][:-1], NODES), steps


def test_up_local_in_a_one_node_step_of_the_allocation_runs_services_on_every_node(
        slurm, image, cache_dir, tmp_path):
    # As in an interactive `srun --pty bash`: the step's SLURM_NNODES=1 and SLURM_NTASKS=1 must not
    # become the defaults of the services' steps (the workers span every node).
    job_id = _up_local_in_allocation(tmp_path, image, cache_dir,
                                     step=["srun", "--nodes=1", "--ntasks=1"])
    steps = _steps(job_id)
    assert "hpc-compose-batch" not in steps, steps
    assert steps["hpc-compose:workers"] == "%s[1-%d]" % (cluster_nodes()[0][:-1], NODES), steps
