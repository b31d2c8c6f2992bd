"""Render: the exact srun lines for every service shape, the #SBATCH header, the batch script's
static checks (bash -n, shellcheck) on every shipped example, and the render command.

The plan records are built by hand here, so these tests pin the renderer alone; what the script
does when it runs is proven on the real cluster in test_slurm_e2e.py.
"""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest

import hpc_compose as hc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "*.yaml")))
IMAGE = "/cache/base/redis.sqsh"
ENV_NAMES = ("HPC_COMPOSE_JOB_DIR,HPC_COMPOSE_NODELIST,HPC_COMPOSE_NODELIST_FILE,"
             "HPC_COMPOSE_NODE_COUNT,HPC_COMPOSE_PRIMARY_NODE,HPC_COMPOSE_SERVICE")
JOB_MOUNT = "--container-mounts=${JOB_DIR}:/hpc-compose/job"


def service(name="app", runtime="pyxis", execution=None, placement=None, **fields):
    values = dict(
        name=name, token=hc.service_token(name), runtime=runtime,
        image=hc.ImageRef("local", IMAGE) if runtime == "pyxis" else hc.ImageRef("none", ""),
        execution=execution or hc.Execution("exec", ("redis-server", "--port", "6380")),
        working_dir=None, environment=(), mounts=(), depends_on=(), dependents=(), readiness=None,
        failure_policy=hc.FailurePolicy(), placement=placement or hc.Placement("single", 1, 1))
    values.update(fields)
    return hc.ServicePlan(**values)


def runtime_plan(*services, **slurm_fields):
    nodes = slurm_fields.pop("nodes", 1)
    slurm = hc.SlurmSpec(nodes=nodes, **slurm_fields)
    spec = hc.ComposeSpec(path="/p/compose.yaml", project_dir="/p", name="demo", version=None,
                          slurm=slurm, services=())
    plan = hc.Plan(spec=spec, compose_file="/p/compose.yaml", project_dir="/p",
                   job_name=slurm.job_name or "demo", cache_dir="/cache", nodes=nodes, slurm=slurm,
                   services=tuple(services), runtime="pyxis")
    images = tuple(hc.ServiceImage(s.name, IMAGE if s.runtime == "pyxis" else None)
                   for s in services)
    return hc.RuntimePlan(plan=plan, images=images, cache_dir="/cache")


def argv(*services, **slurm_fields):
    return hc.service_srun_argv(runtime_plan(*services, **slurm_fields), 0)


BASE = ["--overlap", "--job-name=hpc-compose:app", "--nodes=1", "--ntasks=1"]
NAME = "--container-name=hpc-compose_${SLURM_JOB_ID}_app"  # joined by `exec`, removed at teardown


# --- Pyxis lines -------------------------------------------------------------------------------

def test_exec_entrypoint_runs_through_sh_without_the_image_entrypoint():
    execution = hc.Execution("exec", ("python3", "-m", "app", "it's $HOME"))
    assert argv(service(execution=execution)) == BASE + [
        "--container-image=" + IMAGE, JOB_MOUNT, "--container-env=" + ENV_NAMES, NAME,
        "--no-container-entrypoint",
        "/bin/sh", "-c", 'exec "$@"', "hpc-compose", "python3", "-m", "app", "it's $HOME"]


def test_exec_command_only_passes_argv_straight_to_the_image_entrypoint():
    execution = hc.Execution("exec", ("redis-server", "--port", "6380"), use_image_entrypoint=True)
    assert argv(service(execution=execution)) == BASE + [
        "--container-image=" + IMAGE, JOB_MOUNT, "--container-env=" + ENV_NAMES, NAME,
        "--container-entrypoint", "redis-server", "--port", "6380"]


def test_shell_command_only_runs_sh_c_under_the_image_entrypoint():
    execution = hc.Execution("shell", script="echo $HOME && sleep 1", use_image_entrypoint=True)
    assert argv(service(execution=execution))[-6:] == [
        "--container-env=" + ENV_NAMES, NAME, "--container-entrypoint",
        "/bin/sh", "-c", "echo $HOME && sleep 1"]


def test_shell_entrypoint_and_command_run_the_joined_string_without_the_image_entrypoint():
    execution = hc.Execution("shell", script="/entry.sh --flag serve")
    assert argv(service(execution=execution))[-4:] == [
        "--no-container-entrypoint", "/bin/sh", "-c", "/entry.sh --flag serve"]


def test_neither_command_nor_entrypoint_runs_the_image_default_through_enroot_rc():
    line = argv(service(execution=hc.Execution("default", use_image_entrypoint=True)))
    assert line == BASE + ["--container-image=" + IMAGE, JOB_MOUNT, "--container-env=" + ENV_NAMES,
                           NAME, "--no-container-entrypoint", "/bin/sh", "/etc/rc"]


def test_working_dir_becomes_container_workdir():
    line = argv(service(working_dir="/srv/app"))
    assert line[5:7] == [JOB_MOUNT, "--container-workdir=/srv/app"]


def test_volumes_follow_the_job_mount_and_the_resume_mount():
    mounts = (hc.Mount("/data/in", "/in", "ro"), hc.Mount("/p/src", "/workspace"))
    line = argv(service(mounts=mounts), resume=hc.ResumeSpec("/shared/run"))
    assert (JOB_MOUNT + ",/shared/run:/hpc-compose/resume,/data/in:/in:ro,/p/src:/workspace") in line


def test_container_env_names_every_variable_set_for_the_service():
    environment = (("ZED", "1"), ("PATH", "/opt/bin:/usr/bin"), ("A_B", "x y"))
    line = argv(service(environment=environment))
    assert ("--container-env=A_B," + ENV_NAMES.replace("HPC_COMPOSE_SERVICE",
                                                       "HPC_COMPOSE_SERVICE,PATH,ZED")) in line


