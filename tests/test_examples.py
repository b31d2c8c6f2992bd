"""The shipped examples: each one validates and renders, and its embedded code is well-formed."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import hpc_compose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
NAMES = sorted(name[:-5] for name in os.listdir(EXAMPLES) if name.endswith(".yaml"))
ENV = {"USER": "tester", "HOME": os.environ.get("HOME", "/root")}

# Every example the manual's Examples page and Runbook list, plus the two added by this project.
MANUAL_EXAMPLES = [
    "minimal-batch", "app-redis-worker", "dev-python-app", "llm-curl-workflow",
    "llm-curl-workflow-workdir", "llama-app", "llama-uv-worker", "multi-node-mpi",
    "multi-node-torchrun", "training-checkpoints", "training-resume", "postgres-etl",
    "vllm-openai", "vllm-uv-worker", "mpi-hello", "multi-stage-pipeline", "fairseq-preprocess",
    "restart-policy",
]
COMPANION_NOTES = ["llm-curl/README.md", "llama-uv-worker/README.md",
                   "vllm-uv-worker/README.md", "models/README.md"]


def load(name):
    with open(os.path.join(EXAMPLES, name + ".yaml")) as handle:
        return hpc_compose.parse_yaml(handle.read())


def commands_of(document):
    """(where, form, value) for every command, entrypoint and prepare command of an example."""
    found = []
    for service_name, service in document["services"].items():
        for key in ("entrypoint", "command"):
            if key in service:
                found.append(("%s.%s" % (service_name, key), service[key]))
        prepare = service.get("x-enroot", {}).get("prepare", {})
        for index, line in enumerate(prepare.get("commands", [])):
            found.append(("%s.x-enroot.prepare.commands[%d]" % (service_name, index), line))
    return found


# The HPC patterns around one job (signal + requeue + resume, arrays), runnable on the test cluster.
PATTERN_EXAMPLES = ["long-training", "parameter-sweep", "sweep-grid"]
# A heterogeneous job (x-slurm.groups): a GPU server and CPU services.
HETEROGENEOUS_EXAMPLES = ["gpu-server-cpu-services"]


def test_every_manual_example_and_host_pipeline_is_shipped():
    assert sorted(MANUAL_EXAMPLES + ["host-pipeline"] + PATTERN_EXAMPLES
                  + HETEROGENEOUS_EXAMPLES) == NAMES


@pytest.mark.parametrize("note", COMPANION_NOTES)
def test_companion_notes_named_by_the_manual_exist(note):
    assert os.path.getsize(os.path.join(EXAMPLES, note)) > 200


@pytest.mark.parametrize("name", NAMES)
def test_example_header_names_it_and_describes_it(name):
    with open(os.path.join(EXAMPLES, name + ".yaml")) as handle:
        first = handle.readline()
    assert first.startswith("# %s: " % name)
    assert len(first) > len(name) + 20


@pytest.mark.parametrize("name", NAMES)
def test_example_name_and_job_name_match_its_file(name):
    document = load(name)
    assert document["name"] == name
    assert document["x-slurm"]["job_name"] == name
    assert document["x-slurm"]["time"]


@pytest.mark.parametrize("name", NAMES)
def test_example_validates(cli, name):
    result = cli(["validate", "-f", os.path.join(EXAMPLES, name + ".yaml")], env=ENV)
    assert result.code == 0, result.err


@pytest.mark.parametrize("name", NAMES)
def test_example_renders_a_script_that_bash_accepts(cli, tmp_path, name):
    script = tmp_path / "job.sbatch"
    result = cli(["render", "-f", os.path.join(EXAMPLES, name + ".yaml"), "--output", script],
                 env=ENV)
    assert result.code == 0, result.err
    check = subprocess.run(["bash", "-n", str(script)], stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("name", NAMES)
def test_example_relative_mounts_exist_beside_it(name):
    for service in load(name)["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("./"):
                assert os.path.isdir(os.path.join(EXAMPLES, host)), (name, volume)


@pytest.mark.parametrize("name", NAMES)
def test_example_shell_commands_parse_in_sh(name):
    for where, value in commands_of(load(name)):
        if isinstance(value, str):
            # What /bin/sh runs: a sweep's ((param.NAME)) placeholders become "$VARIABLE" words.
            value = hpc_compose._placeholder_script(value)
            check = subprocess.run(["sh", "-n", "-c", value], stderr=subprocess.PIPE,
                                   universal_newlines=True)
            assert check.returncode == 0, "%s: %s: %s" % (name, where, check.stderr)


@pytest.mark.parametrize("name", NAMES)
def test_example_inline_python_compiles(name):
    for where, value in commands_of(load(name)):
        if isinstance(value, list) and value[0] in ("python", "python3"):
            code = value[value.index("-c") + 1] if "-c" in value else None
            if code is not None:
                compile(code, "%s:%s" % (name, where), "exec")


def test_example_python_sources_compile():
    for folder, _, files in os.walk(EXAMPLES):
        for file_name in files:
            if file_name.endswith(".py"):
                path = os.path.join(folder, file_name)
                with open(path) as handle:
                    compile(handle.read(), path, "exec")


def test_restart_policy_example_shows_all_three_policies():
    services = load("restart-policy")["services"]
    modes = {name: service.get("x-slurm", {}).get("failure_policy", {}).get("mode", "fail_job")
             for name, service in services.items()}
    assert sorted(modes.values()) == ["fail_job", "ignore", "restart_on_failure"]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_host_pipeline_commands_produce_the_result_file(tmp_path):
    """Runs host-pipeline's two commands as the batch script would (minus Slurm)."""
    port = str(_free_port())
    with open(os.path.join(EXAMPLES, "host-pipeline.yaml")) as handle:
        document = hpc_compose.parse_yaml(handle.read().replace("18080", port))
    env = dict(os.environ, HPC_COMPOSE_JOB_DIR=str(tmp_path))
    web = document["services"]["web"]
    server = subprocess.Popen(["/bin/sh", "-c", web["command"]], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = web["readiness"]["url"]
        deadline = time.time() + 20
        import urllib.request
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        worker = document["services"]["worker"]
        worker_env = dict(env, **worker["environment"])
        argv = [sys.executable] + worker["command"][1:]
        result = subprocess.run(argv, env=worker_env, stdout=subprocess.PIPE,
                                universal_newlines=True, timeout=60)
    finally:
        server.terminate()
        server.wait(10)
    assert result.returncode == 0
    text = (tmp_path / "result.txt").read_text()
    assert text.startswith("fetched http://127.0.0.1:%s/message.txt: hello from " % port)
    assert result.stdout == text


def _standin(tmp_path, *args, **env):
    environ = dict(os.environ, HPC_COMPOSE_ATTEMPT=env.get("attempt", "0"),
                   HPC_COMPOSE_IS_RESUME=env.get("is_resume", "0"))
    return subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "standin", "train_standin.py"),
                             "--checkpoint-dir", str(tmp_path)] + list(args),
                            stdout=subprocess.PIPE, universal_newlines=True, env=environ)


