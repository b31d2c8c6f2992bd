"""CLI core: parser assembly, file discovery, output-format flags, completions, main's error path."""
import json
import os
import subprocess
import sys

import pytest

import hpc_compose as hc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = "services:\n  app:\n    image: python:3.11-slim\n    command: python -c pass\n"


def subcommands(parser):
    """The subcommands action of an argparse parser (``.choices``: name -> parser)."""
    import argparse
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]


def test_version_prints_the_module_version(capsys):
    with pytest.raises(SystemExit) as info:
        hc.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("hpc-compose %s" % hc.__version__) and out.endswith("\n")


def test_no_command_prints_help_and_exits_2(cli):
    result = cli([])
    assert result.code == 2 and "usage: hpc-compose" in result.out


def test_unknown_command_lists_every_command(cli):
    result = cli(["valdate"])
    assert result.code == 2
    assert "invalid choice: 'valdate'" in result.err and "'validate'" in result.err
    assert "Traceback" not in result.err


def test_requested_command_builds_only_that_subparser():
    parser = hc.build_parser(hc._requested_command(["validate", "-f", "x.yaml"]))
    assert list(subcommands(parser).choices) == ["validate"]
    assert hc._requested_command(["--help"]) is None
    assert hc._requested_command(["nonsense"]) is None


def test_every_command_of_the_parser_has_a_handler_a_help_line_and_a_manual_section():
    subparsers = subcommands(hc.build_parser())
    assert list(subparsers.choices) == [name for name, _ in hc._command_parsers()]
    with open(os.path.join(REPO, "docs", "commands.md")) as handle:
        headings = [line for line in handle.read().splitlines() if line.startswith("## ")]
    helped = dict((action.dest, action.help) for action in subparsers._choices_actions)
    for name, command in subparsers.choices.items():
        handler = command.get_default("handler")
        assert handler is not None and handler.__name__.startswith("_cmd_"), name
        assert helped[name], name
        assert any(heading == "## " + name or heading.startswith("## %s " % name)
                   or "alias: %s)" % name in heading for heading in headings), name
        assert list(subcommands(hc.build_parser(name)).choices) == [name]


def test_unknown_option_is_usage_error_with_hint(cli):
    result = cli(["validate", "--bogus"])
    assert result.code == 2
    assert "unrecognized arguments: --bogus" in result.err and "hint:" in result.err


def test_json_alias_conflicts_with_text_format(cli, project):
    path = project.write("compose.yaml", MINIMAL)
    result = cli(["validate", "-f", path, "--json", "--format", "text"])
    assert result.code == 2 and "--json conflicts with --format text" in result.err


def test_json_alias_selects_json(cli, project):
    path = project.write("compose.yaml", MINIMAL)
    result = cli(["validate", "-f", path, "--json"])
    assert result.code == 0 and '"valid": true' in result.out


def test_directory_as_file_is_usage_error(cli, project):
    result = cli(["validate", "-f", str(project.root)])
    assert result.code == 2 and "is a directory" in result.err


def test_missing_file_is_usage_error(cli, project):
    result = cli(["validate", "-f", str(project.root / "nope.yaml")])
    assert result.code == 2 and "does not exist" in result.err


def test_default_file_prefers_compose_yaml_over_docker_compose(cli, project):
    project.write("docker-compose.yml", MINIMAL.replace("app:", "legacy:"))
    project.write("compose.yaml", MINIMAL)
    result = cli(["validate", "--format", "json"], cwd=str(project.root))
    assert result.code == 0 and '"app"' in result.out and "legacy" not in result.out


def test_default_file_falls_back_to_docker_compose_names(cli, project):
    project.write("docker-compose.yaml", MINIMAL.replace("app:", "legacy:"))
    result = cli(["validate", "--format", "json"], cwd=str(project.root))
    assert result.code == 0 and '"legacy"' in result.out


def test_no_compose_file_here_names_the_searched_names(cli, project):
    result = cli(["validate"], cwd=str(project.root))
    assert result.code == 2
    for name in hc._DEFAULT_COMPOSE_FILES:
        assert name in result.err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_name_every_command(cli, shell):
    result = cli(["completions", shell])
    assert result.code == 0
    assert " ".join(sorted(subcommands(hc.build_parser()).choices)) in result.out
    assert ("-l watch" if shell == "fish" else "--watch") in result.out


