"""migrate: each rule that turns a docker-compose.yml into a spec, each TODO case, and the command."""
import difflib
import os

import pytest

ENV = {"HOME": "/home/tester", "USER": "tester"}


def migrate(hc, project, compose, files=None, **options):
    """Write ``files`` and ``compose`` into the project and migrate it (no output written)."""
    for name, text in (files or {}).items():
        project.write(name, text)
    path = project.write("docker-compose.yml", compose)
    return hc.migrate_compose(path.read_text(), str(path), hc.MigrateOptions(**options))


def load(hc, project, result):
    """The spec the migrated text loads as (raises what validate would report)."""
    path = project.write("compose.yaml", result.text)
    spec = hc.load_spec(str(path), environ=ENV)
    hc.build_plan(spec, environ=ENV)
    return spec


def service(spec, name):
    return next(s for s in spec.services if s.name == name)


def notes(result):
    return [note for _, note in result.notes]


def assert_changes_are_noted(original, migrated):
    """Every hunk that differs from the original starts with a ``# migrate:`` line."""
    before, after = original.splitlines(), migrated.splitlines()
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        assert tag != "delete", "lines removed without a note: %r" % before[i1:i2]
        assert after[j1].strip().startswith("# migrate: "), after[j1:j2]


# --- networking ---------------------------------------------------------------------------------

NETWORKED = """\
services:
  web:
    image: nginx:1.27
    container_name: web
    hostname: web
    ports: ["8080:80"]
    expose: ["80"]
    networks: [front]
    links: [api]
    command: nginx -g 'daemon off;'
  api:
    image: python:3.12-slim
    network_mode: bridge
    command: python -m http.server 8000
networks:
  front: {}
"""


def test_network_keys_are_dropped_with_a_note_each(hc, project):
    result = migrate(hc, project, NETWORKED)
    for key in ("container_name", "hostname", "ports", "expose", "networks", "links",
                "network_mode"):
        assert any(note.startswith("dropped %s " % key) for note in notes(result)), key
    assert any(note.startswith("dropped top-level networks") for note in notes(result))
    spec = load(hc, project, result)
    assert [s.name for s in spec.services] == ["web", "api"]
    assert_changes_are_noted(NETWORKED, result.text)


HOSTS = """\
services:
  db:
    image: postgres:16
    environment:
      POSTGRES_DB: app
  cache:
    image: redis:7
  app:
    image: python:3.12-slim
    environment:
      DATABASE_URL: postgresql://app@db:5432/app   # the database
      CACHE_HOST: cache
      APP_NAME: db
    command: python -m app --redis cache:6379 --db http://db:5432/
  worker:
    image: python:3.12-slim
    environment:
      - BROKER_URL=redis://cache:6379/0
    command: ["python", "worker.py", "-h", "cache"]
"""


def test_service_host_names_become_127_0_0_1_in_environment_and_commands(hc, project):
    result = migrate(hc, project, HOSTS)
    spec = load(hc, project, result)
    app = dict(service(spec, "app").environment)
    assert app["DATABASE_URL"] == "postgresql://app@127.0.0.1:5432/app"
    assert app["CACHE_HOST"] == "127.0.0.1"
    assert app["APP_NAME"] == "db"     # a name in a variable that is not a host setting stays
    assert dict(service(spec, "db").environment)["POSTGRES_DB"] == "app"
    assert service(spec, "app").command == \
        "python -m app --redis 127.0.0.1:6379 --db http://127.0.0.1:5432/"
    assert dict(service(spec, "worker").environment)["BROKER_URL"] == "redis://127.0.0.1:6379/0"
    assert service(spec, "worker").command == ("python", "worker.py", "-h", "127.0.0.1")
    assert "# the database" in result.text
    assert any(n.startswith("host name db -> 127.0.0.1") for n in notes(result))
    assert_changes_are_noted(HOSTS, result.text)


MULTI_NODE = """\
x-slurm:
  nodes: 2
services:
  store:
    image: redis:7
    x-slurm:
      nodes: 1
  trainer:
    image: python:3.12-slim
    x-slurm:
      nodes: 2
    command: python train.py --store store:6379
"""


def test_a_multi_node_service_reaches_helpers_through_the_primary_node(hc, project):
    result = migrate(hc, project, MULTI_NODE)
    spec = load(hc, project, result)
    assert service(spec, "trainer").command == \
        "python train.py --store $HPC_COMPOSE_PRIMARY_NODE:6379"


def test_a_multi_node_service_environment_naming_a_host_is_a_todo(hc, project):
    text = MULTI_NODE.replace("    command:", "    environment:\n      STORE: redis://store:6379\n"
                              "    command:")
    result = migrate(hc, project, text)
    assert len(result.todos) == 1 and "$HPC_COMPOSE_PRIMARY_NODE" in result.todos[0][1]


# --- volumes ------------------------------------------------------------------------------------

VOLUMES = """\
services:
  db:
    image: postgres:16
    volumes:
      - pgdata:/var/lib/postgresql/data
      - ./init.sql:/docker-entrypoint-initdb.d/init.sql:ro
      - type: volume
        source: backups
        target: /backups
        read_only: true
      - /var/log/postgresql
      - type: tmpfs
        target: /tmp
      - type: tmpfs
        target: /run/scratch
      - type: bind
        source: ./conf
        target: /etc/postgresql/conf.d
        bind:
          create_host_path: true
  nfs:
    image: busybox:1.36
    command: sleep 1
    volumes:
      - shared:/shared
volumes:
  pgdata:
  backups:
    external: true
  shared:
    driver: local
    driver_opts:
      type: none
      o: bind
      device: /scratch/project/shared
"""


