"""Packaging: the reproducible .pyz, every supported Python, stdlib-only and side-effect-free import."""
import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(REPO, "hpc_compose.py")
PYENV_PYTHONS = sorted(
    (path for path in glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python"))
     if os.path.isfile(path)),
    key=lambda path: [int(part) for part in path.split("/versions/")[1].split("/")[0].split(".")])
SUPPORTED = [path for path in PYENV_PYTHONS
             if (3, 6) <= tuple(int(p) for p in path.split("/versions/")[1].split(".")[:2])
             <= (3, 13)] or [sys.executable]


def build(dist, pythons=None, tree=REPO, target="all"):
    argv = ["make", "-s", "-f", "zipapp.mk", target, "DIST=%s" % dist,
            "PYTHON=%s" % sys.executable]
    if pythons is not None:
        argv.append("PYTHONS=%s" % " ".join(pythons))
    subprocess.run(argv, cwd=str(tree), check=True, stdout=subprocess.PIPE)
    return os.path.join(str(dist), "hpc-compose.pyz")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A snapshot of what the build reads, so that both builds see the same sources."""
    root = tmp_path_factory.mktemp("tree")
    for name in ("hpc_compose.py", "zipapp.mk", "install.sh"):
        shutil.copy2(os.path.join(REPO, name), str(root / name))
    shutil.copytree(os.path.join(REPO, "examples"), str(root / "examples"),
                    ignore=shutil.ignore_patterns("__pycache__", ".hpc-compose", "*.pyc"))
    return root


def run(argv, **kwargs):
    kwargs.setdefault("cwd", REPO)
    env = dict(os.environ, USER="tester")
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, **kwargs)


# The running Python's bytecode too: under a Python newer than the pyenv set (3.14 in CI's Debian
# forky root) the archive must still hold a .pyc for the interpreter the tests run.
BUILT_FOR = SUPPORTED + [sys.executable]


@pytest.fixture(scope="module")
def pyz(tmp_path_factory, tree):
    return build(tmp_path_factory.mktemp("dist"), BUILT_FOR, tree)


def test_building_twice_gives_identical_bytes(tmp_path, pyz, tree):
    again = build(tmp_path, BUILT_FOR, tree)
    with open(pyz, "rb") as first, open(again, "rb") as second:
        assert first.read() == second.read()


def test_release_is_reproducible_with_right_sha256sums(tmp_path, tree):
    import hashlib
    import hpc_compose
    folders = []
    for name in ("one", "two"):
        build(tmp_path / name, [sys.executable], tree, target="release")
        folders.append(tmp_path / name)
    published = sorted(path.name for path in folders[0].iterdir() if path.name != ".build")
    versioned = "hpc-compose-%s.pyz" % hpc_compose.__version__
    assert published == sorted(["SHA256SUMS", "hpc-compose.pyz", "hpc-compose.pyz.sha256",
                                versioned, versioned + ".sha256", "install.sh"])
    for name in published:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    assert (folders[0] / versioned).read_bytes() == (folders[0] / "hpc-compose.pyz").read_bytes()
    assert (folders[0] / "install.sh").read_bytes() == (tree / "install.sh").read_bytes()
    sums = (folders[0] / "SHA256SUMS").read_text().splitlines()
    assert sums == ["%s  %s" % (hashlib.sha256((folders[0] / name).read_bytes()).hexdigest(), name)
                    for name in (versioned, "hpc-compose.pyz", "install.sh")]
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=str(folders[0]),
                               stdout=subprocess.PIPE, universal_newlines=True)
        assert check.returncode == 0, check.stdout


def _git(tree, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
               GIT_CONFIG_NOSYSTEM="1", HOME=str(tree))
    return subprocess.run(["git", "-C", str(tree)] + list(args), env=env, check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


@pytest.fixture
def git_tree(tmp_path, tree):
    """A copy of the build tree as a git checkout: tag v<version>, then one more commit."""
    import hpc_compose
    copy = tmp_path / "checkout"
    shutil.copytree(str(tree), str(copy))
    _git(copy, "init", "-q")
    _git(copy, "add", "-A")
    _git(copy, "commit", "-q", "-m", "first")
    _git(copy, "tag", "v" + hpc_compose.__version__)
    (copy / "NOTES").write_text("x\n")
    _git(copy, "add", "NOTES")
    _git(copy, "commit", "-q", "-m", "second")
    return copy


def test_version_of_a_built_pyz_names_the_git_description_of_its_tree(tmp_path, git_tree):
    import hpc_compose
    description = "v%s-1-g%s" % (hpc_compose.__version__, _git(git_tree, "rev-parse", "--short",
                                                               "HEAD"))
    pyz = build(tmp_path / "dist", [sys.executable], git_tree)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for python in (sys.executable, SUPPORTED[0]):
        result = run([python, pyz, "--version"], cwd=str(outside))
        assert result.stdout == "hpc-compose %s (%s)\n" % (hpc_compose.__version__, description)


def test_version_from_a_checkout_names_its_git_description(git_tree):
    import hpc_compose
    (git_tree / "NOTES").write_text("changed\n")
    result = run([sys.executable, str(git_tree / "hpc_compose.py"), "--version"], cwd="/")
    assert result.stdout == "hpc-compose %s (v%s-1-g%s-dirty)\n" % (
        hpc_compose.__version__, hpc_compose.__version__,
        _git(git_tree, "rev-parse", "--short", "HEAD"))


def test_version_without_git_is_the_bare_version(tmp_path, tree):
    import hpc_compose
    pyz = build(tmp_path, [], tree)
    for argv in ([sys.executable, pyz, "--version"],
                 [sys.executable, str(tree / "hpc_compose.py"), "--version"]):
        assert run(argv, cwd=str(tmp_path)).stdout == "hpc-compose %s\n" % hpc_compose.__version__


# Code-hosting sites whose <owner>/<repository> paths (or raw file hosts) would make a file of ours
# a pointer to someone else's downloads. Written as patterns so that this file does not match.
_HOSTED_REPOSITORY = (r"(?:github\.com|gitlab\.com|bitbucket\.org|codeberg\.org|sr\.ht)/[\w.-]+/[\w.-]+"
                      r"|raw\.githubusercontent\.com|objects\.githubusercontent\.com")


def _repository_files():
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    if listed.returncode == 0 and listed.stdout:
        return [name for name in listed.stdout.decode("utf-8").split("\0") if name]
    found = []
    for root, folders, files in os.walk(REPO):
        folders[:] = [name for name in folders if name not in (".git", "dist", "__pycache__")]
        found.extend(os.path.relpath(os.path.join(root, name), REPO) for name in files)
    return found


def test_no_file_names_another_projects_repository_as_a_download_source():
    import re
    pattern = re.compile(_HOSTED_REPOSITORY)
    hits = []
    for name in _repository_files():
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append("%s:%d: %s" % (name, number, line.strip()))
    assert hits == []


def test_changelog_has_a_section_for_the_current_version():
    import hpc_compose
    with open(os.path.join(REPO, "CHANGELOG.md")) as handle:
        headings = [line[3:].strip() for line in handle.read().splitlines()
                    if line.startswith("## ")]
    assert headings[0] in ("Unreleased", hpc_compose.__version__)
    assert [heading for heading in headings if heading.split()[0] == hpc_compose.__version__]


def test_installer_builds_in_no_download_location():
    import re
    with open(os.path.join(REPO, "install.sh")) as handle:
        code = [line for line in handle.read().splitlines() if not line.lstrip().startswith("#")]
    hosts = [line for line in code if re.search(r"://[\w-]+\.[\w.-]+", line)]
    assert hosts == []


def test_archive_holds_module_main_examples_and_bytecode(pyz):
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
        infos = archive.infolist()
    assert names == sorted(names)
    assert {"__main__.py", "hpc_compose.py", "examples/minimal-batch.yaml",
            "examples/host-pipeline.yaml", "examples/models/README.md"} <= set(names)
    for root, _, files in os.walk(os.path.join(REPO, "examples")):
        for file_name in files:
            relative = os.path.relpath(os.path.join(root, file_name), REPO).replace(os.sep, "/")
            run_output = (file_name.endswith((".sbatch", ".pyc")) or file_name.startswith("slurm-")
                          or "/results/" in relative or "__pycache__" in relative
                          or ".hpc-compose" in relative)
            if not run_output:
                assert relative in names
    assert any(name.startswith("hpc_compose.cpython-") and name.endswith(".pyc") for name in names)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert not [name for name in names if name.endswith(".sbatch") or "/slurm-" in name]


def test_archive_starts_with_a_python3_shebang_and_a_checksum_file(pyz):
    with open(pyz, "rb") as handle:
        assert handle.readline() == b"#!/usr/bin/env python3\n"
    import hashlib
    with open(pyz, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    with open(pyz + ".sha256") as handle:
        assert handle.read() == "%s  hpc-compose.pyz\n" % digest


@pytest.mark.parametrize("python", SUPPORTED, ids=lambda p: p.split("/versions/")[-1].split("/")[0])
def test_pyz_runs_version_init_list_and_validate(python, pyz):
    version = run([python, pyz, "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("hpc-compose ")
    listing = run([python, pyz, "init", "--list"])
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split()[0] == "minimal-batch"
    validate = run([python, pyz, "validate", "-f", "examples/minimal-batch.yaml"])
    assert validate.returncode == 0, validate.stderr


@pytest.mark.parametrize("python", SUPPORTED, ids=lambda p: p.split("/versions/")[-1].split("/")[0])
def test_checkout_module_runs_validate(python):
    result = run([python, MODULE, "validate", "-f", "examples/minimal-batch.yaml"])
    assert result.returncode == 0, result.stderr


def _last_line_after_pyz_version(pyz, code):
    """Run ``--version`` through the archive's entry point in a fresh Python, then ``code`` there;
    the last line ``code`` printed."""
    probe = ("import gc, runpy, sys; sys.argv = ['hpc-compose', '--version']\n"
             "try:\n    runpy.run_path(%r, run_name='__main__')\n"
             "except SystemExit:\n    pass\n" % pyz) + code
    result = run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def test_pyz_uses_the_precompiled_module_of_the_running_python(pyz):
    # A module executed from the archive's .pyc has no import spec; one imported from source has.
    assert _last_line_after_pyz_version(
        pyz, "import hpc_compose; print(type(hpc_compose.__spec__).__name__)") == "NoneType"


def test_pyz_freezes_the_module_out_of_the_collector_s_reach_and_leaves_it_on(pyz):
    # Start-up (docs/performance.md): the entry point keeps the cyclic collector off while the
    # module loads and freezes what it defined; the collector is on again for the command's own
    # garbage (logs --follow and --watch run for hours). Python 3.6 has no gc.freeze: there the
    # collector is only off during the load.
    assert _last_line_after_pyz_version(
        pyz, "print(gc.isenabled(), getattr(gc, 'get_freeze_count', lambda: 1001)() > 1000)"
    ) == "True True"


def test_pyz_without_bytecode_runs_from_source(tmp_path):
    source_only = build(tmp_path, [])
    with zipfile.ZipFile(source_only) as archive:
        assert not [name for name in archive.namelist() if name.endswith(".pyc")]
    result = run([sys.executable, source_only, "init", "--template", "host-pipeline", "-o", "-"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# host-pipeline:")


def test_pyz_init_writes_the_same_file_as_a_checkout(tmp_path, pyz):
    from_pyz = run([sys.executable, pyz, "init", "--template", "training-resume", "--name", "n",
                    "--cache-dir", "/c", "--output", str(tmp_path / "a" / "c.yaml")])
    from_checkout = run([sys.executable, MODULE, "init", "--template", "training-resume",
                         "--name", "n", "--cache-dir", "/c", "--output", str(tmp_path / "b" / "c.yaml")])
    assert from_pyz.returncode == 0 and from_checkout.returncode == 0, from_pyz.stderr
    for relative in ("c.yaml", "training/train.py"):
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()


def test_pyz_init_writes_the_template_companion_files(tmp_path, pyz):
    result = run([sys.executable, pyz, "init", "--template", "vllm-uv-worker", "--output",
                  str(tmp_path / "compose.yaml")])
    assert result.returncode == 0, result.stderr
    with open(os.path.join(REPO, "examples", "vllm-uv-worker", "worker.py"), "rb") as handle:
        assert (tmp_path / "vllm-uv-worker" / "worker.py").read_bytes() == handle.read()
    assert (tmp_path / "models" / "README.md").is_file()


def test_pyz_on_a_too_old_python_says_which_python_it_needs(pyz):
    # The running interpreter pretends to be 3.5 before the archive's __main__ runs.
    probe = ("import runpy, sys\nsys.version_info = (3, 5, 0)\n"
             "runpy.run_path(%r, run_name='__main__')\n" % pyz)
    result = run([sys.executable, "-c", probe])
    assert result.returncode == 2
    assert result.stderr.startswith("hpc-compose needs Python 3.6 or newer (this is ")
    assert result.stdout == ""


def _imported_module_names(path):
    with open(path) as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_module_imports_only_the_standard_library():
    import importlib.util
    import sysconfig
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    outside = []
    for name in sorted(_imported_module_names(MODULE)):
        if name in sys.builtin_module_names:
            continue
        spec = importlib.util.find_spec(name)
        origin = os.path.realpath(spec.origin) if spec and spec.origin not in (None, "frozen",
                                                                               "built-in") else ""
        if spec is None or (origin and (not origin.startswith(stdlib + os.sep)
                                        or "site-packages" in origin)):
            outside.append(name)
    assert outside == []


def test_importing_the_module_has_no_side_effects(tmp_path):
    probe = ("import os, sys\n"
             "argv = list(sys.argv)\n"
             "sys.path.insert(0, %r)\n"
             "import hpc_compose\n"
             "assert sys.argv == argv, sys.argv\n"
             "print(sorted(os.listdir('.')), sorted(os.listdir(os.environ['HOME'])))\n" % REPO)
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", probe, "--some-arg"], cwd=str(cwd), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "[] []\n"


def test_importing_the_module_leaves_heavy_modules_unimported():
    probe = ("import sys\nsys.path.insert(0, %r)\nbefore = set(sys.modules)\n"
             "import hpc_compose\n"
             "heavy = {'json', 'subprocess', 'argparse', 'hashlib', 'tempfile', 'shutil',"
             " 'datetime', 'zipfile', 'urllib', 'socket', 'string', 'glob', 'fnmatch', 'shlex'}\n"
             "print(sorted((set(sys.modules) - before) & heavy))\n" % REPO)
    result = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.stdout == "[]\n"


README_LINES = [
    # The cluster the whole suite needs (slurm_support.CLUSTER_COMMAND, what a skip tells to run)...
    "bash tests/cluster/slurm-cluster.sh up --containers --nodes 3 && "
    "python3 hpc_compose.py up -f examples/host-pipeline.yaml",
    # ... and every test on it.
    "python3 -m pip install pytest && python3 -m pytest -q tests"]


def test_readme_starts_with_the_two_setup_commands():
    from slurm_support import CLUSTER_COMMAND
    with open(os.path.join(REPO, "README.md")) as handle:
        lines = handle.read().splitlines()
    assert lines[:6] == ["# hpc-compose", "", "```sh"] + README_LINES + ["```"]
    assert README_LINES[0].startswith(CLUSTER_COMMAND + " && ")


def test_ci_runs_the_readme_s_two_lines_verbatim_in_order_before_its_other_sections():
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        lines = [line.strip() for line in handle.read().splitlines()]
    first, second = (lines.index(line) for line in README_LINES)
    other = lines.index('section "3. pytest for every other CPython"')
    assert first < second < other
    # ... each one the body of the function that the first step of its section calls.
    assert lines[first - 1:first + 2] == ["readme_cluster_and_example() {", README_LINES[0], "}"]
    assert lines[second - 1:second + 2] == ["readme_tests() {", README_LINES[1], "}"]
    # (Section 1b, the newer generations started in the background, sits between them.)
    sections = [n for n, line in enumerate(lines)
                if line.startswith('section "1. ') or line.startswith('section "2. ')]
    calls = [lines[n + 2] for n in sections]
    assert calls == ["readme_cluster_and_example",
                     'with_default_signals bash -c "$(declare -f readme_tests); readme_tests"']


def _top_level_names():
    with open(MODULE) as handle:
        tree = ast.parse(handle.read())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names.extend(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign):
            names.append(node.target.id)
    return names


def test_public_surface_is_exactly_all_and_the_docstring_names_it():
    import hpc_compose
    public = sorted(n for n in _top_level_names() if not n.startswith("_"))
    assert public == sorted(n for n in hpc_compose.__all__ if n != "__version__")
    undocumented = [n for n in hpc_compose.__all__ if "``%s" % n not in hpc_compose.__doc__]
    assert undocumented == []


def _record_classes(tree):
    """The module's ``typing.NamedTuple`` classes (top level), as ast nodes."""
    return [node for node in tree.body if isinstance(node, ast.ClassDef)
            and any(isinstance(base, ast.Name) and base.id == "NamedTuple" for base in node.bases)]


