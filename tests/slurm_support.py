"""Fixtures and helpers for end-to-end tests against the real single-node Slurm cluster.

The cluster comes from the README's first line, ``bash tests/cluster/slurm-cluster.sh up --containers
--nodes 3`` (CLUSTER_COMMAND: three nodes with real Pyxis and Enroot; ``.ci/run`` runs that line too). ``tests/conftest.py`` star-imports this module, so the fixtures below are available
in every test file without an import; import helpers explicitly::

    from slurm_support import wait_for_job, run_tool_cli, sacct_job

    def test_minimal_job_completes(slurm, slurm_jobs, tmp_path):
        res = run_tool_cli(["submit", "-f", str(compose)], cwd=tmp_path)
        job_id = ...  # parsed from res.out
        slurm_jobs.add(job_id)               # scancelled at teardown if still alive
        assert wait_for_job(job_id, timeout=120) == "COMPLETED"

Without a reachable cluster the ``slurm`` fixture skips with the reason; under ``CI=true`` it fails
instead (CI must run every end-to-end test). Polling is sparse: it starts at 0.25 s and backs off to
3 s, and asks ``sacct`` (slurmdbd), which keeps answering after the job leaves ``squeue``.

OWNER: cluster engineer.
"""
import os
import shutil
import socket
import sys
import time
import uuid

import pytest

__all__ = [
    "slurm", "slurm_jobs", "SlurmCluster", "ToolResult", "REPO_ROOT", "TOOL_PATH", "TERMINAL_STATES",
    "cluster_problem", "job_state", "sacct_job", "wait_for_job", "wait_for_state", "cancel_job",
    "submit_wrap", "run_tool_cli", "pyxis_test_image", "TEST_IMAGE", "expected_slurm_generation",
    "slurm_under_test", "cluster_nodes", "require_nodes", "on_node", "enroot_containers", "processes_with",
    "submitted_job_id", "image", "cache_dir", "E2E_CACHE_ROOT", "CLUSTER_COMMAND",
    "CONTAINER_RUNTIMES", "container_runtime", "runtime_line", "apptainer_expected",
    "job_processes",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL_PATH = os.path.join(REPO_ROOT, "hpc_compose.py")
CLUSTER_SCRIPT = os.path.join(REPO_ROOT, "tests", "cluster", "slurm-cluster.sh")
# The README's first line brings up the cluster the whole suite needs: what a skip tells to run.
CLUSTER_COMMAND = "bash tests/cluster/slurm-cluster.sh up --containers --nodes 3"

# Slurm job states after which nothing will change any more (sacct/squeue spelling).
TERMINAL_STATES = frozenset([
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
])
# "planned" (Slurm 23.02 on): an idle node that the backfill scheduler holds for a pending job. On
# 26.05 with three nodes, every node showed it for a while after the heterogeneous-job tests' jobs
# (each component waits for the others), with nothing pending, and the suite failed as "no usable node".
USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing", "planned")

# The real container image the cluster script builds (`up --containers`): Debian minbase with
# python3, curl, netcat-openbsd and procps, as a squashfs file Pyxis imports without a registry.
TEST_IMAGE = os.path.join(os.environ.get("HPC_COMPOSE_TEST_CACHE", "/opt/hpc-compose-tests"),
                          "test-image.sqsh")
# Prepared images of the end-to-end tests go to a cache on the machine's shared file system (not
# /tmp, which the tool refuses as node-local), one folder per test so that prepare really builds.
E2E_CACHE_ROOT = os.path.join(os.path.dirname(TEST_IMAGE), "e2e-cache")


def _run(argv, timeout=30, cwd=None, env=None):
    """Run a command; return (returncode, stdout, stderr) with text output; never raises on failure."""
    import subprocess
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                              universal_newlines=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, "", "%s: timed out after %s s" % (argv[0], exc.timeout)
    except OSError as exc:
        return 127, "", "%s: %s" % (argv[0], exc)
    return proc.returncode, proc.stdout, proc.stderr


class SlurmCluster(object):
    """What the ``slurm`` fixture returns: the node and partition of the test cluster."""

    def __init__(self, node, partition, state, version):
        self.node = node
        self.partition = partition
        self.state = state
        self.version = version

    def __repr__(self):
        return "SlurmCluster(node=%r, partition=%r, state=%r, version=%r)" % (
            self.node, self.partition, self.state, self.version)


def cluster_problem():
    """Return None when the test cluster answers (node usable, sacct working), else why not."""
    import shutil
    for tool in ("sinfo", "sbatch", "squeue", "sacct", "scancel", "srun"):
        if shutil.which(tool) is None:
            return "%s is not on PATH" % tool
    code, out, err = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%T"], timeout=20)
    if code != 0:
        return "sinfo failed: %s" % (err.strip() or out.strip())
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    usable = [r for r in rows if r[2].rstrip("*~#!%$@^-") in USABLE_NODE_STATES]
    if not usable:
        return "no usable node (sinfo says: %s)" % (out.strip() or "nothing")
    code, out, err = _run(["sacct", "-n", "-X", "-P", "--format=JobID", "-S", "now"], timeout=20)
    if code != 0:
        return "sacct failed (is slurmdbd up?): %s" % (err.strip() or out.strip())
    return None


def _cluster_info():
    _, out, _ = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%T"], timeout=20)
    first = out.splitlines()[0] if out.strip() else "||"
    node, partition, state = (first.split("|") + ["", ""])[:3]
    _, version, _ = _run(["sinfo", "--version"], timeout=20)
    return SlurmCluster(node, partition.rstrip("*"), state, version.strip())


@pytest.fixture(scope="session")
def slurm():
    """The real test cluster; skips (fails under CI=true) when it is not reachable."""
    reason = cluster_problem()
    if reason is not None:
        message = ("Slurm test cluster not reachable: %s. Bring it up with `%s`."
                   % (reason, CLUSTER_COMMAND))
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    info = _cluster_info()
    _SLURM_UNDER_TEST.append(info.version)
    expected = expected_slurm_generation()
    if expected is not None and _slurm_release(info.version)[:2] != expected.split("."):
        # Not a skip: the suite was told which Slurm to test and talks to another one.
        pytest.fail("the Slurm on PATH is '%s' (%s), but HPC_COMPOSE_TEST_SLURM asks for %s"
                    % (info.version, shutil.which("sinfo"), expected), pytrace=False)
    return info


_SLURM_UNDER_TEST = []


def expected_slurm_generation():
    """The Slurm generation (e.g. '24.11') the suite must run against, or None for any.

    ``tests/cluster/slurm-cluster.sh exec --slurm X`` sets ``HPC_COMPOSE_TEST_SLURM=X``.
    """
    return os.environ.get("HPC_COMPOSE_TEST_SLURM") or None


def _slurm_release(version):
    # 'slurm 22.05.8' or 'slurm-wlm 24.11.5' -> ['22', '05', '8'] ([] when unreadable).
    words = version.split()
    return words[-1].split(".") if len(words) == 2 else []


def slurm_under_test():
    """The ``sinfo --version`` of the cluster the ``slurm`` fixture used, or None if none was used."""
    return _SLURM_UNDER_TEST[0] if _SLURM_UNDER_TEST else None


_PYXIS_PROBLEM = []


def _pyxis_problem():
    # `srun --help` lists the SPANK options of the plugins srun loaded from plugstack.conf.
    if not _PYXIS_PROBLEM:
        code, out, err = _run(["srun", "--help"], timeout=20)
        if code != 0:
            _PYXIS_PROBLEM.append("srun --help failed: %s" % (err.strip() or out.strip()))
        elif "--container-image" not in out:
            _PYXIS_PROBLEM.append("the cluster has no Pyxis (srun --help lists no --container-image)")
        else:
            _PYXIS_PROBLEM.append(None)
    return _PYXIS_PROBLEM[0]


def pyxis_test_image():
    """Return the path of the real test image; skip the test when Pyxis or the image is missing.

    Under CI=true the skip becomes a failure (tests/conftest.py).
    """
    reason = cluster_problem() or _pyxis_problem()
    if reason is None and not os.path.isfile(TEST_IMAGE):
        reason = "the test image %s is missing" % TEST_IMAGE
    if reason is not None:
        pytest.skip("real Pyxis test not possible: %s. Bring the cluster up with `%s`."
                    % (reason, CLUSTER_COMMAND))
    return TEST_IMAGE


# --- the container runtimes under test: Pyxis everywhere, Apptainer where the cluster has it -------

# The Slurm generation roots that `slurm-cluster.sh up --slurm X --containers` gives Apptainer 1.4.5
# (from sid). The host's 22.05 cluster (Debian 12) has none by design: sid's apptainer needs glibc
# 2.38 and bookworm has 2.36.
APPTAINER_GENERATIONS = ("24.11", "26.05")


def apptainer_expected():
    """True where the container tests must also run under Apptainer.

    In a generation root that installs it (HPC_COMPOSE_TEST_SLURM names it), Apptainer is required:
    its absence fails the ``container_runtime`` fixture rather than silently testing Pyxis only.
    Elsewhere the cases exist only when an ``apptainer`` is on PATH, so that on the host's 22.05
    cluster they are not collected at all (a skip would be a failure under CI=true).
    """
    generation = expected_slurm_generation()
    if generation is not None:
        return generation in APPTAINER_GENERATIONS
    return shutil.which("apptainer") is not None


# Decided once, at import: the parameters of the ``container_runtime`` fixture.
CONTAINER_RUNTIMES = ("pyxis", "apptainer") if apptainer_expected() else ("pyxis",)


# `apptainer build` compresses a .sif with gzip by default: 60 s for the test image on the shared
# 2-core machine, against 5 s with lz4. The tool leaves the default to the site; the tests (and the
# tool they start, which passes its environment to apptainer) ask for lz4.
APPTAINER_TEST_ENVIRONMENT = {"APPTAINER_MKSQUASHFS_ARGS": "-comp lz4"}


@pytest.fixture(params=CONTAINER_RUNTIMES)
def container_runtime(request, monkeypatch):
    """The runtime a container test runs under: "pyxis", then "apptainer" where expected."""
    if request.param == "apptainer":
        if shutil.which("apptainer") is None:
            # Not a skip: this root is meant to have Apptainer (`up --slurm X --containers`).
            pytest.fail("no apptainer on PATH in the Slurm %s root; bring it up with "
                        "`bash tests/cluster/slurm-cluster.sh up --slurm %s --containers`"
                        % (expected_slurm_generation(), expected_slurm_generation()),
                        pytrace=False)
        for name, value in sorted(APPTAINER_TEST_ENVIRONMENT.items()):
            monkeypatch.setenv(name, value)
    return request.param


def runtime_line(runtime, indent="  "):
    """The one x-slurm line that picks ``runtime`` (empty for Pyxis, the default for an image)."""
    return "" if runtime == "pyxis" else "%sruntime: %s\n" % (indent, runtime)


class _JobSet(object):
    """Job ids a test submitted; whatever is still alive at teardown is scancelled."""

    def __init__(self):
        self.ids = []

    def add(self, job_id):
        self.ids.append(str(job_id))
        return str(job_id)


@pytest.fixture
def slurm_jobs(slurm):
    """Register job ids with ``.add(id)``; jobs still queued or running at teardown are cancelled."""
    jobs = _JobSet()
    yield jobs
    for job_id in jobs.ids:
        state, _ = job_state(job_id)
        if state not in TERMINAL_STATES:
            cancel_job(job_id)


def _normalize_state(raw):
    # sacct prints "CANCELLED by 0"; squeue may print "COMPLETING"; keep the first word.
    return raw.strip().split(" ")[0].upper() if raw.strip() else ""


def sacct_job(job_id, fields=("JobID", "JobName", "State", "ExitCode", "Elapsed", "Start", "End",
                              "WorkDir")):
    """Return the allocation row of ``job_id`` from sacct as a dict (empty if sacct knows nothing)."""
    code, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id),
                         "--format=" + ",".join(fields)], timeout=20)
    if code != 0:
        return {}
    for line in out.splitlines():
        values = line.split("|")
        # A heterogeneous job's row is its component 0 (123+0), which runs the batch script.
        if len(values) == len(fields) and values[0] in (str(job_id), "%s+0" % job_id):
            row = dict(zip(fields, values))
            if "State" in row:
                row["State"] = _normalize_state(row["State"])
            return row
    return {}


def job_state(job_id):
    """Return (state, exit_code) for a job: sacct's view, falling back to squeue ('' if unknown)."""
    row = sacct_job(job_id, fields=("JobID", "State", "ExitCode"))
    if row:
        return row["State"], row["ExitCode"]
    code, out, _ = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], timeout=20)
    if code == 0 and out.strip():
        return _normalize_state(out.splitlines()[0]), ""
    return "", ""


def wait_for_state(job_id, states, timeout=120.0):
    """Poll until the job's state is in ``states`` (or terminal); return the state seen last."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    delay = 0.25
    state = ""
    while True:
        state, _ = job_state(job_id)
        if state in wanted or state in TERMINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            return state
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 3.0)


def _record_settled(job_id):
    # slurmdbd may first store a placeholder row (JobName 'allocation', End 'Unknown') when a job's
    # end reaches it before its start record; the real row follows within a second or two.
    row = sacct_job(job_id, fields=("JobID", "JobName", "State", "End"))
    return bool(row) and row["JobName"] != "allocation" and row["End"] not in ("", "Unknown")


def wait_for_job(job_id, timeout=120.0, cancel_on_timeout=True):
    """Wait until the job reaches a terminal state and return it (e.g. 'COMPLETED', 'FAILED').

    It also waits (up to 15 s more) until slurmdbd's accounting row for the job is complete, so
    ``sacct_job`` afterwards sees the real name, end time and exit code.
    On timeout the job is scancelled (unless ``cancel_on_timeout`` is false) and AssertionError is
    raised with the last state seen, so a hung job fails its test instead of hanging the suite.
    """
    state = wait_for_state(job_id, (), timeout=timeout)
    if state in TERMINAL_STATES:
        settle_deadline = time.monotonic() + 15.0
        while not _record_settled(job_id) and time.monotonic() < settle_deadline:
            time.sleep(0.5)
        return job_state(job_id)[0]
    if cancel_on_timeout:
        cancel_job(job_id)
    raise AssertionError("job %s not finished after %.0f s (last state: %s)" % (job_id, timeout, state or "unknown"))


def cancel_job(job_id):
    """scancel a job; return scancel's exit code."""
    return _run(["scancel", str(job_id)], timeout=20)[0]