def test_named_volumes_become_bind_mounts_under_the_data_dir(hc, project):
    result = migrate(hc, project, VOLUMES)
    spec = load(hc, project, result)
    assert service(spec, "db").volumes == (
        "./data/pgdata:/var/lib/postgresql/data",
        "./init.sql:/docker-entrypoint-initdb.d/init.sql:ro",
        "./data/backups:/backups:ro",
        "./data/db-postgresql:/var/log/postgresql",
        "./data/db-tmpfs-scratch:/run/scratch",
        "./conf:/etc/postgresql/conf.d")
    assert result.data_dirs == ("./data/pgdata", "./data/backups", "./data/db-postgresql",
                                "./data/db-tmpfs-scratch")
    assert any("copy its contents there" in n for n in notes(result))
    assert any("tmpfs at /tmp dropped" in n for n in notes(result))
    assert any(n.startswith("dropped top-level volumes") for n in notes(result))
    assert_changes_are_noted(VOLUMES, result.text)


def test_a_bind_style_named_volume_mounts_its_device(hc, project):
    result = migrate(hc, project, VOLUMES)
    assert service(load(hc, project, result), "nfs").volumes == ("/scratch/project/shared:/shared",)


def test_data_dir_option_places_the_volume_folders(hc, project):
    result = migrate(hc, project, VOLUMES, data_dir="/shared/$USER/app")
    assert service(load(hc, project, result), "db").volumes[0] == \
        "/shared/tester/app/pgdata:/var/lib/postgresql/data"


def test_volumes_with_the_host_runtime_are_dropped(hc, project):
    result = migrate(hc, project, "services:\n  job:\n    image: python:3.12\n    command: "
                     "python run.py\n    volumes:\n      - ./in:/in\n", runtime="host")
    spec = load(hc, project, result)
    assert spec.slurm.runtime == "host" and service(spec, "job").volumes == ()
    assert any("volumes dropped" in n for n in notes(result))


def test_host_runtime_without_a_command_is_a_todo(hc, project):
    result = migrate(hc, project, "services:\n  job:\n    image: redis:7\n", runtime="host")
    assert len(result.todos) == 1 and "write the command" in result.todos[0][1]


SECRETS = """\
services:
  app:
    image: python:3.12-slim
    command: python app.py
    env_file: app.env
    secrets:
      - db_password
    configs:
      - source: app_config
        target: /etc/app/config.toml
secrets:
  db_password:
    file: ./secrets/db_password.txt
configs:
  app_config:
    file: ./config.toml
"""


def test_file_secrets_stay_secrets_and_configs_become_read_only_bind_mounts(hc, project):
    result = migrate(hc, project, SECRETS, files={"app.env": "MODE=prod\n",
                                                  "secrets/db_password.txt": "hunter2\n"})
    app = service(load(hc, project, result), "app")
    assert app.volumes == ("./config.toml:/etc/app/config.toml:ro",)
    assert [(s.source, s.target) for s in app.secrets] == [("db_password", "db_password")]
    assert "secrets:\n  db_password:\n    file: ./secrets/db_password.txt" in result.text
    assert_changes_are_noted(SECRETS, result.text)


def test_env_file_is_kept_as_written(hc, project):
    result = migrate(hc, project, SECRETS, files={"app.env": "MODE=prod\nPRICE=$$5\n",
                                                  "secrets/db_password.txt": "hunter2\n"})
    assert "    env_file: app.env\n" in result.text and "environment" not in result.text
    assert dict(service(load(hc, project, result), "app").environment) == \
        {"MODE": "prod", "PRICE": "$5"}


def test_a_missing_env_file_is_kept_for_validate_to_report(hc, project):
    result = migrate(hc, project, SECRETS, files={"secrets/db_password.txt": "hunter2\n"})
    assert result.todos == () and "    env_file: app.env\n" in result.text
    with pytest.raises(hc.SpecError) as info:
        load(hc, project, result)
    assert info.value.path == "services.app.env_file" and "does not exist" in info.value.message


def test_environment_secrets_stay_secrets(hc, project):
    compose = ("services:\n  app:\n    image: x\n    command: run\n    secrets: [token]\n"
               "secrets:\n  token:\n    environment: TOKEN\n")
    result = migrate(hc, project, compose)
    assert result.text == compose and not result.todos


def test_external_secrets_are_a_todo(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n    secrets: [token]\n"
                     "secrets:\n  token:\n    external: true\n")
    todos = [note for _, note in result.todos]
    assert any("secrets token have neither file: nor environment:" in note for note in todos)
    assert any("secret token has neither file: nor environment:" in note for note in todos)


def test_secret_owner_ids_are_dropped_with_a_note(hc, project):
    compose = ("services:\n  app:\n    image: x\n    command: run\n    secrets:\n"
               "      - source: token\n        uid: \"1000\"\n"
               "secrets:\n  token:\n    environment: TOKEN\n")
    result = migrate(hc, project, compose)
    assert any(note.startswith("dropped uid of secret token") for note in notes(result))
    assert "uid" not in result.text.replace("dropped uid", "")
    assert_changes_are_noted(compose, result.text)


# --- restart, resources, health ------------------------------------------------------------------

@pytest.mark.parametrize("restart, expected", [
    ("always", {"mode": "restart_on_failure", "max_restarts": 3, "backoff_seconds": 5}),
    ("unless-stopped", {"mode": "restart_on_failure", "max_restarts": 3, "backoff_seconds": 5}),
    ('"on-failure:5"', {"mode": "restart_on_failure", "max_restarts": 5, "backoff_seconds": 5}),
    ('"no"', {"mode": "fail_job"}),
])
def test_restart_becomes_a_failure_policy(hc, project, restart, expected):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n    restart: %s\n" % restart)
    policy = service(load(hc, project, result), "app").slurm.failure_policy
    assert {k: v for k, v in policy._asdict().items() if v is not None} == expected


def test_restart_in_a_merged_anchor_is_dropped_there_and_each_service_gets_the_policy(hc, project):
    text = ("x-common: &common\n  restart: always\n  logging:\n    driver: none\nservices:\n"
            "  a:\n    <<: *common\n    image: x\n  b:\n    <<: *common\n    image: y\n")
    result = migrate(hc, project, text)
    spec = load(hc, project, result)
    assert all(s.slurm.failure_policy.mode == "restart_on_failure" for s in spec.services)
    assert "x-common: &common" in result.text and "<<: *common" in result.text
    assert_changes_are_noted(text, result.text)


