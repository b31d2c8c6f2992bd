"""Validate and preflight agree with the REAL scheduler: every time and memory form of
test_spec_slurm.py against the real ``sbatch --test-only``, and preflight's refusals of what the
test cluster cannot run (each naming the field, its line and what the cluster offers)."""
import os

import pytest

import hpc_compose as hc
from slurm_support import _run, run_tool_cli
from test_spec_slurm import ACCEPTED, REFUSED

# What sbatch prints when it cannot parse the value itself (not when the cluster lacks room).
PARSE_ERRORS = {"time": "invalid --time specification", "mem": "invalid --mem specification"}


def validates(tmp_path, key, value):
    path = tmp_path / "compose.yaml"
    path.write_text('x-slurm:\n  runtime: host\n  %s: "%s"\nservices:\n  app:\n    command: [true]\n'
                    % (key, value))
    try:
        hc.load_spec(str(path), environ={"HOME": str(tmp_path)})
        return True
    except hc.SpecError:
        return False


# Where validate refuses on purpose what this sbatch lets through: its time parser reads "-5" as a
# limit of 2982611 days (an overflow) and "-0" as no days at all; both are typing mistakes.
DELIBERATE = [("time", "-5"), ("time", "-0")]


@pytest.mark.parametrize("key,value", DELIBERATE)
def test_validate_refuses_on_purpose_what_sbatch_misreads(slurm, tmp_path, key, value):
    script = "#!/bin/bash\n#SBATCH --%s=%s\ntrue\n" % (key, hc.shell_quote(value))
    _code, _out, err = _test_only(script, tmp_path)
    assert PARSE_ERRORS[key] not in err.lower() and not validates(tmp_path, key, value)


@pytest.mark.parametrize("key,value", ACCEPTED + REFUSED)
def test_validate_and_the_real_sbatch_agree_on_time_and_memory(slurm, tmp_path, key, value):
    script = "#!/bin/bash\n#SBATCH --%s=%s\ntrue\n" % (key, hc.shell_quote(value))
    code, _out, err = _test_only(script, tmp_path)
    sbatch_parses = PARSE_ERRORS[key] not in err.lower()
    assert validates(tmp_path, key, value) == sbatch_parses, (key, value, code, err)


def _test_only(script, tmp_path):
    import subprocess
    proc = subprocess.run(["sbatch", "--test-only"], input=script, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def preflight(tmp_path, x_slurm):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  time: \"00:05:00\"\n%sservices:\n  app:\n"
        "    command: [\"true\"]\n" % x_slurm)
    return run_tool_cli(["preflight", "-f", str(tmp_path / "compose.yaml")], cwd=str(tmp_path))


def node_memory_mb():
    _code, out, _err = _run(["sinfo", "-h", "-o", "%m"])
    return max(int(line.rstrip("+")) for line in out.split())


@pytest.mark.parametrize("x_slurm,field,line,offer", [
    ("  mem: 4T\n", "mem", 4, "MB and"),
    ("  nodes: 9\n", "nodes", 4, "9 nodes do not fit partition "),
    ("  partition: no-such-partition\n", "partition", 4, "the cluster has "),
    ("  gres: gpu:1\n", "gres", 4, "no gres"),
])
def test_preflight_refuses_what_the_cluster_cannot_run_naming_field_line_and_offer(
        slurm, tmp_path, x_slurm, field, line, offer):
    result = preflight(tmp_path, x_slurm)
    assert result.code == 1, result
    assert "compose.yaml:%d: x-slurm.%s: " % (line, field) in result.out, result.out
    assert offer in result.out and "sbatch --test-only refuses the job" in result.out
    assert "fix: " in result.out


def test_preflight_passes_a_spec_that_fits(slurm, tmp_path):
    result = preflight(tmp_path, "  mem: %dM\n  nodes: 1\n" % min(512, node_memory_mb()))
    assert result.code == 0, result
    assert "0 errors" in result.out


def test_submit_of_a_refused_spec_imports_nothing(slurm, tmp_path, cache_dir):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  time: \"00:05:00\"\n  mem: 4T\n  cache_dir: %s\nservices:\n  app:\n"
        "    image: redis:7\n    command: [\"true\"]\n" % cache_dir)
    enroot_log = tmp_path / "enroot.log"
    standin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "enroot")
    result = run_tool_cli(["submit", "-f", str(tmp_path / "compose.yaml"), "--enroot-bin",
                           standin], cwd=str(tmp_path),
                          env=dict(os.environ, ENROOT_STANDIN_LOG=str(enroot_log)))
    assert result.code != 0, result
    assert "x-slurm.mem" in result.err and "nothing was submitted" in result.err
    assert not enroot_log.exists() or "import" not in enroot_log.read_text()
    assert os.listdir(cache_dir) == []
    assert not os.path.exists(str(tmp_path / ".hpc-compose"))
