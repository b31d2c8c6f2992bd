"""Safe on a shared cluster (issue 27): #SBATCH values as sbatch itself reads them, no symlink
games under .hpc-compose or in the cache, no secret in any output, bounded input, migrate and
artifact paths that stay inside, and modes that follow the umask.

Each reproduction of the issue is one test here; the real sbatch reads the same adversarial
values in test_security_e2e.py.
"""
import os
import stat

import pytest

import hpc_compose as hc


# --- #SBATCH lines as sbatch reads them ----------------------------------------------------------

class SbatchFatal(Exception):
    """What sbatch refuses the script with (an unmatched quote, a leading ':')."""


def sbatch_directive_arguments(script):
    """The arguments sbatch takes from ``script``'s #SBATCH lines: a port of src/sbatch/opt.c
    (_opt_batch_script, _get_argument). A backslash escapes the next character even inside
    quotes, quotes group, an unquoted '#' ends the line, and a line holding "hetjob" or
    "packjob" starts another heterogeneous-job component (reported here as an error)."""
    arguments = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            stripped = line.lstrip()
            if stripped and not stripped.startswith("#"):
                break            # the first command ends the directives
            continue
        if "hetjob" in line.lower() or "packjob" in line.lower():
            raise SbatchFatal("a heterogeneous-job separator: %r" % line)
        rest = line[len("#SBATCH"):]
        pos = 0
        while True:
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
            if pos < len(rest) and rest[pos] == ":":
                raise SbatchFatal("Unexpected ':' in %r" % line)
            argument, quote, escape = [], None, False
            while pos < len(rest) and (quote or not rest[pos].isspace()):
                char = rest[pos]
                if escape:
                    escape = False
                elif char == "\\":
                    escape = True
                    pos += 1
                    continue
                elif quote:
                    if char == quote:
                        quote = None
                        pos += 1
                        continue
                elif char in "\"'":
                    quote = char
                    pos += 1
                    continue
                elif char == "#":
                    break
                argument.append(char)
                pos += 1
            if quote:
                raise SbatchFatal("Unmatched %s in %r" % (quote, line))
            if not argument:
                break
            arguments.append("".join(argument))
    return arguments


def test_the_splitter_port_reads_what_the_issue_reproduced_with_the_real_sbatch():
    # main 020458e rendered this line for job_name "run-${RUN_NAME}" and the .env line below; the
    # real sbatch took --comment and --output from it.
    line = "#SBATCH --job-name='run-x\\'\"'\"'\" --comment=injected --output=/dev/null #'"
    assert sbatch_directive_arguments(line + "\nset -eu\n") == [
        "--job-name=run-x'\"'", "--comment=injected", "--output=/dev/null"]


ADVERSARIAL = (
    "x\\'\" --comment=injected --output=/dev/null #",
    "x' --comment=injected '",
    "ends-with\\",
    "a b --export=ALL,BASH_ENV=/tmp/evil",
    "it's",
    "\"dq\"",
    "#not-a-comment",
    "tab\there",
    "$(id) `id`",
    "my-hetjob",
    "PackJob",
    ":colon",
)
SBATCH_FIELDS = ("job_name", "partition", "account", "qos", "time", "mem", "gres", "constraint",
                 "output", "error", "chdir")


def _render_with(tmp_path, cli, slurm_lines, top="", env=None):
    (tmp_path / "compose.yaml").write_text(
        "%sx-slurm:\n  runtime: host\n%sservices:\n  app:\n    command: [sleep, '1']\n"
        % (top, slurm_lines))
    return cli(["render", "-f", tmp_path / "compose.yaml"], env=env)


@pytest.mark.parametrize("field", SBATCH_FIELDS + ("name",))
def test_every_sbatch_field_reaches_sbatch_as_exactly_its_value_or_is_refused(tmp_path, cli, field):
    for value in ADVERSARIAL:
        if field == "name":
            result = _render_with(tmp_path, cli, "", top="name: \"${V}\"\n", env={"V": value})
        else:
            result = _render_with(tmp_path, cli, "  %s: \"${V}\"\n" % field, env={"V": value})
        if result.code != 0:
            assert result.code == 2, result
            assert "compose.yaml:" in result.err and \
                ("x-slurm.%s" % field if field != "name" else "name:") in result.err, result
            assert value not in result.err
            continue
        flag = {"name": "job-name", "job_name": "job-name"}.get(field, field)
        arguments = sbatch_directive_arguments(result.out)
        assert "--%s=%s" % (flag, value) in arguments, (value, arguments)
        assert not any(arg.startswith("--comment") or arg.startswith("--export")
                       for arg in arguments), (value, arguments)
        assert len(arguments) == 2 + (field != "name" and field != "job_name"), arguments