RESOURCES = """\
services:
  trainer:
    image: pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime
    command: python train.py
    deploy:
      replicas: 1
      resources:
        limits:
          cpus: "3.5"
          memory: 12g
        reservations:
          devices:
            - driver: nvidia
              count: 2
              capabilities: [gpu]
      placement:
        constraints: [node.role == worker]
  monitor:
    image: python:3.12-slim
    command: python monitor.py
    cpus: 0.5
    mem_limit: 512m
"""


def test_deploy_resources_become_x_slurm(hc, project):
    result = migrate(hc, project, RESOURCES)
    spec = load(hc, project, result)
    trainer = service(spec, "trainer").slurm
    assert (trainer.cpus_per_task, trainer.gpus) == (4, 2)
    assert service(spec, "monitor").slurm.cpus_per_task == 1
    assert (spec.slurm.mem, spec.slurm.cpus_per_task, spec.slurm.gpus) == ("12800M", 5, 2)
    assert any("dropped placement" in n for n in notes(result))
    assert_changes_are_noted(RESOURCES, result.text)


def test_a_gpu_reservation_of_all_gpus_is_a_todo(hc, project):
    result = migrate(hc, project, RESOURCES.replace("count: 2", "count: all"))
    assert any("set x-slurm.gpus" in note for _, note in result.todos)


HEALTH = """\
services:
  api:
    image: python:3.12-slim
    command: python -m http.server 8000
    healthcheck:
      test: ["CMD-SHELL", "curl -fsS http://api:8000/ || exit 1"]
      interval: 10s
      retries: 9
  cache:
    image: redis:7
    healthcheck:
      test: ["CMD", "redis-cli", "-p", "6380", "ping"]
  queue:
    image: python:3.12-slim
    command: celery -A proj worker
    healthcheck:
      test: celery -A proj inspect ping
  client:
    image: python:3.12-slim
    command: python client.py
    depends_on:
      api:
        condition: service_healthy
      cache:
        condition: service_healthy
"""


def test_a_probe_healthcheck_becomes_readiness(hc, project):
    spec = load(hc, project, migrate(hc, project, HEALTH))
    readiness = service(spec, "api").readiness
    assert (readiness.type, readiness.url, readiness.timeout_seconds) == \
        ("http", "http://127.0.0.1:8000/", 90)


def test_a_server_ping_healthcheck_becomes_a_tcp_check_of_its_port(hc, project):
    readiness = service(load(hc, project, migrate(hc, project, HEALTH)), "cache").readiness
    assert (readiness.type, readiness.port) == ("tcp", 6380)


def test_an_inexpressible_healthcheck_nobody_waits_for_is_dropped(hc, project):
    result = migrate(hc, project, HEALTH)
    assert service(load(hc, project, result), "queue").readiness is None
    assert any("healthcheck dropped" in n and "nothing waits" in n for n in notes(result))


def test_an_inexpressible_healthcheck_a_service_waits_for_is_a_todo(hc, project):
    result = migrate(hc, project, HEALTH.replace("      cache:\n", "      queue:\n"))
    assert [n for _, n in result.todos if "another service waits for 'queue'" in n]
    with pytest.raises(hc.SpecError) as info:
        load(hc, project, result)
    assert info.value.line == result.todos[0][0]


def test_depends_on_completed_successfully_is_kept_and_extra_keys_are_dropped(hc, project):
    result = migrate(hc, project, "services:\n  init:\n    image: x\n  app:\n    image: x\n"
                     "    depends_on:\n      init:\n        condition: "
                     "service_completed_successfully\n        required: true\n")
    assert result.todos == ()
    assert any("dropped required of depends_on.init" in n for n in notes(result))
    app = service(load(hc, project, result), "app")
    assert app.depends_on == (("init", "service_completed_successfully"),)


def test_depends_on_completed_successfully_alone_is_left_untouched(hc, project):
    compose = ("services:\n  init:\n    image: x\n  app:\n    image: x\n    depends_on:\n"
               "      init:\n        condition: service_completed_successfully\n")
    result = migrate(hc, project, compose)
    assert result.todos == () and result.text == compose


@pytest.mark.parametrize("key, value", [
    ("logging", "\n      driver: syslog"), ("labels", "\n      - app=web"),
    ("stop_signal", " SIGINT"), ("ulimits", "\n      nofile: 65536"),
    ("security_opt", "\n      - no-new-privileges:true"), ("user", ' "1000:1000"'),
    ("shm_size", " 2gb"), ("privileged", " true"), ("profiles", " [debug]"),
    ("tty", " true"), ("pull_policy", " always"), ("ipc", " host"),
])
def test_keys_without_hpc_meaning_are_dropped_with_a_note(hc, project, key, value):
    text = "services:\n  app:\n    image: x\n    %s:%s\n" % (key, value)
    result = migrate(hc, project, text)
    load(hc, project, result)
    assert [n for n in notes(result) if n.startswith("dropped %s " % key)]
    assert_changes_are_noted(text, result.text)


def test_extends_is_a_todo(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    extends:\n      service: base\n"
                     "    image: x\n")
    assert any(n.startswith("extends ") for _, n in result.todos)


