#!/usr/bin/env python3
"""hpc-compose: run a Compose-like application as one Slurm batch job.

A ``compose.yaml`` (a model server, a Redis, a trainer, a client...) becomes ONE Slurm batch job in
which every service runs as an ``srun`` step, inside a container through Pyxis and Enroot (or
directly on the node with the ``host`` runtime), started in dependency order behind readiness
checks, supervised with failure policies, and tracked afterwards (status, logs, stats, artifacts).

The whole tool is this one module, Python standard library only, for CPython 3.6 to 3.13. Run it as
``python3 hpc_compose.py COMMAND ...``, as the zipapp ``python3 hpc-compose.pyz COMMAND ...``, or
import it (importing has no side effects).

Contents, in pipeline order (each section starts with a banner of ``#`` lines):

1. Errors, constants and shared helpers -- exit codes, the error family, atomic writes, locks,
   the one shell-quoting helper, the subprocess runner every tool wrapper goes through.
2. YAML reader -- ``parse_yaml`` / ``load_yaml``: the YAML 1.2 subset compose files use.
3. Interpolation and .env -- ``$VAR`` / ``${VAR:-default}`` / ``$$`` and the ``.env`` file.
4. Spec -- the validated compose model (``ComposeSpec``) and ``load_spec``.
5. Planner -- ``build_plan``: dependency order, images, mounts, environment, placement.
6. Images -- enroot import / prepare / export, the shared cache and its manifests.
7. Preflight -- login-node checks before a submission.
8. Render -- the batch script (``string.Template`` constants named ``*_TEMPLATE``).
9. Job tracking -- sbatch, squeue, sacct, sstat, scancel; status, logs, stats, artifacts.
10. Init templates -- the shipped examples offered by ``init``.
11. CLI -- argparse commands, one handler per command.
12. main -- ``main(argv=None)``, the entry point.

Exit codes (stable): 0 success; 1 something failed while running (a tool, the job, preflight);
2 invalid spec or usage; 130 interrupted.
"""

import os
import sys
from typing import NamedTuple

# Heavy or rarely used modules (json, subprocess, hashlib, tempfile, shutil, argparse...) are imported
# inside the functions that use them, so that start-up stays close to a bare interpreter.

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # errors
    "HpcComposeError", "UsageError", "YamlError", "SpecError", "ToolError", "JobFailed",
    # YAML
    "parse_yaml", "load_yaml", "YamlDocument", "Mark",
    # interpolation
    "interpolate", "load_dotenv",
    # spec
    "load_spec", "ComposeSpec", "SlurmSpec", "ServiceSpec", "ServiceSlurmSpec", "ReadinessSpec",
    "FailurePolicy", "PrepareSpec", "MetricsSpec", "ArtifactsSpec", "ResumeSpec",
    # planner
    "build_plan", "Plan", "ServicePlan", "ImageRef", "Execution", "Mount", "Dependency", "Placement",
    # images and preflight
    "build_runtime_plan", "prepare_images", "RuntimePlan", "ServiceImage", "Artifact",
    "run_preflight", "PreflightReport", "Finding",
    # render
    "render_script", "shell_quote",
    # CLI
    "main",
]


##############################################################################
# Errors, constants and shared helpers
##############################################################################

EXIT_OK = 0
EXIT_FAILURE = 1      # something failed while running: a tool, the job, preflight
EXIT_USAGE = 2        # invalid spec or command-line usage
EXIT_INTERRUPTED = 130

DEFAULT_COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
METADATA_DIR_NAME = ".hpc-compose"
JOB_MOUNT = "/hpc-compose/job"
RESUME_MOUNT = "/hpc-compose/resume"
RUNTIMES = ("pyxis", "host")
DEFAULT_RUNTIME = "pyxis"
# Cache keys carry this instead of the tool's release version: bump it only when the artifact layout
# or the key recipe changes, so that upgrading hpc-compose does not re-import every image.
CACHE_FORMAT_VERSION = 1


