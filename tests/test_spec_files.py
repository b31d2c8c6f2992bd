"""Compose habits in the spec: several files merged, !reset/!override, env_file, profiles, and
every error of a file reported at once."""
import pytest

ENV = {"HOME": "/home/tester", "USER": "tester"}

BASE = """\
x-slurm:
  time: "00:10:00"
  setup: [echo base]
  cache_dir: /shared/cache
services:
  db:
    image: redis:7
    command: redis-server
  app:
    image: python:3.11-slim
    command: [python, -m, app]
    environment:
      - A=1
      - B=2
    volumes:
      - ./data:/data
      - ./src:/src:ro
    depends_on: [db]
"""


def load(hc, project, files, env=None, **options):
    environ = dict(ENV, **(env or {}))
    paths = [str(project.write(name, text)) for name, text in files]
    return hc.load_spec(paths, environ=environ, **options)


def service(spec, name="app"):
    return next(s for s in spec.services if s.name == name)


def errors(hc, project, files, env=None):
    with pytest.raises(hc.SpecError) as info:
        load(hc, project, files, env)
    return list(getattr(info.value, "errors", (info.value,)))


# --- merging -------------------------------------------------------------------------------------

def test_an_override_without_image_merges_onto_the_base(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE),
                              ("override.yaml", "services:\n  app:\n    working_dir: /src\n")])
    app = service(spec)
    assert (app.image, app.working_dir) == ("python:3.11-slim", "/src")
    assert spec.files == (str(project.root / "compose.yaml"), str(project.root / "override.yaml"))


def test_command_and_entrypoint_are_replaced_not_appended(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  app:\n    command: "
                                                                 "[python, other.py]\n")])
    assert service(spec).command == ("python", "other.py")


def test_environment_merges_by_variable_across_list_and_mapping_forms(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  app:\n"
                                                                 "    environment:\n      B: two\n"
                                                                 "      C: three\n")])
    assert service(spec).environment == (("A", "1"), ("B", "two"), ("C", "three"))


def test_volumes_merge_by_container_path(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  app:\n"
                                                                 "    volumes:\n"
                                                                 "      - ./other:/src\n"
                                                                 "      - ./cache:/cache\n")])
    assert service(spec).volumes == ("./data:/data", "./other:/src", "./cache:/cache")


def test_depends_on_merges_by_service(hc, project):
    base = BASE + "  worker:\n    image: python:3.11-slim\n"
    spec = load(hc, project, [("compose.yaml", base), ("o.yaml", "services:\n  app:\n"
                                                                 "    depends_on:\n      worker:\n"
                                                                 "        condition: service_started"
                                                                 "\n")])
    assert service(spec).depends_on == (("db", "service_started"), ("worker", "service_started"))


def test_x_slurm_merges_key_by_key_and_sequences_append(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "x-slurm:\n  partition: gpu\n"
                                                                 "  setup: [echo override]\n")])
    assert (spec.slurm.time, spec.slurm.partition) == ("00:10:00", "gpu")
    assert spec.slurm.setup == ("echo base", "echo override")


def test_a_service_only_in_the_override_is_added(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  extra:\n"
                                                                 "    image: alpine\n")])
    assert [s.name for s in spec.services] == ["db", "app", "extra"]


def test_reset_removes_the_attribute(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  app:\n"
                                                                 "    depends_on: !reset []\n"
                                                                 "    volumes: !reset\n")])
    assert (service(spec).depends_on, service(spec).volumes) == ((), ())


def test_override_replaces_instead_of_merging(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE), ("o.yaml", "services:\n  app:\n"
                                                                 "    environment: !override\n"
                                                                 "      C: only\n"
                                                                 "    volumes: !override "
                                                                 "[./x:/x]\n")])
    assert service(spec).environment == (("C", "only"),)
    assert service(spec).volumes == ("./x:/x",)


def test_reset_in_a_single_file_removes_the_key(hc, project):
    spec = load(hc, project, [("compose.yaml", BASE.replace("depends_on: [db]",
                                                            "depends_on: !reset [db]"))])
    assert service(spec).depends_on == ()


def test_an_error_in_the_override_names_the_override_file_and_its_line(hc, project):
    found = errors(hc, project, [("compose.yaml", BASE),
                                 ("o.yaml", "services:\n  app:\n    working_dir: relative\n")])
    assert [(e.file, e.line, e.column, e.path) for e in found] == [
        (str(project.root / "o.yaml"), 3, 18, "services.app.working_dir")]