def test_a_name_with_a_dot_is_set_by_env_but_left_out_of_container_env():
    # Pyxis writes --container-env names into bash (`${NAME-}`), which a dot breaks; srun passes
    # the name from env's environment to the program all the same (seen on the test cluster).
    plan = runtime_plan(service(environment=(("discovery.type", "single-node"), ("A", "1"))))
    line = hc.service_srun_argv(plan, 0)
    assert ("--container-env=A," + ENV_NAMES) in line
    assert hc.service_environment(plan, 0)[:2] == [("discovery.type", "single-node"), ("A", "1")]
    assert "        discovery.type=single-node \\\n" in hc.render_script(plan)


def test_resume_adds_its_variables_to_container_env():
    line = argv(service(), resume=hc.ResumeSpec("/shared/run"))
    env_flag = [word for word in line if word.startswith("--container-env=")][0]
    assert env_flag.split("=", 1)[1].split(",") == sorted(
        ENV_NAMES.split(",") + ["HPC_COMPOSE_ATTEMPT", "HPC_COMPOSE_IS_RESUME",
                                "HPC_COMPOSE_RESUME_DIR"])


def test_gpus_and_cpus_per_task_are_step_options():
    line = argv(service(cpus_per_task=8, gpus=2))
    assert line[4:6] == ["--cpus-per-task=8", "--gpus=2"]


def test_gres_wins_over_gpus():
    line = argv(service(gpus=2, gres="gpu:a100:1"))
    assert "--gres=gpu:a100:1" in line and not [w for w in line if w.startswith("--gpus")]


def test_extra_srun_args_come_last_before_the_command():
    execution = hc.Execution("exec", ("hostname",), use_image_entrypoint=True)
    line = argv(service(execution=execution, extra_srun_args=("--mpi=pmix", "--exclusive")))
    assert line[-4:] == ["--container-entrypoint", "--mpi=pmix", "--exclusive", "hostname"]


def test_task_geometry_comes_from_the_placement():
    line = argv(service(placement=hc.Placement("single", 1, 4, 2)))
    assert line[:5] == ["--overlap", "--job-name=hpc-compose:app", "--nodes=1", "--ntasks=4",
                        "--ntasks-per-node=2"]


def test_multi_node_helper_is_pinned_to_the_primary_node():
    line = argv(service(placement=hc.Placement("primary", 1, 1)), nodes=4)
    assert line[:5] == BASE + ["--nodelist=${HPC_COMPOSE_PRIMARY_NODE}"]


def test_distributed_service_spans_the_allocation_without_a_nodelist():
    line = argv(service(placement=hc.Placement("distributed", 4, None, 8)), nodes=4)
    assert line[:4] == ["--overlap", "--job-name=hpc-compose:app", "--nodes=4",
                        "--ntasks-per-node=8"]
    assert not [word for word in line if word.startswith(("--nodelist", "--ntasks="))]


def test_a_step_of_several_tasks_ends_when_one_task_fails():
    assert "--kill-on-bad-exit=1" in argv(service(placement=hc.Placement("distributed", 4, None, 8)),
                                          nodes=4)
    assert "--kill-on-bad-exit=1" in argv(service(placement=hc.Placement("single", 1, 4, None)))
    assert "--kill-on-bad-exit=1" not in argv(service(placement=hc.Placement("primary", 1, 1)),
                                              nodes=4)
    assert "--kill-on-bad-exit=1" not in argv(service())


def test_encoded_token_names_the_step():
    assert argv(service(name="my.app"))[1] == "--job-name=hpc-compose:my_x2e_app"


def test_volume_path_with_a_comma_is_refused():
    with pytest.raises(hc.HpcComposeError, match="cannot mount"):
        argv(service(mounts=(hc.Mount("/data/a,b", "/in"),)))


# --- host lines ---------------------------------------------------------------------------------

def test_host_exec_form_runs_argv_directly_with_chdir():
    execution = hc.Execution("exec", ("python3", "-c", "print(1)"))
    line = argv(service(runtime="host", execution=execution, working_dir="/p/work"))
    assert line == BASE + ["--chdir=/p/work", "python3", "-c", "print(1)"]


def test_host_shell_form_runs_sh_c():
    execution = hc.Execution("shell", script="echo hi > out.txt")
    assert argv(service(runtime="host", execution=execution)) == BASE + [
        "/bin/sh", "-c", "echo hi > out.txt"]


def test_host_environment_points_at_the_real_job_directory():
    plan = runtime_plan(service(runtime="host", environment=(("A", "1"),)))
    assert hc.service_environment(plan, 0) == [
        ("A", "1"), ("HPC_COMPOSE_SERVICE", "app"), ("HPC_COMPOSE_JOB_DIR", "${JOB_DIR}"),
        ("HPC_COMPOSE_NODELIST_FILE", "${JOB_DIR}/allocation/nodes.txt")]


def test_pyxis_environment_points_at_the_container_paths():
    plan = runtime_plan(service(), resume=hc.ResumeSpec("/shared/run"))
    assert hc.service_environment(plan, 0)[1:] == [
        ("HPC_COMPOSE_JOB_DIR", "/hpc-compose/job"),
        ("HPC_COMPOSE_NODELIST_FILE", "/hpc-compose/job/allocation/nodes.txt"),
        ("HPC_COMPOSE_RESUME_DIR", "/hpc-compose/resume")]


# --- the script's words are the argv, after bash has parsed them ---------------------------------

NASTY = ["it's", 'say "hi"', "$HOME `id` $(id)", "back\\slash", "new\nline", "tab\there",
         "ünïcödé 🙂", "", " ", "*", "a,b:c", "--flag=x y"]


def _bash_words(script, index):
    """What bash makes of run_service_<index>'s env+srun words (env shadowed by printf)."""
    start = script.index("run_service_%d() {" % index)
    body = script[start:script.index("\n}\n", start) + 3].replace("exec env", "env", 1)
    program = ("env() { printf '%s\\0' \"$@\"; }\nJOB_DIR=/jobs/7\nLAUNCH=(/usr/bin/srun)\n"
               "HPC_COMPOSE_PRIMARY_NODE=node0\nSLURM_JOB_ID=7\n" + body + "run_service_%d\n" % index)
    out = subprocess.run(["bash", "-c", program], stdout=subprocess.PIPE, check=True).stdout
    return out.decode("utf-8").split("\0")[:-1]