class HpcComposeError(Exception):
    """Base of every error the tool reports to the user (never shown as a traceback)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message, hint=None):
        Exception.__init__(self, message)
        self.message = message
        self.hint = hint

    def render(self):
        """The user-facing text: the message, then the hint on its own line."""
        text = self.message
        if self.hint:
            text += "\n  hint: " + self.hint
        return text

    def __str__(self):
        return self.render()


class UsageError(HpcComposeError):
    """A command-line mistake (bad flag combination, missing file...)."""

    exit_code = EXIT_USAGE


class LocatedError(HpcComposeError):
    """An error that points into a file: ``file:line:column: key.path: message``."""

    exit_code = EXIT_USAGE

    def __init__(self, message, file=None, line=None, column=None, path=None, hint=None):
        HpcComposeError.__init__(self, message, hint)
        self.file = file
        self.line = line
        self.column = column
        self.path = path

    def location(self):
        """``file:line:column`` with whatever parts are known."""
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def render(self):
        text = self.location() + ": "
        if self.path:
            text += self.path + ": "
        text += self.message
        if self.hint:
            text += "\n  hint: " + self.hint
        return text


class YamlError(LocatedError):
    """The YAML text is malformed or uses something outside the supported subset."""


class SpecError(LocatedError):
    """The compose file is valid YAML but not a valid hpc-compose spec."""


class ToolError(HpcComposeError):
    """An external tool (enroot, sbatch, squeue...) was missing or failed."""


class JobFailed(HpcComposeError):
    """The submitted job (or a watched run) ended unsuccessfully."""


def shell_quote(value):
    """Quote ``value`` as one bash word; the only way a value reaches a generated script."""
    value = str(value)
    if "\0" in value:
        raise HpcComposeError("a value contains a NUL byte, which no shell can carry: %r" % value)
    if value and _SAFE_SHELL_CHARS.issuperset(value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


_SAFE_SHELL_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./-_")


def write_file_atomic(path, data, mode=0o644):
    """Write ``data`` (str or bytes) to ``path`` via a temporary file and a rename."""
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path, obj, mode=0o644):
    """Write ``obj`` as pretty, key-sorted JSON to ``path`` atomically."""
    write_file_atomic(path, to_json(obj) + "\n", mode)


def to_json(obj):
    """The one JSON rendering the tool prints and stores (indented, sorted keys, UTF-8)."""
    import json
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)


def read_json(path):
    """Parse a JSON file; ``None`` when it is missing or unreadable (tracked files are optional)."""
    import json
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


class FileLock(object):
    """An exclusive ``flock`` on ``path`` (created if needed), used as a context manager."""

    def __init__(self, path):
        self.path = path
        self.handle = None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        import fcntl
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
        return False


def run_command(argv, env=None, cwd=None, timeout=None, capture=True, input_text=None):
    """Run one external command; every tool wrapper goes through here.

    Returns ``subprocess.CompletedProcess`` (text mode). A missing executable raises ``ToolError``
    naming it; a non-zero exit is the caller's to judge.
    """
    import subprocess
    kwargs = {"universal_newlines": True, "cwd": cwd, "env": env, "timeout": timeout}
    if capture:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    if input_text is not None:
        kwargs["input"] = input_text
    try:
        return subprocess.run(list(argv), **kwargs)
    except FileNotFoundError:
        raise ToolError("required binary '%s' was not found" % argv[0],
                        hint="install it, load its module, or pass its path with the matching "
                             "--*-bin option")
    except PermissionError:
        raise ToolError("'%s' is not executable" % argv[0])
    except subprocess.TimeoutExpired:
        raise ToolError("'%s' did not answer within %s seconds" % (" ".join(argv), timeout))


def find_executable(name):
    """Absolute path of ``name`` (a bare name looked up on PATH, or a path); ``None`` if absent."""
    import shutil
    if os.sep in name:
        return os.path.abspath(name) if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name)


def warn(message):
    """Print a warning line to stderr (never to stdout, which may carry JSON)."""
    sys.stderr.write("warning: %s\n" % message)


##############################################################################
# YAML reader
##############################################################################
# OWNER: YAML helper. Contract (others rely on it):
#   parse_yaml(text) -> plain dict/list/str/int/float/bool/None
#   load_yaml(text, filename=None) -> YamlDocument(data, marks)
#   marks: dict mapping a path tuple (mapping keys as str, sequence indexes as int; () is the root)
#          to Mark(line, column, text): 1-based position of that node's value, and for plain
#          scalars the exact source text (so `1.10` and `true` can be kept as written); None otherwise.
#   key_marks: marks for the KEY token of each mapping entry, keyed by the entry's path tuple
#          (so an "unknown key" error can point at the key itself).
#   Errors raise YamlError(message, file, line, column).


class Mark(NamedTuple):
    line: int
    column: int
    text: object = None


class YamlDocument(NamedTuple):
    data: object
    marks: dict
    key_marks: dict


def parse_yaml(text):
    """Parse YAML text into plain Python values (dict, list, str, int, float, bool, None)."""
    return load_yaml(text).data


def load_yaml(text, filename=None):
    """Parse YAML text, keeping source positions: returns a ``YamlDocument``."""
    raise NotImplementedError("YAML reader not written yet")


##############################################################################
# Interpolation and .env
##############################################################################
# OWNER: spec helper. Contract:
#   load_dotenv(path) -> dict (missing file -> {}; unreadable/malformed -> SpecError with file+line)
#   interpolate(value, variables, path=None) -> str   ($VAR ${VAR} ${VAR:-d} ${VAR-d} $$; missing
#          variable without default -> SpecError naming the variable and the key path)


def load_dotenv(path):
    """Read a ``.env`` file into a dict (empty when the file does not exist)."""
    raise NotImplementedError


def interpolate(value, variables, path=None):
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` in ``value``."""
    raise NotImplementedError