def test_an_error_in_the_base_still_names_the_base_file(hc, project):
    found = errors(hc, project, [("compose.yaml", BASE.replace("redis:7", "http://x/y")),
                                 ("o.yaml", "services:\n  app:\n    working_dir: /src\n")])
    assert [(e.file, e.line, e.path) for e in found] == [
        (str(project.root / "compose.yaml"), 7, "services.db.image")]


def test_relative_paths_resolve_against_the_first_files_directory(hc, project):
    files = [("compose.yaml", BASE), ("sub/o.yaml", "services:\n  app:\n    volumes: "
                                                    "[./more:/more]\n")]
    spec = load(hc, project, files)
    plan = hc.build_plan(spec, environ=ENV)
    app = next(s for s in plan.services if s.name == "app")
    assert str(project.root / "more") in [m.host for m in app.mounts]
    assert spec.project_dir == str(project.root)


def test_an_empty_override_file_is_an_error_naming_it(hc, project):
    found = errors(hc, project, [("compose.yaml", BASE), ("o.yaml", "# nothing\n")])
    assert (found[0].file, found[0].message) == (str(project.root / "o.yaml"),
                                                 "the compose file is empty")


# --- every error at once -------------------------------------------------------------------------

MANY = """\
services:
  app:
    image: python:3.11-slim
    imgae: typo
    working_dir: relative
    command: [python]
    x-slurm:
      nodes: zero
  db:
    command: [redis-server]
  web:
    image: nginx
    depends_on: [missing, app]
x-slurm:
  time: 5
  submit_args: not-a-list
"""


def test_every_independent_error_is_reported_sorted_by_position(hc, project):
    found = errors(hc, project, [("compose.yaml", MANY)])
    assert [(e.line, e.path) for e in found] == [
        (4, "services.app.imgae"), (5, "services.app.working_dir"),
        (8, "services.app.x-slurm.nodes"), (9, "services.db"),
        (13, "services.web.depends_on.missing"), (16, "x-slurm.submit_args")]


def test_the_report_ends_with_a_count_line(hc, project):
    with pytest.raises(hc.SpecErrors) as info:
        load(hc, project, [("compose.yaml", MANY)])
    text = info.value.format()
    assert text.splitlines()[-1] == "6 errors in %s" % (project.root / "compose.yaml")
    assert text.count("compose.yaml:") == 6
    # The first error's fields are the aggregate's, so a caller reading one error still can.
    assert (info.value.line, info.value.path) == (4, "services.app.imgae")


def test_a_misspelt_key_does_not_also_report_the_key_as_missing(hc, project):
    found = errors(hc, project, [("compose.yaml", "services:\n  app:\n    imgae: redis\n")])
    assert [e.message for e in found] == ["unknown key 'imgae' in service 'app'"]


def test_a_dependency_on_a_service_in_error_is_not_reported_again(hc, project):
    text = "services:\n  a:\n    image: 'x y'\n  b:\n    image: redis\n    depends_on: [a]\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [e.path for e in found] == ["services.a.image"]


def test_a_bad_x_slurm_value_is_one_error_and_services_are_still_checked(hc, project):
    text = "x-slurm:\n  nodes: -1\nservices:\n  app:\n    image: 'a b'\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [e.path for e in found] == ["x-slurm.nodes", "services.app.image"]


@pytest.mark.parametrize("field, value, path", [
    ("image", '"./x\\0.sqsh"', "services.app.image"),
    ("command", '"run\\0"', "services.app.command"),
    ("volumes", '["/a\\0b:/c"]', "services.app.volumes[0]"),
    ("environment", '["A=\\0"]', "services.app.environment[0]"),
    ("environment", '{A: "\\0"}', "services.app.environment.A"),
    ("env_file", '"e\\0"', "services.app.env_file"),
])
def test_a_nul_byte_in_a_value_is_a_located_error(hc, project, field, value, path):
    text = "services:\n  app:\n    image: redis\n    %s: %s\n" % (field, value)
    if field == "image":
        text = "services:\n  app:\n    %s: %s\n" % (field, value)
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.path, e.message) for e in found] == [(path, "the value contains a NUL byte")]


def test_a_nul_byte_in_cache_dir_is_a_located_error_not_a_crash(hc, project):
    text = 'x-slurm:\n  cache_dir: "/c\\0"\nservices:\n  app:\n    image: redis\n'
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.line, e.path) for e in found] == [(2, "x-slurm.cache_dir")]


