"""Safe on a shared cluster (issue 27): #SBATCH values as sbatch itself reads them, no symlink
games under .hpc-compose or in the cache, no secret in any output, bounded input, migrate and
artifact paths that stay inside, and modes that follow the umask.

Each reproduction of the issue is one test here; the real sbatch reads the same adversarial
values in test_security_e2e.py.
"""
import os
import stat

import pytest

import hpc_compose as hc


# --- #SBATCH lines as sbatch reads them ----------------------------------------------------------

class SbatchFatal(Exception):
    """What sbatch refuses the script with (an unmatched quote, a leading ':')."""


def sbatch_directive_arguments(script):
    """The arguments sbatch takes from ``script``'s #SBATCH lines: a port of src/sbatch/opt.c
    (_opt_batch_script, _get_argument). A backslash escapes the next character even inside
    quotes, quotes group, an unquoted '#' ends the line, and a line holding "hetjob" or
    "packjob" starts another heterogeneous-job component (reported here as an error)."""
    arguments = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            stripped = line.lstrip()
            if stripped and not stripped.startswith("#"):
                break            # the first command ends the directives
            continue
        if "hetjob" in line.lower() or "packjob" in line.lower():
            raise SbatchFatal("a heterogeneous-job separator: %r" % line)
        rest = line[len("#SBATCH"):]
        pos = 0
        while True:
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
            if pos < len(rest) and rest[pos] == ":":
                raise SbatchFatal("Unexpected ':' in %r" % line)
            argument, quote, escape = [], None, False
            while pos < len(rest) and (quote or not rest[pos].isspace()):
                char = rest[pos]
                if escape:
                    escape = False
                elif char == "\\":
                    escape = True
                    pos += 1
                    continue
                elif quote:
                    if char == quote:
                        quote = None
                        pos += 1
                        continue
                elif char in "\"'":
                    quote = char
                    pos += 1
                    continue
                elif char == "#":
                    break
                argument.append(char)
                pos += 1
            if quote:
                raise SbatchFatal("Unmatched %s in %r" % (quote, line))
            if not argument:
                break
            arguments.append("".join(argument))
    return arguments


def test_the_splitter_port_reads_what_the_issue_reproduced_with_the_real_sbatch():
    # main 020458e rendered this line for job_name "run-${RUN_NAME}" and the .env line below; the
    # real sbatch took --comment and --output from it.
    line = "#SBATCH --job-name='run-x\\'\"'\"'\" --comment=injected --output=/dev/null #'"
    assert sbatch_directive_arguments(line + "\nset -eu\n") == [
        "--job-name=run-x'\"'", "--comment=injected", "--output=/dev/null"]


ADVERSARIAL = (
    "x\\'\" --comment=injected --output=/dev/null #",
    "x' --comment=injected '",
    "ends-with\\",
    "a b --export=ALL,BASH_ENV=/tmp/evil",
    "it's",
    "\"dq\"",
    "#not-a-comment",
    "tab\there",
    "$(id) `id`",
    "my-hetjob",
    "PackJob",
    ":colon",
)
SBATCH_FIELDS = ("job_name", "partition", "account", "qos", "time", "mem", "gres", "constraint",
                 "output", "error", "chdir")


def _render_with(tmp_path, cli, slurm_lines, top="", env=None):
    (tmp_path / "compose.yaml").write_text(
        "%sx-slurm:\n  runtime: host\n%sservices:\n  app:\n    command: [sleep, '1']\n"
        % (top, slurm_lines))
    return cli(["render", "-f", tmp_path / "compose.yaml"], env=env)


@pytest.mark.parametrize("field", SBATCH_FIELDS + ("name",))
def test_every_sbatch_field_reaches_sbatch_as_exactly_its_value_or_is_refused(tmp_path, cli, field):
    for value in ADVERSARIAL:
        if field == "name":
            result = _render_with(tmp_path, cli, "", top="name: \"${V}\"\n", env={"V": value})
        else:
            result = _render_with(tmp_path, cli, "  %s: \"${V}\"\n" % field, env={"V": value})
        if result.code != 0:
            assert result.code == 2, result
            assert "compose.yaml:" in result.err and \
                ("x-slurm.%s" % field if field != "name" else "name:") in result.err, result
            assert value not in result.err
            continue
        flag = {"name": "job-name", "job_name": "job-name"}.get(field, field)
        arguments = sbatch_directive_arguments(result.out)
        assert "--%s=%s" % (flag, value) in arguments, (value, arguments)
        assert not any(arg.startswith("--comment") or arg.startswith("--export")
                       for arg in arguments), (value, arguments)
        assert len(arguments) == 2 + (field != "name" and field != "job_name"), arguments


def test_a_backslash_in_an_sbatch_field_is_refused_at_validate_with_line_and_key(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  job_name: \"run-${RUN_NAME}\"\n"
        "services:\n  app:\n    command: [sleep, '1']\n")
    (tmp_path / ".env").write_text("RUN_NAME=x\\'\" --comment=injected --output=/dev/null #\n")
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2
    assert "compose.yaml:3:13: x-slurm.job_name: the value contains a backslash" in result.err
    assert "--comment" not in result.err


def test_submit_args_entries_are_one_argument_each_or_refused(tmp_path, cli):
    for value in ADVERSARIAL + ("--comment=a b",):
        result = _render_with(tmp_path, cli, "  submit_args: [\"--comment=${V}\"]\n",
                              env={"V": value})
        if result.code != 0:
            assert "x-slurm.submit_args[0]" in result.err, result
            continue
        arguments = sbatch_directive_arguments(result.out)
        assert arguments[-1] == "--comment=" + value and len(arguments) == 3, arguments
    result = _render_with(tmp_path, cli, "  submit_args: [--mail-type=END, --begin=now+3600]\n")
    assert sbatch_directive_arguments(result.out)[-2:] == ["--mail-type=END", "--begin=now+3600"]


def test_run_name_is_refused_when_sbatch_would_read_it_specially(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\nservices:\n  app:\n    command: [sleep, '1']\n")
    result = cli(["run", "-f", tmp_path / "compose.yaml", "--name", "x\\' --comment=y", "--dry-run",
                  "app"])
    assert result.code == 2 and "--name: the value contains a backslash" in result.err, result