##############################################################################
# Spec: the validated compose model
##############################################################################
# OWNER: spec helper. load_spec(path, environ=None) -> ComposeSpec. Everything here is validated,
# interpolated and normalized in shape (environment as ordered pairs, depends_on as pairs, healthcheck
# folded into readiness, failure-policy defaults applied), but paths are not resolved yet (planner).
# Records are immutable; tuples, never lists; mappings kept as tuples of pairs in declared order.


class ReadinessSpec(NamedTuple):
    type: str                      # sleep | tcp | log | http
    seconds: object = None         # sleep
    host: object = None            # tcp (default 127.0.0.1)
    port: object = None            # tcp
    pattern: object = None         # log (a literal substring of the service log)
    url: object = None             # http
    status_code: object = None     # http (default 200)
    timeout_seconds: object = None # tcp/log/http (default 60)


class FailurePolicy(NamedTuple):
    mode: str = "fail_job"         # fail_job | ignore | restart_on_failure
    max_restarts: object = None    # restart_on_failure only (default 3)
    backoff_seconds: object = None # restart_on_failure only (default 5)


class PrepareSpec(NamedTuple):
    commands: tuple
    mounts: tuple = ()             # raw "host:container[:opts]" strings, interpolated, unresolved
    env: tuple = ()                # ((key, value), ...)
    root: bool = True


class ServiceSlurmSpec(NamedTuple):
    nodes: object = None
    ntasks: object = None
    ntasks_per_node: object = None
    cpus_per_task: object = None
    gpus: object = None
    gres: object = None
    extra_srun_args: tuple = ()
    failure_policy: FailurePolicy = FailurePolicy()
    runtime: object = None         # per-service override of x-slurm.runtime (None = inherit)


class ServiceSpec(NamedTuple):
    name: str
    image: object                  # str, or None (allowed only with the host runtime)
    command: object = None         # None | str (shell form) | tuple of str (exec form)
    entrypoint: object = None      # same forms as command
    environment: tuple = ()        # ((key, value), ...) in declared order (map form: file order)
    volumes: tuple = ()            # raw "host:container[:opts]" strings, interpolated, unresolved
    working_dir: object = None
    depends_on: tuple = ()         # ((service, condition), ...) condition: service_started|service_healthy
    readiness: object = None       # ReadinessSpec or None (healthcheck already folded in)
    slurm: ServiceSlurmSpec = ServiceSlurmSpec()
    prepare: object = None         # PrepareSpec or None (x-enroot.prepare)
    runtime: str = DEFAULT_RUNTIME # resolved: service x-slurm.runtime, else top-level, else pyxis
    line: object = None            # line of the service's key in the compose file