def test_rendered_srun_words_reproduce_the_argv_byte_for_byte():
    execution = hc.Execution("exec", tuple(NASTY))
    environment = tuple(("V%d" % i, value) for i, value in enumerate(NASTY))
    plan = runtime_plan(service(execution=execution, environment=environment,
                                placement=hc.Placement("primary", 1, 1),
                                mounts=(hc.Mount("/data/my dir", "/in"),)), nodes=2)
    words = _bash_words(hc.render_script(plan), 0)
    expected_env = ["%s=%s" % (key, value.replace("${JOB_DIR}", "/jobs/7"))
                    for key, value in hc.service_environment(plan, 0)]
    expected_argv = [word.replace("${JOB_DIR}", "/jobs/7")
                     .replace("${HPC_COMPOSE_PRIMARY_NODE}", "node0")
                     .replace("${SLURM_JOB_ID}", "7")
                     for word in hc.service_srun_argv(plan, 0)]
    assert words == expected_env + ["/usr/bin/srun"] + expected_argv
    assert words[-len(NASTY):] == NASTY


# --- Apptainer lines ------------------------------------------------------------------------------

SIF = "/cache/base/redis.sif"
WRAPPER = ["bash", "-c", hc._APPTAINER_STEP_WRAPPER, "hpc-compose-apptainer", "APPTAINERENV_"]
ISOLATION = ["--cleanenv", "--no-eval", "--contain", "--writable-tmpfs"]
BIND_JOB = ["--bind", "${JOB_DIR}:/hpc-compose/job"]


def apptainer_plan(*services, **slurm_fields):
    """runtime_plan() whose apptainer services start from SIF (or the image given to them)."""
    plan = runtime_plan(*services, **slurm_fields)
    images = tuple(hc.ServiceImage(s.name, s.image.reference or SIF)
                   if s.runtime in ("apptainer", "singularity") else image
                   for s, image in zip(services, plan.images))
    return plan._replace(images=images)


def apptainer_service(runtime="apptainer", image=SIF, **fields):
    return service(runtime=runtime, image=hc.ImageRef("local", image), **fields)


def test_apptainer_explicit_entrypoint_is_exec_with_the_isolation_defaults():
    execution = hc.Execution("exec", ("redis-server", "--port", "6380"))
    assert hc.service_srun_argv(apptainer_plan(apptainer_service(execution=execution)), 0) == \
        BASE + WRAPPER + ["apptainer", "--quiet", "exec"] + ISOLATION + BIND_JOB + \
        [SIF, "redis-server", "--port", "6380"]


def test_apptainer_command_only_runs_the_sif_runscript_with_the_command_as_arguments():
    execution = hc.Execution("exec", ("--port", "6380"), use_image_entrypoint=True)
    assert hc.service_srun_argv(apptainer_plan(apptainer_service(execution=execution)), 0)[
        len(BASE) + len(WRAPPER):] == ["apptainer", "--quiet", "run"] + ISOLATION + BIND_JOB + \
        [SIF, "--port", "6380"]


def test_apptainer_image_default_is_run_without_arguments():
    plan = apptainer_plan(apptainer_service(execution=hc.Execution("default",
                                                                   use_image_entrypoint=True)))
    assert hc.service_srun_argv(plan, 0)[-len(ISOLATION) - 4:] == \
        ["run"] + ISOLATION + BIND_JOB + [SIF]


def test_apptainer_squashfs_image_default_goes_through_enroot_rc():
    plan = apptainer_plan(apptainer_service(image="/img/app.sqsh", execution=hc.Execution(
        "shell", script="echo hi", use_image_entrypoint=True)))
    words = hc.service_srun_argv(plan, 0)
    assert words[words.index("/img/app.sqsh"):] == [
        "/img/app.sqsh", "/bin/sh", "-c", '[ -e /etc/rc ] && exec /bin/sh /etc/rc "$@"; exec "$@"',
        "hpc-compose", "/bin/sh", "-c", "echo hi"]
    assert "exec" in words and "run" not in words


def test_apptainer_binds_secrets_resume_volumes_then_pwd_and_nv_for_gpus():
    secret = hc.ServiceSecret("token", "token", "/run/secrets/token")
    plan = apptainer_plan(apptainer_service(
        mounts=(hc.Mount("/data", "/in", "ro"),), working_dir="/work", gpus=1,
        secrets=(secret,)), resume=hc.ResumeSpec("/shared/run"))
    words = hc.service_srun_argv(plan, 0)
    assert "--gpus=1" in words[:words.index("bash")]
    assert words[words.index("--writable-tmpfs") + 1:] == [
        "--nv"] + BIND_JOB + ["--bind", "/shared/run:/hpc-compose/resume",
                              "--bind", "${JOB_DIR}/secrets/app:/run/secrets:ro",
                              "--bind", "/data:/in:ro", "--pwd", "/work", SIF,
                              "redis-server", "--port", "6380"]


def test_singularity_runs_singularity_with_its_own_environment_prefix():
    plan = apptainer_plan(apptainer_service(runtime="singularity", environment=(("A", "1"),)))
    words = hc.service_srun_argv(plan, 0)
    assert words[len(BASE) + 4:len(BASE) + 7] == ["SINGULARITYENV_", "singularity", "--quiet"]
    assert hc.service_environment(plan, 0)[0] == ("SINGULARITYENV_A", "1")


def test_apptainer_environment_is_passed_with_the_prefix_and_container_paths():
    plan = apptainer_plan(apptainer_service(environment=(("A", "1"),)))
    assert hc.service_environment(plan, 0) == [
        ("APPTAINERENV_A", "1"), ("APPTAINERENV_HPC_COMPOSE_SERVICE", "app"),
        ("APPTAINERENV_HPC_COMPOSE_JOB_DIR", "/hpc-compose/job"),
        ("APPTAINERENV_HPC_COMPOSE_NODELIST_FILE", "/hpc-compose/job/allocation/nodes.txt")]


