"""The authoring commands: validate, inspect, config; exit codes and bad input."""
import json
import os

import pytest

STACK = """\
name: stack
x-slurm:
  time: "00:10:00"
  cache_dir: /shared/cache
services:
  redis:
    image: redis:7
    command: redis-server --port 6379
    readiness:
      type: tcp
      port: 6379
  app:
    image: python:3.11-slim
    depends_on:
      redis:
        condition: service_healthy
    environment:
      SECRET_TOKEN: ${TOKEN:-s3cr3t}
      VERSION: 1.10
    volumes:
      - ./src:/workspace:ro
    working_dir: /workspace
    command: ["python", "-m", "main"]
"""


@pytest.fixture
def stack(project):
    project.write("compose.yaml", STACK)
    return project


def test_validate_text(cli, stack):
    result = cli(["validate"], cwd=str(stack.root))
    assert result.code == 0, result
    assert result.out == "spec is valid (2 services: redis -> app)\n"
    assert result.err == ""


def test_validate_json(cli, stack):
    result = cli(["validate", "-f", str(stack.root / "compose.yaml"), "--format", "json"])
    assert result.code == 0, result
    assert json.loads(result.out) == {
        "valid": True, "compose_file": str(stack.root / "compose.yaml"), "name": "stack",
        "service_count": 2, "services": ["redis", "app"]}


def test_validate_json_alias(cli, stack):
    result = cli(["validate", "--json"], cwd=str(stack.root))
    assert json.loads(result.out)["valid"] is True


def test_validate_prints_warnings_to_stderr(cli, project):
    project.write("compose.yaml", "services:\n  app:\n    image: x\n    x-slrum: {}\n")
    result = cli(["validate", "--format", "json"], cwd=str(project.root))
    assert result.code == 0
    assert json.loads(result.out)["valid"] is True
    assert result.err.startswith("warning: ")
    assert "did you mean 'x-slurm'" in result.err


def test_validate_invalid_spec_exits_2_with_location(cli, project):
    project.write("compose.yaml", "services:\n  app:\n    image: x\n    ports: [\"80:80\"]\n")
    result = cli(["validate"], cwd=str(project.root))
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith("error: %s:4:5: services.app.ports: 'ports' is not supported"
                                 % (project.root / "compose.yaml"))
    assert "hint:" in result.err


def test_validate_reports_dependency_cycle(cli, project):
    project.write("compose.yaml", "services:\n  a:\n    image: x\n    depends_on: [b]\n"
                                  "  b:\n    image: x\n    depends_on: [a]\n")
    result = cli(["validate"], cwd=str(project.root))
    assert result.code == 2
    assert "dependency cycle: a -> b -> a" in result.err


# --- bad input: one clear message, exit 2, no traceback -----------------------------------------

def assert_one_clear_error(result):
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("error: ")
    assert "Traceback" not in result.err
    assert len([line for line in result.err.splitlines() if line.startswith("error:")]) == 1


def test_bad_input_malformed_yaml(cli, project):
    project.write("compose.yaml", "services:\n  app:\n    image: [x\n")
    result = cli(["validate"], cwd=str(project.root))
    assert_one_clear_error(result)
    assert str(project.root / "compose.yaml") + ":" in result.err


def test_bad_input_wrong_type(cli, project):
    project.write("compose.yaml", "x-slurm:\n  nodes: \"two\"\nservices:\n  app:\n    image: x\n")
    result = cli(["validate"], cwd=str(project.root))
    assert_one_clear_error(result)
    assert ":2:10: x-slurm.nodes: must be an integer, got the string 'two'" in result.err


def test_bad_input_empty_file(cli, project):
    project.write("compose.yaml", "")
    result = cli(["validate"], cwd=str(project.root))
    assert_one_clear_error(result)
    assert "empty" in result.err


def test_bad_input_binary_file(cli, project):
    (project.root / "compose.yaml").write_bytes(bytes(range(256)))
    result = cli(["validate"], cwd=str(project.root))
    assert_one_clear_error(result)
    assert "binary" in result.err


def test_bad_input_directory_as_file(cli, project):
    (project.root / "sub").mkdir()
    result = cli(["validate", "-f", str(project.root / "sub")])
    assert_one_clear_error(result)
    assert "is a directory" in result.err


def test_bad_input_missing_file(cli, project):
    result = cli(["validate", "-f", str(project.root / "missing.yaml")])
    assert_one_clear_error(result)
    assert "does not exist" in result.err


def test_bad_input_no_compose_file_in_folder(cli, project):
    result = cli(["validate"], cwd=str(project.root))
    assert_one_clear_error(result)
    assert "no compose file found" in result.err


