"""Images: Enroot reference translation, cache keys, the runtime plan, import/prepare through a
stand-in enroot, locking, and the cache commands."""
import json
import os
import shutil
import tempfile

import pytest

import hpc_compose as hc


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A directory standing for shared storage: neither under a temporary root (the spec rejects a
    cache_dir there) nor under $HOME; $HOME and Enroot's config are moved out of the real ones."""
    base = None
    for candidate in ("/var/lib/hpc-compose-tests", os.path.join(REPO, ".tmp")):
        try:
            os.makedirs(candidate, exist_ok=True)
            base = tempfile.mkdtemp(prefix="shared-", dir=candidate)
            break
        except OSError:
            continue
    assert base and not any(hc._under(base, r) for r in hc._TMP_CACHE_ROOTS), base
    os.makedirs(os.path.join(base, "home"))
    monkeypatch.setenv("HOME", os.path.join(base, "home"))
    monkeypatch.setenv("ENROOT_CONFIG_PATH", str(tmp_path / "enroot-config"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    yield base
    shutil.rmtree(base, ignore_errors=True)


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
    ("docker://redis:7", "docker://registry-1.docker.io#library/redis:7"),
    ("docker://bitnami/redis:7", "docker://registry-1.docker.io#bitnami/redis:7"),
    ("docker://docker.io/library/python:3.11", "docker://registry-1.docker.io#library/python:3.11"),
    ("docker://redis@sha256:0123", "docker://registry-1.docker.io/library/redis@sha256:0123"),
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
    assert hc._registry_host(reference) == host


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
    assert image.base.enroot_uri == "docker://registry-1.docker.io#library/redis:7"
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


def test_prepared_key_changes_with_every_input(tmp_path):
    def key(**kw):
        plan = make_plan(tmp_path, [make_service("app", kw.pop("image", "python:3.11"),
                                                 prepare=prepare_plan(**kw))])
        return hc.build_runtime_plan(plan).images[0].prepared.cache_key
    reference = key()
    mount = hc.Mount(host="/data/req.txt", container="/tmp/req.txt")
    variants = [key(image="python:3.12"), key(commands=["pip install pandas"]),
                key(env=[("PIP_INDEX_URL", "x")]), key(root=False), key(mounts=[mount])]
    assert reference == key()
    assert len(set(variants + [reference])) == len(variants) + 1


def test_keys_carry_cache_format_version_not_release_version(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, [make_service("redis", "redis:7")])
    before = hc.build_runtime_plan(plan).images[0].base.cache_key
    monkeypatch.setattr(hc, "__version__", "99.0.0")
    assert hc.build_runtime_plan(plan).images[0].base.cache_key == before
    monkeypatch.setattr(hc, "_CACHE_FORMAT_VERSION", hc._CACHE_FORMAT_VERSION + 1)
    assert hc.build_runtime_plan(plan).images[0].base.cache_key != before


def test_local_base_size_and_mtime_are_part_of_prepared_key(tmp_path):
    sqsh = tmp_path / "base.sqsh"
    sqsh.write_bytes(b"one")
    plan = make_plan(tmp_path, [make_service("app", str(sqsh), prepare=prepare_plan())])
    first = hc.build_runtime_plan(plan).images[0].prepared.cache_key
    sqsh.write_bytes(b"longer content")
    assert hc.build_runtime_plan(plan).images[0].prepared.cache_key != first


def test_same_image_in_two_services_shares_one_base_artifact(tmp_path):
    plan = make_plan(tmp_path, [make_service("a", "redis:7"), make_service("b", "redis:7")])
    a, b = hc.build_runtime_plan(plan).images
    assert a.base.path == b.base.path


# -- prepare through the stand-in enroot ----------------------------------------------------------

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "enroot")


class EnrootLog(object):
    def __init__(self, path):
        self.path = path

    def calls(self):
        import json
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def argvs(self):
        return [call["argv"] for call in self.calls()]


@pytest.fixture
def enroot(tmp_path, monkeypatch):
    """The stand-in enroot, logging to a temporary file; returns the log reader."""
    log = EnrootLog(str(tmp_path / "enroot-calls.jsonl"))
    monkeypatch.setenv("ENROOT_STANDIN_LOG", log.path)
    monkeypatch.setenv("ENROOT_TEMP_PATH", str(tmp_path / "enroot-tmp"))
    for name in ("ENROOT_STANDIN_FAIL", "ENROOT_STANDIN_FAIL_MATCH", "ENROOT_STANDIN_DELAY"):
        monkeypatch.delenv(name, raising=False)
    return log


def options(**kw):
    return hc.PrepareOptions(enroot_bin=STANDIN, **kw)


def partial_of(path):
    directory, name = os.path.split(path)
    return os.path.join(directory, ".partial-%d-%s" % (os.getpid(), name))


def test_import_command_line_and_environment(tmp_path, enroot):
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("model", "nvcr.io/nvidia/pytorch:24.01-py3")]))
    base = rp.images[0].base
    results = hc.prepare_images(rp, options())
    calls = enroot.calls()
    assert [c["argv"] for c in calls] == [
        ["import", "--output", partial_of(base.path), "docker://nvcr.io#nvidia/pytorch:24.01-py3"]]
    cache = str(tmp_path / "cache")
    assert calls[0]["env"]["ENROOT_CACHE_PATH"] == os.path.join(cache, "enroot", "cache")
    assert calls[0]["env"]["ENROOT_DATA_PATH"] == os.path.join(cache, "enroot", "data")
    assert calls[0]["env"]["ENROOT_TEMP_PATH"] == str(tmp_path / "enroot-tmp")
    assert os.path.isfile(base.path)
    assert not os.path.exists(partial_of(base.path))
    assert results[0].base_action == "built" and results[0].runtime_action == "built"
    assert results[0].artifact == base.path


def test_default_temp_path_is_node_local_not_in_cache(tmp_path, enroot, monkeypatch):
    monkeypatch.delenv("ENROOT_TEMP_PATH")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")]))
    hc.prepare_images(rp, options())
    import tempfile
    temp = enroot.calls()[0]["env"]["ENROOT_TEMP_PATH"]
    assert temp.startswith(tempfile.gettempdir() + os.sep)
    assert not temp.startswith(str(tmp_path / "cache"))