def test_apptainer_volume_path_with_a_colon_is_refused():
    plan = apptainer_plan(apptainer_service(mounts=(hc.Mount("/a:b", "/in"),)))
    with pytest.raises(hc.HpcComposeError, match="Apptainer cannot mount"):
        hc.service_srun_argv(plan, 0)


def test_apptainer_step_wrapper_passes_slurm_task_variables_unless_the_service_sets_them():
    out = subprocess.run(
        ["bash", "-c", hc._APPTAINER_STEP_WRAPPER, "x", "APPTAINERENV_", "env"],
        env={"SLURM_PROCID": "3", "HPC_COMPOSE_NODE_COUNT": "2", "CUDA_VISIBLE_DEVICES": "0,1",
             "APPTAINERENV_SLURM_NODEID": "mine", "SLURM_NODEID": "5", "OTHER": "x",
             "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.splitlines()
    assert {"APPTAINERENV_SLURM_PROCID=3", "APPTAINERENV_HPC_COMPOSE_NODE_COUNT=2",
            "APPTAINERENV_CUDA_VISIBLE_DEVICES=0,1", "APPTAINERENV_SLURM_NODEID=mine"} <= set(out)
    assert not any(line.startswith("APPTAINERENV_OTHER") for line in out)


def test_apptainer_rendered_words_reproduce_the_argv_and_environment_byte_for_byte():
    execution = hc.Execution("exec", tuple(NASTY))
    environment = tuple(("V%d" % i, value) for i, value in enumerate(NASTY))
    plan = apptainer_plan(apptainer_service(execution=execution, environment=environment,
                                            mounts=(hc.Mount("/data/my dir", "/in"),)))
    script = hc.render_script(plan)
    words = _bash_words(script, 0)
    expected_env = ["%s=%s" % (key, value.replace("${JOB_DIR}", "/jobs/7"))
                    for key, value in hc.service_environment(plan, 0)]
    expected_argv = [word.replace("${JOB_DIR}", "/jobs/7") for word in
                     hc.service_srun_argv(plan, 0)]
    assert words == expected_env + ["/usr/bin/srun"] + expected_argv
    assert words[-len(NASTY):] == NASTY


def test_apptainer_script_signals_task_processes_and_has_no_pyxis_keeper(tmp_path):
    plan = apptainer_plan(service(name="p"), apptainer_service())
    script = hc.render_script(plan)
    assert "*:1) tasks+=" in script and "scontrol listpids" in script
    assert "start_container_keeper" in script  # the Pyxis service's
    alone = hc.render_script(apptainer_plan(apptainer_service()))
    assert "start_container_keeper" not in alone and "enroot" not in alone
    assert "cannot mount" in alone  # the job directory is bound too: no ',' or ':' in it
    for text in (script, alone):
        path = tmp_path / "job.sh"
        path.write_text(text)
        subprocess.run(["bash", "-n", str(path)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", str(path)], check=True)


# --- #SBATCH header -------------------------------------------------------------------------------

def sbatch_lines(script):
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_sbatch_lines_cover_every_x_slurm_field_in_order():
    plan = runtime_plan(service(), job_name="my job", partition="gpu", account="proj", qos="high",
                        time="01:00:00", nodes=2, ntasks=8, ntasks_per_node=4, cpus_per_task=2,
                        mem="8G", gpus=4, constraint="a100", output="out-%j.txt",
                        error="err-%j.txt", chdir="/scratch/run",
                        submit_args=("--mail-type=END", "--reservation=r1"))
    assert sbatch_lines(hc.render_script(plan)) == [
        "#SBATCH --job-name='my job'", "#SBATCH --nodes=2", "#SBATCH --ntasks=8",
        "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
        "#SBATCH --qos=high", "#SBATCH --time=01:00:00", "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=8G", "#SBATCH --gpus=4", "#SBATCH --constraint=a100",
        "#SBATCH --output=out-%j.txt", "#SBATCH --error=err-%j.txt",
        "#SBATCH --chdir=/scratch/run", "#SBATCH --mail-type=END", "#SBATCH --reservation=r1"]


def test_sbatch_gres_wins_over_gpus():
    lines = sbatch_lines(hc.render_script(runtime_plan(service(), gres="gpu:2", gpus=4)))
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH --gpus=4" not in lines


def test_sbatch_minimal_header_has_job_name_and_nodes():
    assert sbatch_lines(hc.render_script(runtime_plan(service()))) == [
        "#SBATCH --job-name=demo", "#SBATCH --nodes=1"]


def test_sbatch_value_with_a_line_break_is_refused():
    with pytest.raises(hc.HpcComposeError, match="line break"):
        hc.render_script(runtime_plan(service(), partition="a\n#SBATCH --qos=x"))


# --- the script as a whole ------------------------------------------------------------------------

def test_setup_lines_are_emitted_verbatim_before_the_event_loop():
    script = hc.render_script(runtime_plan(service(), setup=("module load x/1.0", "echo \"$X\"")))
    setup = script.index("module load x/1.0\necho \"$X\"\n")
    assert script.index("trap on_exit EXIT") < setup < script.index("\n# The event loop")


def _bash_version_check(script):
    body = script.split("#SBATCH --nodes=1\n", 1)[1]
    return body[:body.index("\nfi\n") + len("\nfi\n")]


def test_bash_version_check_then_set_euo_pipefail_come_right_after_the_header():
    script = hc.render_script(runtime_plan(service()))
    check = _bash_version_check(script)
    assert "if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then" in check
    assert script.split("#SBATCH --nodes=1\n", 1)[1][len(check):].startswith("set -euo pipefail\n")


@pytest.mark.parametrize("version, code", [("4 2 46", 1), ("4 4 20", 0), ("5 2 15", 0), ("3 2 57", 1)])
def test_bash_older_than_4_4_stops_the_script_with_one_line(version, code):
    # BASH_VERSINFO is read-only, so the check runs with its name pointing at a chosen version.
    check = _bash_version_check(hc.render_script(runtime_plan(service())))
    check = "VERSION=(%s)\n" % version + check.replace("BASH_VERSINFO", "VERSION") + "echo went on\n"
    result = subprocess.run(["bash", "-c", check], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == code
    if code:
        assert result.stderr.startswith("hpc-compose: this batch script needs bash >= 4.4")
        assert result.stderr.count("\n") == 1 and result.stdout == ""
    else:
        assert result.stdout == "went on\n" and result.stderr == ""


def test_the_job_ends_with_services_nobody_depends_on_leaving_out_ignore_sidecars():
    ignore = hc.FailurePolicy("ignore")
    plan = runtime_plan(service("db", dependents=("app",)),
                        service("app", depends_on=(hc.Dependency("db", "service_started"),)),
                        service("sidecar", failure_policy=ignore))
    script = hc.render_script(plan)
    assert "END_REASON='every service that ends the job has finished: app'" in script
    assert re.findall(r"ENDS_JOB\[\d\]=\d", script) == [
        "ENDS_JOB[0]=0", "ENDS_JOB[1]=1", "ENDS_JOB[2]=0"]


def test_dependencies_are_rendered_as_index_condition_words():
    plan = runtime_plan(service("db", dependents=("app",)), service("cache", dependents=("app",)),
                        service("app", depends_on=(hc.Dependency("db", "service_healthy"),
                                                   hc.Dependency("cache", "service_started"))))
    assert "DEPENDS_ON[2]='0:service_healthy 1:service_started'" in hc.render_script(plan)


def test_readiness_is_described_for_messages_and_state():
    readiness = hc.ReadinessSpec("log", pattern="Ready to accept 'connections'", timeout_seconds=9)
    script = hc.render_script(runtime_plan(service(readiness=readiness)))
    description = hc.shell_quote('log pattern "Ready to accept \'connections\'"')
    assert "READINESS[0]=log READY_DESCRIPTION[0]=%s\n" % description in script
    assert ("READY_TIMEOUT[0]=9 READY_PATTERN[0]='Ready to accept '\"'\"'connections'\"'\"''\n"
            in script)


def test_readiness_lines_carry_only_the_facts_of_their_type():
    readiness = hc.ReadinessSpec("http", url="http://127.0.0.1:8000/health", timeout_seconds=30)
    script = hc.render_script(runtime_plan(service(readiness=readiness),
                                           service("other", readiness=None)))
    assert ("READY_TIMEOUT[0]=30 READY_CODE[0]=200 READY_URL[0]=http://127.0.0.1:8000/health\n"
            in script)
    assert "READINESS[1]=none\n" in script and "READY_TIMEOUT[1]" not in script


def test_resume_uses_attempt_directories_and_mounts_the_resume_path():
    script = hc.render_script(runtime_plan(service(), resume=hc.ResumeSpec("/shared/run")))
    assert 'RUN_DIR="$JOB_DIR/attempts/$ATTEMPT"' in script
    assert "RESUME_DIR=/shared/run" in script
    assert "ln -sfn \"attempts/$ATTEMPT/$name\" \"$JOB_DIR/$name\"" in script


# --- the script's pieces: each feature's bash only in the scripts that use it -------------------

def _placeholders(template):
    return set(re.findall(r"@\{(\w+)\}", template))


def test_metrics_start_and_stop_are_defined_and_called_when_metrics_are_on():
    script = hc.render_script(runtime_plan(service(), metrics=hc.MetricsSpec(interval_seconds=5)))
    assert "\nmetrics_start() {\n" in script and "\nmetrics_stop() {\n" in script
    assert "\nmetrics_start\nset +e" in script  # once, right before the event loop
    assert _bash_function(script, "finish").count("\n    metrics_stop\n") == 1


@pytest.mark.parametrize("metrics", [None, hc.MetricsSpec(enabled=False)], ids=["absent", "off"])
def test_a_job_without_metrics_has_no_metrics_bash(metrics):
    script = hc.render_script(runtime_plan(service(), metrics=metrics))
    assert "metrics_" not in script and "METRICS_" not in script
    assert "\n# Metrics sampler" not in script


def test_collect_artifacts_is_defined_and_called_at_teardown_when_artifacts_are_declared():
    script = hc.render_script(runtime_plan(service(), artifacts=hc.ArtifactsSpec(
        "/p/out", paths=("/hpc-compose/job/out",))))
    finish = _bash_function(script, "finish")
    assert "\ncollect_artifacts() {\n" in script
    assert " outcome=failure live=()\n" in finish
    assert finish.index("outcome=success\n") < finish.index('    collect_artifacts "$outcome"\n')


def test_a_job_without_artifacts_has_no_artifacts_bash():
    script = hc.render_script(runtime_plan(service()))
    assert "collect_artifacts" not in script and "artifacts_" not in script
    assert "ARTIFACTS_" not in script
    assert "\n# Artifact collection" not in script
    assert "outcome" not in _bash_function(script, "finish")


def test_the_extras_banner_names_only_the_blocks_the_job_uses():
    metrics = hc.MetricsSpec(interval_seconds=5)
    artifacts = hc.ArtifactsSpec("/p/out", paths=("/hpc-compose/job/out",))
    assert "\n# Metrics sampler\n" in hc.render_script(runtime_plan(service(), metrics=metrics))
    assert "\n# Artifact collection\n" in hc.render_script(
        runtime_plan(service(), artifacts=artifacts))
    assert "\n# Metrics sampler and artifact collection\n" in hc.render_script(
        runtime_plan(service(), metrics=metrics, artifacts=artifacts))


def test_local_step_is_only_in_the_script_of_a_local_run():
    plan = runtime_plan(service())
    script = hc.render_script(plan)
    for word in ("local_step", "remove_local_containers", "LAUNCHER", '"$BASH"'):
        assert word not in script
    assert '\nSRUN=$(command -v srun) || {' in script and '\nLAUNCH=("$SRUN")\n' in script
    local = hc.render_script(plan, local=True)
    assert "\nlocal_step() {\n" in local and "\nremove_local_containers() {\n" in local
    assert "[[ $LAUNCHER == srun ]] || { remove_local_containers; return 0; }" in local


def test_a_host_only_job_has_no_container_keeper():
    script = hc.render_script(runtime_plan(service(runtime="host")))
    assert "container_keeper" not in script and "KEEPER" not in script


def test_the_secret_copies_are_checked_and_removed_only_in_a_job_with_secrets():
    plain = hc.render_script(runtime_plan(service()))
    assert "secret" not in plain.lower()
    secret = hc.ServiceSecret("token", "token")
    script = hc.render_script(runtime_plan(service(secrets=(secret,))))
    assert "for token in app; do" in script
    assert '    rm -rf -- "$JOB_DIR/secrets"' in _bash_function(script, "finish")


def test_supervisor_pieces_are_emitted_in_order():
    script = hc.render_script(runtime_plan(service()))
    firsts = ["\nclock() {", "\nlaunch() {", "\nprobe() {", "\nservice_exited() {",
              "\nfinish() {", "\nforward_signals() {", "\non_exit() {"]
    assert [script.index(first) for first in firsts] == sorted(script.index(f) for f in firsts)


def test_no_template_is_longer_than_200_lines():
    long = [name for name, value in vars(hc).items()
            if name.endswith("_TEMPLATE") and value.count("\n") > 200]
    assert long == []


@pytest.mark.parametrize("name, placeholders", [
    ("_SUPERVISOR_STATE_TEMPLATE", {"tick", "tick_ms", "grace", "probe_first_ms",
                                    "probe_backoff", "probe_interval_ms", "probe_limit_ms",
                                    "state_schema_version"}),
    ("_LAUNCH_TEMPLATE", {"marker", "completed_condition"}),
    ("_READINESS_TEMPLATE", {"readiness_exit"}),
    ("_EXITS_TEMPLATE", {"blocked_dependents", "blocked_call", "blocked", "end_service",
                         "signal_fallback", "kill_srun", "tasks", "collect_step", "signal_tasks"}),
    ("_TEARDOWN_TEMPLATE", {"metrics_stop", "remove_containers", "remove_secrets",
                            "outcome_variable", "artifacts_outcome", "collect_artifacts",
                            "kill_last", "end_service", "stop_leftovers"}),
    ("_FORWARD_SIGNALS_TEMPLATE", set()),
    ("_ON_EXIT_TEMPLATE", set()),
])
def test_a_supervisor_piece_has_only_its_own_placeholders(name, placeholders):
    assert _placeholders(getattr(hc, name)) == placeholders


def test_readiness_piece_holds_the_probes_and_the_timeout_policy_only():
    piece = hc._fill(hc._READINESS_TEMPLATE, readiness_exit="124")
    assert re.findall(r"^(\w+)\(\) \{", piece, re.M) == [
        "probe", "run_probe", "stop_probe", "mark_ready", "readiness_timed_out"]
    assert "fail_job 124 " in piece


def _check_syntax(script):
    """``bash -n``, and shellcheck where it is installed, of the script file at ``script``."""
    proc = subprocess.run(["bash", "-n", str(script)], stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck") is not None:
        proc = subprocess.run(["shellcheck", "--format=gcc", str(script)],
                              stdout=subprocess.PIPE, universal_newlines=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("local, slurm_fields", [
    (True, {}), (False, {"metrics": hc.MetricsSpec(interval_seconds=5)}),
    (True, {"artifacts": hc.ArtifactsSpec("/p/out", paths=("/hpc-compose/job/out",))})],
    ids=["local", "metrics-only", "local-artifacts"])
def test_scripts_no_example_renders_pass_bash_n_and_shellcheck(tmp_path, local, slurm_fields):
    script = tmp_path / "job.sbatch"
    script.write_text(hc.render_script(runtime_plan(service(), **slurm_fields), local=local))
    _check_syntax(script)


def test_a_local_run_script_adds_only_the_launcher_the_keeper_and_the_stop_lines_of_local_runs():
    plan = runtime_plan(service(), metrics=hc.MetricsSpec(interval_seconds=5),
                        artifacts=hc.ArtifactsSpec("/p/out", paths=("/hpc-compose/job/out",)))
    script, local = hc.render_script(plan), hc.render_script(plan, local=True)
    for line in (hc._KEEPER_LOCAL_START_TEMPLATE, hc._KEEPER_LOCAL_STOP_TEMPLATE):
        assert local.count(line) == 1
        local = local.replace(line, "")
    # How a service is stopped (its session, what it leaves: tests/test_local.py), in place of srun.
    for key, srun in sorted(hc._stop_values(False).items()):
        if key != "end_service":
            local = local.replace(hc._stop_values(True)[key], srun)
    local = local.replace(hc._stop_values(True)["end_service"], "")
    launcher, allocation = "\n# Launcher: ", "\n# Allocation metadata"
    assert local[:local.index(launcher)] == script[:script.index(launcher)]
    assert local[local.index(allocation):] == script[script.index(allocation):]


def test_one_shot_stage_code_is_rendered_only_when_a_service_waits_for_one(tmp_path):
    fetch = service("fetch", runtime="host")
    plain = hc.render_script(runtime_plan(fetch, service(
        "train", runtime="host", depends_on=(hc.Dependency("fetch", "service_started"),))))
    one_shot = hc.render_script(runtime_plan(fetch, service(
        "train", runtime="host",
        depends_on=(hc.Dependency("fetch", "service_completed_successfully"),))))
    assert "blocked_dependents" not in plain and "service_completed_successfully" not in plain
    assert "blocked_dependents() {" in one_shot
    assert "[[ $condition == service_completed_successfully ]]" in one_shot
    # Both failing branches of the failure policy name the dependents that never start.
    assert one_shot.count('blocked_dependents "$i"; fail_job "$code"') == 2
    assert one_shot.count('exited with code $code$BLOCKED"') == 1
    script = tmp_path / "job.sbatch"
    script.write_text(one_shot)
    _check_syntax(script)


def _render_example(path):
    environ = dict(os.environ, USER=os.environ.get("USER") or "user")
    spec = hc.load_spec(path, environ=environ)
    return hc.render_script(hc.build_runtime_plan(hc.build_plan(spec, environ=environ)))


def test_there_are_shipped_examples_to_check():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_script_passes_bash_n(path, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(_render_example(path))
    proc = subprocess.run(["bash", "-n", str(script)], stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_script_passes_shellcheck(path, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    script = tmp_path / "job.sbatch"
    script.write_text(_render_example(path))
    proc = subprocess.run(["shellcheck", "--format=gcc", str(script)], stdout=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stdout


# --- the render command ---------------------------------------------------------------------------

COMPOSE = """\
name: rendered
x-slurm:
  runtime: host
  time: "00:05:00"
services:
  web:
    command: ["python3", "-m", "http.server", "8000"]
"""


def test_render_prints_the_script_to_stdout(cli, project):
    compose = project.write("compose.yaml", COMPOSE)
    res = cli(["render", "-f", compose])
    assert res.code == 0, res.err
    assert res.out.startswith("#!/bin/bash\n")
    assert "#SBATCH --job-name=rendered" in res.out


def test_render_output_writes_the_file_and_prints_its_path(cli, project):
    compose = project.write("compose.yaml", COMPOSE)
    target = project.root / "out" / "job.sbatch"
    res = cli(["render", "-f", compose, "--output", target])
    assert res.code == 0, res.err
    assert res.out == "%s\n" % target
    assert target.read_text().startswith("#!/bin/bash\n")
    assert res.err == "note: the folder %s did not exist; it was created for the script\n" % (
        project.root / "out")


def test_render_json_reports_each_service_srun_argv(cli, project):
    compose = project.write("compose.yaml", COMPOSE)
    res = cli(["render", "-f", compose, "--format", "json"])
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["output"] is None and data["script"].startswith("#!/bin/bash\n")
    assert data["services"][0]["srun_argv"] == [
        "srun", "--overlap", "--job-name=hpc-compose:web", "--nodes=1", "--ntasks=1",
        "python3", "-m", "http.server", "8000"]
    assert data["services"][0]["ends_job"] is True


def test_render_of_a_missing_file_is_a_usage_error(cli, project):
    res = cli(["render", "-f", project.root / "nope.yaml"])
    assert res.code == 2
    assert "does not exist" in res.err


def _bash_function(script, name):
    start = script.index("\n%s() {" % name) + 1
    return script[start:script.index("\n}\n", start) + 3]


def test_state_json_strings_are_escaped_by_the_script_itself():
    script = hc.render_script(runtime_plan(service()))
    values = ['plain', 'quote " and \\ backslash', "new\nline\ttab\rcr", "bell\x07 esc\x1b",
              "ünïcödé 🙂", "'single'", ""]
    program = _bash_function(script, "json_string") + "".join(
        'json_string %s; printf "%%s\\n" "$JSON"\n' % hc.shell_quote(value) for value in values)
    out = subprocess.run(["bash", "-c", program], stdout=subprocess.PIPE, check=True).stdout
    assert [json.loads(line) for line in out.decode("utf-8").splitlines()] == values


def test_pyxis_jobs_refuse_a_job_directory_pyxis_cannot_mount():
    check = "if [[ $JOB_DIR == *[,:]* ]]; then"
    assert check in hc.render_script(runtime_plan(service()))
    host = service(runtime="host", execution=hc.Execution("exec", ("true",)))
    assert check not in hc.render_script(runtime_plan(host))


# --- x-slurm.signal, requeue, dependency, array ------------------------------------------------

def test_signal_requeue_dependency_and_array_become_sbatch_lines_before_submit_args():
    signal = hc.SignalSpec("USR1", 300, "requeue", 150, 5)
    script = hc.render_script(runtime_plan(service(), signal=signal, dependency="afterok:12",
                                           array="0-3%2", submit_args=("--mail-type=END",)))
    assert [line[len("#SBATCH "):] for line in sbatch_lines(script)[-6:]] == [
        "--array=0-3%2", "--dependency=afterok:12", "--signal=B:USR1@300", "--requeue",
        "--open-mode=append", "--mail-type=END"]


def test_requeue_false_renders_no_requeue_and_keeps_slurm_open_mode():
    lines = sbatch_lines(hc.render_script(runtime_plan(service(), requeue=False)))
    assert "#SBATCH --no-requeue" in lines and not any("--open-mode" in l for l in lines)


def test_signal_table_names_what_each_service_receives():
    spec = hc.ComposeSpec(path="/p/compose.yaml", project_dir="/p", name="demo", version=None,
                          slurm=hc.SlurmSpec(), services=(
                              hc.ServiceSpec("a", None, slurm=hc.ServiceSlurmSpec(
                                  signal=hc.ServiceSignalSpec("INT"))),
                              hc.ServiceSpec("b", None, slurm=hc.ServiceSlurmSpec(
                                  signal=hc.ServiceSignalSpec(forward=False))),
                              hc.ServiceSpec("c", None)))
    plan = runtime_plan(service("a"), service("b"), service("c"),
                        signal=hc.SignalSpec("USR2", 120, "requeue", 60, 3))
    plan = plan._replace(plan=plan.plan._replace(spec=spec))
    script = hc.render_script(plan)
    assert "\nON_SIGNAL=requeue JOB_SIGNAL=USR2 REQUEUE_GRACE=60 MAX_ATTEMPTS=3\n" in script
    assert "\nSIGNAL_TO[0]=INT SIGNAL_TO[1]=- SIGNAL_TO[2]=''\n" in script


def test_without_x_slurm_signal_every_service_gets_the_signal_as_it_came():
    script = hc.render_script(runtime_plan(service("a")))
    assert "\nON_SIGNAL=forward JOB_SIGNAL=USR1 REQUEUE_GRACE=0 MAX_ATTEMPTS=0\n" in script
    assert "\nSIGNAL_TO[0]=''\n" in script


def test_an_array_task_writes_under_its_own_job_directory_and_exports_its_task_id():
    script = hc.render_script(runtime_plan(service(), array="0-3"))
    assert ('JOB_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/${SLURM_ARRAY_JOB_ID:?x-slurm.array: '
            'submit this script with sbatch --array}_${SLURM_ARRAY_TASK_ID}"') in script
    assert ('export HPC_COMPOSE_ARRAY_JOB_ID="$SLURM_ARRAY_JOB_ID" '
            'HPC_COMPOSE_ARRAY_TASK_ID="$SLURM_ARRAY_TASK_ID"') in script
    plain = hc.render_script(runtime_plan(service()))
    assert 'JOB_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/${SLURM_JOB_ID}"' in plain
    assert "HPC_COMPOSE_ARRAY_TASK_ID" not in plain


# --- heterogeneous jobs (x-slurm.groups) ----------------------------------------------------------

HETEROGENEOUS = """\
name: het
x-slurm:
  time: "00:10:00"
  groups:
    head:
      partition: gpu
      gres: gpu:1
    worker-pool:
      partition: cpu
      nodes: 2
      ntasks_per_node: 1
      exclusive: true
services:
  head:
    image: /images/app.sqsh
    command: serve
    readiness: {type: tcp, port: 8000}
  cache:
    image: /images/app.sqsh
    command: cache
    x-slurm: {group: worker-pool, nodes: 1}
    readiness: {type: http, url: "http://localhost:9000/ping?x=1"}
  workers:
    image: /images/app.sqsh
    command: work
    x-slurm: {group: worker-pool, nodes: 2}
    depends_on: {head: {condition: service_healthy}, cache: {condition: service_healthy}}
"""


def _heterogeneous(tmp_path):
    path = tmp_path / "compose.yaml"
    path.write_text(HETEROGENEOUS)
    environ = {"HOME": str(tmp_path), "USER": "tester"}
    return hc.build_runtime_plan(hc.build_plan(hc.load_spec(str(path), environ=environ),
                                               environ=environ))


def test_each_group_is_one_sbatch_block_split_by_hetjob(tmp_path):
    lines = hc._render_sbatch_lines(_heterogeneous(tmp_path).plan)
    assert lines == [
        "#SBATCH --job-name=het", "#SBATCH --nodes=1", "#SBATCH --partition=gpu",
        "#SBATCH --time=00:10:00", "#SBATCH --gres=gpu:1",
        "#SBATCH hetjob",
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=cpu",
        "#SBATCH --exclusive"]


def test_each_step_runs_in_its_group_and_a_helper_is_pinned_to_its_groups_first_node(tmp_path):
    runtime = _heterogeneous(tmp_path)
    head, cache, workers = (hc.service_srun_argv(runtime, i) for i in range(3))
    assert head[:2] == ["--overlap", "--het-group=0"]
    assert cache[:2] == ["--overlap", "--het-group=1"]
    assert "--nodelist=${HPC_COMPOSE_GROUP_WORKER_POOL_PRIMARY_NODE}" in cache
    assert "--het-group=1" in workers and "--nodes=2" in workers
    assert not any(word.startswith("--nodelist") for word in workers)


def test_services_get_their_group_and_every_groups_node_variables(tmp_path):
    runtime = _heterogeneous(tmp_path)
    environment = dict(hc.service_environment(runtime, 1))
    assert environment["HPC_COMPOSE_GROUP"] == "worker-pool"
    container_env = next(w for w in hc.service_srun_argv(runtime, 1)
                         if w.startswith("--container-env="))
    for name in ("HPC_COMPOSE_GROUP", "HPC_COMPOSE_GROUP_HEAD_NODELIST",
                 "HPC_COMPOSE_GROUP_HEAD_PRIMARY_NODE", "HPC_COMPOSE_GROUP_WORKER_POOL_NODELIST",
                 "HPC_COMPOSE_GROUP_WORKER_POOL_PRIMARY_NODE"):
        assert name in container_env.split("=", 1)[1].split(",")


def test_the_script_exports_each_groups_nodes_and_moves_a_later_groups_local_probe(tmp_path):
    script = hc.render_script(_heterogeneous(tmp_path))
    assert 'mapfile -t group_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1")' \
        in script
    assert ('export HPC_COMPOSE_GROUP_WORKER_POOL_NODELIST="${group_nodes[*]}" '
            'HPC_COMPOSE_GROUP_WORKER_POOL_PRIMARY_NODE="${group_nodes[0]}"') in script
    # The head (group 0) is probed where the batch script runs; the cache on its group's node.
    assert "READY_HOST[0]=127.0.0.1" in script
    assert ('READY_URL[1]=http://"${HPC_COMPOSE_GROUP_WORKER_POOL_PRIMARY_NODE}":9000/ping?x=1'
            in script.replace("'", ""))
    assert "NODELIST_VARIABLE[2]=HPC_COMPOSE_GROUP_WORKER_POOL_NODELIST" in script
    # The keeper runs one task on every node of every group: one heterogeneous step.
    assert ("--overlap --het-group=0 --nodes=1 --ntasks=1" in script
            and "--overlap --het-group=1 --nodes=2 --ntasks=2" in script)


def test_a_heterogeneous_script_passes_bash_n_and_shellcheck(tmp_path):
    script = tmp_path / "het.sbatch"
    script.write_text(hc.render_script(_heterogeneous(tmp_path)))
    _check_syntax(script)


def test_a_plain_job_renders_no_group_pieces(tmp_path):
    script = hc.render_script(runtime_plan(service()))
    assert "hetjob" not in script and "--het-group" not in script
    assert "HPC_COMPOSE_GROUP" not in script and "NODELIST_VARIABLE[0]" not in script