def test_long_training_signals_and_requeues_into_its_resume_path():
    slurm = load("long-training")["x-slurm"]
    assert slurm["signal"]["on_signal"] == "requeue" and "resume" in slurm
    command = load("long-training")["services"]["trainer"]["command"]
    assert command[command.index("--checkpoint-dir") + 1] == slurm["resume"]["path"]


def test_standin_trainer_checkpoints_on_sigusr1_and_the_next_run_resumes(tmp_path):
    import signal
    first = _standin(tmp_path, "--steps", "400", "--step-seconds", "0.05")
    assert first.stdout.readline().startswith("starting at step 0")
    assert first.stdout.readline().startswith("step 1 ")
    first.send_signal(signal.SIGUSR1)
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 0
    saved = int(out.splitlines()[-1].split("at step ")[1].split(",")[0])
    assert 1 <= saved < 400
    second = _standin(tmp_path, "--steps", str(saved + 2), "--step-seconds", "0.01",
                      attempt="1", is_resume="1")
    out, _ = second.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[0] == "resumed from step %d (attempt 1, HPC_COMPOSE_IS_RESUME=1)" % saved
    assert lines[-1].startswith("done: %d steps" % (saved + 2))


def test_parameter_sweep_is_a_sweep_of_four_learning_rates_two_at_a_time():
    spec = hpc_compose.load_spec(os.path.join(EXAMPLES, "parameter-sweep.yaml"), environ=ENV)
    assert spec.slurm.array == "0-3%2"
    assert [dict(task.params)["learning_rate"] for task in spec.sweep.tasks] == \
        ["0.4", "0.2", "0.1", "0.05"]
    assert spec.sweep.results == ("run/result.json",)


