"""`run SERVICE [-- COMMAND]`: argv, the spec and batch script of a run job, its errors and exit codes.

End-to-end runs on the real cluster are in test_run_e2e.py.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

import hpc_compose

STACK = """\
name: shop
x-slurm:
  time: "00:05:00"
  array: "0-3"
services:
  db:
    image: redis:7
    readiness:
      type: tcp
      port: 6379
  cache:
    image: redis:7
  web:
    image: python:3.11-slim
    command: ["python3", "-m", "http.server"]
    working_dir: /srv
    environment:
      MODE: prod
      KEEP: "yes"
    volumes:
      - ./static:/srv/static:ro
    depends_on:
      db:
        condition: service_healthy
    readiness:
      type: http
      url: http://127.0.0.1:8000/
    x-slurm:
      failure_policy:
        mode: restart_on_failure
  tool:
    image: busybox
    entrypoint: "/bin/sh -c"
    command: "echo default"
  local:
    x-slurm:
      runtime: host
    command: ["hostname"]
"""


def run_args(*argv):
    return hpc_compose.build_parser("run").parse_args(["run"] + list(argv))


def stack_spec(tmp_path, service="web"):
    (tmp_path / "compose.yaml").write_text(STACK)
    return hpc_compose.load_spec(str(tmp_path / "compose.yaml"), services=[service])


def run_spec(tmp_path, service="web", **request):
    return hpc_compose._run_spec(stack_spec(tmp_path, service),
                                 hpc_compose._RunRequest(service, **request), str(tmp_path / "here"))


def by_name(spec, name):
    return next(s for s in spec.services if s.name == name)


# --- argv ---------------------------------------------------------------------------------------

def test_everything_after_the_service_is_the_command_options_included():
    args = run_args("-e", "A=1", "--detach", "web", "python3", "--detach", "-e", "x")
    assert (args.service, args.command, args.env, args.detach) == (
        "web", ["python3", "--detach", "-e", "x"], ["A=1"], True)


def test_double_dash_separates_the_command():
    args = run_args("web", "--", "sh", "-c", "exit 3")
    assert args.service == "web"
    assert args.command in (["sh", "-c", "exit 3"], ["--", "sh", "-c", "exit 3"])


def test_options_before_the_service_are_run_options():
    args = run_args("--no-deps", "-v", "./a:/a", "--volume", "/b:/b:ro", "-w", "/a",
                    "--name", "one-off", "-e", "A=1", "--env", "B=2", "web")
    assert (args.no_deps, args.volumes, args.workdir, args.name, args.env, args.command) == (
        True, ["./a:/a", "/b:/b:ro"], "/a", "one-off", ["A=1", "B=2"], [])


def test_run_is_in_every_completion_script(cli):
    for shell in ("bash", "zsh", "fish"):
        result = cli(["completions", shell])
        assert result.code == 0
        assert " run" in result.out or "'run'" in result.out or "run)" in result.out
    bash = cli(["completions", "bash"]).out
    case = [line for line in bash.splitlines() if line.strip().startswith("run)")]
    assert case and all(option in case[0] for option in ("--detach", "--no-deps", "--volume",
                                                        "--workdir", "--name", "--env"))


# --- the spec of a run job ----------------------------------------------------------------------

def test_run_job_has_the_service_and_its_dependencies_only(tmp_path):
    spec = run_spec(tmp_path)
    assert [s.name for s in spec.services] == ["db", "web"]


def test_no_deps_leaves_the_dependencies_out(tmp_path):
    spec = run_spec(tmp_path, no_deps=True)
    assert [s.name for s in spec.services] == ["web"]
    assert by_name(spec, "web").depends_on == ()


def test_dependencies_keep_their_readiness_and_the_run_service_has_none(tmp_path):
    spec = run_spec(tmp_path)
    assert by_name(spec, "db").readiness.type == "tcp"
    assert by_name(spec, "web").depends_on == (("db", "service_healthy"),)
    assert by_name(spec, "web").readiness is None


def test_run_service_is_not_restarted_so_the_job_ends_with_it(tmp_path):
    plan = hpc_compose.build_plan(run_spec(tmp_path))
    web = next(s for s in plan.services if s.name == "web")
    assert web.failure_policy.mode == "fail_job"
    assert hpc_compose._job_ending_services(plan) == ["web"]


def test_command_replaces_the_services_command_in_exec_form(tmp_path):
    spec = run_spec(tmp_path, command=("sh", "-c", "echo $HOME; exit 3"))
    assert by_name(spec, "web").command == ("sh", "-c", "echo $HOME; exit 3")


def test_no_command_keeps_the_services_own(tmp_path):
    assert by_name(run_spec(tmp_path), "web").command == ("python3", "-m", "http.server")


def test_command_after_a_shell_form_entrypoint_is_quoted_into_its_script(tmp_path):
    spec = run_spec(tmp_path, "tool", command=("echo", "it's $HOME"))
    plan = hpc_compose.build_plan(spec)
    assert plan.services[0].execution.script == "/bin/sh -c echo 'it'\"'\"'s $HOME'"


def test_entrypoint_replaces_the_images_and_takes_the_command_as_its_arguments(tmp_path):
    spec = run_spec(tmp_path, entrypoint="python3 -u", command=("serve.py", "--port", "1"))
    execution = hpc_compose.build_plan(spec).services[-1].execution
    assert (execution.form, execution.argv) == ("exec", ("python3", "-u", "serve.py", "--port", "1"))
    assert not execution.use_image_entrypoint


def test_entrypoint_keeps_the_services_own_command(tmp_path):
    execution = hpc_compose.build_plan(run_spec(tmp_path, entrypoint="nice -n 5")).services[-1] \
        .execution
    assert execution.argv == ("nice", "-n", "5", "python3", "-m", "http.server")


def test_entrypoint_before_a_shell_form_command_joins_its_script(tmp_path):
    spec = run_spec(tmp_path, "tool", entrypoint="bash -c")
    assert hpc_compose.build_plan(spec).services[0].execution.script == "bash -c echo default"


def test_an_empty_entrypoint_clears_it_and_the_command_runs_alone(tmp_path):
    execution = hpc_compose.build_plan(run_spec(tmp_path, "tool", entrypoint="",
                                                command=("ls", "/"))).services[0].execution
    assert (execution.form, execution.argv, execution.use_image_entrypoint) == (
        "exec", ("ls", "/"), False)
    shell = hpc_compose.build_plan(run_spec(tmp_path, "tool", entrypoint="")).services[0].execution
    assert (shell.script, shell.use_image_entrypoint) == ("echo default", False)


@pytest.mark.parametrize("service, entrypoint, message, hint", [
    ("cache", "", "--entrypoint '' clears the entrypoint, and service 'cache' has no command to "
                  "run instead", "give the command after the service: run --entrypoint '' cache "
                                 "-- COMMAND"),
    ("web", "sh -c 'unclosed", "--entrypoint \"sh -c 'unclosed\": No closing quotation",
     "quote it as you would in a shell, e.g. --entrypoint 'python3 -u'"),
])
def test_bad_entrypoints_are_usage_errors(tmp_path, service, entrypoint, message, hint):
    with pytest.raises(hpc_compose.UsageError) as caught:
        run_spec(tmp_path, service, entrypoint=entrypoint)
    assert (caught.value.message, caught.value.hint) == (message, hint)


def test_compose_habits_rm_and_no_tty_are_accepted():
    args = run_args("--rm", "-T", "--entrypoint", "python3 -u", "web", "x.py")
    assert (args.rm, args.no_tty, args.entrypoint, args.service, args.command) == (
        True, True, "python3 -u", "web", ["x.py"])
    assert run_args("--no-TTY", "web").no_tty


def test_environment_is_set_on_top_of_the_services_own(tmp_path):
    spec = run_spec(tmp_path, environment=(("MODE", "debug"), ("NEW", "a b"), ("NEW", "c")))
    assert by_name(spec, "web").environment == (("MODE", "debug"), ("KEEP", "yes"),
                                                ("NEW", "c"))


def test_volumes_are_added_with_host_paths_relative_to_the_current_directory(tmp_path):
    spec = run_spec(tmp_path, volumes=("./data:/data", "/abs:/abs:ro", "~/x:/x"))
    volumes = by_name(spec, "web").volumes
    assert volumes == ("./static:/srv/static:ro", str(tmp_path / "here" / "data") + ":/data",
                       "/abs:/abs:ro", os.path.expanduser("~/x") + ":/x")


def test_workdir_replaces_the_working_directory(tmp_path):
    assert by_name(run_spec(tmp_path, working_dir="/tmp"), "web").working_dir == "/tmp"


def test_host_workdir_is_relative_to_the_current_directory(tmp_path):
    spec = run_spec(tmp_path, "local", working_dir="sub")
    assert by_name(spec, "local").working_dir == str(tmp_path / "here" / "sub")


def test_job_name_defaults_to_the_stacks_name_run_and_the_service(tmp_path):
    assert hpc_compose.build_plan(run_spec(tmp_path)).job_name == "shop-run-web"
    assert hpc_compose.build_plan(run_spec(tmp_path, job_name="mine")).job_name == "mine"


def test_a_run_job_is_one_job_not_an_array(tmp_path):
    assert stack_spec(tmp_path).slurm.array == "0-3"
    assert run_spec(tmp_path).slurm.array is None


@pytest.mark.parametrize("request_fields, message", [
    ({"volumes": ("data:/d",)}, "--volume: mount 'data:/d' uses the named volume 'data'"),
    ({"volumes": ("./d:rel",)}, "--volume: mount './d:rel': the container path must be absolute"),
    ({"volumes": ("./d:/hpc-compose/job",)}, "reserved for the per-job directory"),
    ({"working_dir": "relative"}, "--workdir 'relative' must be an absolute container path"),
    ({"job_name": " "}, "--name must be a non-empty single line"),
    ({"job_name": "a\nb"}, "--name must be a non-empty single line"),
])
def test_bad_run_options_are_usage_errors(tmp_path, request_fields, message):
    with pytest.raises(hpc_compose.UsageError) as caught:
        run_spec(tmp_path, **request_fields)
    assert message in caught.value.message
    assert caught.value.exit_code == 2


def test_volume_with_the_host_runtime_is_refused(tmp_path):
    with pytest.raises(hpc_compose.UsageError) as caught:
        run_spec(tmp_path, "local", volumes=("./d:/d",))
    assert caught.value.message == ("--volume is not available for service 'local': it uses the "
                                    "host runtime and already sees the node's file system")


def test_workdir_without_any_command_is_refused(tmp_path):
    with pytest.raises(hpc_compose.UsageError) as caught:
        run_spec(tmp_path, "cache", working_dir="/data")
    assert "--workdir needs a command" in caught.value.message
    assert caught.value.hint == "give the command after the service: run --workdir /data cache -- COMMAND"


# --- the rendered script (run --dry-run) -------------------------------------------------------

def dry_run(cli, tmp_path, *argv):
    (tmp_path / "compose.yaml").write_text(STACK)
    return cli(["run", "--dry-run", "--no-preflight", "--skip-prepare"] + list(argv),
               cwd=str(tmp_path))


def test_dry_run_writes_the_run_script_beside_ups_not_over_it(cli, tmp_path):
    result = dry_run(cli, tmp_path, "web", "--", "true")
    assert result.code == 0, result
    assert (tmp_path / "hpc-compose-run-web.sbatch").is_file()
    assert not (tmp_path / "hpc-compose.sbatch").exists()


def test_rendered_run_script_has_the_command_environment_mount_workdir_and_name(cli, tmp_path):
    result = dry_run(cli, tmp_path, "-e", "EXTRA=a b", "-v", "./data:/data:ro", "-w", "/data",
                     "--name", "check-1", "web", "--", "sh", "-c", "echo \"$EXTRA\"; exit 3")
    assert result.code == 0, result
    script = (tmp_path / "hpc-compose-run-web.sbatch").read_text()
    assert "#SBATCH --job-name=check-1\n" in script
    assert "# Services in launch order: db, web\n" in script
    assert "NAME[1]=web TOKEN[1]=web POLICY[1]=fail_job ENDS_JOB[1]=1\n" in script
    assert "NAME[0]=db TOKEN[0]=db POLICY[0]=fail_job ENDS_JOB[0]=0\n" in script
    assert "READINESS[1]=none\n" in script
    assert "        EXTRA='a b' \\\n" in script
    assert ",%s:/data:ro" % (tmp_path / "data") in script
    assert "--container-workdir=/data" in script
    assert "sh -c 'echo \"$EXTRA\"; exit 3'" in script
    assert "cache" not in script.split("# Services in launch order:")[1].split("\n")[0]
    assert subprocess.run(["bash", "-n", str(tmp_path / "hpc-compose-run-web.sbatch")]).returncode == 0


def test_rendered_run_script_with_entrypoint_skips_the_images_entrypoint(cli, tmp_path):
    result = dry_run(cli, tmp_path, "--rm", "-T", "--entrypoint", "python3 -u", "web", "x.py")
    assert result.code == 0, result
    script = (tmp_path / "hpc-compose-run-web.sbatch").read_text()
    web = script.split("hpc-compose:web")[1]
    assert "--no-container-entrypoint" in web and "python3 -u x.py" in web, web[:2000]


def test_rendered_run_script_passes_shellcheck(cli, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    assert dry_run(cli, tmp_path, "-e", "A=$x", "web", "--", "echo", "it's").code == 0
    proc = subprocess.run(["shellcheck", "--format=gcc",
                           str(tmp_path / "hpc-compose-run-web.sbatch")],
                          stdout=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stdout


def test_unknown_service_suggests_the_closest_name_and_exits_2(cli, tmp_path):
    result = dry_run(cli, tmp_path, "wbe", "--", "true")
    assert result.code == 2
    assert result.err == ("error: no such service: wbe\n  hint: did you mean 'web'? services in "
                          "the file: db, cache, web, tool, local\n")


def test_malformed_env_is_a_usage_error(cli, tmp_path):
    result = dry_run(cli, tmp_path, "-e", "NOVALUE", "web")
    assert result.code == 2
    assert result.err.startswith("error: -e takes KEY=VALUE with KEY a variable name, got 'NOVALUE'")


def test_missing_service_is_a_usage_error(cli, tmp_path):
    result = dry_run(cli, tmp_path)
    assert result.code == 2
    assert result.err.startswith("error: hpc-compose run: the following arguments are required: "
                                 "SERVICE\n")


# --- submission and tracking (a stand-in sbatch) -------------------------------------------------

SBATCH_STANDIN = """#!/bin/sh
# STAND-IN for sbatch (no scheduler in unit tests): records its argv and script, answers a job id.
echo "$@" >> "$STANDIN_LOG"
echo 4242
"""


def test_detached_run_is_submitted_and_tracked_without_watching(cli, tmp_path):
    (tmp_path / "compose.yaml").write_text(STACK)
    standin = tmp_path / "sbatch"
    standin.write_text(SBATCH_STANDIN)
    standin.chmod(0o755)
    result = cli(["run", "--detach", "--no-preflight", "--skip-prepare", "--sbatch-bin",
                  str(standin), "local", "--", "uname", "-a"], cwd=str(tmp_path),
                 env={"STANDIN_LOG": str(tmp_path / "sbatch.log")})
    assert result.code == 0, result
    assert result.out == ""  # stdout is the service's; a detached run prints its facts on stderr
    assert "submitted batch job 4242" in result.err
    assert (tmp_path / "sbatch.log").read_text().split()[-1] == str(
        tmp_path / "hpc-compose-run-local.sbatch")
    latest = json.loads((tmp_path / ".hpc-compose" / "latest.json").read_text())
    assert latest["job_id"] == "4242"
    assert latest["run"] == {"service": "local", "command": ["uname", "-a"]}
    assert latest["job_name"] == "shop-run-local"
    assert [s["name"] for s in latest["services"]] == ["local"]


# --- the exit code of a watched run --------------------------------------------------------------

def watched_run(tmp_path, monkeypatch, services, scheduler_state, fmt="text"):
    """``_watch`` of a run record of ``web`` (with ``db``) whose job ended as ``services`` say."""
    project = str(tmp_path)
    job_dir = hpc_compose._job_directory(project, "77")
    os.makedirs(os.path.join(job_dir, "logs"))
    for name in ("db", "web"):
        with open(os.path.join(job_dir, "logs", name + ".log"), "w") as handle:
            handle.write("%s line 1\n%s line 2\r\n" % (name, name))
    with open(os.path.join(job_dir, "state.json"), "w") as handle:
        json.dump({"status": "failed" if scheduler_state != "COMPLETED" else "completed",
                   "services": services}, handle)
    record = {"job_id": "77", "job_dir": job_dir, "compose_file": os.path.join(project, "c.yaml"),
              "batch_log": os.path.join(project, "slurm-77.out"),
              "services": [{"name": n, "token": n, "log_path": os.path.join(job_dir, "logs",
                                                                           n + ".log")}
                           for n in ("db", "web")],
              "run": {"service": "web", "command": ["sh", "-c", "exit 3"]}}
    state = hpc_compose.SchedulerState(scheduler_state, "sacct", exit_code="3:0")
    monkeypatch.setattr(hpc_compose, "_squeue_state", lambda job_id, squeue_bin: state)
    monkeypatch.setattr(hpc_compose, "_sacct_state", lambda job_id, sacct_bin: state)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    args = types.SimpleNamespace(squeue_bin="squeue", sacct_bin="sacct")
    code = hpc_compose._watch(record, args, fmt)
    return code, out.getvalue(), err.getvalue()


def test_run_exits_with_the_services_exit_code_and_streams_only_its_lines(tmp_path, monkeypatch):
    code, out, err = watched_run(tmp_path, monkeypatch, [
        {"name": "db", "status": "stopped", "last_exit_code": 143},
        {"name": "web", "status": "failed", "last_exit_code": 3}], "FAILED")
    assert code == 3
    assert out == "web line 1\nweb line 2\n"
    assert err.splitlines()[-1] == "service 'web' exited with code 3 (job 77 FAILED)"


def test_run_of_a_service_that_exited_0_exits_0(tmp_path, monkeypatch):
    code, out, err = watched_run(tmp_path, monkeypatch, [
        {"name": "db", "status": "stopped", "last_exit_code": 143},
        {"name": "web", "status": "exited", "last_exit_code": 0}], "COMPLETED")
    assert (code, out) == (0, "web line 1\nweb line 2\n")
    assert err.splitlines()[-1] == "job 77 COMPLETED"


def test_run_whose_service_never_finished_fails_as_up_does(tmp_path, monkeypatch):
    code, out, err = watched_run(tmp_path, monkeypatch, [
        {"name": "db", "status": "failed", "last_exit_code": 1},
        {"name": "web", "status": "stopped", "last_exit_code": None}], "FAILED")
    assert code == 1
    assert "error: job 77 ended FAILED (exit 3:0)" in err
    assert "service 'db' failed (exit 1)" in err


def test_run_with_json_prints_the_exit_code_and_keeps_stdout_for_json(tmp_path, monkeypatch):
    code, out, err = watched_run(tmp_path, monkeypatch, [
        {"name": "web", "status": "failed", "last_exit_code": 3}], "FAILED", fmt="json")
    assert code == 3
    assert json.loads(out)["exit_code"] == 3
    assert "web line 1\n" in err


@pytest.mark.parametrize("services, expected", [
    ([{"name": "web", "status": "exited", "last_exit_code": 0}], 0),
    ([{"name": "web", "status": "failed", "last_exit_code": 42}], 42),
    ([{"name": "web", "status": "stopped", "last_exit_code": 143}], None),
    ([{"name": "web", "status": "failed", "last_exit_code": None}], None),
    ([{"name": "other", "status": "exited", "last_exit_code": 0}], None),
])
def test_the_services_exit_code_counts_only_when_it_exited_by_itself(services, expected):
    assert hpc_compose._run_exit_code({"services": services}, "web") == expected
    assert hpc_compose._run_exit_code(None, "web") is None


def test_status_of_a_run_job_names_its_service_and_command(hc):
    status = {"job_id": "77", "scheduler": {"state": "RUNNING", "source": "squeue"},
              "runtime": None, "job_dir": "/p/.hpc-compose/77",
              "batch_log": {"path": "/p/slurm-77.out", "present": False}, "services": [],
              "run": {"service": "web", "command": ["sh", "-c", "echo it's"]}}
    assert "  run:        service web, command sh -c 'echo it'\"'\"'s'\n" in \
        hc._format_status_text(status)
    status["run"]["command"] = None
    assert "  run:        service web, command its own\n" in hc._format_status_text(status)