def test_a_backslash_in_an_sbatch_field_is_refused_at_validate_with_line_and_key(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  job_name: \"run-${RUN_NAME}\"\n"
        "services:\n  app:\n    command: [sleep, '1']\n")
    (tmp_path / ".env").write_text("RUN_NAME=x\\'\" --comment=injected --output=/dev/null #\n")
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2
    assert "compose.yaml:3:13: x-slurm.job_name: the value contains a backslash" in result.err
    assert "--comment" not in result.err


def test_submit_args_entries_are_one_argument_each_or_refused(tmp_path, cli):
    for value in ADVERSARIAL + ("--comment=a b",):
        result = _render_with(tmp_path, cli, "  submit_args: [\"--comment=${V}\"]\n",
                              env={"V": value})
        if result.code != 0:
            assert "x-slurm.submit_args[0]" in result.err, result
            continue
        arguments = sbatch_directive_arguments(result.out)
        assert arguments[-1] == "--comment=" + value and len(arguments) == 3, arguments
    result = _render_with(tmp_path, cli, "  submit_args: [--mail-type=END, --begin=now+3600]\n")
    assert sbatch_directive_arguments(result.out)[-2:] == ["--mail-type=END", "--begin=now+3600"]


def test_run_name_is_refused_when_sbatch_would_read_it_specially(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\nservices:\n  app:\n    command: [sleep, '1']\n")
    result = cli(["run", "-f", tmp_path / "compose.yaml", "--name", "x\\' --comment=y", "--dry-run",
                  "app"])
    assert result.code == 2 and "--name: the value contains a backslash" in result.err, result


# --- files on shared storage ---------------------------------------------------------------------

def test_the_cache_write_probe_never_writes_through_a_planted_link(tmp_path):
    # Reproduction 2: another member of a group-writable cache plants links for the coming pids.
    cache, victim = tmp_path / "cache", tmp_path / "victim.txt"
    cache.mkdir()
    victim.write_text("precious\n")
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        os.symlink(str(victim), str(cache / (".hpc-compose-write-probe-%d" % pid)))
    finding = hc._preflight_writable(str(cache))
    assert finding.level == "ok", finding
    assert victim.read_text() == "precious\n"
    assert sorted(os.listdir(str(cache))) == sorted(
        ".hpc-compose-write-probe-%d" % pid for pid in range(os.getpid() - 2, os.getpid() + 3))


def test_the_fixed_enroot_temp_folder_is_refused_when_it_is_not_ours(tmp_path, monkeypatch):
    # Reproduction 3: a folder someone else made at the predictable name was used as it was.
    import tempfile
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    fixed = tmp_path / ("hpc-compose-enroot-%d" % os.getuid())
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir(mode=0o777)
    os.symlink(str(elsewhere), str(fixed))
    with pytest.raises(hc.HpcComposeError, match="is a symbolic link"):
        hc._enroot_environment(str(tmp_path / "cache"), environ={})
    os.unlink(str(fixed))
    if os.getuid() == 0:
        fixed.mkdir()
        os.chown(str(fixed), 4242, 4242)
        with pytest.raises(hc.HpcComposeError, match="belongs to another user"):
            hc._enroot_environment(str(tmp_path / "cache"), environ={})
        fixed.rmdir()
    fixed.mkdir(mode=0o755)
    os.chmod(str(fixed), 0o755)
    env = hc._enroot_environment(str(tmp_path / "cache"), environ={})
    assert env["ENROOT_TEMP_PATH"] == str(fixed)
    assert stat.S_IMODE(os.lstat(str(fixed)).st_mode) == 0o700


def test_a_planted_hpc_compose_link_is_refused_and_the_folder_it_names_keeps_its_mode(tmp_path):
    # Reproduction 4: <project>/.hpc-compose -> the victim's home; share_with_group made it 0750.
    project, victim = tmp_path / "project", tmp_path / "victim-home"
    project.mkdir()
    victim.mkdir(mode=0o700)
    os.chmod(str(victim), 0o700)
    os.symlink(str(victim), str(project / ".hpc-compose"))
    with pytest.raises(hc.HpcComposeError) as caught:
        hc._make_private_dir(str(project / ".hpc-compose"), 0o750)
    assert "refusing %s: it is a symbolic link" % (project / ".hpc-compose") in caught.value.format()
    with pytest.raises(hc.HpcComposeError, match="is a symbolic link"):
        hc._record_job(str(project), {"job_id": "12"})
    assert stat.S_IMODE(os.stat(str(victim)).st_mode) == 0o700
    assert os.listdir(str(victim)) == []


def test_a_link_planted_below_hpc_compose_is_refused_too(tmp_path):
    project, victim = tmp_path / "project", tmp_path / "victim"
    (project / ".hpc-compose").mkdir(parents=True)
    victim.mkdir()
    os.symlink(str(victim), str(project / ".hpc-compose" / "jobs"))
    with pytest.raises(hc.HpcComposeError, match="jobs: it is a symbolic link"):
        hc._record_job(str(project), {"job_id": "12"})
    assert os.listdir(str(victim)) == []


def test_private_folders_are_created_with_their_mode_and_a_folder_of_ours_gets_it(tmp_path):
    root = tmp_path / ".hpc-compose"
    hc._make_private_dir(str(root / "12" / "secrets"))
    assert [stat.S_IMODE(os.stat(str(path)).st_mode) for path in
            (root, root / "12", root / "12" / "secrets")] == [0o700, 0o700, 0o700]
    hc._make_private_dir(str(root), 0o750)
    assert stat.S_IMODE(os.stat(str(root)).st_mode) == 0o750


def test_the_jobs_lock_and_the_appended_locks_never_create_through_a_planted_link(tmp_path):
    project = tmp_path / "project"
    jobs = project / ".hpc-compose" / "jobs"
    jobs.mkdir(parents=True, mode=0o700)
    target = tmp_path / "created-through-the-link"
    os.symlink(str(target), str(jobs / ".lock"))
    with pytest.raises(hc.HpcComposeError, match="is a symbolic link"):
        hc._record_job(str(project), {"job_id": "12"})
    with pytest.raises(hc.HpcComposeError, match="is a symbolic link"):
        with hc._FileLock(str(jobs / ".lock")):
            pass
    with pytest.raises(hc.HpcComposeError, match="is a symbolic link"):
        hc._try_lock(str(jobs / ".lock"))
    assert not target.exists()


# --- secrets in output ---------------------------------------------------------------------------

SECRET_SPEC = """\
x-slurm: {runtime: host}
secrets:
  pin:
    environment: PIN
services:
  app:
    command: [sleep, "1"]
    env_file: app.env
    secrets: [pin]
"""


@pytest.mark.parametrize("command", (["config"], ["inspect"], ["render"], ["config", "--format",
                                                                         "json"]))
def test_a_short_secret_interpolated_through_an_env_file_never_reaches_the_output(
        tmp_path, cli, command):
    # Reproduction 5: `A=${PIN}` in an env_file printed the 4-character PIN and wrote it in the script.
    (tmp_path / "compose.yaml").write_text(SECRET_SPEC)
    (tmp_path / "app.env").write_text("A=x${PIN}\n")
    (tmp_path / ".env").write_text("PIN=4821\n")
    result = cli(command[:1] + ["-f", tmp_path / "compose.yaml"] + command[1:])
    assert result.code == 2, result
    assert "holds the value of secret 'pin'" in result.err
    assert "4821" not in result.out + result.err


@pytest.mark.parametrize("fmt", ("text", "json"))
def test_a_dotenv_line_that_does_not_parse_is_named_by_number_not_shown(tmp_path, cli, fmt):
    (tmp_path / "compose.yaml").write_text(SECRET_SPEC)
    (tmp_path / "app.env").write_text("A=1\n")
    (tmp_path / ".env").write_text("PIN=4821\nKEY=-----BEGIN PRIVATE KEY-----\n"
                                   "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC+/==\n-----END PRIVATE KEY-----\n")
    result = cli(["validate", "-f", tmp_path / "compose.yaml", "--format", fmt])
    assert result.code == 2, result
    assert ".env line 3 does not start with a valid variable name" in result.out + result.err
    assert "MIIEv" not in result.out + result.err and "PRIVATE" not in result.out + result.err
    (tmp_path / ".env").write_text("PIN=4821\n-----END PRIVATE KEY-----\n")
    result = cli(["validate", "-f", tmp_path / "compose.yaml", "--format", fmt])
    assert ".env line 2 is not KEY=VALUE" in result.out + result.err
    assert "PRIVATE" not in result.out + result.err


# --- bounds --------------------------------------------------------------------------------------

def test_interpolation_nested_a_thousand_deep_is_an_error_not_a_traceback(tmp_path, cli):
    # Reproduction 6a: a RecursionError traceback on main.
    (tmp_path / "compose.yaml").write_text(
        "x-slurm: {runtime: host}\nservices:\n  app:\n    command: [\"%s\"]\n"
        % ("${U:-" * 1000 + "x" + "}" * 1000))
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2, result
    assert "services.app.command[0]: variable expressions are nested more than 32 deep" in \
        result.err
    assert "Traceback" not in result.err


def test_a_value_expanded_past_4_mb_is_refused(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm: {runtime: host}\nservices:\n  app:\n    command: [\"%s\"]\n" % ("$BIG" * 8))
    result = cli(["validate", "-f", tmp_path / "compose.yaml"], env={"BIG": "x" * (1 << 20)})
    assert result.code == 2 and "grows past 4194304 bytes" in result.err, result


def test_thousands_of_errors_are_reported_sorted_and_capped(tmp_path, cli):
    # Reproduction 6b: 8,000 services with an unknown key took 20 s (bench_security.py times it).
    (tmp_path / "compose.yaml").write_text(
        "x-slurm: {runtime: host}\nservices:\n" + "".join(
            "  s%d:\n    command: [x]\n    bogus: 1\n" % index for index in range(3000)))
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2
    lines = result.err.splitlines()
    located = [line for line in lines if "unknown key 'bogus'" in line]
    assert len(located) == hc._MAX_REPORTED_ERRORS
    assert [int(line.split(":")[2]) for line in located] == \
        sorted(int(line.split(":")[2]) for line in located)
    assert "and %d more" % (3000 - hc._MAX_REPORTED_ERRORS) in lines
    assert lines[-1] == "3000 errors in %s" % (tmp_path / "compose.yaml")
    result = cli(["validate", "-f", tmp_path / "compose.yaml", "--format", "json"])
    assert '"error_count": 3000' in result.out


def test_unknown_depends_on_by_the_thousand_keep_a_short_hint(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(
        "x-slurm: {runtime: host}\nservices:\n" + "".join(
            "  s%d:\n    command: [x]\n    depends_on: [gone%d]\n" % (index, index)
            for index in range(2000)))
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2 and "and 1900 more" in result.err
    assert max(len(line) for line in result.err.splitlines()) < 2000


def test_an_anchored_megabyte_used_by_many_aliases_is_refused_before_rendering(tmp_path, cli):
    # Reproduction 6c: main rendered a 1.5 GB script in 26 s and 4.4 GB of memory.
    lines = ["x-slurm: {runtime: host}", "services:", "  app:", "    command: [x]",
             "    environment:", "      A0: &big \"%s\"" % ("x" * 1000000)]
    lines += ["      A%d: *big" % index for index in range(1, 1500)]
    (tmp_path / "compose.yaml").write_text("\n".join(lines) + "\n")
    result = cli(["render", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2 and result.out == "", result.err[:300]
    assert "larger than 4194304 bytes, which Slurm refuses by default" in result.err
    assert "services.app.environment.A" in result.err and "(1000000 characters)" in result.err


# --- paths that stay inside, modes that follow the umask -----------------------------------------

def test_migrate_renames_a_named_volume_that_would_climb_out_of_the_project(tmp_path, cli):
    # Reproduction 7: a folder was created outside the project at migrate time, and bound.
    project = tmp_path / "deep" / "project"
    project.mkdir(parents=True)
    (project / "docker-compose.yml").write_text(
        "services:\n  app:\n    image: alpine\n    volumes:\n      - \"a/../../escaped:/data\"\n"
        "volumes:\n  a/../../escaped: {}\n")
    result = cli(["migrate", "-f", project / "docker-compose.yml"])
    assert result.code == 0, result
    assert not (tmp_path / "deep" / "escaped").exists() and not (project / "escaped").exists()
    assert sorted(os.listdir(str(project / "data"))) == ["volume-a-..-..-escaped"]
    assert "- ./data/volume-a-..-..-escaped:/data" in (project / "compose.yaml").read_text()


@pytest.mark.parametrize("pattern", ("/hpc-compose/job/.[.]/.[.]/outside/*",
                                     "/hpc-compose/job/logs/../../outside/x",
                                     "/hpc-compose/job/.*", "/hpc-compose/job/./x",
                                     "/hpc-compose/job/[.][.]/x", "/hpc-compose/job/.?/x"))
def test_artifact_paths_with_a_dot_component_are_refused_at_validate(tmp_path, cli, pattern):
    # Reproduction 8: `.[.]` passed normpath; bash <= 5.1 matches it with '..'.
    (tmp_path / "compose.yaml").write_text(
        "x-slurm:\n  runtime: host\n  artifacts:\n    export_dir: ./out\n    paths:\n"
        "      - \"%s\"\nservices:\n  app:\n    command: [x]\n" % pattern)
    result = cli(["validate", "-f", tmp_path / "compose.yaml"])
    assert result.code == 2, result
    assert "compose.yaml:6:9: x-slurm.artifacts.paths[0]: artifact path" in result.err
    assert "which is or may match '.' or '..'" in result.err


def test_dot_files_and_globstar_stay_valid_artifact_paths(hc=hc):
    assert hc._normalize_artifact_path("/hpc-compose/job/.cache/*") == "/hpc-compose/job/.cache/*"
    assert hc._normalize_artifact_path("/hpc-compose/job/**/*.pt") == "/hpc-compose/job/**/*.pt"


def _with_umask(umask, function):
    old = os.umask(umask)
    try:
        return function()
    finally:
        os.umask(old)


def test_init_and_migrate_write_with_the_users_umask(tmp_path, cli):
    # Reproduction 9a: init wrote 0644 under umask 077.
    result = _with_umask(0o077, lambda: cli(["init", "--template", "minimal-batch", "--output",
                                              tmp_path / "compose.yaml"]))
    assert result.code == 0, result
    assert stat.S_IMODE(os.stat(str(tmp_path / "compose.yaml")).st_mode) == 0o600
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "docker-compose.yml").write_text("services:\n  app:\n    image: alpine\n")
    os.chmod(str(tmp_path / "m" / "docker-compose.yml"), 0o644)
    result = _with_umask(0o027, lambda: cli(["migrate", "-f", tmp_path / "m" / "docker-compose.yml"]))
    assert result.code == 0, result
    assert stat.S_IMODE(os.stat(str(tmp_path / "m" / "compose.yaml")).st_mode) == 0o640


def test_render_output_folders_are_never_writable_by_others(tmp_path, cli):
    # Reproduction 9b: the folders render -o created followed a 000 umask (0777).
    (tmp_path / "compose.yaml").write_text(
        "x-slurm: {runtime: host}\nservices:\n  app:\n    command: [x]\n")
    script = tmp_path / "out" / "a" / "job.sbatch"
    result = _with_umask(0, lambda: cli(["render", "-f", tmp_path / "compose.yaml", "-o", script]))
    assert result.code == 0, result
    assert [stat.S_IMODE(os.stat(str(path)).st_mode) for path in
            (tmp_path / "out", tmp_path / "out" / "a", script)] == [0o755, 0o755, 0o600]


def test_an_atomic_write_to_a_device_or_fifo_writes_through_and_never_replaces_it(tmp_path):
    # `render -o /dev/null` run as root once replaced /dev/null with a private regular file: a
    # rename onto a device replaces the device. Such paths are written through.
    import threading
    hc._write_file_atomic("/dev/null", "discarded\n", 0o600)
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    hc._write_file_atomic(fifo, b"through the pipe\n")
    reader.join(10)
    assert received == [b"through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