def test_prepare_command_lines_root_mounts_env(tmp_path, enroot):
    req = tmp_path / "req.txt"
    req.write_text("numpy\n")
    mount = hc.Mount(host=str(req), container="/tmp/req.txt", options="ro")
    prep = prepare_plan(commands=["pip install -r /tmp/req.txt", "echo 'done' > /marker"],
                        mounts=[mount], env=[("PIP_CACHE_DIR", "/tmp/pip cache"), ("A", "1")])
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", "python:3.11-slim", prepare=prep)]))
    image = rp.images[0]
    hc.prepare_images(rp, options())
    argvs = enroot.argvs()
    assert argvs[0] == ["import", "--output", partial_of(image.base.path), "docker://registry-1.docker.io#library/python:3.11-slim"]
    name = argvs[1][3]
    assert name.startswith("hpc-compose-prep-" + image.prepared.cache_key[:12])
    assert argvs[1:] == [
        ["create", "--force", "--name", name, image.base.path],
        ["start", "--root", "--rw", "--mount", str(req) + ":/tmp/req.txt:none:rbind,x-create=auto,ro",
         "--env", "PIP_CACHE_DIR=/tmp/pip cache", "--env", "A=1",
         name, "/bin/sh", "-lc", "pip install -r /tmp/req.txt"],
        ["start", "--root", "--rw", "--mount", str(req) + ":/tmp/req.txt:none:rbind,x-create=auto,ro",
         "--env", "PIP_CACHE_DIR=/tmp/pip cache", "--env", "A=1",
         name, "/bin/sh", "-lc", "echo 'done' > /marker"],
        ["export", "--force", "--output", partial_of(image.prepared.path), name],
        ["remove", "--force", name],
    ]
    assert os.path.isfile(image.prepared.path)
    assert not os.path.exists(str(tmp_path / "cache" / "enroot" / "data" / name))


def test_prepare_without_root_omits_root_flag(tmp_path, enroot):
    rp = hc.build_runtime_plan(make_plan(tmp_path, [
        make_service("app", "python:3.11", prepare=prepare_plan(commands=["id"], root=False))]))
    hc.prepare_images(rp, options())
    start = [a for a in enroot.argvs() if a[0] == "start"]
    assert start == [["start", "--rw", start[0][2], "/bin/sh", "-lc", "id"]]


def test_prepare_from_local_image_skips_import(tmp_path, enroot):
    sqsh = tmp_path / "base.sqsh"
    sqsh.write_bytes(b"x")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", str(sqsh), prepare=prepare_plan())]))
    results = hc.prepare_images(rp, options())
    assert [a[0] for a in enroot.argvs()] == ["create", "start", "export", "remove"]
    assert enroot.argvs()[0][-1] == str(sqsh)
    assert results[0].base_action == "present"


def test_local_image_without_prepare_makes_no_enroot_call(tmp_path, enroot):
    sqsh = tmp_path / "app.sqsh"
    sqsh.write_bytes(b"x")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", str(sqsh)),
                                                    make_service("h", None, runtime="host")]))
    results = hc.prepare_images(rp, options())
    assert enroot.calls() == []
    assert results[0].runtime_action == "present" and results[0].artifact == str(sqsh)
    assert results[1].runtime_action is None and results[1].artifact is None


def test_second_prepare_is_a_hit_with_no_enroot_call(tmp_path, enroot):
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan()),
                                make_service("redis", "redis:7")])
    hc.prepare_images(hc.build_runtime_plan(plan), options())
    first = len(enroot.calls())
    results = hc.prepare_images(hc.build_runtime_plan(plan), options())
    assert len(enroot.calls()) == first
    assert [r.runtime_action for r in results] == ["reused", "reused"]


def test_hit_does_not_read_large_local_files(tmp_path, enroot, monkeypatch):
    sqsh = tmp_path / "base.sqsh"
    sqsh.write_bytes(b"x" * 1000)
    plan = make_plan(tmp_path, [make_service("app", str(sqsh), prepare=prepare_plan())])
    hc.prepare_images(hc.build_runtime_plan(plan), options())
    import builtins
    real_open = builtins.open

    def guarded_open(path, *args, **kwargs):
        assert str(path) != str(sqsh), "the local image was read"
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded_open)
    results = hc.prepare_images(hc.build_runtime_plan(plan), options())
    assert results[0].runtime_action == "reused"


def test_force_rebuilds_base_and_prepared_once_per_run(tmp_path, enroot):
    plan = make_plan(tmp_path, [make_service("a", "python:3.11", prepare=prepare_plan()),
                                make_service("b", "python:3.11", prepare=prepare_plan())])
    hc.prepare_images(hc.build_runtime_plan(plan), options())
    before = len(enroot.calls())
    results = hc.prepare_images(hc.build_runtime_plan(plan), options(force=True))
    again = [a[0] for a in enroot.argvs()[before:]]
    assert again == ["import", "create", "start", "export", "remove"]
    assert results[0].runtime_action == "built"


def test_prepare_mounts_rebuild_every_time(tmp_path, enroot):
    mount = hc.Mount(host=str(tmp_path), container="/src")
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan(mounts=[mount]))])
    hc.prepare_images(hc.build_runtime_plan(plan), options())
    before = len(enroot.calls())
    results = hc.prepare_images(hc.build_runtime_plan(plan), options())
    assert [a[0] for a in enroot.argvs()[before:]] == ["create", "start", "export", "remove"]
    assert results[0].runtime_action == "built"
    assert "mounts" in results[0].note


def test_prepared_hit_does_not_need_the_base_image(tmp_path, enroot):
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())])
    rp = hc.build_runtime_plan(plan)
    hc.prepare_images(rp, options())
    os.unlink(rp.images[0].base.path)
    before = len(enroot.calls())
    hc.prepare_images(rp, options())
    assert len(enroot.calls()) == before


