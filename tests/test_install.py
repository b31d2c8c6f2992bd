"""install.sh: local .pyz installs, mirror downloads with checksum checks, clear failures."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SH = os.path.join(REPO, "install.sh")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """A freshly built hpc-compose.pyz (source only: quick to build) with its .sha256."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(["make", "-s", "-f", "zipapp.mk", "DIST=%s" % dist, "PYTHONS=",
                    "PYTHON=%s" % sys.executable], cwd=REPO, check=True)
    return dist / "hpc-compose.pyz"


def run_install(args, env_extra, cwd=None):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run(["sh", INSTALL_SH] + list(args), env=env, cwd=cwd or REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)


def make_mirror(root, pyz, version, checksum=None):
    folder = root / "download" / version
    folder.mkdir(parents=True)
    shutil.copy(str(pyz), str(folder / "hpc-compose.pyz"))
    digest = checksum or hashlib.sha256(pyz.read_bytes()).hexdigest()
    (folder / "hpc-compose.pyz.sha256").write_text("%s  dist/hpc-compose.pyz\n" % digest)
    return "file://%s" % root


def test_local_pyz_is_installed_as_executable_hpc_compose(tmp_path, pyz):
    result = run_install([str(pyz)], {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    target = tmp_path / "bin" / "hpc-compose"
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert target.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    version = subprocess.run([str(target), "--version"], stdout=subprocess.PIPE,
                             universal_newlines=True)
    assert version.stdout.startswith("hpc-compose ")


def test_local_pyz_with_wrong_checksum_file_is_refused(tmp_path, pyz):
    copy = tmp_path / "hpc-compose.pyz"
    shutil.copy(str(pyz), str(copy))
    (tmp_path / "hpc-compose.pyz.sha256").write_text("0" * 64 + "  hpc-compose.pyz\n")
    result = run_install([str(copy)], {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr
    assert not (tmp_path / "bin" / "hpc-compose").exists()


def test_install_dir_defaults_to_home_local_bin(tmp_path, pyz):
    env = {"HOME": str(tmp_path)}
    result = run_install([str(pyz)], env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".local" / "bin" / "hpc-compose").is_file()


def test_version_download_from_file_mirror_is_verified_and_installed(tmp_path, pyz):
    base = make_mirror(tmp_path / "mirror", pyz, "v9.9.9")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "9.9.9",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    assert "checksum ok" in result.stdout
    assert (tmp_path / "bin" / "hpc-compose").read_bytes() == pyz.read_bytes()


def test_latest_download_uses_the_latest_folder_of_the_mirror(tmp_path, pyz):
    mirror = tmp_path / "mirror"
    folder = mirror / "latest" / "download"
    folder.mkdir(parents=True)
    shutil.copy(str(pyz), str(folder / "hpc-compose.pyz"))
    (folder / "hpc-compose.pyz.sha256").write_text(
        hashlib.sha256(pyz.read_bytes()).hexdigest().upper() + "\n")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": "file://%s" % mirror,
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bin" / "hpc-compose").is_file()


def test_download_with_bad_checksum_is_refused_and_nothing_installed(tmp_path, pyz):
    base = make_mirror(tmp_path / "mirror", pyz, "v1.0.0", checksum="ab" * 32)
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "v1.0.0",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr
    assert not (tmp_path / "bin" / "hpc-compose").exists()


def test_existing_install_survives_a_refused_download(tmp_path, pyz):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hpc-compose").write_text("previous install\n")
    base = make_mirror(tmp_path / "mirror", pyz, "v1.0.0", checksum="cd" * 32)
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "v1.0.0",
                              "HPC_COMPOSE_INSTALL_DIR": str(bin_dir)})
    assert result.returncode == 1
    assert (bin_dir / "hpc-compose").read_text() == "previous install\n"


def test_unreachable_url_fails_with_one_clear_line(tmp_path):
    # Port 9 (discard) on loopback: nothing listens there, so the connection is refused at once.
    result = run_install([], {"HPC_COMPOSE_BASE_URL": "http://127.0.0.1:9/releases",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("install.sh: error: could not download http://127.0.0.1:9/")
    assert not (tmp_path / "bin").exists()


def test_missing_version_on_mirror_fails_clearly(tmp_path, pyz):
    base = make_mirror(tmp_path / "mirror", pyz, "v1.0.0")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "v2.0.0",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "download/v2.0.0/hpc-compose.pyz" in result.stderr


def test_missing_local_file_is_an_error(tmp_path):
    result = run_install([str(tmp_path / "nope.pyz")],
                         {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_install_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=sh", INSTALL_SH], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout
