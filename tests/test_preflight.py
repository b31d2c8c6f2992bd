"""Preflight: every finding, with real files, the real srun (with or without Pyxis) and stand-ins
only for enroot, for a Pyxis-enabled srun and for an srun without Pyxis."""
import json
import subprocess
import os
import shutil

import pytest

import hpc_compose as hc
from test_images import STANDIN, make_plan, make_service, prepare_plan, shared  # noqa: F401

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
PYXIS_SRUN = os.path.join(TESTS, "standins", "srun-pyxis")
REAL_SRUN = shutil.which("srun")
REAL_SBATCH = shutil.which("sbatch")


def opts(**kw):
    values = dict(enroot_bin=STANDIN, srun_bin=PYXIS_SRUN, sbatch_bin=REAL_SBATCH or "sbatch")
    values.update(kw)
    return hc.PreflightOptions(**values)


def preflight(plan, **kw):
    return hc.run_preflight(hc.build_runtime_plan(plan), opts(**kw))


def by_check(report, check):
    return [f for f in report.findings if f.check == check]


def levels(report, check):
    return [f.level for f in by_check(report, check)]


def credentials(tmp_path, text):
    path = tmp_path / "enroot-config" / ".credentials"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


needs_slurm = pytest.mark.skipif(REAL_SRUN is None or REAL_SBATCH is None,
                                 reason="Slurm client tools not installed (tests/cluster/slurm-cluster.sh up)")


# -- binaries and Pyxis ----------------------------------------------------------------------------

@needs_slurm
def test_all_binaries_and_pyxis_present_pass(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared))
    assert levels(report, "binary.enroot") == ["ok"]
    assert levels(report, "binary.srun") == ["ok"]
    assert levels(report, "binary.sbatch") == ["ok"]
    assert levels(report, "pyxis") == ["ok"]
    assert report.errors == ()


def test_missing_enroot_is_error_with_flag_remedy(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared),
                       enroot_bin=str(tmp_path / "nope" / "enroot"))
    finding, = by_check(report, "binary.enroot")
    assert finding.level == "error"
    assert "required binary" in finding.message and "--enroot-bin" in finding.remediation


def test_missing_srun_and_sbatch_are_errors(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared),
                       srun_bin="no-such-srun-x", sbatch_bin="no-such-sbatch-x")
    assert levels(report, "binary.srun") == ["error"]
    assert levels(report, "binary.sbatch") == ["error"]
    assert "--srun-bin" in by_check(report, "binary.srun")[0].remediation
    assert "--sbatch-bin" in by_check(report, "binary.sbatch")[0].remediation
    assert by_check(report, "pyxis") == []


@needs_slurm
def test_scontrol_required_only_for_multi_node(tmp_path, shared, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    one = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared))
    assert by_check(one, "binary.scontrol") == []
    two = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared, nodes=2))
    finding, = by_check(two, "binary.scontrol")
    assert finding.level == "error" and "x-slurm.nodes is 2" in finding.message
    os.symlink(shutil.which("scontrol", path="/usr/bin:/usr/local/bin:/bin"), str(bin_dir / "scontrol"))
    assert levels(preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared, nodes=2)),
                  "binary.scontrol") == ["ok"]


def _advertises_container_image(srun):
    result = subprocess.run([srun, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    return "--container-image" in result.stdout + result.stderr


def test_srun_without_pyxis_is_error(tmp_path, shared):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n# STAND-IN for srun on a node without Pyxis: a help text with no plugin options.\n"
                    "echo 'Usage: srun [OPTIONS(0)...] executable [args...]'\n")
    srun.chmod(0o755)
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared),
                       srun_bin=str(srun))
    finding, = by_check(report, "pyxis")
    assert finding.level == "error"
    assert "srun does not advertise --container-image" in finding.message
    assert "x-slurm.runtime: host" in finding.remediation


@needs_slurm
def test_real_srun_pyxis_finding_follows_its_help_text(tmp_path, shared):
    """Holds on a cluster with Pyxis (ok) and without it (error)."""
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared),
                       srun_bin=REAL_SRUN)
    finding, = by_check(report, "pyxis")
    assert finding.level == ("ok" if _advertises_container_image(REAL_SRUN) else "error")


@needs_slurm
def test_host_only_plan_needs_only_srun_and_sbatch(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("job", None, runtime="host")], cache_dir="/tmp/not-used")
    report = preflight(plan, enroot_bin="no-such-enroot", srun_bin=REAL_SRUN)
    checks = {f.check for f in report.findings}
    assert checks == {"binary.srun", "binary.sbatch"}
    assert report.errors == ()


APPTAINER_STANDIN = os.path.join(TESTS, "standins", "apptainer")


def test_apptainer_plan_needs_apptainer_not_enroot_or_pyxis(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer")],
                     cache_dir=shared)
    report = preflight(plan, enroot_bin="no-such-enroot", srun_bin=REAL_SRUN or "srun",
                       apptainer_bin="no-such-apptainer")
    checks = {f.check for f in report.findings}
    assert "binary.enroot" not in checks and "pyxis" not in checks
    assert levels(report, "binary.apptainer") == ["error"]
    assert "builds the .sif images here" in by_check(report, "binary.apptainer")[0].message


def test_apptainer_missing_is_only_a_warning_when_nothing_is_built_here(tmp_path, shared):
    sif = tmp_path / "app.sif"
    sif.write_text("x")
    service = make_service("a", None, runtime="apptainer")._replace(
        image=hc.ImageRef("local", str(sif), original=str(sif)))
    report = preflight(make_plan(tmp_path, [service], cache_dir=shared),
                       apptainer_bin="no-such-apptainer")
    assert levels(report, "binary.apptainer") == ["warn"]


def test_apptainer_found_reports_its_version(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer")],
                     cache_dir=shared)
    report = preflight(plan, apptainer_bin=APPTAINER_STANDIN)
    # The stand-in knows only `build`: its --version fails, which is a warning, not an error.
    assert levels(report, "binary.apptainer") == ["warn"]


# -- cache directory -------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dir", ["/tmp/hc-cache", "/var/tmp/hc", "/dev/shm/hc", "/private/tmp/x"])
def test_cache_dir_in_temporary_location_is_error(tmp_path, shared, cache_dir):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=cache_dir))
    finding, = by_check(report, "cache_dir.policy")
    assert finding.level == "error" and "shared storage" in finding.remediation
    assert by_check(report, "cache_dir.writable") == []


def test_cache_dir_reached_through_symlink_into_tmp_is_error(tmp_path, shared):
    link = os.path.join(shared, "cache-link")
    os.symlink(str(tmp_path), link)
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=link))
    assert levels(report, "cache_dir.policy") == ["error"]


def test_cache_dir_under_home_is_warning(tmp_path, shared):
    home = os.environ["HOME"]
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=os.path.join(home, ".cache", "hpc-compose"))
    report = preflight(plan)
    finding, = by_check(report, "cache_dir.policy")
    assert finding.level == "warn"
    assert "x-slurm.cache_dir is not set" in finding.message
    assert levels(report, "cache_dir.writable") == ["ok"]


def test_explicit_cache_dir_under_home_warning_names_it(tmp_path, shared):
    home = os.environ["HOME"]
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=os.path.join(home, "cache"))
    plan = plan._replace(slurm=plan.slurm._replace(cache_dir="~/cache"))
    finding, = by_check(preflight(plan), "cache_dir.policy")
    assert finding.level == "warn" and "is under $HOME" in finding.message


def test_cache_dir_not_writable_is_error(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir="/sys"))
    finding, = by_check(report, "cache_dir.writable")
    assert finding.level == "error" and "not writable" in finding.message


def test_missing_cache_dir_that_cannot_be_created_is_error(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir="/sys/hc/cache"))
    finding, = by_check(report, "cache_dir.writable")
    assert finding.level == "error" and "cannot be created" in finding.message


def test_missing_cache_dir_is_not_created_by_preflight(tmp_path, shared):
    cache = os.path.join(shared, "new", "cache")
    report = preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=cache))
    assert levels(report, "cache_dir.writable") == ["ok"]
    assert not os.path.exists(os.path.join(shared, "new"))


# -- paths -------------------------------------------------------------------------------------------

def test_missing_local_image_is_error(tmp_path, shared):
    report = preflight(make_plan(tmp_path, [make_service("app", str(tmp_path / "missing.sqsh"))],
                                 cache_dir=shared))
    finding, = by_check(report, "paths.image")
    assert finding.level == "error" and str(tmp_path) in finding.remediation


def test_missing_volume_and_prepare_mount_are_errors(tmp_path, shared):
    volume = hc.Mount(host=str(tmp_path / "src"), container="/src")
    prep_mount = hc.Mount(host=str(tmp_path / "req.txt"), container="/tmp/req.txt")
    service = make_service("app", "python:3.11", mounts=[volume], prepare=prepare_plan(mounts=[prep_mount]))
    report = preflight(make_plan(tmp_path, [service], cache_dir=shared))
    assert levels(report, "paths.volume") == ["error"]
    assert levels(report, "paths.prepare_mount") == ["error"]
    (tmp_path / "src").mkdir()
    (tmp_path / "req.txt").write_text("x")
    report = preflight(make_plan(tmp_path, [service], cache_dir=shared))
    assert levels(report, "paths.volume") == ["ok"]
    assert levels(report, "paths.prepare_mount") == ["ok"]


def test_symlink_to_outside_mounted_dir_is_warned(tmp_path, shared):
    models = tmp_path / "models"
    models.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.gguf").write_text("weights")
    (models / "inside.bin").write_text("x")
    os.symlink(str(elsewhere / "model.gguf"), str(models / "model.gguf"))
    os.symlink(str(models / "inside.bin"), str(models / "alias.bin"))
    service = make_service("llm", "python:3.11", mounts=[hc.Mount(host=str(models), container="/models")])
    findings = by_check(preflight(make_plan(tmp_path, [service], cache_dir=shared)), "paths.symlink")
    assert [f.level for f in findings] == ["warn"]
    assert str(models / "model.gguf") in findings[0].message
    assert "copy the real file" in findings[0].remediation


def test_symlink_into_another_mount_is_fine(tmp_path, shared):
    models = tmp_path / "models"
    models.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "w.bin").write_text("x")
    os.symlink(str(data / "w.bin"), str(models / "w.bin"))
    service = make_service("llm", "python:3.11", mounts=[hc.Mount(host=str(models), container="/models"),
                                                         hc.Mount(host=str(data), container="/data")])
    assert by_check(preflight(make_plan(tmp_path, [service], cache_dir=shared)), "paths.symlink") == []


def test_resume_path_under_tmp_is_warning(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)
    plan = plan._replace(slurm=plan.slurm._replace(resume=hc.ResumeSpec(path="/tmp/run1")))
    finding, = by_check(preflight(plan), "resume.path")
    assert finding.level == "warn" and "shared storage" in finding.remediation
    plan = plan._replace(slurm=plan.slurm._replace(resume=hc.ResumeSpec(path=shared)))
    assert levels(preflight(plan), "resume.path") == ["ok"]


# -- registry credentials -------------------------------------------------------------------------

def test_docker_hub_anonymous_pull_is_warning(tmp_path, shared):
    finding, = by_check(preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)),
                        "registry.credentials")
    assert finding.level == "warn" and "rate-limits" in finding.message
    assert "machine auth.docker.io" in finding.remediation
    assert str(tmp_path / "enroot-config" / ".credentials") in finding.message


def test_docker_hub_needs_registry_line_too_for_enroot_3(tmp_path, shared):
    credentials(tmp_path, "machine auth.docker.io login me password tok\n")
    finding, = by_check(preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)),
                        "registry.credentials")
    assert finding.level == "warn" and "machine registry-1.docker.io" in finding.remediation


def test_docker_hub_credentials_complete_pass(tmp_path, shared):
    credentials(tmp_path, "# hub\nmachine auth.docker.io login me password tok\n"
                          "machine registry-1.docker.io\n  login me\n  password tok\n")
    assert levels(preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)),
                  "registry.credentials") == ["ok"]


def test_nvcr_needs_both_machines(tmp_path, shared):
    credentials(tmp_path, "machine nvcr.io login $oauthtoken password k\n")
    plan = make_plan(tmp_path, [make_service("t", "nvcr.io/nvidia/pytorch:24.01-py3")], cache_dir=shared)
    finding, = by_check(preflight(plan), "registry.credentials")
    assert finding.level == "warn" and "'machine authn.nvidia.com'" in finding.message
    credentials(tmp_path, "machine nvcr.io login $oauthtoken password k\n"
                          "machine authn.nvidia.com login $oauthtoken password k\n")
    assert levels(preflight(plan), "registry.credentials") == ["ok"]