def test_manifest_records_key_inputs_services_and_project(tmp_path, enroot):
    prep = prepare_plan(env=[("TOKEN", "secret-value")])
    plan = make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prep)])
    rp = hc.build_runtime_plan(plan)
    hc.prepare_images(rp, options())
    manifest = hc._load_manifest(rp.images[0].prepared.path)
    assert manifest["kind"] == "prepared"
    assert manifest["cache_key"] == rp.images[0].prepared.cache_key
    assert manifest["cache_format_version"] == hc._CACHE_FORMAT_VERSION
    assert manifest["services"] == ["app"]
    assert manifest["projects"] == [plan.compose_file]
    assert manifest["prepare_commands"] == ["pip install numpy"]
    assert manifest["prepare_env_keys"] == ["TOKEN"]
    assert "secret-value" not in open(rp.images[0].prepared.manifest_path).read()
    base = hc._load_manifest(rp.images[0].base.path)
    assert base["kind"] == "base" and base["enroot_uri"] == "docker://registry-1.docker.io#library/python:3.11"
    assert base["registry"] == "docker.io"


def test_reuse_adds_project_and_touches_last_used(tmp_path, enroot):
    other = tmp_path / "other"
    other.mkdir()
    cache = tmp_path / "cache"
    plan1 = make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=cache)
    plan2 = make_plan(other, [make_service("cache", "redis:7")], cache_dir=cache)
    rp = hc.build_runtime_plan(plan1)
    hc.prepare_images(rp, options())
    path = rp.images[0].base.manifest_path
    manifest = hc._load_json(path)
    manifest["last_used_at"] = 1000
    hc._write_json_atomic(path, manifest)
    hc.prepare_images(hc.build_runtime_plan(plan2), options())
    manifest = hc._load_json(path)
    assert manifest["projects"] == [plan1.compose_file, plan2.compose_file]
    assert manifest["services"] == ["cache", "r"]
    assert manifest["created_by"] == plan1.compose_file
    assert manifest["last_used_at"] > 1000


# -- failures ----------------------------------------------------------------------------------------

def test_import_failure_reports_enroot_output_and_leaves_nothing(tmp_path, enroot, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "import")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")]))
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, options())
    text = info.value.format()
    assert "enroot import of docker://registry-1.docker.io#library/redis:7 failed (exit 1)" in text
    assert "injected import failure" in text
    base = rp.images[0].base.path
    assert not os.path.exists(base) and not os.path.exists(base + ".json")
    assert [n for n in os.listdir(os.path.dirname(base)) if n.startswith(".partial-")] == []


def test_prepare_command_failure_names_command_and_removes_container(tmp_path, enroot, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "start")
    monkeypatch.setenv("ENROOT_STANDIN_FAIL_MATCH", "make install")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service(
        "app", "python:3.11", prepare=prepare_plan(commands=["true", "make install"]))]))
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, options())
    text = info.value.format()
    assert "prepare command 2 of service 'app' (make install) failed (exit 1)" in text
    assert "--keep-failed-prep" in text
    argvs = enroot.argvs()
    assert argvs[-1][:2] == ["remove", "--force"]
    assert not os.path.exists(rp.images[0].prepared.path)
    data = tmp_path / "cache" / "enroot" / "data"
    assert os.listdir(str(data)) == []


def test_keep_failed_prep_keeps_container_and_says_where(tmp_path, enroot, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "start")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())]))
    lines = []
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, options(keep_failed=True), progress=lines.append)
    assert "remove" not in [a[0] for a in enroot.argvs()]
    data = str(tmp_path / "cache" / "enroot" / "data")
    kept = os.listdir(data)
    assert len(kept) == 1
    assert os.path.join(data, kept[0]) in info.value.format()
    assert any("kept the failed prepare container" in line for line in lines)


def test_export_failure_keeps_old_artifact_untouched(tmp_path, enroot, monkeypatch):
    mount = hc.Mount(host=str(tmp_path), container="/src")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service(
        "app", "python:3.11", prepare=prepare_plan(mounts=[mount]))]))
    hc.prepare_images(rp, options())
    path = rp.images[0].prepared.path
    old = open(path).read()
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "export")
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, options())
    assert "enroot export for service 'app' failed" in info.value.format()
    assert open(path).read() == old
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".partial-")] == []


def test_missing_enroot_binary_is_a_clear_error(tmp_path, enroot):
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")]))
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, hc.PrepareOptions(enroot_bin=str(tmp_path / "no-enroot")))
    assert "required binary" in info.value.format() and "--enroot-bin" in info.value.format()


def test_progress_lines_and_enroot_output_pass_through(tmp_path, enroot):
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())]))
    lines = []
    hc.prepare_images(rp, options(), progress=lines.append)
    text = "\n".join(lines)
    assert "importing docker://registry-1.docker.io#library/python:3.11 -> " in text
    assert "imported docker://registry-1.docker.io#library/python:3.11 in " in text
    assert "preparing app from " in text
    assert "exporting app -> " + rp.images[0].prepared.path in text
    assert "prepared app in " in text
    assert "    [INFO] Fetching image manifest list" in lines


# -- locking -------------------------------------------------------------------------------------------

def _prepare_in_child(compose_dir, cache_dir, queue):
    plan = make_plan(__import__("pathlib").Path(compose_dir),
                     [make_service("app", "python:3.11", prepare=prepare_plan())], cache_dir=cache_dir)
    try:
        results = hc.prepare_images(hc.build_runtime_plan(plan), options())
        queue.put((results[0].base_action, results[0].runtime_action))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put(("error", str(exc)))


def test_concurrent_prepares_build_once_and_both_succeed(tmp_path, enroot, monkeypatch):
    import multiprocessing
    monkeypatch.setenv("ENROOT_STANDIN_DELAY", "0.5")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), str(tmp_path / "cache"), queue))
                for _ in range(2)]
    for child in children:
        child.start()
    outcomes = sorted((queue.get(timeout=60) for _ in children), key=str)
    for child in children:
        child.join(30)
    assert outcomes == [("built", "built"), (None, "reused")]
    commands = [a[0] for a in enroot.argvs()]
    assert commands.count("import") == 1 and commands.count("export") == 1


# -- cache list / inspect / prune ------------------------------------------------------------------

def built_plan(tmp_path, enroot, services, **kw):
    plan = make_plan(tmp_path, services, **kw)
    rp = hc.build_runtime_plan(plan)
    hc.prepare_images(rp, options())
    return rp


def test_list_cache_shows_every_artifact_with_manifest(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("app", "python:3.11", prepare=prepare_plan()),
                                       make_service("r", "redis:7")])
    entries = hc.list_cache(rp.cache_dir)
    paths = sorted(e["artifact_path"] for e in entries)
    assert paths == sorted(hc._runtime_artifacts(rp))
    assert all(e["present"] and e["manifest_present"] for e in entries)
    assert {e["kind"] for e in entries} == {"base", "prepared"}


def test_list_cache_ignores_partial_files_and_reports_manifestless_artifacts(tmp_path):
    cache = tmp_path / "cache"
    (cache / "base").mkdir(parents=True)
    (cache / "base" / ".partial-1-x.sqsh").write_text("half")
    (cache / "base" / "copied.sqsh").write_text("x")
    entries = hc.list_cache(str(cache))
    assert [e["artifact_path"] for e in entries] == [str(cache / "base" / "copied.sqsh")]
    assert entries[0]["manifest_present"] is False and entries[0]["kind"] == "base"


def test_inspect_reports_hit_miss_and_rebuild(tmp_path, enroot):
    mount = hc.Mount(host=str(tmp_path), container="/src")
    services = [make_service("app", "python:3.11", prepare=prepare_plan()),
                make_service("dev", "python:3.11", prepare=prepare_plan(commands=["x"], mounts=[mount])),
                make_service("r", "redis:7"), make_service("h", None, runtime="host")]
    plan = make_plan(tmp_path, services)
    rp = hc.build_runtime_plan(plan)
    before = {e["service"]: e["expectation"] for e in hc.inspect_cache(rp)}
    assert before == {"app": "miss", "dev": "rebuild", "r": "miss", "h": "none"}
    hc.prepare_images(rp, options())
    after = {e["service"]: e for e in hc.inspect_cache(rp)}
    assert after["app"]["expectation"] == "hit"
    assert after["app"]["container_image"] == rp.images[0].prepared.path
    assert after["dev"]["expectation"] == "rebuild"
    assert "mounts" in after["dev"]["artifacts"][-1]["reasons"][0]
    assert after["r"]["expectation"] == "hit"


def test_inspect_explains_why_a_changed_prepare_rebuilds(tmp_path, enroot):
    built_plan(tmp_path, enroot, [make_service("app", "python:3.11", prepare=prepare_plan())])
    changed = hc.build_runtime_plan(make_plan(tmp_path, [
        make_service("app", "python:3.11", prepare=prepare_plan(commands=["pip install pandas"]))]))
    entry = hc.inspect_cache(changed, service="app")[0]
    prepared = entry["artifacts"][-1]
    assert entry["expectation"] == "miss"
    assert prepared["reasons"][0].startswith("x-enroot.prepare.commands changed (earlier artifact: ")
    assert entry["artifacts"][0]["expectation"] == "hit"


def test_inspect_unknown_service_is_usage_error(tmp_path):
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")]))
    with pytest.raises(hc.UsageError):
        hc.inspect_cache(rp, service="nope")