def test_bad_input_unreadable_dotenv(cli, stack):
    os.symlink(".env", str(stack.root / ".env"))
    result = cli(["validate"], cwd=str(stack.root))
    assert_one_clear_error(result)
    assert "cannot read .env" in result.err
    assert str(stack.root / ".env") in result.err


def test_bad_input_malformed_dotenv(cli, stack):
    stack.write(".env", "TOKEN\n")
    result = cli(["validate"], cwd=str(stack.root))
    assert_one_clear_error(result)
    assert "%s:1:" % (stack.root / ".env") in result.err


@pytest.mark.parametrize("command", ["validate", "inspect", "config"])
def test_every_authoring_command_reports_spec_errors_the_same_way(cli, project, command):
    project.write("compose.yaml", "services:\n  app:\n    imagee: x\n")
    result = cli([command], cwd=str(project.root))
    assert_one_clear_error(result)
    assert "did you mean 'image'?" in result.err


# --- inspect ------------------------------------------------------------------------------------

def test_inspect_text_summary(cli, stack):
    result = cli(["inspect"], cwd=str(stack.root))
    assert result.code == 0, result
    out = result.out
    assert "name: stack\n" in out
    assert "runtime: pyxis\n" in out
    assert "cache dir: /shared/cache\n" in out
    assert "allocation geometry: nodes=1 ntasks=auto ntasks_per_node=auto\n" in out
    assert "service order: redis -> app\n" in out
    assert "  image: docker://python:3.11-slim (registry docker.io)\n" in out
    assert "  execution: exec: python -m main (image ENTRYPOINT runs first)\n" in out
    assert "  depends on: redis (service_healthy)\n" in out
    assert "  readiness: tcp 127.0.0.1:6379 (timeout 60s)\n" in out
    assert "  failure policy: fail_job\n" in out
    assert "  placement: single nodes=1 ntasks=1 ntasks_per_node=auto\n" in out
    assert "s3cr3t" not in out


def test_inspect_verbose_shows_values_and_mounts_after_a_secrets_note(cli, stack):
    result = cli(["inspect", "--verbose"], cwd=str(stack.root))
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert "secrets" in lines[0]
    assert "    SECRET_TOKEN=s3cr3t" in lines
    assert "    VERSION=1.10" in lines
    assert "    %s -> /workspace (ro)" % (stack.root / "src") in lines
    assert any(line.endswith("-> /hpc-compose/job (per-job directory)") for line in lines)


def test_inspect_json_is_the_plan(cli, stack, hc):
    result = cli(["inspect", "--format", "json"], cwd=str(stack.root))
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["service_order"] == ["redis", "app"]
    assert data["cache_dir"] == "/shared/cache"
    app = data["services"][1]
    assert app["environment"] == [["SECRET_TOKEN", "s3cr3t"], ["VERSION", "1.10"]]
    assert app["mounts"] == [{"host": str(stack.root / "src"), "container": "/workspace",
                              "options": "ro"}]
    assert app["execution"]["argv"] == ["python", "-m", "main"]
    assert app["depends_on"] == [{"name": "redis", "condition": "service_healthy"}]
    assert data["services"][0]["dependents"] == ["app"]


def test_inspect_uses_the_shell_environment(cli, stack):
    result = cli(["inspect", "--verbose"], cwd=str(stack.root), env={"TOKEN": "from-shell"})
    assert "    SECRET_TOKEN=from-shell" in result.out.splitlines()


# --- config -------------------------------------------------------------------------------------