# --- env_file ------------------------------------------------------------------------------------

def test_env_file_string_list_and_long_form(hc, project):
    project.write("a.env", "A=from-a\nB=from-a\n")
    project.write("b.env", "B=from-b\nQ='$LITERAL'\nI=${USER}-x\n")
    text = ("services:\n  app:\n    image: redis\n    env_file:\n      - a.env\n"
            "      - path: b.env\n      - path: missing.env\n        required: false\n")
    app = service(load(hc, project, [("compose.yaml", text)]))
    assert dict(app.environment) == {"A": "from-a", "B": "from-b", "Q": "$LITERAL",
                                     "I": "tester-x"}


def test_environment_wins_over_env_file(hc, project):
    project.write("app.env", "A=file\nB=file\n")
    text = ("services:\n  app:\n    image: redis\n    env_file: app.env\n"
            "    environment:\n      B: explicit\n")
    assert service(load(hc, project, [("compose.yaml", text)])).environment == (
        ("A", "file"), ("B", "explicit"))


def test_env_file_raw_format_is_literal(hc, project):
    project.write("raw.env", "A=\"${USER}\" # kept\n")
    text = "services:\n  app:\n    image: redis\n    env_file: [{path: raw.env, format: raw}]\n"
    assert service(load(hc, project, [("compose.yaml", text)])).environment == (
        ("A", "\"${USER}\" # kept"),)


def test_a_missing_required_env_file_is_a_located_error(hc, project):
    text = "services:\n  app:\n    image: redis\n    env_file: [nope.env]\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.line, e.path) for e in found] == [(4, "services.app.env_file[0]")]
    assert "does not exist" in found[0].message


def test_an_unset_variable_in_an_env_file_names_that_file_and_line(hc, project):
    project.write("app.env", "# first\nA=${NOT_SET}\n")
    text = "services:\n  app:\n    image: redis\n    env_file: app.env\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.file, e.line) for e in found] == [(str(project.root / "app.env"), 2)]


def test_env_files_replace_the_project_dotenv(hc, project):
    project.write(".env", "TAG=from-dotenv\n")
    first = project.write("one.env", "TAG=one\n")
    second = project.write("two.env", "TAG=two\n")
    text = "services:\n  app:\n    image: redis:${TAG}\n"
    assert service(load(hc, project, [("compose.yaml", text)])).image == "redis:from-dotenv"
    spec = load(hc, project, [("compose.yaml", text)], env_files=[str(first), str(second)])
    assert service(spec).image == "redis:two"


# --- profiles ------------------------------------------------------------------------------------

PROFILED = """\
services:
  app:
    image: redis
  debug:
    image: alpine
    profiles: [debug]
  tool:
    image: alpine
    profiles: [tools, debug]
    depends_on: [helper]
  helper:
    image: alpine
    profiles: [tools]
"""


def names(spec):
    return [s.name for s in spec.services]


def test_services_without_profiles_always_run(hc, project):
    spec = load(hc, project, [("compose.yaml", PROFILED)])
    assert names(spec) == ["app"]
    assert spec.profiles == ("debug", "tools")


def test_a_profile_activates_its_services(hc, project):
    assert names(load(hc, project, [("compose.yaml", PROFILED)], profiles=["tools"])) == [
        "app", "tool", "helper"]


def test_compose_profiles_comes_from_the_environment(hc, project):
    spec = load(hc, project, [("compose.yaml", PROFILED)], env={"COMPOSE_PROFILES": "tools"})
    assert names(spec) == ["app", "tool", "helper"]


def test_a_named_service_runs_with_its_dependencies_whatever_their_profiles(hc, project):
    assert names(load(hc, project, [("compose.yaml", PROFILED)], services=["tool"])) == [
        "tool", "helper"]


def test_depending_on_a_disabled_service_is_an_error(hc, project):
    with pytest.raises(hc.SpecError) as info:
        load(hc, project, [("compose.yaml", PROFILED)], profiles=["debug"])
    assert "'tool' depends on 'helper', which is not enabled" in info.value.message
    assert "--profile tools" in info.value.hint


def test_naming_an_unknown_service_is_a_usage_error(hc, project):
    with pytest.raises(hc.UsageError):
        load(hc, project, [("compose.yaml", PROFILED)], services=["nope"])


def test_an_invalid_profile_name_is_a_located_error(hc, project):
    text = "services:\n  app:\n    image: redis\n    profiles: ['-bad']\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.line, e.path) for e in found] == [(4, "services.app.profiles[0]")]