def test_prune_age_removes_old_entries_only(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7"), make_service("p", "postgres:16")])
    old = rp.images[0].base
    manifest = hc._load_json(old.manifest_path)
    manifest["created_at"] = manifest["last_used_at"] = 1000
    hc._write_json_atomic(old.manifest_path, manifest)
    report = hc.prune_cache(rp.cache_dir, age_days=14)
    assert report["removed_paths"] == [old.path]
    assert not os.path.exists(old.path) and not os.path.exists(old.manifest_path)
    assert os.path.exists(rp.images[1].base.path)


def test_prune_age_zero_removes_everything_unused(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7")])
    report = hc.prune_cache(rp.cache_dir, age_days=0, now=__import__("time").time() + 1)
    assert report["removed_count"] == 1 and hc.list_cache(rp.cache_dir) == []


def test_prune_all_unused_removes_only_this_projects_unreferenced_artifacts(tmp_path, enroot):
    cache = tmp_path / "cache"
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    mine_old = built_plan(tmp_path, enroot, [make_service("r", "redis:6")], cache_dir=cache)
    theirs = built_plan(other_dir, enroot, [make_service("x", "nginx:1")], cache_dir=cache)
    current = built_plan(tmp_path, enroot, [make_service("r", "redis:7")], cache_dir=cache)
    report = hc.prune_cache(str(cache), runtime_plan=current)
    assert report["mode"] == "all_unused"
    assert report["removed_paths"] == [mine_old.images[0].base.path]
    assert os.path.exists(theirs.images[0].base.path)
    assert os.path.exists(current.images[0].base.path)


def track_job(project, job_id, script_text=None, state=None, submitted_at=None):
    """Write what TRACKING writes for a submitted job: jobs/<id>.json (+ script, + state.json)."""
    import time
    jobs = project / ".hpc-compose" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    record = {"job_id": str(job_id), "compose_file": str(project / "compose.yaml")}
    if script_text is not None:
        script = project / "hpc-compose.sbatch"
        script.write_text(script_text)
        record["script_path"] = str(script)
    record["submitted_at"] = time.time() if submitted_at is None else submitted_at
    hc._write_json_atomic(str(jobs / ("%s.json" % job_id)), record)
    if state is not None:
        hc._write_json_atomic(str(project / ".hpc-compose" / str(job_id) / "state.json"), {"status": state})


def test_prune_keeps_artifact_of_job_still_in_slurm_queue(tmp_path, enroot, slurm, slurm_jobs):
    from slurm_support import submit_wrap, wait_for_state
    cache = tmp_path / "cache"
    old = built_plan(tmp_path, enroot, [make_service("r", "redis:6")], cache_dir=cache)
    current = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")], cache_dir=cache))
    job_id = submit_wrap("sleep 120", cwd=tmp_path)
    slurm_jobs.add(job_id)
    wait_for_state(job_id, ("PENDING", "RUNNING"), timeout=60)
    track_job(tmp_path, job_id, "srun --container-image=%s true\n" % old.images[0].base.path, state="running")
    report = hc.prune_cache(str(cache), runtime_plan=current)
    assert report["removed_count"] == 0
    assert report["kept_in_use"][0]["path"] == old.images[0].base.path
    assert job_id in report["kept_in_use"][0]["reason"]
    hc._write_json_atomic(str(tmp_path / ".hpc-compose" / job_id / "state.json"), {"status": "completed"})
    assert hc.prune_cache(str(cache), runtime_plan=current)["removed_paths"] == [old.images[0].base.path]


def test_prune_treats_job_gone_from_queue_as_finished(tmp_path, enroot, slurm):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7")])
    track_job(tmp_path, "999999", state="running")
    report = hc.prune_cache(rp.cache_dir, age_days=0, now=__import__("time").time() + 1)
    assert report["removed_count"] == 1


def test_prune_protects_project_artifacts_when_squeue_cannot_answer(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7")])
    track_job(tmp_path, "77")
    report = hc.prune_cache(rp.cache_dir, age_days=0, now=__import__("time").time() + 1,
                            squeue_bin=str(tmp_path / "no-squeue"))
    assert report["removed_count"] == 0
    assert "job 77" in report["kept_in_use"][0]["reason"]
    assert "artifacts are unknown" in report["kept_in_use"][0]["reason"]


def test_prune_ignores_script_rendered_after_submission(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7"), make_service("p", "postgres:16")])
    track_job(tmp_path, "78", "srun --container-image=%s true\n" % rp.images[0].base.path,
              submitted_at=1000)
    report = hc.prune_cache(rp.cache_dir, age_days=0, now=__import__("time").time() + 1,
                            squeue_bin=str(tmp_path / "no-squeue"))
    assert sorted(k["path"] for k in report["kept_in_use"]) == sorted(hc._runtime_artifacts(rp))


def test_prune_skips_artifact_locked_by_a_prepare(tmp_path, enroot):
    rp = built_plan(tmp_path, enroot, [make_service("r", "redis:7")])
    path = rp.images[0].base.path
    with hc._FileLock(path + ".lock"):
        report = hc.prune_cache(rp.cache_dir, age_days=0, now=__import__("time").time() + 1)
    assert report["removed_count"] == 0 and os.path.exists(path)


def test_prune_requires_exactly_one_strategy(tmp_path):
    with pytest.raises(hc.UsageError):
        hc.prune_cache(str(tmp_path))


# -- CLI: prepare, cache ---------------------------------------------------------------------------

COMPOSE = """x-slurm:
  cache_dir: ./cache
services:
  app:
    image: python:3.11-slim
    command: python -m main
    x-enroot:
      prepare:
        commands:
          - pip install numpy
        env:
          PIP_NO_CACHE_DIR: "1"
  redis:
    image: redis:7
"""


@pytest.fixture
def compose(shared, enroot):
    import pathlib
    path = pathlib.Path(shared) / "project" / "compose.yaml"
    path.parent.mkdir()
    path.write_text(COMPOSE)
    return path


def test_cli_prepare_builds_then_reuses(compose, enroot, cli):
    first = cli(["prepare", "-f", compose, "--enroot-bin", STANDIN])
    assert first.code == 0, first
    assert "app: built " in first.out and "redis: built " in first.out
    assert "importing docker://registry-1.docker.io#library/python:3.11-slim" in first.err
    calls = len(enroot.calls())
    second = cli(["prepare", "-f", compose, "--enroot-bin", STANDIN, "--format", "json"])
    assert second.code == 0, second
    assert len(enroot.calls()) == calls
    import json
    data = json.loads(second.out)
    assert [s["runtime_action"] for s in data["services"]] == ["reused", "reused"]
    assert data["cache_dir"] == str(compose.parent / "cache")


def test_cli_prepare_force_rebuilds(compose, enroot, cli):
    assert cli(["prepare", "-f", compose, "--enroot-bin", STANDIN]).code == 0
    calls = len(enroot.calls())
    result = cli(["prepare", "-f", compose, "--enroot-bin", STANDIN, "--force"])
    assert result.code == 0, result
    assert [a[0] for a in enroot.argvs()[calls:]].count("import") == 2


def test_cli_prepare_failure_exits_1_with_message(compose, enroot, cli, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "start")
    result = cli(["prepare", "-f", compose, "--enroot-bin", STANDIN, "--keep-failed-prep"])
    assert result.code == 1
    assert "error: prepare command 1 of service 'app' (pip install numpy) failed" in result.err
    assert "kept the failed prepare container" in result.err
    assert "Traceback" not in result.err


def test_cli_cache_list_inspect_prune(compose, enroot, cli):
    import json
    cache = str(compose.parent / "cache")
    empty = cli(["cache", "list", "--cache-dir", cache])
    assert empty.out == "no cache entries found in %s\n" % cache
    missed = cli(["cache", "inspect", "-f", compose, "--service", "app"])
    assert missed.code == 0 and "service app (pyxis): miss" in missed.out
    assert cli(["prepare", "-f", compose, "--enroot-bin", STANDIN]).code == 0
    listing = cli(["cache", "list", "-f", compose])
    assert listing.out.startswith("cache dir: %s\n" % cache)
    assert len(listing.out.strip().splitlines()) == 4
    data = json.loads(cli(["cache", "list", "--cache-dir", cache, "--format", "json"]).out)
    assert len(data["entries"]) == 3
    hit = json.loads(cli(["cache", "inspect", "-f", compose, "--format", "json"]).out)
    assert [s["expectation"] for s in hit["services"]] == ["hit", "hit"]
    compose.write_text(COMPOSE.replace("redis:7", "redis:7.2"))
    pruned = json.loads(cli(["cache", "prune", "--all-unused", "-f", compose, "--format", "json"]).out)
    assert pruned["removed_count"] == 1 and pruned["removed_paths"][0].endswith("-redis-7.sqsh")


def test_cli_cache_prune_strategies_are_exclusive_and_all_unused_needs_file(compose, cli):
    both = cli(["cache", "prune", "--age", "3", "--all-unused", "-f", compose])
    assert both.code == 2 and "not allowed with argument" in both.err
    neither = cli(["cache", "prune"])
    assert neither.code == 2
    no_file = cli(["cache", "prune", "--all-unused"], cwd=str(compose.parent))
    assert no_file.code == 2 and "-f" in no_file.err


def test_cli_cache_prune_age_text(compose, enroot, cli):
    assert cli(["prepare", "-f", compose, "--enroot-bin", STANDIN]).code == 0
    result = cli(["cache", "prune", "--age", "30", "--cache-dir", str(compose.parent / "cache")])
    assert result.code == 0 and "removed: 0" in result.out


# -- submit --dry-run end to end on every shipped example ----------------------------------------------

EXAMPLES = os.path.join(REPO, "examples")
PYXIS_SRUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "srun-pyxis")


def example_files():
    if not os.path.isdir(EXAMPLES):
        return []
    return sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".yaml"))


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm client tools not installed")
@pytest.mark.parametrize("example", example_files())
def test_submit_dry_run_runs_preflight_prepare_and_render(example, shared, enroot, cli):
    """Copy the examples (their relative paths must keep working), point their shared paths at the
    shared-storage stand-in, and dry-run: preflight passes, prepare imports through the stand-in
    enroot, the script starts every container from a cache artifact; a second run calls no enroot."""
    import re
    project = os.path.join(shared, "examples")
    shutil.copytree(EXAMPLES, project)
    os.makedirs(os.path.join(shared, "home", "models"), exist_ok=True)
    path = os.path.join(project, example)
    with open(path) as handle:
        text = handle.read().replace("/shared/$USER", os.path.join(shared, "store"))
    with open(path, "w") as handle:
        handle.write(text)
    # The examples ask for more than the test cluster's nodes have: the scheduler is a stand-in.
    args = ["submit", "--dry-run", "-f", path, "--enroot-bin", STANDIN, "--srun-bin", PYXIS_SRUN,
            "--sbatch-bin", os.path.join(os.path.dirname(STANDIN), "sbatch-test-only")]
    first = cli(args)
    assert first.code == 0, first
    assert "dry run: skipping sbatch" in first.out
    script_path = os.path.join(project, "hpc-compose.sbatch")
    with open(script_path) as handle:
        script = handle.read()
    plan = hc.build_plan(hc.load_spec(path))
    runtime_plan = hc.build_runtime_plan(plan)
    for service, image in zip(plan.services, runtime_plan.images):
        if image.container_image is None:
            continue
        assert os.path.isfile(image.container_image), service.name
        assert re.search(r"--container-image=['\"]?%s" % re.escape(image.container_image), script), service.name
    imports = [a for a in enroot.argvs() if a[0] == "import"]
    expected = {i.base.enroot_uri for i in runtime_plan.images if i.base is not None}
    assert {a[-1] for a in imports} == expected
    calls = len(enroot.calls())
    second = cli(args)
    assert second.code == 0, second
    rebuilds = [i for i in runtime_plan.images if i.rebuild_every_time]
    if not rebuilds:
        assert len(enroot.calls()) == calls


def test_create_failure_names_service_and_cleans_up(tmp_path, enroot, monkeypatch):
    monkeypatch.setenv("ENROOT_STANDIN_FAIL", "create")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("app", "python:3.11", prepare=prepare_plan())]))
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, options())
    assert "enroot create for service 'app' failed (exit 1)" in info.value.format()
    assert "start" not in [a[0] for a in enroot.argvs()]
    assert not os.path.exists(rp.images[0].prepared.path)


