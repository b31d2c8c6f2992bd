"""The planner: launch order, images, execution forms, mounts, placement, cache dir, tokens."""
import json
import os

import pytest

ENV = {"HOME": "/home/tester", "USER": "tester"}


def make_plan(hc, project, text, env=None):
    environ = dict(ENV, **(env or {}))
    path = project.write("compose.yaml", text)
    return hc.build_plan(hc.load_spec(str(path), environ=environ), environ=environ)


def planned(plan, name):
    return next(s for s in plan.services if s.name == name)


def one_service(hc, project, body, top=""):
    plan = make_plan(hc, project, top + "services:\n  app:\n" + body)
    return planned(plan, "app")


# --- order -------------------------------------------------------------------------------------

def test_dependencies_launch_first_and_file_order_breaks_ties(hc, project):
    plan = make_plan(hc, project, """\
services:
  c:
    image: x
    depends_on: [a]
  a:
    image: x
  b:
    image: x
  d:
    image: x
    depends_on: [c, b]
""")
    assert [s.name for s in plan.services] == ["a", "c", "b", "d"]


def test_dependents_are_listed_in_launch_order(hc, project):
    plan = make_plan(hc, project, "services:\n  db:\n    image: x\n  web:\n    image: x\n"
                                  "    depends_on: [db]\n  job:\n    image: x\n"
                                  "    depends_on: [db, web]\n")
    assert planned(plan, "db").dependents == ("web", "job")
    assert planned(plan, "web").dependents == ("job",)
    assert planned(plan, "job").dependents == ()
    assert planned(plan, "job").depends_on == (hc.Dependency("db", "service_started"),
                                               hc.Dependency("web", "service_started"))


def test_plan_is_deterministic(hc, project):
    text = "services:\n  b:\n    image: x\n    depends_on: [a]\n  a:\n    image: y\n"
    assert make_plan(hc, project, text) == make_plan(hc, project, text)


# --- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image,reference,registry", [
    ("redis:7", "docker://redis:7", "docker.io"),
    ("library/redis", "docker://library/redis", "docker.io"),
    ("ghcr.io/org/app:1.0", "docker://ghcr.io/org/app:1.0", "ghcr.io"),
    ("localhost:5000/app", "docker://localhost:5000/app", "localhost:5000"),
    ("docker://nvcr.io/nvidia/pytorch:24.01-py3", "docker://nvcr.io/nvidia/pytorch:24.01-py3",
     "nvcr.io"),
    ("docker://nvcr.io#nvidia/pytorch:24.01-py3", "docker://nvcr.io#nvidia/pytorch:24.01-py3",
     "nvcr.io"),
    ("docker://user@nvcr.io#nvidia/pytorch", "docker://user@nvcr.io#nvidia/pytorch", "nvcr.io"),
    ("dockerd://app:dev", "dockerd://app:dev", None),
    ("podman://app:dev", "podman://app:dev", None),
])
def test_remote_image_normalization(hc, project, image, reference, registry):
    service = one_service(hc, project, "    image: \"%s\"\n" % image)
    assert service.image == hc.ImageRef("remote", reference, registry, image)


def test_relative_local_image_resolves_against_the_compose_folder(hc, project):
    service = one_service(hc, project, "    image: ./images/app.sqsh\n")
    assert service.image == hc.ImageRef("local", str(project.root / "images" / "app.sqsh"), None,
                                        "./images/app.sqsh")


def test_home_local_image_is_expanded(hc, project):
    service = one_service(hc, project, "    image: ~/img/app.squashfs\n")
    assert service.image.reference == "/home/tester/img/app.squashfs"
    assert service.image.kind == "local"


def test_bare_local_image_name_is_local(hc, project):
    assert one_service(hc, project, "    image: app.sqsh\n").image.reference == \
        str(project.root / "app.sqsh")


def test_host_runtime_has_no_image(hc, project):
    service = one_service(hc, project, "    command: [hostname]\n    x-slurm:\n"
                                       "      runtime: host\n")
    assert service.image.kind == "none"
    assert service.runtime == "host"


# --- execution ---------------------------------------------------------------------------------

def test_no_command_runs_the_image_default(hc, project):
    execution = one_service(hc, project, "    image: x\n").execution
    assert execution == hc.Execution("default", use_image_entrypoint=True)


def test_string_command_alone_is_shell_form_after_the_image_entrypoint(hc, project):
    execution = one_service(hc, project, "    image: x\n    command: echo $HOME\n").execution
    assert execution == hc.Execution("shell", script="echo $HOME", use_image_entrypoint=True)


def test_string_entrypoint_and_command_join_with_one_space(hc, project):
    execution = one_service(hc, project, "    image: x\n    entrypoint: python -u\n"
                                         "    command: main.py --x\n").execution
    assert execution == hc.Execution("shell", script="python -u main.py --x",
                                     use_image_entrypoint=False)


def test_list_entrypoint_then_command_items(hc, project):
    execution = one_service(hc, project, "    image: x\n    entrypoint: [python, -u]\n"
                                         "    command: [main.py, --x]\n").execution
    assert execution == hc.Execution("exec", argv=("python", "-u", "main.py", "--x"),
                                     use_image_entrypoint=False)


