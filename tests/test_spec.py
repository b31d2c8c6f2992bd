"""The spec: load_spec's accepted shape, normalization, and every error path (message, line, key path)."""
import os

import pytest

ENV = {"HOME": "/home/tester", "USER": "tester", "TAG": "7"}


def load(hc, project, text, env=None, name="compose.yaml"):
    path = project.write(name, text)
    environ = dict(ENV, **(env or {}))
    return hc.load_spec(str(path), environ=environ)


def plan(hc, project, text, env=None):
    environ = dict(ENV, **(env or {}))
    return hc.build_plan(load(hc, project, text, env), environ=environ)


def failure(hc, project, text, env=None):
    """The SpecError that loading and planning ``text`` raises."""
    with pytest.raises(hc.SpecError) as info:
        plan(hc, project, text, env)
    return info.value


def service(spec, name="app"):
    return next(s for s in spec.services if s.name == name)


# --- the happy path -------------------------------------------------------------------------------

FULL = """\
name: demo
version: "3.9"
x-common: &common
  LOG_LEVEL: info
x-slurm:
  job_name: demo-job
  partition: gpu
  time: "00:30:00"
  nodes: 1
  cpus_per_task: 4
  mem: 8G
  cache_dir: /shared/$USER/cache
  setup:
    - module load cuda $CUDA_VERSION
  submit_args:
    - "--mail-user=$USER@example.com"
services:
  redis:
    image: redis:${TAG}
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
      <<: *common
      VERSION: 1.10
      DEBUG: true
      HOME_DIR: $HOME
    volumes:
      - ./src:/workspace
    working_dir: /workspace
    command: ["python", "-m", "main", "$$HOME"]
    x-slurm:
      cpus_per_task: 2
      failure_policy:
        mode: restart_on_failure
    x-enroot:
      prepare:
        commands:
          - pip install $PKG
        env:
          PIP_INDEX: ${INDEX:-https://pypi.org/simple}
"""


def test_full_spec_loads(hc, project):
    spec = load(hc, project, FULL)
    assert spec.name == "demo"
    assert spec.version == "3.9"
    assert spec.path == str(project.root / "compose.yaml")
    assert spec.project_dir == str(project.root)
    assert [s.name for s in spec.services] == ["redis", "app"]
    assert spec.warnings == ()


def test_top_level_slurm_strings_are_interpolated(hc, project):
    slurm = load(hc, project, FULL).slurm
    assert slurm.cache_dir == "/shared/tester/cache"
    assert slurm.submit_args == ("--mail-user=tester@example.com",)
    assert (slurm.job_name, slurm.partition, slurm.time, slurm.mem) == (
        "demo-job", "gpu", "00:30:00", "8G")
    assert (slurm.nodes, slurm.cpus_per_task) == (1, 4)


def test_setup_lines_are_not_interpolated(hc, project):
    assert load(hc, project, FULL).slurm.setup == ("module load cuda $CUDA_VERSION",)


def test_image_is_interpolated(hc, project):
    assert service(load(hc, project, FULL), "redis").image == "redis:7"


def test_environment_map_keeps_order_and_source_text(hc, project):
    app = service(load(hc, project, FULL))
    assert app.environment == (("LOG_LEVEL", "info"), ("VERSION", "1.10"), ("DEBUG", "true"),
                               ("HOME_DIR", "/home/tester"))


def test_list_command_items_are_interpolated(hc, project):
    assert service(load(hc, project, FULL)).command == ("python", "-m", "main", "$HOME")


def test_string_command_is_never_interpolated(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n"
                             "    command: echo $HOME ${NOPE} $$ done\n")
    assert service(spec).command == "echo $HOME ${NOPE} $$ done"


