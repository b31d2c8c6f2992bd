"""Secrets and permissions: top-level and per-service ``secrets:``, their located errors, the
owner-only copies and how the script mounts and removes them, the modes of what the tool writes,
and that no value of a secret reaches the spec, the script or any output.

The cluster side (a real job reading /run/secrets, scancel, umask 000) is tests/test_secrets_e2e.py.
"""
import json
import os
import shutil
import stat
import subprocess

import pytest

import hpc_compose as hc

FILE_VALUE = "file-secret-0123456789"
ENV_VALUE = "env-secret-abcdefghij"
ENV = {"HOME": "/home/tester", "USER": "tester", "HF_TOKEN": ENV_VALUE}

COMPOSE = """\
name: demo
secrets:
  api_token:
    file: ./token.txt
  hf:
    environment: HF_TOKEN
services:
  app:
    image: /images/app.sqsh
    command: ["cat", "/run/secrets/api_token"]
    secrets:
      - api_token
      - source: hf
        target: hf_token
        mode: 0400
  helper:
    command: cat "$HPC_COMPOSE_SECRETS_DIR/hf"
    x-slurm:
      runtime: host
    secrets: [hf]
"""


@pytest.fixture
def secret_project(project):
    """A project with token.txt (0600) and the compose file above."""
    token = project.write("token.txt", FILE_VALUE + "\n")
    os.chmod(str(token), 0o600)
    project.write("compose.yaml", COMPOSE)
    return project


def load(project, text=None, env=None):
    if text is not None:
        project.write("compose.yaml", text)
    environ = dict(ENV, **(env or {}))
    return hc.load_spec(str(project.root / "compose.yaml"), environ=environ)


def plan_of(project, text=None, env=None):
    environ = dict(ENV, **(env or {}))
    return hc.build_plan(load(project, text, env), environ=environ)


def failure(project, text, env=None):
    with pytest.raises(hc.SpecError) as info:
        plan_of(project, text, env)
    assert info.value.exit_code == hc._EXIT_USAGE
    return info.value


def service(plan, name):
    return next(s for s in plan.services if s.name == name)


def with_secrets(body, secrets="secrets:\n  api_token:\n    file: ./token.txt\n"
                               "  hf:\n    environment: HF_TOKEN\n"):
    return secrets + "services:\n" + body


# --- the spec -------------------------------------------------------------------------------------

def test_top_level_secrets_keep_their_sources_as_references(secret_project):
    spec = load(secret_project)
    assert spec.secrets == (hc.SecretSpec("api_token", "file", "./token.txt", 3),
                            hc.SecretSpec("hf", "environment", "HF_TOKEN", 5))
    assert FILE_VALUE not in repr(spec) and ENV_VALUE not in repr(spec)


def test_short_form_targets_the_secret_name_and_long_form_sets_target_and_mode(secret_project):
    spec = load(secret_project)
    app = next(s for s in spec.services if s.name == "app")
    assert app.secrets == (hc.ServiceSecret("api_token", "api_token", None),
                           hc.ServiceSecret("hf", "hf_token", 0o400))


@pytest.mark.parametrize("written, expected", [
    ("0400", 0o400), ("0o600", 0o600), ('"0600"', 0o600), ("0700", 0o700),
    ("/run/secrets/x", None)])
def test_mode_is_read_as_octal_as_written(secret_project, written, expected):
    body = "  app:\n    image: /i.sqsh\n    secrets:\n      - source: hf\n        mode: %s\n" % written
    if expected is None:
        assert "is not octal permission bits" in failure(secret_project, with_secrets(body)).message
    else:
        spec = load(secret_project, with_secrets(body))
        assert spec.services[0].secrets[0].mode == expected


def test_group_and_other_mode_bits_are_dropped_with_a_warning(secret_project):
    body = "  app:\n    image: /i.sqsh\n    secrets:\n      - source: hf\n        mode: 0444\n"
    spec = load(secret_project, with_secrets(body))
    assert spec.services[0].secrets[0].mode == 0o400
    assert any("copy stays owner-only (0400)" in w for w in spec.warnings)