def test_sweep_grid_sweeps_two_parameters_with_three_replicates():
    spec = hpc_compose.load_spec(os.path.join(EXAMPLES, "sweep-grid.yaml"), environ=ENV)
    assert spec.sweep.parameters == ("learning_rate", "steps")
    assert len(spec.sweep.tasks) == 15 and spec.slurm.array == "0-14%4"
    assert ("learning_rate", "0.02") not in [p for t in spec.sweep.tasks[:3] for p in t.params]
    assert [task.replicate for task in spec.sweep.tasks[:4]] == [0, 1, 2, 0]


def test_heterogeneous_example_puts_the_server_and_the_clients_in_different_groups():
    plan = hpc_compose.build_plan(hpc_compose.load_spec(
        os.path.join(EXAMPLES, "gpu-server-cpu-services.yaml"), environ=ENV), environ=ENV)
    groups = dict((s.name, (s.group, s.het_group, s.placement.mode)) for s in plan.services)
    assert groups == {"vllm": ("gpu", 0, "single"), "redis": ("cpu", 1, "primary"),
                      "clients": ("cpu", 1, "distributed")}


def with_runtime(text, runtime):
    """The example with its container runtime switched by ONE line: `runtime:` under x-slurm."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if line.startswith("  runtime: "):
            lines[index] = "  runtime: " + runtime
            return "\n".join(lines)
    index = lines.index("x-slurm:")
    return "\n".join(lines[:index + 1] + ["  runtime: " + runtime] + lines[index + 1:])


CONTAINER_EXAMPLES = [name for name in NAMES
                      if any("image" in service for service in load(name)["services"].values())]


def test_the_container_examples_are_the_ones_with_images():
    assert len(CONTAINER_EXAMPLES) >= 18 and "host-pipeline" not in CONTAINER_EXAMPLES


SHELLCHECKED_FLIPPED = ("app-redis-worker", "multi-node-torchrun", "training-resume")


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
@pytest.mark.parametrize("name", CONTAINER_EXAMPLES)
def test_container_example_validates_and_renders_with_the_runtime_flipped(cli, tmp_path, name,
                                                                           runtime):
    with open(os.path.join(EXAMPLES, name + ".yaml")) as handle:
        original = handle.read()
    flipped = with_runtime(original, runtime)
    assert len(set(flipped.split("\n")) - set(original.split("\n"))) == 1
    # In a copy of the examples folder, so that its relative volumes and files still resolve.
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, str(folder))
    compose = folder / (name + ".yaml")
    compose.write_text(flipped)
    result = cli(["validate", "-f", compose], env=ENV)
    assert result.code == 0, result.err
    script = tmp_path / "job.sbatch"
    result = cli(["render", "-f", compose, "--output", script], env=ENV)
    assert result.code == 0, result.err
    text = script.read_text()
    assert "%s --quiet " % runtime in text and "--container-image" not in text
    check = subprocess.run(["bash", "-n", str(script)], stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert check.returncode == 0, check.stderr
    # shellcheck (seconds per script) on three that between them use GPUs, several nodes, a
    # resume folder and prepare; tests/test_render.py shellchecks every example under Pyxis.
    if runtime == "apptainer" and name in SHELLCHECKED_FLIPPED and shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "--format=gcc", str(script)],
                               stdout=subprocess.PIPE, universal_newlines=True)
        assert check.returncode == 0, check.stdout
