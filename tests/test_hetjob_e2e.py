"""Heterogeneous jobs (x-slurm.groups) against the real scheduler, on every cluster CI tests:
the host's Slurm 22.05 and the 24.11 and 26.05 roots, each with three nodes (`--nodes 3`).

Slurm gives every group nodes of its own, so the runs (a head on one node, workers on two) need
three nodes; the preflight test works on any cluster: asking the real `sbatch --test-only` (which
weighs each group alone and accepts), preflight says before the submission that the groups need
more nodes than the cluster has, instead of leaving a job pending for ever.
"""
import json
import re
import time
import uuid

import pytest

from slurm_support import (CLUSTER_COMMAND, _run, cluster_nodes, expected_slurm_generation,
                           free_port, pyxis_test_image, require_nodes, run_tool_cli,
                           wait_for_job)
from test_pyxis_e2e import assert_nothing_left, compose_run, wait_running

NODES = 3


def _cluster_command():
    """What brings up the three nodes of the cluster under test."""
    generation = expected_slurm_generation()
    if generation in (None, "22.05"):
        return CLUSTER_COMMAND
    return "bash tests/cluster/slurm-cluster.sh up --slurm %s --containers --nodes %d" % (
        generation, NODES)


@pytest.fixture(scope="module")
def three_nodes(slurm):
    """The cluster's nodes; the runs need three (a skip, a failure under CI, without)."""
    return require_nodes(NODES, "a two-group heterogeneous job (a head on one node, workers on two)",
                         _cluster_command())


@pytest.fixture(scope="module")
def image(three_nodes):
    return pyxis_test_image()


def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


def test_preflight_refuses_groups_that_need_more_nodes_than_the_cluster_has(slurm, tmp_path):
    nodes = len(cluster_nodes())
    (tmp_path / "compose.yaml").write_text("""\
name: groups-too-big
x-slurm:
  runtime: host
  time: "00:05:00"
  groups:
    head: {nodes: 1}
    workers: {nodes: %d}
services:
  head: {command: ["true"]}
  workers: {command: ["true"], x-slurm: {group: workers}}
""" % nodes)

    result = run_tool_cli(["preflight", "-f", "compose.yaml"], cwd=str(tmp_path))

    assert result.code == 1, result
    assert ("compose.yaml:5: x-slurm.groups: the groups need %d nodes together and their "
            "partitions have %d" % (nodes + 1, nodes)) in result.out + result.err, result
    assert "sbatch --test-only accepts each group alone" in result.out + result.err


# --- a head on one node, workers on two ---------------------------------------------------------

def _heterogeneous(cache_dir, image, head_port, probe_port, worker_command, time_limit="00:05:00"):
    """Group head (1 node): an HTTP head. Group workers (2 nodes): a helper probed on its node
    (a readiness check across groups) and the workers, distributed, reaching the head by name."""
    return """\
name: groups-e2e
x-slurm:
  time: "%s"
  cache_dir: %s
  groups:
    head: {nodes: 1}
    workers: {nodes: 2, ntasks_per_node: 1}
services:
  head:
    image: %s
    command: exec python3 -m http.server %d
    readiness: {type: tcp, port: %d}
  probe:
    image: %s
    x-slurm: {group: workers, nodes: 1}
    command: exec python3 -m http.server %d
    readiness: {type: http, url: "http://127.0.0.1:%d/"}
  workers:
    image: %s
    x-slurm: {group: workers, nodes: 2}
    depends_on: {head: {condition: service_healthy}, probe: {condition: service_healthy}}
    command: %s
""" % (time_limit, cache_dir, image, head_port, head_port, image, probe_port, probe_port, image,
       json.dumps(worker_command))


_REACH_HEAD = ("python3 -c \"import os, socket, urllib.request; urllib.request.urlopen('http://%s:"
               "%d/', timeout=10); print(socket.gethostname(), 'reached', os.environ["
               "'HPC_COMPOSE_GROUP_HEAD_PRIMARY_NODE'], 'in', os.environ['HPC_COMPOSE_GROUP'])\"")


