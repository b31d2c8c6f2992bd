"""Preflight asks the scheduler: ``sbatch --test-only`` of the rendered script, and a refusal
explained from ``sinfo`` and ``scontrol show partition`` (field, line, what the cluster offers, a
fix). The scheduler's answers here come from stand-ins that print what a real Slurm prints
(tests/test_scheduler_e2e.py asks the real one)."""
import os
import stat

import pytest

import hpc_compose as hc

SINFO_ROWS = "debug*|up|7030|2|(null)|n1\ndebug*|up|7030|2|(null)|n2\ngpu|up|64000|16|gpu:a100:4(S:0-1)|g1\n"
SCONTROL_ROWS = ("PartitionName=debug MaxNodes=UNLIMITED MaxTime=UNLIMITED State=UP TotalNodes=2\n"
                 "PartitionName=gpu MaxNodes=1 MaxTime=01:00:00 State=UP TotalNodes=1\n")


def standin(tmp_path, name, stdout="", stderr="", code=0):
    """A STAND-IN for one Slurm client: prints the given answer, records its argv and stdin."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\necho \"$@\" >> %s.argv\ncat > %s.stdin\nprintf '%%s' '%s'\n"
                    "printf '%%s' '%s' >&2\nexit %d\n"
                    % (path, path, stdout, stderr, code))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def report(tmp_path, x_slurm, sbatch_error="", sbatch_code=1):
    compose = tmp_path / "compose.yaml"
    compose.write_text("x-slurm:\n  runtime: host\n%sservices:\n  app:\n    command: [\"true\"]\n"
                       % x_slurm)
    plan = hc.build_plan(hc.load_spec(str(compose), environ={"HOME": str(tmp_path)}),
                         environ={"HOME": str(tmp_path)})
    runtime_plan = hc.build_runtime_plan(plan)
    options = hc.PreflightOptions(
        srun_bin=standin(tmp_path, "srun"),
        sbatch_bin=standin(tmp_path, "sbatch", stderr=sbatch_error, code=sbatch_code),
        sinfo_bin=standin(tmp_path, "sinfo", stdout=SINFO_ROWS),
        scontrol_bin=standin(tmp_path, "scontrol", stdout=SCONTROL_ROWS),
        script=hc.render_script(runtime_plan))
    return hc.run_preflight(runtime_plan, options)


def scheduler(found):
    return [f for f in found.findings if f.check == "scheduler"]


def test_an_accepted_job_is_one_ok_finding_and_sbatch_read_the_rendered_script(tmp_path):
    found = report(tmp_path, "  mem: 1G\n", "sbatch: Job 7 to start at now using 1 processors on "
                                           "nodes n1 in partition debug", 0)
    assert [f.level for f in scheduler(found)] == ["ok"]
    assert (tmp_path / "sbatch.argv").read_text().split() == ["--test-only"]
    assert (tmp_path / "sbatch.stdin").read_text().startswith("#!/bin/bash")


REFUSED = "sbatch: error: Batch job submission failed: Requested node configuration is not available"


@pytest.mark.parametrize("x_slurm,field,line,offer,fix", [
    ("  mem: 4T\n", "mem", 3, "4T (4194304 MB per node) does not fit partition debug: 2 nodes, "
     "7030 MB and 2 CPUs each", "at most 7030M"),
    ("  nodes: 9\n", "nodes", 3, "9 nodes do not fit partition debug", "at most 2 nodes"),
    ("  partition: nope\n", "partition", 3, "partition 'nope' does not exist; the cluster has "
     "debug, gpu", "the default (debug)"),
    ("  gres: gpu:1\n", "gres", 3, "no node has gres 'gpu' in partition debug", "drop x-slurm.gres"),
    ("  gpus_per_node: 1\n", "gpus_per_node", 3, "no node has gres 'gpu'",
     "drop x-slurm.gpus_per_node"),
    ("  partition: gpu\n  time: \"02:00:00\"\n", "time", 4, "longer than the MaxTime of "
     "partition gpu", "at most 60 minutes"),
    ("  partition: gpu\n  nodes: 2\n", "nodes", 4, "2 nodes do not fit partition gpu", "at most 1"),
    ("  cpus_per_task: 8\n", "cpus_per_task", 3, "8 CPUs per task do not fit", "at most 2 CPUs"),
])
def test_a_refusal_names_the_field_its_line_the_offer_and_a_fix(tmp_path, x_slurm, field, line,
                                                                offer, fix):
    found = scheduler(report(tmp_path, x_slurm, REFUSED))
    assert [f.level for f in found] == ["error"]
    assert found[0].message.startswith("compose.yaml:%d: x-slurm.%s: " % (line, field))
    assert offer in found[0].message and "Requested node configuration" in found[0].message
    assert fix in found[0].remediation


def test_a_refusal_nothing_explains_still_says_what_the_scheduler_said(tmp_path):
    found = scheduler(report(tmp_path, "", "sbatch: error: Batch job submission failed: "
                                           "Something new"))
    assert found[0].level == "error" and "Something new" in found[0].message
    assert "sinfo" in found[0].remediation


def test_an_unreachable_scheduler_is_said_once_and_preflight_goes_on(tmp_path):
    found = report(tmp_path, "", "sbatch: error: Batch job submission failed: Unable to contact "
                                 "slurm controller (connect failure)")
    assert [f.level for f in scheduler(found)] == ["warn"]
    assert "could not be asked" in scheduler(found)[0].message and not found.errors


def test_up_local_does_not_ask_the_scheduler(tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text("x-slurm:\n  runtime: host\nservices:\n  app:\n    command: [\"true\"]\n")
    plan = hc.build_plan(hc.load_spec(str(compose)))
    found = hc.run_preflight(hc.build_runtime_plan(plan), hc.PreflightOptions(
        local="machine", sbatch_bin=standin(tmp_path, "sbatch", code=1)))
    assert [f.message for f in scheduler(found)] == ["up --local: the scheduler is not asked"]
    assert not (tmp_path / "sbatch.argv").exists()


def test_the_partition_offer_is_read_from_sinfo_and_scontrol(tmp_path):
    offers = hc._read_partitions(standin(tmp_path, "sinfo", stdout=SINFO_ROWS),
                                 standin(tmp_path, "scontrol", stdout=SCONTROL_ROWS))
    assert offers["gpu"] == hc._PartitionOffer("gpu", "UP", False, ("g1",), 64000, 16, ("gpu",),
                                               3600, 1)
    assert offers["debug"].default and offers["debug"].max_time is None
    assert offers["debug"].nodes == ("n1", "n2")


def test_a_heterogeneous_job_is_checked_group_by_group(tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text("x-slurm:\n  runtime: host\n  groups:\n    head:\n      partition: gpu\n"
                       "    workers:\n      nodes: 5\n      mem: 1G\nservices:\n"
                       "  app:\n    command: [\"true\"]\n"
                       "  work:\n    command: [\"true\"]\n    x-slurm: {group: workers}\n")
    environ = {"HOME": str(tmp_path)}
    runtime_plan = hc.build_runtime_plan(hc.build_plan(hc.load_spec(str(compose),
                                                                    environ=environ),
                                                       environ=environ))
    script = hc.render_script(runtime_plan)
    options = hc.PreflightOptions(
        srun_bin=standin(tmp_path, "srun"), sbatch_bin=standin(tmp_path, "sbatch",
                                                               stderr=REFUSED, code=1),
        sinfo_bin=standin(tmp_path, "sinfo", stdout=SINFO_ROWS),
        scontrol_bin=standin(tmp_path, "scontrol", stdout=SCONTROL_ROWS), script=script)
    found = scheduler(hc.run_preflight(runtime_plan, options))
    # sbatch read the whole script, both blocks; the refusal names the group that does not fit.
    assert "#SBATCH hetjob" in (tmp_path / "sbatch.stdin").read_text()
    assert [f.message.split(" (sbatch")[0] for f in found] == [
        "compose.yaml:7: x-slurm.groups.workers.nodes: 5 nodes do not fit partition debug: "
        "2 nodes, 7030 MB and 2 CPUs each, no gres, no time limit"]
    assert "at most 2 nodes" in found[0].remediation


def test_groups_needing_more_nodes_together_than_there_are_are_refused_though_sbatch_accepts(
        tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text("x-slurm:\n  runtime: host\n  groups:\n    head: {}\n    workers:\n"
                       "      nodes: 2\nservices:\n  app:\n    command: [\"true\"]\n"
                       "  work:\n    command: [\"true\"]\n    x-slurm: {group: workers}\n")
    environ = {"HOME": str(tmp_path)}
    runtime_plan = hc.build_runtime_plan(hc.build_plan(hc.load_spec(str(compose),
                                                                    environ=environ),
                                                       environ=environ))
    options = hc.PreflightOptions(
        srun_bin=standin(tmp_path, "srun"),
        sbatch_bin=standin(tmp_path, "sbatch", stderr="sbatch: Job 7 to start at now", code=0),
        sinfo_bin=standin(tmp_path, "sinfo", stdout=SINFO_ROWS),
        scontrol_bin=standin(tmp_path, "scontrol", stdout=SCONTROL_ROWS),
        script=hc.render_script(runtime_plan))
    found = scheduler(hc.run_preflight(runtime_plan, options))
    assert [f.level for f in found] == ["error"]
    assert found[0].message.startswith(
        "compose.yaml:3: x-slurm.groups: the groups need 3 nodes together and their partitions "
        "have 2 (n1,n2)")
    assert found[0].message.endswith("(sbatch --test-only accepts each group alone)")
