"""Migrated Compose apps of the corpus (tests/migrate_corpus/) run on REAL Pyxis + Enroot.

Each test copies a corpus app, runs `hpc-compose migrate` on its docker-compose.yml as a user would,
then `hpc-compose submit` on the result, with TEST_IMAGE pointing the app's `${TEST_IMAGE:-...}`
image at the local test image (`slurm_support.pyxis_test_image()`), and checks what the services
wrote into the folders migrate made of the named volumes.
"""
import os
import re
import shutil

from slurm_support import free_port, run_tool_cli, wait_for_job

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrate_corpus")


def migrate_and_submit(app, tmp_path, image, cache_dir, slurm_jobs):
    """Copy corpus ``app``, migrate it, submit the result; returns (folder, final job state)."""
    folder = str(tmp_path / app)
    shutil.copytree(os.path.join(CORPUS, app), folder)
    # WEB_PORT: a port free now, never a fixed one (the suites of two Slurm generations run side
    # by side on one machine, and a server of the other suite would answer this one's readiness).
    env = {"TEST_IMAGE": image, "WEB_PORT": str(free_port())}
    migrated = run_tool_cli(["migrate", "--cache-dir", cache_dir], cwd=folder, env=env)
    assert migrated.code == 0 and "the result validates" in migrated.out, migrated
    submitted = run_tool_cli(["submit", "-f", "compose.yaml"], cwd=folder, env=env, timeout=900)
    assert submitted.code == 0, submitted
    job_id = re.search(r"submitted batch job (\d+)", submitted.out + submitted.err).group(1)
    slurm_jobs.add(job_id)
    state = wait_for_job(job_id, timeout=600)
    if state != "COMPLETED":
        # What the services printed, so a failure explains itself in CI's output.
        logs = run_tool_cli(["logs", "-f", "compose.yaml", "--job-id", job_id], cwd=folder,
                            env=env)
        print("job %s ended %s; hpc-compose logs:\n%s%s" % (job_id, state, logs.out, logs.err))
    return folder, state


def read(folder, *parts):
    with open(os.path.join(folder, *parts), encoding="utf-8") as handle:
        return handle.read()


def test_migrated_web_and_client_app_runs_with_readiness_and_a_named_volume(
        slurm, slurm_jobs, image, cache_dir, tmp_path):
    folder, state = migrate_and_submit("local-http-client", tmp_path, image, cache_dir,
                                       slurm_jobs)
    assert state == "COMPLETED"
    # The client reached http://web:$WEB_PORT as 127.0.0.1 after the healthcheck turned readiness
    # passed, and wrote into the bind mount migrate made of the `results` volume.
    assert read(folder, "data", "results", "page.html") == read(folder, "site", "index.html")


def test_migrated_dockerfile_app_is_prepared_and_runs(slurm, slurm_jobs, image, cache_dir,
                                                      tmp_path):
    folder, state = migrate_and_submit("local-build", tmp_path, image, cache_dir, slurm_jobs)
    assert state == "COMPLETED"
    # RUN baked greeting.txt into the prepared image; ENV reached the service at run time; the
    # COPY after the last RUN became a runtime volume of greet.sh.
    assert read(folder, "data", "out", "greeting.txt") == \
        "built by prepare\nat run time: built by prepare\n"


def test_migrated_two_stage_dockerfile_app_prints_what_docker_prints(slurm, slurm_jobs, image,
                                                                    cache_dir, tmp_path):
    # The build stage is prepared as its own image, and the final stage's prepare copies its
    # file --from it; WORKDIR, COPY into it, COPY dir/ ./dir/, ENV and RUN made the rest, and a
    # dotted environment name (as Elasticsearch's) reaches the program.
    folder, state = migrate_and_submit("two-stage-app", tmp_path, image, cache_dir, slurm_jobs)
    assert state == "COMPLETED"
    assert read(folder, "data", "out", "report.txt") == (
        "greeting: hello from ENV\n"
        "cwd: /app\n"
        "discovery.type: single-node\n"
        "RUN step ran\n"
        "requests==2.32.3\n"
        "setting=42\n"
        "built in the build stage, in /src\n")
