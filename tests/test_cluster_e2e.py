"""Smoke test of the real test cluster: a plain sbatch job runs, is accounted and writes its output.

If this fails, every other end-to-end test will too: look at the cluster first
(`bash tests/cluster/slurm-cluster.sh status`).
"""
import os
import subprocess

from slurm_support import expected_slurm_generation, sacct_job, submit_wrap, wait_for_job, run_tool_cli


def test_sbatch_wrap_job_completes_with_its_output(slurm, slurm_jobs, tmp_path):
    job_id = slurm_jobs.add(submit_wrap(
        "echo smoke-$SLURM_JOB_ID; srun --overlap printf 'step:%s\\n' \"$SLURM_JOB_PARTITION\"",
        cwd=tmp_path, output="out-%j.txt", args=["--time=2", "--job-name=hc-smoke"]))

    assert wait_for_job(job_id, timeout=120) == "COMPLETED"
    row = sacct_job(job_id)
    assert row["ExitCode"] == "0:0"
    assert row["JobName"] == "hc-smoke"
    with open(os.path.join(str(tmp_path), "out-%s.txt" % job_id)) as handle:
        assert handle.read() == "smoke-%s\nstep:%s\n" % (job_id, slurm.partition)


def test_failing_job_is_reported_failed_with_its_exit_code(slurm, slurm_jobs, tmp_path):
    job_id = slurm_jobs.add(submit_wrap("exit 3", cwd=tmp_path, output="/dev/null", args=["--time=2"]))

    assert wait_for_job(job_id, timeout=120) == "FAILED"
    assert sacct_job(job_id)["ExitCode"] == "3:0"


def test_tool_runs_as_a_subprocess_under_this_python(tmp_path):
    res = run_tool_cli(["--version"], cwd=tmp_path)

    assert res.code == 0, res
    assert res.out.strip().startswith("hpc-compose")


def test_controller_and_job_steps_are_the_slurm_of_the_client_commands(slurm, slurm_jobs, tmp_path):
    # slurm-cluster.sh exec --slurm X runs the suite against generation X: its clients, its
    # slurmctld and its slurmd must all be X, not the host's Slurm answering in their place.
    config = subprocess.check_output(["scontrol", "show", "config"], universal_newlines=True, timeout=20)
    controller = [line.split("=", 1)[1].strip() for line in config.splitlines()
                  if line.split("=", 1)[0].strip() == "SLURM_VERSION"]
    job_id = slurm_jobs.add(submit_wrap("srun --overlap srun --version", cwd=tmp_path,
                                        output="out-%j.txt", args=["--time=2"]))
    assert wait_for_job(job_id, timeout=120) == "COMPLETED"
    with open(os.path.join(str(tmp_path), "out-%s.txt" % job_id)) as handle:
        in_step = handle.read().strip()

    release = slurm.version.split()[-1]
    assert controller == [release]
    assert in_step.split()[-1] == release
    expected = expected_slurm_generation()
    if expected is not None:
        assert release.startswith(expected + "."), (release, expected)
