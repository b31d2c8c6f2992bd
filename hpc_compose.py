#!/usr/bin/env python3
"""hpc-compose: run a Compose-like application as one Slurm batch job.

A ``compose.yaml`` (a model server, a Redis, a trainer, a client...) becomes ONE Slurm batch job in
which every service runs as an ``srun`` step, inside a container through Pyxis and Enroot (or
directly on the node with the ``host`` runtime), started in dependency order behind readiness
checks, supervised with failure policies, and tracked afterwards (status, logs, stats, artifacts).

The whole tool is this one module, Python standard library only, for CPython 3.6 to 3.13. Run it as
``python3 hpc_compose.py COMMAND ...``, as the zipapp ``python3 hpc-compose.pyz COMMAND ...``, or
import it (importing has no side effects).

Contents, in pipeline order (each section starts with a banner of ``#`` lines, and uses only what
stands above it, as tests/test_layout.py checks):

1. Errors, constants and shared helpers -- exit codes, the error family, atomic writes, locks,
   the one shell-quoting helper, the subprocess runner every tool wrapper goes through.
2. YAML reader -- ``parse_yaml`` / ``parse_yaml_document``: the YAML 1.2 subset compose files
   use; and the YAML writer ``config`` prints with.
3. Interpolation and .env -- ``$VAR`` / ``${VAR:-default}`` / ``$$`` and the ``.env`` file.
4. Spec -- the validated compose model (``ComposeSpec``) and ``load_spec``.
5. Planner -- ``build_plan``: dependency order, images, mounts, environment, placement.
6. Images -- enroot import / prepare / export, the shared cache and its manifests.
7. Preflight -- login-node checks before a submission, the scheduler's answer, and lint.
8. Render -- the batch script (``string.Template`` constants named ``*_TEMPLATE``).
9. Job tracking -- sbatch, squeue, sacct, sstat, scancel; status, logs, stats, the report
   (timeline and charts: text, SVG, HTML), artifacts.
10. Init templates -- the shipped examples offered by ``init``.
11. Migrate -- ``migrate_compose``: a docker-compose.yml (and its Dockerfiles) rewritten as a spec.
12. CLI -- argparse commands, one handler per command.
13. main -- ``main(argv=None)``, the entry point.

Public API (for people who vendor this file): exactly the names in ``__all__``; every other
top-level name starts with an underscore and may change without notice. In pipeline order:

- errors: ``HpcComposeError`` (``.format()`` is the user-facing text) and its subclasses
  ``UsageError``, ``LocatedError`` (``YamlError``, ``SpecError``, and ``SpecErrors`` holding
  every independent ``SpecError`` of a file), ``ToolError``, ``JobFailed``;
- YAML: ``parse_yaml(text)`` -> plain values, ``parse_yaml_document(text, filename)`` ->
  ``YamlDocument`` with a ``Mark`` per value;
- interpolation: ``interpolate``, ``parse_dotenv(text)``, ``load_dotenv(path)``;
- spec: ``load_spec(path or [paths merged in order], environ, env_files, profiles,
  services)`` -> ``ComposeSpec`` (records ``SlurmSpec``, ``ServiceSpec``, ``ServiceSlurmSpec``,
  ``ModuleSpec``, ``ReadinessSpec``, ``FailurePolicy``, ``PrepareSpec``, ``MetricsSpec``,
  ``ArtifactsSpec``, ``ResumeSpec``, ``SecretSpec``, ``ServiceSecret``, ``SignalSpec``,
  ``ServiceSignalSpec``, ``SweepSpec`` of ``SweepTask``),
  ``spec_to_dict``;
- planner: ``build_plan(spec)`` -> ``Plan`` (records ``ServicePlan``, ``ImageRef``, ``Execution``,
  ``Mount``, ``Dependency``, ``Placement``, ``PreparePlan``), ``plan_to_dict``, ``service_token``,
  ``resolve_host_path``, ``normalize_image``;
- images and preflight: ``build_runtime_plan`` -> ``RuntimePlan`` (``ServiceImage``,
  ``Artifact``), ``prepare_images`` (``PrepareOptions`` -> ``PrepareResult``), ``list_cache``,
  ``inspect_cache``, ``enroot_uri``, ``run_preflight`` (``PreflightOptions`` ->
  ``PreflightReport`` of ``Finding``);
- render: ``render_script(runtime_plan)`` and its pieces ``render_metrics_block``,
  ``render_artifacts_block``, ``service_srun_argv``, ``service_environment``, ``shell_quote``;
- tracking: ``watch_job`` -> ``WatchOutcome``, ``SchedulerState``, ``prune_cache``; init:
  ``TEMPLATE_NAMES``, ``list_templates``, ``load_template`` -> ``InitTemplate``,
  ``customize_template``; migrate: ``migrate_compose(text)`` (``MigrateOptions`` ->
  ``MigrateResult``); CLI: ``build_parser``, ``main(argv=None)``; ``__version__``.

One verb, one meaning: ``load_*`` reads a path, ``parse_*`` reads text, ``render_*`` makes the
batch script (or a piece of it), ``format_*`` makes text to print or store: human text, or the
machine format its name says (``_format_json``, ``_format_yaml``, ``_format_stats_csv``,
``_format_stats_jsonl``); ``*_to_dict`` (``*_to_list``) makes JSON-ready data. Other functions
are verbs for what they do (``build_plan``, ``prepare_images``); a pure query may be named for what
it returns (``_job_directory``, ``_mount_text``); records are nouns. How the file is organised and
where to add things: docs/contributing.md.

Exit codes (stable): 0 success; 1 something failed while running (a tool, the job, preflight);
2 invalid spec or usage; 130 interrupted.
"""

import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

# Heavy or rarely used modules (json, subprocess, hashlib, tempfile, shutil, argparse...) are imported
# inside the functions that use them, so that start-up stays close to a bare interpreter.

__version__ = "0.1.0"
# `git describe` of the tree a release was built from; zipapp.mk fills it in the archived copy.
_BUILD_DESCRIPTION = ""

__all__ = [
    "__version__",
    # errors
    "HpcComposeError", "UsageError", "LocatedError", "YamlError", "SpecError", "SpecErrors",
    "ToolError", "JobFailed",
    # YAML
    "parse_yaml", "parse_yaml_document", "YamlDocument", "Mark",
    # interpolation
    "interpolate", "parse_dotenv", "load_dotenv",
    # spec
    "load_spec", "ComposeSpec", "SlurmSpec", "ServiceSpec", "ServiceSlurmSpec", "ModuleSpec",
    "ReadinessSpec",
    "SecretSpec", "ServiceSecret",
    "FailurePolicy", "PrepareSpec", "MetricsSpec", "ArtifactsSpec", "ResumeSpec",
    "SignalSpec", "ServiceSignalSpec", "SweepSpec", "SweepTask",
    # planner
    "build_plan", "Plan", "ServicePlan", "ImageRef", "Execution", "Mount", "Dependency", "Placement",
    "PreparePlan", "service_token", "plan_to_dict", "spec_to_dict", "resolve_host_path",
    "normalize_image",
    # images and preflight
    "build_runtime_plan", "prepare_images", "RuntimePlan", "ServiceImage", "Artifact",
    "PrepareOptions", "PrepareResult", "enroot_uri", "list_cache", "inspect_cache",
    "run_preflight", "PreflightOptions", "PreflightReport", "Finding",
    # render
    "render_script", "service_srun_argv", "service_environment", "shell_quote", "render_metrics_block", "render_artifacts_block",
    # job tracking
    "watch_job", "WatchOutcome", "SchedulerState", "prune_cache",
    # init templates
    "TEMPLATE_NAMES", "list_templates", "load_template", "InitTemplate", "customize_template",
    # migrate
    "migrate_compose", "MigrateOptions", "MigrateResult",
    # CLI
    "build_parser", "main",
]


##############################################################################
# Errors, constants and shared helpers
##############################################################################

_EXIT_OK = 0
_EXIT_FAILURE = 1      # something failed while running: a tool, the job, preflight
_EXIT_USAGE = 2        # invalid spec or command-line usage
_EXIT_INTERRUPTED = 130

_DEFAULT_COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
_DEFAULT_OVERRIDE_FILES = ("compose.override.yml", "compose.override.yaml",
                           "docker-compose.override.yml", "docker-compose.override.yaml")
_METADATA_DIR_NAME = ".hpc-compose"
_JOB_MOUNT = "/hpc-compose/job"
_RESUME_MOUNT = "/hpc-compose/resume"
_SECRETS_MOUNT = "/run/secrets"      # Compose's convention: each secret is a file here
_SECRETS_DIR_NAME = "secrets"        # <job dir>/secrets/<service token>/<target>: the owner-only copies
_SECRETS_DIR_VARIABLE = "HPC_COMPOSE_SECRETS_DIR"
# Modes of what hpc-compose writes. Owner-only by default: the script, the tracking records and the
# job directory can hold environment values (where people do put tokens). share_with_group opens the
# job directory and the service logs to the group, never the script, the records or the secrets.
_PRIVATE_FILE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700
_SHARED_DIR_MODE = 0o750
_RUNTIMES = ("pyxis", "apptainer", "singularity", "host")
_DEFAULT_RUNTIME = "pyxis"
# The runtimes whose services run `apptainer exec` (or `singularity exec`, its older name) under srun.
_APPTAINER_RUNTIMES = ("apptainer", "singularity")
# Cache keys carry this instead of the tool's release version: bump it only when the artifact layout
# or the key recipe changes, so that upgrading hpc-compose does not re-import every image.
_CACHE_FORMAT_VERSION = 1
# Comment lines `hpc-compose migrate` writes; load_spec refuses a file that still has a TODO one.
_MIGRATE_NOTE = "# migrate: "
_MIGRATE_TODO = _MIGRATE_NOTE + "TODO "

# Contracts between this module and the batch script it writes (docs/execution-model.md): the files
# the script leaves in the job directory and the schema version of each JSON file either side writes.
_STATE_FILE_NAME = "state.json"          # <job dir>/state.json, written by the batch script
_STATE_SCHEMA_VERSION = 2                # state.json (2: "signals", status "requeued")
_TRACKING_SCHEMA_VERSION = 2             # .hpc-compose/jobs/<id>.json and latest.json (2: chains, arrays)
_RESUME_LATEST_SCHEMA_VERSION = 1        # <resume dir>/_hpc-compose/latest.json
_METRICS_META_SCHEMA_VERSION = 1         # <job dir>/metrics/meta.json
_ARTIFACTS_MANIFEST_SCHEMA_VERSION = 3   # <job dir>/artifacts/manifest.json
_EXPORT_PROVENANCE_SCHEMA_VERSION = 2    # <export dir>/_hpc-compose/bundles/<bundle>.json
_CONTAINER_NAME_PREFIX = "hpc-compose_"   # + job id + "_" + token: a Pyxis service's container (exec)
_LAUNCHER_VARIABLE = "HPC_COMPOSE_LAUNCHER"  # "local": `up --local` outside Slurm runs the script
_LOCAL_JOB_PREFIX = "local-"                  # + UTC time + "-" + pid: the id of such a run
_LOCAL_RUN_VARIABLE = "HPC_COMPOSE_LOCAL_RUN"  # up --local: its job dir, in each process of the run
_LOG_TIMES_SUFFIX = ".times"             # <job dir>/logs/<token>.times: "<epoch ms> <log size>" lines
_TIMELINE_FILE_NAME = "timeline.jsonl"   # <job dir>/timeline.jsonl: one line per state.json write
_PARAMS_FILE_NAME = "params.json"        # <job dir>/params.json: a sweep task's index and parameters


_ERROR_WORD_LIMIT = 200      # characters of one word (a value, a key, a path) an error shows
_ERROR_TEXT_LIMIT = 2000     # characters of one message or hint


def _shorten_error_text(text):
    """``text`` with any huge word, and the whole, cut to an excerpt: a 6 MB value in a file must
    not come back as a 6 MB error."""
    import re
    if text is None or len(text) <= _ERROR_WORD_LIMIT:
        return text
    text = re.sub(r"\S{%d,}" % (_ERROR_WORD_LIMIT + 1), lambda match: "%s... (%d characters)" % (
        match.group(0)[:60], len(match.group(0))), text)
    if len(text) > _ERROR_TEXT_LIMIT:
        text = "%s... (%d characters)" % (text[:_ERROR_TEXT_LIMIT // 2], len(text))
    return text


class _HintedError(Exception):
    """A message and, where it helps, a hint: how to fix it."""

    def __init__(self, message, hint=None):
        message = _shorten_error_text(message)
        Exception.__init__(self, message)
        self.message = message
        self.hint = _shorten_error_text(hint)


class HpcComposeError(_HintedError):
    """Base of every error the tool reports to the user (never shown as a traceback)."""

    exit_code = _EXIT_FAILURE

    def format(self):
        """The user-facing text: the message, then the hint on its own line."""
        text = self.message
        if self.hint:
            text += "\n  hint: " + self.hint
        return text

    def __str__(self):
        return self.format()


class UsageError(HpcComposeError):
    """A command-line mistake (bad flag combination, missing file...)."""

    exit_code = _EXIT_USAGE


class LocatedError(HpcComposeError):
    """An error that points into a file: ``file:line:column: key.path: message``."""

    exit_code = _EXIT_USAGE

    def __init__(self, message, file=None, line=None, column=None, path=None, hint=None):
        HpcComposeError.__init__(self, message, hint)
        self.file = file
        self.line = line
        self.column = column
        self.path = _shorten_error_text(path)

    def location(self):
        """``file:line:column`` with whatever parts are known."""
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def format(self):
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


_MAX_REPORTED_ERRORS = 100   # a file with thousands of mistakes: the first ones, then a count
_MAX_LISTED_SERVICES = 50    # a hint that lists the services shows at most this many names


class SpecErrors(SpecError):
    """Several independent mistakes in the compose file(s), each a located ``SpecError``, sorted
    by position; the attributes of the first one are this error's. ``more`` counts those after
    the first ``_MAX_REPORTED_ERRORS``, which are not kept."""

    def __init__(self, errors, more=0, lead=None):
        first = errors[0]
        SpecError.__init__(self, first.message, file=first.file, line=first.line,
                           column=first.column, path=first.path, hint=first.hint)
        self.errors = tuple(errors)
        self.more = more
        self.lead = lead           # a first line that says what the errors together mean

    def format(self):
        files = sorted(set(error.file for error in self.errors if error.file))
        lines = ([self.lead] if self.lead else []) + [error.format() for error in self.errors]
        if self.more:
            lines.append("and %d more" % self.more)
        count = len(self.errors) + self.more
        return "\n".join(lines + ["%d error%s in %s" % (count, "" if count == 1 else "s",
                                                        ", ".join(files) or "the input")])


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


def _write_file_atomic(path, data, mode=0o644):
    """Write ``data`` (str or bytes) to ``path`` via a temporary file and a rename.

    A path that names a device or a FIFO (``-o /dev/null``, ``-o /dev/stdout``, a named pipe) is
    written through instead: a rename would replace the device itself, which root can do.
    """
    import stat
    import tempfile
    try:
        kind = os.lstat(path).st_mode
    except OSError:
        kind = 0
    if stat.S_ISCHR(kind) or stat.S_ISFIFO(kind):
        with open(path, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        return
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


def _umask_mode(mode=0o666):
    """``mode`` as the user's umask leaves it: what ``open()`` would create (files a user asked
    for, such as ``init``'s, follow the umask; the tool's own records have fixed private modes)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return mode & ~umask


def _write_json_atomic(path, obj, mode=0o644):
    """Write ``obj`` as pretty, key-sorted JSON to ``path`` atomically."""
    _write_file_atomic(path, _format_json(obj) + "\n", mode)


def _format_json(obj):
    """The one JSON rendering the tool prints and stores (indented, sorted keys, UTF-8)."""
    import json
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)


def _load_json(path):
    """Parse a JSON file; ``None`` when it is missing or unreadable (tracked files are optional)."""
    import json
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _open_no_follow(path, flags, mode_text, mode=0o666):
    """``open(path)`` that never goes through a symbolic link someone planted at ``path`` (in a
    shared folder, a link would make us create or truncate a file of their choosing)."""
    import errno
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HpcComposeError("refusing %s: it is a symbolic link (hpc-compose does not follow "
                                  "links where it writes)" % path,
                                  hint="remove the link; whoever made it may be trying to make "
                                       "you write elsewhere")
        raise
    return os.fdopen(fd, mode_text)


def _check_own_directory(path, why):
    """Refuse ``path`` unless it is a real folder (not a symbolic link) owned by this user; ``why``
    ends the one-line message."""
    import stat
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = "belongs to another user (uid %d)" % info.st_uid
    else:
        return
    raise HpcComposeError("refusing %s: it %s; %s" % (path, problem, why),
                          hint="remove or rename it (in a shared folder someone else may have "
                               "made it), then run the command again")


def _set_directory_mode(path, mode):
    """chmod a folder through the folder itself: a link put in its place is not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class _FileLock(object):
    """An exclusive ``flock`` on ``path`` (created if needed), used as a context manager."""

    def __init__(self, path):
        self.path = path
        self.handle = None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            self.handle = _open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a")
        except PermissionError:
            # flock needs no write access: another user's lock file in a group-shared cache still works.
            self.handle = _open_no_follow(self.path, os.O_RDONLY, "r")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        import fcntl
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
        return False


def _run_command(argv, env=None, cwd=None, timeout=None, capture=True, input_text=None):
    """Run one external command; every tool wrapper goes through here.

    Returns ``subprocess.CompletedProcess`` (text mode). A missing executable raises ``ToolError``
    naming it; a non-zero exit is the caller's to judge.
    """
    import subprocess
    # Slurm prints job names and reasons as their owner wrote them: UTF-8 whatever our locale.
    kwargs = {"universal_newlines": True, "encoding": "utf-8", "errors": "replace", "cwd": cwd,
              "env": env, "timeout": timeout}
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
        raise ToolError("'%s' did not answer within %g seconds" % (" ".join(argv), timeout))


def _find_executable(name):
    """Absolute path of ``name`` (a bare name looked up on PATH, or a path); ``None`` if absent."""
    import shutil
    if os.sep in name:
        return os.path.abspath(name) if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name)


def _warn(message):
    """Print a warning line to stderr (never to stdout, which may carry JSON)."""
    sys.stderr.write("warning: %s\n" % message)


def _make_standard_streams_utf8():
    """Make stdout and stderr UTF-8 under the C/POSIX locale, as Python 3.7+ does by itself.

    Python 3.6 writes ASCII there (RHEL 8's system Python in cron, batch jobs, ``ssh host cmd``),
    and a log line or spec value with one accented letter would end in a traceback. Another
    non-UTF-8 locale keeps its encoding, with replacement characters instead of a traceback.
    """
    import codecs
    import io
    for name, errors in (("stdout", "surrogateescape"), ("stderr", "backslashreplace")):
        stream = getattr(sys, name)
        try:
            encoding = codecs.lookup(stream.encoding).name
        except (AttributeError, LookupError, TypeError):
            continue  # not a real console stream (tests, an embedding program)
        if encoding == "utf-8" or not hasattr(stream, "buffer"):
            continue
        if encoding == "ascii":
            encoding = "utf-8"
        else:
            encoding, errors = stream.encoding, (errors if name == "stderr" else "replace")
        stream.flush()
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding=encoding, errors=errors)
        else:
            setattr(sys, name, io.TextIOWrapper(stream.detach(), encoding=encoding, errors=errors,
                                                line_buffering=stream.line_buffering))


##############################################################################
# YAML reader
##############################################################################
# Contract:
#   parse_yaml(text) -> plain dict/list/str/int/float/bool/None
#   parse_yaml_document(text, filename=None) -> YamlDocument(data, marks, key_marks, tags)
#   marks: dict mapping a path tuple (mapping keys as str, sequence indexes as int; () is the root)
#          to Mark(line, column, text): 1-based position of that node's value, and for plain
#          scalars the exact source text (so `1.10` and `true` can be kept as written), else None.
#   key_marks: marks for the KEY token of each mapping entry, keyed by the entry's path tuple
#          (so an "unknown key" error can point at the key itself).
#   Errors raise YamlError(message, file, line, column, hint). ``text`` may be str or UTF-8 bytes.
#
# The subset (docs/yaml-subset.md): one document of block and flow collections, plain / quoted /
# block scalars, comments, anchors, aliases and merge keys, resolved with the YAML 1.2 core schema
# (`yes`, `on`, `00:10:00` stay strings). Tags, complex keys, directives and several documents are
# refused rather than guessed. Values reached through an alias or a merge key are copies, and their
# marks point at where they are defined.
#
# Shape: a line-oriented block layer (indentation decides structure) over a character-level layer
# for scalars and flow collections. Positions are (row, col), 0-based internally, 1-based in marks
# and errors. Hot paths use str.find/lstrip rather than per-character loops or regular expressions.


# A node's place in a document: mapping keys as str, sequence indexes as int; () is the root.
_Path = Tuple[Union[str, int], ...]


class Mark(NamedTuple):
    """Where a node starts (1-based) and, for a plain scalar, its exact source text."""
    line: int
    column: int
    text: Optional[str] = None


_make_mark = tuple.__new__   # Mark(...) without the Python-level __new__ (marks are made per node)


class YamlDocument(NamedTuple):
    """What ``parse_yaml_document`` returns: the values, and the marks of values and of mapping keys."""
    data: object         # any YAML value: dict, list, str, int, float, bool or None
    marks: Dict[_Path, Mark]       # after merging files: ``_FileMark``s from the second file on
    key_marks: Dict[_Path, Mark]
    # path -> "!reset" | "!override" (Compose's merge tags, the only ones read); None: no tags
    tags: Optional[Dict[_Path, str]] = None


_SPACE_TAB = " \t"
_FLOW_INDICATORS = frozenset(",[]{}")
# A ':' or '-' or '?' followed by one of these is an indicator, not the start of a plain scalar.
_FLOW_BREAKS = frozenset(" \t,[]{}")
_ANCHOR_END = frozenset(" \t,[]{}")
_YAML_DIGITS = frozenset("0123456789")
_YAML_OCTAL_DIGITS = frozenset("01234567")
_YAML_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Only plain scalars starting with one of these can resolve to something other than a string.
_RESOLVABLE_START = frozenset("0123456789+-.~nNtTfF")
_RESERVED_START = frozenset("@`")
# First characters after which a key or value needs the general (slower) path.
_SPECIAL_START = frozenset("-?:,[]{}#&*!|>'\"%@` \t")
_YAML_MISSING = object()
_CORE_SCHEMA_WORDS = {
    "~": None, "null": None, "Null": None, "NULL": None,
    "true": True, "True": True, "TRUE": True,
    "false": False, "False": False, "FALSE": False,
    ".inf": float("inf"), ".Inf": float("inf"), ".INF": float("inf"),
    "+.inf": float("inf"), "+.Inf": float("inf"), "+.INF": float("inf"),
    "-.inf": float("-inf"), "-.Inf": float("-inf"), "-.INF": float("-inf"),
    ".nan": float("nan"), ".NaN": float("nan"), ".NAN": float("nan"),
}
_DOUBLE_QUOTED_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
    "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85",
    "_": "\xa0", "L": "\u2028", "P": "\u2029",
}
_HEX_ESCAPE_LENGTHS = {"x": 2, "u": 4, "U": 8}
# Aliases copy what they point at; this caps the number of nodes aliases and merge keys may add,
# so that a "billion laughs" file fails fast instead of eating the login node's memory.
_MAX_ALIAS_NODES = 100000
# Collections nested deeper than this are refused (compose files nest a handful of levels; the
# reader is recursive, so an absurd nesting must not reach Python's recursion limit).
_MAX_NESTING = 100
# Integers with more digits than this are refused (Python refuses to convert much longer ones).
_MAX_INTEGER_DIGITS = 1000
_ROOT_INDENT = -1
_ANCHORED_ALIAS_MESSAGE = "an alias cannot have an anchor: it names a node that already has one"
_ANCHORED_ALIAS_HINT = "write the alias alone ('key: *name'), or anchor the original node"
# Compose's merge tags (used in override files); every other tag is refused.
_MERGE_TAGS = ("!reset", "!override")
_MARKER_INDENT = -2   # "indentation" reported for `---` / `...` lines and the end of the text


def parse_yaml(text):
    """Parse YAML text into plain Python values (dict, list, str, int, float, bool, None)."""
    return parse_yaml_document(text).data


def parse_yaml_document(text, filename=None) -> YamlDocument:
    """Parse YAML text, keeping source positions: returns a ``YamlDocument``."""
    text = _decode_yaml_source(text, filename)
    reader = _YamlReader(text, filename)
    try:
        data = reader.read_document()
    except _IntegerTooLong as exc:
        line, column = _yaml_text_position(text, text.find(exc.args[0]), "\n")
        raise YamlError("an integer with more than %d digits" % _MAX_INTEGER_DIGITS, file=filename,
                        line=line, column=column, hint="quote it if it is meant as text")
    return YamlDocument(data, reader.marks, reader.key_marks, reader.tags)


class _IntegerTooLong(Exception):
    """Raised by _resolve_plain, which does not know where it is; parse_yaml_document adds the place."""


def _decode_yaml_source(text, filename):
    """Text as str without BOM and with LF line ends; binary input is refused with its position."""
    if isinstance(text, (bytes, bytearray)):
        raw = bytes(text)
        if b"\0" in raw:
            line, column = _yaml_text_position(raw, raw.index(b"\0"), b"\n")
            raise YamlError("this is a binary file (it contains NUL bytes), not YAML text",
                            file=filename, line=line, column=column,
                            hint="give the path of the compose YAML file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line, column = _yaml_text_position(raw, exc.start, b"\n")
            raise YamlError("the file is not valid UTF-8 text (byte 0x%02x)" % raw[exc.start],
                            file=filename, line=line, column=column, hint="save it as UTF-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Fast C-level check first; the exact scan only runs for unusual text.
    if not text.replace("\n", "").replace("\t", "").isprintable():
        _check_printable(text, filename)
    return text


def _yaml_text_position(text, index, newline):
    """1-based (line, column) of ``index`` in ``text`` (str or bytes)."""
    line = text.count(newline, 0, index) + 1
    return line, index - (text.rfind(newline, 0, index) + 1) + 1


def _check_printable(text, filename):
    """Refuse characters YAML does not allow in a stream (control characters, NUL...)."""
    for index, char in enumerate(text):
        code = ord(char)
        if code < 0x20 and char not in "\n\t" or 0x7F <= code <= 0x9F and code != 0x85 or \
                0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF):
            line, column = _yaml_text_position(text, index, "\n")
            if char == "\0":
                message = "this is a binary file (it contains NUL bytes), not YAML text"
            else:
                message = "control character U+%04X is not allowed in YAML text" % code
            raise YamlError(message, file=filename, line=line, column=column,
                            hint="give the path of the compose YAML file; write special "
                                 "characters as escapes in a double-quoted string (\"\\x07\")")


def _resolve_plain(text):
    """The YAML 1.2 core-schema value of a plain scalar's text."""
    if not text:
        return None
    if text[0] not in _RESOLVABLE_START:
        return text
    value = _CORE_SCHEMA_WORDS.get(text, _YAML_MISSING)
    if value is not _YAML_MISSING:
        return value
    body = text[1:] if text[0] in "+-" else text
    if not body:
        return text
    if _YAML_DIGITS.issuperset(body):
        if len(body) > _MAX_INTEGER_DIGITS:
            raise _IntegerTooLong(text)
        return int(text)
    if body is text and len(text) > 2 and text[0] == "0":
        if len(text) > _MAX_INTEGER_DIGITS and (text[1] == "x" or text[1] == "o"):
            raise _IntegerTooLong(text)
        if text[1] == "x" and _YAML_HEX_DIGITS.issuperset(text[2:]):
            return int(text[2:], 16)
        if text[1] == "o" and _YAML_OCTAL_DIGITS.issuperset(text[2:]):
            return int(text[2:], 8)
    if _is_core_float(body):
        return float(text)
    return text


def _is_core_float(body):
    """Does ``body`` (sign removed) match ``(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?``?"""
    mantissa, exponent = body, None
    for letter in "eE":
        if letter in body:
            mantissa, _, exponent = body.partition(letter)
            break
    if exponent is not None:
        if exponent[:1] in ("+", "-"):
            exponent = exponent[1:]
        if not exponent or not _YAML_DIGITS.issuperset(exponent):
            return False
    whole, dot, fraction = mantissa.partition(".")
    if whole and not _YAML_DIGITS.issuperset(whole):
        return False
    if fraction and not _YAML_DIGITS.issuperset(fraction):
        return False
    if not whole:
        return bool(dot and fraction)
    return True


def _join_block_scalar(groups, folded, chomping, trailing_blank_lines, final_break):
    """The value of a block scalar from its content lines ``groups`` ((blank lines before,
    text) pairs), with YAML's folding (`>`) and chomping (`-` strip, `+` keep, None clip)."""
    if not groups:
        return "\n" * trailing_blank_lines if chomping == "+" else ""
    chunks = []
    previous = None
    for blank_lines, text in groups:
        if previous is None:
            if blank_lines:
                chunks.append("\n" * blank_lines)
        elif folded and previous[:1] not in (" ", "\t") and text[:1] not in (" ", "\t"):
            # Folding: a single line break between two normal lines becomes a space.
            chunks.append("\n" * blank_lines if blank_lines else " ")
        else:
            chunks.append("\n" * (blank_lines + 1))
        chunks.append(text)
        previous = text
    if chomping != "-" and final_break:
        chunks.append("\n")
        if chomping == "+":
            chunks.append("\n" * trailing_blank_lines)
    return "".join(chunks)


def _copy_yaml_node(value):
    """A deep copy of a parsed collection (alias targets are copied, never shared)."""
    if type(value) is dict:
        return {key: _copy_yaml_node(item) for key, item in value.items()}
    if type(value) is list:
        return [_copy_yaml_node(item) for item in value]
    return value


def _yaml_path_key(key):
    """The path element of a mapping key (non-string keys are str()'d)."""
    return key if type(key) is str else str(key)


def _format_character(char):
    """How to name a character in an error message."""
    if char == "":
        return "the end of the line"
    return repr(char)


class _YamlReader(object):
    """One pass over the lines of one document; fills marks and key_marks as it goes."""

    def __init__(self, text, filename):
        lines = text.split("\n")
        # A final "\n" ends the last line; it does not start an empty one.
        self.final_break = lines[-1] == ""
        if self.final_break:
            lines.pop()
        self.lines = lines
        self.count = len(lines)
        self.filename = filename
        self.marks = {}
        self.key_marks = {}
        self.tags = {}
        self.log = []        # paths in the order their marks were recorded (to re-root aliases)
        self.anchors = {}    # name -> (value, path, first log index, end log index)
        self.alias_row = self.alias_col = 0   # where the alias being expanded is (for errors)
        self.expanded = 0    # nodes added by aliases and merge keys so far
        self.depth = 0       # collections currently open
        self.continuation_indent = 0   # spaces that later lines of a flow/quoted node need

    # -- errors and marks ---------------------------------------------------------------------

    def error(self, message, row, col, hint=None):
        return YamlError(message, file=self.filename, line=row + 1, column=col + 1, hint=hint)

    def enter_collection(self, row, col):
        """Count one more open collection; refuse absurd nesting before Python's stack does."""
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise self.error("collections are nested more than %d levels deep" % _MAX_NESTING,
                             row, col, hint="a compose file never needs that; check the brackets "
                                            "and the indentation")

    def mark(self, path, row, col, text=None):
        """Record the mark of the node at ``path``, logged so that aliases can copy it."""
        self.marks[path] = _make_mark(Mark, (row + 1, col + 1, text))
        self.log.append(path)

    def copy_marks(self, first, end, source, target, skip_root, only_keys=None):
        """Re-root the marks logged in [first, end) from path ``source`` to path ``target``."""
        self.expanded += end - first
        if self.expanded > _MAX_ALIAS_NODES:
            raise YamlError(
                "aliases expand this document by more than %d nodes" % _MAX_ALIAS_NODES,
                file=self.filename, line=self.alias_row + 1, column=self.alias_col + 1,
                hint="this looks like an alias bomb (\"billion laughs\"); a compose file never "
                     "needs that many values")
        marks = self.marks
        key_marks = self.key_marks
        log = self.log
        size = len(source)
        for path in log[first:end]:
            if path[:size] != source:
                continue
            if len(path) == size:
                if skip_root:
                    continue
                new_path = target
            else:
                if only_keys is not None and only_keys.get(path[size]) != source:
                    continue
                new_path = target + path[size:]
            mark = marks.get(path)
            if mark is None:
                continue
            marks[new_path] = mark
            log.append(new_path)
            if len(path) != size:
                key_mark = key_marks.get(path)
                if key_mark is not None:
                    key_marks[new_path] = key_mark

    # -- lines --------------------------------------------------------------------------------

    def next_content_row(self, row):
        """(row, indent) of the next line holding content, skipping blank and comment lines.

        `---` / `...` lines and the end of the text report _MARKER_INDENT, below any real indent.
        """
        lines = self.lines
        count = self.count
        while row < count:
            line = lines[row]
            rest = line.lstrip(" ")
            if not rest or rest[0] == "#":
                row += 1
                continue
            indent = len(line) - len(rest)
            if rest[0] == "\t":
                rest = rest.lstrip(_SPACE_TAB)
                if not rest or rest[0] == "#":
                    row += 1
                    continue
                raise self.error("a tab character is used for indentation", row,
                                 line.index("\t"), hint="YAML indentation must use spaces only")
            if indent == 0 and (rest[:3] == "---" or rest[:3] == "...") and \
                    (len(rest) == 3 or rest[3] in _SPACE_TAB):
                return row, _MARKER_INDENT
            return row, indent
        return count, _MARKER_INDENT

    def expect_line_end(self, row, col, what):
        """Only spaces and a comment may follow ``what`` on its line; returns the next row."""
        line = self.lines[row]
        start = col
        length = len(line)
        while col < length and line[col] in _SPACE_TAB:
            col += 1
        if col < length and (line[col] != "#" or col == start):
            if line[col] == ":" and (col + 1 == length or line[col + 1] in _SPACE_TAB):
                raise self.error("a ':' after %s is not allowed here (mapping values are not "
                                 "allowed in this context)" % what, row, col,
                                 hint="a mapping key must be a plain or quoted scalar on the line "
                                      "where its block mapping starts")
            hint = "a comment needs a space before the '#'" if line[col] == "#" else None
            raise self.error("expected a comment or the end of the line after %s, found %s"
                             % (what, _format_character(line[col])), row, col, hint=hint)
        return row + 1

    # -- document -----------------------------------------------------------------------------

    def read_document(self):
        """The value of the one document in the text (None when it is empty)."""
        lines = self.lines
        row, indent = self.next_content_row(0)
        while row < self.count and lines[row][:1] == "%":
            raise self.error("YAML directives (%s) are not supported" % lines[row].split()[0],
                             row, 0, hint="remove the directive line; the file is read as "
                                          "YAML 1.2 core schema")
        if row >= self.count:
            self.mark((), 0, 0)
            return None
        line = lines[row]
        if indent == _MARKER_INDENT and line[:3] == "...":
            self.mark((), row, 0)
            self.finish_document(row)
            return None
        if indent == _MARKER_INDENT:
            col = 3
            while col < len(line) and line[col] in _SPACE_TAB:
                col += 1
            if col < len(line) and line[col] != "#":
                row, value = self.parse_node(row, col, _ROOT_INDENT, (), block_allowed=False,
                                             sequence_at_same_indent=False)
            else:
                row, value = self.parse_node_below(row + 1, _ROOT_INDENT, (),
                                                   sequence_at_same_indent=False, empty_row=row,
                                                   empty_col=3)
        else:
            row, value = self.parse_node(row, indent, _ROOT_INDENT, (), block_allowed=True,
                                         sequence_at_same_indent=False)
        self.finish_document(row)
        return value

    def finish_document(self, row):
        """After the document only blank lines, comments and one `...` may follow."""
        lines = self.lines
        row, indent = self.next_content_row(row)
        if row < self.count and indent == _MARKER_INDENT and lines[row][:3] == "...":
            self.expect_line_end(row, 3, "'...'")
            row, indent = self.next_content_row(row + 1)
        if row >= self.count:
            return
        line = lines[row]
        if indent == _MARKER_INDENT or line[:1] == "%":
            raise self.error("several YAML documents in one file are not supported", row, 0,
                             hint="keep one document per compose file (remove this '---' or "
                                  "split the file)")
        raise self.error("expected the end of the document, found more content at column %d "
                         "(less indented than the start of the document?)" % (indent + 1),
                         row, indent, hint="check the indentation of this line")

    # -- block nodes --------------------------------------------------------------------------

    def parse_node_below(self, row, parent_indent, path, sequence_at_same_indent,
                         empty_row, empty_col):
        """The node that starts on a later line (after `key:` or `-` with nothing after it)."""
        next_row, indent = self.next_content_row(row)
        if indent > parent_indent:
            return self.parse_node(next_row, indent, parent_indent, path, block_allowed=True,
                                   sequence_at_same_indent=False)
        if sequence_at_same_indent and indent == parent_indent:
            line = self.lines[next_row]
            if line[indent] == "-" and (len(line) == indent + 1 or line[indent + 1] in _SPACE_TAB):
                return self.parse_block_sequence(next_row, indent, parent_indent, path)
        self.mark(path, empty_row, empty_col)
        return row, None

    def parse_node(self, row, col, parent_indent, path, block_allowed, sequence_at_same_indent):
        """The node whose first character is at (row, col); returns (next row, value).

        ``block_allowed``: a block mapping or sequence may start here (at a line start or after
        `- `), not after `key: ` where only a scalar, flow collection or block scalar may follow.
        """
        line = self.lines[row]
        char = line[col]
        if char == "&":
            return self.parse_anchored_node(row, col, parent_indent, path, block_allowed,
                                            sequence_at_same_indent)
        if char == "*":
            col, value = self.parse_alias(row, col, path)
            return self.expect_line_end(row, col, "an alias"), value
        # Later lines of a flow collection or quoted string are indented under the parent block.
        self.continuation_indent = max(parent_indent + 1, 0)
        if char == "!":
            return self.parse_tagged_node(row, col, parent_indent, path, sequence_at_same_indent)
        if char == '"' or char == "'":
            end_row, end_col, value = self.parse_quoted(row, col)
            if end_row == row and self.is_key_colon(line, end_col):
                if block_allowed:
                    return self.parse_block_mapping(row, col, path)
                raise self.error("mapping values are not allowed here", row,
                                 self.skip_spaces(line, end_col),
                                 hint="a nested mapping goes on its own lines, indented under "
                                      "its key")
            self.mark(path, row, col)
            return self.expect_line_end(end_row, end_col, "a quoted string"), value
        if char == "[" or char == "{":
            end_row, end_col, value = self.parse_flow_collection(row, col, path)
            if end_row == row and self.is_key_colon(line, end_col):
                raise self.error("a flow collection as a mapping key (a complex key) is not "
                                 "supported", row, col, hint="use a plain or quoted string key")
            return self.expect_line_end(end_row, end_col, "a flow collection"), value
        if char == "|" or char == ">":
            return self.parse_block_scalar(row, col, parent_indent, path)
        following = line[col + 1:col + 2]
        if char == "-" and (following == "" or following in _SPACE_TAB):
            if block_allowed:
                return self.parse_block_sequence(row, col, parent_indent, path)
            raise self.error("a block sequence cannot start on the line of its key", row, col,
                             hint="start the '- ' items on the next line, indented under the "
                                  "key")
        self.check_node_start(row, col, char, following)
        return self.parse_plain_block(row, col, parent_indent, path, block_allowed)

    def read_merge_tag(self, row, col, path):
        """The `!reset` / `!override` tag at (row, col), recorded for ``path``; returns the column
        after it. Any other tag is refused."""
        line = self.lines[row]
        end = col + 1
        while end < len(line) and line[end] not in _ANCHOR_END:
            end += 1
        tag = line[col:end]
        if tag not in _MERGE_TAGS:
            raise self.error("YAML tags (%s) are not supported" % tag, row, col,
                             hint="only Compose's !reset and !override are read; to write a "
                                  "string that starts with '!', quote it")
        self.tags[path] = tag
        return end

    def parse_tagged_node(self, row, col, parent_indent, path, sequence_at_same_indent):
        """`!reset node` / `!override node` in block context (the node may start below)."""
        line = self.lines[row]
        col = self.skip_spaces(line, self.read_merge_tag(row, col, path))
        if col >= len(line) or line[col] == "#":
            return self.parse_node_below(row + 1, parent_indent, path,
                                         sequence_at_same_indent=sequence_at_same_indent,
                                         empty_row=row, empty_col=col)
        return self.parse_node(row, col, parent_indent, path, block_allowed=False,
                               sequence_at_same_indent=sequence_at_same_indent)

    def check_node_start(self, row, col, char, following):
        """Refuse what cannot start a node in this subset (tags, complex keys, indicators)."""
        if char == "!":
            tag = self.lines[row][col:].split(None, 1)[0]
            raise self.error("YAML tags (%s) are not supported" % tag, row, col,
                             hint="remove the tag; to write a string that starts with '!', "
                                  "quote it")
        if char == "?" and (following == "" or following in _SPACE_TAB):
            raise self.error("complex mapping keys ('? ') are not supported", row, col,
                             hint="write the key as a plain or quoted string: 'key: value'")
        if char == ":" and (following == "" or following in _SPACE_TAB):
            raise self.error("a mapping entry without a key (':' at the start of a value)",
                             row, col, hint="write 'key: value', or quote the value")
        if char == "%":
            raise self.error("a plain value cannot start with '%'", row, col,
                             hint="quote the value ('%...') ; YAML directives are not supported")
        if char in _RESERVED_START:
            raise self.error("a plain value cannot start with the reserved character %r" % char,
                             row, col, hint="quote the value")
        if char in _FLOW_INDICATORS or char == "#":
            raise self.error("expected a value, found %r" % char, row, col,
                             hint="quote the value if %r is part of it" % char)

    def parse_anchored_node(self, row, col, parent_indent, path, block_allowed,
                            sequence_at_same_indent):
        """`&name node`: parse the node and remember it for later aliases."""
        line = self.lines[row]
        name, col = self.read_anchor_name(row, col)
        col = self.skip_spaces(line, col)
        first = len(self.log)
        if col >= len(line) or line[col] == "#":
            row, value = self.parse_node_below(row + 1, parent_indent, path, sequence_at_same_indent,
                                               empty_row=row, empty_col=col)
        else:
            char = line[col]
            if char == '"' or char == "'":
                end_row, end_col, _ = self.parse_quoted(row, col)
                anchors_a_key = end_row == row and self.is_key_colon(line, end_col)
            else:
                anchors_a_key = char not in "[{|>*&!" and self.find_key_colon(line, col) >= 0
            if block_allowed and anchors_a_key:
                raise self.error("an anchor before a key on the same line is not supported (it "
                                 "would anchor the key, not the mapping)", row, col,
                                 hint="put '&%s' on the line of the parent key "
                                      "(parent: &%s) or alone before the mapping" % (name, name))
            if char == "&":
                raise self.error("a node may have only one anchor", row, col)
            if char == "*":
                raise self.error(_ANCHORED_ALIAS_MESSAGE, row, col, hint=_ANCHORED_ALIAS_HINT)
            row, value = self.parse_node(row, col, parent_indent, path, block_allowed and
                                         char == "-", sequence_at_same_indent)
        self.anchors[name] = (value, path, first, len(self.log))
        return row, value

    def read_anchor_name(self, row, col):
        """The name after '&' or '*' at (row, col); returns (name, column after it)."""
        line = self.lines[row]
        end = col + 1
        length = len(line)
        while end < length and line[end] not in _ANCHOR_END:
            end += 1
        name = line[col + 1:end]
        if not name:
            what = "an anchor" if line[col] == "&" else "an alias"
            raise self.error("expected the name of %s after %r" % (what, line[col]), row, col)
        return name, end

    def parse_alias(self, row, col, path):
        """`*name`: a copy of the anchored node; its marks are those of the anchored node."""
        name, end = self.read_anchor_name(row, col)
        anchor = self.anchors.get(name)
        if anchor is None:
            raise self.error("undefined alias '*%s'" % name, row, col,
                             hint="define it earlier in the file with '&%s' (an alias cannot "
                                  "refer to a later or enclosing node)" % name)
        value, source, first, last = anchor
        self.alias_row, self.alias_col = row, col
        self.copy_marks(first, last, source, path, False)
        if type(value) is dict or type(value) is list:
            value = _copy_yaml_node(value)
        return end, value

    def skip_spaces(self, line, col):
        length = len(line)
        while col < length and line[col] in _SPACE_TAB:
            col += 1
        return col

    def is_key_colon(self, line, col):
        """After a quoted key or flow collection: is the next thing a `:` key indicator?"""
        col = self.skip_spaces(line, col)
        return col < len(line) and line[col] == ":" and (
            col + 1 == len(line) or line[col + 1] in _SPACE_TAB)

    def find_key_colon(self, line, col):
        """Index of the `: ` ending a plain key that starts at ``col``, or -1 (none before a
        comment)."""
        limit = self.find_comment(line, col)
        index = line.find(":", col, limit)
        while index >= 0:
            if index + 1 == len(line) or line[index + 1] in _SPACE_TAB:
                return index
            index = line.find(":", index + 1, limit)
        return -1

    def find_comment(self, line, col):
        """Index where a ` #` comment starts after ``col``, or the line length."""
        index = line.find(" #", col)
        if "\t#" in line:
            tab_index = line.find("\t#", col)
            if tab_index >= 0 and (index < 0 or tab_index < index):
                index = tab_index
        return len(line) if index < 0 else index

    def parse_plain_block(self, row, col, parent_indent, path, block_allowed):
        """A plain scalar in block context (maybe over several lines), or the first key of a
        block mapping when `key: ` follows."""
        line = self.lines[row]
        limit = self.find_comment(line, col)
        colon = line.find(":", col, limit)
        while colon >= 0:
            if colon + 1 == len(line) or line[colon + 1] in _SPACE_TAB:
                if block_allowed:
                    return self.parse_block_mapping(row, col, path)
                raise self.error("mapping values are not allowed here", row, colon,
                                 hint="quote the value if it contains ': ', or put a nested "
                                      "mapping on its own lines under its key")
            colon = line.find(":", colon + 1, limit)
        text = line[col:limit].rstrip(_SPACE_TAB)
        first_row, first_text = row, text
        next_row = row + 1
        if limit == len(line) and next_row < self.count:
            lines = self.lines
            pieces = None
            blank_lines = 0
            count = self.count
            while next_row < count:
                line = lines[next_row]
                rest = line.lstrip(_SPACE_TAB)
                if not rest:
                    blank_lines += 1
                    next_row += 1
                    continue
                indent = len(line) - len(line.lstrip(" "))
                if indent <= parent_indent or rest[0] == "#" or indent == 0 and (
                        rest[:3] == "---" or rest[:3] == "...") and (
                        len(rest) == 3 or rest[3] in _SPACE_TAB):
                    break
                start = len(line) - len(rest)
                limit = self.find_comment(line, start)
                colon = self.find_key_colon(line, start)
                if colon >= 0:
                    self.refuse_key_under_plain(first_row, col, first_text, block_allowed,
                                                next_row, colon)
                if pieces is None:
                    pieces = [text]
                pieces.append("\n" * blank_lines if blank_lines else " ")
                pieces.append(line[start:limit].rstrip(_SPACE_TAB))
                blank_lines = 0
                row = next_row
                next_row += 1
                if limit < len(line):
                    break
            if pieces is not None:
                text = "".join(pieces)
                self.mark(path, first_row, col, text)
                return row + 1, text
        value = _resolve_plain(text)
        self.mark(path, row, col, text)
        return row + 1, value

    def refuse_key_under_plain(self, first_row, col, first_text, block_allowed, row, colon):
        """A `key: value` line indented under a plain value: say which line is really wrong."""
        if block_allowed and ":" in first_text:
            raise self.error("expected 'key: value' with a space after the ':', found %r"
                             % first_text, first_row, col + first_text.index(":"),
                             hint="YAML needs a space after the colon of a key (%s)"
                                  % first_text.replace(":", ": ", 1))
        if block_allowed:
            raise self.error("%r has no ':', so it is a plain value, and the more indented "
                             "mapping entry on line %d cannot belong to it"
                             % (first_text, row + 1), first_row, col,
                             hint="if %r is meant as a key, write '%s:'" % (first_text,
                                                                            first_text))
        raise self.error("mapping values are not allowed here (this line continues the plain "
                         "value of the line above, so its ': ' is invalid)", row, colon,
                         hint="if this is meant to be a new key, indent it exactly like the key "
                              "above; if it is text, quote the whole value")

    def parse_block_mapping(self, row, indent, path):
        """Entries `key: value` at column ``indent`` from ``row`` on."""
        lines = self.lines
        marks = self.marks
        key_marks = self.key_marks
        result = {}
        merges = None
        self.enter_collection(row, indent)
        self.mark(path, row, indent)
        while True:
            line = lines[row]
            length = len(line)
            # Fast path for the usual `plain key: ...`; anything unusual takes parse_mapping_key.
            text = None
            if line[indent] not in _SPECIAL_START:
                colon = line.find(":", indent)
                if colon > indent and (colon + 1 == length or line[colon + 1] == " ") and \
                        line.find("#", indent, colon) < 0:
                    text = line[indent:colon].rstrip(_SPACE_TAB)
                    key = text if text[0] not in _RESOLVABLE_START else _resolve_plain(text)
                    col = colon + 1
            if text is None:
                key, text, col = self.parse_mapping_key(row, indent)
            key_path = path + (key if type(key) is str else str(key),)
            if key in result or (text == "<<" and merges is not None):
                first_mark = key_marks[key_path]
                raise self.error("duplicate key %r (first defined at line %d, column %d)"
                                 % (_yaml_path_key(key), first_mark[0], first_mark[1]), row, indent,
                                 hint="remove one of them; YAML mapping keys must be unique")
            key_marks[key_path] = _make_mark(Mark, (row + 1, indent + 1, text))
            key_row = row
            value_col = col
            while value_col < length and line[value_col] in _SPACE_TAB:
                value_col += 1
            first = len(self.log)
            value = _YAML_MISSING
            if value_col >= length or line[value_col] == "#":
                row, value = self.parse_node_below(row + 1, indent, key_path,
                                                   sequence_at_same_indent=True, empty_row=row,
                                                   empty_col=min(col + 1, length))
                row, next_indent = self.next_content_row(row)
            elif line[value_col] not in _SPECIAL_START and line.find(": ", value_col) < 0 and \
                    line.find(" #", value_col) < 0 and line.find("\t", value_col) < 0 and \
                    line[-1] != ":" and text != "<<":
                # A one-line plain value: it ends here unless the next line is more indented.
                row, next_indent = self.next_content_row(row + 1)
                if next_indent <= indent:
                    value_text = line[value_col:].rstrip(" ")
                    value = value_text if value_text[0] not in _RESOLVABLE_START else \
                        _resolve_plain(value_text)
                    marks[key_path] = _make_mark(Mark, (key_row + 1, value_col + 1, value_text))
                    self.log.append(key_path)
                else:
                    row = key_row
            if value is _YAML_MISSING:
                row, value = self.parse_node(row, value_col, indent, key_path, block_allowed=False,
                                             sequence_at_same_indent=True)
                row, next_indent = self.next_content_row(row)
            if text == "<<":
                merges = self.merge_sources(value, key_path, first, (key_row, indent))
            else:
                result[key] = value
            if next_indent == indent:
                continue
            if next_indent > indent:
                raise self.error("unexpected indentation: expected a key at column %d (like the "
                                 "keys above) or less" % (indent + 1), row, next_indent,
                                 hint="align this line with its sibling keys")
            break
        if merges is not None:
            result = self.apply_merges(result, merges, path)
        self.depth -= 1
        return row, result

    def parse_mapping_key(self, row, col):
        """The key at (row, col) of a block mapping entry; returns (key, source text of a plain
        key or None for a quoted one, column after the ':')."""
        line = self.lines[row]
        char = line[col]
        if char == '"' or char == "'":
            end_row, end_col, key = self.parse_quoted(row, col)
            if end_row != row:
                raise self.error("a mapping key must fit on one line", row, col)
            end_col = self.skip_spaces(line, end_col)
            if end_col < len(line) and line[end_col] == ":" and (
                    end_col + 1 == len(line) or line[end_col + 1] in _SPACE_TAB):
                return key, None, end_col + 1
            raise self.error("expected ':' after the mapping key %s, found %s"
                             % (line[col:end_col].rstrip(),
                                _format_character(line[end_col:end_col + 1])),
                             row, end_col)
        following = line[col + 1:col + 2]
        if char == "-" and (following == "" or following in _SPACE_TAB):
            raise self.error("expected a mapping key at this indentation, found a sequence entry "
                             "'- '", row, col, hint="a list goes under a key (key:, then the '- ' "
                                                     "items), not between the keys of a mapping")
        self.refuse_key_start(row, col, char)
        if char == "&":
            raise self.error("an anchor before a key on the same line is not supported (it "
                             "would anchor the key, not the mapping)", row, col,
                             hint="put the anchor on the line of the parent key")
        if char in "|>":
            raise self.error("expected a mapping key, found a block scalar indicator %r" % char,
                             row, col)
        self.check_node_start(row, col, char, following)
        colon = self.find_key_colon(line, col)
        if colon < 0:
            found = line[col:self.find_comment(line, col)].rstrip(_SPACE_TAB)
            if ":" in found:
                raise self.error("expected a mapping entry 'key: value' with a space after the "
                                 "':', found %r" % found, row, col + found.index(":"),
                                 hint="YAML needs a space after the colon of a key (%s)"
                                      % found.replace(":", ": ", 1))
            raise self.error("expected a mapping entry 'key: value' at this indentation, found "
                             "%r without a ':'" % found, row, col,
                             hint="add ': ' after the key, or fix the indentation")
        text = line[col:colon].rstrip(_SPACE_TAB)
        return _resolve_plain(text), text, colon + 1

    def merge_sources(self, value, key_path, first, key_position):
        """The mappings a `<<` key merges, with where their marks were logged."""
        if type(value) is dict:
            return [(value, key_path, first, len(self.log))]
        if type(value) is list and value and all(type(item) is dict for item in value):
            return [(item, key_path + (index,), first, len(self.log))
                    for index, item in enumerate(value)]
        row, col = key_position
        raise self.error("the merge key '<<' expects a mapping or a list of mappings (such as "
                         "*common or [*a, *b])", row, col,
                         hint="quote the key ('<<') if you want a literal '<<' key")

    def apply_merges(self, explicit, merges, path):
        """YAML merge precedence: explicit keys win; earlier merged mappings win over later."""
        result = {}
        taken_from = {}
        for mapping, source, _, _ in merges:
            for key, value in mapping.items():
                if key not in explicit and key not in result:
                    result[key] = value
                    taken_from[_yaml_path_key(key)] = source
        for mapping, source, first, end in merges:
            self.alias_row, self.alias_col = self.marks[path][0] - 1, self.marks[path][1] - 1
            self.copy_marks(first, end, source, path, True, taken_from)
        for key, value in explicit.items():
            result[key] = value
        return result

    def parse_block_sequence(self, row, indent, parent_indent, path):
        """Entries `- value` at column ``indent`` from ``row`` on."""
        lines = self.lines
        items = []
        self.enter_collection(row, indent)
        self.mark(path, row, indent)
        while True:
            line = lines[row]
            item_path = path + (len(items),)
            col = self.skip_spaces(line, indent + 1)
            if col >= len(line) or line[col] == "#":
                row, value = self.parse_node_below(row + 1, indent, item_path,
                                                   sequence_at_same_indent=False, empty_row=row,
                                                   empty_col=min(indent + 2, len(line)))
                row, next_indent = self.next_content_row(row)
            elif line[col] not in _SPECIAL_START and line.find(": ", col) < 0 and \
                    line.find(" #", col) < 0 and line.find("\t", col) < 0 and line[-1] != ":":
                # A one-line plain item: it ends here unless the next line is more indented.
                next_row, next_indent = self.next_content_row(row + 1)
                if next_indent <= indent:
                    text = line[col:].rstrip(" ")
                    value = text if text[0] not in _RESOLVABLE_START else _resolve_plain(text)
                    self.marks[item_path] = _make_mark(Mark, (row + 1, col + 1, text))
                    self.log.append(item_path)
                    row = next_row
                else:
                    row, value = self.parse_node(row, col, indent, item_path, block_allowed=True,
                                                 sequence_at_same_indent=False)
                    row, next_indent = self.next_content_row(row)
            else:
                row, value = self.parse_node(row, col, indent, item_path, block_allowed=True,
                                             sequence_at_same_indent=False)
                row, next_indent = self.next_content_row(row)
            items.append(value)
            if next_indent == indent:
                line = lines[row]
                if line[indent] == "-" and (len(line) == indent + 1 or
                                            line[indent + 1] in _SPACE_TAB):
                    continue
                if indent > parent_indent:
                    raise self.error("expected a sequence entry '- ' at this indentation, found "
                                     "%r" % line.strip()[:40], row, indent,
                                     hint="a mapping entry cannot follow the items of a list at "
                                          "the same indentation; check the indentation")
            elif next_indent > indent:
                raise self.error("unexpected indentation: expected '- ' at column %d (like the "
                                 "entries above) or less" % (indent + 1), row, next_indent,
                                 hint="align this line with its sibling entries")
            break
        self.depth -= 1
        return row, items

    def parse_block_scalar(self, row, col, parent_indent, path):
        """`|` (literal) or `>` (folded) with optional chomping and indentation indicators."""
        folded = self.lines[row][col] == ">"
        chomping, increment = self.read_block_scalar_header(row, col)
        self.mark(path, row, col)
        if increment is not None:
            indent = max(parent_indent, 0) + increment
        else:
            indent = self.detect_block_indent(row + 1, parent_indent)
        next_row, groups, trailing_blank_lines, final_break = self.collect_block_lines(row + 1,
                                                                                      indent)
        return next_row, _join_block_scalar(groups, folded, chomping, trailing_blank_lines,
                                            final_break)

    def read_block_scalar_header(self, row, col):
        """The chomping ('-', '+' or None) and indentation indicator (1-9 or None) after the
        `|` or `>` at (row, col); only a comment may follow them."""
        line = self.lines[row]
        chomping = None
        increment = None
        cursor = col + 1
        for _ in range(2):
            char = line[cursor:cursor + 1]
            if char and char in "+-" and chomping is None:
                chomping = char
            elif char and char in "123456789" and increment is None:
                increment = int(char)
            elif char == "0":
                raise self.error("a block scalar indentation indicator must be 1 to 9", row,
                                 cursor)
            else:
                break
            cursor += 1
        end = self.skip_spaces(line, cursor)
        if end < len(line) and (line[end] != "#" or end == cursor):
            raise self.error("expected a chomping indicator (+ or -), an indentation indicator "
                             "(1-9), a comment or the end of the line after %r, found %s"
                             % (line[col], _format_character(line[end])), row, end)
        return chomping, increment

    def detect_block_indent(self, row, parent_indent):
        """The content indentation of a block scalar without an indentation indicator: that of
        its first non-blank line (and at least one more than the parent)."""
        lines = self.lines
        indent = 0
        while row < self.count:
            text = lines[row]
            stripped = text.lstrip(" ")
            if stripped:
                indent = max(indent, len(text) - len(stripped))
                break
            indent = max(indent, len(text))
            row += 1
        return max(indent, parent_indent + 1, 1 if parent_indent >= 0 else 0)

    def collect_block_lines(self, row, indent):
        """The lines of a block scalar from ``row``: (next row, [(blank lines before, text)],
        trailing blank lines, whether its last content line ends with a line break)."""
        lines = self.lines
        count = self.count
        groups = []
        blank_lines = 0
        last_content_row = -1
        while row < count:
            text = lines[row]
            if len(text) > indent and text[:indent].strip(" ") == "":
                if indent == 0 and (text[:3] == "---" or text[:3] == "...") and (
                        len(text) == 3 or text[3] in _SPACE_TAB):
                    break
                groups.append((blank_lines, text[indent:]))
                blank_lines = 0
                last_content_row = row
            elif text.strip(" ") == "":
                blank_lines += 1
            elif text.strip(_SPACE_TAB) == "":
                # Only spaces indent: a tab here is neither an empty line nor content (YAML 1.2).
                raise self.error("a tab in the indentation of a block scalar line", row,
                                 text.index("\t"), hint="indent block scalar lines with spaces "
                                                        "only, or remove the tab")
            else:
                break
            row += 1
        # The end of the text ends a last line of spaces as a line break would (yaml-test-suite
        # L24T, JEF9); a last content line without a break keeps having none.
        final_break = (last_content_row < count - 1 or self.final_break
                       or lines[last_content_row].strip(" ") == "")
        return row, groups, blank_lines, final_break

    # -- quoted scalars -----------------------------------------------------------------------

    def parse_quoted(self, row, col):
        """A single- or double-quoted scalar starting at (row, col); returns (row, column after
        the closing quote, value). Line breaks inside fold like YAML says."""
        lines = self.lines
        line = lines[row]
        quote = line[col]
        double = quote == '"'
        start_row, start_col = row, col
        col += 1
        # Fast path: a one-line string without escapes.
        end = line.find(quote, col)
        if end >= 0 and (not double or line.find("\\", col, end) < 0) and (
                double or line[end + 1:end + 2] != "'"):
            return row, end + 1, line[col:end]
        chunks = []
        while True:
            length = len(line)
            escaped_break = False
            while True:
                end = line.find(quote, col)
                if double:
                    escape = line.find("\\", col, end if end >= 0 else length)
                    if escape >= 0:
                        chunks.append(line[col:escape])
                        if escape + 1 == length:
                            col = length
                            escaped_break = True
                            break
                        text, col = self.read_escape(row, escape)
                        chunks.append(text)
                        continue
                elif end >= 0 and line[end + 1:end + 2] == "'":
                    chunks.append(line[col:end + 1])
                    col = end + 2
                    continue
                if end >= 0:
                    chunks.append(line[col:end])
                    return row, end + 1, "".join(chunks)
                break
            if not escaped_break:
                # Trailing spaces of a line are not part of a folded string.
                chunks.append(line[col:].rstrip(_SPACE_TAB))
            row += 1
            blank_lines = 0
            while row < self.count and lines[row].strip(_SPACE_TAB) == "":
                blank_lines += 1
                row += 1
            if row >= self.count:
                raise self.error("unterminated %s string (expected a closing %s)"
                                 % ("double-quoted" if double else "single-quoted", quote),
                                 start_row, start_col,
                                 hint="add the closing quote, or escape quotes inside it")
            line = lines[row]
            if (line[:3] == "---" or line[:3] == "...") and (len(line) == 3 or line[3] in
                                                             _SPACE_TAB):
                raise self.error("unterminated %s string before a document marker"
                                 % ("double-quoted" if double else "single-quoted"),
                                 start_row, start_col, hint="add the closing %s" % quote)
            if self.leading_spaces(row) < self.continuation_indent:
                # Most often the closing quote is missing and this is the next key.
                raise self.error("unterminated %s string (expected a closing %s before line %d, "
                                 "which is not indented under its key)"
                                 % ("double-quoted" if double else "single-quoted", quote,
                                    row + 1), start_row, start_col,
                                 hint="add the closing quote, or indent the continuation lines "
                                      "of a multi-line string under their key")
            if escaped_break:
                chunks.append("\n" * blank_lines)
            else:
                chunks.append("\n" * blank_lines if blank_lines else " ")
            col = self.skip_spaces(line, 0)

    def read_escape(self, row, col):
        """The character(s) of the escape at line[col] == '\\'; returns (text, next column)."""
        line = self.lines[row]
        char = line[col + 1]
        text = _DOUBLE_QUOTED_ESCAPES.get(char)
        if text is not None:
            return text, col + 2
        size = _HEX_ESCAPE_LENGTHS.get(char)
        if size is not None:
            digits = line[col + 2:col + 2 + size]
            if len(digits) != size or not _YAML_HEX_DIGITS.issuperset(digits):
                raise self.error("expected %d hexadecimal digits after '\\%s'" % (size, char),
                                 row, col)
            code = int(digits, 16)
            # Lone surrogates would fail later, when a script or a JSON file is written.
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise self.error("'\\%s%s' is not a valid Unicode code point" % (char, digits),
                                 row, col)
            return chr(code), col + 2 + size
        raise self.error("unknown escape '\\%s' in a double-quoted string" % char, row, col,
                         hint="write '\\\\' for a backslash, or use single quotes, where "
                              "backslashes are literal")

    # -- flow collections ---------------------------------------------------------------------

    def skip_flow_space(self, row, col, open_row, open_col):
        """Skip spaces, line breaks and comments inside a flow collection."""
        lines = self.lines
        while True:
            line = lines[row]
            length = len(line)
            while col < length and line[col] in _SPACE_TAB:
                col += 1
            if col < length and line[col] == "#" and (col == 0 or line[col - 1] in _SPACE_TAB):
                col = length
            if col < length:
                if row != open_row:
                    self.check_flow_line_indent(row, col)
                return row, col
            row += 1
            col = 0
            if row >= self.count:
                raise self.error("unterminated flow collection (expected a closing %r)"
                                 % ("]" if lines[open_row][open_col] == "[" else "}"),
                                 open_row, open_col, hint="add the closing bracket")
            line = lines[row]
            if (line[:3] == "---" or line[:3] == "...") and (len(line) == 3 or line[3] in
                                                             _SPACE_TAB):
                raise self.error("unterminated flow collection before a document marker",
                                 open_row, open_col, hint="add the closing bracket")

    def leading_spaces(self, row):
        line = self.lines[row]
        return len(line) - len(line.lstrip(" "))

    def check_flow_line_indent(self, row, col):
        """A later line of a flow collection must be indented (with spaces) more than the block
        collection it is in (YAML 1.2; yaml-test-suite 9C9N). A line that only closes it may
        stand at the column of its key, as JSON-style files write it."""
        indent = self.leading_spaces(row)
        line = self.lines[row]
        if indent >= self.continuation_indent or (
                line[col] in "]}" and col == indent and indent >= self.continuation_indent - 1):
            return
        raise self.error("this line of a flow collection must be indented more than the block "
                         "it is in (by at least %d space%s)"
                         % (self.continuation_indent, "" if self.continuation_indent == 1
                            else "s"), row, indent,
                         hint="indent the entries of a multi-line [...] or {...} under their key "
                              "or '-'")

    def parse_flow_collection(self, row, col, path):
        """`[...]` or `{...}`, maybe over several lines; returns (row, column after it, value)."""
        lines = self.lines
        open_row, open_col = row, col
        is_mapping = lines[row][col] == "{"
        closer = "}" if is_mapping else "]"
        result = {} if is_mapping else []
        merges = None
        self.enter_collection(row, col)
        self.mark(path, row, col)
        row, col = self.skip_flow_space(row, col + 1, open_row, open_col)
        while True:
            line = lines[row]
            char = line[col]
            if char == closer:
                if merges is not None:
                    result = self.apply_merges(result, merges, path)
                self.depth -= 1
                return row, col + 1, result
            following = line[col + 1:col + 2]
            if char == "?" and (following == "" or following in _FLOW_BREAKS):
                raise self.error("complex mapping keys ('? ') are not supported", row, col,
                                 hint="write the key as a plain or quoted string")
            entry_row, entry_col = row, col
            if is_mapping:
                row, col, merge = self.parse_flow_mapping_entry(result, path, row, col,
                                                                merges is not None, open_row,
                                                                open_col, closer)
                if merge is not None:
                    merges = merge
            else:
                item_path = path + (len(result),)
                row, col, value = self.parse_flow_node(row, col, item_path, open_row, open_col)
                after_row, after_col = self.check_flow_key_line(entry_row, entry_col, row, col,
                                                                open_row, open_col)
                if lines[after_row][after_col] == ":":
                    value = self.parse_flow_pair(entry_row, entry_col, value, item_path,
                                                 after_row, after_col, open_row, open_col)
                    row, col, value = value
                result.append(value)
            row, col = self.skip_flow_space(row, col, open_row, open_col)
            line = lines[row]
            char = line[col]
            if char == ",":
                row, col = self.skip_flow_space(row, col + 1, open_row, open_col)
            elif char != closer:
                raise self.error("expected ',' or %r in a flow %s, found %s"
                                 % (closer, "mapping" if is_mapping else "sequence",
                                    _format_character(char)), row, col,
                                 hint="separate entries with ', ' and quote values containing "
                                      "',', '[', ']', '{' or '}'")

    def parse_flow_mapping_entry(self, result, path, row, col, merged, open_row, open_col,
                                 closer):
        """One `key: value` (or lone `key`) of a flow mapping, stored into ``result``; returns
        (row, column after it, merge sources when the key is `<<`, else None)."""
        lines = self.lines
        entry_row, entry_col = row, col
        key, text, row, col = self.parse_flow_key(row, col)
        key_path = path + (key if type(key) is str else str(key),)
        if key in result or (text == "<<" and merged):
            first_mark = self.key_marks[key_path]
            raise self.error("duplicate key %r (first defined at line %d, column %d)"
                             % (_yaml_path_key(key), first_mark[0], first_mark[1]),
                             entry_row, entry_col,
                             hint="remove one of them; YAML mapping keys must be unique")
        self.key_marks[key_path] = _make_mark(Mark, (entry_row + 1, entry_col + 1, text))
        # Unlike a pair inside `[...]`, a key in `{...}` may be followed by its ':' on a later line.
        row, col = self.skip_flow_space(row, col, open_row, open_col)
        first = len(self.log)
        value = None
        if lines[row][col] == ":":
            row, col = self.skip_flow_space(row, col + 1, open_row, open_col)
            char = lines[row][col]
            if char == "," or char == closer:
                self.mark(key_path, row, col)
            else:
                row, col, value = self.parse_flow_node(row, col, key_path, open_row, open_col)
        else:
            self.mark(key_path, row, col)
        if text == "<<":
            return row, col, self.merge_sources(value, key_path, first, (entry_row, entry_col))
        result[key] = value
        return row, col, None

    def check_flow_key_line(self, key_row, key_col, row, col, open_row, open_col):
        """Skip to what follows an entry of `[...]`; a ':' there (a single-pair mapping) must be
        on the line where the key starts and ends (YAML implicit keys are single-line)."""
        next_row, next_col = self.skip_flow_space(row, col, open_row, open_col)
        if self.lines[next_row][next_col] == ":" and (next_row != key_row or row != key_row):
            raise self.error("a mapping key must fit on one line, with its ':' on the same line",
                             key_row, key_col, hint="join the key and its ':' on one line")
        return next_row, next_col

    def parse_flow_pair(self, key_row, key_col, key, item_path, row, col, open_row, open_col):
        """`[key: value]`: a single-pair mapping inside a flow sequence."""
        if type(key) is dict or type(key) is list:
            raise self.error("a flow collection as a mapping key (a complex key) is not "
                             "supported", key_row, key_col, hint="use a plain or quoted key")
        key_mark = self.marks.get(item_path)   # the key was parsed as the item itself
        text = key_mark.text if key_mark is not None else None
        self.mark(item_path, key_row, key_col)
        key_path = item_path + (_yaml_path_key(key),)
        self.key_marks[key_path] = _make_mark(Mark, (key_row + 1, key_col + 1, text))
        row, col = self.skip_flow_space(row, col + 1, open_row, open_col)
        char = self.lines[row][col]
        if char == "," or char == "]":
            self.mark(key_path, row, col)
            return row, col, {key: None}
        row, col, value = self.parse_flow_node(row, col, key_path, open_row, open_col)
        return row, col, {key: value}

    def refuse_key_start(self, row, col, char):
        """A key (block or flow) is a string: not a flow collection, not an alias."""
        if char == "[" or char == "{":
            raise self.error("a flow collection as a mapping key (a complex key) is not "
                             "supported", row, col, hint="use a plain or quoted string key")
        if char == "*":
            raise self.error("an alias as a mapping key is not supported", row, col,
                             hint="write the key itself")

    def parse_flow_key(self, row, col):
        """A key inside `{...}`: a quoted or plain scalar; returns (key, text, row, col)."""
        line = self.lines[row]
        char = line[col]
        if char == '"' or char == "'":
            end_row, end_col, key = self.parse_quoted(row, col)
            return key, None, end_row, end_col
        self.refuse_key_start(row, col, char)
        if char == "&":
            raise self.error("an anchor on a mapping key is not supported", row, col,
                             hint="anchor the whole mapping instead")
        following = line[col + 1:col + 2]
        if char == ":" and (following == "" or following in _FLOW_BREAKS):
            raise self.error("a mapping entry without a key", row, col,
                             hint="write 'key: value'")
        self.check_flow_start(row, col, char, following)
        end_row, end_col, text = self.scan_flow_plain(row, col)
        return _resolve_plain(text), text, end_row, end_col

    def check_flow_start(self, row, col, char, following):
        if char == "-" and (following == "" or following in _FLOW_BREAKS):
            raise self.error("a block sequence entry '- ' is not allowed inside a flow "
                             "collection", row, col, hint="separate items with ', ' instead")
        if char in "|>":
            raise self.error("a block scalar (%s) is not allowed inside a flow collection" % char,
                             row, col, hint="use a quoted string with \\n escapes")
        self.check_node_start(row, col, char, following)

    def parse_flow_node(self, row, col, path, open_row, open_col):
        """A node inside a flow collection; returns (row, column after it, value)."""
        lines = self.lines
        line = lines[row]
        char = line[col]
        if char == "[" or char == "{":
            return self.parse_flow_collection(row, col, path)
        if char == '"' or char == "'":
            end_row, end_col, value = self.parse_quoted(row, col)
            self.mark(path, row, col)
            return end_row, end_col, value
        if char == "*":
            end, value = self.parse_alias(row, col, path)
            return row, end, value
        if char == "!":
            end = self.read_merge_tag(row, col, path)
            row, col = self.skip_flow_space(row, end, open_row, open_col)
            if lines[row][col] in ",]}":
                self.mark(path, row, col)
                return row, col, None
            return self.parse_flow_node(row, col, path, open_row, open_col)
        if char == "&":
            name, end = self.read_anchor_name(row, col)
            first = len(self.log)
            next_row, next_col = self.skip_flow_space(row, end, open_row, open_col)
            following = lines[next_row][next_col]
            if following == "," or following in "]}" or (
                    following == ":" and lines[next_row][next_col + 1:next_col + 2] in
                    ("", " ", "\t", ",", "]", "}")):
                self.mark(path, next_row, next_col)
                value = None
                row, col = next_row, next_col
            else:
                if following == "*":
                    raise self.error(_ANCHORED_ALIAS_MESSAGE, next_row, next_col,
                                     hint=_ANCHORED_ALIAS_HINT)
                row, col, value = self.parse_flow_node(next_row, next_col, path, open_row,
                                                       open_col)
            self.anchors[name] = (value, path, first, len(self.log))
            return row, col, value
        self.check_flow_start(row, col, char, line[col + 1:col + 2])
        end_row, end_col, text = self.scan_flow_plain(row, col)
        if end_row == row:
            self.mark(path, row, col, text)
            return end_row, end_col, _resolve_plain(text)
        self.mark(path, row, col, text)
        return end_row, end_col, text

    def scan_flow_plain(self, row, col):
        """A plain scalar inside a flow collection, maybe folded over several lines; returns
        (row, column after it, text)."""
        lines = self.lines
        line = lines[row]
        end = self.plain_flow_end(line, col)
        text = line[col:end].rstrip(_SPACE_TAB)
        pieces = None
        while end == len(line):
            scan = row + 1
            blank_lines = 0
            while scan < self.count and lines[scan].strip(_SPACE_TAB) == "":
                blank_lines += 1
                scan += 1
            if scan >= self.count:
                break
            following = lines[scan]
            start = self.skip_spaces(following, 0)
            char = following[start]
            if char in "#,[]{}" or char == ":" and following[start + 1:start + 2] in (
                    "", " ", "\t", ",", "[", "]", "{", "}") or start == 0 and (
                    following[:3] == "---" or following[:3] == "..."):
                break
            end = self.plain_flow_end(following, start)
            if pieces is None:
                pieces = [text]
            pieces.append("\n" * blank_lines if blank_lines else " ")
            pieces.append(following[start:end].rstrip(_SPACE_TAB))
            row, line = scan, following
        if pieces is not None:
            text = "".join(pieces)
        return row, end, text

    def plain_flow_end(self, line, col):
        """Where a plain scalar inside a flow collection ends on ``line``."""
        length = len(line)
        index = col
        while index < length:
            char = line[index]
            if char in _FLOW_INDICATORS:
                break
            if char == ":" and (index + 1 == length or line[index + 1] in _FLOW_BREAKS):
                break
            if char == "#" and line[index - 1] in _SPACE_TAB:
                break
            index += 1
        return index


# --- writing YAML (config's text output and migrate's rewritten lines) ----------------------------

_PLAIN_UNSAFE = frozenset("-?:,[]{}#&*!|>'\"%@`")


def _format_yaml_scalar(value):
    """A scalar as YAML text that reads back as the same value: a string plain when it can be."""
    if not isinstance(value, str):
        return _yaml_scalar(value)
    plain = (value and value == value.strip() and value[0] not in _PLAIN_UNSAFE
             and ": " not in value and " #" not in value and not value.endswith(":")
             and "\n" not in value and "\t" not in value and value.isprintable()
             and _resolve_plain(value) == value)
    return value if plain else _yaml_scalar(value)


def _format_yaml_lines(value, indent, scalar=_format_yaml_scalar, key_text=_format_yaml_scalar):
    """Block-style YAML lines of a dict or list, indented by ``indent`` spaces."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = pad + key_text(key) + ":"
            if isinstance(item, (dict, list)) and item:
                lines.append(head)
                lines.extend(_format_yaml_lines(item, indent + 2, scalar, key_text))
            else:
                lines.append(head + " " + scalar(item))
        return lines
    for item in value:
        if isinstance(item, (dict, list)) and item:
            nested = _format_yaml_lines(item, indent + 2, scalar, key_text)
            lines.append(pad + "- " + nested[0][indent + 2:])
            lines.extend(nested[1:])
        else:
            lines.append(pad + "- " + scalar(item))
    return lines


def _format_yaml(data, indent=0):
    """Block-style YAML for plain data; every string is double-quoted so it reads back exactly."""
    return "\n".join(_format_yaml_lines(data, 2 * indent, _yaml_scalar, _yaml_key))


def _yaml_key(key):
    import re
    if re.match(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*\Z", key) and key not in (
            "true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"):
        return key
    return _yaml_scalar(key)


def _yaml_scalar(value):
    import json
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    # JSON string escapes are valid YAML double-quoted escapes.
    return json.dumps(value, ensure_ascii=False)


##############################################################################
# Interpolation and .env
##############################################################################
# Contract:
#   load_dotenv(path) -> dict (missing file -> {}; unreadable/malformed -> SpecError with file+line)
#   interpolate(value, variables, path=None, ...) -> str   ($VAR ${VAR} ${VAR:-d} ${VAR-d}
#          ${VAR:?msg} ${VAR?msg} ${VAR:+alt} ${VAR+alt} $$, nested in defaults; missing variable
#          without default -> SpecError naming the variable, file, line, key path)
# The grammar is Compose's; other operators (bash's `:=`, `#`, `%`...) are refused.

_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_START | frozenset("0123456789")
# Bounds: ${A:-${B:-...}} nested deeper than this is refused (not a RecursionError), and so is
# one value, or all of a file's values together, grown by expansion past Slurm's default limit of
# a batch script (4 MB), which no such value could reach anyway.
_MAX_INTERPOLATION_DEPTH = 32
_MAX_EXPANDED_SIZE = 4 * 1024 * 1024


def load_dotenv(path):
    """Read a ``.env`` file into a dict (empty when the file does not exist)."""
    if not os.path.lexists(path):
        return {}
    return parse_dotenv(_read_env_file(path), path)


def _read_env_file(path):
    """The text of a ``.env``-format file; what stops reading it is a located error."""
    if os.path.isdir(path):
        raise SpecError("'%s' is a directory, not a file" % os.path.basename(path), file=path,
                        hint="remove or rename it; hpc-compose reads KEY=VALUE lines from it")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise SpecError("cannot read %s: %s" % (os.path.basename(path), exc.strerror or exc),
                        file=path, hint="fix its permissions, or remove it if it is not meant "
                                        "for this project")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError("%s is not UTF-8 text" % os.path.basename(path), file=path, line=line)


def parse_dotenv(text, filename=None):
    """Parse ``.env`` text: comments, blank lines, optional ``export``, ``KEY=VALUE``, quotes stripped."""
    return dict((key, value) for _, key, value, _ in _dotenv_entries(text, filename))


def _dotenv_entries(text, filename):
    """``(line number, key, value, quote character or "")`` for each ``KEY=VALUE`` line."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\0" in stripped:
            raise SpecError(".env line contains a NUL byte (is this a binary file?)",
                            file=filename, line=number)
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export"):].lstrip()
        # Neither message quotes the line: it may be part of a secret (a multi-line PEM key).
        if "=" not in stripped:
            raise SpecError(".env line %d is not KEY=VALUE (a value cannot span lines)" % number,
                            file=filename, line=number,
                            hint="write KEY=VALUE, or start the line with # to make it a comment")
        key, value = stripped.split("=", 1)
        key = key.strip()
        if not key or key[0] not in _NAME_START or not _NAME_CHARS.issuperset(key):
            raise SpecError(".env line %d does not start with a valid variable name" % number,
                            file=filename, line=number,
                            hint="names use letters, digits and _, and do not start with a digit")
        value = value.strip()
        quote = ""
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
        yield number, key, value, quote


def _build_variables(project_dir, environ=None, env_files=None):
    """The interpolation variables: ``.env`` from ``project_dir`` (or, instead, ``env_files`` in
    order, later ones winning: ``--env-file``) under the process environment."""
    if env_files is None:
        variables = load_dotenv(os.path.join(project_dir, ".env"))
    else:
        variables = {}
        for path in env_files:
            if not os.path.isfile(path):
                raise UsageError("env file %s does not exist" % path,
                                 hint="check the --env-file path (relative to the current "
                                      "directory)")
            variables.update(load_dotenv(path))
    variables.update(os.environ if environ is None else environ)
    return variables


def interpolate(value, variables, path=None, file=None, line=None, column=None,
                unset_is_empty=False, keep=(), used=None):
    """Expand ``$VAR``, ``${VAR}``, Compose's ``${VAR<op>word}`` forms (``:-`` ``-`` ``:?`` ``?``
    ``:+`` ``+``) and ``$$`` in ``value``.

    ``unset_is_empty``: an unset variable without a default expands to "" instead of failing (the
    manual's rule for ``image``). ``keep``: names left exactly as written (``SLURM_JOB_ID`` in
    ``artifacts.export_dir`` is expanded later, from tracked metadata). ``used``: a set that
    receives the name of every variable the value refers to.
    """
    if not isinstance(value, str) or "$" not in value:
        return value
    where = {"path": path, "file": file, "line": line, "column": column}
    expansion = _Interpolation(value, variables, where, unset_is_empty, keep)
    text = expansion.expand()
    if used is not None:
        used.update(expansion.used)
    return text


class _Interpolation(object):
    """One pass over one string; a small recursive-descent expander for the ``${...}`` forms."""

    def __init__(self, text, variables, where, unset_is_empty, keep):
        self.text = text
        self.variables = variables
        self.where = where
        self.unset_is_empty = unset_is_empty
        self.keep = keep
        self.depth = 0
        self.size = 0
        self.used = set()

    def fail(self, message, hint=None):
        raise SpecError(message, hint=hint, **self.where)

    def expand(self):
        return self.expand_range(0, len(self.text))

    def grown(self, piece):
        """``piece`` (an expansion), counted against ``_MAX_EXPANDED_SIZE``."""
        self.size += len(piece)
        if self.size > _MAX_EXPANDED_SIZE:
            self.fail("the value grows past %d bytes when its variables are expanded"
                      % _MAX_EXPANDED_SIZE, hint="Slurm refuses batch scripts larger than 4 MB; "
                                                 "pass large data as a file (a volume)")
        return piece

    def expand_range(self, start, end):
        if self.depth >= _MAX_INTERPOLATION_DEPTH:
            self.fail("variable expressions are nested more than %d deep"
                      % _MAX_INTERPOLATION_DEPTH, hint="nest fewer ${NAME:-...} defaults")
        self.depth += 1
        text = self.text
        out = []
        pos = start
        while pos < end:
            dollar = text.find("$", pos, end)
            if dollar < 0:
                out.append(text[pos:end])
                break
            out.append(text[pos:dollar])
            nxt = dollar + 1
            if nxt >= end:
                out.append("$")
                pos = nxt
            elif text[nxt] == "$":
                out.append("$")
                pos = nxt + 1
            elif text[nxt] == "{":
                close = self.matching_brace(nxt, end)
                out.append(self.grown(self.expand_braced(dollar, nxt + 1, close)))
                pos = close + 1
            elif text[nxt] in _NAME_START:
                stop = nxt
                while stop < end and text[stop] in _NAME_CHARS:
                    stop += 1
                name = text[nxt:stop]
                out.append(text[dollar:stop] if name in self.keep else
                           self.grown(self.lookup(name)))
                pos = stop
            else:
                # `$(`, `$1`, `$ `...: not a variable reference; kept for the shell that reads it.
                out.append("$")
                pos = nxt
        self.depth -= 1
        return "".join(out)

    def matching_brace(self, open_pos, end):
        # Every brace counts, as compose-go counts them: ${JSON:-{"json":1}} ends at the last '}'.
        depth = 0
        pos = open_pos
        text = self.text
        while pos < end:
            char = text[pos]
            if char == "$" and pos + 1 < end and text[pos + 1] == "$":
                pos += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return pos
            pos += 1
        self.fail("unterminated variable expression %r (missing '}')" % self.text[open_pos - 1:end],
                  hint="close it with }, or write $$ for a literal $")

    def expand_braced(self, dollar, start, close):
        text = self.text
        stop = start
        while stop < close and text[stop] in _NAME_CHARS:
            stop += 1
        name = text[start:stop]
        expression = text[dollar:close + 1]
        if not name or name[0] not in _NAME_START:
            self.fail("invalid variable expression %r" % expression,
                      hint="use ${NAME}, ${NAME:-default} or ${NAME-default}; $$ is a literal $")
        if name in self.keep:
            return expression
        self.used.add(name)
        if stop == close:
            return self.lookup(name)
        if text.startswith(":-", stop):
            value = self.variables.get(name)
            if value:
                return value
            return self.expand_range(stop + 2, close)
        if text[stop] == "-":
            if name in self.variables:
                return self.variables[name]
            return self.expand_range(stop + 1, close)
        colon = text[stop] == ":"
        operator = text[stop + 1] if colon and stop + 1 < close else text[stop]
        # `:?` / `:+` test "set and not empty", `?` / `+` only "set".
        present = bool(self.variables.get(name)) if colon else name in self.variables
        if operator == "?":
            if present:
                return self.variables[name]
            message = self.expand_range(stop + 1 + colon, close)
            self.fail("variable '%s' is %s%s" % (name, "empty or not set" if colon else "not set",
                                                 ": " + message if message else ""),
                      hint="set it in the environment or in .env next to the compose file")
        if operator == "+":
            return self.expand_range(stop + 1 + colon, close) if present else ""
        self.fail("unsupported variable expression %r" % expression,
                  hint="supported forms: $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, "
                       "${NAME:?message}, ${NAME?message}, ${NAME:+alternative}, "
                       "${NAME+alternative}, and $$ for a literal $")

    def lookup(self, name):
        self.used.add(name)
        if name in self.variables:
            return self.variables[name]
        if self.unset_is_empty:
            return ""
        if name.startswith("SLURM_"):
            self.fail("variable '%s' is not set and has no default" % name,
                      hint="Slurm's job variables do not exist when the file is loaded on the "
                           "login node: in x-slurm.output/error use Slurm's %%j, in a string-form "
                           "command the container's shell expands $%s, or write $$%s" % (name,
                                                                                       name))
        self.fail("variable '%s' is not set and has no default" % name,
                  hint="set it in the environment or in .env next to the compose file, give a "
                       "default with ${%s:-value}, or write $$ for a literal $" % name)


##############################################################################
# Spec: the validated compose model
##############################################################################
# load_spec(path, environ=None) -> ComposeSpec. Everything here is validated,
# interpolated and normalized in shape (environment as ordered pairs, depends_on as pairs, healthcheck
# folded into readiness, failure-policy and readiness defaults applied), but paths are not resolved
# yet (planner). Records are immutable; tuples, never lists; mappings kept as tuples of pairs in
# declared order. The rules both the spec checks and the planner apply (image forms, placement,
# host paths, the cache dir policy) come first, so that neither stage reaches forward for them;
# spec_to_dict (the JSON form `config` prints) closes the section.


class ReadinessSpec(NamedTuple):
    type: str                      # sleep | tcp | log | http
    seconds: Optional[int] = None  # sleep
    host: Optional[str] = None     # tcp (default 127.0.0.1)
    port: Optional[int] = None     # tcp
    pattern: Optional[str] = None  # log (a literal substring of the service log)
    url: Optional[str] = None      # http
    status_code: Optional[int] = None      # http (default 200)
    timeout_seconds: Optional[int] = None  # tcp/log/http (default 60)


class FailurePolicy(NamedTuple):
    mode: str = "fail_job"         # fail_job | ignore | restart_on_failure
    max_restarts: Optional[int] = None     # restart_on_failure only (default 3)
    backoff_seconds: Optional[int] = None  # restart_on_failure only (default 5)


class PrepareSpec(NamedTuple):
    commands: Tuple[str, ...]
    mounts: Tuple[str, ...] = ()   # raw "host:container[:opts]" strings, interpolated, unresolved
    env: Tuple[Tuple[str, str], ...] = ()  # ((key, value), ...)
    root: bool = True


class ModuleSpec(NamedTuple):
    """One environment module of x-slurm.modules, with where it was written (for preflight)."""
    name: str                      # as `module load` takes it, e.g. gcc/12.2
    location: str = ""             # "compose.yaml:12", the line that names it


class ServiceSlurmSpec(NamedTuple):
    nodes: Optional[int] = None
    ntasks: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    gpus: Optional[int] = None
    gres: Optional[str] = None
    extra_srun_args: Tuple[str, ...] = ()
    failure_policy: FailurePolicy = FailurePolicy()
    runtime: Optional[str] = None  # per-service override of x-slurm.runtime (None = inherit)
    signal: Optional["ServiceSignalSpec"] = None  # None: forward the job's signal as it is
    mem: Optional[str] = None      # srun --mem of the service's step
    time: Optional[str] = None     # srun --time of the service's step
    mpi: Optional[str] = None      # srun --mpi=TYPE (pmix, pmi2, ...)
    modules: Tuple[ModuleSpec, ...] = ()  # loaded after the job-level x-slurm.modules


class ServiceSpec(NamedTuple):
    name: str
    image: Optional[str]           # None is allowed only with the host runtime
    command: Union[str, Tuple[str, ...], None] = None  # str: shell form; tuple: exec form
    entrypoint: Union[str, Tuple[str, ...], None] = None  # same forms as command
    # ((key, value), ...) in declared order (map form: file order)
    environment: Tuple[Tuple[str, str], ...] = ()
    volumes: Tuple[str, ...] = ()  # raw "host:container[:opts]" strings, interpolated, unresolved
    working_dir: Optional[str] = None
    # ((service, condition), ...) condition: _DEPENDENCY_CONDITIONS
    depends_on: Tuple[Tuple[str, str], ...] = ()
    readiness: Optional[ReadinessSpec] = None  # healthcheck already folded in
    slurm: ServiceSlurmSpec = ServiceSlurmSpec()
    prepare: Optional[PrepareSpec] = None      # x-enroot.prepare
    runtime: str = _DEFAULT_RUNTIME # resolved: service x-slurm.runtime, else top-level, else pyxis
    line: Optional[int] = None     # line of the service's key in the compose file
    profiles: Tuple[str, ...] = ()  # Compose profiles; () = always active
    file: Optional[str] = None     # the file of the service's key, when not the first file
    secrets: Tuple["ServiceSecret", ...] = ()  # in declared order


class MetricsSpec(NamedTuple):
    enabled: bool = True
    interval_seconds: int = 5
    collectors: Tuple[str, ...] = ("gpu", "slurm")


class ArtifactsSpec(NamedTuple):
    export_dir: str
    collect: str = "always"        # always | on_success | on_failure
    paths: Tuple[str, ...] = ()    # the implicit "default" bundle
    bundles: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # ((name, (path, ...)), ...)


class ResumeSpec(NamedTuple):
    path: str


class SignalSpec(NamedTuple):
    """x-slurm.signal: Slurm warns the batch shell ``before`` seconds ahead of the time limit."""
    name: str                      # USR1 | USR2 (the batch shell traps both)
    before: int                    # seconds
    on_signal: str = "forward"     # forward | requeue
    grace: Optional[int] = None    # requeue: seconds the services get to exit before the requeue
    max_attempts: Optional[int] = None  # requeue: the attempt that may not requeue itself any more


class ServiceSignalSpec(NamedTuple):
    """services.<name>.x-slurm.signal: what the service receives when the job is signalled."""
    name: Optional[str] = None     # None: the signal the batch shell received
    forward: bool = True


class SlurmSpec(NamedTuple):
    job_name: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    nodes: Optional[int] = None
    ntasks: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    gres: Optional[str] = None
    gpus: Optional[int] = None
    constraint: Optional[str] = None
    output: Optional[str] = None
    error: Optional[str] = None
    chdir: Optional[str] = None
    cache_dir: Optional[str] = None  # interpolated string, unresolved (planner resolves)
    metrics: Optional[MetricsSpec] = None
    artifacts: Optional[ArtifactsSpec] = None
    resume: Optional[ResumeSpec] = None
    setup: Tuple[str, ...] = ()
    submit_args: Tuple[str, ...] = ()
    runtime: str = _DEFAULT_RUNTIME # hpc-compose extension: pyxis | host
    share_with_group: bool = False # job directory and service logs readable by the group
    signal: Optional[SignalSpec] = None
    requeue: Optional[bool] = None  # None | True | False (--requeue / --no-requeue)
    dependency: Optional[str] = None  # a Slurm dependency expression
    array: Optional[str] = None    # a Slurm array expression such as "0-15%4"
    # sbatch options checked against _SLURM_GRAMMARS, rendered as --mem-per-cpu=... and so on
    mem_per_cpu: Optional[str] = None
    mem_per_gpu: Optional[str] = None
    gpus_per_node: Optional[str] = None
    gpus_per_task: Optional[str] = None
    reservation: Optional[str] = None
    licenses: Optional[str] = None
    nodelist: Optional[str] = None
    exclude: Optional[str] = None
    begin: Optional[str] = None
    mail_type: Optional[str] = None
    mail_user: Optional[str] = None
    cpus_per_gpu: Optional[int] = None
    exclusive: Union[bool, str, None] = None  # True: --exclusive; "user"/"mcs": --exclusive=MODE
    modules: Tuple[ModuleSpec, ...] = ()  # environment modules every service loads
    modules_path: Tuple[str, ...] = ()  # `module use` folders, unresolved (planner resolves)


class ComposeSpec(NamedTuple):
    path: str                      # absolute path of the compose file
    project_dir: str               # its directory: relative paths, .env, .hpc-compose/ live here
    name: Optional[str]            # top-level name
    version: Optional[str]         # top-level version, as written (not interpreted)
    slurm: SlurmSpec
    services: Tuple[ServiceSpec, ...]  # in file order
    warnings: Tuple[str, ...] = ()  # human-readable warnings (e.g. misspelt x- keys)
    files: Tuple[str, ...] = ()    # every compose file merged, in order (path is the first)
    profiles: Tuple[str, ...] = ()  # every profile named by a service, sorted
    secrets: Tuple["SecretSpec", ...] = ()  # top-level secrets, in file order
    sweep: Optional["SweepSpec"] = None  # x-sweep: slurm.array then holds its array expression


class SweepTask(NamedTuple):
    """One task of a sweep: its array index, its parameters (in x-sweep.matrix order), its replicate."""
    index: int
    params: Tuple[Tuple[str, str], ...]
    replicate: int = 0


class SweepSpec(NamedTuple):
    """x-sweep: a parameter matrix run as one job array, one task per combination and replicate."""
    parameters: Tuple[str, ...]    # names, in matrix order
    tasks: Tuple[SweepTask, ...]   # index order: combinations in order, each one's replicates
    replicates: int = 1
    max_parallel: Optional[int] = None
    results: Tuple[str, ...] = ("result.json",)  # files under the task's job directory


class SecretSpec(NamedTuple):
    """A top-level secret: where its value comes from, never the value itself."""
    name: str
    source: str                    # file | environment
    reference: str                 # file: the path (planner: absolute); environment: the variable
    line: Optional[int] = None


class ServiceSecret(NamedTuple):
    source: str                    # the top-level secret's name
    target: str                    # file name under /run/secrets (default: the secret's name)
    mode: Optional[int] = None     # owner permission bits of the copy (None = 0600)


# --- accepted keys --------------------------------------------------------------------------------

_FAILURE_MODES = ("fail_job", "ignore", "restart_on_failure")
_DEFAULT_MAX_RESTARTS = 3
_DEFAULT_BACKOFF_SECONDS = 5
_READINESS_FIELDS = {
    "sleep": ("seconds",),
    "tcp": ("host", "port", "timeout_seconds"),
    "log": ("pattern", "timeout_seconds"),
    "http": ("url", "status_code", "timeout_seconds"),
}
_DEFAULT_READINESS_TIMEOUT = 60
_DEPENDENCY_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
_ENV_FILE_KEYS = ("path", "required", "format")
_METRICS_COLLECTORS = ("gpu", "slurm")
_ARTIFACT_COLLECT = ("always", "on_success", "on_failure")
_JOB_SIGNALS = ("USR1", "USR2")     # the batch shell passes these on; TERM/INT/HUP end the job
_SERVICE_SIGNALS = ("HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "CONT", "WINCH", "URG")
_ON_SIGNAL_ACTIONS = ("forward", "requeue")
_EXCLUSIVE_MODES = ("user", "mcs")  # --exclusive=MODE; true is plain --exclusive
_DEFAULT_MAX_ATTEMPTS = 5
_DEFAULT_SWEEP_RESULTS = ("result.json",)
# `((param.NAME))` in command, entrypoint, environment values and volumes: the task's value, filled
# in at run time. Not `${...}`, which is Compose interpolation, read when the file is loaded.
_SWEEP_PLACEHOLDER_PATTERN = r"\(\(param\.([A-Za-z_][A-Za-z0-9_]*)\)\)"
_SWEEP_PARAM_PREFIX = "HPC_COMPOSE_PARAM_"

# --- Slurm's value grammar ------------------------------------------------------------------------
# What sbatch and srun parse themselves (Slurm's parse_time.c time_str2mins, proc_args.c
# str_to_mbytes, gres.c, slurm_opt.c): a value they refuse is refused at validate, with the forms
# they accept in the hint. Patterns are written once, in the dialect both Python's re and JSON
# Schema (ECMA 262) read: no \A, \Z, (?i) or lookbehind; `hpc-compose schema` prints them as they are.

class _SlurmGrammar(NamedTuple):
    """The accepted forms of one Slurm option's value, as a regex and as words for the hint."""
    pattern: str                   # anchored with ^...$, matched with re.fullmatch
    forms: str                     # the accepted forms, for the error's hint


def _any_case(word):
    """``abc`` -> ``[Aa][Bb][Cc]``: a case-insensitive word in a pattern JSON Schema can read."""
    return "".join("[%s%s]" % (c.upper(), c.lower()) if c.isalpha() else c for c in word)


_SLURM_NAME = "[A-Za-z0-9_][A-Za-z0-9_.-]*"
_GRES_ITEM = ("(%s/)?[A-Za-z][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]*[A-Za-z_.-][A-Za-z0-9_.-]*)?"
              "(:[0-9]+[KkMmGg]?)?" % _any_case("gres"))
_MEMORY_GRAMMAR = _SlurmGrammar(
    "^[0-9]+([KkMmGgTt][Bb]?)?$",
    "a whole number with an optional unit K, M (the default), G or T: 8G, 512M, 2048, 4GB")
_GPU_COUNT_GRAMMAR = _SlurmGrammar(
    "^([A-Za-z][A-Za-z0-9_.-]*:)?[0-9]+$", "a count, or type:count: 2, a100:2")
_MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
               "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
_MAIL_TYPE_WORD = "(%s)" % "|".join(_any_case(name) for name in sorted(_MAIL_TYPES, key=len,
                                                                       reverse=True))
_BEGIN_WORDS = ("now", "today", "tomorrow", "midnight", "noon", "elevenses", "fika", "teatime")
_SLURM_GRAMMARS = {
    "time": _SlurmGrammar(
        "^([0-9]+(:[0-9]+){0,2}|[0-9]+-([0-9]+(:[0-9]+){0,2})?|-1|%s|%s)$"
        % (_any_case("unlimited"), _any_case("infinite")),
        "minutes (90), MM:SS (61:00), HH:MM:SS (01:00:00), D-HH (1-12), D-HH:MM:SS "
        "(2-12:00:00) or UNLIMITED"),
    "mem": _MEMORY_GRAMMAR,
    "mem_per_cpu": _MEMORY_GRAMMAR,
    "mem_per_gpu": _MEMORY_GRAMMAR,
    "gres": _SlurmGrammar(
        "^%s(,%s)*$" % (_GRES_ITEM, _GRES_ITEM),
        "name[:type][:count], comma-separated: gpu:2, gpu:a100:2, gpu:1,shard:2"),
    "gpus_per_node": _GPU_COUNT_GRAMMAR,
    "gpus_per_task": _GPU_COUNT_GRAMMAR,
    "licenses": _SlurmGrammar(
        "^[A-Za-z0-9_.@-]+(:[0-9]+)?([,|][A-Za-z0-9_.@-]+(:[0-9]+)?)*$",
        "name[:count], comma-separated: matlab:2,ansys"),
    "nodelist": _SlurmGrammar(
        "^[A-Za-z0-9_.,\\[\\]/-]+$", "a host list without spaces: node[01-04],node07"),
    "exclude": _SlurmGrammar(
        "^[A-Za-z0-9_.,\\[\\]/-]+$", "a host list without spaces: node[01-04],node07"),
    "partition": _SlurmGrammar(
        "^%s(,%s)*$" % (_SLURM_NAME, _SLURM_NAME), "a partition name, or several with commas"),
    "reservation": _SlurmGrammar(
        "^%s(,%s)*$" % (_SLURM_NAME, _SLURM_NAME), "a reservation name, or several with commas"),
    "begin": _SlurmGrammar(
        "^(%s(\\+[0-9]+(%s)?)?|%s|[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{1,2}:[0-9]{2}(:[0-9]{2})?)?"
        "|[0-9]{1,2}:[0-9]{2}(:[0-9]{2})?(%s|%s)?|[0-9]{1,2}[/.][0-9]{1,2}([/.][0-9]{2,4})?"
        "|[0-9]{4}([0-9]{2})?)$"
        % (_any_case("now"), "|".join(_any_case(unit) for unit in (
            "seconds", "minutes", "hours", "days", "weeks")),
           "|".join(_any_case(word) for word in _BEGIN_WORDS[1:]), _any_case("am"),
           _any_case("pm")),
        "now+1hours, 2030-01-31T16:00:00, 16:00, 12/31, tomorrow, midnight"),
    "mail_type": _SlurmGrammar(
        "^%s(,%s)*$" % (_MAIL_TYPE_WORD, _MAIL_TYPE_WORD),
        "comma-separated: " + ", ".join(_MAIL_TYPES)),
    "mail_user": _SlurmGrammar("^[^\\s,]+(,[^\\s,]+)*$", "an address: someone@example.org"),
}


def _check_slurm_value(key, text):
    """``text`` if Slurm's own parser accepts it for option ``key``; raises ``_Invalid``."""
    import re
    grammar = _SLURM_GRAMMARS[key]
    if re.fullmatch(grammar.pattern, text):
        return text
    # The value itself is not repeated: it may come from the environment (a secret, a 6 MB line).
    raise _Invalid("the value (%d characters) is not a value Slurm accepts for --%s"
                   % (len(text), key.replace("_", "-")), hint="write " + grammar.forms)


def _excerpt(text, limit=60):
    """``text`` quoted, cut to ``limit`` characters: an error shows the start of a huge value."""
    if len(text) <= limit:
        return repr(text)
    return "%r... (%d characters)" % (text[:limit], len(text))


def _memory_megabytes(text):
    """Megabytes of a Slurm memory value (``8G``, ``512``, ``4GB``), or None if it is not one."""
    import re
    match = re.fullmatch("([0-9]+)([KkMmGgTt]?)[Bb]?", str(text).strip())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).upper()
    if unit == "K":
        return (number + 1023) // 1024
    return number * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]


# x-slurm.mpi: srun's --mpi plugin names (pmix, pmix_v4, pmi2, cray_shasta, none); which ones a
# cluster has, preflight asks `srun --mpi=list`. x-slurm.modules: what `module load` takes (gcc,
# gcc/12.2, openmpi/4.1.4-cuda): no blanks, no leading '-' (an option to `module`).
_MPI_TYPE_PATTERN = "^[a-z][a-z0-9_]*$"
_MODULE_NAME_PATTERN = "^[^-\\s][^\\s]*$"


# --- the file format: one table for the validator's key lists and for `hpc-compose schema` --------

class _Field(NamedTuple):
    """One key of the compose file format. The validator's accepted keys and the JSON Schema
    printed by ``hpc-compose schema`` are both read from these records, so they cannot drift."""
    name: str
    kind: str                      # a key of _SCHEMA_KINDS, or "mapping" (then ``fields``)
    description: str
    # kind "choice" (create_host_path's only choice is true), or the items of kind "choices"
    choices: Tuple[Union[str, bool], ...] = ()
    default: object = None         # any JSON value the schema shows (str, int, bool, list)
    fields: Tuple["_Field", ...] = ()  # kind "mapping": its keys
    minimum: int = 1               # kind "count"
    extensions: bool = False       # kind "mapping": x-* keys are accepted (and ignored)


def _field_names(fields):
    return tuple(field.name for field in fields)


_RUNTIMES_FIELD_TEXT = ("pyxis (a container through Pyxis/Enroot), apptainer or singularity (srun "
                        "apptainer exec), or host (plain srun on the node)")
_SLURM_STRING_FIELDS = (
    _Field("job_name", "text", "#SBATCH --job-name (default: name, else hpc-compose)"),
    _Field("partition", "slurm_value", "#SBATCH --partition"),
    _Field("account", "text", "#SBATCH --account"),
    _Field("qos", "text", "#SBATCH --qos"),
    _Field("time", "slurm_value", "#SBATCH --time: 90 (minutes), \"01:00:00\", \"2-12:00:00\""),
    _Field("mem", "slurm_value", "#SBATCH --mem (per node), e.g. 8G"),
    _Field("gres", "slurm_value", "#SBATCH --gres (wins over gpus)"),
    _Field("constraint", "text", "#SBATCH --constraint"),
    _Field("output", "text", "#SBATCH --output (the batch log)"),
    _Field("error", "text", "#SBATCH --error"),
    _Field("chdir", "text", "#SBATCH --chdir"),
    _Field("cache_dir", "text", "shared image cache directory, visible from every node",
           default="$HOME/.cache/hpc-compose"),
    _Field("mem_per_cpu", "slurm_value", "#SBATCH --mem-per-cpu, e.g. 2G (not with mem)"),
    _Field("mem_per_gpu", "slurm_value", "#SBATCH --mem-per-gpu, e.g. 16G (not with mem)"),
    _Field("gpus_per_node", "slurm_value", "#SBATCH --gpus-per-node, e.g. 4 or a100:4"),
    _Field("gpus_per_task", "slurm_value", "#SBATCH --gpus-per-task, e.g. 1"),
    _Field("reservation", "slurm_value", "#SBATCH --reservation"),
    _Field("licenses", "slurm_value", "#SBATCH --licenses, e.g. matlab:2"),
    _Field("nodelist", "slurm_value", "#SBATCH --nodelist, e.g. node[01-04]"),
    _Field("exclude", "slurm_value", "#SBATCH --exclude, e.g. node07"),
    _Field("begin", "slurm_value", "#SBATCH --begin, e.g. now+1hours or 2030-01-31T16:00:00"),
    _Field("mail_type", "slurm_value", "#SBATCH --mail-type, e.g. END,FAIL"),
    _Field("mail_user", "slurm_value", "#SBATCH --mail-user"),
)
_SLURM_COUNT_FIELDS = (
    _Field("nodes", "count", "allocation node count", default=1),
    _Field("ntasks", "count", "#SBATCH --ntasks"),
    _Field("ntasks_per_node", "count", "#SBATCH --ntasks-per-node"),
    _Field("cpus_per_task", "count", "#SBATCH --cpus-per-task"),
    _Field("gpus", "count", "#SBATCH --gpus, used only when gres is not set"),
    _Field("cpus_per_gpu", "count", "#SBATCH --cpus-per-gpu"),
)
_METRICS_FIELDS = (
    _Field("enabled", "boolean", "sample metrics while the job runs", default=True),
    _Field("interval_seconds", "count", "seconds between samples", default=5),
    _Field("collectors", "choices", "what to sample", choices=_METRICS_COLLECTORS,
           default=list(_METRICS_COLLECTORS)),
)
_ARTIFACTS_FIELDS = (
    _Field("collect", "choice", "when teardown collects the artifacts",
           choices=_ARTIFACT_COLLECT, default="always"),
    _Field("export_dir", "text", "where 'hpc-compose artifacts' exports them (${SLURM_JOB_ID} "
                                 "is expanded at export time)"),
    _Field("paths", "texts", "paths collected into the default bundle"),
    _Field("bundles", "bundles", "named bundles: name -> {paths: [...]}"),
)
_SIGNAL_FIELDS = (
    _Field("name", "signal_name", "the signal: USR1 or USR2 (SIG prefix and case optional)",
           choices=_JOB_SIGNALS, default="USR1"),
    _Field("before", "duration", "how long before the time limit Slurm sends it (30s, 5m, 1m30s; "
                                 "at most 65535 s)"),
    _Field("on_signal", "choice", "forward: pass it to the services; requeue: also requeue the "
                                  "job after grace", choices=_ON_SIGNAL_ACTIONS, default="forward"),
    _Field("grace", "duration", "requeue: time the services get to exit before the requeue "
                                "(default: half of before)"),
    _Field("max_attempts", "count", "requeue: the attempt that runs on to the time limit instead",
           default=_DEFAULT_MAX_ATTEMPTS),
)
_SERVICE_SIGNAL_FIELDS = (
    _Field("name", "signal_name", "the signal the service receives (default: the one the batch "
                                  "shell received)", choices=_SERVICE_SIGNALS),
    _Field("forward", "boolean", "false: the service is not signalled", default=True),
)
_SLURM_FIELDS = _SLURM_STRING_FIELDS + _SLURM_COUNT_FIELDS + (
    _Field("metrics", "mapping", "runtime metrics sampling", fields=_METRICS_FIELDS),
    _Field("artifacts", "mapping", "artifact collection and export", fields=_ARTIFACTS_FIELDS),
    _Field("resume", "mapping", "a shared resume directory mounted into every service",
           fields=(_Field("path", "text", "absolute host path on shared storage"),)),
    _Field("setup", "texts", "shell lines run in the batch script before any service (not "
                             "interpolated)"),
    _Field("submit_args", "texts", "extra raw #SBATCH arguments"),
    _Field("runtime", "choice", _RUNTIMES_FIELD_TEXT, choices=_RUNTIMES, default=_DEFAULT_RUNTIME),
    _Field("share_with_group", "boolean", "job directory and service logs readable by the group "
                                          "(0750/0640 instead of owner-only)", default=False),
    _Field("signal", "mapping", "a warning signal before the time limit (#SBATCH --signal=B:...)",
           fields=_SIGNAL_FIELDS),
    _Field("requeue", "boolean", "#SBATCH --requeue (true) or --no-requeue (false)"),
    _Field("dependency", "text", "#SBATCH --dependency, e.g. afterok:12345 (submit --after adds "
                                 "to it)"),
    _Field("array", "text", "#SBATCH --array, e.g. \"0-15%4\": one task per index"),
    _Field("exclusive", "exclusive", "#SBATCH --exclusive: true, or user or mcs "
                                     "(--exclusive=user)"),
    _Field("modules", "modules", "environment modules every service's step loads (module load), "
                                 "e.g. gcc/12.2"),
    _Field("modules_path", "texts", "folders of modulefiles to add first (module use); relative "
                                    "to the compose file"),
)
_FAILURE_POLICY_FIELDS = (
    _Field("mode", "choice", "what a non-zero exit does", choices=_FAILURE_MODES,
           default="fail_job"),
    _Field("max_restarts", "count", "relaunches after the first launch (restart_on_failure)",
           default=3),
    _Field("backoff_seconds", "count", "delay between relaunches (restart_on_failure)",
           default=5),
)
_SERVICE_SLURM_FIELDS = (
    _Field("nodes", "count", "1 (a helper) or the allocation's node count (distributed)"),
    _Field("ntasks", "count", "srun --ntasks"),
    _Field("ntasks_per_node", "count", "srun --ntasks-per-node"),
    _Field("cpus_per_task", "count", "srun --cpus-per-task"),
    _Field("gpus", "count", "srun --gpus, used only when gres is not set"),
    _Field("gres", "slurm_value", "srun --gres (wins over gpus)"),
    _Field("mem", "slurm_value", "srun --mem: the step's memory per node, e.g. 4G"),
    _Field("time", "slurm_value", "srun --time: the step's time limit, e.g. 30 or \"00:30:00\""),
    _Field("extra_srun_args", "texts", "arguments appended to the service's srun"),
    _Field("failure_policy", "mapping", "what happens when the service exits non-zero",
           fields=_FAILURE_POLICY_FIELDS),
    _Field("runtime", "choice", _RUNTIMES_FIELD_TEXT + " for this service", choices=_RUNTIMES),
    _Field("signal", "service_signal", "what the service receives when the job is signalled: "
                                       "{name, forward}, or false", fields=_SERVICE_SIGNAL_FIELDS),
    _Field("mpi", "mpi", "srun --mpi=TYPE: the MPI wire-up (pmix, pmi2, ... as srun --mpi=list "
                         "shows), a string or {type: TYPE}"),
    _Field("modules", "modules", "environment modules this service's step loads too, after "
                                 "x-slurm.modules"),
)
_READINESS_SCHEMA_FIELDS = (
    _Field("type", "choice", "how readiness is checked", choices=("sleep", "tcp", "log", "http")),
    _Field("seconds", "count", "sleep: seconds after the launch", minimum=0),
    _Field("host", "text", "tcp: host to connect to", default="127.0.0.1"),
    _Field("port", "count", "tcp: port to connect to"),
    _Field("pattern", "text", "log: literal text to wait for in the service log"),
    _Field("url", "text", "http: the http:// or https:// URL to poll"),
    _Field("status_code", "count", "http: the expected status code", default=200, minimum=100),
    _Field("timeout_seconds", "count", "tcp/log/http: give up after this many seconds",
           default=60),
)
_HEALTHCHECK_FIELDS = (
    _Field("test", "command", "CMD/CMD-SHELL list or a shell string: nc -z, curl or wget "
                              "--spider probes become readiness"),
    _Field("timeout", "text", "overall readiness timeout, e.g. 60s", default="60s"),
    _Field("disable", "boolean", "no readiness", default=False),
    _Field("interval", "unsupported", "not supported: readiness is polled every second"),
    _Field("retries", "unsupported", "not supported: readiness is polled every second"),
    _Field("start_period", "unsupported", "not supported: readiness is polled every second"),
    _Field("start_interval", "unsupported", "not supported: readiness is polled every second"),
)
_VOLUME_FIELDS = (
    _Field("type", "choice", "only bind is supported (named volumes and tmpfs are not)",
           choices=("bind",)),
    _Field("source", "text", "the host path"),
    _Field("target", "text", "the absolute container path"),
    _Field("read_only", "boolean", "mount read-only", default=False),
    _Field("bind", "mapping", "bind options", fields=(
        _Field("create_host_path", "choice", "only true: a missing source folder is created",
               choices=(True,), default=True),)),
)
_PREPARE_FIELDS = (
    _Field("commands", "texts", "shell commands run in the image by enroot (not interpolated)"),
    _Field("mounts", "volumes", "host:container[:options] mounts (or type: bind) visible only "
                                "during prepare", fields=_VOLUME_FIELDS),
    _Field("env", "environment", "environment only during prepare"),
    _Field("root", "boolean", "run the commands with enroot --root", default=True),
)
_SECRET_FIELDS = (
    _Field("file", "text", "a file on the login node holding the value (relative to the "
                           "compose file)"),
    _Field("environment", "text", "a variable of the shell or .env holding the value (its "
                                  "name, without $)"),
)
_SERVICE_SECRET_FIELDS = (
    _Field("source", "text", "the top-level secret's name"),
    _Field("target", "text", "file name under /run/secrets (default: the secret's name)"),
    _Field("mode", "mode", "owner permission bits of the copy, e.g. 0400 (default: 0600)"),
)
_SERVICE_FIELDS = (
    _Field("image", "text", "registry reference (redis:7) or a local .sqsh/.squashfs file"),
    _Field("command", "command", "a string (shell form, /bin/sh -c) or a list (exec form)"),
    _Field("entrypoint", "command", "same forms as command"),
    _Field("environment", "environment", "variables for the service: a mapping or KEY=VALUE "
                                         "list (wins over env_file)"),
    _Field("env_file", "env_file", "files of KEY=VALUE lines for the service's environment"),
    _Field("volumes", "volumes", "bind mounts: host:container[:ro|rw], or the long syntax "
                                 "with type: bind", fields=_VOLUME_FIELDS),
    _Field("working_dir", "text", "working directory (needs command or entrypoint)"),
    _Field("depends_on", "depends_on", "services to start first: a list, or name -> {condition}"),
    _Field("profiles", "texts", "Compose profiles: the service runs only when one is active"),
    _Field("extends", "extends", "start from another service: NAME or {service, file}"),
    _Field("readiness", "readiness", "when the service counts as ready (for service_healthy)",
           fields=_READINESS_SCHEMA_FIELDS),
    _Field("healthcheck", "mapping", "Compose healthcheck, for the probes readiness can express",
           fields=_HEALTHCHECK_FIELDS),
    _Field("x-slurm", "mapping", "per-service Slurm settings", fields=_SERVICE_SLURM_FIELDS),
    _Field("x-enroot", "mapping", "image preparation", fields=(
        _Field("prepare", "mapping", "customize the image once, on the login node",
               fields=_PREPARE_FIELDS),)),
    _Field("secrets", "service_secrets", "top-level secrets this service reads as owner-only "
                                         "files under /run/secrets", fields=_SERVICE_SECRET_FIELDS),
)
_SWEEP_FIELDS = (
    _Field("matrix", "sweep_matrix", "parameter name -> list of values: every combination runs"),
    _Field("include", "sweep_combinations", "extra combinations, each naming every parameter"),
    _Field("exclude", "sweep_combinations", "combinations to skip: each removes every combination "
                                            "that matches all of its keys"),
    _Field("replicates", "count", "run each combination N times (HPC_COMPOSE_REPLICATE 0..N-1)",
           default=1),
    _Field("max_parallel", "count", "at most N tasks at once: the array's %N"),
    _Field("results", "texts", "result files a service writes into $HPC_COMPOSE_JOB_DIR, read by "
                               "sweep status", default=list(_DEFAULT_SWEEP_RESULTS)),
)
_TOP_LEVEL_FIELDS = (
    _Field("name", "text", "project name; the Slurm job name when x-slurm.job_name is not set"),
    _Field("version", "text", "accepted for Compose compatibility and ignored"),
    _Field("services", "services", "the services, each run as one srun step"),
    _Field("x-slurm", "mapping", "Slurm settings and shared runtime defaults",
           fields=_SLURM_FIELDS),
    _Field("secrets", "secrets", "secrets: name -> {file: PATH} or {environment: VARIABLE}; "
                                 "values never enter the batch script", fields=_SECRET_FIELDS),
    _Field("x-sweep", "mapping", "a parameter sweep, run as one job array (docs/sweeps.md)",
           fields=_SWEEP_FIELDS),
)


_TEXT_TYPES = ["string", "number", "boolean"]     # a scalar is read as the text written
_INTERPOLATED = {"type": "string", "pattern": "\\$"}   # ${VAR} checked once interpolated
_ENV_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"


def _choice_schema(choices):
    return {"anyOf": [{"enum": list(choices)}, _INTERPOLATED]}


def _signal_name_pattern(names):
    """A regex for ``names`` as the loader reads them: any case, optional SIG prefix."""
    def any_case(text):
        return "".join("[%s%s]" % (c.upper(), c.lower()) if c.isalpha() else c for c in text)
    return "^\\s*(%s)?(%s)\\s*$" % (any_case("SIG"), "|".join(any_case(n) for n in names))


def _field_schema(field):
    """The JSON Schema (draft-07) of one field, with its description and default."""
    import re
    kind = field.kind
    text = {"type": _TEXT_TYPES}
    texts = {"type": ["array", "null"], "items": text}
    if kind == "mapping":
        schema = _mapping_schema(field.fields, field.extensions)
        schema["type"] = ["object", "null"]
    elif kind == "readiness":
        schema = _mapping_schema(field.fields, False)
        schema.update(type="object", required=["type"], allOf=[
            {"if": {"properties": {"type": {"const": kind_name}}},
             "then": {"propertyNames": {"enum": ["type"] + list(names)}}}
            for kind_name, names in sorted(_READINESS_FIELDS.items())])
    elif kind == "text":
        schema = dict(text)
    elif kind == "slurm_value":
        pattern = _SLURM_GRAMMARS[field.name].pattern
        schema = {"anyOf": [{"type": "string", "pattern": pattern}, _INTERPOLATED]}
        if re.fullmatch(pattern, "0"):     # time in minutes, memory in megabytes
            schema["anyOf"].insert(1, {"type": "integer", "minimum": 0})
    elif kind == "exclusive":
        schema = {"anyOf": [{"type": "boolean"}, _choice_schema(_EXCLUSIVE_MODES)]}
    elif kind == "count":
        schema = {"anyOf": [{"type": "integer", "minimum": field.minimum},
                            {"type": "string", "pattern": "^\\s*[0-9]+\\s*$|\\$"}]}
    elif kind == "boolean":
        schema = {"type": "boolean"}
    elif kind == "choice":
        schema = _choice_schema(field.choices)
    elif kind == "choices":
        schema = {"type": ["array", "null"], "items": _choice_schema(field.choices),
                  "uniqueItems": True}
    elif kind == "texts":
        schema = texts
    elif kind == "command":
        schema = {"type": ["string", "array", "null"], "items": text}
    elif kind == "environment":
        schema = {"anyOf": [
            {"type": "object", "additionalProperties": False,
             "patternProperties": {_ENV_NAME_PATTERN: {"type": _TEXT_TYPES + ["null"]}}},
            {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*="}},
            {"type": "null"}]}
    elif kind == "env_file":
        entry = {"anyOf": [{"type": "string"}, {
            "type": "object", "required": ["path"], "additionalProperties": False,
            "properties": {"path": {"type": "string", "description": "the file"},
                           "required": {"type": "boolean", "default": True,
                                        "description": "false: a missing file is skipped"},
                           "format": {"enum": ["raw"], "description": "raw: values are literal"}}}]}
        schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": entry},
                            {"type": "null"}]}
    elif kind == "depends_on":
        condition = {"type": ["object", "null"], "additionalProperties": False, "properties": {
            "condition": dict(_choice_schema(_DEPENDENCY_CONDITIONS),
                              description="what the dependency must reach first",
                              default="service_started")}}
        schema = {"anyOf": [{"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                            {"type": "object", "additionalProperties": condition},
                            {"type": "null"}]}
    elif kind == "extends":
        schema = {"anyOf": [{"type": "string"}, {
            "type": "object", "required": ["service"], "additionalProperties": False,
            "properties": {"service": {"type": "string", "description": "the service to extend"},
                           "file": {"type": "string",
                                    "description": "the compose file that defines it"}}}]}
    elif kind == "volumes":
        long_syntax = _mapping_schema(field.fields, False)
        long_syntax.update(type="object", required=["type", "source", "target"])
        schema = {"type": ["array", "null"], "items": {"anyOf": [{"type": "string"},
                                                                  long_syntax]}}
    elif kind == "sweep_matrix":
        schema = {"type": ["object", "null"], "additionalProperties": False,
                  "patternProperties": {_ENV_NAME_PATTERN: {"type": "array", "minItems": 1,
                                                            "items": text}}}
    elif kind == "sweep_combinations":
        schema = {"type": ["array", "null"], "items": {
            "type": "object", "minProperties": 1, "additionalProperties": False,
            "patternProperties": {_ENV_NAME_PATTERN: text}}}
    elif kind == "duration":
        # Read as written (not interpolated): seconds, or h/m/s parts such as 1m30s.
        schema = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern":
                            "^\\s*([0-9]+|(?=[0-9])([0-9]+h)?([0-9]+m)?([0-9]+s)?)\\s*$"}]}
    elif kind == "signal_name":
        schema = {"anyOf": [{"type": "string", "pattern": _signal_name_pattern(field.choices)},
                            _INTERPOLATED]}
    elif kind == "service_signal":
        signal = _mapping_schema(field.fields, False)
        signal["type"] = ["object", "null"]
        schema = {"anyOf": [{"const": False}, signal]}
    elif kind == "mpi":
        mpi_type = {"type": "string", "pattern": _MPI_TYPE_PATTERN}
        schema = {"anyOf": [mpi_type, {"type": "object", "required": ["type"],
                                       "additionalProperties": False,
                                       "properties": {"type": mpi_type}}]}
    elif kind == "modules":
        schema = {"type": ["array", "null"],
                  "items": {"type": "string", "pattern": _MODULE_NAME_PATTERN}}
    elif kind == "mode":
        schema = {"anyOf": [{"type": "integer", "minimum": 0},
                            {"type": "string", "pattern": "^\\s*(0[oO])?[0-7]{1,4}\\s*$"}]}
    elif kind == "secrets":
        secret = _mapping_schema(field.fields, False)
        secret.update(type="object", oneOf=[{"required": [name]} for name in
                                            _field_names(field.fields)])
        schema = {"type": ["object", "null"], "additionalProperties": False,
                  "patternProperties": {"^[A-Za-z0-9][A-Za-z0-9_.-]*$": secret}}
    elif kind == "service_secrets":
        long_syntax = _mapping_schema(field.fields, False)
        long_syntax.update(type="object", required=["source"])
        schema = {"type": ["array", "null"], "items": {"anyOf": [{"type": "string"},
                                                                  long_syntax]}}
    elif kind == "services":
        service = _mapping_schema(_SERVICE_FIELDS, True)
        service["type"] = "object"
        schema = {"type": "object", "minProperties": 1, "additionalProperties": False,
                  "patternProperties": {"^[A-Za-z0-9][A-Za-z0-9_.-]*$": service}}
    elif kind == "bundles":
        bundle = {"type": "object", "required": ["paths"], "additionalProperties": False,
                  "properties": {"paths": dict(texts, description="paths in this bundle")}}
        schema = {"type": ["object", "null"], "additionalProperties": False,
                  "propertyNames": {"not": {"const": "default"}},
                  "patternProperties": {"^[A-Za-z0-9_-]+$": bundle}}
    else:   # "unsupported": the validator names the key and says why
        schema = {"not": {}}
    schema["description"] = field.description
    if field.default is not None:
        schema["default"] = field.default
    return schema


def _mapping_schema(fields, extensions):
    schema = {"properties": dict((field.name, _field_schema(field)) for field in fields),
              "additionalProperties": False}
    if extensions:
        # x-* keys are accepted and ignored (the place for YAML anchors).
        schema["patternProperties"] = {"^x-": {}}
    return schema


def _compose_json_schema():
    """The JSON Schema (draft-07) of the compose file format, from the validator's table."""
    schema = _mapping_schema(_TOP_LEVEL_FIELDS, True)
    schema.update({"$schema": "http://json-schema.org/draft-07/schema#",
                   "title": "hpc-compose file (hpc-compose %s)" % __version__,
                   "type": "object", "required": ["services"]})
    return schema


_TOP_LEVEL_KEYS = _field_names(_TOP_LEVEL_FIELDS)
_SERVICE_KEYS = _field_names(_SERVICE_FIELDS)
_SLURM_STRING_KEYS = _field_names(_SLURM_STRING_FIELDS)
_SLURM_COUNT_KEYS = _field_names(_SLURM_COUNT_FIELDS)
_SLURM_KEYS = _field_names(_SLURM_FIELDS)
_SERVICE_SLURM_KEYS = _field_names(_SERVICE_SLURM_FIELDS)
_FAILURE_POLICY_KEYS = _field_names(_FAILURE_POLICY_FIELDS)
_SIGNAL_KEYS = _field_names(_SIGNAL_FIELDS)
_SERVICE_SIGNAL_KEYS = _field_names(_SERVICE_SIGNAL_FIELDS)
_HEALTHCHECK_KEYS = _field_names(_HEALTHCHECK_FIELDS)
_X_ENROOT_KEYS = ("prepare",)
_PREPARE_KEYS = _field_names(_PREPARE_FIELDS)
_METRICS_KEYS = _field_names(_METRICS_FIELDS)
_ARTIFACTS_KEYS = _field_names(_ARTIFACTS_FIELDS)
_RESUME_KEYS = ("path",)
_SWEEP_KEYS = _field_names(_SWEEP_FIELDS)
_SECRET_SOURCES = _field_names(_SECRET_FIELDS)
_SECRET_UNSUPPORTED = {
    "external": ("external secrets (a Swarm secret store) are not supported",
                 "use file: (a file on the login node) or environment: (a variable)"),
    "name": ("'name' (an external secret's name) is not supported",
             "use file: or environment:"),
    "content": ("inline 'content' is not supported: it would put the value in the compose file",
                "use file: (an owner-only file) or environment: (a variable)"),
}
_SERVICE_SECRET_KEYS = _field_names(_SERVICE_SECRET_FIELDS)
_SERVICE_SECRET_UNSUPPORTED = dict(
    (key, ("'%s' is not supported: the copy belongs to you, and the service runs as you" % key,
           "remove it")) for key in ("uid", "gid"))
_DEFAULT_SECRET_MODE = 0o600
_SECRET_CHECK_LIMIT = 1 << 16      # bytes: larger secret files are not searched for in spec values
_SECRET_MATCH_MIN = 8              # a value contained in a spec string must be at least this long
_MAX_SIGNAL_BEFORE = 65535          # Slurm's --signal time field is 16 bits
_REQUEUE_TEARDOWN_SECONDS = 15      # the stop grace (10 s) and a margin, after the requeue grace
_DEPENDENCY_TYPES = ("after", "afterany", "afterburstbuffer", "aftercorr", "afternotok", "afterok",
                     "singleton")

_NETWORK_HINT = ("there is no Docker network or service-name DNS: services on one node share the "
                 "host network (use 127.0.0.1); multi-node runs use HPC_COMPOSE_PRIMARY_NODE")
_UNSUPPORTED_SERVICE_KEYS = {
    "build": ("'build' is not supported",
              "use image: with a base image plus x-enroot.prepare.commands for dependencies "
              "(mount build files with x-enroot.prepare.mounts)"),
    "ports": ("'ports' is not supported",
              "remove it: services share the host network, so use 127.0.0.1:<port> when both "
              "sides run on the same node"),
    "networks": ("'networks' is not supported", _NETWORK_HINT),
    "network_mode": ("'network_mode' is not supported", _NETWORK_HINT),
    "restart": ("the Compose 'restart' key is not supported",
                "use services.<name>.x-slurm.failure_policy (mode: restart_on_failure, "
                "max_restarts, backoff_seconds)"),
    "deploy": ("'deploy' is not supported",
               "use x-slurm for resources (cpus_per_task, mem, gpus, gres) at the top level or "
               "per service"),
}
# Other Compose keys people bring along; rejected like any unknown key, but with a useful hint.
_COMPOSE_KEY_HINTS = {
    "cpus": "use x-slurm.cpus_per_task",
    "mem_limit": "use x-slurm.mem at the top level",
    "container_name": "remove it: each service runs as a Slurm step named after the service",
    "expose": "remove it: services share the host network",
    "hostname": "remove it: services run on the allocation's nodes under their real host names",
}
_UNSUPPORTED_TOP_LEVEL_KEYS = {
    "volumes": ("top-level 'volumes' (named volumes) is not supported",
                "use host-path bind mounts in services.<name>.volumes, e.g. ./data:/data"),
    "networks": ("top-level 'networks' is not supported", _NETWORK_HINT),
    "configs": ("top-level 'configs' is not supported",
                "mount the file from the host with services.<name>.volumes"),
}


_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_SERVICE_NAME_CHARS = _ALNUM | frozenset("_.-")
_BUNDLE_NAME_CHARS = _ALNUM | frozenset("_-")


def _is_service_name(name):
    """Compose's charset: ``^[A-Za-z0-9][A-Za-z0-9_.-]*$``."""
    return bool(name) and name[0] in _ALNUM and _SERVICE_NAME_CHARS.issuperset(name)


def _is_env_name(name):
    return bool(name) and name[0] in _NAME_START and _NAME_CHARS.issuperset(name)


def _expand_sweep(matrix, include=(), exclude=(), replicates=1):
    """The tasks of a sweep: the product of ``matrix`` (``((name, (value, ...)), ...)``, the first
    parameter varying slowest), less every combination that matches all the keys of an ``exclude``
    entry, plus each ``include`` combination not already there; each combination ``replicates``
    times in a row. ``include`` and ``exclude`` entries are ``((name, value), ...)``."""
    import itertools
    names = tuple(name for name, _ in matrix)
    combinations = []
    if names:
        for values in itertools.product(*(values for _, values in matrix)):
            combination = tuple(zip(names, values))
            if not any(all(pair in combination for pair in entry) for entry in exclude):
                combinations.append(combination)
    for entry in include:
        order = names or tuple(name for name, _ in include[0])
        values = dict(entry)
        combination = tuple((name, values[name]) for name in order)
        if combination not in combinations:
            combinations.append(combination)
    return tuple(SweepTask(number * replicates + replicate, combination, replicate)
                 for number, combination in enumerate(combinations)
                 for replicate in range(replicates))


def _sweep_array(sweep):
    """The x-slurm.array expression of a sweep: every task index, and %max_parallel."""
    text = "0-%d" % (len(sweep.tasks) - 1)
    if sweep.max_parallel is not None:
        text += "%%%d" % sweep.max_parallel
    return text


def _sweep_placeholders(text):
    """The parameter names ``((param.NAME))`` placeholders in ``text`` use, in order."""
    import re
    return re.findall(_SWEEP_PLACEHOLDER_PATTERN, text)


_NUL_HINT = ("no path, command line or environment variable can carry a NUL character; remove "
             "the \\0 escape")
_UNREAD = object()   # what the spec loader keeps for a field it could not read (already reported)
# A record holding it never leaves the loader (it reports the error), so no field's type names it.


class _Invalid(_HintedError):
    """A value-level problem found by a pure helper; the caller adds the location."""


# --- pure value rules shared by the spec checks and the planner -----------------------------------

_IMAGE_SCHEMES = ("docker://", "dockerd://", "podman://")
_LOCAL_IMAGE_SUFFIXES = (".sqsh", ".squashfs")


_SIF_SUFFIX = ".sif"                # a local Apptainer image: only the apptainer runtimes run it


def _classify_image(image, runtime=_DEFAULT_RUNTIME):
    """``("local", path)`` or ``("remote", normalized reference)`` for ``runtime``; raises
    ``_Invalid``."""
    apptainer = runtime in _APPTAINER_RUNTIMES
    if not image.strip():
        raise _Invalid("image is empty", hint="name a registry image (redis:7) or a local "
                                              ".sqsh/.squashfs file")
    if image != image.strip() or any(c.isspace() for c in image):
        raise _Invalid("image %r contains whitespace" % image)
    lowered = image.lower()
    looks_like_path = image.startswith(("/", "./", "../", "~/")) or image in (".", "..", "~")
    if lowered.endswith(_LOCAL_IMAGE_SUFFIXES):
        return "local", image
    if lowered.endswith(_SIF_SUFFIX) and (apptainer or looks_like_path):
        if not apptainer:
            raise _Invalid("image %r is an Apptainer .sif file, which Pyxis cannot run" % image,
                           hint="set x-slurm.runtime: apptainer, or use a .sqsh image")
        return "local", image
    if looks_like_path:
        raise _Invalid("image %r is a path but not a .sqsh or .squashfs file; build contexts are "
                       "not supported" % image,
                       hint="use a registry image plus x-enroot.prepare.commands, or point at a "
                            "squashfs image exported with enroot")
    reference = image.split("://", 1)[-1]
    name = reference.rsplit("/", 1)[-1]
    if reference.endswith((":", "@")) or name.startswith((":", "@")) or "/:" in reference:
        raise _Invalid("image %r has an empty %s (a variable that is not set?)" % (
            image, "tag" if reference.endswith((":", "@")) else "name"),
            hint="set the variable, give it a default (${TAG:-3.12}), or write the tag: "
                 "python:3.12")
    if "://" in image:
        if not image.startswith(_IMAGE_SCHEMES):
            raise _Invalid("image scheme %r is not supported" % image.split("://", 1)[0],
                           hint="use docker://, dockerd:// or podman://, or no scheme (docker:// "
                                "is assumed)")
        if not image.split("://", 1)[1]:
            raise _Invalid("image %r names no image after the scheme" % image)
        if apptainer and not image.startswith("docker://"):
            raise _Invalid("image scheme %r is not supported with the %s runtime"
                           % (image.split("://", 1)[0], runtime),
                           hint="use docker:// (or no scheme), or a local .sif or .sqsh file")
        return "remote", image
    return "remote", "docker://" + image


def _split_volume(entry, reserved=True, resume_enabled=False):
    """``(host, container, options)`` from ``host:container[:options]``; raises ``_Invalid``."""
    import posixpath
    if "," in entry:
        raise _Invalid("mount %r contains ',' which Pyxis uses to separate mounts" % entry,
                       hint="rename the path, or mount a parent directory without a comma")
    if ":" not in entry:
        raise _Invalid("mount %r needs the form host_path:container_path" % entry,
                       hint="anonymous volumes are not supported; bind a host directory, e.g. "
                            "./data:%s" % entry)
    host, rest = entry.split(":", 1)
    container, _, options = rest.partition(":")
    if not host:
        raise _Invalid("mount %r has an empty host path" % entry)
    if not host.startswith(("/", ".", "~")):
        raise _Invalid("mount %r uses the named volume '%s'; named volumes are not supported"
                       % (entry, host), hint="bind a host path instead, e.g. ./%s:%s"
                                             % (host, container or "/data"))
    if not container.startswith("/"):
        raise _Invalid("mount %r: the container path must be absolute" % entry)
    target = posixpath.normpath(container)
    if reserved and (target == _JOB_MOUNT or target.startswith(_JOB_MOUNT + "/")):
        raise _Invalid("mount %r targets %s, which is reserved for the per-job directory"
                       % (entry, _JOB_MOUNT), hint="mount it somewhere else; the job directory is "
                                                   "mounted there automatically")
    if reserved and resume_enabled and (target == _RESUME_MOUNT
                                        or target.startswith(_RESUME_MOUNT + "/")):
        raise _Invalid("mount %r targets %s, which is reserved for x-slurm.resume.path"
                       % (entry, _RESUME_MOUNT))
    if options and not all(part for part in options.split(":")):
        raise _Invalid("mount %r has empty mount options" % entry)
    return host, container, options or None


# sbatch reads #SBATCH lines with a splitter of its own (src/sbatch/opt.c, _get_argument), not
# bash's: a backslash escapes the next character even inside quotes, so a value quoted for bash can
# close its quotes for sbatch and add options of its choosing (--output, --export=BASH_ENV=...); a
# line that holds "hetjob" or "packjob" anywhere starts another component of a heterogeneous job.
# Quoted values must avoid those; a raw submit_args entry is one argument, so it must also avoid
# what splits or quotes (blanks, ' and ") and '#', which starts a comment outside quotes.
_SBATCH_ESCAPE_CHARS = frozenset("\\\0\n\r")
_SBATCH_RAW_CHARS = frozenset(" \t\v\f'\"#")
_SBATCH_COMPONENT_WORDS = ("hetjob", "packjob")


def _check_sbatch_value(text, raw=False):
    """``text`` is safe on an #SBATCH line (``raw``: written there unquoted); raises ``_Invalid``."""
    special = _SBATCH_ESCAPE_CHARS | _SBATCH_RAW_CHARS if raw else _SBATCH_ESCAPE_CHARS
    found = sorted(set(text) & special)
    if found:
        names = ", ".join({"\\": "a backslash", "\0": "a NUL byte", "\n": "a line break",
                           "\r": "a carriage return", " ": "a space", "\t": "a tab",
                           "#": "'#'", "'": "a single quote", '"': "a double quote"}
                          .get(char, repr(char)) for char in found)
        raise _Invalid("the value contains %s, which sbatch reads specially on an #SBATCH line "
                       "(it would split the value or take what follows as options of its own)"
                       % names,
                       hint="one sbatch argument per entry, without blanks, quotes, '#' or '\\'"
                       if raw else "remove it: sbatch treats '\\' as an escape even inside quotes")
    lowered = text.lower()
    for word in _SBATCH_COMPONENT_WORDS:
        if word in lowered:
            raise _Invalid("the value contains '%s', which makes sbatch start another component "
                           "of a heterogeneous job on that #SBATCH line" % word,
                           hint="choose a value without '%s'" % word)


def _normalize_artifact_path(value):
    """An artifact source path, normalized; must live under /hpc-compose/job (not its artifacts/)."""
    import fnmatch
    import posixpath
    if not value.startswith("/"):
        raise _Invalid("artifact path %r must be an absolute container path under %s"
                       % (value, _JOB_MOUNT), hint="e.g. %s/checkpoints/*.pt" % _JOB_MOUNT)
    for part in value.split("/"):
        # bash <= 5.1 (RHEL 8 and 9) lets a pattern such as `.[.]` or `.*` match `..`: a path
        # that climbs out of the job's folder however it is spelt.
        plain = part.replace("\\", "")
        if plain in (".", "..") or plain[:1] in (".", "[") and (
                fnmatch.fnmatchcase(".", plain) or fnmatch.fnmatchcase("..", plain)):
            raise _Invalid("artifact path %r has a component %r, which is or may match '.' or "
                           "'..'" % (value, part),
                           hint="write the path from %s down without '.' or '..' (a dot file: "
                                "name it, e.g. .cache/*)" % _JOB_MOUNT)
    path = "/" + posixpath.normpath(value).lstrip("/")
    if not path.startswith(_JOB_MOUNT + "/"):
        raise _Invalid("artifact path %r is not under %s" % (value, _JOB_MOUNT),
                       hint="collect files the services wrote below %s" % _JOB_MOUNT)
    artifacts_dir = _JOB_MOUNT + "/artifacts"
    if path == artifacts_dir or path.startswith(artifacts_dir + "/"):
        raise _Invalid("artifact path %r is inside %s, where collection writes its output"
                       % (value, artifacts_dir))
    return path


def _parse_duration(value):
    """Seconds from an integer or a Compose duration such as ``30s``, ``2m``, ``1m30s``, ``1h``."""
    import re
    if isinstance(value, bool):
        raise _Invalid("expected a duration such as 30s or 1m30s, got %r" % value)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        match = re.match(r"\A(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z", value.strip())
        if value.strip().isdigit():
            seconds = int(value.strip())
        elif match and value.strip():
            hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise _Invalid("%r is not a duration in whole seconds (like 30s, 2m or 1m30s)" % value)
    else:
        raise _Invalid("expected a duration such as 30s or 1m30s")
    if seconds < 1:
        raise _Invalid("duration must be at least 1 second")
    return seconds


def _signal_name(value):
    """``SIGUSR1``/``usr1`` -> ``USR1``; anything else unchanged for the choice check to refuse."""
    if isinstance(value, str):
        value = value.strip().upper()
        return value[3:] if value.startswith("SIG") else value
    return value


def _slurm_time_seconds(text):
    """Seconds of a Slurm time limit (``30``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``), or None."""
    import re
    if text is None:
        return None
    text = str(text).strip()
    match = re.match(r"\A(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z", text)
    if not match:
        return None           # UNLIMITED, INFINITE, or something sbatch will judge itself
    days, first, second, third = match.groups()
    if days is not None:      # D-HH, D-HH:MM, D-HH:MM:SS
        parts = [int(first), int(second or 0), int(third or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if third is not None:     # HH:MM:SS
        return int(first) * 3600 + int(second) * 60 + int(third)
    if second is not None:    # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60    # minutes


def _check_dependency(text):
    """A Slurm dependency expression, checked for shape: ``afterok:12:13,singleton`` or ``?``-joined."""
    import re
    separators = set(re.findall(r"[,?]", text))
    if len(separators) > 1:
        raise _Invalid("dependency %r mixes ',' (all of) and '?' (any of); Slurm accepts only one "
                       "of them" % text)
    for item in re.split(r"[,?]", text):
        kind, _, rest = item.partition(":")
        if kind not in _DEPENDENCY_TYPES:
            raise _Invalid("dependency %r: %r is not a Slurm dependency type" % (text, kind),
                           hint="one of " + ", ".join(_DEPENDENCY_TYPES))
        if kind == "singleton":
            if rest:
                raise _Invalid("dependency %r: singleton takes no job id" % text)
            continue
        ids = rest.split(":") if rest else []
        pattern = r"\A\d+(?:_\d+)?(?:\+\d+)?\Z" if kind == "after" else r"\A\d+(?:_\d+)?\Z"
        if not ids or not all(re.match(pattern, job) for job in ids):
            raise _Invalid("dependency %r: %s needs one or more job ids after ':' (like %s:12345)"
                           % (text, kind, kind))
    return text


def _check_array(text):
    """A Slurm array expression (``0-15``, ``1,3,5``, ``0-30:2``, ``0-15%4``), checked."""
    import re
    body, percent, limit = text.partition("%")
    if percent and not re.match(r"\A[1-9]\d*\Z", limit):
        raise _Invalid("array %r: the limit after '%%' must be a positive integer" % text)
    for item in body.split(","):
        match = re.match(r"\A(\d+)(?:-(\d+)(?::([1-9]\d*))?)?\Z", item)
        if not match:
            raise _Invalid("array %r: %r is not an index, a range A-B or a stepped range A-B:S"
                           % (text, item), hint="Slurm's syntax, e.g. 0-15%4 or 1,3,5")
        if match.group(2) is not None and int(match.group(2)) < int(match.group(1)):
            raise _Invalid("array %r: the range %s runs backwards" % (text, item))
    return text


def _check_mpi_type(text):
    """An srun --mpi plugin name (pmix, pmi2, ...), checked in form (preflight asks the cluster)."""
    import re
    if not re.match(_MPI_TYPE_PATTERN, text):
        raise _Invalid("%s is not an MPI plugin name" % _excerpt(text),
                       hint="write one of the names `srun --mpi=list` prints, e.g. pmix or pmi2")
    return text


def _check_module_name(text):
    """An environment module name (gcc, gcc/12.2), as `module load` takes it."""
    import re
    if not re.match(_MODULE_NAME_PATTERN, text):
        raise _Invalid("%s is not a module name" % _excerpt(text),
                       hint="one module per list item, as `module load` takes it, e.g. gcc/12.2 "
                            "(no blanks, no leading '-')")
    return text


def _is_local_host(host):
    host = (host or "").strip().strip("[]").lower()
    return host in ("localhost", "::1", "0.0.0.0", "") or host.startswith("127.")


def _url_host(url):
    try:
        from urllib.parse import urlsplit
        return urlsplit(url).hostname
    except ValueError:
        return None


class Placement(NamedTuple):
    mode: str                      # single (1-node job) | primary (helper pinned to primary node) | distributed
    nodes: int = 1
    ntasks: Optional[int] = None
    ntasks_per_node: Optional[int] = None


def _resolve_placement(alloc_nodes, service_slurm, top_slurm, service_count):
    """The ``Placement`` of one service in an allocation of ``alloc_nodes``; raises ``_Invalid``."""
    requested = service_slurm.nodes
    if alloc_nodes <= 1:
        if requested not in (None, 1):
            raise _Invalid("x-slurm.nodes is %s but the allocation has 1 node" % requested,
                           hint="raise the top-level x-slurm.nodes, or drop the service's nodes")
        return _helper_geometry("single", service_slurm)
    if requested is None:
        distributed = service_count == 1
    elif requested == alloc_nodes:
        distributed = True
    elif requested == 1:
        distributed = False
    elif requested > alloc_nodes:
        raise _Invalid("x-slurm.nodes is %s but the allocation has only %s nodes"
                       % (requested, alloc_nodes))
    else:
        raise _Invalid("x-slurm.nodes is %s; a service runs either on 1 node (a helper on the "
                       "primary node) or on all %s nodes (the distributed step)"
                       % (requested, alloc_nodes),
                       hint="partial-node placement is not supported in v1")
    if not distributed:
        return _helper_geometry("primary", service_slurm)
    ntasks = service_slurm.ntasks
    ntasks_per_node = service_slurm.ntasks_per_node
    if ntasks is None:
        ntasks = top_slurm.ntasks
        if ntasks_per_node is None:
            ntasks_per_node = top_slurm.ntasks_per_node
            if ntasks_per_node is None and ntasks is None:
                ntasks_per_node = 1
    return Placement("distributed", alloc_nodes, ntasks, ntasks_per_node)


def _helper_geometry(mode, service_slurm):
    # A one-node step runs one task unless the service asks otherwise: otherwise srun inside the
    # batch job would inherit the allocation's task count and start the program many times.
    ntasks = service_slurm.ntasks
    if ntasks is None and service_slurm.ntasks_per_node is None:
        ntasks = 1
    return Placement(mode, 1, ntasks, service_slurm.ntasks_per_node)


_TMP_CACHE_ROOTS = ("/tmp", "/var/tmp", "/private/tmp", "/dev/shm")


def _under(path, root):
    path = os.path.normpath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _expand_home(path, environ):
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return home + path[1:]
    if path.startswith("~"):
        return os.path.expanduser(path)
    return path


def resolve_host_path(path, project_dir, environ=None):
    """An absolute, normalized host path: ``~`` expanded, relative to the compose file's folder."""
    environ = os.environ if environ is None else environ
    path = _expand_home(path, environ)
    if not os.path.isabs(path):
        path = os.path.join(project_dir, path)
    return os.path.normpath(path)


def _check_cache_dir(path):
    """Refuse node-local temporary file systems: prepare runs on the login node, jobs elsewhere."""
    for candidate in (path, os.path.realpath(path)):
        for root in _TMP_CACHE_ROOTS:
            if _under(candidate, root):
                raise _Invalid("cache_dir %s is under %s, which is not shared between the login "
                               "node and the compute nodes" % (path, root),
                               hint="use shared storage such as /shared/$USER/hpc-compose-cache, "
                                    "or omit it for $HOME/.cache/hpc-compose")


# --- reading the file -----------------------------------------------------------------------------

def _load_compose_bytes(path):
    """The compose file's bytes; decoding (and refusing binary or non-UTF-8 input) is the YAML
    reader's job, which locates the offending byte."""
    if os.path.isdir(path):
        raise SpecError("'%s' is a directory, not a compose file" % path, file=path,
                        hint="pass the YAML file itself, e.g. -f %s"
                             % os.path.join(path, "compose.yaml"))
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SpecError("compose file does not exist", file=path,
                        hint="check the path, or create one with 'hpc-compose init'")
    except OSError as exc:
        raise SpecError("cannot read the compose file: %s" % (exc.strerror or exc), file=path)


class _FileMark(NamedTuple):
    """A ``Mark`` in another file than the first compose file (after merging override files)."""
    line: int
    column: int
    text: Optional[str]
    file: str


# How Compose merges a service key given in several files (compose-spec 13-merge.md); keys not
# listed merge by shape: mappings key by key, sequences appended, scalars replaced.
_SERVICE_MERGE_RULES = {
    "command": "replace", "entrypoint": "replace", "environment": "by_name",
    "volumes": "by_target", "depends_on": "by_service", "env_file": "append",
    "profiles": "unique", "secrets": "by_target",
}
_MERGE_MISSING = object()
_MERGE_RESET = object()


def _subtree(marks, path):
    """The entries of ``marks`` at ``path`` and below."""
    size = len(path)
    return [(key, mark) for key, mark in marks.items() if key[:size] == path]


class _DocumentMerge(object):
    """Compose files merged in order; ``marks``/``key_marks`` keep where each value came from."""

    def __init__(self, filename, document):
        self.data = document.data
        self.marks = dict(document.marks)
        self.key_marks = dict(document.key_marks)
        if document.tags:
            # !reset in the first file removes the key; !override has nothing to override.
            self.add(filename, document, rebase=False)

    def add(self, filename, document, rebase=True):
        """Merge ``document`` (read from ``filename``) over what has been merged so far."""
        def relocate(marks):
            if not rebase:
                return marks
            return dict((path, _FileMark(mark[0], mark[1], mark[2],
                                         getattr(mark, "file", None) or filename))
                        for path, mark in marks.items())
        self.source_marks = relocate(document.marks)
        self.source_key_marks = relocate(document.key_marks)
        self.tags = document.tags or {}
        base = self.data if rebase else {}
        if not rebase:
            self.marks, self.key_marks = {(): self.source_marks.get(())}, {}
        merged = self.merge((), base, document.data)
        self.data = None if merged is _MERGE_RESET else merged

    def take(self, path):
        """Marks at and under ``path`` now come from the file being merged."""
        for marks in (self.marks, self.key_marks):
            for key, _ in _subtree(marks, path):
                if key != path or marks is self.marks:
                    del marks[key]
        for key, mark in _subtree(self.source_marks, path):
            self.marks[key] = mark
        for key, mark in _subtree(self.source_key_marks, path):
            if key != path:
                self.key_marks[key] = mark

    def merge(self, path, base, value):
        tag = self.tags.get(path)
        if tag == "!reset":
            return _MERGE_RESET
        if tag == "!override" or base is _MERGE_MISSING and type(value) is not dict:
            self.take(path)
            return value
        if base is _MERGE_MISSING:
            base = {}
            self.marks[path] = self.source_marks.get(path)
        rule = _SERVICE_MERGE_RULES.get(path[2]) if len(path) == 3 and \
            path[0] == "services" else None
        if path[-2:] == ("healthcheck", "test") or rule == "replace":
            self.take(path)
            return value
        if rule in ("by_name", "by_service") and type(base) is not type(value) or \
                rule in ("by_name", "by_service") and type(base) is list:
            base = self.to_mapping(path, base, rule, self.marks, self.key_marks)
            value = self.to_mapping(path, value, rule, self.source_marks, self.source_key_marks)
        if rule == "append" and type(base) is str:
            base = self.to_list(path, base, self.marks)
        if rule == "append" and type(value) is str:
            value = self.to_list(path, value, self.source_marks)
        if type(base) is dict and type(value) is dict:
            result = dict(base)
            for key, item in value.items():
                key_path = path + (_yaml_path_key(key),)
                merged = self.merge(key_path, result.get(key, _MERGE_MISSING), item)
                if merged is _MERGE_RESET:
                    result.pop(key, None)
                    for marks in (self.marks, self.key_marks):
                        for gone, _ in _subtree(marks, key_path):
                            del marks[gone]
                    continue
                if key not in result or self.tags.get(key_path) == "!override":
                    self.key_marks[key_path] = self.source_key_marks.get(key_path)
                result[key] = merged
            return result
        if type(base) is list and type(value) is list:
            if rule == "by_target":
                return self.merge_by_target(path, base, value)
            if rule == "unique":
                value_items = [(index, item) for index, item in enumerate(value)
                               if item not in base]
            else:
                value_items = list(enumerate(value))
            result = list(base)
            for index, item in value_items:
                self.move(self.source_marks, path + (index,), path + (len(result),))
                result.append(item)
            return result
        if type(value) is not dict and type(value) is not list and \
                type(base) is not dict and type(base) is not list:
            self.marks[path] = self.source_marks.get(path)
            return value
        self.take(path)
        return value

    def move(self, source, old, new, target=None):
        """Copy the marks of ``source`` under ``old`` to ``new`` in ``target`` (default: ours)."""
        target = self.marks if target is None else target
        size = len(old)
        for key, mark in _subtree(source, old):
            target[new + key[size:]] = mark

    def to_list(self, path, text, marks):
        """``env_file: x`` as ``[x]`` (marks moved to the item)."""
        if path in marks:
            marks[path + (0,)] = marks[path]
        return [text]

    def to_mapping(self, path, value, rule, marks, key_marks):
        """A list form (``KEY=VALUE`` items, or service names) as the mapping form, when it has
        one; anything else is left for the validator to report where it was written."""
        if type(value) is not list:
            return value
        result = {}
        for index, item in enumerate(value):
            if type(item) is not str:
                return value
            key, equals, text = item.partition("=")
            if rule != "by_name":
                key, equals, text = item, "", None
            if key in result:
                return value
            result[key] = text if equals else None
            mark = marks.get(path + (index,))
            if mark is not None:
                marks[path + (key,)] = key_marks[path + (key,)] = mark
        return result

    def merge_by_target(self, path, base, value):
        """``volumes`` (and ``secrets``): an entry with the container path of an earlier one
        replaces it."""
        result = list(base)
        origins = [(self.marks, index) for index in range(len(base))]
        target_of = _secret_target if path[-1] == "secrets" else _volume_target
        targets = [target_of(item) for item in base]
        for index, item in enumerate(value):
            target = target_of(item)
            if target is not None and target in targets:
                position = targets.index(target)
                result[position] = item
                origins[position] = (self.source_marks, index)
            else:
                result.append(item)
                origins.append((self.source_marks, index))
                targets.append(target)
        moved = {}
        for position, (marks, index) in enumerate(origins):
            self.move(marks, path + (index,), path + (position,), moved)
        for key, _ in _subtree(self.marks, path):
            if key != path:
                del self.marks[key]
        self.marks.update(moved)
        return result


def _secret_target(entry):
    """The file a service secret entry becomes under /run/secrets (short form: its name)."""
    if type(entry) is dict:
        entry = entry.get("target") or entry.get("source")
    if type(entry) is not str:
        return None
    return entry[len(_SECRETS_MOUNT) + 1:] if entry.startswith(_SECRETS_MOUNT + "/") else entry


def _volume_target(entry):
    """The container path of a volume entry (short ``SRC:DST[:MODE]`` or long ``target:``)."""
    if type(entry) is dict:
        return entry.get("target")
    if type(entry) is not str:
        return None
    parts = entry.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _load_compose_text(path):
    """The compose file as text, decoded by the YAML reader's rules (binary or non-UTF-8 input is
    refused with its position)."""
    return _decode_yaml_source(_load_compose_bytes(path), path)


def _load_compose_document(path, check_todos=True):
    """Read and parse one compose file (an empty one, or one with a line migrate left to do, is
    an error naming it)."""
    text = _load_compose_text(path)
    document = parse_yaml_document(text, filename=path)
    if document.data is None:
        raise SpecError("the compose file is empty", file=path, line=1,
                        hint="it needs at least a services: mapping with one service; "
                             "'hpc-compose init --list' shows starting points")
    if check_todos:
        _check_migrate_todos(text, path)
    return document


def _check_migrate_todos(text, path):
    """A ``# migrate: TODO`` line left by ``migrate`` is the first problem to report."""
    todos = [(number, line) for number, line in enumerate(text.split("\n"), 1)
             if line.lstrip().startswith(_MIGRATE_TODO.strip())]
    if not todos:
        return
    number, line = todos[0]
    others = [str(n) for n, _ in todos[1:]]
    raise SpecError("migrate left a TODO: " + line.strip()[len(_MIGRATE_TODO):], file=path,
                    line=number, column=len(line) - len(line.lstrip()) + 1,
                    hint="resolve it, then delete the '# migrate: TODO' line"
                         + (" (more TODO lines: %s)" % ", ".join(others) if others else ""))


def _service_marks(marks, name):
    """The marks of ``services.<name>`` and below, keyed by path relative to the service."""
    prefix = ("services", name)
    return dict((path[2:], mark) for path, mark in _subtree(marks, prefix))


def _under_service(marks, name):
    return dict((("services", name) + path, mark) for path, mark in marks.items())


class _Extends(object):
    """Compose's ``extends``: a service starts from another one (in this file or another),
    merged with the usual rules; ``depends_on`` is not inherited. Resolved before validation, so
    every value keeps the mark of the file it is written in."""

    def __init__(self, document, first_file):
        self.document = document
        self.first_file = first_file
        self.documents = {first_file: document}

    def apply(self):
        services = self.document.data.get("services")
        if type(services) is not dict or not any(
                type(raw) is dict and "extends" in raw for raw in services.values()):
            return self.document
        data = dict(self.document.data)
        data["services"] = dict(services)
        marks = dict(self.document.marks)
        key_marks = dict(self.document.key_marks)
        for name in services:
            raw, service_marks, service_key_marks = self.resolve(self.first_file, name, [])
            if raw is services[name]:
                continue
            data["services"][name] = raw
            for table in (marks, key_marks):
                for path, _ in _subtree(table, ("services", name)):
                    if len(path) > 2:
                        del table[path]
            marks.update(_under_service(service_marks, name))
            key_marks.update((path, mark) for path, mark in
                             _under_service(service_key_marks, name).items() if len(path) > 2)
        return YamlDocument(data, marks, key_marks)

    def error(self, document, path, message, hint=None):
        mark = document.marks.get(path) or document.key_marks.get(path)
        return SpecError(message, file=getattr(mark, "file", None) or self.first_file,
                         line=mark.line if mark else None, column=mark.column if mark else None,
                         path=_dotted(path), hint=hint)

    def load(self, path):
        if path not in self.documents:
            if not os.path.isfile(path):
                return None
            document = _load_compose_document(path)
            self.documents[path] = YamlDocument(
                document.data,
                dict((p, _FileMark(m[0], m[1], m[2], path)) for p, m in document.marks.items()),
                dict((p, _FileMark(m[0], m[1], m[2], path))
                     for p, m in document.key_marks.items()))
        return self.documents[path]

    def target(self, file, document, name):
        """(file, service name) that ``services.<name>.extends`` names."""
        path = ("services", name, "extends")
        extends = document.data["services"][name]["extends"]
        if type(extends) is str:
            return file, extends
        if type(extends) is not dict or type(extends.get("service")) is not str:
            raise self.error(document, path, "extends needs the name of a service: "
                             "extends: NAME, or extends: {service: NAME, file: PATH}")
        unknown = [key for key in extends if key not in ("service", "file")]
        if unknown:
            raise self.error(document, path + (unknown[0],), "unknown key '%s' in extends"
                             % unknown[0], hint="valid keys: service, file")
        if extends.get("file") is None:
            return file, extends["service"]
        if type(extends["file"]) is not str:
            raise self.error(document, path + ("file",), "extends.file must be a path")
        mark = document.marks.get(path + ("file",))
        holder = getattr(mark, "file", None) or file
        base_file = os.path.normpath(os.path.join(os.path.dirname(holder),
                                                  os.path.expanduser(extends["file"])))
        if self.load(base_file) is None:
            raise self.error(document, path + ("file",), "extends.file %s does not exist"
                             % base_file)
        return base_file, extends["service"]

    def resolve(self, file, name, chain):
        """The service ``name`` of ``file`` with its extends applied: (raw, marks, key_marks),
        marks relative to the service."""
        document = self.documents[file]
        raw = document.data["services"][name]
        marks = _service_marks(document.marks, name)
        key_marks = _service_marks(document.key_marks, name)
        if type(raw) is not dict or "extends" not in raw:
            return raw, marks, key_marks
        base_file, base_name = self.target(file, document, name)
        base_document = self.documents[base_file]
        services = base_document.data.get("services") if type(base_document.data) is dict \
            else None
        where = ("services", name, "extends")
        if type(services) is not dict or base_name not in services:
            raise self.error(document, where, "extends names service '%s', which %s does not "
                             "define" % (base_name, base_file),
                             hint="services there: " + ", ".join(map(str, services or ())))
        chain = chain + [(file, name)]
        if (base_file, base_name) in chain:
            names = [entry[1] for entry in chain[chain.index((base_file, base_name)):]]
            raise self.error(document, where, "extends cycle: %s"
                             % " -> ".join(names + [base_name]),
                             hint="remove one of these extends")
        base, base_marks, base_key_marks = self.resolve(base_file, base_name, chain)
        if type(base) is not dict:
            raise self.error(document, where, "extends names service '%s', which is not a "
                             "mapping" % base_name)
        base = dict((key, value) for key, value in base.items() if key != "depends_on")
        local = dict((key, value) for key, value in raw.items() if key != "extends")
        merge = _DocumentMerge(file, YamlDocument(
            {"services": {name: base}}, _under_service(base_marks, name),
            _under_service(base_key_marks, name)))
        merge.add(file, YamlDocument({"services": {name: local}}, _under_service(marks, name),
                                     _under_service(key_marks, name)))
        merged = merge.data["services"][name]
        return merged, _service_marks(merge.marks, name), _service_marks(merge.key_marks, name)


def _merge_compose_files(paths, check_todos=True):
    """Parse ``paths`` and merge them in order with Compose's rules; returns a ``YamlDocument``
    whose marks from the second file on are ``_FileMark``s (they carry their file)."""
    first = _load_compose_document(paths[0], check_todos)
    if len(paths) == 1 and not first.tags:
        return first
    merged = _DocumentMerge(paths[0], first)
    for path in paths[1:]:
        merged.add(path, _load_compose_document(path, check_todos))
    return YamlDocument(merged.data, merged.marks, merged.key_marks)


def _load_compose_files(paths):
    """The merged document of ``paths`` with every service's ``extends`` resolved."""
    document = _merge_compose_files(paths)
    if type(document.data) is not dict:
        return document
    return _Extends(document, paths[0]).apply()


def load_spec(path, environ=None, env_files=None, profiles=None, services=None) -> ComposeSpec:
    """Read, merge, interpolate and validate compose file(s); returns a ``ComposeSpec``.

    ``path`` is one file or a list merged in order (Compose's repeated ``-f``); relative paths
    and ``.env`` belong to the first file's directory. ``env_files`` replace that ``.env``
    (``--env-file``). ``profiles``: the active profiles (default: ``COMPOSE_PROFILES``).
    ``services``: keep only these and what they depend on (``up SERVICE...``).
    """
    paths = [os.path.abspath(path)] if isinstance(path, str) else \
        [os.path.abspath(item) for item in path]
    document = _load_compose_files(paths)
    variables = _build_variables(os.path.dirname(paths[0]), environ, env_files)
    loader = _SpecLoader(paths[0], document, variables, paths)
    try:
        spec = loader.load()
    except SpecError as exc:
        raise _with_migrate_lead(loader.redacted(exc), path if isinstance(path, str) else path[0])
    if profiles is None:
        profiles = [name.strip() for name in variables.get("COMPOSE_PROFILES", "").split(",")
                    if name.strip()]
    return _select_services(spec, profiles, services or ())


# Keys only a Docker Compose file has: errors on them mean the wrong kind of file was given.
_DOCKER_COMPOSE_KEYS = ("build", "ports", "networks", "network_mode", "expose", "container_name")


def _with_migrate_lead(error, path):
    """``error``, led by one line pointing to ``migrate`` when it reads like a Docker Compose file."""
    errors = getattr(error, "errors", (error,))
    keys = set((item.path or "").rsplit(".", 1)[-1] for item in errors) & set(_DOCKER_COMPOSE_KEYS)
    if len(keys) < 2 and "build" not in keys:   # one stray key is a slip, not a Docker file
        return error
    shown = os.path.relpath(path)
    shown = path if shown.startswith("..") else shown
    lead = ("%s looks like a Docker Compose file (%s): convert it with `hpc-compose migrate -f %s "
            "-o hpc-compose.yaml`, then use hpc-compose.yaml"
            % (shown, ", ".join(sorted(keys)), shell_quote(shown)))
    return SpecErrors(errors, getattr(error, "more", 0), lead=lead)


def _select_services(spec, profiles, names):
    """The services that run, as Compose picks them: those without ``profiles`` and those with an
    active one; or, when ``names`` are given, those services and everything they depend on,
    whatever their profiles."""
    by_name = dict((service.name, service) for service in spec.services)
    declared = tuple(sorted(set(name for service in spec.services for name in service.profiles)))
    if names:
        unknown = [name for name in names if name not in by_name]
        if unknown:
            close = _closest(unknown[0], by_name)
            raise UsageError("no such service: %s" % ", ".join(unknown),
                             hint=("did you mean '%s'? " % close if close else "")
                             + "services in the file: " + ", ".join(by_name))
        wanted = set()
        pending = list(names)
        while pending:
            name = pending.pop()
            if name not in wanted:
                wanted.add(name)
                pending.extend(target for target, _ in by_name[name].depends_on)
    else:
        active = set(profiles)
        wanted = set(service.name for service in spec.services
                     if not service.profiles or active.intersection(service.profiles))
        for service in spec.services:
            disabled = [target for target, _ in service.depends_on if target not in wanted]
            if service.name in wanted and disabled:
                target = by_name[disabled[0]]
                raise SpecError("service '%s' depends on '%s', which is not enabled (its profiles: "
                                "%s)" % (service.name, target.name, ", ".join(target.profiles)),
                                file=service.file or spec.path, line=service.line,
                                path="services.%s.depends_on" % service.name,
                                hint="activate one with --profile %s (or COMPOSE_PROFILES), or "
                                     "name the services to run: up %s"
                                     % (target.profiles[0], service.name))
        if not wanted:
            raise UsageError("no service is enabled: every service has profiles and none of them "
                             "is active (%s)" % ", ".join(declared),
                             hint="activate one with --profile NAME or COMPOSE_PROFILES")
    return spec._replace(services=tuple(service for service in spec.services
                                        if service.name in wanted), profiles=declared)


def _dotted(path):
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[%d]" % part
        else:
            text += ("." if text else "") + str(part)
    return text


def _closest(word, choices):
    import difflib
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# --- run: the spec of a one-off job (hpc-compose run SERVICE -- COMMAND) --------------------------

class _RunRequest(NamedTuple):
    """What ``run`` changes in the file's stack, as given on its command line."""
    service: str
    command: Tuple[str, ...] = ()  # () keeps the service's own command
    # ((key, value), ...) set on top of the service's environment
    environment: Tuple[Tuple[str, str], ...] = ()
    volumes: Tuple[str, ...] = ()  # "host:container[:options]" as in the spec's volumes
    working_dir: Optional[str] = None
    job_name: Optional[str] = None  # None: "<job name>-run-<service>"
    no_deps: bool = False
    entrypoint: Optional[str] = None  # None keeps the service's; else --entrypoint's text


def _run_spec(spec, request, cwd):
    """The spec of a ``run`` job from ``spec`` (already narrowed to the service and what it depends
    on): the service with its command, environment, volumes and working directory replaced, no
    readiness and no restarts of its own (so the job ends when it ends), and one job, not an array.

    Relative host paths of ``request`` (volumes, a host working directory) are relative to ``cwd``,
    like every path given on the command line. A mistake in ``request`` raises ``UsageError``.
    """
    service = next(s for s in spec.services if s.name == request.service)
    host = service.runtime == "host"
    command = service.command
    entrypoint = service.entrypoint
    if request.entrypoint is not None:
        entrypoint = _run_entrypoint(service, request)
    if request.command:
        command = tuple(request.command)
        if isinstance(entrypoint, str):
            # A shell-form entrypoint takes the command as words of the same script.
            command = " ".join(shell_quote(word) for word in request.command)
    elif request.entrypoint is not None and isinstance(command, str):
        # The service's shell-form command stays one script, after the new entrypoint's words.
        entrypoint = " ".join(shell_quote(word) for word in entrypoint)
    working_dir = service.working_dir
    if request.working_dir is not None:
        working_dir = request.working_dir
        if command is None and entrypoint is None:
            raise UsageError("--workdir needs a command: service '%s' runs its image's default"
                             % service.name, hint="give the command after the service: run "
                             "--workdir %s %s -- COMMAND" % (working_dir, service.name))
        if host:
            working_dir = os.path.normpath(os.path.join(cwd, os.path.expanduser(working_dir)))
        elif not working_dir.startswith("/"):
            raise UsageError("--workdir %r must be an absolute container path" % working_dir)
    volumes = list(service.volumes)
    for text in request.volumes:
        if host:
            raise UsageError("--volume is not available for service '%s': it uses the host "
                             "runtime and already sees the node's file system" % service.name,
                             hint="use the host paths directly")
        try:
            source, target, options = _split_volume(text,
                                                    resume_enabled=spec.slurm.resume is not None)
        except _Invalid as exc:
            raise UsageError("--volume: %s" % exc.message, hint=exc.hint)
        source = os.path.normpath(os.path.join(cwd, os.path.expanduser(source)))
        volumes.append(":".join(part for part in (source, target, options) if part))
    values = dict(request.environment)   # a key given twice: the last value wins
    environment = [(key, values.pop(key, value)) for key, value in service.environment]
    for key, _ in request.environment:
        if key in values:
            environment.append((key, values.pop(key)))
    job_name = request.job_name
    if job_name is None:
        job_name = "%s-run-%s" % (spec.slurm.job_name or spec.name or "hpc-compose", service.name)
    elif not job_name.strip() or "\n" in job_name or "\r" in job_name:
        raise UsageError("--name must be a non-empty single line, got %r" % job_name)
    else:
        try:
            _check_sbatch_value(job_name)
        except _Invalid as exc:
            raise UsageError("--name: " + exc.message, hint=exc.hint)
    service = service._replace(
        command=command, entrypoint=entrypoint, working_dir=working_dir, volumes=tuple(volumes),
        environment=tuple(environment), readiness=None,
        depends_on=() if request.no_deps else service.depends_on,
        slurm=service.slurm._replace(failure_policy=FailurePolicy()))
    services = tuple(service if s.name == service.name else s for s in spec.services
                     if not request.no_deps or s.name == service.name)
    return spec._replace(services=services,
                         slurm=spec.slurm._replace(job_name=job_name, array=None))


def _run_entrypoint(service, request):
    """``run --entrypoint TEXT``: TEXT split into words as a shell would (Compose's rule), in place
    of the service's entrypoint and the image's; '' clears it, so the command runs alone."""
    import shlex
    try:
        words = tuple(shlex.split(request.entrypoint))
    except ValueError as exc:
        raise UsageError("--entrypoint %r: %s" % (request.entrypoint, exc),
                         hint="quote it as you would in a shell, e.g. --entrypoint 'python3 -u'")
    if not words and not request.command and service.command is None:
        raise UsageError("--entrypoint '' clears the entrypoint, and service '%s' has no command "
                         "to run instead" % service.name,
                         hint="give the command after the service: run --entrypoint '' %s -- "
                              "COMMAND" % service.name)
    return words


class _SpecLoader(object):
    """Walks the parsed YAML once, checking and normalizing every field it knows."""

    def __init__(self, path, document, variables, files=None):
        self.file = path
        self.files = tuple(files or (path,))
        self.project_dir = os.path.dirname(path)
        self.data = document.data
        self.marks = document.marks or {}
        self.key_marks = getattr(document, "key_marks", None) or {}
        self.variables = variables
        self.warnings = []
        self.secret_values = []        # (name, text) read to keep values out of the spec; never stored
        self.secrets = ()              # the top-level SecretSpecs, once read
        self.secret_names = set()      # every name under secrets:, read or in error
        self.errors = []     # every independent SpecError found, reported together by load()
        # Sets, so that recording an error stays linear in the number of errors: the paths in
        # error, and for each misspelt key its mapping and the key it was meant to be.
        self.error_paths = set()
        self.misspelt_parents = set()
        self.misspelt_meant = set()
        self.expanded_size = 0   # characters added by interpolation so far (bounded)
        self.unknown_targets = 0   # depends_on entries naming no service, so far

    # --- locations and errors ---

    def mark(self, path, at_key=False):
        path = tuple(path)
        if not at_key and isinstance(self.value_at(path), (dict, list)):
            # A whole block is best pointed at by its key: the value starts on a later line.
            at_key = True
        first = (self.key_marks.get(path) if at_key else None) or self.marks.get(path) or \
            self.key_marks.get(path)
        if first is not None:
            return first
        # A missing key: point at the nearest enclosing key that exists.
        while path:
            path = path[:-1]
            mark = self.key_marks.get(path) or self.marks.get(path)
            if mark is not None:
                return mark
        return None

    def value_at(self, path):
        node = self.data
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node

    def file_of(self, mark):
        """The file a mark points into (values merged from an override file carry theirs)."""
        return getattr(mark, "file", None) or self.file

    def error(self, path, message, hint=None, at_key=False):
        mark = self.mark(path, at_key)
        return SpecError(message, file=self.file_of(mark), line=mark.line if mark else None,
                         column=mark.column if mark else None, path=_dotted(path) or None,
                         hint=hint)

    def interpolate(self, path, value, **options):
        mark = self.mark(path)
        used = set()
        text = interpolate(value, self.variables, path=_dotted(path), file=self.file_of(mark),
                           line=mark.line if mark else None,
                           column=mark.column if mark else None, used=used, **options)
        self.check_secret_value(path, text, expanded=text != value, used=used)
        self.expanded_size += max(0, len(text) - len(value))
        if self.expanded_size > _MAX_EXPANDED_SIZE:
            raise self.error(path, "the file's values grow past %d bytes when their variables "
                             "are expanded" % _MAX_EXPANDED_SIZE,
                             hint="Slurm refuses batch scripts larger than 4 MB; pass large "
                                  "data as a file (a volume)")
        return text

    # --- every error at once ---

    def record(self, error):
        """Keep ``error`` for the report, unless its key (or one above it) is already in error:
        one mistake gives one message, not a cascade."""
        path = error.path or ""
        # `imgae:` was reported; "needs an image" (about the mapping that holds it) or an error
        # at the key it was meant to be would be the same mistake again.
        if path in self.misspelt_parents:
            return
        for end in range(len(path) + 1):
            if end == len(path) or path[end] in ".[":
                if path[:end] in self.error_paths:
                    return
                if (end == len(path) or path[end] == ".") and path[:end] in self.misspelt_meant:
                    return
        self.errors.append(error)
        self.error_paths.add(path)

    def attempt(self, read, *args, **options):
        """``read(*args)``, or ``options['default']`` after recording the SpecError it raised."""
        default = options.pop("default", None)
        try:
            return read(*args, **options)
        except SpecError as error:
            self.record(error)
            return default

    def report_errors(self):
        """Raise the errors recorded so far, sorted by file and position, as one error."""
        if not self.errors:
            return
        order = dict((name, index) for index, name in enumerate(self.files))
        errors = sorted(self.errors, key=lambda e: (order.get(e.file, len(order)), e.file or "",
                                                    e.line or 0, e.column or 0))
        if len(errors) == 1:
            raise errors[0]
        raise SpecErrors(errors[:_MAX_REPORTED_ERRORS],
                         more=max(0, len(errors) - _MAX_REPORTED_ERRORS))

    # --- typed readers ---

    def mapping(self, path, value, what="a mapping"):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, "expected %s, got %s" % (what, _format_value(value)))
        return value

    def check_keys(self, path, mapping, allowed, scope, hints=None):
        """Record every key not in ``allowed``, with a hint."""
        for key in mapping:
            if key in allowed:
                continue
            key_path = tuple(path) + (key,)
            if not isinstance(key, str):
                self.record(self.error(key_path, "keys must be strings, got %r" % (key,),
                                       at_key=True))
                continue
            if hints and key in hints:
                message, hint = hints[key]
                self.record(self.error(key_path, message, hint=hint, at_key=True))
                continue
            suggestion = _closest(key, allowed)
            hint = "did you mean '%s'?" % suggestion if suggestion else None
            if _COMPOSE_KEY_HINTS.get(key) and scope.startswith("service"):
                hint = _COMPOSE_KEY_HINTS[key]
            if not hint:
                hint = "valid keys: " + ", ".join(allowed)
            self.record(self.error(key_path, "unknown key '%s' in %s" % (key, scope), hint=hint,
                                   at_key=True))
            if suggestion and suggestion not in mapping:
                parent = _dotted(path)
                self.misspelt_parents.add(parent)
                self.misspelt_meant.add(parent + "." + suggestion if parent else suggestion)

    def string(self, path, value, interpolated=True, allow_empty=False, **options):
        if isinstance(value, str):
            text = value
        elif isinstance(value, (bool, int, float)):
            # Keep what the user typed: `1.10` must not become `1.1`, nor `True` replace `true`.
            mark = self.marks.get(tuple(path))
            text = mark.text if mark is not None and mark.text is not None else _scalar_text(value)
        elif value is None:
            raise self.error(path, "expected a string, got an empty value")
        else:
            raise self.error(path, "expected a string, got %s" % _format_value(value))
        if interpolated:
            text = self.interpolate(path, text, **options)
        if not allow_empty and not text.strip():
            raise self.error(path, "must not be empty")
        if "\0" in text:
            raise self.error(path, "the value contains a NUL byte", hint=_NUL_HINT)
        return text

    def optional_string(self, path, value, **options):
        return None if value is None else self.string(path, value, **options)

    def integer(self, path, value, minimum=1):
        if value is None:
            return None
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            # `${NODES:-2}`: a string is accepted when it interpolates to a plain integer.
            text = self.interpolate(path, value).strip()
            if text.isdigit():
                number = int(text)
        if number is None:
            raise self.error(path, "must be an integer, got %s" % _format_value(value))
        if number < minimum:
            raise self.error(path, "must be at least %d, got %d" % (minimum, number))
        return number

    def boolean(self, path, value):
        if not isinstance(value, bool):
            raise self.error(path, "must be true or false, got %s" % _format_value(value))
        return value

    def sequence(self, path, value):
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, "expected a list, got %s" % _format_value(value))
        return value

    def string_list(self, path, value, interpolated=True, **options):
        items = self.sequence(path, value)
        return tuple(self.string(tuple(path) + (index,), item, interpolated, **options)
                     for index, item in enumerate(items))

    def choice(self, path, value, choices):
        text = self.string(path, value)
        if text not in choices:
            suggestion = _closest(text, choices)
            raise self.error(path, "'%s' is not one of %s" % (text, ", ".join(choices)),
                             hint="did you mean '%s'?" % suggestion if suggestion else None)
        return text

    def apply_rule(self, path, function, *args, **kwargs):
        """``function(*args, **kwargs)``, a pure value rule; its ``_Invalid`` becomes a located error."""
        try:
            return function(*args, **kwargs)
        except _Invalid as exc:
            raise self.error(path, exc.message, hint=exc.hint)

    def environment(self, path, value):
        """Map or ``KEY=VALUE`` list -> ((key, value), ...); values interpolated, keys not."""
        pairs = []
        seen = set()
        if isinstance(value, dict):
            for key, item in value.items():
                item_path = tuple(path) + (key,)
                if not isinstance(key, str) or not _is_env_name(key):
                    raise self.error(item_path, "%r is not a valid environment variable name"
                                     % (key,), at_key=True,
                                     hint="names use letters, digits and _, and do not start "
                                          "with a digit")
                if item is None:
                    # Compose's `KEY:` with no value passes the variable through from the shell.
                    text = self.interpolate(item_path, "${%s}" % key)
                else:
                    text = self.string(item_path, item, allow_empty=True)
                pairs.append((key, text))
            return tuple(pairs)
        for index, item in enumerate(self.sequence(path, value)):
            item_path = tuple(path) + (index,)
            if not isinstance(item, str) or "=" not in item:
                raise self.error(item_path, "environment list items must be KEY=VALUE, got %s"
                                 % _format_value(item),
                                 hint="write KEY=VALUE, or use the mapping form KEY: VALUE")
            key, text = item.split("=", 1)
            if "\0" in text:
                raise self.error(item_path, "the value contains a NUL byte", hint=_NUL_HINT)
            if not _is_env_name(key):
                raise self.error(item_path, "%r is not a valid environment variable name" % key,
                                 hint="names use letters, digits and _, and do not start with "
                                      "a digit")
            if key in seen:
                raise self.error(item_path, "environment variable '%s' is set twice" % key)
            seen.add(key)
            pairs.append((key, self.interpolate(item_path, text)))
        return tuple(pairs)

    # --- the document ---

    def load(self):
        root = self.data
        if not isinstance(root, dict):
            raise self.error((), "the compose file must be a mapping with a services: key, got %s"
                             % _format_value(root))
        ours = ("x-slurm", "x-sweep")
        for key in root:
            if isinstance(key, str) and key.startswith("x-") and key not in ours:
                self.check_extension_key((key,), key, top_level=True)
        known = tuple(k for k in root if not (isinstance(k, str) and k.startswith("x-")
                                               and k not in ours))
        self.attempt(self.check_keys, (), dict.fromkeys(known), _TOP_LEVEL_KEYS, "the top level",
                     _UNSUPPORTED_TOP_LEVEL_KEYS)
        # Secrets first: every value interpolated after this is checked against theirs.
        self.secrets = self.attempt(self.top_level_secrets, ("secrets",), root.get("secrets"),
                                    default=())
        name = self.attempt(self.optional_string, ("name",), root.get("name"))
        if name is not None:
            # The job name when x-slurm.job_name is not set: it reaches an #SBATCH line.
            self.attempt(self.apply_rule, ("name",), _check_sbatch_value, name)
        version = root.get("version")
        if version is not None:
            version = self.attempt(self.string, ("version",), version, interpolated=False,
                                   allow_empty=True)
        slurm = self.attempt(self.slurm, ("x-slurm",), root.get("x-slurm"), default=SlurmSpec())
        sweep = None
        if root.get("x-sweep") is not None:
            sweep = self.attempt(self.sweep, ("x-sweep",), root["x-sweep"])
        if sweep is not None and slurm.array is not None:
            self.record(self.error(("x-slurm", "array"), "x-slurm.array and x-sweep both make the "
                                   "job array", hint="drop x-slurm.array: x-sweep sets the array "
                                                     "from its tasks (max_parallel for %N)"))
        elif sweep is not None:
            slurm = slurm._replace(array=_sweep_array(sweep))
        if "services" not in root:
            self.record(self.error((), "the compose file has no services: mapping",
                                   hint="add services: with at least one service"))
            self.report_errors()
        raw_services = self.attempt(self.mapping, ("services",), root["services"],
                                    "a mapping of services")
        if raw_services == {}:
            self.record(self.error(("services",), "services must contain at least one service"))
        raw_services = raw_services or {}
        services = []
        for name_, raw in raw_services.items():
            errors_before = len(self.errors)
            service = self.attempt(self.service, name_, raw, slurm)
            if service is not None and len(self.errors) == errors_before:
                services.append(service)
        self.check_relations(tuple(services), slurm, raw_services)
        for service in services:
            self.check_placeholders(service, sweep)
        self.report_errors()
        return ComposeSpec(self.file, self.project_dir, name, version, slurm, tuple(services),
                           tuple(self.warnings), self.files, secrets=self.secrets, sweep=sweep)

    def check_extension_key(self, path, key, top_level):
        """Extension keys are ignored (anchor holders); a near-miss of ours earns a warning."""
        known = ("x-slurm", "x-sweep") if top_level else ("x-slurm", "x-enroot")
        if top_level and key == "x-enroot":
            self.warnings.append("%s: x-enroot belongs under a service (services.<name>.x-enroot);"
                                 " at the top level it is ignored" % self.where(path))
            return
        import difflib
        for candidate in known:
            if difflib.SequenceMatcher(None, key.lower(), candidate).ratio() >= 0.75:
                self.warnings.append("%s: extension key '%s' is ignored; did you mean '%s'?"
                                     % (self.where(path), key, candidate))
                return

    def where(self, path):
        mark = self.mark(path, at_key=True)
        location = self.file + (":%d" % mark.line if mark else "")
        return "%s: %s" % (location, _dotted(path))

    # --- x-sweep ---

    def sweep(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _SWEEP_KEYS, "x-sweep")
        matrix = []
        upper = {}
        for name, values in self.mapping(path + ("matrix",), raw.get("matrix")).items():
            item_path = path + ("matrix", name)
            self.sweep_parameter_name(item_path, name)
            if name.upper() in upper:
                raise self.error(item_path, "parameters '%s' and '%s' are the same variable %s%s"
                                 % (upper[name.upper()], name, _SWEEP_PARAM_PREFIX, name.upper()),
                                 at_key=True, hint="rename one of them")
            upper[name.upper()] = name
            texts = tuple(self.string(item_path + (index,), value, allow_empty=True)
                          for index, value in enumerate(self.sequence(item_path, values)))
            if not texts:
                raise self.error(item_path, "parameter '%s' has no values" % name,
                                 hint="give it a list of at least one value")
            if len(set(texts)) != len(texts):
                raise self.error(item_path, "parameter '%s' lists a value twice" % name,
                                 hint="use replicates: N to run a combination several times")
            matrix.append((name, texts))
        include = tuple(self.sweep_combination(path + ("include", index), entry)
                        for index, entry in enumerate(self.sequence(path + ("include",),
                                                                    raw.get("include"))))
        exclude = tuple(self.sweep_combination(path + ("exclude", index), entry)
                        for index, entry in enumerate(self.sequence(path + ("exclude",),
                                                                    raw.get("exclude"))))
        if not matrix and not include:
            raise self.error(path, "x-sweep needs matrix (or include)",
                             hint="matrix: {lr: [0.1, 0.01]} runs one task per value")
        names = tuple(name for name, _ in matrix) or tuple(name for name, _ in include[0])
        for index, entry in enumerate(include):
            given = set(name for name, _ in entry)
            if given != set(names):
                missing = [name for name in names if name not in given]
                extra = sorted(given.difference(names))
                raise self.error(path + ("include", index), "an include entry is a whole "
                                 "combination: %s" % ("it has no value for " + ", ".join(missing)
                                                      if missing else "unknown parameter "
                                                      + ", ".join(extra)),
                                 hint="name every parameter: " + ", ".join(names))
        for index, entry in enumerate(exclude):
            for name, _ in entry:
                if name not in names:
                    raise self.error(path + ("exclude", index, name), "exclude names '%s', which "
                                     "is not a parameter" % name, at_key=True,
                                     hint="parameters: " + ", ".join(names))
        replicates = self.integer(path + ("replicates",), raw.get("replicates")) or 1
        max_parallel = self.integer(path + ("max_parallel",), raw.get("max_parallel"))
        results = self.string_list(path + ("results",), raw.get("results"))
        for index, result in enumerate(results):
            if os.path.isabs(result) or ".." in result.split("/"):
                raise self.error(path + ("results", index), "a result file is a path under the "
                                 "task's job directory, got %r" % result,
                                 hint="write it to $HPC_COMPOSE_JOB_DIR/result.json and list "
                                      "result.json")
        tasks = _expand_sweep(tuple(matrix), include, exclude, replicates)
        if not tasks:
            raise self.error(path + ("exclude",), "exclude removes every combination: the sweep "
                             "has no task")
        return SweepSpec(names, tasks, replicates, max_parallel, results or _DEFAULT_SWEEP_RESULTS)

    def sweep_parameter_name(self, path, name):
        if not isinstance(name, str) or not _is_env_name(name):
            raise self.error(path, "%r is not a valid parameter name" % (name,), at_key=True,
                             hint="names use letters, digits and _ (they become "
                                  "%sNAME variables)" % _SWEEP_PARAM_PREFIX)

    def sweep_combination(self, path, raw):
        """One include/exclude entry: ``((name, value), ...)`` in the order written."""
        entry = self.mapping(path, raw, "a mapping of parameter -> value")
        if not entry:
            raise self.error(path, "an empty combination", hint="name at least one parameter")
        pairs = []
        for name, value in entry.items():
            self.sweep_parameter_name(path + (name,), name)
            pairs.append((name, self.string(path + (name,), value, allow_empty=True)))
        return tuple(pairs)

    def check_placeholders(self, service, sweep):
        """Every ``((param.NAME))`` names a parameter of x-sweep."""
        names = sweep.parameters if sweep is not None else ()
        fields = [("command", service.command), ("entrypoint", service.entrypoint),
                  ("environment", [value for _, value in service.environment]),
                  ("volumes", service.volumes)]
        for key, value in fields:
            texts = [value] if isinstance(value, str) else list(value or ())
            for text in texts:
                for name in _sweep_placeholders(text):
                    if name in names and key == "volumes":
                        self.check_mount_values(service, sweep, name)
                    if name in names:
                        continue
                    self.record(self.error(("services", service.name, key),
                                           "((param.%s)) names no x-sweep parameter" % name,
                                           hint="parameters: " + ", ".join(names) if names else
                                           "placeholders take their values from x-sweep.matrix"))
                    return

    def check_mount_values(self, service, sweep, name):
        """A value that fills a volume path: Pyxis and Apptainer split mounts at ',' and ':'."""
        for task in sweep.tasks:
            value = dict(task.params)[name]
            if "," in value or ":" in value:
                self.record(self.error(("x-sweep", "matrix", name), "value %r of parameter '%s' "
                                       "fills a volume of service '%s', but contains ',' or ':', "
                                       "which split mounts" % (value, name, service.name),
                                       hint="use values without ',' and ':' for paths"))
                return

    # --- x-slurm (top level) ---

    def slurm(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _SLURM_KEYS, "x-slurm")
        values = {}
        # Key by key (attempt), so that one bad value is one error and the rest is still read.
        for key in _SLURM_STRING_KEYS:
            values[key] = self.attempt(self.slurm_value, path + (key,), raw.get(key))
        for key in _SLURM_COUNT_KEYS:
            values[key] = self.attempt(self.integer, path + (key,), raw.get(key))
        if raw.get("exclusive") is not None:
            values["exclusive"] = self.attempt(self.exclusive, path + ("exclusive",),
                                               raw["exclusive"])
        self.check_memory_options(path, values)
        if values["cache_dir"] is not None:
            self.attempt(self.apply_rule, path + ("cache_dir",), _check_cache_dir,
                         resolve_host_path(values["cache_dir"], self.project_dir, self.variables))
        if "metrics" in raw:
            values["metrics"] = self.attempt(self.metrics, path + ("metrics",), raw["metrics"])
        if raw.get("artifacts") is not None:
            values["artifacts"] = self.attempt(self.artifacts, path + ("artifacts",),
                                               raw["artifacts"])
        if raw.get("resume") is not None:
            values["resume"] = self.attempt(self.resume, path + ("resume",), raw["resume"],
                                            default=_UNREAD)
        # setup lines are shell, emitted verbatim: interpolating them would eat the user's $VARS.
        values["setup"] = self.attempt(self.string_list, path + ("setup",), raw.get("setup"),
                                       interpolated=False, allow_empty=True, default=())
        values["submit_args"] = self.attempt(self.string_list, path + ("submit_args",),
                                             raw.get("submit_args"), default=())
        for index, arg in enumerate(values["submit_args"]):
            self.attempt(self.apply_rule, path + ("submit_args", index), _check_sbatch_value, arg,
                         raw=True)
        if raw.get("runtime") is not None:
            values["runtime"] = self.attempt(self.choice, path + ("runtime",), raw["runtime"],
                                             _RUNTIMES, default=_UNREAD)
        if raw.get("share_with_group") is not None:
            values["share_with_group"] = self.attempt(self.boolean, path + ("share_with_group",),
                                                      raw["share_with_group"], default=False)
        if raw.get("requeue") is not None:
            values["requeue"] = self.attempt(self.boolean, path + ("requeue",), raw["requeue"],
                                             default=_UNREAD)
        if raw.get("signal") is not None:
            values["signal"] = self.attempt(self.job_signal, path + ("signal",), raw["signal"],
                                            values)
        if raw.get("dependency") is not None:
            values["dependency"] = self.attempt(self.dependency, path + ("dependency",),
                                                raw["dependency"])
        if raw.get("array") is not None:
            values["array"] = self.attempt(self.job_array, path + ("array",), raw["array"])
        values["modules"] = self.attempt(self.modules, path + ("modules",), raw.get("modules"),
                                         default=())
        values["modules_path"] = self.attempt(self.string_list, path + ("modules_path",),
                                              raw.get("modules_path"), default=())
        # A resume or requeue that could not be read was reported; signal did not repeat it.
        for key in ("resume", "requeue"):
            if values.get(key) is _UNREAD:
                values[key] = None
        self.check_gpus(path, values)
        return SlurmSpec(**values)

    def slurm_value(self, path, raw):
        """A string option; one that sbatch or srun parses is checked against its grammar."""
        text = self.optional_string(path, raw)
        if text is not None and path[-1] != "cache_dir":
            self.apply_rule(path, _check_sbatch_value, text)
        if text is not None and path[-1] in _SLURM_GRAMMARS:
            self.apply_rule(path, _check_slurm_value, path[-1], text)
        return text

    def exclusive(self, path, raw):
        if isinstance(raw, bool):
            return raw
        return self.choice(path, raw, _EXCLUSIVE_MODES)

    def check_memory_options(self, path, values):
        given = [key for key in ("mem", "mem_per_cpu", "mem_per_gpu") if values.get(key)]
        if len(given) > 1:
            self.record(self.error(path + (given[1],), "%s and %s are both set; sbatch accepts "
                                   "only one of mem, mem_per_cpu and mem_per_gpu" % tuple(given[:2]),
                                   hint="keep the one that says what the job needs"))

    def job_signal(self, path, raw, values):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _SIGNAL_KEYS, "x-slurm.signal")
        # name and on_signal are read on their own: a bad one is reported with the before errors.
        name = "USR1"
        if raw.get("name") is not None:
            name = self.attempt(self.choice, path + ("name",), _signal_name(raw["name"]),
                                _JOB_SIGNALS, default=name)
        action = "forward"
        if raw.get("on_signal") is not None:
            action = self.attempt(self.choice, path + ("on_signal",), raw["on_signal"],
                                  _ON_SIGNAL_ACTIONS, default=_UNREAD)
        if raw.get("before") is None:
            raise self.error(path, "x-slurm.signal needs before",
                             hint="how long before the time limit Slurm sends it, e.g. before: 5m")
        before = self.apply_rule(path + ("before",), _parse_duration, raw["before"])
        if before > _MAX_SIGNAL_BEFORE:
            raise self.error(path + ("before",), "before is %d s; Slurm accepts at most %d s"
                             % (before, _MAX_SIGNAL_BEFORE))
        limit = _slurm_time_seconds(values.get("time"))
        if limit is not None and before >= limit:
            raise self.error(path + ("before",), "before (%d s) is not shorter than the job's "
                             "time limit (x-slurm.time %s = %d s): the signal would never come"
                             % (before, values["time"], limit),
                             hint="give the job more time or the signal a smaller before")
        if action is _UNREAD:
            return SignalSpec(name, before)
        if action != "requeue":
            self.refuse_keys_unless(path, raw, ("grace", "max_attempts"), "on_signal: requeue")
            return SignalSpec(name, before, action)
        if values.get("resume") is None:
            raise self.error(path + ("on_signal",), "on_signal: requeue needs x-slurm.resume: "
                             "the next attempt must find the checkpoint somewhere",
                             hint="add x-slurm.resume.path (shared storage) and load the "
                                  "checkpoint from $HPC_COMPOSE_RESUME_DIR")
        if values.get("requeue") is False:
            raise self.error(path + ("on_signal",), "on_signal: requeue contradicts "
                             "x-slurm.requeue: false", hint="set requeue: true or drop it")
        grace = before // 2
        if raw.get("grace") is not None:
            grace = self.apply_rule(path + ("grace",), _parse_duration, raw["grace"])
        if grace + _REQUEUE_TEARDOWN_SECONDS > before:
            raise self.error(path + ("grace" if "grace" in raw else "before",),
                             "grace (%d s) and the teardown after it (%d s) do not fit in before "
                             "(%d s)" % (grace, _REQUEUE_TEARDOWN_SECONDS, before),
                             hint="make before at least grace + %d s" % _REQUEUE_TEARDOWN_SECONDS)
        max_attempts = self.integer(path + ("max_attempts",), raw.get("max_attempts"))
        return SignalSpec(name, before, action, grace,
                          _DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts)

    def dependency(self, path, raw):
        return self.apply_rule(path, _check_dependency, self.string(path, raw))

    def job_array(self, path, raw):
        return self.apply_rule(path, _check_array, self.string(path, _scalar_text(raw)))

    def service_signal(self, path, raw):
        if raw is False:
            return ServiceSignalSpec(forward=False)
        if not isinstance(raw, dict):
            raise self.error(path, "expected a mapping (name, forward) or false, got %s"
                             % _format_value(raw))
        self.check_keys(path, raw, _SERVICE_SIGNAL_KEYS, "services.<name>.x-slurm.signal")
        name = None
        if raw.get("name") is not None:
            name = self.choice(path + ("name",), _signal_name(raw["name"]), _SERVICE_SIGNALS)
        forward = True
        if raw.get("forward") is not None:
            forward = self.boolean(path + ("forward",), raw["forward"])
        return ServiceSignalSpec(name, forward)

    def check_gpus(self, path, values):
        if values.get("gres") is not None and values.get("gpus") is not None:
            self.warnings.append("%s: gpus is ignored because gres is set at the same level"
                                 % self.where(path + ("gpus",)))

    def metrics(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _METRICS_KEYS, "x-slurm.metrics")
        enabled = True if raw.get("enabled") is None else self.boolean(path + ("enabled",),
                                                                        raw["enabled"])
        interval = self.integer(path + ("interval_seconds",), raw.get("interval_seconds"))
        collectors = ("gpu", "slurm")
        if raw.get("collectors") is not None:
            collectors = []
            for index, item in enumerate(self.sequence(path + ("collectors",), raw["collectors"])):
                item_path = path + ("collectors", index)
                collector = self.choice(item_path, item, _METRICS_COLLECTORS)
                if collector in collectors:
                    raise self.error(item_path, "collector '%s' is listed twice" % collector)
                collectors.append(collector)
            if not collectors:
                raise self.error(path + ("collectors",), "collectors must not be empty",
                                 hint="list gpu and/or slurm, or set enabled: false")
            collectors = tuple(collectors)
        return MetricsSpec(enabled, interval if interval is not None else 5, collectors)

    def artifacts(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _ARTIFACTS_KEYS, "x-slurm.artifacts")
        if raw.get("export_dir") is None:
            raise self.error(path, "x-slurm.artifacts needs export_dir",
                             hint="e.g. export_dir: ./results/${SLURM_JOB_ID}")
        export_dir = self.string(path + ("export_dir",), raw["export_dir"],
                                 keep=("SLURM_JOB_ID",))
        collect = "always"
        if raw.get("collect") is not None:
            collect = self.choice(path + ("collect",), raw["collect"], _ARTIFACT_COLLECT)
        paths = self.artifact_paths(path + ("paths",), raw.get("paths"))
        bundles = []
        raw_bundles = self.mapping(path + ("bundles",), raw.get("bundles"))
        for bundle, body in raw_bundles.items():
            bundle_path = path + ("bundles", bundle)
            if not isinstance(bundle, str) or not bundle or \
                    not _BUNDLE_NAME_CHARS.issuperset(bundle):
                raise self.error(bundle_path, "bundle name %r must match [A-Za-z0-9_-]+"
                                 % (bundle,), at_key=True)
            if bundle == "default":
                raise self.error(bundle_path, "bundle name 'default' is reserved for "
                                 "x-slurm.artifacts.paths", at_key=True,
                                 hint="put those paths under artifacts.paths, or rename the bundle")
            body = self.mapping(bundle_path, body)
            self.check_keys(bundle_path, body, ("paths",), "an artifact bundle")
            bundle_paths = self.artifact_paths(bundle_path + ("paths",), body.get("paths"))
            if not bundle_paths:
                raise self.error(bundle_path, "bundle '%s' needs at least one path" % bundle)
            bundles.append((bundle, bundle_paths))
        if not paths and not bundles:
            raise self.error(path, "x-slurm.artifacts needs at least one source path in paths or "
                             "bundles", hint="e.g. paths: [%s/metrics/**]" % _JOB_MOUNT)
        return ArtifactsSpec(export_dir, collect, paths, tuple(bundles))

    def artifact_paths(self, path, raw):
        result = []
        for index, item in enumerate(self.sequence(path, raw)):
            item_path = path + (index,)
            text = self.string(item_path, item, keep=("SLURM_JOB_ID",))
            result.append(self.apply_rule(item_path, _normalize_artifact_path, text))
        return tuple(result)

    def resume(self, path, raw):
        import posixpath
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _RESUME_KEYS, "x-slurm.resume")
        if raw.get("path") is None:
            raise self.error(path, "x-slurm.resume needs path",
                             hint="a shared host directory, e.g. path: /shared/$USER/runs/my-run")
        text = self.string(path + ("path",), raw["path"])
        if not text.startswith("/"):
            raise self.error(path + ("path",), "resume path %r must be an absolute host path"
                             % text, hint="use shared storage visible from every node")
        normalized = "/" + posixpath.normpath(text).lstrip("/")
        if "," in normalized or ":" in normalized:
            raise self.error(path + ("path",), "resume path %r contains '%s', which the container "
                             "mount list cannot carry" % (text, "," if "," in text else ":"),
                             hint="choose a directory name without ',' or ':'")
        if normalized == "/hpc-compose" or normalized.startswith("/hpc-compose/"):
            raise self.error(path + ("path",), "resume path %r is a container path; it must point "
                             "at shared host storage" % text,
                             hint="it is mounted into every service at %s" % _RESUME_MOUNT)
        return ResumeSpec(normalized)

    # --- services ---

    def service(self, name, raw, top_slurm):
        path = ("services", name)
        if not isinstance(name, str) or not _is_service_name(name):
            raise self.error(path, "service name %r is not valid" % (name,), at_key=True,
                             hint="use letters, digits, '_', '.' and '-', starting with a letter "
                                  "or digit")
        if raw is None:
            raise self.error(path, "service '%s' is empty" % name,
                             hint="give it at least an image and usually a command")
        raw = self.mapping(path, raw, "a mapping (the service definition)")
        for key in raw:
            if isinstance(key, str) and key.startswith("x-") and key not in ("x-slurm", "x-enroot"):
                self.check_extension_key(path + (key,), key, top_level=False)
        known = dict((k, v) for k, v in raw.items()
                     if not (isinstance(k, str) and k.startswith("x-")
                             and k not in ("x-slurm", "x-enroot")))
        self.check_keys(path, known, _SERVICE_KEYS, "service '%s'" % name,
                        _UNSUPPORTED_SERVICE_KEYS)
        # Each field is read on its own, so that one bad field does not hide the others; a check
        # across fields runs only when the fields it reads were read without error.
        slurm = self.attempt(self.service_slurm, path + ("x-slurm",), raw.get("x-slurm"),
                             default=ServiceSlurmSpec())
        runtime = slurm.runtime or top_slurm.runtime
        host = runtime == "host"
        mark = self.mark(path, at_key=True)
        line = mark.line if mark else None
        # A runtime that could not be read (already reported) decides nothing: no "needs an image".
        image = self.attempt(self.service_image, path, raw, host or runtime is _UNREAD, runtime)
        command = self.attempt(self.command_form, path + ("command",), raw.get("command"),
                               default=_UNREAD)
        entrypoint = self.attempt(self.command_form, path + ("entrypoint",),
                                  raw.get("entrypoint"), default=_UNREAD)
        commands_read = command is not _UNREAD and entrypoint is not _UNREAD
        if commands_read:
            self.attempt(self.check_command_forms, path, host, command, entrypoint)
        environment = self.attempt(self.service_environment, path, raw, default=())
        volumes = self.attempt(self.service_volumes, path, raw, host, top_slurm, default=())
        working_dir = None
        if commands_read:
            working_dir = self.attempt(self.service_working_dir, path, raw, host,
                                       command is not None or entrypoint is not None)
        depends_on = self.attempt(self.depends_on, path + ("depends_on",), raw.get("depends_on"),
                                  default=())
        readiness = self.attempt(self.service_readiness, path, raw)
        prepare = self.attempt(self.service_prepare, path, raw, host)
        profiles = self.attempt(self.service_profiles, path + ("profiles",), raw.get("profiles"),
                                default=())
        secrets = self.attempt(self.service_secrets, path + ("secrets",), raw.get("secrets"),
                               default=())
        return ServiceSpec(name, image, command, entrypoint, environment, volumes, working_dir,
                           depends_on, readiness, slurm, prepare, runtime, line, profiles,
                           getattr(mark, "file", None), secrets)

    def service_image(self, path, raw, host, runtime):
        image = None
        if raw.get("image") is not None:
            # The manual: unset variables in image expand to empty strings (then caught as empty).
            image = self.string(path + ("image",), raw["image"], unset_is_empty=True,
                                allow_empty=True)
            if not host:
                self.apply_rule(path + ("image",), _classify_image, image, runtime)
            else:
                self.warnings.append("%s: image '%s' is not used: the service runs with the host "
                                     "runtime" % (self.where(path + ("image",)), image))
        elif not host:
            raise self.error(path, "service '%s' needs an image" % path[-1],
                             hint="e.g. image: python:3.11-slim, or run it on the node with "
                                  "x-slurm.runtime: host")
        return image

    def check_command_forms(self, path, host, command, entrypoint):
        if command is not None and entrypoint is not None and \
                isinstance(command, str) != isinstance(entrypoint, str):
            raise self.error(path + ("entrypoint",), "command and entrypoint must use the same "
                             "form (both strings or both lists)",
                             hint="write both as lists (exec form) or both as strings (shell "
                                  "form)")
        if host and command is None and entrypoint is None:
            raise self.error(path, "service '%s' uses the host runtime but has no command or "
                             "entrypoint" % path[-1],
                             hint="there is no image default to run; give it a command")

    def service_volumes(self, path, raw, host, top_slurm):
        if raw.get("volumes") is None:
            return ()
        if host:
            raise self.error(path + ("volumes",), "volumes are not available with the host "
                             "runtime: the service already sees the node's file system",
                             hint="use the host paths directly, or switch the service to "
                                  "x-slurm.runtime: pyxis")
        import posixpath
        volumes = []
        targets = {}
        for index, item in enumerate(self.sequence(path + ("volumes",), raw["volumes"])):
            item_path = path + ("volumes", index)
            # Each entry on its own: short form as written, or the long syntax (type: bind).
            text = self.attempt(self.volume_text, item_path, item)
            parts = text is not None and self.attempt(
                self.apply_rule, item_path, _split_volume, text,
                resume_enabled=top_slurm.resume is not None)
            if not parts:
                continue
            target = posixpath.normpath(parts[1])
            if target in targets:
                self.record(self.error(item_path, "two mounts at %s: %r and %r; the second would "
                                       "hide the first" % (target, targets[target], text),
                                       hint="keep one, or mount the second somewhere else"))
                continue
            targets[target] = text
            volumes.append(text)
        return tuple(volumes)

    def service_working_dir(self, path, raw, host, has_command):
        if raw.get("working_dir") is None:
            return None
        working_dir = self.string(path + ("working_dir",), raw["working_dir"])
        if not has_command:
            raise self.error(path + ("working_dir",), "working_dir needs an explicit command "
                             "or entrypoint",
                             hint="add the command to run in that directory")
        if not host and not working_dir.startswith("/"):
            raise self.error(path + ("working_dir",), "working_dir %r must be an absolute "
                             "container path" % working_dir)
        return working_dir

    def service_readiness(self, path, raw):
        if raw.get("readiness") is not None and raw.get("healthcheck") is not None:
            raise self.error(path + ("healthcheck",), "healthcheck and readiness are mutually "
                             "exclusive", hint="keep one of them (readiness is the native form)")
        if raw.get("readiness") is not None:
            return self.readiness(path + ("readiness",), raw["readiness"])
        if raw.get("healthcheck") is not None:
            return self.healthcheck(path + ("healthcheck",), raw["healthcheck"])
        return None

    def service_prepare(self, path, raw, host):
        if raw.get("x-enroot") is None:
            return None
        if host:
            raise self.error(path + ("x-enroot",), "x-enroot is not available with the host "
                             "runtime: there is no container image to prepare",
                             hint="install the tools on the node (x-slurm.setup can load "
                                  "modules), or use x-slurm.runtime: pyxis")
        return self.x_enroot(path + ("x-enroot",), raw["x-enroot"])

    def service_environment(self, path, raw):
        """``env_file`` entries in order, then ``environment`` over them (Compose's precedence)."""
        values = {}
        order = []
        for key, value in self.attempt(self.env_files, path + ("env_file",), raw.get("env_file"),
                                       default=()):
            if key not in values:
                order.append(key)
            values[key] = value
        for key, value in self.environment(path + ("environment",), raw.get("environment")):
            if key not in values:
                order.append(key)
            values[key] = value
        return tuple((key, values[key]) for key in order)

    def env_files(self, path, raw):
        """The variables of a service's ``env_file`` (string, list, or ``{path, required,
        format}`` items), read from files relative to the project directory."""
        if raw is None:
            return []
        items = [raw] if isinstance(raw, str) else self.sequence(path, raw)
        pairs = []
        for index, item in enumerate(items):
            item_path = path if isinstance(raw, str) else path + (index,)
            required, raw_format = True, None
            if isinstance(item, dict):
                self.check_keys(item_path, item, _ENV_FILE_KEYS, "an env_file entry")
                if item.get("path") is None:
                    raise self.error(item_path, "an env_file entry needs path")
                if item.get("required") is not None:
                    required = self.boolean(item_path + ("required",), item["required"])
                if item.get("format") is not None:
                    raw_format = self.choice(item_path + ("format",), item["format"], ("raw",))
                item_path, item = item_path + ("path",), item["path"]
            name = self.string(item_path, item)
            file_path = resolve_host_path(name, self.project_dir, self.variables)
            if not os.path.isfile(file_path):
                if required:
                    raise self.error(item_path, "env_file %s does not exist" % file_path,
                                     hint="create it, fix the path, or use the long form with "
                                          "required: false")
                continue
            for key, value, used in self.env_file_values(file_path, raw_format == "raw"):
                # The service's environment is written into the batch script.
                self.check_secret_value(item_path, value, expanded=False, used=used)
                pairs.append((key, value))
        return pairs

    def env_file_values(self, file_path, raw_format):
        """Compose's env_file grammar: unquoted and double-quoted values are interpolated,
        single-quoted ones and ``format: raw`` files are literal. ``(key, value, the names of the
        variables it refers to)`` per line."""
        pairs = []
        text = _read_env_file(file_path)
        if raw_format:
            for line in text.splitlines():
                key, equals, value = line.partition("=")
                if equals and _is_env_name(key.strip()):
                    pairs.append((key.strip(), value, ()))
            return pairs
        for number, key, value, quote in _dotenv_entries(text, file_path):
            used = set()
            if quote != "'":
                value = interpolate(value, self.variables, path=key, file=file_path, line=number,
                                    used=used)
            pairs.append((key, value, used))
        return pairs

    def service_profiles(self, path, raw):
        names = self.string_list(path, raw, interpolated=False)
        for index, name in enumerate(names):
            if not _is_service_name(name):
                raise self.error(path + (index,), "profile name %r is not valid" % name,
                                 hint="use letters, digits, '_', '.' and '-', starting with a "
                                      "letter or digit")
        return names

    def command_form(self, path, value):
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise self.error(path, "must not be an empty list")
            # Exec form: each word is interpolated (write $$ for a literal $).
            return tuple(self.string(path + (index,), item, allow_empty=True)
                         for index, item in enumerate(value))
        # Shell form reaches /bin/sh -c exactly as written: $VARS are the container shell's.
        return self.string(path, value, interpolated=False)

    def volume_text(self, path, item):
        """A volume as ``source:target[:ro]``: the short form as written, or the long syntax."""
        if not isinstance(item, dict):
            return self.string(path, item)
        if item.get("type") is None:
            raise self.error(path, "a long-syntax volume needs type: bind",
                             hint="write type: bind, source: HOST_PATH, target: CONTAINER_PATH")
        kind = self.string(path + ("type",), item["type"])
        name = item.get("source") if isinstance(item.get("source"), str) else "NAME"
        target = item.get("target") if isinstance(item.get("target"), str) else "/data"
        if kind == "volume":
            raise self.error(path + ("type",), "type: volume (a named volume) is not supported",
                             hint="write type: bind with source: a folder on storage the compute "
                                  "nodes see, e.g. source: ./data/%s (hpc-compose migrate writes "
                                  "this)" % name)
        if kind == "tmpfs":
            raise self.error(path + ("type",), "type: tmpfs is not supported",
                             hint="every step gets a fresh /tmp; for %s write type: bind with "
                                  "source: a folder such as ./data/scratch" % target)
        if kind != "bind":
            raise self.error(path + ("type",), "volume type '%s' is not supported" % kind,
                             hint="write type: bind with source and target")
        self.check_keys(path, item, ("type", "source", "target", "read_only", "bind"),
                        "a long-syntax volume")
        for key in ("source", "target"):
            if item.get(key) is None:
                raise self.error(path, "a type: bind volume needs %s" % key)
        source = self.string(path + ("source",), item["source"])
        target = self.string(path + ("target",), item["target"])
        read_only = item.get("read_only") is not None and \
            self.boolean(path + ("read_only",), item["read_only"])
        bind = self.mapping(path + ("bind",), item.get("bind"))
        self.check_keys(path + ("bind",), bind, ("create_host_path",), "bind")
        if bind.get("create_host_path") is not None and \
                not self.boolean(path + ("bind", "create_host_path"), bind["create_host_path"]):
            raise self.error(path + ("bind", "create_host_path"), "create_host_path: false is not "
                             "supported: the batch script creates a missing source folder, as "
                             "Docker does for the short form",
                             hint="remove it; preflight reports a missing source before you submit")
        return "%s:%s%s" % (source, target, ":ro" if read_only else "")

    def service_slurm(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _SERVICE_SLURM_KEYS, "services.<name>.x-slurm")
        values = {}
        for key in ("nodes", "ntasks", "ntasks_per_node", "cpus_per_task", "gpus"):
            values[key] = self.attempt(self.integer, path + (key,), raw.get(key))
        for key in ("gres", "mem", "time"):
            values[key] = self.attempt(self.slurm_value, path + (key,), raw.get(key))
        values["extra_srun_args"] = self.attempt(self.string_list, path + ("extra_srun_args",),
                                                 raw.get("extra_srun_args"), default=())
        values["failure_policy"] = self.attempt(self.failure_policy, path + ("failure_policy",),
                                                raw.get("failure_policy"),
                                                default=FailurePolicy())
        if raw.get("runtime") is not None:
            values["runtime"] = self.attempt(self.choice, path + ("runtime",), raw["runtime"],
                                             _RUNTIMES, default=_UNREAD)
        if raw.get("signal") is not None:
            values["signal"] = self.attempt(self.service_signal, path + ("signal",), raw["signal"])
        if raw.get("mpi") is not None:
            values["mpi"] = self.attempt(self.mpi, path + ("mpi",), raw["mpi"])
        values["modules"] = self.attempt(self.modules, path + ("modules",), raw.get("modules"),
                                         default=())
        self.check_gpus(path, values)
        return ServiceSlurmSpec(**values)

    def mpi(self, path, raw):
        """x-slurm.mpi: ``pmix`` or ``{type: pmix}`` -> the plugin name."""
        if isinstance(raw, dict):
            self.check_keys(path, raw, ("type",), "x-slurm.mpi")
            if raw.get("type") is None:
                raise self.error(path, "x-slurm.mpi needs type", hint="e.g. mpi: {type: pmix}")
            path = path + ("type",)
            raw = raw["type"]
        return self.apply_rule(path, _check_mpi_type, self.string(path, raw))

    def modules(self, path, raw):
        """x-slurm.modules: module names, each with the file and line that names it."""
        found = []
        for index, name in enumerate(self.string_list(path, raw)):
            self.apply_rule(path + (index,), _check_module_name, name)
            mark = self.mark(path + (index,))
            location = self.file_of(mark) if mark is not None else self.file
            if mark is not None:
                location += ":%d" % mark.line
            found.append(ModuleSpec(name, location))
        return tuple(found)

    def refuse_keys_unless(self, path, raw, keys, needed):
        """One located error for the first of ``keys`` set in ``raw``: they need ``needed``."""
        for key in keys:
            if key in raw:
                raise self.error(path + (key,), "%s is valid only with %s" % (key, needed),
                                 at_key=True)

    def failure_policy(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _FAILURE_POLICY_KEYS, "failure_policy")
        mode = "fail_job"
        if raw.get("mode") is not None:
            mode = self.choice(path + ("mode",), raw["mode"], _FAILURE_MODES)
        if mode != "restart_on_failure":
            self.refuse_keys_unless(path, raw, ("max_restarts", "backoff_seconds"),
                                    "mode: restart_on_failure (mode is %s)" % mode)
            return FailurePolicy(mode)
        max_restarts = self.integer(path + ("max_restarts",), raw.get("max_restarts"))
        backoff = self.integer(path + ("backoff_seconds",), raw.get("backoff_seconds"))
        return FailurePolicy(mode,
                             _DEFAULT_MAX_RESTARTS if max_restarts is None else max_restarts,
                             _DEFAULT_BACKOFF_SECONDS if backoff is None else backoff)

    def depends_on(self, path, raw):
        pairs = []
        if isinstance(raw, dict):
            for target, body in raw.items():
                item_path = path + (target,)
                if not isinstance(target, str):
                    raise self.error(item_path, "dependency names must be strings", at_key=True)
                condition = "service_started"
                body = self.mapping(item_path, body, "a mapping with condition:")
                self.check_keys(item_path, body, ("condition",), "a depends_on entry")
                if body.get("condition") is not None:
                    condition_path = item_path + ("condition",)
                    condition = self.choice(condition_path, body["condition"],
                                            _DEPENDENCY_CONDITIONS)
                pairs.append((target, condition))
            return tuple(pairs)
        for index, item in enumerate(self.sequence(path, raw)):
            item_path = path + (index,)
            target = self.string(item_path, item, interpolated=False)
            if target in [p[0] for p in pairs]:
                raise self.error(item_path, "'%s' is listed twice" % target)
            pairs.append((target, "service_started"))
        return tuple(pairs)

    def readiness(self, path, raw):
        raw = self.mapping(path, raw)
        if raw.get("type") is None:
            raise self.error(path, "readiness needs a type (%s)" % ", ".join(_READINESS_FIELDS))
        kind = self.choice(path + ("type",), raw["type"], tuple(_READINESS_FIELDS))
        self.check_keys(path, raw, ("type",) + _READINESS_FIELDS[kind],
                        "readiness of type %s" % kind)
        timeout = self.integer(path + ("timeout_seconds",), raw.get("timeout_seconds"))
        if timeout is None:
            timeout = _DEFAULT_READINESS_TIMEOUT
        if kind == "sleep":
            if raw.get("seconds") is None:
                raise self.error(path, "readiness type sleep needs seconds")
            return ReadinessSpec("sleep", seconds=self.integer(path + ("seconds",),
                                                               raw["seconds"], minimum=0))
        if kind == "tcp":
            if raw.get("port") is None:
                raise self.error(path, "readiness type tcp needs port")
            port = self.integer(path + ("port",), raw["port"])
            if port > 65535:
                raise self.error(path + ("port",), "port %d is out of range (1-65535)" % port)
            host = "127.0.0.1"
            if raw.get("host") is not None:
                host = self.string(path + ("host",), raw["host"])
            return ReadinessSpec("tcp", host=host, port=port, timeout_seconds=timeout)
        if kind == "log":
            if raw.get("pattern") is None:
                raise self.error(path, "readiness type log needs pattern")
            # A literal substring of the log: never interpolated, `$` is just a character.
            pattern = self.string(path + ("pattern",), raw["pattern"], interpolated=False)
            return ReadinessSpec("log", pattern=pattern, timeout_seconds=timeout)
        if raw.get("url") is None:
            raise self.error(path, "readiness type http needs url")
        url = self.string(path + ("url",), raw["url"])
        if not url.startswith(("http://", "https://")) or not _url_host(url):
            raise self.error(path + ("url",), "url %r must be an http:// or https:// URL with a "
                             "host" % url)
        status = 200
        if raw.get("status_code") is not None:
            status = self.integer(path + ("status_code",), raw["status_code"], minimum=100)
            if status > 599:
                raise self.error(path + ("status_code",), "status_code %d is not an HTTP status"
                                 % status)
        return ReadinessSpec("http", url=url, status_code=status, timeout_seconds=timeout)

    def healthcheck(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _HEALTHCHECK_KEYS, "healthcheck")
        if raw.get("disable") is not None and self.boolean(path + ("disable",), raw["disable"]):
            return None
        for key in ("interval", "retries", "start_period", "start_interval"):
            if key in raw:
                raise self.error(path + (key,), "healthcheck.%s is not supported in v1" % key,
                                 at_key=True, hint="remove it: readiness is polled every second "
                                                   "until healthcheck.timeout (default 60s)")
        if raw.get("test") is None:
            raise self.error(path, "healthcheck needs test (or disable: true)")
        timeout = _DEFAULT_READINESS_TIMEOUT
        if raw.get("timeout") is not None:
            timeout = self.apply_rule(path + ("timeout",), _parse_duration, raw["timeout"])
        test_path = path + ("test",)
        test = raw["test"]
        if isinstance(test, list):
            words = [self.string(test_path + (i,), w, allow_empty=True) for i, w in enumerate(test)]
            if not words:
                raise self.error(test_path, "healthcheck test must not be empty")
            if words[0] == "NONE":
                return None
            if words[0] == "CMD":
                argv = words[1:]
            elif words[0] == "CMD-SHELL":
                if len(words) != 2:
                    raise self.error(test_path, "CMD-SHELL takes exactly one command string")
                argv = self.apply_rule(test_path, _split_shell_probe, words[1])
            else:
                raise self.error(test_path, "healthcheck test lists must start with CMD or "
                                 "CMD-SHELL, got %r" % words[0])
        else:
            argv = self.apply_rule(test_path, _split_shell_probe, self.string(test_path, test))
        readiness = self.apply_rule(test_path, _probe_readiness, argv)
        return readiness._replace(timeout_seconds=timeout)

    def x_enroot(self, path, raw):
        raw = self.mapping(path, raw)
        self.check_keys(path, raw, _X_ENROOT_KEYS, "x-enroot")
        if raw.get("prepare") is None:
            return None
        path = path + ("prepare",)
        raw = self.mapping(path, raw["prepare"])
        self.check_keys(path, raw, _PREPARE_KEYS, "x-enroot.prepare")
        # Prepare commands are shell run inside the image by enroot: never interpolated.
        commands = self.string_list(path + ("commands",), raw.get("commands"), interpolated=False)
        if not commands:
            raise self.error(path + ("commands",), "x-enroot.prepare.commands must not be empty",
                             hint="list the shell commands that customize the image")
        mounts = []
        for index, item in enumerate(self.sequence(path + ("mounts",), raw.get("mounts"))):
            item_path = path + ("mounts", index)
            text = self.volume_text(item_path, item)
            self.apply_rule(item_path, _split_volume, text, reserved=False)
            mounts.append(text)
        env = self.environment(path + ("env",), raw.get("env"))
        root = True if raw.get("root") is None else self.boolean(path + ("root",), raw["root"])
        return PrepareSpec(commands, tuple(mounts), env, root)

    # --- secrets ---

    def top_level_secrets(self, path, raw):
        """``secrets:`` -> (SecretSpec, ...); each source is checked and its value read, not kept.
        A secret that cannot be read is reported and left out (services naming it are not)."""
        raw = self.mapping(path, raw, "a mapping of secrets")
        self.secret_names = set(raw)
        secrets = []
        for name, body in raw.items():
            secret = self.attempt(self.top_level_secret, path + (name,), name, body)
            if secret is not None:
                secrets.append(secret)
        return tuple(secrets)

    def top_level_secret(self, item_path, name, body):
        if not isinstance(name, str) or not _is_service_name(name):
            raise self.error(item_path, "secret name %r is not valid" % (name,), at_key=True,
                             hint="use letters, digits, '_', '.' and '-', starting with a "
                                  "letter or digit")
        body = self.mapping(item_path, body, "a mapping with file: or environment:")
        errors_before = len(self.errors)
        self.check_keys(item_path, body, _SECRET_SOURCES, "secret '%s'" % name,
                        _SECRET_UNSUPPORTED)
        if len(self.errors) != errors_before:
            return None
        given = [key for key in _SECRET_SOURCES if body.get(key) is not None]
        if len(given) != 1:
            raise self.error(item_path, "secret '%s' needs exactly one of file: or "
                             "environment:" % name,
                             hint="file: ./token.txt (a file on this node) or environment: "
                                  "HF_TOKEN (a variable of the shell or .env)")
        mark = self.mark(item_path, at_key=True)
        source_path = item_path + (given[0],)
        if given[0] == "file":
            reference = self.string(source_path, body["file"])
            value = self.read_secret_file(source_path, reference)
        else:
            reference = self.string(source_path, body["environment"], interpolated=False)
            if not _is_env_name(reference):
                raise self.error(source_path, "%r is not a valid environment variable name"
                                 % reference, hint="name the variable, e.g. environment: "
                                                   "HF_TOKEN (without $)")
            if reference not in self.variables:
                raise self.error(source_path, "variable '%s' (the source of secret '%s') is "
                                 "not set" % (reference, name),
                                 hint="export it in the shell that runs hpc-compose, or set it "
                                      "in .env next to the compose file")
            value = self.variables[reference].encode("utf-8", "surrogateescape")
        self.remember_secret_value(name, value)
        return SecretSpec(name, given[0], reference, mark.line if mark else None)

    def read_secret_file(self, path, reference):
        """The first bytes of a secret file (enough for the leak check); located errors."""
        resolved = resolve_host_path(reference, self.project_dir, self.variables)
        if not os.path.exists(resolved):
            raise self.error(path, "secret file %s does not exist" % resolved,
                             hint="relative paths are relative to the compose file's directory")
        if not os.path.isfile(resolved):
            raise self.error(path, "secret file %s is not a regular file" % resolved)
        try:
            with open(resolved, "rb") as handle:
                return handle.read(_SECRET_CHECK_LIMIT + 1)
        except OSError as exc:
            raise self.error(path, "cannot read secret file %s: %s"
                             % (resolved, exc.strerror or exc))

    def remember_secret_value(self, name, value):
        if len(value) > _SECRET_CHECK_LIMIT:
            return
        try:
            text = value.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            return
        if text:
            self.secret_values.append((name, text))

    def check_secret_value(self, path, text, expanded=True, used=()):
        """A secret's value must not reach the spec: it would be written into the batch script.

        A long value counts anywhere in the text; a short one as the whole result of expanding
        a variable (``time: "1"`` is not a leak of a secret that happens to be ``1``), and any
        value when ``text`` refers to a variable (``used``) that holds a secret, however short.
        """
        if not isinstance(text, str):
            return
        held = set()
        for name in used:
            held.update(self.secrets_in_variable(name))
        for name, value in self.secret_values:
            if (len(value) >= _SECRET_MATCH_MIN and value in text) or name in held or \
                    (expanded and text == value):
                raise self.error(path, "this value holds the value of secret '%s', which would "
                                 "then be written into the batch script" % name,
                                 hint="list the secret under services.<name>.secrets and read "
                                      "the file %s/<target> in the service (e.g. in a shell "
                                      "command: export TOKEN=\"$(cat %s/%s)\")"
                                      % (_SECRETS_MOUNT, _SECRETS_MOUNT, name))

    def secrets_in_variable(self, variable):
        """The names of the secrets whose value ``variable`` holds (or that it is the source of)."""
        value = self.variables.get(variable)
        return [secret.name for secret in self.secrets
                if secret.source == "environment" and secret.reference == variable] + \
            [name for name, text in self.secret_values
             if value is not None and value.rstrip("\r\n") == text]

    def redacted(self, error):
        """``error`` with every secret value it quotes replaced by ``<secret NAME>``."""
        def scrub(text):
            if not text:
                return text
            for name, value in self.secret_values:
                shown = "<secret %s>" % name
                text = text.replace(repr(value), shown)
                if len(value) >= _SECRET_MATCH_MIN:
                    text = text.replace(value, shown)
            return text
        for each in (error,) + tuple(getattr(error, "errors", ())):
            each.message = scrub(each.message)
            each.hint = scrub(each.hint)
            each.path = scrub(each.path)
            each.args = (each.message,)
        return error

    def service_secrets(self, path, raw):
        """Short (``- name``) and long (``source``/``target``/``mode``) forms -> (ServiceSecret, ...);
        each entry is read on its own (every error at once)."""
        result = []
        for index, item in enumerate(self.sequence(path, raw)):
            secret = self.attempt(self.service_secret, path + (index,), item, result)
            if secret is not None:
                result.append(secret)
        return tuple(result)

    def service_secret(self, item_path, item, earlier):
        declared = dict((secret.name, secret) for secret in self.secrets)
        if isinstance(item, dict):
            errors_before = len(self.errors)
            self.check_keys(item_path, item, _SERVICE_SECRET_KEYS, "a service secret",
                            _SERVICE_SECRET_UNSUPPORTED)
            if len(self.errors) != errors_before:
                return None
            if item.get("source") is None:
                raise self.error(item_path, "a service secret in the long form needs source",
                                 hint="source: names a top-level secret")
            source_path = item_path + ("source",)
            source = self.string(source_path, item["source"], interpolated=False)
        else:
            source_path = item_path
            source = self.string(item_path, item, interpolated=False)
            item = {}
        if source not in declared:
            if source in self.secret_names:
                return None    # declared, but in error: reported where it is declared
            suggestion = _closest(source, declared)
            raise self.error(source_path, "unknown secret '%s'" % source,
                             hint="did you mean '%s'?" % suggestion if suggestion else
                             ("declared secrets: " + ", ".join(declared) if declared else
                              "declare it under the top-level secrets: with file: or "
                              "environment:"))
        target = source
        if item.get("target") is not None:
            target = self.secret_target(item_path + ("target",), item["target"])
        if any(other.target == target for other in earlier):
            raise self.error(item_path, "two secrets of this service have the target '%s'"
                             % target, hint="give one of them another target:")
        mode = None
        if item.get("mode") is not None:
            mode = self.secret_mode(item_path + ("mode",), item["mode"])
        return ServiceSecret(source, target, mode)

    def secret_target(self, path, value):
        text = self.string(path, value, interpolated=False)
        name = text[len(_SECRETS_MOUNT) + 1:] if text.startswith(_SECRETS_MOUNT + "/") else text
        if name in (".", "..") or not _is_service_name(name):
            raise self.error(path, "target %r must be a file name (the secret is mounted at "
                             "%s/<target>)" % (text, _SECRETS_MOUNT),
                             hint="letters, digits, '_', '.' and '-'; other container paths "
                                  "are not supported")
        return name

    def secret_mode(self, path, value):
        """Octal permission bits, written as Compose does (0400, 0o440, "0600")."""
        text = value
        if isinstance(value, int) and not isinstance(value, bool):
            mark = self.marks.get(tuple(path))
            text = mark.text if mark is not None and mark.text else "%o" % value
        if not isinstance(text, str):
            raise self.error(path, "mode must be octal permission bits such as 0400, got %s"
                             % _format_value(value))
        digits = text.strip()
        digits = digits[2:] if digits[:2].lower() == "0o" else digits
        if not digits or not frozenset("01234567").issuperset(digits) or int(digits, 8) > 0o777:
            raise self.error(path, "mode %r is not octal permission bits (0000-0777)" % text,
                             hint="e.g. mode: 0400")
        mode = int(digits, 8)
        if not mode & 0o400:
            raise self.error(path, "mode %s leaves the secret unreadable by its owner (the "
                             "service runs as you)" % text, hint="e.g. mode: 0400")
        if mode & 0o077:
            self.warnings.append("%s: mode %s: group and other bits are dropped, the copy stays "
                                 "owner-only (0%o)" % (self.where(path), text, mode & 0o700))
        return mode & 0o700

    # --- rules across services ---

    def check_relations(self, services, slurm, raw_services):
        """Rules between services; a service that failed to load is known by name only."""
        by_name = dict((s.name, s) for s in services)
        for service in services:
            base = ("services", service.name, "depends_on")
            for target, condition in service.depends_on:
                error = self.dependency_error(base + (target,), service, target, condition,
                                              by_name, raw_services)
                if error is not None:
                    self.record(error)
        alloc_nodes = slurm.nodes or 1
        distributed = None
        for service in services:
            path = ("services", service.name, "x-slurm", "nodes")
            placement = self.attempt(self.apply_rule, path, _resolve_placement, alloc_nodes,
                                     service.slurm, slurm, len(raw_services))
            if placement is None or placement.mode != "distributed":
                continue
            if distributed is not None:
                self.record(self.error(path, "services '%s' and '%s' both span the whole "
                                       "allocation; at most one distributed service is supported"
                                       % (distributed, service.name),
                                       hint="set x-slurm.nodes: 1 on helper services"))
                continue
            distributed = service.name
            readiness = service.readiness
            local = readiness is not None and (
                (readiness.type == "tcp" and _is_local_host(readiness.host))
                or (readiness.type == "http" and _is_local_host(_url_host(readiness.url))))
            if local:
                self.record(self.error(("services", service.name, "readiness"),
                                       "the distributed service '%s' cannot use %s readiness "
                                       "against localhost" % (service.name, readiness.type),
                                       hint="use sleep or log readiness, or an explicit non-local "
                                            "host"))

    def dependency_error(self, where, service, target, condition, by_name, raw_services):
        """What is wrong with one depends_on entry, or None."""
        if target not in raw_services:
            # A suggestion compares with every service: only for the errors shown, and the list of
            # services shortened, so that thousands of unknown names stay linear.
            self.unknown_targets += 1
            suggestion = None
            if self.unknown_targets <= _MAX_REPORTED_ERRORS:
                suggestion = _closest(target, [name for name in raw_services if
                                               isinstance(name, str)])
            names = [str(name) for _, name in zip(range(_MAX_LISTED_SERVICES), raw_services)]
            if len(raw_services) > _MAX_LISTED_SERVICES:
                names.append("... (%d in all)" % len(raw_services))
            return self.error(where, "service '%s' depends on unknown service '%s'"
                              % (service.name, target),
                              hint="did you mean '%s'?" % suggestion if suggestion else
                              "defined services: " + ", ".join(names))
        if target == service.name:
            return self.error(where, "service '%s' depends on itself" % target)
        dependency = by_name.get(target)
        if dependency is None:
            return None    # its own errors are reported
        if condition == "service_healthy" and dependency.readiness is None:
            return self.error(where, "condition service_healthy needs service '%s' to define "
                              "readiness (or a supported healthcheck)" % target,
                              hint="add readiness to '%s', or use service_started" % target)
        if dependency.slurm.failure_policy.mode == "ignore":
            return self.error(where, "service '%s' cannot be a dependency: its failure_policy "
                              "mode is ignore" % target,
                              hint="use fail_job or restart_on_failure for services others "
                                   "depend on")
        return None


def _split_shell_probe(command):
    """Words of a CMD-SHELL probe, dropping a trailing ``|| exit 1`` (Compose habit)."""
    import shlex
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise _Invalid("cannot split healthcheck command %r: %s" % (command, exc))
    if "||" in words:
        tail = words[words.index("||") + 1:]
        if tail in (["exit", "1"], ["false"], ["exit"]):
            words = words[:words.index("||")]
    for word in words:
        if word in ("|", "||", "&&", ";", "&") or word.startswith("$("):
            raise _Invalid("healthcheck command %r is not a recognized probe" % command,
                           hint=_PROBE_HINT)
    return words


_PROBE_HINT = ("supported probes: nc -z HOST PORT, curl URL, wget --spider URL; for anything else "
               "use readiness: (type tcp, http, log or sleep)")


# Options of curl and wget that take a value (the next word is not the URL).
_PROBE_VALUE_OPTIONS = frozenset(("-o", "--output", "-O", "--output-document", "-u", "--user",
                                  "-H", "--header", "-X", "--request", "-d", "--data", "-m",
                                  "--max-time", "-w", "--write-out", "-A", "--user-agent",
                                  "-T", "--timeout", "--retry", "--connect-timeout", "-t",
                                  "--tries", "-e", "--execute"))


def _probe_operands(args, value_options=_PROBE_VALUE_OPTIONS):
    """The words of a probe's argv that are not options nor option values."""
    operands = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in value_options:
            skip = True
        elif not arg.startswith("-"):
            operands.append(arg)
    return operands


def _probe_readiness(argv):
    """The readiness a healthcheck argv stands for; raises ``_Invalid`` for other probes."""
    import re
    if not argv:
        raise _Invalid("healthcheck test has no command", hint=_PROBE_HINT)
    program = argv[0].rsplit("/", 1)[-1]
    args = argv[1:]
    zero_io = any(a.startswith("-") and not a.startswith("--") and "z" in a[1:] for a in args)
    if program in ("nc", "ncat", "netcat") and zero_io:
        positional = _probe_operands(args, ("-w", "-i", "-q"))
        if len(positional) != 2 or not positional[1].isdigit() or \
                not 1 <= int(positional[1]) <= 65535:
            raise _Invalid("nc probe %r needs exactly HOST PORT" % " ".join(argv),
                           hint=_PROBE_HINT)
        return ReadinessSpec("tcp", host=positional[0], port=int(positional[1]))
    if program == "curl" or (program == "wget" and "--spider" in args):
        urls = [a for a in args if a.startswith(("http://", "https://"))]
        if not urls:
            # curl and wget read `localhost:9200/_health` as http://: so does readiness.
            urls = ["http://" + a for a in _probe_operands(args) if re.match(
                r"\A(localhost|[0-9.]+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:[0-9]+)?(/\S*)?\Z", a)
                and (":" in a or "/" in a or a == "localhost")]
        if not urls:
            raise _Invalid("%s probe has no http:// or https:// URL" % program, hint=_PROBE_HINT)
        return ReadinessSpec("http", url=urls[-1], status_code=200)
    raise _Invalid("healthcheck probe %r is not supported" % " ".join(argv), hint=_PROBE_HINT)


def _format_value(value):
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "a boolean (%s)" % ("true" if value else "false")
    if isinstance(value, (int, float)):
        return "a number (%s)" % _scalar_text(value)
    if isinstance(value, str):
        return "the string %r" % value
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _scalar_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _readiness_to_dict(readiness, escape=None):
    if readiness is None:
        return None
    escape = escape or _unchanged
    fields = ("type",) + _READINESS_FIELDS.get(readiness.type, ())
    data = dict((key, getattr(readiness, key)) for key in fields)
    for key in ("host", "url"):
        if data.get(key) is not None:
            data[key] = escape(data[key])
    return data


def _failure_policy_to_dict(policy):
    data = {"mode": policy.mode}
    if policy.mode == "restart_on_failure":
        data["max_restarts"] = policy.max_restarts
        data["backoff_seconds"] = policy.backoff_seconds
    return data


def _unchanged(text):
    return text


def _escape_dollars(text):
    return text.replace("$", "$$")


def _slurm_to_dict(slurm, escape=None):
    escape = escape or _unchanged
    data = {}
    for key in _SLURM_STRING_KEYS:
        value = getattr(slurm, key)
        if value is not None:
            data[key] = escape(value)
    for key in _SLURM_COUNT_KEYS:
        value = getattr(slurm, key)
        if value is not None:
            data[key] = value
    if slurm.metrics is not None:
        data["metrics"] = {"enabled": slurm.metrics.enabled,
                           "interval_seconds": slurm.metrics.interval_seconds,
                           "collectors": list(slurm.metrics.collectors)}
    if slurm.artifacts is not None:
        artifacts = slurm.artifacts
        data["artifacts"] = {"collect": artifacts.collect,
                             "export_dir": escape(artifacts.export_dir),
                             "paths": [escape(p) for p in artifacts.paths],
                             "bundles": dict((name, {"paths": [escape(p) for p in paths]})
                                             for name, paths in artifacts.bundles)}
    if slurm.resume is not None:
        data["resume"] = {"path": escape(slurm.resume.path)}
    if slurm.setup:
        data["setup"] = list(slurm.setup)
    if slurm.submit_args:
        data["submit_args"] = [escape(a) for a in slurm.submit_args]
    if slurm.modules:
        data["modules"] = [escape(m.name) for m in slurm.modules]
    if slurm.modules_path:
        data["modules_path"] = [escape(p) for p in slurm.modules_path]
    data["runtime"] = slurm.runtime
    if slurm.share_with_group:
        data["share_with_group"] = True
    if slurm.signal is not None:
        data["signal"] = dict((key, value) for key, value in slurm.signal._asdict().items()
                              if value is not None)
    if slurm.requeue is not None:
        data["requeue"] = slurm.requeue
    if slurm.exclusive is not None:
        data["exclusive"] = slurm.exclusive
    for key in ("dependency", "array"):
        if getattr(slurm, key) is not None:
            data[key] = escape(getattr(slurm, key))
    return data


def _secrets_to_dict(secrets, escape=None):
    """Top-level secrets as references (``file:`` path or ``environment:`` name), never values."""
    escape = escape or _unchanged
    return dict((secret.name, {secret.source: escape(secret.reference)
                               if secret.source == "file" else secret.reference})
                for secret in secrets)


def _service_secrets_to_list(secrets):
    result = []
    for item in secrets:
        data = {"source": item.source, "target": item.target}
        if item.mode is not None:
            data["mode"] = "0%o" % item.mode
        result.append(data)
    return result


def _sweep_config_to_dict(sweep, escape):
    """x-sweep as ``config`` prints it: the tasks as an include list (what they expand to)."""
    data = {"include": [dict((name, escape(value)) for name, value in task.params)
                        for task in sweep.tasks if task.replicate == 0]}
    if sweep.replicates != 1:
        data["replicates"] = sweep.replicates
    if sweep.max_parallel is not None:
        data["max_parallel"] = sweep.max_parallel
    if sweep.results != _DEFAULT_SWEEP_RESULTS:
        data["results"] = list(sweep.results)
    return data


def _sweep_to_dict(sweep):
    """x-sweep as JSON-ready data: its settings and every task (index, replicate, parameters)."""
    from collections import OrderedDict
    return {"parameters": list(sweep.parameters), "replicates": sweep.replicates,
            "max_parallel": sweep.max_parallel, "results": list(sweep.results),
            "tasks": [{"index": task.index, "replicate": task.replicate,
                       "params": OrderedDict(task.params)} for task in sweep.tasks]}


def spec_to_dict(spec, escape_dollars=False):
    """The normalized, interpolated spec as plain data (what ``config`` prints).

    With ``escape_dollars`` every ``$`` in a field that is interpolated on load is written ``$$``,
    so the output loads back into the same spec (as ``docker compose config`` does).
    """
    escape = _escape_dollars if escape_dollars else _unchanged
    services = {}
    for service in spec.services:
        data = {}
        if service.image is not None:
            data["image"] = escape(service.image)
        for key in ("entrypoint", "command"):
            value = getattr(service, key)
            if value is not None:
                # Shell form is never interpolated, so it is printed exactly as written.
                data[key] = value if isinstance(value, str) else [escape(v) for v in value]
        if service.environment:
            data["environment"] = dict((k, escape(v)) for k, v in service.environment)
        if service.volumes:
            data["volumes"] = [escape(v) for v in service.volumes]
        if service.working_dir is not None:
            data["working_dir"] = escape(service.working_dir)
        if service.depends_on:
            data["depends_on"] = dict((name, {"condition": condition})
                                      for name, condition in service.depends_on)
        if service.readiness is not None:
            data["readiness"] = _readiness_to_dict(service.readiness, escape)
        if service.profiles:
            data["profiles"] = list(service.profiles)
        slurm = {}
        for key in ("nodes", "ntasks", "ntasks_per_node", "cpus_per_task", "gpus"):
            value = getattr(service.slurm, key)
            if value is not None:
                slurm[key] = value
        for key in ("gres", "mem", "time"):
            if getattr(service.slurm, key) is not None:
                slurm[key] = escape(getattr(service.slurm, key))
        if service.slurm.extra_srun_args:
            slurm["extra_srun_args"] = [escape(a) for a in service.slurm.extra_srun_args]
        if service.slurm.failure_policy != FailurePolicy():
            slurm["failure_policy"] = _failure_policy_to_dict(service.slurm.failure_policy)
        if service.slurm.runtime is not None:
            slurm["runtime"] = service.slurm.runtime
        if service.slurm.signal is not None:
            slurm["signal"] = dict((key, value) for key, value
                                   in service.slurm.signal._asdict().items() if value is not None)
        if service.slurm.mpi is not None:
            slurm["mpi"] = service.slurm.mpi
        if service.slurm.modules:
            slurm["modules"] = [escape(m.name) for m in service.slurm.modules]
        if slurm:
            data["x-slurm"] = slurm
        if service.prepare is not None:
            prepare = {"commands": list(service.prepare.commands), "root": service.prepare.root}
            if service.prepare.mounts:
                prepare["mounts"] = [escape(m) for m in service.prepare.mounts]
            if service.prepare.env:
                prepare["env"] = dict((k, escape(v)) for k, v in service.prepare.env)
            data["x-enroot"] = {"prepare": prepare}
        if service.secrets:
            data["secrets"] = _service_secrets_to_list(service.secrets)
        services[service.name] = data
    result = {}
    if spec.name is not None:
        result["name"] = escape(spec.name)
    if spec.version is not None:
        result["version"] = spec.version
    result["x-slurm"] = _slurm_to_dict(spec.slurm, escape)
    if spec.sweep is not None:
        # The array is x-sweep's: printed once, as the sweep, so the output loads back.
        result["x-slurm"].pop("array", None)
        result["x-sweep"] = _sweep_config_to_dict(spec.sweep, escape)
    if spec.secrets:
        result["secrets"] = _secrets_to_dict(spec.secrets, escape)
    result["services"] = services
    return result


##############################################################################
# Planner: spec -> deterministic normalized plan
##############################################################################
# build_plan(spec, environ=None) -> Plan. Pure apart from reading $HOME from
# the environment and resolving symlinks of cache_dir; existence checks are preflight's.
# plan_to_dict (the JSON form `inspect` prints) closes the section.


class ImageRef(NamedTuple):
    kind: str                      # remote | local | none (host runtime without an image)
    reference: str                 # normalized: docker://redis:7, podman://x, or absolute .sqsh path
    registry: Optional[str] = None  # registry host for remote docker:// refs (docker.io for Hub)
    original: Optional[str] = None  # what the user wrote


class Execution(NamedTuple):
    form: str                      # default (image entrypoint+cmd) | shell | exec
    argv: Tuple[str, ...] = ()     # exec form: the full argv (entrypoint items + command items)
    script: Optional[str] = None   # shell form: the string run by /bin/sh -c (entrypoint + " " + command)
    use_image_entrypoint: bool = False  # True when the image ENTRYPOINT must run (no entrypoint key)


class Mount(NamedTuple):
    host: str                      # absolute host path
    container: str
    options: Optional[str] = None  # e.g. "ro", kept verbatim


class Dependency(NamedTuple):
    name: str
    condition: str                 # service_started | service_healthy | service_completed_successfully


class PreparePlan(NamedTuple):
    commands: Tuple[str, ...]
    mounts: Tuple[Mount, ...] = ()  # resolved
    env: Tuple[Tuple[str, str], ...] = ()  # ((key, value), ...)
    root: bool = True


class ServicePlan(NamedTuple):
    name: str
    token: str                     # filesystem/bash-safe token: log file <token>.log, step name
    runtime: str                   # pyxis | host
    image: ImageRef
    execution: Execution
    working_dir: Optional[str]
    environment: Tuple[Tuple[str, str], ...]  # ((key, value), ...) final values the service sees
    mounts: Tuple[Mount, ...]      # user volumes, resolved (implicit job mount NOT included)
    depends_on: Tuple[Dependency, ...]
    dependents: Tuple[str, ...]    # names of services that depend on this one
    readiness: Optional[ReadinessSpec]
    failure_policy: FailurePolicy  # defaults applied (max_restarts/backoff set for restart mode)
    placement: Placement
    cpus_per_task: Optional[int] = None
    gpus: Optional[int] = None
    gres: Optional[str] = None     # when set, gpus is ignored
    extra_srun_args: Tuple[str, ...] = ()
    prepare: Optional[PreparePlan] = None
    secrets: Tuple[ServiceSecret, ...] = ()  # files under /run/secrets
    mem: Optional[str] = None      # srun --mem
    time: Optional[str] = None     # srun --time
    mpi: Optional[str] = None      # srun --mpi=TYPE
    modules: Tuple[ModuleSpec, ...] = ()  # x-slurm.modules, then the service's own
    module_paths: Tuple[str, ...] = ()  # absolute `module use` folders (only with modules)


class Plan(NamedTuple):
    spec: ComposeSpec
    compose_file: str
    project_dir: str
    job_name: str                  # x-slurm.job_name, else name, else "hpc-compose"
    cache_dir: str                 # absolute
    nodes: int                     # allocation node count (default 1)
    slurm: SlurmSpec
    services: Tuple[ServicePlan, ...]  # in launch (dependency) order
    runtime: str                   # top-level default runtime
    secrets: Tuple[SecretSpec, ...] = ()  # file references made absolute


def service_token(name):
    """The file-name-safe token for a service: ``[A-Za-z0-9_-]`` kept, anything else ``_xHH_``.

    An ``_`` that would otherwise read as the start of an ``_xHH_`` group is itself encoded
    (``_x5f_``), so decoding left to right is unambiguous and two services never share a token.
    """
    data = name.encode("utf-8")
    out = []
    for index, byte in enumerate(data):
        char = chr(byte)
        if char in _TOKEN_SAFE:
            if char == "_" and _starts_group(data, index):
                out.append("_x5f_")
            else:
                out.append(char)
        else:
            out.append("_x%02x_" % byte)
    return "".join(out)


_TOKEN_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_HEX_DIGITS = frozenset("0123456789abcdef")   # groups are written in lower-case hex


def _starts_group(data, index):
    # `_` `x` H H followed by something whose encoding begins with `_` (a kept `_` or an encoded
    # byte): left as is, a decoder would read `_xHH_` there.
    if index + 4 >= len(data):
        return False
    if chr(data[index + 1]) != "x" or not _HEX_DIGITS.issuperset(chr(data[index + 2])
                                                                + chr(data[index + 3])):
        return False
    following = chr(data[index + 4])
    return following == "_" or following not in _TOKEN_SAFE


def _resolve_cache_dir(spec, environ=None):
    """The absolute cache directory of ``spec``; refuses node-local temporary file systems."""
    environ = os.environ if environ is None else environ
    configured = spec.slurm.cache_dir
    if configured is None:
        home = environ.get("HOME")
        if home:
            return os.path.normpath(os.path.join(home, ".cache", "hpc-compose"))
        return os.path.normpath(os.path.join(spec.project_dir, ".cache", "hpc-compose"))
    path = resolve_host_path(configured, spec.project_dir, environ)
    try:
        _check_cache_dir(path)
    except _Invalid as exc:
        raise SpecError(exc.message, file=spec.path, path="x-slurm.cache_dir", hint=exc.hint)
    return path


def normalize_image(image, project_dir, environ=None, runtime=_DEFAULT_RUNTIME) -> ImageRef:
    """The ``ImageRef`` for an image string (remote reference, local squashfs or .sif path)."""
    kind, value = _classify_image(image, runtime)
    if kind == "local":
        return ImageRef("local", resolve_host_path(value, project_dir, environ), None, image)
    return ImageRef("remote", value, _image_registry(value), image)


def _image_registry(reference):
    # Only docker:// references name a registry; dockerd:// and podman:// read a local daemon.
    if not reference.startswith("docker://"):
        return None
    rest = reference[len("docker://"):]
    if "#" in rest:
        # Enroot's own form: docker://[USER@]REGISTRY#IMAGE
        return rest.split("#", 1)[0].rsplit("@", 1)[-1] or "docker.io"
    first, slash, _ = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _execution(service):
    command, entrypoint = service.command, service.entrypoint
    if command is None and entrypoint is None:
        return Execution("default", use_image_entrypoint=True)
    use_image_entrypoint = entrypoint is None
    if isinstance(command, str) or isinstance(entrypoint, str):
        script = " ".join(part for part in (entrypoint, command) if part)
        return Execution("shell", script=script, use_image_entrypoint=use_image_entrypoint)
    argv = tuple(entrypoint or ()) + tuple(command or ())
    return Execution("exec", argv=argv, use_image_entrypoint=use_image_entrypoint)


def _mounts(entries, project_dir, environ):
    mounts = []
    for entry in entries:
        host, container, options = _split_volume(entry, reserved=False)
        mounts.append(Mount(resolve_host_path(host, project_dir, environ), container, options))
    return tuple(mounts)


def _launch_order(spec):
    """Services in dependency order: among those ready, file order wins; a cycle is an error."""
    remaining = list(spec.services)
    placed = []
    placed_names = set()
    while remaining:
        for service in remaining:
            if all(target in placed_names for target, _ in service.depends_on):
                placed.append(service)
                placed_names.add(service.name)
                remaining.remove(service)
                break
        else:
            cycle = _find_cycle(remaining)
            first = next(s for s in spec.services if s.name == cycle[0])
            raise SpecError("dependency cycle: %s" % " -> ".join(cycle),
                            file=first.file or spec.path, line=first.line, path="services.%s.depends_on" % cycle[0],
                            hint="remove one of these depends_on entries")
    return placed


def _find_cycle(services):
    by_name = dict((s.name, s) for s in services)
    for start in services:
        trail = [start.name]
        current = start
        # Every remaining service waits on a remaining one, so following the first such edge
        # must come back to a name already on the trail.
        while True:
            target = next(t for t, _ in current.depends_on if t in by_name)
            if target in trail:
                return trail[trail.index(target):] + [target]
            trail.append(target)
            current = by_name[target]


def build_plan(spec, environ=None) -> Plan:
    """Turn a validated spec into the deterministic ``Plan``."""
    environ = os.environ if environ is None else environ
    alloc_nodes = spec.slurm.nodes or 1
    cache_dir = _resolve_cache_dir(spec, environ)
    module_paths = tuple(resolve_host_path(path, spec.project_dir, environ)
                         for path in spec.slurm.modules_path)
    ordered = _launch_order(spec)
    dependents = dict((s.name, []) for s in ordered)
    for service in ordered:
        for target, _ in service.depends_on:
            dependents[target].append(service.name)
    services = []
    for service in ordered:
        try:
            placement = _resolve_placement(alloc_nodes, service.slurm, spec.slurm,
                                           len(spec.services))
            if service.runtime == "host" or service.image is None:
                image = ImageRef("none", "", None, service.image)
            else:
                image = normalize_image(service.image, spec.project_dir, environ,
                                        service.runtime)
            mounts = _mounts(service.volumes, spec.project_dir, environ)
            prepare = None
            if service.prepare is not None:
                prepare = PreparePlan(service.prepare.commands,
                                      _mounts(service.prepare.mounts, spec.project_dir, environ),
                                      service.prepare.env, service.prepare.root)
        except _Invalid as exc:
            raise SpecError(exc.message, file=service.file or spec.path, line=service.line,
                            path="services." + service.name, hint=exc.hint)
        working_dir = service.working_dir
        if working_dir is not None and service.runtime == "host":
            working_dir = resolve_host_path(working_dir, spec.project_dir, environ)
        modules = spec.slurm.modules + service.slurm.modules
        policy = service.slurm.failure_policy
        if policy.mode == "restart_on_failure":
            policy = policy._replace(
                max_restarts=_DEFAULT_MAX_RESTARTS if policy.max_restarts is None
                else policy.max_restarts,
                backoff_seconds=_DEFAULT_BACKOFF_SECONDS if policy.backoff_seconds is None
                else policy.backoff_seconds)
        services.append(ServicePlan(
            name=service.name, token=service_token(service.name), runtime=service.runtime,
            image=image, execution=_execution(service), working_dir=working_dir,
            environment=service.environment, mounts=mounts,
            depends_on=tuple(Dependency(t, c) for t, c in service.depends_on),
            dependents=tuple(dependents[service.name]), readiness=service.readiness,
            failure_policy=policy, placement=placement,
            cpus_per_task=service.slurm.cpus_per_task, gpus=service.slurm.gpus,
            gres=service.slurm.gres, extra_srun_args=service.slurm.extra_srun_args,
            prepare=prepare, secrets=service.secrets, mem=service.slurm.mem,
            time=service.slurm.time, mpi=service.slurm.mpi, modules=modules,
            module_paths=module_paths if modules else ()))
    job_name = spec.slurm.job_name or spec.name or "hpc-compose"
    secrets = tuple(secret._replace(reference=resolve_host_path(secret.reference,
                                                                spec.project_dir, environ))
                    if secret.source == "file" else secret for secret in spec.secrets)
    return Plan(spec=spec, compose_file=spec.path, project_dir=spec.project_dir,
                job_name=job_name, cache_dir=cache_dir, nodes=alloc_nodes, slurm=spec.slurm,
                services=tuple(services), runtime=spec.slurm.runtime, secrets=secrets)


def _mount_to_dict(mount):
    return {"host": mount.host, "container": mount.container, "options": mount.options}


def plan_to_dict(plan):
    """The plan as plain JSON-ready data (``inspect --format json``); reusable by other commands."""
    services = []
    for service in plan.services:
        execution = service.execution
        prepare = None
        if service.prepare is not None:
            prepare = {"commands": list(service.prepare.commands),
                       "mounts": [_mount_to_dict(m) for m in service.prepare.mounts],
                       "env": [list(pair) for pair in service.prepare.env],
                       "root": service.prepare.root}
        services.append({
            "name": service.name,
            "token": service.token,
            "runtime": service.runtime,
            "image": {"kind": service.image.kind, "reference": service.image.reference,
                      "registry": service.image.registry, "original": service.image.original},
            "execution": {"form": execution.form, "argv": list(execution.argv),
                          "script": execution.script,
                          "use_image_entrypoint": execution.use_image_entrypoint},
            "working_dir": service.working_dir,
            "environment": [list(pair) for pair in service.environment],
            "mounts": [_mount_to_dict(m) for m in service.mounts],
            "depends_on": [{"name": d.name, "condition": d.condition}
                           for d in service.depends_on],
            "dependents": list(service.dependents),
            "readiness": _readiness_to_dict(service.readiness),
            "failure_policy": _failure_policy_to_dict(service.failure_policy),
            "placement": {"mode": service.placement.mode, "nodes": service.placement.nodes,
                          "ntasks": service.placement.ntasks,
                          "ntasks_per_node": service.placement.ntasks_per_node},
            "cpus_per_task": service.cpus_per_task,
            "gpus": service.gpus,
            "gres": service.gres,
            "extra_srun_args": list(service.extra_srun_args),
            "prepare": prepare,
            "secrets": _service_secrets_to_list(service.secrets),
        })
        for key in ("mem", "time", "mpi"):
            if getattr(service, key) is not None:
                services[-1][key] = getattr(service, key)
        if service.modules:
            services[-1]["modules"] = [module.name for module in service.modules]
            services[-1]["module_paths"] = list(service.module_paths)
    return {
        "compose_file": plan.compose_file,
        "project_dir": plan.project_dir,
        "name": plan.spec.name,
        "job_name": plan.job_name,
        "runtime": plan.runtime,
        "cache_dir": plan.cache_dir,
        "nodes": plan.nodes,
        "slurm": _slurm_to_dict(plan.slurm),
        "service_order": [s.name for s in plan.services],
        "sweep": _sweep_to_dict(plan.spec.sweep) if plan.spec.sweep is not None else None,
        "services": services,
        "secrets": _secrets_to_dict(plan.secrets),
        "warnings": list(plan.spec.warnings),
    }


##############################################################################
# Images: enroot import, x-enroot.prepare, the shared cache
##############################################################################
# Contract:
#   build_runtime_plan(plan) -> RuntimePlan: decides, for every service, which artifact the
#       container starts from (pure apart from cheap stats of local images and reading manifests).
#   prepare_images(runtime_plan, options: PrepareOptions, progress=print-like callable or None)
#       -> tuple of PrepareResult (one per service); raises ToolError on enroot failures.
#
# Cache layout under x-slurm.cache_dir (shared between the login node and the compute nodes):
#   base/<key16>-<label>.sqsh       imported remote images, + <artifact>.json manifest
#   prepared/<key16>-<label>.sqsh   x-enroot.prepare results, + <artifact>.json manifest
#   base/ and prepared/ .sif        the same for apptainer services (`apptainer build`)
#   enroot/{cache,data}/            ENROOT_CACHE_PATH (layer cache) and ENROOT_DATA_PATH (prepare rootfs)
#   apptainer/cache/                APPTAINER_CACHEDIR (layer cache of `apptainer build`)
# The file name carries the first 16 hex digits of the cache key, so a changed input is a different
# file: nothing is ever overwritten in place, and a hit is "the file exists" (one stat, no hashing).


class Artifact(NamedTuple):
    kind: str                      # base | prepared
    path: str                      # absolute path of the .sqsh in the cache
    manifest_path: str             # path + ".json"
    cache_key: str                 # full sha256 hex
    source: str                    # the image reference (or local path) it is built from
    # ((category, digest), ...): what the key covers, for "why it rebuilds"
    inputs: Tuple[Tuple[str, str], ...] = ()
    enroot_uri: Optional[str] = None  # base: the URI handed to `enroot import`
    builder: str = "enroot"        # enroot (.sqsh) | apptainer | singularity (.sif, `build`)


class ServiceImage(NamedTuple):
    service: str
    container_image: Optional[str]  # the value for --container-image (None for host runtime)
    base: Optional[Artifact] = None      # for an imported remote image
    prepared: Optional[Artifact] = None  # for an x-enroot.prepare image
    local_path: Optional[str] = None  # a user-provided local .sqsh/.squashfs, used in place
    rebuild_every_time: bool = False  # prepare.mounts present


class RuntimePlan(NamedTuple):
    plan: Plan
    images: Tuple[ServiceImage, ...]  # aligned with plan.services
    cache_dir: str


class PrepareOptions(NamedTuple):
    enroot_bin: str = "enroot"
    apptainer_bin: Optional[str] = None  # None: the runtime's own command (apptainer, singularity)
    force: bool = False            # prepare --force / submit --force-rebuild
    keep_failed: bool = False      # --keep-failed-prep


class PrepareResult(NamedTuple):
    service: str
    base_action: Optional[str] = None     # None | present | reused | built
    runtime_action: Optional[str] = None  # present | reused | built  (None for host runtime)
    note: Optional[str] = None
    artifact: Optional[str] = None  # path the container starts from (None for host runtime)


_MANIFEST_SUFFIX = ".json"
_PARTIAL_PREFIX = ".partial-"       # in-progress imports/exports; renamed into place when complete
_DOCKER_HUB_REGISTRY = "registry-1.docker.io"
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


# --- references -----------------------------------------------------------------------------------

class _DockerReference(NamedTuple):
    registry: Optional[str]        # None for Docker Hub
    repository: str                # e.g. library/redis, nvidia/pytorch
    tag: Optional[str] = None
    digest: Optional[str] = None   # sha256:... (Enroot >= 4.0 only)
    user: Optional[str] = None     # docker://user@registry#image (Enroot syntax)


def _parse_docker_reference(reference):
    """Split a ``docker://`` reference (Docker or Enroot syntax) into a ``_DockerReference``."""
    rest = reference[len("docker://"):] if reference.startswith("docker://") else reference
    user = None
    if "#" in rest:
        # Already Enroot syntax: [user@]registry#image[:tag]
        head, image = rest.split("#", 1)
        if "@" in head:
            user, head = head.rsplit("@", 1)
        registry = head or None
    else:
        image = rest
        registry = None
        first, sep, remainder = image.partition("/")
        if sep and (first == "localhost" or "." in first or ":" in first):
            registry, image = first, remainder
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    last_slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > last_slash:
        image, tag = image[:colon], image[colon + 1:]
    if registry in _DOCKER_HUB_HOSTS:
        registry = None
    return _DockerReference(registry, image, tag, digest, user)


def enroot_uri(reference):
    """The URI for ``enroot import``: Enroot's ``docker://[user@]registry#image[:tag]`` syntax.

    Enroot 3.x only understands the ``#`` form (a ``registry/image`` reference is sent to Docker
    Hub); 4.x accepts it too, so one form serves both. Docker Hub references name
    ``registry-1.docker.io`` (and ``library/`` for official images). A digest cannot be
    written in the ``#`` form, so digest references use Docker's syntax, which needs Enroot >= 4.0
    (preflight warns). ``dockerd://`` and ``podman://`` references pass through unchanged.
    """
    if not reference.startswith("docker://"):
        return reference
    ref = _parse_docker_reference(reference)
    repository = ref.repository
    if ref.registry is None and "/" not in repository:
        repository = "library/" + repository
    # Docker Hub is named explicitly: Enroot 3.x looks up the login for a pull in its credentials
    # file by the registry part of the URI, so without it a Hub pull is always anonymous.
    registry = ref.registry or _DOCKER_HUB_REGISTRY
    user = (ref.user + "@") if ref.user else ""
    if ref.digest:
        return "docker://%s%s/%s@%s" % (user, registry, repository, ref.digest)
    return "docker://%s%s#%s%s" % (user, registry, repository, (":" + ref.tag) if ref.tag else "")


def _registry_host(reference):
    """The registry host a remote reference pulls from (``docker.io`` for Docker Hub, None for
    ``dockerd://`` / ``podman://`` / local images)."""
    if not reference.startswith("docker://"):
        return None
    return _parse_docker_reference(reference).registry or "docker.io"


def _artifact_label(text):
    """A readable file-name label: ``docker://nvcr.io#nvidia/pytorch:24.01`` -> ``pytorch-24.01``."""
    name = text
    for prefix in ("docker://", "dockerd://", "podman://"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.split("#")[-1].split("@")[0]
    name = name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".sqsh", ".squashfs", _SIF_SUFFIX):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    name = name.replace(":", "-")
    label = "".join(c if c in _LABEL_CHARS else "_" for c in name)
    return label.strip("._")[:60] or "image"


_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# --- cache keys -----------------------------------------------------------------------------------

def _digest(parts):
    """SHA-256 hex over ``parts``, each followed by a NUL byte (so no two part lists collide)."""
    import hashlib
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _local_image_identity(path):
    """``path``, size and modification time of a local image: an edited .sqsh is a new input
    without hashing gigabytes."""
    try:
        st = os.stat(path)
        return "%s size=%d mtime_ns=%d" % (path, st.st_size, getattr(st, "st_mtime_ns",
                                                                     int(st.st_mtime * 1e9)))
    except OSError:
        return "%s missing" % path


def _mount_text(mount):
    text = "%s:%s" % (mount.host, mount.container)
    if mount.options:
        text += ":" + mount.options
    return text


def _make_artifact(cache_dir, kind, label, source, inputs, uri=None, builder="enroot"):
    # An Enroot key stays as it always was; a .sif names its format, so the two never share a key.
    if builder != "enroot":
        inputs = tuple(inputs) + (("format", "sif"),)
    key = _digest(["hpc-compose-cache", "format=%d" % _CACHE_FORMAT_VERSION, kind]
                  + ["%s=%s" % pair for pair in inputs])
    path = os.path.join(cache_dir, kind if kind == "base" else "prepared",
                        "%s-%s%s" % (key[:16], label, ".sqsh" if builder == "enroot"
                                     else _SIF_SUFFIX))
    return Artifact(kind=kind, path=path, manifest_path=path + _MANIFEST_SUFFIX, cache_key=key,
                    source=source, inputs=tuple(inputs), enroot_uri=uri, builder=builder)


def _image_builder(runtime):
    """The tool that builds a service's images: enroot, or the apptainer command of the runtime."""
    return runtime if runtime in _APPTAINER_RUNTIMES else "enroot"


def _base_artifact(cache_dir, reference, builder="enroot"):
    if builder != "enroot":
        # `apptainer build` takes Docker's own reference syntax (docker://redis:7).
        return _make_artifact(cache_dir, "base", _artifact_label(reference), reference,
                              (("image", _digest([reference])),), builder=builder)
    uri = enroot_uri(reference)
    return _make_artifact(cache_dir, "base", _artifact_label(uri), reference,
                          (("image", _digest([uri])),), uri=uri)


def _prepared_artifact(cache_dir, base_source, base_identity, prepare, builder="enroot"):
    inputs = (
        ("base", _digest([base_identity])),
        ("commands", _digest(prepare.commands)),
        ("env", _digest("%s=%s" % pair for pair in prepare.env)),
        ("mounts", _digest(_mount_text(m) for m in prepare.mounts)),
        ("root", "true" if prepare.root else "false"),
    )
    return _make_artifact(cache_dir, "prepared", _artifact_label(base_source) + "-prepared",
                          base_source, inputs, builder=builder)


# --- runtime plan ---------------------------------------------------------------------------------

def build_runtime_plan(plan) -> RuntimePlan:
    """Attach image artifacts (cache paths and keys) to every service of ``plan``."""
    cache_dir = plan.cache_dir
    images = []
    for service in plan.services:
        images.append(_service_image(cache_dir, service))
    return RuntimePlan(plan=plan, images=tuple(images), cache_dir=cache_dir)


def _service_image(cache_dir, service):
    if service.runtime == "host" or service.image is None or service.image.kind == "none":
        return ServiceImage(service=service.name, container_image=None)
    image = service.image
    builder = _image_builder(service.runtime)
    base = None
    local_path = None
    if image.kind == "local":
        local_path = image.reference
        base_identity = "local " + _local_image_identity(local_path)
    else:
        base = _base_artifact(cache_dir, image.reference, builder)
        base_identity = "base " + base.cache_key
    prepared = None
    rebuild = False
    if service.prepare is not None:
        prepared = _prepared_artifact(cache_dir, image.reference, base_identity, service.prepare,
                                      builder)
        rebuild = bool(service.prepare.mounts)
    if prepared is not None:
        container_image = prepared.path
    elif base is not None:
        container_image = base.path
    else:
        container_image = local_path
    return ServiceImage(service=service.name, container_image=container_image, base=base,
                        prepared=prepared, local_path=local_path, rebuild_every_time=rebuild)


def _default_cache_dir(environ=None):
    """``$HOME/.cache/hpc-compose``: the cache directory when x-slurm.cache_dir is not set."""
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", "hpc-compose")


def _runtime_artifacts(runtime_plan):
    """Every cache artifact path ``runtime_plan`` references (runtime images and their bases)."""
    paths = set()
    for image in runtime_plan.images:
        for artifact in (image.base, image.prepared):
            if artifact is not None:
                paths.add(artifact.path)
    return paths


# --- enroot wrapper -------------------------------------------------------------------------------

def _enroot_environment(cache_dir, environ=None):
    """The environment every enroot call of ours gets: layer cache and prepare rootfs under the
    shared cache dir, but a node-local temporary directory (squashfs creation on NFS/Lustre fails
    with stale file handles)."""
    import tempfile
    env = dict(os.environ if environ is None else environ)
    env["ENROOT_CACHE_PATH"] = os.path.join(cache_dir, "enroot", "cache")
    env["ENROOT_DATA_PATH"] = os.path.join(cache_dir, "enroot", "data")
    if not env.get("ENROOT_TEMP_PATH"):
        env["ENROOT_TEMP_PATH"] = os.path.join(tempfile.gettempdir(),
                                               "hpc-compose-enroot-%d" % os.getuid())
        _check_private_temp_dir(env["ENROOT_TEMP_PATH"])
    for key in ("ENROOT_CACHE_PATH", "ENROOT_DATA_PATH", "ENROOT_TEMP_PATH"):
        os.makedirs(env[key], exist_ok=True)
    return env


def _check_private_temp_dir(path, variable="ENROOT_TEMP_PATH"):
    """Our fixed-name folder in the shared temporary directory: owner-only, or refused when
    someone else made it first (or made it a link), since image imports unpack there."""
    try:
        os.mkdir(path, _PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    _check_own_directory(path, "image imports unpack there; set %s to a folder of your own "
                               "instead" % variable)
    # Ours; an older release made it with the umask's mode.
    _set_directory_mode(path, _PRIVATE_DIR_MODE)


def _apptainer_environment(cache_dir, environ=None):
    """The environment of our apptainer builds: the layer cache under the shared cache dir, the
    build's scratch space node-local (as for Enroot); Apptainer needs both to exist already."""
    import tempfile
    env = dict(os.environ if environ is None else environ)
    env["APPTAINER_CACHEDIR"] = os.path.join(cache_dir, "apptainer", "cache")
    if not env.get("APPTAINER_TMPDIR"):
        env["APPTAINER_TMPDIR"] = os.path.join(tempfile.gettempdir(),
                                               "hpc-compose-apptainer-%d" % os.getuid())
        _check_private_temp_dir(env["APPTAINER_TMPDIR"], "APPTAINER_TMPDIR")
    for key in ("APPTAINER_CACHEDIR", "APPTAINER_TMPDIR"):
        os.makedirs(env[key], exist_ok=True)
        # SingularityCE reads only its own names.
        env["SINGULARITY_" + key[len("APPTAINER_"):]] = env[key]
    return env


def _run_enroot(argv, env, output=None, tool_hint=None):
    """Run one enroot command, streaming its output lines to ``output`` (a callable) as they come.

    This does not use ``_run_command`` because an import can run for many minutes and the user must
    see Enroot's own progress while it happens. Returns ``(exit_code, last_lines)``.
    """
    import subprocess
    from collections import deque
    try:
        # Its own process group, so that an interrupt stops Enroot's helpers (curl, parallel,
        # mksquashfs) too, not only the enroot shell script.
        process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=env, universal_newlines=True, encoding="utf-8",
                                   errors="replace",
                                   start_new_session=True)
    except FileNotFoundError:
        raise ToolError("required binary '%s' was not found" % argv[0],
                        hint=tool_hint or "install Enroot, load its module, or pass its path "
                                          "with --enroot-bin")
    except PermissionError:
        raise ToolError("'%s' is not executable" % argv[0],
                        hint="pass the path of a working enroot with --enroot-bin")
    tail = deque(maxlen=20)
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if output is not None:
                output("    " + line)
        code = process.wait()
    except BaseException:
        import signal
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except OSError:
            pass
        process.wait()
        raise
    finally:
        process.stdout.close()
    return code, list(tail)


def _enroot_failure(step, argv, code, tail, hint=None, tool="enroot"):
    text = "%s failed (exit %d): %s" % (step, code, " ".join(shell_quote(a) for a in argv))
    detail = [line for line in tail if line.strip()][-8:]
    if detail:
        text += "\n  %s said:\n" % tool + "\n".join("    " + line for line in detail)
    return ToolError(text, hint=hint)


# --- manifests ------------------------------------------------------------------------------------

def _load_manifest(artifact_path):
    """The manifest dict stored beside ``artifact_path``; None when absent or unreadable."""
    data = _load_json(artifact_path + _MANIFEST_SUFFIX)
    return data if isinstance(data, dict) else None


def _manifest_for(artifact, plan, services, service_plan=None, base_path=None, local_base=None):
    prepare = service_plan.prepare if service_plan is not None else None
    manifest = {
        "cache_format_version": _CACHE_FORMAT_VERSION,
        "kind": artifact.kind,
        "artifact_path": artifact.path,
        "cache_key": artifact.cache_key,
        "source_image": artifact.source,
        "enroot_uri": artifact.enroot_uri,
        "registry": _registry_host(artifact.source) if "://" in artifact.source else None,
        "inputs": dict(artifact.inputs),
        "services": sorted(services),
        "projects": [plan.compose_file],
        "created_by": plan.compose_file,
        "built_with": __version__,
    }
    if artifact.builder != "enroot":
        manifest["builder"] = artifact.builder
    if artifact.kind == "prepared":
        manifest.update({
            "base_artifact": base_path,
            "local_base": local_base,
            "prepare_commands": list(prepare.commands),
            "prepare_env_keys": [key for key, _ in prepare.env],
            "prepare_mounts": [_mount_text(m) for m in prepare.mounts],
            "prepare_root": bool(prepare.root),
            "rebuild_every_time": bool(prepare.mounts),
        })
    return manifest


def _record_build(artifact, manifest, seconds):
    import time
    now = int(time.time())
    manifest = dict(manifest, created_at=now, last_used_at=now, build_seconds=round(seconds, 1))
    _write_json_atomic(artifact.manifest_path, manifest)


def _record_use(artifact, plan, services, fresh_manifest):
    """Touch ``last_used_at`` and add this project and these services to the manifest (the caller
    holds the artifact's lock)."""
    import time
    manifest = _load_manifest(artifact.path)
    if manifest is None:
        # An artifact without a manifest (copied in, or a crash between rename and manifest):
        # describe it from the current plan, dated by the file itself.
        manifest = dict(fresh_manifest)
        try:
            manifest["created_at"] = int(os.stat(artifact.path).st_mtime)
        except OSError:
            manifest["created_at"] = int(time.time())
    manifest["services"] = sorted(set(manifest.get("services") or []) | set(services))
    projects = list(manifest.get("projects") or [])
    if plan.compose_file not in projects:
        projects.append(plan.compose_file)
    manifest["projects"] = projects
    manifest["last_used_at"] = int(time.time())
    _write_json_atomic(artifact.manifest_path, manifest)


# --- prepare --------------------------------------------------------------------------------------

def _partial_path(artifact_path):
    """Where an import/export writes before the rename: same directory (same file system, so the
    rename is atomic), a name that is never mistaken for an artifact."""
    directory, name = os.path.split(artifact_path)
    return os.path.join(directory, "%s%d-%s" % (_PARTIAL_PREFIX, os.getpid(), name))


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _PrepareRun(object):
    """State of one prepare_images call: options, the enroot environment, what was built."""

    def __init__(self, runtime_plan, options, progress):
        self.runtime_plan = runtime_plan
        self.plan = runtime_plan.plan
        self.options = options
        self.progress = progress
        self.env = None
        self.apptainer_env = None
        self.built = set()         # artifact paths built in this run (force rebuilds each once)

    def say(self, text):
        if self.progress is not None:
            self.progress(text)

    def enroot_env(self):
        if self.env is None:
            self.env = _enroot_environment(self.runtime_plan.cache_dir)
        return self.env

    def enroot(self, args):
        return [self.options.enroot_bin] + list(args)

    def apptainer(self, builder, args):
        """The argv and environment of one ``apptainer`` (or ``singularity``) call."""
        if self.apptainer_env is None:
            self.apptainer_env = _apptainer_environment(self.runtime_plan.cache_dir)
        return [self.options.apptainer_bin or builder] + list(args), self.apptainer_env

    def needs_build(self, artifact, always=False):
        if artifact.path in self.built:
            return False
        if always or self.options.force:
            return True
        return not os.path.isfile(artifact.path)


def prepare_images(runtime_plan, options=PrepareOptions(),
                   progress=None) -> Tuple[PrepareResult, ...]:
    """Import and prepare every image the plan needs into the shared cache."""
    run = _PrepareRun(runtime_plan, options, progress)
    users = {}
    for service, image in zip(runtime_plan.plan.services, runtime_plan.images):
        for artifact in (image.base, image.prepared):
            if artifact is not None:
                users.setdefault(artifact.path, set()).add(service.name)
    results = []
    for service, image in zip(runtime_plan.plan.services, runtime_plan.images):
        try:
            results.append(_prepare_service(run, service, image, users))
        except OSError as exc:
            raise ToolError("preparing the image of service '%s' failed: %s%s"
                            % (service.name, exc.strerror or exc,
                               (": " + exc.filename) if getattr(exc, "filename", None) else ""),
                            hint="check that the cache directory %s is writable for you (a cache "
                                 "shared by a group needs group write permission)"
                                 % runtime_plan.cache_dir)
    return tuple(results)


def _prepare_service(run, service, image, users):
    if image.container_image is None:
        return PrepareResult(service=service.name, note="host runtime: no container image")
    if image.prepared is None and image.base is None:
        return PrepareResult(service=service.name, runtime_action="present",
                             note="local image used in place", artifact=image.local_path)
    base_action = None
    if image.prepared is None:
        base_action = _ensure_base(run, image.base, users)
        return PrepareResult(service=service.name, base_action=base_action,
                             runtime_action=base_action, artifact=image.base.path)
    prepared = image.prepared
    if not run.needs_build(prepared, always=image.rebuild_every_time):
        _reuse(run, prepared, users, service)
        return PrepareResult(service=service.name, base_action=None, runtime_action="reused",
                             artifact=prepared.path,
                             note="base not needed: the prepared image is cached")
    with _FileLock(prepared.path + ".lock"):
        # Someone else may have built it while we waited for the lock: then reuse theirs.
        if not run.needs_build(prepared, always=image.rebuild_every_time):
            _reuse(run, prepared, users, service, locked=True)
            return PrepareResult(service=service.name, runtime_action="reused",
                                 artifact=prepared.path)
        if image.base is not None:
            base_action = _ensure_base(run, image.base, users)
            base_path = image.base.path
        else:
            base_action = "present"
            base_path = image.local_path
            if not os.path.isfile(base_path):
                raise ToolError("local image '%s' of service '%s' does not exist" % (base_path, service.name),
                                hint="fix the image path (relative paths resolve from the compose file's folder)")
        _build_prepared(run, service, image, base_path, users.get(image.prepared.path, ()))
    note = None
    if image.rebuild_every_time:
        note = "rebuilt because x-enroot.prepare.mounts is set (rebuilds on every prepare/submit)"
    return PrepareResult(service=service.name, base_action=base_action, runtime_action="built",
                         artifact=prepared.path, note=note)


def _reuse(run, artifact, users, service, locked=False):
    _note_use(run, artifact, users, service if artifact.kind == "prepared" else None, locked)
    run.say("reusing %s (cache hit)" % artifact.path)


def _note_use(run, artifact, users, service_plan=None, locked=False):
    """Record this use in the manifest. Best effort: in a cache shared by several users the
    directory may not be writable for us, and a hit must still work."""
    services = users.get(artifact.path, ())
    fresh = _manifest_for(artifact, run.plan, services, service_plan)
    try:
        if locked:
            _record_use(artifact, run.plan, services, fresh)
        else:
            with _FileLock(artifact.path + ".lock"):
                _record_use(artifact, run.plan, services, fresh)
    except OSError as exc:
        run.say("note: could not update the manifest of %s (%s); the image is reused anyway"
                % (artifact.path, exc.strerror or exc))


def _ensure_base(run, artifact, users):
    """Import a remote image unless its artifact is already in the cache: ``reused`` or ``built``."""
    import time
    if not run.needs_build(artifact):
        if artifact.path in run.built:
            return "built"
        _note_use(run, artifact, users)
        run.say("reusing %s for %s (cache hit)" % (artifact.path, artifact.source))
        return "reused"
    with _FileLock(artifact.path + ".lock"):
        if not run.needs_build(artifact):
            _note_use(run, artifact, users, locked=True)
            run.say("reusing %s for %s (imported meanwhile by another prepare)"
                    % (artifact.path, artifact.source))
            return "reused"
        partial = _partial_path(artifact.path)
        _remove_quietly(partial)
        if artifact.builder == "enroot":
            env = run.enroot_env()
            argv = run.enroot(["import", "--output", partial, artifact.enroot_uri])
            step = "enroot import of %s" % artifact.enroot_uri
        else:
            argv, env = run.apptainer(artifact.builder, ["build", partial, artifact.source])
            step = "%s build of %s" % (artifact.builder, artifact.source)
        run.say("importing %s -> %s" % (artifact.enroot_uri or artifact.source, artifact.path))
        started = time.time()
        try:
            code, tail = _run_enroot(argv, env, run.progress, _builder_hint(artifact.builder))
            if code != 0:
                raise _enroot_failure(step, argv, code, tail, hint=_import_hint(artifact, tail),
                                      tool=artifact.builder)
            if not os.path.isfile(partial):
                raise ToolError("%s reported success but wrote no file at %s" % (step, partial))
            os.replace(partial, artifact.path)
        finally:
            _remove_quietly(partial)
        elapsed = time.time() - started
        _record_build(artifact, _manifest_for(artifact, run.plan, users.get(artifact.path, ())),
                      elapsed)
        run.built.add(artifact.path)
        run.say("imported %s in %.1fs" % (artifact.enroot_uri or artifact.source, elapsed))
        return "built"


def _builder_hint(builder):
    """The hint when the build tool itself is missing (None: Enroot's own)."""
    if builder == "enroot":
        return None
    return ("install Apptainer (or SingularityCE), load its module, or pass its path with "
            "--apptainer-bin")


def _import_hint(artifact, tail):
    text = "\n".join(tail)
    if ("401" in text or "403" in text or "nauthorized" in text) and artifact.builder != "enroot":
        return ("the registry refused the pull: log in with '%s registry login --username USER "
                "docker://%s' (or set APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD)"
                % (artifact.builder, _registry_host(artifact.source) or "REGISTRY"))
    if "401" in text or "403" in text or "nauthorized" in text:
        return ("the registry refused the pull: add credentials for %s to Enroot's credentials file "
                "($ENROOT_CONFIG_PATH/.credentials); 'hpc-compose preflight' shows which machine "
                "lines are needed" % (_registry_host(artifact.source) or "the registry"))
    if "429" in text or "Too Many Requests" in text:
        return "the registry rate-limited an anonymous pull: add credentials (see 'hpc-compose preflight')"
    return "check the image name and tag, and that this node can reach the registry"


def _prepare_container_name(prepared):
    import time
    return "hpc-compose-prep-%s-%d-%d" % (prepared.cache_key[:12], os.getpid(), int(time.time()))


def _enroot_mount_arg(mount):
    """``enroot start --mount`` value. Enroot reads SRC:DST[:TYPE:OPTIONS] as an fstab line, and
    options given alone (SRC:DST:ro) replace its default ``rbind,x-create=auto``: no bind, no
    mount point (seen with Enroot 4.1.2: "failed to mount ... No such file or directory")."""
    if not mount.options:
        return "%s:%s" % (mount.host, mount.container)
    return "%s:%s:none:rbind,x-create=auto,%s" % (mount.host, mount.container, mount.options)


def _enroot_start_args(name, prepare, command):
    """Arguments after ``enroot`` for one prepare command: ``start [--root] --rw [--mount M]...
    [--env K=V]... NAME /bin/sh -lc COMMAND``."""
    args = ["start"]
    if prepare.root:
        args.append("--root")
    args.append("--rw")
    for mount in prepare.mounts:
        args += ["--mount", _enroot_mount_arg(mount)]
    for key, value in prepare.env:
        args += ["--env", "%s=%s" % (key, value)]
    return args + [name, "/bin/sh", "-lc", command]


def _apptainer_definition(base_path, prepare):
    """The definition file of an apptainer prepare: the base image, the commands in ``%post``."""
    lines = ["Bootstrap: localimage", "From: " + base_path, "", "%post", "    set -e"]
    for key, value in prepare.env:
        lines.append("    export %s=%s" % (key, shell_quote(value)))
    for command in prepare.commands:
        # Each command in its own login shell, as `enroot start ... /bin/sh -lc` runs it.
        text = shell_quote(command)
        if any(line.startswith("%") for line in text.split("\n")[1:]):
            raise ToolError("a prepare command has a line that starts with '%%', which a "
                            "definition file reads as a new section: %r" % command,
                            hint="indent that line, or put the commands in a script")
        lines.append("    /bin/sh -lc " + text)
    return "\n".join(lines) + "\n"


def _apptainer_prepare_argv(run, prepared, prepare, partial, definition):
    """``apptainer build --fakeroot [--bind M]... PARTIAL DEFINITION``: %post needs root in the
    image, which a user gets through fakeroot (and root too, on nodes without CAP_SYS_RESOURCE)."""
    args = ["build", "--fakeroot"]
    for mount in prepare.mounts:
        args += ["--bind", _mount_text(mount)]
    return run.apptainer(prepared.builder, args + [partial, definition])


def _build_prepared_sif(run, service, image, base_path):
    """Build the prepared .sif of an apptainer service from a definition file."""
    import tempfile
    prepared = image.prepared
    partial = _partial_path(prepared.path)
    _remove_quietly(partial)
    handle, definition = tempfile.mkstemp(prefix="hpc-compose-prepare-", suffix=".def")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(_apptainer_definition(base_path, service.prepare))
        argv, env = _apptainer_prepare_argv(run, prepared, service.prepare, partial, definition)
        code, tail = _run_enroot(argv, env, run.progress, _builder_hint(prepared.builder))
        if code != 0:
            raise _enroot_failure("%s build of the prepared image of service '%s'"
                                  % (prepared.builder, service.name), argv, code, tail,
                                  tool=prepared.builder,
                                  hint="fix the command in services.%s.x-enroot.prepare.commands "
                                       "and run 'hpc-compose prepare' again" % service.name)
        if not os.path.isfile(partial):
            raise ToolError("%s build for service '%s' reported success but wrote no file at %s"
                            % (prepared.builder, service.name, partial))
        os.replace(partial, prepared.path)
    finally:
        _remove_quietly(partial)
        _remove_quietly(definition)


def _build_prepared(run, service, image, base_path, services):
    import time
    prepared = image.prepared
    prepare = service.prepare
    run.say("preparing %s from %s (%d command%s)"
            % (service.name, base_path, len(prepare.commands), "" if len(prepare.commands) == 1 else "s"))
    started = time.time()
    if prepared.builder != "enroot":
        _build_prepared_sif(run, service, image, base_path)
        _finish_prepared(run, service, image, base_path, services, started)
        return
    env = run.enroot_env()
    name = _prepare_container_name(prepared)
    partial = _partial_path(prepared.path)
    _remove_quietly(partial)
    created = False
    try:
        argv = run.enroot(["create", "--force", "--name", name, base_path])
        code, tail = _run_enroot(argv, env, run.progress)
        if code != 0:
            raise _enroot_failure("enroot create for service '%s'" % service.name, argv, code, tail)
        created = True
        for index, command in enumerate(prepare.commands, 1):
            run.say("preparing %s: command %d/%d: %s" % (service.name, index, len(prepare.commands), command))
            argv = run.enroot(_enroot_start_args(name, prepare, command))
            code, tail = _run_enroot(argv, env, run.progress)
            if code != 0:
                raise _enroot_failure(
                    "prepare command %d of service '%s' (%s)" % (index, service.name, command),
                    argv, code, tail,
                    hint="fix the command in services.%s.x-enroot.prepare.commands and run "
                         "'hpc-compose prepare' again%s" % (service.name, "" if run.options.keep_failed
                                                            else "; --keep-failed-prep keeps the container for debugging"))
        run.say("exporting %s -> %s" % (service.name, prepared.path))
        argv = run.enroot(["export", "--force", "--output", partial, name])
        code, tail = _run_enroot(argv, env, run.progress)
        if code != 0:
            raise _enroot_failure("enroot export for service '%s'" % service.name, argv, code, tail,
                                  hint="check free space in %s" % os.path.dirname(prepared.path))
        if not os.path.isfile(partial):
            raise ToolError("enroot export for service '%s' reported success but wrote no file at %s"
                            % (service.name, partial))
        os.replace(partial, prepared.path)
    except BaseException as exc:
        _remove_quietly(partial)
        if created and run.options.keep_failed:
            location = os.path.join(env["ENROOT_DATA_PATH"], name)
            message = ("kept the failed prepare container '%s' at %s (inspect it with: "
                       "ENROOT_DATA_PATH=%s enroot start --rw %s /bin/sh; remove it with: "
                       "ENROOT_DATA_PATH=%s enroot remove --force %s)"
                       % (name, location, shell_quote(env["ENROOT_DATA_PATH"]), name,
                          shell_quote(env["ENROOT_DATA_PATH"]), name))
            run.say(message)
            if isinstance(exc, HpcComposeError):
                exc.message += "\n  " + message
        elif created:
            _run_enroot(run.enroot(["remove", "--force", name]), env, None)
        raise
    remove_argv = run.enroot(["remove", "--force", name])
    code, tail = _run_enroot(remove_argv, env, None)
    if code != 0:
        run.say("warning: could not remove the prepare container %s: %s" % (name, " ".join(tail[-2:])))
    _finish_prepared(run, service, image, base_path, services, started)


def _finish_prepared(run, service, image, base_path, services, started):
    """Record a prepared image just built: its manifest, and this run's set of built artifacts."""
    import time
    prepared = image.prepared
    elapsed = time.time() - started
    local_base = None
    if image.local_path:
        local_base = _local_image_identity(image.local_path)
    _record_build(prepared, _manifest_for(prepared, run.plan, services, service,
                                          base_path=base_path, local_base=local_base), elapsed)
    run.built.add(prepared.path)
    run.say("prepared %s in %.1fs" % (service.name, elapsed))


# --- cache list / inspect (prune_cache ends job tracking: it asks which jobs still run) -----------

_ARTIFACT_SUFFIXES = (".sqsh", ".squashfs", _SIF_SUFFIX)


def _cache_artifact_paths(cache_dir):
    """Every artifact file (complete ones only) under ``cache_dir``'s base/ and prepared/."""
    paths = []
    for kind in ("base", "prepared"):
        directory = os.path.join(cache_dir, kind)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.startswith(_PARTIAL_PREFIX):
                continue
            if name.endswith(_ARTIFACT_SUFFIXES) or \
                    (name.endswith(_MANIFEST_SUFFIX) and name[:-len(_MANIFEST_SUFFIX)].endswith(_ARTIFACT_SUFFIXES)):
                path = os.path.join(directory, name)
                if name.endswith(_MANIFEST_SUFFIX):
                    path = path[:-len(_MANIFEST_SUFFIX)]
                if path not in paths:
                    paths.append(path)
    return sorted(paths)


def list_cache(cache_dir):
    """One dict per cached artifact: its manifest (when present) plus ``present`` and ``size_bytes``."""
    entries = []
    for path in _cache_artifact_paths(cache_dir):
        manifest = _load_manifest(path)
        entry = dict(manifest or {})
        entry.setdefault("kind", os.path.basename(os.path.dirname(path)))
        entry["artifact_path"] = path
        entry["manifest_present"] = manifest is not None
        try:
            st = os.stat(path)
            entry["present"] = True
            entry["size_bytes"] = st.st_size
            if manifest is None:
                entry["created_at"] = int(st.st_mtime)
        except OSError:
            entry["present"] = False
            entry["size_bytes"] = None
        entries.append(entry)
    return entries


_INPUT_REASONS = {
    "image": "the image reference changed",
    "base": "the base image changed (reference, or a local image's size or modification time)",
    "commands": "x-enroot.prepare.commands changed",
    "env": "x-enroot.prepare.env changed",
    "mounts": "x-enroot.prepare.mounts changed",
    "root": "x-enroot.prepare.root changed",
}


def _miss_reasons(artifact, plan, service_name, cache_dir):
    """Why ``artifact`` is not in the cache, by comparing with the last artifact of the same kind
    that this project built for this service."""
    previous = None
    for entry in list_cache(cache_dir):
        if entry.get("kind") != artifact.kind or entry.get("artifact_path") == artifact.path:
            continue
        if service_name not in (entry.get("services") or []):
            continue
        if plan.compose_file not in (entry.get("projects") or []):
            continue
        if previous is None or (entry.get("last_used_at") or 0) > (previous.get("last_used_at") or 0):
            previous = entry
    if previous is None:
        return ["not built yet (no earlier %s artifact of this project for service '%s')"
                % (artifact.kind, service_name)]
    reasons = []
    if previous.get("cache_format_version") != _CACHE_FORMAT_VERSION:
        reasons.append("the cache format changed (version %s -> %s)"
                       % (previous.get("cache_format_version"), _CACHE_FORMAT_VERSION))
    old_inputs = previous.get("inputs") or {}
    for category, digest in artifact.inputs:
        if old_inputs.get(category) != digest:
            reasons.append(_INPUT_REASONS.get(category, category + " changed"))
    if not reasons:
        reasons.append("the earlier artifact was removed")
    return ["%s (earlier artifact: %s)" % (r, previous["artifact_path"]) for r in reasons[:1]] + reasons[1:]


def _artifact_report(artifact, plan, service_name, cache_dir, always=False):
    present = os.path.isfile(artifact.path)
    manifest = _load_manifest(artifact.path) if present else None
    report = {
        "kind": artifact.kind,
        "path": artifact.path,
        "cache_key": artifact.cache_key,
        "source": artifact.source,
        "present": present,
        "manifest_present": manifest is not None,
        "created_at": (manifest or {}).get("created_at"),
        "last_used_at": (manifest or {}).get("last_used_at"),
        "services": (manifest or {}).get("services", []),
    }
    if artifact.enroot_uri:
        report["enroot_uri"] = artifact.enroot_uri
    if always:
        report["expectation"] = "rebuild"
        report["reasons"] = ["x-enroot.prepare.mounts is set: rebuilds on every prepare/submit"]
    elif present:
        report["expectation"] = "hit"
        report["reasons"] = []
    else:
        report["expectation"] = "miss"
        report["reasons"] = _miss_reasons(artifact, plan, service_name, cache_dir)
    return report


def inspect_cache(runtime_plan, service=None):
    """Per service: which artifact the container starts from, and whether the next prepare will
    reuse it (hit), build it (miss, with the reasons) or rebuild it every time (prepare mounts)."""
    plan = runtime_plan.plan
    names = [s.name for s in plan.services]
    if service is not None and service not in names:
        raise UsageError("service '%s' is not in %s" % (service, plan.compose_file),
                         hint="services: %s" % ", ".join(names))
    reports = []
    for service_plan, image in zip(plan.services, runtime_plan.images):
        if service is not None and service_plan.name != service:
            continue
        entry = {"service": service_plan.name, "runtime": service_plan.runtime,
                 "image": service_plan.image.reference or None,
                 "container_image": image.container_image, "artifacts": []}
        if image.container_image is None:
            entry["expectation"] = "none"
            entry["note"] = "host runtime: no container image"
        elif image.base is None and image.prepared is None:
            entry["expectation"] = "present" if os.path.isfile(image.local_path) else "missing"
            entry["note"] = "local image used in place"
        else:
            if image.prepared is not None:
                prepared = _artifact_report(image.prepared, plan, service_plan.name,
                                            runtime_plan.cache_dir, image.rebuild_every_time)
                entry["artifacts"].append(prepared)
                entry["expectation"] = prepared["expectation"]
            if image.base is not None:
                base = _artifact_report(image.base, plan, service_plan.name, runtime_plan.cache_dir)
                if image.prepared is not None and entry["expectation"] == "hit" and not base["present"]:
                    base["expectation"] = "not needed"
                    base["reasons"] = ["the prepared image is cached, so the base is not imported"]
                entry["artifacts"].insert(0, base)
                if image.prepared is None:
                    entry["expectation"] = base["expectation"]
            if image.local_path:
                entry["local_base"] = image.local_path
        reports.append(entry)
    return reports


def _try_lock(path):
    """A non-blocking exclusive lock on ``path``; the open handle, or None when someone holds it."""
    import fcntl
    handle = _open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _remove_artifact(path):
    """Delete an artifact and its manifest unless a prepare holds its lock; True when removed."""
    handle = _try_lock(path + ".lock")
    if handle is None:
        return False
    try:
        _remove_quietly(path)
        _remove_quietly(path + _MANIFEST_SUFFIX)
    finally:
        handle.close()
    _remove_quietly(path + ".lock")
    return True


##############################################################################
# Preflight: login-node checks before a submission
##############################################################################
# Contract:
#   run_preflight(runtime_plan, options: PreflightOptions) -> PreflightReport
#   _lint_plan(plan) -> tuple of _LintWarning (valid, but likely wrong; codes in docs/lint.md)
# Levels: error (the run cannot work: submit stops), warn (it may work; `preflight --strict` fails),
# ok (passed; listed with --verbose). Every error and warning carries a remediation. With the
# rendered script in its options, preflight asks the scheduler itself (sbatch --test-only).


class Finding(NamedTuple):
    level: str                     # ok | warn | error
    check: str                     # short id, e.g. "binary.srun", "cache_dir.policy"
    message: str
    remediation: Optional[str] = None


class PreflightOptions(NamedTuple):
    enroot_bin: str = "enroot"
    srun_bin: str = "srun"
    sbatch_bin: str = "sbatch"
    skip_prepare: bool = False
    dry_run: bool = False          # submit --dry-run: a missing reused image is a warning, not an error
    local: Optional[str] = None    # up --local: "allocation" or "machine" (no sbatch; no srun outside Slurm)
    apptainer_bin: Optional[str] = None  # None: the runtime's own command
    script: Optional[str] = None   # the rendered batch script: sbatch --test-only judges it
    sinfo_bin: str = "sinfo"
    scontrol_bin: str = "scontrol"


class PreflightReport(NamedTuple):
    findings: Tuple[Finding, ...]

    @property
    def errors(self):
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self):
        return tuple(f for f in self.findings if f.level == "warn")

    @property
    def passed(self):
        return tuple(f for f in self.findings if f.level == "ok")

    def failed(self, strict=False):
        """True when the report should fail the command (errors, or warnings with ``strict``)."""
        return bool(self.errors) or (strict and bool(self.warnings))


_UNRELIABLE_RESUME_ROOTS = ("/tmp", "/var/tmp")

# module_command: true once `module` (Lmod's or Environment Modules' shell function) is defined,
# sourcing the site's init script when this shell lacks it (a batch shell is no login shell), looked
# for where sites put it. Preflight runs it on the login node; the batch script on the node.
_MODULE_INIT_SHELL = """\
    module_command() {
        local init
        declare -F module >/dev/null && return 0
        for init in "${LMOD_PKG:+$LMOD_PKG/init/bash}" "${MODULESHOME:+$MODULESHOME/init/bash}" \\
                /etc/profile.d/lmod.sh /etc/profile.d/z00_lmod.sh /etc/profile.d/modules.sh \\
                /usr/share/lmod/lmod/init/bash /usr/share/Modules/init/bash \\
                /usr/share/modules/init/bash; do
            [[ -n $init && -f $init ]] || continue
            set +u
            # shellcheck disable=SC1090  # the site's init script
            . "$init"
            set -u
            declare -F module >/dev/null && return 0
        done
        return 1
    }"""

# Preflight's question (bash -c, arguments FOLDER... -- MODULE...): one "missing NAME" line per
# module that `module is-avail` does not find after `module use` of the folders.
_MODULE_CHECK_SHELL = _MODULE_INIT_SHELL + """
module_command || { echo no-module-command; exit 0; }
while [[ $# -gt 0 && $1 != -- ]]; do module use "$1"; shift; done
shift
for name in "$@"; do
    module is-avail "$name" >/dev/null 2>&1 || echo "missing $name"
done
"""
_SYMLINK_SCAN_LIMIT = 5000         # entries per mounted directory: big model trees are not walked whole


def run_preflight(runtime_plan, options=PreflightOptions()) -> PreflightReport:
    """Check that this login node can prepare and submit ``runtime_plan``."""
    plan = runtime_plan.plan
    uses_images = any(image.container_image is not None for image in runtime_plan.images)
    # Enroot and Pyxis matter only to Pyxis services; apptainer services have checks of their own.
    uses_containers = any(image.container_image is not None and service.runtime == "pyxis"
                          for service, image in zip(plan.services, runtime_plan.images))
    findings = []
    enroot_path = None
    if uses_containers:
        enroot_path = _preflight_binary(findings, "enroot", options.enroot_bin, "--enroot-bin")
    srun_path = None
    if options.local != "machine":
        srun_path = _preflight_binary(findings, "srun", options.srun_bin, "--srun-bin")
    sbatch_path = None
    if options.local is None:
        sbatch_path = _preflight_binary(findings, "sbatch", options.sbatch_bin, "--sbatch-bin")
    else:
        findings.extend(_preflight_local(runtime_plan, options.local, enroot_path))
    if plan.nodes > 1:
        _preflight_binary(findings, "scontrol", "scontrol", None,
                      why="x-slurm.nodes is %d: the batch script expands the node list with it"
                          % plan.nodes)
    elif _secret_services(plan) and options.local is None:
        _preflight_binary(findings, "scontrol", "scontrol", None,
                          why="the job uses secrets: submit releases it with scontrol once the "
                              "owner-only copies are written")
    if uses_containers and srun_path:
        findings.append(_preflight_pyxis(srun_path))
    if uses_containers and enroot_path:
        findings.extend(_preflight_enroot_version(runtime_plan, enroot_path))
    findings.extend(_preflight_apptainer(runtime_plan, options))
    if uses_images:
        findings.extend(_preflight_cache_dir(runtime_plan, writable=not options.skip_prepare))
    findings.extend(_preflight_paths(runtime_plan))
    findings.extend(_preflight_resume_path(plan))
    if uses_containers and not options.skip_prepare:
        findings.extend(_preflight_credentials(runtime_plan))
    findings.extend(_preflight_curl(plan))
    if srun_path and any(service.mpi for service in plan.services):
        findings.extend(_preflight_mpi(plan, srun_path))
    findings.extend(_preflight_modules(plan))
    findings.extend(_preflight_batch_log_folders(plan))
    findings.extend(_preflight_secret_files(plan))
    if options.skip_prepare:
        findings.extend(_preflight_skip_prepare(runtime_plan, options.dry_run))
    if options.local is not None:
        findings.append(Finding("ok", "scheduler", "up --local: the scheduler is not asked"))
    elif options.script is not None and sbatch_path:
        findings.extend(_preflight_scheduler(plan, options.script, sbatch_path, options.sinfo_bin,
                                             options.scontrol_bin))
    return PreflightReport(findings=tuple(findings))


def _preflight_binary(findings, name, given, flag, why=None):
    path = _find_executable(given)
    if path:
        findings.append(Finding("ok", "binary." + name, "%s found at %s" % (name, path)))
        return path
    message = "required binary '%s' was not found" % given
    if why:
        message += " (%s)" % why
    remedy = "run on a login node with the Slurm client tools and Enroot available"
    if flag:
        remedy += ", or pass its path with %s PATH" % flag
    else:
        remedy += ", or put it on PATH"
    findings.append(Finding("error", "binary." + name, message, remedy))
    return None


def _preflight_pyxis(srun_path):
    """Pyxis adds ``--container-image`` to ``srun``: its help text is the standard detection."""
    try:
        result = _run_command([srun_path, "--help"], timeout=30)
    except ToolError as exc:
        return Finding("error", "pyxis", "could not run '%s --help': %s" % (srun_path, exc.message),
                       "check that srun works on this node, or pass another one with --srun-bin")
    if "--container-image" in (result.stdout or "") + (result.stderr or ""):
        return Finding("ok", "pyxis", "srun advertises --container-image (Pyxis is available)")
    return Finding("error", "pyxis",
                   "srun does not advertise --container-image: Pyxis support appears unavailable "
                   "on this node (%s)" % srun_path,
                   "move to a login node or cluster with Pyxis, or run the services without "
                   "containers with x-slurm.runtime: host")


def _preflight_apptainer(runtime_plan, options):
    """The apptainer services' checks: the command and its version (an error when images must be
    built here), user namespaces (Debian's and most sites' Apptainer has no setuid starter), and
    APPTAINER_TMPDIR, which Apptainer needs to exist."""
    findings = []
    builds = {}
    for service, image in zip(runtime_plan.plan.services, runtime_plan.images):
        if service.runtime in _APPTAINER_RUNTIMES:
            needs_build = (image.base is not None or image.prepared is not None) \
                and not options.skip_prepare
            builds[service.runtime] = builds.get(service.runtime, False) or needs_build
    for runtime, needs_build in sorted(builds.items()):
        command = options.apptainer_bin or runtime
        path = _find_executable(command)
        if not path:
            where = ("it builds the .sif images here" if needs_build
                     else "the compute nodes need it; this node only checks")
            findings.append(Finding("error" if needs_build else "warn", "binary." + runtime,
                                    "'%s' was not found (%s)" % (command, where),
                                    "load the site's apptainer module, or pass its path with "
                                    "--apptainer-bin"))
            continue
        try:
            result = _run_command([path, "--version"], timeout=30)
            version = (result.stdout or "").strip() if result.returncode == 0 else ""
        except ToolError:
            version = ""
        findings.append(Finding("ok" if version else "warn", "binary." + runtime,
                                "%s found at %s (%s)" % (runtime, path, version or
                                                         "'--version' failed")))
    if not builds:
        return findings
    try:
        with open("/proc/sys/user/max_user_namespaces") as handle:
            namespaces = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        namespaces = None
    if namespaces == 0:
        findings.append(Finding("warn", "apptainer.userns", "user namespaces are disabled on this "
                                "node (max_user_namespaces is 0): Apptainer then needs its setuid "
                                "starter", "ask the site whether the compute nodes allow user "
                                "namespaces or install Apptainer setuid"))
    tmpdir = os.environ.get("APPTAINER_TMPDIR")
    if tmpdir and not os.path.isdir(tmpdir):
        findings.append(Finding("error", "apptainer.tmpdir", "APPTAINER_TMPDIR %s does not exist "
                                "(Apptainer does not create it)" % tmpdir,
                                "mkdir -p it, or unset APPTAINER_TMPDIR"))
    return findings


def _preflight_enroot_version(runtime_plan, enroot_path):
    digests = sorted({image.base.enroot_uri for image in runtime_plan.images
                      if image.base is not None and "@sha256:" in (image.base.enroot_uri or "")})
    if not digests:
        return []
    try:
        result = _run_command([enroot_path, "version"], timeout=30)
        version = (result.stdout or "").strip().split()[-1] if result.returncode == 0 else ""
    except (ToolError, IndexError):
        version = ""
    major = version.split(".")[0]
    if major.isdigit() and int(major) >= 4:
        return [Finding("ok", "enroot.version",
                        "Enroot %s accepts digest references (%s)" % (version, ", ".join(digests)))]
    if major.isdigit():
        return [Finding("error", "enroot.version",
                        "Enroot %s cannot import digest references (%s): digests need Enroot 4.0 or "
                        "newer" % (version, ", ".join(digests)),
                        "use a tag instead of @sha256:..., or run on a node with Enroot >= 4.0")]
    return [Finding("warn", "enroot.version",
                    "could not tell the Enroot version; digest references (%s) need Enroot 4.0 or "
                    "newer" % ", ".join(digests),
                    "check 'enroot version', or use a tag instead of @sha256:...")]


def _preflight_cache_dir(runtime_plan, writable=True):
    plan = runtime_plan.plan
    cache_dir = runtime_plan.cache_dir
    explicit = plan.slurm.cache_dir is not None
    findings = []
    resolved = os.path.realpath(cache_dir)
    for root in _TMP_CACHE_ROOTS:
        if _under(cache_dir, root) or _under(resolved, root):
            findings.append(Finding(
                "error", "cache_dir.policy",
                "cache directory %s is under %s, which is node-local or wiped: images prepared on "
                "the login node would not be visible to the compute nodes" % (cache_dir, root),
                "set x-slurm.cache_dir to shared storage visible from the login and compute nodes, "
                "e.g. /shared/$USER/hpc-compose-cache"))
            return findings
    home = os.environ.get("HOME")
    if home and home != "/" and _under(resolved, os.path.realpath(home)):
        if explicit:
            message = "cache directory %s is under $HOME" % cache_dir
        else:
            message = ("x-slurm.cache_dir is not set, so images are cached under $HOME (%s)"
                       % cache_dir)
        findings.append(Finding(
            "warn", "cache_dir.policy",
            message + ": this works only if $HOME is shared with the compute nodes, and home "
            "quotas are small for multi-gigabyte images",
            "set x-slurm.cache_dir to a shared project or workspace path"))
    else:
        findings.append(Finding("ok", "cache_dir.policy",
                                "cache directory %s is outside temporary locations" % cache_dir))
    if writable:
        findings.append(_preflight_writable(cache_dir))
    return findings


def _preflight_can_create_in(directory):
    """Really try (root passes every permission test of os.access)."""
    import tempfile
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hpc-compose-probe-", dir=directory))
        return True
    except OSError:
        return False


def _preflight_writable(cache_dir):
    if not os.path.isdir(cache_dir):
        # Do not create it here (a typo would leave stray directories): prepare creates it, so
        # the nearest existing ancestor must be writable.
        ancestor = os.path.dirname(os.path.abspath(cache_dir))
        while ancestor != os.path.dirname(ancestor) and not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if os.path.isdir(ancestor) and _preflight_can_create_in(ancestor):
            return Finding("ok", "cache_dir.writable",
                           "cache directory %s does not exist yet; prepare will create it in %s"
                           % (cache_dir, ancestor))
        return Finding("error", "cache_dir.writable",
                       "cache directory %s does not exist and cannot be created: %s is not writable"
                       % (cache_dir, ancestor),
                       "create it yourself, or point x-slurm.cache_dir at a writable shared path")
    import tempfile
    try:
        # A new file of our own (O_EXCL: never through a link planted at a name we could guess).
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".hpc-compose-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Finding("error", "cache_dir.writable",
                       "cache directory %s is not writable: %s" % (cache_dir, exc.strerror or exc),
                       "fix its permissions, or point x-slurm.cache_dir at a writable shared path")
    return Finding("ok", "cache_dir.writable", "cache directory %s is writable" % cache_dir)


def _preflight_paths(runtime_plan):
    plan = runtime_plan.plan
    findings = []
    for service, image in zip(plan.services, runtime_plan.images):
        if image.local_path is not None:
            if os.path.isfile(image.local_path):
                findings.append(Finding("ok", "paths.image", "service '%s': local image %s exists"
                                        % (service.name, image.local_path)))
            else:
                findings.append(Finding(
                    "error", "paths.image",
                    "service '%s': local image %s does not exist" % (service.name, image.local_path),
                    "fix the image path; relative paths resolve from the compose file's folder (%s)"
                    % plan.project_dir))
        groups = [("paths.volume", "volume", service.mounts, "volumes")]
        if service.prepare is not None:
            groups.append(("paths.prepare_mount", "prepare mount", service.prepare.mounts,
                           "x-enroot.prepare.mounts"))
        for check, label, mounts, key in groups:
            for mount in mounts:
                if os.path.exists(mount.host):
                    findings.append(Finding("ok", check, "service '%s': %s %s exists"
                                            % (service.name, label, mount.host)))
                    findings.extend(_preflight_symlinks(service, mount, mounts))
                else:
                    findings.append(Finding(
                        "error", check,
                        "service '%s': %s host path %s does not exist" % (service.name, label, mount.host),
                        "create it or fix services.%s.%s; relative paths resolve from the compose "
                        "file's folder (%s)" % (service.name, key, plan.project_dir)))
    return findings


def _preflight_symlinks(service, mount, mounts):
    """Warn about symlinks inside a mounted directory whose targets the container cannot see."""
    root = os.path.realpath(mount.host)
    if not os.path.isdir(root):
        return []
    visible = [os.path.realpath(m.host) for m in mounts]
    invisible = []
    seen = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            seen += 1
            path = os.path.join(directory, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not any(_under(target, v) for v in visible):
                    invisible.append((path, target))
        if seen >= _SYMLINK_SCAN_LIMIT:
            break
    findings = []
    for path, target in invisible[:5]:
        findings.append(Finding(
            "warn", "paths.symlink",
            "service '%s': %s is a symlink to %s, which is outside the mounted directory %s and "
            "will not be visible inside the container" % (service.name, path, target, mount.host),
            "copy the real file into the mounted directory, or also mount the directory that "
            "contains the target"))
    if len(invisible) > 5:
        findings.append(Finding("warn", "paths.symlink",
                                "service '%s': %d more symlinks under %s point outside it"
                                % (service.name, len(invisible) - 5, mount.host),
                                "see the warnings above"))
    return findings


def _preflight_resume_path(plan):
    resume = plan.slurm.resume
    if resume is None:
        return []
    for root in _UNRELIABLE_RESUME_ROOTS:
        if _under(resume.path, root):
            return [Finding("warn", "resume.path",
                            "x-slurm.resume.path %s is under %s: node-local or cleaned storage is "
                            "not a reliable place for checkpoints a restarted job must find"
                            % (resume.path, root),
                            "put the resume path on shared storage")]
    return [Finding("ok", "resume.path", "resume path %s is outside temporary locations" % resume.path)]


# --- registry credentials -------------------------------------------------------------------------

def _enroot_credentials_path(environ=None):
    """Enroot's credentials file: ``$ENROOT_CONFIG_PATH/.credentials``, else under
    ``$XDG_CONFIG_HOME/enroot`` or ``$HOME/.config/enroot``."""
    environ = os.environ if environ is None else environ
    if environ.get("ENROOT_CONFIG_PATH"):
        base = environ["ENROOT_CONFIG_PATH"]
    elif environ.get("XDG_CONFIG_HOME"):
        base = os.path.join(environ["XDG_CONFIG_HOME"], "enroot")
    else:
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config", "enroot")
    return os.path.join(base, ".credentials")


def _credential_machines(path):
    """``{machine: login}`` from a netrc-style file (comment lines skipped); {} when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    tokens = []
    for line in lines:
        if line.lstrip().startswith("#"):
            continue
        tokens.extend(line.split())
    machines = {}
    current = None
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "machine" and index + 1 < len(tokens):
            current = tokens[index + 1]
            machines.setdefault(current, None)
            index += 2
            continue
        if token == "login" and current is not None and index + 1 < len(tokens):
            machines[current] = tokens[index + 1]
            index += 2
            continue
        index += 1
    return machines


def _pulls(runtime_plan):
    """``{registry: [service, ...]}`` for the images the next prepare would import."""
    pulls = {}
    for service, image in zip(runtime_plan.plan.services, runtime_plan.images):
        if image.base is None or os.path.isfile(image.base.path):
            continue
        if image.prepared is not None and not image.rebuild_every_time \
                and os.path.isfile(image.prepared.path):
            continue
        host = _registry_host(image.base.source)
        if host is not None:
            pulls.setdefault(host, []).append(service.name)
    return pulls


def _preflight_credentials(runtime_plan):
    path = _enroot_credentials_path()
    machines = _credential_machines(path)
    findings = []
    for host, services in sorted(_pulls(runtime_plan).items()):
        who = "service%s %s" % ("s" if len(services) > 1 else "", ", ".join("'%s'" % s for s in services))
        if host == "docker.io":
            missing = [m for m in ("auth.docker.io", _DOCKER_HUB_REGISTRY) if m not in machines]
            if "auth.docker.io" in missing:
                findings.append(Finding(
                    "warn", "registry.credentials",
                    "%s will pull anonymously from Docker Hub, which rate-limits anonymous pulls "
                    "(HTTP 429); no 'machine auth.docker.io' entry in %s" % (who, path),
                    "add 'machine auth.docker.io login <user> password <access-token>' and "
                    "'machine %s login <user> password <access-token>' to %s"
                    % (_DOCKER_HUB_REGISTRY, path)))
            elif missing:
                findings.append(Finding(
                    "warn", "registry.credentials",
                    "%s: %s has 'machine auth.docker.io' but no 'machine %s' entry, so Enroot 3.x "
                    "does not know which login to use and pulls anonymously" % (who, path, _DOCKER_HUB_REGISTRY),
                    "add 'machine %s login <user> password <access-token>' (same login) to %s"
                    % (_DOCKER_HUB_REGISTRY, path)))
            else:
                findings.append(Finding("ok", "registry.credentials",
                                        "Docker Hub credentials found in %s" % path))
        elif host == "nvcr.io":
            missing = [m for m in ("nvcr.io", "authn.nvidia.com") if m not in machines]
            if missing:
                findings.append(Finding(
                    "warn", "registry.credentials",
                    "%s pull from nvcr.io, which needs both 'machine nvcr.io' and 'machine "
                    "authn.nvidia.com' entries; %s lacks %s"
                    % (who, path, " and ".join("'machine %s'" % m for m in missing)),
                    "add 'machine nvcr.io login $oauthtoken password <NGC API key>' and 'machine "
                    "authn.nvidia.com login $oauthtoken password <NGC API key>' to %s" % path))
            else:
                findings.append(Finding("ok", "registry.credentials",
                                        "NGC (nvcr.io) credentials found in %s" % path))
        else:
            machine = host.rsplit(":", 1)[0] if ":" in host else host
            if machine in machines:
                findings.append(Finding("ok", "registry.credentials",
                                        "credentials for %s found in %s" % (machine, path)))
            else:
                findings.append(Finding(
                    "ok", "registry.credentials",
                    "%s will pull anonymously from %s (fine for public images; for a private one add "
                    "'machine %s login <user> password <token>' to %s)" % (who, host, machine, path)))
    return findings


def _step_has_several_tasks(placement):
    tasks_per_node = placement.ntasks_per_node or 1
    return (placement.mode == "distributed" or (placement.ntasks or 1) > 1
            or tasks_per_node * (placement.nodes or 1) > 1)


def _local_plan_problems(plan, mode):
    """Why ``plan`` cannot run with ``up --local`` in ``mode`` (one sentence each; empty: it can)."""
    problems = []
    if plan.slurm.array is not None:
        problems.append("x-slurm.array makes a job array, which only sbatch can start; submit it "
                        "with 'hpc-compose up' instead")
    if mode != "machine":
        return problems
    if (plan.nodes or 1) > 1:
        problems.append("x-slurm.nodes is %d, but outside Slurm there is one machine: run it "
                        "inside an allocation (salloc -N %d) instead" % (plan.nodes, plan.nodes))
    for service in plan.services:
        if _step_has_several_tasks(service.placement):
            problems.append("service '%s' runs several tasks (x-slurm placement), which outside "
                            "Slurm would all be one process: run it inside an allocation instead"
                            % service.name)
        words = [str(arg) for arg in service.extra_srun_args if not str(arg).startswith("-")]
        if words:
            problems.append("service '%s' has x-slurm srun_args with a separate value (%s); outside "
                            "Slurm srun_args are skipped and only --option=value words can be: "
                            "write --option=value" % (service.name, " ".join(words)))
    return problems


def _preflight_local(runtime_plan, mode, enroot_path):
    """What ``up --local`` needs here: bash, and outside Slurm an enroot that can list containers;
    no sbatch. The plan's problems for the mode (an array, several nodes or tasks) are errors."""
    findings = [Finding("ok", "local.mode",
                        "up --local runs the batch script with bash here, never sbatch: %s" % (
                            "its services become steps of allocation %s" % os.environ.get(
                                "SLURM_JOB_ID") if mode == "allocation"
                            else "outside Slurm, its services run on this machine"))]
    _preflight_binary(findings, "bash", "bash", None, why="up --local runs the batch script with it")
    for problem in _local_plan_problems(runtime_plan.plan, mode):
        findings.append(Finding("error", "local.plan", problem))
    if mode == "machine" and enroot_path:
        try:
            result = _run_command([enroot_path, "list"], timeout=60)
            error = None if result.returncode == 0 else (result.stderr or result.stdout).strip()
        except ToolError as exc:
            error = exc.message
        if error:
            findings.append(Finding("error", "local.enroot", "'%s list' failed: %s" % (
                enroot_path, error), "outside Slurm the Pyxis services run through enroot "
                "create/start: check ENROOT_DATA_PATH and ENROOT_RUNTIME_PATH are writable"))
        else:
            findings.append(Finding("ok", "local.enroot", "enroot can create and start the Pyxis "
                                    "services' containers here (%s list works)" % enroot_path))
    return findings


def _preflight_curl(plan):
    users = [s.name for s in plan.services if s.readiness is not None and s.readiness.type == "http"]
    if not users:
        return []
    path = _find_executable("curl")
    if path:
        return [Finding("ok", "readiness.curl", "curl found at %s (HTTP readiness)" % path)]
    return [Finding("warn", "readiness.curl",
                    "HTTP readiness (%s) polls with curl, which is not on this node's PATH"
                    % ", ".join(users),
                    "make sure curl exists on the compute nodes, or use tcp or log readiness")]


def _mpi_types(text):
    """The plugin names in ``srun --mpi=list`` output (tab-indented lines, then "specific pmix
    plugin versions available: pmix_v4,...")."""
    names = set()
    for line in text.splitlines():
        if line[:1].isspace() and line.strip():
            names.add(line.strip())
        elif "versions available:" in line:
            names.update(word.strip() for word in line.split(":", 1)[1].split(",") if word.strip())
    return names


def _preflight_mpi(plan, srun_path):
    """Each x-slurm.mpi type against the cluster's ``srun --mpi=list``."""
    try:
        result = _run_command([srun_path, "--mpi=list"], timeout=30)
    except ToolError as exc:
        return [Finding("warn", "mpi", "could not run '%s --mpi=list': %s"
                        % (srun_path, exc.message), "check that srun works on this node")]
    available = _mpi_types((result.stdout or "") + "\n" + (result.stderr or ""))
    if not available:
        return [Finding("warn", "mpi", "'%s --mpi=list' named no MPI plugin" % srun_path,
                        "run srun --mpi=list on this node and check x-slurm.mpi by hand")]
    findings = []
    for service in plan.services:
        if service.mpi is None:
            continue
        if service.mpi in available:
            findings.append(Finding("ok", "mpi", "service '%s': srun --mpi=%s is available"
                                    % (service.name, service.mpi)))
        else:
            findings.append(Finding(
                "error", "mpi", "service '%s': this cluster's srun has no MPI plugin '%s' "
                "(services.%s.x-slurm.mpi; srun --mpi=list: %s)"
                % (service.name, service.mpi, service.name, ", ".join(sorted(available))),
                "use one of those types (pmix for Open MPI 4 and newer, pmi2 for MPICH and "
                "Intel MPI), or ask the site which one its MPI was built for"))
    return findings


def _preflight_modules(plan):
    """Every x-slurm.modules name must exist on this login node (``module is-avail``)."""
    modules = {}
    paths = []
    for service in plan.services:
        for module in service.modules:
            modules.setdefault(module.name, module)
        paths.extend(path for path in service.module_paths if path not in paths)
    if not modules:
        return []
    names = sorted(modules)
    try:
        result = _run_command(["bash", "-c", _MODULE_CHECK_SHELL, "hpc-compose"] + paths + ["--"]
                              + names, timeout=120)
    except ToolError as exc:
        return [Finding("error", "modules", "could not ask the module system: %s" % exc.message,
                        "run preflight on a login node with bash and environment modules")]
    lines = (result.stdout or "").splitlines()
    if "no-module-command" in lines:
        return [Finding("error", "modules", "x-slurm.modules names %s but this node has no "
                        "environment modules (no module command, no init script in "
                        "/etc/profile.d, $LMOD_PKG or $MODULESHOME)" % ", ".join(names),
                        "run on the cluster's login node, or remove x-slurm.modules")]
    missing = set(line[len("missing "):] for line in lines if line.startswith("missing "))
    findings = []
    for name in names:
        module = modules[name]
        if name in missing:
            findings.append(Finding(
                "error", "modules", "module '%s' (%s) is not available%s" % (
                    name, module.location, " (module use: %s)" % ", ".join(paths) if paths
                    else ""),
                "check its name with `module spider %s` (Lmod) or `module avail %s`; a folder "
                "of your own modulefiles goes in x-slurm.modules_path" % (name, name)))
        else:
            findings.append(Finding("ok", "modules", "module '%s' is available" % name))
    return findings


def _preflight_batch_log_folders(plan):
    """Slurm fails a job without writing any log when the folder of --output/--error is missing."""
    # Relative paths count from the batch job's working directory: x-slurm.chdir, else the folder
    # sbatch runs in, which is the compose file's folder.
    workdir = plan.project_dir
    if plan.slurm.chdir:
        workdir = os.path.join(plan.project_dir, os.path.expanduser(plan.slurm.chdir))
    findings = []
    for field in ("output", "error"):
        value = getattr(plan.slurm, field)
        folder = os.path.dirname(value or "")
        if not folder or "%" in folder:
            # No folder part, or a Slurm pattern (%x, %u...) only the scheduler can expand.
            continue
        folder = os.path.normpath(os.path.join(workdir, os.path.expanduser(folder)))
        if os.path.isdir(folder):
            findings.append(Finding("ok", "batch_log." + field,
                                    "x-slurm.%s folder %s exists" % (field, folder)))
        else:
            findings.append(Finding(
                "error", "batch_log." + field,
                "the folder of x-slurm.%s (%s) does not exist: Slurm would fail the job without "
                "writing any log" % (field, folder),
                "create it (mkdir -p %s) or change x-slurm.%s" % (shell_quote(folder), field)))
    return findings


def _secret_services(plan):
    return [service for service in plan.services if service.secrets]


def _preflight_secret_files(plan):
    """Like ssh with keys: files that hold values should be readable by their owner only."""
    paths = [("dotenv", os.path.join(plan.project_dir, ".env"))]
    paths += [("secret." + s.name, s.reference) for s in plan.secrets if s.source == "file"]
    findings = []
    for check, path in paths:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o044:
            findings.append(Finding(
                "warn", "permissions." + check,
                "%s is readable by %s (mode %04o): it holds values such as tokens"
                % (path, "group and others" if mode & 0o004 and mode & 0o040 else
                   "others" if mode & 0o004 else "the group", mode),
                "chmod 600 %s" % shell_quote(path)))
        else:
            findings.append(Finding("ok", "permissions." + check,
                                    "%s is owner-only (mode %04o)" % (path, mode)))
    return findings


def _preflight_skip_prepare(runtime_plan, dry_run=False):
    findings = []
    for service, image in zip(runtime_plan.plan.services, runtime_plan.images):
        artifact = image.prepared or image.base
        if artifact is None:
            continue
        if not os.path.isfile(artifact.path):
            # A dry run submits nothing, so `submit --dry-run --skip-prepare` stays a pure
            # validate-and-render run; the finding still says a real submit would fail.
            findings.append(Finding(
                "warn" if dry_run else "error", "skip_prepare.artifact",
                "service '%s': --skip-prepare reuses cached images, but its %s image %s is not in "
                "the cache" % (service.name, artifact.kind, artifact.path),
                "run 'hpc-compose prepare -f %s' first, or submit without --skip-prepare"
                % runtime_plan.plan.compose_file))
            continue
        manifest = _load_manifest(artifact.path)
        if image.rebuild_every_time:
            built = (manifest or {}).get("created_at")
            when = ""
            if built:
                import time
                when = " at " + time.strftime("%Y-%m-%d %H:%M", time.localtime(built))
            findings.append(Finding(
                "warn", "skip_prepare.reuse",
                "service '%s': its prepared image was built from x-enroot.prepare.mounts%s; "
                "--skip-prepare reuses it without the current contents of those mounts"
                % (service.name, when),
                "submit without --skip-prepare to rebuild it from the current files"))
        elif manifest is None:
            findings.append(Finding(
                "warn", "skip_prepare.reuse",
                "service '%s': %s has no manifest, so nothing tells what it was built from"
                % (service.name, artifact.path),
                "run 'hpc-compose prepare --force -f %s' to rebuild and record it"
                % runtime_plan.plan.compose_file))
        else:
            findings.append(Finding("ok", "skip_prepare.artifact", "service '%s': reusing %s"
                                    % (service.name, artifact.path)))
    return findings


def _preflight_report_to_dict(report, compose_file=None, strict=False):
    """The ``--format json`` form of a report."""
    return {
        "compose_file": compose_file,
        "ok": not report.failed(strict),
        "strict": strict,
        "summary": {"errors": len(report.errors), "warnings": len(report.warnings),
                    "passed": len(report.passed)},
        "findings": [f._asdict() for f in report.findings],
    }


def _format_preflight_report(report, verbose=False):
    """The text form of a report: a summary line, then errors, warnings (and passes with verbose)."""
    lines = ["preflight: %d error%s, %d warning%s, %d check%s passed" % (
        len(report.errors), "" if len(report.errors) == 1 else "s",
        len(report.warnings), "" if len(report.warnings) == 1 else "s",
        len(report.passed), "" if len(report.passed) == 1 else "s")]
    for label, findings in (("error", report.errors), ("warning", report.warnings)):
        for finding in findings:
            lines.append("%s: %s" % (label, finding.message))
            if finding.remediation:
                lines.append("  fix: %s" % finding.remediation)
    if verbose:
        for finding in report.passed:
            lines.append("ok: %s" % finding.message)
    return "\n".join(lines) + "\n"


# --- lint: what is valid but likely wrong (docs/lint.md) -------------------------------------------

# Stable codes: a code is never reused for another smell (docs/lint.md lists every one).
_LINT_CODES = (
    ("HC001", "image-not-pinned", "an image with no tag, or :latest"),
    ("HC002", "no-time-limit", "the job has no x-slurm.time"),
    ("HC003", "readiness-outlasts-job", "a readiness timeout longer than the job's time limit"),
    ("HC004", "dependency-without-readiness", "a service others depend on has no readiness"),
    ("HC005", "cache-dir-not-shared", "a cache dir the compute nodes may not see"),
    ("HC006", "service-exceeds-job", "a service asks for more than the job has"),
    ("HC007", "mounts-hide-each-other", "a mount inside another mount of the same service"),
)
_LINT_NAMES = dict((code, name) for code, name, _what in _LINT_CODES)
# Node-local roots that a cache dir should not live under (the /tmp family is already an error).
_NODE_LOCAL_ROOTS = ("/local", "/localscratch", "/scratch/local", "/var", "/run", "/mnt/local")


class _LintWarning(NamedTuple):
    code: str                      # HC001...: a key of _LINT_NAMES
    path: Tuple[Union[str, int], ...]  # where in the compose file: ("services", "app", "image")
    message: str
    hint: str
    line: Optional[int] = None


def _read_compose_document(compose_file):
    """The compose file as a ``YamlDocument`` (for lines and x- keys), or None if unreadable."""
    try:
        return _load_compose_document(compose_file, check_todos=False)
    except (OSError, HpcComposeError):
        return None


def _compose_key_lines(document):
    """``{path: line}`` of every key (and value) of ``document``; ``{}`` for None."""
    if document is None:
        return {}
    lines = dict((path, mark.line) for path, mark in document.marks.items())
    lines.update((path, mark.line) for path, mark in document.key_marks.items())
    return lines


def _lint_ignored(document, path):
    """The codes ``x-lint.ignore`` silences for ``path`` (top level, or the path's service)."""
    data = document.data if document is not None and isinstance(document.data, dict) else {}
    holders = [data]
    if len(path) > 1 and path[0] == "services" and isinstance(data.get("services"), dict):
        holders.append(data["services"].get(path[1]))
    codes = set()
    for holder in holders:
        lint = holder.get("x-lint") if isinstance(holder, dict) else None
        if isinstance(lint, dict) and isinstance(lint.get("ignore"), list):
            codes.update(str(code) for code in lint["ignore"])
    return codes


def _located_line(lines, path):
    """The line of ``path``, else of the nearest enclosing key that is written."""
    path = tuple(path)
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _image_unpinned(image):
    if image.kind != "remote":
        return False
    reference = image.reference.split("://", 1)[-1]
    if "@" in reference:
        return False
    name = reference.rsplit("/", 1)[-1]
    return ":" not in name or name.rsplit(":", 1)[1] == "latest"


def _service_excess(service, slurm):
    """``[(key, text)]``: what ``service`` asks for beyond the job's own x-slurm values."""
    excess = []
    for key in ("cpus_per_task", "gpus"):
        mine, job = getattr(service, key), getattr(slurm, key)
        if mine and job and mine > job:
            excess.append((key, "%s %d is more than the job's %d" % (key, mine, job)))
    for key, measure in (("mem", _memory_megabytes), ("time", _slurm_time_seconds)):
        mine, job = getattr(service, key), getattr(slurm, key)
        if mine and job and measure(mine) and measure(job) and measure(mine) > measure(job):
            excess.append((key, "%s %s is more than the job's %s" % (key, mine, job)))
    return excess


def _lint_plan(plan):
    """The lint warnings of ``plan``, in file order: valid, but probably not what was meant."""
    import posixpath
    found = []
    slurm = plan.slurm
    limit = _slurm_time_seconds(slurm.time)
    if slurm.time is None:
        found.append(("HC002", ("x-slurm",), "the job has no time limit (x-slurm.time): it gets "
                      "the partition's default, often the maximum, and waits longer in the queue",
                      "set x-slurm.time, e.g. \"01:00:00\""))
    depended = set(dependency.name for service in plan.services
                   for dependency in service.depends_on)
    containers = False
    for service in plan.services:
        where = ("services", service.name)
        if service.runtime != "host":
            containers = True
        if service.runtime != "host" and _image_unpinned(service.image):
            found.append(("HC001", where + ("image",), "image %s has no tag or uses :latest: the "
                          "next prepare may pull another image" % service.image.original,
                          "pin a tag such as %s:1.2.3, or a digest"
                          % service.image.original.split(":")[0]))
        timeout = service.readiness.timeout_seconds if service.readiness else None
        if timeout and limit and timeout > limit:
            found.append(("HC003", where + ("readiness",), "readiness waits up to %d s, longer "
                          "than the job's time limit (%s = %d s)" % (timeout, slurm.time, limit),
                          "lower timeout_seconds, or give the job more time"))
        if service.name in depended and service.readiness is None:
            found.append(("HC004", where, "service '%s' has dependents but no readiness: they "
                          "start as soon as it is launched, before it listens" % service.name,
                          "add readiness (tcp, http or log) or a healthcheck"))
        for key, text in _service_excess(service, slurm):
            found.append(("HC006", where + ("x-slurm", key), "service '%s': %s"
                          % (service.name, text), "raise the job's x-slurm.%s or lower the "
                          "service's" % key))
        targets = [posixpath.normpath(mount.container) for mount in service.mounts]
        for index, target in enumerate(targets):
            for other in targets[:index]:
                if target != other and (_under(target, other) or _under(other, target)):
                    found.append(("HC007", where + ("volumes", index), "mount %s and mount %s "
                                  "overlap: the inner one hides part of the outer one" % (
                                      other, target), "mount one folder, or separate them"))
    cache_local = [root for root in _NODE_LOCAL_ROOTS if _under(plan.cache_dir, root)]
    if containers and (slurm.cache_dir is None or cache_local):
        found.append(("HC005", ("x-slurm", "cache_dir") if slurm.cache_dir else ("x-slurm",),
                      "cache dir %s %s" % (plan.cache_dir, "is under %s, which is often "
                                           "node-local" % cache_local[0] if cache_local else
                                           "is the default under $HOME: compute nodes see it "
                                           "only if $HOME is shared"),
                      "set x-slurm.cache_dir to shared project or scratch storage"))
    document = _read_compose_document(plan.compose_file)
    lines = _compose_key_lines(document)
    warnings = [_LintWarning(code, path, message, hint, _located_line(lines, path))
                for code, path, message, hint in found
                if code not in _lint_ignored(document, path)]
    return tuple(sorted(warnings, key=lambda w: (w.line or 0, w.code)))


# --- the scheduler's answer: sbatch --test-only, explained by sinfo and scontrol -------------------

_SCHEDULER_TIMEOUT = 30            # seconds sbatch --test-only, sinfo and scontrol may take each
_SCHEDULER_UNREACHABLE = ("unable to contact slurm controller", "connection refused",
                          "zero bytes were transmitted", "socket timed out",
                          "could not establish a configuration source", "slurm_load_partitions")


class _PartitionOffer(NamedTuple):
    """What one partition offers, from ``sinfo -N`` (its nodes) and ``scontrol show partition``."""
    name: str
    state: str                     # UP, DOWN, DRAIN, INACTIVE (scontrol), else sinfo's up/down
    default: bool
    nodes: Tuple[str, ...]
    memory_mb: int                 # the largest node's memory
    cpus: int                      # the largest node's CPU count
    gres: Tuple[str, ...]          # gres names any node has (gpu, shard...)
    max_time: Optional[int]        # seconds; None: no limit
    max_nodes: Optional[int]       # None: no limit


def _read_partitions(sinfo_bin, scontrol_bin):
    """``{name: _PartitionOffer}`` of this cluster; ``{}`` when sinfo cannot be asked."""
    import re
    try:
        rows = _run_command([sinfo_bin, "-h", "-N", "-o", "%P|%a|%m|%c|%G|%N"],
                            timeout=_SCHEDULER_TIMEOUT)
        limits = _run_command([scontrol_bin, "show", "partition", "-o"],
                              timeout=_SCHEDULER_TIMEOUT)
    except ToolError:
        return {}
    found = {}
    for line in (rows.stdout or "").splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        name, state, memory, cpus, gres, node = parts
        entry = found.setdefault(name.rstrip("*"), {
            "state": state.upper(), "default": name.endswith("*"), "nodes": [], "memory": 0,
            "cpus": 0, "gres": set()})
        if node not in entry["nodes"]:
            entry["nodes"].append(node)
        entry["memory"] = max(entry["memory"], int(memory.rstrip("+")) if
                              memory.rstrip("+").isdigit() else 0)
        entry["cpus"] = max(entry["cpus"], int(cpus) if cpus.isdigit() else 0)
        for item in re.sub(r"\([^)]*\)", "", gres).split(","):
            if item and item != "null":
                entry["gres"].add(item.split(":")[0])
    settings = {}
    for line in (limits.stdout or "").splitlines() if limits.returncode == 0 else ():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" in fields:
            settings[fields["PartitionName"]] = fields
    offers = {}
    for name, entry in found.items():
        fields = settings.get(name, {})
        max_nodes = fields.get("MaxNodes", "")
        offers[name] = _PartitionOffer(
            name, fields.get("State", entry["state"]), entry["default"], tuple(entry["nodes"]),
            entry["memory"], entry["cpus"], tuple(sorted(entry["gres"])),
            _slurm_time_seconds(fields.get("MaxTime")),
            int(max_nodes) if max_nodes.isdigit() else None)
    return offers


def _format_offer(offer):
    """``partition debug: 3 nodes, 7030 MB and 2 CPUs each, no gres, no time limit``."""
    return "partition %s: %d node%s, %d MB and %d CPUs each, %s, %s" % (
        offer.name, len(offer.nodes), "" if len(offer.nodes) == 1 else "s", offer.memory_mb,
        offer.cpus, "gres " + ",".join(offer.gres) if offer.gres else "no gres",
        "no time limit" if offer.max_time is None else "MaxTime %d min" % (offer.max_time // 60))


def _requested_gres(slurm):
    names = []
    for item in (slurm.gres or "").split(","):
        name = item.split(":")[0]
        if name.lower().startswith("gres/"):
            name = name[5:]
        if name:
            names.append(name)
    if not names and (slurm.gpus or slurm.gpus_per_node or slurm.gpus_per_task):
        names.append("gpu")
    return names


def _scheduler_refusals(plan, offers):
    """``[(field, what the cluster offers, fix)]``: why a job of ``plan`` cannot run on ``offers``."""
    slurm = plan.slurm
    defaults = [name for name, offer in sorted(offers.items()) if offer.default]
    wanted = slurm.partition.split(",") if slurm.partition else defaults[:1]
    problems = []
    for name in wanted:
        offer = offers.get(name)
        if offer is None:
            problems.append(("partition", "partition '%s' does not exist; the cluster has %s"
                             % (name, ", ".join(sorted(offers)) or "none"),
                             "set x-slurm.partition to one of them, or drop it for the default "
                             "(%s)" % (", ".join(defaults) or "none")))
            continue
        if offer.state.upper() != "UP":
            problems.append(("partition", "partition %s is %s" % (name, offer.state.lower()),
                             "choose another partition, or wait until it is up"))
        limit = min(len(offer.nodes), offer.max_nodes or len(offer.nodes))
        if plan.nodes > limit:
            problems.append(("nodes", "%d nodes do not fit %s" % (plan.nodes, _format_offer(offer)),
                             "ask for at most %d node%s" % (limit, "" if limit == 1 else "s")))
        memory = _memory_megabytes(slurm.mem) if slurm.mem else None
        if memory and offer.memory_mb and memory > offer.memory_mb:
            problems.append(("mem", "%s (%d MB per node) does not fit %s"
                             % (slurm.mem, memory, _format_offer(offer)),
                             "ask for at most %dM, or choose a partition with bigger nodes"
                             % offer.memory_mb))
        seconds = _slurm_time_seconds(slurm.time)
        if seconds and offer.max_time is not None and seconds > offer.max_time:
            problems.append(("time", "%s is longer than the MaxTime of %s"
                             % (slurm.time, _format_offer(offer)),
                             "ask for at most %d minutes, or choose another partition"
                             % (offer.max_time // 60)))
        if slurm.cpus_per_task and offer.cpus and slurm.cpus_per_task > offer.cpus:
            problems.append(("cpus_per_task", "%d CPUs per task do not fit %s"
                             % (slurm.cpus_per_task, _format_offer(offer)),
                             "ask for at most %d CPUs per task" % offer.cpus))
        for gres in _requested_gres(slurm):
            if gres not in offer.gres:
                field = next(key for key in ("gres", "gpus", "gpus_per_node", "gpus_per_task")
                             if getattr(slurm, key))
                problems.append((field, "no node has gres '%s' in %s" % (gres, _format_offer(offer)),
                                 "drop x-slurm.%s, or choose a partition whose nodes have it"
                                 % field))
    return problems


def _preflight_scheduler(plan, script, sbatch_path, sinfo_bin="sinfo", scontrol_bin="scontrol"):
    """Ask the real scheduler: ``sbatch --test-only`` of the rendered script, imports nothing."""
    try:
        result = _run_command([sbatch_path, "--test-only"], input_text=script,
                              cwd=plan.project_dir, timeout=_SCHEDULER_TIMEOUT)
        answer = " ".join(((result.stderr or "") + " " + (result.stdout or "")).split())
    except ToolError as exc:
        result, answer = None, exc.message
    if result is not None and result.returncode == 0:
        return [Finding("ok", "scheduler", "sbatch --test-only accepts the job (%s)"
                        % answer.replace("sbatch: ", ""))]
    if result is None or any(word in answer.lower() for word in _SCHEDULER_UNREACHABLE):
        return [Finding("warn", "scheduler", "the scheduler could not be asked (%s): the job was "
                        "not checked against the cluster" % answer,
                        "run preflight on a login node of the cluster to check partition, "
                        "memory, time and gres before submitting")]
    reason = answer.split("error: ")[-1] or "no reason given"
    problems = _scheduler_refusals(plan, _read_partitions(sinfo_bin, scontrol_bin))
    lowered = reason.lower()
    for field in ("account", "qos", "reservation", "licenses", "dependency"):
        if field.rstrip("s") in lowered and getattr(plan.slurm, field):
            problems.append((field, "%s is refused" % getattr(plan.slurm, field),
                             "check it with `sacctmgr show assoc user=$USER` or your site's "
                             "documentation"))
    if not problems:
        problems = [(None, None, "`sinfo` and `scontrol show partition` show what the cluster "
                                 "offers")]
    lines = _compose_key_lines(_read_compose_document(plan.compose_file))
    findings = []
    for field, offer, fix in problems:
        line = _located_line(lines, ("x-slurm", field) if field else ("x-slurm",))
        where = os.path.basename(plan.compose_file) + (":%d" % line if line else "")
        message = "%s: %s (sbatch --test-only refuses the job: %s)" % (
            where + (": x-slurm." + field if field else ""), offer or "the scheduler", reason)
        findings.append(Finding("error", "scheduler", message, fix))
    return findings


##############################################################################
# Render: the batch script
##############################################################################
# render_script(runtime_plan, local=False) -> str: the complete, self-contained sbatch script. It
# is built from small string.Template constants (named *_TEMPLATE, placeholders written ``@{name}``
# so the bash inside reads naturally, ``$`` left to bash; tests use ``[[ ]]``), each filled by one
# ``_render_*`` function or by render_script itself; every value from the spec reaches the script
# through shell_quote. The constants below stand in the order they are emitted.
#
# What the script does, in order (docs/execution-model.md tells the same story for users):
#   1. #SBATCH lines (x-slurm fields, then submit_args verbatim), the bash >= 4.4 check,
#      ``set -euo pipefail``, the per-job directory;
#   2. one static table per service (policy, dependencies, readiness) and one ``run_service_<i>``
#      function holding the exact env + srun command line;
#   3. json_string (the one JSON escaper), the supervisor's functions by concern (state and
#      logging, launch and dependencies, readiness, exits and failure policies, teardown, signal
#      forwarding and requeue, the EXIT trap), the log index, the container keeper (jobs with
#      containers), the metrics/artifacts functions (only when used: render_metrics_block /
#      render_artifacts_block, after render_script), the traps and a first state.json: from there
#      on every way out goes through teardown;
#   4. the resume attempt layout, the secret and array checks when used, the launcher (srun;
#      local_step too in the script of `up --local` outside Slurm), allocation metadata and
#      HPC_COMPOSE_* variables, the x-slurm.setup lines, then ONE event loop in the batch shell
#      that launches, probes, restarts and ends the job; teardown always leaves a final state.json.
# A job's script carries the bash of a feature (metrics, artifacts, secrets, arrays, resume,
# containers, one-shot stages, local runs) only when the job uses it, callers included.
# Public helpers for tests and ``render --format json``: service_srun_argv, service_environment.

_STOP_GRACE_SECONDS = 10      # SIGTERM -> SIGKILL; below Slurm's default KillWait (30 s)
_SUPERVISOR_TICK = "0.2"      # seconds between two turns of the event loop
_PROBE_FIRST_INTERVAL_MS = 20  # readiness attempts start this close together, right after launch,
_PROBE_BACKOFF = 40           # then the interval grows to 1/40 of the time spent starting,
_PROBE_INTERVAL_MS = 200      # up to this: at most five attempts per second and service
_PROBE_LIMIT_SECONDS = 3      # one readiness attempt (tcp connect, grep, curl) may take this long
_READINESS_TIMEOUT_DEFAULT = 60
_TCP_HOST_DEFAULT = "127.0.0.1"
_HTTP_STATUS_DEFAULT = 200
_EXIT_READINESS_TIMEOUT = 124  # like timeout(1)
_RESTART_MARKER = "### hpc-compose:"


_SHELL_TEMPLATE_CLASS = []  # one slot: the @{} Template subclass, made on first use (string imports re)


def _fill(template, **values):
    """Substitute ``@{name}`` placeholders of a *_TEMPLATE constant (bash's ``$`` stays as it is)."""
    if not _SHELL_TEMPLATE_CLASS:
        from string import Template

        class ShellTemplate(Template):
            delimiter = "@"
            pattern = r"""
            @(?:
              (?P<escaped>(?!))|
              (?P<named>(?!))|
              \{(?P<braced>[_a-z][_a-z0-9]*)\}|
              (?P<invalid>(?!))
            )"""

        _SHELL_TEMPLATE_CLASS.append(ShellTemplate)
    return _SHELL_TEMPLATE_CLASS[0](template).substitute(**values)


# --- templates: header, prelude, the service tables -----------------------------------------------

_SCRIPT_HEAD_TEMPLATE = """\
#!/bin/bash
# hpc-compose batch script for job @{job_name}, generated by hpc-compose @{version}
# from @{compose_file}
# Services in launch order: @{service_names}
# Re-render rather than edit: hpc-compose render -f <compose file> --output <path>
"""

_PRELUDE_TEMPLATE = """
# Empty arrays under `set -u`, `wait -n` and `exec {fd}<>` need bash 4.4 (RHEL 7 ships 4.2).
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
    echo "hpc-compose: this batch script needs bash >= 4.4, but it runs under bash $BASH_VERSION" >&2
    exit 1
fi
set -euo pipefail

# ---------------------------------------------------------------------------
# Per-job directory (mounted at /hpc-compose/job in every container)
# ---------------------------------------------------------------------------
: "${SLURM_JOB_ID:?this script runs as a Slurm batch job: submit it with sbatch}"
JOB_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/@{job_key}"
ATTEMPT="${SLURM_RESTART_COUNT:-0}"
RUN_DIR="@{run_dir}"
LOG_DIR="$RUN_DIR/logs"
STATE_FILE="$RUN_DIR/state.json"
TIMELINE_FILE="$RUN_DIR/timeline.jsonl"
EXPECTED_NODES=@{nodes}
# What this script writes can hold values of the spec: @{who}, whatever the
# submitter's umask. The services get that umask back (run_service_<i>).
USER_UMASK=$(umask)
umask @{umask}
mkdir -p "$LOG_DIR" "$RUN_DIR/metrics" "$RUN_DIR/artifacts" "$RUN_DIR/allocation"
chmod @{job_dir_mode} "$JOB_DIR"
exec {SLEEP_FD}<> <(:)  # a pipe nobody writes: read -t on it sleeps without forking
# Pyxis takes PYXIS_* variables as defaults for every srun; the srun lines below say everything.
for name in "${!PYXIS_@}"; do unset -v "$name"; done
"""

# Every task of a job array (x-slurm.array) has its own job directory: <array job id>_<task id>.
_ARRAY_JOB_KEY = "${SLURM_ARRAY_JOB_ID:?x-slurm.array: submit this script with sbatch --array}_${SLURM_ARRAY_TASK_ID}"

_SERVICE_TABLE_HEAD_TEMPLATE = """
# ---------------------------------------------------------------------------
# Services: static facts, one bash array per fact, indexed in launch order
# ---------------------------------------------------------------------------
# DEPENDS_ON holds "index:condition" words. ENDS_JOB=1 marks the services that no other service
# depends on (ignore sidecars left out): the job ends when all of them have exited.
SERVICE_COUNT=@{count}
END_REASON=@{end_reason}
"""

_SERVICE_ENTRY_TEMPLATE = """
# @{index}: @{name}
NAME[@{index}]=@{name_word} TOKEN[@{index}]=@{token} POLICY[@{index}]=@{policy} ENDS_JOB[@{index}]=@{ends_job}
DEPENDS_ON[@{index}]=@{depends_on}
PLACEMENT[@{index}]=@{placement} DISTRIBUTED[@{index}]=@{distributed}
@{restart}@{readiness}"""

_SIGNAL_TABLE_TEMPLATE = """
# Signals (x-slurm.signal): ON_SIGNAL is forward or requeue; SIGNAL_TO is what each service receives
# when the batch shell gets USR1/USR2 ('' the same signal, - nothing).
ON_SIGNAL=@{on_signal} JOB_SIGNAL=@{job_signal} REQUEUE_GRACE=@{grace} MAX_ATTEMPTS=@{max_attempts}
@{signal_to}
"""

_RESTART_ENTRY_TEMPLATE = """\
MAX_RESTARTS[@{index}]=@{max_restarts} BACKOFF[@{index}]=@{backoff}
"""

_NO_READINESS_ENTRY_TEMPLATE = """\
READINESS[@{index}]=none
"""

_READINESS_ENTRY_TEMPLATE = """\
READINESS[@{index}]=@{type} READY_DESCRIPTION[@{index}]=@{description}
@{probe}
"""

_RUN_SERVICE_TEMPLATE = """
# @{name}: the srun step (runs in a background subshell; its output is appended to the log).
# shellcheck disable=SC2016  # single-quoted arguments are expanded by the service, not here
run_service_@{index}() {
    umask "$USER_UMASK"
@{mkdirs}@{modules}    exec env \\
@{env}        "${LAUNCH[@]}" \\
@{argv}
}
"""

_RUN_MODULES_TEMPLATE = """\
    # x-slurm.modules, in the service's own shell: srun hands the environment they make to the step.
    load_modules @{name} @{words} || exit 1
"""

# The modules: `module` is the site's shell function (Lmod or Environment Modules). Folders before
# the -- are `module use`d, names after it loaded; the init script is found as preflight found it.
_LOAD_MODULES_TEMPLATE = """
# MODULES: load_modules SERVICE FOLDER... -- MODULE...: module use, module load, or say why not.
load_modules() {
    local service=$1
    shift
@{module_init}
    if ! module_command; then
        printf 'hpc-compose: service %s: no environment modules on %s (no module command, %s)\\n' \\
            "$service" "$(hostname)" "no init script in /etc/profile.d, LMOD_PKG or MODULESHOME" >&2
        return 1
    fi
    # Module scripts are not written for set -u.
    set +u
    while [[ $# -gt 0 && $1 != -- ]]; do
        module use "$1"
        shift
    done
    shift
    if ! module load "$@"; then
        set -u
        printf 'hpc-compose: service %s: module load %s failed (see above)\\n' "$service" "$*" >&2
        return 1
    fi
    set -u
}
"""

# --- templates: the JSON escaper and the supervisor, by concern -----------------------------------

# The one JSON string escaper of the script: the supervisor's state.json, the resume marker, the
# metrics sampler and the artifact manifest all write their strings through it.
_JSON_STRING_TEMPLATE = r"""
# JSON: the JSON string literal for $1. The script's one escaper (state.json, the resume marker,
# metrics, the artifact manifest): control characters become \u00XX, nothing is dropped.
json_string() {
    local s=$1 n hex ch
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    if [[ $s == *[$'\001'-$'\037']* ]]; then
        for ((n = 1; n < 32; n++)); do
            printf -v hex '%02x' "$n"
            # shellcheck disable=SC2059  # the format is the escape \xHH itself
            printf -v ch "\\x$hex"
            s=${s//"$ch"/\\u00$hex}
        done
    fi
    JSON="\"$s\""
}

json_or_null() {  # JSON for $1, or null when it is empty
    if [[ -z $1 ]]; then JSON=null; else json_string "$1"; fi
}
"""

# The supervisor, in the order the script defines it. State and logging: the tunables, one
# entry per service, the clock, the batch log and state.json.
_SUPERVISOR_STATE_TEMPLATE = r"""
# ---------------------------------------------------------------------------
# Supervisor state (one entry per service) and helpers
# ---------------------------------------------------------------------------
TICK=@{tick} TICK_MS=@{tick_ms}
STOP_GRACE_SECONDS=@{grace}
PROBE_FIRST_MS=@{probe_first_ms} PROBE_BACKOFF=@{probe_backoff} PROBE_INTERVAL_MS=@{probe_interval_ms}
PROBE_LIMIT_MS=@{probe_limit_ms}
WAKE_MS=0 WOKEN=0  # the event loop's next turn is due at WAKE_MS (or TICK); WOKEN: a child said it ended
JOB_STATUS=running JOB_EXIT=null JOB_REASON='' FINISHING=0 STATE_CHANGED=1 PENDING_SIGNALS=()
SIGNALS_JSON='' REQUEUE_SELF=0 LAST_ATTEMPT_NOTE=''
KILL_WAIT=30  # Slurm's KillWait, read from scontrol once the allocation is known
PROC_ROOTS=0
[[ -e /proc/$$/root ]] && PROC_ROOTS=1
for ((i = 0; i < SERVICE_COUNT; i++)); do
    STATUS[i]=waiting PID[i]='' LAUNCHES[i]=0 RESTARTS[i]=0 LAST_EXIT[i]=null
    READY_STATE[i]='' LAUNCH_MS[i]=0 DUE_MS[i]=0 KILL_MS[i]=0 PROBE_PID[i]='' PROBE_MS[i]=0
    LOG_OFFSET[i]=0 STARTED_AT[i]='' FINISHED_AT[i]='' HARD_KILLED[i]=0
    [[ ${READINESS[i]} == none ]] || READY_STATE[i]=pending
done

# NOW_MS: milliseconds since the epoch, NOW_ISO: the same second as ISO 8601 (no fork either way).
clock() {
    local t
    if [[ -n ${EPOCHREALTIME:-} ]]; then
        t=${EPOCHREALTIME/[.,]/}
        NOW_MS=$((10#${t:0:${#t}-3}))
    else
        printf -v t '%(%s)T' -1
        NOW_MS=$((t * 1000))
    fi
    printf -v t '%(%Y-%m-%dT%H:%M:%S%z)T' $((NOW_MS / 1000))
    NOW_ISO="${t:0:22}:${t:22}"
}

wake_at() {  # the event loop's next turn is due by epoch millisecond $1 at the latest
    if (( WAKE_MS == 0 || $1 < WAKE_MS )); then WAKE_MS=$1; fi
}

# The end of a turn of the event loop: sleep until what is due first (wake_at), TICK at most, or
# until a child that ended (a step, a readiness attempt) writes its line on SLEEP_FD.
sleep_until_due() {
    local ms=$TICK_MS seconds
    # Without EPOCHREALTIME (bash < 5) the clock counts whole seconds: the plain TICK it is.
    if (( WAKE_MS )) && [[ -n ${EPOCHREALTIME:-} ]]; then
        clock
        ms=$((WAKE_MS - NOW_MS))
        (( ms <= TICK_MS )) || ms=$TICK_MS
        (( ms >= 1 )) || ms=1
    fi
    WAKE_MS=0 WOKEN=0
    printf -v seconds '%d.%03d' $((ms / 1000)) $((ms % 1000))
    if read -r -t "$seconds" -u "$SLEEP_FD" _; then WOKEN=1; fi
}

# Is process $1 still running? kill -0 alone is not enough: an exited child that bash has not
# reaped yet (a zombie) still answers it, but its /proc/<pid>/root link no longer resolves.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    (( ! PROC_ROOTS )) || [[ -e /proc/$1/root ]]
}

say() {  # a line for the Slurm batch log
    clock
    printf '%s hpc-compose: %s\n' "$NOW_ISO" "$*"
}

# state.json, rewritten atomically (temporary file + rename) whenever something changed; and one
# line appended to timeline.jsonl (every service's status, launches, last exit), from which
# `status --timeline` and `report` draw the job's phases.
write_state() {
    local i services='' separator='' readiness pid reason nodelist timeline=''
    clock
    for ((i = 0; i < SERVICE_COUNT; i++)); do
        readiness=null
        if [[ ${READINESS[i]} != none ]]; then
            readiness="{\"type\": \"${READINESS[i]}\", \"status\": \"${READY_STATE[i]}\"}"
        fi
        pid=${PID[i]:-null}
        json_string "$JOB_DIR/logs/${TOKEN[i]}.log"
        services+="$separator    {\"name\": \"${NAME[i]}\", \"token\": \"${TOKEN[i]}\", \"log_path\": $JSON"
        services+=", \"status\": \"${STATUS[i]}\", \"pid\": $pid, \"launches\": ${LAUNCHES[i]}"
        services+=", \"restarts\": ${RESTARTS[i]}, \"failure_policy\": \"${POLICY[i]}\""
        if [[ ${POLICY[i]} == restart_on_failure ]]; then
            services+=", \"max_restarts\": ${MAX_RESTARTS[i]}"
        else
            services+=", \"max_restarts\": null"
        fi
        services+=", \"last_exit_code\": ${LAST_EXIT[i]}, \"readiness\": $readiness"
        if (( DISTRIBUTED[i] )); then
            json_string "${HPC_COMPOSE_NODELIST:-}"
        else
            json_string "${HPC_COMPOSE_PRIMARY_NODE:-}"
        fi
        nodelist=$JSON
        services+=", \"placement\": {${PLACEMENT[i]}, \"nodelist\": $nodelist}"
        json_or_null "${STARTED_AT[i]}"
        services+=", \"started_at\": $JSON"
        json_or_null "${FINISHED_AT[i]}"
        services+=", \"finished_at\": $JSON}"
        timeline+="${separator:+, }[\"${STATUS[i]}\", ${LAUNCHES[i]}, ${LAST_EXIT[i]}]"
        separator=$',\n'
    done
    json_or_null "$JOB_REASON"
    reason=$JSON
    printf '{\n  "schema_version": @{state_schema_version},\n  "job_id": "%s",\n  "attempt": %s,\n  "status": "%s",\n  "exit_code": %s,\n  "reason": %s,\n  "updated_at": "%s",\n  "signals": [%s],\n  "services": [\n%s\n  ]\n}\n' \
        "$SLURM_JOB_ID" "$ATTEMPT" "$JOB_STATUS" "$JOB_EXIT" "$reason" "$NOW_ISO" "$SIGNALS_JSON" \
        "$services" >"$STATE_FILE.tmp" && mv -f "$STATE_FILE.tmp" "$STATE_FILE"
    printf '{"at_ms": %s, "status": "%s", "exit_code": %s, "services": [%s]}\n' \
        "$NOW_MS" "$JOB_STATUS" "$JOB_EXIT" "$timeline" >>"$TIMELINE_FILE"
    STATE_CHANGED=0
}
"""

# Launch and dependencies: a service starts as a background srun step once its dependencies allow.
_LAUNCH_TEMPLATE = r"""
# Launch service $1 as a background srun step; its log is appended to, never truncated.
launch() {
    local i=$1 log="$LOG_DIR/${TOKEN[$1]}.log"
    clock
    if (( LAUNCHES[i] > 0 )); then
        printf '%s restarting service %s (restart %s of %s, previous exit code %s) at %s\n' \
            "@{marker}" "'${NAME[i]}'" "${RESTARTS[i]}" "${MAX_RESTARTS[i]}" "${LAST_EXIT[i]}" \
            "$NOW_ISO" >>"$log"
    elif [[ -s $log ]]; then
        printf '%s service %s launched again in a new run of job %s at %s\n' \
            "@{marker}" "'${NAME[i]}'" "$SLURM_JOB_ID" "$NOW_ISO" >>"$log"
    fi
    : >>"$log"
    [[ ${READINESS[i]} != log ]] || LOG_OFFSET[i]=$(stat -c %s -- "$log" 2>/dev/null || echo 0)
    # The step alone holds the write end of a pipe whose reader wakes the event loop when it reads
    # end-of-file, that is the moment srun exits: no turn of the loop waits for the exit. (The
    # reader lets go of the script's output at once: it may outlive the script.)
    exec {EXIT_FD}> >(exec >/dev/null 2>&1; read -r _; printf '\n' >&"$SLEEP_FD")
    "run_service_$i" >>"$log" 2>&1 </dev/null &
    PID[i]=$! HARD_KILLED[i]=0
    exec {EXIT_FD}>&-
    LAUNCHES[i]=$((LAUNCHES[i] + 1))
    LAUNCH_MS[i]=$NOW_MS STARTED_AT[i]=$NOW_ISO FINISHED_AT[i]='' LAST_EXIT[i]=null
    PROBE_MS[i]=$NOW_MS
    wake_at $((NOW_MS + PROBE_FIRST_MS))
    if [[ ${READINESS[i]} == none ]]; then
        STATUS[i]=running
    else
        STATUS[i]=starting READY_STATE[i]=pending
    fi
    STATE_CHANGED=1
    say "launched service '${NAME[i]}' (pid ${PID[i]}, launch ${LAUNCHES[i]}, log $log)"
}

note_stop() {  # note_stop INDEX WHY: in its log, before Slurm's report; up/logs show this instead
    printf '%s stopping service %s (SIGTERM) at %s after %s\n' "@{marker}" "'${NAME[$1]}'" \
        "$NOW_ISO" "$2" >>"$LOG_DIR/${TOKEN[$1]}.log"
}

# Start service $1 once every dependency is satisfied (called each tick while it waits).
try_start() {
    local i=$1 dependency j condition
    # shellcheck disable=SC2086  # "index:condition" words, split on purpose
    for dependency in ${DEPENDS_ON[i]}; do
        j=${dependency%%:*} condition=${dependency#*:}
        if [[ $condition == service_healthy ]]; then
            [[ ${READY_STATE[j]} == ready ]] && continue
            if [[ ${STATUS[j]} == exited ]]; then
                STATUS[i]=failed
                fail_job 1 "service '${NAME[i]}' cannot start: its dependency '${NAME[j]}' exited before its ${READINESS[j]} readiness check succeeded"
            fi
            return
        fi
@{completed_condition}        # service_started: launched and alive, or already finished successfully (a one-shot).
        case ${STATUS[j]} in
            starting|running|ready|exited) ;;
            *) return ;;
        esac
    done
    launch "$i"
}
"""

# One-shot stages (depends_on condition service_completed_successfully), rendered only when a
# service waits for one: try_start's condition here, blocked_dependents after the exits.
_COMPLETED_CONDITION_TEMPLATE = """\
        if [[ $condition == service_completed_successfully ]]; then
            # A one-shot stage: only its exit code 0 lets the dependent start. A non-zero exit
            # went through its failure policy, which ended the job or is restarting it.
            [[ ${STATUS[j]} == exited ]] && continue
            return
        fi
"""

# Readiness: probes in background subshells, and what a readiness timeout does.
_READINESS_TEMPLATE = r"""
# Readiness of service $1: one attempt at a time, in a background subshell, so the loop never blocks.
# Attempts start PROBE_FIRST_MS apart and back off to PROBE_INTERVAL_MS as the wait grows; an
# attempt that ends wakes the loop (a line on SLEEP_FD), so its answer is taken at once.
probe() {
    local i=$1 code interval
    if [[ ${READINESS[i]} == sleep ]]; then
        if (( NOW_MS - LAUNCH_MS[i] >= READY_SECONDS[i] * 1000 )); then
            mark_ready "$i"
        else
            wake_at $((LAUNCH_MS[i] + READY_SECONDS[i] * 1000))
        fi
        return
    fi
    if [[ -n ${PROBE_PID[i]} ]]; then
        if alive "${PROBE_PID[i]}"; then
            if (( NOW_MS - PROBE_MS[i] < PROBE_LIMIT_MS )); then
                # Woken by its line, the attempt may still be exiting: look again very soon.
                if (( WOKEN )); then wake_at $((NOW_MS + 2)); else wake_at $((PROBE_MS[i] + PROBE_LIMIT_MS)); fi
                return
            fi
            kill -KILL "${PROBE_PID[i]}" 2>/dev/null
        fi
        code=0
        wait "${PROBE_PID[i]}" 2>/dev/null || code=$?
        PROBE_PID[i]=''
        if (( code == 0 )); then mark_ready "$i"; return; fi
    fi
    if (( NOW_MS - LAUNCH_MS[i] >= READY_TIMEOUT[i] * 1000 )); then
        readiness_timed_out "$i"
        return
    fi
    interval=$(( (NOW_MS - LAUNCH_MS[i]) / PROBE_BACKOFF ))
    (( interval >= PROBE_FIRST_MS )) || interval=$PROBE_FIRST_MS
    (( interval <= PROBE_INTERVAL_MS )) || interval=$PROBE_INTERVAL_MS
    if (( NOW_MS - PROBE_MS[i] < interval )); then
        wake_at $((PROBE_MS[i] + interval))
        return
    fi
    { run_probe "$i"; code=$?; printf '\n' >&"$SLEEP_FD"; exit "$code"; } </dev/null >/dev/null 2>&1 &
    PROBE_PID[i]=$! PROBE_MS[i]=$NOW_MS
    wake_at $((NOW_MS + PROBE_LIMIT_MS))
}

run_probe() {  # one readiness attempt for service $1; exit status 0 means ready
    local i=$1
    case ${READINESS[i]} in
        tcp) exec 3<>"/dev/tcp/${READY_HOST[i]}/${READY_PORT[i]}" ;;
        log) grep -Fq -e "${READY_PATTERN[i]}" < <(tail -c "+$((LOG_OFFSET[i] + 1))" -- "$LOG_DIR/${TOKEN[i]}.log") ;;
        http) [[ $(curl --silent --output /dev/null --write-out '%{http_code}' --connect-timeout 1 \
                    --max-time 2 --url "${READY_URL[i]}") == "${READY_CODE[i]}" ]] ;;
        *) return 1 ;;
    esac
}

stop_probe() {
    if [[ -n ${PROBE_PID[$1]} ]]; then
        kill -KILL "${PROBE_PID[$1]}" 2>/dev/null
        wait "${PROBE_PID[$1]}" 2>/dev/null
        PROBE_PID[$1]=''
    fi
}

mark_ready() {
    READY_STATE[$1]=ready STATUS[$1]=ready STATE_CHANGED=1
    say "service '${NAME[$1]}' is ready (${READY_DESCRIPTION[$1]})"
}

# A readiness timeout counts as a failure of the service: its failure policy decides.
readiness_timed_out() {
    local i=$1 what
    what="${READY_DESCRIPTION[i]} readiness did not succeed within ${READY_TIMEOUT[i]} s"
    READY_STATE[i]=timeout STATE_CHANGED=1
    case ${POLICY[i]} in
        ignore)
            STATUS[i]=running
            say "service '${NAME[i]}': $what (failure_policy ignore: it keeps running)" ;;
        restart_on_failure)
            if (( RESTARTS[i] < MAX_RESTARTS[i] )); then
                say "service '${NAME[i]}': $what; stopping it for a restart"
                note_stop "$i" "$what, for a restart"
                STATUS[i]=restarting KILL_MS[i]=$((NOW_MS + STOP_GRACE_SECONDS * 1000))
                signal_steps TERM "$i"
            else
                STATUS[i]=failed
                fail_job @{readiness_exit} "service '${NAME[i]}': $what, after ${RESTARTS[i]} restarts (max_restarts ${MAX_RESTARTS[i]})"
            fi ;;
        *)
            STATUS[i]=failed
            fail_job @{readiness_exit} "service '${NAME[i]}': $what" ;;
    esac
}
"""

# Exits and failure policies: what a service's exit means for it and for the job, and how a
# service's step is stopped (signal_steps, kill_service_hard).
_EXITS_TEMPLATE = r"""
@{blocked_dependents}# Service $1 exited with code $2: apply its failure policy.
service_exited() {
    local i=$1 code=$2
    stop_probe "$i"
    PID[i]='' LAST_EXIT[i]=$code FINISHED_AT[i]=$NOW_ISO STATE_CHANGED=1
    if (( code == 0 )); then
        STATUS[i]=exited
        say "service '${NAME[i]}' exited with code 0"
        return
    fi
    # A service killed by a signal can be the first sign that Slurm ends the job (the time limit and
    # scancel signal the steps and this shell at the same moment): Slurm's record then decides.
    (( code > 128 )) && end_as_slurm_says $((code - 128))
    case ${POLICY[i]} in
        ignore)
            STATUS[i]=failed
            say "service '${NAME[i]}' exited with code $code (failure_policy ignore: the job goes on)" ;;
        restart_on_failure)
            if (( RESTARTS[i] < MAX_RESTARTS[i] )); then
                STATUS[i]=restarting DUE_MS[i]=$((NOW_MS + BACKOFF[i] * 1000))
                say "service '${NAME[i]}' exited with code $code; restart $((RESTARTS[i] + 1)) of ${MAX_RESTARTS[i]} in ${BACKOFF[i]} s"
            else
                STATUS[i]=failed
                @{blocked_call}fail_job "$code" "service '${NAME[i]}' exited with code $code after ${RESTARTS[i]} restarts (max_restarts ${MAX_RESTARTS[i]})@{blocked}"
            fi ;;
        *)
            STATUS[i]=failed
            @{blocked_call}fail_job "$code" "service '${NAME[i]}' exited with code $code@{blocked}" ;;
    esac
}

watch_service() {  # a launched service: did it exit, is it ready yet?
    local i=$1 code=0
    if ! alive "${PID[i]}"; then
        @{end_service}wait "${PID[i]}" 2>/dev/null || code=$?
        service_exited "$i" "$code"
        return
    fi
    if [[ ${READY_STATE[i]} == pending ]]; then probe "$i"; fi
}

watch_restart() {  # a service between two launches: being stopped, or in its backoff
    local i=$1 code=0
    if [[ -n ${PID[i]} ]]; then
        if alive "${PID[i]}"; then
            if (( NOW_MS >= KILL_MS[i] )); then
                kill_service_hard "$i"
                KILL_MS[i]=$((NOW_MS + 3000))
            fi
            return
        fi
        @{end_service}wait "${PID[i]}" 2>/dev/null || code=$?
        stop_probe "$i"
        PID[i]='' LAST_EXIT[i]=$code FINISHED_AT[i]=$NOW_ISO STATE_CHANGED=1
        DUE_MS[i]=$((NOW_MS + BACKOFF[i] * 1000))
        return
    fi
    if (( NOW_MS >= DUE_MS[i] )); then
        RESTARTS[i]=$((RESTARTS[i] + 1))
        launch "$i"
    fi
}

# signal_steps SIGNAL INDEX...: signal the Slurm steps of these services through scancel. srun
# itself turns a SIGTERM into a SIGKILL of its step ("forcing job termination"), so a graceful stop
# must reach the step directly. A service whose step is not found (not registered yet, or no Slurm
# tools) gets the signal on its srun instead. Fails only when no step at all was signalled.
signal_steps() {
    local signal=$1 listing line i steps=() found=()@{tasks}
    shift
    if command -v squeue >/dev/null 2>&1; then
        # "<job>.<step> hpc-compose:<token>" lines
        listing=$(squeue --steps --noheader --jobs "$SLURM_JOB_ID" --format='%i %j' 2>/dev/null)
        while [[ -n $listing ]]; do
            line=${listing%%$'\n'*}
            if [[ $listing == *$'\n'* ]]; then listing=${listing#*$'\n'}; else listing=''; fi
            for i in "$@"; do
                if [[ ${line#* } == "hpc-compose:${TOKEN[i]}" ]]; then
@{collect_step}                fi
            done
        done
    fi
    for i in "$@"; do
        if [[ -z ${found[i]:-} && -n ${PID[i]} ]]; then @{signal_fallback}; fi
    done
@{signal_tasks}    (( ${#steps[@]} > 0 )) || return 1
    scancel --quiet --signal="$signal" "${steps[@]}" 2>/dev/null
}

# SIGKILL for the service's step, which makes its srun exit; for srun itself when that was not
# possible or did not help (a killed srun can leave its step running until the job ends).
kill_service_hard() {
    if (( HARD_KILLED[$1] )); then
        @{kill_srun}
    else
        signal_steps KILL "$1"
    fi
    HARD_KILLED[$1]=1
}

check_job_end() {  # the job ends when every service marked ENDS_JOB has exited for good
    local i
    for ((i = 0; i < SERVICE_COUNT; i++)); do
        if (( ENDS_JOB[i] )); then
            case ${STATUS[i]} in
                exited|failed) ;;
                *) return ;;
            esac
        fi
    done
    finish completed 0 "$END_REASON"
}

fail_job() {  # fail_job CODE REASON
    finish failed "$1" "$2"
}
"""

# A one-shot stage that failed names the dependents it leaves waiting.
_BLOCKED_DEPENDENTS_TEMPLATE = """\
# BLOCKED: ", so 'x' and 'y' never started" for the services still waiting for service $1 to
# complete successfully (for the reason of a job that ends because $1 failed).
blocked_dependents() {
    local i=$1 k names=''
    for ((k = 0; k < SERVICE_COUNT; k++)); do
        if [[ ${STATUS[k]} == waiting && " ${DEPENDS_ON[k]} " == *" $i:service_completed_successfully "* ]]; then
            say "service '${NAME[k]}' will not start: it waits for '${NAME[i]}' to complete successfully"
            names+="${names:+, }'${NAME[k]}'"
        fi
    done
    BLOCKED=${names:+, so $names never started}
}

"""

# Teardown (finish) and the signals that end the job (on_signal). Per-feature lines are
# placeholders: metrics_stop, container and secret removal, artifact collection.
_TEARDOWN_TEMPLATE = """
# Teardown: SIGTERM to every live service, a grace period, SIGKILL; then artifacts, final state, exit.
finish() {
    local status=$1 code=$2 reason=$3 i rc running deadline killed=0@{outcome_variable} live=()
    local grace=$STOP_GRACE_SECONDS last_wait=3000  # ms between SIGKILL of the steps and of srun
    (( FINISHING )) && return 0
    FINISHING=1
    trap '' TERM INT HUP USR1 USR2
    set +e
    say "job $status (exit code $code): $reason"
    if [[ $status == cancelled || $status == timeout || ( $status == requeued && $REQUEUE_SELF == 0 ) ]]; then
        # Slurm has signalled the steps too and sends SIGKILL to everything after KillWait:
        # keep the grace period short enough to write the final state before that.
        grace=$(( (KILL_WAIT - 2) / 2 < STOP_GRACE_SECONDS ? (KILL_WAIT - 2) / 2 : STOP_GRACE_SECONDS ))
        (( grace >= 1 )) || grace=1
        last_wait=1000
    fi
@{metrics_stop}    for ((i = 0; i < SERVICE_COUNT; i++)); do
        stop_probe "$i"
        case ${STATUS[i]} in
            waiting|starting|running|ready|restarting) STATUS[i]=stopped ;;
        esac
        if [[ -n ${PID[i]} ]]; then live+=("$i"); fi
    done
    local why=''  # stops of hpc-compose's own are noted; scancel's, the time limit's, Slurm's not
    [[ $status == completed ]] && why="the job's final services ended"
    [[ $status == failed ]] && why="the job failed: $reason"
    (( REQUEUE_SELF )) && why="the job asked Slurm to requeue it"
    for i in "${live[@]}"; do [[ -z $why ]] || note_stop "$i" "$why"; done
    if (( ${#live[@]} > 0 )); then signal_steps TERM "${live[@]}"; fi
    write_state
    clock
    deadline=$((NOW_MS + grace * 1000))
    while :; do
        running=0
        for ((i = 0; i < SERVICE_COUNT; i++)); do
            if [[ -n ${PID[i]} ]] && alive "${PID[i]}"; then running=1; fi
        done
        (( running )) || break
        clock
        if (( NOW_MS >= deadline )); then
            (( killed )) && break
            killed=1 deadline=$((NOW_MS + last_wait))
            for ((i = 0; i < SERVICE_COUNT; i++)); do
                if [[ -n ${PID[i]} ]] && alive "${PID[i]}"; then
                    say "service '${NAME[i]}' did not stop within $grace s: SIGKILL"
                    kill_service_hard "$i"
                fi
            done
        fi
        read -r -t "$TICK" -u "$SLEEP_FD" _ 2>/dev/null
    done
    clock
    for ((i = 0; i < SERVICE_COUNT; i++)); do
        if [[ -n ${PID[i]} ]]; then
            # Whatever still lives now would block the wait below: srun goes, its step ends with the job.
            alive "${PID[i]}" && @{kill_last}
            @{end_service}rc=0
            wait "${PID[i]}" 2>/dev/null || rc=$?
            PID[i]='' LAST_EXIT[i]=$rc FINISHED_AT[i]=$NOW_ISO
        fi
    done
@{stop_leftovers}@{artifacts_outcome}    LOG_INDEX_MS=0
    index_logs
@{remove_containers}@{remove_secrets}@{collect_artifacts}    if [[ $status == requeued ]] && (( REQUEUE_SELF )) && ! requeue_job; then
        status=failed code=1 reason="$reason; but scontrol requeue failed: $REQUEUE_ERROR"
        say "job failed (exit code 1): scontrol requeue failed: $REQUEUE_ERROR"
    fi
    # Only now does state.json leave "running": readers may take its status as final.
    JOB_STATUS=$status JOB_EXIT=$code JOB_REASON=$reason
    write_state
    exit "$JOB_EXIT"
}

# end_as_slurm_says NUMBER: when Slurm's record of the job says that Slurm is ending it (the time
# limit, a requeue from outside, scancel), finish with that status; otherwise return.
end_as_slurm_says() {
    local number=$1 name job
    name=$(kill -l "$number" 2>/dev/null) || name=$number
    job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 0
    if [[ $job =~ JobState=TIMEOUT|Reason=TimeLimit ]]; then
        finish timeout $((128 + number)) "the job reached its time limit (SIG$name)$LAST_ATTEMPT_NOTE"
    fi
    # A requeue from outside (scontrol requeue, preemption) also arrives as SIGTERM; Slurm has
    # already counted the next attempt.
    if [[ $job =~ JobState=(PREEMPTED|REQUEUE) ]] ||
        { [[ $job =~ Restarts=([0-9]+) ]] && (( BASH_REMATCH[1] > ATTEMPT )); }; then
        finish requeued $((128 + number)) "the job was requeued by Slurm (preemption or scontrol requeue) during attempt $((ATTEMPT + 1)) (SIG$name): attempt $((ATTEMPT + 2)) resumes"
    fi
    if [[ $job =~ JobState=CANCELLED ]]; then
        finish cancelled $((128 + number)) "the job was cancelled (SIG$name)"
    fi
    return 0
}

# scancel and the time limit both arrive as SIGTERM; Slurm's record of the job tells them apart.
on_signal() {
    local name=$1 number=$2
    (( FINISHING )) && return 0
    end_as_slurm_says "$number"
    finish cancelled $((128 + number)) "the job was cancelled (SIG$name)"
}
"""

# signal_steps' collection of the steps to signal: every step through scancel, or (a job with
# apptainer services, whose indices @{patterns} matches) theirs through the task signal below.
_COLLECT_STEP_TEMPLATE = """\
                    steps+=("${line%% *}") found[i]=1
"""
_COLLECT_TASK_STEP_TEMPLATE = """\
                    case $signal:$i in
                        KILL:*) steps+=("${line%% *}") ;;
                        @{patterns}) tasks+=("${line%% *}") ;;
                        *) steps+=("${line%% *}") ;;
                    esac
                    found[i]=1
"""
# Apptainer: scancel --signal reaches every process of the step, squashfuse_ll included, and the
# service then often dies of a bus error in its own handler. The step's task process (apptainer
# itself) passes the signal on once: so it goes there, on this node (scontrol listpids); a step
# with no task here (another node) still gets scancel.
_SIGNAL_TASKS_CALL_TEMPLATE = r"""    local tasks_left=() step pid rest sent
    for step in "${tasks[@]}"; do
        sent=0
        while read -r pid _ _ rest; do
            [[ ${rest%% *} =~ ^[0-9]+$ ]] || continue
            kill -"$signal" "$pid" 2>/dev/null && sent=1
        done < <(scontrol listpids "$step" 2>/dev/null)
        (( sent )) || tasks_left+=("$step")
    done
    steps+=("${tasks_left[@]}")
    (( ${#tasks[@]} > ${#tasks_left[@]} )) && (( ${#steps[@]} == 0 )) && return 0
"""

# Teardown's line for a job with secrets; _teardown_values holds finish's other per-feature lines.
_REMOVE_SECRETS_TEMPLATE = """\
    rm -rf -- "$JOB_DIR/@{secrets_dir}"  # the services are gone: so go the secret copies
"""

# Signals the job passes on (USR1/USR2) and the requeue it may ask for (x-slurm.signal).
_FORWARD_SIGNALS_TEMPLATE = r"""
# requeue_job: the job asks Slurm to requeue it (x-slurm.signal.on_signal: requeue). Slurm then
# ends this attempt (SIGTERM, then SIGKILL after KillWait) and starts attempt N+1 later.
requeue_job() {
    local out
    out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1) && return 0
    REQUEUE_ERROR=${out//$'\n'/ }
    return 1
}

# USR1/USR2 sent to the batch shell (x-slurm.signal, scancel --batch --signal=USR1) are passed on
# to every running service that takes them (SIGNAL_TO), instead of killing the script; each one is
# recorded in state.json. The trap only queues the signal (see the event loop for why).
forward_signals() {
    local signal i to action targets sent count
    local -A by_signal
    for signal in "${PENDING_SIGNALS[@]}"; do
        by_signal=() sent='' count=0 action=forward
        for ((i = 0; i < SERVICE_COUNT; i++)); do
            [[ -n ${PID[i]} && ${SIGNAL_TO[i]} != - ]] || continue
            to=${SIGNAL_TO[i]:-$signal}
            by_signal[$to]+=" $i"
            json_string "${NAME[i]}"
            sent+="${sent:+, }{\"service\": $JSON, \"signal\": \"$to\"}"
            count=$((count + 1))
        done
        say "forwarding SIG$signal to $count running service(s)"
        for to in "${!by_signal[@]}"; do
            read -r -a targets <<<"${by_signal[$to]}"
            signal_steps "$to" "${targets[@]}"
        done
        if [[ $ON_SIGNAL == requeue && $signal == "$JOB_SIGNAL" && -z $LAST_ATTEMPT_NOTE ]]; then
            action=requeue
            if (( ATTEMPT + 1 >= MAX_ATTEMPTS )); then
                action=last_attempt
                LAST_ATTEMPT_NOTE=" on attempt $((ATTEMPT + 1)), the last one x-slurm.signal.max_attempts ($MAX_ATTEMPTS) allows: not requeued"
                say "not requeueing: attempt $((ATTEMPT + 1)) is the last of $MAX_ATTEMPTS (x-slurm.signal.max_attempts)"
            fi
        fi
        clock
        SIGNALS_JSON+="${SIGNALS_JSON:+, }{\"signal\": \"$signal\", \"received_at\": \"$NOW_ISO\", \"action\": \"$action\", \"forwarded_to\": [$sent]}"
        STATE_CHANGED=1
        if [[ $action == requeue ]]; then requeue_after_signal "$signal"; fi
    done
    PENDING_SIGNALS=()
}

# on_signal: requeue. The services had the signal; give them REQUEUE_GRACE seconds to save and exit,
# then tear down and requeue. A SIGTERM meanwhile (scancel, the time limit) wins.
requeue_after_signal() {
    local signal=$1 i rc running deadline
    write_state
    say "requeue: the services have $REQUEUE_GRACE s to exit after SIG$signal, then the job requeues itself"
    clock
    deadline=$((NOW_MS + REQUEUE_GRACE * 1000))
    while [[ -z $STOP_SIGNAL ]] && (( NOW_MS < deadline )); do
        running=0
        for ((i = 0; i < SERVICE_COUNT; i++)); do
            [[ -n ${PID[i]} ]] || continue
            if alive "${PID[i]}"; then running=1; continue; fi
            rc=0
            wait "${PID[i]}" 2>/dev/null || rc=$?
            stop_probe "$i"
            PID[i]='' LAST_EXIT[i]=$rc FINISHED_AT[i]=$NOW_ISO STATUS[i]=exited
            (( rc == 0 )) || STATUS[i]=failed
            say "service '${NAME[i]}' exited with code $rc after SIG$signal"
            write_state
        done
        (( running )) || break
        read -r -t "$TICK" -u "$SLEEP_FD" _
        clock
    done
    [[ -z $STOP_SIGNAL ]] || return 0
    REQUEUE_SELF=1
    finish requeued 0 "the job requeued itself after SIG$signal (x-slurm.signal.on_signal: requeue): attempt $((ATTEMPT + 1)) ended, attempt $((ATTEMPT + 2)) resumes from x-slurm.resume"
}
"""

# The EXIT trap: an end without finish() still tears down.
_ON_EXIT_TEMPLATE = """
on_exit() {  # the script ended without finish(): a setup line or the script itself failed
    local code=$?
    (( FINISHING )) && exit "$code"
    (( code != 0 )) || code=1
    finish failed "$code" "the batch script stopped unexpectedly (exit code $code) before the services finished; see the Slurm batch log"
}
"""

# --- templates: log index, container keeper, extras banner ----------------------------------------

_LOG_INDEX_TEMPLATE = """
# Log timing index, read by `hpc-compose logs` to interleave services in write order and for
# --timestamps and --since: at most once a second, every log whose size changed gets one
# "<epoch ms> <size>" line appended to logs/<token>@{suffix}. One stat call covers all logs.
LOG_INDEX_MS=0 INDEXED_SIZE=()
index_logs() {
    local i n paths=() which=() sizes=()
    (( NOW_MS - LOG_INDEX_MS >= 1000 )) || return 0
    LOG_INDEX_MS=$NOW_MS
    for ((i = 0; i < SERVICE_COUNT; i++)); do
        if [[ -e $LOG_DIR/${TOKEN[i]}.log ]]; then
            paths+=("$LOG_DIR/${TOKEN[i]}.log") which+=("$i")
        fi
    done
    (( ${#paths[@]} > 0 )) || return 0
    mapfile -t sizes < <(stat -c %s -- "${paths[@]}" 2>/dev/null)
    (( ${#sizes[@]} == ${#paths[@]} )) || return 0
    for ((n = 0; n < ${#paths[@]}; n++)); do
        i=${which[n]}
        if [[ ${sizes[n]} != "${INDEXED_SIZE[i]:-0}" ]]; then
            INDEXED_SIZE[i]=${sizes[n]}
            printf '%s %s\n' "$NOW_MS" "${sizes[n]}" >>"$LOG_DIR/${TOKEN[i]}@{suffix}"
        fi
    done
}
"""

_CONTAINER_KEEPER_TEMPLATE = r"""
# The services' named containers (--container-name, joined by `hpc-compose exec`) outlive the job
# under Pyxis's default container_scope=global. One keeper task per node, started before the first
# service (a cancelled job can start no step any more), removes this job's containers on its node
# when teardown asks (the stop file) or when Slurm signals the step (scancel, the time limit).
KEEPER_STOP="$RUN_DIR/containers.stop" KEEPER_PID=''
start_container_keeper() {
@{local_start}    rm -f -- "$KEEPER_STOP"
    # shellcheck disable=SC2016  # the script is expanded by the keeper's shell, on its node
    srun --overlap --nodes="$HPC_COMPOSE_NODE_COUNT" --ntasks="$HPC_COMPOSE_NODE_COUNT" \
        --ntasks-per-node=1 --kill-on-bad-exit=0 --job-name=hpc-compose-keeper /bin/sh -c '
        prefix=$1 job=$2 stop=$3
        remove() {
            trap "" TERM INT HUP
            n=0  # give the services, signalled at the same time, up to 10 s to stop
            while [ $n -lt 20 ] && enroot list -f 2>/dev/null | awk -v a="pyxis_$prefix" -v b="pyxis_${job}_$prefix" \
                    "NR > 1 && (index(\$1, a) == 1 || index(\$1, b) == 1) && \$2 ~ /^[0-9]+\$/ {found = 1}
                     END {exit !found}"; do
                sleep 0.5
                n=$((n + 1))
            done
            enroot list 2>/dev/null | while read -r name; do
                case $name in
                    pyxis_"$prefix"*|pyxis_"$job"_"$prefix"*) enroot remove -f "$name" >/dev/null 2>&1 ;;
                esac
            done
            exit 0
        }
        trap remove TERM INT HUP
        while [ ! -e "$stop" ]; do sleep 1; done
        remove' sh @{prefix}"${SLURM_JOB_ID}_" "$SLURM_JOB_ID" "$KEEPER_STOP" \
        >/dev/null 2>&1 </dev/null &
    KEEPER_PID=$!
}

stop_container_keeper() {  # ask the keepers to remove the containers, and wait up to 60 s
    local waited=0
@{local_stop}    [[ -n $KEEPER_PID ]] || return 0
    : >"$KEEPER_STOP"
    while alive "$KEEPER_PID" && (( waited < 600 )); do
        read -r -t 0.1 -u "$SLEEP_FD" _ 2>/dev/null
        waited=$((waited + 1))
    done
    if alive "$KEEPER_PID"; then
        say "the named containers of job $SLURM_JOB_ID may be left on some node (enroot list shows them)"
        kill -KILL "$KEEPER_PID" 2>/dev/null
    fi
    wait "$KEEPER_PID" 2>/dev/null
    rm -f -- "$KEEPER_STOP"
    KEEPER_PID=''
}
"""

# The keeper's lines for `up --local` outside Slurm (render_script(..., local=True)).
_KEEPER_LOCAL_START_TEMPLATE = """\
    [[ $LAUNCHER == srun ]] || return 0  # up --local outside Slurm: teardown removes them itself
"""
_KEEPER_LOCAL_STOP_TEMPLATE = """\
    [[ $LAUNCHER == srun ]] || { remove_local_containers; return 0; }
"""

# Above the metrics and artifacts blocks when the job uses one (_render_extras).
_EXTRAS_BANNER_TEMPLATE = """
# ---------------------------------------------------------------------------
# @{title}
# ---------------------------------------------------------------------------
"""

# --- templates: traps, per-job setup, launcher, allocation, event loop ----------------------------

_SIGNALS_TEMPLATE = """
# ---------------------------------------------------------------------------
# Traps: scancel, the time limit and any unexpected exit all end in teardown
# ---------------------------------------------------------------------------
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal HUP 1' HUP
trap 'PENDING_SIGNALS+=(USR1)' USR1
trap 'PENDING_SIGNALS+=(USR2)' USR2
trap on_exit EXIT
write_state
"""

_RESUME_TEMPLATE = """
# Resume (x-slurm.resume): this attempt writes under attempts/<n>/; the top-level names point at it.
RESUME_DIR=@{resume_path}
IS_RESUME=0
mkdir -p "$RESUME_DIR/_hpc-compose"
if (( ATTEMPT > 0 )) || [[ -e $RESUME_DIR/_hpc-compose/latest.json ]]; then
    IS_RESUME=1
fi
for name in logs metrics artifacts allocation state.json timeline.jsonl; do
    if [[ -L $JOB_DIR/$name || ! -e $JOB_DIR/$name ]]; then
        ln -sfn "attempts/$ATTEMPT/$name" "$JOB_DIR/$name"
    else
        echo "hpc-compose: warning: $JOB_DIR/$name is not a symlink; left as it is" >&2
    fi
done
export HPC_COMPOSE_RESUME_DIR="$RESUME_DIR" HPC_COMPOSE_ATTEMPT="$ATTEMPT" HPC_COMPOSE_IS_RESUME="$IS_RESUME"
"""

_ARRAY_TEMPLATE = """
# Job array (x-slurm.array): every task runs the whole stack; services see which task they are.
export HPC_COMPOSE_ARRAY_JOB_ID="$SLURM_ARRAY_JOB_ID" HPC_COMPOSE_ARRAY_TASK_ID="$SLURM_ARRAY_TASK_ID"
"""


_SWEEP_TEMPLATE = """
# ---------------------------------------------------------------------------
# Sweep (x-sweep): the parameter table, one row per array task, and this task's row exported
# ---------------------------------------------------------------------------
@{columns}SWEEP_REPLICATE=(@{replicates})
# The row as JSON: the task's params.json
SWEEP_JSON=(
@{rows})
SWEEP_TASK="$SLURM_ARRAY_TASK_ID"
if [[ -z ${SWEEP_JSON[SWEEP_TASK]+set} ]]; then
    echo "hpc-compose: array task $SWEEP_TASK is not in this sweep's table (@{count} tasks)" >&2
    exit 1
fi
export HPC_COMPOSE_SWEEP_INDEX="$SWEEP_TASK" HPC_COMPOSE_REPLICATE="${SWEEP_REPLICATE[SWEEP_TASK]}"
@{exports}printf '%s\\n' "${SWEEP_JSON[SWEEP_TASK]}" > "$JOB_DIR/@{params_file}"
"""

_SWEEP_COLUMN_TEMPLATE = """\
# @{name}
SWEEP_PARAM_@{column}=(@{values})
"""

_SWEEP_EXPORT_TEMPLATE = """\
export @{variable}="${SWEEP_PARAM_@{column}[SWEEP_TASK]}"
"""


_SECRETS_TEMPLATE = """
# ---------------------------------------------------------------------------
# Secrets: 'hpc-compose submit' wrote owner-only copies (0600 files, 0700 directories) to
# $JOB_DIR/@{secrets_dir}/<service token>/ before releasing the job; teardown removes them.
# ---------------------------------------------------------------------------
for token in @{tokens}; do
    if [[ ! -d $JOB_DIR/@{secrets_dir}/$token ]]; then
        echo "hpc-compose: the secret copies of this job are missing ($JOB_DIR/@{secrets_dir}/$token): 'hpc-compose submit' writes them, plain sbatch does not (a requeued job finds them removed)" >&2
        exit 1
    fi
done
"""


_PYXIS_PATH_CHECK_TEMPLATE = """
# --container-mounts separates mounts with ',' and fields with ':', so the job directory cannot hold them.
if [[ $JOB_DIR == *[,:]* ]]; then
    echo "hpc-compose: the job directory $JOB_DIR contains ',' or ':', which Pyxis cannot mount; submit from another directory" >&2
    exit 1
fi
"""


_SRUN_LAUNCHER_TEMPLATE = """
# ---------------------------------------------------------------------------
# Launcher: every service is an srun step of this job (sbatch, or `hpc-compose up --local` inside
# an allocation).
# ---------------------------------------------------------------------------
SRUN=$(command -v srun) || { echo "hpc-compose: srun is not on PATH on $(hostname)" >&2; exit 1; }
LAUNCH=("$SRUN")
"""

# Only in the script of `up --local` outside Slurm (render_script(..., local=True)).
_LOCAL_LAUNCHER_TEMPLATE = r"""
# ---------------------------------------------------------------------------
# Launcher: every service is an srun step of this job (sbatch, or `hpc-compose up --local` inside
# an allocation), except in `hpc-compose up --local` outside Slurm (@{launcher_variable}=local),
# where local_step does on this machine what srun and Pyxis would do.
# ---------------------------------------------------------------------------
LAUNCHER=${@{launcher_variable}:-srun}
unset -v @{launcher_variable}

# local_step DIR SRUN-OPTION... COMMAND...: one service on this machine. Scheduling options
# (--nodes, --ntasks, --gres, x-slurm srun_args...) mean nothing on one machine and are skipped;
# the Pyxis options become `enroot create` (once) and `enroot start` of the same image, named
# pyxis_<--container-name> as Pyxis names it, with the same mounts (x-create=auto,rbind + flags),
# the --container-env variables (--env) and the run's marker, --container-workdir, and Pyxis's
# entrypoint rule (without the entrypoint, /etc/rc.local becomes `exec "$@"`). DIR holds the
# enroot configuration files.
local_step() {
    local dir=$1 image='' mounts='' workdir='' variables='' name='' entrypoint=0 chdir=''
    local item source target flags conf quoted list=() args=() lines=()
    shift
    while (( $# > 0 )); do
        case $1 in
            --container-image=*) image=${1#*=} ;;
            --container-mounts=*) mounts=${1#*=} ;;
            --container-workdir=*) workdir=${1#*=} ;;
            --container-env=*) variables=${1#*=} ;;
            --container-name=*) name=${1#*=} ;;
            --container-entrypoint) entrypoint=1 ;;
            --no-container-entrypoint) entrypoint=0 ;;
            --chdir=*) chdir=${1#*=} ;;
            -*) ;;
            *) break ;;
        esac
        shift
    done
    # The services see no Slurm job: there is none.
    unset -v SLURM_JOB_ID SLURM_SUBMIT_DIR
    unset -f local_step
    if [[ -z $image ]]; then
        if [[ -n $chdir ]]; then cd -- "$chdir" || exit 1; fi
        exec "$@"
    fi
    IFS=, read -r -a list <<<"$mounts"
    for item in "${list[@]}"; do
        IFS=: read -r source target flags <<<"$item"
        args+=(--mount "$source:$target:none:x-create=auto,rbind${flags:+,${flags//+/,}}")
    done
    IFS=, read -r -a list <<<"$variables"
    for item in "${list[@]}"; do args+=(--env "$item"); done
    args+=(--env @{run_variable})
    # Pyxis runs the command in --container-workdir, else where the image's /etc/rc went (its
    # WORKDIR); without the entrypoint, its /etc/rc.local is `exec "$@"`. Here /etc/rc.local does
    # both, and an image without /etc/rc (not made by enroot import) gets one that sources it.
    if [[ -n $workdir ]]; then
        quoted=${workdir//\'/\'\\\'\'}
        lines+=("cd -- '$quoted' || exit 1")
    fi
    # shellcheck disable=SC2016  # "$@" is expanded by /etc/rc in the container
    (( entrypoint )) || lines+=('exec "$@"')
    if (( ${#lines[@]} > 0 )); then
        conf="$dir/$name.conf"
        {
            cat <<'CONF'
hooks() {
    [ -e "${ENROOT_ROOTFS}/etc/rc" ] || printf '%s\n' '. /etc/rc.local' 'exec "$@"' >"${ENROOT_ROOTFS}/etc/rc"
CONF
            # shellcheck disable=SC2016  # ENROOT_ROOTFS is expanded by enroot, which sources this
            printf '    printf "%%s\\n" %s>"${ENROOT_ROOTFS}/etc/rc.local"\n}\n' "$(printf '%q ' "${lines[@]}")"
        } >"$conf" || exit 1
        args=(--conf "$conf" "${args[@]}")
    fi
    if ! enroot list 2>/dev/null | grep -qxF -- "pyxis_$name"; then
        # Its unsquashfs progress would fill the service log; its errors go there.
        if ! item=$(enroot create --name "pyxis_$name" "$image" 2>&1); then
            printf 'hpc-compose: enroot create of %s failed:\n%s\n' "$image" "$item" >&2
            exit 1
        fi
    fi
    exec enroot start "${args[@]}" "pyxis_$name" "$@"
}

# Teardown outside Slurm: this job's enroot containers go (its services have stopped by now).
remove_local_containers() {
    local name
    while read -r name; do
        case $name in
            pyxis_@{prefix}"$SLURM_JOB_ID"_*)
                enroot remove -f "$name" >/dev/null 2>&1 ||
                    say "could not remove the container $name (enroot list shows it)" ;;
        esac
    done < <(enroot list 2>/dev/null)
}

# signal_service SIGNAL INDEX (the local script's signal_steps and teardown stop a service with it):
# the service's srun; outside Slurm, every process of the session the service started in
# (local_step), as a signal to a step reaches every process of it.
signal_service() {
    if [[ $LAUNCHER == srun ]]; then
        kill -"$1" "${PID[$2]}" 2>/dev/null
    else
        kill -"$1" -- "-${PID[$2]}" 2>/dev/null
    fi
}

# end_service INDEX: its first process has ended (not reaped yet, so its pid cannot be reused).
# Outside Slurm, what it leaves goes too, as slurmstepd ends what is left of a step: its session's
# processes, and any process of the run that is the service's (a daemon with a session of its own).
end_service() {
    [[ $LAUNCHER == srun ]] && return 0
    kill -KILL -- "-${PID[$1]}" 2>/dev/null
    stop_leftovers "${NAME[$1]}"
}

# stop_leftovers [SERVICE]: outside Slurm no slurmstepd ends what a service leaves behind (a child
# of a stopped shell, a daemon with a session of its own). Every process of the run carries the
# marker @{run_variable} (up --local sets it, local_step passes it into the containers):
# each one whose environment has it, and HPC_COMPOSE_SERVICE=SERVICE when given, gets SIGKILL;
# this script aside.
stop_leftovers() {
    local file pid marker="@{run_variable}=$@{run_variable}" files=()
    mapfile -t files < <(grep -lsxzF -e "$marker" /proc/[0-9]*/environ)
    if [[ -n ${1:-} ]] && (( ${#files[@]} > 0 )); then
        mapfile -t files < <(grep -lsxzF -e "HPC_COMPOSE_SERVICE=$1" -- "${files[@]}")
    fi
    for file in "${files[@]}"; do
        pid=${file#/proc/}
        pid=${pid%/environ}
        (( pid == $$ )) || kill -KILL "$pid" 2>/dev/null
    done
}

if [[ $LAUNCHER == local ]]; then
    if ! command -v setsid >/dev/null 2>&1; then
        echo "hpc-compose: setsid (util-linux) is not on PATH on $(hostname)" >&2
        exit 1
    fi
    export @{run_variable}="${@{run_variable}:-$JOB_DIR}"
    mkdir -p "$RUN_DIR/local"
    export -f local_step
    # Every service starts in a session of its own, so that stopping it reaches every process it
    # started. (setsid keeps the pid: a background job of this script leads no process group.)
    LAUNCH=(setsid "$BASH" -c 'local_step "$@"' hpc-compose-local "$RUN_DIR/local")
else
    SRUN=$(command -v srun) || { echo "hpc-compose: srun is not on PATH on $(hostname)" >&2; exit 1; }
    LAUNCH=("$SRUN")
fi
"""


_ALLOCATION_TEMPLATE = """
# ---------------------------------------------------------------------------
# Allocation metadata (every job, single-node included)
# ---------------------------------------------------------------------------
# Slurm's KillWait: how long teardown has after scancel or the time limit before SIGKILL.
KILL_WAIT=$(scontrol show config 2>/dev/null | sed -n 's/^KillWait *= *//p') || true
KILL_WAIT=${KILL_WAIT%% *}
[[ $KILL_WAIT =~ ^[0-9]+$ ]] || KILL_WAIT=30
allocation_nodes=()
if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null 2>&1; then
    mapfile -t allocation_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
if (( ${#allocation_nodes[@]} == 0 )); then
    if (( EXPECTED_NODES > 1 )); then
        echo "hpc-compose: cannot expand SLURM_JOB_NODELIST (needs scontrol) in a multi-node job" >&2
        exit 1
    fi
    allocation_nodes=("${SLURMD_NODENAME:-${HOSTNAME:-$(hostname)}}")
fi
printf '%s\\n' "${allocation_nodes[@]}" >"$RUN_DIR/allocation/nodes.txt"
printf '%s\\n' "${allocation_nodes[0]}" >"$RUN_DIR/allocation/primary_node"
export HPC_COMPOSE_JOB_DIR="$JOB_DIR"
export HPC_COMPOSE_PRIMARY_NODE="${allocation_nodes[0]}"
export HPC_COMPOSE_NODE_COUNT="${#allocation_nodes[@]}"
export HPC_COMPOSE_NODELIST="${allocation_nodes[*]}"
export HPC_COMPOSE_NODELIST_FILE="$JOB_DIR/allocation/nodes.txt"
"""


_RESUME_LATEST_TEMPLATE = """
# The resume directory remembers which job and attempt wrote it last.
json_string @{compose_name}
printf '{"schema_version": @{schema_version}, "compose_name": %s, "job_id": "%s", "attempt": %s, "updated_at": "%s"}\\n' \\
    "$JSON" "$SLURM_JOB_ID" "$ATTEMPT" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \\
    >"$RESUME_DIR/_hpc-compose/latest.json.tmp"
mv -f "$RESUME_DIR/_hpc-compose/latest.json.tmp" "$RESUME_DIR/_hpc-compose/latest.json"
"""


_SETUP_TEMPLATE = """
# ---------------------------------------------------------------------------
# x-slurm.setup (verbatim, under set -euo pipefail)
# ---------------------------------------------------------------------------
@{lines}
"""

_CURL_CHECK_TEMPLATE = """\
command -v curl >/dev/null 2>&1 ||
    echo "hpc-compose: warning: curl is not on PATH on $(hostname); http readiness cannot succeed" >&2
"""


_MAIN_LOOP_TEMPLATE = """
# ---------------------------------------------------------------------------
# The event loop: launch what is ready to start, watch what runs, probe readiness, restart, end
# ---------------------------------------------------------------------------
@{before_loop}set +e  # from here on every failure is handled explicitly; an unexpected exit still tears down
# Inside the loop a trap only takes note of the signal: bash runs trap handlers from within
# `read -t`, and when the read's timeout expires meanwhile it abandons the handler half-way. The loop
# acts on the note at the start of its next turn, a fraction of a second later.
STOP_SIGNAL=''
trap 'STOP_SIGNAL="TERM 15"' TERM
trap 'STOP_SIGNAL="INT 2"' INT
trap 'STOP_SIGNAL="HUP 1"' HUP
say "supervising @{count} service(s) in job $SLURM_JOB_ID (state: $STATE_FILE)"
while :; do
    [[ -z $STOP_SIGNAL ]] || on_signal "${STOP_SIGNAL% *}" "${STOP_SIGNAL#* }"
    clock
    for ((i = 0; i < SERVICE_COUNT; i++)); do
        case ${STATUS[i]} in
            waiting) try_start "$i" ;;
            starting|running|ready) watch_service "$i" ;;
            restarting) watch_restart "$i" ;;
        esac
    done
    (( ${#PENDING_SIGNALS[@]} == 0 )) || forward_signals
    check_job_end
    index_logs
    (( STATE_CHANGED )) && write_state
    sleep_until_due
done
"""

# --- pieces: words, #SBATCH lines, service tables, run_service_<i> --------------------------------

class _ShellVariable(NamedTuple):
    """A bash variable expanded at run time inside one word of the script."""
    name: str


def _shell_word(*parts):
    """One shell word from literal strings and ``_ShellVariable`` parts, literals quoted by shell_quote."""
    if not any(isinstance(part, _ShellVariable) or part for part in parts):
        return "''"
    text = ""
    for part in parts:
        if isinstance(part, _ShellVariable):
            text += '"${%s}"' % part.name
        elif part:
            text += shell_quote(part)
    return text


def _shown_word(*parts):
    """The same word as ``_word`` shows it in an argv: variables left as ``${NAME}``."""
    return "".join("${%s}" % part.name if isinstance(part, _ShellVariable) else part for part in parts)


def _single_line(value, what):
    value = str(value)
    if "\n" in value or "\r" in value:
        raise HpcComposeError("%s contains a line break, which cannot go into an #SBATCH line: %r"
                              % (what, value))
    return value


# x-slurm fields rendered as --field-name=VALUE after the resources, in this order
_SBATCH_TEXT_OPTIONS = ("constraint", "output", "error", "chdir", "mem_per_cpu", "mem_per_gpu",
                        "gpus_per_node", "gpus_per_task", "cpus_per_gpu", "reservation",
                        "licenses", "nodelist", "exclude", "begin", "mail_type", "mail_user")


def _render_sbatch_lines(plan):
    slurm = plan.slurm
    lines = ["--job-name=" + shell_quote(_single_line(plan.job_name, "the job name")),
             "--nodes=" + shell_quote(plan.nodes or 1)]
    fields = (("ntasks", "--ntasks"), ("ntasks_per_node", "--ntasks-per-node"),
              ("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
              ("time", "--time"), ("cpus_per_task", "--cpus-per-task"), ("mem", "--mem"))
    for field, flag in fields:
        value = getattr(slurm, field)
        if value is not None:
            lines.append(flag + "=" + shell_quote(_single_line(value, "x-slurm." + field)))
    if slurm.gres is not None:
        lines.append("--gres=" + shell_quote(_single_line(slurm.gres, "x-slurm.gres")))
    elif slurm.gpus is not None:
        lines.append("--gpus=" + shell_quote(_single_line(slurm.gpus, "x-slurm.gpus")))
    for field in _SBATCH_TEXT_OPTIONS:
        value = getattr(slurm, field)
        if value is not None:
            lines.append("--%s=%s" % (field.replace("_", "-"),
                                      shell_quote(_single_line(value, "x-slurm." + field))))
    if slurm.exclusive is True:
        lines.append("--exclusive")
    elif slurm.exclusive:
        lines.append("--exclusive=" + shell_quote(slurm.exclusive))
    lines.extend(_render_job_pattern_sbatch_lines(slurm))
    for arg in slurm.submit_args:
        lines.append(_single_line(arg, "x-slurm.submit_args entry"))
    return ["#SBATCH " + line for line in lines]


def _render_job_pattern_sbatch_lines(slurm):
    """``--array``, ``--dependency``, ``--signal``, ``--requeue`` from their x-slurm fields."""
    lines = []
    if slurm.array is not None:
        lines.append("--array=" + shell_quote(_single_line(slurm.array, "x-slurm.array")))
    if slurm.dependency is not None:
        lines.append("--dependency=" + shell_quote(_single_line(slurm.dependency,
                                                                "x-slurm.dependency")))
    signal = slurm.signal
    if signal is not None:
        lines.append("--signal=" + shell_quote("B:%s@%d" % (signal.name, signal.before)))
    requeue = slurm.requeue
    if requeue is None and signal is not None and signal.on_signal == "requeue":
        requeue = True
    if requeue is not None:
        lines.append("--requeue" if requeue else "--no-requeue")
    if requeue:
        # Every attempt appends to the batch log, so the log tells the whole story of the job.
        lines.append("--open-mode=append")
    return lines


def _render_signal_table(plan):
    """The bash lines of _SIGNAL_TABLE_TEMPLATE: the job's signal policy and SIGNAL_TO per service."""
    signal = plan.slurm.signal or SignalSpec("USR1", 0)
    by_name = dict((s.name, s) for s in plan.spec.services)
    targets = []
    for index, service in enumerate(plan.services):
        wanted = by_name[service.name].slurm.signal if service.name in by_name else None
        target = ""
        if wanted is not None:
            target = wanted.name or "" if wanted.forward else "-"
        targets.append("SIGNAL_TO[%d]=%s" % (index, shell_quote(target)))
    return _fill(_SIGNAL_TABLE_TEMPLATE, on_signal=shell_quote(signal.on_signal),
                 job_signal=shell_quote(signal.name), grace=shell_quote(int(signal.grace or 0)),
                 max_attempts=shell_quote(int(signal.max_attempts or 0)),
                 signal_to=" ".join(targets))


def _job_ending_services(plan):
    """Names of the services whose exit ends the job: no dependents, failure policy not ignore."""
    ending = [s.name for s in plan.services
              if not s.dependents and s.failure_policy.mode != "ignore"]
    return ending or [s.name for s in plan.services]


def _container_argv(service, image=None):
    """The argv after the srun options (after the apptainer options for an apptainer service):
    shell form, exec form, or nothing (image default). ``image`` is the service's ServiceImage."""
    execution = service.execution
    if service.runtime in _APPTAINER_RUNTIMES:
        return _apptainer_argv(service, image)
    if execution.form == "shell":
        return ["/bin/sh", "-c", execution.script]
    if execution.form == "exec":
        if service.runtime == "host" or execution.use_image_entrypoint:
            # The image ENTRYPOINT must see the command itself as its arguments (Compose rule).
            return list(execution.argv)
        # srun resolves a bare program name on the host (Pyxis lesson): let /bin/sh in the image do it.
        return ["/bin/sh", "-c", 'exec "$@"', "hpc-compose"] + list(execution.argv)
    if service.runtime == "host":
        raise HpcComposeError("service '%s' uses the host runtime but has neither command nor "
                              "entrypoint" % service.name)
    # srun needs a command, so the image default is run the way enroot start does: /etc/rc (made
    # by enroot import) changes to the image's WORKDIR and execs its ENTRYPOINT + CMD.
    return ["/bin/sh", "/etc/rc"]


def _runs_image_default(service, image):
    """True when an apptainer service starts with ``apptainer run``: a .sif's runscript applies the
    image's ENTRYPOINT and CMD by Compose's rules (`apptainer exec` would bypass both)."""
    execution = service.execution
    return (image.container_image.endswith(_SIF_SUFFIX)
            and (execution.form == "default" or execution.use_image_entrypoint))


def _apptainer_argv(service, image):
    """The words after the image for an apptainer service."""
    execution = service.execution
    words = []
    if not image.container_image.endswith(_SIF_SUFFIX) and \
            (execution.form == "default" or execution.use_image_entrypoint):
        # A SquashFS image has no runscript. One made by enroot import has /etc/rc, which changes
        # to the image's WORKDIR and execs ENTRYPOINT with the arguments (CMD without), as under
        # Pyxis; any other has no entrypoint to apply: the arguments run as they are.
        words = ["/bin/sh", "-c", '[ -e /etc/rc ] && exec /bin/sh /etc/rc "$@"; exec "$@"',
                 "hpc-compose"]
    if execution.form == "shell":
        return words + ["/bin/sh", "-c", execution.script]
    # `apptainer exec` resolves a bare program name in the container: no /bin/sh in between.
    return words + list(execution.argv)


# The step's first command for an apptainer service: --cleanenv keeps the submitting shell out of
# the container, so Slurm's task variables (SLURM_PROCID... set per task on the node), the job's
# HPC_COMPOSE_* and the GPU visibility Slurm chose pass in explicitly, unless the service's step
# environment already sets them. $1 is the APPTAINERENV_ (or SINGULARITYENV_) prefix.
_APPTAINER_STEP_WRAPPER = ('prefix=$1; shift; for name in "${!SLURM@}" "${!HPC_COMPOSE_@}" '
                           'CUDA_VISIBLE_DEVICES ROCR_VISIBLE_DEVICES; do variable=$prefix$name; '
                           '[[ -v $name && ! -v $variable ]] && export "$variable=${!name}"; done; '
                           'exec "$@"')


def _apptainer_env_prefix(runtime):
    """APPTAINERENV_ (apptainer) or SINGULARITYENV_ (singularity): the names it passes in."""
    return "SINGULARITYENV_" if runtime == "singularity" else "APPTAINERENV_"


def _apptainer_lines(runtime_plan, index):
    """The words of an apptainer service after the srun options, up to and with the image, in the
    groups the script writes one per line.

    The defaults, each for a reason: --cleanenv (the service sees its image's environment, its own
    and the job's, not the submitting shell's), --no-eval (values reach it byte for byte: Apptainer
    would otherwise run `...` and $(...) in them), --contain (no home, /tmp or current directory
    from the node: only what volumes bind, as under Pyxis), --writable-tmpfs (the image's file
    system is writable in memory, as a Pyxis container's is), --nv when the service asks for
    GPUs. No --pid or --ipc: signals reach the payload directly, and Slurm tracks its processes.
    """
    service = runtime_plan.plan.services[index]
    image = runtime_plan.images[index]
    action = "run" if _runs_image_default(service, image) else "exec"
    command = [(service.runtime,), ("--quiet",), (action,), ("--cleanenv",), ("--no-eval",),
               ("--contain",), ("--writable-tmpfs",)]
    if service.gpus or (service.gres is not None and "gpu" in service.gres):
        command.append(("--nv",))
    lines = [[("bash",), ("-c",), (_APPTAINER_STEP_WRAPPER,), ("hpc-compose-apptainer",),
              (_apptainer_env_prefix(service.runtime),)], command,
             [("--bind",), (_ShellVariable("JOB_DIR"), ":" + _JOB_MOUNT)]]
    resume = runtime_plan.plan.slurm.resume
    if resume is not None:
        lines.append([("--bind",), (resume.path + ":" + _RESUME_MOUNT,)])
    if service.secrets:
        lines.append([("--bind",), (_ShellVariable("JOB_DIR"), "/%s/%s:%s:ro" % (
            _SECRETS_DIR_NAME, service.token, _SECRETS_MOUNT))])
    for mount in service.mounts:
        lines.append([("--bind",), (_mount_text(mount),)])
    if service.working_dir:
        lines.append([("--pwd",), (service.working_dir,)])
    lines.append([(image.container_image,)])
    return lines


def _env_names(runtime_plan, service):
    names = ["HPC_COMPOSE_JOB_DIR", "HPC_COMPOSE_NODELIST", "HPC_COMPOSE_NODELIST_FILE",
             "HPC_COMPOSE_NODE_COUNT", "HPC_COMPOSE_PRIMARY_NODE", "HPC_COMPOSE_SERVICE"]
    if runtime_plan.plan.slurm.resume is not None:
        names += ["HPC_COMPOSE_ATTEMPT", "HPC_COMPOSE_IS_RESUME", "HPC_COMPOSE_RESUME_DIR"]
    if service.secrets:
        names.append(_SECRETS_DIR_VARIABLE)
    return sorted(set(names) | set(key for key, _ in service.environment))


def _environment_parts(runtime_plan, index):
    """``[(name, parts)]`` the service's step gets on top of the batch environment, in order."""
    service = runtime_plan.plan.services[index]
    items = [(key, (str(value),)) for key, value in service.environment]
    tool = [("HPC_COMPOSE_SERVICE", (service.name,))]
    if service.runtime == "host":
        tool += [("HPC_COMPOSE_JOB_DIR", (_ShellVariable("JOB_DIR"),)),
                 ("HPC_COMPOSE_NODELIST_FILE", (_ShellVariable("JOB_DIR"), "/allocation/nodes.txt"))]
    else:
        tool += [("HPC_COMPOSE_JOB_DIR", (_JOB_MOUNT,)),
                 ("HPC_COMPOSE_NODELIST_FILE", (_JOB_MOUNT + "/allocation/nodes.txt",))]
        if runtime_plan.plan.slurm.resume is not None:
            tool.append(("HPC_COMPOSE_RESUME_DIR", (_RESUME_MOUNT,)))
    if service.secrets:
        tool.append((_SECRETS_DIR_VARIABLE, _secrets_location(service)))
    # The tool's own names come last so that they win over a spec value of the same name.
    if service.runtime in _APPTAINER_RUNTIMES:
        # Apptainer passes these into the container, unevaluated (--no-eval), without the prefix.
        prefix = _apptainer_env_prefix(service.runtime)
        return [(prefix + key, parts) for key, parts in items + tool]
    return items + tool


def _secrets_location(service):
    """Where service's secrets are, as word parts: /run/secrets in a container, the copy on the host."""
    if service.runtime == "host":
        return (_ShellVariable("JOB_DIR"), "/%s/%s" % (_SECRETS_DIR_NAME, service.token))
    return (_SECRETS_MOUNT,)


def service_environment(runtime_plan, index):
    """``[(name, value)]`` set by ``env`` for service ``index``'s step (``${VAR}`` = run time)."""
    return [(key, _shown_word(*parts)) for key, parts in _environment_parts(runtime_plan, index)]


def _check_mount_paths(service):
    """Pyxis and Apptainer both split mounts at ',' and fields at ':'."""
    for mount in service.mounts:
        for path in (mount.host, mount.container):
            if "," in path or ":" in path:
                raise HpcComposeError("volume path %r of service '%s' contains ',' or ':', which "
                                      "%s cannot mount" % (path, service.name,
                                                           "Apptainer" if service.runtime
                                                           in _APPTAINER_RUNTIMES else "Pyxis"))


def _mount_parts(runtime_plan, service):
    """Parts of the --container-mounts value: the job dir first, then resume, then volumes."""
    _check_mount_paths(service)
    parts = [_ShellVariable("JOB_DIR"), ":" + _JOB_MOUNT]
    resume = runtime_plan.plan.slurm.resume
    if resume is not None:
        parts.append("," + resume.path + ":" + _RESUME_MOUNT)
    if service.secrets:
        parts += [",", _ShellVariable("JOB_DIR"), "/%s/%s:%s:ro" % (_SECRETS_DIR_NAME, service.token,
                                                         _SECRETS_MOUNT)]
    for mount in service.mounts:
        parts.append("," + mount.host + ":" + mount.container
                     + (":" + mount.options if mount.options else ""))
    return parts


def _srun_parts(runtime_plan, index):
    """The srun argv of service ``index`` as words made of parts (literals and ``_ShellVariable``s)."""
    service = runtime_plan.plan.services[index]
    placement = service.placement
    words = [("--overlap",), ("--job-name=hpc-compose:" + service.token,),
             ("--nodes=%s" % (placement.nodes or 1),)]
    if placement.ntasks is not None:
        words.append(("--ntasks=%s" % placement.ntasks,))
    if placement.ntasks_per_node is not None:
        words.append(("--ntasks-per-node=%s" % placement.ntasks_per_node,))
    if placement.ntasks is None and placement.ntasks_per_node is None \
            and placement.mode != "distributed":
        # Otherwise the step inherits the job's --ntasks and would start the service N times.
        words.append(("--ntasks=1",))
    if _step_has_several_tasks(placement):
        # srun waits for every task unless told otherwise: a task failing on any node must end
        # the whole step at once, so that the service's failure policy applies then.
        words.append(("--kill-on-bad-exit=1",))
    if placement.mode == "primary":
        words.append(("--nodelist=", _ShellVariable("HPC_COMPOSE_PRIMARY_NODE")))
    if service.cpus_per_task is not None:
        words.append(("--cpus-per-task=%s" % service.cpus_per_task,))
    if service.gres is not None:
        words.append(("--gres=%s" % service.gres,))
    elif service.gpus is not None:
        words.append(("--gpus=%s" % service.gpus,))
    for key in ("mem", "time", "mpi"):
        if getattr(service, key) is not None:
            words.append(("--%s=%s" % (key, getattr(service, key)),))
    if service.runtime == "host":
        if service.working_dir:
            words.append(("--chdir=%s" % service.working_dir,))
    elif service.runtime in _APPTAINER_RUNTIMES:
        _check_mount_paths(service)
    else:
        image = runtime_plan.images[index].container_image
        words.append(("--container-image=%s" % image,))
        words.append(tuple(["--container-mounts="] + _mount_parts(runtime_plan, service)))
        if service.working_dir:
            words.append(("--container-workdir=%s" % service.working_dir,))
        words.append(("--container-env=" + ",".join(_env_names(runtime_plan, service)),))
        # Named per job so that `hpc-compose exec` can join it (NAME:exec); teardown removes it.
        words.append(("--container-name=" + _CONTAINER_NAME_PREFIX, _ShellVariable("SLURM_JOB_ID"),
                      "_" + service.token))
        if service.execution.form != "default" and service.execution.use_image_entrypoint:
            words.append(("--container-entrypoint",))
        else:
            words.append(("--no-container-entrypoint",))
    words.extend((str(arg),) for arg in service.extra_srun_args)
    if service.runtime in _APPTAINER_RUNTIMES:
        for line in _apptainer_lines(runtime_plan, index):
            words.extend(line)
    words.extend((arg,) for arg in _container_argv(service, runtime_plan.images[index]))
    return words


def service_srun_argv(runtime_plan, index):
    """The exact srun argv (after ``srun``) for service ``index``; ``${VAR}`` marks run-time values."""
    return [_shown_word(*parts) for parts in _srun_parts(runtime_plan, index)]


def _unchanged_parts(parts):
    return parts


def _render_sweep_table(sweep):
    """The x-sweep block: one bash array per parameter (indexed by task), the replicates, each
    task's params.json row, and the exports of the running task's row."""
    import json
    from collections import OrderedDict
    columns = "".join(_fill(_SWEEP_COLUMN_TEMPLATE, name=_comment(name), column=str(column),
                            values=" ".join(shell_quote(dict(task.params)[name])
                                            for task in sweep.tasks))
                      for column, name in enumerate(sweep.parameters))
    rows = "".join("    %s\n" % shell_quote(json.dumps(OrderedDict([
        ("index", task.index), ("replicate", task.replicate),
        ("params", OrderedDict(task.params))]))) for task in sweep.tasks)
    exports = "".join(_fill(_SWEEP_EXPORT_TEMPLATE, column=str(column),
                            variable=_SWEEP_PARAM_PREFIX + name.upper())
                      for column, name in enumerate(sweep.parameters))
    return _fill(_SWEEP_TEMPLATE, columns=columns, rows=rows, exports=exports,
                 replicates=" ".join(str(task.replicate) for task in sweep.tasks),
                 count=str(len(sweep.tasks)), params_file=_PARAMS_FILE_NAME)


def _placeholder_parts(parts):
    """Word parts with every ``((param.NAME))`` of a literal part turned into the variable
    HPC_COMPOSE_PARAM_NAME: the value is expanded at run time, as data (inside double quotes)."""
    import re
    result = []
    for part in parts:
        if isinstance(part, _ShellVariable) or "((param." not in part:
            result.append(part)
            continue
        pieces = re.split(_SWEEP_PLACEHOLDER_PATTERN, part)
        for position, piece in enumerate(pieces):
            if position % 2:
                result.append(_ShellVariable(_SWEEP_PARAM_PREFIX + piece.upper()))
            elif piece:
                result.append(piece)
    return tuple(result)


def _placeholder_script(script):
    """A shell-form command with each ``((param.NAME))`` written ``"$HPC_COMPOSE_PARAM_NAME"``:
    /bin/sh expands the variable, so the value is never read as shell code."""
    import re
    return re.sub(_SWEEP_PLACEHOLDER_PATTERN,
                  lambda match: '"$%s%s"' % (_SWEEP_PARAM_PREFIX, match.group(1).upper()), script)


def _render_run_service(runtime_plan, index):
    service = runtime_plan.plan.services[index]
    if runtime_plan.plan.spec.sweep is None:
        fill = _unchanged_parts
    else:
        fill = _placeholder_parts
    mkdirs = ""
    if service.runtime != "host":
        # Pyxis refuses a missing bind source; Docker creates missing directories, and so do we.
        sources = [m.host for m in service.mounts]
        if runtime_plan.plan.slurm.resume is not None:
            sources.insert(0, runtime_plan.plan.slurm.resume.path)
        for source in sources:
            quoted = _shell_word(*fill((source,)))
            mkdirs += "    [[ -e %s ]] || mkdir -p -- %s\n" % (quoted, quoted)
    env = "".join("        %s \\\n" % _shell_word(*fill((key + "=",) + tuple(parts)))
                  for key, parts in _environment_parts(runtime_plan, index))
    words = _srun_parts(runtime_plan, index)
    command = _container_argv(service, runtime_plan.images[index])
    groups = []
    if service.runtime in _APPTAINER_RUNTIMES:
        groups = _apptainer_lines(runtime_plan, index)
    options = words[:len(words) - len(command) - sum(len(group) for group in groups)]
    lines = ["        " + _shell_word(*fill(parts)) for parts in options]
    lines += ["        " + " ".join(_shell_word(*fill(parts)) for parts in group)
              for group in groups]
    if service.execution.form == "shell" and fill is _placeholder_parts:
        command = [_placeholder_script(arg) if arg == service.execution.script else arg
                   for arg in command]
    if command:
        lines.append("        " + " ".join(_shell_word(*fill((arg,))) for arg in command))
    argv = " \\\n".join(lines)
    modules = ""
    if service.modules:
        modules = _fill(_RUN_MODULES_TEMPLATE, name=shell_quote(service.name),
                        words=" ".join([shell_quote(path) for path in service.module_paths]
                                       + ["--"] + [shell_quote(m.name) for m in service.modules]))
    return _fill(_RUN_SERVICE_TEMPLATE, name=_comment(service.name), index=str(index),
                 mkdirs=mkdirs, modules=modules, env=env, argv=argv)


def _comment(text):
    """Text safe inside a bash comment (one line)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _format_probe(readiness):
    """One phrase for the probe, as messages, state.json and ``inspect`` name it."""
    if readiness.type == "sleep":
        return "sleep %ss" % readiness.seconds
    if readiness.type == "tcp":
        return "tcp %s:%s" % (readiness.host or _TCP_HOST_DEFAULT, readiness.port)
    if readiness.type == "log":
        return 'log pattern "%s"' % readiness.pattern
    return "http %s status %s" % (readiness.url, readiness.status_code or _HTTP_STATUS_DEFAULT)


def _render_readiness_entry(index, readiness):
    """The READINESS / READY_* lines: only the facts this readiness type uses."""
    if readiness is None:
        return _fill(_NO_READINESS_ENTRY_TEMPLATE, index=index)
    fields = []
    if readiness.type == "sleep":
        fields.append(("READY_SECONDS", int(readiness.seconds or 0)))
    else:
        fields.append(("READY_TIMEOUT", int(readiness.timeout_seconds or _READINESS_TIMEOUT_DEFAULT)))
    if readiness.type == "tcp":
        fields += [("READY_HOST", readiness.host or _TCP_HOST_DEFAULT),
                   ("READY_PORT", int(readiness.port))]
    elif readiness.type == "log":
        fields.append(("READY_PATTERN", readiness.pattern))
    elif readiness.type == "http":
        fields += [("READY_CODE", int(readiness.status_code or _HTTP_STATUS_DEFAULT)),
                   ("READY_URL", readiness.url)]
    probe = " ".join("%s[%s]=%s" % (name, index, shell_quote(value)) for name, value in fields)
    return _fill(_READINESS_ENTRY_TEMPLATE, index=index, type=shell_quote(readiness.type),
                 description=shell_quote(_format_probe(readiness)), probe=probe)


def _render_service_entry(plan, index, ending):
    service = plan.services[index]
    index_of = dict((s.name, i) for i, s in enumerate(plan.services))
    policy = service.failure_policy
    placement = service.placement
    placement_json = '"mode": %s, "nodes": %s, "ntasks": %s, "ntasks_per_node": %s' % (
        _format_json(placement.mode), _format_json(placement.nodes or 1),
        _format_json(placement.ntasks), _format_json(placement.ntasks_per_node))
    restart = ""
    if policy.mode == "restart_on_failure":
        restart = _fill(_RESTART_ENTRY_TEMPLATE, index=str(index),
                        max_restarts=shell_quote(int(policy.max_restarts or 3)),
                        backoff=shell_quote(int(policy.backoff_seconds or 5)))
    return _fill(
        _SERVICE_ENTRY_TEMPLATE, index=str(index), name=_comment(service.name),
        name_word=shell_quote(service.name), token=shell_quote(service.token),
        policy=shell_quote(policy.mode), ends_job="1" if service.name in ending else "0",
        depends_on=shell_quote(" ".join("%d:%s" % (index_of[d.name], d.condition)
                                        for d in service.depends_on)),
        placement=shell_quote(placement_json),
        distributed="1" if placement.mode == "distributed" else "0",
        restart=restart, readiness=_render_readiness_entry(str(index), service.readiness))


def _job_dir_mode(plan):
    """The job directory's mode for ``plan`` (0700, or 0750 with x-slurm.share_with_group)."""
    return _SHARED_DIR_MODE if plan.slurm.share_with_group else _PRIVATE_DIR_MODE


def _permission_values(plan):
    mode = _job_dir_mode(plan)
    who = ("readable by owner and group (x-slurm.share_with_group)" if plan.slurm.share_with_group
           else "owner-only")
    return {"umask": "%03o" % (0o777 & ~mode), "job_dir_mode": "%04o" % mode, "who": who}


# --- render_script --------------------------------------------------------------------------------

def _teardown_values(plan, containers, metrics, artifacts):
    """The lines of finish() that belong to a feature: each "" when the job does not use it."""
    values = dict(metrics_stop="", remove_containers="", remove_secrets="", outcome_variable="",
                  artifacts_outcome="", collect_artifacts="")
    if metrics:
        values["metrics_stop"] = "    metrics_stop\n"
    if containers:
        values["remove_containers"] = "    stop_container_keeper\n"
    if _secret_services(plan):
        values["remove_secrets"] = _fill(_REMOVE_SECRETS_TEMPLATE, secrets_dir=_SECRETS_DIR_NAME)
    if artifacts:
        values.update(outcome_variable=" outcome=failure",
                      artifacts_outcome="    [[ $status == completed ]] && outcome=success\n",
                      collect_artifacts='    collect_artifacts "$outcome"\n')
    return values


def _task_signal_values(plan):
    """signal_steps' lines that send an apptainer service's TERM to its task processes only."""
    indices = [str(i) for i, service in enumerate(plan.services)
               if service.runtime in _APPTAINER_RUNTIMES]
    if not indices:
        return dict(collect_step=_COLLECT_STEP_TEMPLATE, signal_tasks="", tasks="")
    patterns = "|".join("*:" + index for index in indices)
    return dict(collect_step=_fill(_COLLECT_TASK_STEP_TEMPLATE, patterns=patterns),
                signal_tasks=_SIGNAL_TASKS_CALL_TEMPLATE, tasks=" tasks=()")


def _stop_values(local):
    """How the supervisor stops a service's process: its srun (kill), or in the script of up
    --local outside Slurm the whole session local_step started it in (signal_service), and what
    is left of the service when its first process ends (end_service) and of the run at teardown
    (stop_leftovers): the functions of _LOCAL_LAUNCHER_TEMPLATE."""
    if not local:
        return dict(signal_fallback='kill -"$signal" "${PID[i]}" 2>/dev/null',
                    kill_srun='kill -KILL "${PID[$1]}" 2>/dev/null',
                    kill_last='kill -KILL "${PID[i]}" 2>/dev/null', end_service="",
                    stop_leftovers="")
    return dict(signal_fallback='signal_service "$signal" "$i"', kill_srun='signal_service KILL "$1"',
                kill_last='signal_service KILL "$i"', end_service='end_service "$i"; ',
                stop_leftovers="    [[ $LAUNCHER == srun ]] || stop_leftovers  # the probes and the "
                               "sampler have gone\n")


def _render_supervisor(plan, containers, metrics, artifacts, local=False):
    """The supervisor's functions, piece by piece, with only the lines of the features in use."""
    one_shot = any(dependency.condition == "service_completed_successfully"
                   for service in plan.services for dependency in service.depends_on)
    blocked = dict(blocked_dependents="", blocked_call="", blocked="")
    stop = _stop_values(local)
    if one_shot:
        blocked = dict(blocked_dependents=_BLOCKED_DEPENDENTS_TEMPLATE,
                       blocked_call='blocked_dependents "$i"; ', blocked="$BLOCKED")
    return "".join([
        _fill(_SUPERVISOR_STATE_TEMPLATE, tick=_SUPERVISOR_TICK,
              tick_ms=str(int(round(float(_SUPERVISOR_TICK) * 1000))), grace=str(_STOP_GRACE_SECONDS),
              probe_first_ms=str(_PROBE_FIRST_INTERVAL_MS), probe_backoff=str(_PROBE_BACKOFF),
              probe_interval_ms=str(_PROBE_INTERVAL_MS),
              probe_limit_ms=str(_PROBE_LIMIT_SECONDS * 1000),
              state_schema_version=str(_STATE_SCHEMA_VERSION)),
        _fill(_LAUNCH_TEMPLATE, marker=_RESTART_MARKER,
              completed_condition=_COMPLETED_CONDITION_TEMPLATE if one_shot else ""),
        _fill(_READINESS_TEMPLATE, readiness_exit=str(_EXIT_READINESS_TIMEOUT)),
        _fill(_EXITS_TEMPLATE, **dict(blocked, **dict(stop, **_task_signal_values(plan)))),
        _fill(_TEARDOWN_TEMPLATE, **dict(_teardown_values(plan, containers, metrics, artifacts),
                                         **stop)),
        _FORWARD_SIGNALS_TEMPLATE,
        _ON_EXIT_TEMPLATE])


def _render_extras(metrics, artifacts):
    """The metrics and artifacts blocks under one banner; "" when the job uses neither."""
    if not metrics and not artifacts:
        return ""
    title = {(True, True): "Metrics sampler and artifact collection",
             (True, False): "Metrics sampler",
             (False, True): "Artifact collection"}[bool(metrics), bool(artifacts)]
    blocks = [block.rstrip("\n") for block in (metrics, artifacts) if block]
    return _fill(_EXTRAS_BANNER_TEMPLATE, title=title) + "\n\n".join(blocks) + "\n"


_MAX_SCRIPT_SIZE = 4 * 1024 * 1024   # bytes: Slurm's default max_script_size


def _plan_strings(record, path):
    """``(size, dotted path)`` of every string in a plan record and the records it holds."""
    if isinstance(record, str):
        yield len(record), path
    elif isinstance(record, tuple) and hasattr(record, "_fields"):
        for field in record._fields:
            for item in _plan_strings(getattr(record, field), path + "." + field):
                yield item
    elif isinstance(record, (tuple, list)):
        if len(record) == 2 and isinstance(record[0], str):
            # (key, value): the environment, labels... (or two words of a command)
            yield len(record[0]), path
            for item in _plan_strings(record[1], path + "." + record[0][:40]):
                yield item
            return
        for index, value in enumerate(record):
            keyed = isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            for item in _plan_strings(value, path if keyed else "%s[%d]" % (path, index)):
                yield item


def _check_script_size(plan, script=None):
    """``script``, unless it (or before rendering, the plan's values together) is larger than Slurm
    takes: then an error naming the biggest values."""
    import heapq

    def strings():
        for service in plan.services:
            for item in _plan_strings(service, "services." + service.name):
                yield item
        for item in _plan_strings(plan.slurm, "x-slurm"):
            yield item
    size = len(script.encode("utf-8")) if script is not None else \
        sum(length for length, _ in strings())
    if size <= _MAX_SCRIPT_SIZE:
        return script
    biggest = heapq.nlargest(3, strings())
    raise SpecError("the batch script would be larger than %d bytes, which Slurm refuses by "
                    "default (max_script_size); the biggest values: %s" % (
                        _MAX_SCRIPT_SIZE, ", ".join("%s (%d characters)" % (path, length)
                                                    for length, path in biggest)),
                    file=plan.compose_file,
                    hint="pass large data as a file (a volume) instead of a value")


def render_script(runtime_plan, local=False):
    """Render the complete, self-contained batch script for ``runtime_plan``.

    ``local=True`` renders it for ``up --local`` outside Slurm: its services start through
    local_step on this machine when the script runs with HPC_COMPOSE_LAUNCHER=local.
    """
    plan = runtime_plan.plan
    services = plan.services
    if not services:
        raise HpcComposeError("the plan has no services to run")
    _check_script_size(plan)
    ending = _job_ending_services(plan)
    resume = plan.slurm.resume
    # Named containers to remove are Pyxis's; the mount path rule holds for every container runtime.
    containers = any(s.runtime == "pyxis" for s in services)
    binds = any(s.runtime != "host" for s in services)
    apptainer = any(s.runtime in _APPTAINER_RUNTIMES for s in services)
    secret_services = _secret_services(plan)
    metrics = render_metrics_block(runtime_plan)
    artifacts = render_artifacts_block(runtime_plan)
    pieces = [_fill(_SCRIPT_HEAD_TEMPLATE, job_name=_comment(plan.job_name), version=__version__,
                    compose_file=_comment(plan.compose_file),
                    service_names=_comment(", ".join(s.name for s in services))),
              "\n".join(_render_sbatch_lines(plan)) + "\n",
              _fill(_PRELUDE_TEMPLATE, nodes=shell_quote(int(plan.nodes or 1)),
                    job_key=(_ARRAY_JOB_KEY if plan.slurm.array is not None
                             else "${SLURM_JOB_ID}"),
                    run_dir="$JOB_DIR/attempts/$ATTEMPT" if resume else "$JOB_DIR",
                    **_permission_values(plan)),
              _fill(_SERVICE_TABLE_HEAD_TEMPLATE, count=str(len(services)),
                    end_reason=shell_quote("every service that ends the job has finished: "
                                           + ", ".join(ending)))]
    pieces.extend(_render_service_entry(plan, index, ending) for index in range(len(services)))
    pieces.append(_render_signal_table(plan))
    pieces.extend(_render_run_service(runtime_plan, index) for index in range(len(services)))
    if any(s.modules for s in services):
        pieces.append(_fill(_LOAD_MODULES_TEMPLATE, module_init=_MODULE_INIT_SHELL))
    pieces.append(_JSON_STRING_TEMPLATE)
    pieces.append(_render_supervisor(plan, containers, bool(metrics), bool(artifacts), local))
    pieces.append(_fill(_LOG_INDEX_TEMPLATE, suffix=shell_quote(_LOG_TIMES_SUFFIX)))
    if containers:
        pieces.append(_fill(_CONTAINER_KEEPER_TEMPLATE, prefix=shell_quote(_CONTAINER_NAME_PREFIX),
                            local_start=_KEEPER_LOCAL_START_TEMPLATE if local else "",
                            local_stop=_KEEPER_LOCAL_STOP_TEMPLATE if local else ""))
    pieces.append(_render_extras(metrics, artifacts))
    # From here on any exit (a failed setup line, scancel, the time limit) goes through teardown.
    pieces.append(_SIGNALS_TEMPLATE)
    if resume is not None:
        pieces.append(_fill(_RESUME_TEMPLATE, resume_path=shell_quote(resume.path)))
    if secret_services:
        pieces.append(_fill(_SECRETS_TEMPLATE, secrets_dir=_SECRETS_DIR_NAME,
                            tokens=" ".join(shell_quote(s.token) for s in secret_services)))
    if plan.slurm.array is not None:
        pieces.append(_ARRAY_TEMPLATE)
    if plan.spec.sweep is not None:
        pieces.append(_render_sweep_table(plan.spec.sweep))
    if binds:
        pieces.append(_PYXIS_PATH_CHECK_TEMPLATE)
    if local:
        pieces.append(_fill(_LOCAL_LAUNCHER_TEMPLATE, launcher_variable=_LAUNCHER_VARIABLE,
                            run_variable=_LOCAL_RUN_VARIABLE,
                            prefix=shell_quote(_CONTAINER_NAME_PREFIX)))
    else:
        pieces.append(_SRUN_LAUNCHER_TEMPLATE)
    pieces.append(_ALLOCATION_TEMPLATE)
    if resume is not None:
        pieces.append(_fill(_RESUME_LATEST_TEMPLATE,
                            compose_name=shell_quote(plan.spec.name or plan.job_name),
                            schema_version=str(_RESUME_LATEST_SCHEMA_VERSION)))
    if plan.slurm.setup:
        pieces.append(_fill(_SETUP_TEMPLATE, lines="\n".join(plan.slurm.setup)))
    before_loop = ""
    if any(s.readiness is not None and s.readiness.type == "http" for s in services):
        before_loop = _CURL_CHECK_TEMPLATE
    if containers:
        before_loop += "start_container_keeper\n"
    if metrics:
        before_loop += "metrics_start\n"
    pieces.append(_fill(_MAIN_LOOP_TEMPLATE, count=str(len(services)), before_loop=before_loop))
    return _check_script_size(plan, "".join(pieces))


# --- render extras: the metrics sampler and teardown artifact collection --------------------------
# render_script() pastes these blocks into the batch script. Contract with
# the rest of the script:
#   * ``JOB_DIR`` is set (the per-job directory, mounted at /hpc-compose/job: artifact patterns are
#     resolved against it) and ``RUN_DIR`` may be (the current attempt's directory with resume;
#     ``metrics/`` and ``artifacts/`` are written under ``${RUN_DIR:-$JOB_DIR}``);
#     ``HPC_COMPOSE_ATTEMPT``, ``HPC_COMPOSE_IS_RESUME`` and ``HPC_COMPOSE_RESUME_DIR`` are read if set.
#   * ``metrics_start`` (after setup, before the first launch) and ``metrics_stop`` (in teardown) are
#     defined and called only when x-slurm.metrics is enabled: render_metrics_block is "" otherwise.
#   * ``collect_artifacts success|failure`` (in teardown, after services are reaped) is defined and
#     called only with x-slurm.artifacts: render_artifacts_block is "" otherwise.
#   * Everything is best-effort: no function here ever returns non-zero or exits the script, so they
#     are safe under ``set -e``. Helper names start with ``metrics_`` / ``artifacts_``.
# The files written are read back by ``stats`` and ``artifacts`` in the job tracking section.

_METRICS_TEMPLATE = r"""# Metrics sampler (x-slurm.metrics): best-effort, batch host only; never fails the job.
METRICS_INTERVAL=@{interval}
METRICS_COLLECT_GPU=@{collect_gpu}
METRICS_COLLECT_SLURM=@{collect_slurm}
# AllocTRES is not an sstat field before Slurm 23.x, so the sampler asks only for what 22.05 has.
METRICS_SSTAT_FIELDS=JobID,NTasks,AveCPU,AveRSS,MaxRSS,TRESUsageInAve
METRICS_PID=""
METRICS_DIR=""
METRICS_GPU_AVAILABLE=null
METRICS_GPU_NOTE=""
METRICS_GPU_LAST=""
METRICS_SLURM_AVAILABLE=null
METRICS_SLURM_NOTE=""
METRICS_SLURM_LAST=""

# One JSON row in REPLY: {"sampled_at": $1, <name>: <value>...}, $2 and $3 naming the arrays of
# names and values.
metrics_row() {
    local -n row_names=$2 row_values=$3
    local record="{\"sampled_at\":\"$1\"" i
    for i in "${!row_names[@]}"; do
        metrics_json_value "${row_values[$i]:-}"
        record+=",\"${row_names[$i]}\":$JSON"
    done
    REPLY="$record}"
}

# JSON text for one value in JSON: a string (trimmed), or null for empty and nvidia-smi's N/A forms.
metrics_json_value() {
    local value=$1
    value=${value#"${value%%[![:space:]]*}"}
    value=${value%"${value##*[![:space:]]}"}
    case $value in
        ''|'N/A'|'[N/A]'|'[Not Supported]'|'[Unknown Error]'|'[Insufficient Permissions]')
            JSON=null
            return 0 ;;
    esac
    json_string "$value"
}

# Record a collector's availability; the first time it turns unavailable, say why in the batch log.
metrics_mark() {
    local collector=$1 available=$2 note=$3 sampled_at=$4
    if [[ "$collector" = gpu ]]; then
        if [[ "$available" = false ]] && [[ "$METRICS_GPU_AVAILABLE" != false ]]; then
            echo "metrics warning [gpu]: $note" >&2
        fi
        METRICS_GPU_AVAILABLE=$available
        METRICS_GPU_NOTE=$note
        [[ -z "$sampled_at" ]] || METRICS_GPU_LAST=$sampled_at
    else
        if [[ "$available" = false ]] && [[ "$METRICS_SLURM_AVAILABLE" != false ]]; then
            echo "metrics warning [slurm]: $note" >&2
        fi
        METRICS_SLURM_AVAILABLE=$available
        METRICS_SLURM_NOTE=$note
        [[ -z "$sampled_at" ]] || METRICS_SLURM_LAST=$sampled_at
    fi
}

metrics_write_meta() {
    local gpu_note gpu_last slurm_note slurm_last tmp
    metrics_json_value "$METRICS_GPU_NOTE"; gpu_note=$JSON
    metrics_json_value "$METRICS_GPU_LAST"; gpu_last=$JSON
    metrics_json_value "$METRICS_SLURM_NOTE"; slurm_note=$JSON
    metrics_json_value "$METRICS_SLURM_LAST"; slurm_last=$JSON
    tmp="$METRICS_DIR/.meta.json.$BASHPID"
    {
        printf '{"schema_version":@{schema_version},"sampler_pid":%s,"interval_seconds":%s,"collectors":[' \
            "${METRICS_PID:-null}" "$METRICS_INTERVAL"
        printf '{"name":"gpu","enabled":%s,"available":%s,"note":%s,"last_sampled_at":%s},' \
            "$METRICS_COLLECT_GPU" "$METRICS_GPU_AVAILABLE" "$gpu_note" "$gpu_last"
        printf '{"name":"slurm","enabled":%s,"available":%s,"note":%s,"last_sampled_at":%s}]}\n' \
            "$METRICS_COLLECT_SLURM" "$METRICS_SLURM_AVAILABLE" "$slurm_note" "$slurm_last"
    } > "$tmp" 2>/dev/null || return 0
    mv -f "$tmp" "$METRICS_DIR/meta.json" 2>/dev/null || true
}

# Append to $METRICS_DIR/$4 one row per line of nvidia-smi CSV output $3, its columns named by the
# array $2 (the "No running processes found" line is not a row).
metrics_append_csv() {
    local line chunk=""
    local -a fields
    while IFS= read -r line; do
        [[ -n $line && $line != *'No running'* ]] || continue
        IFS=',' read -r -a fields <<< "$line"
        metrics_row "$1" "$2" fields
        chunk+="$REPLY"$'\n'
    done <<< "$3"
    [[ -z $chunk ]] || printf '%s' "$chunk" >> "$METRICS_DIR/$4" 2>/dev/null || true
}

metrics_sample_gpu() {
    local now=$1 output
    local -a names=(index uuid name utilization_gpu utilization_memory memory_used_mib
                    memory_total_mib temperature_c power_draw_w power_limit_w)
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        metrics_mark gpu false "nvidia-smi not found on the batch host" ""
        return 0
    fi
    if ! output=$(nvidia-smi --query-gpu=index,uuid,name,utilization.gpu,utilization.memory,memory.used,memory.total,temperature.gpu,power.draw,power.limit --format=csv,noheader,nounits 2>&1); then
        metrics_mark gpu false "nvidia-smi --query-gpu failed: ${output%%$'\n'*}" ""
        return 0
    fi
    metrics_append_csv "$now" names "$output" gpu.jsonl
    if output=$(nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_gpu_memory --format=csv,noheader,nounits 2>/dev/null); then
        names=(gpu_uuid pid process_name used_memory_mib)
        metrics_append_csv "$now" names "$output" gpu_processes.jsonl
    fi
    metrics_mark gpu true "" "$now"
}

metrics_sample_slurm() {
    local now=$1 output line chunk=""
    local -a fields
    local -a names=(step_id ntasks ave_cpu ave_rss max_rss tres_usage_in_ave)
    if ! command -v sstat >/dev/null 2>&1; then
        metrics_mark slurm false "sstat not found on the batch host" ""
        return 0
    fi
    if ! output=$(sstat --allsteps --jobs "${SLURM_JOB_ID:-0}" --parsable2 --noconvert --noheader --format="$METRICS_SSTAT_FIELDS" 2>&1); then
        metrics_mark slurm false "sstat failed: ${output%%$'\n'*}" ""
        return 0
    fi
    while IFS= read -r line; do
        # Only numbered service steps (<jobid>.<n>); batch/extern steps are the scaffolding.
        case ${line%%|*} in
            *.*[!0-9]*|*.) continue ;;
            *.*) ;;
            *) continue ;;
        esac
        IFS='|' read -r -a fields <<< "$line|"
        if [[ "${#fields[@]}" -ne "${#names[@]}" ]]; then
            metrics_mark slurm false "sstat printed ${#fields[@]} fields instead of ${#names[@]}" ""
            return 0
        fi
        metrics_row "$now" names fields
        chunk+="$REPLY"$'\n'
    done <<< "$output"
    [[ -z "$chunk" ]] || printf '%s' "$chunk" >> "$METRICS_DIR/slurm.jsonl" 2>/dev/null || true
    metrics_mark slurm true "" "$now"
}

metrics_sample() {
    local now
    now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    [[ "$METRICS_COLLECT_GPU" != true ]] || metrics_sample_gpu "$now"
    [[ "$METRICS_COLLECT_SLURM" != true ]] || metrics_sample_slurm "$now"
    metrics_write_meta
    return 0
}

metrics_loop() {
    local sleeper=""
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM INT
    METRICS_PID=$BASHPID
    while :; do
        sleep "$METRICS_INTERVAL" &
        sleeper=$!
        wait "$sleeper"
        metrics_sample
    done
}

metrics_start() {
    METRICS_DIR="${RUN_DIR:-$JOB_DIR}/metrics"
    if ! mkdir -p "$METRICS_DIR" 2>/dev/null; then
        echo "metrics warning: cannot create $METRICS_DIR; sampling is off" >&2
        return 0
    fi
    { : > "$METRICS_DIR/gpu.jsonl"; : > "$METRICS_DIR/gpu_processes.jsonl"
      : > "$METRICS_DIR/slurm.jsonl"; } 2>/dev/null || true
    metrics_sample
    metrics_loop </dev/null &
    METRICS_PID=$!
    metrics_write_meta
    return 0
}

metrics_stop() {
    if [[ -n "$METRICS_PID" ]]; then
        kill "$METRICS_PID" 2>/dev/null || true
        wait "$METRICS_PID" 2>/dev/null || true
        METRICS_PID=""
    fi
    return 0
}
"""

_ARTIFACTS_TEMPLATE = r"""# Artifact collection at teardown (x-slurm.artifacts): best-effort; never fails the job.
# Parallel arrays: the bundle each declared pattern belongs to, and the pattern (a container path).
ARTIFACTS_COLLECT_POLICY=@{policy}
ARTIFACTS_BUNDLE_NAMES=(@{bundle_names})
ARTIFACTS_PATTERN_BUNDLES=(@{pattern_bundles})
ARTIFACTS_PATTERNS=(@{patterns})

# Escape glob characters in a literal path so that only the user's pattern part globs.
artifacts_glob_escape() {
    local text=$1 out="" char i
    for ((i = 0; i < ${#text}; i++)); do
        char=${text:i:1}
        case $char in
            '*'|'?'|'['|']'|\\) out+="\\$char" ;;
            *) out+=$char ;;
        esac
    done
    REPLY=$out
}

# Append a JSON string to the comma-separated list held in the named variable.
artifacts_append() {
    local -n artifacts_list=$1
    json_string "$2"
    artifacts_list+="${artifacts_list:+,}$JSON"
}

# Is relative path $3, or a directory above it, a key (after prefix $2) of associative array $1?
artifacts_copied_through() {
    local -n artifacts_copied=$1
    local parent=$3
    while :; do
        [[ -z "${artifacts_copied[$2$parent]:-}" ]] || return 0
        case $parent in */*) parent=${parent%/*} ;; *) return 1 ;; esac
    done
}

# Copy one match into the payload: a directory by its content, anything else as itself.
artifacts_copy() {
    if [[ -d "$1" ]] && [[ ! -L "$1" ]]; then
        mkdir -p "$2" 2>/dev/null && cp -a "$1/." "$2/" 2>/dev/null
    else
        mkdir -p "${2%/*}" 2>/dev/null && cp -a "$1" "$2" 2>/dev/null
    fi
}

collect_artifacts() {
    local outcome=${1:-failure}
    local dir="${RUN_DIR:-$JOB_DIR}/artifacts" root_glob pattern bundle host_pattern match rel i
    local payload="$dir/payload" collected_at tmp skip=""
    local declared="" matched="" copied="" warnings="" bundles_json="" name
    local -a matches
    local -A seen_match=() seen_copy=() b_declared=() b_matched=() b_copied=() b_warnings=()
    local -A b_seen_match=() b_seen_copy=()
    local restore_shopt IFS=
    restore_shopt=$(shopt -p nullglob globstar dotglob || true)
    collected_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    if ! { rm -rf "$payload" && mkdir -p "$payload"; } 2>/dev/null; then
        echo "artifacts warning: cannot prepare $payload; nothing collected" >&2
        return 0
    fi
    case $ARTIFACTS_COLLECT_POLICY:$outcome in
        on_success:success|on_failure:failure|always:*) ;;
        *) skip="collection skipped: policy $ARTIFACTS_COLLECT_POLICY, job outcome $outcome" ;;
    esac
    [[ -z "$skip" ]] || artifacts_append warnings "$skip"
    artifacts_glob_escape "$JOB_DIR"
    root_glob=$REPLY
    shopt -s nullglob globstar dotglob
    for i in "${!ARTIFACTS_PATTERNS[@]}"; do
        pattern=${ARTIFACTS_PATTERNS[$i]}
        bundle=${ARTIFACTS_PATTERN_BUNDLES[$i]}
        artifacts_append declared "$pattern"
        artifacts_append "b_declared[$bundle]" "$pattern"
        [[ -z "$skip" ]] || continue
        case $pattern in
            *[*?[]*)
                host_pattern="$root_glob${pattern#/hpc-compose/job}"
                # IFS is empty (local) so the expansion only globs: paths with spaces stay whole.
                # shellcheck disable=SC2206
                matches=($host_pattern) ;;
            *) matches=("$JOB_DIR${pattern#/hpc-compose/job}") ;;
        esac
        if [[ "${#matches[@]}" -eq 0 ]] || { [[ "${#matches[@]}" -eq 1 ]] && [[ ! -e "${matches[0]}" ]] && [[ ! -L "${matches[0]}" ]]; }; then
            artifacts_append warnings "no match for $pattern"
            artifacts_append "b_warnings[$bundle]" "no match for $pattern"
            continue
        fi
        for match in "${matches[@]}"; do
            match=${match%/}
            [[ -e "$match" ]] || [[ -L "$match" ]] || continue
            if [[ "$match" = "$JOB_DIR" ]]; then
                artifacts_append warnings "skipped the job directory itself (matched by $pattern)"
                continue
            fi
            rel=${match#"$JOB_DIR"/}
            case $rel in
                artifacts|artifacts/*) continue ;;
            esac
            if [[ -z "${seen_match[$rel]:-}" ]]; then
                seen_match[$rel]=1
                artifacts_append matched "/hpc-compose/job/$rel"
            fi
            if [[ -z "${b_seen_match[$bundle/$rel]:-}" ]]; then
                b_seen_match[$bundle/$rel]=1
                artifacts_append "b_matched[$bundle]" "/hpc-compose/job/$rel"
            fi
            # Copied once, even when an overlapping pattern or a parent directory matched too.
            if ! artifacts_copied_through seen_copy "" "$rel"; then
                if ! artifacts_copy "$match" "$payload/$rel"; then
                    artifacts_append warnings "could not copy /hpc-compose/job/$rel"
                    artifacts_append "b_warnings[$bundle]" "could not copy /hpc-compose/job/$rel"
                    continue
                fi
                # shellcheck disable=SC2034  # read by artifacts_copied_through
                seen_copy[$rel]=1
                artifacts_append copied "$rel"
            fi
            if ! artifacts_copied_through b_seen_copy "$bundle/" "$rel"; then
                # shellcheck disable=SC2034  # read by artifacts_copied_through
                b_seen_copy[$bundle/$rel]=1
                artifacts_append "b_copied[$bundle]" "$rel"
            fi
        done
    done
    eval "$restore_shopt"
    for name in "${ARTIFACTS_BUNDLE_NAMES[@]}"; do
        json_string "$name"
        bundles_json+="${bundles_json:+,}$JSON:{\"declared_source_patterns\":[${b_declared[$name]:-}],\"matched_source_paths\":[${b_matched[$name]:-}],\"copied_relative_paths\":[${b_copied[$name]:-}],\"warnings\":[${b_warnings[$name]:-}]}"
    done
    tmp="$dir/.manifest.json.$BASHPID"
    {
        json_string "${SLURM_JOB_ID:-}"
        printf '{"schema_version":@{schema_version},"job_id":%s,' "$JSON"
        json_string "$ARTIFACTS_COLLECT_POLICY"
        printf '"collect_policy":%s,"collected_at":"%s",' "$JSON" "$collected_at"
        json_string "$outcome"
        printf '"job_outcome":%s,"attempt":%s,' "$JSON" "${HPC_COMPOSE_ATTEMPT:-0}"
        if [[ "${HPC_COMPOSE_IS_RESUME:-0}" = 1 ]]; then printf '"is_resume":true,'; else printf '"is_resume":false,'; fi
        if [[ -n "${HPC_COMPOSE_RESUME_DIR:-}" ]]; then
            json_string "$HPC_COMPOSE_RESUME_DIR"
            printf '"resume_dir":%s,' "$JSON"
        else
            printf '"resume_dir":null,'
        fi
        printf '"declared_source_patterns":[%s],"matched_source_paths":[%s],' "$declared" "$matched"
        printf '"copied_relative_paths":[%s],"warnings":[%s],"bundles":{%s}}\n' "$copied" "$warnings" "$bundles_json"
    } > "$tmp" 2>/dev/null || return 0
    mv -f "$tmp" "$dir/manifest.json" 2>/dev/null || true
}
"""


def render_metrics_block(runtime_plan):
    """Bash defining ``metrics_start`` / ``metrics_stop`` for x-slurm.metrics; "" when it is off."""
    metrics = runtime_plan.plan.slurm.metrics
    if metrics is None or not metrics.enabled:
        return ""
    collectors = tuple(metrics.collectors or ())
    return _fill(_METRICS_TEMPLATE,
        interval=shell_quote(int(metrics.interval_seconds or 5)),
        collect_gpu=shell_quote("true" if "gpu" in collectors else "false"),
        collect_slurm=shell_quote("true" if "slurm" in collectors else "false"),
        schema_version=str(_METRICS_META_SCHEMA_VERSION))


def _artifact_bundles(artifacts):
    """``((bundle, (pattern, ...)), ...)`` of an ``ArtifactsSpec``: ``default`` first when present."""
    bundles = []
    if artifacts.paths:
        bundles.append(("default", tuple(artifacts.paths)))
    for name, paths in artifacts.bundles:
        bundles.append((name, tuple(paths)))
    return tuple(bundles)


def render_artifacts_block(runtime_plan):
    """Bash defining ``collect_artifacts success|failure`` for x-slurm.artifacts; "" without it."""
    artifacts = runtime_plan.plan.slurm.artifacts
    if artifacts is None:
        return ""
    bundles = _artifact_bundles(artifacts)
    pattern_bundles, patterns = [], []
    for name, paths in bundles:
        for path in paths:
            pattern_bundles.append(shell_quote(name))
            patterns.append(shell_quote(path))
    return _fill(_ARTIFACTS_TEMPLATE,
        policy=shell_quote(artifacts.collect or "always"),
        bundle_names=" ".join(shell_quote(name) for name, _ in bundles),
        pattern_bundles=" ".join(pattern_bundles),
        patterns=" ".join(patterns),
        schema_version=str(_ARTIFACTS_MANIFEST_SCHEMA_VERSION))


##############################################################################
# Job tracking: scheduler, logs, stats, artifacts
##############################################################################
# Thin wrappers for sbatch, squeue, sacct, sstat, scancel (all through
# _run_command); the tracked metadata under <compose dir>/.hpc-compose/ (jobs/<id>.json, latest.json);
# scheduler state, runtime state (state.json), log following, watch, stats, artifact export, clean,
# and the cache's prune (prune_cache), which must know which jobs still run.
#
# Politeness: the scheduler is asked about our own job id only, at an adaptive interval
# (_WATCH_POLL_FIRST doubling to _WATCH_POLL_MAX, back to the first after a state change); `squeue`
# while the job is queued or running, `sacct` only after it left the queue. Logs are read from files.

_WATCH_POLL_FIRST = 2.0       # seconds between scheduler queries right after a change
_WATCH_POLL_MAX = 30.0        # the back-off cap
_LOG_POLL_SECONDS = 0.5       # log files are cheap to read: no scheduler cost
_STATE_SETTLE_SECONDS = 15.0  # after Slurm says the job ended, how long to wait for the final state.json
_ACCOUNTING_GRACE_SECONDS = 60.0  # how long a job may be unknown to both squeue and sacct
# A squeue or sacct that has not answered by then counts as no answer: against an unreachable
# controller squeue retries for about 20 s by itself. Sites may set their own in the environment.
_SCHEDULER_TIMEOUT_SECONDS = 10.0
_SCHEDULER_TIMEOUT_VARIABLE = "HPC_COMPOSE_SCHEDULER_TIMEOUT"
# In a job directory: when the scheduler last answered about the job, and since when it does not.
_SCHEDULER_NOTE_NAME = "scheduler.json"
_TERMINAL_STATES = frozenset((
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "LAUNCH_FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "RECONFIG_FAIL", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"))
_FINAL_RUNTIME_STATUSES = frozenset(("completed", "failed", "cancelled", "timeout"))
_ABSENT_VALUES = frozenset(("", "n/a", "none", "unknown", "invalid", "not set", "(null)"))


class SchedulerState(NamedTuple):
    state: str                     # upper-case Slurm state (RUNNING, COMPLETED...) or UNKNOWN
    source: str                    # squeue | sacct | none
    reason: Optional[str] = None   # pending or failure reason, when Slurm gives one
    start: Optional[str] = None    # as Slurm prints it
    end: Optional[str] = None
    exit_code: Optional[str] = None  # sacct's "code:signal"

    @property
    def terminal(self):
        return self.state in _TERMINAL_STATES

    @property
    def failed(self):
        return self.terminal and self.state != "COMPLETED"

    def to_dict(self):
        """JSON form used by status, stats and submit --format json."""
        data = dict(self._asdict())
        data["terminal"] = self.terminal
        data["failed"] = self.failed
        return data


# --- where things live ----------------------------------------------------------------------------

def _tracking_root(project_dir):
    """``<compose dir>/.hpc-compose``: tracked metadata and (sbatch runs there) job directories."""
    return os.path.join(project_dir, _METADATA_DIR_NAME)


def _job_directory(project_dir, job_id):
    """The per-job runtime directory the batch script writes (``.hpc-compose/<id>``)."""
    return os.path.join(_tracking_root(project_dir), str(job_id))


def _job_record_path(project_dir, job_id):
    """``.hpc-compose/jobs/<id>.json``."""
    return os.path.join(_tracking_root(project_dir), "jobs", "%s.json" % job_id)


def _latest_record_path(project_dir):
    """``.hpc-compose/latest.json`` (a copy of the newest job record)."""
    return os.path.join(_tracking_root(project_dir), "latest.json")


def _is_job_id(text):
    """A tracked job id: Slurm's (digits), or ``local-<UTC time>-<pid>`` of ``up --local``."""
    import re
    return bool(re.match(r"^(\d+|%s\d{8}T\d{6}Z-\d+)$" % _LOCAL_JOB_PREFIX, str(text)))


def _job_id_order(job_id):
    """Sort key of job ids: Slurm's by number, then local runs (their ids sort by time)."""
    text = str(job_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


# --- sbatch and the tracked record ----------------------------------------------------------------

def _parse_sbatch_job_id(stdout):
    """``(job_id, cluster)`` from ``sbatch --parsable`` output (``123`` or ``123;cluster``)."""
    import re
    for line in reversed([l.strip() for l in (stdout or "").splitlines() if l.strip()]):
        match = re.match(r"^(\d+)(?:;(\S+))?$", line)
        if match:
            return match.group(1), match.group(2)
        match = re.search(r"Submitted batch job (\d+)", line)
        if match:
            return match.group(1), None
    raise ToolError("sbatch did not print a job id (output: %r)" % (stdout or "").strip()[:200],
                    hint="check that --sbatch-bin points at Slurm's sbatch")


def _current_user():
    """The login name Slurm's ``%u`` expands to."""
    name = os.environ.get("USER") or os.environ.get("LOGNAME")
    if name:
        return name
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "unknown"


def _expand_slurm_filename(pattern, job_id, job_name, user=None):
    """Expand sbatch's ``%j %A %x %u %%`` (with optional zero-pad width) in an output file name.

    Specifiers that need the node or task (``%N``, ``%t``...) are kept as written.
    """
    import re
    user = user or _current_user()

    def replace(match):
        width, letter = match.group(1), match.group(2)
        if letter == "%":
            return "%"
        if letter in "jA":
            value = str(job_id)
            return value.zfill(min(int(width), 10)) if width else value
        if letter == "x":
            return str(job_name)
        if letter == "u":
            return user
        return match.group(0)

    return re.sub(r"%(\d*)([%A-Za-z])", replace, pattern)


def _batch_log_path(project_dir, job_id, job_name, output=None, chdir=None, user=None):
    """Absolute path of Slurm's batch log: x-slurm.output or ``slurm-%j.out``.

    Relative names are relative to the job's working directory: x-slurm.chdir when set (itself
    relative to the compose dir), else the compose dir, where ``submit`` runs sbatch.
    """
    name = _expand_slurm_filename(output or "slurm-%j.out", job_id, job_name, user)
    base = project_dir
    if chdir:
        base = os.path.join(project_dir, os.path.expanduser(str(chdir)))
    return os.path.normpath(os.path.join(base, os.path.expanduser(name)))


def _build_job_record(runtime_plan, job_id, cluster=None, script_path=None, submitted_at=None):
    """The tracked metadata of one submission (a JSON-ready dict)."""
    import time
    plan = runtime_plan.plan
    project_dir = plan.project_dir
    slurm = plan.slurm
    directory = _job_directory(project_dir, job_id)
    services = []
    for service, image in zip(plan.services, runtime_plan.images):
        services.append({
            "name": service.name, "token": service.token, "runtime": service.runtime,
            "log_path": os.path.join(directory, "logs", service.token + ".log")})
        if image.container_image:
            services[-1]["image"] = image.container_image   # the cache artifact (diff shows it)
        if service.runtime == "pyxis":
            services[-1]["container_name"] = _container_name(job_id, service.token)
    artifacts = slurm.artifacts
    return {
        "schema_version": _TRACKING_SCHEMA_VERSION,
        "job_id": str(job_id),
        "cluster": cluster,
        "submitted_at": submitted_at if submitted_at is not None else time.time(),
        "compose_file": plan.compose_file,
        "project_dir": project_dir,
        "submit_dir": project_dir,
        "script_path": script_path,
        "cache_dir": plan.cache_dir,
        "job_name": plan.job_name,
        "job_dir": directory,
        "batch_log": _batch_log_path(project_dir, job_id, plan.job_name, slurm.output, slurm.chdir),
        "batch_error_log": (_batch_log_path(project_dir, job_id, plan.job_name, slurm.error,
                                           slurm.chdir) if slurm.error else None),
        "services": services,
        "metrics_enabled": bool(slurm.metrics is not None and slurm.metrics.enabled),
        "artifact_export_dir": artifacts.export_dir if artifacts is not None else None,
        "resume_dir": slurm.resume.path if slurm.resume is not None else None,
        "array": slurm.array,
        "array_tasks": _array_task_ids(slurm.array) if slurm.array is not None else None,
        "sweep": _sweep_to_dict(plan.spec.sweep) if plan.spec.sweep is not None else None,
        "sweep_root": str(job_id) if plan.spec.sweep is not None else None,
        "uses_secrets": bool(_secret_services(plan)),
        # The normalized spec (what `config` prints; secrets as references): diff compares it.
        "spec": spec_to_dict(plan.spec),
    }


def _record_job(project_dir, record):
    """Store ``jobs/<id>.json`` and ``latest.json`` atomically, serialized by a lock.

    Parallel submits from one compose dir each write their own record; ``latest.json`` ends up
    naming whichever took the lock last, never a mix of two.
    """
    root = _tracking_root(project_dir)
    _make_private_dir(os.path.join(root, "jobs"))
    lock = os.path.join(root, "jobs", ".lock")
    if not os.path.lexists(lock):
        _open_no_follow(lock, os.O_WRONLY | os.O_CREAT, "a", _PRIVATE_FILE_MODE).close()
    with _FileLock(lock):
        _write_json_atomic(_job_record_path(project_dir, record["job_id"]), record,
                          _PRIVATE_FILE_MODE)
        _write_json_atomic(_latest_record_path(project_dir), record, _PRIVATE_FILE_MODE)
    return _job_record_path(project_dir, record["job_id"])


def _make_private_dir(path, mode=_PRIVATE_DIR_MODE):
    """Create ``path`` (with its parents) and give it exactly ``mode``, whatever the umask.

    In a shared project folder someone else may have made ``.hpc-compose`` (or a folder under it)
    first, or a symbolic link to a folder of yours: from ``.hpc-compose`` down, every folder must
    be a real folder owned by you, and the mode is set through the folder itself, never a link.
    Folders missing there are created owner-only, with their mode from the start."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    start = parts.index(_METADATA_DIR_NAME) if _METADATA_DIR_NAME in parts else len(parts) - 1
    os.makedirs(os.sep.join(parts[:start]) or os.sep, exist_ok=True)
    for end in range(start + 1, len(parts) + 1):
        folder = os.sep.join(parts[:end])
        try:
            os.mkdir(folder, mode if end == len(parts) else _PRIVATE_DIR_MODE)
        except FileExistsError:
            pass
        _check_own_directory(folder, "hpc-compose keeps job files only in folders of your own")
    _set_directory_mode(path, mode)


# --- secrets: the owner-only copies a job reads ---------------------------------------------------

def _secrets_directory(job_dir):
    """``<job dir>/secrets``: one 0700 directory per service token, one copy per secret."""
    return os.path.join(job_dir, _SECRETS_DIR_NAME)


def _secret_value(secret, variables):
    """The bytes of one secret, read at the last moment (a file, or a variable)."""
    if secret.source == "environment":
        if secret.reference not in variables:
            raise ToolError("variable '%s' (the source of secret '%s') is no longer set"
                            % (secret.reference, secret.name))
        return variables[secret.reference].encode("utf-8", "surrogateescape")
    try:
        with open(secret.reference, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ToolError("cannot read secret file %s (secret '%s'): %s"
                        % (secret.reference, secret.name, exc.strerror or exc))


def _write_secret_copies(plan, job_dir, environ=None):
    """Write every service's secrets as owner-only files below ``<job_dir>/secrets/<token>/``.

    The directories are 0700 and each copy has its ``mode`` (default 0600), set explicitly so that
    the umask cannot widen them. Returns the secrets directory.
    """
    variables = _build_variables(plan.project_dir, environ)
    declared = dict((secret.name, secret) for secret in plan.secrets)
    root = _secrets_directory(job_dir)
    # The job is new and held: anything here is stale (a cluster that reused the job id).
    _remove_secret_copies(job_dir)
    _make_private_dir(job_dir, _job_dir_mode(plan))
    _make_private_dir(root)
    for service in plan.services:
        if not service.secrets:
            continue
        directory = os.path.join(root, service.token)
        _make_private_dir(directory)
        for item in service.secrets:
            value = _secret_value(declared[item.source], variables)
            path = os.path.join(directory, item.target)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            handle = os.open(path, flags, _PRIVATE_FILE_MODE)
            try:
                os.fchmod(handle, item.mode if item.mode is not None else _DEFAULT_SECRET_MODE)
                view = memoryview(value)
                while view:
                    view = view[os.write(handle, view):]
            finally:
                os.close(handle)
    return root


def _remove_secret_copies(job_dir):
    """Remove a job's secret copies; True when there were some."""
    import shutil
    root = _secrets_directory(job_dir)
    if not os.path.isdir(root) or os.path.islink(root):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return not os.path.exists(root)


def _remove_leftover_secrets(project_dir, squeue_bin="squeue"):
    """Remove the secret copies of every job that has ended (a crash skips teardown's removal).

    Returns the job ids whose copies were removed; a job that may still run keeps them.
    """
    root = _tracking_root(project_dir)
    try:
        names = sorted((n for n in os.listdir(root) if n.isdigit()), key=int)
    except OSError:
        return []
    holders = [n for n in names if os.path.isdir(_secrets_directory(os.path.join(root, n)))]
    queue_states, queue_known = _queue_facts(project_dir, holders, squeue_bin)
    removed = []
    for job_id in holders:
        directory = _job_directory(project_dir, job_id)
        if _job_is_finished(directory, queue_states, queue_known) and \
                _remove_secret_copies(directory):
            removed.append(job_id)
    return removed


def _deliver_secrets(plan, job_id, cluster, say, scontrol_bin="scontrol", scancel_bin="scancel"):
    """The job was submitted held: write its secret copies, then release it (cancel on failure).

    So the values travel from this node to the job through owner-only files in its own directory,
    never through the script, the environment of sbatch or the scheduler.
    """
    job_dir = _job_directory(plan.project_dir, job_id)
    try:
        _write_secret_copies(plan, job_dir)
        if any(arg in ("-H", "--hold") for arg in plan.slurm.submit_args):
            say("job %s stays held (x-slurm.submit_args has --hold): release it with "
                "'scontrol release %s'" % (job_id, job_id))
        else:
            _release_job(job_id, cluster, scontrol_bin)
    except BaseException as exc:
        # Whatever stopped us (Ctrl-C included), no held job and no copies are left behind.
        try:
            _cancel_job(job_id, scancel_bin)
        except HpcComposeError as cancel_error:
            _warn("could not cancel the held job %s: %s" % (job_id, cancel_error.message))
        _remove_secret_copies(job_dir)
        if isinstance(exc, HpcComposeError):
            message = exc.message
        elif isinstance(exc, OSError):
            message = "cannot write the secret copies in %s: %s" % (_secrets_directory(job_dir),
                                                                    exc.strerror or exc)
        else:
            raise
        raise ToolError("job %s was cancelled before it started: %s" % (job_id, message))


def _minimal_job_record(project_dir, job_id):
    """A record for a job id that was not submitted through this compose dir's tracking."""
    return {
        "schema_version": _TRACKING_SCHEMA_VERSION, "job_id": str(job_id), "cluster": None,
        "submitted_at": None, "compose_file": None, "project_dir": project_dir,
        "submit_dir": project_dir, "script_path": None, "cache_dir": None,
        "job_name": None, "job_dir": _job_directory(project_dir, job_id),
        "batch_log": _batch_log_path(project_dir, job_id, "hpc-compose"), "services": [],
        "metrics_enabled": False, "artifact_export_dir": None, "resume_dir": None,
        "untracked": True,
    }


def _same_file(a, b):
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _latest_job_record(project_dir, compose_file=None):
    """The newest record of this directory, or of ``compose_file`` when several share it."""
    latest = _load_json(_latest_record_path(project_dir))
    if not isinstance(latest, dict) or not _is_job_id(latest.get("job_id", "")):
        latest = None
    if compose_file is None or latest is None or _same_file(latest.get("compose_file"),
                                                            compose_file):
        return latest
    # Two compose files in one directory share .hpc-compose/: find this file's newest job.
    mine = [r for r in _list_job_records(project_dir) if _same_file(r.get("compose_file"),
                                                                   compose_file)]
    return mine[-1] if mine else None


def _load_job_record(project_dir, job_id=None, compose_file=None):
    """The tracked record of ``job_id`` (or of the latest submission); raises UsageError if none."""
    if job_id is not None:
        job_id = str(job_id).strip()
        if not _is_job_id(job_id):
            raise UsageError("--job-id must be a numeric Slurm job id (or the local-... id of "
                             "an up --local run), got %r" % job_id)
        record = _load_json(_job_record_path(project_dir, job_id))
        if not isinstance(record, dict):
            return _minimal_job_record(project_dir, job_id)
    else:
        record = _latest_job_record(project_dir, compose_file)
        if record is None:
            where = _tracking_root(project_dir)
            if compose_file:
                where += " for %s" % os.path.basename(compose_file)
            raise UsageError("no tracked job in %s" % where,
                             hint="submit one with 'hpc-compose submit', or pass --job-id ID")
    record.setdefault("project_dir", project_dir)
    record.setdefault("job_dir", _job_directory(project_dir, record["job_id"]))
    record.setdefault("services", [])
    return record


def _list_job_records(project_dir):
    """Every tracked record under ``jobs/``, oldest first (unreadable files skipped)."""
    directory = os.path.join(_tracking_root(project_dir), "jobs")
    records = []
    try:
        names = os.listdir(directory)
    except OSError:
        return records
    for name in names:
        if name.endswith(".json") and _is_job_id(name[:-5]):
            record = _load_json(os.path.join(directory, name))
            if isinstance(record, dict) and str(record.get("job_id")) == name[:-5]:
                records.append(record)
    records.sort(key=lambda r: (r.get("submitted_at") or 0, _job_id_order(r["job_id"])))
    return records


def _record_log_sources(record, service=None):
    """``[(service name, log path), ...]`` of a record, optionally one service (UsageError if unknown)."""
    sources = [(s.get("name"), s.get("log_path")) for s in record.get("services", [])
               if isinstance(s, dict) and s.get("name") and s.get("log_path")]
    if not sources:
        # An untracked job id: take whatever the batch script wrote.
        state = _load_runtime_state(record["job_dir"]) or {}
        sources = [(s["name"], s["log_path"]) for s in state.get("services", [])
                   if s.get("name") and s.get("log_path")]
        if not sources:
            logs = os.path.join(record["job_dir"], "logs")
            try:
                sources = [(name[:-4], os.path.join(logs, name))
                           for name in sorted(os.listdir(logs)) if name.endswith(".log")]
            except OSError:
                sources = []
    if service is not None:
        chosen = [pair for pair in sources if pair[0] == service]
        if not chosen:
            raise UsageError("job %s has no service '%s'" % (record["job_id"], service),
                             hint="services: %s" % (", ".join(n for n, _ in sources) or "(none)"))
        return chosen
    return sources


# --- scheduler (squeue, sacct, scancel, sbatch) ---------------------------------------------------

def _normalize_slurm_state(text):
    """``CANCELLED by 123`` -> ``CANCELLED``; ``COMPLETED+`` -> ``COMPLETED``; empty -> ``UNKNOWN``."""
    text = (text or "").strip()
    if not text:
        return "UNKNOWN"
    return text.split()[0].rstrip("+").upper()


def _known_value(value):
    value = (value or "").strip()
    return None if value.lower() in _ABSENT_VALUES else value


def _squeue_state(job_id, squeue_bin="squeue"):
    """The job's state while Slurm still lists it in the queue, else ``None`` (one squeue call)."""
    result = _run_command([squeue_bin, "-h", "-j", str(job_id), "-o", "%T|%r|%S"],
                          timeout=_scheduler_timeout())
    if result.returncode != 0:
        # A job purged from slurmctld's memory is "Invalid job id"; anything else (controller
        # down, timeouts) says nothing about the job and must not be read as "it left".
        if "invalid job id" in (result.stderr or "").lower():
            return None
        raise ToolError("squeue failed: %s" % ((result.stderr or result.stdout).strip()
                                               or "exit %d" % result.returncode))
    for line in result.stdout.splitlines():
        if line.strip():
            parts = (line.split("|") + ["", "", ""])[:3]
            state = _normalize_slurm_state(parts[0])
            reason = _known_value(parts[1]) if state == "PENDING" else None
            return SchedulerState(state, "squeue", reason=reason, start=_known_value(parts[2]))
    return None


def _sacct_state(job_id, sacct_bin="sacct"):
    """The job's accounting record (state, exit code, reason, start, end), or ``None``."""
    result = _run_command([sacct_bin, "-n", "-X", "-P", "-j", str(job_id),
                          "--format=State,ExitCode,Reason,Start,End"],
                          timeout=_scheduler_timeout())
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        if line.strip():
            parts = (line.split("|") + [""] * 5)[:5]
            return SchedulerState(_normalize_slurm_state(parts[0]), "sacct",
                                  reason=_known_value(parts[2]), start=_known_value(parts[3]),
                                  end=_known_value(parts[4]), exit_code=_known_value(parts[1]))
    return None


def _query_scheduler(job_id, squeue_bin="squeue", sacct_bin="sacct", use_sacct=True):
    """Scheduler state: ``squeue`` first; ``sacct`` only once the job is not queued or running.

    When squeue gives no answer, sacct (slurmdbd, not the controller) may still know that the job
    ended; otherwise squeue's ToolError stands.
    """
    try:
        state = _squeue_state(job_id, squeue_bin)
    except ToolError:
        accounted = _sacct_state_or_none(job_id, sacct_bin) if use_sacct else None
        if accounted is not None and accounted.terminal:
            return accounted
        raise
    if state is not None and not state.terminal:
        return state
    if use_sacct:
        try:
            accounted = _sacct_state(job_id, sacct_bin)
        except ToolError:
            accounted = None
        if accounted is not None and (state is None or accounted.terminal):
            return accounted
    return state or SchedulerState("UNKNOWN", "none")


def _sacct_state_or_none(job_id, sacct_bin):
    try:
        return _sacct_state(job_id, sacct_bin)
    except ToolError:
        return None


def _scheduler_timeout():
    """Seconds a squeue/sacct call may take: $HPC_COMPOSE_SCHEDULER_TIMEOUT, else the default."""
    try:
        seconds = float(os.environ.get(_SCHEDULER_TIMEOUT_VARIABLE, ""))
    except ValueError:
        return _SCHEDULER_TIMEOUT_SECONDS
    return seconds if seconds > 0 else _SCHEDULER_TIMEOUT_SECONDS


def _format_moment(stamp):
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp)).strip()


def _query_scheduler_or_files(record, squeue_bin="squeue", sacct_bin="sacct"):
    """``(state, warning)``: the scheduler's answer about a job, or UNKNOWN and a one-line warning.

    status, ps and stats answer from the job's own files when the scheduler does not answer (a
    controller that is down or overloaded, no squeue on this node). The job directory keeps
    ``scheduler.json`` (the last answer, and since when none came) so the warning can say since
    when.
    """
    import time
    if record.get("local"):
        return _local_run_state(record), None  # up --local: its state.json is the truth
    path = os.path.join(record["job_dir"], _SCHEDULER_NOTE_NAME)
    note = _load_json(path)
    note = note if isinstance(note, dict) else {}
    now = time.time()
    try:
        state = _query_scheduler(record["job_id"], squeue_bin, sacct_bin)
    except ToolError as exc:
        since = note.get("silent_since")
        if not isinstance(since, (int, float)):
            since = now
            _write_scheduler_note(path, dict(note, silent_since=since))
        text = "the scheduler did not answer (%s); no answer since %s" % (
            exc.message, _format_moment(since))
        if isinstance(note.get("answered_at"), (int, float)) and note.get("state"):
            text += ", last answer %s: %s" % (_format_moment(note["answered_at"]), note["state"])
        return SchedulerState("UNKNOWN", "none"), text + "; showing what the job's own files say"
    answered = {"answered_at": now, "state": state.state, "source": state.source,
                "silent_since": None}
    if state.source != "none" and (
            note.get("silent_since") or note.get("state") != state.state
            or now - (note.get("answered_at") or 0) > 60):
        _write_scheduler_note(path, answered)
    return state, None


def _write_scheduler_note(path, note):
    # Only into a job directory the batch script already made; a note is never worth an error.
    if os.path.isdir(os.path.dirname(path)):
        try:
            _write_json_atomic(path, note)
        except OSError:
            pass


def _squeue_states(job_ids, squeue_bin="squeue"):
    """``{job_id: STATE}`` for those of ``job_ids`` still in the queue, in one squeue call."""
    job_ids = [str(j) for j in job_ids]
    if not job_ids:
        return {}
    result = _run_command([squeue_bin, "-h", "-j", ",".join(job_ids), "-o", "%i|%T"],
                          timeout=_scheduler_timeout())
    if result.returncode != 0:
        if "invalid job id" in (result.stderr or "").lower():
            return {}
        raise ToolError("squeue failed: %s" % (result.stderr or result.stdout).strip())
    states = {}
    for line in result.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip().split("_")[0]] = _normalize_slurm_state(state)
    return states


def _submit_batch_script(script_path, project_dir, sbatch_bin="sbatch", hold=False,
                         dependency=None, array=None):
    """``sbatch --parsable [--hold] [--dependency=...] [--array=...] <script>`` run from the
    compose dir; returns ``(job_id, cluster)``."""
    argv = [sbatch_bin, "--parsable"] + (["--hold"] if hold else [])
    if array:
        # The command line wins over the script's #SBATCH --array (sweep retry: some tasks).
        argv.append("--array=" + array)
    if dependency:
        # The command line wins over the script's #SBATCH --dependency: it carries both.
        argv.append("--dependency=" + dependency)
    result = _run_command(argv + [script_path], cwd=project_dir, timeout=300)
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())
        hint = "the rendered script is at %s" % script_path
        if dependency and "dependency" in message.lower():
            hint = ("the dependency %s names a job Slurm does not know (or no longer knows); "
                    "check the job id, or submit without it" % dependency)
        raise ToolError("sbatch failed (exit %d): %s" % (result.returncode, message), hint=hint)
    return _parse_sbatch_job_id(result.stdout)


def _release_job(job_id, cluster=None, scontrol_bin="scontrol"):
    """``scontrol release <id>``: let a job submitted with ``--hold`` start."""
    argv = [scontrol_bin] + (["--clusters=" + cluster] if cluster else []) + ["release",
                                                                              str(job_id)]
    result = _run_command(argv, timeout=60)
    if result.returncode != 0:
        raise ToolError("scontrol release %s failed: %s"
                        % (job_id, (result.stderr or result.stdout).strip()
                           or "exit %d" % result.returncode))


_AFTER_TYPES = ("afterok", "afterany", "afternotok")


def _resolve_after(after, after_file):
    """``--after JOB_ID|latest[:TYPE]`` and ``--after-file`` -> the chain kept in the job record."""
    if after is None and after_file is None:
        return None
    target, _, kind = (after or "latest").partition(":")
    kind = kind or "afterok"
    if kind not in _AFTER_TYPES:
        raise UsageError("--after %s: %r is not one of %s" % (after, kind, ", ".join(_AFTER_TYPES)))
    compose_file = None
    if target == "latest":
        if after_file is None:
            raise UsageError("--after latest needs --after-file FILE: the compose file whose "
                             "latest tracked job to wait for")
        compose_file = os.path.abspath(after_file)
        if not os.path.isfile(compose_file):
            raise UsageError("--after-file %s: no such file" % after_file)
        parent = _latest_job_record(os.path.dirname(compose_file), compose_file)
        if parent is None:
            raise UsageError("--after-file %s has no tracked job yet" % after_file,
                             hint="submit it first: hpc-compose submit -f %s" % after_file)
        target = parent["job_id"]
    elif not target.isdigit():
        raise UsageError("--after %s: expected a job id or latest" % after)
    elif after_file is not None:
        compose_file = os.path.abspath(after_file)
    return {"job_id": target, "type": kind, "compose_file": compose_file,
            "dependency": "%s:%s" % (kind, target)}


def _dependency_job_ids(expression):
    """The job ids a Slurm dependency expression names, in order."""
    import re
    return re.findall(r"(?<=[:])(\d+(?:_\d+)?)", expression or "")


def _check_dependency_jobs(dependency, squeue_bin="squeue", sacct_bin="sacct"):
    """Refuse a dependency on a job the scheduler does not know: Slurm would take it as satisfied."""
    for job_id in _dependency_job_ids(dependency):
        if _query_scheduler(job_id, squeue_bin, sacct_bin).state == "UNKNOWN":
            raise UsageError("the dependency %s names job %s, which neither squeue nor sacct knows; "
                             "Slurm would consider it satisfied and start this job at once"
                             % (dependency, job_id), hint="check the job id (hpc-compose status "
                             "-f <its compose file> shows it)")


def _format_dependency_wait(record, scheduler, squeue_bin="squeue", sacct_bin="sacct"):
    """Words for a job held by its dependency: whom it waits for, or why it can never run."""
    if scheduler.state != "PENDING" or scheduler.reason not in ("Dependency",
                                                                "DependencyNeverSatisfied"):
        return None
    chain = record.get("after") or {}
    parents = []
    for job_id in _dependency_job_ids(record.get("dependency")):
        where = (" of %s" % chain["compose_file"]
                 if chain.get("job_id") == job_id and chain.get("compose_file") else "")
        state = _query_scheduler(job_id, squeue_bin, sacct_bin)
        parents.append({"job_id": job_id, "where": where, "state": state.state,
                        "exit_code": state.exit_code})
    if scheduler.reason == "Dependency":
        text = "waiting for " + ", ".join("job %s%s (%s)" % (p["job_id"], p["where"], p["state"])
                                          for p in parents) if parents else "waiting for its dependency"
        return {"never_satisfied": False, "text": text, "parents": parents}
    ended = [p for p in parents if p["state"] in _TERMINAL_STATES] or parents
    text = "never able to run (DependencyNeverSatisfied): " + "; ".join(
        "job %s%s ended %s%s" % (p["job_id"], p["where"], p["state"],
                                 " (exit code %s)" % p["exit_code"] if p["exit_code"] else "")
        for p in ended) + " so %s cannot hold; cancel this job" % (record.get("dependency") or
                                                                    "the dependency")
    return {"never_satisfied": True, "text": text, "parents": parents}


def _cancel_job(job_id, scancel_bin="scancel"):
    """``scancel <id>``; raises ToolError with scancel's message when it fails."""
    result = _run_command([scancel_bin, str(job_id)], timeout=60)
    if result.returncode != 0:
        raise ToolError("scancel %s failed: %s"
                        % (job_id, (result.stderr or result.stdout).strip() or "exit %d" % result.returncode))
    return result.stdout


# --- runtime state (state.json written by the batch script) ---------------------------------------

def _load_runtime_state(job_dir):
    """``state.json`` of a job, normalized; ``None`` while it does not exist or is unreadable.

    Read tolerantly: unknown keys are kept, missing ones default, a service entry that is not an
    object is skipped, so an older or newer batch script never breaks ``status``.
    """
    data = _load_json(os.path.join(job_dir, _STATE_FILE_NAME))
    if not isinstance(data, dict):
        return None
    services = []
    for entry in data.get("services") or ():
        if not isinstance(entry, dict) or not entry.get("name"):
            continue
        service = dict(entry)
        service.setdefault("status", "unknown")
        for key in ("pid", "launches", "restarts", "failure_policy", "max_restarts",
                    "last_exit_code", "readiness", "placement", "started_at", "finished_at",
                    "log_path", "token"):
            service.setdefault(key, None)
        services.append(service)
    state = dict(data)
    state["services"] = services
    for key in ("status", "exit_code", "reason", "attempt", "updated_at"):
        state.setdefault(key, None)
    return state


def _load_attempt_states(job_dir):
    """``[(attempt, state or None), ...]`` of a job with x-slurm.resume (``attempts/<n>/``), oldest first."""
    root = os.path.join(job_dir, "attempts")
    try:
        names = os.listdir(root)
    except OSError:
        return []
    attempts = sorted(int(name) for name in names if name.isdigit())
    return [(n, _load_runtime_state(os.path.join(root, str(n)))) for n in attempts]


def _attempt_to_dict(attempt, state):
    """One attempt of a requeued job as JSON-ready data (for ``status``)."""
    state = state or {}
    return {"attempt": attempt, "status": state.get("status") or "not started",
            "exit_code": state.get("exit_code"), "reason": state.get("reason"),
            "signals": state.get("signals") or []}


def _format_signal(entry):
    """``SIGUSR1 at T -> requeue (train: SIGINT)``: one recorded signal of state.json."""
    targets = ", ".join("%s: SIG%s" % (t.get("service"), t.get("signal"))
                        for t in entry.get("forwarded_to") or () if isinstance(t, dict))
    return "SIG%s at %s -> %s (%s)" % (entry.get("signal"), entry.get("received_at"),
                                      entry.get("action"), targets or "no running service")


def _format_runtime_failure(state):
    """One phrase naming the failed services from state.json (or ``None``)."""
    if not state:
        return None
    reason = str(state["reason"]) if state.get("reason") else None
    # The batch script's own reason usually names the culprit already; add only who it leaves out.
    failed = [s for s in state["services"] if s.get("status") == "failed"
              and not (reason and "'%s'" % s["name"] in reason)]
    parts = [reason] if reason else []
    for service in failed:
        text = "service '%s' failed" % service["name"]
        if service.get("last_exit_code") not in (None, 0):
            text += " (exit %s)" % service["last_exit_code"]
        readiness = service.get("readiness")
        if isinstance(readiness, dict) and readiness.get("status") == "timeout":
            text += " (readiness %s timed out)" % readiness.get("type", "probe")
        parts.append(text)
    return "; ".join(parts) or None


def _jobs_in_progress(project_dir, squeue_bin="squeue"):
    """``[(job_id, record)]`` for tracked jobs of a project that may still run.

    A final ``state.json`` (or record status) means finished. Otherwise one ``squeue`` call
    decides: a job no longer in the queue has ended (it may have died before writing a final
    state). When squeue cannot answer, the job counts as running: pruning must never guess.
    """
    import glob
    unsure = []
    for path in sorted(glob.glob(os.path.join(project_dir, _METADATA_DIR_NAME, "jobs", "*.json"))):
        record = _load_json(path)
        if not isinstance(record, dict):
            continue
        job_id = str(record.get("job_id") or os.path.basename(path)[:-len(".json")])
        state = _load_json(os.path.join(project_dir, _METADATA_DIR_NAME, job_id, _STATE_FILE_NAME))
        status = state.get("status") if isinstance(state, dict) else None
        if status is None and isinstance(record.get("status"), str):
            status = record["status"]
        if status is not None and status.lower() in _FINAL_RUNTIME_STATUSES:
            continue
        unsure.append((job_id, record))
    if not unsure:
        return []
    try:
        queued = _squeue_states([job_id for job_id, _ in unsure if job_id.isdigit()], squeue_bin)
    except ToolError:
        return unsure
    return [(job_id, record) for job_id, record in unsure
            if not job_id.isdigit() or job_id in queued]


# --- logs -----------------------------------------------------------------------------------------

def _tail_lines(path, count):
    """The last ``count`` lines of a file (fewer if it is shorter; ``[]`` if it is missing)."""
    if count <= 0:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            block, data = 65536, b""
            position = end
            while position > 0 and data.count(b"\n") <= count:
                step = min(block, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-count:]


class _LogFollower(object):
    """Follows several log files by offset: complete lines only, files that appear later, truncation.

    ``poll()`` returns ``[(name, line), ...]`` of new complete lines; ``flush()`` also returns the
    partial last lines (used once the job has ended).
    """

    def __init__(self, sources, from_end=False):
        self.sources = list(sources)
        self.offsets = {}
        self.partial = {}
        self.modified = {}
        for name, path in self.sources:
            size = 0
            if from_end:
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = 0
            self.offsets[path] = size
            self.partial[path] = b""

    def _read(self, path):
        try:
            status = os.stat(path)
        except OSError:
            return b""
        size, self.modified[path] = status.st_size, status.st_mtime_ns
        if size < self.offsets[path]:
            # Truncated or replaced: start over rather than miss what is there now.
            self.offsets[path] = 0
            self.partial[path] = b""
        if size == self.offsets[path]:
            return b""
        try:
            with open(path, "rb") as handle:
                handle.seek(self.offsets[path])
                # Bounded per poll so a log that explodes never balloons our memory; the rest
                # is read on the next polls.
                data = handle.read(min(size - self.offsets[path], 4 << 20))
        except OSError:
            return b""
        self.offsets[path] += len(data)
        return data

    def poll(self):
        """New complete lines since the last call, file by file, the file written last at the end
        (the teardown that a final service's last line caused comes after that line)."""
        chunks = []
        for order, (name, path) in enumerate(self.sources):
            data = self.partial[path] + self._read(path)
            if not data:
                continue
            pieces = data.split(b"\n")
            self.partial[path] = pieces.pop()
            if pieces:
                chunks.append((self.modified.get(path, 0), order,
                               [(name, piece.decode("utf-8", "replace")) for piece in pieces]))
        chunks.sort(key=lambda chunk: chunk[:2])
        return [line for _, _, lines in chunks for line in lines]

    def flush(self):
        """New complete lines plus every held partial line."""
        lines = self.poll()
        for name, path in self.sources:
            if self.partial[path]:
                lines.append((name, self.partial[path].decode("utf-8", "replace")))
                self.partial[path] = b""
        return lines


def _format_log_line(name, line):
    """``[service] line``: the prefix every streamed log line gets."""
    return "[%s] %s" % (name, line.rstrip("\r"))


# Slurm's report of a step that was signalled or ended (srun's and slurmstepd's words, 22.05 to
# 26.05), as it reaches the step's output. 26.05 puts a time stamp before slurmstepd's line and
# names the signal (``[2026-12-06T11:03:36.835] error: *** STEP 263.0 ON vm CANCELLED AT ... DUE to
# SIGNAL Terminated ***``). A cancellation for a reason of Slurm's own (``... DUE TO TIME LIMIT
# ***``, upper case) is not among them.
_SLURM_STOP_REPORTS = (
    r"(slurmstepd(-\S+)?: )?(\[\S+\] )?error: \*\*\* STEP \S+ ON \S+ CANCELLED AT \S+"
    r"( DUE to SIGNAL \S+)? \*\*\*",
    r"srun: error: \S+: tasks? \S+: (Terminated|Killed)",
    r"srun: Force Terminated (StepId=)?\S+",
    r"srun: forcing job termination",
    r"srun: Job step aborted: Waiting up to \d+ seconds for job step to finish\.",
    r"srun: launch/slurm: _step_signal: Terminating StepId=\S+",
    r"srun: Received task exit notification for \d+ tasks? of StepId=\S+ \(status=0x[0-9a-f]+\)\.",
)


class _StopNotes(object):
    """Prefixed output (``up``, ``logs``) of the services that hpc-compose stopped on purpose.

    Before it signals such a service (the job's final services ended, the job failed, a restart),
    the batch script notes the stop in the service's log (``note_stop``); Slurm then reports the
    stop in words that read like a failure (``error: *** STEP 1.0 ON vm CANCELLED AT ...``,
    ``srun: error: vm: task 0: Terminated``). ``line`` shows the note as one line of hpc-compose's
    own and leaves those reports out. The log file keeps them, and a stop for another reason
    (scancel, the time limit, a node failure) has no note: Slurm's words are shown.
    """

    def __init__(self):
        import re
        self.note = re.compile(re.escape(_RESTART_MARKER)
                               + r" stopping service '.*' \((SIG[A-Z0-9]+)\) at \S+ after (.+)$")
        self.report = re.compile("(%s)$" % "|".join(_SLURM_STOP_REPORTS))
        self.stopped = set()

    def line(self, name, text):
        """What prefixed output shows for ``text`` of service ``name``; ``None``: nothing."""
        match = self.note.match(text)
        if match:
            self.stopped.add(name)
            return "stopped by hpc-compose after %s (%s)" % (match.group(2), match.group(1))
        if text.startswith(_RESTART_MARKER):
            self.stopped.discard(name)  # launched again: Slurm's next report is news
        elif name in self.stopped and self.report.match(text):
            return None
        return text


def _prefixed_lines(stream):
    """``show`` for ``watch_job`` and local runs: ``[service] line``, stop notes as ``_StopNotes``."""
    notes = _StopNotes()

    def show(name, line):
        text = notes.line(name, line.rstrip("\r"))
        if text is not None:
            stream.write(_format_log_line(name, text) + "\n")
    return show


# --- logs: interleaved reading, --since, --timestamps, colours ------------------------------------

class _LogLine(NamedTuple):
    written_ms: int                # when it was written, as close as the timing index tells
    name: str                      # the service
    text: str


_LOG_COLOURS = ("36", "33", "32", "35", "34", "31", "96", "93", "92", "95", "94", "91")


def _load_log_times(log_path):
    """``[(size, epoch ms), ...]`` from the supervisor's timing index beside ``log_path``."""
    entries = []
    try:
        with open(log_path[:-len(".log")] + _LOG_TIMES_SUFFIX) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                    entries.append((int(fields[1]), int(fields[0])))
    except OSError:
        return []
    entries.sort()
    return entries


def _tail_block(path, count):
    """``(offset, bytes)``: enough of the end of ``path`` to hold its last ``count`` lines."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    return position, data


def _load_service_lines(name, path, count):
    """The last ``count`` lines of one service log as ``_LogLine``s, timed by its index."""
    import bisect
    if count <= 0:
        return []
    try:
        offset, data = _tail_block(path, count)
        modified_ms = int(os.stat(path).st_mtime * 1000)
    except OSError:
        return []
    times = _load_log_times(path)
    sizes = [size for size, _ in times]
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    ends, end = [], offset
    for piece in pieces:
        end += len(piece) + 1
        ends.append(end)
    if offset > 0:                 # the first piece is the tail of a line we do not show
        pieces, ends = pieces[1:], ends[1:]
    lines = []
    for piece, end in list(zip(pieces, ends))[-count:]:
        # The first index entry whose size covers the line's end is the tick that saw it written;
        # a line after the last tick (or without an index) is as old as the file's last change.
        at = bisect.bisect_left(sizes, min(end, offset + len(data)))
        written = times[at][1] if at < len(times) else modified_ms
        lines.append(_LogLine(written, name, piece.decode("utf-8", "replace").rstrip("\r")))
    return lines


def _load_interleaved_lines(sources, count, since_ms=None):
    """The last ``count`` lines of each source, merged in the order they were written."""
    lines = []
    for name, path in sources:
        lines.extend(line for line in _load_service_lines(name, path, count)
                     if since_ms is None or line.written_ms >= since_ms)
    # Stable: lines written in the same tick keep service order, and file order within a service.
    lines.sort(key=lambda line: line.written_ms)
    return lines


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_since(text, now=None):
    """``--since``: a duration (``90s``, ``10m``, ``1h30m``, ``2d``), an ISO 8601 time (local time
    without a zone) or Unix seconds, as epoch milliseconds; UsageError otherwise."""
    import re
    import time
    now = time.time() if now is None else now
    value = text.strip()
    if re.match(r"^(\d+(\.\d+)?[smhd])+$", value):
        seconds = sum(float(number) * _DURATION_UNITS[unit]
                      for number, _, unit in re.findall(r"(\d+(\.\d+)?)([smhd])", value))
        return int((now - seconds) * 1000)
    if re.match(r"^\d+(\.\d+)?$", value):
        return int(float(value) * 1000)
    match = re.match(r"^(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(\.\d+)?)?)?"
                     r"(Z|[+-]\d\d:?\d\d)?$", value)
    if match:
        import calendar
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        fields = (int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                  int(second or 0), 0, 0, -1)
        try:
            if zone is None:
                seconds = time.mktime(fields)
            else:
                seconds = calendar.timegm(fields)
                if zone != "Z":
                    sign = -1 if zone[0] == "+" else 1
                    digits = zone[1:].replace(":", "")
                    seconds += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        except (OverflowError, ValueError):
            match = None
        else:
            return int((seconds + float(fraction or 0)) * 1000)
    raise UsageError("--since takes a duration (90s, 10m, 1h30m, 2d), a time "
                     "(2026-11-29T15:04:05, with Z or +01:00 for a zone) or Unix seconds; got %r"
                     % text)


def _format_log_time(written_ms):
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(written_ms // 1000)) \
        + ".%03dZ" % (written_ms % 1000)


class _LogPrinter(object):
    """Writes ``_LogLine``s as ``logs`` shows them: prefix, timestamp, per-service colour."""

    def __init__(self, names, out, prefix=True, timestamps=False, colour=False):
        self.out = out
        self.prefix = prefix
        self.notes = _StopNotes()
        self.timestamps = timestamps
        self.colours = {}
        if colour:
            self.colours = dict((name, _LOG_COLOURS[i % len(_LOG_COLOURS)])
                                for i, name in enumerate(names))

    def write(self, line):
        text = line.text.rstrip("\r")
        if self.prefix:
            text = self.notes.line(line.name, text)
            if text is None:
                return
        if self.timestamps:
            text = _format_log_time(line.written_ms) + " " + text
        self._emit(line.name, text)

    def note(self, name, text):
        """A line of hpc-compose's own (an attempt marker): prefixed, never timestamped."""
        self.notes.stopped.discard(name)
        self._emit(name, text)

    def _emit(self, name, text):
        if self.prefix:
            label = "[%s]" % name
            if name in self.colours:
                label = "\033[%sm%s\033[0m" % (self.colours[name], label)
            text = label + " " + text
        self.out.write(text + "\n")


def _use_colour(stream):
    """Colours only on a terminal, and never with NO_COLOR set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- watch ----------------------------------------------------------------------------------------

class _SchedulerPoller(object):
    """Asks the scheduler about one job at an adaptive interval and counts its calls.

    ``squeue`` while the job is listed in the queue; ``sacct`` after it left (or squeue shows it
    ended, for the exit code). Interval: _WATCH_POLL_FIRST, doubling to _WATCH_POLL_MAX, reset to the
    first after a state change.
    """

    def __init__(self, job_id, squeue_bin="squeue", sacct_bin="sacct", clock=None,
                 first=_WATCH_POLL_FIRST, cap=_WATCH_POLL_MAX):
        import time
        self.job_id = job_id
        self.squeue_bin = squeue_bin
        self.sacct_bin = sacct_bin
        self.clock = clock or time.monotonic
        self.first = first
        self.cap = cap
        self.interval = first
        self.next_at = self.clock()
        self.calls = 0
        self.state = SchedulerState("UNKNOWN", "none")
        self.seen_in_queue = False
        self.left_queue = False
        self.unknown_since = None
        self.silence = None        # why the scheduler does not answer, while it does not

    def due(self):
        return self.clock() >= self.next_at

    def poll(self):
        """One query (squeue, or sacct once out of the queue); returns ``(state, changed)``."""
        state = None
        if not self.left_queue:
            self.calls += 1
            try:
                state = _squeue_state(self.job_id, self.squeue_bin)
            except ToolError as exc:
                if _find_executable(self.squeue_bin) is None:
                    raise
                return self._skip(exc)  # a transient controller problem: keep the last state
            self.silence = None
            if state is not None:
                self.seen_in_queue = True
            elif self.seen_in_queue:
                self.left_queue = True  # from now on only sacct can know it
        if state is None or state.terminal:
            self.calls += 1
            try:
                accounted = _sacct_state(self.job_id, self.sacct_bin)
            except ToolError:
                accounted = None
            if accounted is not None and (state is None or accounted.terminal):
                state = accounted
        now = self.clock()
        if state is None:
            if self.unknown_since is None:
                self.unknown_since = now
            state = SchedulerState("UNKNOWN", "none")
        else:
            self.unknown_since = None
        changed = (state.state, state.source) != (self.state.state, self.state.source)
        self.state = state
        self.interval = self.first if changed else min(self.interval * 2, self.cap)
        self.next_at = now + self.interval
        return state, changed

    def _skip(self, error):
        self.silence = error.message
        self.interval = min(self.interval * 2, self.cap)
        self.next_at = self.clock() + self.interval
        return self.state, False

    def hurry(self):
        """Query soon and keep the interval short (the job is known to be ending)."""
        self.interval = self.first
        self.cap = self.first
        self.next_at = min(self.next_at, self.clock() + 0.5)

    def lost(self):
        """True when neither squeue nor sacct has known the job for _ACCOUNTING_GRACE_SECONDS."""
        return (self.unknown_since is not None
                and self.clock() - self.unknown_since > _ACCOUNTING_GRACE_SECONDS)


class WatchOutcome(NamedTuple):
    """What ``watch_job`` returns: how the job ended, and what following it cost."""
    scheduler: SchedulerState
    runtime: Optional[Dict[str, object]]  # state.json's JSON object, or None
    ok: bool
    reason: str
    scheduler_calls: int
    seconds: float


def watch_job(record, squeue_bin="squeue", sacct_bin="sacct", out=None, sleep=None, clock=None,
              sources=None, show=None) -> WatchOutcome:
    """Stream every service log (prefixed) and follow the scheduler until the job ends.

    ``sources``: the ``(service, log path)`` pairs to stream (default: every service);
    ``show(service, line)`` prints one line (default: ``[service] line`` on ``out``).
    """
    import time
    out = out or sys.stdout
    show = show or _prefixed_lines(out)
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    started = clock()
    job_id = record["job_id"]
    follower = _LogFollower(_record_log_sources(record) if sources is None else sources)
    poller = _SchedulerPoller(job_id, squeue_bin, sacct_bin, clock=clock)
    out.write("watching job %s (Ctrl-C stops watching, not the job)\n" % job_id)
    out.flush()
    state_path = os.path.join(record["job_dir"], _STATE_FILE_NAME)
    state_seen = None
    told_silence = False
    while True:
        for name, line in follower.poll():
            show(name, line)
        # state.json is free to read: once the batch script says it is done, ask the scheduler
        # promptly instead of waiting out a backed-off interval.
        try:
            stamp = os.stat(state_path).st_mtime
        except OSError:
            stamp = None
        if stamp != state_seen:
            state_seen = stamp
            runtime = _load_runtime_state(record["job_dir"])
            if runtime and runtime.get("status") in _FINAL_RUNTIME_STATUSES:
                poller.hurry()
        if poller.due():
            state, changed = poller.poll()
            if bool(poller.silence) != told_silence:
                # An outage is said once when it starts and once when it ends, not at every poll.
                told_silence = bool(poller.silence)
                out.write("scheduler: no answer (%s); still watching the logs\n" % poller.silence
                          if told_silence else "scheduler: answering again\n")
            if changed:
                text = "scheduler: job %s %s" % (job_id, state.state)
                if state.reason:
                    text += " (%s)" % state.reason
                out.write(text + "\n")
            if state.terminal or poller.lost() or _ended_unaccounted(state, record):
                break
        out.flush()
        sleep(_LOG_POLL_SECONDS)
    # The batch script may still be finishing its last writes when the scheduler says done (on
    # several nodes, srun relays the last lines of remote tasks after Slurm already reports the
    # end): every log line is printed before the verdict, so wait for the final state.json.
    _settle_logs(record, follower, show, sleep, clock)
    runtime = _load_runtime_state(record["job_dir"])
    state = poller.state
    ok = state.state == "COMPLETED"
    if ok:
        reason = "job %s COMPLETED" % job_id
    elif not state.terminal and _runtime_final(runtime):
        ok, reason = _conclusion_from_state(job_id, runtime)
    elif not state.terminal:
        reason = ("job %s could not be tracked: neither squeue nor sacct knows it"
                  % job_id)
    else:
        reason = "job %s ended %s" % (job_id, state.state)
        if state.exit_code and state.exit_code != "0:0":
            reason += " (exit %s)" % state.exit_code
        if state.state == "NODE_FAIL":
            reason += ": " + _format_node_failure(record)
        summary = _format_runtime_failure(runtime)
        if summary:
            reason += ": " + summary
    out.flush()
    return WatchOutcome(state, runtime, ok, reason, poller.calls, clock() - started)


def _runtime_final(runtime):
    return bool(runtime) and runtime.get("status") in _FINAL_RUNTIME_STATUSES


def _ended_unaccounted(state, record):
    """True when neither squeue nor sacct knows the job but its state.json says it has ended."""
    return state.state == "UNKNOWN" and _runtime_final(_load_runtime_state(record["job_dir"]))


def _conclusion_from_state(job_id, runtime):
    """``(ok, reason)`` from the job's own state.json, for clusters without job accounting."""
    text = "job %s %s according to its state.json (exit code %s)" % (
        job_id, runtime["status"], runtime.get("exit_code"))
    ok = runtime["status"] == "completed"
    if not ok:
        summary = _format_runtime_failure(runtime)
        if summary:
            text += ": " + summary
    return ok, text + ("; neither squeue nor sacct knows the job any more (is job accounting "
                       "disabled on this cluster?), so this comes from the batch script itself")


def _settle_logs(record, follower, show, sleep, clock):
    """Print log lines until state.json is final (at most _STATE_SETTLE_SECONDS), then the rest."""
    deadline = clock() + _STATE_SETTLE_SECONDS
    while not _runtime_final(_load_runtime_state(record["job_dir"])) and clock() < deadline:
        for name, line in follower.poll():
            show(name, line)
        sleep(_LOG_POLL_SECONDS)
    for name, line in follower.flush():
        show(name, line)


def _job_nodes(record):
    path = os.path.join(record["job_dir"], "allocation", "nodes.txt")
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    except (OSError, ValueError):
        return []


def _format_node_failure(record, sinfo_bin="sinfo"):
    """Which of the job's nodes Slurm holds as failed, in words (for a NODE_FAIL end)."""
    nodes = _job_nodes(record)
    failed = []
    if nodes:
        try:
            result = _run_command([sinfo_bin, "-h", "-N", "-n", ",".join(nodes), "-o", "%N|%T|%E"],
                                 timeout=60)
        except ToolError:
            result = None
        lines = (result.stdout or "").splitlines() if result and result.returncode == 0 else ()
        for line in lines:
            name, state, why = (line.split("|") + ["", ""])[:3]
            word = state.rstrip("*~#!%$@^-").lower()
            # A trailing * is sinfo's "not responding".
            if word in ("down", "drained", "draining", "fail", "failing") or state.endswith("*"):
                text = "node %s is %s" % (name, word)
                if _known_value(why):
                    text += " (%s)" % why
                elif state.endswith("*"):
                    text += " (not responding)"
                if text not in failed:
                    failed.append(text)
    if nodes and not failed:
        failed = _node_events(nodes, record.get("submitted_at"))
    if failed:
        return "a node of the job failed (%s); Slurm ended the job on every node" % "; ".join(failed)
    return "a node of the job failed; Slurm ended the job on every node"


def _node_events(nodes, since, sacctmgr_bin="sacctmgr"):
    """Down events of ``nodes`` since the job was submitted, from accounting (the node may be back
    up by now, so sinfo no longer shows it): ``["node n3 was down* 14:59:12..14:59:28 (...)"]``."""
    import time
    if not since:
        return []
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(float(since) - 60))
    try:
        result = _run_command([sacctmgr_bin, "-n", "-P", "show", "event", "nodes=" + ",".join(nodes),
                              "start=" + start, "format=NodeName,TimeStart,TimeEnd,State,Reason"],
                             timeout=60)
    except ToolError:
        return []
    events = []
    for line in (result.stdout or "").splitlines() if result.returncode == 0 else ():
        name, begin, end, state, why = (line.split("|") + [""] * 5)[:5]
        if name and (state.rstrip("*~#!%$@^-").upper() in ("DOWN", "DRAIN", "FAIL")
                     or state.endswith("*")):
            text = "node %s was %s from %s to %s" % (name, state.rstrip("*").lower() or "down",
                                                     begin, _known_value(end) or "now")
            if _known_value(why):
                text += " (%s)" % why
            events.append(text)
    return events


def _follow_logs(record, sources, squeue_bin="squeue", sacct_bin="sacct", out=None, sleep=None,
                clock=None, printer=None):
    """``logs --follow``: print new lines as they appear until the job ends (sparse job checks).

    Lines are printed in the order they are read, so services interleave as they write (to within
    _LOG_POLL_SECONDS); ``printer`` (a ``_LogPrinter``) formats them, by default ``[service] line``.
    """
    import time
    out = out or sys.stdout
    sleep = sleep or time.sleep
    printer = printer or _LogPrinter([name for name, _ in sources], out)
    follower = _LogFollower(sources, from_end=True)
    poller = _SchedulerPoller(record["job_id"], squeue_bin, sacct_bin, clock=clock,
                             first=5.0, cap=_WATCH_POLL_MAX)
    poller.next_at += poller.first
    runtime = _load_runtime_state(record["job_dir"])
    if runtime and runtime.get("status") in _FINAL_RUNTIME_STATUSES:
        poller.hurry()  # the job looks finished already: confirm it at once
    # Why the scheduler is not asked: no Slurm client here, no controller; a local run (up --local),
    # whose state.json says when it ends.
    silence = "no client" if record.get("local") else None
    while True:
        for name, line in follower.poll():
            printer.write(_LogLine(int(time.time() * 1000), name, line))
        out.flush()
        if silence != "no client" and poller.due():
            try:
                state, _ = poller.poll()
            except ToolError as exc:
                _warn_follow_silence(exc.message)
                silence, state = "no client", None
            if state is not None and (state.terminal or poller.lost()):
                break
            if poller.silence and silence is None:
                _warn_follow_silence(poller.silence)
                silence = "outage"
            elif silence == "outage" and not poller.silence:
                silence = None
        if silence:
            # Without the scheduler, the job's own state.json says when it has ended.
            runtime = _load_runtime_state(record["job_dir"])
            if runtime and runtime.get("status") in _FINAL_RUNTIME_STATUSES:
                break
        sleep(_LOG_POLL_SECONDS)
    for name, line in follower.flush():
        printer.write(_LogLine(int(time.time() * 1000), name, line))
    out.flush()
    return poller.state


def _warn_follow_silence(reason):
    import time
    _warn("the scheduler did not answer (%s) at %s; following the log files until the job's "
          "state.json says it ended" % (reason, _format_moment(time.time())))


# --- exec: a command inside a running service -----------------------------------------------------

_RUNNING_SERVICE_STATUSES = frozenset(("starting", "running", "ready"))

# The default command of `exec`: an interactive shell, bash when the image (or node) has it.
_EXEC_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash; fi; exec sh"]

# Run inside the step `exec` starts (in the container with Pyxis, which joins the service's
# namespaces but starts from the image's environment): the command gets the environment and working
# directory of the service's first process, read from /proc, then --workdir and -e apply. That
# process is the step's first task (scontrol listpids STEP) on the host runtime, and in a container
# the oldest process sharing this mount namespace (`-ef` on /proc/PID/ns/mnt: no fork per process).
# The entries of /proc/PID/environ are NUL-separated: bash reads them exactly, plain sh by lines.
_EXEC_SCRIPT = r"""step=$1 workdir=$2
shift 2
pid=''
if [ -n "$step" ]; then
    pid=$(scontrol listpids "$step" 2>/dev/null | awk '$4 ~ /^[0-9]+$/ {print $1; exit}')
else
    for entry in /proc/[0-9]*; do
        candidate=${entry#/proc/}
        [ "$candidate" = "$$" ] && continue
        if [ "$entry/ns/mnt" -ef /proc/self/ns/mnt ] && { [ -z "$pid" ] || [ "$candidate" -lt "$pid" ]; }; then
            pid=$candidate
        fi
    done
fi
if [ -n "$pid" ] && [ -r "/proc/$pid/environ" ]; then
    cd -P "/proc/$pid/cwd" 2>/dev/null || true
    [ -z "$workdir" ] || cd "$workdir" || exit 1
    if command -v bash >/dev/null 2>&1; then
        exec bash -c 'vars=()
            while IFS= read -r -d "" entry; do vars+=("$entry"); done <"/proc/$1/environ"
            shift
            exec env -i "${vars[@]}" "$@"' bash "$pid" "$@"
    fi
    # Without bash the entries are read as lines: a value with a line break is cut there.
    count=$#
    while IFS= read -r line; do
        case $line in [A-Za-z_]*=*) set -- "$@" "$line" ;; esac
    done <<EOF
$(tr '\0' '\n' <"/proc/$pid/environ")
EOF
    while [ "$count" -gt 0 ]; do set -- "$@" "$1"; shift; count=$((count - 1)); done
    exec env -i "$@"
fi
[ -z "$workdir" ] || cd "$workdir" || exit 1
exec "$@"
"""


# exec into an apptainer service, run by srun on its node: the step's task process is Apptainer;
# its child that is not squashfuse is the service (the payload). nsenter joins the payload's user
# namespace (not as root), mount namespace, root and working directory, with the payload's
# environment (--cleanenv made it the container's), then --workdir and the command.
_APPTAINER_EXEC_SCRIPT = r"""step=$1 workdir=$2
shift 2
task=$(scontrol listpids "$step" 2>/dev/null | awk '$4 ~ /^[0-9]+$/ {print $1; exit}')
payload=''
for child in $(cat "/proc/$task/task/$task/children" 2>/dev/null); do
    case $(cat "/proc/$child/comm" 2>/dev/null) in
        squashfuse*|'') ;;
        *) payload=$child; break ;;
    esac
done
if [ -z "$payload" ]; then
    echo "hpc-compose: no running container process of step $step on $(hostname)" >&2
    exit 1
fi
exec bash -c 'payload=$1 workdir=$2
    shift 2
    vars=()
    while IFS= read -r -d "" entry; do vars+=("$entry"); done <"/proc/$payload/environ"
    namespaces=(-m -r -w)
    (( EUID == 0 )) || namespaces=(-U --preserve-credentials -m -r -w)
    exec nsenter -t "$payload" "${namespaces[@]}" env -i "${vars[@]}" /bin/sh -c \
        "[ -z \"\$1\" ] || cd \"\$1\" || exit 1; shift; exec \"\$@\"" hpc-compose-exec "$workdir" "$@"' \
    bash "$payload" "$workdir" "$@"
"""


class _ExecTarget(NamedTuple):
    job_id: str
    name: str                      # the service
    runtime: str                   # pyxis | apptainer | singularity | host
    node: str
    container_name: Optional[str]  # Pyxis: the name given by the batch script; otherwise None


def _container_name(job_id, token):
    """The name the batch script gives a Pyxis service's container (``enroot list``: ``pyxis_`` + it)."""
    return "%s%s_%s" % (_CONTAINER_NAME_PREFIX, job_id, token)


def _record_service(record, name):
    """The record's entry for service ``name``; unknown names suggest the closest one (exit 1)."""
    services = [s for s in record.get("services", []) if isinstance(s, dict) and s.get("name")]
    for service in services:
        if service["name"] == name:
            return service
    names = [s["name"] for s in services]
    if not names:
        # An untracked --job-id: hpc-compose did not submit it from here, so its services are unknown.
        raise HpcComposeError("job %s is not tracked here (no %s), so exec does not know its "
                              "services" % (record["job_id"],
                                            _job_record_path(record["project_dir"], record["job_id"])))
    close = _closest(name, names)
    text = "job %s has no service '%s'" % (record["job_id"], name)
    if close:
        text += " (did you mean '%s'?)" % close
    elif names:
        text += " (its services: %s)" % ", ".join(names)
    raise HpcComposeError(text)


def _running_service_state(record, name, scheduler):
    """The service's entry in state.json, checking that the job and the service run now (exit 1)."""
    job_id = record["job_id"]
    if scheduler.state != "RUNNING":
        text = "job %s is not running (%s)" % (job_id, scheduler.state)
        if scheduler.state == "UNKNOWN":
            text = "job %s is not running (Slurm does not know it)" % job_id
        raise HpcComposeError(text)
    runtime = _load_runtime_state(record["job_dir"]) or {}
    for service in runtime.get("services", []):
        if service.get("name") == name:
            if service.get("status") in _RUNNING_SERVICE_STATUSES:
                return service
            raise HpcComposeError(
                "service '%s' is not running in job %s (status %s, last exit code %s); its log: %s"
                % (name, job_id, service.get("status"),
                   "none" if service.get("last_exit_code") is None else service["last_exit_code"],
                   service.get("log_path")))
    raise HpcComposeError("service '%s' is not running in job %s: the batch script has not "
                          "started it yet (no entry in %s)"
                          % (name, job_id, os.path.join(record["job_dir"], "state.json")))


def _pick_node(name, nodes, node=None, index=None):
    """The node ``exec`` runs on: ``node`` if the service runs there, the ``index``-th (1-based), or
    the first."""
    if not nodes:
        raise HpcComposeError("service '%s' has no node in state.json yet" % name)
    if node is not None:
        if node not in nodes:
            raise HpcComposeError("service '%s' does not run on node %s (its nodes: %s)"
                                  % (name, node, ",".join(nodes)))
        return node
    if index is not None:
        if not 1 <= index <= len(nodes):
            raise HpcComposeError("service '%s' has %d node(s): --index must be 1 to %d, got %d"
                                  % (name, len(nodes), len(nodes), index))
        return nodes[index - 1]
    return nodes[0]


def _refuse_apptainer_exec(name, runtime):
    """exec outside Slurm cannot join an apptainer service yet: it says so."""
    if runtime in _APPTAINER_RUNTIMES:
        raise HpcComposeError("service '%s' runs with the %s runtime, which exec cannot join in "
                              "up --local outside Slurm yet" % (name, runtime),
                              hint="run the stack inside an allocation (salloc), where exec "
                                   "joins it")


def _exec_target(record, name, scheduler, expand_nodes, node=None, index=None):
    """Where ``exec`` goes: the service, its runtime, node and container; HpcComposeError (exit 1)
    for a job or service that is not running or a runtime that cannot be joined."""
    service = _record_service(record, name)
    state = _running_service_state(record, name, scheduler)
    runtime = service.get("runtime") or "pyxis"
    name_of_container = None
    if runtime == "pyxis":
        name_of_container = service.get("container_name")
        if not name_of_container:
            raise HpcComposeError(
                "service '%s' of job %s runs in a container without a name (the job was submitted "
                "by an older hpc-compose), so exec cannot join it; resubmit the job" % (name,
                                                                                       record["job_id"]))
    # One node, "n1 n2 n3" (the batch script's HPC_COMPOSE_NODELIST) or a Slurm hostlist n[1-3].
    nodelist = (state.get("placement") or {}).get("nodelist") or ""
    nodes = expand_nodes(nodelist) if "[" in nodelist else nodelist.replace(",", " ").split()
    return _ExecTarget(record["job_id"], name, runtime, _pick_node(name, nodes, node, index),
                      name_of_container)


def _exec_srun_argv(target, command, environment=(), workdir=None, tty=False, step=None,
                   srun_bin="srun"):
    """The ``srun`` argv that runs ``command`` in ``target`` (``step``: the host service's step id);
    ``environment`` is ``(KEY, VALUE)`` pairs set on top of the service's environment."""
    argv = [srun_bin, "--jobid=%s" % target.job_id, "--overlap", "--nodes=1", "--ntasks=1",
            "--nodelist=%s" % target.node, "--job-name=hpc-compose-exec", "--quiet"]
    if tty:
        argv.append("--pty")
    command = list(command) or list(_EXEC_SHELL)
    if environment:
        command = ["env"] + ["%s=%s" % pair for pair in environment] + command
    script = _EXEC_SCRIPT
    if target.runtime == "pyxis":
        argv.append("--container-name=%s:exec" % target.container_name)
    elif target.runtime in _APPTAINER_RUNTIMES:
        script = _APPTAINER_EXEC_SCRIPT
    return argv + ["/bin/sh", "-c", script, "hpc-compose-exec", step or "",
                   workdir or ""] + command


def _parse_assignments(values):
    """``-e KEY=VAL`` options as pairs (UsageError for one without ``=`` or with a bad name)."""
    import re
    pairs = []
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError("-e takes KEY=VALUE with KEY a variable name, got %r" % value)
        pairs.append((key, text))
    return pairs


def _expand_nodelist(nodelist, scontrol_bin="scontrol"):
    """``n[1-3]`` -> ``['n1', 'n2', 'n3']`` through ``scontrol show hostnames``."""
    result = _run_command([scontrol_bin, "show", "hostnames", nodelist], timeout=60)
    if result.returncode != 0:
        raise ToolError("scontrol show hostnames %s failed: %s"
                        % (nodelist, (result.stderr or result.stdout).strip()))
    return result.stdout.split()


def _service_step(job_id, token, squeue_bin="squeue"):
    """The ``<job>.<step>`` id of the service's current step, or ``None``."""
    result = _run_command([squeue_bin, "--steps", "--noheader", "--jobs", str(job_id),
                          "--format=%i %j"], timeout=60)
    for line in result.stdout.splitlines() if result.returncode == 0 else ():
        step, _, name = line.strip().partition(" ")
        if name == "hpc-compose:" + token:
            return step
    return None


# --- up --local: the job where you are ------------------------------------------------------------
# `up --local` runs the rendered script with bash right here: inside an allocation (SLURM_JOB_ID set
# by salloc or an interactive srun) its services are srun steps of that allocation; outside Slurm,
# local_step (render) runs them on this machine. Either way the job directory, state.json and logs
# are those of a batch job, and state.json, not the scheduler, says how the run is doing.

_LOCAL_STATES = {"running": "RUNNING", "completed": "COMPLETED", "failed": "FAILED",
                 "cancelled": "CANCELLED", "timeout": "TIMEOUT", "requeued": "FAILED"}


def _local_mode(environ=None):
    """``allocation`` inside a Slurm allocation (SLURM_JOB_ID is set), else ``machine``."""
    environ = os.environ if environ is None else environ
    return "allocation" if environ.get("SLURM_JOB_ID") else "machine"


def _local_job_id(mode, environ=None, now=None, pid=None):
    """The tracked id of a local run: the allocation's job id, or ``local-<UTC time>-<pid>``."""
    import time
    environ = os.environ if environ is None else environ
    if mode == "allocation":
        return environ["SLURM_JOB_ID"]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return "%s%s-%d" % (_LOCAL_JOB_PREFIX, stamp, os.getpid() if pid is None else pid)


def _local_ignored_settings(plan):
    """The x-slurm keys set in ``plan`` that only sbatch acts on, so ``up --local`` passes them
    over: a dependency, raw #SBATCH arguments, the warning signal, requeueing."""
    slurm = plan.slurm
    return [key for key, value in (("dependency", slurm.dependency),
                                   ("submit_args", slurm.submit_args),
                                   ("signal", slurm.signal), ("requeue", slurm.requeue))
            if value not in (None, ())]


def _local_run_state(record):
    """The scheduler state of a local run, as its state.json says (source ``state.json``)."""
    runtime = _load_runtime_state(record["job_dir"]) or {}
    status = runtime.get("status")
    if status is None or status == "running":
        if _local_supervisor_gone(record):
            return SchedulerState("FAILED", "state.json",
                                  reason="its batch script (pid %s) ended without a final "
                                         "state.json" % record.get("local_pid"))
        return SchedulerState("RUNNING", "state.json")
    code = runtime.get("exit_code")
    return SchedulerState(_LOCAL_STATES.get(status, "UNKNOWN"), "state.json",
                          reason=runtime.get("reason"),
                          exit_code=None if code is None else "%s:0" % code)


def _local_supervisor_gone(record):
    """True when the local run's batch script ran on this host and its process has ended."""
    import socket
    pid = record.get("local_pid")
    if not isinstance(pid, int) or record.get("local_host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _local_exec_argv(pid, command, environment=(), workdir=None, enroot_bin="enroot"):
    """``exec`` into a container of a local run outside Slurm: ``enroot exec PID`` and the exec
    script (the environment and directory of the container's first process, then -e, --workdir)."""
    command = list(command) or list(_EXEC_SHELL)
    if environment:
        command = ["env"] + ["%s=%s" % pair for pair in environment] + command
    return [enroot_bin, "exec", str(pid), "/bin/sh", "-c", _EXEC_SCRIPT, "hpc-compose-exec", "",
            workdir or ""] + command


def _mount_namespace(pid):
    """``mnt:[inode]`` of process ``pid`` (or ``self``); None when it cannot be read."""
    try:
        return os.readlink("/proc/%s/ns/mnt" % pid)
    except OSError:
        return None


def _local_exec_pid(record, name, container=False):
    """The pid of service ``name`` of a local run outside Slurm (state.json), checked to be alive
    and, for a ``container``, to be inside it already (enroot start has finished)."""
    state = _running_service_state(record, name, _local_run_state(record))
    pid = state.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OSError):
        raise HpcComposeError("service '%s' of job %s has no live process here (pid %s): exec "
                              "joins a local run on the machine it runs on (%s)"
                              % (name, record["job_id"], pid, record.get("local_host")))
    if container and _mount_namespace(pid) == _mount_namespace("self"):
        raise HpcComposeError("service '%s' of job %s is still starting its container (enroot "
                              "create/start); try again in a moment" % (name, record["job_id"]))
    return int(pid)


# Run by `up --local` inside an allocation, before the batch script: the script starts its steps as
# in a batch job, so the variables of a step this runs in (an interactive `srun --pty bash`, or the
# step on the first node below) give way to the allocation's: srun takes SLURM_NTASKS, SLURM_NNODES
# and the like as the defaults of every step it starts.
_ALLOCATION_PRELUDE = r"""[ -z "$2" ] || echo "$$" >"$2"  # the script's pid on its node (exec keeps it)
for name in "${!SLURM_STEP@}" "${!SLURM_PTY_@}" "${!SLURM_CPU_BIND@}" \
        SLURM_NTASKS SLURM_NPROCS SLURM_NTASKS_PER_NODE SLURM_TASKS_PER_NODE SLURM_PROCID \
        SLURM_LOCALID SLURM_NODEID SLURM_GTIDS SLURM_TASK_PID SLURM_DISTRIBUTION \
        SLURM_SRUN_COMM_HOST SLURM_SRUN_COMM_PORT SLURM_LAUNCH_NODE_IPADDR SLURM_OVERLAP; do
    unset -v "$name"
done
export SLURM_NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
export SLURM_NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
exec bash "$1"
"""


_BATCH_STEP_NAME = "hpc-compose-batch"  # the step of `up --local` run from salloc's shell


def _local_batch_argv(mode, script_path, srun_bin="srun", environ=None, pid_file=""):
    """How ``up --local`` starts the batch script, and whether that is a step of its own. Outside
    Slurm: bash here. Inside an allocation: on a node of it, as sbatch would start it (writing its
    pid to ``pid_file``); ``salloc``'s shell runs on the machine it was typed on (on most clusters
    a login node, outside the allocation, where readiness probes of 127.0.0.1 would miss the
    services), so there the script runs as a step on the allocation's first node."""
    environ = os.environ if environ is None else environ
    if mode != "allocation":
        return ["bash", script_path], False
    argv = ["bash", "-c", _ALLOCATION_PRELUDE, _BATCH_STEP_NAME, script_path, pid_file]
    if environ.get("SLURMD_NODENAME"):  # a shell that is itself a step runs on a node already
        return argv, False
    return [srun_bin, "--overlap", "--nodes=1", "--ntasks=1", "--relative=0",
            "--job-name=" + _BATCH_STEP_NAME, "--kill-on-bad-exit=1", "--quiet"] + argv, True


def _batch_step_pass_on(job_id, pid_file, process, srun_bin="srun"):
    """How a signal reaches the batch script when it runs in a step of its own: SIGTERM to its pid,
    through a step on its node, as scancel of a batch job gives it. Signalled itself, srun would
    end the step at once with SIGKILL (before the teardown is done), and a signal to the whole step
    would reach the services' srun clients and the container keeper too. srun is terminated only
    when the script's pid is not known (it has not started)."""
    def pass_on(number):
        if not _signal_batch_step(job_id, _read_batch_pid(pid_file), srun_bin):
            process.terminate()
    return pass_on


def _batch_pid_path(project_dir, job_id):
    """``.hpc-compose/.<job>.batch-pid``: the batch script's pid, while up --local follows it in
    an allocation (left behind only when up --local died)."""
    return os.path.join(_tracking_root(project_dir), ".%s.batch-pid" % job_id)


def _read_batch_pid(pid_file):
    try:
        with open(pid_file) as handle:
            pid = handle.read().strip()
    except OSError:
        return None
    return pid if pid.isdigit() else None


def _signal_batch_step(job_id, pid, srun_bin="srun"):
    """SIGTERM to the batch script (``pid`` on the allocation's first node) through a small step
    there; False when that was not possible."""
    return pid is not None and _run_command(
        [srun_bin, "--jobid=%s" % job_id, "--overlap", "--nodes=1", "--ntasks=1", "--relative=0",
         "--job-name=" + _BATCH_STEP_NAME + "-signal", "--quiet", "kill", "-TERM", pid],
        timeout=_scheduler_timeout()).returncode == 0


def _stop_orphaned_batch_script(job_id, pid_file, job_dir, srun_bin, say, timeout):
    """In an allocation: an earlier up --local there died without removing its pid file, so its
    batch script may still run. Unless its state.json is final, it gets SIGTERM, as scancel would
    give it, and up to ``timeout`` seconds to tear down."""
    import time
    pid = _read_batch_pid(pid_file)
    state = _load_runtime_state(job_dir) or {}
    if pid is not None and state.get("status") not in _FINAL_RUNTIME_STATUSES:
        say("stopping the earlier run in allocation %s, whose up --local has gone (its batch "
            "script, pid %s, tears down)" % (job_id, pid))
        if _signal_batch_step(job_id, pid, srun_bin):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (_load_runtime_state(job_dir) or {}).get(
                    "status") not in _FINAL_RUNTIME_STATUSES:
                time.sleep(0.5)
    _remove_quietly(pid_file)


def _local_batch_preexec(tied):
    """What the batch script's process does before bash starts: SIGINT back at its default and,
    when ``tied``, SIGTERM from the kernel when we end (PR_SET_PDEATHSIG), even by SIGKILL, so
    that it tears down as for scancel instead of running on with nobody following it. (Not for
    srun: a SIGTERM ends its step at once, teardown and all.)"""
    import signal
    prctl = None
    if tied:
        try:
            import ctypes
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (ImportError, OSError, AttributeError):  # no ctypes, or no prctl (not Linux)
            prctl = None
    parent = os.getpid()

    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:  # we ended before it took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _follow_local_run(process, follower, out, pass_on=None):
    """Print the service logs until the batch script exits. Ctrl-C, SIGTERM and SIGHUP (the
    terminal closed, the allocation ended) are passed on to it once (by ``pass_on(number)`` when
    given), as scancel would pass them, and it tears down; a signal ignored when we started stays
    ignored. Returns its exit code (128 + N when a signal N ended it)."""
    import signal
    import time
    received = []

    def forward(number, frame):
        if not received:
            (pass_on or process.send_signal)(number)
            sys.stderr.write("\nstopping job (%s): every service stops and its containers are "
                             "removed\n" % signal.Signals(number).name)
        received.append(number)

    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) != signal.SIG_IGN:
            previous[number] = signal.signal(number, forward)
    show = _prefixed_lines(out)
    try:
        while True:
            for name, line in follower.poll():
                show(name, line)
            out.flush()
            if process.poll() is not None:
                break
            time.sleep(_LOG_POLL_SECONDS)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    for name, line in follower.flush():
        show(name, line)
    out.flush()
    code = process.returncode
    return 128 - code if code < 0 else code


def _run_local(plan, runtime_plan, mode, job_id, script_path, out, say, srun_bin="srun"):
    """The run part of ``up --local``: track it, start the script, follow its logs (to ``out``).
    Returns its exit code and its tracked record."""
    import socket
    import subprocess
    record = _build_job_record(runtime_plan, job_id, None, script_path)
    record.update(local=mode, local_host=socket.gethostname(), local_pid=None)
    if _secret_services(plan):
        _write_secret_copies(plan, record["job_dir"])
    environment = dict(os.environ, SLURM_SUBMIT_DIR=plan.project_dir)
    environment[_LOCAL_RUN_VARIABLE] = record["job_dir"]
    if mode == "machine":
        environment.update({"SLURM_JOB_ID": job_id, _LAUNCHER_VARIABLE: "local"})
    workdir = plan.project_dir  # where sbatch would start the job: x-slurm.chdir, else the compose dir
    if plan.slurm.chdir:
        workdir = os.path.normpath(os.path.join(plan.project_dir,
                                                os.path.expanduser(str(plan.slurm.chdir))))
    pid_file = _batch_pid_path(plan.project_dir, job_id)
    argv, in_step = _local_batch_argv(mode, script_path, srun_bin, pid_file=pid_file)
    follower = _LogFollower(_record_log_sources(record), from_end=True)
    with open(record["batch_log"], "ab") as batch_log:
        os.chmod(record["batch_log"], _PRIVATE_FILE_MODE)
        # Its own session: a Ctrl-C reaches the batch script through us, once, and its services
        # through its teardown, as scancel would reach them. SIGINT is reset for it, since bash
        # cannot trap a signal that was ignored when it started (as in a background job).
        process = subprocess.Popen(argv, cwd=workdir, env=environment,
                                   stdin=subprocess.DEVNULL, stdout=batch_log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_local_batch_preexec(tied=not in_step))
    record["local_pid"] = process.pid
    _record_job(plan.project_dir, record)
    say("started job %s %s (pid %d): %s" % (
        job_id, "as steps of this allocation" if mode == "allocation" else "on this machine",
        process.pid, script_path))
    say("batch log: %s" % record["batch_log"])
    pass_on = _batch_step_pass_on(job_id, pid_file, process, srun_bin) if in_step else None
    try:
        code = _follow_local_run(process, follower, out, pass_on)
    finally:
        _remove_quietly(pid_file)
    return code, record


def _exec_local(record, name, command, environment, workdir=None, enroot_bin="enroot"):
    """``exec`` into a local run outside Slurm: ``enroot exec`` into the container, or the host
    command with the service's environment and directory (from /proc), on this machine."""
    service = _record_service(record, name)
    _refuse_apptainer_exec(name, service.get("runtime"))
    pid = _local_exec_pid(record, name, container=service.get("runtime") != "host")
    if service.get("runtime") != "host":
        argv = _local_exec_argv(pid, command, environment, workdir, enroot_bin)
        code = _run_command(argv, capture=False).returncode
        return 128 - code if code < 0 else code
    try:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            entries = handle.read().split(b"\0")
        workdir = workdir or os.readlink("/proc/%d/cwd" % pid)
    except OSError as exc:
        raise HpcComposeError("cannot read the environment of service '%s' (pid %d): %s"
                              % (name, pid, exc.strerror or exc))
    variables = dict(os.fsdecode(entry).split("=", 1) for entry in entries if b"=" in entry)
    variables.update(environment)
    argv = ["/bin/sh", "-c", 'exec "$@"', "hpc-compose-exec"] + (list(command) or list(_EXEC_SHELL))
    code = _run_command(argv, env=variables, cwd=workdir, capture=False).returncode
    return 128 - code if code < 0 else code


# --- up --local: what an earlier run left ---------------------------------------------------------
# Every process of a local run carries _LOCAL_RUN_VARIABLE (its job directory) in its environment:
# the batch script, its helpers, the services, and inside containers too. The run's lock tells
# whether an up --local still follows it. A run nobody follows whose processes live on is a
# leftover: its batch script is tearing down (its up --local was killed: the kernel sent it
# SIGTERM), or it was killed itself and its services were orphaned.

class _RunProcess(NamedTuple):
    """A live process of a local run, found by the run's variable in its environment."""
    pid: int
    job_id: str
    service: object                # its HPC_COMPOSE_SERVICE (str); None for the batch script's own
    command: str                   # its command line, shortened


def _shorten(text, limit):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _process_command(pid, proc="/proc"):
    try:
        with open(os.path.join(proc, str(pid), "cmdline"), "rb") as handle:
            command = handle.read().replace(b"\0", b" ").strip()
    except OSError:
        return "?"
    return _shorten(command.decode("utf-8", "replace"), 100)


def _local_run_processes(project_dir, proc="/proc"):
    """The live processes here of this project's local runs (``_RunProcess``, by pid)."""
    prefix = ("%s=%s%s" % (_LOCAL_RUN_VARIABLE, _tracking_root(project_dir), os.sep)).encode()
    service_prefix = b"HPC_COMPOSE_SERVICE="
    found = []
    for name in sorted(os.listdir(proc), key=lambda text: int(text) if text.isdigit() else 0):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(os.path.join(proc, name, "environ"), "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        job_dir = next((e[len(prefix):] for e in entries if e.startswith(prefix)), None)
        command = _process_command(name, proc) if job_dir is not None else ""
        if not command or command == "?":  # not a run's, a zombie, or gone meanwhile
            continue
        service = next((e[len(service_prefix):] for e in entries if e.startswith(service_prefix)),
                       None)
        found.append(_RunProcess(int(name), job_dir.decode("utf-8", "replace").split(os.sep)[0],
                                 None if service is None else service.decode("utf-8", "replace"),
                                 command))
    return found


def _format_run_process(process):
    """``pid 123 (service 'web': python3 -m http.server 8000)``."""
    return "pid %d (%s%s)" % (process.pid, "service '%s': " % process.service
                              if process.service else "", process.command)


def _followed_local_run(project_dir, job_id):
    """True while an up --local holds the lock of run ``job_id``."""
    path = os.path.join(_tracking_root(project_dir), ".%s.local-lock" % job_id)
    if not os.path.exists(path):
        return False
    handle = _try_lock(path)
    if handle is None:
        return True
    handle.close()
    return False


def _local_leftovers(project_dir, wait_seconds=0.0, say=None, ours=None):
    """``{job id: [_RunProcess]}`` of this project's local runs that no up --local follows but
    whose processes live here (``ours``: the job id whose lock the caller holds, for a new run in
    the same allocation). A leftover whose batch script still runs is tearing down: it gets up to
    ``wait_seconds`` to end (``say`` tells once that we wait)."""
    import time
    deadline = time.monotonic() + wait_seconds
    told = set()
    while True:
        runs = {}
        for process in _local_run_processes(project_dir):
            runs.setdefault(process.job_id, []).append(process)
        leftovers = dict((job_id, processes) for job_id, processes in runs.items()
                         if job_id == ours or not _followed_local_run(project_dir, job_id))
        tearing_down = [job_id for job_id, processes in leftovers.items()
                        if _local_batch_pid(project_dir, job_id) in [p.pid for p in processes]]
        if not tearing_down or time.monotonic() >= deadline:
            return leftovers
        for job_id in tearing_down:
            if say is not None and job_id not in told:
                say("waiting for job %s to finish its teardown (its up --local has gone)" % job_id)
                told.add(job_id)
        time.sleep(0.2)


def _local_batch_pid(project_dir, job_id):
    """The pid of the batch script of local run ``job_id`` on this host (its record), or None."""
    import socket
    record = _load_json(_job_record_path(project_dir, job_id))
    if not isinstance(record, dict) or record.get("local_host") != socket.gethostname():
        return None
    pid = record.get("local_pid")
    return pid if isinstance(pid, int) else None


def _stop_local_leftovers(project_dir, leftovers):
    """SIGKILL the leftover processes (as Slurm's step teardown would have) and remove the runs'
    Enroot containers; returns the containers removed."""
    import signal
    for processes in leftovers.values():
        for process in processes:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                pass
    removed = []
    if not leftovers or _find_executable("enroot") is None:
        return removed
    listing = _run_command(["enroot", "list"], timeout=60)
    for name in listing.stdout.split() if listing.returncode == 0 else ():
        if any(name.startswith("pyxis_%s%s_" % (_CONTAINER_NAME_PREFIX, job_id))
               for job_id in leftovers):
            if _run_command(["enroot", "remove", "-f", name], timeout=120).returncode == 0:
                removed.append(name)
    return removed


def _listening_sockets(proc="/proc"):
    """``{port: [socket inode]}`` of the TCP sockets listening here (IPv4 and IPv6)."""
    ports = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", table)) as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                ports.setdefault(int(fields[1].rsplit(":", 1)[1], 16), []).append(fields[9])
    return ports


def _socket_holders(inodes, proc="/proc"):
    """``{inode: pid}`` of the processes that hold these sockets open (the ones we may look at)."""
    wanted = set("socket:[%s]" % inode for inode in inodes)
    holders = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            descriptors = os.listdir(os.path.join(proc, name, "fd"))
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(os.path.join(proc, name, "fd", descriptor))
            except OSError:
                continue
            if target in wanted:
                holders.setdefault(target[8:-1], int(name))
    return holders


def _readiness_ports(plan):
    """``[(service, port)]``: the local ports the services' tcp and http readiness checks."""
    from urllib.parse import urlsplit
    ports = []
    for service in plan.services:
        readiness = service.readiness
        if readiness is None:
            continue
        port = None
        if readiness.type == "tcp" and _is_local_host(readiness.host) and readiness.port:
            port = int(readiness.port)
        elif readiness.type == "http" and _is_local_host(_url_host(readiness.url)):
            try:
                parts = urlsplit(readiness.url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                port = None
        if port:
            ports.append((service.name, port))
    return ports


def _taken_ports(plan, proc="/proc"):
    """``[(service, port, pid or None)]``: readiness ports of ``plan`` that something here
    listens on already (a service's readiness would then succeed against it)."""
    listening = _listening_sockets(proc)
    wanted = [(name, port) for name, port in _readiness_ports(plan) if port in listening]
    holders = _socket_holders([i for _, port in wanted for i in listening[port]], proc) \
        if wanted else {}
    return [(name, port, next((holders[i] for i in listening[port] if i in holders), None))
            for name, port in wanted]


def _check_local_leftovers(plan, say, job_id):
    """Before a local run starts here: an earlier run of the project that is tearing down gets the
    time to end; what one left running, and a process on a port the stack's readiness checks, is
    an error naming the process (instead of a service failing with "Address already in use")."""
    leftovers = _local_leftovers(plan.project_dir, _STOP_GRACE_SECONDS + 5.0, say, ours=job_id)
    problems = ["job %s, which no up --local follows any more, left %s running" % (
        job_id, ", ".join(_format_run_process(p) for p in processes))
        for job_id, processes in sorted(leftovers.items())]
    taken = _taken_ports(plan)
    if taken:
        owners = dict((p.pid, p) for p in _local_run_processes(plan.project_dir))
        for name, port, pid in taken:
            holder = "a process we may not look at"
            if pid in owners:
                holder = "%s of job %s" % (_format_run_process(owners[pid]), owners[pid].job_id)
            elif pid is not None:
                holder = "pid %d (%s)" % (pid, _process_command(pid))
            problems.append("port %d, which the readiness of service '%s' checks, is taken by %s"
                            % (port, name, holder))
    if problems:
        raise ToolError("cannot start %s here: %s" % (plan.compose_file, "; ".join(problems)),
                        hint="'hpc-compose clean -f %s --age DAYS' (or --all) stops what earlier "
                             "local runs of it left, whatever DAYS is; anything else, stop it "
                             "yourself" % plan.compose_file
                        if leftovers else "stop it, or let the service use another port")


# --- status ---------------------------------------------------------------------------------------

def _file_facts(path):
    import time
    try:
        info = os.stat(path)
    except OSError:
        return {"path": path, "present": False, "size_bytes": None, "updated_age_seconds": None}
    return {"path": path, "present": True, "size_bytes": info.st_size,
            "updated_age_seconds": max(0, int(time.time() - info.st_mtime))}


def _job_status(record, squeue_bin="squeue", sacct_bin="sacct"):
    """Scheduler state, runtime state and log facts of a tracked job (a JSON-ready dict)."""
    scheduler, scheduler_warning = _query_scheduler_or_files(record, squeue_bin, sacct_bin)
    runtime = _load_runtime_state(record["job_dir"])
    by_name = {}
    if runtime:
        by_name = dict((s["name"], s) for s in runtime["services"])
    services = []
    for name, path in _record_log_sources(record):
        entry = {"name": name, "log": _file_facts(path)}
        state = by_name.get(name, {})
        for key in ("status", "pid", "launches", "restarts", "failure_policy", "max_restarts",
                    "last_exit_code", "readiness", "placement", "started_at", "finished_at"):
            entry[key] = state.get(key)
        if not state:
            entry["status"] = "unknown"
        services.append(entry)
    return {
        "job_id": record["job_id"],
        "progress": _job_progress(scheduler, runtime, record),
        "compose_file": record.get("compose_file"),
        "job_dir": record["job_dir"],
        "script_path": record.get("script_path"),
        "tracked": not record.get("untracked", False),
        "scheduler": scheduler.to_dict(),
        "scheduler_warning": scheduler_warning,
        "runtime": None if runtime is None else {
            key: runtime.get(key) for key in ("status", "exit_code", "reason", "attempt",
                                              "updated_at")},
        "batch_log": _file_facts(record.get("batch_log")
                                 or _batch_log_path(record["project_dir"], record["job_id"],
                                                   "hpc-compose")),
        "batch_error_log": (_file_facts(record["batch_error_log"])
                            if record.get("batch_error_log") else None),
        "services": services,
        "resume_dir": record.get("resume_dir"),
        "signals": (runtime or {}).get("signals") or [],
        "dependency": _format_dependency_wait(record, scheduler, squeue_bin, sacct_bin),
        "attempts": [_attempt_to_dict(n, state)
                     for n, state in _load_attempt_states(record["job_dir"])],
        "run": record.get("run"),
    }


def _job_progress(scheduler, runtime, record):
    """What the scheduler and state.json say together, in words, where they alone would mislead.

    A requeued job is PENDING again while state.json still holds the ended attempt; a cluster
    without accounting forgets a finished job, so its state.json is all there is; a NODE_FAIL end
    says which node failed.
    """
    if scheduler.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") and runtime:
        attempt = runtime.get("attempt") or 0
        return ("requeued: attempt %s ended %s; Slurm has the job %s again and attempt %s starts "
                "when it runs" % (attempt, runtime.get("status"), scheduler.state,
                                  int(attempt) + 1))
    if scheduler.state == "UNKNOWN" and _runtime_final(runtime):
        return _conclusion_from_state(record["job_id"], runtime)[1]
    if scheduler.state == "NODE_FAIL":
        return "ended NODE_FAIL: " + _format_node_failure(record)
    return None


# --- job arrays -----------------------------------------------------------------------------------

def _array_task_ids(expression):
    """The task ids of a Slurm array expression (``0-15%4`` -> 0..15), in order."""
    body = str(expression).partition("%")[0]
    tasks = []
    for item in body.split(","):
        bounds, _, step = item.partition(":")
        first, _, last = bounds.partition("-")
        tasks.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    return sorted(set(tasks))


def _task_record(record, task):
    """The record of one task of an array job: its own job id ``A_T``, directory and logs."""
    tasks = record.get("array_tasks")
    if not tasks:
        raise UsageError("job %s is not a job array; --task applies to x-slurm.array jobs"
                         % record["job_id"])
    if task not in tasks:
        raise UsageError("job %s has no task %d" % (record["job_id"], task),
                         hint="its tasks: %s" % record.get("array"))
    import re
    project_dir = record["project_dir"]
    task_id = "%s_%d" % (record["job_id"], task)
    directory = _job_directory(project_dir, task_id)
    result = dict(record, job_id=task_id, job_dir=directory, array_task=task,
                  array_job_id=record["job_id"])
    result["services"] = [dict(s, log_path=os.path.join(directory, "logs", s["token"] + ".log"))
                          for s in record.get("services", ())]
    for key in ("batch_log", "batch_error_log"):
        if record.get(key):
            # The record holds %A expanded; Slurm's default array name is slurm-%A_%a.out.
            result[key] = re.sub(r"slurm-%s\.out\Z" % re.escape(record["job_id"]),
                                 "slurm-%s.out" % task_id, record[key]).replace("%a", str(task))
    return result


def _require_task(record):
    """A command that reads one job directory needs ``--task`` for an array job."""
    if record.get("array_tasks") and record.get("array_task") is None:
        raise UsageError("job %s is a job array (%s): pick one task with --task N"
                         % (record["job_id"], record.get("array")),
                         hint="hpc-compose status shows every task's state")


def _array_task_states(array_job_id, squeue_bin="squeue", sacct_bin="sacct", tasks=None):
    """``{task: SchedulerState}``: one ``squeue -r`` call, plus one ``sacct`` call for the tasks
    squeue no longer lists (all of ``tasks``; with ``tasks=()`` squeue alone)."""
    states = {}
    prefix = "%s_" % array_job_id
    result = _run_command([squeue_bin, "-h", "-r", "-j", str(array_job_id), "-o", "%i|%T|%r"],
                          timeout=60)
    if result.returncode != 0 and "invalid job id" not in (result.stderr or "").lower():
        raise ToolError("squeue failed: %s" % (result.stderr or result.stdout).strip())
    for line in result.stdout.splitlines() if result.returncode == 0 else ():
        job, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if job.startswith(prefix) and job[len(prefix):].isdigit():
            states[int(job[len(prefix):])] = SchedulerState(
                _normalize_slurm_state(state), "squeue",
                reason=reason if _known_value(reason) and reason != "None" else None)
    if tasks is not None and all(task in states for task in tasks):
        return states
    try:
        result = _run_command([sacct_bin, "-n", "-X", "-P", "-j", str(array_job_id),
                               "--format=JobID,State,ExitCode"], timeout=60)
    except ToolError:
        return states
    if result.returncode != 0:
        return states
    for line in result.stdout.splitlines():
        fields = line.split("|")
        if len(fields) != 3 or not fields[0].startswith(prefix):
            continue
        task = fields[0][len(prefix):]
        if task.isdigit() and int(task) not in states:
            states[int(task)] = SchedulerState(_normalize_slurm_state(fields[1]), "sacct",
                                               exit_code=fields[2])
    return states


def _array_status(record, squeue_bin="squeue", sacct_bin="sacct"):
    """Every task of an array job: scheduler state (two queries in all) and state.json."""
    tasks = record["array_tasks"]
    states = _array_task_states(record["job_id"], squeue_bin, sacct_bin, tasks)
    rows = []
    counts = {}
    for task in tasks:
        scheduler = states.get(task) or SchedulerState("UNKNOWN", "none")
        runtime = _load_runtime_state(_job_directory(record["project_dir"],
                                                     "%s_%d" % (record["job_id"], task)))
        counts[scheduler.state] = counts.get(scheduler.state, 0) + 1
        rows.append({"task": task, "scheduler": scheduler.to_dict(),
                     "runtime": None if runtime is None else {
                         key: runtime.get(key) for key in ("status", "exit_code", "reason")}})
    return {"job_id": record["job_id"], "compose_file": record.get("compose_file"),
            "array": record.get("array"), "task_count": len(tasks),
            "states": dict(sorted(counts.items())), "tasks": rows,
            "failed": [row["task"] for row in rows
                       if row["scheduler"]["state"] in _TERMINAL_STATES
                       and row["scheduler"]["state"] != "COMPLETED"]}


def _format_array_status_text(status):
    """The human rendering of ``_array_status``: counts by state, then the failed tasks."""
    lines = ["job %s (array %s, %d tasks)" % (status["job_id"], status["array"],
                                              status["task_count"])]
    lines.append("  tasks:      " + ", ".join("%d %s" % (count, state)
                                              for state, count in status["states"].items()))
    if status.get("compose_file"):
        lines.append("  compose:    %s" % status["compose_file"])
    by_task = dict((row["task"], row) for row in status["tasks"])
    for task in status["failed"]:
        row = by_task[task]
        text = "  task %d:     %s" % (task, row["scheduler"]["state"])
        if row["scheduler"].get("exit_code"):
            text += ", exit code %s" % row["scheduler"]["exit_code"]
        if row["runtime"] and row["runtime"].get("reason"):
            text += ", %s" % row["runtime"]["reason"]
        lines.append(text)
    if status["failed"]:
        lines.append("  details:    hpc-compose status --task N (logs --task N) -f %s"
                     % (status.get("compose_file") or "compose.yaml"))
    return "\n".join(lines) + "\n"


# --- sweeps: one row per task, retries, results -------------------------------------------------
# A sweep (x-sweep) is an array job whose record carries the parameter table. `sweep retry`
# submits the same script again as a smaller array (the same task indices); its record names the
# first job as sweep_root, and `sweep status` shows each task's latest attempt.

_SWEEP_LOG_LINES = 5          # lines of the failing service's log a failed task shows
_SWEEP_RESULT_DEPTH = 2       # nested result objects are flattened this deep (a.b)
_SWEEP_ROW_COLUMNS = ("index", "state", "elapsed", "exit_code", "replicate", "attempt")


def _sweep_root_record(project_dir, record):
    """The first job of the sweep ``record`` belongs to (``record`` itself, or what it retried)."""
    if not record.get("sweep"):
        raise UsageError("job %s is not a sweep: its compose file has no x-sweep"
                         % record["job_id"],
                         hint="for a plain job array use hpc-compose status (--task N)")
    root = record.get("sweep_root") or record["job_id"]
    if root == record["job_id"]:
        return record
    return _load_job_record(project_dir, root)


def _sweep_attempts(project_dir, root):
    """The root job and its retries, oldest first."""
    retries = [record for record in _list_job_records(project_dir)
               if record.get("sweep_root") == root["job_id"] and record["job_id"] != root["job_id"]]
    return [root] + retries


def _parse_sacct_task_id(text):
    """``123_4`` -> ``("123", [4])``; ``123_[5-9%2]`` (tasks not started) -> ``("123", [5..9])``."""
    job, _, task = text.partition("_")
    if task.isdigit():
        return job, [int(task)]
    if task.startswith("[") and task.endswith("]"):
        try:
            return job, _array_task_ids(task[1:-1])
        except ValueError:
            return job, []
    return job, []


def _sweep_task_states(job_ids, sacct_bin="sacct"):
    """``{(job id, task): {state, exit_code, elapsed, nodes}}`` of every task of ``job_ids``: one
    sacct call for them all, pending tasks included (sacct lists them as ``A_[5-9]``)."""
    if not job_ids:
        return {}
    result = _run_command([sacct_bin, "-n", "-X", "-P", "-j", ",".join(job_ids),
                           "--format=JobID,State,ExitCode,Elapsed,NodeList"],
                          timeout=_scheduler_timeout())
    if result.returncode != 0:
        raise ToolError("sacct failed: %s" % (result.stderr or result.stdout).strip(),
                        hint="sweep status reads the scheduler's accounting (sacct)")
    states = {}
    for line in result.stdout.splitlines():
        fields = line.split("|")
        if len(fields) != 5:
            continue
        job, tasks = _parse_sacct_task_id(fields[0].strip())
        for task in tasks:
            states[(job, task)] = {
                "state": _normalize_slurm_state(fields[1]),
                "exit_code": _known_value(fields[2]) if len(tasks) == 1 else None,
                "elapsed": _known_value(fields[3]) if len(tasks) == 1 else None,
                "nodes": _known_value(fields[4]) if len(tasks) == 1 else None}
    return states


def _sweep_queue_states(job_ids, squeue_bin="squeue"):
    """``{(job id, task): {state...}}`` from one ``squeue -r`` call: what sacct did not know yet
    (accounting lags the controller by a moment after a submission)."""
    result = _run_command([squeue_bin, "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%M|%N"],
                          timeout=_scheduler_timeout())
    states = {}
    for line in result.stdout.splitlines() if result.returncode == 0 else ():
        fields = line.split("|")
        if len(fields) != 4:
            continue
        job, tasks = _parse_sacct_task_id(fields[0].strip())
        for task in tasks:
            states[(job, task)] = {"state": _normalize_slurm_state(fields[1]), "exit_code": None,
                                   "elapsed": _known_value(fields[2]),
                                   "nodes": _known_value(fields[3])}
    return states


def _flatten_results(data, prefix="", depth=_SWEEP_RESULT_DEPTH):
    """``[(key, scalar)]`` of a result object: numbers, strings, booleans; nested objects as a.b."""
    items = []
    for key, value in data.items():
        name = prefix + str(key)
        if isinstance(value, dict) and depth > 1:
            items.extend(_flatten_results(value, name + ".", depth - 1))
        elif value is None or isinstance(value, (bool, int, float, str)):
            items.append((name, value))
    return items


def _load_sweep_results(job_dir, files):
    """The scalar values of a task's result files (JSON objects), in file order; ``{}`` if none."""
    from collections import OrderedDict
    results = OrderedDict()
    for name in files:
        data = _load_json(os.path.join(job_dir, name))
        if isinstance(data, dict):
            results.update(_flatten_results(data))
    return results


def _sweep_failure(job_dir):
    """``{service, log}``: the service that failed a task (state.json) and its log's last lines."""
    runtime = _load_runtime_state(job_dir)
    if runtime is None:
        return None
    services = runtime["services"]
    failed = [s for s in services if s.get("status") == "failed"] or \
        [s for s in services if s.get("last_exit_code") not in (None, 0, "0")]
    if not failed:
        return {"service": None, "reason": runtime.get("reason"), "log": []}
    service = failed[0]
    log = service.get("log_path") or os.path.join(job_dir, "logs", "%s.log" % service.get("token"))
    if not os.path.isabs(log):
        log = os.path.join(job_dir, log)
    return {"service": service["name"], "reason": runtime.get("reason"),
            "log": _tail_lines(log, _SWEEP_LOG_LINES)}


def _sweep_status(record, sacct_bin="sacct", squeue_bin="squeue"):
    """Every task of a sweep at its latest attempt: parameters, scheduler state, elapsed, exit,
    result values (columns), and for a failed task the failing service's last log lines."""
    project_dir = record["project_dir"]
    root = _sweep_root_record(project_dir, record)
    attempts = _sweep_attempts(project_dir, root)
    latest = {}
    for number, attempt in enumerate(attempts, 1):
        for task in attempt.get("array_tasks") or ():
            latest[task] = (number, attempt)
    job_ids = [attempt["job_id"] for attempt in attempts]
    states = _sweep_task_states(job_ids, sacct_bin)
    if any((attempt["job_id"], task) not in states for task, (_, attempt) in latest.items()):
        states.update(_sweep_queue_states(job_ids, squeue_bin))
    sweep = root["sweep"]
    columns = []
    rows = []
    counts = {}
    for entry in sweep["tasks"]:
        index = entry["index"]
        number, attempt = latest.get(index, (1, root))
        task_id = "%s_%d" % (attempt["job_id"], index)
        job_dir = _job_directory(project_dir, task_id)
        scheduler = states.get((attempt["job_id"], index)) or {
            "state": "UNKNOWN", "exit_code": None, "elapsed": None, "nodes": None}
        results = _load_sweep_results(job_dir, sweep.get("results") or _DEFAULT_SWEEP_RESULTS)
        columns.extend(key for key in results if key not in columns)
        row = {"index": index, "replicate": entry.get("replicate", 0), "params": entry["params"],
               "job_id": task_id, "attempt": number, "state": scheduler["state"],
               "elapsed": scheduler["elapsed"], "exit_code": scheduler["exit_code"],
               "nodes": scheduler["nodes"], "results": results, "failure": None}
        if row["state"] in _TERMINAL_STATES and row["state"] != "COMPLETED":
            row["failure"] = _sweep_failure(job_dir)
        counts[row["state"]] = counts.get(row["state"], 0) + 1
        rows.append(row)
    return {"job_id": root["job_id"], "compose_file": root.get("compose_file"),
            "attempts": [attempt["job_id"] for attempt in attempts],
            "parameters": sweep["parameters"], "result_columns": columns,
            "task_count": len(rows), "states": dict(sorted(counts.items())), "tasks": rows,
            "failed": [row["index"] for row in rows
                       if row["state"] in _TERMINAL_STATES and row["state"] != "COMPLETED"]}


def _sort_sweep_rows(status, key=None, top=None):
    """``status`` with its rows sorted by ``key`` (a result column, a parameter, index, state,
    elapsed; ``-KEY`` descending; missing values last) and cut to the first ``top``."""
    if key is None and top is None:
        return status
    rows = list(status["tasks"])
    if key is not None:
        descending = key.startswith("-")
        name = key.lstrip("-")
        result = name[len("results."):] if name.startswith("results.") else None
        known = (list(_SWEEP_ROW_COLUMNS) + list(status["parameters"])
                 + list(status["result_columns"]))
        if name not in known and result not in status["result_columns"]:
            raise UsageError("--sort %s: no such column" % key,
                             hint="columns: " + ", ".join(known)
                             + " (results.NAME: the result, where a parameter has its name)")

        def value(row):
            if result is not None:
                item = row["results"].get(result)
            elif name in status["parameters"]:
                item = row["params"].get(name)
            elif name in _SWEEP_ROW_COLUMNS:
                item = row.get(name)
            else:
                item = row["results"].get(name)
            return _sortable(item)
        present = [row for row in rows if value(row) is not None]
        missing = [row for row in rows if value(row) is None]
        present.sort(key=value, reverse=descending)
        rows = present + missing
    if top is not None:
        rows = rows[:top]
    return dict(status, tasks=rows)


def _sortable(value):
    """A sort key that orders numbers (also numbers written as text) before other text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return (0, float(value), "")
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, str(value))


def _result_labels(status, fixed):
    """The header of each result column: its name, or ``results.NAME`` where that name is already
    a parameter or one of the ``fixed`` columns."""
    taken = set(status["parameters"]) | set(fixed)
    return [("results." + name) if name in taken else name for name in status["result_columns"]]


def _sweep_table(status):
    """``(header, rows)`` of the sweep table: index, parameters, state, elapsed, exit, results."""
    fixed = ["index", "rep", "state", "elapsed", "exit"]
    header = (["index"] + list(status["parameters"]) + fixed[1:]
              + _result_labels(status, fixed))
    rows = []
    for row in status["tasks"]:
        exit_code = row["exit_code"]
        cells = ([str(row["index"])] + [str(row["params"].get(name, "")) for name in
                                        status["parameters"]]
                 + [str(row["replicate"]), row["state"]
                    + ("" if row["attempt"] == 1 else " (retry %d)" % (row["attempt"] - 1)),
                    row["elapsed"] or "-", exit_code.split(":")[0] if exit_code else "-"]
                 + [_format_result_value(row["results"].get(name))
                    for name in status["result_columns"]])
        rows.append(cells)
    return header, rows


def _format_result_value(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "%.6g" % value
    return str(value)


def _format_sweep_status_text(status):
    """The human rendering of ``_sweep_status``: a table, then each failed task's log lines."""
    header, rows = _sweep_table(status)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["sweep %s (%d tasks%s): %s" % (
        status["job_id"], status["task_count"],
        ", retries: " + ", ".join(status["attempts"][1:]) if len(status["attempts"]) > 1 else "",
        ", ".join("%d %s" % (count, state) for state, count in status["states"].items()))]
    for cells in [header] + rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    for row in status["tasks"]:
        failure = row["failure"]
        if failure is None and row["index"] not in status["failed"]:
            continue
        text = "task %d (%s): %s" % (row["index"], row["job_id"], row["state"])
        if failure and failure.get("service"):
            text += ", service %s" % failure["service"]
        if failure and failure.get("reason"):
            text += ": %s" % failure["reason"]
        lines.append(text)
        for line in (failure or {}).get("log") or ():
            lines.append("    | " + line)
    if status["failed"]:
        lines.append("retry them: hpc-compose sweep retry --failed -f %s"
                     % (status.get("compose_file") or "compose.yaml"))
    return "\n".join(lines) + "\n"


def _format_sweep_status_csv(status):
    """The sweep table as CSV (every field quoted): one row per task."""
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    fixed = ["index", "replicate", "job_id", "attempt", "state", "elapsed", "exit_code"]
    header = (["index"] + list(status["parameters"]) + fixed[1:]
              + _result_labels(status, fixed))
    writer.writerow(header)
    for row in status["tasks"]:
        writer.writerow([row["index"]] + [row["params"].get(name, "") for name in
                                          status["parameters"]]
                        + [row["replicate"], row["job_id"], row["attempt"], row["state"],
                           row["elapsed"] or "", row["exit_code"] or ""]
                        + [_format_result_value(row["results"].get(name))
                           if name in row["results"] else "" for name in status["result_columns"]])
    return buffer.getvalue()


def _sweep_retry_tasks(status, failed=False, tasks=None):
    """The task indices ``sweep retry`` submits again: ``tasks`` (checked), else the failed ones."""
    known = [row["index"] for row in status["tasks"]]
    if tasks:
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise UsageError("sweep %s has no task %s" % (status["job_id"],
                                                          ", ".join(str(t) for t in unknown)),
                             hint="its tasks: 0-%d" % (len(known) - 1))
        chosen = sorted(set(tasks))
        if failed:
            chosen = [task for task in chosen if task in status["failed"]]
        return chosen
    return list(status["failed"])


def _retry_record(root, job_id, cluster, tasks, array, submitted_at=None):
    """The tracked record of a retry: the root's, for job ``job_id`` running ``tasks``."""
    import re
    import time
    project_dir = root["project_dir"]
    directory = _job_directory(project_dir, job_id)
    record = dict(root, job_id=str(job_id), cluster=cluster, job_dir=directory, array=array,
                  array_tasks=list(tasks), sweep_root=root["job_id"], dependency=None,
                  after=None, submitted_at=submitted_at if submitted_at is not None
                  else time.time())
    record["services"] = [dict(service, log_path=os.path.join(directory, "logs",
                                                              service["token"] + ".log"))
                          for service in root.get("services", ())]
    for key in ("batch_log", "batch_error_log"):
        if root.get(key):
            record[key] = re.sub(r"(?<![0-9])%s(?![0-9])" % re.escape(root["job_id"]),
                                 str(job_id), root[key])
    return record


def _parse_task_list(text):
    """``--tasks 3,7,10-12`` -> ``[3, 7, 10, 11, 12]``."""
    try:
        return _array_task_ids(text)
    except ValueError:
        raise UsageError("--tasks %s: expected indices such as 3,7 or 10-12" % text)


# --- diff: two jobs or sweep tasks side by side ---------------------------------------------------

def _job_facts(project_dir, job, sacct_bin="sacct"):
    """What ``diff`` compares of one job (``ID``) or sweep/array task (``ID_TASK``): spec,
    parameters, resources, images, nodes, elapsed, exit and results. One sacct call."""
    job_id, _, task = str(job).partition("_")
    record = _load_job_record(project_dir, job_id)
    if task:
        if not task.isdigit():
            raise UsageError("%s: a job is ID or ID_TASK (a task of an array)" % job)
        if record.get("sweep") and record.get("sweep_root") == record["job_id"]:
            # A sweep task is its latest attempt, as sweep status shows it.
            for attempt in _sweep_attempts(project_dir, record):
                if int(task) in (attempt.get("array_tasks") or ()):
                    record = attempt
        record = _task_record(record, int(task))
    else:
        _require_task(record)
    job_dir = record["job_dir"]
    facts = {"job": record["job_id"], "compose_file": record.get("compose_file")}
    params = _load_json(os.path.join(job_dir, _PARAMS_FILE_NAME))
    facts["params"] = params.get("params") if isinstance(params, dict) else None
    facts["replicate"] = params.get("replicate") if isinstance(params, dict) else None
    script = record.get("sweep_script") or record.get("script_path")
    facts["script_sha256"] = _file_sha256(script) if script else None
    facts["resources"] = _script_sbatch_options(script) if script else {}
    facts["spec"] = dict(_flatten_spec(record.get("spec") or {}))
    facts["images"] = dict((s["name"], s.get("image") or s.get("runtime"))
                           for s in record.get("services", ()))
    result = _run_command([sacct_bin, "-n", "-X", "-P", "-j", record["job_id"],
                           "--format=JobID,State,ExitCode,Elapsed,NodeList"],
                          timeout=_scheduler_timeout())
    scheduler = {}
    for line in result.stdout.splitlines() if result.returncode == 0 else ():
        fields = line.split("|")
        if len(fields) == 5 and fields[0] == record["job_id"]:
            scheduler = {"state": _normalize_slurm_state(fields[1]), "exit_code": fields[2],
                         "elapsed": fields[3], "nodes": fields[4]}
    facts.update(state=scheduler.get("state"), exit_code=scheduler.get("exit_code"),
                 elapsed=scheduler.get("elapsed"), nodes=scheduler.get("nodes"))
    sweep = record.get("sweep") or {}
    facts["results"] = dict(_load_sweep_results(job_dir, sweep.get("results")
                                                or _DEFAULT_SWEEP_RESULTS))
    return facts


def _flatten_spec(data, prefix=""):
    """``[(dotted path, value)]`` of a normalized spec: mappings walked, lists kept whole (JSON)."""
    import json
    items = []
    for key, value in data.items():
        name = prefix + str(key)
        if isinstance(value, dict) and value:
            items.extend(_flatten_spec(value, name + "."))
        elif isinstance(value, list):
            items.append((name, json.dumps(value, sort_keys=True)))
        else:
            items.append((name, value))
    return items


def _file_sha256(path):
    import hashlib
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def _script_sbatch_options(path):
    """``{option: value}`` of a batch script's ``#SBATCH`` lines (the resources asked for)."""
    import shlex
    options = {}
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return options
    for line in lines:
        if line.startswith("#SBATCH "):
            try:
                words = shlex.split(line[len("#SBATCH "):])
            except ValueError:
                continue
            for word in words:
                name, _, value = word.partition("=")
                if name not in ("--array",):
                    options[name.lstrip("-")] = value or "true"
    return options


def _diff_facts(left, right):
    """``[{field, left, right}]``: every fact that differs between two ``_job_facts``, flattened
    (``params.lr``, ``results.loss``), in a stable order."""
    def flat(facts):
        items = {}
        for key, value in facts.items():
            if key == "job":
                continue
            if isinstance(value, dict):
                for name, item in value.items():
                    items["%s.%s" % (key, name)] = item
            else:
                items[key] = value
        return items
    a, b = flat(left), flat(right)
    order = ["compose_file", "script_sha256", "spec", "params", "replicate", "resources", "images", "state", "exit_code",
             "elapsed", "nodes", "results"]
    names = sorted(set(a) | set(b), key=lambda name: (
        order.index(name.split(".")[0]) if name.split(".")[0] in order else len(order), name))
    return [{"field": name, "left": a.get(name), "right": b.get(name)} for name in names
            if a.get(name) != b.get(name)]


def _format_diff_text(left, right, differences):
    """``diff``'s human output: one line per differing fact, the two values side by side."""
    lines = ["%s  vs  %s" % (left["job"], right["job"])]
    if not differences:
        lines.append("  no difference in spec, parameters, resources, images, nodes, elapsed, "
                     "exit or results")
    width = max([len(item["field"]) for item in differences] or [0])
    for item in differences:
        lines.append("  %s  %s  ->  %s" % (item["field"].ljust(width),
                                            _format_result_value(item["left"]),
                                            _format_result_value(item["right"])))
    return "\n".join(lines) + "\n"


def _format_preview(word):
    # The summary stays one line per field: long inline scripts are cut (--verbose shows them).
    first = word.split("\n", 1)[0]
    if first != word or len(first) > 100:
        return first[:100] + "..."
    return word


def _age(seconds):
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s ago" % (seconds // size, unit)
    return "%ds ago" % seconds


def _format_status_text(status):
    """The human rendering of ``_job_status``."""
    scheduler = status["scheduler"]
    lines = ["job %s" % status["job_id"]]
    text = "%s (%s)" % (scheduler["state"], scheduler["source"])
    for key in ("reason", "exit_code"):
        if scheduler.get(key) and scheduler[key] != "0:0":
            text += ", %s %s" % (key.replace("_", " "), scheduler[key])
    lines.append("  scheduler:  " + text)
    if status.get("progress"):
        lines.append("  progress:   " + status["progress"])
    if status.get("dependency"):
        lines.append("  dependency: " + status["dependency"]["text"])
    if status.get("run"):
        command = status["run"].get("command")
        lines.append("  run:        service %s, command %s" % (
            status["run"].get("service"),
            " ".join(shell_quote(_format_preview(word)) for word in command) if command
            else "its own"))
    runtime = status["runtime"]
    if runtime:
        text = str(runtime.get("status"))
        if runtime.get("exit_code") is not None:
            text += ", exit code %s" % runtime["exit_code"]
        if runtime.get("reason"):
            text += ", %s" % runtime["reason"]
        if runtime.get("attempt") not in (None, 0, "0"):
            text += ", attempt %s" % runtime["attempt"]
        lines.append("  runtime:    " + text)
    else:
        lines.append("  runtime:    no state.json yet")
    for entry in status.get("signals") or ():
        lines.append("  signal:     " + _format_signal(entry))
    if len(status.get("attempts") or ()) > 1:
        for attempt in status["attempts"]:
            text = attempt["status"]
            if attempt.get("exit_code") is not None:
                text += ", exit code %s" % attempt["exit_code"]
            if attempt.get("reason"):
                text += ", %s" % attempt["reason"]
            lines.append("  attempt %s:  %s" % (attempt["attempt"], text))
    if status.get("compose_file"):
        lines.append("  compose:    %s" % status["compose_file"])
    lines.append("  job dir:    %s" % status["job_dir"])
    batch = status["batch_log"]
    lines.append("  batch log:  %s (%s)" % (batch["path"], "updated " + _age(batch["updated_age_seconds"])
                                           if batch["present"] else "not written yet"))
    errors = status.get("batch_error_log")
    if errors:
        lines.append("  batch err:  %s (%s)" % (errors["path"], "updated " + _age(
            errors["updated_age_seconds"]) if errors["present"] else "not written yet"))
    for service in status["services"]:
        parts = ["  service %s: %s" % (service["name"], service["status"])]
        if service.get("failure_policy"):
            restarts = "%s" % (service.get("restarts") or 0)
            if service.get("max_restarts") is not None:
                restarts += "/%s" % service["max_restarts"]
            parts.append("policy=%s restarts=%s" % (service["failure_policy"], restarts))
        if service.get("last_exit_code") is not None:
            parts.append("last_exit=%s" % service["last_exit_code"])
        readiness = service.get("readiness")
        if isinstance(readiness, dict):
            parts.append("readiness=%s:%s" % (readiness.get("type"), readiness.get("status")))
        placement = service.get("placement")
        if isinstance(placement, dict) and (placement.get("nodes") or 1) not in (1, "1"):
            parts.append("placement=%s nodes=%s nodelist=%s" % (
                placement.get("mode"), placement.get("nodes"), placement.get("nodelist")))
        lines.append(" ".join(parts))
        log = service["log"]
        lines.append("    log: %s (%s)" % (log["path"], "updated " + _age(log["updated_age_seconds"])
                                           if log["present"] else "not written yet"))
    return "\n".join(lines) + "\n"


# --- stats ----------------------------------------------------------------------------------------

_STATS_CSV_COLUMNS = ("job_id", "scheduler_state", "scheduler_source", "stats_source", "step_id",
                     "ntasks", "ave_cpu", "ave_rss", "max_rss", "tres_usage_in_ave", "gpu_util",
                     "gpu_mem", "usage_tres_in_ave_map")
_SSTAT_FIELDS = ("step_id", "ntasks", "ave_cpu", "ave_rss", "max_rss", "tres_usage_in_ave")


def _parse_tres(text):
    """``cpu=1,gres/gpu=2`` -> ``{"cpu": "1", "gres/gpu": "2"}`` (empty for null or junk)."""
    result = {}
    for item in (text or "").split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            result[key.strip()] = value.strip()
    return result


def _load_jsonl_tail(path, limit=1 << 20):
    """Parsed records of the last ``limit`` bytes of a jsonl file (a half-written line skipped)."""
    import json
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            data = handle.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > limit:
        lines = lines[1:]
    records = []
    for line in lines:
        try:
            value = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def _latest_group(records):
    if not records:
        return None, []
    latest = max(str(r.get("sampled_at") or "") for r in records)
    return latest, [r for r in records if str(r.get("sampled_at") or "") == latest]


def _load_sampler_metrics(job_dir):
    """The metrics sampler's files: meta plus the latest sample of each jsonl file."""
    directory = os.path.join(job_dir, "metrics")
    meta = _load_json(os.path.join(directory, "meta.json"))
    gpu_at, gpus = _latest_group(_load_jsonl_tail(os.path.join(directory, "gpu.jsonl")))
    _, processes = _latest_group(_load_jsonl_tail(os.path.join(directory, "gpu_processes.jsonl")))
    slurm_at, steps = _latest_group(_load_jsonl_tail(os.path.join(directory, "slurm.jsonl")))
    return {"present": isinstance(meta, dict) or bool(gpus or steps),
            "meta": meta if isinstance(meta, dict) else None,
            "gpu_sampled_at": gpu_at, "gpus": gpus, "gpu_processes": processes,
            "slurm_sampled_at": slurm_at, "steps": steps}


def _parse_sstat_output(text):
    """Rows of ``sstat --parsable2 --noheader`` for numbered steps only (``<job>.<n>``)."""
    import re
    rows = []
    for line in (text or "").splitlines():
        fields = line.split("|")
        if len(fields) != len(_SSTAT_FIELDS) or not re.match(r"^\d+(\+\d+)?\.\d+$", fields[0]):
            continue
        rows.append(dict(zip(_SSTAT_FIELDS, [f.strip() or None for f in fields])))
    return rows


def _live_sstat(job_id, sstat_bin="sstat"):
    """Step CPU/memory rows from a live ``sstat`` call (the job must be running)."""
    result = _run_command([sstat_bin, "--allsteps", "--jobs", str(job_id), "--parsable2",
                          "--noconvert", "--noheader",
                          "--format=JobID,NTasks,AveCPU,AveRSS,MaxRSS,TRESUsageInAve"], timeout=60)
    if result.returncode != 0:
        raise ToolError("sstat failed: %s" % (result.stderr or result.stdout).strip())
    return _parse_sstat_output(result.stdout)


def _collect_stats(record, sstat_bin="sstat", squeue_bin="squeue", sacct_bin="sacct"):
    """Metrics of a job: the sampler's files first, live ``sstat`` when they have no step rows."""
    notes, sources = [], []
    scheduler, scheduler_warning = _query_scheduler_or_files(record, squeue_bin, sacct_bin)
    sampler = _load_sampler_metrics(record["job_dir"])
    steps = [dict(row) for row in sampler["steps"]]
    if sampler["present"]:
        sources.append("sampler")
    if not steps:
        if scheduler.state == "RUNNING" and record.get("local") != "machine":
            try:
                steps = _live_sstat(record["job_id"], sstat_bin)
                sources.append("sstat")
            except ToolError as exc:
                if not sampler["present"]:
                    raise
                notes.append(str(exc.message))
        elif not sampler["present"]:
            notes.append("no sampler data and the job is %s, so live sstat has nothing to show"
                         % scheduler.state)
    for step in steps:
        usage = _parse_tres(step.get("tres_usage_in_ave"))
        step["usage_tres_in_ave_map"] = usage
        step["gpu_util"] = usage.get("gres/gpuutil")
        step["gpu_mem"] = usage.get("gres/gpumem")
    collectors = []
    if sampler["meta"]:
        collectors = [c for c in sampler["meta"].get("collectors") or [] if isinstance(c, dict)]
    available = bool(steps or sampler["gpus"])
    if not available and not notes:
        notes.append("no samples yet" if scheduler.state in ("PENDING", "RUNNING", "CONFIGURING")
                     else "no step metrics were recorded")
    return {
        "job_id": record["job_id"], "scheduler": scheduler.to_dict(),
        "scheduler_warning": scheduler_warning, "source": "+".join(sources) or "none",
        "available": available, "notes": notes,
        "collectors": collectors, "gpu_sampled_at": sampler["gpu_sampled_at"],
        "slurm_sampled_at": sampler["slurm_sampled_at"], "gpus": sampler["gpus"],
        "gpu_processes": sampler["gpu_processes"], "steps": steps,
    }


def _map_text(mapping):
    return ";".join("%s=%s" % (k, v) for k, v in sorted((mapping or {}).items()))


def _format_stats_csv(stats):
    """One CSV row per step (header first; every field quoted)."""
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(_STATS_CSV_COLUMNS)
    for step in stats["steps"]:
        row = {"job_id": stats["job_id"], "scheduler_state": stats["scheduler"]["state"],
               "scheduler_source": stats["scheduler"]["source"], "stats_source": stats["source"]}
        row.update(step)
        row["usage_tres_in_ave_map"] = _map_text(step.get("usage_tres_in_ave_map"))
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in _STATS_CSV_COLUMNS])
    return buffer.getvalue()


def _format_stats_jsonl(stats):
    """One JSON object per line: summary, note, collector, gpu_device, gpu_process, step."""
    import json
    job_id = stats["job_id"]
    records = [{"type": "summary", "job_id": job_id, "scheduler_state": stats["scheduler"]["state"],
                "scheduler_source": stats["scheduler"]["source"], "stats_source": stats["source"],
                "available": stats["available"], "gpu_sampled_at": stats["gpu_sampled_at"],
                "slurm_sampled_at": stats["slurm_sampled_at"],
                "scheduler_warning": stats["scheduler_warning"]}]
    records += [{"type": "note", "job_id": job_id, "message": n} for n in stats["notes"]]
    for kind, key in (("collector", "collectors"), ("gpu_device", "gpus"),
                      ("gpu_process", "gpu_processes"), ("step", "steps")):
        for item in stats[key]:
            record = {"type": kind, "job_id": job_id}
            record.update(item)
            records.append(record)
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def _format_stats_text(stats):
    """The human rendering of ``_collect_stats``."""
    lines = ["job %s: %s (%s); stats from %s" % (stats["job_id"], stats["scheduler"]["state"],
                                                 stats["scheduler"]["source"], stats["source"])]
    for collector in stats["collectors"]:
        text = "  collector %s: " % collector.get("name")
        if not collector.get("enabled"):
            text += "disabled"
        elif collector.get("available") is False:
            text += "unavailable (%s)" % collector.get("note")
        else:
            text += "ok, last sample %s" % collector.get("last_sampled_at")
        lines.append(text)
    if stats["steps"]:
        header = ("STEP", "NTASKS", "AVE_CPU", "AVE_RSS", "MAX_RSS", "GPU_UTIL", "GPU_MEM")
        rows = [header] + [(_format_or_dash(s.get("step_id")), _format_or_dash(s.get("ntasks")),
                            _format_cpu_time(s.get("ave_cpu")), _format_size(s.get("ave_rss")),
                            _format_size(s.get("max_rss")), _format_or_dash(s.get("gpu_util")),
                            _format_or_dash(s.get("gpu_mem")))
                           for s in stats["steps"]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for gpu in stats["gpus"]:
        lines.append("  gpu %s %s: util %s%% mem %s/%s MiB temp %sC power %s/%s W" % tuple(
            gpu.get(k) if gpu.get(k) is not None else "-" for k in (
                "index", "name", "utilization_gpu", "memory_used_mib", "memory_total_mib",
                "temperature_c", "power_draw_w", "power_limit_w")))
    for process in stats["gpu_processes"]:
        lines.append("  gpu process %s %s on %s: %s MiB" % (
            process.get("pid"), process.get("process_name"), process.get("gpu_uuid"),
            process.get("used_memory_mib")))
    for note in stats["notes"]:
        lines.append("  note: %s" % note)
    return "\n".join(lines) + "\n"


def _format_or_dash(value):
    return "-" if value is None else str(value)


_SLURM_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _format_size(value):
    """Bytes (cache sizes, sstat's ``9121792`` with --noconvert) or ``200K`` -> ``8.7 MiB``."""
    text = _format_or_dash(value).strip()
    number, scale = text, 1
    if text[-1:].upper() in _SLURM_SIZE_SUFFIXES:
        number, scale = text[:-1], _SLURM_SIZE_SUFFIXES[text[-1:].upper()]
    try:
        amount = float(number) * scale
    except ValueError:
        return text
    for name in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or name == "TiB":
            return "%d B" % amount if name == "B" else "%.1f %s" % (amount, name)
        amount /= 1024.0


def _format_cpu_time(value):
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS.mmm`` or seconds -> ``6s``, ``4m 05s``, ``1d 02h 03m``."""
    text = _format_or_dash(value).strip()
    days, _, clock = text.rpartition("-")
    try:
        seconds = 0.0
        for part in clock.split(":"):
            seconds = seconds * 60 + float(part)
        seconds += int(days or 0) * 86400
    except ValueError:
        return text
    if seconds < 60:
        return "%.1fs" % seconds if seconds % 1 else "%ds" % seconds
    whole = int(round(seconds))
    if whole < 3600:
        return "%dm %02ds" % (whole // 60, whole % 60)
    if whole < 86400:
        return "%dh %02dm %02ds" % (whole // 3600, whole % 3600 // 60, whole % 60)
    return "%dd %02dh %02dm" % (whole // 86400, whole % 86400 // 3600, whole % 3600 // 60)


# --- report: the job as a picture (status --timeline, stats sparklines, the HTML report) ----------
# Everything here is pure but the three loaders at the top: the timeline comes from timeline.jsonl
# (one line per state.json write of the batch script), the charts from the metrics sampler's jsonl
# files, and the rest from state.json and the logs. The plotting core (scales, ticks, the time axis)
# is shared by the text and the SVG drawings.

class _TimelineSpan(NamedTuple):
    """A stretch of one service's life in one phase (waiting, starting, running, ready, ...)."""
    phase: str
    start_ms: int
    end_ms: int


class _TimelineEvent(NamedTuple):
    """A moment on the timeline: a service's launch, restart, ready, exit; the job's signal or end."""
    at_ms: int
    kind: str
    text: str


class _ServiceTimeline(NamedTuple):
    """One row of the timeline: a service, its spans and events, and whether it failed."""
    name: str
    spans: Tuple[_TimelineSpan, ...]
    events: Tuple[_TimelineEvent, ...]
    failed: bool
    last_exit_code: Optional[int]


class _Timeline(NamedTuple):
    """The job from its first state record to its last (or now, while it runs)."""
    start_ms: Optional[int]
    end_ms: Optional[int]
    status: str
    exit_code: Optional[int]
    services: Tuple[_ServiceTimeline, ...]
    events: Tuple[_TimelineEvent, ...]
    source: str   # "timeline" (timeline.jsonl), "state" (state.json's times only) or "none"


class _ChartSeries(NamedTuple):
    """One line of a chart: a label and ``(epoch ms, value)`` points."""
    label: str
    points: Tuple[Tuple[int, float], ...]


class _Chart(NamedTuple):
    """A resource chart: a title, the unit of its y axis and its series."""
    title: str
    unit: str
    series: Tuple[_ChartSeries, ...]


# Phases drawn as bars (the others, exited and stopped, end a bar). Colours from Okabe and Ito's
# palette for colour blindness, with lightness far apart so that greyscale keeps them apart too;
# waiting is hatched rather than coloured.
_TIMELINE_PHASES = ("waiting", "starting", "running", "ready", "restarting", "failed")
_PHASE_COLOURS = {"waiting": "#e8e8e8", "starting": "#e69f00", "running": "#56b4e9",
                  "ready": "#0072b2", "restarting": "#cc79a7", "failed": "#d55e00"}
_PHASE_TEXT_UNICODE = {"waiting": "\u2591", "starting": "\u2592", "running": "\u2593",
                       "ready": "\u2588", "restarting": "\u2573", "failed": "\u2717"}
_PHASE_TEXT_ASCII = {"waiting": ".", "starting": "-", "running": "=", "ready": "#",
                     "restarting": "r", "failed": "X"}
_SERVICE_OK_COLOUR = "#009e73"
_SERVICE_FAILED_COLOUR = "#d55e00"
# Line colours for chart series, each also with its own dash pattern (greyscale, print).
_SERIES_STYLES = (("#0072b2", ""), ("#d55e00", "6 3"), ("#009e73", "2 2"), ("#cc79a7", "8 3 2 3"),
                  ("#e69f00", "4 4"), ("#56b4e9", "1 3"), ("#000000", "10 2"))
_SPARK_UNICODE = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
_SPARK_ASCII = "_.-:=+*#"
_TEXT_WIDTH = 80
_REPORT_LOG_LINES = 20


def _finite(value):
    """``value`` as a float, or ``None`` for None, NaN, infinities and what is not a number."""
    import math
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _nice_step(span, count):
    """A 1, 2 or 5 times a power of ten step that cuts ``span`` into about ``count`` pieces."""
    import math
    raw = span / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _nice_ticks(low, high, count=5):
    """``(low, high, ticks)``: a domain widened to round numbers around the values and its ticks.

    NaN or infinite bounds, and a domain of one value, still give a drawable axis."""
    low, high = _finite(low), _finite(high)
    if low is None and high is None:
        low, high = 0.0, 1.0
    elif low is None or high is None:
        low = high = low if high is None else high
    if low > high:
        low, high = high, low
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        low, high = (0.0, high + pad) if low >= 0 and low - pad < 0 else (low - pad, high + pad)
    step = _nice_step(high - low, count)
    import math
    start, stop = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = []
    value = start
    while value <= stop + step / 2 and len(ticks) < 4 * count + 2:
        ticks.append(0.0 if abs(value) < step / 1e9 else value)
        value = start + step * len(ticks)
    return start, stop, ticks


def _scale(value, domain, pixels):
    """``value`` in ``domain`` (low, high) mapped linearly onto ``pixels`` (from, to)."""
    low, high = domain
    if high == low:
        return (pixels[0] + pixels[1]) / 2.0
    return pixels[0] + (value - low) * (pixels[1] - pixels[0]) / float(high - low)


def _format_number(value):
    """A tick label: ``0``, ``2.5``, ``1,500``, ``2.5M``, ``3e+15``."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e15 or magnitude < 1e-3:
        return "%.3g" % value
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if magnitude >= limit:
            return ("%.3g" % (value / limit)) + suffix
    if magnitude >= 1000:
        return "{:,.0f}".format(value)
    return ("%.3f" % value).rstrip("0").rstrip(".")


def _format_elapsed(seconds):
    """``0s``, ``45s``, ``2m``, ``2m30s``, ``1h05m``: time since the job's start, for axes."""
    seconds = int(round(seconds))
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return "%s%ds" % (sign, seconds)
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return "%s%dm%s" % (sign, minutes, "%02ds" % rest if rest else "")
    hours, rest = divmod(seconds, 3600)
    return "%s%dh%02dm" % (sign, hours, rest // 60)


_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
               86400)


def _time_ticks(start_ms, end_ms, count=6):
    """``[(epoch ms, label)]``: ticks at round times since ``start_ms`` (``0s``, ``30s``, ``1m``...)."""
    span = max(1.0, (end_ms - start_ms) / 1000.0)
    step = _TIME_STEPS[-1]
    for candidate in _TIME_STEPS:
        if span / candidate <= count:
            step = candidate
            break
    ticks, seconds = [], 0
    while seconds <= span + 1e-9:
        ticks.append((start_ms + seconds * 1000, _format_elapsed(seconds)))
        seconds += step
    return ticks


def _resample(values, width):
    """``values`` (floats or None) averaged into ``width`` buckets; a bucket of no value is None."""
    if not values or width <= 0:
        return []
    buckets = []
    for index in range(min(width, len(values))):
        chunk = values[index * len(values) // min(width, len(values)):
                       (index + 1) * len(values) // min(width, len(values))]
        finite = [v for v in (_finite(x) for x in chunk) if v is not None]
        buckets.append(sum(finite) / len(finite) if finite else None)
    return buckets


def _format_sparkline(values, width=24, ascii_only=False):
    """A sparkline of ``values`` in at most ``width`` characters (NaN and None are blanks)."""
    levels = _SPARK_ASCII if ascii_only else _SPARK_UNICODE
    buckets = _resample(values, width)
    finite = [v for v in buckets if v is not None]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    text = ""
    for value in buckets:
        if value is None:
            text += " "
        elif high == low:
            text += levels[len(levels) // 2]
        else:
            text += levels[min(len(levels) - 1, int((value - low) / (high - low) * len(levels)))]
    return text


def _text_wants_ascii(stream, environ=None):
    """True when the terminal may not show Unicode blocks: an ASCII locale (``LANG=C``) or stream.

    Python 3.7 and later turn a C locale into ``LC_CTYPE=C.UTF-8`` in its own environment (PEP
    538), so that value beside a C or unset ``LANG`` still means the user's locale is C."""
    environ = os.environ if environ is None else environ
    lang = environ.get("LANG") or ""
    ctype = environ.get("LC_CTYPE") or ""
    if not environ.get("LC_ALL") and ctype in ("C.UTF-8", "C.utf8") and lang in ("", "C", "POSIX"):
        return True
    locale = environ.get("LC_ALL") or ctype or lang
    if "utf8" not in locale.lower().replace("-", ""):
        return True
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return bool(encoding) and encoding != "utf8"


# --- report: the timeline, from timeline.jsonl (or state.json's times) ----------------------------

def _iso_to_ms(text):
    """``2026-12-06T12:00:00+00:00`` (as the batch script writes) -> epoch ms; None otherwise."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return _parse_since(text)
    except UsageError:
        return None


def _load_timeline_records(job_dir):
    """The batch script's timeline.jsonl lines that parse, in file order."""
    records = []
    for record in _load_jsonl_tail(os.path.join(job_dir, _TIMELINE_FILE_NAME), limit=8 << 20):
        if isinstance(record.get("at_ms"), int) and isinstance(record.get("services"), list):
            records.append(record)
    return records


def _service_row(name, entries, end_ms):
    """One service's row from its ``(at ms, [status, launches, last exit])`` entries."""
    spans, events = [], []
    previous = None
    for index, (at_ms, entry) in enumerate(entries):
        status, launches, last_exit = (list(entry) + [None, 0, None])[:3]
        status = str(status)
        launches = launches if isinstance(launches, int) else 0
        if previous is not None:
            old_status, old_launches, old_exit = previous
            if launches > old_launches:
                events.append(_TimelineEvent(at_ms, "restart" if old_launches else "launch",
                                            "restart %d" % (launches - 1) if old_launches
                                            else "launched"))
            if last_exit is not None and (old_exit is None or launches != old_launches) \
                    and status != "stopped":
                events.append(_TimelineEvent(at_ms, "exit", "exit %s" % last_exit))
            if status == "ready" and old_status != "ready":
                events.append(_TimelineEvent(at_ms, "ready", "ready"))
        elif launches:
            events.append(_TimelineEvent(at_ms, "launch", "launched"))
            if status == "ready":
                events.append(_TimelineEvent(at_ms, "ready", "ready"))
        previous = (status, launches, last_exit)
        until = entries[index + 1][0] if index + 1 < len(entries) else end_ms
        if status in _TIMELINE_PHASES and status != "failed" and until > at_ms:
            if spans and spans[-1].phase == status and spans[-1].end_ms == at_ms:
                spans[-1] = spans[-1]._replace(end_ms=until)
            else:
                spans.append(_TimelineSpan(status, at_ms, until))
    failed = previous is not None and previous[0] == "failed"
    last_exit = previous[2] if previous is not None else None
    if failed:
        at = entries[-1][0]
        for at_ms, entry in reversed(entries):
            if str(entry[0]) != "failed":
                break
            at = at_ms
        spans.append(_TimelineSpan("failed", at, max(at, end_ms)))
    return _ServiceTimeline(name, tuple(spans), tuple(events), failed,
                           last_exit if isinstance(last_exit, int) else None)


def _build_timeline(records, state, now_ms):
    """The job's :class:`_Timeline` from its timeline records and state.json (either may be missing)."""
    state = state or {}
    names = [str(s.get("name")) for s in state.get("services") or ()]
    job_events = []
    for signal in state.get("signals") or ():
        at = _iso_to_ms(signal.get("received_at")) if isinstance(signal, dict) else None
        if at is not None:
            job_events.append(_TimelineEvent(at, "signal", "SIG%s (%s)" % (
                signal.get("signal"), signal.get("action"))))
    status = str(state.get("status") or "unknown")
    exit_code = state.get("exit_code") if isinstance(state.get("exit_code"), int) else None
    if records:
        width = max(len(r["services"]) for r in records)
        names += ["service %d" % (i + 1) for i in range(len(names), width)]
        last = records[-1]
        status = str(last.get("status") or status)
        final = status in _FINAL_RUNTIME_STATUSES or status == "requeued"
        start_ms = records[0]["at_ms"]
        end_ms = last["at_ms"] if final else max(now_ms, last["at_ms"])
        if final and isinstance(last.get("exit_code"), int):
            exit_code = last["exit_code"]
        services = []
        for index, name in enumerate(names):
            entries = [(r["at_ms"], r["services"][index]) for r in records
                       if index < len(r["services"]) and isinstance(r["services"][index], list)]
            services.append(_service_row(name, entries, end_ms))
        job_events.insert(0, _TimelineEvent(start_ms, "start", "job start"))
        if final:
            job_events.append(_TimelineEvent(end_ms, "end", "job %s" % status))
        return _Timeline(start_ms, end_ms, status, exit_code, tuple(services),
                        tuple(sorted(job_events)), "timeline")
    # A job of an older script: state.json's launch and end times of each service's last run.
    services, moments = [], []
    for entry in state.get("services") or ():
        started = _iso_to_ms(entry.get("started_at"))
        finished = _iso_to_ms(entry.get("finished_at"))
        moments += [m for m in (started, finished) if m is not None]
        failed = entry.get("status") == "failed"
        spans = ()
        if started is not None:
            spans = (_TimelineSpan("running", started, finished if finished is not None else now_ms),)
        exit_value = entry.get("last_exit_code")
        events = ()
        if finished is not None and exit_value is not None:
            events = (_TimelineEvent(finished, "exit", "exit %s" % exit_value),)
        services.append(_ServiceTimeline(str(entry.get("name")), spans, events, failed,
                                        exit_value if isinstance(exit_value, int) else None))
    if not moments:
        return _Timeline(None, None, status, exit_code, tuple(services), tuple(job_events), "none")
    return _Timeline(min(moments), max(moments + [now_ms] if status not in _FINAL_RUNTIME_STATUSES
                                      else moments), status, exit_code, tuple(services),
                    tuple(sorted(job_events)), "state")


def _timeline_to_dict(timeline):
    """JSON-ready form of a :class:`_Timeline` (``status --timeline --format json``)."""
    return {"start_ms": timeline.start_ms, "end_ms": timeline.end_ms, "status": timeline.status,
            "exit_code": timeline.exit_code, "source": timeline.source,
            "events": [dict(e._asdict()) for e in timeline.events],
            "services": [{"name": s.name, "failed": s.failed, "last_exit_code": s.last_exit_code,
                          "spans": [dict(p._asdict()) for p in s.spans],
                          "events": [dict(e._asdict()) for e in s.events]}
                         for s in timeline.services]}


def _format_timeline_text(timeline, width=_TEXT_WIDTH, ascii_only=False):
    """The timeline in ``width`` columns: one row per service, an elapsed-time axis, a legend."""
    glyphs = _PHASE_TEXT_ASCII if ascii_only else _PHASE_TEXT_UNICODE
    if timeline.start_ms is None or not timeline.services:
        return "timeline: no state records yet (the job has not started)\n"
    label_width = min(16, max(len(s.name) for s in timeline.services))
    note_width = 9
    bar_width = max(10, width - label_width - note_width - 4)
    span_ms = max(1, timeline.end_ms - timeline.start_ms)

    def column(at_ms):
        return min(bar_width - 1, max(0, int((at_ms - timeline.start_ms) * bar_width // span_ms)))

    lines = []
    for service in timeline.services:
        cells = [" "] * bar_width
        for span in service.spans:
            for index in range(column(span.start_ms), max(column(span.start_ms) + 1,
                                                          column(span.end_ms))):
                cells[index] = glyphs[span.phase]
        for event in service.events:
            if event.kind == "restart":
                cells[column(event.at_ms)] = "R" if ascii_only else "\u21bb"
        if service.failed:
            note = "FAILED" + (" %s" % service.last_exit_code
                               if service.last_exit_code is not None else "")
        elif service.last_exit_code is not None:
            note = "exit %s" % service.last_exit_code
        else:
            note = ""
        name = service.name if len(service.name) <= label_width else \
            service.name[:label_width - 1] + ("~" if ascii_only else "\u2026")
        lines.append(("%s |%s| %s" % (name.ljust(label_width), "".join(cells),
                                       note[:note_width])).rstrip())
    left = _format_elapsed(0)
    right = _format_elapsed(span_ms / 1000.0)
    lines.append("%s  %s%s" % (" " * label_width, left, right.rjust(bar_width - len(left))))
    legend = "  ".join("%s %s" % (glyphs[p], p) for p in _TIMELINE_PHASES)
    legend += "  %s restart" % ("R" if ascii_only else "\u21bb")
    lines.append(legend)
    head = "timeline of the job: %s" % timeline.status
    if timeline.exit_code is not None:
        head += " (exit code %s)" % timeline.exit_code
    if timeline.source == "state":
        head += "; from state.json only (a script without timeline.jsonl)"
    return "\n".join([head] + lines) + "\n"


# --- report: the charts, from the metrics sampler's files -----------------------------------------

def _cpu_seconds(text):
    """sstat's AveCPU (``[D-]HH:MM:SS``, ``MM:SS.mmm``) in seconds; None when it does not parse."""
    days, _, clock = str(text or "").strip().rpartition("-")
    if not clock:
        return None
    try:
        seconds = 0.0
        for part in clock.split(":"):
            seconds = seconds * 60 + float(part)
        return seconds + int(days or 0) * 86400
    except ValueError:
        return None


def _size_bytes(text):
    """sstat's ``9121792`` or ``200K`` in bytes; None when it does not parse."""
    value = str(text or "").strip()
    scale = 1
    if value[-1:].upper() in _SLURM_SIZE_SUFFIXES:
        value, scale = value[:-1], _SLURM_SIZE_SUFFIXES[value[-1:].upper()]
    number = _finite(value)
    return None if number is None else number * scale


def _step_services(record, sacct_bin="sacct"):
    """``{step id: service name}`` from accounting (a service's steps are named
    ``hpc-compose:<token>``); ``{}`` when sacct cannot say."""
    names = dict((s.get("token"), s.get("name")) for s in record.get("services") or ())
    try:
        result = _run_command([sacct_bin, "--jobs", str(record["job_id"]), "--noheader",
                               "--parsable2", "--format=JobID,JobName"], timeout=_scheduler_timeout())
    except (ToolError, OSError):
        return {}
    steps = {}
    for line in (result.stdout or "").splitlines() if result.returncode == 0 else ():
        step_id, _, name = line.partition("|")
        if name.startswith("hpc-compose:") and names.get(name[len("hpc-compose:"):]):
            steps[step_id] = names[name[len("hpc-compose:"):]]
    return steps


def _load_charts(job_dir, step_services=None):
    """Charts of what the sampler recorded: CPU (cores) and RSS (MiB) per step, GPU per device;
    a step is named for its service where ``step_services`` knows it."""
    step_services = step_services or {}
    directory = os.path.join(job_dir, "metrics")
    moments = {}   # every row of one sample has the same time: parse each once

    def moment(text):
        if text not in moments:
            moments[text] = _iso_to_ms(text)
        return moments[text]

    steps = {}
    for row in _load_jsonl_tail(os.path.join(directory, "slurm.jsonl"), limit=16 << 20):
        at = moment(row.get("sampled_at"))
        if at is not None and row.get("step_id"):
            steps.setdefault(str(row["step_id"]), []).append((at, row))
    cpu, rss = [], []
    for step_id in sorted(steps, key=lambda s: [int(p) if p.isdigit() else p
                                                for p in s.replace("+", ".").split(".")]):
        rows = sorted(steps[step_id], key=lambda pair: pair[0])
        used, previous = [], None
        for at, row in rows:
            tasks = _finite(row.get("ntasks")) or 1.0
            seconds = _cpu_seconds(row.get("ave_cpu"))
            total = None if seconds is None else seconds * tasks
            if previous is not None and total is not None and at > previous[0]:
                used.append((at, max(0.0, (total - previous[1]) / ((at - previous[0]) / 1000.0))))
            if total is not None:
                previous = (at, total)
        label = "%s (%s)" % (step_services[step_id], step_id.rpartition(".")[2]) \
            if step_id in step_services else "step " + step_id
        cpu.append(_ChartSeries(label, tuple(used)))
        sizes = [(at, _size_bytes(row.get("ave_rss"))) for at, row in rows]
        rss.append(_ChartSeries(label, tuple((at, size / 1048576.0) for at, size in sizes
                                             if size is not None)))
    gpus = {}
    for row in _load_jsonl_tail(os.path.join(directory, "gpu.jsonl"), limit=16 << 20):
        at = moment(row.get("sampled_at"))
        if at is not None:
            gpus.setdefault(str(row.get("index")), []).append((at, row))
    utilisation, memory = [], []
    for index in sorted(gpus, key=lambda s: (len(s), s)):
        rows = sorted(gpus[index], key=lambda pair: pair[0])
        utilisation.append(_ChartSeries("GPU " + index, tuple(
            (at, _finite(row.get("utilization_gpu"))) for at, row in rows
            if _finite(row.get("utilization_gpu")) is not None)))
        memory.append(_ChartSeries("GPU " + index, tuple(
            (at, _finite(row.get("memory_used_mib"))) for at, row in rows
            if _finite(row.get("memory_used_mib")) is not None)))
    charts = [_Chart("CPU", "cores", tuple(cpu)), _Chart("Memory (RSS)", "MiB", tuple(rss)),
              _Chart("GPU utilisation", "%", tuple(utilisation)),
              _Chart("GPU memory", "MiB", tuple(memory))]
    return [chart for chart in charts if any(series.points for series in chart.series)]


def _load_job_charts(record, sacct_bin="sacct"):
    """The charts of a tracked job, its steps named for their services (one sacct call)."""
    return _load_charts(record["job_dir"], {} if record.get("local") else
                        _step_services(record, sacct_bin))


def _format_chart_sparklines(charts, width=_TEXT_WIDTH, ascii_only=False):
    """``stats``' sparklines: one line per series with its min, max and last value."""
    lines = []
    for chart in charts:
        lines.append("  %s (%s):" % (chart.title, chart.unit))
        label_width = max(len(s.label) for s in chart.series)
        longest = max(len(s.points) for s in chart.series)
        for series in chart.series:
            values = [value for _, value in series.points]
            finite = [v for v in (_finite(x) for x in values) if v is not None]
            if not finite:
                lines.append("    %s  (no samples)" % series.label.ljust(label_width))
                continue
            numbers = "min %s max %s last %s" % tuple(
                _format_number(round(v, 2)) for v in (min(finite), max(finite), finite[-1]))
            room = max(8, width - 4 - label_width - 2 - 2 - len(numbers))
            lines.append("    %s  %s  %s" % (series.label.ljust(label_width),
                                             _format_sparkline(values, room, ascii_only).ljust(
                                                 min(room, longest)), numbers))
    return "\n".join(lines) + ("\n" if lines else "")


# --- report: one self-contained HTML page (inline SVG and CSS, no script) -------------------------

def _escape_html(value):
    """Every value that reaches the page, escaped (service names and log lines are user data)."""
    import html
    return html.escape("" if value is None else str(value), quote=True)


# The report's layout is fixed (tests/test_report_screenshot_e2e.py samples pixels at it): the
# timeline's label column, row height and bar area.
_GANTT_LABEL_WIDTH = 200
_GANTT_ROW_HEIGHT = 30
_GANTT_BAR_WIDTH = 660
_GANTT_TOP = 36
_CHART_WIDTH = 440
_CHART_HEIGHT = 250

_REPORT_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; color: #111; background: #fff; margin: 24px; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 24px 0 8px; }
table.facts td { padding: 1px 14px 1px 0; vertical-align: top; } table.facts td:first-child { color: #555; }
svg { display: block; } svg text { font: 12px system-ui, sans-serif; fill: #111; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.note { color: #555; font-style: italic; }
.log { border-left: 4px solid #999; padding-left: 10px; margin: 10px 0; }
.log.failed { border-left: 8px solid #d55e00; background: #fff3ec; }
.log h3 { font-size: 14px; margin: 4px 0; } .log.failed h3::after { content: " (failed)"; color: #a03c00; }
pre { font: 12px/1.35 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; margin: 0; }
@media print { body { margin: 0; } .log.failed { background: none; } }
"""


def _format_timeline_svg(timeline):
    """The Gantt chart: a row per service (its badge, name, phase bars, events), a time axis, legend."""
    rows = len(timeline.services)
    height = _GANTT_TOP + rows * _GANTT_ROW_HEIGHT + 70
    width = _GANTT_LABEL_WIDTH + _GANTT_BAR_WIDTH + 70
    x0, x1 = _GANTT_LABEL_WIDTH, _GANTT_LABEL_WIDTH + _GANTT_BAR_WIDTH
    start = timeline.start_ms or 0
    end = max(start + 1000, timeline.end_ms or start)
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
             'role="img" aria-label="timeline">' % (width, height, width, height),
             '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
             'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f2f2f2"/>'
             '<line x1="0" y1="0" x2="0" y2="6" stroke="#9a9a9a" stroke-width="2"/></pattern></defs>']
    bottom = _GANTT_TOP + rows * _GANTT_ROW_HEIGHT
    for at_ms, label in _time_ticks(start, end, 8):
        x = _scale(at_ms, (start, end), (x0, x1))
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>'
                     '<text x="%.1f" y="%d" text-anchor="middle">%s</text>'
                     % (x, _GANTT_TOP - 4, x, bottom, x, _GANTT_TOP - 10, _escape_html(label)))
    for row, service in enumerate(timeline.services):
        y = _GANTT_TOP + row * _GANTT_ROW_HEIGHT
        badge = _SERVICE_FAILED_COLOUR if service.failed else _SERVICE_OK_COLOUR
        parts.append('<rect class="badge" x="4" y="%d" width="14" height="14" fill="%s"/>'
                     % (y + 8, badge))
        name = service.name if len(service.name) <= 24 else service.name[:23] + "\u2026"
        parts.append('<text x="24" y="%d"%s>%s%s</text>' % (
            y + 20, ' font-weight="bold"' if service.failed else "", _escape_html(name),
            " \u2717" if service.failed else ""))
        for span in service.spans:
            left = _scale(span.start_ms, (start, end), (x0, x1))
            right = max(left + 2, _scale(span.end_ms, (start, end), (x0, x1)))
            fill = "url(#hatch)" if span.phase == "waiting" else _PHASE_COLOURS[span.phase]
            if right - left < 4:   # too thin to point at: no tooltip (a restart loop has many)
                parts.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>' % (
                    left, y + 5, right - left, _GANTT_ROW_HEIGHT - 10, fill))
                continue
            parts.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s">'
                         '<title>%s %s to %s</title></rect>' % (
                             left, y + 5, right - left, _GANTT_ROW_HEIGHT - 10, fill,
                             _escape_html(span.phase),
                             _format_elapsed((span.start_ms - start) / 1000.0),
                             _format_elapsed((span.end_ms - start) / 1000.0)))
        for event in service.events:
            x = _scale(event.at_ms, (start, end), (x0, x1))
            if event.kind == "restart":
                parts.append('<path d="M%.1f %d l5 -6 h-10 z" fill="#000"><title>%s</title></path>'
                             % (x, y + 5, _escape_html(event.text)))
            elif event.kind == "ready":
                parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000" '
                             'stroke-width="2"><title>ready</title></line>'
                             % (x, y + 3, x, y + _GANTT_ROW_HEIGHT - 3))
            elif event.kind == "exit" and event.text != "exit 0":
                parts.append('<text x="%.1f" y="%d" font-size="10">%s</text>'
                             % (x + 3, y + _GANTT_ROW_HEIGHT - 1, _escape_html(event.text)))
    for event in timeline.events:
        x = _scale(event.at_ms, (start, end), (x0, x1))
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000" '
                     'stroke-dasharray="3 3"><title>%s</title></line>'
                     % (x, _GANTT_TOP - 4, x, bottom + 4, _escape_html(event.text)))
    y = bottom + 24
    x = x0
    for phase in _TIMELINE_PHASES:
        fill = "url(#hatch)" if phase == "waiting" else _PHASE_COLOURS[phase]
        parts.append('<rect x="%d" y="%d" width="14" height="12" fill="%s" stroke="#555" '
                     'stroke-width="0.5"/><text x="%d" y="%d">%s</text>'
                     % (x, y, fill, x + 18, y + 11, phase))
        x += 28 + 8 * len(phase)
    parts.append('<path d="M%d %d l5 -6 h-10 z" fill="#000"/><text x="%d" y="%d">restart</text>'
                 % (x + 5, y + 11, x + 14, y + 11))
    parts.append('<text x="%d" y="%d">|  ready: the readiness moment; dashed: job start, signals, '
                 'end</text>' % (x0, y + 34))
    parts.append("</svg>")
    return "\n".join(parts)


def _thin_points(points, limit):
    """At most ``limit`` points: consecutive runs merged into their last time and highest value
    (a peak stays visible), so a day of samples does not make a page of megabytes."""
    if len(points) <= limit:
        return list(points)
    thinned = []
    for index in range(limit):
        chunk = points[index * len(points) // limit:(index + 1) * len(points) // limit]
        if chunk:
            thinned.append((chunk[-1][0], max(value for _, value in chunk)))
    return thinned


def _format_chart_svg(chart, start_ms, end_ms):
    """One resource chart: axes with ticks and units, a line per series, a legend."""
    left, top, right, bottom = 60, 28, _CHART_WIDTH - 14, _CHART_HEIGHT - 80
    points = [p for s in chart.series for p in s.points if _finite(p[1]) is not None]
    times = [p[0] for p in points]
    start = start_ms if start_ms is not None else min(times)
    end = max([end_ms or start] + times + [start + 1000])
    low, high, ticks = _nice_ticks(0.0, max([p[1] for p in points] or [0.0]), 4)
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
             'aria-label="%s">' % (_CHART_WIDTH, _CHART_HEIGHT, _escape_html(chart.title)),
             '<text x="%d" y="16" font-weight="bold">%s (%s)</text>'
             % (left, _escape_html(chart.title), _escape_html(chart.unit))]
    for tick in ticks:
        y = _scale(tick, (low, high), (bottom, top))
        parts.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e4e4e4"/>'
                     '<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                     % (left, y, right, y, left - 4, y + 4, _format_number(tick)))
    for at_ms, label in _time_ticks(start, end, 5):
        x = _scale(at_ms, (start, end), (left, right))
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#888"/>'
                     '<text x="%.1f" y="%d" text-anchor="middle">%s</text>'
                     % (x, bottom, x, bottom + 4, x, bottom + 16, _escape_html(label)))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (left, top, left, bottom, left, bottom, right, bottom))
    parts.append('<text x="%d" y="%d" text-anchor="end" fill="#555">time since job start</text>'
                 % (right, bottom + 31))
    for index, series in enumerate(chart.series):
        colour, dash = _SERIES_STYLES[index % len(_SERIES_STYLES)]
        finite = [(at, value) for at, value in series.points if _finite(value) is not None]
        coordinates = ["%.1f,%.1f" % (_scale(at, (start, end), (left, right)),
                                      _scale(value, (low, high), (bottom, top)))
                       for at, value in _thin_points(finite, (right - left) // 2)]
        if len(coordinates) == 1:
            x, y = coordinates[0].split(",")
            parts.append('<circle cx="%s" cy="%s" r="3" fill="%s"/>' % (x, y, colour))
        elif coordinates:
            parts.append('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>'
                         % (colour, ' stroke-dasharray="%s"' % dash if dash else "",
                            " ".join(coordinates)))
        x = left + (index % 3) * 125
        y = bottom + 50 + (index // 3) * 15
        parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>'
                     '<text x="%d" y="%d">%s</text>'
                     % (x, y - 4, x + 20, y - 4, colour,
                        ' stroke-dasharray="%s"' % dash if dash else "", x + 24, y,
                        _escape_html(series.label[:18])))
    parts.append("</svg>")
    return "\n".join(parts)


def _script_resources(script_path):
    """The ``#SBATCH`` lines of the job's script that say what it asked for (nodes, time, ...)."""
    wanted = ("--nodes", "--ntasks", "--cpus-per-task", "--mem", "--gres", "--gpus", "--time",
              "--partition")
    found = []
    try:
        with open(script_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.startswith("#SBATCH "):
                    if line.strip() and not line.startswith("#"):
                        break
                    continue
                option = line[len("#SBATCH "):].strip()
                if option.split("=", 1)[0] in wanted:
                    found.append(option)
    except (OSError, TypeError):
        pass
    return found


def _report_facts(record, scheduler, state, timeline):
    """``[(label, text)]``: the job's facts at the top of the report."""
    import time
    state = state or {}
    facts = [("job", "%s (%s)" % (record.get("job_name") or "-", record["job_id"])),
             ("scheduler", scheduler.state + (", exit %s" % scheduler.exit_code
                                              if scheduler.exit_code else "")),
             ("runtime", "%s%s" % (timeline.status, ", exit code %s" % timeline.exit_code
                                   if timeline.exit_code is not None else ""))]
    if state.get("reason"):
        facts.append(("reason", state["reason"]))
    nodes = sorted(set(str((s.get("placement") or {}).get("nodelist")) for s in
                       state.get("services") or () if isinstance(s.get("placement"), dict)
                       and (s.get("placement") or {}).get("nodelist")))
    if nodes:
        facts.append(("nodes", ", ".join(nodes)))
    resources = _script_resources(record.get("script_path"))
    if resources:
        facts.append(("resources", " ".join(resources)))
    submitted = _finite(record.get("submitted_at"))
    if submitted is not None:
        facts.append(("submitted", _format_moment(submitted)))
        if timeline.start_ms is not None:
            facts.append(("queue wait", _format_elapsed(timeline.start_ms / 1000.0 - submitted)))
    if timeline.start_ms is not None:
        facts.append(("elapsed", _format_elapsed((timeline.end_ms - timeline.start_ms) / 1000.0)))
    attempt = state.get("attempt")
    if isinstance(attempt, int) and attempt > 0:
        facts.append(("attempts", "%d (requeued %d times)" % (attempt + 1, attempt)))
    facts.append(("report made", _format_moment(time.time())))
    return facts


def _format_report_html(facts, timeline, charts, logs, metrics_note):
    """The whole report page: facts, timeline, charts (or why there are none), last log lines.

    ``logs`` is ``[(service name, failed, [lines])]``; every value is escaped here."""
    title = "hpc-compose report: %s" % facts[0][1]
    body = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
            '<meta name="generator" content="hpc-compose %s">' % _escape_html(__version__),
            '<title>%s</title>' % _escape_html(title), '<style>%s</style>' % _REPORT_STYLE,
            '</head>', '<body>', '<h1>%s</h1>' % _escape_html(title), '<table class="facts">']
    for label, text in facts:
        body.append('<tr><td>%s</td><td>%s</td></tr>' % (_escape_html(label), _escape_html(text)))
    body += ['</table>', '<h2>Timeline</h2>']
    if timeline.start_ms is None:
        body.append('<p class="note">No state records yet: the job has not started.</p>')
    else:
        if timeline.source == "state":
            body.append('<p class="note">Drawn from state.json alone (each service\'s last launch '
                        'and exit): the job\'s script wrote no timeline.jsonl.</p>')
        body.append(_format_timeline_svg(timeline))
    body.append('<h2>Resources</h2>')
    if charts:
        body.append('<div class="charts">')
        body += [_format_chart_svg(chart, timeline.start_ms, timeline.end_ms) for chart in charts]
        body.append('</div>')
    else:
        body.append('<p class="note">%s</p>' % _escape_html(metrics_note))
    body.append('<h2>Last log lines</h2>')
    for name, failed, lines in logs:
        body.append('<div class="log%s"><h3>%s</h3><pre>%s</pre></div>' % (
            " failed" if failed else "", _escape_html(name),
            _escape_html("\n".join(lines)) if lines else "(empty)"))
    body += ['</body>', '</html>']
    return "\n".join(body) + "\n"


def _collect_report(record, squeue_bin="squeue", sacct_bin="sacct", now_ms=None):
    """``(facts, timeline, charts, logs, metrics note)`` of a tracked job, from its files."""
    import time
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    scheduler, _ = _query_scheduler_or_files(record, squeue_bin, sacct_bin)
    state = _load_runtime_state(record["job_dir"])
    timeline = _build_timeline(_load_timeline_records(record["job_dir"]), state, now_ms)
    charts = _load_job_charts(record, sacct_bin)
    if charts:
        note = ""
    elif record.get("metrics_enabled"):
        note = "The metrics sampler (x-slurm.metrics) recorded no samples for this job."
    else:
        note = ("No resource samples: this job did not enable x-slurm.metrics "
                "(see docs/reports.md for what the sampler records and what it costs).")
    failed = set(s.name for s in timeline.services if s.failed)
    logs = [(name, name in failed, _tail_lines(path, _REPORT_LOG_LINES))
            for name, path in _record_log_sources(record)]
    return _report_facts(record, scheduler, state, timeline), timeline, charts, logs, note


# --- artifacts export -----------------------------------------------------------------------------

def _expand_export_dir(template, job_id, project_dir):
    """x-slurm.artifacts.export_dir with ``${SLURM_JOB_ID}`` expanded, relative to the compose dir."""
    path = str(template).replace("${SLURM_JOB_ID}", str(job_id)).replace("$SLURM_JOB_ID", str(job_id))
    return os.path.normpath(os.path.join(project_dir, os.path.expanduser(path)))


def _copy_entry(source, target):
    """Copy a file, symlink (recreated) or directory tree; overwrites what an earlier export left."""
    import shutil
    if os.path.islink(source):
        if os.path.lexists(target):
            os.unlink(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(source), target)
    elif os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(source)):
            _copy_entry(os.path.join(source, name), os.path.join(target, name))
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def _files_to_list(root, relative_paths):
    """Provenance entries (type, size, sha256) for every file under the exported relative paths."""
    import hashlib
    entries = []

    def visit(relative):
        path = os.path.join(root, relative)
        if os.path.islink(path):
            entries.append({"relative_path": relative, "entry_type": "symlink", "size_bytes": None,
                            "sha256": None, "link_target": os.readlink(path)})
        elif os.path.isdir(path):
            entries.append({"relative_path": relative, "entry_type": "directory",
                            "size_bytes": None, "sha256": None, "link_target": None})
            for name in sorted(os.listdir(path)):
                visit(os.path.join(relative, name))
        elif os.path.isfile(path):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            entries.append({"relative_path": relative, "entry_type": "file",
                            "size_bytes": os.path.getsize(path), "sha256": digest.hexdigest(),
                            "link_target": None})

    for relative in relative_paths:
        visit(relative)
    return entries


def _export_artifacts(record, bundles=None, tarball=False, export_template=None):
    """Copy collected artifacts into the export dir, with provenance JSON per bundle."""
    try:
        return _export_artifact_bundles(record, bundles, tarball, export_template)
    except OSError as exc:
        raise ToolError("artifact export failed: %s" % exc,
                        hint="check that the export dir is writable and has space")


def _export_artifact_bundles(record, bundles, tarball, export_template):
    import time
    import tarfile
    job_id = record["job_id"]
    template = export_template or record.get("artifact_export_dir")
    if not template:
        raise UsageError("job %s has no x-slurm.artifacts.export_dir" % job_id,
                         hint="add an x-slurm.artifacts block to the compose file and resubmit")
    artifacts_dir = os.path.join(record["job_dir"], "artifacts")
    manifest = _load_json(os.path.join(artifacts_dir, "manifest.json"))
    if not isinstance(manifest, dict):
        raise ToolError("job %s has no collected artifacts yet (%s is missing)"
                        % (job_id, os.path.join(artifacts_dir, "manifest.json")),
                        hint="artifacts are collected when the job ends; check 'hpc-compose status'")
    owners = [str(job_id)]
    if record.get("array_task") is not None:
        # A task's batch script knows itself by its own Slurm job id, as state.json records it.
        owners.append(str((_load_runtime_state(record["job_dir"]) or {}).get("job_id")))
    if str(manifest.get("job_id")) not in owners:
        raise ToolError("%s belongs to job %s, not %s" % (os.path.join(artifacts_dir, "manifest.json"),
                                                          manifest.get("job_id"), job_id))
    available = manifest.get("bundles") or {}
    selected = list(bundles) if bundles else list(available)
    unknown = [b for b in selected if b not in available]
    if unknown:
        raise UsageError("unknown artifact bundle(s): %s" % ", ".join(unknown),
                         hint="bundles of job %s: %s" % (job_id, ", ".join(available) or "(none)"))
    export_dir = _expand_export_dir(template, job_id, record["project_dir"])
    payload = os.path.join(artifacts_dir, "payload")
    results = []
    for name in selected:
        bundle = available[name] or {}
        target = export_dir if name == "default" else os.path.join(export_dir, "bundles", name)
        warnings = list(bundle.get("warnings") or [])
        exported = []
        for relative in bundle.get("copied_relative_paths") or []:
            relative = os.path.normpath(str(relative))
            if relative.startswith("..") or os.path.isabs(relative):
                warnings.append("skipped unsafe path %s" % relative)
                continue
            source = os.path.join(payload, relative)
            if not os.path.lexists(source):
                warnings.append("missing from payload: %s" % relative)
                continue
            _copy_entry(source, os.path.join(target, relative))
            exported.append(relative)
        tarball_path = None
        if tarball:
            tarball_path = os.path.join(export_dir, "%s.tar.gz" % name)
            os.makedirs(export_dir, exist_ok=True)
            with tarfile.open(tarball_path + ".tmp", "w:gz") as archive:
                for relative in sorted(exported):
                    archive.add(os.path.join(target, relative), arcname=relative)
            os.replace(tarball_path + ".tmp", tarball_path)
        provenance = {
            "schema_version": _EXPORT_PROVENANCE_SCHEMA_VERSION, "job_id": job_id, "bundle": name,
            "attempt": manifest.get("attempt"), "is_resume": manifest.get("is_resume"),
            "resume_dir": manifest.get("resume_dir"), "compose_file": record.get("compose_file"),
            "script_path": record.get("script_path"), "collect_policy": manifest.get("collect_policy"),
            "job_outcome": manifest.get("job_outcome"), "collected_at": manifest.get("collected_at"),
            "exported_at_unix": int(time.time()), "export_dir": export_dir, "bundle_dir": target,
            "tarball_path": tarball_path, "selected_bundles": selected,
            "declared_source_patterns": bundle.get("declared_source_patterns") or [],
            "matched_source_paths": bundle.get("matched_source_paths") or [],
            "copied_relative_paths": exported, "warnings": warnings,
            "files": _files_to_list(target, exported),
        }
        provenance_path = os.path.join(export_dir, "_hpc-compose", "bundles", "%s.json" % name)
        _write_json_atomic(provenance_path, provenance)
        results.append({"bundle": name, "bundle_dir": target, "exported": exported,
                        "warnings": warnings, "tarball_path": tarball_path,
                        "provenance_path": provenance_path})
    return {"job_id": job_id, "export_dir": export_dir, "manifest_path":
            os.path.join(artifacts_dir, "manifest.json"), "collect_policy":
            manifest.get("collect_policy"), "job_outcome": manifest.get("job_outcome"),
            "bundles": results}


# --- clean ----------------------------------------------------------------------------------------

def _job_is_finished(job_dir, queue_states, queue_known):
    """True only when we are sure the job no longer runs (state.json final, or not in the queue)."""
    state = _load_runtime_state(job_dir)
    if state and state.get("status") in _FINAL_RUNTIME_STATUSES:
        return True
    if not queue_known:
        return False
    job_id = os.path.basename(job_dir)
    queued = queue_states.get(job_id)
    return queued is None or queued in _TERMINAL_STATES


def _clean_jobs(project_dir, age_days=None, remove_all=False, squeue_bin="squeue", now=None,
               compose_file=None):
    """Remove old tracked jobs (record + job dir); never a running job, never the latest one.

    With ``compose_file``, only that file's jobs (and job dirs no record claims) are candidates.
    Returns ``(removed ids, {kept id: why})``.
    """
    import shutil
    import time
    now = time.time() if now is None else now
    root = _tracking_root(project_dir)
    latest = _latest_job_record(project_dir, compose_file)
    latest_id = str(latest.get("job_id")) if isinstance(latest, dict) else None
    candidates, claimed = {}, set()
    for record in _list_job_records(project_dir):
        claimed.add(str(record["job_id"]))
        if compose_file and record.get("compose_file") and \
                not _same_file(record["compose_file"], compose_file):
            continue
        candidates[str(record["job_id"])] = record.get("submitted_at")
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        if name.isdigit() and os.path.isdir(os.path.join(root, name)) and name not in claimed:
            candidates[name] = os.path.getmtime(os.path.join(root, name))
    chosen, kept = [], {}
    for job_id, submitted_at in sorted(candidates.items(), key=lambda item: _job_id_order(item[0])):
        if job_id == latest_id:
            kept[job_id] = "latest tracked job"
            continue
        if not remove_all and submitted_at is not None and now - submitted_at < age_days * 86400.0:
            continue
        chosen.append(job_id)
    queue_states, queue_known = _queue_facts(project_dir, chosen, squeue_bin)
    removed = []
    for job_id in chosen:
        directory = _job_directory(project_dir, job_id)
        if not _job_is_finished(directory, queue_states, queue_known):
            kept[job_id] = ("still in the queue (%s)" % queue_states[job_id]
                            if job_id in queue_states else "could not confirm that it ended")
            continue
        if os.path.isdir(directory) and not os.path.islink(directory):
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.unlink(_job_record_path(project_dir, job_id))
        except OSError:
            pass
        _remove_unheld_lock(os.path.join(root, ".%s.local-lock" % job_id))  # of up --local
        removed.append(job_id)
    return removed, kept


def _remove_unheld_lock(path):
    """Delete the lock file ``path`` unless someone holds its lock (or it is not there)."""
    if not os.path.exists(path):
        return
    handle = _try_lock(path)
    if handle is not None:
        _remove_quietly(path)
        handle.close()


def _queue_facts(project_dir, job_ids, squeue_bin):
    """``(queue states, known)`` for the jobs without a final state.json: one squeue call at most."""
    unsure = [j for j in job_ids if not _final_state_file(_job_directory(project_dir, j))]
    if not unsure:
        return {}, True
    try:
        return _squeue_states(unsure, squeue_bin), True
    except ToolError:
        return {}, False


def _final_state_file(job_dir):
    state = _load_runtime_state(job_dir)
    return bool(state and state.get("status") in _FINAL_RUNTIME_STATUSES)


# --- cache prune: never what a tracked, unfinished job uses ---------------------------------------
# Here, after tracking, because which jobs may still run is tracking's rule (records, state.json,
# one squeue call); what the cache holds and how an artifact is removed are the images section's.

def _paths_named_in(value, found):
    if isinstance(value, dict):
        for item in value.values():
            _paths_named_in(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _paths_named_in(item, found)
    elif isinstance(value, str) and value.endswith(_ARTIFACT_SUFFIXES):
        found.add(value)


def _script_artifacts(text):
    import re
    return set(re.findall(r"(/[^\s'\"=,]+\.(?:sqsh|squashfs))", text))


def _submitted_script_artifacts(record, project_dir):
    """Artifact paths in the job's rendered script, if the script is still the one submitted (the
    next render overwrites it: a newer file says nothing about this job)."""
    script = record.get("script_path")
    submitted = record.get("submitted_at")
    if not isinstance(script, str) or not isinstance(submitted, (int, float)):
        return set()
    script = script if os.path.isabs(script) else os.path.join(project_dir, script)
    try:
        if os.path.getmtime(script) > submitted + 1:
            return set()
        with open(script, encoding="utf-8", errors="replace") as handle:
            return _script_artifacts(handle.read())
    except OSError:
        return set()


def _artifacts_in_use(cache_dir, extra_projects=(), squeue_bin="squeue"):
    """``{artifact_path: reason}`` for artifacts a tracked, unfinished job may be using.

    Jobs are found through the projects named in the cache's manifests (and ``extra_projects``):
    ``<compose dir>/.hpc-compose/jobs/*.json``. The paths come from the job record and its rendered
    script; when a running job names none, every artifact of that project is protected.
    """
    entries = list_cache(cache_dir)
    projects = set(extra_projects)
    for entry in entries:
        projects.update(p for p in (entry.get("projects") or []) if isinstance(p, str))
    in_use = {}
    for compose_file in sorted(projects):
        project_dir = os.path.dirname(compose_file)
        for job_id, record in _jobs_in_progress(project_dir, squeue_bin):
            found = set()
            _paths_named_in(record, found)
            found |= _submitted_script_artifacts(record, project_dir)
            reason = "used by job %s of %s" % (job_id, compose_file)
            if found:
                for path in found:
                    in_use.setdefault(os.path.abspath(path), reason)
            else:
                for entry in entries:
                    if compose_file in (entry.get("projects") or []):
                        in_use.setdefault(entry["artifact_path"], reason + " (its artifacts are unknown)")
    return in_use


def prune_cache(cache_dir, age_days=None, runtime_plan=None, now=None, squeue_bin="squeue"):
    """Remove old (``age_days``) or unused (``runtime_plan``: this project's artifacts its plan no
    longer references) cache entries, never what a tracked unfinished job uses. Returns a report."""
    import time
    if (age_days is None) == (runtime_plan is None):
        raise UsageError("choose one prune strategy: --age DAYS or --all-unused -f FILE")
    now = time.time() if now is None else now
    extra = [runtime_plan.plan.compose_file] if runtime_plan is not None else []
    in_use = _artifacts_in_use(cache_dir, extra, squeue_bin)
    referenced = _runtime_artifacts(runtime_plan) if runtime_plan is not None else set()
    removed, kept = [], []
    for entry in list_cache(cache_dir):
        path = entry["artifact_path"]
        if runtime_plan is not None:
            if path in referenced or runtime_plan.plan.compose_file not in (entry.get("projects") or []):
                continue
        else:
            stamp = max(entry.get("created_at") or 0, entry.get("last_used_at") or 0)
            if stamp > now - age_days * 86400:
                continue
        if path in in_use:
            kept.append({"path": path, "reason": in_use[path]})
            continue
        if _remove_artifact(path):
            removed.append(path)
        else:
            kept.append({"path": path, "reason": "a prepare is writing it right now"})
    if age_days is not None:
        # Leftovers of interrupted imports/exports (never reused: only renamed files are artifacts).
        for kind in ("base", "prepared"):
            directory = os.path.join(cache_dir, kind)
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                if name.startswith(_PARTIAL_PREFIX) and os.path.getmtime(path) <= now - max(age_days, 1) * 86400:
                    _remove_quietly(path)
                    removed.append(path)
    return {"cache_dir": cache_dir, "mode": "age" if age_days is not None else "all_unused",
            "age_days": age_days, "removed_count": len(removed), "removed_paths": removed,
            "kept_in_use": kept}


##############################################################################
# Init templates: the shipped examples
##############################################################################
# The examples/ folder is the template library. It is read through the module's own loader, so the
# same code finds it inside the .pyz (zipimport) and beside hpc_compose.py in a checkout. A template
# is edited as text, not re-serialized: the user gets the example's comments and layout intact.

# The order of `init --list`: the simplest first, then by workload family.
TEMPLATE_NAMES = (
    "minimal-batch", "host-pipeline", "app-redis-worker", "dev-python-app", "postgres-etl",
    "restart-policy", "multi-stage-pipeline", "fairseq-preprocess", "llm-curl-workflow",
    "llm-curl-workflow-workdir", "llama-app", "llama-uv-worker", "vllm-openai", "vllm-uv-worker",
    "training-checkpoints", "training-resume", "mpi-hello", "multi-node-mpi", "multi-node-torchrun",
    "long-training", "parameter-sweep", "sweep-grid",
)

_DEFAULT_INIT_OUTPUT = "compose.yaml"


class InitTemplate(NamedTuple):
    """A shipped example, as ``load_template`` and ``list_templates`` return it."""
    name: str
    description: str               # the text after "# <name>: " on the example's first line
    text: str                      # the example file, unchanged


def _examples_location():
    """``(loader, folder)`` where the shipped examples live for this copy of the module."""
    # A module built by hand (zipapp loader, exec) may lack __file__ or __loader__: read them as data.
    module_file = globals().get("__file__") or ""
    folder = os.path.join(os.path.dirname(os.path.abspath(module_file)), "examples")
    return globals().get("__loader__"), folder


def _load_example(relative_path):
    """Bytes of ``examples/<relative_path>``; ``None`` when this copy ships no such file."""
    loader, folder = _examples_location()
    path = os.path.join(folder, *relative_path.split("/"))
    # zipimporter.get_data and SourceFileLoader.get_data both take a path under the module's
    # folder (or archive), so one call covers the .pyz and a checkout.
    if loader is not None and hasattr(loader, "get_data"):
        try:
            return loader.get_data(path)
        except (OSError, IOError):
            pass
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (OSError, IOError):
        return None


def _no_examples_error():
    _, folder = _examples_location()
    return HpcComposeError(
        "the shipped examples are not available to this copy of hpc-compose (looked in %s)" % folder,
        hint="use the released hpc-compose.pyz, or run hpc_compose.py from a checkout that has its "
             "examples/ folder; a vendored single hpc_compose.py carries no templates")


def _template_description(text):
    """The one-line description from an example's first line ``# <name>: <description>``."""
    first = text.split("\n", 1)[0]
    if first.startswith("#") and ":" in first:
        return first.split(":", 1)[1].strip()
    return ""


def load_template(name) -> InitTemplate:
    """The shipped example ``name`` (a trailing ``.yaml`` is tolerated) as an ``InitTemplate``."""
    wanted = name[:-5] if name.endswith(".yaml") else name
    if wanted not in TEMPLATE_NAMES:
        raise UsageError("unknown template '%s'" % name,
                         hint="available templates: %s (see 'hpc-compose init --list')"
                              % ", ".join(TEMPLATE_NAMES))
    data = _load_example(wanted + ".yaml")
    if data is None:
        raise _no_examples_error()
    text = data.decode("utf-8")
    return InitTemplate(wanted, _template_description(text), text)


def list_templates() -> List[InitTemplate]:
    """Every shipped template, in ``init --list`` order."""
    return [load_template(name) for name in TEMPLATE_NAMES]


def _init_yaml_scalar(value):
    """``value`` as a YAML scalar that reads back as exactly that string."""
    import json
    import re
    if (re.match(r"^[A-Za-z0-9_/.$~][A-Za-z0-9_/.$~@+=-]*$", value)
            and value.lower() not in ("true", "false", "null", "~", "yes", "no", "on", "off")
            and not re.match(r"^[-+]?(\.?[0-9]|0[xo])", value)):
        return value
    # A JSON string is a valid YAML double-quoted scalar with the same meaning.
    return json.dumps(value, ensure_ascii=False)


def _init_top_level_key(line):
    """The key of a top-level ``key: ...`` line, or ``None`` (comments, blanks, indented lines)."""
    if not line or line[0] in " \t#" or ":" not in line:
        return None
    key = line.split(":", 1)[0].strip()
    if key.startswith(("'", '"')):
        key = key[1:-1]
    return key


def _init_line_key(line, indent):
    """The key of a ``key: ...`` line at exactly ``indent`` spaces, or ``None``."""
    body = line[indent:]
    if line[:indent].strip() or not body or body[0] in " \t#" or ":" not in body:
        return None
    return body.split(":", 1)[0].strip()


def _init_trailing_comment(line):
    """The trailing `` # comment`` of a simple ``key: value`` line ('' when none)."""
    index = line.find(" #")
    return line[index:] if index >= 0 and "'" not in line and '"' not in line else ""


def customize_template(text, name=None, job_name=None, cache_dir=None):
    """Set top-level ``name``, ``x-slurm.job_name`` and ``x-slurm.cache_dir`` in a template's text.

    Only the lines holding those keys change (they are added where missing); every comment and the
    layout of the example stay as they were.
    """
    lines = text.split("\n")
    if name is not None:
        _init_set_name(lines, name)
    settings = [(key, value) for key, value in (("job_name", job_name), ("cache_dir", cache_dir))
                if value is not None]
    if settings:
        _init_set_slurm_keys(lines, settings)
    return "\n".join(lines)


def _init_set_name(lines, name):
    for index, line in enumerate(lines):
        if _init_top_level_key(line) == "name":
            lines[index] = "name: " + _init_yaml_scalar(name) + _init_trailing_comment(line)
            return
    # No name yet: put it before the first top-level key, below the header comment.
    for index, line in enumerate(lines):
        if _init_top_level_key(line) is not None:
            lines[index:index] = ["name: " + _init_yaml_scalar(name), ""]
            return
    lines.append("name: " + _init_yaml_scalar(name))


def _init_set_slurm_keys(lines, settings):
    header = None
    for index, line in enumerate(lines):
        if _init_top_level_key(line) == "x-slurm":
            header = index
            break
    if header is None:
        block = ["x-slurm:"] + ["  %s: %s" % (key, _init_yaml_scalar(value)) for key, value in settings]
        position = len(lines)
        for index, line in enumerate(lines):
            if _init_top_level_key(line) == "services":
                position = index
                break
        lines[position:position] = block + [""]
        return
    rest = lines[header].split(":", 1)[1].strip()
    if rest and not rest.startswith("#"):
        raise HpcComposeError("template x-slurm block is not in block style; cannot edit it")
    end = len(lines)
    indent = None
    for index in range(header + 1, len(lines)):
        line = lines[index]
        if _init_top_level_key(line) is not None or (line[:1] not in ("", " ", "\t", "#")):
            end = index
            break
        stripped = line.lstrip(" ")
        if indent is None and stripped and not stripped.startswith("#"):
            indent = len(line) - len(stripped)
    indent = indent or 2
    missing = []
    for key, value in settings:
        for index in range(header + 1, end):
            if _init_line_key(lines[index], indent) == key:
                lines[index] = "%s%s: %s%s" % (" " * indent, key, _init_yaml_scalar(value),
                                               _init_trailing_comment(lines[index]))
                break
        else:
            missing.append("%s%s: %s" % (" " * indent, key, _init_yaml_scalar(value)))
    lines[header + 1:header + 1] = missing


def _template_assets(text):
    """Relative host paths (``./...``) a template mounts, which must be copied along with it."""
    import re
    found = []
    for match in re.finditer(r"^\s*-\s*['\"]?(\./[^:'\"\s]+):", text, re.M):
        if match.group(1) not in found:
            found.append(match.group(1))
    return found


def _example_file_names():
    """Every file shipped under examples/, as ``a/b.txt`` paths relative to that folder."""
    loader, folder = _examples_location()
    archive = getattr(loader, "archive", None)
    if archive:
        import zipfile
        with zipfile.ZipFile(archive) as bundle:
            return sorted(name[len("examples/"):] for name in bundle.namelist()
                          if name.startswith("examples/") and not name.endswith("/"))
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", _METADATA_DIR_NAME))
        for file_name in files:
            if not file_name.endswith(".pyc"):
                relative = os.path.relpath(os.path.join(root, file_name), folder)
                names.append(relative.replace(os.sep, "/"))
    return sorted(names)


def _template_files(template):
    """``{relative path: bytes}`` of the shipped files in the folders a template mounts."""
    folders = [asset[2:].rstrip("/") for asset in _template_assets(template.text)]
    files = {}
    for name in _example_file_names():
        if any(name.startswith(folder + "/") for folder in folders):
            data = _load_example(name)
            if data is not None:
                files[name] = data
    return files


##############################################################################
# Migrate: a docker-compose.yml becomes an hpc-compose spec
##############################################################################
# migrate_compose(text, filename, options) -> MigrateResult. A line-oriented rewrite of the user's
# file guided by the YAML reader's marks: every key the spec accepts keeps its lines (comments,
# order, anchors); a key that must change is replaced, dropped or added as whole lines, each change
# led by one ``# migrate: ...`` comment line saying what was done and why. What cannot be expressed
# gets a ``# migrate: TODO ...`` line, which load_spec then reports as the first problem.
# Dockerfiles named by ``build:`` become image + x-enroot.prepare (_migrate_build, which
# reads them through _translate_dockerfile). _Migration holds the file's rows, edits and
# what services share; _ServiceMigration rewrites one service, key by key (KEY_RULES).
# The only I/O is reading Dockerfiles and env/secret files through ``options.read_text``; the CLI
# handler writes the result and creates the data folders.

_MIGRATE_BUILD_MOUNT = "/tmp/hpc-compose-build"
_MIGRATE_DEFAULT_DATA_DIR = "./data"
_NETWORK_REASON = "services share the node's network (reach them at 127.0.0.1)"
# Service keys with no meaning on a Slurm allocation: dropped, each with the reason shown.
_MIGRATE_DROPPED_KEYS = {
    "ports": _NETWORK_REASON + "; pick ports that are free on the compute node",
    "expose": _NETWORK_REASON,
    "networks": "there is no Docker network: " + _NETWORK_REASON,
    "network_mode": "there is no Docker network: " + _NETWORK_REASON,
    "links": "there is no service-name DNS: " + _NETWORK_REASON,
    "external_links": "there is no service-name DNS: " + _NETWORK_REASON,
    "container_name": "each service runs as a Slurm step named after the service",
    "hostname": "services run under the real host name of their node",
    "domainname": "services run under the real host name of their node",
    "extra_hosts": "/etc/hosts comes from the node",
    "dns": "name resolution comes from the node",
    "dns_search": "name resolution comes from the node",
    "dns_opt": "name resolution comes from the node",
    "mac_address": "services share the node's network",
    "logging": "each service's output is captured in the job's log folder (hpc-compose logs)",
    "labels": "containers are not labelled; Slurm tracks the job",
    "annotations": "containers are not annotated; Slurm tracks the job",
    "stop_signal": "the batch script stops services with SIGTERM, then SIGKILL",
    "stop_grace_period": "the batch script stops services with SIGTERM, then SIGKILL",
    "ulimits": "limits come from Slurm and the node",
    "security_opt": "Pyxis runs containers unprivileged as your own user",
    "privileged": "Pyxis runs containers unprivileged as your own user",
    "cap_add": "Pyxis runs containers unprivileged as your own user",
    "cap_drop": "Pyxis runs containers unprivileged as your own user",
    "user": "Pyxis runs containers as your own user",
    "userns_mode": "Pyxis runs containers as your own user",
    "group_add": "Pyxis runs containers as your own user",
    "pid": "each service is its own Slurm step",
    "ipc": "each service is its own Slurm step",
    "cgroup_parent": "Slurm owns the cgroups",
    "cgroup": "Slurm owns the cgroups",
    "tty": "services run without a terminal; output goes to the job's logs",
    "stdin_open": "services run without a terminal; output goes to the job's logs",
    "init": "services run as Slurm steps; Slurm reaps their processes",
    "pull_policy": "images are imported once into the cache (hpc-compose prepare)",
    "platform": "images are imported for the node's architecture",
    "read_only": "whether the image is writable is a site setting (read-only by default in "
                 "Enroot); write to volumes",
    "shm_size": "/dev/shm comes from the node",
    "sysctls": "kernel settings come from the node",
    "tmpfs": "every step gets a fresh /tmp; bind a folder with volumes for other paths",
    "devices": "devices come from the node; ask Slurm for GPUs with x-slurm.gpus",
    "device_cgroup_rules": "Slurm owns the cgroups",
    "oom_kill_disable": "memory is enforced by Slurm (x-slurm.mem)",
    "oom_score_adj": "memory is enforced by Slurm (x-slurm.mem)",
    "mem_reservation": "memory is enforced by Slurm (x-slurm.mem)",
    "memswap_limit": "memory is enforced by Slurm (x-slurm.mem)",
    "mem_swappiness": "memory is enforced by Slurm (x-slurm.mem)",
    "cpu_shares": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_quota": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_period": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpuset": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_count": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_percent": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_rt_runtime": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "cpu_rt_period": "CPUs are allocated by Slurm (x-slurm.cpus_per_task)",
    "pids_limit": "limits come from Slurm and the node",
    "blkio_config": "I/O limits come from the node",
    "storage_opt": "the container file system is the image",
    "isolation": "Pyxis is the container runtime",
    "runtime": "Pyxis is the container runtime",
    "scale": "one instance per service; x-slurm.ntasks runs several tasks of one step",
    "profiles": "every service of the file runs; delete the services you do not want",
    "attach": "every service's output is captured in the job's logs",
    "develop": "there is no watch mode on a batch allocation",
    "post_start": "lifecycle hooks do not exist; put the step in the command",
    "pre_stop": "lifecycle hooks do not exist; put the step in the command",
    "use_api_socket": "there is no Docker daemon on the nodes",
    "credential_spec": "there is no Docker daemon on the nodes",
}
_MIGRATE_TOP_DROPPED = {
    "networks": "there is no Docker network: " + _NETWORK_REASON,
    "volumes": "named volumes became bind mounts of folders (see each service's volumes)",
    "configs": "configs became read-only bind mounts of their files",
}
_DOCKER_MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
                        "g": 1024 ** 3, "gb": 1024 ** 3, "t": 1024 ** 4, "tb": 1024 ** 4,
                        "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2,
                        "gi": 1024 ** 3, "gib": 1024 ** 3}
# Server ping commands a healthcheck often uses, and the port the server listens on by default.
# An environment value that is just a service name is a host name in variables named like these.
_HOST_VARIABLE_WORDS = frozenset(("HOST", "HOSTNAME", "ADDR", "ADDRESS", "SERVER", "SERVERS",
                                  "BROKER", "BROKERS", "ENDPOINT", "NODE"))
_HOST_FLAGS = ("-h", "-H", "--host")
_PING_PROBES = {"redis-cli": ("-p", 6379), "pg_isready": ("-p", 5432),
                "mysqladmin": ("-P", 3306), "mongosh": ("--port", 27017),
                "mongo": ("--port", 27017), "rabbitmq-diagnostics": (None, 5672)}


def _local_secret_source(definition):
    """True for a top-level secret hpc-compose can deliver (a ``file:`` or ``environment:`` one)."""
    return isinstance(definition, dict) and bool(definition.get("file")
                                                 or definition.get("environment"))


class MigrateOptions(NamedTuple):
    """What ``migrate`` was asked for (paths as the user wrote them)."""
    data_dir: str = _MIGRATE_DEFAULT_DATA_DIR
    cache_dir: Optional[str] = None
    runtime: str = _DEFAULT_RUNTIME
    # read_text(path) -> str, or raises OSError (None: open the file)
    read_text: Optional[Callable[[str], str]] = None


class MigrateResult(NamedTuple):
    """The migrated text and what was done to it."""
    text: str
    notes: Tuple[Tuple[int, str], ...]  # ((line in the output, note), ...) in file order
    todos: Tuple[Tuple[int, str], ...]  # ((line in the output, note), ...)
    counts: Dict[str, int]         # {"kept": n, "changed": n, "dropped": n, "added": n}
    data_dirs: Tuple[str, ...]     # folders for named volumes, as written (relative to the file)
    env_files_copied: bool = False  # values of env_file files are in the text (may be secrets)


class _Edit(NamedTuple):
    start: int                     # first replaced row (0-based)
    end: int                       # row after the last replaced one (== start for an insertion)
    lines: Tuple[str, ...]         # the new rows


class _BuildResult(NamedTuple):
    image: Optional[str]           # the FROM image; None without a FROM line
    commands: Tuple[str, ...]
    prepare_env: Tuple[Tuple[str, str], ...]  # ((key, value), ...)
    runtime_env: Tuple[Tuple[str, str], ...]  # ((key, value), ...) from ENV
    mounts: Tuple[str, ...]        # "host:container" prepare mounts
    volumes: Tuple[Tuple[str, str], ...]  # ((volume text, note), ...)
    working_dir: Optional[str]
    command: Union[str, List[str], None]  # CMD: exec form as a list, shell form as a string
    entrypoint: Union[str, List[str], None]  # ENTRYPOINT, in the same forms
    healthcheck: Optional[Dict[str, object]]  # a Compose healthcheck mapping from HEALTHCHECK
    notes: Tuple[str, ...]
    todos: Tuple[str, ...]


def _load_text_file(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def _brief(value, limit=60):
    """A short one-line rendering of a dropped value for its note."""
    import json
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _escape_interpolation(text):
    return text.replace("$", "$$")


# --- value rules ----------------------------------------------------------------------------------

def _docker_memory_megabytes(value):
    """Megabytes (rounded up) of a Compose memory value (``512m``, ``2g``, ``1.5GiB``, bytes)."""
    import math
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    if unit not in _DOCKER_MEMORY_UNITS:
        raise _Invalid("memory %r has an unknown unit" % value)
    try:
        amount = float(number) * _DOCKER_MEMORY_UNITS[unit]
    except ValueError:
        raise _Invalid("memory %r is not a number" % value)
    return int(math.ceil(amount / 1024 ** 2))


def _format_megabytes(megabytes):
    return "%dG" % (megabytes // 1024) if megabytes % 1024 == 0 else "%dM" % megabytes


def _restart_policy(value):
    """``(failure_policy mapping or None, note)`` for a Compose ``restart`` value."""
    text = str(value).strip().lower()
    if text in ("no", "false", ""):
        return None, "restart: no is the default (fail_job: a non-zero exit ends the job)"
    if text.startswith("on-failure"):
        _, _, count = text.partition(":")
        limit = int(count) if count.isdigit() and int(count) > 0 else _DEFAULT_MAX_RESTARTS
        return ({"mode": "restart_on_failure", "max_restarts": limit,
                 "backoff_seconds": _DEFAULT_BACKOFF_SECONDS},
                "restart: %s -> failure_policy restart_on_failure, %d restarts" % (value, limit))
    if text in ("always", "unless-stopped", "any"):
        return ({"mode": "restart_on_failure", "max_restarts": _DEFAULT_MAX_RESTARTS,
                 "backoff_seconds": _DEFAULT_BACKOFF_SECONDS},
                "restart: %s -> failure_policy restart_on_failure with limits (a job ends; "
                "only non-zero exits restart)" % value)
    raise _Invalid("restart %r is not a Compose restart policy" % value)


def _healthcheck_readiness(healthcheck):
    """``(readiness mapping or None, note)``; raises ``_Invalid`` when it cannot be expressed."""
    if not isinstance(healthcheck, dict):
        raise _Invalid("healthcheck is not a mapping")
    if healthcheck.get("disable") is True:
        return None, "healthcheck disabled: no readiness"
    test = healthcheck.get("test")
    if isinstance(test, list):
        words = [str(word) for word in test]
        if not words or words[0] == "NONE":
            return None, "healthcheck test NONE: no readiness"
        if words[0] == "CMD":
            argv = words[1:]
        elif words[0] == "CMD-SHELL" and len(words) == 2:
            argv = _split_shell_probe(words[1])
        else:
            raise _Invalid("healthcheck test %r is not CMD or CMD-SHELL" % (test,))
    elif isinstance(test, str):
        argv = _split_shell_probe(test)
    else:
        raise _Invalid("healthcheck has no test")
    try:
        readiness = _probe_readiness(argv)._asdict()
        how = "the same probe"
    except _Invalid:
        program = argv[0].rsplit("/", 1)[-1] if argv else ""
        if program not in _PING_PROBES:
            raise
        flag, port = _PING_PROBES[program]
        for index, word in enumerate(argv[:-1]):
            if word == flag and argv[index + 1].isdigit():
                port = int(argv[index + 1])
        readiness = {"type": "tcp", "host": "127.0.0.1", "port": port}
        how = "%s becomes a check that port %d accepts connections" % (program, port)
    seconds = _DEFAULT_READINESS_TIMEOUT
    durations = [healthcheck.get(k) for k in ("interval", "start_period")]
    if any(d is not None for d in durations):
        # Docker gives up after start_period + retries * interval; readiness has one timeout.
        interval = _parse_duration(healthcheck.get("interval") or "30s")
        start = _parse_duration(healthcheck["start_period"]) if healthcheck.get(
            "start_period") else 0
        retries = healthcheck.get("retries") or 3
        if not str(retries).isdigit():
            raise _Invalid("healthcheck retries %r is not a number" % (retries,))
        retries = int(retries)
        seconds = max(_DEFAULT_READINESS_TIMEOUT, start + interval * retries)
    data = {"type": readiness["type"]}
    for key in _READINESS_FIELDS[readiness["type"]]:
        if readiness.get(key) is not None:
            data[key] = readiness[key]
    data["timeout_seconds"] = seconds
    return data, "healthcheck -> readiness %s: %s, polled every second for up to %ds" % (
        data["type"], how, seconds)


def _unique(items):
    """The items in order, each once."""
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _host_patterns(names):
    """A compiled pattern that finds service host names in URLs, ``host:port``, ``-h host`` and
    ``${HOST:-host}``."""
    import re
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(r"(?:(?<=//)|(?<=@)|(?<=-h )|(?<=--host )|(?<=--host=)|(?<=-H )|(?<=:-))"
                      r"(%s)(?![\w.@-])|(?<![\w./@-])(%s)(?=:\d)" % (alternatives, alternatives))


def _rewrite_hosts(text, pattern, replacement):
    """``(new text, [names replaced])``."""
    found = []

    def replace(match):
        found.append(match.group(1) or match.group(2))
        return replacement

    return pattern.sub(replace, text), found


# --- Dockerfile -> image + x-enroot.prepare -------------------------------------------------------

def _parse_dockerfile(text):
    """``[(INSTRUCTION, arguments, line)]``: continuation lines joined, comments skipped."""
    instructions = []
    pending, start = None, 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending is None):
            continue
        if pending is None:
            pending, start = [], number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = None
        word, _, rest = joined.partition(" ")
        instructions.append((word.upper(), rest.strip(), start))
    if pending:
        joined = " ".join(part for part in pending if part)
        word, _, rest = joined.partition(" ")
        instructions.append((word.upper(), rest.strip(), start))
    return instructions


def _split_flags(arguments):
    """``({flag: value}, rest)`` for leading ``--flag[=value]`` words."""
    flags = {}
    rest = arguments
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        name, _, value = word[2:].partition("=")
        flags.setdefault(name, []).append(value)
        rest = rest.strip()
    return flags, rest


def _exec_form(arguments):
    """The list of a JSON exec-form argument, or None for the shell form."""
    import json
    if not arguments.startswith("["):
        return None
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _dockerfile_substitute(text, variables):
    """``(text, unknown names)``: ``$VAR``, ``${VAR}``, ``${VAR:-x}`` taken from ``variables``."""
    import re
    unknown = []

    def replace(match):
        name = match.group(1) or match.group(2)
        default = match.group(4)
        if name in variables:
            return variables[name] if variables[name] or default is None else default
        if default is not None:
            return default
        unknown.append(name)
        return match.group(0)

    result = re.sub(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\})",
                    replace, text)
    return result, unknown


def _dockerfile_pairs(arguments, legacy_allowed):
    """``[(key, value)]`` of ENV/ARG/LABEL arguments (``K=V ...``, or ``K V`` when allowed)."""
    import shlex
    try:
        words = shlex.split(arguments, posix=True)
    except ValueError:
        words = arguments.split()
    if legacy_allowed and words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        pairs.append((key, value if eq else None))
    return pairs


class _DockerfileStage(NamedTuple):
    """One ``FROM`` stage of a Dockerfile."""
    image: str                     # the FROM image, build arguments substituted
    name: Optional[str]            # the name after AS
    body: Tuple[Tuple[str, str, int], ...]  # (INSTRUCTION, arguments, line) after its FROM


class _StageChoice(NamedTuple):
    """The stage a build makes, and the instructions that make it."""
    image: str                     # the base image: the FROM of the first stage of the chain
    body: Tuple[Tuple[str, str, int], ...]  # the instructions of every stage of the chain, in order
    variables: Tuple[Tuple[str, str], ...]  # the ARGs before the first FROM, with build.args
    notes: Tuple[str, ...]
    todos: Tuple[str, ...]


def _select_stage(instructions, build_args, target):
    """The ``_StageChoice`` for ``target`` (else the last stage); None without a FROM line."""
    notes, todos = [], []
    global_args = {}
    stages = []
    for instruction, arguments, line in instructions:
        if instruction == "FROM":
            flags, rest = _split_flags(arguments)
            if "platform" in flags:
                notes.append("FROM --platform dropped: images are imported for the node's "
                             "architecture")
            words = rest.split()
            image, unknown = _dockerfile_substitute(words[0] if words else "", global_args)
            if unknown:
                todos.append("FROM %s uses build argument(s) %s without a default: write the "
                             "base image" % (rest, ", ".join(unknown)))
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(_DockerfileStage(image, name, ()))
        elif not stages:
            if instruction == "ARG":
                for key, value in _dockerfile_pairs(arguments, False):
                    global_args[key] = build_args.get(key, value if value is not None else "")
        else:
            stages[-1] = stages[-1]._replace(body=stages[-1].body
                                             + ((instruction, arguments, line),))
    if not stages:
        return None
    by_name = dict((stage.name, stage) for stage in stages if stage.name)
    chosen = stages[-1]
    if target:
        if target not in by_name:
            todos.append("build target '%s' is not a stage of the Dockerfile" % target)
        else:
            chosen = by_name[target]
    if len(stages) > 1:
        notes.append("multi-stage Dockerfile: used stage %s (FROM %s), the one that makes the "
                     "image" % (chosen.name or "#%d" % len(stages), chosen.image))
    # A stage built FROM an earlier stage inherits that stage's instructions.
    chain = [chosen]
    while chain[0].image in by_name and by_name[chain[0].image] not in chain:
        chain.insert(0, by_name[chain[0].image])
    body = tuple(item for stage in chain for item in stage.body)
    return _StageChoice(chain[0].image, body, tuple(global_args.items()), tuple(notes),
                        tuple(todos))


class _BuildContext(NamedTuple):
    """What every instruction of one Dockerfile translation reads."""
    context: str                   # the build context as written relative to the compose file
    context_dir: Optional[str]     # its absolute path, used only to tell folders from files
    build_args: Dict[str, str]     # build.args of the service


class _DockerfileStep(NamedTuple):
    """One instruction of the chosen stage."""
    instruction: str               # RUN, COPY, ...
    arguments: str
    where: str                     # "Dockerfile line N", for notes
    after_last_run: bool           # no RUN follows: a COPY here can be a runtime volume


class _DockerfileState(NamedTuple):
    """What the instructions so far made; each instruction's function returns the next state."""
    variables: Tuple[Tuple[str, str], ...]  # ARG and ENV values in order (a later one wins)
    notes: Tuple[str, ...]
    todos: Tuple[str, ...]
    commands: Tuple[str, ...] = ()  # x-enroot.prepare.commands
    prepare_env: Tuple[Tuple[str, str], ...] = ()  # ARG and ENV values for the prepare commands
    runtime_env: Tuple[Tuple[str, str], ...] = ()  # ENV values for the service
    mounts: Tuple[str, ...] = ()   # the build context's prepare mount, once a COPY needs it
    volumes: Tuple[Tuple[str, str], ...] = ()  # (volume text, note) of COPYs after the last RUN
    workdir: Optional[str] = None
    made_workdir: Optional[str] = None  # the WORKDIR that a prepare command has created
    shell: Optional[List[str]] = None  # SHELL's exec form, which wraps the later RUNs
    command: Union[str, List[str], None] = None  # CMD: exec form as a list, shell form a string
    entrypoint: Union[str, List[str], None] = None
    healthcheck: Optional[Dict[str, object]] = None  # a Compose healthcheck mapping

    def note(self, text):
        return self._replace(notes=self.notes + (text,))

    def todo(self, text):
        return self._replace(todos=self.todos + (text,))


def _in_workdir(state, line):
    """``line`` run in the WORKDIR, which is created first unless a command already did."""
    if state.workdir is None:
        return line
    prefix = "" if state.made_workdir == state.workdir else \
        "mkdir -p %s && " % shell_quote(state.workdir)
    return prefix + "cd %s && %s" % (shell_quote(state.workdir), line)


def _build_source(source):
    """Where a build context path is inside the prepare container."""
    import posixpath
    return posixpath.normpath(posixpath.join(_MIGRATE_BUILD_MOUNT, source))


def _host_source(build, source):
    """A build context path as a host path relative to the compose file."""
    import posixpath
    joined = posixpath.normpath(posixpath.join(build.context, source))
    return joined if joined.startswith(("/", ".", "~")) else "./" + joined


def _is_build_folder(build, source):
    if source in (".", "./") or source.endswith("/"):
        return True
    return bool(build.context_dir) and os.path.isdir(os.path.join(build.context_dir, source))


# --- one function per instruction: (state, step, build) -> state ----------------------------------

def _dockerfile_run(state, step, build):
    flags, rest = _split_flags(step.arguments)
    for mount in flags.get("mount", []):
        if "type=secret" in mount or "type=ssh" in mount:
            state = state.todo("%s: RUN --mount=%s uses a build secret: run that step with the "
                               "secret available (a prepare mount of the file) and keep the "
                               "secret out of the image" % (step.where, mount))
        else:
            state = state.note("%s: RUN --mount=%s dropped (prepare runs each command once)"
                               % (step.where, mount))
    if "<<" in rest:
        return state.todo("%s: a RUN here-document cannot be written as one prepare command: "
                          "split it into commands" % step.where)
    words = _exec_form(rest)
    line_text = " ".join(shell_quote(word) for word in words) if words else rest
    if state.shell and not words:
        line_text = " ".join(shell_quote(word) for word in state.shell) + " " + \
            shell_quote(line_text)
    return state._replace(commands=state.commands + (_in_workdir(state, line_text),),
                          made_workdir=state.workdir)


def _dockerfile_variables(state, step, build):
    """ENV and ARG: values for the later instructions and the prepare; ENV also for the service."""
    instruction = step.instruction
    for key, value in _dockerfile_pairs(step.arguments, instruction == "ENV"):
        variables = dict(state.variables)
        if instruction == "ARG":
            value = build.build_args.get(key, value)
            if value is None:
                if key not in variables:
                    state = state.todo("%s: ARG %s has no default and build.args does not set "
                                       "it: give it a value in x-enroot.prepare.env"
                                       % (step.where, key))
                continue
        value, unknown = _dockerfile_substitute(value or "", variables)
        if unknown:
            state = state.todo("%s: %s %s refers to $%s from the base image: write its value"
                               % (step.where, instruction, key, ", $".join(unknown)))
        pair = ((key, value),)
        state = state._replace(
            variables=state.variables + pair, prepare_env=state.prepare_env + pair,
            runtime_env=state.runtime_env + (pair if instruction == "ENV" else ()))
    return state


def _dockerfile_workdir(state, step, build):
    import posixpath
    path, _ = _dockerfile_substitute(step.arguments, dict(state.variables))
    return state._replace(workdir=posixpath.normpath(posixpath.join(state.workdir or "/", path)))


def _dockerfile_copy(state, step, build):
    """COPY and ADD: a runtime volume after the last RUN, else a prepare command."""
    import posixpath
    where, instruction = step.where, step.instruction
    flags, rest = _split_flags(step.arguments)
    if "from" in flags:
        return state.todo("%s: %s --from=%s copies out of another stage or image, which "
                          "prepare cannot do: install those files with a prepare command"
                          % (where, instruction, flags["from"][0]))
    for flag in sorted(flags):
        state = state.note("%s: %s --%s dropped (prepare runs as root; files keep the "
                           "mounted files' modes)" % (where, instruction, flag))
    variables = dict(state.variables)
    words = _exec_form(rest) or rest.split()
    words = [_dockerfile_substitute(word, variables)[0] for word in words]
    if len(words) < 2:
        return state.todo("%s: %s needs a source and a destination" % (where, instruction))
    sources, destination = words[:-1], words[-1]
    folder_destination = destination.endswith("/") or destination in (".", "..") \
        or destination.endswith(("/.", "/.."))
    destination = posixpath.normpath(posixpath.join(state.workdir or "/", destination))
    # Docker copies into a destination that is an existing folder, and WORKDIR made this one
    # (and the folders above it): `WORKDIR /code` then `COPY requirements.txt /code`.
    folder_destination = folder_destination or _under(state.workdir or "/", destination)
    if folder_destination and not destination.endswith("/"):
        destination += "/"
    remote = [s for s in sources if "://" in s or s.startswith("git@")]
    if remote:
        return state.todo("%s: ADD %s fetches from the network: download it in a prepare "
                          "command (curl -fsSL URL -o DEST) instead" % (where, remote[0]))
    globbed = any(c in s for s in sources for c in "*?[")
    archive = instruction == "ADD" and len(sources) == 1 and sources[0].endswith(
        (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"))
    if step.after_last_run and len(sources) == 1 and not globbed and not archive:
        target = destination
        if target.endswith("/") and not _is_build_folder(build, sources[0]):
            target += posixpath.basename(sources[0].rstrip("/"))
        target = posixpath.normpath(target)
        volume = ("%s:%s" % (_host_source(build, sources[0]), target),
                  "%s: %s %s %s is a runtime volume: nothing in the build needs it after the "
                  "last RUN, and edits show up without a rebuild"
                  % (where, instruction, sources[0], words[-1]))
        return state._replace(volumes=state.volumes + (volume,))
    made_workdir = state.made_workdir
    if state.workdir and (destination + "/").startswith(state.workdir.rstrip("/") + "/"):
        made_workdir = state.workdir
    state = state._replace(
        commands=state.commands + (_copy_command(build, sources, destination, globbed,
                                                 archive),),
        mounts=state.mounts or ("%s:%s" % (_host_source(build, "."), _MIGRATE_BUILD_MOUNT),),
        made_workdir=made_workdir)
    return state.note("%s: %s %s baked into the image by a prepare command (a later RUN needs "
                      "it); the build context is a prepare mount, so the image is rebuilt on "
                      "every submit" % (where, instruction, " ".join(sources)))


def _copy_command(build, sources, destination, globbed, archive):
    """The prepare command that copies (or extracts) ``sources`` from the mounted context."""
    import posixpath
    folder_target = destination.endswith("/") or len(sources) > 1 or globbed
    target = destination.rstrip("/") or "/"
    parts = []
    for source in sources:
        inside = _build_source(source)
        quoted = inside if globbed else shell_quote(inside)
        if archive:
            parts.append("mkdir -p %s && tar -xf %s -C %s" % (
                shell_quote(target), quoted, shell_quote(target)))
        elif _is_build_folder(build, source) and not globbed:
            parts.append("mkdir -p %s && cp -a %s/. %s/" % (
                shell_quote(target), quoted, shell_quote(target)))
        elif folder_target:
            parts.append("mkdir -p %s && cp -a %s %s/" % (
                shell_quote(target), quoted, shell_quote(target)))
        else:
            parts.append("mkdir -p %s && cp -a %s %s" % (
                shell_quote(posixpath.dirname(target) or "/"), quoted, shell_quote(target)))
    return " && ".join(parts)


def _dockerfile_cmd(state, step, build):
    words = _exec_form(step.arguments)
    return state._replace(command=words if words is not None else step.arguments)


def _dockerfile_entrypoint(state, step, build):
    words = _exec_form(step.arguments)
    # Docker: a new ENTRYPOINT resets an inherited CMD.
    return state._replace(entrypoint=words if words is not None else step.arguments,
                          command=None)


def _dockerfile_healthcheck(state, step, build):
    flags, rest = _split_flags(step.arguments)
    if rest.upper().startswith("NONE"):
        return state._replace(healthcheck={"disable": True})
    word, _, probe = rest.partition(" ")
    words = _exec_form(probe.strip())
    healthcheck = {"test": ["CMD"] + words if words else ["CMD-SHELL", probe.strip()]}
    for flag in ("timeout", "interval", "retries", "start-period"):
        if flag in flags:
            healthcheck[flag.replace("-", "_")] = flags[flag][0]
    return state._replace(healthcheck=healthcheck)


def _dockerfile_shell(state, step, build):
    return state._replace(shell=_exec_form(step.arguments)).note(
        "%s: SHELL %s wraps the later RUN commands" % (step.where, step.arguments))


# Instructions that mean nothing for a prepared image, and why.
_DOCKERFILE_DROPPED = {
    "USER": "Pyxis runs the container as your own user",
    "EXPOSE": _NETWORK_REASON,
    "LABEL": "image labels are not kept",
    "MAINTAINER": "metadata only",
    "STOPSIGNAL": "the batch script stops services with SIGTERM",
    "VOLUME": "bind a folder with volumes: if the data must outlive the job",
}


def _dockerfile_dropped(state, step, build):
    return state.note("%s: %s %s dropped: %s" % (step.where, step.instruction, step.arguments,
                                                _DOCKERFILE_DROPPED[step.instruction]))


def _dockerfile_unsupported(state, step, build):
    return state.todo("%s: %s %s has no prepare equivalent: do it with a prepare command or "
                      "leave it out" % (step.where, step.instruction, step.arguments))


# Instruction -> its function; an instruction not here is a TODO (_dockerfile_unsupported).
_DOCKERFILE_INSTRUCTIONS = dict(
    [("RUN", _dockerfile_run), ("ENV", _dockerfile_variables), ("ARG", _dockerfile_variables),
     ("WORKDIR", _dockerfile_workdir), ("COPY", _dockerfile_copy), ("ADD", _dockerfile_copy),
     ("CMD", _dockerfile_cmd), ("ENTRYPOINT", _dockerfile_entrypoint),
     ("HEALTHCHECK", _dockerfile_healthcheck), ("SHELL", _dockerfile_shell)]
    + [(instruction, _dockerfile_dropped) for instruction in _DOCKERFILE_DROPPED])


def _translate_dockerfile(text, context, build_args, target, context_dir=None):
    """The image, prepare commands and runtime settings a Dockerfile stands for (``_BuildResult``).

    ``context`` is the build context as written relative to the compose file (``./app``);
    ``context_dir`` its absolute path, used only to tell folders from files for COPY.
    """
    stage = _select_stage(_parse_dockerfile(text), build_args, target)
    if stage is None:
        return _BuildResult(None, (), (), (), (), (), None, None, None, None, (),
                            ("the Dockerfile has no FROM line: write the base image",))
    build = _BuildContext(context, context_dir, build_args)
    runs = [index for index, item in enumerate(stage.body) if item[0] == "RUN"]
    state = _DockerfileState(stage.variables, stage.notes, stage.todos)
    for index, (instruction, arguments, line) in enumerate(stage.body):
        step = _DockerfileStep(instruction, arguments, "Dockerfile line %d" % line,
                               index > (runs[-1] if runs else -1))
        translate = _DOCKERFILE_INSTRUCTIONS.get(instruction, _dockerfile_unsupported)
        state = translate(state, step, build)
    if state.shell is not None and state.commands:
        state = state.note("SHELL applies to the RUN commands only")
    return _BuildResult(stage.image, state.commands, state.prepare_env, state.runtime_env,
                        state.mounts, state.volumes, state.workdir, state.command,
                        state.entrypoint, state.healthcheck, state.notes, state.todos)


# --- build: -> image + x-enroot.prepare + the service's runtime settings --------------------------

class _BuildMigration(NamedTuple):
    """What a service's ``build:`` becomes."""
    lines_value: Dict[str, object]  # written where build: was (image, x-enroot)
    notes: Tuple[str, ...]         # the comment lines above it, TODOs last
    image_note: Optional[str]      # why the service's own image: goes; None when it has none
    # (key, value, notes) the service gains from CMD, ENTRYPOINT, WORKDIR and HEALTHCHECK
    additions: Tuple[Tuple[str, object, Tuple[str, ...]], ...]
    environment: Tuple[Tuple[str, str, str], ...]  # (key, value, note) from ENV
    volumes: Tuple[Tuple[str, str], ...]  # (volume text, note): COPYs after the last RUN


def _migrate_build(raw, project_dir, read_text, host_runtime, readiness_needed):
    """The ``_BuildMigration`` of service ``raw``'s ``build:`` (its Dockerfile read through
    ``read_text``); ``readiness_needed``: another service waits for this one to be healthy."""
    build = raw["build"]
    notes, todos = [], []
    if isinstance(build, str):
        build = {"context": build}
    if not isinstance(build, dict):
        build = {}
    context = str(build.get("context") or ".")
    dockerfile = build.get("dockerfile") or "Dockerfile"
    arguments = build.get("args") or {}
    if isinstance(arguments, list):
        arguments = dict(str(item).partition("=")[::2] for item in arguments)
    arguments = dict((str(k), "" if v is None else str(v)) for k, v in arguments.items())
    for key in build:
        if key in ("secrets", "ssh", "additional_contexts"):
            todos.append("build.%s is not available to prepare: give the commands that use "
                         "it what they need through a prepare mount" % key)
        elif key not in ("context", "dockerfile", "dockerfile_inline", "args", "target"):
            notes.append("build.%s dropped (prepare builds on the login node)" % key)
    result = None
    if "://" in context or context.startswith("git@"):
        todos.append("build context %s is remote: clone it and point build at the folder, "
                     "or write image + x-enroot.prepare by hand" % context)
    else:
        if not context.startswith(("/", ".", "~")):
            context = "./" + context
        context_dir = os.path.join(project_dir, context)
        text = build.get("dockerfile_inline")
        where = "dockerfile_inline"
        if text is None:
            where = os.path.normpath(os.path.join(context, str(dockerfile)))
            try:
                text = read_text(os.path.join(context_dir, str(dockerfile)))
            except OSError:
                todos.append("Dockerfile %s not found: write image (the base image) and "
                             "x-enroot.prepare.commands (its RUN lines)" % where)
        if text is not None:
            result = _translate_dockerfile(str(text), context, arguments,
                                           build.get("target"), context_dir)
            notes.insert(0, "build (context %s) -> image + x-enroot.prepare from %s" % (
                context, where))
    lines_value = {}
    if result is not None:
        notes += list(result.notes)
        todos += list(result.todos)
    image = result.image if result is not None else None
    if image and not host_runtime:
        lines_value["image"] = image
    elif "image" in raw and not host_runtime:
        lines_value["image"] = raw["image"]
    if host_runtime:
        if result is not None and result.commands:
            todos.append("with the host runtime nothing is built: install on the node what "
                         "these did: %s" % " ; ".join(result.commands))
    elif result is not None and result.commands:
        prepare = {"commands": list(result.commands)}
        if result.mounts:
            prepare["mounts"] = list(result.mounts)
        if result.prepare_env:
            prepare["env"] = dict((k, _escape_interpolation(v)) for k, v in result.prepare_env)
        if "x-enroot" in raw:
            todos.append("the service already has x-enroot: merge these prepare settings "
                         "into it")
            lines_value["x-enroot-from-build"] = {"prepare": prepare}
        else:
            lines_value["x-enroot"] = {"prepare": prepare}
    additions, environment, volumes = (), (), ()
    if result is not None:
        additions, runtime_notes = _build_runtime(raw, result, readiness_needed)
        notes += runtime_notes
        environment = _build_environment(raw, result)
        volumes = () if host_runtime else result.volumes
    image_note = None
    if "image" in raw and "image" in lines_value and lines_value["image"] != raw["image"]:
        image_note = "image %s named the built image; the base image is the Dockerfile's FROM" \
            % raw["image"]
    elif "image" in raw and host_runtime:
        image_note = "image %s dropped: with the host runtime the service runs on the node " \
            "itself" % raw["image"]
    elif "image" in raw:
        image_note = "image moved to where build was"
    return _BuildMigration(lines_value, tuple(notes + ["TODO " + t for t in todos]), image_note,
                           additions, environment, volumes)


def _build_runtime(raw, result, readiness_needed):
    """``(additions, notes)``: the service keys that CMD, ENTRYPOINT, WORKDIR and HEALTHCHECK of
    a translated build give service ``raw``, and notes for the build's comment."""
    notes = []
    additions = []
    command = raw.get("command")
    entrypoint = raw.get("entrypoint")
    new_command = result.command if command is None else None
    new_entrypoint = result.entrypoint if entrypoint is None else None
    final_command = command if command is not None else new_command
    final_entrypoint = entrypoint if entrypoint is not None else new_entrypoint
    if final_command is not None and final_entrypoint is not None and \
            isinstance(final_command, str) != isinstance(final_entrypoint, str):
        if new_entrypoint is not None and isinstance(new_entrypoint, list):
            new_entrypoint = " ".join(shell_quote(w) for w in new_entrypoint)
        elif new_entrypoint is not None:
            new_entrypoint = ["/bin/sh", "-c", new_entrypoint]
        elif new_command is not None and isinstance(new_command, str):
            new_command = ["/bin/sh", "-c", new_command]
        elif new_command is not None:
            new_command = " ".join(shell_quote(w) for w in new_command)
    for key, value, source in (("entrypoint", new_entrypoint, "ENTRYPOINT"),
                               ("command", new_command, "CMD")):
        if value is None:
            continue
        if isinstance(value, list):
            value = [_escape_interpolation(word) for word in value]
        additions.append((key, value, ("%s -> %s (Dockerfile %s)" % (source, key, source),)))
    has_command = final_command is not None or final_entrypoint is not None
    if result.working_dir and "working_dir" not in raw:
        if has_command:
            additions.append(("working_dir", result.working_dir,
                              ("WORKDIR %s -> working_dir" % result.working_dir,)))
        else:
            notes.append("WORKDIR %s not kept: working_dir needs a command, and the base "
                         "image's command runs in the base image's folder" % result.working_dir)
    if result.healthcheck and "healthcheck" not in raw and "readiness" not in raw:
        try:
            readiness, note = _healthcheck_readiness(result.healthcheck)
        except _Invalid as exc:
            if readiness_needed:
                additions.append(("readiness", None, ()))
            else:
                notes.append("Dockerfile HEALTHCHECK dropped: %s" % exc.message)
            return tuple(additions), notes
        if readiness is not None:
            additions.append(("readiness", readiness, ("Dockerfile HEALTHCHECK: " + note,)))
    return tuple(additions), notes


def _build_environment(raw, result):
    """``((key, value, note), ...)``: the ENV values that service ``raw`` does not set itself."""
    environment = raw.get("environment")
    names = set(environment) if isinstance(environment, dict) else set(
        str(item).partition("=")[0] for item in environment or [])
    return tuple((key, _escape_interpolation(value),
                  "ENV %s -> environment (the prepared image does not keep ENV)" % key)
                 for key, value in result.runtime_env if key not in names)


# --- the rewrite ----------------------------------------------------------------------------------

def migrate_compose(text, filename=None, options=None) -> MigrateResult:
    """Rewrite Docker Compose YAML text as an hpc-compose spec; returns a ``MigrateResult``."""
    options = options or MigrateOptions()
    document = parse_yaml_document(text, filename)
    if not isinstance(document.data, dict) or not isinstance(document.data.get("services"), dict):
        raise SpecError("this is not a Compose file: it has no services: mapping", file=filename,
                        line=1)
    prefix = ()
    if _migrate_needs_block_style(text, document):
        # Flow-style (or JSON) files cannot be edited line by line: write them in block style once.
        text = "\n".join(_format_yaml_lines(document.data, 0)) + "\n"
        document = parse_yaml_document(text, filename)
        prefix = (_MIGRATE_NOTE + "rewrote the file in block style (it used flow style or JSON);"
                  " comments and anchors of the original are not kept",)
    migration = _Migration(text, document, filename, options)
    return migration.run(prefix)


def _migrate_needs_block_style(text, document):
    marks = document.marks
    lines = text.split("\n")

    def is_flow(path):
        mark = marks.get(path)
        return mark is not None and lines[mark.line - 1][mark.column - 1:mark.column] in ("{", "[")

    if is_flow(()) or is_flow(("services",)):
        return True
    return any(is_flow(("services", name)) for name in document.data["services"])


class _Migration(object):
    """One rewrite of a file: its rows, the edits collected for them, and what the services
    share (named volumes, data folders, the sums for the top-level x-slurm). Each service is
    rewritten by a ``_ServiceMigration``; the edits are applied bottom-up at the end."""

    def __init__(self, text, document, filename, options):
        self.lines = text.split("\n")
        self.final_break = self.lines[-1] == ""
        if self.final_break:
            self.lines.pop()
        self.data = document.data
        self.marks = document.marks
        self.key_marks = document.key_marks
        self.filename = filename
        self.project_dir = os.path.dirname(os.path.abspath(filename)) if filename else os.getcwd()
        self.options = options
        self.read_text = options.read_text or _load_text_file
        self.edits = []
        self.counts = {"kept": 0, "changed": 0, "dropped": 0, "added": 0}
        self.data_dirs = []
        self.top_slurm = {}        # top-level x-slurm key -> [notes] of what was added into it
        self.services = [n for n in self.data["services"] if isinstance(n, str)]
        self.host_pattern = _host_patterns(self.services) if self.services else None
        self.top_volumes = self.data.get("volumes") if isinstance(self.data.get("volumes"),
                                                                   dict) else {}
        self.host_runtime = options.runtime == "host"
        self.sums = {"mem": 0, "cpus_per_task": 0, "gpus": 0}
        # Where each key is written: a key reached through a merge key is edited at its anchor.
        self.origin = {}
        for key_path, mark in self.key_marks.items():
            self.origin.setdefault(mark, key_path)
        self.dropped = {}          # key paths dropped, in order (a dict used as an ordered set)
        self.env_files_copied = False

    # --- rows -------------------------------------------------------------------------------------

    def indent_of(self, row):
        line = self.lines[row]
        return len(line) - len(line.lstrip(" "))

    def block_end(self, row, column, sequence_at_column):
        """The row after the block that starts on ``row`` with its key or dash at ``column``."""
        last = row
        for index in range(row + 1, len(self.lines)):
            stripped = self.lines[index].strip()
            if not stripped:
                continue
            indent = self.indent_of(index)
            if indent > column or (indent == column and sequence_at_column
                                   and (stripped == "-" or stripped.startswith("- "))):
                last = index
                continue
            break
        return last + 1

    def entry_rows(self, path):
        """``(start, end, column)`` of a block mapping entry; None without lines of its own."""
        mark = self.key_marks.get(tuple(path))
        if mark is None:
            return None
        row, column = mark.line - 1, mark.column - 1
        before = self.lines[row][:column]
        if before.strip() not in ("", "-") and not before.rstrip().endswith("- "):
            return None
        if before.strip() == "-" or before.rstrip().endswith("-"):
            return None    # first key of a sequence item: edited with its item
        value = self._value(path)
        return row, self.block_end(row, column, isinstance(value, list)), column

    def item_rows(self, path):
        """``(start, end, dash column)`` of a block sequence item, or None."""
        mark = self.marks.get(tuple(path))
        if mark is None:
            return None
        row = mark.line - 1
        before = self.lines[row][:mark.column - 1].rstrip()
        if not before.endswith("-") or before[:-1].strip().strip("-").strip():
            return None
        dash = len(before) - 1
        return row, self.block_end(row, dash, False), dash

    def is_flow(self, path):
        mark = self.marks.get(tuple(path))
        return mark is not None and \
            self.lines[mark.line - 1][mark.column - 1:mark.column] in ("{", "[")

    def child_indent(self, start, end, default):
        for row in range(start + 1, end):
            stripped = self.lines[row].strip()
            if stripped and not stripped.startswith("#"):
                return self.indent_of(row)
        return default

    def _value(self, path):
        node = self.data
        for part in path:
            node = node[part]
        return node

    def owns(self, service, path):
        """Is ``path``'s key written inside the service's own block (not reached by a merge key)?"""
        rows = self.entry_rows(("services", service))
        mark = self.key_marks.get(tuple(path))
        return rows is not None and mark is not None and rows[0] < mark.line - 1 < rows[1]

    # --- edits ------------------------------------------------------------------------------------

    def note_lines(self, column, notes):
        return [" " * column + (note if note.startswith("#") else _MIGRATE_NOTE + note)
                for note in notes]

    def replace(self, start, end, column, notes, new_lines=()):
        self.edits.append(_Edit(start, end, tuple(self.note_lines(column, notes))
                                + tuple(new_lines)))

    def replace_entry(self, path, notes, value=None, drop=False):
        """Replace (or drop) a mapping entry; False when it has no lines of its own to replace."""
        rows = self.entry_rows(path)
        if rows is None:
            return False
        start, end, column = rows
        lines = () if drop else _format_yaml_lines({path[-1]: value}, column)
        self.replace(start, end, column, notes, lines)
        return True

    def insert_into(self, path, notes, value):
        """Add the entries of mapping ``value`` (or the items of list ``value``) to ``path``."""
        start, end, column = self.entry_rows(path)
        indent = self.child_indent(start, end, column + 2)
        if isinstance(value, list) and self.lines[start + 1:start + 2] and \
                self.indent_of(start + 1) == column:
            indent = column
        self.edits.append(_Edit(end, end, tuple(self.note_lines(indent, notes))
                                + tuple(_format_yaml_lines(value, indent))))

    def drop(self, path, note):
        if self.replace_entry(path, [note], drop=True):
            self.counts["dropped"] += 1
            self.dropped[self.origin.get(self.key_marks[tuple(path)], tuple(path))] = True

    def todo_entry(self, path, note):
        """A TODO line before the entry, which stays as written."""
        rows = self.entry_rows(path)
        if rows is None:
            return
        start, end, column = rows
        self.replace(start, end, column, ["TODO " + note], self.lines[start:end])
        self.counts["changed"] += 1

    def rewrite_region(self, path, rows, new_text_of, note):
        """Apply a text rewrite to the rows of one value (from its mark on) with a note above."""
        start, end, column = rows
        mark = self.marks[tuple(path)]
        lines = list(self.lines[start:end])
        first = mark.line - 1 - start
        for offset in range(first, len(lines)):
            begin = mark.column - 1 if offset == first else 0
            lines[offset] = lines[offset][:begin] + new_text_of(lines[offset][begin:])
        self.replace(start, end, column, [note], lines)

    # --- the run ----------------------------------------------------------------------------------

    def run(self, prefix):
        for name in self.services:
            if isinstance(self.data["services"][name], dict):
                _ServiceMigration(self, name).run()
        self.migrate_top_level()
        self.keep_emptied_mappings()
        return self.result(prefix)

    def keep_emptied_mappings(self):
        """A mapping whose every key was dropped (an anchor of Compose-only keys) becomes {}."""
        for parent in _unique(path[:-1] for path in self.dropped if len(path) > 1):
            value = self._value(parent)
            if isinstance(value, dict) and all(parent + (k,) in self.dropped for k in value):
                start, end, column = self.entry_rows(parent)
                indent = self.child_indent(start, end, column + 2)
                self.edits.append(_Edit(end, end, (" " * indent + "{}",)))

    def result(self, prefix):
        edits = []
        # Insertions at one row stay in the order they were made (a service's variables before
        # the keys added at the end of the service); iterating a set here made that order, and
        # so whether the file parses, depend on the hash seed.
        for edit in sorted(_unique(self.edits), key=lambda e: (e.start, e.end)):
            if edits and edit.start < edits[-1].end:
                raise HpcComposeError("migrate: two changes overlap at line %d of %s"
                                      % (edit.start + 1, self.filename or "the file"),
                                      hint="please report this with the file that caused it")
            edits.append(edit)
        lines = list(self.lines)
        for edit in reversed(edits):
            lines[edit.start:edit.end] = list(edit.lines)
        lines = list(prefix) + lines
        notes, todos = [], []
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith(_MIGRATE_TODO.strip()):
                todos.append((number, stripped[len(_MIGRATE_TODO):]))
            elif stripped.startswith(_MIGRATE_NOTE):
                notes.append((number, stripped[len(_MIGRATE_NOTE):]))
        text = "\n".join(lines) + ("\n" if self.final_break or lines else "")
        return MigrateResult(text, tuple(notes), tuple(todos), dict(self.counts),
                             tuple(self.data_dirs), self.env_files_copied)


    # --- what the services share ------------------------------------------------------------------

    def needs_readiness(self, name):
        for other in self.services:
            depends = self.data["services"][other]
            depends = depends.get("depends_on") if isinstance(depends, dict) else None
            if isinstance(depends, dict) and isinstance(depends.get(name), dict) and \
                    depends[name].get("condition") == "service_healthy":
                return True
        return False

    def host_replacement(self, name):
        """127.0.0.1, or $HPC_COMPOSE_PRIMARY_NODE for a service that spans several nodes."""
        top = self.data.get("x-slurm") if isinstance(self.data.get("x-slurm"), dict) else {}
        own = self.data["services"][name].get("x-slurm")
        own = own if isinstance(own, dict) else {}
        try:
            nodes = int(top.get("nodes") or 1)
            requested = own.get("nodes")
            requested = int(requested) if requested is not None else None
        except (TypeError, ValueError):
            return "127.0.0.1"
        distributed = nodes > 1 and (requested == nodes or
                                     (requested is None and len(self.services) == 1))
        return "$HPC_COMPOSE_PRIMARY_NODE" if distributed else "127.0.0.1"

    def env_rewrite(self, variable, value, replacement):
        """``(new value, names)`` for one environment value (a bare name only in *_HOST & co)."""
        if not isinstance(value, str):
            return value, []
        if value in self.services and _HOST_VARIABLE_WORDS.intersection(
                variable.upper().replace("-", "_").split("_")):
            return replacement, [value]
        return _rewrite_hosts(value, self.host_pattern, replacement)

    def data_dir(self, volume):
        import posixpath
        base = self.options.data_dir.rstrip("/") or "."
        folder = posixpath.join(base, volume)
        if folder not in self.data_dirs:
            self.data_dirs.append(folder)
        return folder

    def named_volume_source(self, volume):
        """``(host path, note)`` for a named volume."""
        definition = self.top_volumes.get(volume)
        definition = definition if isinstance(definition, dict) else {}
        options = definition.get("driver_opts")
        if isinstance(options, dict) and str(options.get("o", "")).split(",")[0] == "bind" and \
                options.get("device"):
            return (str(options["device"]), "named volume '%s' is a bind of %s: mounted directly"
                    % (volume, options["device"]))
        import re
        # Docker refuses other names; `a/../../escaped` would make a folder outside the project.
        safe = volume if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", volume) else \
            "volume-" + re.sub(r"[^A-Za-z0-9_.-]", "-", volume)
        folder = self.data_dir(safe)
        note = ("named volume '%s' -> bind mount of %s (created by migrate; it must be on storage "
                "the compute nodes see)" % (volume, folder))
        if safe != volume:
            note += "; renamed: Docker accepts only letters, digits, '_', '.' and '-' in a name"
        if definition.get("external"):
            note += "; the volume was external: copy its contents there"
        return folder, note

    def top_slurm_note(self, key, note):
        self.top_slurm.setdefault(key, [])
        self.top_slurm[key].append(note)

    # --- top level --------------------------------------------------------------------------------

    def migrate_top_secrets(self, secrets):
        for name, definition in secrets.items():
            if _local_secret_source(definition):
                self.counts["kept"] += 1
            elif self.used_secret(name):
                self.todo_entry(("secrets", name), "secret %s has neither file: nor environment: "
                                "(external and content secrets are not supported)" % name)
            else:
                self.drop(("secrets", name), "dropped secret %s: no service uses it and it has "
                          "neither file: nor environment:" % name)

    def used_secret(self, name):
        for body in self.data["services"].values():
            entries = body.get("secrets") if isinstance(body, dict) else None
            for entry in entries if isinstance(entries, list) else ():
                if (entry.get("source") if isinstance(entry, dict) else entry) == name:
                    return True
        return False

    def migrate_top_level(self):
        for key in list(self.data):
            if not isinstance(key, str):
                continue
            if key in ("services", "name", "version", "x-slurm") or key.startswith("x-"):
                continue
            value = self.data[key]
            if key == "secrets" and isinstance(value, dict):
                self.migrate_top_secrets(value)
            elif key in _MIGRATE_TOP_DROPPED:
                self.drop((key,), "dropped top-level %s: %s" % (key, _MIGRATE_TOP_DROPPED[key]))
            elif key == "include":
                self.todo_entry((key,), "include is not supported: copy the included services "
                                "into this file")
            else:
                self.drop((key,), "dropped top-level %s %s: it has no meaning here"
                          % (key, _brief(value)))
        values, notes = {}, []
        current = self.data.get("x-slurm") if isinstance(self.data.get("x-slurm"), dict) else {}
        if self.sums["mem"] and "mem" not in current:
            values["mem"] = _format_megabytes(self.sums["mem"])
            notes.append("x-slurm.mem %s: the memory limits of the services added up (%s)"
                         % (values["mem"], "; ".join(self.top_slurm.get("mem", []))))
        for key, what in (("cpus_per_task", "CPUs"), ("gpus", "GPUs")):
            if self.sums[key] and key not in current and len(self.services) > 1:
                values[key] = self.sums[key]
                notes.append("x-slurm.%s %d: the allocation holds the %s every service asks for"
                             % (key, self.sums[key], what))
        if self.options.cache_dir and "cache_dir" not in current:
            values["cache_dir"] = self.options.cache_dir
            notes.append("x-slurm.cache_dir from --cache-dir (shared by login and compute nodes)")
        if self.host_runtime and current.get("runtime") != "host":
            values["runtime"] = "host"
            notes.append("x-slurm.runtime host from --runtime: services run on the node, not in "
                         "containers")
        if not values:
            return
        self.counts["added"] += 1
        if current and self.entry_rows(("x-slurm",)):
            self.insert_into(("x-slurm",), notes, values)
            return
        start, _, column = self.entry_rows(("services",))
        lines = tuple(self.note_lines(column, notes)) + tuple(
            _format_yaml_lines({"x-slurm": values}, column))
        self.edits.append(_Edit(start, start, lines))


class _ServiceMigration(object):
    """The rewrite of one service of a ``_Migration``: each key by its rule (``KEY_RULES``), then
    what the service gained (variables, volumes, x-slurm keys, its build's settings) in one go."""

    def __init__(self, migration, name):
        self.migration = migration
        self.name = name
        self.path = ("services", name)
        self.raw = migration.data["services"][name]
        self.additions = {}        # service key -> (value, [notes]) added at the end of the block
        self.slurm_additions = {}  # service x-slurm key -> (value, [notes])
        self.volume_additions = []  # (volume, note)
        self.env_additions = []    # (key, value, note); key None: a note only
        self.env_replacement = None  # (new value, notes) of a flow-style environment
        self.env_rewritten = None  # the environment with host names rewritten
        self.volumes_converted = None  # (new list, notes) when volumes are written whole

    def run(self):
        raw, migration = self.raw, self.migration
        handled = set()
        if "build" in raw:
            self.migrate_build()
            handled.update(("build", "image"))
        for key in list(raw):
            if key in handled or not isinstance(key, str):
                continue
            self.migrate_key(key)
        if "healthcheck" not in raw and "readiness" not in raw and \
                migration.needs_readiness(self.name):
            self.additions.setdefault("readiness", (None, []))
        if migration.host_runtime and not any(k in raw or k in self.additions
                                              for k in ("command", "entrypoint")):
            self.additions["command"] = (None, ["TODO with the host runtime there is no image "
                                                "default command: write the command to run"])
        self.flush()

    def migrate_key(self, key):
        """One key by its rule in ``KEY_RULES``; an x- key without one stays, any other key goes."""
        path = self.path + (key,)
        rule = self.KEY_RULES.get(key)
        if rule is not None:
            rule(self, path, self.raw[key])
        elif key.startswith("x-"):
            self.migration.counts["kept"] += 1
        else:
            reason = _MIGRATE_DROPPED_KEYS.get(key) or "it has no meaning on a Slurm allocation"
            self.migration.drop(path, "dropped %s %s: %s" % (key, _brief(self.raw[key]), reason))

    # --- what the service gained ------------------------------------------------------------------

    def flush(self):
        migration, path = self.migration, self.path
        self.flush_volumes()
        self.flush_environment()
        if self.slurm_additions:
            current = self.raw.get("x-slurm")
            values = dict((k, v) for k, (v, _) in self.slurm_additions.items())
            notes = [note for _, ns in self.slurm_additions.values() for note in ns]
            if isinstance(current, dict) and migration.owns(self.name, path + ("x-slurm",)):
                notes += ["x-slurm.%s kept as written (the Compose value was %s)"
                          % (k, _brief(v)) for k, v in values.items() if k in current]
                values = dict((k, v) for k, v in values.items() if k not in current)
                if values:
                    migration.insert_into(path + ("x-slurm",), notes, values)
                else:
                    start, end, column = migration.entry_rows(path + ("x-slurm",))
                    migration.edits.append(_Edit(end, end, tuple(migration.note_lines(
                        migration.child_indent(start, end, column + 2), notes))))
            elif current is not None:
                self.additions["x-slurm"] = (values, ["TODO this service's x-slurm comes from a "
                                                      "merge key; merge these keys into it"]
                                             + notes)
            else:
                self.additions["x-slurm"] = (values, notes)
        if "readiness" in self.additions and self.additions["readiness"][0] is None:
            del self.additions["readiness"]
            self.additions["readiness"] = ({"type": "tcp", "port": 1}, [
                "TODO another service waits for '%s' to be healthy: set the port it listens "
                "on (or another readiness type)" % self.name])
        if not self.additions:
            return
        start, end, column = migration.entry_rows(path)
        indent = migration.child_indent(start, end, column + 2)
        lines = []
        for key, (value, notes) in self.additions.items():
            lines += migration.note_lines(indent, notes)
            if value is not None:
                lines += _format_yaml_lines({key: value}, indent)
                migration.counts["added"] += 1
        migration.edits.append(_Edit(end, end, tuple(lines)))

    def flush_volumes(self):
        """Add the collected volumes: into a block list of the service's own, else as a whole."""
        volumes = self.raw.get("volumes")
        present = (self.volumes_converted or (list(volumes or []), []))[0]
        # A mount the service already lists (Docker merges the two) is not added a second time.
        additions = [(text, note) for text, note in self.volume_additions if text not in present]
        if not additions and self.volumes_converted is None:
            return
        migration = self.migration
        path = self.path + ("volumes",)
        notes = [note for _, note in additions]
        items = [text for text, _ in additions]
        owned = isinstance(volumes, list) and migration.owns(self.name, path)
        if owned and volumes and self.volumes_converted is None and not migration.is_flow(path):
            migration.insert_into(path, notes, items)
            return
        value, converted = self.volumes_converted or (list(volumes or []), [])
        if owned:
            migration.replace_entry(path, converted + notes, value + items)
        else:
            # A merge key's volumes are replaced, not merged, by the service's own: copy them.
            self.additions["volumes"] = (value + items, converted + notes + (
                ["volumes from the merge key copied here"] if volumes else []))

    def flush_environment(self):
        """Add the collected variables: into a block of the service's own, else as a whole."""
        notes = _unique(note for _, _, note in self.env_additions)
        additions = [(k, v) for k, v, _ in self.env_additions if k is not None]
        if not additions and self.env_replacement is None:
            return
        migration = self.migration
        path = self.path + ("environment",)
        environment = self.raw.get("environment")
        owned = environment is not None and migration.owns(self.name, path)
        if owned and not migration.is_flow(path) and self.env_replacement is None:
            items = dict(additions) if isinstance(environment, dict) else \
                ["%s=%s" % pair for pair in additions]
            migration.insert_into(path, notes, items)
            return
        value, replaced = self.env_replacement or (self.env_rewritten or environment, [])
        if isinstance(value, list):
            value = list(value) + ["%s=%s" % pair for pair in additions]
        else:
            value = dict(value or {}, **dict(additions))
        if owned:
            migration.replace_entry(path, replaced + notes, value)
        else:
            # A merge key's environment is replaced, not merged, by the service's own: copy it.
            self.additions["environment"] = (value, replaced + notes + (
                ["environment from the merge key copied here"] if environment else []))

    def add_slurm(self, key, value, note):
        if key in self.slurm_additions:
            self.slurm_additions[key][1].append(note)
        else:
            self.slurm_additions[key] = (value, [note])

    # --- keys kept or refused ---------------------------------------------------------------------

    def keep(self, path, value):
        self.migration.counts["kept"] += 1

    def migrate_working_dir(self, path, value):
        if not any(k in self.raw for k in ("command", "entrypoint")) and "build" not in self.raw:
            self.migration.todo_entry(path, "working_dir %s needs an explicit command: write the "
                                      "command the image runs by default" % value)
            return
        self.migration.counts["kept"] += 1

    def migrate_image(self, path, value):
        if self.migration.host_runtime:
            return self.migration.drop(path, "image %s dropped: with the host runtime the "
                                       "service runs on the node itself" % value)
        self.migration.counts["kept"] += 1

    def migrate_unsupported(self, path, value):
        self.migration.todo_entry(path, "%s %s is not supported: copy the settings it brings "
                                  "into this service" % (path[-1], _brief(value)))

    # --- service hosts ----------------------------------------------------------------------------

    def migrate_command(self, path, value):
        migration = self.migration
        replacement = migration.host_replacement(self.name)
        if isinstance(value, str) and path[-1] == "command" and value.lstrip().startswith("-"):
            return self.migrate_argument_command(path, value)
        words = value if isinstance(value, list) else [value]
        found, new_words = [], []
        for index, word in enumerate(words):
            if not isinstance(word, str) or migration.host_pattern is None:
                new_words.append(word)
            elif word in migration.services and index and words[index - 1] in _HOST_FLAGS:
                found.append(word)
                new_words.append(replacement)
            else:
                new_word, names = _rewrite_hosts(word, migration.host_pattern, replacement)
                found += names
                new_words.append(new_word)
        # Compose interpolates a string command ($$ is a literal $); hpc-compose hands it to the
        # container's shell untouched, so $$ would be the shell's process id.
        dollars = isinstance(value, str) and "$$" in value
        if not found and not dollars:
            migration.counts["kept"] += 1
            return
        if found and replacement != "127.0.0.1" and isinstance(value, list):
            migration.todo_entry(path, "service host name(s) %s: this service spans several "
                                 "nodes; write the command in shell form with "
                                 "$HPC_COMPOSE_PRIMARY_NODE" % ", ".join(sorted(set(found))))
            return
        notes = []
        if found:
            notes.append("host name %s -> %s (there is no service-name DNS; %s)" % (
                ", ".join(sorted(set(found))), replacement,
                "helpers run on the primary node" if replacement != "127.0.0.1"
                else "services share the node's network"))
        if dollars:
            notes.append("$$ -> $ (a string %s is not interpolated here: the container's shell "
                         "expands its variables)" % path[-1])
        migration.counts["changed"] += 1
        if isinstance(value, list):
            migration.replace_entry(path, notes, new_words)
            return
        rows = migration.entry_rows(path)
        if rows is None:
            return

        def rewrite(text):
            if dollars:
                text = text.replace("$$", "$")
            return _rewrite_hosts(text, migration.host_pattern, replacement)[0] if found else text

        migration.rewrite_region(path, rows, rewrite, "; ".join(notes))

    def migrate_argument_command(self, path, value):
        """A string ``command`` of options (``--default-authentication-plugin=...``): Docker splits
        it into arguments for the image's entrypoint; a shell would run ``-...`` as a program. The
        list form passes them to the entrypoint here too."""
        import shlex
        migration = self.migration
        try:
            words = shlex.split(value)
        except ValueError as exc:
            migration.todo_entry(path, "the command %s cannot be split into arguments as Docker "
                                 "does (%s): write it as a list" % (_excerpt(value), exc))
            return
        migration.counts["changed"] += 1
        migration.replace_entry(path, ["string command of options -> list: Docker passes its "
                                       "words to the image's entrypoint as arguments"], words)

    def migrate_environment(self, path, value):
        migration = self.migration
        names = value if isinstance(value, dict) else [
            str(item).partition("=")[0] for item in value or []]
        invalid = [str(key) for key in names if not _is_env_name(str(key))]
        if invalid:
            return migration.todo_entry(path, "%s: not shell variable names, which the container "
                                        "environment needs; pass these settings another way (a "
                                        "command-line option or a config file)"
                                        % ", ".join(invalid))
        if migration.host_pattern is None or not isinstance(value, (dict, list)):
            migration.counts["kept"] += 1
            return
        replacement = migration.host_replacement(self.name)
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        changes = []
        for key, item in items:
            if isinstance(value, list):
                if not isinstance(item, str) or "=" not in item:
                    continue
                variable, _, text = item.partition("=")
                new, found = migration.env_rewrite(variable, text, replacement)
                new = variable + "=" + new
            else:
                new, found = migration.env_rewrite(str(key), item, replacement)
            if found:
                changes.append((key, new, found))
        if not changes:
            migration.counts["kept"] += 1
            return
        migration.counts["changed"] += 1
        if replacement != "127.0.0.1":
            migration.todo_entry(path, "environment refers to service host name(s) %s and this "
                                 "service spans several nodes: read $HPC_COMPOSE_PRIMARY_NODE in "
                                 "a shell-form command instead"
                                 % ", ".join(sorted(set(f for _, _, fs in changes for f in fs))))
            return
        new_value = dict(value) if isinstance(value, dict) else list(value)
        for key, new, _ in changes:
            new_value[key] = new
        self.env_rewritten = new_value
        if migration.is_flow(path):
            names = sorted(set(f for _, _, fs in changes for f in fs))
            self.env_replacement = (new_value, [
                "host name %s -> 127.0.0.1 (there is no service-name DNS; services share the "
                "node's network)" % ", ".join(names)])
            return
        for key, new, found in changes:
            item_path = path + (key,)
            rows = migration.entry_rows(item_path) if isinstance(value, dict) else \
                migration.item_rows(item_path)
            if rows is None:
                continue
            whole = value[key] if isinstance(value, dict) else value[key].partition("=")[2]

            def rewrite(text, whole=whole, found=found):
                if found == [whole]:
                    import re
                    return re.sub(r"(?<![\w./@-])%s(?![\w.-])" % re.escape(whole), "127.0.0.1",
                                  text, count=1)
                return _rewrite_hosts(text, migration.host_pattern, "127.0.0.1")[0]

            migration.rewrite_region(item_path, rows, rewrite,
                                     "host name %s -> 127.0.0.1 (there is no service-name DNS; "
                                     "services share the node's network)"
                                     % ", ".join(sorted(set(found))))

    def migrate_env_file(self, path, value):
        """``env_file`` stays as written: hpc-compose reads it as Compose does. A value that names
        another service's host is set again, rewritten, in ``environment`` (which wins)."""
        migration = self.migration
        if migration.host_pattern is None:
            migration.counts["kept"] += 1
            return
        files = value if isinstance(value, list) else [value]
        existing = self.raw.get("environment")
        names = set(existing) if isinstance(existing, dict) else set(
            str(item).partition("=")[0] for item in existing or [])
        replacement = migration.host_replacement(self.name)
        changed = False
        for entry in files:
            if isinstance(entry, dict):
                entry = entry.get("path")
            file_path = os.path.join(migration.project_dir, str(entry))
            try:
                variables = parse_dotenv(migration.read_text(file_path), file_path)
            except (OSError, SpecError):
                continue    # validate reports a missing or unreadable file at its entry
            for key, item in variables.items():
                item, found = migration.env_rewrite(key, item, replacement)
                if found and key not in names:
                    names.add(key)
                    # Compose interpolates env_file values too, so the value is copied as written.
                    migration.env_files_copied = True
                    self.env_additions.append((key, item, "host name %s -> %s in %s from "
                                               "env_file %s (environment wins over env_file)"
                                               % (", ".join(found), replacement, key, entry)))
                    changed = True
        migration.counts["changed" if changed else "kept"] += 1

    # --- volumes, secrets, configs ----------------------------------------------------------------

    def convert_volume(self, item):
        """``(new item or None to drop, note)``; ``(item, None)`` when it stays as written."""
        import posixpath
        data_dir = self.migration.data_dir
        if isinstance(item, str):
            if ":" not in item:
                slug = "%s-%s" % (self.name, posixpath.basename(item.rstrip("/")) or "root")
                return ("%s:%s" % (data_dir(slug), item),
                        "anonymous volume %s -> bind mount of %s (created by migrate)"
                        % (item, data_dir(slug)))
            source, _, rest = item.partition(":")
            if source.startswith(("/", ".", "~", "$")):
                return item, None
            host, note = self.migration.named_volume_source(source)
            return "%s:%s" % (host, rest), note
        if not isinstance(item, dict):
            return item, None
        kind = item.get("type", "volume")
        target = item.get("target")
        read_only = item.get("read_only") is True
        suffix = ":ro" if read_only else ""
        if kind == "bind":
            extra = [k for k in item if k not in ("type", "source", "target", "read_only",
                                                  "bind")]
            bind = item.get("bind") if isinstance(item.get("bind"), dict) else {}
            extra += ["bind." + k for k in bind if k != "create_host_path"]
            if not extra:
                return item, None
            return ("%s:%s%s" % (item.get("source"), target, suffix),
                    "long-syntax bind -> short form (%s not used by Pyxis)" % ", ".join(extra))
        if kind == "volume":
            source = item.get("source")
            if not source:
                slug = "%s-%s" % (self.name, posixpath.basename(str(target).rstrip("/")))
                return ("%s:%s%s" % (data_dir(slug), target, suffix),
                        "anonymous volume %s -> bind mount of %s (created by migrate)"
                        % (target, data_dir(slug)))
            host, note = self.migration.named_volume_source(str(source))
            return "%s:%s%s" % (host, target, suffix), note
        if kind == "tmpfs":
            if str(target).rstrip("/") == "/tmp":
                return None, "tmpfs at /tmp dropped: every step gets a fresh /tmp"
            slug = "%s-tmpfs-%s" % (self.name, posixpath.basename(str(target).rstrip("/")))
            return ("%s:%s" % (data_dir(slug), target),
                    "tmpfs %s -> bind mount of %s (a folder, not memory: empty it if the program "
                    "expects a fresh one)" % (target, data_dir(slug)))
        return None, "volume of type %s dropped: only bind mounts exist on the nodes" % kind

    def migrate_volumes(self, path, value):
        migration = self.migration
        if not isinstance(value, list):
            migration.counts["kept"] += 1
            return
        if migration.host_runtime:
            return migration.drop(path, "volumes dropped: with the host runtime the service sees "
                                  "the node's file system (use the host paths directly)")
        converted = [self.convert_volume(item) for item in value]
        if all(note is None for _, note in converted):
            migration.counts["kept"] += 1
            return
        migration.counts["changed"] += 1
        if migration.is_flow(path) or not migration.owns(self.name, path):
            # Written whole by flush_volumes, with what the build adds.
            self.volumes_converted = ([item for item, _ in converted if item is not None],
                                      [note for _, note in converted if note])
            return
        for index, (item, note) in enumerate(converted):
            if note is None:
                continue
            rows = migration.item_rows(path + (index,))
            if rows is None:
                continue
            start, end, dash = rows
            new_lines = () if item is None else _format_yaml_lines([item], dash)
            migration.replace(start, end, dash, [note], new_lines)

    def migrate_configs(self, path, value):
        """Configs with a ``file:`` become read-only bind mounts of it."""
        data = self.migration.data
        top = data.get("configs") if isinstance(data.get("configs"), dict) else {}
        todo = []
        for entry in value if isinstance(value, list) else []:
            source = entry.get("source") if isinstance(entry, dict) else entry
            target = entry.get("target") if isinstance(entry, dict) else None
            definition = top.get(source) if isinstance(top.get(source), dict) else {}
            if not definition.get("file"):
                todo.append(str(source))
                continue
            if not target:
                target = "/%s" % source
            host = str(definition["file"])
            if not host.startswith(("/", ".", "~", "$")):
                host = "./" + host
            self.volume_additions.append(("%s:%s:ro" % (host, target),
                                          "config %s -> read-only bind mount of %s at %s"
                                          % (source, host, target)))
        if todo:
            return self.migration.todo_entry(path, "configs %s are not files: pass them as "
                                             "environment values from .env, or mount a file"
                                             % ", ".join(todo))
        self.migration.drop(path, "configs %s became read-only bind mounts (see volumes)"
                            % _brief(value))

    def migrate_secrets(self, path, value):
        """Secrets with a ``file:`` or ``environment:`` source stay: the spec supports them."""
        data = self.migration.data
        top = data.get("secrets") if isinstance(data.get("secrets"), dict) else {}
        entries = value if isinstance(value, list) else []
        unsupported = sorted(set(
            str(entry.get("source") if isinstance(entry, dict) else entry) for entry in entries
            if not _local_secret_source(top.get(entry.get("source") if isinstance(entry, dict)
                                                 else entry))))
        if unsupported:
            return self.migration.todo_entry(path, "secrets %s have neither file: nor "
                                             "environment: (external and content secrets are "
                                             "not supported): put the value in an owner-only "
                                             "file and name it with file:"
                                             % ", ".join(unsupported))
        changed = False
        for index, entry in enumerate(entries):
            for owner in ("uid", "gid"):
                if isinstance(entry, dict) and owner in entry:
                    self.migration.drop(path + (index, owner), "dropped %s of secret %s: the copy "
                                        "belongs to the job's user" % (owner, entry.get("source")))
                    changed = True
        if not changed:
            self.migration.counts["kept"] += 1

    # --- dependencies, health, restarts, resources ------------------------------------------------

    def migrate_depends_on(self, path, value):
        if not isinstance(value, dict):
            self.migration.counts["kept"] += 1
            return
        changed = False
        for target, body in value.items():
            if not isinstance(body, dict):
                continue
            # Every condition (service_completed_successfully too) means the same here.
            extra = [k for k in body if k != "condition"]
            if not extra:
                continue
            item_path = path + (target,)
            condition = body.get("condition")
            new = {"condition": "service_started" if condition is None else condition}
            notes = ["dropped %s of depends_on.%s: hpc-compose starts each service once"
                     % (", ".join(extra), target)]
            if not self.migration.replace_entry(item_path, notes, new):
                continue
            changed = True
        self.migration.counts["changed" if changed else "kept"] += 1

    def migrate_healthcheck(self, path, value):
        migration = self.migration
        try:
            readiness, note = _healthcheck_readiness(value)
        except _Invalid as exc:
            if migration.needs_readiness(self.name):
                return migration.todo_entry(path, "%s: another service waits for '%s' to be "
                                            "healthy; write a readiness (tcp port, log line, "
                                            "http url) instead" % (exc.message, self.name))
            return migration.drop(path, "healthcheck dropped (%s); nothing waits for it to be "
                                  "healthy" % exc.message)
        if readiness is None:
            return migration.drop(path, note)
        if readiness.get("type") == "http":
            readiness["url"] = _rewrite_hosts(readiness["url"], migration.host_pattern,
                                              "127.0.0.1")[0]
        if readiness.get("type") == "tcp" and readiness.get("host") in migration.services:
            readiness["host"] = "127.0.0.1"
        rows = migration.entry_rows(path)
        if rows is None or not migration.owns(self.name, path):
            self.additions["readiness"] = (readiness, [note])
            migration.counts["changed"] += 1
            return
        start, end, column = rows
        migration.replace(start, end, column, [note],
                          _format_yaml_lines({"readiness": readiness}, column))
        migration.counts["changed"] += 1

    def migrate_restart(self, path, value):
        try:
            policy, note = _restart_policy(value)
        except _Invalid as exc:
            return self.migration.todo_entry(path, exc.message + ": write x-slurm.failure_policy")
        if policy is not None:
            self.add_slurm("failure_policy", policy, note)
            note = "restart moved to x-slurm.failure_policy"
        self.migration.drop(path, note)

    def add_cpus(self, value, source):
        import math
        try:
            cpus = int(math.ceil(float(value)))
        except (TypeError, ValueError):
            return
        if cpus >= 1:
            self.add_slurm("cpus_per_task", cpus, "%s %s -> x-slurm.cpus_per_task %d"
                           % (source, value, cpus))
            self.migration.sums["cpus_per_task"] += cpus

    def add_memory(self, value, source):
        try:
            megabytes = _docker_memory_megabytes(value)
        except _Invalid:
            return
        self.migration.sums["mem"] += megabytes
        self.migration.top_slurm_note("mem", "%s %s counted into the top-level x-slurm.mem"
                                      % (source, value))

    def add_gpus(self, count, source):
        self.add_slurm("gpus", count, "%s -> x-slurm.gpus %d" % (source, count))
        self.migration.sums["gpus"] += count

    def migrate_resource_key(self, path, value):
        """cpus, mem_limit and gpus."""
        key = path[-1]
        if key == "cpus":
            self.add_cpus(value, "cpus")
        elif key == "mem_limit":
            self.add_memory(value, "mem_limit")
        else:
            if str(value) == "all":
                return self.migration.todo_entry(path, "gpus: all: set x-slurm.gpus to the "
                                                 "number of GPUs the service needs")
            try:
                self.add_gpus(int(value), "gpus %s" % value)
            except (TypeError, ValueError):
                return self.migration.todo_entry(path, "gpus %s: set x-slurm.gpus"
                                                 % _brief(value))
        self.migration.drop(path, "%s moved to %s" % (
            key, "the top-level x-slurm.mem" if key == "mem_limit" else "x-slurm"))

    def migrate_deploy(self, path, value):
        value = value if isinstance(value, dict) else {}
        dropped = []
        todos = []
        for key, item in value.items():
            if key == "resources" and isinstance(item, dict):
                limits = item.get("limits") if isinstance(item.get("limits"), dict) else {}
                reservations = item.get("reservations") if isinstance(
                    item.get("reservations"), dict) else {}
                cpus = limits.get("cpus", reservations.get("cpus"))
                if cpus is not None:
                    self.add_cpus(cpus, "deploy.resources cpus")
                memory = limits.get("memory", reservations.get("memory"))
                if memory is not None:
                    self.add_memory(memory, "deploy.resources memory")
                for device in reservations.get("devices") or []:
                    if not isinstance(device, dict):
                        continue
                    capabilities = device.get("capabilities") or []
                    if "gpu" not in capabilities and device.get("driver") != "nvidia":
                        dropped.append("device %s" % _brief(device))
                        continue
                    count = device.get("count")
                    if device.get("device_ids"):
                        count = len(device["device_ids"])
                    if count in (None, "all") or not str(count).isdigit():
                        todos.append("GPU reservation count %s: set x-slurm.gpus to the number "
                                     "of GPUs the service needs" % (count or "unset"))
                        continue
                    self.add_gpus(int(count), "deploy GPU reservation count %s" % count)
            elif key == "restart_policy" and isinstance(item, dict):
                condition = item.get("condition", "any")
                if condition == "none":
                    continue
                try:
                    attempts = int(item.get("max_attempts") or _DEFAULT_MAX_RESTARTS)
                    delay = _parse_duration(item["delay"]) if item.get("delay") else \
                        _DEFAULT_BACKOFF_SECONDS
                except (ValueError, _Invalid):
                    todos.append("deploy.restart_policy %s: write x-slurm.failure_policy"
                                 % _brief(item))
                    continue
                policy = {"mode": "restart_on_failure", "max_restarts": max(1, attempts),
                          "backoff_seconds": max(1, delay)}
                self.add_slurm("failure_policy", policy, "deploy.restart_policy %s -> "
                               "failure_policy restart_on_failure" % _brief(item))
            elif key == "replicas" and item in (1, "1"):
                continue
            else:
                dropped.append("%s %s" % (key, _brief(item, 30)))
        note = "deploy moved to x-slurm"
        if dropped:
            note += "; dropped %s (no meaning in one batch job)" % "; ".join(dropped)
        if self.migration.replace_entry(path, ["TODO " + t for t in todos] + [note],
                                        drop=True):
            self.migration.counts["dropped"] += 1


    # --- build ------------------------------------------------------------------------------------

    def migrate_build(self):
        """``build:`` becomes image + x-enroot.prepare (``_migrate_build``) where it was written;
        the service gains the Dockerfile's runtime settings."""
        migration = self.migration
        build = _migrate_build(self.raw, migration.project_dir, migration.read_text,
                               migration.host_runtime, migration.needs_readiness(self.name))
        migration.counts["changed"] += 1
        for key, value, notes in build.additions:
            self.additions[key] = (value, list(notes))
        self.env_additions += build.environment
        self.volume_additions += build.volumes
        if build.image_note is not None:
            migration.drop(self.path + ("image",), build.image_note)
        rows = migration.entry_rows(self.path + ("build",))
        if rows is not None:
            start, end, column = rows
            migration.replace(start, end, column, build.notes,
                              _format_yaml_lines(build.lines_value, column)
                              if build.lines_value else ())

    # The rule of each service key; an x- key without one stays, any other key is dropped.
    KEY_RULES = {
        "readiness": keep, "working_dir": migrate_working_dir, "image": migrate_image,
        "command": migrate_command, "entrypoint": migrate_command,
        "environment": migrate_environment, "env_file": migrate_env_file,
        "volumes": migrate_volumes, "secrets": migrate_secrets, "configs": migrate_configs,
        "depends_on": migrate_depends_on, "healthcheck": migrate_healthcheck,
        "restart": migrate_restart, "deploy": migrate_deploy,
        "cpus": migrate_resource_key, "mem_limit": migrate_resource_key,
        "gpus": migrate_resource_key,
        "extends": migrate_unsupported, "volumes_from": migrate_unsupported,
    }


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


def _usage_hint(prog, message):
    """The hint of an argparse error: a did-you-mean for a mistyped choice, else --help."""
    import re
    typed = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if typed:
        close = _closest(typed.group(1), [choice.strip().strip("'")
                                          for choice in typed.group(2).split(",")])
        if close:
            return "did you mean '%s'? (run '%s --help' for usage)" % (close, prog)
    if prog.endswith(" logs") and "-f/--file: expected one argument" in message:
        return "-f names the compose file (-f compose.yaml); to follow the logs, use --follow"
    return "run '%s --help' for usage" % prog


class _ArgumentParser(object):
    """Factory for argparse parsers that report usage errors as ``UsageError`` (exit code 2)."""

    @staticmethod
    def create(**kwargs):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise UsageError("%s: %s" % (self.prog, message),
                                 hint=_usage_hint(self.prog, message))

        return Parser(**kwargs)


def build_parser(command=None):
    """The argparse parser for ``hpc-compose``; with ``command``, only that subcommand is built.

    Building every subcommand's parser costs several milliseconds on each run, so ``main`` builds
    just the one asked for; ``--help``, a typo or no command get the full parser.
    """
    import argparse
    parser = _ArgumentParser.create(
        prog="hpc-compose",
        description="Run a Compose-like application as one Slurm batch job (Pyxis/Enroot or host).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_version_action(), nargs=0,
                        help="show the version (and the git description of its tree) and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=type(parser))
    for name, add in _command_parsers():
        if command is None or name == command:
            add(subparsers)
    return parser


def _version_action():
    """The argparse action of ``--version``, made on first use (argparse is imported lazily)."""
    import argparse

    class VersionAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            sys.stdout.write(_format_version() + "\n")
            parser.exit()

    return VersionAction


def _format_version():
    """``hpc-compose 0.2.0``, followed by the git description of its tree when there is one."""
    description = _BUILD_DESCRIPTION or _checkout_description()
    text = "hpc-compose " + __version__
    return "%s (%s)" % (text, description) if description else text


def _checkout_description():
    # Run from a checkout of this project (zipapp.mk beside the module): ask git; else nothing.
    folder = os.path.dirname(os.path.abspath(__file__))
    if not (os.path.exists(os.path.join(folder, ".git"))
            and os.path.isfile(os.path.join(folder, "zipapp.mk"))):
        return ""
    try:
        result = _run_command(["git", "-C", folder, "describe", "--tags", "--always", "--dirty"],
                             timeout=5)
    except ToolError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _requested_command(argv):
    """The subcommand named by ``argv`` when it is a known one, else ``None``."""
    if not argv or argv[0].startswith("-"):
        return None
    names = set(name for name, _ in _command_parsers())
    return argv[0] if argv[0] in names else None


def _command_parsers():
    """``(command name, function adding its parser)`` for every command, in ``--help`` order:
    authoring, the run, tracking, maintenance."""
    return (
        ("validate", _add_validate_parser), ("lint", _add_lint_parser),
        ("inspect", _add_inspect_parser),
        ("config", _add_config_parser), ("render", _add_render_parser),
        ("preflight", _add_preflight_parser), ("prepare", _add_prepare_parser),
        ("submit", _add_submit_parser), ("up", _add_up_parser), ("run", _add_run_parser),
        ("status", _add_status_parser), ("ps", _add_ps_parser), ("logs", _add_logs_parser), ("exec", _add_exec_parser),
        ("stats", _add_stats_parser), ("report", _add_report_parser),
        ("artifacts", _add_artifacts_parser),
        ("sweep", _add_sweep_parser), ("diff", _add_diff_parser),
        ("cancel", _add_cancel_parser), ("down", _add_down_parser), ("clean", _add_clean_parser),
        ("cache", _add_cache_parser), ("init", _add_init_parser), ("migrate", _add_migrate_parser),
        ("schema", _add_schema_parser), ("completions", _add_completions_parser),
    )


def _add_command(subparsers, name, handler, help_text, examples=(), aliases_note=None):
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


def _add_spec_command(subparsers, name, handler, help_text, examples):
    """A command that reads the compose file and prints text or JSON: ``-f`` and ``--format``."""
    parser = _add_command(subparsers, name, handler, help_text, examples)
    _add_file_argument(parser)
    _add_format_argument(parser)
    return parser


def _add_file_argument(parser, required=False):
    """``-f/--file`` (repeatable: files merge in order), ``--env-file`` and ``--profile``."""
    parser.add_argument("-f", "--file", dest="file", metavar="FILE", required=required,
                        action="append",
                        help="compose file; repeat to merge override files in order (default: "
                             "COMPOSE_FILE, else %s in the current directory plus "
                             "compose.override.yaml when present)"
                             % " / ".join(_DEFAULT_COMPOSE_FILES))
    parser.add_argument("--env-file", dest="env_file", metavar="PATH", action="append",
                        help="read interpolation variables from PATH instead of the project's "
                             ".env (repeatable; later files win)")
    parser.add_argument("--profile", dest="profile", metavar="NAME", action="append",
                        help="activate a Compose profile (repeatable; default: COMPOSE_PROFILES)")


def _add_format_argument(parser, choices=("text", "json")):
    """``--format`` plus the ``--json`` compatibility alias."""
    parser.add_argument("--format", dest="format", choices=choices, default=None,
                        help="output format (default: text)")
    parser.add_argument("--json", dest="json_alias", action="store_true",
                        help="alias for --format json")


def _output_format(args):
    """The effective output format of a command that takes ``_add_format_argument``."""
    chosen = getattr(args, "format", None)
    if getattr(args, "json_alias", False):
        if chosen not in (None, "json"):
            raise UsageError("--json conflicts with --format %s" % chosen)
        return "json"
    return chosen or "text"


def _resolve_compose_files(args, environ=None):
    """The compose files, absolute, in merge order: every ``-f``; else ``COMPOSE_FILE`` (split on
    ``COMPOSE_PATH_SEPARATOR``, default ``:``); else the first default name present here plus
    the first override file present beside it, as Compose does."""
    environ = os.environ if environ is None else environ
    given = getattr(args, "file", None) or []
    if isinstance(given, str):
        given = [given]     # a command whose -f takes one file (migrate)
    if not given and environ.get("COMPOSE_FILE"):
        separator = environ.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
        given = [item for item in environ["COMPOSE_FILE"].split(separator) if item]
    paths = []
    for item in given:
        if item == "-":
            paths.append(_compose_file_from_stdin())
            continue
        path = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(path):
            raise UsageError("'%s' is a directory, not a compose file" % item,
                             hint="pass the YAML file itself, e.g. -f %s"
                                  % os.path.join(item, "compose.yaml"))
        if not os.path.exists(path):
            raise UsageError("compose file '%s' does not exist" % item,
                             hint="check the path, or create one with 'hpc-compose init'")
        paths.append(path)
    if paths:
        return paths
    for name in _DEFAULT_COMPOSE_FILES:
        if os.path.isfile(name):
            paths.append(os.path.abspath(name))
            break
    else:
        raise UsageError("no compose file found in %s (looked for %s)"
                         % (os.getcwd(), ", ".join(_DEFAULT_COMPOSE_FILES)),
                         hint="pass one with -f FILE, or create one with 'hpc-compose init'")
    for name in _DEFAULT_OVERRIDE_FILES:
        if os.path.isfile(name):
            paths.append(os.path.abspath(name))
            break
    return paths


_STDIN_COMPOSE_FILE = ".hpc-compose-stdin.yaml"


def _compose_file_from_stdin():
    """``-f -``: the compose file read from standard input, kept as .hpc-compose-stdin.yaml in the
    current folder (so relative paths, .env and tracked jobs belong to it, as for a file there)."""
    path = os.path.join(os.getcwd(), _STDIN_COMPOSE_FILE)
    _write_file_atomic(path, sys.stdin.read(), _PRIVATE_FILE_MODE)
    return path


def _resolve_compose_file(args):
    """The first compose file: its directory is the project's (``.env``, tracked jobs)."""
    return _resolve_compose_files(args)[0]


def _spec_options(args, environ=None):
    """``load_spec`` keyword arguments from ``--env-file``, ``--profile`` and ``SERVICE...``."""
    environ = os.environ if environ is None else environ
    env_files = getattr(args, "env_file", None)
    if not env_files and environ.get("COMPOSE_ENV_FILES"):
        env_files = [item for item in environ["COMPOSE_ENV_FILES"].split(",") if item]
    return {"env_files": [os.path.abspath(os.path.expanduser(item)) for item in env_files]
                         if env_files else None,
            "profiles": getattr(args, "profile", None),
            "services": getattr(args, "services", None)}


def _load_plan_from_args(args):
    """Load the spec named by ``args`` and build its plan: ``(spec, plan)``."""
    spec = load_spec(_resolve_compose_files(args), **_spec_options(args))
    for message in spec.warnings:
        _warn(message)
    return spec, build_plan(spec)


def _print_json(obj):
    """Print ``obj`` as the tool's JSON to stdout."""
    sys.stdout.write(_format_json(obj) + "\n")


def _add_completions_parser(subparsers):
    parser = _add_command(subparsers, "completions", _cmd_completions,
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
        -f|--file|--env-file|-o|--output|--script-out|--data-dir|--cache-dir) mapfile -t COMPREPLY < <(compgen -f -- "$$cur") ;;
    esac
}
complete -F _hpc_compose hpc-compose
"""


def _cmd_completions(args):
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
    return _EXIT_OK


# --- validate -------------------------------------------------------------------------------------

def _add_validate_parser(subparsers):
    _add_spec_command(subparsers, "validate", _cmd_validate,
                      "check the compose file (keys, types, dependencies, placement)",
                      ["hpc-compose validate -f compose.yaml",
                       "hpc-compose validate -f compose.yaml --format json"])


def _cmd_validate(args):
    """Load, interpolate and validate the spec and build its plan; report the result."""
    fmt = _output_format(args)
    try:
        spec, plan = _load_plan_from_args(args)
    except LocatedError as error:
        if fmt != "json":
            raise
        errors = getattr(error, "errors", (error,))
        _print_json({"valid": False, "error_count": len(errors) + getattr(error, "more", 0),
                     "errors": [_located_error_to_dict(item) for item in errors]})
        return error.exit_code
    if fmt == "json":
        data = {"valid": True, "compose_file": plan.compose_file, "name": spec.name,
                "service_count": len(plan.services), "services": [s.name for s in plan.services]}
        if spec.sweep is not None:
            data["sweep_task_count"] = len(spec.sweep.tasks)
        _print_json(data)
    else:
        count = len(plan.services)
        sys.stdout.write("spec is valid (%d service%s: %s)\n"
                         % (count, "" if count == 1 else "s",
                            " -> ".join(s.name for s in plan.services)))
        if spec.sweep is not None:
            sys.stdout.write("sweep: %s\n" % _format_sweep_summary(spec.sweep))
    return _EXIT_OK


def _format_sweep_summary(sweep):
    """``10 tasks (5 combinations x 2 replicates) of lr, model; array 0-9%4``."""
    combinations = len(sweep.tasks) // sweep.replicates
    text = "%d task%s (%d combination%s" % (len(sweep.tasks), "" if len(sweep.tasks) == 1 else "s",
                                           combinations, "" if combinations == 1 else "s")
    if sweep.replicates != 1:
        text += " x %d replicates" % sweep.replicates
    return text + ") of %s; array %s" % (", ".join(sweep.parameters), _sweep_array(sweep))


def _located_error_to_dict(error):
    return {"file": error.file, "line": error.line, "column": error.column, "path": error.path,
            "message": error.message, "hint": error.hint}


# --- lint -----------------------------------------------------------------------------------------

def _add_lint_parser(subparsers):
    parser = _add_spec_command(subparsers, "lint", _cmd_lint,
                               "warn about what is valid but likely wrong (codes: docs/lint.md)",
                               ["hpc-compose lint -f compose.yaml",
                                "hpc-compose lint --strict -f compose.yaml   (exit 1 on warnings)",
                                "hpc-compose lint -f compose.yaml --format json"])
    parser.add_argument("--strict", action="store_true", help="exit 1 when there is a warning")


def _lint_warning_to_dict(warning, compose_file):
    return {"code": warning.code, "name": _LINT_NAMES[warning.code], "file": compose_file,
            "line": warning.line, "path": _dotted(warning.path), "message": warning.message,
            "hint": warning.hint}


def _cmd_lint(args):
    """Validate, then list the lint warnings; exit 0 on warnings (1 with --strict)."""
    fmt = _output_format(args)
    _spec, plan = _load_plan_from_args(args)
    warnings = _lint_plan(plan)
    if fmt == "json":
        _print_json({"compose_file": plan.compose_file, "ok": not warnings,
                     "warnings": [_lint_warning_to_dict(w, plan.compose_file) for w in warnings]})
    else:
        name = os.path.relpath(plan.compose_file)
        name = plan.compose_file if name.startswith("..") else name
        for warning in warnings:
            sys.stdout.write("%s:%s: %s %s: %s\n  hint: %s\n" % (
                name, warning.line or "", warning.code, _dotted(warning.path) or "(file)",
                warning.message, warning.hint))
        sys.stdout.write("lint: %d warning%s\n" % (len(warnings), "" if len(warnings) == 1
                                                   else "s"))
    return _EXIT_FAILURE if warnings and args.strict else _EXIT_OK


# --- schema ---------------------------------------------------------------------------------------

def _add_schema_parser(subparsers):
    _add_command(subparsers, "schema", _cmd_schema,
                 "print the JSON Schema (draft-07) of the compose file, for editors",
                 ["hpc-compose schema > hpc-compose.schema.json",
                  "# then, first line of compose.yaml:",
                  "# yaml-language-server: $schema=./hpc-compose.schema.json"])


def _cmd_schema(args):
    """Print the JSON Schema generated from the validator's field table."""
    _print_json(_compose_json_schema())
    return _EXIT_OK


# --- inspect --------------------------------------------------------------------------------------

def _add_inspect_parser(subparsers):
    parser = _add_spec_command(subparsers, "inspect", _cmd_inspect,
                              "show the normalized plan: order, images, placement, readiness",
                              ["hpc-compose inspect -f compose.yaml",
                               "hpc-compose inspect --verbose -f compose.yaml   (may print secrets)",
                               "hpc-compose inspect -f compose.yaml --format json"])
    parser.add_argument("--verbose", action="store_true",
                        help="also print resolved environment values and mounts (may show "
                             "secrets)")


def _format_geometry(ntasks, ntasks_per_node, nodes):
    return "nodes=%s ntasks=%s ntasks_per_node=%s" % (
        nodes, "auto" if ntasks is None else ntasks,
        "auto" if ntasks_per_node is None else ntasks_per_node)


def _format_readiness(readiness):
    if readiness is None:
        return "none"
    text = _format_probe(readiness)
    if readiness.type != "sleep":
        text += " (timeout %ss)" % readiness.timeout_seconds
    return text


def _format_failure_policy(policy):
    if policy.mode == "restart_on_failure":
        return "restart_on_failure (max_restarts=%s, backoff_seconds=%s)" % (
            policy.max_restarts, policy.backoff_seconds)
    return policy.mode


def _format_execution(service, verbose=False):
    execution = service.execution
    if execution.form == "default":
        return "image default (ENTRYPOINT + CMD)"
    entry = " (image ENTRYPOINT runs first)" if (execution.use_image_entrypoint
                                                  and service.runtime != "host") else ""
    if execution.form == "shell":
        words = ["/bin/sh", "-c", execution.script]
    else:
        words = list(execution.argv)
    text = " ".join(shell_quote(w if verbose else _format_preview(w)) for w in words)
    return "%s: %s%s" % (execution.form, text, entry)


def _format_image(image):
    if image.kind == "none":
        return "none (host runtime)"
    if image.kind == "local":
        return "%s (local squashfs)" % image.reference
    registry = " (registry %s)" % image.registry if image.registry else ""
    return image.reference + registry


def _plan_cache_reports(plan):
    """``{service: report}`` from the images section (where each container starts from, and
    whether the next prepare reuses or builds it); empty when that cannot be worked out."""
    try:
        reports = inspect_cache(build_runtime_plan(plan))
    except HpcComposeError:
        return {}
    return dict((report["service"], report) for report in reports)


_EXPECTATION_TEXT = {"hit": "cache hit", "miss": "cache miss",
                     "rebuild": "rebuilds on every prepare/submit",
                     "present": "local image present", "missing": "local image MISSING",
                     "not needed": "not needed"}


def _runtime_image_lines(report):
    lines = []
    if not report or report.get("container_image") is None:
        return lines
    for artifact in report.get("artifacts", ()):
        state = _EXPECTATION_TEXT.get(artifact.get("expectation"), artifact.get("expectation"))
        lines.append("  %s image: %s (%s)" % (
            "runtime" if artifact.get("kind") == "prepared" else "base", artifact.get("path"),
            state))
    if not report.get("artifacts"):
        state = _EXPECTATION_TEXT.get(report.get("expectation"), report.get("expectation"))
        lines.append("  runtime image: %s (%s)" % (report["container_image"], state))
    return lines


# The x-slurm values inspect's text shows as the job's resources, in this order.
_INSPECT_JOB_RESOURCES = ("partition", "account", "qos", "time", "cpus_per_task", "mem",
                          "mem_per_cpu", "mem_per_gpu", "gres", "gpus", "gpus_per_node",
                          "gpus_per_task", "cpus_per_gpu", "constraint", "exclusive",
                          "reservation")


def _format_inspect_text(plan, verbose=False, cache_reports=None):
    """The human summary ``inspect`` prints."""
    cache_reports = cache_reports or {}
    slurm = plan.slurm
    lines = []
    if verbose:
        lines.append("note: --verbose prints resolved environment values, which may include "
                     "secrets (values of secrets: are never shown)")
        lines.append("compose file: %s" % plan.compose_file)
        lines.append("project dir: %s" % plan.project_dir)
    lines.append("name: %s" % (plan.spec.name or "-"))
    lines.append("job name: %s" % plan.job_name)
    lines.append("runtime: %s" % plan.runtime)
    lines.append("cache dir: %s" % plan.cache_dir)
    lines.append("allocation geometry: %s" % _format_geometry(slurm.ntasks, slurm.ntasks_per_node,
                                                           plan.nodes))
    asked = ["%s=%s" % (key, getattr(slurm, key)) for key in _INSPECT_JOB_RESOURCES
             if getattr(slurm, key) not in (None, False)]
    lines.append("job resources: %s" % (" ".join(asked) or "the partition's defaults"))
    lines.append("service order: %s" % " -> ".join(s.name for s in plan.services))
    sweep = plan.spec.sweep
    if sweep is not None:
        lines.append("sweep: %s" % _format_sweep_summary(sweep))
        for task in sweep.tasks:
            lines.append("  task %d: %s%s" % (
                task.index, " ".join("%s=%s" % pair for pair in task.params),
                " (replicate %d)" % task.replicate if sweep.replicates != 1 else ""))
    for service in plan.services:
        lines.append("")
        lines.append("service: %s" % service.name)
        lines.append("  image: %s" % _format_image(service.image))
        lines.extend(_runtime_image_lines(cache_reports.get(service.name)))
        lines.append("  runtime: %s" % service.runtime)
        lines.append("  execution: %s" % _format_execution(service, verbose))
        if service.working_dir is not None:
            lines.append("  working dir: %s" % service.working_dir)
        placement = service.placement
        geometry = _format_geometry(placement.ntasks, placement.ntasks_per_node, placement.nodes)
        pinned = " nodelist=$HPC_COMPOSE_PRIMARY_NODE" if placement.mode == "primary" else ""
        lines.append("  placement: %s %s%s" % (placement.mode, geometry, pinned))
        resources = []
        if service.cpus_per_task is not None:
            resources.append("cpus_per_task=%s" % service.cpus_per_task)
        if service.gres is not None:
            resources.append("gres=%s" % service.gres)
        elif service.gpus is not None:
            resources.append("gpus=%s" % service.gpus)
        resources.extend("%s=%s" % (key, getattr(service, key)) for key in ("mem", "time")
                         if getattr(service, key) is not None)
        if resources:
            lines.append("  resources: %s" % " ".join(resources))
        if service.extra_srun_args:
            lines.append("  extra srun args: %s" % " ".join(service.extra_srun_args))
        if service.mpi is not None:
            lines.append("  mpi: srun --mpi=%s" % service.mpi)
        if service.modules:
            lines.append("  modules: %s%s" % (" ".join(m.name for m in service.modules),
                                               " (module use %s)" % " ".join(service.module_paths)
                                               if service.module_paths else ""))
        lines.append("  depends on: %s" % (", ".join("%s (%s)" % (d.name, d.condition)
                                                      for d in service.depends_on) or "-"))
        lines.append("  readiness: %s" % _format_readiness(service.readiness))
        lines.append("  failure policy: %s" % _format_failure_policy(service.failure_policy))
        if service.secrets:
            lines.append("  secrets: %s" % ", ".join(_format_secret(plan, service, item, verbose)
                                                      for item in service.secrets))
        if service.prepare is not None:
            rebuild = (" (rebuilds on every prepare/submit: prepare.mounts are set)"
                       if service.prepare.mounts else "")
            lines.append("  prepare: %d command%s%s" % (
                len(service.prepare.commands), "" if len(service.prepare.commands) == 1 else "s",
                rebuild))
        if verbose:
            if service.runtime != "host":
                lines.append("  mounts:")
                lines.append("    %s -> %s (per-job directory)"
                             % ("${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/${SLURM_JOB_ID}",
                                _JOB_MOUNT))
                if slurm.resume is not None:
                    lines.append("    %s -> %s (resume)" % (slurm.resume.path, _RESUME_MOUNT))
                if service.secrets:
                    lines.append("    %s/%s/%s -> %s (ro, secret copies)" % (
                        "${SLURM_SUBMIT_DIR:-$PWD}/.hpc-compose/${SLURM_JOB_ID}",
                        _SECRETS_DIR_NAME, service.token, _SECRETS_MOUNT))
                for mount in service.mounts:
                    lines.append("    %s -> %s%s" % (mount.host, mount.container,
                                                     " (%s)" % mount.options if mount.options
                                                     else ""))
            if service.environment:
                lines.append("  environment:")
                for key, value in service.environment:
                    lines.append("    %s=%s" % (key, value))
            else:
                lines.append("  environment: -")
            if service.prepare is not None:
                for command in service.prepare.commands:
                    lines.append("  prepare command: %s" % command)
                for mount in service.prepare.mounts:
                    lines.append("  prepare mount: %s -> %s%s" % (
                        mount.host, mount.container,
                        " (%s)" % mount.options if mount.options else ""))
                for key, value in service.prepare.env:
                    lines.append("  prepare env: %s=%s" % (key, value))
    return "\n".join(lines) + "\n"


def _format_secret(plan, service, item, verbose=False):
    """``<secret NAME> -> /run/secrets/target (0600)``; with verbose, where the value comes from."""
    where = _SECRETS_MOUNT if service.runtime != "host" else "$" + _SECRETS_DIR_VARIABLE
    text = "<secret %s> -> %s/%s (%04o)" % (item.source, where, item.target,
                                           item.mode if item.mode is not None
                                           else _DEFAULT_SECRET_MODE)
    if verbose:
        secret = next(s for s in plan.secrets if s.name == item.source)
        text += " from %s %s" % ("file" if secret.source == "file" else "variable",
                                 secret.reference)
    return text


def _cmd_inspect(args):
    """Print the normalized plan (text summary, or the whole plan as JSON)."""
    fmt = _output_format(args)
    spec, plan = _load_plan_from_args(args)
    reports = _plan_cache_reports(plan)
    if fmt == "json":
        data = plan_to_dict(plan)
        data["images"] = [reports[s.name] for s in plan.services if s.name in reports]
        _print_json(data)
    else:
        sys.stdout.write(_format_inspect_text(plan, verbose=args.verbose, cache_reports=reports))
    return _EXIT_OK


# --- config ---------------------------------------------------------------------------------------

def _add_config_parser(subparsers):
    parser = _add_spec_command(
        subparsers, "config", _cmd_config,
        "print the normalized, interpolated spec (like docker compose config)",
        ["hpc-compose config -f compose.yaml",
         "hpc-compose config -f compose.yaml -f compose.prod.yaml",
         "hpc-compose config --services --profile debug",
         "hpc-compose config -f compose.yaml --format json",
         "hpc-compose config --no-interpolate -f compose.yaml"])
    parser.add_argument("--no-interpolate", action="store_true",
                        help="print the file as written: variables are not expanded (nor checked)")
    parser.add_argument("--services", dest="list_services", action="store_true",
                        help="print the names of the services that would run, one per line")
    parser.add_argument("--profiles", dest="list_profiles", action="store_true",
                        help="print every profile the services name, one per line")


def _cmd_config(args):
    """Print the spec after interpolation and normalization."""
    fmt = _output_format(args)
    if args.no_interpolate:
        # The files as written, merged: variables are neither expanded nor checked.
        paths = _resolve_compose_files(args)
        data = _merge_compose_files(paths, check_todos=False).data
    else:
        spec, plan = _load_plan_from_args(args)
        if args.list_services or args.list_profiles:
            names = [service.name for service in spec.services] if args.list_services else \
                list(spec.profiles)
            sys.stdout.write("".join(name + "\n" for name in names))
            return _EXIT_OK
        data = spec_to_dict(spec, escape_dollars=True)
    if fmt == "json":
        _print_json(data)
    else:
        sys.stdout.write(_format_yaml(data) + "\n")
    return _EXIT_OK


# --- render ---------------------------------------------------------------------------------------

def _add_render_parser(subparsers):
    parser = _add_command(
        subparsers, "render", _cmd_render,
        "print the batch script (or write it with --output)",
        ["hpc-compose render -f compose.yaml > job.sbatch",
         "hpc-compose render -f compose.yaml --output /tmp/job.sbatch",
         "hpc-compose render -f compose.yaml --format json"])
    _add_file_argument(parser)
    parser.add_argument("-o", "--output", dest="output", metavar="PATH",
                        help="write the script to PATH and print the path (default: stdout)")
    _add_format_argument(parser)


def _format_render_summary(runtime_plan, script, output=None):
    """The ``render --format json`` document: the script, where it went, each service's srun argv."""
    plan = runtime_plan.plan
    services = []
    for index, service in enumerate(plan.services):
        services.append({
            "name": service.name,
            "token": service.token,
            "runtime": service.runtime,
            "log": "logs/%s.log" % service.token,
            "ends_job": service.name in _job_ending_services(plan),
            "srun_argv": ["srun"] + service_srun_argv(runtime_plan, index),
            "environment": [[key, value] for key, value in service_environment(runtime_plan, index)],
        })
    return {"compose_file": plan.compose_file, "job_name": plan.job_name, "output": output,
            "script": script, "services": services}


def _make_script_folders(folder):
    """The missing folders above ``render -o``'s script: by the umask, but never writable by
    others, who could otherwise put a script of theirs in its place before it is submitted."""
    if os.path.isdir(folder):
        return
    _make_script_folders(os.path.dirname(folder))
    try:
        os.mkdir(folder, 0o755)
    except FileExistsError:
        pass


def _cmd_render(args):
    """Render the batch script to stdout, or to ``--output`` (then print its path)."""
    fmt = _output_format(args)
    _, plan = _load_plan_from_args(args)
    runtime_plan = build_runtime_plan(plan)
    script = render_script(runtime_plan)
    output = None
    if args.output:
        output = os.path.abspath(os.path.expanduser(args.output))
        if os.path.isdir(output):
            raise UsageError("--output '%s' is a directory" % args.output,
                             hint="name the script file, e.g. --output %s"
                                  % os.path.join(args.output, "job.sbatch"))
        missing = not os.path.isdir(os.path.dirname(output))
        _make_script_folders(os.path.dirname(output))
        _write_file_atomic(output, script, mode=_PRIVATE_FILE_MODE)
        if missing:     # said, not silent: a mistyped folder shows up here
            sys.stderr.write("note: the folder %s did not exist; it was created for the script\n"
                             % os.path.dirname(output))
    if fmt == "json":
        _print_json(_format_render_summary(runtime_plan, script, output))
    elif output:
        sys.stdout.write(output + "\n")
    else:
        sys.stdout.write(script)
    return _EXIT_OK


# --- submit, up, run, status, ps, logs, exec, stats, artifacts, cancel, down, clean ---------------

def _add_tool_arguments(parser, names):
    """``--NAME-bin PATH`` for each external tool the command calls."""
    for name in names:
        parser.add_argument("--%s-bin" % name, dest="%s_bin" % name, default=name, metavar="PATH",
                            help="%s executable (default: %s from PATH)" % (name, name))


def _add_apptainer_argument(parser):
    parser.add_argument("--apptainer-bin", dest="apptainer_bin", metavar="PATH",
                        help="apptainer executable that builds .sif images (default: apptainer, "
                             "or singularity for x-slurm.runtime: singularity, from PATH)")


def _add_job_id_argument(parser):
    parser.add_argument("--job-id", dest="job_id", metavar="ID",
                        help="a Slurm job id (default: the latest job submitted from this compose dir)")
    parser.add_argument("--task", type=int, metavar="N",
                        help="one task of a job array (x-slurm.array): its own directory and logs")


def _add_submit_arguments(parser, services=True, script="hpc-compose.sbatch"):
    _add_file_argument(parser)
    if services:
        parser.add_argument("services", metavar="SERVICE", nargs="*",
                            help="run only these services and what they depend on (default: "
                                 "every service whose profiles are active)")
    parser.add_argument("--script-out", dest="script_out", metavar="PATH",
                        help="where to write the batch script (default: <compose dir>/%s)" % script)
    parser.add_argument("--dry-run", action="store_true",
                        help="run preflight, prepare and render, write the script, but do not call sbatch")
    parser.add_argument("--no-preflight", action="store_true", help="skip the preflight checks")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="reuse existing prepared images instead of preparing them")
    parser.add_argument("--force-rebuild", action="store_true",
                        help="re-import and re-prepare every image")
    parser.add_argument("--keep-failed-prep", action="store_true",
                        help="keep the Enroot rootfs when a prepare step fails")
    parser.add_argument("--after", metavar="JOB_ID|latest[:TYPE]",
                        help="start only after that job: TYPE is afterok (default), afterany or "
                             "afternotok; latest is the latest job of --after-file")
    parser.add_argument("--after-file", dest="after_file", metavar="FILE",
                        help="the compose file whose latest tracked job --after latest means "
                             "(alone: --after latest:afterok)")
    _add_tool_arguments(parser, ("enroot", "srun", "sbatch", "squeue", "sacct", "scontrol",
                                 "scancel"))
    _add_apptainer_argument(parser)
    _add_format_argument(parser)


def _add_submit_parser(subparsers):
    parser = _add_command(
        subparsers, "submit", _cmd_submit,
        "check, prepare, render and submit the job with sbatch (--watch to follow it)",
        ["hpc-compose submit --watch -f compose.yaml",
         "hpc-compose submit --dry-run --skip-prepare -f compose.yaml",
         "hpc-compose submit --script-out job.sbatch -f compose.yaml"])
    _add_submit_arguments(parser)
    parser.add_argument("--watch", action="store_true",
                        help="follow the scheduler state and stream service logs until the job ends")


def _add_up_parser(subparsers):
    parser = _add_command(subparsers, "up", _cmd_up,
                         "submit and watch (= submit --watch); exits 0 only if the job completed",
                         ["hpc-compose up -f examples/host-pipeline.yaml",
                          "hpc-compose up --local -f examples/host-pipeline.yaml"])
    _add_submit_arguments(parser)
    parser.add_argument("--local", action="store_true",
                        help="run the job here, never sbatch: as steps of this allocation inside "
                             "salloc/srun, else on this machine (exit code: the job's)")


def _add_run_parser(subparsers):
    import argparse
    parser = _add_command(
        subparsers, "run", _cmd_run,
        "submit a one-off job: SERVICE (with its dependencies) running COMMAND, watched like up; "
        "exits with the service's exit code",
        ["hpc-compose run app -- python3 -c 'print(42)'",
         "hpc-compose run -e DEBUG=1 -v ./data:/data --workdir /data app -- ls",
         "hpc-compose run --no-deps --detach --name nightly-check app -- ./check.sh"],
        "Options go before SERVICE; everything after it is the command.")
    _add_submit_arguments(parser, services=False, script="hpc-compose-run-<service>.sbatch")
    parser.add_argument("-d", "--detach", action="store_true",
                        help="submit and print the job, do not watch it")
    parser.add_argument("--no-deps", dest="no_deps", action="store_true",
                        help="do not start the services SERVICE depends on")
    parser.add_argument("-e", "--env", dest="env", action="append", default=[], metavar="KEY=VAL",
                        help="set an environment variable for the service (repeatable)")
    parser.add_argument("-v", "--volume", dest="volumes", action="append", default=[],
                        metavar="HOST:CONTAINER[:ro]",
                        help="bind-mount a host path (repeatable; relative to this directory)")
    parser.add_argument("-w", "--workdir", metavar="DIR",
                        help="the service's working directory")
    parser.add_argument("--name", metavar="NAME",
                        help="the job name (default: <job name>-run-<service>)")
    parser.add_argument("--entrypoint", metavar="CMD",
                        help="replaces the entrypoint (words split as a shell would; '' clears "
                             "it)")
    parser.add_argument("--rm", action="store_true",
                        help="accepted for Compose habit: a run's containers are always removed")
    parser.add_argument("-T", "--no-TTY", dest="no_tty", action="store_true",
                        help="accepted for Compose habit: a run job never has a terminal")
    parser.add_argument("service", metavar="SERVICE")
    command = parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                                  help="replaces the service's command (default: its own)")
    command.required = False  # as for exec: a missing SERVICE names SERVICE alone


def _add_status_arguments(parser):
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    _add_tool_arguments(parser, ("squeue", "sacct"))
    _add_format_argument(parser)
    parser.add_argument("--timeline", action="store_true",
                        help="draw the job's timeline (a row per service, 80 columns)")
    _add_watch_argument(parser)


def _add_watch_argument(parser):
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, default=None,
                        metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until the job ends or Ctrl-C")


def _add_status_parser(subparsers):
    parser = _add_command(subparsers, "status", _cmd_status,
                         "scheduler state, per-service state and log paths of a tracked job",
                         ["hpc-compose status -f compose.yaml",
                          "hpc-compose status --job-id 12345 --format json"])
    _add_status_arguments(parser)


def _add_ps_parser(subparsers):
    parser = _add_command(subparsers, "ps", _cmd_status, "alias of status",
                         ["hpc-compose ps -f compose.yaml"])
    _add_status_arguments(parser)


def _add_logs_parser(subparsers):
    parser = _add_command(subparsers, "logs", _cmd_logs,
                         "print (or follow) the service logs of a tracked job, prefixed [service]",
                         ["hpc-compose logs -f compose.yaml",
                          "hpc-compose logs -f compose.yaml --service app --follow",
                          "hpc-compose logs --follow app worker",
                          "hpc-compose logs -f compose.yaml --tail 20"])
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    parser.add_argument("names", nargs="*", metavar="SERVICE",
                        help="only these services (as docker compose logs SERVICE...)")
    parser.add_argument("--service", metavar="NAME", help="only this service")
    parser.add_argument("--follow", action="store_true",
                        help="keep printing new lines until the job ends (Ctrl-C to stop)")
    parser.add_argument("--tail", "--lines", dest="tail", type=int, default=100, metavar="N",
                        help="how many existing lines per service to print first (default: 100)")
    parser.add_argument("--since", metavar="WHEN",
                        help="only lines written since WHEN: a duration (10m, 1h30m) or a time "
                             "(2026-11-29T15:04:05, Z or +01:00 for a zone)")
    parser.add_argument("-t", "--timestamps", action="store_true",
                        help="show when each line was written (UTC, to the supervisor's second)")
    parser.add_argument("--no-prefix", dest="prefix", action="store_false",
                        help="leave out the [service] prefix")
    _add_tool_arguments(parser, ("squeue", "sacct"))


def _add_exec_parser(subparsers):
    import argparse
    parser = _add_command(subparsers, "exec", _cmd_exec,
                         "run a command inside a running service of a tracked job",
                         ["hpc-compose exec app",
                          "hpc-compose exec -T app -- python3 -c 'import sys; print(sys.version)'",
                          "hpc-compose exec --index 2 -e DEBUG=1 --workdir /tmp trainer -- ls"],
                         "Options go before SERVICE; everything after it is the command.")
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--node", metavar="NAME", help="the node of a distributed service to use")
    where.add_argument("--index", type=int, metavar="N",
                       help="the Nth node of a distributed service (1 = the first, the default)")
    tty = parser.add_mutually_exclusive_group()
    tty.add_argument("--pty", dest="tty", action="store_true", default=None,
                     help="give the command a terminal (the default when stdin is one)")
    tty.add_argument("-T", "--no-tty", dest="tty", action="store_false",
                     help="no terminal, even when stdin is one")
    parser.add_argument("-e", "--env", dest="env", action="append", default=[], metavar="KEY=VAL",
                        help="set an environment variable for the command (repeatable)")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="run the command in DIR")
    parser.add_argument("service", metavar="SERVICE")
    command = parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                                  help="the command and its arguments (default: bash, else sh)")
    # argparse counts a REMAINDER as required and would name COMMAND too when SERVICE is missing.
    command.required = False
    _add_tool_arguments(parser, ("srun", "squeue", "sacct", "scontrol"))


def _add_stats_parser(subparsers):
    parser = _add_command(subparsers, "stats", _cmd_stats,
                         "GPU and step metrics of a job (sampler files first, then live sstat)",
                         ["hpc-compose stats -f compose.yaml",
                          "hpc-compose stats -f compose.yaml --format csv"])
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    _add_tool_arguments(parser, ("sstat", "squeue", "sacct"))
    _add_format_argument(parser, choices=("text", "json", "csv", "jsonl"))
    _add_watch_argument(parser)


def _add_report_parser(subparsers):
    parser = _add_command(subparsers, "report", _cmd_report,
                         "write one self-contained HTML page of a job: facts, timeline, resource "
                         "charts, last log lines",
                         ["hpc-compose report", "hpc-compose report 12345 -o job-12345.html"])
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    parser.add_argument("job", nargs="?", metavar="JOB",
                        help="the job id (the same as --job-id; default: the latest job)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="where to write the page (default: report-<job id>.html; - for stdout)")
    _add_tool_arguments(parser, ("squeue", "sacct"))


def _add_sweep_parser(subparsers):
    parser = _add_command(subparsers, "sweep", _cmd_sweep,
                         "the tasks of an x-sweep job: parameters, state, results; retry some",
                         ["hpc-compose sweep status -f sweep.yaml --sort loss --top 5",
                          "hpc-compose sweep status -f sweep.yaml --format csv > results.csv",
                          "hpc-compose sweep retry --failed -f sweep.yaml",
                          "hpc-compose sweep retry --tasks 3,7 -f sweep.yaml"])
    sub = parser.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND",
                                parser_class=type(parser))
    status = _add_command(sub, "status", _cmd_sweep_status,
                          "one row per task (latest attempt): index, parameters, state, elapsed, "
                          "exit, result values; failed tasks with their log's last lines",
                          ["hpc-compose sweep status -f sweep.yaml",
                           "hpc-compose sweep status --sort -accuracy --top 3",
                           "hpc-compose sweep status --watch"])
    _add_file_argument(status)
    status.add_argument("--job-id", dest="job_id", metavar="ID",
                        help="the sweep's job id, or a retry's (default: the latest job "
                             "submitted from this compose dir)")
    status.add_argument("--sort", metavar="KEY",
                        help="sort by a result, a parameter, index, state or elapsed (-KEY: "
                             "descending); tasks without the value come last")
    status.add_argument("--top", type=int, metavar="N", help="only the first N rows")
    status.add_argument("--watch", action="store_true",
                        help="refresh until every task has ended")
    status.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between two refreshes of --watch (default: 10)")
    _add_tool_arguments(status, ("sacct", "squeue"))
    _add_format_argument(status, choices=("text", "json", "csv"))
    retry = _add_command(sub, "retry", _cmd_sweep_retry,
                         "submit the failed (or chosen) tasks again as a new array with the same "
                         "parameters and indices; sweep status then shows the latest attempt",
                         ["hpc-compose sweep retry --failed -f sweep.yaml",
                          "hpc-compose sweep retry --tasks 3,7 -f sweep.yaml"])
    _add_file_argument(retry)
    retry.add_argument("--job-id", dest="job_id", metavar="ID",
                       help="the sweep's job id (default: the latest job of this compose dir)")
    retry.add_argument("--failed", action="store_true",
                       help="the tasks that ended other than COMPLETED (the default without "
                            "--tasks; with --tasks, only those of them that failed)")
    retry.add_argument("--tasks", metavar="LIST", help="these task indices, e.g. 3,7 or 10-12")
    _add_tool_arguments(retry, ("sbatch", "sacct", "squeue"))
    _add_format_argument(retry)


def _cmd_sweep(args):
    """``sweep`` without a subcommand is a usage error."""
    raise UsageError("sweep needs a subcommand: status or retry",
                     hint="run 'hpc-compose sweep --help'")


def _sweep_record(args):
    compose_file = _resolve_compose_file(args)
    record = _load_job_record(os.path.dirname(compose_file), args.job_id, compose_file)
    return _sweep_root_record(record["project_dir"], record)


def _print_sweep_status(status, fmt):
    if fmt == "json":
        _print_json(status)
    elif fmt == "csv":
        sys.stdout.write(_format_sweep_status_csv(status))
    else:
        sys.stdout.write(_format_sweep_status_text(status))


def _cmd_sweep_status(args, sleep=None):
    """The sweep table: one sacct call per refresh, whatever the number of tasks."""
    import time
    fmt = _output_format(args)
    if args.top is not None and args.top < 1:
        raise UsageError("--top must be at least 1")
    record = _sweep_record(args)
    sleep = sleep or time.sleep
    clear = args.watch and fmt == "text" and sys.stdout.isatty()
    try:
        while True:
            status = _sweep_status(record, args.sacct_bin, args.squeue_bin)
            if clear:
                sys.stdout.write("\033[H\033[J")
            _print_sweep_status(_sort_sweep_rows(status, args.sort, args.top), fmt)
            sys.stdout.flush()
            ended = all(row["state"] in _TERMINAL_STATES for row in status["tasks"])
            if not args.watch or ended:
                return _EXIT_OK
            sleep(max(args.interval, 1.0))
    except KeyboardInterrupt:
        sys.stderr.write("\nstopped watching sweep %s; its tasks keep running.\n"
                         % record["job_id"])
        return _EXIT_INTERRUPTED


def _cmd_sweep_retry(args):
    """Submit the chosen tasks of a sweep again: the first job's script, ``--array`` of them."""
    fmt = _output_format(args)
    root = _sweep_record(args)
    if root.get("uses_secrets"):
        raise UsageError("sweep %s uses secrets, which only a fresh submission delivers"
                         % root["job_id"], hint="submit the sweep again: hpc-compose submit")
    script = root.get("sweep_script") or root.get("script_path")
    if not script or not os.path.isfile(script):
        raise UsageError("the batch script of sweep %s is gone (%s)" % (root["job_id"], script),
                         hint="submit the sweep again: hpc-compose submit")
    status = _sweep_status(root, args.sacct_bin, args.squeue_bin)
    tasks = _sweep_retry_tasks(status, args.failed, _parse_task_list(args.tasks)
                               if args.tasks else None)
    if not tasks:
        if fmt == "json":
            _print_json({"job_id": None, "tasks": []})
        else:
            print("nothing to retry: no task of sweep %s failed" % root["job_id"])
        return _EXIT_OK
    running = [row["index"] for row in status["tasks"]
               if row["index"] in tasks and row["state"] not in _TERMINAL_STATES]
    if running:
        raise UsageError("task %s of sweep %s has not ended yet" % (
            ", ".join(str(task) for task in running), root["job_id"]),
            hint="wait for it (sweep status --watch), or cancel it first")
    array = ",".join(str(task) for task in tasks)
    if root["sweep"].get("max_parallel"):
        array += "%%%d" % root["sweep"]["max_parallel"]
    job_id, cluster = _submit_batch_script(script, root["project_dir"], args.sbatch_bin,
                                          array=array)
    record = _retry_record(root, job_id, cluster, tasks, array)
    try:
        _record_job(root["project_dir"], record)
    except OSError as exc:
        _warn("job %s was submitted but its tracking record could not be written: %s"
              % (job_id, exc))
    if fmt == "json":
        _print_json({"job_id": job_id, "cluster": cluster, "sweep": root["job_id"],
                     "tasks": tasks, "array": array})
    else:
        print("submitted batch job %s: tasks %s of sweep %s again"
              % (job_id, ", ".join(str(task) for task in tasks), root["job_id"]))
        print("follow them: hpc-compose sweep status --watch -f %s"
              % (root.get("compose_file") or "compose.yaml"))
    return _EXIT_OK


def _add_diff_parser(subparsers):
    parser = _add_command(subparsers, "diff", _cmd_diff,
                         "what differs between two tracked jobs or sweep tasks: spec, parameters, "
                         "resources, images, nodes, elapsed, exit, results",
                         ["hpc-compose diff 1234_3 1234_7",
                          "hpc-compose diff 1200 1250 --format json"])
    parser.add_argument("left", metavar="JOB_A", help="a job id, or ID_TASK for a task of a "
                                                      "sweep or array")
    parser.add_argument("right", metavar="JOB_B", help="the job to compare it with")
    _add_file_argument(parser)
    _add_tool_arguments(parser, ("sacct",))
    _add_format_argument(parser)


def _cmd_diff(args):
    """Two jobs' facts side by side, only where they differ (two sacct calls)."""
    compose_file = _resolve_compose_file(args)
    project_dir = os.path.dirname(compose_file)
    left = _job_facts(project_dir, args.left, args.sacct_bin)
    right = _job_facts(project_dir, args.right, args.sacct_bin)
    differences = _diff_facts(left, right)
    if _output_format(args) == "json":
        _print_json({"left": left, "right": right, "differences": differences})
    else:
        sys.stdout.write(_format_diff_text(left, right, differences))
    return _EXIT_OK


def _add_artifacts_parser(subparsers):
    parser = _add_command(subparsers, "artifacts", _cmd_artifacts,
                         "export collected artifacts to x-slurm.artifacts.export_dir",
                         ["hpc-compose artifacts -f compose.yaml",
                          "hpc-compose artifacts -f compose.yaml --bundle checkpoints --tarball"])
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    parser.add_argument("--bundle", action="append", metavar="NAME",
                        help="export only this bundle (repeatable; 'default' is x-slurm.artifacts.paths)")
    parser.add_argument("--tarball", action="store_true",
                        help="also write <export_dir>/<bundle>.tar.gz per exported bundle")
    _add_format_argument(parser)


def _add_cancel_arguments(parser):
    _add_file_argument(parser)
    _add_job_id_argument(parser)
    _add_tool_arguments(parser, ("scancel",))


def _add_cancel_parser(subparsers):
    parser = _add_command(subparsers, "cancel", _cmd_cancel, "cancel a tracked job (scancel)",
                         ["hpc-compose cancel -f compose.yaml"])
    _add_cancel_arguments(parser)


def _add_down_parser(subparsers):
    parser = _add_command(subparsers, "down", _cmd_cancel, "alias of cancel",
                         ["hpc-compose down -f compose.yaml"])
    _add_cancel_arguments(parser)


def _add_clean_parser(subparsers):
    parser = _add_command(subparsers, "clean", _cmd_clean,
                         "remove old tracked jobs (never a running one, never the latest) and the secret copies of ended jobs",
                         ["hpc-compose clean -f compose.yaml --age 7",
                          "hpc-compose clean -f compose.yaml --all"])
    _add_file_argument(parser)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--age", type=float, metavar="DAYS",
                       help="remove jobs submitted more than DAYS days ago")
    group.add_argument("--all", dest="remove_all", action="store_true",
                       help="remove every tracked job except the latest")
    _add_tool_arguments(parser, ("squeue",))
    _add_format_argument(parser)


def _job_record(args):
    compose_file = _resolve_compose_file(args)
    record = _load_job_record(os.path.dirname(compose_file), args.job_id, compose_file)
    if getattr(args, "task", None) is not None:
        record = _task_record(record, args.task)
    return record


def _needs_images(plan):
    return any(service.runtime != "host" for service in plan.services)


def _print_findings(report):
    for finding in report.findings:
        if finding.level in ("warn", "error"):
            text = "preflight %s: %s" % ("warning" if finding.level == "warn" else "error",
                                         finding.message)
            if finding.remediation:
                text += "\n  hint: %s" % finding.remediation
            sys.stderr.write(text + "\n")


def _write_job_script(args, plan, say, local=None):
    """Preflight (unless --no-preflight), prepare the images, render and write the batch script:
    what ``submit``, ``run`` and ``up --local`` (``local``: its mode) do first. Returns the runtime
    plan and the script's path."""
    action = "start" if local else "submit"
    runtime_plan = build_runtime_plan(plan)
    # Rendered before anything is imported: the scheduler judges this very script first.
    script = render_script(runtime_plan, local=local == "machine")
    if not args.no_preflight:
        report = run_preflight(runtime_plan, PreflightOptions(
            enroot_bin=args.enroot_bin, apptainer_bin=getattr(args, "apptainer_bin", None), srun_bin=args.srun_bin,
            sbatch_bin=args.sbatch_bin,
            skip_prepare=args.skip_prepare, dry_run=bool(getattr(args, "dry_run", False)),
            local=local, script=None if local else script))
        _print_findings(report)
        if report.errors:
            raise ToolError("preflight found %d error(s); nothing was %s"
                            % (len(report.errors), "started" if local else "submitted"),
                            hint="fix them, or pass --no-preflight to %s anyway" % action)
    _prepare_for_run(args, plan, runtime_plan, say)
    script_path = os.path.abspath(args.script_out) if args.script_out else \
        os.path.join(plan.project_dir, "hpc-compose.sbatch")
    _write_file_atomic(script_path, script, _PRIVATE_FILE_MODE)
    return runtime_plan, script_path


def _prepare_for_run(args, plan, runtime_plan, say):
    """Import and prepare the images ``plan`` needs (submit, up --local), unless --skip-prepare."""
    if not args.skip_prepare and _needs_images(plan):
        try:
            prepare_images(runtime_plan, PrepareOptions(
                enroot_bin=args.enroot_bin, apptainer_bin=args.apptainer_bin,
                force=args.force_rebuild,
                keep_failed=args.keep_failed_prep), progress=say)
        except NotImplementedError:
            raise ToolError("image preparation is not available in this build",
                            hint="prepare images separately and pass --skip-prepare")


def _cmd_submit(args):
    """Preflight, prepare, render, write the script, sbatch, record; optionally watch."""
    spec, plan = _load_plan_from_args(args)
    return _submit_plan(args, plan)


def _submit_plan(args, plan, run=None):
    """``submit`` from the plan on: ``run`` (``{"service", "command"}``) marks a ``run`` job, whose
    own messages go to stderr so that stdout carries the service's output alone."""
    fmt = _output_format(args)
    say = (lambda text: sys.stderr.write(text + "\n")) if fmt == "json" or run else print
    runtime_plan, script_path = _write_job_script(args, plan, say)
    result = {"dry_run": bool(args.dry_run), "script_path": script_path,
              "cache_dir": plan.cache_dir, "job_id": None}
    if args.dry_run:
        if fmt == "json":
            _print_json(result)
        else:
            print("rendered script: %s" % script_path)
            print("cache dir: %s" % plan.cache_dir)
            print("dry run: skipping sbatch")
        return _EXIT_OK
    chain = _resolve_after(getattr(args, "after", None), getattr(args, "after_file", None))
    dependency = ",".join(part for part in (plan.slurm.dependency, chain and chain["dependency"])
                          if part)
    _check_dependency_jobs(dependency, args.squeue_bin, args.sacct_bin)
    _make_private_dir(_tracking_root(plan.project_dir), _job_dir_mode(plan))
    holds = bool(_secret_services(plan))
    job_id, cluster = _submit_batch_script(script_path, plan.project_dir, args.sbatch_bin,
                                          hold=holds, dependency=dependency)
    if holds:
        _deliver_secrets(plan, job_id, cluster, say, args.scontrol_bin, args.scancel_bin)
    record = _build_job_record(runtime_plan, job_id, cluster, script_path)
    if plan.spec.sweep is not None:
        # sweep retry resubmits this very script, whatever renders to script_path later.
        record["sweep_script"] = _keep_sweep_script(plan.project_dir, job_id, script_path)
    record["dependency"] = dependency or None
    record["after"] = chain
    if run:
        record["run"] = run     # a `run` job: which service, which command
    metadata_path = None
    try:
        metadata_path = _record_job(plan.project_dir, record)
    except OSError as exc:
        _warn("job %s was submitted but its tracking record could not be written: %s" % (job_id, exc))
    result.update({"job_id": job_id, "cluster": cluster, "batch_log": record["batch_log"],
                   "job_dir": record["job_dir"], "metadata_path": metadata_path,
                   "service_logs": [{"service": s["name"], "path": s["log_path"]}
                                    for s in record["services"]]})
    if fmt == "json" and not getattr(args, "watch", False):
        _print_json(result)
    else:
        say("submitted batch job %s%s" % (job_id, " on cluster %s" % cluster if cluster else ""))
        say("rendered script: %s" % script_path)
        say("cache dir: %s" % plan.cache_dir)
        if record.get("array_tasks"):
            first = _task_record(record, record["array_tasks"][0])
            say("job array: %d tasks (%s), each in its own job directory, e.g. %s"
                % (len(record["array_tasks"]), record["array"], first["job_dir"]))
            say("batch log of task %d: %s" % (first["array_task"], first["batch_log"]))
        else:
            say("batch log: %s" % record["batch_log"])
            for service in record["services"]:
                say("log  service '%s': %s" % (service["name"], service["log_path"]))
        if metadata_path:
            say("tracked job metadata: %s" % metadata_path)
    if getattr(args, "watch", False):
        if record.get("array_tasks"):
            return _watch_array(record, args, fmt)
        return _watch(record, args, fmt)
    return _EXIT_OK


def _keep_sweep_script(project_dir, job_id, script_path):
    """A private copy of a sweep's batch script beside its record (``jobs/<id>.sbatch``)."""
    path = os.path.join(_tracking_root(project_dir), "jobs", "%s.sbatch" % job_id)
    try:
        with open(script_path) as handle:
            _make_private_dir(os.path.dirname(path))
            _write_file_atomic(path, handle.read(), _PRIVATE_FILE_MODE)
    except OSError as exc:
        _warn("the batch script of sweep %s could not be kept for sweep retry: %s" % (job_id, exc))
        return None
    return path


def _watch(record, args, fmt):
    run = record.get("run")
    out = sys.stderr if fmt == "json" or run else sys.stdout
    sources = show = None
    if run:
        # `run` shows its service's output as it is, alone on stdout (stderr with --format json).
        sources = _record_log_sources(record, run["service"])
        show = _unprefixed_lines(sys.stderr if fmt == "json" else sys.stdout)
    try:
        outcome = watch_job(record, args.squeue_bin, args.sacct_bin, out=out, sources=sources,
                            show=show)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\nstopped watching job %s; it keeps running.\n"
                         "  follow it again: hpc-compose logs --follow -f %s\n"
                         "  cancel it:       hpc-compose cancel -f %s\n"
                         % (record["job_id"], record.get("compose_file") or "compose.yaml",
                            record.get("compose_file") or "compose.yaml"))
        return _EXIT_INTERRUPTED
    exit_code = _run_exit_code(outcome.runtime, run["service"]) if run else None
    if fmt == "json":
        result = {"job_id": record["job_id"], "ok": outcome.ok, "reason": outcome.reason,
                  "scheduler": outcome.scheduler.to_dict(), "runtime": outcome.runtime,
                  "scheduler_calls": outcome.scheduler_calls}
        if run:
            result["exit_code"] = exit_code
        _print_json(result)
    if exit_code is not None:
        return _conclude_run(record, outcome, exit_code, out)
    if outcome.ok:
        out.write(outcome.reason + "\n")
        return _EXIT_OK
    sys.stderr.write("error: %s\n" % outcome.reason)
    batch_log = record.get("batch_log")
    if batch_log:
        # The batch log explains failures that happen before (or outside) any service log.
        for line in _tail_lines(batch_log, 10):
            sys.stderr.write(_format_log_line("batch", line) + "\n")
        sys.stderr.write("  hint: the batch log is %s\n" % batch_log)
    return _EXIT_FAILURE


_ARRAY_POLL_FIRST = 2.0
_ARRAY_POLL_MAX = 15.0


def _watch_array(record, args, fmt, sleep=None):
    """``up`` of an array job: wait for every task; exit 0 only if all of them completed."""
    import time
    sleep = sleep or time.sleep
    out = sys.stderr if fmt == "json" else sys.stdout
    reported = set()
    delay = _ARRAY_POLL_FIRST
    try:
        while True:
            status = _array_status(record, args.squeue_bin, args.sacct_bin)
            changed = False
            for row in status["tasks"]:
                state = row["scheduler"]["state"]
                if state in _TERMINAL_STATES and row["task"] not in reported:
                    reported.add(row["task"])
                    changed = True
                    out.write("task %d %s\n" % (row["task"], state))
            out.flush()
            if len(reported) == status["task_count"]:
                break
            delay = _ARRAY_POLL_FIRST if changed else min(delay * 1.5, _ARRAY_POLL_MAX)
            sleep(delay)
    except KeyboardInterrupt:
        sys.stderr.write("\nstopped watching job %s; its tasks keep running.\n" % record["job_id"])
        return _EXIT_INTERRUPTED
    if fmt == "json":
        _print_json(status)
    else:
        out.write(_format_array_status_text(status))
    if status["failed"]:
        sys.stderr.write("error: %d of %d tasks of job %s did not complete: %s\n" % (
            len(status["failed"]), status["task_count"], record["job_id"],
            ", ".join(str(task) for task in status["failed"])))
        return _EXIT_FAILURE
    return _EXIT_OK


def _cmd_up(args):
    """``submit --watch``; with ``--local``, run the job right here (``_cmd_up_local``)."""
    if args.local:
        return _cmd_up_local(args)
    args.watch = True
    return _cmd_submit(args)


def _cmd_run(args):
    """A one-off job of SERVICE (and its dependencies) with COMMAND, submitted like ``up``."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    request = _RunRequest(args.service, tuple(command), tuple(_parse_assignments(args.env)),
                          tuple(args.volumes), args.workdir, args.name, args.no_deps,
                          args.entrypoint)
    args.services = [args.service]
    spec = load_spec(_resolve_compose_files(args), **_spec_options(args))
    for message in spec.warnings:
        _warn(message)
    plan = build_plan(_run_spec(spec, request, os.getcwd()))
    if not args.script_out:
        # Beside up's script, not over it: the tracked record of an up job names its script.
        args.script_out = os.path.join(plan.project_dir,
                                       "hpc-compose-run-%s.sbatch" % service_token(args.service))
    args.watch = not args.detach
    return _submit_plan(args, plan, run={"service": args.service, "command": command or None})


def _unprefixed_lines(stream):
    """``show`` for ``watch_job``: each line as the service wrote it, at once."""
    def show(name, line):
        stream.write(line.rstrip("\r") + "\n")
        stream.flush()
    return show


def _run_exit_code(runtime, name):
    """The exit code of a ``run`` job's service once it exited by itself; ``None`` when it never
    ran to its end (not started, a dependency failed, the job was cancelled or timed out)."""
    for service in (runtime or {}).get("services", ()):
        if service.get("name") == name and service.get("status") in ("exited", "failed"):
            code = service.get("last_exit_code")
            return code if isinstance(code, int) else None
    return None


def _conclude_run(record, outcome, exit_code, out):
    """The exit code of a watched ``run``: its service's, said on stderr when it is not 0."""
    if exit_code:
        sys.stderr.write("service '%s' exited with code %d (job %s %s)\n"
                         % (record["run"]["service"], exit_code, record["job_id"],
                            outcome.scheduler.state))
    else:
        out.write(outcome.reason + "\n")
    return exit_code


def _cmd_up_local(args):
    """``up --local``: preflight, prepare, render; run the script with bash here, never sbatch;
    print the service logs as they grow; exit with the job's own exit code."""
    fmt = _output_format(args)
    say = (lambda text: sys.stderr.write(text + "\n")) if fmt == "json" else print
    for flag, value in (("--after", args.after), ("--after-file", args.after_file)):
        if value:
            raise UsageError("%s waits for another job in the queue; up --local starts at once "
                             "and never uses sbatch" % flag)
    mode = _local_mode()
    _spec, plan = _load_plan_from_args(args)
    problems = _local_plan_problems(plan, mode)
    if problems:
        raise UsageError("up --local cannot run %s %s: %s" % (
            plan.compose_file, "in this allocation" if mode == "allocation" else "outside Slurm",
            "; ".join(problems)))
    ignored = _local_ignored_settings(plan)
    if ignored:
        _warn("up --local does not use x-slurm %s: only sbatch acts on %s (the job starts at once, "
              "%s)" % (", ".join(ignored), "it" if len(ignored) == 1 else "them",
                       "in this allocation" if mode == "allocation" else "on this machine"))
    runtime_plan, script_path = _write_job_script(args, plan, say, local=mode)
    if args.dry_run:
        say("rendered script: %s" % script_path)
        say("dry run: not starting it (up --local would run it with bash here)")
        return _EXIT_OK
    job_id = _local_job_id(mode)
    _make_private_dir(_tracking_root(plan.project_dir), _job_dir_mode(plan))
    # The lock says that an up --local follows the run: held until it exits, however it exits. In
    # an allocation the job directory is the allocation's, so a second run of this project in it
    # (which would share its state.json and logs) is refused while the first one runs; a run
    # outside Slurm has a job id of its own. The lock file stays: removing it would let two runs
    # lock two different files; `clean` removes it with the job.
    lock = _try_lock(os.path.join(_tracking_root(plan.project_dir), ".%s.local-lock" % job_id))
    if lock is None:
        raise UsageError("a local run of %s is already running in allocation %s; a second "
                         "one would share its job directory" % (plan.compose_file, job_id),
                         hint="wait for it to end, stop it (Ctrl-C where it runs), or run "
                              "the second stack from another folder")
    out = sys.stderr if fmt == "json" else sys.stdout
    try:
        if mode == "allocation":
            _stop_orphaned_batch_script(job_id, _batch_pid_path(plan.project_dir, job_id),
                                        _job_directory(plan.project_dir, job_id), args.srun_bin,
                                        say, _STOP_GRACE_SECONDS + 5.0)
        if mode == "machine" or os.environ.get("SLURMD_NODENAME"):  # the script runs here
            _check_local_leftovers(plan, say, job_id)
        code, record = _run_local(plan, runtime_plan, mode, job_id, script_path, out, say,
                                  args.srun_bin)
    finally:
        if lock is not None:
            lock.close()
    return _report_local_run(job_id, record, mode, code, fmt, out)


def _report_local_run(job_id, record, mode, code, fmt, out):
    """How an ``up --local`` run ended (JSON, or a line; the batch log's tail when it failed);
    returns its exit code."""
    runtime = _load_runtime_state(record["job_dir"]) or {}
    status = runtime.get("status") or "ended"
    reason = "job %s %s (exit code %d)" % (job_id, status, code)
    if runtime.get("reason"):
        reason += ": %s" % runtime["reason"]
    if fmt == "json":
        _print_json({"job_id": job_id, "local": mode, "status": status, "exit_code": code,
                     "reason": runtime.get("reason"), "job_dir": record["job_dir"],
                     "batch_log": record["batch_log"]})
    elif code == 0:
        out.write(reason + "\n")
    else:
        sys.stderr.write("error: %s\n" % reason)
        for line in _tail_lines(record["batch_log"], 10):
            sys.stderr.write(_format_log_line("batch", line) + "\n")
        sys.stderr.write("  hint: the batch log is %s\n" % record["batch_log"])
    return code


def _watch_screens(args, draw):
    """``--watch``: call ``draw()`` (text, and whether the job has ended) every few seconds, each
    time over the last screen on a terminal; once without ``--watch``."""
    import time
    if args.watch is None:
        sys.stdout.write(draw()[0])
        return _EXIT_OK
    if args.watch <= 0:
        raise UsageError("--watch takes a number of seconds above 0; got %s" % args.watch)
    if _output_format(args) != "text":
        raise UsageError("--watch redraws text: leave out --format/--json")
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            text, ended = draw()
            sys.stdout.write(clear + text + ("" if clear else "\n"))
            sys.stdout.flush()
            if ended:
                return _EXIT_OK
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED


def _cmd_status(args):
    """Scheduler state (squeue, then sacct), per-service state from state.json, log paths."""
    record = _job_record(args)
    if args.timeline or args.watch is not None:
        if args.timeline:
            _require_task(record)
        return _watch_screens(args, lambda: _status_screen(record, args))
    if record.get("array_tasks") and record.get("array_task") is None:
        status = _array_status(record, args.squeue_bin, args.sacct_bin)
        if record.get("sweep"):
            status["sweep"] = "hpc-compose sweep status -f %s" % (
                record.get("compose_file") or "compose.yaml")
        if _output_format(args) == "json":
            _print_json(status)
        else:
            sys.stdout.write(_format_array_status_text(status))
            if record.get("sweep"):
                sys.stdout.write("  sweep:      this job is a sweep: parameters, results and "
                                 "retries: %s\n" % status["sweep"])
        return _EXIT_OK
    status = _job_status(record, args.squeue_bin, args.sacct_bin)
    if status["scheduler_warning"]:
        _warn(status["scheduler_warning"])
    if _output_format(args) == "json":
        _print_json(status)
    else:
        sys.stdout.write(_format_status_text(status))
    return _EXIT_OK


def _cmd_logs(args):
    """Print the last lines of the service logs interleaved in write order; ``--follow`` keeps reading."""
    if args.tail < 0:
        raise UsageError("--tail must be 0 or more")
    since_ms = None if args.since is None else _parse_since(args.since)
    record = _job_record(args)
    _require_task(record)
    names = list(args.names) + ([args.service] if args.service else [])
    sources = [pair for name in names for pair in _record_log_sources(record, name)] \
        if names else _record_log_sources(record)
    printer = _LogPrinter([name for name, _ in _record_log_sources(record)], sys.stdout,
                          prefix=args.prefix, timestamps=args.timestamps,
                          colour=_use_colour(sys.stdout))
    attempts = [n for n, _ in _load_attempt_states(record["job_dir"])]
    if len(attempts) > 1:
        # A requeued job: every attempt's lines, each attempt after a marker line per service.
        for attempt in attempts:
            logs_dir = os.path.join(record["job_dir"], "attempts", str(attempt), "logs")
            for name, _ in sources:
                printer.note(name, "%s attempt %d (job %s)" % (_RESTART_MARKER, attempt,
                                                                record["job_id"]))
            attempt_sources = [(name, os.path.join(logs_dir, os.path.basename(path)))
                               for name, path in sources]
            for line in _load_interleaved_lines(attempt_sources, args.tail, since_ms):
                printer.write(line)
    else:
        for line in _load_interleaved_lines(sources, args.tail, since_ms):
            printer.write(line)
    sys.stdout.flush()
    if args.follow:
        try:
            _follow_logs(record, sources, args.squeue_bin, args.sacct_bin, out=sys.stdout,
                        printer=printer)
        except KeyboardInterrupt:
            sys.stdout.flush()
            return _EXIT_INTERRUPTED
    return _EXIT_OK


def _cmd_exec(args):
    """Run a command inside a running service (Pyxis: its named container) through srun --overlap."""
    environment = _parse_assignments(args.env)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    record = _job_record(args)
    _record_service(record, args.service)
    if record.get("local") == "machine":
        return _exec_local(record, args.service, command, environment, args.workdir,
                           getattr(args, "enroot_bin", "enroot"))
    scheduler = (_local_run_state(record) if record.get("local")
                 else _query_scheduler(record["job_id"], args.squeue_bin, args.sacct_bin))
    target = _exec_target(record, args.service, scheduler,
                          lambda nodelist: _expand_nodelist(nodelist, args.scontrol_bin),
                          args.node, args.index)
    step = None
    if target.runtime != "pyxis":
        # The host and apptainer services are found through their step's task process.
        token = _record_service(record, args.service).get("token")
        step = _service_step(record["job_id"], token, args.squeue_bin)
        if step is None:
            # Without its step there is no process to take the environment and directory from.
            raise HpcComposeError("service '%s' is not running in job %s: Slurm lists no step "
                                  "named hpc-compose:%s (squeue --steps)"
                                  % (args.service, record["job_id"], token))
    tty = sys.stdin.isatty() if args.tty is None else args.tty
    if tty and os.environ.get("TERM") and "TERM" not in dict(environment):
        environment.append(("TERM", os.environ["TERM"]))  # the service has none: a shell needs it
    argv = _exec_srun_argv(target, command, environment, args.workdir, tty, step, args.srun_bin)
    result = _run_command(argv, capture=False)
    code = result.returncode
    return 128 - code if code < 0 else code


def _status_screen(record, args):
    """``(text, ended)`` for status --timeline / --watch: the status text, the timeline below it."""
    import time
    ascii_only = _text_wants_ascii(sys.stdout)
    if record.get("array_tasks") and record.get("array_task") is None:
        status = _array_status(record, args.squeue_bin, args.sacct_bin)
        return _format_array_status_text(status), False
    status = _job_status(record, args.squeue_bin, args.sacct_bin)
    if status["scheduler_warning"]:
        _warn(status["scheduler_warning"])
    text = _format_status_text(status)
    ended = bool(status["scheduler"]["terminal"]) or _runtime_final(
        _load_runtime_state(record["job_dir"]))
    if args.timeline:
        timeline = _build_timeline(_load_timeline_records(record["job_dir"]),
                                   _load_runtime_state(record["job_dir"]),
                                   int(time.time() * 1000))
        if _output_format(args) == "json":
            return _format_json(_timeline_to_dict(timeline)) + "\n", ended
        text += _format_timeline_text(timeline, _TEXT_WIDTH, ascii_only)
    return text, ended


def _stats_screen(record, args):
    """``(text, ended)`` for stats --watch: the stats text and its sparklines."""
    stats = _collect_stats(record, args.sstat_bin, args.squeue_bin, args.sacct_bin)
    charts = _load_job_charts(record, args.sacct_bin)
    return (_format_stats_text(stats) + _format_chart_sparklines(
        charts, _TEXT_WIDTH, _text_wants_ascii(sys.stdout)), bool(stats["scheduler"]["terminal"]))


def _cmd_report(args):
    """Write the job's report page (one HTML file, inline SVG and CSS, no script)."""
    if args.job is not None:
        if args.job_id is not None and args.job_id != args.job:
            raise UsageError("report takes one job: JOB %s and --job-id %s differ"
                             % (args.job, args.job_id))
        args.job_id = args.job
    record = _job_record(args)
    _require_task(record)
    page = _format_report_html(*_collect_report(record, args.squeue_bin, args.sacct_bin))
    if args.output == "-":
        sys.stdout.write(page)
        return _EXIT_OK
    path = args.output or "report-%s.html" % record["job_id"]
    try:
        _write_file_atomic(path, page)
    except OSError as exc:
        raise HpcComposeError("cannot write the report to %s: %s" % (path, exc.strerror or exc),
                              hint="pick a writable place with -o FILE (or -o - for stdout)")
    sys.stdout.write("wrote %s\n" % path)
    return _EXIT_OK


def _cmd_stats(args):
    """Metrics from the sampler files, else live sstat, as text, json, csv or jsonl."""
    record = _job_record(args)
    _require_task(record)
    if args.watch is not None:
        return _watch_screens(args, lambda: _stats_screen(record, args))
    stats = _collect_stats(record, args.sstat_bin, args.squeue_bin, args.sacct_bin)
    if stats["scheduler_warning"]:
        _warn(stats["scheduler_warning"])
    fmt = _output_format(args)
    if fmt == "json":
        _print_json(stats)
    elif fmt == "csv":
        sys.stdout.write(_format_stats_csv(stats))
    elif fmt == "jsonl":
        sys.stdout.write(_format_stats_jsonl(stats))
    else:
        sys.stdout.write(_format_stats_text(stats) + _format_chart_sparklines(
            _load_job_charts(record, args.sacct_bin), _TEXT_WIDTH, _text_wants_ascii(sys.stdout)))
    return _EXIT_OK


def _cmd_artifacts(args):
    """Export the collected payload into x-slurm.artifacts.export_dir (with provenance)."""
    record = _job_record(args)
    _require_task(record)
    template = None
    if not record.get("artifact_export_dir"):
        # An untracked job id: the compose file still says where exports go.
        try:
            spec = load_spec(_resolve_compose_files(args), **_spec_options(args))
            if spec.slurm.artifacts is not None:
                template = spec.slurm.artifacts.export_dir
        except (HpcComposeError, NotImplementedError):
            template = None
    report = _export_artifacts(record, args.bundle, args.tarball, template)
    if _output_format(args) == "json":
        _print_json(report)
        return _EXIT_OK
    print("job %s: collect policy %s, job outcome %s" % (report["job_id"], report["collect_policy"],
                                                         report["job_outcome"]))
    print("manifest: %s" % report["manifest_path"])
    print("export dir: %s" % report["export_dir"])
    for bundle in report["bundles"]:
        print("bundle %s: %d path(s) -> %s" % (bundle["bundle"], len(bundle["exported"]),
                                               bundle["bundle_dir"]))
        for path in bundle["exported"]:
            print("  %s" % os.path.join(bundle["bundle_dir"], path))
        for text in bundle["warnings"]:
            print("  warning: %s" % text)
        if bundle["tarball_path"]:
            print("  tarball: %s" % bundle["tarball_path"])
        print("  provenance: %s" % bundle["provenance_path"])
    return _EXIT_OK


def _cmd_cancel(args):
    """``scancel`` the tracked job; the batch script's teardown writes the final state."""
    record = _job_record(args)
    output = _cancel_job(record["job_id"], args.scancel_bin)
    if output.strip():
        print(output.strip())
    if _load_runtime_state(record["job_dir"]) is None:
        # It never started (state.json comes before any service): no teardown will remove them.
        _remove_secret_copies(record["job_dir"])
    print("cancelled job: %s" % record["job_id"])
    return _EXIT_OK


def _cmd_clean(args):
    """Remove tracked jobs by age or all but the latest; running jobs are always kept."""
    if args.age is not None and args.age < 0:
        raise UsageError("--age must be 0 or more days")
    compose_file = _resolve_compose_file(args)
    project_dir = os.path.dirname(compose_file)
    # What local runs nobody follows left running here goes first (a run tearing down may end).
    leftovers = _local_leftovers(project_dir, _STOP_GRACE_SECONDS + 5.0)
    containers = _stop_local_leftovers(project_dir, leftovers)
    removed, kept = _clean_jobs(project_dir, args.age, args.remove_all,
                               args.squeue_bin, compose_file=compose_file)
    secrets_removed = _remove_leftover_secrets(project_dir, args.squeue_bin)
    if _output_format(args) == "json":
        _print_json({"removed": removed, "kept": kept, "secrets_removed": secrets_removed,
                     "stopped": dict((job_id, [p.pid for p in processes])
                                     for job_id, processes in leftovers.items()),
                     "containers_removed": containers})
        return _EXIT_OK
    for job_id, processes in sorted(leftovers.items()):
        print("stopped what job %s left running: %s" % (
            job_id, ", ".join(_format_run_process(p) for p in processes)))
    for name in containers:
        print("removed the container %s" % name)
    for job_id in secrets_removed:
        print("removed the secret copies left by job %s" % job_id)
    if removed:
        print("removed %d tracked job(s): %s" % (len(removed), ", ".join(removed)))
    else:
        print("no tracked jobs to clean")
    for job_id, why in sorted(kept.items(), key=lambda item: _job_id_order(item[0])):
        print("kept job %s: %s" % (job_id, why))
    return _EXIT_OK


# --- preflight, prepare, cache --------------------------------------------------------------------

def _progress_to_stderr(line):
    """Progress sink for prepare: stderr, so that stdout stays clean for --format json."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _add_preflight_parser(subparsers):
    parser = _add_command(subparsers, "preflight", _cmd_preflight,
                         "check that this node can prepare and submit the spec",
                         ["hpc-compose preflight -f compose.yaml",
                          "hpc-compose preflight --verbose -f compose.yaml",
                          "hpc-compose preflight --strict -f compose.yaml",
                          "hpc-compose preflight -f compose.yaml --enroot-bin /opt/enroot/bin/enroot "
                          "--srun-bin /usr/local/bin/srun --sbatch-bin /usr/local/bin/sbatch"])
    _add_file_argument(parser)
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    parser.add_argument("--verbose", action="store_true", help="also list the checks that passed")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="check as 'submit --skip-prepare' would: cached images must exist")
    parser.add_argument("--local", action="store_true",
                        help="check what 'up --local' needs here (no sbatch; enroot, not Pyxis, "
                             "outside Slurm)")
    _add_tool_arguments(parser, ("enroot", "srun", "sbatch"))
    _add_apptainer_argument(parser)
    _add_format_argument(parser)


def _cmd_preflight(args):
    """Run the login-node checks and print the report; exit 1 on errors (or warnings with --strict)."""
    fmt = _output_format(args)
    _spec, plan = _load_plan_from_args(args)
    runtime_plan = build_runtime_plan(plan)
    report = run_preflight(runtime_plan, PreflightOptions(
        enroot_bin=args.enroot_bin, apptainer_bin=getattr(args, "apptainer_bin", None), srun_bin=args.srun_bin,
        sbatch_bin=args.sbatch_bin,
        skip_prepare=args.skip_prepare, local=_local_mode() if args.local else None,
        script=None if args.local else render_script(runtime_plan)))
    if fmt == "json":
        _print_json(_preflight_report_to_dict(report, plan.compose_file, args.strict))
    else:
        sys.stdout.write(_format_preflight_report(report, verbose=args.verbose))
        if args.strict and report.warnings and not report.errors:
            sys.stdout.write("--strict: warnings count as failures\n")
    return _EXIT_FAILURE if report.failed(args.strict) else _EXIT_OK


def _add_prepare_parser(subparsers):
    parser = _add_command(subparsers, "prepare", _cmd_prepare,
                         "import and prepare images into the shared cache (login node)",
                         ["hpc-compose prepare -f compose.yaml",
                          "hpc-compose prepare --force -f compose.yaml",
                          "hpc-compose prepare --keep-failed-prep -f compose.yaml"])
    _add_file_argument(parser)
    parser.add_argument("--force", action="store_true",
                        help="re-import and rebuild every image even when cached")
    parser.add_argument("--keep-failed-prep", action="store_true",
                        help="keep the Enroot container of a failed prepare step for debugging")
    # --srun-bin/--sbatch-bin are accepted (the manual gives prepare the same override flags as
    # preflight and submit) but prepare itself runs only enroot.
    _add_tool_arguments(parser, ("enroot", "srun", "sbatch"))
    _add_apptainer_argument(parser)
    _add_format_argument(parser)


def _prepare_results_to_dict(runtime_plan, results):
    """The ``--format json`` form of a prepare run."""
    return {"compose_file": runtime_plan.plan.compose_file, "cache_dir": runtime_plan.cache_dir,
            "services": [r._asdict() for r in results]}


def _format_prepare_results(runtime_plan, results):
    """One line per service: what the container starts from and what prepare did."""
    lines = ["cache dir: %s" % runtime_plan.cache_dir]
    for result in results:
        if result.artifact is None:
            lines.append("%s: %s" % (result.service, result.note or "nothing to prepare"))
            continue
        text = "%s: %s %s" % (result.service, result.runtime_action, result.artifact)
        extras = []
        if result.base_action and result.base_action != result.runtime_action:
            extras.append("base %s" % result.base_action)
        if result.note:
            extras.append(result.note)
        if extras:
            text += " (%s)" % "; ".join(extras)
        lines.append(text)
    return "\n".join(lines) + "\n"


def _cmd_prepare(args):
    """Import and prepare the spec's images; a cached image costs nothing."""
    fmt = _output_format(args)
    _spec, plan = _load_plan_from_args(args)
    runtime_plan = build_runtime_plan(plan)
    results = prepare_images(runtime_plan, PrepareOptions(
        enroot_bin=args.enroot_bin, apptainer_bin=args.apptainer_bin, force=args.force,
        keep_failed=args.keep_failed_prep),
        progress=_progress_to_stderr)
    if fmt == "json":
        _print_json(_prepare_results_to_dict(runtime_plan, results))
    else:
        sys.stdout.write(_format_prepare_results(runtime_plan, results))
    return _EXIT_OK


def _add_cache_parser(subparsers):
    parser = _add_command(subparsers, "cache", _cmd_cache, "list, inspect and prune cached images",
                         ["hpc-compose cache list",
                          "hpc-compose cache inspect -f compose.yaml --service app",
                          "hpc-compose cache prune --age 14",
                          "hpc-compose cache prune --all-unused -f compose.yaml"])
    sub = parser.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", parser_class=type(parser))
    listing = _add_command(sub, "list", _cmd_cache_list, "list imported and prepared images",
                          ["hpc-compose cache list", "hpc-compose cache list --cache-dir /shared/me/cache"])
    _add_file_argument(listing)
    listing.add_argument("--cache-dir", metavar="DIR",
                         help="cache to list (default: x-slurm.cache_dir of -f or of the compose "
                              "file in this directory, else $HOME/.cache/hpc-compose)")
    _add_format_argument(listing)
    inspect = _add_command(sub, "inspect", _cmd_cache_inspect,
                          "show per service which image is used and whether it will be rebuilt",
                          ["hpc-compose cache inspect -f compose.yaml",
                           "hpc-compose cache inspect -f compose.yaml --service app"])
    _add_file_argument(inspect)
    inspect.add_argument("--service", metavar="NAME", help="only this service")
    _add_format_argument(inspect)
    prune = _add_command(sub, "prune", _cmd_cache_prune,
                        "remove old or unused cached images (never those of running jobs)",
                        ["hpc-compose cache prune --age 14",
                         "hpc-compose cache prune --all-unused -f compose.yaml"])
    strategy = prune.add_mutually_exclusive_group(required=True)
    strategy.add_argument("--age", type=int, metavar="DAYS",
                          help="remove entries not used for DAYS days (0: everything not in use)")
    strategy.add_argument("--all-unused", action="store_true",
                          help="remove this project's entries that its current plan no longer "
                               "references (needs -f)")
    _add_file_argument(prune)
    prune.add_argument("--cache-dir", metavar="DIR",
                       help="cache to prune with --age (default: as for cache list)")
    _add_format_argument(prune)


def _cmd_cache(args):
    """``cache`` without a subcommand is a usage error."""
    raise UsageError("cache needs a subcommand: list, inspect or prune",
                     hint="run 'hpc-compose cache --help'")


def _cache_dir_from_args(args):
    if getattr(args, "cache_dir", None):
        return os.path.abspath(os.path.expanduser(args.cache_dir))
    # -f, or the compose file found here as every other command finds it, names the cache.
    if getattr(args, "file", None) or os.environ.get("COMPOSE_FILE") or \
            any(os.path.isfile(name) for name in _DEFAULT_COMPOSE_FILES):
        return _load_plan_from_args(args)[1].cache_dir
    return _default_cache_dir()


def _format_timestamp(stamp):
    import time
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _cmd_cache_list(args):
    """List the cache's artifacts with their manifests."""
    fmt = _output_format(args)
    cache_dir = _cache_dir_from_args(args)
    entries = list_cache(cache_dir)
    if fmt == "json":
        _print_json({"cache_dir": cache_dir, "entries": entries})
        return _EXIT_OK
    if not entries:
        sys.stdout.write("no cache entries found in %s\n" % cache_dir)
        return _EXIT_OK
    lines = ["cache dir: %s" % cache_dir]
    for entry in entries:
        lines.append("\t".join([
            entry.get("kind", "?"), entry["artifact_path"], _format_size(entry.get("size_bytes")),
            "services=%s" % ",".join(entry.get("services") or []) if entry["manifest_present"]
            else "manifest=missing",
            "source=%s" % (entry.get("source_image") or "?"),
            "last_used=%s" % _format_timestamp(entry.get("last_used_at") or entry.get("created_at"))]))
    sys.stdout.write("\n".join(lines) + "\n")
    return _EXIT_OK


def _cmd_cache_inspect(args):
    """Per service: which artifact, hit or miss, and why it rebuilds."""
    fmt = _output_format(args)
    _spec, plan = _load_plan_from_args(args)
    runtime_plan = build_runtime_plan(plan)
    reports = inspect_cache(runtime_plan, service=args.service)
    if fmt == "json":
        _print_json({"compose_file": plan.compose_file, "cache_dir": runtime_plan.cache_dir,
                    "services": reports})
        return _EXIT_OK
    lines = ["cache dir: %s" % runtime_plan.cache_dir]
    for entry in reports:
        lines.append("service %s (%s): %s" % (entry["service"], entry["runtime"], entry["expectation"]))
        if entry.get("note"):
            lines.append("  %s" % entry["note"])
        if entry["container_image"]:
            lines.append("  container image: %s" % entry["container_image"])
        if entry.get("local_base"):
            lines.append("  local base image: %s" % entry["local_base"])
        for artifact in entry["artifacts"]:
            lines.append("  %-8s %-10s %s" % (artifact["kind"], artifact["expectation"], artifact["path"]))
            lines.append("           source: %s" % artifact.get("enroot_uri", artifact["source"]))
            if artifact["present"]:
                lines.append("           manifest: %s, built %s, last used %s" % (
                    "yes" if artifact["manifest_present"] else "missing",
                    _format_timestamp(artifact["created_at"]), _format_timestamp(artifact["last_used_at"])))
            for reason in artifact["reasons"]:
                lines.append("           why: %s" % reason)
    sys.stdout.write("\n".join(lines) + "\n")
    return _EXIT_OK


def _cmd_cache_prune(args):
    """Remove old (--age) or this project's unused (--all-unused) cache entries."""
    fmt = _output_format(args)
    if args.age is not None and args.age < 0:
        raise UsageError("--age must be 0 or more days")
    if args.all_unused:
        if not args.file:
            raise UsageError("cache prune --all-unused needs the compose file named explicitly with -f",
                             hint="hpc-compose cache prune --all-unused -f compose.yaml")
        if args.cache_dir:
            raise UsageError("--cache-dir goes with --age; --all-unused prunes the -f file's cache")
        _spec, plan = _load_plan_from_args(args)
        runtime_plan = build_runtime_plan(plan)
        report = prune_cache(runtime_plan.cache_dir, runtime_plan=runtime_plan)
    else:
        report = prune_cache(_cache_dir_from_args(args), age_days=args.age)
    if fmt == "json":
        _print_json(report)
        return _EXIT_OK
    lines = ["cache dir: %s" % report["cache_dir"], "removed: %d" % report["removed_count"]]
    lines += ["pruned: %s" % path for path in report["removed_paths"]]
    lines += ["kept: %s (%s)" % (k["path"], k["reason"]) for k in report["kept_in_use"]]
    sys.stdout.write("\n".join(lines) + "\n")
    return _EXIT_OK


# --- init -----------------------------------------------------------------------------------------

def _add_init_parser(subparsers):
    parser = _add_command(
        subparsers, "init", _cmd_init, "write a starter compose file from a shipped example",
        ["hpc-compose init --list",
         "hpc-compose init --describe-template app-redis-worker",
         "hpc-compose init --template minimal-batch --name my-app "
         "--cache-dir /shared/$USER/hpc-compose-cache --output compose.yaml",
         "hpc-compose init --template host-pipeline --output - | less"])
    parser.add_argument("--template", metavar="NAME",
                        help="the example to start from (see --list)")
    parser.add_argument("--name", metavar="NAME",
                        help="application name: sets top-level name and x-slurm.job_name "
                             "(default: the template name)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                        help="sets x-slurm.cache_dir; must be shared between login and compute "
                             "nodes (default: keep the template's value)")
    parser.add_argument("--output", "-o", metavar="FILE", default=_DEFAULT_INIT_OUTPUT,
                        help="file to write, '-' for standard output (default: %s)"
                             % _DEFAULT_INIT_OUTPUT)
    parser.add_argument("--force", action="store_true",
                        help="overwrite FILE (and the template's companion files) if they exist")
    parser.add_argument("--no-files", dest="with_files", action="store_false",
                        help="write only the compose file, not the files the template mounts "
                             "(worker sources, notes)")
    parser.add_argument("--list", "--list-templates", dest="list_templates", action="store_true",
                        help="list the available templates and exit")
    parser.add_argument("--describe-template", dest="describe_template", metavar="NAME",
                        help="show what a template contains and exit")


def _cmd_init(args):
    """Write a shipped example, customized, as a new compose file (or list/describe templates)."""
    if args.list_templates:
        templates = list_templates()
        width = max(len(t.name) for t in templates)
        for template in templates:
            sys.stdout.write("%-*s  %s\n" % (width, template.name, template.description))
        return _EXIT_OK
    if args.describe_template:
        sys.stdout.write(_format_template(load_template(args.describe_template)))
        return _EXIT_OK
    if not args.template:
        raise UsageError("init needs --template NAME",
                         hint="see the templates with 'hpc-compose init --list'")
    template = load_template(args.template)
    name = args.name if args.name is not None else template.name
    if not name.strip():
        raise UsageError("--name must not be empty")
    if args.cache_dir is not None and not args.cache_dir.strip():
        raise UsageError("--cache-dir must not be empty")
    if args.cache_dir is not None and "$" not in args.cache_dir:
        try:
            _check_cache_dir(resolve_host_path(args.cache_dir, os.getcwd()))
        except _Invalid as exc:
            raise UsageError("--cache-dir: " + exc.message, hint=exc.hint)
    text = customize_template(template.text, name=name, job_name=name, cache_dir=args.cache_dir)
    if args.output == "-":
        sys.stdout.write(text)
        return _EXIT_OK
    output = os.path.abspath(os.path.expanduser(args.output))
    if os.path.isdir(output):
        raise UsageError("'%s' is a directory" % args.output,
                         hint="pass a file name, e.g. --output %s"
                              % os.path.join(args.output, _DEFAULT_INIT_OUTPUT))
    companions = _template_files(template) if args.with_files else {}
    folder = os.path.dirname(output)
    targets = [output] + [os.path.join(folder, *relative.split("/"))
                          for relative in sorted(companions)]
    existing = [path for path in targets if os.path.lexists(path)]
    if existing and not args.force:
        shown = args.output if existing[0] == output else existing[0]
        raise UsageError("'%s' already exists; not overwriting it" % shown,
                         hint="pass --force to replace it, or choose another --output"
                              + (" (or --no-files)" if existing[0] != output else ""))
    _write_file_atomic(output, text, _umask_mode())
    display = shell_quote(args.output)
    lines = ["wrote %s (from template %s)" % (output, template.name)]
    for relative in sorted(companions):
        path = os.path.join(folder, *relative.split("/"))
        _write_file_atomic(path, companions[relative], _umask_mode())
        lines.append("wrote %s" % path)
    try:
        load_spec(output)
    except HpcComposeError as exc:
        # Written as asked, but the next step would fail: say so now, not at validate.
        _warn("hpc-compose validate will refuse %s as it is: %s"
              % (args.output, exc.format().splitlines()[0]))
    assets = _template_assets(template.text)
    if assets and not args.with_files:
        lines.append("this template mounts %s relative to the compose file: create %s, or "
                     "change the volumes" % (", ".join(assets),
                                             "it" if len(assets) == 1 else "them"))
    lines += ["next steps:",
              "  hpc-compose validate -f %s" % display,
              "  hpc-compose inspect --verbose -f %s" % display,
              "  hpc-compose submit --watch -f %s" % display]
    sys.stdout.write("\n".join(lines) + "\n")
    return _EXIT_OK


# --- migrate --------------------------------------------------------------------------------------

_MIGRATE_INPUTS = ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml")


def _add_migrate_parser(subparsers):
    parser = _add_command(
        subparsers, "migrate", _cmd_migrate,
        "rewrite a docker-compose.yml (and its Dockerfiles) as an hpc-compose spec",
        ["hpc-compose migrate                    docker-compose.yml -> compose.yaml",
         "hpc-compose migrate -f app/docker-compose.yml --data-dir /shared/$USER/app-data",
         "hpc-compose migrate -o - | less"])
    parser.add_argument("-f", "--file", dest="file", metavar="FILE",
                        help="the Docker Compose file (default: %s in the current directory)"
                             % " / ".join(_MIGRATE_INPUTS))
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="file to write next to the input, '-' for standard output "
                             "(default: compose.yaml beside the input)")
    parser.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                        default=_MIGRATE_DEFAULT_DATA_DIR,
                        help="where named volumes become folders, relative to the file or "
                             "absolute; on storage the compute nodes see (default: %s)"
                             % _MIGRATE_DEFAULT_DATA_DIR)
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                        help="sets x-slurm.cache_dir (shared by login and compute nodes)")
    parser.add_argument("--runtime", choices=_RUNTIMES, default=_DEFAULT_RUNTIME,
                        help="pyxis (containers, the default) or host (services run on the node)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file")


def _migrate_input(args):
    if args.file:
        return _resolve_compose_file(args)
    for name in _MIGRATE_INPUTS:
        if os.path.isfile(name):
            return os.path.abspath(name)
    raise UsageError("no Docker Compose file found in %s (looked for %s)"
                     % (os.getcwd(), ", ".join(_MIGRATE_INPUTS)), hint="pass one with -f FILE")


def _migrate_validation(text, folder):
    """``None`` when ``text`` validates as a spec in ``folder``, else the error's text."""
    import tempfile
    fd, path = tempfile.mkstemp(dir=folder, prefix=".migrate-check.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        build_plan(load_spec(path))
        return None
    except HpcComposeError as exc:
        return exc.format().replace(path, "<output>")
    finally:
        os.unlink(path)


def _cmd_migrate(args):
    """Write the hpc-compose version of a Docker Compose file, then say what changed."""
    source = _migrate_input(args)
    folder = os.path.dirname(source)
    output = args.output or os.path.join(folder, "compose.yaml")
    if output != "-":
        output = os.path.abspath(os.path.expanduser(output))
        if os.path.dirname(output) != folder:
            raise UsageError("write the migrated file next to %s" % os.path.basename(source),
                             hint="relative paths in it are relative to its folder; use -o %s"
                                  % os.path.join(folder, os.path.basename(output)))
        if output == source:
            raise UsageError("the output would replace the Docker Compose file it is made from",
                             hint="choose another name, e.g. -o hpc-compose.yaml")
        if os.path.lexists(output) and not args.force:
            raise UsageError("'%s' already exists; not overwriting it" % output,
                             hint="pass --force to replace it, or choose another -o")
    if not args.data_dir.strip():
        raise UsageError("--data-dir must not be empty")
    options = MigrateOptions(data_dir=args.data_dir, cache_dir=args.cache_dir,
                             runtime=args.runtime)
    result = migrate_compose(_load_compose_text(source), source, options)
    variables = _build_variables(folder)
    created = []
    for data_dir in result.data_dirs:
        host = resolve_host_path(interpolate(data_dir, variables, path="--data-dir"), folder,
                                 variables)
        if not os.path.isdir(host):
            os.makedirs(host, exist_ok=True)
            created.append(host)
    problem = _migrate_validation(result.text, folder)
    shown = "<stdout>" if output == "-" else output
    if output == "-":
        sys.stdout.write(result.text)
    else:
        # The file may now hold what was kept apart in env files (passwords): owner-only then.
        mode = _umask_mode()
        _write_file_atomic(output, result.text, mode & 0o600 if result.env_files_copied else mode)
    counts = result.counts
    lines = ["migrated %s -> %s" % (source, shown),
             "keys: %d kept, %d changed, %d dropped, %d added; %d note line%s"
             % (counts["kept"], counts["changed"], counts["dropped"], counts["added"],
                len(result.notes), "" if len(result.notes) == 1 else "s")]
    for host in created:
        lines.append("created %s (a named volume's folder: it must be on storage the compute "
                     "nodes see)" % host)
    if result.todos:
        lines.append("%d TODO line%s to resolve:" % (len(result.todos),
                                                     "" if len(result.todos) == 1 else "s"))
        lines += ["  %s:%d: %s" % (shown, number, note) for number, note in result.todos]
    elif problem:
        lines.append("the result does not validate yet:")
        lines += ["  " + line for line in problem.splitlines()]
    else:
        lines.append("the result validates; next: hpc-compose preflight -f %s"
                     % shell_quote(shown))
    stream = sys.stderr if output == "-" else sys.stdout
    stream.write("\n".join(lines) + "\n")
    return _EXIT_OK


def _format_template(template):
    """The text of ``init --describe-template``: description, header notes, an init command."""
    notes = []
    for line in template.text.split("\n")[1:]:
        if not line.startswith("#"):
            break
        notes.append(line[1:].strip() and "  " + line[1:].strip() or "")
    lines = ["template: %s" % template.name, "description: %s" % template.description]
    while notes and not notes[0]:
        notes.pop(0)
    if notes:
        lines += ["", "notes:"] + notes
    assets = _template_assets(template.text)
    if assets:
        lines += ["", "mounts from beside the compose file: %s" % ", ".join(assets),
                  "init also writes their shipped files (unless --no-files):"]
        lines += ["  " + relative for relative in sorted(_template_files(template))]
    lines += ["", "start from it with:",
              "  hpc-compose init --template %s --name my-app "
              "--cache-dir /shared/$USER/hpc-compose-cache --output compose.yaml" % template.name]
    return "\n".join(lines).rstrip("\n") + "\n"


##############################################################################
# main
##############################################################################

def main(argv=None):
    """Run the hpc-compose command line; returns the process exit code."""
    _make_standard_streams_utf8()
    try:
        if argv is None:
            argv = sys.argv[1:]
        # `--version` alone needs no subcommand's parser at all ("" matches none).
        parser = build_parser("" if argv == ["--version"] else _requested_command(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return _EXIT_USAGE
        return args.handler(args)
    except HpcComposeError as exc:
        sys.stderr.write("error: %s\n" % exc.format())
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return _EXIT_INTERRUPTED
    except BrokenPipeError:
        # `hpc-compose logs | head`: the reader left; that is not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return _EXIT_OK
    except OSError as exc:
        # A file system problem no handler foresaw (a full disk, an unwritable --output...): one line.
        where = " (%s)" % exc.filename if getattr(exc, "filename", None) else ""
        sys.stderr.write("error: %s%s\n" % (exc.strerror or exc, where))
        return _EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