def submit_wrap(command, cwd, output="slurm-%j.out", args=()):
    """Submit ``sbatch --wrap command`` from ``cwd``; return the job id (str). Raises on failure."""
    argv = ["sbatch", "--parsable", "--output", output] + list(args) + ["--wrap", command]
    code, out, err = _run(argv, cwd=str(cwd), timeout=30)
    if code != 0:
        raise AssertionError("sbatch failed (%d): %s" % (code, err.strip()))
    return out.strip().split(";")[0]


@pytest.fixture(scope="module")
def image():
    """The Pyxis test image of the cluster (see ``pyxis_test_image``)."""
    return pyxis_test_image()


@pytest.fixture
def cache_dir(request):
    """A cache folder of the test's own under E2E_CACHE_ROOT, named after its file; removed after."""
    prefix = request.module.__name__.rpartition(".")[2].replace("test_", "").replace("_e2e", "")
    path = os.path.join(E2E_CACHE_ROOT, "%s-%s" % (prefix, uuid.uuid4().hex[:12]))
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ephemeral_low():
    """The first port of the kernel's ephemeral range (where connect() takes its source ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A TCP port free on every address of this machine now, below the ephemeral range.

    End-to-end suites of several Slurm generations run at the same time on one machine, so a test's
    service must never listen on a fixed port: the other suite's copy of the test may hold it. Nor
    may it take a port of the ephemeral range, as ``bind(0)`` gives: any outgoing connection made
    before the service starts (srun, slurmdbd's database link...) can hold that port as its source
    port, and a server bound to all addresses (``python3 -m http.server``) then fails with "Address
    already in use" (CI saw it once). So: a random port between 10000 and the ephemeral range
    that binds on all IPv4 and IPv6 addresses now.
    """
    import random
    low = max(_ephemeral_low(), 10001)
    families = [(socket.AF_INET, "0.0.0.0")]
    try:
        socket.socket(socket.AF_INET6).close()
        families.append((socket.AF_INET6, "::"))
    except OSError:  # no IPv6 here
        pass
    for _ in range(1000):
        port = random.randint(10000, low - 1)
        try:
            for family, address in families:
                with socket.socket(family) as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free TCP port between 10000 and %d" % low)