def test_list_command_alone_keeps_the_image_entrypoint(hc, project):
    execution = one_service(hc, project, "    image: x\n    command: [--port, \"80\"]\n").execution
    assert execution == hc.Execution("exec", argv=("--port", "80"), use_image_entrypoint=True)


def test_host_runtime_relative_working_dir_resolves_against_compose_folder(hc, project):
    service = one_service(hc, project, "    command: [ls]\n    working_dir: ./data\n"
                                       "    x-slurm:\n      runtime: host\n")
    assert service.working_dir == str(project.root / "data")


def test_container_working_dir_is_kept(hc, project):
    service = one_service(hc, project, "    image: x\n    command: [ls]\n    working_dir: /w\n")
    assert service.working_dir == "/w"


# --- mounts and environment --------------------------------------------------------------------

def test_mounts_are_resolved(hc, project):
    service = one_service(hc, project, "    image: x\n    volumes:\n      - ./src:/workspace\n"
                                       "      - ~/models:/models:ro\n      - /data/../shared:/d\n")
    assert service.mounts == (
        hc.Mount(str(project.root / "src"), "/workspace", None),
        hc.Mount("/home/tester/models", "/models", "ro"),
        hc.Mount("/shared", "/d", None))


def test_prepare_block_is_planned_with_resolved_mounts(hc, project):
    service = one_service(hc, project, """\
    image: x
    x-enroot:
      prepare:
        commands: [pip install -r /tmp/req.txt]
        mounts: [./requirements.txt:/tmp/req.txt]
        env: [A=1]
        root: false
""")
    assert service.prepare == hc.PreparePlan(
        ("pip install -r /tmp/req.txt",),
        (hc.Mount(str(project.root / "requirements.txt"), "/tmp/req.txt", None),),
        (("A", "1"),), False)


def test_environment_pairs_reach_the_plan(hc, project):
    service = one_service(hc, project, "    image: x\n    environment:\n      B: 2\n      A: $USER\n")
    assert service.environment == (("B", "2"), ("A", "tester"))


# --- failure policy ----------------------------------------------------------------------------

def test_failure_policy_defaults_in_plan(hc, project):
    service = one_service(hc, project, "    image: x\n    x-slurm:\n      failure_policy:\n"
                                       "        mode: restart_on_failure\n        max_restarts: 7\n")
    assert service.failure_policy == hc.FailurePolicy("restart_on_failure", 7, 5)


def test_default_failure_policy_is_fail_job(hc, project):
    assert one_service(hc, project, "    image: x\n").failure_policy == hc.FailurePolicy("fail_job")


# --- placement ---------------------------------------------------------------------------------

def test_single_node_service_runs_one_task_by_default(hc, project):
    service = one_service(hc, project, "    image: x\n")
    assert service.placement == hc.Placement("single", 1, 1, None)


def test_single_node_service_task_geometry_from_service(hc, project):
    service = one_service(hc, project, "    image: x\n    x-slurm:\n      ntasks_per_node: 4\n")
    assert service.placement == hc.Placement("single", 1, None, 4)


def test_only_service_of_multi_node_job_is_distributed(hc, project):
    service = one_service(hc, project, "    image: x\n", top="x-slurm:\n  nodes: 3\n")
    assert service.placement == hc.Placement("distributed", 3, None, 1)


def test_distributed_service_inherits_top_level_tasks(hc, project):
    service = one_service(hc, project, "    image: x\n",
                          top="x-slurm:\n  nodes: 2\n  ntasks: 8\n  ntasks_per_node: 4\n")
    assert service.placement == hc.Placement("distributed", 2, 8, 4)


def test_helpers_are_pinned_to_the_primary_node(hc, project):
    plan = make_plan(hc, project, """\
x-slurm:
  nodes: 2
services:
  store:
    image: redis:7
  trainer:
    image: x
    x-slurm:
      nodes: 2
      ntasks_per_node: 4
""")
    assert planned(plan, "store").placement == hc.Placement("primary", 1, 1, None)
    assert planned(plan, "trainer").placement == hc.Placement("distributed", 2, None, 4)
    assert plan.nodes == 2


def test_distributed_service_may_use_a_non_local_readiness_host(hc, project):
    service = one_service(hc, project, "    image: x\n    readiness:\n      type: tcp\n"
                                       "      host: node001\n      port: 29500\n",
                          top="x-slurm:\n  nodes: 2\n")
    assert service.placement.mode == "distributed"


# --- job-level values --------------------------------------------------------------------------

def test_cache_dir_defaults_under_home(hc, project):
    plan = make_plan(hc, project, "services:\n  app:\n    image: x\n")
    assert plan.cache_dir == "/home/tester/.cache/hpc-compose"


def test_relative_cache_dir_resolves_against_compose_folder(hc, project):
    # The test folder itself lives under /tmp, which cache_dir refuses: plan a moved copy.
    path = project.write("compose.yaml", "services:\n  app:\n    image: x\n")
    spec = hc.load_spec(str(path), environ=ENV)
    spec = spec._replace(project_dir="/shared/project",
                         slurm=spec.slurm._replace(cache_dir="cache"))
    plan = hc.build_plan(spec, environ=ENV)
    assert plan.cache_dir == "/shared/project/cache"