def test_string_entrypoint_is_never_interpolated(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    entrypoint: run $NOPE\n")
    assert service(spec).entrypoint == "run $NOPE"


def test_list_command_keeps_number_text(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    command: [sleep, 1.10, true]\n")
    assert service(spec).command == ("sleep", "1.10", "true")


def test_readiness_defaults_are_applied(hc, project):
    readiness = service(load(hc, project, FULL), "redis").readiness
    assert readiness == hc.ReadinessSpec("tcp", host="127.0.0.1", port=6379, timeout_seconds=60)


def test_depends_on_map_form(hc, project):
    assert service(load(hc, project, FULL)).depends_on == (("redis", "service_healthy"),)


def test_depends_on_list_form_means_service_started(hc, project):
    spec = load(hc, project, "services:\n  a:\n    image: x\n  b:\n    image: x\n"
                             "    depends_on: [a]\n")
    assert service(spec, "b").depends_on == (("a", "service_started"),)


def test_depends_on_map_without_condition_means_service_started(hc, project):
    spec = load(hc, project, "services:\n  a:\n    image: x\n  b:\n    image: x\n"
                             "    depends_on:\n      a: {}\n")
    assert service(spec, "b").depends_on == (("a", "service_started"),)


def test_failure_policy_restart_defaults(hc, project):
    policy = service(load(hc, project, FULL)).slurm.failure_policy
    assert policy == hc.FailurePolicy("restart_on_failure", 3, 5)


def test_failure_policy_defaults_to_fail_job(hc, project):
    assert service(load(hc, project, FULL), "redis").slurm.failure_policy == hc.FailurePolicy()


def test_prepare_commands_not_interpolated_env_values_are(hc, project):
    prepare = service(load(hc, project, FULL)).prepare
    assert prepare.commands == ("pip install $PKG",)
    assert prepare.env == (("PIP_INDEX", "https://pypi.org/simple"),)
    assert prepare.root is True


def test_volumes_and_working_dir_are_kept_raw_but_interpolated(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    command: [a]\n"
                             "    volumes: [\"$HOME/data:/data:ro\"]\n    working_dir: /w/$USER\n")
    assert service(spec).volumes == ("/home/tester/data:/data:ro",)
    assert service(spec).working_dir == "/w/tester"


def test_environment_list_form(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    environment:\n"
                             "      - A=1\n      - B=x=y\n      - C=\n      - D=$USER\n")
    assert service(spec).environment == (("A", "1"), ("B", "x=y"), ("C", ""), ("D", "tester"))


def test_environment_keys_are_not_interpolated(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    environment:\n"
                             "      - USER_HOME=$HOME\n")
    assert service(spec).environment == (("USER_HOME", "/home/tester"),)


def test_environment_empty_value_passes_variable_through(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    environment:\n      USER:\n")
    assert service(spec).environment == (("USER", "tester"),)


def test_dotenv_fills_missing_variables(hc, project):
    project.write(".env", "PORT=8080\nUSER=from-dotenv\n")
    spec = load(hc, project, "services:\n  app:\n    image: x\n    environment:\n"
                             "      P: $PORT\n      U: $USER\n")
    assert service(spec).environment == (("P", "8080"), ("U", "tester"))


def test_image_unset_variable_expands_to_empty(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: ${REGISTRY}redis:7\n")
    assert service(spec).image == "redis:7"


def test_healthcheck_cmd_nc_becomes_tcp(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"CMD\", \"nc\", \"-z\", \"127.0.0.1\", \"6379\"]\n"
                             "      timeout: 30s\n")
    assert service(spec).readiness == hc.ReadinessSpec("tcp", host="127.0.0.1", port=6379,
                                                       timeout_seconds=30)


def test_healthcheck_cmd_shell_nc_becomes_tcp(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"CMD-SHELL\", \"nc -z -w 2 db 5432\"]\n")
    assert service(spec).readiness == hc.ReadinessSpec("tcp", host="db", port=5432,
                                                       timeout_seconds=60)


def test_healthcheck_nc_with_combined_flags(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"CMD-SHELL\", \"nc -zv 127.0.0.1 6379\"]\n")
    assert service(spec).readiness.port == 6379


def test_values_reached_through_aliases_keep_source_text(hc, project):
    spec = load(hc, project, "x-env: &env\n  VERSION: 1.10\n  FLAG: true\nx-svc: &svc\n"
                             "  image: x\n  command: [sleep, 1.50]\nservices:\n  app:\n"
                             "    <<: *svc\n    environment: *env\n")
    assert service(spec).environment == (("VERSION", "1.10"), ("FLAG", "true"))
    assert service(spec).command == ("sleep", "1.50")


def test_healthcheck_curl_becomes_http(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"CMD-SHELL\", \"curl -fsS http://127.0.0.1:8000/health"
                             " || exit 1\"]\n      timeout: 1m30s\n")
    assert service(spec).readiness == hc.ReadinessSpec(
        "http", url="http://127.0.0.1:8000/health", status_code=200, timeout_seconds=90)


def test_healthcheck_wget_spider_becomes_http(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"CMD\", \"wget\", \"--spider\", \"-q\","
                             " \"https://localhost/ready\"]\n")
    assert service(spec).readiness.url == "https://localhost/ready"


def test_healthcheck_string_test_is_shell_form(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: curl -f http://127.0.0.1:80/\n      timeout: 10\n")
    assert service(spec).readiness.timeout_seconds == 10


def test_healthcheck_disable_means_no_readiness(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      disable: true\n")
    assert service(spec).readiness is None


def test_healthcheck_none_test_means_no_readiness(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    healthcheck:\n"
                             "      test: [\"NONE\"]\n")
    assert service(spec).readiness is None


def test_readiness_types(hc, project):
    spec = load(hc, project, """\
services:
  a:
    image: x
    readiness: {type: sleep, seconds: 5}
  b:
    image: x
    readiness: {type: log, pattern: "Server started $", timeout_seconds: 20}
  c:
    image: x
    readiness: {type: http, url: "http://127.0.0.1:8080/health"}
""")
    assert service(spec, "a").readiness == hc.ReadinessSpec("sleep", seconds=5)
    assert service(spec, "b").readiness == hc.ReadinessSpec("log", pattern="Server started $",
                                                            timeout_seconds=20)
    assert service(spec, "c").readiness == hc.ReadinessSpec(
        "http", url="http://127.0.0.1:8080/health", status_code=200, timeout_seconds=60)


def test_metrics_block_defaults(hc, project):
    spec = load(hc, project, "x-slurm:\n  metrics: {}\nservices:\n  app:\n    image: x\n")
    assert spec.slurm.metrics == hc.MetricsSpec(True, 5, ("gpu", "slurm"))


def test_metrics_omitted_is_none(hc, project):
    assert load(hc, project, "services:\n  app:\n    image: x\n").slurm.metrics is None


def test_metrics_explicit_values(hc, project):
    spec = load(hc, project, "x-slurm:\n  metrics:\n    enabled: false\n    interval_seconds: 2\n"
                             "    collectors: [slurm]\nservices:\n  app:\n    image: x\n")
    assert spec.slurm.metrics == hc.MetricsSpec(False, 2, ("slurm",))


def test_artifacts_bundles_and_job_id_kept(hc, project):
    spec = load(hc, project, """\
x-slurm:
  artifacts:
    collect: on_failure
    export_dir: ./results/${SLURM_JOB_ID}/$USER
    paths:
      - /hpc-compose/job/metrics/**
    bundles:
      checkpoints:
        paths:
          - /hpc-compose/job//checkpoints/*.pt
services:
  app:
    image: x
""")
    assert spec.slurm.artifacts == hc.ArtifactsSpec(
        "./results/${SLURM_JOB_ID}/tester", "on_failure", ("/hpc-compose/job/metrics/**",),
        (("checkpoints", ("/hpc-compose/job/checkpoints/*.pt",)),))


def test_resume_path_is_interpolated_and_normalized(hc, project):
    spec = load(hc, project, "x-slurm:\n  resume:\n    path: /shared/$USER/runs//x/\n"
                             "services:\n  app:\n    image: x\n")
    assert spec.slurm.resume == hc.ResumeSpec("/shared/tester/runs/x")


def test_integer_from_interpolated_string(hc, project):
    spec = load(hc, project, "x-slurm:\n  nodes: ${NODES:-2}\nservices:\n  app:\n    image: x\n")
    assert spec.slurm.nodes == 2


def test_time_written_as_number_keeps_text(hc, project):
    spec = load(hc, project, "x-slurm:\n  time: 30\nservices:\n  app:\n    image: x\n")
    assert spec.slurm.time == "30"


def test_runtime_defaults_to_pyxis(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n")
    assert spec.slurm.runtime == "pyxis"
    assert service(spec).runtime == "pyxis"
    assert service(spec).slurm.runtime is None


def test_host_runtime_top_level_with_per_service_override(hc, project):
    spec = load(hc, project, """\
x-slurm:
  runtime: host
services:
  tool:
    command: hostname
    working_dir: ./work
  app:
    image: redis:7
    x-slurm:
      runtime: pyxis
""")
    assert service(spec, "tool").runtime == "host"
    assert service(spec, "tool").image is None
    assert service(spec, "app").runtime == "pyxis"
    assert service(spec, "app").slurm.runtime == "pyxis"


def test_host_runtime_image_is_ignored_with_a_warning(hc, project):
    spec = load(hc, project, "x-slurm:\n  runtime: host\nservices:\n  app:\n    image: redis:7\n"
                             "    command: [true]\n")
    assert len(spec.warnings) == 1
    assert "not used" in spec.warnings[0] and "services.app.image" in spec.warnings[0]


def test_extension_keys_are_accepted_and_ignored(hc, project):
    spec = load(hc, project, "x-anchors: &a\n  image: x\nservices:\n  app:\n    <<: *a\n"
                             "    x-notes: hello\n")
    assert service(spec).image == "x"
    assert spec.warnings == ()


@pytest.mark.parametrize("key,expected", [("x-slrum", "x-slurm"), ("x-slurms", "x-slurm"),
                                          ("x-enrot", "x-enroot")])
def test_misspelt_service_extension_key_warns(hc, project, key, expected):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    %s: {}\n" % key)
    assert len(spec.warnings) == 1
    assert "did you mean '%s'" % expected in spec.warnings[0]
    assert ":4:" in spec.warnings[0]


def test_misspelt_top_level_extension_key_warns(hc, project):
    spec = load(hc, project, "x-slurn:\n  time: 1\nservices:\n  app:\n    image: x\n")
    assert "did you mean 'x-slurm'" in spec.warnings[0]


def test_top_level_x_enroot_warns_it_belongs_under_a_service(hc, project):
    spec = load(hc, project, "x-enroot:\n  prepare: {}\nservices:\n  app:\n    image: x\n")
    assert "belongs under a service" in spec.warnings[0]


def test_gpus_next_to_gres_warns_that_it_is_ignored(hc, project):
    spec = load(hc, project, "x-slurm:\n  gres: gpu:2\n  gpus: 2\nservices:\n  app:\n"
                             "    image: x\n    x-slurm:\n      gres: gpu:1\n      gpus: 1\n")
    assert len(spec.warnings) == 2
    assert "x-slurm.gpus" in spec.warnings[0] and ":3:" in spec.warnings[0]
    assert "services.app.x-slurm.gpus" in spec.warnings[1]
    assert all("ignored because gres is set" in w for w in spec.warnings)


def test_service_line_is_recorded(hc, project):
    spec = load(hc, project, "services:\n  a:\n    image: x\n  b:\n    image: x\n")
    assert [s.line for s in spec.services] == [2, 4]


# --- errors: the file itself ---------------------------------------------------------------------

def test_empty_file_is_an_error(hc, project):
    error = failure(hc, project, "")
    assert "empty" in error.message
    assert error.exit_code == 2


def test_comment_only_file_is_empty(hc, project):
    assert "empty" in failure(hc, project, "# nothing here\n").message


def test_binary_file_is_an_error(hc, project):
    path = project.root / "compose.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
    with pytest.raises(hc.YamlError) as info:   # the YAML reader decodes and locates the NUL
        hc.load_spec(str(path), environ=ENV)
    assert "binary" in info.value.message
    assert (info.value.line, info.value.column) == (1, 7)


def test_non_utf8_file_is_an_error_with_line(hc, project):
    path = project.root / "compose.yaml"
    path.write_bytes(b"services:\n  app:\n    image: caf\xe9\n")
    with pytest.raises(hc.YamlError) as info:
        hc.load_spec(str(path), environ=ENV)
    assert "UTF-8" in info.value.message
    assert info.value.line == 3


def test_directory_is_an_error(hc, project):
    with pytest.raises(hc.SpecError) as info:
        hc.load_spec(str(project.root), environ=ENV)
    assert "directory" in info.value.message


def test_missing_file_is_an_error(hc, project):
    with pytest.raises(hc.SpecError) as info:
        hc.load_spec(str(project.root / "nope.yaml"), environ=ENV)
    assert "does not exist" in info.value.message


def test_malformed_yaml_is_a_yaml_error_with_line(hc, project):
    path = project.write("compose.yaml", "services:\n  app:\n    image: [unclosed\n")
    with pytest.raises(hc.YamlError) as info:
        hc.load_spec(str(path), environ=ENV)
    assert info.value.line is not None
    assert info.value.exit_code == 2


def test_unreadable_dotenv_is_an_error(hc, project):
    os.symlink(".env", str(project.root / ".env"))
    error = failure(hc, project, "services:\n  app:\n    image: x\n")
    assert "cannot read .env" in error.message
    assert error.file == str(project.root / ".env")


def test_malformed_dotenv_names_its_line(hc, project):
    project.write(".env", "A=1\nnot a pair\n")
    error = failure(hc, project, "services:\n  app:\n    image: x\n")
    assert error.file == str(project.root / ".env")
    assert error.line == 2


# --- errors: table of spec mistakes (text, message fragment, line, key path) ---------------------

CASES = [
    # top level
    ("- a\n- b\n", "must be a mapping with a services: key", 1, None),
    ("name: x\n", "has no services", 1, None),
    ("services: {}\n", "at least one service", 1, "services"),
    ("services:\n  - app\n", "expected a mapping of services", 1, "services"),
    ("service:\n  app:\n    image: x\n", "unknown key 'service' in the top level", 1, "service"),
    ("volumes:\n  data: {}\nservices:\n  app:\n    image: x\n",
     "top-level 'volumes' (named volumes) is not supported", 1, "volumes"),
    ("services:\n  app:\n    image: x\nnetworks:\n  n: {}\n",
     "top-level 'networks' is not supported", 4, "networks"),
    ("secrets:\n  s: {}\nservices:\n  app:\n    image: x\n",
     "secret 's' needs exactly one of file: or environment:", 2, "secrets.s"),
    ("configs: {}\nservices:\n  app:\n    image: x\n", "top-level 'configs' is not supported", 1,
     "configs"),
    ("name: $NOPE\nservices:\n  app:\n    image: x\n", "variable 'NOPE' is not set", 1, "name"),
    # service names and shapes
    ("services:\n  bad name:\n    image: x\n", "service name 'bad name' is not valid", 2,
     "services.bad name"),
    ("services:\n  -app:\n    image: x\n", "service name '-app' is not valid", 2,
     "services.-app"),
    ("services:\n  app:\n", "service 'app' is empty", 2, "services.app"),
    ("services:\n  app: redis\n", "expected a mapping (the service definition)", 2,
     "services.app"),
    ("services:\n  app:\n    image: x\n    imgae: y\n", "unknown key 'imgae' in service 'app'", 4,
     "services.app.imgae"),
    ("services:\n  app:\n    image: x\n    build: .\n", "'build' is not supported", 4,
     "services.app.build"),
    ("services:\n  app:\n    image: x\n    ports: [\"80:80\"]\n", "'ports' is not supported", 4,
     "services.app.ports"),
    ("services:\n  app:\n    image: x\n    networks: [n]\n", "'networks' is not supported", 4,
     "services.app.networks"),
    ("services:\n  app:\n    image: x\n    network_mode: host\n",
     "'network_mode' is not supported", 4, "services.app.network_mode"),
    ("services:\n  app:\n    image: x\n    restart: always\n",
     "the Compose 'restart' key is not supported", 4, "services.app.restart"),
    ("services:\n  app:\n    image: x\n    deploy: {}\n", "'deploy' is not supported", 4,
     "services.app.deploy"),
    ("services:\n  app:\n    image: x\n    env_file: missing.env\n", "does not exist", 4,
     "services.app.env_file"),
    # image
    ("services:\n  app:\n    command: [a]\n", "service 'app' needs an image", 2, "services.app"),
    ("services:\n  app:\n    image: http://example.com/x\n", "image scheme 'http' is not "
     "supported", 3, "services.app.image"),
    ("services:\n  app:\n    image: ./app\n", "build contexts are not supported", 3,
     "services.app.image"),
    ("services:\n  app:\n    image: ${NOPE}\n", "image is empty", 3, "services.app.image"),
    ("services:\n  app:\n    image: [redis]\n", "expected a string, got a list", 3,
     "services.app.image"),
    ("services:\n  app:\n    image: \"redis 7\"\n", "contains whitespace", 3,
     "services.app.image"),
    ("services:\n  app:\n    image: docker://\n", "names no image", 3, "services.app.image"),
    # command / entrypoint
    ("services:\n  app:\n    image: x\n    command: []\n", "must not be an empty list", 4,
     "services.app.command"),
    ("services:\n  app:\n    image: x\n    command: {a: b}\n", "expected a string, got a mapping",
     4, "services.app.command"),
    ("services:\n  app:\n    image: x\n    command: \"\"\n", "must not be empty", 4,
     "services.app.command"),
    ("services:\n  app:\n    image: x\n    command: [a]\n    entrypoint: run\n",
     "command and entrypoint must use the same form", 5, "services.app.entrypoint"),
    ("services:\n  app:\n    image: x\n    command: [echo, $NOPE]\n", "variable 'NOPE'", 4,
     "services.app.command[1]"),
    # environment
    ("services:\n  app:\n    image: x\n    environment:\n      - JUSTKEY\n",
     "environment list items must be KEY=VALUE", 5, "services.app.environment[0]"),
    ("services:\n  app:\n    image: x\n    environment:\n      - 1A=x\n",
     "'1A' is not a valid environment variable name", 5, "services.app.environment[0]"),
    ("services:\n  app:\n    image: x\n    environment:\n      - A=1\n      - A=2\n",
     "environment variable 'A' is set twice", 6, "services.app.environment[1]"),
    ("services:\n  app:\n    image: x\n    environment:\n      BAD NAME: x\n",
     "'BAD NAME' is not a valid environment variable name", 5,
     "services.app.environment.BAD NAME"),
    ("services:\n  app:\n    image: x\n    environment:\n      .hidden: x\n",
     "'.hidden' is not a valid environment variable name", 5,
     "services.app.environment..hidden"),
    ("services:\n  app:\n    image: x\n    environment:\n      A: $MISSING\n",
     "variable 'MISSING' is not set", 5, "services.app.environment.A"),
    ("services:\n  app:\n    image: x\n    environment:\n      A: [1]\n",
     "expected a string, got a list", 5, "services.app.environment.A"),
    ("services:\n  app:\n    image: x\n    environment:\n      NOT_IN_ENV:\n",
     "variable 'NOT_IN_ENV' is not set", 5, "services.app.environment.NOT_IN_ENV"),
    ("services:\n  app:\n    image: x\n    environment: A=1\n", "expected a list", 4,
     "services.app.environment"),
    # volumes
    ("services:\n  app:\n    image: x\n    volumes: ./a:/a\n", "expected a list", 4,
     "services.app.volumes"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - /data\n",
     "needs the form host_path:container_path", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - data:/data\n",
     "named volumes are not supported", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - ./a,b:/data\n",
     "contains ','", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - ./a:/hpc-compose/job\n",
     "reserved for the per-job directory", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - ./a:/hpc-compose/job/sub\n",
     "reserved for the per-job directory", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - ./a:data\n",
     "the container path must be absolute", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: volume\n        source: db\n"
     "        target: /a\n", "type: volume (a named volume) is not supported", 5,
     "services.app.volumes[0].type"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: tmpfs\n        target: /a\n",
     "type: tmpfs is not supported", 5, "services.app.volumes[0].type"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - {type: npipe, source: a, target: /a}\n",
     "volume type 'npipe' is not supported", 5, "services.app.volumes[0].type"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - {source: ., target: /a}\n",
     "a long-syntax volume needs type: bind", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: bind\n        target: /a\n",
     "a type: bind volume needs source", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: bind\n        source: data\n"
     "        target: /a\n", "named volumes are not supported", 5, "services.app.volumes[0]"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: bind\n        source: .\n"
     "        target: /a\n        consistency: cached\n", "unknown key 'consistency'", 8,
     "services.app.volumes[0].consistency"),
    ("services:\n  app:\n    image: x\n    volumes:\n      - type: bind\n        source: .\n"
     "        target: /a\n        bind:\n          create_host_path: false\n",
     "create_host_path: false is not supported", 9,
     "services.app.volumes[0].bind.create_host_path"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [a]\n"
     "        mounts:\n          - {type: volume, source: v, target: /v}\n",
     "type: volume (a named volume) is not supported", 8,
     "services.app.x-enroot.prepare.mounts[0].type"),
    ("x-slurm:\n  resume:\n    path: /shared/r\nservices:\n  app:\n    image: x\n    volumes:\n"
     "      - ./a:/hpc-compose/resume\n", "reserved for x-slurm.resume.path", 8,
     "services.app.volumes[0]"),
    # working_dir
    ("services:\n  app:\n    image: x\n    working_dir: /w\n",
     "working_dir needs an explicit command or entrypoint", 4, "services.app.working_dir"),
    ("services:\n  app:\n    image: x\n    command: [a]\n    working_dir: w\n",
     "must be an absolute container path", 5, "services.app.working_dir"),
    # depends_on
    ("services:\n  app:\n    image: x\n    depends_on: [redis]\n  rediss:\n    image: x\n",
     "depends on unknown service 'redis'", 4, "services.app.depends_on.redis"),
    ("services:\n  app:\n    image: x\n    depends_on: [app]\n", "depends on itself", 4,
     "services.app.depends_on.app"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on:\n      a:\n"
     "        condition: service_healthy\n", "needs service 'a' to define readiness", 7,
     "services.b.depends_on.a"),
    ("services:\n  a:\n    image: x\n    x-slurm:\n      failure_policy:\n        mode: ignore\n"
     "  b:\n    image: x\n    depends_on: [a]\n", "its failure_policy mode is ignore", 9,
     "services.b.depends_on.a"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on:\n      a:\n"
     "        condition: service_ready\n", "'service_ready' is not one of", 8,
     "services.b.depends_on.a.condition"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on:\n      a:\n"
     "        condition: service_completed\n", "'service_completed' is not one of", 8,
     "services.b.depends_on.a.condition"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on: [a, a]\n",
     "'a' is listed twice", 6, "services.b.depends_on[1]"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on:\n      a:\n"
     "        required: true\n", "unknown key 'required' in a depends_on entry", 8,
     "services.b.depends_on.a.required"),
    ("services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n"
     "    depends_on: [a]\n", "dependency cycle: a -> b -> a", 2, "services.a.depends_on"),
    ("services:\n  a:\n    image: x\n  b:\n    image: x\n    depends_on: [c]\n  c:\n    image: x\n"
     "    depends_on: [d]\n  d:\n    image: x\n    depends_on: [b]\n",
     "dependency cycle: b -> c -> d -> b", 4, "services.b.depends_on"),
    # readiness
    ("services:\n  app:\n    image: x\n    readiness:\n      port: 80\n",
     "readiness needs a type", 4, "services.app.readiness"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: ping\n",
     "'ping' is not one of sleep, tcp, log, http", 5, "services.app.readiness.type"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: tcp\n",
     "readiness type tcp needs port", 4, "services.app.readiness"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: tcp\n      port: 70000\n",
     "port 70000 is out of range", 6, "services.app.readiness.port"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: sleep\n      seconds: 1\n"
     "      port: 80\n", "unknown key 'port' in readiness of type sleep", 7,
     "services.app.readiness.port"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: sleep\n",
     "readiness type sleep needs seconds", 4, "services.app.readiness"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: log\n",
     "readiness type log needs pattern", 4, "services.app.readiness"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: http\n      url: localhost:80\n",
     "must be an http:// or https:// URL", 6, "services.app.readiness.url"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: http\n",
     "readiness type http needs url", 4, "services.app.readiness"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: http\n      url: http://h/\n"
     "      status_code: 999\n", "status_code 999 is not an HTTP status", 7,
     "services.app.readiness.status_code"),
    ("services:\n  app:\n    image: x\n    readiness:\n      type: tcp\n      port: 80\n"
     "      timeout_seconds: soon\n", "must be an integer, got the string 'soon'", 7,
     "services.app.readiness.timeout_seconds"),
    ("services:\n  app:\n    image: x\n    readiness: tcp\n", "expected a mapping", 4,
     "services.app.readiness"),
    # healthcheck
    ("services:\n  app:\n    image: x\n    readiness:\n      type: sleep\n      seconds: 1\n"
     "    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n",
     "healthcheck and readiness are mutually exclusive", 7, "services.app.healthcheck"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n"
     "      interval: 5s\n", "healthcheck.interval is not supported in v1", 6,
     "services.app.healthcheck.interval"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n"
     "      retries: 5\n", "healthcheck.retries is not supported in v1", 6,
     "services.app.healthcheck.retries"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n"
     "      start_period: 5s\n", "healthcheck.start_period is not supported in v1", 6,
     "services.app.healthcheck.start_period"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      timeout: 5s\n",
     "healthcheck needs test", 4, "services.app.healthcheck"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, redis-cli, ping]\n",
     "healthcheck probe 'redis-cli ping' is not supported", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, wget, http://h/]\n",
     "is not supported", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h]\n",
     "needs exactly HOST PORT", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, curl, -f]\n",
     "has no http:// or https:// URL", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [RUN, x]\n",
     "must start with CMD or CMD-SHELL", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: \"curl http://h/ | grep ok\"\n",
     "is not a recognized probe", 5, "services.app.healthcheck.test"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n"
     "      timeout: 1.5s\n", "not a duration in whole seconds", 6,
     "services.app.healthcheck.timeout"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      disable: yes\n",
     "must be true or false", 5, "services.app.healthcheck.disable"),
    ("services:\n  app:\n    image: x\n    healthcheck:\n      test: [CMD, nc, -z, h, '1']\n"
     "      tiemout: 5s\n", "unknown key 'tiemout' in healthcheck", 6,
     "services.app.healthcheck.tiemout"),
    # top-level x-slurm
    ("x-slurm:\n  partiton: gpu\nservices:\n  app:\n    image: x\n",
     "unknown key 'partiton' in x-slurm", 2, "x-slurm.partiton"),
    ("x-slurm:\n  nodes: \"two\"\nservices:\n  app:\n    image: x\n",
     "must be an integer, got the string 'two'", 2, "x-slurm.nodes"),
    ("x-slurm:\n  nodes: 0\nservices:\n  app:\n    image: x\n", "must be at least 1, got 0", 2,
     "x-slurm.nodes"),
    ("x-slurm:\n  nodes: 1.5\nservices:\n  app:\n    image: x\n",
     "must be an integer, got a number (1.5)", 2, "x-slurm.nodes"),
    ("x-slurm:\n  ntasks: true\nservices:\n  app:\n    image: x\n",
     "must be an integer, got a boolean (true)", 2, "x-slurm.ntasks"),
    ("x-slurm:\n  cpus_per_task: [4]\nservices:\n  app:\n    image: x\n",
     "must be an integer, got a list", 2, "x-slurm.cpus_per_task"),
    ("x-slurm:\n  partition: [a]\nservices:\n  app:\n    image: x\n",
     "expected a string, got a list", 2, "x-slurm.partition"),
    ("x-slurm: 5\nservices:\n  app:\n    image: x\n", "expected a mapping", 1, "x-slurm"),
    ("x-slurm:\n  runtime: docker\nservices:\n  app:\n    image: x\n",
     "'docker' is not one of pyxis, apptainer, singularity, host", 2, "x-slurm.runtime"),
    ("x-slurm:\n  setup: module load x\nservices:\n  app:\n    image: x\n", "expected a list", 2,
     "x-slurm.setup"),
    ("x-slurm:\n  submit_args: [--mail-user=$NOPE]\nservices:\n  app:\n    image: x\n",
     "variable 'NOPE'", 2, "x-slurm.submit_args[0]"),
    ("x-slurm:\n  cache_dir: /tmp/cache\nservices:\n  app:\n    image: x\n",
     "is under /tmp", 2, "x-slurm.cache_dir"),
    ("x-slurm:\n  cache_dir: /dev/shm\nservices:\n  app:\n    image: x\n",
     "is under /dev/shm", 2, "x-slurm.cache_dir"),
    ("x-slurm:\n  cache_dir: /var/tmp/x\nservices:\n  app:\n    image: x\n",
     "is under /var/tmp", 2, "x-slurm.cache_dir"),
    # metrics
    ("x-slurm:\n  metrics:\n    interval_seconds: 0\nservices:\n  app:\n    image: x\n",
     "must be at least 1", 3, "x-slurm.metrics.interval_seconds"),
    ("x-slurm:\n  metrics:\n    collectors: [gpu, disk]\nservices:\n  app:\n    image: x\n",
     "'disk' is not one of gpu, slurm", 3, "x-slurm.metrics.collectors[1]"),
    ("x-slurm:\n  metrics:\n    collectors: [gpu, gpu]\nservices:\n  app:\n    image: x\n",
     "collector 'gpu' is listed twice", 3, "x-slurm.metrics.collectors[1]"),
    ("x-slurm:\n  metrics:\n    collectors: []\nservices:\n  app:\n    image: x\n",
     "collectors must not be empty", 3, "x-slurm.metrics.collectors"),
    ("x-slurm:\n  metrics:\n    enabled: on\nservices:\n  app:\n    image: x\n",
     "must be true or false", 3, "x-slurm.metrics.enabled"),
    ("x-slurm:\n  metrics:\n    interval: 5\nservices:\n  app:\n    image: x\n",
     "unknown key 'interval' in x-slurm.metrics", 3, "x-slurm.metrics.interval"),
    # artifacts
    ("x-slurm:\n  artifacts:\n    paths: [/hpc-compose/job/x]\nservices:\n  app:\n    image: x\n",
     "needs export_dir", 2, "x-slurm.artifacts"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\nservices:\n  app:\n    image: x\n",
     "needs at least one source path", 2, "x-slurm.artifacts"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    paths: [metrics/x]\nservices:\n  app:\n"
     "    image: x\n", "must be an absolute container path", 4, "x-slurm.artifacts.paths[0]"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    paths: [/data/x]\nservices:\n  app:\n"
     "    image: x\n", "is not under /hpc-compose/job", 4, "x-slurm.artifacts.paths[0]"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    paths: [/hpc-compose/job/../etc]\n"
     "services:\n  app:\n    image: x\n", "has a component '..', which is or may match", 4,
     "x-slurm.artifacts.paths[0]"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    paths: [/hpc-compose/job/artifacts/x]\n"
     "services:\n  app:\n    image: x\n", "is inside /hpc-compose/job/artifacts", 4,
     "x-slurm.artifacts.paths[0]"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    collect: sometimes\n    paths: "
     "[/hpc-compose/job/x]\nservices:\n  app:\n    image: x\n", "'sometimes' is not one of", 4,
     "x-slurm.artifacts.collect"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    bundles:\n      default:\n"
     "        paths: [/hpc-compose/job/x]\nservices:\n  app:\n    image: x\n",
     "bundle name 'default' is reserved", 5, "x-slurm.artifacts.bundles.default"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    bundles:\n      bad.name:\n"
     "        paths: [/hpc-compose/job/x]\nservices:\n  app:\n    image: x\n",
     "must match [A-Za-z0-9_-]+", 5, "x-slurm.artifacts.bundles.bad.name"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    bundles:\n      ckpt:\n        paths: []\n"
     "services:\n  app:\n    image: x\n", "bundle 'ckpt' needs at least one path", 5,
     "x-slurm.artifacts.bundles.ckpt"),
    ("x-slurm:\n  artifacts:\n    export_dir: ./out\n    bundles:\n      ckpt:\n        path: [x]\n"
     "services:\n  app:\n    image: x\n", "unknown key 'path' in an artifact bundle", 6,
     "x-slurm.artifacts.bundles.ckpt.path"),
    # resume
    ("x-slurm:\n  resume: {}\nservices:\n  app:\n    image: x\n", "needs path", 2,
     "x-slurm.resume"),
    ("x-slurm:\n  resume:\n    path: runs/x\nservices:\n  app:\n    image: x\n",
     "must be an absolute host path", 3, "x-slurm.resume.path"),
    ("x-slurm:\n  resume:\n    path: /hpc-compose/resume\nservices:\n  app:\n    image: x\n",
     "is a container path", 3, "x-slurm.resume.path"),
    ("x-slurm:\n  resume:\n    path: /shared/a,b\nservices:\n  app:\n    image: x\n",
     "contains ','", 3, "x-slurm.resume.path"),
    # service x-slurm and failure_policy
    ("services:\n  app:\n    image: x\n    x-slurm:\n      cpus: 2\n",
     "unknown key 'cpus' in services.<name>.x-slurm", 5, "services.app.x-slurm.cpus"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      extra_srun_args: --exclusive\n",
     "expected a list", 5, "services.app.x-slurm.extra_srun_args"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n        mode: retry\n",
     "'retry' is not one of fail_job, ignore, restart_on_failure", 6,
     "services.app.x-slurm.failure_policy.mode"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n        max_restarts: 2\n",
     "max_restarts is valid only with mode: restart_on_failure", 6,
     "services.app.x-slurm.failure_policy.max_restarts"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n        mode: ignore\n"
     "        backoff_seconds: 2\n", "backoff_seconds is valid only with mode: restart_on_failure",
     7, "services.app.x-slurm.failure_policy.backoff_seconds"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n"
     "        mode: restart_on_failure\n        max_restarts: 0\n", "must be at least 1, got 0", 7,
     "services.app.x-slurm.failure_policy.max_restarts"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n"
     "        mode: restart_on_failure\n        backoff_seconds: 0\n", "must be at least 1, got 0",
     7, "services.app.x-slurm.failure_policy.backoff_seconds"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      failure_policy:\n"
     "        mode: restart_on_failure\n        window_seconds: 60\n",
     "unknown key 'window_seconds' in failure_policy", 7,
     "services.app.x-slurm.failure_policy.window_seconds"),
    ("services:\n  app:\n    image: x\n    x-slurm:\n      runtime: docker\n",
     "'docker' is not one of pyxis, apptainer, singularity, host", 5, "services.app.x-slurm.runtime"),
    # apptainer runtime: its image forms
    ("services:\n  app:\n    image: ./app.sif\n", "is an Apptainer .sif file, which Pyxis cannot run",
     3, "services.app.image"),
    ("services:\n  app:\n    image: podman://app\n    x-slurm:\n      runtime: apptainer\n",
     "image scheme 'podman' is not supported with the apptainer runtime", 3, "services.app.image"),
    ("services:\n  app:\n    image: x\n    environment:\n      a.b: x\n    x-slurm:\n"
     "      runtime: apptainer\n", "environment name a.b is not a shell variable name", 4,
     "services.app.environment"),
    # x-enroot.prepare.stages
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [a]\n"
     "        stages:\n          build:\n            commands: [b]\n",
     "stage 'build' needs an image", 8, "services.app.x-enroot.prepare.stages.build"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [a]\n"
     "        stages:\n          build:\n            image: y\n            target: z\n",
     "unknown key 'target'", 10, "services.app.x-enroot.prepare.stages.build.target"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [a]\n"
     "        stages:\n          build:\n            image: y\n    x-slurm:\n"
     "      runtime: apptainer\n",
     "prepare stages are not available with the apptainer runtime", 7,
     "services.app.x-enroot.prepare.stages"),
    # host runtime
    ("x-slurm:\n  runtime: host\nservices:\n  app:\n    environment: {A: b}\n",
     "uses the host runtime but has no command or entrypoint", 4, "services.app"),
    ("x-slurm:\n  runtime: host\nservices:\n  app:\n    command: [a]\n    volumes: [./a:/a]\n",
     "volumes are not available with the host runtime", 6, "services.app.volumes"),
    ("services:\n  app:\n    command: [a]\n    x-slurm:\n      runtime: host\n    x-enroot:\n"
     "      prepare:\n        commands: [x]\n", "x-enroot is not available with the host runtime",
     6, "services.app.x-enroot"),
    # x-enroot
    ("services:\n  app:\n    image: x\n    x-enroot:\n      build: {}\n",
     "unknown key 'build' in x-enroot", 5, "services.app.x-enroot.build"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        command: [x]\n",
     "unknown key 'command' in x-enroot.prepare", 6, "services.app.x-enroot.prepare.command"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: []\n",
     "x-enroot.prepare.commands must not be empty", 6, "services.app.x-enroot.prepare.commands"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        root: false\n",
     "x-enroot.prepare.commands must not be empty", 5, "services.app.x-enroot.prepare.commands"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [x]\n"
     "        mounts: [\"./a,b:/a\"]\n", "contains ','", 7,
     "services.app.x-enroot.prepare.mounts[0]"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [x]\n"
     "        root: \"yes\"\n", "must be true or false", 7,
     "services.app.x-enroot.prepare.root"),
    ("services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n        commands: [x]\n"
     "        env:\n          - NOEQUALS\n", "environment list items must be KEY=VALUE", 8,
     "services.app.x-enroot.prepare.env[0]"),
    # placement
    ("services:\n  app:\n    image: x\n    x-slurm:\n      nodes: 2\n",
     "the allocation has 1 node", 5, "services.app.x-slurm.nodes"),
    ("x-slurm:\n  nodes: 4\nservices:\n  a:\n    image: x\n    x-slurm:\n      nodes: 3\n",
     "a service runs either on 1 node", 7, "services.a.x-slurm.nodes"),
    ("x-slurm:\n  nodes: 4\nservices:\n  a:\n    image: x\n    x-slurm:\n      nodes: 5\n",
     "the allocation has only 4 nodes", 7, "services.a.x-slurm.nodes"),
    ("x-slurm:\n  nodes: 2\nservices:\n  a:\n    image: x\n    x-slurm:\n      nodes: 2\n"
     "  b:\n    image: x\n    x-slurm:\n      nodes: 2\n",
     "at most one distributed service is supported", 11, "services.b.x-slurm.nodes"),
    ("x-slurm:\n  nodes: 2\nservices:\n  a:\n    image: x\n    readiness:\n      type: tcp\n"
     "      port: 29500\n", "cannot use tcp readiness against localhost", 6,
     "services.a.readiness"),
    ("x-slurm:\n  nodes: 2\nservices:\n  a:\n    image: x\n    readiness:\n      type: http\n"
     "      url: http://localhost:8000/\n", "cannot use http readiness against localhost", 6,
     "services.a.readiness"),
]


@pytest.mark.parametrize("text,message,line,path", CASES,
                         ids=["%03d-%s" % (i, c[1][:40]) for i, c in enumerate(CASES)])
def test_spec_error(hc, project, text, message, line, path):
    error = failure(hc, project, text)
    assert message in error.message, error.format()
    assert error.line == line, error.format()
    assert error.path == path, error.format()
    assert error.file == str(project.root / "compose.yaml")
    assert error.exit_code == 2


def test_unknown_key_suggests_the_closest(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: x\n    depend_on: [a]\n")
    assert error.hint == "did you mean 'depends_on'?"


def test_unknown_top_level_key_points_at_the_key_column(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: x\n    imgae: y\n")
    assert error.column == 5


def test_unsupported_compose_keys_carry_migration_hints(hc, project):
    hints = {}
    for key, value in (("build", "."), ("ports", "[]"), ("restart", "always"),
                       ("deploy", "{}"), ("network_mode", "host")):
        hints[key] = failure(hc, project, "services:\n  app:\n    image: x\n    %s: %s\n"
                             % (key, value)).hint
    assert "x-enroot.prepare.commands" in hints["build"]
    assert "127.0.0.1" in hints["ports"]
    assert "x-slurm.failure_policy" in hints["restart"]
    assert "x-slurm" in hints["deploy"]
    assert "127.0.0.1" in hints["network_mode"]


def test_unknown_service_dependency_suggests_a_name(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: x\n    depends_on: [redis]\n"
                                 "  rediss:\n    image: x\n")
    assert error.hint == "did you mean 'rediss'?"


def test_error_render_has_file_line_column_and_path(hc, project):
    error = failure(hc, project, "x-slurm:\n  nodes: two\nservices:\n  app:\n    image: x\n")
    text = error.format()
    assert text.startswith("%s:2:10: x-slurm.nodes: must be an integer"
                           % (project.root / "compose.yaml"))


# --- robustness: any wrong value anywhere is a SpecError, never a crash --------------------------

ROBUST_BASE = FULL.replace("x-slurm:\n  job_name", """x-slurm:
  metrics:
    collectors: [gpu]
  artifacts:
    export_dir: ./o
    paths: [/hpc-compose/job/a]
    bundles:
      b:
        paths: [/hpc-compose/job/b]
  resume:
    path: /shared/r
  job_name""", 1) + """\
  extra:
    image: ./img.sqsh
    healthcheck:
      test: ["CMD", "nc", "-z", "h", "1"]
      timeout: 5s
"""
WRONG_VALUES = [None, [], {}, 0, -1, "", "x", True, 1.5, "$NOPE", ["a"], {"a": 1}, "a,b:/c"]


def all_paths(node, prefix=()):
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            for path in all_paths(value, prefix + (key,)):
                yield path
    elif isinstance(node, list):
        for index, value in enumerate(node):
            for path in all_paths(value, prefix + (index,)):
                yield path


def test_any_wrong_value_at_any_key_is_a_spec_error_not_a_crash(hc, project):
    import copy
    base = hc.parse_yaml(ROBUST_BASE)
    path = project.root / "compose.yaml"
    path.write_text(hc._format_yaml(base) + "\n")
    assert len(hc.build_plan(hc.load_spec(str(path), environ=ENV), environ=ENV).services) == 3
    outcomes = {"ok": 0, "error": 0}
    for key_path in list(all_paths(base)):
        for value in WRONG_VALUES:
            mutated = copy.deepcopy(base)
            node = mutated
            for part in key_path[:-1]:
                node = node[part]
            node[key_path[-1]] = value
            path.write_text(hc._format_yaml(mutated) + "\n")
            try:
                spec = hc.load_spec(str(path), environ=ENV)
                hc._format_inspect_text(hc.build_plan(spec, environ=ENV), verbose=True)
                outcomes["ok"] += 1
            except hc.HpcComposeError as exc:
                assert exc.exit_code == 2
                assert exc.format()
                outcomes["error"] += 1
    assert outcomes["error"] > 500


# --- long-syntax volumes ------------------------------------------------------------------------

def test_long_syntax_bind_volume_loads_as_the_short_form(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    volumes:\n"
                "      - type: bind\n        source: ./data\n        target: /data\n"
                "        read_only: true\n        bind:\n          create_host_path: true\n"
                "      - {type: bind, source: /scratch/$USER, target: /scratch}\n")
    assert service(spec).volumes == ("./data:/data:ro", "/scratch/tester:/scratch")


def test_long_syntax_prepare_mount_loads_as_the_short_form(hc, project):
    spec = load(hc, project, "services:\n  app:\n    image: x\n    x-enroot:\n      prepare:\n"
                "        commands: [pip install -r /r.txt]\n        mounts:\n"
                "          - {type: bind, source: ./r.txt, target: /r.txt, read_only: true}\n")
    assert service(spec).prepare.mounts == ("./r.txt:/r.txt:ro",)


def test_long_syntax_volume_error_says_what_to_write(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: x\n    volumes:\n"
                    "      - type: volume\n        source: pgdata\n        target: /var/lib/pg\n")
    assert "type: bind" in error.hint and "./data/pgdata" in error.hint and "migrate" in error.hint


def test_migrate_todo_line_is_the_first_problem_validate_reports(hc, project):
    error = failure(hc, project, "services:\n  app:\n    # migrate: TODO write the base image\n"
                    "    bogus: 1\n  # migrate: TODO another\n")
    assert error.line == 3 and error.column == 5
    assert error.message == "migrate left a TODO: write the base image"
    assert "more TODO lines: 5" in error.hint


# --- x-slurm.signal, requeue, dependency, array ---------------------------------------------------

PATTERNS = """\
x-slurm:
  time: "00:30:00"
  runtime: host
{slurm}
services:
  app:
    command: ["true"]
{service}
"""


def patterns(hc, project, slurm="", service=""):
    return load(hc, project, PATTERNS.format(slurm=slurm, service=service))


def patterns_failure(hc, project, slurm="", service=""):
    return failure(hc, project, PATTERNS.format(slurm=slurm, service=service))


REQUEUE = """\
  resume: {path: /shared/run}
  signal: {before: 5m, on_signal: requeue}"""


def test_signal_defaults_to_usr1_forwarded(hc, project):
    spec = patterns(hc, project, "  signal: {before: 5m}")
    assert spec.slurm.signal == hc.SignalSpec("USR1", 300, "forward", None, None)


def test_signal_requeue_takes_grace_half_of_before_and_five_attempts(hc, project):
    spec = patterns(hc, project, REQUEUE)
    assert spec.slurm.signal == hc.SignalSpec("USR1", 300, "requeue", 150, 5)


def test_signal_name_accepts_the_sig_prefix_in_any_case(hc, project):
    assert patterns(hc, project, "  signal: {name: sigusr2, before: 60}").slurm.signal.name == "USR2"


def test_signal_name_other_than_usr1_usr2_is_located(hc, project):
    error = patterns_failure(hc, project, "  signal: {name: TERM, before: 60}")
    assert error.path == "x-slurm.signal.name" and error.line == 4 and error.exit_code == 2


def test_signal_before_as_long_as_the_time_limit_is_an_error(hc, project):
    error = patterns_failure(hc, project, "  signal: {before: 30m}")
    assert error.path == "x-slurm.signal.before"
    assert "not shorter than the job's time limit (x-slurm.time 00:30:00 = 1800 s)" in error.message


def test_signal_without_before_is_an_error(hc, project):
    error = patterns_failure(hc, project, "  signal: {name: USR1}")
    assert error.path == "x-slurm.signal" and "needs before" in error.message


def test_on_signal_requeue_without_resume_is_an_error(hc, project):
    error = patterns_failure(hc, project, "  signal: {before: 5m, on_signal: requeue}")
    assert error.path == "x-slurm.signal.on_signal" and "needs x-slurm.resume" in error.message


def test_on_signal_requeue_with_requeue_false_is_an_error(hc, project):
    error = patterns_failure(hc, project, REQUEUE + "\n  requeue: false")
    assert "contradicts x-slurm.requeue: false" in error.message


def test_grace_that_leaves_no_time_for_teardown_is_an_error(hc, project):
    error = patterns_failure(hc, project, REQUEUE.replace("requeue}", "requeue, grace: 4m50s}"))
    assert error.path == "x-slurm.signal.grace"
    assert "grace (290 s) and the teardown after it (15 s) do not fit in before (300 s)" \
        in error.message


def test_grace_and_max_attempts_need_on_signal_requeue(hc, project):
    error = patterns_failure(hc, project, "  signal: {before: 5m, max_attempts: 3}")
    assert error.path == "x-slurm.signal.max_attempts" and "only with on_signal: requeue" \
        in error.message


def test_service_signal_false_stops_forwarding_and_a_name_renames(hc, project):
    spec = patterns(hc, project, service="    x-slurm:\n      signal: false")
    assert service(spec).slurm.signal == hc.ServiceSignalSpec(None, False)
    spec = patterns(hc, project, service="    x-slurm:\n      signal: {name: INT}")
    assert service(spec).slurm.signal == hc.ServiceSignalSpec("INT", True)


def test_service_signal_kill_is_refused(hc, project):
    error = patterns_failure(hc, project, service="    x-slurm:\n      signal: {name: KILL}")
    assert error.path == "services.app.x-slurm.signal.name"


@pytest.mark.parametrize("expression", ["afterok:12345", "afterany:1:2,singleton",
                                        "afternotok:7?afterok:8", "after:5+10", "afterok:9_3"])
def test_dependency_expressions_slurm_accepts_are_kept(hc, project, expression):
    assert patterns(hc, project, "  dependency: %s" % expression).slurm.dependency == expression


@pytest.mark.parametrize("expression, words", [
    ("afterbad:1", "'afterbad' is not a Slurm dependency type"),
    ("afterok", "afterok needs one or more job ids"),
    ("afterok:12x", "afterok needs one or more job ids"),
    ("afterok:1,afterany:2?afterok:3", "mixes ','"),
    ("singleton:4", "singleton takes no job id"),
])
def test_bad_dependency_is_located(hc, project, expression, words):
    error = patterns_failure(hc, project, "  dependency: %s" % expression)
    assert error.path == "x-slurm.dependency" and words in error.message and error.line == 4


@pytest.mark.parametrize("expression", ["0-15%4", "1,3,5", "0-30:2", "7", "0-3,10-12%2"])
def test_array_expressions_slurm_accepts_are_kept(hc, project, expression):
    assert patterns(hc, project, "  array: %s" % expression).slurm.array == expression


@pytest.mark.parametrize("expression, words", [
    ("5-1", "runs backwards"), ("0-15%0", "positive integer"), ("a-b", "is not an index"),
    ("0-4:0", "is not an index"), ("1,,2", "is not an index"),
])
def test_bad_array_is_located(hc, project, expression, words):
    error = patterns_failure(hc, project, "  array: \"%s\"" % expression)
    assert error.path == "x-slurm.array" and words in error.message and error.line == 4


# --- x-slurm.groups: heterogeneous jobs -----------------------------------------------------------

HETEROGENEOUS = """\
x-slurm:
  time: "00:10:00"
  groups:
    head:
      partition: gpu
      nodes: 1
    worker-pool:
      nodes: 2
      ntasks_per_node: 1
services:
  head:
    image: redis:7
  cache:
    image: redis:7
    x-slurm: {group: worker-pool, nodes: 1}
  workers:
    image: redis:7
    x-slurm: {group: worker-pool, nodes: 2}
"""


def test_groups_keep_file_order_and_their_own_resources(hc, project):
    spec = load(hc, project, HETEROGENEOUS)
    assert [g.name for g in spec.slurm.groups] == ["head", "worker-pool"]
    assert spec.slurm.groups[0].slurm.partition == "gpu"
    assert spec.slurm.groups[1].slurm.nodes == 2
    assert spec.slurm.partition is None


def test_a_service_without_group_runs_in_the_first_and_placement_is_per_group(hc, project):
    result = plan(hc, project, HETEROGENEOUS)
    where = dict((s.name, (s.group, s.het_group, s.placement.mode, s.placement.nodes))
                 for s in result.services)
    assert where == {"head": ("head", 0, "single", 1), "cache": ("worker-pool", 1, "primary", 1),
                     "workers": ("worker-pool", 1, "distributed", 2)}
    assert result.nodes == 1


def test_unknown_group_is_refused_with_a_suggestion(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace("group: worker-pool, nodes: 2",
                                                      "group: worker-poll, nodes: 2"))
    assert error.path == "services.workers.x-slurm.group"
    assert "unknown group 'worker-poll'" in error.message
    assert "worker-pool" in error.hint


def test_group_without_groups_is_refused(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: redis:7\n"
                                 "    x-slurm: {group: gpu}\n")
    assert error.path == "services.app.x-slurm.group"
    assert "x-slurm.groups is not set" in error.message


def test_a_distributed_service_larger_than_its_group_is_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace("group: worker-pool, nodes: 2",
                                                      "group: worker-pool, nodes: 3"))
    assert error.path == "services.workers.x-slurm.nodes"
    assert "group 'worker-pool' has only 2 nodes" in error.message


def test_a_job_level_resource_next_to_groups_is_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace('  time: "00:10:00"\n',
                                                      '  time: "00:10:00"\n  mem: 4G\n'))
    assert error.path == "x-slurm.mem"
    assert "set next to x-slurm.groups" in error.message
    assert "x-slurm.groups.<name>.mem" in error.hint


def test_a_group_that_runs_no_service_is_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace("services:\n",
                                                      "    spare: {nodes: 1}\nservices:\n"))
    assert error.path == "x-slurm.groups.spare"
    assert "runs no service" in error.message


def test_an_empty_groups_mapping_is_refused(hc, project):
    error = failure(hc, project, "x-slurm:\n  groups: {}\nservices:\n  app:\n    image: redis:7\n")
    assert error.path == "x-slurm.groups"
    assert "empty" in error.message


def test_groups_with_an_array_are_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace('  time: "00:10:00"\n',
                                                      '  time: "00:10:00"\n  array: 0-3\n'))
    assert error.path == "x-slurm.array"
    assert "job arrays of heterogeneous jobs" in error.message


def test_groups_with_a_sweep_are_refused(hc, project):
    # A sweep is a job array; Slurm has no arrays of heterogeneous jobs.
    error = failure(hc, project, HETEROGENEOUS.replace(
        "services:\n", "x-sweep:\n  matrix:\n    lr: [1, 2]\nservices:\n"))
    assert error.path == "x-sweep"
    assert "job arrays of heterogeneous jobs" in error.message


def test_two_groups_giving_one_variable_name_are_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace("    head:\n      partition",
                                                      "    worker_pool:\n      partition")
                    .replace("  head:\n    image", "  head:\n    x-slurm: {group: worker_pool}\n"
                             "    image"))
    assert error.path == "x-slurm.groups.worker-pool"
    assert "HPC_COMPOSE_GROUP_WORKER_POOL_NODELIST" in error.message