class ToolResult(object):
    """Outcome of ``run_tool_cli``: ``.code``, ``.out``, ``.err``."""

    def __init__(self, code, out, err):
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self):
        return "ToolResult(code=%r, out=%r, err=%r)" % (self.code, self.out[-2000:], self.err[-2000:])


def run_tool_cli(args, cwd=None, env=None, timeout=600, python=None):
    """Run ``python hpc_compose.py ARGS`` as a subprocess (the current interpreter by default).

    ``env`` entries are added to the current environment. Unlike the in-process ``cli`` fixture this
    exercises the real entry point, signals and exit codes.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    argv = [python or sys.executable, TOOL_PATH] + [str(a) for a in args]
    code, out, err = _run(argv, cwd=str(cwd) if cwd else None, env=full_env, timeout=timeout)
    return ToolResult(code, out, err)


# --- nodes of the cluster (one host, or N slurmd "hosts" in namespaces: `up --nodes N`) ---------

NODE_PID_DIR = "/run/slurm"


def cluster_nodes():
    """Node names of the test cluster, in sinfo order."""
    _, out, _ = _run(["sinfo", "-h", "-N", "-o", "%N"], timeout=20)
    names = []
    for line in out.split():
        if line not in names:
            names.append(line)
    return names


def require_nodes(count, needs, command):
    """The cluster's nodes when there are ``count``; else a skip saying what ``needs`` them and the
    ``command`` that brings them up (a failure under CI, where a skip is one)."""
    nodes = cluster_nodes()
    if len(nodes) < count:
        message = "%s needs %d nodes (`%s`); the cluster has %s" % (
            needs, count, command, " ".join(nodes) or "no node")
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return nodes


def _node_pid(node):
    # `up --nodes N` runs each slurmd in its own namespaces with pid file slurmd-<node>.pid (%n).
    try:
        with open(os.path.join(NODE_PID_DIR, "slurmd-%s.pid" % node)) as handle:
            pid = handle.read().strip()
    except OSError:
        return None
    return pid if pid and os.path.isdir("/proc/" + pid) else None


def on_node(node, argv, timeout=30):
    """Run argv where ``node``'s slurmd runs (inside its namespaces when it has its own); (code, out, err)."""
    pid = _node_pid(node)
    if pid is not None:
        argv = ["nsenter", "--target", pid, "--mount", "--uts", "--net"] + list(argv)
    return _run(argv, timeout=timeout)


def enroot_containers(node, data_path=None):
    """Names ``enroot list`` shows on ``node`` (Pyxis's containers: the root user's data path)."""
    argv = ["enroot", "list"]
    if data_path:
        argv = ["env", "ENROOT_DATA_PATH=" + data_path] + argv
    code, out, err = on_node(node, argv)
    if code != 0:
        raise AssertionError("enroot list on %s failed: %s" % (node, err.strip()))
    return out.split()


def processes_with(marker):
    """``[(pid, command line)]`` of live processes whose command line contains ``marker``.

    Every node of the test cluster shares the machine's process table (only network, UTS and
    mount namespaces are per node), so this sees container processes of all nodes.
    """
    found = []
    own = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == own:
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(pid), cmdline))
    return found


def job_processes(job_id, submit_dir):
    """``[(pid, command line)]`` of live processes of the job submitted from ``submit_dir``.

    Found by their environment (SLURM_JOB_ID and SLURM_SUBMIT_DIR, which every task inherits and
    an apptainer service passes into its container): this sees what a marker in a command line
    cannot, such as Apptainer's starter ("Apptainer runtime parent") and squashfuse_ll. The folder
    matters: the clusters of two Slurm generations share this process table and number their jobs
    alike.
    """
    wanted = [b"SLURM_JOB_ID=" + str(job_id).encode(),
              b"SLURM_SUBMIT_DIR=" + os.fsencode(os.path.realpath(str(submit_dir)))]
    found = []
    for pid, cmdline in processes_with(""):
        try:
            with open("/proc/%d/environ" % pid, "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if all(entry in environ for entry in wanted):
            found.append((pid, cmdline))
    return found


def submitted_job_id(output):
    """The job id in ``submit``/``up`` output (``submitted batch job N``)."""
    import re
    match = re.search(r"submitted batch job (\d+)", output)
    if match is None:
        raise AssertionError("no 'submitted batch job N' in: %s" % output[-2000:])
    return match.group(1)