def test_hit_survives_a_manifest_that_cannot_be_updated(tmp_path, enroot, monkeypatch):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")])
    hc.prepare_images(hc.build_runtime_plan(plan), options())

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(hc, "_write_json_atomic", read_only)
    lines = []
    results = hc.prepare_images(hc.build_runtime_plan(plan), options(), progress=lines.append)
    assert results[0].runtime_action == "reused"
    assert any("could not update the manifest" in line for line in lines)


def test_unwritable_cache_is_a_tool_error_not_a_traceback(tmp_path, enroot, monkeypatch):
    plan = make_plan(tmp_path, [make_service("r", "redis:7")])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/shared/cache/base/x.lock")
    monkeypatch.setattr(hc._FileLock, "__enter__", refuse)
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(hc.build_runtime_plan(plan), options())
    assert "Permission denied: /shared/cache/base/x.lock" in info.value.format()
    assert "writable" in info.value.format()


def test_interrupted_import_stops_enroot_and_leaves_no_partial(tmp_path, enroot, monkeypatch):
    import signal
    import threading
    import time
    monkeypatch.setenv("ENROOT_STANDIN_DELAY", "30")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("r", "redis:7")]))
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    started = time.time()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        hc.prepare_images(rp, options())
    timer.cancel()
    assert time.time() - started < 20, "the 30 s import was waited for instead of stopped"
    base = rp.images[0].base.path
    assert not os.path.exists(base)
    assert [n for n in os.listdir(os.path.dirname(base)) if n.startswith(".partial-")] == []


def test_cli_prepare_accepts_srun_and_sbatch_overrides(compose, enroot, cli):
    result = cli(["prepare", "-f", compose, "--enroot-bin", STANDIN, "--srun-bin", "/x/srun",
                  "--sbatch-bin", "/x/sbatch"])
    assert result.code == 0, result


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm client tools not installed")
def test_submit_dry_run_skip_prepare_with_empty_cache_renders_with_warning(shared, cli):
    """`submit --dry-run --skip-prepare` is the pure validate-and-render run: a missing artifact is
    reported as a warning (a real submit would refuse), the script is still written."""
    project = os.path.join(shared, "dry")
    os.makedirs(project)
    path = os.path.join(project, "compose.yaml")
    with open(path, "w") as handle:
        handle.write("x-slurm:\n  cache_dir: %s\nservices:\n  app:\n    image: redis:7\n"
                     % os.path.join(shared, "empty-cache"))
    result = cli(["submit", "--dry-run", "--skip-prepare", "-f", path, "--enroot-bin", STANDIN,
                  "--srun-bin", PYXIS_SRUN])
    assert result.code == 0, result
    assert "skip_prepare" in result.err or "--skip-prepare" in result.err
    assert os.path.isfile(os.path.join(project, "hpc-compose.sbatch"))
    refused = cli(["submit", "--skip-prepare", "-f", path, "--enroot-bin", STANDIN,
                   "--srun-bin", PYXIS_SRUN])
    assert refused.code == 1 and "preflight found" in refused.err