def test_at_most_a_tenth_of_record_fields_are_typed_object_each_with_a_comment():
    with open(MODULE) as handle:
        source = handle.read()
    lines = source.splitlines()
    fields = [(record.name, field) for record in _record_classes(ast.parse(source))
              for field in record.body if isinstance(field, ast.AnnAssign)]
    untyped = [(name, field) for name, field in fields
               if isinstance(field.annotation, ast.Name) and field.annotation.id == "object"]
    assert len(fields) > 200
    assert len(untyped) * 10 <= len(fields), ["%s.%s" % (name, field.target.id)
                                              for name, field in untyped]
    # A field that can hold any value says which values, on its own line.
    unexplained = ["%s.%s" % (name, field.target.id) for name, field in untyped
                   if "#" not in lines[field.lineno - 1]]
    assert unexplained == []


def test_no_record_has_a_mutable_default():
    import hpc_compose
    records = [value for value in vars(hpc_compose).values()
               if isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "_fields")
               and value.__module__ == "hpc_compose"]
    assert len(records) > 40
    mutable = []
    for record in records:
        for field, default in record._field_defaults.items():
            try:
                hash(default)     # a list, dict or set, or a tuple holding one, is unhashable
            except TypeError:
                mutable.append("%s.%s" % (record.__name__, field))
    assert mutable == []


def _annotation_names(annotation):
    """Every name an annotation refers to, forward references (strings) included."""
    names = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name):
            names.add(node.id)
        text = getattr(node, "value" if type(node).__name__ == "Constant" else "s", None)
        if type(node).__name__ in ("Constant", "Str") and isinstance(text, str):
            names |= _annotation_names(ast.parse(text, mode="eval"))
    return names


def test_every_public_function_return_annotation_names_a_public_type():
    import builtins
    import typing
    import hpc_compose
    with open(MODULE) as handle:
        tree = ast.parse(handle.read())
    allowed = set(hpc_compose.__all__) | set(dir(builtins)) | set(typing.__all__)
    annotated = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in hpc_compose.__all__ and node.returns:
            annotated[node.name] = sorted(_annotation_names(node.returns) - allowed)
    assert {"watch_job", "load_template", "load_spec", "build_plan"} <= set(annotated)
    assert dict((name, bad) for name, bad in annotated.items() if bad) == {}