class MetricsSpec(NamedTuple):
    enabled: bool = True
    interval_seconds: int = 5
    collectors: tuple = ("gpu", "slurm")


class ArtifactsSpec(NamedTuple):
    export_dir: str
    collect: str = "always"        # always | on_success | on_failure
    paths: tuple = ()              # the implicit "default" bundle
    bundles: tuple = ()            # ((name, (path, ...)), ...)


class ResumeSpec(NamedTuple):
    path: str


class SlurmSpec(NamedTuple):
    job_name: object = None
    partition: object = None
    account: object = None
    qos: object = None
    time: object = None
    nodes: object = None
    ntasks: object = None
    ntasks_per_node: object = None
    cpus_per_task: object = None
    mem: object = None
    gres: object = None
    gpus: object = None
    constraint: object = None
    output: object = None
    error: object = None
    chdir: object = None
    cache_dir: object = None       # interpolated string, unresolved (planner resolves)
    metrics: object = None         # MetricsSpec or None
    artifacts: object = None       # ArtifactsSpec or None
    resume: object = None          # ResumeSpec or None
    setup: tuple = ()
    submit_args: tuple = ()
    runtime: str = DEFAULT_RUNTIME # hpc-compose extension: pyxis | host


class ComposeSpec(NamedTuple):
    path: str                      # absolute path of the compose file
    project_dir: str               # its directory: relative paths, .env, .hpc-compose/ live here
    name: object                   # top-level name or None
    version: object
    slurm: SlurmSpec
    services: tuple                # (ServiceSpec, ...) in file order
    warnings: tuple = ()           # human-readable warnings (e.g. misspelt x- keys)


def load_spec(path, environ=None):
    """Read, interpolate and validate a compose file; returns a ``ComposeSpec``."""
    raise NotImplementedError


##############################################################################
# Planner: spec -> deterministic normalized plan
##############################################################################
# OWNER: spec helper. build_plan(spec, environ=None) -> Plan. Pure apart from reading the
# environment for $HOME; no file system checks (those are preflight's).


class ImageRef(NamedTuple):
    kind: str                      # remote | local | none (host runtime without an image)
    reference: str                 # normalized: docker://redis:7, podman://x, or absolute .sqsh path
    registry: object = None        # registry host for remote docker:// refs (docker.io for Hub)
    original: object = None        # what the user wrote


class Execution(NamedTuple):
    form: str                      # default (image entrypoint+cmd) | shell | exec
    argv: tuple = ()               # exec form: the full argv (entrypoint items + command items)
    script: object = None          # shell form: the string run by /bin/sh -c (entrypoint + " " + command)
    use_image_entrypoint: bool = False  # True when the image ENTRYPOINT must run (no entrypoint key)


class Mount(NamedTuple):
    host: str                      # absolute host path
    container: str
    options: object = None         # e.g. "ro", kept verbatim


class Dependency(NamedTuple):
    name: str
    condition: str                 # service_started | service_healthy


class Placement(NamedTuple):
    mode: str                      # single (1-node job) | primary (helper pinned to primary node) | distributed
    nodes: int = 1
    ntasks: object = None
    ntasks_per_node: object = None


class PreparePlan(NamedTuple):
    commands: tuple
    mounts: tuple = ()             # (Mount, ...) resolved
    env: tuple = ()                # ((key, value), ...)
    root: bool = True