def test_target_may_be_written_as_a_run_secrets_path(secret_project):
    body = ("  app:\n    image: /i.sqsh\n    secrets:\n      - source: hf\n"
            "        target: /run/secrets/token\n")
    assert load(secret_project, with_secrets(body)).services[0].secrets[0].target == "token"


def test_share_with_group_is_a_boolean_of_x_slurm(secret_project):
    text = "x-slurm:\n  share_with_group: true\n" + with_secrets(
        "  app:\n    image: /i.sqsh\n")
    assert load(secret_project, text).slurm.share_with_group is True
    error = failure(secret_project, "x-slurm:\n  share_with_group: yes please\n"
                    + with_secrets("  app:\n    image: /i.sqsh\n"))
    assert error.path == "x-slurm.share_with_group" and "true or false" in error.message


SERVICE = "  app:\n    image: /i.sqsh\n    secrets:\n"


@pytest.mark.parametrize("text, message, line, path", [
    (with_secrets(SERVICE + "      - api_tokn\n"), "unknown secret 'api_tokn'", 10,
     "services.app.secrets[0]"),
    (with_secrets(SERVICE + "      - source: nope\n"), "unknown secret 'nope'", 10,
     "services.app.secrets[0].source"),
    ("services:\n" + SERVICE + "      - hf\n", "unknown secret 'hf'", 5, "services.app.secrets[0]"),
    ("secrets:\n  t:\n    file: ./missing.txt\nservices:\n  app:\n    image: /i.sqsh\n",
     "secret file", 3, "secrets.t.file"),
    ("secrets:\n  t:\n    file: ./\nservices:\n  app:\n    image: /i.sqsh\n",
     "is not a regular file", 3, "secrets.t.file"),
    ("secrets:\n  t:\n    environment: NOT_SET_ANYWHERE\nservices:\n  app:\n    image: /i.sqsh\n",
     "variable 'NOT_SET_ANYWHERE' (the source of secret 't') is not set", 3,
     "secrets.t.environment"),
    ("secrets:\n  t:\n    environment: $HF_TOKEN\nservices:\n  app:\n    image: /i.sqsh\n",
     "is not a valid environment variable name", 3, "secrets.t.environment"),
    ("secrets:\n  t:\n    file: ./token.txt\n    environment: HF_TOKEN\nservices:\n  app:\n"
     "    image: /i.sqsh\n", "needs exactly one of file: or environment:", 2, "secrets.t"),
    ("secrets:\n  t:\n    external: true\nservices:\n  app:\n    image: /i.sqsh\n",
     "external secrets", 3, "secrets.t.external"),
    ("secrets:\n  t:\n    content: hunter2\nservices:\n  app:\n    image: /i.sqsh\n",
     "inline 'content' is not supported", 3, "secrets.t.content"),
    ("secrets:\n  -bad:\n    file: ./token.txt\nservices:\n  app:\n    image: /i.sqsh\n",
     "secret name '-bad' is not valid", 2, "secrets.-bad"),
    ("secrets: [a]\nservices:\n  app:\n    image: /i.sqsh\n", "expected a mapping of secrets", 1,
     "secrets"),
    (with_secrets(SERVICE + "      - source: hf\n        target: ../escape\n"),
     "must be a file name", 11, "services.app.secrets[0].target"),
    (with_secrets(SERVICE + "      - source: hf\n        target: /etc/token\n"),
     "must be a file name", 11, "services.app.secrets[0].target"),
    (with_secrets(SERVICE + "      - hf\n      - source: api_token\n        target: hf\n"),
     "two secrets of this service have the target 'hf'", 11, "services.app.secrets[1]"),
    (with_secrets(SERVICE + "      - source: hf\n        mode: 0200\n"),
     "unreadable by its owner", 11, "services.app.secrets[0].mode"),
    (with_secrets(SERVICE + "      - source: hf\n        mode: 0999\n"),
     "is not octal permission bits", 11, "services.app.secrets[0].mode"),
    (with_secrets(SERVICE + "      - source: hf\n        uid: '1000'\n"),
     "'uid' is not supported", 11, "services.app.secrets[0].uid"),
    (with_secrets(SERVICE + "      - target: x\n"), "needs source", 10, "services.app.secrets[0]"),
    (with_secrets(SERVICE + "      - source: hf\n        label: x\n"), "unknown key 'label'", 11,
     "services.app.secrets[0].label"),
])
def test_secret_errors_are_located(secret_project, text, message, line, path):
    error = failure(secret_project, text)
    assert message in error.message
    assert (error.line, error.path) == (line, path)
    assert error.file == str(secret_project.root / "compose.yaml")


