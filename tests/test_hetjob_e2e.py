"""A heterogeneous job (x-slurm.groups) on any cluster, one node included: two groups of one node
each, a server in the first and a client in the second that reaches it through the group
variables, a readiness probe sent to the second group's node, and sacct's two components.
The 3-node version (a head on one node, workers on two, status/stats/exec/cancel, a failing
worker) is in tests/test_multinode_e2e.py."""
import json

from slurm_support import _run, free_port, pyxis_test_image, wait_for_job
from test_pyxis_e2e import compose_run


def test_two_groups_of_one_node_run_as_one_job_and_the_client_reaches_the_server(
        slurm, slurm_jobs, cache_dir, tmp_path):
    image = pyxis_test_image()
    server_port, helper_port = free_port(), free_port()
    reach = ("python3 -c \"import os, urllib.request; urllib.request.urlopen('http://' + "
             "os.environ['HPC_COMPOSE_GROUP_SERVER_PRIMARY_NODE'] + ':%d/', timeout=10); "
             "print('reached the server from group', os.environ['HPC_COMPOSE_GROUP'])\"" % server_port)
    run = compose_run(tmp_path, """\
name: groups-one-node
x-slurm:
  time: "00:05:00"
  cache_dir: %s
  groups:
    server: {nodes: 1, ntasks: 1}
    client: {nodes: 1, ntasks: 1}
services:
  server:
    image: %s
    command: exec python3 -m http.server %d
    readiness: {type: tcp, port: %d}
  helper:
    image: %s
    x-slurm: {group: client}
    command: exec python3 -m http.server %d
    readiness: {type: tcp, port: %d}
  client:
    image: %s
    x-slurm: {group: client}
    depends_on: {server: {condition: service_healthy}, helper: {condition: service_healthy}}
    command: %s
""" % (cache_dir, image, server_port, server_port, image, helper_port, helper_port, image,
       json.dumps(reach)), slurm_jobs)

    assert run.result.code == 0, run.result
    assert wait_for_job(run.job_id, timeout=60) == "COMPLETED"
    assert "reached the server from group client" in run.log("client")
    assert run.service("client")["placement"]["group"] == "client"
    code, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", run.job_id, "--format=JobID,State"])
    assert code == 0
    assert [line.split("|")[0] for line in out.splitlines() if line.strip()] == [
        run.job_id + "+0", run.job_id + "+1"]