def test_cli_cache_list_uses_the_compose_file_found_in_this_directory(compose, cli):
    result = cli(["cache", "list", "--format", "json"], cwd=str(compose.parent))
    assert result.code == 0, result
    assert json.loads(result.out)["cache_dir"] == str(compose.parent / "cache")


def test_cli_cache_list_without_a_compose_file_lists_the_home_cache(tmp_path, cli):
    home = tmp_path / "home"
    result = cli(["cache", "list"], cwd=str(tmp_path), env={"HOME": str(home)})
    assert result.out == "no cache entries found in %s\n" % (home / ".cache" / "hpc-compose")


# -- apptainer services: .sif images through the stand-in apptainer ---------------------------------

APPTAINER_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "apptainer")


@pytest.fixture
def apptainer(tmp_path, monkeypatch):
    """The stand-in apptainer, logging to a temporary file; returns the log reader."""
    log = EnrootLog(str(tmp_path / "apptainer-calls.jsonl"))
    monkeypatch.setenv("APPTAINER_STANDIN_LOG", log.path)
    monkeypatch.setenv("APPTAINER_TMPDIR", str(tmp_path / "apptainer-tmp"))
    monkeypatch.delenv("APPTAINER_STANDIN_FAIL", raising=False)
    return log


def apptainer_options(**kw):
    return hc.PrepareOptions(enroot_bin=STANDIN, apptainer_bin=APPTAINER_STANDIN, **kw)


def test_apptainer_service_image_is_a_sif_with_its_own_cache_key(tmp_path):
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer"),
                                make_service("p", "redis:7")])
    sif, sqsh = [image.base for image in hc.build_runtime_plan(plan).images]
    assert sif.path.startswith(str(tmp_path / "cache" / "base") + os.sep)
    assert sif.path.endswith("-redis-7.sif") and sqsh.path.endswith("-redis-7.sqsh")
    assert sif.builder == "apptainer" and sif.enroot_uri is None and sif.source == "docker://redis:7"
    assert sif.cache_key != sqsh.cache_key
    assert dict(sif.inputs)["format"] == "sif" and "format" not in dict(sqsh.inputs)


def test_singularity_and_apptainer_services_share_one_sif(tmp_path):
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer"),
                                make_service("s", "redis:7", runtime="singularity")])
    first, second = [image.base for image in hc.build_runtime_plan(plan).images]
    assert first.path == second.path


def test_apptainer_build_then_cache_hit_builds_nothing(tmp_path, apptainer, enroot):
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer")])
    rp = hc.build_runtime_plan(plan)
    base = rp.images[0].base
    results = hc.prepare_images(rp, apptainer_options())
    calls = apptainer.calls()
    assert [c["argv"] for c in calls] == [["build", partial_of(base.path), "docker://redis:7"]]
    assert calls[0]["env"]["APPTAINER_CACHEDIR"] == str(tmp_path / "cache" / "apptainer" / "cache")
    assert calls[0]["env"]["APPTAINER_TMPDIR"] == str(tmp_path / "apptainer-tmp")
    assert results[0].runtime_action == "built" and results[0].artifact == base.path
    manifest = hc._load_manifest(base.path)
    assert manifest["builder"] == "apptainer" and manifest["source_image"] == "docker://redis:7"
    again = hc.prepare_images(hc.build_runtime_plan(plan), apptainer_options())
    assert again[0].runtime_action == "reused" and len(apptainer.calls()) == 1
    assert enroot.calls() == []
    assert [e["artifact_path"] for e in hc.list_cache(str(tmp_path / "cache"))] == [base.path]


def test_apptainer_prepare_is_a_definition_file_built_with_fakeroot(tmp_path, apptainer):
    prepare = hc.PreparePlan(commands=("apt-get update", "echo 'done'"),
                             mounts=(hc.Mount(str(tmp_path), "/src", "ro"),),
                             env=(("MODE", "a b"),))
    plan = make_plan(tmp_path, [make_service("a", "redis:7", runtime="apptainer",
                                             prepare=prepare)])
    rp = hc.build_runtime_plan(plan)
    image = rp.images[0]
    assert image.container_image == image.prepared.path and image.prepared.path.endswith(".sif")
    hc.prepare_images(rp, apptainer_options())
    build_base, build_prepared = apptainer.calls()
    argv = build_prepared["argv"]
    assert argv[:4] == ["build", "--fakeroot", "--bind", "%s:/src:ro" % tmp_path]
    assert argv[4] == partial_of(image.prepared.path) and argv[5].endswith(".def")
    assert not os.path.exists(argv[5])
    # The bind's destination is made first (%setup, on the host): a build cannot create it.
    target = '"${APPTAINER_ROOTFS}"/src'
    assert build_prepared["definition"] == (
        "Bootstrap: localimage\nFrom: %s\n\n%%setup\n"
        '    if [ -d %s ]; then mkdir -p %s; else mkdir -p "$(dirname %s)" && touch %s; fi\n\n'
        "%%post\n    set -e\n    export MODE='a b'\n"
        "    /bin/sh -lc 'apt-get update'\n    /bin/sh -lc 'echo '\"'\"'done'\"'\"''\n"
        % (image.base.path, hc.shell_quote(str(tmp_path)), target, target, target))
    assert os.path.isfile(image.prepared.path)