class ServicePlan(NamedTuple):
    name: str
    token: str                     # filesystem/bash-safe token: log file <token>.log, step name
    runtime: str                   # pyxis | host
    image: ImageRef
    execution: Execution
    working_dir: object
    environment: tuple             # ((key, value), ...) final values the service sees
    mounts: tuple                  # (Mount, ...) user volumes, resolved (implicit job mount NOT included)
    depends_on: tuple              # (Dependency, ...)
    dependents: tuple              # names of services that depend on this one
    readiness: object              # ReadinessSpec or None
    failure_policy: FailurePolicy  # defaults applied (max_restarts/backoff set for restart mode)
    placement: Placement
    cpus_per_task: object = None
    gpus: object = None
    gres: object = None            # when set, gpus is ignored
    extra_srun_args: tuple = ()
    prepare: object = None         # PreparePlan or None


class Plan(NamedTuple):
    spec: ComposeSpec
    compose_file: str
    project_dir: str
    job_name: str                  # x-slurm.job_name, else name, else "hpc-compose"
    cache_dir: str                 # absolute
    nodes: int                     # allocation node count (default 1)
    slurm: SlurmSpec
    services: tuple                # (ServicePlan, ...) in launch (dependency) order
    runtime: str                   # top-level default runtime


def service_token(name):
    """The file-name-safe token for a service: ``[A-Za-z0-9_-]`` kept, anything else ``_xHH_``."""
    raise NotImplementedError


def build_plan(spec, environ=None):
    """Turn a validated spec into the deterministic ``Plan``."""
    raise NotImplementedError


##############################################################################
# Images: enroot import, x-enroot.prepare, the shared cache
##############################################################################
# OWNER: images helper. Contract:
#   build_runtime_plan(plan) -> RuntimePlan: decides, for every service, which artifact the
#       container starts from (pure apart from cheap stats of local images and reading manifests).
#   prepare_images(runtime_plan, options: PrepareOptions, progress=print-like callable or None)
#       -> tuple of PrepareResult (one per service); raises ToolError on enroot failures.


class Artifact(NamedTuple):
    kind: str                      # base | prepared
    path: str                      # absolute path of the .sqsh in the cache
    manifest_path: str             # path + ".json"
    cache_key: str                 # full sha256 hex
    source: str                    # the image reference (or local path) it is built from


class ServiceImage(NamedTuple):
    service: str
    container_image: object        # the value for --container-image (None for host runtime)
    base: object = None            # Artifact for an imported remote image, else None
    prepared: object = None        # Artifact for an x-enroot.prepare image, else None
    local_path: object = None      # a user-provided local .sqsh/.squashfs, used in place
    rebuild_every_time: bool = False  # prepare.mounts present


class RuntimePlan(NamedTuple):
    plan: Plan
    images: tuple                  # (ServiceImage, ...) aligned with plan.services
    cache_dir: str


class PrepareOptions(NamedTuple):
    enroot_bin: str = "enroot"
    force: bool = False            # prepare --force / submit --force-rebuild
    keep_failed: bool = False      # --keep-failed-prep


class PrepareResult(NamedTuple):
    service: str
    base_action: object = None     # None | present | reused | built
    runtime_action: object = None  # present | reused | built
    note: object = None


def build_runtime_plan(plan):
    """Attach image artifacts (cache paths and keys) to every service of ``plan``."""
    raise NotImplementedError


def prepare_images(runtime_plan, options=PrepareOptions(), progress=None):
    """Import and prepare every image the plan needs into the shared cache."""
    raise NotImplementedError


##############################################################################
# Preflight: login-node checks before a submission
##############################################################################
# OWNER: images helper. Contract:
#   run_preflight(runtime_plan, options: PreflightOptions) -> PreflightReport


class Finding(NamedTuple):
    level: str                     # ok | warn | error
    check: str                     # short id, e.g. "binary.srun", "cache_dir.policy"
    message: str
    remediation: object = None


class PreflightOptions(NamedTuple):
    enroot_bin: str = "enroot"
    srun_bin: str = "srun"
    sbatch_bin: str = "sbatch"
    skip_prepare: bool = False


class PreflightReport(NamedTuple):
    findings: tuple

    @property
    def errors(self):
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self):
        return tuple(f for f in self.findings if f.level == "warn")