def test_unknown_secret_suggests_the_closest_name(secret_project):
    error = failure(secret_project, with_secrets(SERVICE + "      - api_tokn\n"))
    assert error.hint == "did you mean 'api_token'?"


def test_a_secret_value_in_an_environment_value_is_refused_without_showing_it(secret_project):
    body = "  app:\n    image: /i.sqsh\n    environment:\n      TOKEN: Bearer ${HF_TOKEN}\n"
    error = failure(secret_project, with_secrets(body))
    assert error.path == "services.app.environment.TOKEN" and error.line == 10
    assert "holds the value of secret 'hf'" in error.message
    assert ENV_VALUE not in error.format()


def test_passing_the_source_variable_through_is_refused(secret_project):
    body = "  app:\n    image: /i.sqsh\n    environment:\n      HF_TOKEN:\n"
    error = failure(secret_project, with_secrets(body))
    assert error.path == "services.app.environment.HF_TOKEN"
    assert "secret 'hf'" in error.message


def test_a_file_secret_value_in_an_exec_command_is_refused(secret_project):
    body = '  app:\n    image: /i.sqsh\n    command: ["run", "--token=${T}"]\n'
    error = failure(secret_project, with_secrets(body), env={"T": FILE_VALUE})
    assert error.path == "services.app.command[1]" and "secret 'api_token'" in error.message
    assert FILE_VALUE not in error.format()


def test_a_short_secret_counts_only_as_a_whole_value(secret_project):
    text = "secrets:\n  pin:\n    environment: PIN\nservices:\n  app:\n    image: /i.sqsh\n" \
           "    environment:\n      A: 'port 1234'\n      B: ${PIN}\n"
    error = failure(secret_project, text, env={"PIN": "1234"})
    assert error.path == "services.app.environment.B"


def test_an_error_that_quotes_a_secret_value_shows_the_secret_name_instead(secret_project):
    body = "  app:\n    image: /i.sqsh\n    depends_on: [%s]\n" % ENV_VALUE
    error = failure(secret_project, with_secrets(body))
    assert "<secret hf>" in error.message and ENV_VALUE not in error.format()


# --- the plan -------------------------------------------------------------------------------------

def test_the_plan_resolves_file_sources_and_carries_service_secrets(secret_project):
    plan = plan_of(secret_project)
    assert plan.secrets[0].reference == str(secret_project.root / "token.txt")
    assert plan.secrets[1].reference == "HF_TOKEN"
    assert [s.target for s in service(plan, "app").secrets] == ["api_token", "hf_token"]


# --- the script -----------------------------------------------------------------------------------

def runtime_plan_of(project, text=None):
    return hc.build_runtime_plan(plan_of(project, text))


def script_of(project, text=None):
    return hc.render_script(runtime_plan_of(project, text))


def index_of(runtime_plan, name):
    return [s.name for s in runtime_plan.plan.services].index(name)


