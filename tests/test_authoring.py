"""Authoring mistakes caught where they are made: an image with an empty tag or name after
interpolation, two mounts at one container path, a Docker Compose file given to validate, init
values that validate would refuse."""
import pytest

from test_spec import failure


@pytest.mark.parametrize("image,what", [
    ('"python:${PYVER:-}"', "empty tag"), ('"${REPO:-}:3.12"', "empty name"),
    ('"ghcr.io/${ORG:-}/:1"', "empty name"), ('"docker://python:"', "empty tag"),
])
def test_an_image_with_an_empty_tag_or_name_is_refused(hc, project, image, what):
    error = failure(hc, project, "services:\n  app:\n    image: %s\n" % image)
    assert error.path == "services.app.image" and what in error.message
    assert "${TAG:-3.12}" in error.hint


def test_two_mounts_at_one_container_path_are_refused_at_the_second(hc, project):
    error = failure(hc, project, "services:\n  app:\n    image: redis:7\n"
                                 "    volumes: [./d1:/data, ./d2:/data/]\n")
    assert error.path == "services.app.volumes[1]" and "two mounts at /data" in error.message


def test_a_docker_compose_file_leads_with_the_migrate_command(cli, project):
    path = project.write("compose.yaml", "services:\n  web:\n    build: .\n    ports: ['80:80']\n"
                                         "    image: nginx\n")
    result = cli(["validate", "-f", "compose.yaml"], cwd=str(project.root))
    assert result.code == 2
    first = result.err.splitlines()[0]
    assert "looks like a Docker Compose file (build, ports)" in first
    assert "`hpc-compose migrate -f compose.yaml -o hpc-compose.yaml`" in first
    assert result.err.rstrip().endswith("2 errors in %s" % path)


def test_a_build_key_alone_is_enough_and_one_error_is_counted_as_one(cli, project):
    project.write("compose.yaml", "services:\n  web:\n    build: .\n    image: nginx\n")
    result = cli(["validate", "-f", "compose.yaml"], cwd=str(project.root))
    assert "looks like a Docker Compose file (build)" in result.err.splitlines()[0]
    assert result.err.rstrip().endswith("1 error in %s" % (project.root / "compose.yaml"))


def test_one_stray_ports_key_is_not_called_a_docker_file(cli, project):
    project.write("compose.yaml", "services:\n  web:\n    ports: ['80:80']\n    image: nginx\n")
    result = cli(["validate", "-f", "compose.yaml"], cwd=str(project.root))
    assert "Docker Compose file" not in result.err


def test_init_refuses_a_cache_dir_validate_would_refuse(cli, tmp_path):
    result = cli(["init", "--template", "minimal-batch", "--cache-dir", "/tmp/cache", "-o",
                  str(tmp_path / "c.yaml")])
    assert result.code == 2 and "--cache-dir: cache_dir /tmp/cache is under /tmp" in result.err
    assert not (tmp_path / "c.yaml").exists()


def test_init_warns_when_validate_would_refuse_what_it_wrote(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("USER", raising=False)
    result = cli(["init", "--template", "minimal-batch", "-o", str(tmp_path / "c.yaml")])
    assert result.code == 0
    assert "validate will refuse" in result.err and "'USER' is not set" in result.err


@pytest.mark.parametrize("text", [
    "x-slurm:\n  cpus_per_task: \"%s\"\nservices:\n  a:\n    image: redis:7\n",
    "services:\n  a:\n    image: redis:7\n    %s: 1\n",
    "services:\n  a:\n    image: \"redis:7 %s\"\n",
    "services:\n  a:\n    image: redis:7\n    depends_on: [%s]\n",
])
def test_an_error_about_a_huge_value_shows_a_short_excerpt(cli, project, text):
    project.write("compose.yaml", text % ("x" * 3000000))
    result = cli(["validate", "-f", "compose.yaml"], cwd=str(project.root))
    assert result.code == 2 and len(result.err) < 1000
    assert "(30000" in result.err and "characters)" in result.err