def run_preflight(runtime_plan, options=PreflightOptions()):
    """Check that this login node can prepare and submit ``runtime_plan``."""
    raise NotImplementedError


##############################################################################
# Render: the batch script
##############################################################################
# OWNER: render helper. Contract:
#   render_script(runtime_plan) -> str   (the complete sbatch script)
#   Templates are string.Template constants named *_TEMPLATE; every value goes through shell_quote.


def render_script(runtime_plan):
    """Render the complete, self-contained batch script for ``runtime_plan``."""
    raise NotImplementedError


##############################################################################
# Job tracking: scheduler, logs, stats, artifacts
##############################################################################
# OWNER: tracking helper. Thin wrappers for sbatch, squeue, sacct, sstat, scancel; the tracked
# metadata under <compose dir>/.hpc-compose/; status, logs, watch, stats, artifacts, clean.


##############################################################################
# Init templates: the shipped examples
##############################################################################
# OWNER: packaging helper. The examples/ folder is shipped inside the .pyz; init reads it from the
# zip (or from examples/ beside this file in a checkout).


##############################################################################
# CLI
##############################################################################
# The parser is assembled from one ``_add_<command>_parser(subparsers)`` function per command; each
# sets ``handler=cmd_<command>`` and each handler takes the parsed ``args`` and returns an exit code.
# Shared argument helpers and output helpers live here; the command handlers follow, grouped by area.

_EPILOG = """examples:
  hpc-compose submit --watch -f compose.yaml     normal run: check, prepare, submit, follow
  hpc-compose validate -f compose.yaml           check the spec
  hpc-compose inspect --verbose -f compose.yaml  show the normalized plan
  hpc-compose init --template minimal-batch --name my-app --output compose.yaml

exit codes: 0 success, 1 failed while running, 2 invalid spec or usage, 130 interrupted
"""


class _ArgumentParser(object):
    """Factory for argparse parsers that report usage errors as ``UsageError`` (exit code 2)."""

    @staticmethod
    def create(**kwargs):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise UsageError("%s: %s" % (self.prog, message),
                                 hint="run '%s --help' for usage" % self.prog)

        return Parser(**kwargs)