def test_pyxis_service_mounts_its_copies_read_only_at_run_secrets(secret_project):
    runtime_plan = runtime_plan_of(secret_project)
    index = index_of(runtime_plan, "app")
    argv = hc.service_srun_argv(runtime_plan, index)
    mounts = [a for a in argv if a.startswith("--container-mounts=")][0]
    assert mounts.endswith(",${JOB_DIR}/secrets/app:/run/secrets:ro")
    env_names = [a for a in argv if a.startswith("--container-env=")][0]
    assert "HPC_COMPOSE_SECRETS_DIR" in env_names.split("=", 1)[1].split(",")
    assert ("HPC_COMPOSE_SECRETS_DIR", "/run/secrets") in hc.service_environment(runtime_plan,
                                                                                index)


def test_host_service_finds_its_copies_through_hpc_compose_secrets_dir(secret_project):
    runtime_plan = runtime_plan_of(secret_project)
    index = index_of(runtime_plan, "helper")
    assert ("HPC_COMPOSE_SECRETS_DIR", "${JOB_DIR}/secrets/helper") in \
        hc.service_environment(runtime_plan, index)
    assert not any("secrets" in a for a in hc.service_srun_argv(runtime_plan, index))


def test_a_service_without_secrets_gets_neither_mount_nor_variable(secret_project):
    text = COMPOSE + "  plain:\n    image: /images/app.sqsh\n"
    runtime_plan = runtime_plan_of(secret_project, text)
    index = index_of(runtime_plan, "plain")
    assert not any("secrets" in a for a in hc.service_srun_argv(runtime_plan, index))
    assert "HPC_COMPOSE_SECRETS_DIR" not in dict(hc.service_environment(runtime_plan, index))


def _function(script, name):
    start = script.index("\n%s() {" % name)
    return script[start:script.index("\n}\n", start)]


def test_the_script_checks_for_the_copies_and_teardown_removes_them(secret_project):
    script = script_of(secret_project)
    assert "for token in app helper; do" in script
    assert "plain sbatch does not" in script
    finish = _function(script, "finish")
    removal = finish.index('rm -rf -- "$JOB_DIR/secrets"')
    assert finish.index("wait \"${PID[i]}\"") < removal < finish.index("JOB_STATUS=$status")
    # The check runs after the traps, so a missing copy still ends in teardown and a final state.
    assert script.index("trap on_exit EXIT") < script.index("for token in app helper")


def test_a_job_without_secrets_has_no_secret_check_or_removal(secret_project):
    script = script_of(secret_project, "services:\n  app:\n    image: /i.sqsh\n")
    assert "/secrets" not in script and "rm -rf" not in script


def test_the_script_writes_owner_only_and_gives_services_the_submitters_umask(secret_project):
    script = script_of(secret_project)
    prelude = script[:script.index('mkdir -p "$LOG_DIR"')]
    assert "USER_UMASK=$(umask)\numask 077\n" in prelude
    assert 'chmod 0700 "$JOB_DIR"' in script
    assert _function(script, "run_service_0").split("\n")[2] == '    umask "$USER_UMASK"'


def test_share_with_group_opens_the_job_directory_and_logs_to_the_group(secret_project):
    script = script_of(secret_project, "x-slurm:\n  share_with_group: true\n" + COMPOSE)
    assert "umask 027\n" in script and 'chmod 0750 "$JOB_DIR"' in script
    assert "chmod 0700" not in script


def test_the_script_holds_no_secret_value_and_passes_bash_n_and_shellcheck(secret_project,
                                                                            tmp_path):
    script = script_of(secret_project)
    assert FILE_VALUE not in script and ENV_VALUE not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--format=gcc", str(path)], stdout=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stdout


# --- the copies and the tracked files ---------------------------------------------------------------

