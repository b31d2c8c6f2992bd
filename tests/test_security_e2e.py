"""#SBATCH values against the real sbatch (issue 27): the splitter port of test_security.py
predicts what sbatch takes from a line, and the values hpc-compose accepts reach the job exactly,
with nothing injected. Every job is submitted held (`--hold`) and cancelled at the end.
"""
import os
import subprocess

import pytest

import hpc_compose as hc
from slurm_support import run_tool_cli, submitted_job_id, cancel_job
from test_security import SbatchFatal, sbatch_directive_arguments


def scontrol_fields(job_id):
    """``scontrol show job``'s fields as a dict (a value runs to the next ' Key=' on its line;
    JobName and the file paths, which may hold blanks, run to the end of their line)."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=30).stdout
    fields = {}
    for line in out.splitlines():
        line = line.strip()
        for key in ("JobName=", "StdOut=", "StdErr=", "WorkDir=", "Comment="):
            if key in line and (line.startswith(key) or key == "JobName="):
                fields[key[:-1]] = line[line.index(key) + len(key):]
                break
        else:
            for word in line.split(" "):
                if "=" in word:
                    key, _, value = word.partition("=")
                    fields.setdefault(key, value)
    return fields


def submit_held(script_text, cwd):
    path = os.path.join(str(cwd), "job.sbatch")
    with open(path, "w") as handle:
        handle.write(script_text)
    return subprocess.run(["sbatch", "--hold", "--parsable", path], cwd=str(cwd),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


@pytest.mark.parametrize("value", (
    "x\\'\" --comment=injected --output=/dev/null #",    # the issue's value: injects
    "x' --comment=not-injected '",                     # quoted soundly: one argument
    "it's \"q\" #x $(id)",
    "ends-with\\",                                      # sbatch: Unmatched '
))
def test_the_splitter_port_predicts_what_the_real_sbatch_takes(slurm, slurm_jobs, tmp_path, value):
    script = ("#!/bin/bash\n#SBATCH --job-name=%s\n#SBATCH --time=00:01:00\n"
              "#SBATCH --output=/dev/null\ntrue\n" % hc.shell_quote(value))
    try:
        predicted = sbatch_directive_arguments(script)
    except SbatchFatal:
        predicted = None
    result = submit_held(script, tmp_path)
    if predicted is None:
        assert result.returncode != 0 and "Unmatched" in result.stderr, result
        return
    assert result.returncode == 0, result.stderr
    job_id = slurm_jobs.add(result.stdout.strip().split(";")[0])
    try:
        fields = scontrol_fields(job_id)
        options = dict(arg[2:].split("=", 1) for arg in predicted if "=" in arg)
        assert fields["JobName"] == options["job-name"]
        assert fields.get("Comment", "(null)") == options.get("comment", "(null)")
    finally:
        cancel_job(job_id)


def test_accepted_adversarial_values_reach_the_job_exactly_and_inject_nothing(slurm, slurm_jobs,
                                                                              tmp_path):
    work = tmp_path / "work dir #1"
    work.mkdir()
    name = "it's \"q\" #x $(id) --comment=injected"
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  time: \"00:01:00\"\n  job_name: ${NAME}\n"
        "  output: ${OUT}\n  error: ${ERR}\n  chdir: ${WORK}\n"
        "  submit_args: [--hold, \"--comment=${COMMENT}\"]\n"
        "services:\n  app:\n    command: [\"true\"]\n")
    env = {"NAME": name, "OUT": str(tmp_path / "o u t's #%j.out"),
           "ERR": str(tmp_path / "e \"r\" %j.err"), "WORK": str(work), "COMMENT": "plain"}
    result = run_tool_cli(["submit", "-f", tmp_path / "compose.yaml"], cwd=tmp_path, env=env)
    assert result.code == 0, result
    job_id = slurm_jobs.add(submitted_job_id(result.out + result.err))
    try:
        fields = scontrol_fields(job_id)
        assert fields["JobName"] == name
        assert fields["StdOut"] == str(tmp_path / ("o u t's #%s.out" % job_id))
        assert fields["StdErr"] == str(tmp_path / ("e \"r\" %s.err" % job_id))
        assert fields["WorkDir"] == str(work)
        assert fields.get("Comment") == "plain"
    finally:
        cancel_job(job_id)


def test_the_issues_injection_is_refused_before_anything_is_submitted(slurm, tmp_path):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  time: \"00:01:00\"\n  job_name: \"run-${RUN_NAME}\"\n"
        "services:\n  app:\n    command: [\"true\"]\n")
    (tmp_path / ".env").write_text("RUN_NAME=x\\'\" --comment=injected --output=/dev/null #\n")
    result = run_tool_cli(["submit", "-f", tmp_path / "compose.yaml"], cwd=tmp_path)
    assert result.code == 2, result
    assert "x-slurm.job_name: the value contains a backslash" in result.err
    assert "submitted batch job" not in result.out + result.err
    assert not os.path.exists(str(tmp_path / ".hpc-compose" / "latest.json"))