def test_home_cache_dir_is_expanded(hc, project):
    plan = make_plan(hc, project, "x-slurm:\n  cache_dir: ~/cache\nservices:\n  app:\n"
                                  "    image: x\n")
    assert plan.cache_dir == "/home/tester/cache"


def test_relative_cache_dir_in_a_tmp_project_is_rejected(hc):
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(dir="/tmp")
    try:
        path = os.path.join(folder, "compose.yaml")
        with open(path, "w") as handle:
            handle.write("x-slurm:\n  cache_dir: cache\nservices:\n  app:\n    image: x\n")
        with pytest.raises(hc.SpecError) as info:
            hc.load_spec(path, environ=ENV)
        assert "under /tmp" in info.value.message
        assert info.value.path == "x-slurm.cache_dir"
    finally:
        shutil.rmtree(folder)


def test_cache_dir_without_home_falls_back_to_compose_folder(hc, project):
    path = project.write("compose.yaml", "services:\n  app:\n    image: x\n")
    spec = hc.load_spec(str(path), environ={})
    assert hc.build_plan(spec, environ={}).cache_dir == \
        os.path.join(str(project.root), ".cache", "hpc-compose")


@pytest.mark.parametrize("top,expected", [
    ("name: n\nx-slurm:\n  job_name: j\n", "j"),
    ("name: n\n", "n"),
    ("", "hpc-compose"),
])
def test_job_name_chain(hc, project, top, expected):
    assert make_plan(hc, project, top + "services:\n  app:\n    image: x\n").job_name == expected


def test_plan_runtime_and_file_fields(hc, project):
    plan = make_plan(hc, project, "x-slurm:\n  runtime: host\nservices:\n  app:\n"
                                  "    command: [true]\n")
    assert plan.runtime == "host"
    assert plan.compose_file == str(project.root / "compose.yaml")
    assert plan.project_dir == str(project.root)


def test_service_resources_reach_the_plan(hc, project):
    service = one_service(hc, project, "    image: x\n    x-slurm:\n      cpus_per_task: 2\n"
                                       "      gpus: 1\n      gres: gpu:a100:1\n"
                                       "      extra_srun_args: [--exclusive]\n",
                          top="")
    assert (service.cpus_per_task, service.gpus, service.gres) == (2, 1, "gpu:a100:1")


def test_extra_srun_args_are_interpolated(hc, project):
    path = project.write("compose.yaml", "services:\n  app:\n    image: x\n    x-slurm:\n"
                                         "      extra_srun_args: [\"--mpi=$MPI\"]\n")
    environ = dict(ENV, MPI="pmix")
    plan = hc.build_plan(hc.load_spec(str(path), environ=environ), environ=environ)
    assert plan.services[0].extra_srun_args == ("--mpi=pmix",)


def test_plan_to_dict_is_json_ready(hc, project):
    plan = make_plan(hc, project, "services:\n  app:\n    image: redis:7\n    readiness:\n"
                                  "      type: tcp\n      port: 6379\n")
    data = json.loads(json.dumps(hc.plan_to_dict(plan)))
    assert data["service_order"] == ["app"]
    assert data["services"][0]["image"]["reference"] == "docker://redis:7"
    assert data["services"][0]["readiness"] == {"type": "tcp", "host": "127.0.0.1",
                                                "port": 6379, "timeout_seconds": 60}


# --- service tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,token", [
    ("app", "app"),
    ("my-app_1", "my-app_1"),
    ("my.app", "my_x2e_app"),
    ("my_x2e_app", "my_x5f_x2e_app"),
    ("a_x2e", "a_x2e"),
    ("a_x2e.", "a_x5f_x2e_x2e_"),
    ("a_xzz_b", "a_xzz_b"),
    ("a_xAB_b", "a_xAB_b"),
    ("v1.2.3", "v1_x2e_2_x2e_3"),
    ("caf\u00e9", "caf_xc3__xa9_"),
])
def test_service_token(hc, name, token):
    assert hc.service_token(name) == token


def decode_token(token):
    import re
    out = bytearray()
    pos = 0
    while pos < len(token):
        match = re.match(r"_x([0-9a-f]{2})_", token[pos:])
        if match:
            out.append(int(match.group(1), 16))
            pos += 5
        else:
            out.extend(token[pos].encode())
            pos += 1
    return out.decode("utf-8")


def test_service_tokens_decode_back_to_the_name(hc):
    names = ["my.app", "my_x2e_app", "my_x2e.app", "_x2e_", "_x2e", "x_x5f_", "a.b_c.d", "__",
             "_x41__x42_", "a_x2e_.b", "1.0", "a-b.c_d", "_xAB_.", "_xab_"]
    for name in names:
        token = hc.service_token(name)
        assert decode_token(token) == name, (name, token)
        assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                 "0123456789_-")
    assert len(set(hc.service_token(n) for n in names)) == len(names)
