"""The test cluster scripts' own behaviour that needs no cluster: `--slurm` dispatch and bad input.

Bringing generations up and running the end-to-end suite in them is CI's section 7 (.ci/run).
"""
import os
import shutil
import subprocess

import pytest

from slurm_support import REPO_ROOT

CLUSTER_SH = os.path.join(REPO_ROOT, "tests", "cluster", "slurm-cluster.sh")
GENERATION_SH = os.path.join(REPO_ROOT, "tests", "cluster", "slurm-generation.sh")


def run(argv):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def test_exec_on_the_host_generation_runs_the_command_with_that_generation_named():
    code, out, err = run(["bash", CLUSTER_SH, "exec", "--slurm", "22.05", "--",
                          "sh", "-c", 'printf "%s|%s" "$HPC_COMPOSE_TEST_SLURM" "$1"', "sh", "a b"])

    assert (code, out, err) == (0, "22.05|a b", "")


@pytest.mark.parametrize("action", ["up", "status", "down", "exec"])
def test_an_unknown_generation_is_one_line_naming_the_known_ones(action):
    code, out, err = run(["bash", CLUSTER_SH, action, "--slurm", "23.02", "--", "true"])

    assert code == 1
    assert out == ""
    assert err == ("[slurm-generation] ERROR: unknown Slurm generation '23.02' "
                   "(known: 22.05, 24.11, 26.05)\n")


@pytest.mark.parametrize("nodes", ["0", "three", ""])
def test_a_newer_generation_refuses_a_node_count_that_is_not_a_positive_number(nodes):
    code, out, err = run(["bash", GENERATION_SH, "up", "24.11", "--nodes", nodes])

    assert code == 1
    assert err == ("[slurm-generation 24.11] ERROR: --nodes wants a number >= 1, not '%s'\n"
                   % nodes)


@pytest.mark.parametrize("script", ["slurm-cluster.sh", "slurm-generation.sh", "slurm-conf.sh",
                                    "container-tools.sh"])
def test_cluster_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    # -x reads the `. slurm-conf.sh` of the two cluster scripts (so the functions they take from it
    # are known); slurm-conf.sh itself is checked as one of the scripts.
    code, out, err = run([shellcheck, "-x", "--severity=warning",
                          os.path.join(REPO_ROOT, "tests", "cluster", script)])

    assert code == 0, out + err