def test_a_two_group_heterogeneous_job_runs_and_status_logs_stats_cancel_follow_it(
        slurm, slurm_jobs, image, cache_dir, tmp_path):
    head_port, probe_port = free_port(), free_port()
    marker = "hc-e2e-%s" % uuid.uuid4().hex[:8]
    reach = _REACH_HEAD % ("$HPC_COMPOSE_GROUP_HEAD_PRIMARY_NODE", head_port)
    run = compose_run(tmp_path, _heterogeneous(
        cache_dir, image, head_port, probe_port,
        "%s && exec python3 -c 'import time; time.sleep(600)' %s" % (reach, marker)),
        slurm_jobs, verb="submit")
    assert run.result.code == 0, run.result
    wait_running(run, ["head", "probe", "workers"])
    deadline = time.monotonic() + 60
    while run.log("workers").count("reached") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    # One job, two components: the head alone on one node, the workers on the two others.
    head_node = run.service("head")["placement"]["nodelist"]
    worker_nodes = run.service("workers")["placement"]["nodelist"].split()
    assert len(worker_nodes) == 2 and head_node not in worker_nodes
    assert run.service("probe")["placement"]["nodelist"] == worker_nodes[0]
    assert sorted(re.findall(r"(\S+) reached (\S+) in workers", run.log("workers"))) == sorted(
        (node, head_node) for node in worker_nodes)

    status = run_tool_cli(["status", "-f", "compose.yaml"], cwd=str(tmp_path))
    assert status.code == 0, status
    assert "group head (%s+0): RUNNING on %s: head" % (run.job_id, head_node) in status.out
    assert "group workers (%s+1): RUNNING on " % run.job_id in status.out
    assert "service workers: running" in status.out and "group=workers nodes=2" in status.out
    logs = run_tool_cli(["logs", "-f", "compose.yaml", "--tail", "50"], cwd=str(tmp_path))
    assert logs.code == 0 and "[workers]" in logs.out and "reached" in logs.out, logs
    stats = run_tool_cli(["stats", "-f", "compose.yaml", "--format", "json"], cwd=str(tmp_path))
    assert stats.code == 0, stats
    steps = [step["step_id"] for step in json.loads(stats.out)["steps"]]
    assert any(step.startswith(run.job_id + "+0.") for step in steps), steps
    assert any(step.startswith(run.job_id + "+1.") for step in steps), steps
    exec_result = run_tool_cli(["exec", "-f", "compose.yaml", "-T", "--index", "2", "workers", "--",
                                "sh", "-c", "echo $HPC_COMPOSE_GROUP on $(hostname)"],
                               cwd=str(tmp_path))
    assert exec_result.code == 0, exec_result
    assert "workers on %s" % worker_nodes[1] in exec_result.out

    cancel = run_tool_cli(["cancel", "-f", "compose.yaml"], cwd=str(tmp_path))
    assert cancel.code == 0, cancel
    assert wait_for_job(run.job_id, timeout=120) == "CANCELLED"
    code, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", run.job_id, "--format=JobID,NodeList"])
    assert [line.split("|")[0] for line in lines_of(out)] == [run.job_id + "+0",
                                                             run.job_id + "+1"]
    assert_nothing_left(marker, run)


def test_a_failing_worker_fails_the_heterogeneous_job_and_stops_the_head(
        slurm, slurm_jobs, image, cache_dir, tmp_path):
    head_port, probe_port = free_port(), free_port()
    reach = _REACH_HEAD % ("$HPC_COMPOSE_GROUP_HEAD_PRIMARY_NODE", head_port)
    run = compose_run(tmp_path, _heterogeneous(
        cache_dir, image, head_port, probe_port,
        # Task 1 fails once it has reached the head; task 0 would run on.
        "%s && if [ \"$SLURM_PROCID\" = 1 ]; then exit 3; fi; exec sleep 600" % reach),
        slurm_jobs)

    assert run.result.code == 1, run.result
    assert wait_for_job(run.job_id, timeout=60) == "FAILED"
    state = run.state()
    assert state["status"] == "failed" and "workers" in state["reason"]
    # srun ends the step at once (--kill-on-bad-exit); its own exit code is the other task's.
    assert "task 1: Exited with exit code 3" in run.log("workers")
    assert run.service("workers")["last_exit_code"] != 0
    assert run.service("head")["status"] == "stopped"
    assert "reached" in run.log("workers")