def test_config_yaml_reads_back_as_the_normalized_spec(cli, stack, hc):
    result = cli(["config"], cwd=str(stack.root))
    assert result.code == 0, result
    data = hc.parse_yaml(result.out)
    assert data["services"]["app"]["environment"] == {"SECRET_TOKEN": "s3cr3t", "VERSION": "1.10"}
    assert data["services"]["app"]["command"] == ["python", "-m", "main"]
    assert data["services"]["redis"]["readiness"] == {"type": "tcp", "host": "127.0.0.1",
                                                      "port": 6379, "timeout_seconds": 60}
    assert data["services"]["app"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert data["x-slurm"]["time"] == "00:10:00"


def test_config_json_matches_the_yaml(cli, stack, hc):
    text = cli(["config"], cwd=str(stack.root)).out
    as_json = json.loads(cli(["config", "--format", "json"], cwd=str(stack.root)).out)
    assert hc.parse_yaml(text) == as_json


def test_config_output_validates_again(cli, stack, project, tmp_path):
    text = cli(["config"], cwd=str(stack.root)).out
    again = tmp_path / "again"
    again.mkdir()
    (again / "compose.yaml").write_text(text)
    (again / "src").mkdir()
    result = cli(["validate"], cwd=str(again))
    assert result.code == 0, result


def test_config_keeps_dollar_in_string_commands_literal(cli, project, hc):
    project.write("compose.yaml", "services:\n  app:\n    image: x\n"
                                  "    command: echo \"$HOME\" '$$'\n")
    data = hc.parse_yaml(cli(["config"], cwd=str(project.root)).out)
    assert data["services"]["app"]["command"] == "echo \"$HOME\" '$$'"


def test_config_escapes_dollars_of_interpolated_fields_so_it_loads_back(cli, project, hc):
    project.write("compose.yaml", "x-slurm:\n  artifacts:\n    export_dir: ./out/${SLURM_JOB_ID}\n"
                                  "    paths: [/hpc-compose/job/x]\nservices:\n  app:\n"
                                  "    image: x\n    command: [sh, -c, \"echo $$HOME\"]\n"
                                  "    environment:\n      PRICE: \"5$$\"\n")
    text = cli(["config"], cwd=str(project.root)).out
    data = hc.parse_yaml(text)
    assert data["services"]["app"]["command"] == ["sh", "-c", "echo $$HOME"]
    assert data["services"]["app"]["environment"] == {"PRICE": "5$$"}
    assert data["x-slurm"]["artifacts"]["export_dir"] == "./out/$${SLURM_JOB_ID}"
    original = hc.load_spec(str(project.root / "compose.yaml"))
    (project.root / "compose.yaml").write_text(text)
    again = hc.load_spec(str(project.root / "compose.yaml"))
    assert [s._replace(line=None) for s in again.services] == \
        [s._replace(line=None) for s in original.services]
    assert again.slurm == original.slurm


def test_inspect_shows_cache_artifacts_and_expectation(cli, stack):
    out = cli(["inspect"], cwd=str(stack.root)).out
    lines = out.splitlines()
    base = [line for line in lines if line.startswith("  base image: /shared/cache/base/")]
    assert len(base) == 2
    assert all(line.endswith("(cache miss)") for line in base)


def test_inspect_shows_local_image_state(cli, project):
    project.write("compose.yaml", "services:\n  app:\n    image: ./app.sqsh\n")
    assert "  runtime image: %s (local image MISSING)" % (project.root / "app.sqsh") in \
        cli(["inspect"], cwd=str(project.root)).out.splitlines()
    project.write("app.sqsh", "squashfs stand-in")
    assert "  runtime image: %s (local image present)" % (project.root / "app.sqsh") in \
        cli(["inspect"], cwd=str(project.root)).out.splitlines()


def test_inspect_json_carries_image_reports(cli, stack):
    data = json.loads(cli(["inspect", "--json"], cwd=str(stack.root)).out)
    assert [entry["service"] for entry in data["images"]] == ["redis", "app"]
    assert data["images"][0]["expectation"] == "miss"


def shipped_examples():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith(".yaml"))


def test_config_of_every_shipped_example_loads_back_to_the_same_spec(cli, hc, tmp_path):
    environ = {"USER": "tester", "HOME": "/home/tester"}
    examples = shipped_examples()
    assert examples
    for example in examples:
        result = cli(["config", "-f", example], env=environ)
        assert result.code == 0, (example, result)
        copy = tmp_path / os.path.basename(example)
        copy.write_text(result.out)
        original = hc.load_spec(example, environ=environ)
        again = hc.load_spec(str(copy), environ=environ)
        assert [s._replace(line=None) for s in again.services] == \
            [s._replace(line=None) for s in original.services], example
        assert again.slurm == original.slurm, example
        assert (again.name, again.version) == (original.name, original.version)