# --- extends -------------------------------------------------------------------------------------

EXTENDING = """\
services:
  base:
    image: python:3.11-slim
    command: [python, base.py]
    environment: {A: "1", B: "2"}
    volumes: ["./a:/a", "./b:/b"]
    depends_on: [db]
  db:
    image: redis
  app:
    extends: base
    environment: {B: two}
    volumes: ["./other:/b"]
"""


def test_extends_merges_the_base_service_under_the_local_one(hc, project):
    app = service(load(hc, project, [("compose.yaml", EXTENDING)]))
    assert (app.image, app.command) == ("python:3.11-slim", ("python", "base.py"))
    assert app.environment == (("A", "1"), ("B", "two"))
    assert app.volumes == ("./a:/a", "./other:/b")


def test_extends_does_not_inherit_depends_on(hc, project):
    spec = load(hc, project, [("compose.yaml", EXTENDING)])
    assert (service(spec, "base").depends_on, service(spec).depends_on) == (
        (("db", "service_started"),), ())


def test_extends_from_another_file_is_recursive_and_relative_to_the_declaring_file(hc, project):
    project.write("lib/common.yaml", "services:\n  root:\n    image: alpine\n"
                                     "    command: [sh, -c, root]\n  common:\n"
                                     "    extends: {service: root}\n    environment: [Z=z]\n")
    text = ("services:\n  app:\n    extends:\n      service: common\n      file: "
            "lib/common.yaml\n    environment: {C: '3'}\n")
    app = service(load(hc, project, [("compose.yaml", text)]))
    assert (app.image, app.command, app.environment) == (
        "alpine", ("sh", "-c", "root"), (("Z", "z"), ("C", "3")))


def test_an_error_in_an_extended_file_names_that_file(hc, project):
    project.write("lib/common.yaml", "services:\n  common:\n    image: alpine\n"
                                     "    working_dir: relative\n    command: [x]\n")
    text = "services:\n  app:\n    extends: {service: common, file: lib/common.yaml}\n"
    found = errors(hc, project, [("compose.yaml", text)])
    assert [(e.file, e.line, e.path) for e in found] == [
        (str(project.root / "lib" / "common.yaml"), 4, "services.app.working_dir")]


def test_an_extends_cycle_is_an_error_naming_the_chain(hc, project):
    text = ("services:\n  a:\n    image: x\n    extends: b\n  b:\n    extends: c\n"
            "  c:\n    extends: a\n")
    found = errors(hc, project, [("compose.yaml", text)])
    assert found[0].message == "extends cycle: a -> b -> c -> a"
    assert (found[0].line, found[0].path) == (8, "services.c.extends")


@pytest.mark.parametrize("extends, message", [
    ("nope", "extends names service 'nope', which"),
    ("{service: base, file: missing.yaml}", "extends.file"),
    ("{service: base, files: x}", "unknown key 'files' in extends"),
    ("[base]", "extends needs the name of a service"),
])
def test_extends_mistakes_are_located_errors(hc, project, extends, message):
    text = "services:\n  base:\n    image: x\n  app:\n    extends: %s\n" % extends
    found = errors(hc, project, [("compose.yaml", text)])
    assert message in found[0].message
    assert found[0].line == 5


def test_a_planner_error_about_a_service_of_the_override_names_the_override(hc, project):
    files = [("compose.yaml", BASE), ("o.yaml", "services:\n  extra:\n    image: ./missing.sqsh\n"
                                                "    depends_on: [extra2]\n  extra2:\n"
                                                "    image: redis\n    depends_on: [extra]\n")]
    with pytest.raises(hc.SpecError) as info:
        hc.build_plan(load(hc, project, files), environ=ENV)
    assert (info.value.file, info.value.line) == (str(project.root / "o.yaml"), 2)
    assert info.value.message == "dependency cycle: extra -> extra2 -> extra"


def test_each_x_slurm_value_is_its_own_error(hc, project):
    text = ("x-slurm:\n  nodes: zero\n  time: [1]\n  setup: not-a-list\nservices:\n  app:\n"
            "    image: redis\n    x-slurm:\n      gpus: none\n      failure_policy: {mode: x}\n")
    found = errors(hc, project, [("compose.yaml", text)])
    assert [e.path for e in found] == [
        "x-slurm.nodes", "x-slurm.time", "x-slurm.setup", "services.app.x-slurm.gpus",
        "services.app.x-slurm.failure_policy.mode"]


