"""Command-line habits people bring from Docker Compose and from typing fast: a did-you-mean for
a mistyped command, logs SERVICE..., logs -f without a file, -f - for standard input, and the
job's resources in inspect."""
import io

import hpc_compose as hc

SPEC = ("x-slurm:\n  runtime: host\n  time: \"00:10:00\"\n  mem: 2G\n  partition: debug\n"
        "services:\n  app:\n    command: [\"true\"]\n    x-slurm:\n      mem: 1G\n")


def test_a_mistyped_command_gets_a_did_you_mean(cli):
    result = cli(["valdate"])
    assert result.code == 2 and "did you mean 'validate'?" in result.err


def test_logs_f_without_a_file_says_follow_is_the_flag(cli):
    result = cli(["logs", "-f"])
    assert result.code == 2 and "to follow the logs, use --follow" in result.err


def test_logs_takes_service_names_as_compose_does():
    args = hc.build_parser("logs").parse_args(["logs", "--follow", "app", "worker"])
    assert args.names == ["app", "worker"] and args.follow


def test_f_dash_reads_the_compose_file_from_standard_input(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SPEC))
    result = cli(["validate", "-f", "-"], cwd=str(tmp_path))
    assert result.code == 0 and "spec is valid (1 service: app)" in result.out
    assert (tmp_path / ".hpc-compose-stdin.yaml").read_text() == SPEC


def test_inspect_text_shows_the_jobs_and_the_steps_resources(cli, project):
    project.write("compose.yaml", SPEC)
    result = cli(["inspect", "-f", "compose.yaml"], cwd=str(project.root))
    assert "job resources: partition=debug time=00:10:00 mem=2G\n" in result.out
    assert "  resources: mem=1G\n" in result.out