@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def test_copies_are_owner_only_with_exact_bytes_whatever_the_umask(secret_project, umask_000):
    plan = plan_of(secret_project)
    job_dir = secret_project.root / ".hpc-compose" / "42"
    root = hc._write_secret_copies(plan, str(job_dir), environ=ENV)
    assert (mode(job_dir), mode(root)) == (0o700, 0o700)
    assert mode(job_dir / "secrets" / "app") == 0o700
    assert (job_dir / "secrets" / "app" / "api_token").read_text() == FILE_VALUE + "\n"
    assert (job_dir / "secrets" / "app" / "hf_token").read_text() == ENV_VALUE
    assert mode(job_dir / "secrets" / "app" / "api_token") == 0o600
    assert mode(job_dir / "secrets" / "app" / "hf_token") == 0o400
    assert (job_dir / "secrets" / "helper" / "hf").read_text() == ENV_VALUE


def test_environment_secrets_are_read_from_dotenv_too(secret_project):
    secret_project.write(".env", "HF_TOKEN=%s\n" % ENV_VALUE)
    plan = plan_of(secret_project)
    hc._write_secret_copies(plan, str(secret_project.root / "job"),
                           environ={"HOME": "/home/tester"})
    assert (secret_project.root / "job" / "secrets" / "helper" / "hf").read_text() == ENV_VALUE


def test_a_secret_file_gone_since_loading_is_a_tool_error_naming_it(secret_project):
    plan = plan_of(secret_project)
    os.unlink(str(secret_project.root / "token.txt"))
    with pytest.raises(hc.ToolError) as info:
        hc._write_secret_copies(plan, str(secret_project.root / "job"), environ=ENV)
    assert "token.txt" in info.value.message and "api_token" in info.value.message


def test_records_and_their_folder_are_owner_only_whatever_the_umask(project, umask_000):
    record = {"job_id": "7", "services": []}
    hc._record_job(str(project.root), record)
    root = project.root / ".hpc-compose"
    assert mode(root / "jobs") == 0o700
    assert mode(root / "jobs" / "7.json") == 0o600 and mode(root / "latest.json") == 0o600
    assert mode(root / "jobs" / ".lock") == 0o600


SQUEUE_STANDIN = """#!/bin/sh
# STAND-IN for squeue (the unit tests do not submit jobs): prints no job, as for ended jobs.
exit 0
"""


def _job_with_copies(project, job_id, status):
    job_dir = project.root / ".hpc-compose" / job_id
    (job_dir / "secrets" / "app").mkdir(parents=True)
    (job_dir / "secrets" / "app" / "t").write_text("x")
    if status:
        (job_dir / "state.json").write_text(json.dumps({"job_id": job_id, "status": status,
                                                        "services": []}))
    return job_dir


def test_clean_removes_copies_of_ended_jobs_and_keeps_those_it_cannot_rule_out(project):
    ended = _job_with_copies(project, "1", "completed")
    crashed = _job_with_copies(project, "2", "running")     # teardown never ran
    removed = hc._remove_leftover_secrets(str(project.root), squeue_bin="/nonexistent/squeue")
    assert removed == ["1"]
    assert not (ended / "secrets").exists() and (crashed / "secrets").exists()
    standin = project.root / "squeue"
    standin.write_text(SQUEUE_STANDIN)
    standin.chmod(0o755)
    assert hc._remove_leftover_secrets(str(project.root), squeue_bin=str(standin)) == ["2"]
    assert not (crashed / "secrets").exists() and (crashed / "state.json").exists()


# --- the commands ----------------------------------------------------------------------------------

def run(cli, secret_project, *args):
    result = cli(list(args) + ["-f", str(secret_project.root / "compose.yaml")],
                 env={"HF_TOKEN": ENV_VALUE})
    assert FILE_VALUE not in result.out + result.err
    assert ENV_VALUE not in result.out + result.err
    return result


@pytest.mark.parametrize("args", [
    ["config"], ["config", "--format", "json"], ["inspect", "--verbose"],
    ["inspect", "--format", "json"], ["render"], ["render", "--format", "json"],
    ["validate"], ["preflight", "--verbose"]])
def test_no_command_output_holds_a_secret_value(cli, secret_project, args):
    result = run(cli, secret_project, *args)
    assert result.code in (0, 1) and "Traceback" not in result.err


def test_config_prints_secret_sources_as_references(cli, secret_project):
    data = json.loads(run(cli, secret_project, "config", "--format", "json").out)
    assert data["secrets"] == {"api_token": {"file": "./token.txt"},
                               "hf": {"environment": "HF_TOKEN"}}
    assert data["services"]["app"]["secrets"] == [
        {"source": "api_token", "target": "api_token"},
        {"source": "hf", "target": "hf_token", "mode": "0400"}]


def test_config_output_loads_back_into_the_same_spec(cli, secret_project):
    text = run(cli, secret_project, "config").out
    secret_project.write("compose.yaml", text)
    again = json.loads(run(cli, secret_project, "config", "--format", "json").out)
    secret_project.write("compose.yaml", COMPOSE)
    assert again == json.loads(run(cli, secret_project, "config", "--format", "json").out)


def test_config_no_interpolate_prints_variables_as_written_without_needing_them(cli, project):
    project.write("compose.yaml", "services:\n  app:\n    image: /i.sqsh\n    environment:\n"
                                  "      TOKEN: ${NOT_SET_ANYWHERE}\n")
    result = cli(["config", "--no-interpolate", "-f", str(project.root / "compose.yaml")])
    assert result.code == 0, result.err
    assert 'TOKEN: "${NOT_SET_ANYWHERE}"' in result.out


def test_inspect_shows_each_secret_by_name_and_target(cli, secret_project):
    out = run(cli, secret_project, "inspect", "--verbose").out
    assert "secrets: <secret api_token> -> /run/secrets/api_token (0600) from file " in out
    assert "<secret hf> -> /run/secrets/hf_token (0400) from variable HF_TOKEN" in out
    assert "<secret hf> -> $HPC_COMPOSE_SECRETS_DIR/hf (0600)" in out


def test_render_output_file_is_owner_only_whatever_the_umask(cli, secret_project, umask_000):
    target = secret_project.root / "out" / "job.sbatch"
    assert run(cli, secret_project, "render", "--output", str(target)).code == 0
    assert mode(target) == 0o600


def test_preflight_warns_about_group_or_world_readable_value_files_with_the_fix(cli,
                                                                              secret_project):
    secret_project.write(".env", "HF_TOKEN=%s\n" % ENV_VALUE)
    os.chmod(str(secret_project.root / ".env"), 0o644)
    os.chmod(str(secret_project.root / "token.txt"), 0o640)
    report = hc.run_preflight(runtime_plan_of(secret_project))
    findings = dict((f.check, f) for f in report.findings)
    dotenv = findings["permissions.dotenv"]
    assert dotenv.level == "warn" and "readable by group and others (mode 0644)" in dotenv.message
    assert dotenv.remediation == "chmod 600 %s" % (secret_project.root / ".env")
    token = findings["permissions.secret.api_token"]
    assert token.level == "warn" and "readable by the group (mode 0640)" in token.message


def test_preflight_accepts_owner_only_value_files(secret_project):
    report = hc.run_preflight(runtime_plan_of(secret_project))
    finding = [f for f in report.findings if f.check == "permissions.secret.api_token"][0]
    assert finding.level == "ok"


def test_stale_copies_under_a_reused_job_id_are_replaced(secret_project):
    plan = plan_of(secret_project)
    job_dir = secret_project.root / ".hpc-compose" / "5"
    stale = job_dir / "secrets" / "app" / "api_token"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    hc._write_secret_copies(plan, str(job_dir), environ=ENV)
    assert stale.read_text() == FILE_VALUE + "\n"


def test_a_short_secret_written_literally_elsewhere_is_not_a_leak(secret_project):
    text = "secrets:\n  pin:\n    environment: PIN\nservices:\n  app:\n    image: /i.sqsh\n" \
           "    environment:\n      A: '1234'\n"
    spec = load(secret_project, text, env={"PIN": "1234"})
    assert spec.services[0].environment == (("A", "1234"),)