def test_config_keeps_signal_requeue_dependency_array_and_service_signal(cli, tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text('x-slurm:\n  runtime: host\n  time: "01:00:00"\n  resume: {path: /shared/r}\n'
                       '  signal: {before: 5m, on_signal: requeue}\n  requeue: true\n'
                       '  dependency: afterok:5\n  array: "0-3"\n'
                       'services:\n  app:\n    command: ["true"]\n'
                       '    x-slurm:\n      signal: {name: INT}\n')
    result = cli(["config", "-f", compose, "--format", "json"])
    data = json.loads(result.out)
    assert data["x-slurm"]["signal"] == {"name": "USR1", "before": 300, "on_signal": "requeue",
                                         "grace": 150, "max_attempts": 5}
    assert (data["x-slurm"]["requeue"], data["x-slurm"]["dependency"], data["x-slurm"]["array"]) \
        == (True, "afterok:5", "0-3")
    assert data["services"]["app"]["x-slurm"]["signal"] == {"name": "INT", "forward": True}


# --- several compose files, profiles, every error at once ----------------------------------------

HOST_BASE = """\
x-slurm:
  runtime: host
services:
  db:
    command: [sleep, "1"]
  app:
    command: [echo, base]
    depends_on: [db]
  debug:
    command: [echo, debug]
    profiles: [debug]
"""


def test_repeated_f_merges_the_files_and_config_prints_the_result(cli, project):
    base = project.write("compose.yaml", HOST_BASE)
    override = project.write("prod.yaml", "services:\n  app:\n    command: [echo, prod]\n")
    result = cli(["config", "-f", base, "-f", override, "--format", "json"])
    assert result.code == 0, result
    assert json.loads(result.out)["services"]["app"]["command"] == ["echo", "prod"]


def test_compose_file_lists_the_files_with_the_path_separator(cli, project):
    project.write("compose.yaml", HOST_BASE)
    project.write("prod.yaml", "services:\n  app:\n    command: [echo, prod]\n")
    for separator, env in ((":", {}), (";", {"COMPOSE_PATH_SEPARATOR": ";"})):
        env = dict(env, COMPOSE_FILE="compose.yaml%sprod.yaml" % separator)
        result = cli(["config", "--format", "json"], cwd=project.root, env=env)
        assert result.code == 0, result
        assert json.loads(result.out)["services"]["app"]["command"] == ["echo", "prod"]


def test_without_f_the_default_override_file_is_merged(cli, project):
    project.write("compose.yaml", HOST_BASE)
    project.write("compose.override.yaml", "services:\n  app:\n    command: [echo, local]\n")
    result = cli(["config", "--format", "json"], cwd=project.root)
    assert result.code == 0, result
    assert json.loads(result.out)["services"]["app"]["command"] == ["echo", "local"]


def test_f_replaces_the_default_files(cli, project):
    base = project.write("compose.yaml", HOST_BASE)
    project.write("compose.override.yaml", "services:\n  app:\n    command: [echo, local]\n")
    result = cli(["config", "-f", base, "--format", "json"], cwd=project.root)
    assert json.loads(result.out)["services"]["app"]["command"] == ["echo", "base"]


def test_config_services_and_profiles(cli, project):
    path = project.write("compose.yaml", HOST_BASE)
    assert cli(["config", "-f", path, "--services"]).out == "db\napp\n"
    assert cli(["config", "-f", path, "--services", "--profile", "debug"]).out == \
        "db\napp\ndebug\n"
    assert cli(["config", "-f", path, "--services"],
               env={"COMPOSE_PROFILES": "debug"}).out == "db\napp\ndebug\n"
    assert cli(["config", "-f", path, "--profiles"]).out == "debug\n"


def test_env_file_flag_replaces_dotenv(cli, project):
    path = project.write("compose.yaml", "services:\n  app:\n    image: redis:${TAG}\n")
    project.write(".env", "TAG=dotenv\n")
    flag_file = project.write("ci.env", "TAG=ci\n")
    result = cli(["config", "-f", path, "--env-file", flag_file, "--format", "json"])
    assert json.loads(result.out)["services"]["app"]["image"] == "redis:ci"
    missing = cli(["config", "-f", path, "--env-file", project.root / "nope.env"])
    assert missing.code == 2 and "env file" in missing.err


def test_submit_with_service_names_runs_them_and_their_dependencies(cli, project):
    path = project.write("compose.yaml", HOST_BASE)
    result = cli(["submit", "--dry-run", "--no-preflight", "-f", path, "debug", "app"])
    assert result.code == 0, result
    script = (project.root / "hpc-compose.sbatch").read_text()
    assert "echo debug" in script and "sleep 1" in script.replace("'", "")


def test_validate_reports_every_error_then_a_count(cli, project):
    path = project.write("compose.yaml", "services:\n  a:\n    image: 'x y'\n  b:\n"
                                         "    image: redis\n    working_dir: rel\n"
                                         "    command: [run]\n")
    result = cli(["validate", "-f", path])
    assert result.code == 2
    lines = result.err.splitlines()
    assert lines[0].startswith("error: %s:3:12: services.a.image:" % path)
    assert any(line.startswith("%s:6:18: services.b.working_dir:" % path) for line in lines)
    assert lines[-1] == "2 errors in %s" % path


def test_validate_json_lists_the_errors(cli, project):
    path = project.write("compose.yaml", "services:\n  a:\n    image: 'x y'\n  b:\n"
                                         "    imgae: redis\n")
    result = cli(["validate", "-f", path, "--format", "json"])
    assert result.code == 2
    report = json.loads(result.out)
    assert report["valid"] is False and report["error_count"] == 2
    assert [(e["line"], e["column"], e["path"]) for e in report["errors"]] == [
        (3, 12, "services.a.image"), (5, 5, "services.b.imgae")]
    assert report["errors"][1]["hint"] == "did you mean 'image'?"