def build_parser():
    """The full argparse parser for the ``hpc-compose`` command."""
    import argparse
    parser = _ArgumentParser.create(
        prog="hpc-compose",
        description="Run a Compose-like application as one Slurm batch job (Pyxis/Enroot or host).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="hpc-compose " + __version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=type(parser))
    for add in _command_adders():
        add(subparsers)
    return parser


def _command_adders():
    # Order here is the order of `hpc-compose --help`: authoring, the run, tracking, maintenance.
    return (
        _add_validate_parser, _add_inspect_parser, _add_config_parser, _add_render_parser,
        _add_preflight_parser, _add_prepare_parser, _add_submit_parser, _add_up_parser,
        _add_status_parser, _add_ps_parser, _add_logs_parser, _add_stats_parser,
        _add_artifacts_parser, _add_cancel_parser, _add_down_parser, _add_clean_parser,
        _add_cache_parser, _add_init_parser, _add_completions_parser,
    )


def add_command(subparsers, name, handler, help_text, examples=(), aliases_note=None):
    """Add one subcommand with a help line and an examples epilog; returns its parser."""
    import argparse
    epilog = None
    if examples:
        epilog = "examples:\n" + "\n".join("  " + line for line in examples)
    description = help_text
    if aliases_note:
        description += "\n\n" + aliases_note
    parser = subparsers.add_parser(name, help=help_text, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def add_file_argument(parser, required=False):
    """``-f/--file``: the compose file (default: compose.yaml, then Docker Compose's other names)."""
    parser.add_argument("-f", "--file", dest="file", metavar="FILE", required=required,
                        help="compose file (default: %s in the current directory)"
                             % " / ".join(DEFAULT_COMPOSE_FILES))


def add_format_argument(parser, choices=("text", "json")):
    """``--format`` plus the ``--json`` compatibility alias."""
    parser.add_argument("--format", dest="format", choices=choices, default=None,
                        help="output format (default: text)")
    parser.add_argument("--json", dest="json_alias", action="store_true",
                        help="alias for --format json")


def output_format(args):
    """The effective output format of a command that takes ``add_format_argument``."""
    chosen = getattr(args, "format", None)
    if getattr(args, "json_alias", False):
        if chosen not in (None, "json"):
            raise UsageError("--json conflicts with --format %s" % chosen)
        return "json"
    return chosen or "text"


def resolve_compose_file(args):
    """The absolute compose file path from ``-f``, or the first default name present here."""
    given = getattr(args, "file", None)
    if given:
        path = os.path.abspath(os.path.expanduser(given))
        if os.path.isdir(path):
            raise UsageError("'%s' is a directory, not a compose file" % given,
                             hint="pass the YAML file itself, e.g. -f %s"
                                  % os.path.join(given, "compose.yaml"))
        if not os.path.exists(path):
            raise UsageError("compose file '%s' does not exist" % given,
                             hint="check the path, or create one with 'hpc-compose init'")
        return path
    for name in DEFAULT_COMPOSE_FILES:
        if os.path.isfile(name):
            return os.path.abspath(name)
    raise UsageError("no compose file found in %s (looked for %s)"
                     % (os.getcwd(), ", ".join(DEFAULT_COMPOSE_FILES)),
                     hint="pass one with -f FILE, or create one with 'hpc-compose init'")


def load_plan_from_args(args):
    """Load the spec named by ``args`` and build its plan: ``(spec, plan)``."""
    spec = load_spec(resolve_compose_file(args))
    for message in spec.warnings:
        warn(message)
    return spec, build_plan(spec)


def print_json(obj):
    """Print ``obj`` as the tool's JSON to stdout."""
    sys.stdout.write(to_json(obj) + "\n")


def _add_completions_parser(subparsers):
    parser = add_command(subparsers, "completions", cmd_completions,
                         "print a shell completion script",
                         ["hpc-compose completions bash > ~/.local/share/bash-completion/completions/hpc-compose",
                          "hpc-compose completions zsh > ~/.zfunc/_hpc-compose",
                          "hpc-compose completions fish > ~/.config/fish/completions/hpc-compose.fish"])
    parser.add_argument("shell", choices=("bash", "zsh", "fish"))


def _completion_table():
    """``{command: [options...]}`` read from the parser itself, so completions never drift."""
    import argparse
    parser = build_parser()
    table = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options = []
                for sub_action in sub._actions:
                    options.extend(o for o in sub_action.option_strings if o.startswith("--"))
                    if isinstance(sub_action, argparse._SubParsersAction):
                        options.extend(sorted(sub_action.choices))
                    elif not sub_action.option_strings and sub_action.choices:
                        options.extend(sub_action.choices)
                table[name] = sorted(set(options))
    return table


_BASH_COMPLETION_TEMPLATE = """# bash completion for hpc-compose (generated by 'hpc-compose completions bash')
_hpc_compose() {
    local cur command
    cur="$${COMP_WORDS[COMP_CWORD]}"
    command="$${COMP_WORDS[1]}"
    if [ "$$COMP_CWORD" -eq 1 ]; then
        mapfile -t COMPREPLY < <(compgen -W "$commands --help --version" -- "$$cur")
        return
    fi
    case "$$command" in
$cases
    esac
    case "$${COMP_WORDS[COMP_CWORD-1]}" in
        -f|--file|--output|--script-out) mapfile -t COMPREPLY < <(compgen -f -- "$$cur") ;;
    esac
}
complete -F _hpc_compose hpc-compose
"""


def cmd_completions(args):
    """Print a completion script for bash, zsh or fish."""
    from string import Template
    table = _completion_table()
    commands = sorted(table)
    if args.shell == "bash":
        cases = "\n".join(
            '        %s) mapfile -t COMPREPLY < <(compgen -W "%s" -- "$cur"); return ;;'
            % (name, " ".join(table[name])) for name in commands)
        sys.stdout.write(Template(_BASH_COMPLETION_TEMPLATE).substitute(
            commands=" ".join(commands), cases=cases))
    elif args.shell == "zsh":
        lines = ["#compdef hpc-compose", "# zsh completion for hpc-compose",
                 "_hpc_compose() {", "  local -a commands", "  commands=(%s)" % " ".join(commands),
                 "  if (( CURRENT == 2 )); then", "    compadd -- $commands", "    return", "  fi",
                 "  case ${words[2]} in"]
        for name in commands:
            lines.append("    %s) compadd -- %s ;;" % (name, " ".join(table[name])))
        lines += ["  esac", "  _files", "}", '_hpc_compose "$@"']
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        lines = ["# fish completion for hpc-compose",
                 "complete -c hpc-compose -f -n '__fish_use_subcommand' -a '%s'" % " ".join(commands)]
        for name in commands:
            for option in table[name]:
                if option.startswith("--"):
                    lines.append("complete -c hpc-compose -n '__fish_seen_subcommand_from %s' -l %s"
                                 % (name, option[2:]))
                else:
                    lines.append("complete -c hpc-compose -f -n '__fish_seen_subcommand_from %s' -a %s"
                                 % (name, option))
        sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# CLI: validate, inspect, config commands (OWNER: spec helper)

def _add_validate_parser(subparsers):
    add_command(subparsers, "validate", _not_written_yet, "(not written yet)")

def _add_inspect_parser(subparsers):
    add_command(subparsers, "inspect", _not_written_yet, "(not written yet)")

def _add_config_parser(subparsers):
    add_command(subparsers, "config", _not_written_yet, "(not written yet)")


# CLI: render commands (OWNER: render helper)

def _add_render_parser(subparsers):
    add_command(subparsers, "render", _not_written_yet, "(not written yet)")


# CLI: submit, up, status, ps, logs, stats, artifacts, cancel, down, clean commands (OWNER: tracking helper)

def _add_submit_parser(subparsers):
    add_command(subparsers, "submit", _not_written_yet, "(not written yet)")

def _add_up_parser(subparsers):
    add_command(subparsers, "up", _not_written_yet, "(not written yet)")

def _add_status_parser(subparsers):
    add_command(subparsers, "status", _not_written_yet, "(not written yet)")

def _add_ps_parser(subparsers):
    add_command(subparsers, "ps", _not_written_yet, "(not written yet)")

def _add_logs_parser(subparsers):
    add_command(subparsers, "logs", _not_written_yet, "(not written yet)")

def _add_stats_parser(subparsers):
    add_command(subparsers, "stats", _not_written_yet, "(not written yet)")

def _add_artifacts_parser(subparsers):
    add_command(subparsers, "artifacts", _not_written_yet, "(not written yet)")

def _add_cancel_parser(subparsers):
    add_command(subparsers, "cancel", _not_written_yet, "(not written yet)")

def _add_down_parser(subparsers):
    add_command(subparsers, "down", _not_written_yet, "(not written yet)")

def _add_clean_parser(subparsers):
    add_command(subparsers, "clean", _not_written_yet, "(not written yet)")


# CLI: preflight, prepare, cache commands (OWNER: images helper)

def _add_preflight_parser(subparsers):
    add_command(subparsers, "preflight", _not_written_yet, "(not written yet)")

def _add_prepare_parser(subparsers):
    add_command(subparsers, "prepare", _not_written_yet, "(not written yet)")

def _add_cache_parser(subparsers):
    add_command(subparsers, "cache", _not_written_yet, "(not written yet)")


# CLI: init commands (OWNER: packaging helper)

def _add_init_parser(subparsers):
    add_command(subparsers, "init", _not_written_yet, "(not written yet)")




def _not_written_yet(args):
    raise HpcComposeError("'%s' is not implemented yet" % args.command)


##############################################################################
# main
##############################################################################

def main(argv=None):
    """Run the hpc-compose command line; returns the process exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return EXIT_USAGE
        return args.handler(args)
    except HpcComposeError as exc:
        sys.stderr.write("error: %s\n" % exc.render())
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `hpc-compose logs | head`: the reader left; that is not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