def test_a_sif_prepared_from_a_squashfs_image_gets_its_default_as_runscript():
    # Found on real Apptainer: a .sif built from a .sqsh had Apptainer's "There is no runscript"
    # one, and `apptainer run` of the prepared image ignored the service's command.
    prepare = hc.PreparePlan(commands=("true",), mounts=(), env=())
    definition = hc._apptainer_definition("/images/base.sqsh", prepare)
    assert "%runscript\n    " + hc._SQUASHFS_DEFAULT_SCRIPT + "\n\n%post" in definition
    assert "%runscript" not in hc._apptainer_definition("/images/base.sif", prepare)


def test_apptainer_build_failure_names_the_tool_and_leaves_no_file(tmp_path, apptainer,
                                                                   monkeypatch):
    monkeypatch.setenv("APPTAINER_STANDIN_FAIL", "build")
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("a", "redis:7",
                                                                 runtime="apptainer")]))
    with pytest.raises(hc.ToolError) as info:
        hc.prepare_images(rp, apptainer_options())
    assert "apptainer build of docker://redis:7 failed (exit 255)" in info.value.message
    assert "apptainer said:" in info.value.message
    assert not os.listdir(os.path.dirname(rp.images[0].base.path)) or \
        not any(n.endswith(".sif") for n in os.listdir(os.path.dirname(rp.images[0].base.path)))


# -- prepare stages (a Dockerfile's build stage, COPY --from) ----------------------------------------

def staged_plan(tmp_path, stage_commands=("go build -o /out/api",), stage_image="golang:1.22"):
    reference = "docker://" + stage_image
    stage = hc.PrepareStagePlan("build", hc.ImageRef("remote", reference, stage_image),
                                tuple(stage_commands))
    prep = hc.PreparePlan(("cp -a /tmp/hpc-compose-stage/build/out/api /api",), stages=(stage,))
    return make_plan(tmp_path, [make_service("api", "debian:12", prepare=prep)])


def test_a_stage_is_prepared_on_its_own_and_mounted_read_only_into_the_service_prepare(
        tmp_path, enroot):
    rp = hc.build_runtime_plan(staged_plan(tmp_path))
    image = rp.images[0]
    stage = image.stages[0]
    assert stage.prepared is not None and stage.path == stage.prepared.path
    hc.prepare_images(rp, options())
    argvs = enroot.argvs()
    # The stage: imported, prepared and exported first, as a service's image would be.
    assert argvs[0] == ["import", "--output", partial_of(stage.base.path),
                        "docker://registry-1.docker.io#library/golang:1.22"]
    assert [a[0] for a in argvs[1:5]] == ["create", "start", "export", "remove"]
    assert argvs[2][-1] == "go build -o /out/api"
    # Then the service's image, with the stage's files unpacked and mounted at its name.
    name = [a for a in argvs[5:] if a[0] == "create"][0][3]
    data = str(tmp_path / "cache" / "enroot" / "data")
    assert ["create", "--force", "--name", name + "-stage-build", stage.path] in argvs
    start = [a for a in argvs[5:] if a[0] == "start"][0]
    assert start == ["start", "--root", "--rw", "--mount",
                     os.path.join(data, name + "-stage-build")
                     + ":/tmp/hpc-compose-stage/build:none:rbind,x-create=auto,ro",
                     name, "/bin/sh", "-lc", "cp -a /tmp/hpc-compose-stage/build/out/api /api"]
    assert ["remove", "--force", name + "-stage-build"] in argvs
    assert os.path.isfile(image.prepared.path) and os.path.isfile(stage.prepared.path)


def test_a_stage_without_commands_is_the_imported_image_itself(tmp_path, enroot):
    rp = hc.build_runtime_plan(staged_plan(tmp_path, stage_commands=(),
                                           stage_image="nginx:1.27"))
    stage = rp.images[0].stages[0]
    assert stage.prepared is None and stage.path == stage.base.path
    hc.prepare_images(rp, options())
    assert ["create", "--force", "--name", enroot.argvs()[2][3] + "-stage-build",
            stage.base.path] in enroot.argvs()


def test_a_changed_stage_changes_the_service_image(tmp_path):
    first = hc.build_runtime_plan(staged_plan(tmp_path)).images[0]
    second = hc.build_runtime_plan(staged_plan(tmp_path, ("go build -o /out/other",))).images[0]
    assert first.prepared.path != second.prepared.path
    assert first.base.path == second.base.path


def test_a_second_prepare_of_a_staged_service_is_a_hit(tmp_path, enroot):
    rp = hc.build_runtime_plan(staged_plan(tmp_path))
    hc.prepare_images(rp, options())
    count = len(enroot.argvs())
    results = hc.prepare_images(rp, options())
    assert len(enroot.argvs()) == count
    assert results[0].runtime_action == "reused"
    assert rp.images[0].stages[0].prepared.path in hc._runtime_artifacts(rp)


def test_preflight_counts_a_stage_image_among_the_pulls_that_need_credentials(tmp_path):
    rp = hc.build_runtime_plan(staged_plan(tmp_path, stage_image="nvcr.io/nvidia/cuda:12.4"))
    assert hc._pulls(rp) == {"docker.io": ["api"], "nvcr.io": ["api"]}


def test_a_stage_with_mounts_rebuilds_the_stage_and_the_service_image_every_time(
        tmp_path, enroot):
    stage = hc.PrepareStagePlan("build", hc.ImageRef("remote", "docker://golang:1.22", "golang"),
                                ("go build",), (hc.Mount(str(tmp_path), "/src"),))
    prep = hc.PreparePlan(("cp -a /tmp/hpc-compose-stage/build/out /out",), stages=(stage,))
    rp = hc.build_runtime_plan(make_plan(tmp_path, [make_service("api", "debian:12",
                                                                 prepare=prep)]))
    assert rp.images[0].rebuild_every_time
    hc.prepare_images(rp, options())
    count = len([a for a in enroot.argvs() if a[0] == "export"])
    results = hc.prepare_images(rp, options())
    assert len([a for a in enroot.argvs() if a[0] == "export"]) == 2 * count == 4
    assert results[0].note == "rebuilt because a prepare stage has mounts (rebuilds on every " \
                              "prepare/submit)"
