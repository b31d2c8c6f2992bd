"""Images: Enroot reference translation, cache keys, the runtime plan, import/prepare through a
stand-in enroot, locking, and the cache commands."""
import os

import pytest

import hpc_compose as hc


# -- hand-built plans (independent of the spec loader) ---------------------------------------------

def make_service(name, image=None, runtime="pyxis", prepare=None, mounts=()):
    """A ServicePlan with just enough filled in for the images stage."""
    if image is None:
        ref = hc.ImageRef(kind="none", reference="")
    elif image.endswith((".sqsh", ".squashfs")):
        ref = hc.ImageRef(kind="local", reference=image, original=image)
    else:
        reference = image if "://" in image else "docker://" + image
        ref = hc.ImageRef(kind="remote", reference=reference, original=image)
    return hc.ServicePlan(
        name=name, token=name, runtime=runtime, image=ref,
        execution=hc.Execution(form="shell", script="true"), working_dir=None, environment=(),
        mounts=tuple(mounts), depends_on=(), dependents=(), readiness=None,
        failure_policy=hc.FailurePolicy(), placement=hc.Placement(mode="single"), prepare=prepare)


def make_plan(tmp_path, services, cache_dir=None, nodes=1):
    compose = str(tmp_path / "compose.yaml")
    slurm = hc.SlurmSpec()
    spec = hc.ComposeSpec(path=compose, project_dir=str(tmp_path), name="demo", version=None,
                          slurm=slurm, services=())
    return hc.Plan(spec=spec, compose_file=compose, project_dir=str(tmp_path), job_name="demo",
                   cache_dir=str(cache_dir or tmp_path / "cache"), nodes=nodes, slurm=slurm,
                   services=tuple(services), runtime="pyxis")


def prepare_plan(commands=("pip install numpy",), mounts=(), env=(), root=True):
    return hc.PreparePlan(commands=tuple(commands), mounts=tuple(mounts), env=tuple(env), root=root)


# -- reference translation -------------------------------------------------------------------------

@pytest.mark.parametrize("reference, uri", [
    ("docker://redis:7", "docker://redis:7"),
    ("docker://bitnami/redis:7", "docker://bitnami/redis:7"),
    ("docker://docker.io/library/python:3.11", "docker://library/python:3.11"),
    ("docker://nvcr.io/nvidia/pytorch:24.01-py3", "docker://nvcr.io#nvidia/pytorch:24.01-py3"),
    ("docker://localhost:5000/team/app:1", "docker://localhost:5000#team/app:1"),
    ("docker://$oauthtoken@nvcr.io#nvidia/x:1", "docker://$oauthtoken@nvcr.io#nvidia/x:1"),
    ("docker://ghcr.io/a/b@sha256:0123", "docker://ghcr.io/a/b@sha256:0123"),
    ("dockerd://myimage:1", "dockerd://myimage:1"),
    ("podman://myimage:1", "podman://myimage:1"),
])
def test_enroot_uri_uses_hash_syntax_that_enroot_3_and_4_accept(reference, uri):
    assert hc.enroot_uri(reference) == uri


@pytest.mark.parametrize("reference, host", [
    ("docker://redis:7", "docker.io"),
    ("docker://nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io"),
    ("docker://registry-1.docker.io/library/redis", "docker.io"),
    ("dockerd://x:1", None),
])
def test_registry_host_of_reference(reference, host):
    assert hc.registry_host(reference) == host


# -- runtime plan ------------------------------------------------------------------------------------

def test_runtime_plan_points_remote_service_at_base_artifact(tmp_path):
    plan = make_plan(tmp_path, [make_service("redis", "redis:7")])
    rp = hc.build_runtime_plan(plan)
    image = rp.images[0]
    assert image.base is not None and image.prepared is None
    assert image.container_image == image.base.path
    assert image.base.path.startswith(str(tmp_path / "cache" / "base") + os.sep)
    assert image.base.path.endswith("-redis-7.sqsh")
    assert image.base.manifest_path == image.base.path + ".json"
    assert image.base.enroot_uri == "docker://redis:7"
    assert rp.cache_dir == str(tmp_path / "cache")


def test_runtime_plan_uses_local_image_in_place(tmp_path):
    sqsh = tmp_path / "app.sqsh"
    sqsh.write_bytes(b"x")
    plan = make_plan(tmp_path, [make_service("app", str(sqsh))])
    image = hc.build_runtime_plan(plan).images[0]
    assert image.container_image == str(sqsh)
    assert image.local_path == str(sqsh)
    assert image.base is None and image.prepared is None


def test_runtime_plan_points_prepared_service_at_prepared_artifact(tmp_path):
    plan = make_plan(tmp_path, [make_service("app", "python:3.11-slim", prepare=prepare_plan())])
    image = hc.build_runtime_plan(plan).images[0]
    assert image.prepared.path.startswith(str(tmp_path / "cache" / "prepared") + os.sep)
    assert image.container_image == image.prepared.path
    assert image.base is not None
    assert image.rebuild_every_time is False


def test_runtime_plan_host_service_has_no_container_image(tmp_path):
    plan = make_plan(tmp_path, [make_service("job", None, runtime="host"),
                                make_service("job2", "redis:7", runtime="host")])
    images = hc.build_runtime_plan(plan).images
    assert [i.container_image for i in images] == [None, None]
    assert all(i.base is None and i.prepared is None for i in images)


def test_runtime_plan_marks_prepare_mounts_as_rebuild_every_time(tmp_path):
    mount = hc.Mount(host=str(tmp_path / "req.txt"), container="/tmp/req.txt")
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan(mounts=[mount]))])
    assert hc.build_runtime_plan(plan).images[0].rebuild_every_time is True