def test_other_registry_anonymous_is_only_informational(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("a", "ghcr.io/org/app:1")], cache_dir=shared)
    finding, = by_check(preflight(plan), "registry.credentials")
    assert finding.level == "ok" and "machine ghcr.io" in finding.message


def test_credentials_file_location_follows_enroot(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("ENROOT_CONFIG_PATH", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert hc._enroot_credentials_path() == "/home/u/.config/enroot/.credentials"
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg")
    assert hc._enroot_credentials_path() == "/xdg/enroot/.credentials"
    monkeypatch.setenv("ENROOT_CONFIG_PATH", "/etc/enroot-user")
    assert hc._enroot_credentials_path() == "/etc/enroot-user/.credentials"


def test_no_credential_check_when_image_is_cached(tmp_path, shared, monkeypatch):
    monkeypatch.setenv("ENROOT_TEMP_PATH", str(tmp_path / "et"))
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)
    hc.prepare_images(hc.build_runtime_plan(plan), hc.PrepareOptions(enroot_bin=STANDIN))
    assert by_check(preflight(plan), "registry.credentials") == []


# -- curl, Enroot version, skip-prepare -----------------------------------------------------------

def test_http_readiness_without_curl_is_warning(tmp_path, shared, monkeypatch):
    service = make_service("web", "python:3.11")._replace(
        readiness=hc.ReadinessSpec(type="http", url="http://127.0.0.1:8080/"))
    plan = make_plan(tmp_path, [service], cache_dir=shared)
    assert levels(preflight(plan), "readiness.curl") == ["ok"]
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    finding, = by_check(preflight(plan), "readiness.curl")
    assert finding.level == "warn" and "curl" in finding.remediation


def test_digest_reference_needs_enroot_4(tmp_path, shared, monkeypatch):
    plan = make_plan(tmp_path, [make_service("a", "ghcr.io/org/app@sha256:0123")], cache_dir=shared)
    monkeypatch.setenv("ENROOT_STANDIN_VERSION", "3.5.0")
    finding, = by_check(preflight(plan), "enroot.version")
    assert finding.level == "error" and "Enroot 3.5.0" in finding.message
    monkeypatch.setenv("ENROOT_STANDIN_VERSION", "4.1.0")
    assert levels(preflight(plan), "enroot.version") == ["ok"]
    assert by_check(preflight(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)),
                    "enroot.version") == []


def test_skip_prepare_with_missing_artifact_is_error(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())], cache_dir=shared)
    finding, = by_check(preflight(plan, skip_prepare=True), "skip_prepare.artifact")
    assert finding.level == "error"
    assert "--skip-prepare" in finding.message and "hpc-compose prepare -f" in finding.remediation


def test_skip_prepare_reuse_of_mount_built_image_is_warning(tmp_path, shared, monkeypatch):
    monkeypatch.setenv("ENROOT_TEMP_PATH", str(tmp_path / "et"))
    mount = hc.Mount(host=str(tmp_path), container="/src")
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan(mounts=[mount])),
                                make_service("r", "redis:7")], cache_dir=shared)
    hc.prepare_images(hc.build_runtime_plan(plan), hc.PrepareOptions(enroot_bin=STANDIN))
    report = preflight(plan, skip_prepare=True)
    assert levels(report, "skip_prepare.reuse") == ["warn"]
    assert "without the current contents" in by_check(report, "skip_prepare.reuse")[0].message
    assert levels(report, "skip_prepare.artifact") == ["ok"]
    assert report.errors == () or {f.check for f in report.errors} <= {"pyxis", "binary.sbatch"}


def test_every_error_and_warning_says_what_to_do(tmp_path, shared):
    service = make_service("app", str(tmp_path / "none.sqsh"),
                           mounts=[hc.Mount(host=str(tmp_path / "nope"), container="/x")])
    plan = make_plan(tmp_path, [service, make_service("r", "redis:7")], cache_dir="/tmp/c", nodes=2)
    report = preflight(plan, enroot_bin="nope-enroot", srun_bin="nope-srun", sbatch_bin="nope-sbatch",
                       skip_prepare=True)
    assert len(report.errors) >= 5
    assert all(f.remediation for f in report.errors + report.warnings)