def test_an_unknown_key_in_a_group_is_refused(hc, project):
    error = failure(hc, project, HETEROGENEOUS.replace("      partition: gpu\n",
                                                      "      partition: gpu\n      time: 5\n"))
    assert error.path == "x-slurm.groups.head.time"


def test_a_local_probe_of_a_distributed_service_in_a_later_group_is_accepted(hc, project):
    text = HETEROGENEOUS.replace("x-slurm: {group: worker-pool, nodes: 2}",
                                 "x-slurm: {group: worker-pool, nodes: 2}\n"
                                 "    readiness: {type: tcp, port: 6379}")
    assert plan(hc, project, text).services[2].readiness.port == 6379


def test_groups_reach_the_json_schema_and_config(hc, project):
    schema = hc._compose_json_schema()
    slurm = schema["properties"]["x-slurm"]["properties"]
    group = slurm["groups"]["patternProperties"]["^[A-Za-z0-9][A-Za-z0-9_.-]*$"]
    assert sorted(group["properties"]) == sorted(hc._GROUP_KEYS)
    service_slurm = schema["properties"]["services"]["patternProperties"][
        "^[A-Za-z0-9][A-Za-z0-9_.-]*$"]["properties"]["x-slurm"]["properties"]
    assert "group" in service_slurm
    data = hc.spec_to_dict(load(hc, project, HETEROGENEOUS))
    assert data["x-slurm"]["groups"]["worker-pool"] == {"nodes": 2, "ntasks_per_node": 1}
