"""Heterogeneous jobs (x-slurm.groups) against the real scheduler of any cluster, one node
included. Slurm gives every group nodes of its own, so a one-node cluster cannot run one: what
every cluster checks here is that preflight, asking the real `sbatch --test-only` (which weighs
each group alone and accepts), says before the submission that the groups need more nodes than
the cluster has, instead of leaving a job pending for ever. The runs themselves (a head on one
node, workers on two) are in tests/test_multinode_e2e.py, on the 3-node cluster."""
from slurm_support import cluster_nodes, run_tool_cli


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