def test_a_bad_runtime_does_not_also_ask_for_an_image(hc, project):
    for text in ("x-slurm:\n  runtime: hots\nservices:\n  app:\n    command: [run]\n",
                 "services:\n  app:\n    command: [run]\n    x-slurm:\n      runtime: hots\n"):
        found = errors(hc, project, [("compose.yaml", text)])
        assert [e.message for e in found] == ["'hots' is not one of pyxis, apptainer, singularity, host"]


# --- secrets and long-syntax volumes in the same report --------------------------------------------

SECRETS_AND_VOLUMES = """\
secrets:
  good:
    environment: GOOD
  unset:
    environment: NOT_SET
  inline:
    content: abc
services:
  app:
    image: redis:7
    secrets:
      - good
      - unset
      - missing
      - source: good
        uid: "0"
    volumes:
      - type: volume
        source: data
        target: /data
      - {type: bind, source: ./ok, target: /ok}
      - relative:/x
"""


def test_secret_and_volume_errors_are_all_reported_at_once(hc, project):
    found = errors(hc, project, [("compose.yaml", SECRETS_AND_VOLUMES)], env={"GOOD": "x"})
    assert [(e.line, e.path) for e in found] == [
        (5, "secrets.unset.environment"), (7, "secrets.inline.content"),
        (14, "services.app.secrets[2]"), (16, "services.app.secrets[3].uid"),
        (18, "services.app.volumes[0].type"), (22, "services.app.volumes[2]")]


def test_a_service_naming_a_secret_in_error_is_not_reported_again(hc, project):
    found = errors(hc, project, [("compose.yaml", SECRETS_AND_VOLUMES)], env={"GOOD": "x"})
    assert not any(e.path == "services.app.secrets[1]" for e in found)


def test_a_long_syntax_bind_volume_merges_by_target_with_a_short_one(hc, project):
    override = ("services:\n  app:\n    volumes:\n"
                "      - {type: bind, source: ./other, target: /data, read_only: true}\n")
    spec = load(hc, project, [("compose.yaml", BASE), ("override.yaml", override)])
    assert service(spec).volumes == ("./other:/data:ro", "./src:/src:ro")


def test_an_env_file_value_holding_a_secret_is_refused_at_its_entry(hc, project):
    project.write("app.env", "TOKEN=a-long-secret-value\n")
    text = ("secrets:\n  token:\n    environment: TOKEN\nservices:\n  app:\n    image: redis:7\n"
            "    env_file: app.env\n    secrets: [token]\n")
    found = errors(hc, project, [("compose.yaml", text)], env={"TOKEN": "a-long-secret-value"})
    assert [(e.path, "secret 'token'" in e.message) for e in found] == \
        [("services.app.env_file", True)]


def test_service_secrets_merge_by_target(hc, project):
    project.write("a.txt", "first-value-1234\n")
    project.write("b.txt", "second-value-5678\n")
    base = ("secrets:\n  a:\n    file: a.txt\n  b:\n    file: b.txt\nservices:\n  app:\n"
            "    image: redis:7\n    secrets: [a, {source: b, target: token}]\n")
    override = "services:\n  app:\n    secrets:\n      - {source: a, target: token}\n      - b\n"
    spec = load(hc, project, [("compose.yaml", base), ("override.yaml", override)])
    assert [(s.source, s.target) for s in service(spec).secrets] == \
        [("a", "a"), ("a", "token"), ("b", "b")]


SIGNAL_MISTAKES = """\
x-slurm:
  time: "01:00:00"
  resume: {path: relative}
  requeue: sometimes
  signal: {name: TERM, before: soon, on_signal: requeue}
  dependency: afterbad:1
  array: 5-1
services:
  app:
    image: redis:7
    x-slurm:
      signal: {name: KILL}
"""


def test_signal_requeue_dependency_and_array_errors_are_all_reported_at_once(hc, project):
    found = errors(hc, project, [("compose.yaml", SIGNAL_MISTAKES)])
    assert [(e.line, e.path) for e in found] == [
        (3, "x-slurm.resume.path"), (4, "x-slurm.requeue"), (5, "x-slurm.signal.name"),
        (5, "x-slurm.signal.before"), (6, "x-slurm.dependency"), (7, "x-slurm.array"),
        (12, "services.app.x-slurm.signal.name")]
    # The resume and requeue in error are not asked for again by on_signal: requeue.
    assert not any(e.path == "x-slurm.signal.on_signal" for e in found)
