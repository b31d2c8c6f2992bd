"""install.sh: local .pyz, URL and site-mirror installs with checksum checks; clear failures."""
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


def make_mirror(root, pyz, folder_name, checksum=None):
    """A site mirror of releases: <root>/<folder_name>/hpc-compose.pyz and its .sha256."""
    folder = root / folder_name
    folder.mkdir(parents=True)
    shutil.copy(str(pyz), str(folder / "hpc-compose.pyz"))
    digest = checksum or hashlib.sha256(pyz.read_bytes()).hexdigest()
    (folder / "hpc-compose.pyz.sha256").write_text("%s  hpc-compose.pyz\n" % digest)
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


def test_file_url_with_its_sha256_is_verified_and_installed(tmp_path, pyz):
    base = make_mirror(tmp_path / "site", pyz, "any")
    result = run_install([base + "/any/hpc-compose.pyz"],
                         {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    assert "checksum ok" in result.stdout
    assert (tmp_path / "bin" / "hpc-compose").read_bytes() == pyz.read_bytes()


def test_file_url_without_its_sha256_is_refused_and_nothing_installed(tmp_path, pyz):
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(str(pyz), str(folder / "hpc-compose.pyz"))
    url = "file://%s/hpc-compose.pyz" % folder
    result = run_install([url], {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "install.sh: error: could not download %s.sha256 (curl failed); check the network, the "
        "URL and the version" % url)
    assert not (tmp_path / "bin").exists()


def test_file_url_with_a_wrong_checksum_is_refused_and_nothing_installed(tmp_path, pyz):
    base = make_mirror(tmp_path / "site", pyz, "any", checksum="ab" * 32)
    result = run_install([base + "/any/hpc-compose.pyz"],
                         {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "nothing was installed" in result.stderr
    assert not (tmp_path / "bin").exists()


def test_plain_http_url_is_refused_as_usage(tmp_path):
    result = run_install(["http://127.0.0.1:9/hpc-compose.pyz"],
                         {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 2
    assert result.stderr == ("install.sh: error: only https:// and file:// URLs are accepted, not "
                             "http://127.0.0.1:9/hpc-compose.pyz\n")


def test_no_source_prints_how_to_get_a_pyz_and_exits_2(tmp_path):
    env = {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")}
    env_without_mirror = dict((k, v) for k, v in os.environ.items()
                              if k not in ("HPC_COMPOSE_BASE_URL", "HPC_COMPOSE_VERSION"))
    env_without_mirror.update(env)
    result = subprocess.run(["sh", INSTALL_SH], env=env_without_mirror, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "install.sh: error: nothing to install" in result.stderr
    assert "release page" in result.stderr
    assert "make -f zipapp.mk && sh install.sh dist/hpc-compose.pyz" in result.stderr
    assert not (tmp_path / "bin").exists()


@pytest.mark.parametrize("version", ["0.2.0", "v0.2.0"])
def test_version_from_a_site_mirror_is_verified_and_installed(tmp_path, pyz, version):
    base = make_mirror(tmp_path / "mirror", pyz, "0.2.0")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base + "/", "HPC_COMPOSE_VERSION": version,
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("downloading %s/0.2.0/hpc-compose.pyz\nchecksum ok\n" % base)
    assert (tmp_path / "bin" / "hpc-compose").read_bytes() == pyz.read_bytes()


def test_mirror_without_version_takes_its_latest_folder(tmp_path, pyz):
    base = make_mirror(tmp_path / "mirror", pyz, "latest")
    (tmp_path / "mirror" / "latest" / "hpc-compose.pyz.sha256").write_text(
        hashlib.sha256(pyz.read_bytes()).hexdigest().upper() + "\n")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base,
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bin" / "hpc-compose").is_file()


def test_existing_install_survives_a_refused_download(tmp_path, pyz):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hpc-compose").write_text("previous install\n")
    base = make_mirror(tmp_path / "mirror", pyz, "1.0.0", checksum="cd" * 32)
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "1.0.0",
                              "HPC_COMPOSE_INSTALL_DIR": str(bin_dir)})
    assert result.returncode == 1
    assert (bin_dir / "hpc-compose").read_text() == "previous install\n"


def test_unreachable_url_fails_with_one_clear_line(tmp_path):
    # Port 9 (discard) on loopback: nothing listens there, so the connection is refused at once.
    result = run_install([], {"HPC_COMPOSE_BASE_URL": "https://127.0.0.1:9/releases",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("install.sh: error: could not download "
                               "https://127.0.0.1:9/releases/latest/hpc-compose.pyz")
    assert not (tmp_path / "bin").exists()


def test_missing_version_on_mirror_fails_clearly(tmp_path, pyz):
    base = make_mirror(tmp_path / "mirror", pyz, "1.0.0")
    result = run_install([], {"HPC_COMPOSE_BASE_URL": base, "HPC_COMPOSE_VERSION": "v2.0.0",
                              "HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "/2.0.0/hpc-compose.pyz" in result.stderr


def test_missing_local_file_is_an_error(tmp_path):
    result = run_install([str(tmp_path / "nope.pyz")],
                         {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_install_dir_that_cannot_be_created_fails_and_places_nothing(tmp_path, pyz):
    (tmp_path / "a-file").write_text("")
    result = run_install([str(pyz)], {"HPC_COMPOSE_INSTALL_DIR": str(tmp_path / "a-file" / "bin")})
    assert result.returncode == 1
    assert result.stderr == "install.sh: error: cannot create %s\n" % (tmp_path / "a-file" / "bin")


def test_unwritable_install_dir_fails_and_places_nothing(pyz):
    # root writes everywhere: run the installer as an unprivileged user then (setpriv).
    import tempfile
    root = tempfile.mkdtemp(prefix="hpc-compose-install-test-")
    try:
        os.chmod(root, 0o755)
        shutil.copy(str(pyz), os.path.join(root, "hpc-compose.pyz"))
        os.chmod(os.path.join(root, "hpc-compose.pyz"), 0o644)
        bin_dir = os.path.join(root, "bin")
        os.mkdir(bin_dir, 0o555)
        os.chmod(bin_dir, 0o555)
        argv = ["sh", INSTALL_SH, os.path.join(root, "hpc-compose.pyz")]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if not setpriv:
                pytest.skip("running as root without setpriv (util-linux) to drop privileges")
            argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] + argv
        env = dict(os.environ, HPC_COMPOSE_INSTALL_DIR=bin_dir, HOME=root, TMPDIR="/tmp")
        result = subprocess.run(argv, env=env, cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        assert result.returncode == 1
        assert result.stderr == "install.sh: error: cannot write into %s\n" % bin_dir
        assert os.listdir(bin_dir) == []
    finally:
        os.chmod(os.path.join(root, "bin"), 0o755)
        shutil.rmtree(root)


def test_install_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=sh", INSTALL_SH], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout
