"""Secrets and permissions on the REAL test cluster, with the tool run under ``umask 000``.

A job with a secret from a file and one from the environment: the service reads both (host runtime
through $HPC_COMPOSE_SECRETS_DIR, Pyxis runtime at /run/secrets), the owner-only copies exist only
while the job can run and are gone after it ends (normal end, scancel of a running or of a pending
job, the time limit, a failed release, a killed batch shell followed by ``clean``); the script,
records and job directory are owner-only; no file under the compose directory (other than the
secret's own source file) and no output of config, inspect --verbose, render or status --format
json contains either value.
"""
import hashlib
import json
import os
import stat
import subprocess
import time
import uuid

import pytest

from slurm_support import (TOOL_PATH, pyxis_test_image, runtime_line, wait_for_job,
                           wait_for_state)
from test_tracking_e2e import final_state

import hpc_compose

HEAD = """\
name: secrets-e2e
secrets:
  api_token:
    file: ./token.txt
  hf:
    environment: HF_TOKEN
x-slurm:
  time: "{time}"
{slurm}services:
  reader:
{where}    command: >-
      d="$HPC_COMPOSE_SECRETS_DIR";
      echo "modes $(stat -c %a "$d") $(stat -c %a "$d/api_token") $(stat -c %a "$d/hf_token")";
      sha256sum "$d/api_token" "$d/hf_token";
      echo "umask $(umask)";
      touch "$d/new" 2>/dev/null || echo "copies are read-only";
      echo reader-done; {tail}
    secrets:
      - api_token
      - source: hf
        target: hf_token
        mode: 0400
"""
HOST = "    x-slurm:\n      runtime: host\n"


class Run(object):
    """One compose project with fresh secret values, driven through the CLI under umask 000."""

    def __init__(self, tmp_path, slurm_jobs, where=HOST, slurm="", tail="", time_limit="00:05:00"):
        self.folder = tmp_path
        self.slurm_jobs = slurm_jobs
        self.file_value = "file-secret-" + uuid.uuid4().hex
        self.env_value = "env-secret-" + uuid.uuid4().hex
        (tmp_path / "token.txt").write_text(self.file_value + "\n")
        os.chmod(str(tmp_path / "token.txt"), 0o600)
        self.compose = tmp_path / "compose.yaml"
        self.compose.write_text(HEAD.format(time=time_limit, slurm=slurm, where=where,
                                            tail=tail))
        self.job_id = None

    def tool(self, *args):
        """The CLI as a subprocess started with umask 000; returns (code, out, err)."""
        env = dict(os.environ, HF_TOKEN=self.env_value)
        proc = subprocess.run(["python3", TOOL_PATH] + [str(a) for a in args],
                              cwd=str(self.folder), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=600,
                              preexec_fn=lambda: os.umask(0))
        for text in (proc.stdout, proc.stderr):
            assert self.file_value not in text and self.env_value not in text, args
        return proc.returncode, proc.stdout, proc.stderr

    def submit(self, *extra):
        code, out, err = self.tool("submit", "-f", self.compose, "--format", "json", *extra)
        assert code == 0, err
        result = json.loads(out)
        self.job_id = self.slurm_jobs.add(result["job_id"])
        return result

    @property
    def job_dir(self):
        return self.folder / ".hpc-compose" / self.job_id

    @property
    def copies(self):
        return self.job_dir / "secrets" / "reader"

    def log(self):
        return (self.job_dir / "logs" / "reader.log").read_text()

    def wait_for_log(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self.log():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("%r never appeared in the reader's log" % text)

    def digests(self):
        return (hashlib.sha256((self.file_value + "\n").encode()).hexdigest(),
                hashlib.sha256(self.env_value.encode()).hexdigest())

    def files_holding_a_value(self):
        found = []
        for directory, _, names in os.walk(str(self.folder)):
            for name in names:
                path = os.path.join(directory, name)
                if path == str(self.folder / "token.txt") or os.path.islink(path):
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
                if self.file_value.encode() in data or self.env_value.encode() in data:
                    found.append(path)
        return found


def batch_shell_pid(job_id):
    """The pid of the job's batch shell, from ``scontrol listpids`` (the test cluster's nodes all
    run on this machine; the node name picks the right slurmd)."""
    node = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], stdout=subprocess.PIPE,
                          universal_newlines=True, timeout=30).stdout.split(",")[0].strip()
    listing = subprocess.run(["scontrol", "listpids", job_id, node], stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=30).stdout
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "batch":
            try:
                with open("/proc/%s/cmdline" % fields[0], "rb") as handle:
                    if b"slurm_script" in handle.read():
                        return int(fields[0])
            except OSError:
                continue
    raise AssertionError("no batch shell of job %s in scontrol listpids: %r" % (job_id, listing))


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def assert_owner_only_tracking(run, script_path):
    root = run.folder / ".hpc-compose"
    assert mode(script_path) == 0o600
    assert (mode(root), mode(root / "jobs"), mode(run.job_dir)) == (0o700, 0o700, 0o700)
    assert mode(root / "jobs" / ("%s.json" % run.job_id)) == 0o600
    assert mode(root / "latest.json") == 0o600
    assert mode(run.job_dir / "state.json") == 0o600
    assert mode(run.job_dir / "logs" / "reader.log") == 0o600


def assert_outputs_hold_no_value(run):
    for args in (["config"], ["config", "--format", "json"], ["inspect", "--verbose"],
                 ["render"], ["render", "--format", "json"], ["status", "--format", "json"]):
        code, _, err = run.tool(*(args + ["-f", run.compose]))   # tool() checks the values
        assert code == 0, (args, err)


def assert_nothing_keeps_a_value(run, script_path, status, mounted_read_only=False):
    """After the job: the service read both, the copies are gone, modes and outputs are right."""
    assert final_state(run.job_dir)["status"] == status
    assert_service_read_both_secrets(run, mounted_read_only)
    assert not (run.job_dir / "secrets").exists()
    assert run.files_holding_a_value() == []
    assert_owner_only_tracking(run, script_path)
    assert_outputs_hold_no_value(run)


def assert_service_read_both_secrets(run, mounted_read_only=False):
    log = run.log()
    file_digest, env_digest = run.digests()
    assert "modes 700 600 400" in log
    assert "%s  " % file_digest in log and "%s  " % env_digest in log
    assert ("copies are read-only" in log) == mounted_read_only
    # The services get the submitter's umask back: only what hpc-compose writes is owner-only.
    assert "umask 0000" in log


def test_host_service_reads_both_secrets_and_nothing_keeps_a_value_afterwards(
        slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs)
    result = run.submit()
    assert wait_for_job(run.job_id, timeout=120) == "COMPLETED"
    assert_nothing_keeps_a_value(run, result["script_path"], "completed")


def test_container_service_reads_both_secrets_at_run_secrets(slurm, slurm_jobs, tmp_path,
                                                             container_runtime):
    image = pyxis_test_image()
    cache = os.path.join(os.path.dirname(image), "e2e-cache")
    run = Run(tmp_path, slurm_jobs, where="    image: %s\n" % image,
              slurm="  cache_dir: %s\n%s" % (cache, runtime_line(container_runtime)))
    result = run.submit("--skip-prepare")
    assert wait_for_job(run.job_id, timeout=180) == "COMPLETED"
    assert_nothing_keeps_a_value(run, result["script_path"], "completed", mounted_read_only=True)
    assert "/run/secrets/api_token" in run.log()


def test_cancelled_running_job_removes_its_copies(slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs, tail="exec sleep 300")
    result = run.submit()
    run.wait_for_log("reader-done")
    # While the job runs, the copies exist, owner-only.
    assert (mode(run.job_dir / "secrets"), mode(run.copies)) == (0o700, 0o700)
    assert (mode(run.copies / "api_token"), mode(run.copies / "hf_token")) == (0o600, 0o400)
    code, out, err = run.tool("cancel", "-f", run.compose)
    assert code == 0, err
    assert wait_for_job(run.job_id, timeout=90) == "CANCELLED"
    assert_nothing_keeps_a_value(run, result["script_path"], "cancelled")


def test_cancelling_a_pending_job_removes_the_copies_it_never_read(slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs, slurm="  submit_args:\n    - --begin=now+3600\n")
    run.submit()
    assert wait_for_state(run.job_id, ("PENDING",), timeout=30) == "PENDING"
    assert (run.copies / "api_token").read_text() == run.file_value + "\n"
    code, _, err = run.tool("cancel", "-f", run.compose)
    assert code == 0, err
    assert not (run.job_dir / "secrets").exists()
    assert wait_for_job(run.job_id, timeout=60) == "CANCELLED"
    assert run.files_holding_a_value() == []


def test_time_limit_removes_the_copies(slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs, tail="exec sleep 600", time_limit="00:01:00")
    run.submit()
    assert wait_for_job(run.job_id, timeout=240) == "TIMEOUT"
    assert final_state(run.job_dir)["status"] == "timeout"
    assert not (run.job_dir / "secrets").exists()
    assert run.files_holding_a_value() == []


def test_a_failed_release_cancels_the_held_job_and_removes_the_copies(slurm, slurm_jobs,
                                                                       tmp_path):
    run = Run(tmp_path, slurm_jobs)
    code, out, err = run.tool("submit", "-f", run.compose, "--scontrol-bin", "/bin/false")
    assert code == 1
    assert "was cancelled before it started: scontrol release" in err
    job_id = slurm_jobs.add(err.split("job ", 1)[1].split()[0])
    assert wait_for_job(job_id, timeout=60) == "CANCELLED"
    assert not (run.folder / ".hpc-compose" / job_id / "secrets").exists()
    assert run.files_holding_a_value() == []


def test_clean_removes_the_copies_a_killed_batch_shell_left(slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs, tail="exec sleep 300")
    run.submit()
    run.wait_for_log("reader-done")
    # SIGKILL to the batch shell cannot be trapped: no teardown runs, as after a crash. (Slurm turns
    # `scancel --signal=KILL` into an ordinary cancel, so the shell is killed directly on the node.)
    os.kill(batch_shell_pid(run.job_id), 9)
    assert wait_for_job(run.job_id, timeout=90) in ("CANCELLED", "FAILED")
    assert (run.copies / "api_token").exists()
    code, out, err = run.tool("clean", "--all", "-f", run.compose)
    assert code == 0, err
    assert "removed the secret copies left by job %s" % run.job_id in out
    assert not (run.job_dir / "secrets").exists()
    assert run.files_holding_a_value() == []


def test_share_with_group_makes_logs_group_readable_but_not_the_script_or_records(
        slurm, slurm_jobs, tmp_path):
    run = Run(tmp_path, slurm_jobs, slurm="  share_with_group: true\n")
    result = run.submit()
    assert wait_for_job(run.job_id, timeout=120) == "COMPLETED"
    final_state(run.job_dir)
    root = run.folder / ".hpc-compose"
    assert (mode(root), mode(run.job_dir), mode(run.job_dir / "logs")) == (0o750, 0o750, 0o750)
    assert mode(run.job_dir / "logs" / "reader.log") == 0o640
    assert mode(result["script_path"]) == 0o600
    assert mode(root / "jobs") == 0o700 and mode(root / "latest.json") == 0o600
    assert run.files_holding_a_value() == []
    assert hpc_compose._load_runtime_state(str(run.job_dir))["status"] == "completed"
