"""Job tracking on the login node: records, scheduler parsing, state.json, logs, stats, artifacts,
clean; and the metrics / artifact bash blocks of the batch script, run under real bash.

End-to-end behaviour against the real Slurm lives in test_tracking_e2e.py.
"""
import io
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import types

import pytest

import hpc_compose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers ------------------------------------------------------------------------------------

def runtime_plan_with(metrics=None, artifacts=None):
    """The part of a RuntimePlan the render-extras blocks read (x-slurm.metrics / .artifacts)."""
    slurm = hpc_compose.SlurmSpec(metrics=metrics, artifacts=artifacts)
    return types.SimpleNamespace(plan=types.SimpleNamespace(slurm=slurm))


def run_block(tmp_path, body, job_dir, env=None, path_dirs=()):
    """Run ``set -euo pipefail; JOB_DIR=...; <the script's json_string>; <body>`` under bash;
    returns the CompletedProcess."""
    script = tmp_path / "block.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\nJOB_DIR=\"$1\"\n" + hpc_compose._JSON_STRING_TEMPLATE
                      + body)
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join(list(path_dirs) + ["/usr/bin", "/bin"])
    environ.update(env or {})
    return subprocess.run([shutil.which("bash"), str(script), str(job_dir)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=environ, timeout=60)


def make_record(project_dir, job_id, services=(("app", "app"),), submitted_at=None, **extra):
    job_dir = hpc_compose._job_directory(str(project_dir), job_id)
    record = {
        "schema_version": 1, "job_id": str(job_id), "project_dir": str(project_dir),
        "compose_file": os.path.join(str(project_dir), "compose.yaml"),
        "job_dir": job_dir, "submitted_at": submitted_at if submitted_at is not None else time.time(),
        "batch_log": os.path.join(str(project_dir), "slurm-%s.out" % job_id),
        "services": [{"name": name, "token": token,
                      "log_path": os.path.join(job_dir, "logs", token + ".log")}
                     for name, token in services],
    }
    record.update(extra)
    return record


def write_state(job_dir, status, services=()):
    os.makedirs(job_dir, exist_ok=True)
    with open(os.path.join(job_dir, "state.json"), "w") as handle:
        json.dump({"schema_version": 1, "status": status, "services": list(services)}, handle)


NVIDIA_SMI_STANDIN = """#!/bin/bash
# STAND-IN for nvidia-smi (no GPU on this machine): records its argv and prints the CSV shape the
# real tool prints for --format=csv,noheader,nounits.
echo "$*" >> "$STANDIN_LOG"
case "$1" in
  --query-gpu=*)
    echo '0, GPU-1111, NVIDIA A100-SXM4-40GB, 37, 12, 1024, 40960, 41, 88.50, 400.00'
    echo '1, GPU-2222, NVIDIA A100-SXM4-40GB, [N/A], 0, 0, 40960, 30, [Not Supported], 400.00' ;;
  --query-compute-apps=*)
    echo 'GPU-1111, 4242, python3, 1000' ;;
esac
"""


@pytest.fixture
def nvidia_smi_standin(tmp_path):
    directory = tmp_path / "standin-bin"
    directory.mkdir()
    tool = directory / "nvidia-smi"
    tool.write_text(NVIDIA_SMI_STANDIN)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return str(directory), str(tmp_path / "nvidia-smi.argv")


# --- job ids and batch log paths ---------------------------------------------------------------

def test_parsable_job_id_is_parsed(hc):
    assert hc._parse_sbatch_job_id("4242\n") == ("4242", None)


def test_parsable_job_id_with_cluster_is_parsed(hc):
    assert hc._parse_sbatch_job_id("4243;cluster-a\n") == ("4243", "cluster-a")


def test_classic_sbatch_line_is_parsed(hc):
    assert hc._parse_sbatch_job_id("Submitted batch job 99\n") == ("99", None)


def test_sbatch_output_without_job_id_is_a_tool_error(hc):
    with pytest.raises(hc.ToolError) as info:
        hc._parse_sbatch_job_id("sbatch: error: Batch job submission failed\n")
    assert "job id" in info.value.message


def test_batch_log_defaults_to_slurm_jobid_out_in_compose_dir(hc, tmp_path):
    assert hc._batch_log_path(str(tmp_path), "123", "app") == str(tmp_path / "slurm-123.out")


def test_batch_log_expands_job_name_user_and_padding(hc, tmp_path):
    path = hc._batch_log_path(str(tmp_path), "123", "train", "logs/%x-%u-%8j-%A.%%.out", user="ada")
    assert path == str(tmp_path / "logs" / "train-ada-00000123-123.%.out")


def test_batch_log_keeps_node_specifier_and_absolute_paths(hc, tmp_path):
    assert hc._batch_log_path(str(tmp_path), "7", "x", "/scratch/%N-%j.log") == "/scratch/%N-7.log"


def test_batch_log_is_relative_to_chdir_when_set(hc, tmp_path):
    path = hc._batch_log_path(str(tmp_path), "7", "x", "out-%j.txt", chdir="run")
    assert path == str(tmp_path / "run" / "out-7.txt")


def test_slurm_state_is_normalized(hc):
    assert hc._normalize_slurm_state("CANCELLED by 0") == "CANCELLED"
    assert hc._normalize_slurm_state("completed+") == "COMPLETED"
    assert hc._normalize_slurm_state("") == "UNKNOWN"


def test_sstat_output_keeps_numbered_steps_only(hc):
    rows = hc._parse_sstat_output("12.batch|1|0|1K|1K|cpu=0\n12.extern|1|0|0|0|\n"
                                 "12.0|2|00:00:03|100K|200K|cpu=00:00:03,mem=100K\n")
    assert [r["step_id"] for r in rows] == ["12.0"]
    assert rows[0]["ntasks"] == "2" and rows[0]["max_rss"] == "200K"


# --- state.json --------------------------------------------------------------------------------

def test_missing_state_json_reads_as_none(hc, tmp_path):
    assert hc._load_runtime_state(str(tmp_path)) is None


def test_half_written_state_json_reads_as_none(hc, tmp_path):
    (tmp_path / "state.json").write_text('{"status": "runn')
    assert hc._load_runtime_state(str(tmp_path)) is None


def test_state_json_is_read_tolerantly(hc, tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({
        "status": "failed", "future_key": 1,
        "services": [{"name": "db", "status": "failed", "last_exit_code": 3}, "junk",
                     {"status": "running"}, {"name": "web"}]}))
    state = hc._load_runtime_state(str(tmp_path))
    assert [s["name"] for s in state["services"]] == ["db", "web"]
    assert state["services"][1]["status"] == "unknown"
    assert state["services"][0]["restarts"] is None
    assert state["future_key"] == 1 and state["exit_code"] is None


def test_failure_summary_names_failed_service_and_exit_code(hc, tmp_path):
    write_state(str(tmp_path), "failed", [
        {"name": "db", "status": "failed", "last_exit_code": 3},
        {"name": "web", "status": "stopped"},
        {"name": "probe", "status": "failed", "readiness": {"type": "tcp", "status": "timeout"}}])
    summary = hc._format_runtime_failure(hc._load_runtime_state(str(tmp_path)))
    assert "service 'db' failed (exit 3)" in summary
    assert "service 'probe' failed (readiness tcp timed out)" in summary
    assert "web" not in summary


def test_failure_summary_does_not_repeat_the_scripts_reason(hc, tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({
        "status": "failed", "reason": "service 'db' exited with code 3",
        "services": [{"name": "db", "status": "failed", "last_exit_code": 3},
                     {"name": "cache", "status": "failed", "last_exit_code": 1}]}))
    summary = hc._format_runtime_failure(hc._load_runtime_state(str(tmp_path)))
    assert summary == "service 'db' exited with code 3; service 'cache' failed (exit 1)"


# --- tracked metadata --------------------------------------------------------------------------

def _submit_many(project_dir, first_id, count):
    for job_id in range(first_id, first_id + count):
        record = make_record(project_dir, job_id, services=[("svc%d" % i, "svc%d" % i)
                                                            for i in range(30)])
        hpc_compose._record_job(project_dir, record)


def test_parallel_writers_never_corrupt_tracked_metadata(hc, tmp_path):
    project_dir = str(tmp_path)
    workers = [multiprocessing.Process(target=_submit_many, args=(project_dir, 1000 * (w + 1), 15))
               for w in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    written = sorted(os.listdir(os.path.join(project_dir, ".hpc-compose", "jobs")))
    records = [n for n in written if n.endswith(".json")]
    assert len(records) == 6 * 15
    for name in records:
        with open(os.path.join(project_dir, ".hpc-compose", "jobs", name)) as handle:
            assert json.load(handle)["job_id"] == name[:-5]
    latest = hc._load_json(hc._latest_record_path(project_dir))
    assert latest["job_id"] + ".json" in records
    assert not [n for n in written if n.endswith(".tmp")]


def test_latest_record_is_loaded_without_job_id(hc, tmp_path):
    hc._record_job(str(tmp_path), make_record(tmp_path, 5))
    hc._record_job(str(tmp_path), make_record(tmp_path, 6))
    assert hc._load_job_record(str(tmp_path))["job_id"] == "6"
    assert hc._load_job_record(str(tmp_path), "5")["job_id"] == "5"


def test_unknown_job_id_gets_a_minimal_record(hc, tmp_path):
    record = hc._load_job_record(str(tmp_path), "77")
    assert record["untracked"] and record["job_dir"] == str(tmp_path / ".hpc-compose" / "77")


def test_no_tracked_job_is_a_usage_error(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    result = cli(["status", "-f", str(tmp_path / "compose.yaml")])
    assert result.code == 2
    assert "no tracked job" in result.err and "--job-id" in result.err


def test_latest_job_is_per_compose_file_when_two_share_a_directory(hc, tmp_path):
    hc._record_job(str(tmp_path), make_record(tmp_path, 10, compose_file=str(tmp_path / "a.yaml")))
    hc._record_job(str(tmp_path), make_record(tmp_path, 11, compose_file=str(tmp_path / "b.yaml")))
    assert hc._load_job_record(str(tmp_path), compose_file=str(tmp_path / "a.yaml"))["job_id"] == "10"
    assert hc._load_job_record(str(tmp_path), compose_file=str(tmp_path / "b.yaml"))["job_id"] == "11"
    with pytest.raises(hc.UsageError) as info:
        hc._load_job_record(str(tmp_path), compose_file=str(tmp_path / "c.yaml"))
    assert "for c.yaml" in info.value.message


def test_non_numeric_job_id_is_a_usage_error(hc, tmp_path):
    with pytest.raises(hc.UsageError):
        hc._load_job_record(str(tmp_path), "12; rm -rf /")


# --- logs ---------------------------------------------------------------------------------------

def test_follower_holds_partial_lines_until_complete(hc, tmp_path):
    log = tmp_path / "a.log"
    follower = hc._LogFollower([("a", str(log))])
    assert follower.poll() == []                      # the file does not exist yet
    with open(str(log), "ab") as handle:
        handle.write(b"hel")
    assert follower.poll() == []
    with open(str(log), "ab") as handle:
        handle.write(b"lo\nwor")
    assert follower.poll() == [("a", "hello")]
    with open(str(log), "ab") as handle:
        handle.write("ld \u00e9\n".encode("utf-8"))
    assert follower.poll() == [("a", "world \u00e9")]


def test_follower_flush_returns_the_last_partial_line(hc, tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"one\ntwo")
    follower = hc._LogFollower([("a", str(log))])
    assert follower.poll() == [("a", "one")]
    assert follower.flush() == [("a", "two")]
    assert follower.flush() == []


def test_follower_restarts_a_truncated_file(hc, tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"first run line\n")
    follower = hc._LogFollower([("a", str(log))])
    assert follower.poll() == [("a", "first run line")]
    log.write_bytes(b"new\n")
    assert follower.poll() == [("a", "new")]


def test_follower_from_end_skips_existing_lines(hc, tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(b"old\n")
    follower = hc._LogFollower([("a", str(log))], from_end=True)
    with open(str(log), "ab") as handle:
        handle.write(b"new\n")
    assert follower.poll() == [("a", "new")]


def test_follower_gives_the_file_written_last_last(hc, tmp_path):
    # The worker's last line, then the server's stop that it caused, read in one poll: in that order.
    web, worker = tmp_path / "web.log", tmp_path / "worker.log"
    follower = hc._LogFollower([("web", str(web)), ("worker", str(worker))])
    worker.write_bytes(b"fetched\n")
    web.write_bytes(b"### hpc-compose: stopping service 'web'\n")
    os.utime(str(worker), ns=(10 ** 18, 10 ** 18))
    os.utime(str(web), ns=(10 ** 18 + 1, 10 ** 18 + 1))
    assert follower.poll() == [("worker", "fetched"),
                               ("web", "### hpc-compose: stopping service 'web'")]
    with open(str(web), "ab") as handle:
        handle.write(b"a\n")
    with open(str(worker), "ab") as handle:
        handle.write(b"b\n")
    os.utime(str(worker), ns=(10 ** 18 + 2, 10 ** 18 + 2))
    os.utime(str(web), ns=(10 ** 18 + 2, 10 ** 18 + 2))
    assert follower.poll() == [("web", "a"), ("worker", "b")]  # at the same time: in source order


def test_tail_returns_last_lines(hc, tmp_path):
    log = tmp_path / "a.log"
    log.write_text("".join("line %d\n" % i for i in range(5000)))
    assert hc._tail_lines(str(log), 3) == ["line 4997", "line 4998", "line 4999"]
    assert hc._tail_lines(str(tmp_path / "missing.log"), 3) == []


def test_logs_command_prefixes_lines_and_honours_tail(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, 31, services=[("web", "web"), ("my.app", "my_x2e_app")])
    hc._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"))
    with open(record["services"][0]["log_path"], "w") as handle:
        handle.write("a\nb\nc\n")
    with open(record["services"][1]["log_path"], "w") as handle:
        handle.write("x\n")
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml"), "--tail", "2"])
    assert result.code == 0
    assert result.out.splitlines() == ["[web] b", "[web] c", "[my.app] x"]
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml"), "--service", "my.app"])
    assert result.out.splitlines() == ["[my.app] x"]


# A service the batch script stopped because the job's final services ended, as its log holds it
# on Slurm 22.05: hpc-compose's note, then Slurm's report of the stop.
STOPPED_WEB_LOG = """\
Serving HTTP on 127.0.0.1 port 18080 (http://127.0.0.1:18080/) ...
### hpc-compose: stopping service 'web' (SIGTERM) at 2026-12-06T06:11:21+00:00 after the job's final services ended
slurmstepd-vm: error: *** STEP 1.0 ON vm CANCELLED AT 2026-12-06T06:11:21 ***
srun: Job step aborted: Waiting up to 32 seconds for job step to finish.
srun: error: vm: task 0: Terminated
srun: forcing job termination
srun: Force Terminated StepId=1.0
"""


def _shown(hc, lines, name="web"):
    out = io.StringIO()
    show = hc._prefixed_lines(out)
    for line in lines:
        show(name, line)
    return out.getvalue().splitlines()


def test_prefixed_output_shows_a_stop_of_hpc_compose_s_own_as_one_line_instead_of_slurms(hc):
    assert _shown(hc, STOPPED_WEB_LOG.splitlines()) == [
        "[web] Serving HTTP on 127.0.0.1 port 18080 (http://127.0.0.1:18080/) ...",
        "[web] stopped by hpc-compose after the job's final services ended (SIGTERM)"]


def test_later_slurm_versions_words_for_the_stop_are_left_out_too(hc):
    assert _shown(hc, [
        "### hpc-compose: stopping service 'web' (SIGTERM) at T after the job failed: service "
        "'client' exited with code 3",
        "slurmstepd: error: *** STEP 12.3 ON n1 CANCELLED AT 2026-12-06T06:11:21 ***",
        "srun: launch/slurm: _step_signal: Terminating StepId=12.3",
        "srun: Received task exit notification for 3 tasks of StepId=12.3 (status=0x000f).",
        "srun: error: n[1-3]: tasks 0-2: Killed",
        "shutting down"]) == [
        "[web] stopped by hpc-compose after the job failed: service 'client' exited with code 3 "
        "(SIGTERM)", "[web] shutting down"]


def test_slurm_26_05_s_time_stamped_report_naming_the_signal_is_left_out_too(hc):
    assert _shown(hc, [
        "### hpc-compose: stopping service 'web' (SIGTERM) at T after the job's final services "
        "ended",
        "[2026-12-06T11:03:36.835] error: *** STEP 263.0 ON vm CANCELLED AT 2026-12-06T11:03:36 "
        "DUE to SIGNAL Terminated ***",
        "srun: error: vm: task 0: Terminated"]) == [
        "[web] stopped by hpc-compose after the job's final services ended (SIGTERM)"]


def test_a_stop_without_hpc_compose_s_note_keeps_slurms_words(hc):
    # scancel, the time limit, a node failure: the batch script notes nothing, Slurm says why.
    lines = ["slurmstepd-vm: error: *** STEP 1.0 ON vm CANCELLED AT 2026-12-06T06:11:21 ***",
             "srun: error: vm: task 0: Terminated", "srun: Force Terminated StepId=1.0"]
    assert _shown(hc, lines) == ["[web] " + line for line in lines]


def test_slurms_report_of_a_cancellation_for_its_own_reason_stays_after_a_note(hc):
    assert _shown(hc, [
        "### hpc-compose: stopping service 'web' (SIGTERM) at T after the job's final services "
        "ended",
        "slurmstepd-vm: error: *** STEP 1.0 ON vm CANCELLED AT 2026-12-06T06:11:21 DUE TO TIME "
        "LIMIT ***"])[1:] == [
        "[web] slurmstepd-vm: error: *** STEP 1.0 ON vm CANCELLED AT 2026-12-06T06:11:21 DUE TO "
        "TIME LIMIT ***"]


def test_a_relaunch_after_a_stop_shows_slurms_next_report_and_other_services_are_untouched(hc):
    out = io.StringIO()
    show = hc._prefixed_lines(out)
    show("web", "### hpc-compose: stopping service 'web' (SIGTERM) at T after tcp 127.0.0.1:80 "
                "readiness did not succeed within 5 s, for a restart")
    show("web", "srun: error: vm: task 0: Terminated")
    show("db", "srun: error: vm: task 0: Terminated")
    show("web", "### hpc-compose: restarting service 'web' (restart 1 of 2, previous exit code "
                "143) at T")
    show("web", "srun: error: vm: task 0: Terminated")
    assert out.getvalue().splitlines() == [
        "[web] stopped by hpc-compose after tcp 127.0.0.1:80 readiness did not succeed within 5 s, "
        "for a restart (SIGTERM)",
        "[db] srun: error: vm: task 0: Terminated",
        "[web] ### hpc-compose: restarting service 'web' (restart 1 of 2, previous exit code 143) "
        "at T",
        "[web] srun: error: vm: task 0: Terminated"]


def test_logs_shows_the_stop_note_the_log_file_and_no_prefix_keep_slurms_lines(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, 33, services=[("web", "web")])
    hc._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"))
    with open(record["services"][0]["log_path"], "w") as handle:
        handle.write(STOPPED_WEB_LOG)
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml")])
    assert result.code == 0
    assert result.out.splitlines() == _shown(hc, STOPPED_WEB_LOG.splitlines())
    assert "error" not in result.out
    raw = cli(["logs", "-f", str(tmp_path / "compose.yaml"), "--no-prefix"])
    assert raw.out == STOPPED_WEB_LOG


def _up_local_outside_slurm(tmp_path, services):
    """``up --local`` of a host-runtime stack on this machine (bash, no Slurm): (code, out, web log)."""
    (tmp_path / "compose.yaml").write_text(
        "name: stops\nx-slurm: {runtime: host, time: '00:05:00'}\nservices:\n" + services)
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("SLURM_"))
    proc = subprocess.run([sys.executable, hpc_compose.__file__, "up", "--local", "--no-preflight",
                           "-f", "compose.yaml"], cwd=str(tmp_path), env=env, timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    logs = list((tmp_path / ".hpc-compose").glob("local-*/logs/web.log"))
    return proc.returncode, proc.stdout, logs[0].read_text() if logs else None


WEB = """\
  web:
    command: echo serving; exec sleep 300
    readiness: {type: log, pattern: serving}
"""


def test_the_batch_script_notes_a_stop_after_the_final_services_ended_and_up_shows_it(tmp_path):
    code, out, log = _up_local_outside_slurm(tmp_path, WEB + """\
  client:
    depends_on: {web: {condition: service_healthy}}
    command: echo done
""")
    assert code == 0, out
    assert "[web] stopped by hpc-compose after the job's final services ended (SIGTERM)\n" in out
    assert log.startswith("serving\n### hpc-compose: stopping service 'web' (SIGTERM) at ")
    assert log.endswith(" after the job's final services ended\n")


def test_the_batch_script_notes_a_stop_after_another_service_failed(tmp_path):
    code, out, log = _up_local_outside_slurm(tmp_path, WEB + """\
  client:
    depends_on: {web: {condition: service_healthy}}
    command: exit 3
""")
    assert code == 3, out
    assert ("[web] stopped by hpc-compose after the job failed: service 'client' exited with code 3 "
            "(SIGTERM)\n") in out
    assert log.count("### hpc-compose: stopping service 'web'") == 1


def test_the_batch_script_notes_a_stop_for_a_restart_and_each_stop_shows_once(tmp_path):
    code, out, log = _up_local_outside_slurm(tmp_path, """\
  web:
    command: echo launched; exec sleep 300
    readiness: {type: log, pattern: never-said, timeout_seconds: 1}
    x-slurm:
      failure_policy: {mode: restart_on_failure, max_restarts: 1, backoff_seconds: 1}
""")
    assert code == 124, out
    notes = [line for line in log.splitlines() if line.startswith("### hpc-compose: stopping")]
    assert [note.split(" after ", 1)[1] for note in notes] == [
        'log pattern "never-said" readiness did not succeed within 1 s, for a restart',
        "the job failed: service 'web': log pattern \"never-said\" readiness did not succeed "
        "within 1 s, after 1 restarts (max_restarts 1)"]
    assert [line for line in out.splitlines() if line.startswith("[web] stopped by")] == [
        "[web] stopped by hpc-compose after " + note.split(" after ", 1)[1] + " (SIGTERM)"
        for note in notes]


def test_logs_of_unknown_service_is_a_usage_error(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    hc._record_job(str(tmp_path), make_record(tmp_path, 32))
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml"), "--service", "nope"])
    assert result.code == 2 and "no service 'nope'" in result.err and "app" in result.err


# --- scheduler polling policy -------------------------------------------------------------------

def test_poller_backs_off_and_resets_after_a_change(hc, monkeypatch):
    now = [0.0]
    states = iter(["PENDING", "PENDING", "PENDING", "RUNNING", "RUNNING"])
    monkeypatch.setattr(hc, "_squeue_state",
                        lambda job_id, squeue_bin: hc.SchedulerState(next(states), "squeue"))
    poller = hc._SchedulerPoller("1", clock=lambda: now[0], first=2.0, cap=8.0)
    intervals = []
    for _ in range(5):
        poller.poll()
        intervals.append(poller.interval)
    assert intervals == [2.0, 4.0, 8.0, 2.0, 4.0]
    assert poller.calls == 5


def test_poller_asks_sacct_only_after_the_job_left_the_queue(hc, monkeypatch):
    asked = []
    queue = iter([hc.SchedulerState("RUNNING", "squeue"), None])

    def fake_squeue(job_id, squeue_bin):
        asked.append("squeue")
        return next(queue)

    def fake_sacct(job_id, sacct_bin):
        asked.append("sacct")
        return hc.SchedulerState("COMPLETED", "sacct", exit_code="0:0")

    monkeypatch.setattr(hc, "_squeue_state", fake_squeue)
    monkeypatch.setattr(hc, "_sacct_state", fake_sacct)
    poller = hc._SchedulerPoller("1", clock=lambda: 0.0)
    assert poller.poll()[0].state == "RUNNING"
    assert asked == ["squeue"]
    state, changed = poller.poll()
    assert state.state == "COMPLETED" and state.source == "sacct" and changed
    assert asked == ["squeue", "squeue", "sacct"]


def scripted_squeue(answers):
    """A _squeue_state replacement that gives ``answers`` in order (an exception is raised)."""
    def squeue(job_id, squeue_bin):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    return squeue


def test_poller_keeps_its_state_through_a_transient_squeue_failure(hc, monkeypatch):
    answers = [hc.SchedulerState("RUNNING", "squeue"), hc.ToolError("squeue failed: timeout"),
               hc.SchedulerState("RUNNING", "squeue")]
    monkeypatch.setattr(hc, "_squeue_state", scripted_squeue(answers))
    monkeypatch.setattr(hc, "_sacct_state", lambda job_id, sacct_bin: pytest.fail("sacct asked"))
    poller = hc._SchedulerPoller("1", squeue_bin=shutil.which("true"), clock=lambda: 0.0)
    assert poller.poll() == (hc.SchedulerState("RUNNING", "squeue"), True)
    assert poller.poll() == (hc.SchedulerState("RUNNING", "squeue"), False)
    assert not poller.left_queue
    assert poller.poll()[0].state == "RUNNING"


def test_poller_without_squeue_binary_raises(hc):
    poller = hc._SchedulerPoller("1", squeue_bin="/nonexistent/squeue", clock=lambda: 0.0)
    with pytest.raises(hc.ToolError):
        poller.poll()


# --- clean --------------------------------------------------------------------------------------

def _tracked(tmp_path, job_id, age_days, status=None):
    record = make_record(tmp_path, job_id, submitted_at=time.time() - age_days * 86400)
    hpc_compose._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"), exist_ok=True)
    if status:
        write_state(record["job_dir"], status)
    return record


def test_clean_age_removes_old_finished_jobs_only(hc, tmp_path):
    old = _tracked(tmp_path, 1, 10, "completed")
    young = _tracked(tmp_path, 2, 1, "completed")
    _tracked(tmp_path, 3, 0, "completed")             # latest
    removed, kept = hc._clean_jobs(str(tmp_path), age_days=7, squeue_bin="/nonexistent/squeue")
    assert removed == ["1"]
    assert not os.path.exists(old["job_dir"])
    assert not os.path.exists(hc._job_record_path(str(tmp_path), "1"))
    assert os.path.isdir(young["job_dir"])


def test_clean_all_keeps_the_latest_job(hc, tmp_path):
    for job_id in (1, 2, 3):
        _tracked(tmp_path, job_id, 5, "failed")
    removed, kept = hc._clean_jobs(str(tmp_path), remove_all=True, squeue_bin="/nonexistent/squeue")
    assert removed == ["1", "2"]
    assert kept == {"3": "latest tracked job"}
    assert os.path.isdir(os.path.join(str(tmp_path), ".hpc-compose", "3"))


def test_clean_removes_the_up_local_lock_of_a_removed_job_unless_held(hc, tmp_path):
    import fcntl
    for job_id in (1, 2, 3):
        _tracked(tmp_path, job_id, 5, "completed")
    root = tmp_path / ".hpc-compose"
    for job_id in (1, 2, 3):
        (root / (".%d.local-lock" % job_id)).write_text("")
    with open(str(root / ".2.local-lock"), "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        removed, _ = hc._clean_jobs(str(tmp_path), remove_all=True, squeue_bin="/nonexistent/squeue")
    assert removed == ["1", "2"]
    assert sorted(p.name for p in root.glob(".*.local-lock")) == [".2.local-lock", ".3.local-lock"]


def test_clean_never_removes_a_job_it_cannot_prove_finished(hc, tmp_path):
    running = _tracked(tmp_path, 1, 30, "running")
    unstarted = _tracked(tmp_path, 2, 30)
    _tracked(tmp_path, 3, 0, "completed")
    removed, kept = hc._clean_jobs(str(tmp_path), remove_all=True, squeue_bin="/nonexistent/squeue")
    assert removed == []
    assert set(kept) == {"1", "2", "3"}
    assert os.path.isdir(running["job_dir"]) and os.path.isdir(unstarted["job_dir"])


def test_clean_leaves_another_compose_files_jobs_alone(hc, cli, tmp_path):
    for job_id, name in ((1, "a.yaml"), (2, "b.yaml"), (3, "a.yaml"), (4, "b.yaml")):
        record = make_record(tmp_path, job_id, submitted_at=time.time() - 9 * 86400,
                             compose_file=str(tmp_path / name))
        hc._record_job(str(tmp_path), record)
        write_state(record["job_dir"], "completed")
    (tmp_path / "a.yaml").write_text("services: {}\n")
    result = cli(["clean", "-f", str(tmp_path / "a.yaml"), "--all",
                  "--squeue-bin", "/nonexistent/squeue"])
    assert result.code == 0, result
    assert "removed 1 tracked job(s): 1" in result.out
    assert "kept job 3: latest tracked job" in result.out
    assert os.path.isdir(os.path.join(str(tmp_path), ".hpc-compose", "2"))


def test_clean_command_reports_what_it_removed(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    _tracked(tmp_path, 8, 9, "cancelled")
    _tracked(tmp_path, 9, 0, "completed")
    result = cli(["clean", "-f", str(tmp_path / "compose.yaml"), "--age", "7",
                  "--squeue-bin", "/nonexistent/squeue"])
    assert result.code == 0
    assert "removed 1 tracked job(s): 8" in result.out


def test_clean_requires_age_or_all(hc, cli, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    assert cli(["clean", "-f", str(tmp_path / "compose.yaml")]).code == 2


# --- the metrics block --------------------------------------------------------------------------

def test_metrics_block_is_empty_when_disabled(hc):
    # The script then neither defines nor calls metrics_start / metrics_stop (test_render.py).
    assert hc.render_metrics_block(runtime_plan_with(hc.MetricsSpec(enabled=False))) == ""


def test_metrics_block_passes_shellcheck(hc, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    block = hc.render_metrics_block(runtime_plan_with(hc.MetricsSpec(interval_seconds=3)))
    script = tmp_path / "m.sh"
    script.write_text("#!/bin/bash\nJOB_DIR=/x\n" + hc._JSON_STRING_TEMPLATE + block
                      + "metrics_start\nmetrics_stop\n")
    result = subprocess.run(["shellcheck", str(script)], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout


def test_metrics_and_artifacts_blocks_escape_control_characters_like_state_json(hc, tmp_path):
    block = hc.render_metrics_block(runtime_plan_with(hc.MetricsSpec(interval_seconds=1)))
    result = run_block(tmp_path, block + "metrics_json_value $' a\\x01b\\tc\\n '; echo \"$JSON\"\n"
                       "metrics_json_value ' [N/A] '; echo \"$JSON\"\n", tmp_path / "job")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == ["a\x01b\tc", None]


def test_metrics_block_without_tools_marks_collectors_unavailable(hc, tmp_path):
    block = hc.render_metrics_block(runtime_plan_with(hc.MetricsSpec(interval_seconds=1)))
    job_dir = tmp_path / "job"
    # Only coreutils on PATH: neither nvidia-smi nor sstat.
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    for tool in ("date", "mkdir", "mv", "sleep"):
        os.symlink(shutil.which(tool), str(bare / tool))
    result = run_block(tmp_path, block + "metrics_start\nmetrics_stop\necho survived\n", job_dir,
                       env={"PATH": str(bare)})
    assert result.returncode == 0 and "survived" in result.stdout
    assert "metrics warning [gpu]: nvidia-smi not found" in result.stderr
    meta = json.loads((job_dir / "metrics" / "meta.json").read_text())
    by_name = dict((c["name"], c) for c in meta["collectors"])
    assert by_name["gpu"]["available"] is False and by_name["slurm"]["available"] is False
    assert meta["interval_seconds"] == 1
    for name in ("gpu.jsonl", "gpu_processes.jsonl", "slurm.jsonl"):
        assert (job_dir / "metrics" / name).read_text() == ""


def test_metrics_block_samples_gpus_in_background(hc, tmp_path, nvidia_smi_standin):
    standin_dir, argv_log = nvidia_smi_standin
    block = hc.render_metrics_block(runtime_plan_with(
        hc.MetricsSpec(interval_seconds=1, collectors=("gpu",))))
    job_dir = tmp_path / "job"
    result = run_block(tmp_path, block + "metrics_start\nsleep 2.5\nmetrics_stop\n", job_dir,
                       env={"STANDIN_LOG": argv_log}, path_dirs=[standin_dir])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(l) for l in (job_dir / "metrics" / "gpu.jsonl").read_text().splitlines()]
    assert len(rows) >= 4                               # 2 GPUs x (first sample + >= 1 more)
    assert len(set(r["sampled_at"] for r in rows)) >= 2
    assert rows[0]["name"] == "NVIDIA A100-SXM4-40GB" and rows[0]["utilization_gpu"] == "37"
    assert rows[1]["utilization_gpu"] is None and rows[1]["power_draw_w"] is None
    processes = (job_dir / "metrics" / "gpu_processes.jsonl").read_text().splitlines()
    assert json.loads(processes[0])["pid"] == "4242"
    meta = json.loads((job_dir / "metrics" / "meta.json").read_text())
    gpu = [c for c in meta["collectors"] if c["name"] == "gpu"][0]
    slurm = [c for c in meta["collectors"] if c["name"] == "slurm"][0]
    assert gpu["available"] is True and slurm["enabled"] is False
    assert "--query-gpu=index,uuid,name" in open(argv_log).read()


def _stats_record(tmp_path, job_dir):
    return {"job_id": "5", "job_dir": str(job_dir), "project_dir": str(tmp_path), "services": []}


def test_stats_reads_latest_sampler_group_as_csv_and_jsonl(hc, tmp_path, nvidia_smi_standin):
    standin_dir, argv_log = nvidia_smi_standin
    block = hc.render_metrics_block(runtime_plan_with(
        hc.MetricsSpec(interval_seconds=1, collectors=("gpu",))))
    job_dir = tmp_path / "job"
    run_block(tmp_path, block + "metrics_start\nsleep 1.5\nmetrics_stop\n", job_dir,
              env={"STANDIN_LOG": argv_log}, path_dirs=[standin_dir])
    # Steps as the in-job sampler writes them from sstat (rows appended per sample).
    with open(str(job_dir / "metrics" / "slurm.jsonl"), "a") as handle:
        for at, cpu in (("2026-01-01T00:00:00Z", "00:00:01"), ("2026-01-01T00:00:05Z", "00:00:06")):
            handle.write(json.dumps({"sampled_at": at, "step_id": "5.0", "ntasks": "1",
                                     "ave_cpu": cpu, "ave_rss": "10K", "max_rss": "20K",
                                     "tres_usage_in_ave": "cpu=%s,gres/gpuutil=50" % cpu}) + "\n")
        handle.write('{"sampled_at": "2026-01-01T00:00:1')     # a half-written last line
    stats = hc._collect_stats(_stats_record(tmp_path, job_dir), sstat_bin="/nonexistent/sstat",
                             squeue_bin="/nonexistent/squeue", sacct_bin="/nonexistent/sacct")
    assert stats["source"] == "sampler" and stats["available"]
    assert [s["ave_cpu"] for s in stats["steps"]] == ["00:00:06"]
    assert stats["steps"][0]["gpu_util"] == "50"
    assert len(stats["gpus"]) == 2
    csv_lines = hc._format_stats_csv(stats).splitlines()
    assert csv_lines[0] == ",".join('"%s"' % c for c in hc._STATS_CSV_COLUMNS)
    assert csv_lines[1].startswith('"5","UNKNOWN","none","sampler","5.0","1","00:00:06"')
    assert '"cpu=00:00:06;gres/gpuutil=50"' in csv_lines[1]
    records = [json.loads(l) for l in hc._format_stats_jsonl(stats).splitlines()]
    assert [r["type"] for r in records] == ["summary", "collector", "collector", "gpu_device",
                                            "gpu_device", "gpu_process", "step"]
    assert records[0]["scheduler_warning"].startswith("the scheduler did not answer (required "
                                                      "binary '/nonexistent/squeue' was not found)")
    assert all(r["job_id"] == "5" for r in records)


# --- the artifacts block and export -------------------------------------------------------------

ARTIFACTS = hpc_compose.ArtifactsSpec(
    export_dir="./results/${SLURM_JOB_ID}", collect="always",
    paths=("/hpc-compose/job/metrics/**",),
    bundles=(("checkpoints", ("/hpc-compose/job/ckpt/*.pt", "/hpc-compose/job/notes dir",
                              "/hpc-compose/job/missing/*")),))


def _job_with_files(tmp_path):
    job_dir = tmp_path / "proj" / ".hpc-compose" / "41"
    (job_dir / "ckpt").mkdir(parents=True)
    (job_dir / "metrics").mkdir()
    (job_dir / "notes dir" / "sub").mkdir(parents=True)
    (job_dir / "ckpt" / "epoch1.pt").write_bytes(b"weights-1")
    (job_dir / "ckpt" / "epoch1.txt").write_text("not a checkpoint")
    (job_dir / "metrics" / "gpu.jsonl").write_text("{}\n")
    (job_dir / "notes dir" / "sub" / "it's.md").write_text("quote'd")
    return job_dir


def test_artifacts_block_passes_shellcheck(hc, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    script = tmp_path / "a.sh"
    script.write_text("#!/bin/bash\nJOB_DIR=/x\n" + hc._JSON_STRING_TEMPLATE + hc.render_artifacts_block(
        runtime_plan_with(artifacts=ARTIFACTS)) + "collect_artifacts success\n")
    result = subprocess.run(["shellcheck", str(script)], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout


def test_artifacts_block_quotes_patterns(hc):
    block = hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS))
    assert "'/hpc-compose/job/notes dir'" in block
    assert "'/hpc-compose/job/metrics/**'" in block


def test_artifacts_block_collects_payload_and_manifest(hc, tmp_path):
    job_dir = _job_with_files(tmp_path)
    block = hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS))
    result = run_block(tmp_path, block + "collect_artifacts success\necho after\n", job_dir,
                       env={"SLURM_JOB_ID": "41"})
    assert result.returncode == 0 and result.stdout == "after\n", result.stderr
    payload = job_dir / "artifacts" / "payload"
    assert (payload / "ckpt" / "epoch1.pt").read_bytes() == b"weights-1"
    assert not (payload / "ckpt" / "epoch1.txt").exists()
    assert (payload / "notes dir" / "sub" / "it's.md").read_text() == "quote'd"
    manifest = json.loads((job_dir / "artifacts" / "manifest.json").read_text())
    assert manifest["job_id"] == "41" and manifest["job_outcome"] == "success"
    assert manifest["bundles"]["default"]["copied_relative_paths"] == ["metrics"]
    assert manifest["bundles"]["checkpoints"]["copied_relative_paths"] == ["ckpt/epoch1.pt",
                                                                           "notes dir"]
    assert "no match for /hpc-compose/job/missing/*" in manifest["warnings"]


def test_artifacts_policy_on_success_skips_failed_jobs(hc, tmp_path):
    job_dir = _job_with_files(tmp_path)
    block = hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS._replace(
        collect="on_success")))
    run_block(tmp_path, block + "collect_artifacts failure\n", job_dir, env={"SLURM_JOB_ID": "41"})
    manifest = json.loads((job_dir / "artifacts" / "manifest.json").read_text())
    assert manifest["copied_relative_paths"] == []
    assert manifest["warnings"] == ["collection skipped: policy on_success, job outcome failure"]
    assert os.listdir(str(job_dir / "artifacts" / "payload")) == []


def test_artifacts_are_exported_with_provenance_and_tarball(hc, cli, tmp_path):
    job_dir = _job_with_files(tmp_path)
    project = tmp_path / "proj"
    (project / "compose.yaml").write_text("services: {}\n")
    run_block(tmp_path, hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS))
              + "collect_artifacts success\n", job_dir, env={"SLURM_JOB_ID": "41"})
    hc._record_job(str(project), make_record(project, 41, artifact_export_dir=ARTIFACTS.export_dir))
    result = cli(["artifacts", "-f", str(project / "compose.yaml"), "--bundle", "checkpoints",
                  "--tarball"])
    assert result.code == 0, result.err
    export = project / "results" / "41"
    assert (export / "bundles" / "checkpoints" / "ckpt" / "epoch1.pt").read_bytes() == b"weights-1"
    assert not (export / "metrics").exists()             # only the selected bundle
    provenance = json.loads((export / "_hpc-compose" / "bundles" / "checkpoints.json").read_text())
    files = dict((f["relative_path"], f) for f in provenance["files"])
    import hashlib
    assert files["ckpt/epoch1.pt"]["sha256"] == hashlib.sha256(b"weights-1").hexdigest()
    assert files["notes dir"]["entry_type"] == "directory"
    with tarfile.open(str(export / "checkpoints.tar.gz")) as archive:
        assert "ckpt/epoch1.pt" in archive.getnames()


def test_default_bundle_exports_to_the_export_root(hc, tmp_path):
    job_dir = _job_with_files(tmp_path)
    project = tmp_path / "proj"
    run_block(tmp_path, hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS))
              + "collect_artifacts success\n", job_dir, env={"SLURM_JOB_ID": "41"})
    record = make_record(project, 41, artifact_export_dir="out-$SLURM_JOB_ID")
    report = hc._export_artifacts(record)
    assert report["export_dir"] == str(project / "out-41")
    assert (project / "out-41" / "metrics" / "gpu.jsonl").exists()
    assert (project / "out-41" / "_hpc-compose" / "bundles" / "default.json").exists()


def test_unknown_bundle_is_a_usage_error(hc, tmp_path):
    job_dir = _job_with_files(tmp_path)
    run_block(tmp_path, hc.render_artifacts_block(runtime_plan_with(artifacts=ARTIFACTS))
              + "collect_artifacts success\n", job_dir, env={"SLURM_JOB_ID": "41"})
    record = make_record(tmp_path / "proj", 41, artifact_export_dir="out")
    with pytest.raises(hc.UsageError) as info:
        hc._export_artifacts(record, bundles=["nope"])
    assert "checkpoints" in info.value.format()


def test_export_without_manifest_explains_why(hc, tmp_path):
    record = make_record(tmp_path, 8, artifact_export_dir="out")
    with pytest.raises(hc.ToolError) as info:
        hc._export_artifacts(record)
    assert "no collected artifacts" in info.value.message


# --- a scheduler that does not answer (the real Slurm client, a controller nobody runs) -----------

def _free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dead_controller(tmp_path):
    """Environment for the REAL squeue/sacct against a controller that does not answer.

    SLURM_CONF names a copy of the cluster's slurm.conf (or a minimal one) whose SlurmctldPort
    nothing listens on; the shared controller is never touched.
    """
    squeue = shutil.which("squeue")
    if not squeue:
        pytest.skip("the Slurm client (squeue) is not installed: apt-get install slurm-client")
    source = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    lines = ["ClusterName=nobody", "SlurmctldHost=localhost(127.0.0.1)", "AuthType=auth/munge",
             "NodeName=localhost CPUs=1 State=UNKNOWN", "PartitionName=debug Nodes=localhost"]
    if os.path.isfile(source):
        with open(source) as handle:
            lines = [line.rstrip("\n") for line in handle]
    lines = [line for line in lines if not line.split("=")[0].strip().lower().startswith(
        ("slurmctldport", "include"))]
    lines.append("SlurmctldPort=%d" % _free_port())
    conf = tmp_path / "dead-slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return {"SLURM_CONF": str(conf), "PATH": os.path.dirname(squeue) + ":/usr/bin:/bin",
            "HPC_COMPOSE_SCHEDULER_TIMEOUT": "2"}