# -- CLI -----------------------------------------------------------------------------------------------

def write_compose(tmp_path, body):
    path = tmp_path / "proj" / "compose.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


@needs_slurm
def test_cli_preflight_host_plan_passes_with_exit_0(tmp_path, shared, cli):
    compose = write_compose(tmp_path, "services:\n  job:\n    command: echo hi\n"
                                      "x-slurm:\n  runtime: host\n")
    result = cli(["preflight", "-f", compose, "--verbose"])
    assert result.code == 0, result
    assert result.out.startswith("preflight: 0 errors, 0 warnings")
    assert "ok: srun found at" in result.out


def test_cli_preflight_errors_exit_1_with_fix_lines(tmp_path, shared, cli):
    compose = write_compose(tmp_path, "x-slurm:\n  cache_dir: %s\nservices:\n  app:\n"
                                      "    image: ./missing.sqsh\n    command: run\n" % shared)
    result = cli(["preflight", "-f", compose, "--enroot-bin", STANDIN, "--srun-bin", PYXIS_SRUN])
    assert result.code == 1, result
    assert "error: service 'app': local image %s does not exist" % (tmp_path / "proj" / "missing.sqsh") in result.out
    assert "  fix: " in result.out


@needs_slurm
def test_cli_preflight_strict_fails_on_warnings_and_json(tmp_path, shared, cli):
    compose = write_compose(tmp_path, "x-slurm:\n  cache_dir: %s\nservices:\n  r:\n"
                                      "    image: redis:7\n" % shared)
    args = ["preflight", "-f", compose, "--enroot-bin", STANDIN, "--srun-bin", PYXIS_SRUN]
    relaxed = cli(args)
    assert relaxed.code == 0, relaxed
    assert "warning: service 'r' will pull anonymously from Docker Hub" in relaxed.out
    strict = cli(args + ["--strict", "--format", "json"])
    assert strict.code == 1
    data = json.loads(strict.out)
    assert data["ok"] is False and data["strict"] is True
    assert data["summary"]["warnings"] == 1 and data["summary"]["errors"] == 0
    assert {"level", "check", "message", "remediation"} <= set(data["findings"][0])


def test_dry_run_skip_prepare_missing_artifact_is_only_warning(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())], cache_dir=shared)
    finding, = by_check(preflight(plan, skip_prepare=True, dry_run=True), "skip_prepare.artifact")
    assert finding.level == "warn"


def test_skip_prepare_does_not_probe_cache_writability_or_credentials(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir="/sys")
    report = preflight(plan, skip_prepare=True)
    assert by_check(report, "cache_dir.writable") == []
    assert by_check(report, "registry.credentials") == []


def test_unreadable_enroot_version_with_digest_is_warning(tmp_path, shared, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_VERSION", "")
    plan = make_plan(tmp_path, [make_service("a", "ghcr.io/org/app@sha256:0123")], cache_dir=shared)
    finding, = by_check(preflight(plan), "enroot.version")
    assert finding.level == "warn" and "tag instead" in finding.remediation


# -- batch log folders -----------------------------------------------------------------------------

def test_missing_batch_output_folder_is_error_naming_field(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)
    plan = plan._replace(slurm=plan.slurm._replace(output="logs/slurm-%j.out"))
    finding, = by_check(preflight(plan), "batch_log.output")
    assert finding.level == "error"
    assert "x-slurm.output" in finding.message and str(tmp_path / "logs") in finding.message
    assert "mkdir -p" in finding.remediation


def test_existing_batch_error_folder_under_chdir_passes(tmp_path, shared):
    (tmp_path / "run" / "logs").mkdir(parents=True)
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)
    plan = plan._replace(slurm=plan.slurm._replace(chdir="run", error="logs/%x-%j.err"))
    assert levels(preflight(plan), "batch_log.error") == ["ok"]


def test_batch_log_folder_with_slurm_pattern_is_not_judged(tmp_path, shared):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=shared)
    plan = plan._replace(slurm=plan.slurm._replace(output="/nonexistent/%u/out.log"))
    assert by_check(preflight(plan), "batch_log.output") == []