def test_working_dir_without_a_command_is_a_todo(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n    working_dir: /srv\n")
    assert any("working_dir /srv needs an explicit command" in n for _, n in result.todos)


# --- build: Dockerfile -> image + x-enroot.prepare -------------------------------------------------

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG PYTHON=3.12
FROM python:${PYTHON}-slim
ARG PIP_INDEX=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 \\
    APP_HOME=/srv/app
WORKDIR /srv/app
RUN apt-get update \\
 && apt-get install -y --no-install-recommends curl \\
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install --index-url "$PIP_INDEX" -r requirements.txt
COPY src/ ./src/
EXPOSE 8000
USER app
LABEL org.opencontainers.image.title=app
HEALTHCHECK --interval=15s CMD curl -f http://localhost:8000/health || exit 1
CMD ["python", "-m", "src.app"]
"""

BUILD = """\
services:
  app:
    build:
      context: ./app
      args:
        PYTHON: "3.11"
    image: registry.example.org/team/app:dev
"""


def build_result(hc, project, dockerfile=DOCKERFILE, compose=BUILD, **files):
    files = dict(files, **{"app/Dockerfile": dockerfile, "app/requirements.txt": "flask\n"})
    project.write("app/src/app.py", "print('hi')\n")
    return migrate(hc, project, compose, files=files)


def test_build_becomes_image_and_prepare_commands(hc, project):
    result = build_result(hc, project)
    app = service(load(hc, project, result), "app")
    assert app.image == "python:3.11-slim"
    assert app.prepare.commands == (
        "mkdir -p /srv/app && cd /srv/app && apt-get update && apt-get install -y "
        "--no-install-recommends curl && rm -rf /var/lib/apt/lists/*",
        "mkdir -p /srv/app && cp -a /tmp/hpc-compose-build/requirements.txt /srv/app/",
        'cd /srv/app && pip install --index-url "$PIP_INDEX" -r requirements.txt')
    assert app.prepare.mounts == ("./app:/tmp/hpc-compose-build",)
    assert dict(app.prepare.env) == {"PIP_INDEX": "https://pypi.org/simple",
                                     "PYTHONUNBUFFERED": "1", "APP_HOME": "/srv/app"}
    assert result.todos == ()


def test_build_runtime_settings_come_from_the_dockerfile(hc, project):
    result = build_result(hc, project)
    app = service(load(hc, project, result), "app")
    assert app.command == ("python", "-m", "src.app")
    assert app.working_dir == "/srv/app"
    assert dict(app.environment) == {"PYTHONUNBUFFERED": "1", "APP_HOME": "/srv/app"}
    assert app.volumes == ("./app/src:/srv/app/src",)
    assert (app.readiness.type, app.readiness.url) == ("http", "http://localhost:8000/health")
    for dropped in ("EXPOSE 8000 dropped", "USER app dropped", "LABEL"):
        assert any(dropped in n for n in notes(result)), dropped
    assert any("named the built image" in n for n in notes(result))
    assert_changes_are_noted(BUILD, result.text)


def test_build_short_form_and_compose_command_win_over_cmd(hc, project):
    compose = "services:\n  app:\n    build: ./app\n    command: python -m src.other\n"
    app = service(load(hc, project, build_result(hc, project, compose=compose)), "app")
    assert app.image == "python:3.12-slim" and app.command == "python -m src.other"


def test_multi_stage_dockerfile_uses_the_last_stage_with_a_note(hc, project):
    dockerfile = ("FROM node:20 AS assets\nRUN npm ci && npm run build\n"
                  "FROM python:3.12-slim AS base\nRUN pip install gunicorn\n"
                  "FROM base AS runtime\nRUN pip install flask\nCMD gunicorn app:app\n")
    result = build_result(hc, project, dockerfile, compose="services:\n  app:\n    build: ./app\n")
    app = service(load(hc, project, result), "app")
    assert app.image == "python:3.12-slim"
    assert app.prepare.commands == ("pip install gunicorn", "pip install flask")
    assert app.command == "gunicorn app:app"
    assert any("multi-stage Dockerfile: stage runtime (FROM base) makes the image" in n
               for n in notes(result))
    assert app.prepare.stages == ()


def test_copy_from_a_build_stage_prepares_that_stage_on_its_own(hc, project):
    dockerfile = ("FROM golang:1.22 AS build\nWORKDIR /src\nCOPY . .\n"
                  "RUN go build -o /out/api ./cmd/api\n"
                  "FROM debian:12-slim\nCOPY --from=build /out/api /usr/local/bin/api\n"
                  "COPY --from=build /src/static/ /srv/static/\n"
                  "CMD [\"/usr/local/bin/api\"]\n")
    result = build_result(hc, project, dockerfile, compose="services:\n  app:\n    build: ./app\n")
    app = service(load(hc, project, result), "app")
    assert app.image == "debian:12-slim"
    (stage,) = app.prepare.stages
    assert stage == hc.PrepareStageSpec(
        "build", "golang:1.22",
        ("mkdir -p /src && cp -a /tmp/hpc-compose-build/. /src/",
         "cd /src && go build -o /out/api ./cmd/api"), ("./app:/tmp/hpc-compose-build",))
    inside = "/tmp/hpc-compose-stage/build/out/api"
    assert app.prepare.commands[0] == (
        "if [ -d %s ]; then mkdir -p /usr/local/bin/api && cp -a %s/. /usr/local/bin/api/; "
        "else mkdir -p /usr/local/bin && cp -a %s /usr/local/bin/api; fi" % (inside, inside, inside))
    assert app.prepare.commands[1].endswith(
        "else mkdir -p /srv/static && cp -a /tmp/hpc-compose-stage/build/src/static /srv/static/; fi")
    assert app.prepare.mounts == ()     # the final stage copies from the stage only
    assert "      prepare:\n        stages:\n          build:\n            image: golang:1.22\n" \
        in result.text


def test_copy_from_an_image_or_a_stage_number(hc, project):
    dockerfile = ("FROM alpine:3.20\nRUN echo made > /made\n"
                  "FROM debian:12-slim\nCOPY --from=nginx:1.27 /etc/nginx/nginx.conf /etc/\n"
                  "COPY --from=0 /made /made\n")
    app = service(load(hc, project, build_result(
        hc, project, dockerfile, compose="services:\n  app:\n    build: ./app\n")), "app")
    assert [(s.name, s.image, s.commands) for s in app.prepare.stages] == [
        ("nginx-1.27", "nginx:1.27", ()), ("stage0", "alpine:3.20", ("echo made > /made",))]
    assert "cp -a /tmp/hpc-compose-stage/nginx-1.27/etc/nginx/nginx.conf /etc/; fi" in \
        app.prepare.commands[0]


def test_build_target_picks_the_stage(hc, project):
    dockerfile = "FROM python:3.12 AS dev\nRUN pip install pytest\nFROM python:3.12-slim\n"
    compose = "services:\n  app:\n    build:\n      context: ./app\n      target: dev\n"
    app = service(load(hc, project, build_result(hc, project, dockerfile, compose)), "app")
    assert app.image == "python:3.12" and app.prepare.commands == ("pip install pytest",)


def test_entrypoint_and_cmd_keep_the_exec_form(hc, project):
    dockerfile = ('FROM alpine:3.20\nRUN apk add tini\nENTRYPOINT ["tini", "--"]\n'
                  'CMD ["sh", "-c", "echo $HOME"]\n')
    app = service(load(hc, project, build_result(
        hc, project, dockerfile, "services:\n  app:\n    build: ./app\n")), "app")
    assert app.entrypoint == ("tini", "--") and app.command == ("sh", "-c", "echo $HOME")


def test_add_of_a_local_archive_is_extracted_by_a_prepare_command(hc, project):
    dockerfile = "FROM debian:12\nADD tools.tar.gz /opt/tools/\nRUN /opt/tools/setup.sh\n"
    app = service(load(hc, project, build_result(
        hc, project, dockerfile, "services:\n  app:\n    build: ./app\n")), "app")
    assert app.prepare.commands[0] == \
        "mkdir -p /opt/tools && tar -xf /tmp/hpc-compose-build/tools.tar.gz -C /opt/tools"


@pytest.mark.parametrize("dockerfile, todo", [
    ("FROM golang:1.22 AS build\nRUN go build -o /out/app\n"
     "FROM gcr.io/distroless/static-debian12\nCOPY --from=build /out/app /app\n",
     "has no shell, which the prepare commands run in"),
    ("FROM debian:12 AS a\nRUN make\nFROM debian:12 AS b\nCOPY --from=a /x /x\n"
     "FROM debian:12\nCOPY --from=b /x /x\n", "a stage that reads another stage"),
    ("FROM debian:12\nADD https://example.org/tool.tgz /opt/\nRUN true\n", "fetches from the network"),
    ("FROM debian:12\nONBUILD RUN make\nRUN true\n", "ONBUILD RUN make has no prepare equivalent"),
    ("FROM debian:12\nRUN --mount=type=secret,id=token make\n", "uses a build secret"),
    ("FROM debian:12\nRUN <<EOF\nmake\nEOF\n", "here-document"),
    ("FROM debian:12\nARG VERSION\nRUN make V=$VERSION\n", "ARG VERSION has no default"),
    ("FROM debian:12\nENV PATH=/opt/venv/bin:$PATH\nRUN true\n", "refers to $PATH"),
    ("RUN true\n", "no FROM line"),
])
def test_dockerfile_instructions_prepare_cannot_express_are_todos(hc, project, dockerfile, todo):
    result = build_result(hc, project, dockerfile, "services:\n  app:\n    build: ./app\n")
    assert any(todo in note for _, note in result.todos), result.todos
    with pytest.raises(hc.SpecError) as info:
        load(hc, project, result)
    assert info.value.line == result.todos[0][0] and "migrate left a TODO" in info.value.message


def test_build_secrets_and_a_missing_dockerfile_are_todos(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    build:\n      context: ./nowhere\n"
                     "      secrets: [token]\n")
    todos = [note for _, note in result.todos]
    assert any("build.secrets" in n for n in todos)
    assert any("Dockerfile nowhere/Dockerfile not found" in n for n in todos)


def test_build_with_the_host_runtime_lists_what_to_install(hc, project):
    result = build_result(hc, project, compose="services:\n  app:\n    build: ./app\n")
    host = migrate(hc, project, "services:\n  app:\n    build: ./app\n", runtime="host")
    assert result.todos == ()
    assert any("install on the node" in n and "pip install" in n for _, n in host.todos)


# --- the file as a whole ---------------------------------------------------------------------------

def test_comments_order_and_anchors_are_kept(hc, project):
    text = ("# my stack\nname: demo\nx-env: &env\n  LOG_LEVEL: info  # verbose\n"
            "services:\n  # first\n  b:\n    image: x\n    environment: *env\n    ports: [1]\n"
            "  a:\n    image: y\n")
    result = migrate(hc, project, text)
    kept = [line for line in text.splitlines() if "ports" not in line]
    assert [line for line in result.text.splitlines() if "# migrate:" not in line] == kept
    assert [s.name for s in load(hc, project, result).services] == ["b", "a"]


def test_a_flow_style_file_is_rewritten_in_block_style(hc, project):
    text = ('{"services": {"web": {"image": "nginx", "ports": ["80:80"], '
            '"volumes": ["html:/usr/share/nginx/html"]}}, "volumes": {"html": {}}}\n')
    result = migrate(hc, project, text)
    assert result.text.startswith("# migrate: rewrote the file in block style")
    assert service(load(hc, project, result), "web").volumes == \
        ("./data/html:/usr/share/nginx/html",)


def test_cache_dir_option_sets_x_slurm_cache_dir(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n",
                     cache_dir="/shared/tester/cache")
    assert load(hc, project, result).slurm.cache_dir == "/shared/tester/cache"


def test_counts_add_up_to_the_keys_seen(hc, project):
    result = migrate(hc, project, NETWORKED)
    # web: image, command kept, 6 dropped; api: image, command kept, network_mode dropped; top: 1
    assert result.counts == {"kept": 4, "changed": 0, "dropped": 8, "added": 0}


def test_not_a_compose_file_is_a_located_error(hc, project):
    with pytest.raises(hc.SpecError) as info:
        migrate(hc, project, "- a\n- b\n")
    assert "no services: mapping" in info.value.message


# --- the command ----------------------------------------------------------------------------------

def test_migrate_command_writes_compose_yaml_and_creates_volume_folders(cli, project):
    project.write("docker-compose.yml", VOLUMES)
    result = cli(["migrate"], cwd=str(project.root))
    assert result.code == 0, result
    assert (project.root / "compose.yaml").read_text().count("# migrate: ") > 5
    assert (project.root / "data" / "pgdata").is_dir()
    assert "created %s" % (project.root / "data" / "pgdata") in result.out
    assert "the result validates" in result.out
    assert cli(["validate", "-f", str(project.root / "compose.yaml")]).code == 0


def test_migrate_command_refuses_to_overwrite_without_force(cli, project):
    project.write("docker-compose.yml", NETWORKED)
    project.write("compose.yaml", "old\n")
    result = cli(["migrate"], cwd=str(project.root))
    assert result.code == 2 and "already exists" in result.err
    assert (project.root / "compose.yaml").read_text() == "old\n"
    assert cli(["migrate", "--force"], cwd=str(project.root)).code == 0
    assert "# migrate:" in (project.root / "compose.yaml").read_text()


def test_migrate_to_stdout_keeps_the_summary_on_stderr(cli, project):
    path = project.write("docker-compose.yml", NETWORKED)
    result = cli(["migrate", "-f", str(path), "-o", "-"])
    assert result.code == 0 and result.out.startswith("services:")
    assert "keys: 4 kept, 0 changed, 8 dropped, 0 added" in result.err
    assert not (project.root / "compose.yaml").exists()


def test_migrate_lists_the_todo_lines_and_validate_points_at_the_first(cli, project):
    path = project.write("docker-compose.yml", "services:\n  app:\n    build: ./missing\n")
    result = cli(["migrate", "-f", str(path)])
    assert result.code == 0 and "1 TODO line to resolve:" in result.out
    check = cli(["validate", "-f", str(project.root / "compose.yaml")])
    assert check.code == 2
    assert "compose.yaml:3:5: migrate left a TODO: Dockerfile missing/Dockerfile not found" \
        in check.err


def test_migrate_output_in_another_folder_is_refused(cli, project, tmp_path_factory):
    path = project.write("docker-compose.yml", NETWORKED)
    other = tmp_path_factory.mktemp("elsewhere") / "compose.yaml"
    result = cli(["migrate", "-f", str(path), "-o", str(other)])
    assert result.code == 2 and "next to docker-compose.yml" in result.err


def test_migrate_without_a_docker_compose_file_is_a_usage_error(cli, project):
    result = cli(["migrate"], cwd=str(project.root))
    assert result.code == 2 and "no Docker Compose file found" in result.err


def test_completions_offer_migrate_and_its_options(cli):
    result = cli(["completions", "bash"])
    assert " migrate " in result.out
    line = [l for l in result.out.splitlines() if l.strip().startswith("migrate)")][0]
    for option in ("--file", "--output", "--data-dir", "--cache-dir", "--runtime", "--force"):
        assert option in line
    files = [l for l in result.out.splitlines() if "compgen -f" in l][0]
    assert "-o|--output" in files and "--data-dir|--cache-dir" in files


def test_double_dollars_in_a_string_command_become_single(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n    entrypoint: >\n"
                     "      /bin/sh -c \"echo $${USER} $$HOME\"\n")
    assert service(load(hc, project, result), "app").entrypoint == '/bin/sh -c "echo ${USER} $HOME"\n'
    assert any(n.startswith("$$ -> $") for n in notes(result))


def test_env_file_values_naming_a_service_host_are_set_again_in_environment(hc, project):
    result = migrate(hc, project, "services:\n  broker:\n    image: x\n  app:\n    image: y\n"
                     "    env_file: app.env\n",
                     files={"app.env": "URL=amqp://broker:5672//\nMODE=prod\n"})
    assert "    env_file: app.env\n" in result.text
    assert dict(service(load(hc, project, result), "app").environment) == \
        {"URL": "amqp://127.0.0.1:5672//", "MODE": "prod"}
    assert any("host name broker -> 127.0.0.1 in URL" in n for n in notes(result))


def test_environment_names_with_dots_are_kept_as_docker_passes_them(hc, project):
    result = migrate(hc, project, "services:\n  es:\n    image: x\n    environment:\n"
                     "      - discovery.type=single-node\n      - xpack.security.enabled=false\n")
    assert result.todos == ()
    assert dict(service(load(hc, project, result), "es").environment) == \
        {"discovery.type": "single-node", "xpack.security.enabled": "false"}


def test_environment_names_no_service_can_take_are_a_todo(hc, project):
    result = migrate(hc, project, "services:\n  es:\n    image: x\n    environment:\n"
                     "      - 9lives=x\n")
    assert any("9lives: not environment names hpc-compose can pass" in n
               for _, n in result.todos)


def test_the_migration_guide_shows_what_migrate_writes(hc, project):
    import re
    guide = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                         "migration.md")
    with open(guide, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("## A three-service app, before and after"):]
    before, dockerfile, after = re.findall(r"```(?:yaml|dockerfile)\n(.*?)```", section,
                                           re.S)[:3]
    result = migrate(hc, project, before, files={"app/Dockerfile": dockerfile})
    assert result.text == after
    load(hc, project, result)


def test_shell_wraps_the_later_run_commands(hc, project):
    dockerfile = ('FROM debian:12\nSHELL ["/bin/bash", "-o", "pipefail", "-c"]\n'
                  "RUN curl -fsSL https://example.org/x | tar -x\n")
    app = service(load(hc, project, build_result(
        hc, project, dockerfile, "services:\n  app:\n    build: ./app\n")), "app")
    assert app.prepare.commands == (
        "/bin/bash -o pipefail -c 'curl -fsSL https://example.org/x | tar -x'",)


def test_build_dockerfile_option_names_the_file_in_the_context(hc, project):
    compose = "services:\n  app:\n    build:\n      context: ./app\n      dockerfile: docker/Dockerfile.cpu\n"
    result = migrate(hc, project, compose, files={
        "app/docker/Dockerfile.cpu": "FROM python:3.12-slim\nRUN pip install numpy\n"})
    app = service(load(hc, project, result), "app")
    assert (app.image, app.prepare.commands) == ("python:3.12-slim", ("pip install numpy",))
    assert any("from app/docker/Dockerfile.cpu" in n for n in notes(result))


def test_deploy_restart_policy_becomes_a_failure_policy(hc, project):
    result = migrate(hc, project, "services:\n  app:\n    image: x\n    deploy:\n"
                     "      restart_policy:\n        condition: on-failure\n        delay: 10s\n"
                     "        max_attempts: 2\n")
    policy = service(load(hc, project, result), "app").slurm.failure_policy
    assert (policy.mode, policy.max_restarts, policy.backoff_seconds) == \
        ("restart_on_failure", 2, 10)


def test_a_file_with_copied_env_file_values_is_written_owner_only(cli, project):
    path = project.write("docker-compose.yml", "services:\n  broker:\n    image: x\n  app:\n"
                                               "    image: y\n    env_file: app.env\n")
    os.chmod(str(path), 0o644)
    project.write("app.env", "URL=amqp://user:secret@broker:5672//\n")
    assert cli(["migrate", "-f", str(path)]).code == 0
    assert os.stat(str(project.root / "compose.yaml")).st_mode & 0o777 == 0o600
    path.write_text(SECRETS)
    assert cli(["migrate", "-f", str(path), "--force"]).code == 0
    assert os.stat(str(project.root / "compose.yaml")).st_mode & 0o777 == 0o644
    path.write_text(NETWORKED)
    assert cli(["migrate", "-f", str(path), "--force"]).code == 0
    assert os.stat(str(project.root / "compose.yaml")).st_mode & 0o777 == 0o644


def test_migrate_never_replaces_its_input(cli, project):
    project.write("compose.yaml", NETWORKED)
    result = cli(["migrate", "--force"], cwd=str(project.root))
    assert result.code == 2 and "would replace the Docker Compose file" in result.err
    assert (project.root / "compose.yaml").read_text() == NETWORKED


@pytest.mark.parametrize("environment", [
    "    environment: {URL: 'http://web:80'}\n",
    "    environment: [URL=http://web:80]\n",
    "    <<: *env\n",
])
def test_variables_from_the_build_join_any_form_of_environment(hc, project, environment):
    compose = ("x-env: &env\n  environment:\n    URL: http://web:80\nservices:\n  web:\n"
               "    image: nginx\n  app:\n    build: ./app\n" + environment)
    result = build_result(hc, project, "FROM python:3.12\nENV MODE=prod\nRUN true\n", compose)
    assert dict(service(load(hc, project, result), "app").environment) == \
        {"URL": "http://127.0.0.1:80", "MODE": "prod"}
    assert_changes_are_noted(compose, result.text)


@pytest.mark.parametrize("volumes", [
    "    volumes: [cache:/cache]\n",
    "    volumes:\n      - cache:/cache\n",
    "    <<: *vols\n",
])
def test_named_volumes_and_build_volumes_join_any_form_of_volumes(hc, project, volumes):
    compose = ("x-vols: &vols\n  volumes:\n    - cache:/cache\nservices:\n  app:\n"
               "    build: ./app\n" + volumes + "volumes:\n  cache:\n")
    result = build_result(hc, project, "FROM python:3.12\nRUN true\nCOPY run.py /srv/\n", compose)
    assert service(load(hc, project, result), "app").volumes == \
        ("./data/cache:/cache", "./app/run.py:/srv/run.py")
    assert_changes_are_noted(compose, result.text)


def test_a_host_name_as_a_variable_default_is_rewritten(hc, project):
    result = migrate(hc, project, "services:\n  db:\n    image: x\n  app:\n    image: y\n"
                     "    environment:\n      URL: http://${DB_HOST:-db}:5432\n")
    assert dict(service(load(hc, project, result), "app").environment) == \
        {"URL": "http://127.0.0.1:5432"}
    assert "URL: http://${DB_HOST:-127.0.0.1}:5432" in result.text


# --- the same output for every hash seed ----------------------------------------------------------

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrate_corpus")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every folder of the repository that holds compose files: Docker Compose apps, the shipped
# examples (already specs: migrate must keep them valid), and the YAML reader's corpus (odd YAML,
# not always a valid spec: those results are only read back as YAML).
COMPOSE_FOLDERS = ("tests/migrate_corpus", "examples", "tests/yaml_corpus")
MIGRATE_EVERY_FILE = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
import hpc_compose
texts = {}
for base in sys.argv[3:]:
    for folder, _, names in sorted(os.walk(os.path.join(sys.argv[2], base))):
        for name in sorted(names):
            if not name.endswith((".yml", ".yaml")):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8-sig") as handle:
                text = handle.read()
            try:
                data = hpc_compose.parse_yaml(text)
            except hpc_compose.HpcComposeError:
                continue
            if isinstance(data, dict) and isinstance(data.get("services"), dict):
                texts[os.path.relpath(path, sys.argv[2])] = \
                    hpc_compose.migrate_compose(text, path).text
print(json.dumps(texts, sort_keys=True))
"""


def test_migrate_writes_the_same_file_for_every_hash_seed_and_it_reads_back(hc, tmp_path):
    import json
    import shutil
    import subprocess
    import sys
    copy = tmp_path / "repository"
    for folder in COMPOSE_FOLDERS:
        shutil.copytree(os.path.join(REPOSITORY, folder), str(copy / folder))
    outputs = {}
    for seed in (0, 1, 5, 7):
        done = subprocess.run([sys.executable, "-c", MIGRATE_EVERY_FILE, REPOSITORY, str(copy)]
                              + list(COMPOSE_FOLDERS),
                              env=dict(os.environ, PYTHONHASHSEED=str(seed)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        assert done.returncode == 0, done.stderr
        outputs[seed] = json.loads(done.stdout)
    texts = outputs[0]
    assert len([p for p in texts if p.startswith("tests/migrate_corpus/")]) == \
        len(os.listdir(CORPUS))
    assert len([p for p in texts if p.startswith("examples/")]) >= 15
    for seed, migrated in outputs.items():
        assert sorted(migrated) == sorted(texts)
        for path, text in migrated.items():
            assert text == texts[path], "PYTHONHASHSEED=%d changed %s" % (seed, path)
    for path, text in sorted(texts.items()):
        hc.parse_yaml_document(text, path)
        if path.startswith("tests/yaml_corpus/"):
            continue
        migrated = copy / (path + ".migrated.yaml")
        migrated.write_text(text, encoding="utf-8")
        try:
            hc.build_plan(hc.load_spec(str(migrated), environ=ENV), environ=ENV)
        except hc.HpcComposeError as exc:
            # The one way a migrated file may fail: a TODO migrate wrote and explained.
            assert "migrate left a TODO" in exc.message, (path, exc.format())


def test_variables_from_the_dockerfile_join_an_environment_list_ahead_of_added_keys(hc):
    path = os.path.join(CORPUS, "workdir-env-list", "docker-compose.yml")
    with open(path, encoding="utf-8") as handle:
        result = hc.migrate_compose(handle.read(), path)
    lines = result.text.splitlines()
    assert lines.index("      - GREETING=hello") == lines.index("      - MODE=dev") + 2
    assert lines.index("      - GREETING=hello") < lines.index("    working_dir: /code")


def test_a_copy_the_service_already_mounts_is_not_mounted_twice(hc, project):
    result = migrate(hc, project, "services:\n  web:\n    build: .\n    volumes:\n      - .:/code\n",
                     files={"Dockerfile": "FROM python:3.11-slim\nWORKDIR /code\nCOPY . /code\n"
                                          "CMD [\"python\", \"app.py\"]\n"})
    assert service(load(hc, project, result), "web").volumes == (".:/code",)


@pytest.mark.parametrize("test,url", [
    ('["CMD", "curl", "--fail", "localhost:9200/_cluster/health"]',
     "http://localhost:9200/_cluster/health"),
    ('["CMD-SHELL", "curl -f -o /dev/null 127.0.0.1:8080 || exit 1"]', "http://127.0.0.1:8080"),
    ('["CMD", "wget", "--spider", "-q", "localhost/ready"]', "http://localhost/ready"),
])
def test_a_curl_or_wget_healthcheck_without_a_scheme_becomes_http_readiness(hc, project, test,
                                                                           url):
    result = migrate(hc, project, "services:\n  es:\n    image: elasticsearch:8.13.0\n"
                                  "    healthcheck:\n      test: %s\n" % test)
    assert service(load(hc, project, result), "es").readiness.url == url


def test_a_string_command_of_options_becomes_arguments_for_the_entrypoint(hc, project):
    result = migrate(hc, project, "services:\n  db:\n    image: mysql:8\n"
                                  "    command: '--default-authentication-plugin=mysql_native_password'\n")
    execution = hc.build_plan(load(hc, project, result), environ=ENV).services[0].execution
    assert execution.argv == ("--default-authentication-plugin=mysql_native_password",)
    assert execution.use_image_entrypoint


def test_copy_to_the_workdir_copies_into_it_as_docker_does(hc, project):
    result = migrate(hc, project, "services:\n  web:\n    build: .\n",
                     files={"requirements.txt": "", "Dockerfile": (
                         "FROM python:3.11-slim\nWORKDIR /code\nCOPY requirements.txt /code\n"
                         "RUN pip install -r requirements.txt\nCMD [\"python\", \"app.py\"]\n")})
    commands = service(load(hc, project, result), "web").prepare.commands
    assert commands[0] == ("mkdir -p /code && cp -a /tmp/hpc-compose-build/requirements.txt "
                           "/code/")


# A key migrate adds into has no block of its own to add lines to when it is empty, null or in
# flow style: it is written again whole (before, `{}` or a second key after it did not parse).
@pytest.mark.parametrize("compose,check", [
    ("services:\n  app:\n    image: x\n    x-slurm: {}\n    deploy:\n      resources:\n"
     "        limits:\n          cpus: '2'\n",
     lambda spec: service(spec, "app").slurm.cpus_per_task == 2),
    ("services:\n  app:\n    image: x\n    x-slurm:\n    deploy:\n      resources:\n"
     "        limits:\n          cpus: '2'\n",
     lambda spec: service(spec, "app").slurm.cpus_per_task == 2),
    ("services:\n  app:\n    build: .\n    environment:\n",
     lambda spec: dict(service(spec, "app").environment) == {"A": "1"}),
    ("services:\n  app:\n    image: x\n    volumes:\n    build: .\n",
     lambda spec: service(spec, "app").volumes == ("./a.sh:/code/a.sh",)),
    ("services:\n  app:\n    ports: ['80:80']\n    deploy:\n      resources:\n        limits:\n"
     "          cpus: '2'\n    image: x\n", lambda spec: service(spec, "app").image == "x"),
])
def test_keys_added_to_an_empty_or_flow_value_are_written_whole(hc, project, compose, check):
    result = migrate(hc, project, compose, files={
        "Dockerfile": "FROM python:3.12\nWORKDIR /code\nENV A=1\nCOPY a.sh .\n"
                      "CMD [\"sh\", \"a.sh\"]\n", "a.sh": "true\n"},
        cache_dir="/shared/cache")
    assert check(load(hc, project, result)), result.text


def test_top_level_x_slurm_in_flow_style_gets_the_added_keys(hc, project):
    result = migrate(hc, project, "x-slurm: {}\nservices:\n  app:\n    image: x\n",
                     cache_dir="/shared/cache")
    assert load(hc, project, result).slurm.cache_dir == "/shared/cache"