# Job ids far above anything the test cluster hands out, so that its accounting never knows them.
UNANSWERED_JOB = "987654321"


def _ended_job(tmp_path, job_id=UNANSWERED_JOB):
    (tmp_path / "compose.yaml").write_text("services:\n  app:\n    image: x\n")
    record = make_record(tmp_path, job_id)
    hpc_compose._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"))
    with open(record["services"][0]["log_path"], "w") as handle:
        handle.write("step 1\nstep 2\n")
    write_state(record["job_dir"], "completed", [{"name": "app", "status": "completed"}])
    return record


def _run_tool(args, cwd, env):
    environ = dict(os.environ)
    environ.update(env)
    return subprocess.run([sys.executable, os.path.join(REPO, "hpc_compose.py")] + list(args),
                          cwd=str(cwd), env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


@pytest.mark.parametrize("command", ["status", "ps"])
def test_status_answers_from_the_job_files_when_the_controller_does_not(command, tmp_path,
                                                                         dead_controller):
    _ended_job(tmp_path)
    result = _run_tool([command], tmp_path, dead_controller)
    assert result.returncode == 0, result.stderr
    warning = result.stderr.splitlines()
    assert len(warning) == 1
    assert warning[0].startswith("warning: the scheduler did not answer ('squeue -h -j %s -o "
                                 "%%T|%%r|%%S' did not answer within 2 seconds); no answer since "
                                 % UNANSWERED_JOB)
    assert warning[0].endswith("; showing what the job's own files say")
    assert "  runtime:    completed" in result.stdout
    assert "  service app: completed" in result.stdout


def test_status_says_since_when_the_scheduler_is_silent_and_its_last_answer(tmp_path,
                                                                           dead_controller):
    record = _ended_job(tmp_path)
    note = os.path.join(record["job_dir"], hpc_compose._SCHEDULER_NOTE_NAME)
    with open(note, "w") as handle:
        json.dump({"answered_at": 1767225600.0, "state": "RUNNING", "source": "squeue"}, handle)
    first = _run_tool(["status", "--format", "json"], tmp_path, dict(dead_controller, TZ="UTC"))
    second = _run_tool(["status"], tmp_path, dict(dead_controller, TZ="UTC"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    status = json.loads(first.stdout)
    assert status["scheduler"]["state"] == "UNKNOWN"
    assert status["scheduler_warning"] in first.stderr
    since = first.stderr.split("no answer since ")[1].split(",")[0]
    assert second.stderr.split("no answer since ")[1].split(",")[0] == since
    assert ", last answer 2026-01-01 00:00:00 UTC: RUNNING;" in second.stderr


def test_status_uses_the_default_scheduler_timeout(tmp_path, dead_controller):
    _ended_job(tmp_path)
    env = dict(dead_controller)
    del env["HPC_COMPOSE_SCHEDULER_TIMEOUT"]
    result = _run_tool(["status"], tmp_path, env)
    assert result.returncode == 0
    timeout = hpc_compose._SCHEDULER_TIMEOUT_SECONDS
    assert "did not answer within %g seconds" % timeout in result.stderr


def test_stats_answers_when_the_controller_does_not(tmp_path, dead_controller):
    _ended_job(tmp_path)
    result = _run_tool(["stats", "--format", "json"], tmp_path, dead_controller)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: the scheduler did not answer (")
    assert json.loads(result.stdout)["scheduler"]["state"] == "UNKNOWN"


def test_logs_follow_ends_with_the_job_files_when_the_controller_does_not_answer(tmp_path,
                                                                                dead_controller):
    _ended_job(tmp_path)
    result = _run_tool(["logs", "--follow"], tmp_path, dead_controller)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[app] step 1\n[app] step 2\n"
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("warning: the scheduler did not answer (")
    assert "following the log files until the job's state.json says it ended" in result.stderr


@pytest.mark.parametrize("args", [["status"], ["ps", "--format", "json"], ["stats"],
                                  ["logs", "--follow"]])
def test_tracking_commands_answer_without_squeue_and_sacct_on_path(args, tmp_path):
    _ended_job(tmp_path)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = _run_tool(args, tmp_path, {"PATH": str(empty)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: the scheduler did not answer (required binary "
                                    "'squeue' was not found)")
    assert len(result.stderr.splitlines()) == 1


def test_watch_keeps_watching_through_an_outage_and_says_so_once(hc, tmp_path, monkeypatch):
    record = _ended_job(tmp_path, "5")
    write_state(record["job_dir"], "running", [{"name": "app", "status": "running"}])
    answers = [hc.SchedulerState("RUNNING", "squeue")] + [
        hc.ToolError("'squeue' did not answer within 10 seconds")] * 4 + [
        hc.SchedulerState("RUNNING", "squeue"), hc.SchedulerState("COMPLETED", "squeue")]
    monkeypatch.setattr(hc, "_squeue_state", scripted_squeue(answers))
    monkeypatch.setattr(hc, "_sacct_state", lambda job_id, sacct_bin: hc.SchedulerState(
        "COMPLETED", "sacct", exit_code="0:0"))
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    import io
    out = io.StringIO()
    outcome = hc.watch_job(record, squeue_bin=shutil.which("true"), out=out, sleep=sleep,
                           clock=lambda: now[0])
    assert outcome.ok and answers == []
    lines = [line for line in out.getvalue().splitlines() if line.startswith("scheduler:")]
    assert lines == ["scheduler: job 5 RUNNING",
                     "scheduler: no answer ('squeue' did not answer within 10 seconds); still "
                     "watching the logs",
                     "scheduler: answering again",
                     "scheduler: job 5 COMPLETED"]


def test_stats_text_shows_memory_in_binary_units_and_cpu_time_as_durations(hc):
    stats = {"job_id": "5", "scheduler": {"state": "RUNNING", "source": "squeue"},
             "source": "sstat", "collectors": [], "gpus": [], "gpu_processes": [], "notes": [],
             "steps": [{"step_id": "5.0", "ntasks": "2", "ave_cpu": "01:02:03",
                        "ave_rss": "9121792", "max_rss": "200K", "gpu_util": None,
                        "gpu_mem": None},
                       {"step_id": "5.1", "ntasks": "1", "ave_cpu": "00:06.500",
                        "ave_rss": "0", "max_rss": "1-junk", "gpu_util": "50", "gpu_mem": "10"}]}
    lines = hc._format_stats_text(stats).splitlines()
    assert lines[1].split() == ["STEP", "NTASKS", "AVE_CPU", "AVE_RSS", "MAX_RSS", "GPU_UTIL",
                                "GPU_MEM"]
    assert lines[2].split("  ")[1:] and "1h 02m 03s" in lines[2]
    assert "8.7 MiB" in lines[2] and "200.0 KiB" in lines[2]
    assert "6.5s" in lines[3] and "0 B" in lines[3] and "1-junk" in lines[3]


@pytest.mark.parametrize("text, expected", [
    ("00:00:06", "6s"), ("00:01.234", "1.2s"), ("01:02:03", "1h 02m 03s"),
    ("1-02:03:04", "1d 02h 03m"), ("65", "1m 05s"), (None, "-"), ("n/a", "n/a")])
def test_cpu_time_reads_as_a_duration(hc, text, expected):
    assert hc._format_cpu_time(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("9121792", "8.7 MiB"), ("200K", "200.0 KiB"), ("1.5G", "1.5 GiB"), ("512", "512 B"),
    (None, "-"), ("n/a", "n/a")])
def test_memory_reads_in_binary_units(hc, text, expected):
    assert hc._format_size(text) == expected


def test_stats_json_keeps_the_exact_numbers(hc, tmp_path):
    record = _ended_job(tmp_path, "6")
    os.makedirs(os.path.join(record["job_dir"], "metrics"))
    with open(os.path.join(record["job_dir"], "metrics", "slurm.jsonl"), "w") as handle:
        handle.write(json.dumps({"sampled_at": "2026-01-01T00:00:00Z", "step_id": "6.0",
                                 "ntasks": "1", "ave_cpu": "00:00:06", "ave_rss": "9121792",
                                 "max_rss": "9121792", "tres_usage_in_ave": ""}) + "\n")
    stats = hc._collect_stats(record, "/nonexistent/sstat", "/nonexistent/squeue",
                             "/nonexistent/sacct")
    assert json.loads(hc._format_json(stats))["steps"][0]["ave_rss"] == "9121792"
    assert "8.7 MiB" in hc._format_stats_text(stats)


# --- clusters without accounting, requeue, NODE_FAIL ------------------------------------------

def _write_final_state(job_dir, status, exit_code, attempt=0, reason=None):
    os.makedirs(job_dir, exist_ok=True)
    with open(os.path.join(job_dir, "state.json"), "w") as handle:
        json.dump({"schema_version": 1, "status": status, "exit_code": exit_code,
                   "attempt": attempt, "reason": reason, "services": []}, handle)


def _unaccounted(hc, monkeypatch, queue):
    # squeue knows the job while it runs, then forgets it; sacct answers nothing (accounting off).
    answers = iter(queue)
    monkeypatch.setattr(hc, "_squeue_state", lambda job_id, squeue_bin: next(answers, None))
    monkeypatch.setattr(hc, "_sacct_state", lambda job_id, sacct_bin: None)


def test_watch_concludes_from_state_json_when_no_scheduler_knows_the_job(hc, monkeypatch, tmp_path):
    record = make_record(tmp_path, 7)
    _write_final_state(record["job_dir"], "completed", 0)
    _unaccounted(hc, monkeypatch, [hc.SchedulerState("RUNNING", "squeue")])
    out = io.StringIO()
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    outcome = hc.watch_job(record, out=out, sleep=sleep, clock=lambda: now[0])

    assert outcome.ok
    assert "completed according to its state.json (exit code 0)" in outcome.reason
    assert "accounting" in outcome.reason
    assert now[0] < hc._ACCOUNTING_GRACE_SECONDS  # no waiting out the grace period


def test_watch_without_accounting_reports_a_failed_job_as_failed(hc, monkeypatch, tmp_path):
    record = make_record(tmp_path, 8)
    _write_final_state(record["job_dir"], "failed", 3, reason="service 'app' exited with code 3")
    _unaccounted(hc, monkeypatch, [hc.SchedulerState("RUNNING", "squeue")])
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    outcome = hc.watch_job(record, out=io.StringIO(), sleep=sleep, clock=lambda: now[0])

    assert not outcome.ok
    assert "failed according to its state.json (exit code 3)" in outcome.reason
    assert "service 'app' exited with code 3" in outcome.reason


def test_status_of_a_requeued_job_waits_for_the_next_attempt(hc, monkeypatch, tmp_path):
    record = make_record(tmp_path, 9)
    _write_final_state(record["job_dir"], "cancelled", 143, attempt=0)
    monkeypatch.setattr(hc, "_query_scheduler", lambda *args, **kwargs: hc.SchedulerState(
        "PENDING", "squeue", reason="BeginTime"))

    status = hc._job_status(record)

    assert status["progress"] == ("requeued: attempt 0 ended cancelled; Slurm has the job PENDING "
                                  "again and attempt 1 starts when it runs")
    assert "progress:   requeued" in hc._format_status_text(status)


def test_status_without_accounting_says_it_concluded_from_state_json(hc, monkeypatch, tmp_path):
    record = make_record(tmp_path, 10)
    _write_final_state(record["job_dir"], "completed", 0)
    monkeypatch.setattr(hc, "_query_scheduler",
                        lambda *args, **kwargs: hc.SchedulerState("UNKNOWN", "none"))

    status = hc._job_status(record)

    assert status["progress"].startswith("job 10 completed according to its state.json")


def test_node_failure_names_the_failed_node(hc, tmp_path):
    record = make_record(tmp_path, 11)
    os.makedirs(os.path.join(record["job_dir"], "allocation"))
    with open(os.path.join(record["job_dir"], "allocation", "nodes.txt"), "w") as handle:
        handle.write("n1\nn2\nn3\n")
    sinfo = tmp_path / "sinfo"
    # STAND-IN for sinfo: prints what `sinfo -h -N -n n1,n2,n3 -o '%N|%T|%E'` printed on the
    # 3-node test cluster after n3's slurmd was killed.
    sinfo.write_text("#!/bin/sh\n[ \"$4\" = n1,n2,n3 ] || exit 1\n"
                     "printf 'n1|idle|none\\nn2|idle|none\\nn3|down*|Not responding\\n'\n")
    sinfo.chmod(0o755)

    text = hc._format_node_failure(record, sinfo_bin=str(sinfo))

    assert text == ("a node of the job failed (node n3 is down (Not responding)); "
                    "Slurm ended the job on every node")


def test_node_failure_after_the_node_came_back_is_read_from_node_events(hc, tmp_path):
    # STAND-IN for sacctmgr: prints what `sacctmgr -n -P show event nodes=n1,n2,n3 start=...
    # format=NodeName,TimeStart,TimeEnd,State,Reason` printed on the 3-node test cluster.
    sacctmgr = tmp_path / "sacctmgr"
    sacctmgr.write_text("#!/bin/sh\n[ \"$5\" = nodes=n1,n2,n3 ] || exit 1\n"
                        "echo 'n3|2026-11-29T14:59:12|2026-11-29T14:59:28|DOWN*|Not responding'\n")
    sacctmgr.chmod(0o755)

    events = hc._node_events(["n1", "n2", "n3"], time.time(), sacctmgr_bin=str(sacctmgr))

    assert events == ["node n3 was down from 2026-11-29T14:59:12 to 2026-11-29T14:59:28 "
                      "(Not responding)"]


# --- attempts of a requeued job -------------------------------------------------------------------

def _attempt(job_dir, attempt, status, reason, log_lines, signals=()):
    directory = os.path.join(job_dir, "attempts", str(attempt))
    os.makedirs(os.path.join(directory, "logs"))
    with open(os.path.join(directory, "state.json"), "w") as handle:
        json.dump({"schema_version": 1, "attempt": attempt, "status": status, "exit_code": 0,
                   "reason": reason, "signals": list(signals),
                   "services": [{"name": "app", "status": "exited"}]}, handle)
    with open(os.path.join(directory, "logs", "app.log"), "w") as handle:
        handle.write("".join(line + "\n" for line in log_lines))


def _requeued_job(hc, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, 41)
    hc._record_job(str(tmp_path), record)
    signal = {"signal": "USR1", "received_at": "2026-11-29T10:00:00+00:00", "action": "requeue",
              "forwarded_to": [{"service": "app", "signal": "USR1"}]}
    _attempt(record["job_dir"], 0, "requeued", "the job requeued itself", ["a1", "a2"], [signal])
    _attempt(record["job_dir"], 1, "completed", "done", ["b1"])
    for name in ("logs", "state.json"):
        os.symlink("attempts/1/" + name, os.path.join(record["job_dir"], name))
    return record


def test_status_lists_every_attempt_and_the_signals_of_the_latest(hc, tmp_path, monkeypatch):
    record = _requeued_job(hc, tmp_path)
    monkeypatch.setattr(hc, "_query_scheduler",
                        lambda *args, **kwargs: hc.SchedulerState("COMPLETED", "sacct"))
    status = hc._job_status(record)
    assert [(a["attempt"], a["status"]) for a in status["attempts"]] == \
        [(0, "requeued"), (1, "completed")]
    assert status["attempts"][0]["signals"][0]["action"] == "requeue"
    text = hc._format_status_text(status)
    assert "  attempt 0:  requeued, exit code 0, the job requeued itself\n" in text
    assert "  attempt 1:  completed, exit code 0, done\n" in text


def test_signal_line_names_the_action_and_every_service_reached(hc):
    entry = {"signal": "USR1", "received_at": "T", "action": "requeue",
             "forwarded_to": [{"service": "train", "signal": "INT"}]}
    assert hc._format_signal(entry) == "SIGUSR1 at T -> requeue (train: SIGINT)"


def test_logs_of_a_requeued_job_mark_each_attempt(hc, cli, tmp_path):
    _requeued_job(hc, tmp_path)
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml"), "--tail", "5"])
    assert result.code == 0
    assert result.out.splitlines() == [
        "[app] ### hpc-compose: attempt 0 (job 41)", "[app] a1", "[app] a2",
        "[app] ### hpc-compose: attempt 1 (job 41)", "[app] b1"]


# --- chains: --after and the dependency explanation ----------------------------------------------

def test_after_latest_takes_the_latest_tracked_job_of_the_other_compose_file(hc, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    hc._record_job(str(tmp_path), make_record(tmp_path, 51))
    chain = hc._resolve_after("latest:afterany", str(tmp_path / "compose.yaml"))
    assert chain == {"job_id": "51", "type": "afterany", "dependency": "afterany:51",
                     "compose_file": str(tmp_path / "compose.yaml")}
    assert hc._resolve_after(None, str(tmp_path / "compose.yaml"))["dependency"] == "afterok:51"
    assert hc._resolve_after("77", None)["dependency"] == "afterok:77"


@pytest.mark.parametrize("after, words", [
    ("latest", "--after latest needs --after-file"), ("77:afterbad", "'afterbad' is not one of"),
    ("seventy", "expected a job id or latest"),
])
def test_bad_after_is_a_usage_error(hc, after, words):
    with pytest.raises(hc.UsageError) as info:
        hc._resolve_after(after, None)
    assert words in info.value.message and info.value.exit_code == 2


def test_after_file_without_a_tracked_job_is_a_usage_error(hc, tmp_path):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    with pytest.raises(hc.UsageError) as info:
        hc._resolve_after(None, str(tmp_path / "compose.yaml"))
    assert "has no tracked job yet" in info.value.message


def test_dependency_job_ids_are_read_from_any_expression(hc):
    assert hc._dependency_job_ids("afterok:1:2,after:3+5,singleton,afterany:4_7") == \
        ["1", "2", "3", "4_7"]


def test_a_never_satisfied_dependency_names_the_parent_and_its_outcome(hc, monkeypatch):
    monkeypatch.setattr(hc, "_query_scheduler", lambda job_id, *args: hc.SchedulerState(
        "FAILED", "sacct", exit_code="3:0"))
    record = {"dependency": "afterok:60", "after": {"job_id": "60", "compose_file": "/p/a.yaml"}}
    explained = hc._format_dependency_wait(record, hc.SchedulerState(
        "PENDING", "squeue", reason="DependencyNeverSatisfied"))
    assert explained["text"] == ("never able to run (DependencyNeverSatisfied): job 60 of "
                                 "/p/a.yaml ended FAILED (exit code 3:0) so afterok:60 cannot "
                                 "hold; cancel this job")
    assert hc._format_dependency_wait(record, hc.SchedulerState("RUNNING", "squeue")) is None


# --- job arrays ------------------------------------------------------------------------------------

def test_array_task_ids_expand_ranges_steps_and_lists(hc):
    assert hc._array_task_ids("0-3%2") == [0, 1, 2, 3]
    assert hc._array_task_ids("1,5-9:2,20") == [1, 5, 7, 9, 20]


def _array_record(hc, tmp_path, array="0-2"):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, 70, array=array, array_tasks=hc._array_task_ids(array))
    hc._record_job(str(tmp_path), record)
    return record


def test_a_task_record_has_its_own_directory_logs_and_batch_log(hc, tmp_path):
    task = hc._task_record(_array_record(hc, tmp_path), 2)
    assert task["job_id"] == "70_2" and task["array_task"] == 2
    assert task["job_dir"] == str(tmp_path / ".hpc-compose" / "70_2")
    assert task["services"][0]["log_path"] == str(tmp_path / ".hpc-compose" / "70_2" / "logs" /
                                                  "app.log")
    assert task["batch_log"] == str(tmp_path / "slurm-70_2.out")


def test_task_of_a_plain_job_or_outside_the_array_is_a_usage_error(hc, cli, tmp_path):
    with pytest.raises(hc.UsageError) as info:
        hc._task_record(_array_record(hc, tmp_path), 3)
    assert info.value.message == "job 70 has no task 3"
    with pytest.raises(hc.UsageError):
        hc._task_record(make_record(tmp_path, 71), 0)
    result = cli(["logs", "-f", str(tmp_path / "compose.yaml")])
    assert result.code == 2 and "job 70 is a job array (0-2): pick one task with --task N" \
        in result.err


SQUEUE_ARRAY_STANDIN = """#!/bin/sh
# STAND-IN for squeue -r (records its argv; prints the array tasks still queued).
echo "squeue $*" >> "$STANDIN_LOG"
printf '70_2|RUNNING|None\\n'
"""

SACCT_ARRAY_STANDIN = """#!/bin/sh
# STAND-IN for sacct -X -P (records its argv; prints the rows of the tasks that ended).
echo "sacct $*" >> "$STANDIN_LOG"
printf '70_0|COMPLETED|0:0\\n70_1|FAILED|3:0\\n70_2|RUNNING|0:0\\n'
"""


def _standin_folder(tmp_path, scripts):
    """tmp_path/bin with the ``(name, text)`` stand-in scripts, executable."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in scripts:
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _standins(tmp_path, monkeypatch):
    folder = _standin_folder(tmp_path, (("squeue", SQUEUE_ARRAY_STANDIN),
                                        ("sacct", SACCT_ARRAY_STANDIN)))
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "calls.log"))
    return str(folder / "squeue"), str(folder / "sacct")


def test_array_status_asks_squeue_once_and_sacct_once_for_every_task(hc, tmp_path, monkeypatch):
    squeue, sacct = _standins(tmp_path, monkeypatch)
    record = _array_record(hc, tmp_path)
    os.makedirs(os.path.join(str(tmp_path), ".hpc-compose", "70_1"))
    with open(os.path.join(str(tmp_path), ".hpc-compose", "70_1", "state.json"), "w") as handle:
        json.dump({"status": "failed", "exit_code": 3, "reason": "service 'app' exited with code 3",
                   "services": []}, handle)
    status = hc._array_status(record, squeue, sacct)
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "squeue -h -r -j 70 -o %i|%T|%r", "sacct -n -X -P -j 70 --format=JobID,State,ExitCode"]
    assert status["states"] == {"COMPLETED": 1, "FAILED": 1, "RUNNING": 1}
    assert status["failed"] == [1]
    text = hc._format_array_status_text(status)
    assert "  tasks:      1 COMPLETED, 1 FAILED, 1 RUNNING\n" in text
    assert "  task 1:     FAILED, exit code 3:0, service 'app' exited with code 3\n" in text


def test_up_of_an_array_waits_for_every_task_and_fails_if_one_did_not_complete(hc, tmp_path,
                                                                             monkeypatch, capsys):
    record = _array_record(hc, tmp_path, "0-1")
    answers = [{0: hc.SchedulerState("RUNNING", "squeue"), 1: hc.SchedulerState("PENDING", "squeue")},
               {0: hc.SchedulerState("COMPLETED", "sacct"), 1: hc.SchedulerState("RUNNING", "squeue")},
               {0: hc.SchedulerState("COMPLETED", "sacct"), 1: hc.SchedulerState("TIMEOUT", "sacct")}]
    monkeypatch.setattr(hc, "_array_task_states", lambda *args: answers.pop(0))
    args = types.SimpleNamespace(squeue_bin="squeue", sacct_bin="sacct")
    code = hc._watch_array(record, args, "text", sleep=lambda seconds: None)
    out, err = capsys.readouterr()
    assert code == 1 and not answers
    assert [l for l in out.splitlines() if l.startswith("task ")] == ["task 0 COMPLETED",
                                                                      "task 1 TIMEOUT"]
    assert "error: 1 of 2 tasks of job 70 did not complete: 1" in err


# --- logs: interleaving, --since, --timestamps, --no-prefix, colours ----------------------------

def _logged_job(hc, tmp_path, job_id, logs):
    """A tracked job whose services wrote ``logs``: {token: [(epoch ms, text), ...]} with an index."""
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, job_id, services=[(token, token) for token in logs])
    hc._record_job(str(tmp_path), record)
    os.makedirs(os.path.join(record["job_dir"], "logs"), exist_ok=True)
    for token, lines in logs.items():
        path = os.path.join(record["job_dir"], "logs", token + ".log")
        size = 0
        with open(path, "w") as log, open(path[:-4] + hc._LOG_TIMES_SUFFIX, "w") as index:
            for written_ms, text in lines:
                log.write(text + "\n")
                size += len(text) + 1
                index.write("%d %d\n" % (written_ms, size))
    return str(tmp_path / "compose.yaml")


def test_logs_interleave_services_in_the_order_lines_were_written(hc, cli, tmp_path):
    compose = _logged_job(hc, tmp_path, 41, {
        "web": [(1000, "w1"), (3000, "w2")], "db": [(2000, "d1"), (4000, "d2")]})
    result = cli(["logs", "-f", compose])
    assert result.code == 0
    assert result.out.splitlines() == ["[web] w1", "[db] d1", "[web] w2", "[db] d2"]


def test_logs_timestamps_and_no_prefix(hc, cli, tmp_path):
    compose = _logged_job(hc, tmp_path, 42, {"web": [(1764428645123, "hello")]})
    result = cli(["logs", "-f", compose, "--timestamps", "--no-prefix"])
    assert result.out.splitlines() == ["2025-11-29T15:04:05.123Z hello"]


def test_logs_since_keeps_only_newer_lines(hc, cli, tmp_path):
    now_ms = int(time.time() * 1000)
    compose = _logged_job(hc, tmp_path, 43, {
        "web": [(now_ms - 3600 * 1000, "old"), (now_ms - 5 * 1000, "new")]})
    assert cli(["logs", "-f", compose, "--since", "10m"]).out.splitlines() == ["[web] new"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000 - 7200))
    assert cli(["logs", "-f", compose, "--since", stamp]).out.splitlines() == [
        "[web] old", "[web] new"]


def test_logs_since_that_is_neither_duration_nor_time_is_a_usage_error(hc, cli, tmp_path):
    compose = _logged_job(hc, tmp_path, 44, {"web": [(1000, "x")]})
    result = cli(["logs", "-f", compose, "--since", "yesterday"])
    assert result.code == 2
    assert result.err.startswith("error: --since takes a duration (90s, 10m, 1h30m, 2d)")


def test_since_parses_durations_zones_and_unix_seconds(hc):
    now = 1000000.0
    assert hc._parse_since("1h30m", now) == int((now - 5400) * 1000)
    assert hc._parse_since("2025-11-29T15:04:05Z") == 1764428645000
    assert hc._parse_since("2025-11-29T16:04:05+01:00") == 1764428645000
    assert hc._parse_since("1764428645.5") == 1764428645500


def test_log_lines_without_an_index_keep_service_order(hc, cli, tmp_path):
    compose = _logged_job(hc, tmp_path, 45, {"web": [(1, "w")], "db": [(1, "d")]})
    for name in ("web", "db"):
        os.remove(os.path.join(hc._job_directory(str(tmp_path), 45), "logs", name + ".times"))
    assert cli(["logs", "-f", compose]).out.splitlines() in (["[web] w", "[db] d"],
                                                              ["[db] d", "[web] w"])


def test_log_colours_only_on_a_terminal_without_no_color(hc, monkeypatch):
    class Terminal(object):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert hc._use_colour(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not hc._use_colour(Terminal())
    monkeypatch.delenv("NO_COLOR")
    assert not hc._use_colour(types.SimpleNamespace(isatty=lambda: False))
    out = []
    printer = hc._LogPrinter(["web", "db"], types.SimpleNamespace(write=out.append), colour=True)
    printer.write(hc._LogLine(0, "db", "x"))
    assert out == ["\033[33m[db]\033[0m x\n"]


def test_follow_prints_lines_of_several_services_as_they_arrive(hc, tmp_path, monkeypatch):
    record = make_record(tmp_path, 46, services=[("web", "web"), ("db", "db")])
    logs = os.path.join(record["job_dir"], "logs")
    os.makedirs(logs)
    writes = [("db", "d1\n"), ("web", "w1\n"), ("db", "d2\n")]
    # The job runs while lines remain to be written, then ends.
    monkeypatch.setattr(hc, "_squeue_state", lambda job_id, squeue_bin: hc.SchedulerState(
        "RUNNING" if writes else "COMPLETED", "squeue"))
    out = []
    sink = types.SimpleNamespace(write=out.append, flush=lambda: None)
    now = [0.0]

    def sleep(_):
        now[0] += 100.0            # every turn the poller is due
        if writes:
            token, text = writes.pop(0)
            with open(os.path.join(logs, token + ".log"), "a") as handle:
                handle.write(text)
    hc._follow_logs(record, hc._record_log_sources(record), out=sink, sleep=sleep,
                   clock=lambda: now[0])
    assert "".join(out).splitlines() == ["[db] d1", "[web] w1", "[db] d2"]


def test_supervisor_indexes_each_log_size_once_it_changed(hc, tmp_path):
    job_dir = tmp_path / "job"
    (job_dir / "logs").mkdir(parents=True)
    (job_dir / "logs" / "a.log").write_text("one\n")
    body = ("LOG_DIR=$JOB_DIR/logs SERVICE_COUNT=2 TOKEN=(a b)\n"
            + hc._fill(hc._LOG_INDEX_TEMPLATE, suffix=hc.shell_quote(hc._LOG_TIMES_SUFFIX))
            + "NOW_MS=5000; index_logs\nNOW_MS=5500; echo more >>\"$LOG_DIR/a.log\"; index_logs\n"
            + "NOW_MS=6000; index_logs\nNOW_MS=7000; index_logs\n")
    result = run_block(tmp_path, body, job_dir)
    assert result.returncode == 0, result.stderr
    assert (job_dir / "logs" / "a.times").read_text() == "5000 4\n6000 9\n"
    assert not (job_dir / "logs" / "b.times").exists()


# --- exec: error paths, the srun line, the in-step script ---------------------------------------

def _exec_job(hc, tmp_path, job_id=51, status="running", runtime="pyxis", nodelist="n1",
              container=True, last_exit=None):
    (tmp_path / "compose.yaml").write_text("services: {}\n")
    record = make_record(tmp_path, job_id, services=[("web", "web"), ("db", "db")])
    for service in record["services"]:
        service["runtime"] = runtime
        if container and runtime == "pyxis":
            service["container_name"] = hc._container_name(job_id, service["token"])
    hc._record_job(str(tmp_path), record)
    write_state(record["job_dir"], "running", [
        {"name": "web", "status": status, "last_exit_code": last_exit,
         "log_path": record["services"][0]["log_path"],
         "placement": {"mode": "distributed", "nodelist": nodelist}}])
    return str(tmp_path / "compose.yaml")


@pytest.fixture
def srun_calls(hc, monkeypatch):
    """Scheduler RUNNING; the exec srun is recorded instead of run and 'exits' with code 7."""
    calls = []
    monkeypatch.setattr(hc, "_query_scheduler", lambda job_id, *a, **k: hc.SchedulerState(
        "RUNNING", "squeue"))
    monkeypatch.setattr(hc, "_expand_nodelist", lambda nodelist, scontrol_bin: ["n1", "n2", "n3"])

    def run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 7)
    monkeypatch.setattr(hc, "_run_command", run)
    return calls


def test_exec_runs_srun_overlap_into_the_named_container_and_returns_its_exit_code(
        hc, cli, tmp_path, srun_calls):
    compose = _exec_job(hc, tmp_path, nodelist="n[1-3]")
    result = cli(["exec", "-f", compose, "-T", "--index", "2", "-e", "A=b c", "-w", "/srv",
                  "web", "--", "ls", "-l"])
    assert result.code == 7, result
    argv = srun_calls[0]
    assert argv[:9] == ["srun", "--jobid=51", "--overlap", "--nodes=1", "--ntasks=1",
                        "--nodelist=n2", "--job-name=hpc-compose-exec", "--quiet",
                        "--container-name=hpc-compose_51_web:exec"]
    assert argv[9:11] == ["/bin/sh", "-c"]
    assert argv[12:] == ["hpc-compose-exec", "", "/srv", "env", "A=b c", "ls", "-l"]


def test_exec_without_a_command_starts_a_shell_with_a_terminal_when_asked(hc, cli, tmp_path,
                                                                           srun_calls):
    compose = _exec_job(hc, tmp_path)
    assert cli(["exec", "-f", compose, "--pty", "web"], env={"TERM": "vt100"}).code == 7
    argv = srun_calls[0]
    assert "--pty" in argv
    # no host step, no workdir; the caller's TERM (a service has none), then bash or sh
    assert argv[-7:] == ["", "", "env", "TERM=vt100"] + hc._EXEC_SHELL


def test_exec_on_the_host_runtime_names_the_services_step(hc, cli, tmp_path, srun_calls,
                                                         monkeypatch):
    compose = _exec_job(hc, tmp_path, runtime="host")
    monkeypatch.setattr(hc, "_service_step", lambda job_id, token, squeue_bin: "51.3")
    assert cli(["exec", "-f", compose, "-T", "web", "true"]).code == 7
    argv = srun_calls[0]
    assert not any(word.startswith("--container") for word in argv)
    assert argv[-4:] == ["hpc-compose-exec", "51.3", "", "true"]


def test_exec_on_the_host_runtime_without_the_services_step_is_an_error(hc, cli, tmp_path,
                                                                       srun_calls, monkeypatch):
    compose = _exec_job(hc, tmp_path, runtime="host")
    monkeypatch.setattr(hc, "_service_step", lambda job_id, token, squeue_bin: None)
    result = cli(["exec", "-f", compose, "-T", "web", "true"])
    assert (result.code, srun_calls) == (1, [])
    assert result.err == ("error: service 'web' is not running in job 51: Slurm lists no step "
                          "named hpc-compose:web (squeue --steps)\n")


@pytest.mark.parametrize("args, state, message", [
    (["web"], "COMPLETED", "error: job 51 is not running (COMPLETED)\n"),
    (["web"], "UNKNOWN", "error: job 51 is not running (Slurm does not know it)\n"),
    (["wbe"], "RUNNING", "error: job 51 has no service 'wbe' (did you mean 'web'?)\n"),
    (["zzz"], "RUNNING", "error: job 51 has no service 'zzz' (its services: web, db)\n"),
    (["db"], "RUNNING", "error: service 'db' is not running in job 51: the batch script has not "
                        "started it yet (no entry in "),
    (["--node", "n9", "web"], "RUNNING", "error: service 'web' does not run on node n9 "
                                         "(its nodes: n1)\n"),
    (["--index", "2", "web"], "RUNNING", "error: service 'web' has 1 node(s): --index must be 1 "
                                         "to 1, got 2\n"),
])
def test_exec_errors_are_one_line_and_exit_1(hc, cli, tmp_path, monkeypatch, args, state,
                                            message):
    compose = _exec_job(hc, tmp_path)
    monkeypatch.setattr(hc, "_query_scheduler", lambda job_id, *a, **k: hc.SchedulerState(
        state, "sacct"))
    result = cli(["exec", "-f", compose] + args)
    assert result.code == 1
    assert result.err.startswith(message) and result.err.count("\n") == 1


def test_exec_into_a_service_that_exited_names_its_exit_code_and_log(hc, cli, tmp_path,
                                                                     srun_calls):
    compose = _exec_job(hc, tmp_path, status="exited", last_exit=3)
    result = cli(["exec", "-f", compose, "web"])
    assert result.code == 1 and srun_calls == []
    assert result.err == ("error: service 'web' is not running in job 51 (status exited, last "
                          "exit code 3); its log: %s\n"
                          % os.path.join(hc._job_directory(str(tmp_path), 51), "logs", "web.log"))


def test_exec_into_a_container_without_a_name_cannot_attach(hc, cli, tmp_path, srun_calls):
    compose = _exec_job(hc, tmp_path, container=False)
    result = cli(["exec", "-f", compose, "web"])
    assert result.code == 1 and srun_calls == []
    assert result.err.startswith("error: service 'web' of job 51 runs in a container without a "
                                 "name (the job was submitted by an older hpc-compose)")


def test_exec_of_an_untracked_job_id_says_its_services_are_unknown(hc, cli, tmp_path,
                                                                   srun_calls):
    compose = _exec_job(hc, tmp_path)
    result = cli(["exec", "-f", compose, "--job-id", "77", "web"])
    assert (result.code, srun_calls) == (1, [])
    assert result.err == ("error: job 77 is not tracked here (no %s), so exec does not know its "
                          "services\n" % hc._job_record_path(str(tmp_path), "77"))


def test_exec_without_a_service_is_a_usage_error_naming_only_service(hc, cli, tmp_path,
                                                                     srun_calls):
    result = cli(["exec", "-f", _exec_job(hc, tmp_path)])
    assert (result.code, srun_calls) == (2, [])
    assert result.err.splitlines()[0] == ("error: hpc-compose exec: the following arguments are "
                                          "required: SERVICE")


def test_exec_env_option_without_equals_is_a_usage_error(hc, cli, tmp_path, srun_calls):
    compose = _exec_job(hc, tmp_path)
    result = cli(["exec", "-f", compose, "-e", "NOPE", "web"])
    assert result.code == 2 and srun_calls == []
    assert result.err == "error: -e takes KEY=VALUE with KEY a variable name, got 'NOPE'\n"


SCONTROL_STANDIN = """#!/bin/sh
# STAND-IN for `scontrol listpids STEP` (no slurmd here): prints the table the real tool prints,
# with the pid the test put in $STANDIN_PID as task 0 of the step.
echo "$*" >> "$STANDIN_LOG"
echo "PID      JOBID    STEPID   LOCALID GLOBALID"
echo "$STANDIN_PID 51 3 0 0"
"""


def _run_exec_script(hc, runtime, environ, workdir=None):
    """Run exec's on-node script (what srun would run) for a probe command that prints
    GREETING|OTHER|CALLER_ONLY|PWD and exits 4, with -e OTHER=2."""
    argv = hc._exec_srun_argv(hc._ExecTarget("51", "web", runtime, "n1", None),
                              ["sh", "-c", 'printf "%s|%s|%s|%s" "$GREETING" "$OTHER" '
                               '"${CALLER_ONLY-unset}" "$PWD"; exit 4'], [("OTHER", "2")],
                              workdir=workdir, step="51.3")
    assert not any(word.startswith("--container-name") for word in argv)
    return subprocess.run(argv[argv.index("/bin/sh"):], stdout=subprocess.PIPE, env=environ,
                          universal_newlines=True, timeout=30)


def test_exec_script_takes_the_environment_and_directory_of_the_services_process(hc, tmp_path):
    standins = tmp_path / "bin"
    standins.mkdir()
    (standins / "scontrol").write_text(SCONTROL_STANDIN)
    (standins / "scontrol").chmod(0o755)
    workdir = tmp_path / "svc dir"
    workdir.mkdir()
    tricky = "a 'b' $c\nsecond line"
    service = subprocess.Popen(["sleep", "60"], cwd=str(workdir), env={
        "PATH": "/usr/bin:/bin", "GREETING": tricky, "OTHER": "1"})
    try:
        environ = {"PATH": "%s:/usr/bin:/bin" % standins, "STANDIN_PID": str(service.pid),
                   "STANDIN_LOG": str(tmp_path / "log"), "CALLER_ONLY": "x"}
        result = _run_exec_script(hc, "host", environ)
    finally:
        service.kill()
        service.wait()
    assert result.returncode == 4
    assert result.stdout == "%s|2|unset|%s" % (tricky, workdir)
    assert (tmp_path / "log").read_text() == "listpids 51.3\n"


NSENTER_STANDIN = """#!/bin/sh
# STAND-IN for nsenter (joining namespaces needs a real container): records its options, then
# runs the command after them here.
while [ $# -gt 0 ]; do
    case $1 in
        -t) echo "-t $2" >> "$STANDIN_LOG"; shift 2 ;;
        -*) echo "$1" >> "$STANDIN_LOG"; shift ;;
        *) break ;;
    esac
done
exec "$@"
"""


def test_apptainer_exec_script_enters_the_payload_with_its_environment(hc, tmp_path):
    standins = _standin_folder(tmp_path, (("scontrol", SCONTROL_STANDIN),
                                          ("nsenter", NSENTER_STANDIN)))
    workdir = tmp_path / "svc"
    workdir.mkdir()
    tricky = "a 'b' $c\nsecond line"
    # The step's task process (Apptainer) with the service as its child.
    task = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env={
        "PATH": "/usr/bin:/bin", "GREETING": tricky, "OTHER": "1"})
    try:
        for _ in range(100):
            children = open("/proc/%d/task/%d/children" % (task.pid, task.pid)).read().split()
            if children:
                break
            time.sleep(0.05)
        environ = {"PATH": "%s:/usr/bin:/bin" % standins, "STANDIN_PID": str(task.pid),
                   "STANDIN_LOG": str(tmp_path / "log"), "CALLER_ONLY": "x"}
        result = _run_exec_script(hc, "apptainer", environ, str(workdir))
    finally:
        task.kill()
        task.wait()
    assert result.returncode == 4
    assert result.stdout == "%s|2|unset|%s" % (tricky, workdir)
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0] == "listpids 51.3"
    namespaces = ["-m", "-r", "-w"] if os.geteuid() == 0 else [
        "-U", "--preserve-credentials", "-m", "-r", "-w"]
    assert log[1:] == ["-t %s" % children[0]] + namespaces


def test_exec_outside_slurm_refuses_an_apptainer_service():
    with pytest.raises(hpc_compose.HpcComposeError, match="runs with the apptainer runtime, which "
                                                          "exec cannot join in up --local"):
        hpc_compose._refuse_apptainer_exec("web", "apptainer")
    hpc_compose._refuse_apptainer_exec("web", "pyxis")
    hpc_compose._refuse_apptainer_exec("web", "host")


# --- heterogeneous jobs: 123+0, 123+1 -------------------------------------------------------------

def _scheduler_answers(hc, monkeypatch, answers):
    """``_run_command`` answering by the tool's name (argv[0]) with canned stdout; records argv."""
    calls = []

    def run(argv, **kwargs):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, answers.get(argv[0], ""), "")
    monkeypatch.setattr(hc, "_run_command", run)
    return calls


def test_het_components_come_from_squeue_in_group_order(hc, monkeypatch):
    _scheduler_answers(hc, monkeypatch, {
        "squeue": "1561+1|1562|RUNNING|n[2-3]\n1561+0|1561|RUNNING|n1\n"})
    components = hc._het_components("1561")
    assert [(c.component, c.het_group, c.job_id, c.state, c.nodes) for c in components] == [
        ("1561+0", 0, "1561", "RUNNING", "n1"), ("1561+1", 1, "1562", "RUNNING", "n[2-3]")]


def test_het_components_of_a_finished_job_come_from_sacct(hc, monkeypatch):
    calls = _scheduler_answers(hc, monkeypatch, {
        "sacct": "1556+0|1556|COMPLETED|n1\n1556+1|1557|FAILED|n[2-3]\n"})
    components = hc._het_components("1556")
    assert [(c.component, c.state) for c in components] == [("1556+0", "COMPLETED"),
                                                             ("1556+1", "FAILED")]
    assert [argv[0] for argv in calls] == ["squeue", "sacct"]


def test_a_plain_job_has_no_het_components(hc, monkeypatch):
    _scheduler_answers(hc, monkeypatch, {"squeue": "77|77|RUNNING|n1\n"})
    assert hc._het_components("77") == []


def test_squeue_states_count_a_component_as_its_job(hc, monkeypatch):
    _scheduler_answers(hc, monkeypatch, {"squeue": "1561+0|RUNNING\n1561+1|RUNNING\n9_2|PENDING\n"})
    assert hc._squeue_states(["1561", "9"]) == {"1561": "RUNNING", "9": "PENDING"}


def _heterogeneous_record(hc, tmp_path):
    record = make_record(tmp_path, "1561", services=(("head", "head"), ("workers", "workers")),
                         groups=[{"name": "head", "het_group": 0, "nodes": 1,
                                  "services": ["head"]},
                                 {"name": "workers", "het_group": 1, "nodes": 2,
                                  "services": ["workers"]}])
    record["services"][1].update(group="workers", het_group=1)
    write_state(record["job_dir"], "running", [
        {"name": "head", "status": "ready",
         "placement": {"mode": "single", "nodes": 1, "group": "head", "het_group": 0,
                       "nodelist": "n1"}},
        {"name": "workers", "status": "running",
         "placement": {"mode": "distributed", "nodes": 2, "group": "workers", "het_group": 1,
                       "nodelist": "n2 n3"}}])
    return record


def test_status_shows_each_group_and_where_each_service_runs(hc, tmp_path, monkeypatch):
    record = _heterogeneous_record(hc, tmp_path)
    monkeypatch.setattr(hc, "_query_scheduler_or_files", lambda *a, **k: (
        hc.SchedulerState("RUNNING", "squeue"), None))
    _scheduler_answers(hc, monkeypatch, {
        "squeue": "1561+0|1561|RUNNING|n1\n1561+1|1562|RUNNING|n[2-3]\n"})
    status = hc._job_status(record)
    assert [(g["name"], g["component"], g["state"], g["nodes"], g["services"])
            for g in status["groups"]] == [("head", "1561+0", "RUNNING", "n1", ["head"]),
                                          ("workers", "1561+1", "RUNNING", "n[2-3]", ["workers"])]
    text = hc._format_status_text(status)
    assert "  group workers (1561+1): RUNNING on n[2-3]: workers\n" in text
    assert "service workers: running group=workers nodes=2 nodelist=n2 n3" in text
    assert "service head: ready group=head nodes=1 nodelist=n1" in text


def test_stats_asks_sstat_per_component_and_names_steps_as_sacct_does(hc, monkeypatch):
    calls = []

    def run(argv, **kwargs):
        calls.append(list(argv))
        if argv[0] == "squeue":
            out = "1561+0|1561|RUNNING|n1\n1561+1|1562|RUNNING|n[2-3]\n"
        else:
            job = argv[argv.index("--jobs") + 1]
            out = "%s.batch|1|00:00:00|1K|1K|\n%s.2|2|00:00:01|2K|3K|cpu=1\n" % (job, job)
        return subprocess.CompletedProcess(argv, 0, out, "")
    monkeypatch.setattr(hc, "_run_command", run)
    steps = hc._live_sstat_components("1561")
    assert [s["step_id"] for s in steps] == ["1561+0.2", "1561+1.2"]
    assert [argv[argv.index("--jobs") + 1] for argv in calls if argv[0] == "sstat"] == [
        "1561", "1562"]


def test_exec_into_a_later_group_passes_its_het_group(hc):
    argv = hc._exec_srun_argv(hc._ExecTarget("1561", "workers", "pyxis", "n3",
                                             "hpc-compose_1561_workers", 1), ["true"])
    assert argv[:3] == ["srun", "--jobid=1561", "--het-group=1"]
    assert "--nodelist=n3" in argv


def test_the_job_record_names_the_groups_and_each_services_group(hc, tmp_path):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  groups:\n    a: {}\n    b: {nodes: 2}\nservices:\n"
        "  one: {image: /i.sqsh}\n  two: {image: /i.sqsh, x-slurm: {group: b}}\n")
    environ = {"HOME": str(tmp_path), "USER": "tester"}
    plan = hc.build_plan(hc.load_spec(str(tmp_path / "compose.yaml"), environ=environ),
                         environ=environ)
    record = hc._build_job_record(hc.build_runtime_plan(plan), "40")
    assert record["groups"] == [{"name": "a", "het_group": 0, "nodes": 1, "services": ["one"]},
                                {"name": "b", "het_group": 1, "nodes": 2, "services": ["two"]}]
    assert [(s["group"], s["het_group"]) for s in record["services"]] == [("a", 0), ("b", 1)]