def test_bash_completion_script_parses():
    result = subprocess.run([sys.executable, os.path.join(REPO, "hpc_compose.py"), "completions", "bash"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    check = subprocess.run(["bash", "-n"], input=result.stdout, universal_newlines=True)
    assert check.returncode == 0


def test_broken_pipe_is_not_an_error():
    command = "%s %s completions bash | head -1" % (sys.executable, os.path.join(REPO, "hpc_compose.py"))
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("# bash completion")


def test_shell_quote_round_trips_through_bash():
    values = ["plain", "", "with space", "it's", "$HOME", "a\nb", "back\\slash", "ünï", "--flag=x"]
    script = "printf '%s\\0' " + " ".join(hc.shell_quote(v) for v in values)
    out = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE).stdout.decode("utf-8")
    assert out.split("\0")[:-1] == values


def test_shell_quote_refuses_nul():
    with pytest.raises(hc.HpcComposeError):
        hc.shell_quote("a\0b")


def test_write_json_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "state.json"
    hc._write_json_atomic(str(target), {"b": 1, "a": [1, 2]})
    assert hc._load_json(str(target)) == {"a": [1, 2], "b": 1}
    assert os.listdir(str(tmp_path)) == ["state.json"]


def test_unwritable_output_is_one_line_error_not_traceback(cli, project):
    path = project.write("compose.yaml", MINIMAL)
    result = cli(["render", "-f", path, "--output", "/proc/nope/job.sbatch"])
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.startswith("error: ") and "/proc/nope" in result.err


# --- output encoding under the C locale -----------------------------------------------------------

LOCALE_PYTHONS = [path for path in (os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python"),
                                    os.path.expanduser("~/.pyenv/versions/3.13.0/bin/python"))
                  if os.path.isfile(path)] or [sys.executable]
UNICODE_SPEC = ("name: d\u00e9mo\nservices:\n  app:\n    image: python:3.11-slim\n"
                "    command: echo \"h\u00e9llo \u2713\"\n    environment:\n"
                "      GREETING: \"gr\u00fc\u00df \u2713\"\n")
UNICODE_LOG = "h\u00e9llo \u2713\n\u2587\u2587\u2587 50%\n"


def run_in_c_locale(python, args, cwd, path="/nonexistent"):
    """The module run by ``python`` in a bare C-locale environment, as cron or ``ssh host cmd``."""
    env = {"PATH": path, "LANG": "C", "LC_ALL": "C", "HOME": str(cwd)}
    return subprocess.run([python, os.path.join(REPO, "hpc_compose.py")] + list(args), env=env,
                          cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


@pytest.fixture
def unicode_job(tmp_path):
    """A project with non-ASCII values and an ended job (id 4242) whose log is non-ASCII."""
    (tmp_path / "compose.yaml").write_bytes(UNICODE_SPEC.encode("utf-8"))
    job_dir = tmp_path / ".hpc-compose" / "4242"
    (job_dir / "logs").mkdir(parents=True)
    (job_dir / "logs" / "app.log").write_bytes(UNICODE_LOG.encode("utf-8"))
    (job_dir / "state.json").write_text(json.dumps({
        "status": "completed", "exit_code": 0, "services": [
            {"name": "app", "status": "completed", "log_path": str(job_dir / "logs" / "app.log")}]}))
    return tmp_path


@pytest.mark.parametrize("python", LOCALE_PYTHONS, ids=lambda p: p.split("/versions/")[-1].split("/")[0])
@pytest.mark.parametrize("args, expected", [
    (["config"], "name: \"d\u00e9mo\""),
    (["config", "--format", "json"], "\"name\": \"d\u00e9mo\""),
    (["inspect", "--verbose"], "GREETING=gr\u00fc\u00df \u2713"),
    (["render"], "#SBATCH --job-name='d\u00e9mo'"),
    (["logs", "--job-id", "4242"], "[app] h\u00e9llo \u2713\n[app] \u2587\u2587\u2587 50%\n"),
    (["logs", "--follow", "--job-id", "4242"], "[app] h\u00e9llo \u2713\n"),
])
def test_output_is_utf8_under_the_c_locale(python, args, expected, unicode_job):
    result = run_in_c_locale(python, args, unicode_job)
    assert b"Traceback" not in result.stderr, result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.decode("utf-8")


@pytest.mark.parametrize("python", LOCALE_PYTHONS, ids=lambda p: p.split("/versions/")[-1].split("/")[0])
def test_error_messages_are_readable_under_the_c_locale(python, tmp_path):
    (tmp_path / "compose.yaml").write_bytes(
        "services:\n  \u00e4pp:\n    image: x\n".encode("utf-8"))
    result = run_in_c_locale(python, ["validate"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode("utf-8").startswith(
        "error: %s:2:3: services.\u00e4pp: service name '\u00e4pp' is not valid\n"
        % (tmp_path / "compose.yaml"))
