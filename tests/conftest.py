"""Shared pytest fixtures: the module under test, an in-process CLI runner, temporary projects.

Under CI (CI=true) a skipped test is turned into a failure: CI must run everything.
"""
import io
import os
import sys
import contextlib

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import hpc_compose  # noqa: E402

from slurm_support import *  # noqa: E402,F401,F403  (fixtures for the real test cluster)


@pytest.fixture
def hc():
    """The hpc_compose module."""
    return hpc_compose


class CliResult(object):
    def __init__(self, code, out, err):
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self):
        return "CliResult(code=%r, out=%r, err=%r)" % (self.code, self.out[-2000:], self.err[-2000:])


def run_cli(args, cwd=None, env=None):
    """Run ``hpc_compose.main(args)`` in-process; returns CliResult(code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    old_env = dict(os.environ)
    try:
        if cwd:
            os.chdir(cwd)
        if env:
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = hpc_compose.main([str(a) for a in args])
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """Call as ``cli([...args], cwd=..., env=...)``."""
    return run_cli


@pytest.fixture
def project(tmp_path):
    """A temporary project folder; ``project.write(name, text)`` creates files in it."""
    class Project(object):
        root = tmp_path

        def write(self, name, text):
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path

    return Project()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = "skipped under CI=true, which counts as a failure: %s" % reason


def pytest_configure(config):
    # A shell run in the background starts its children with SIGINT ignored, and that is inherited
    # through exec: the tests of Ctrl-C handling would then fail for a reason that is not the
    # product's. A handled signal is reset to its default in children, so handling it here fixes it.
    import signal
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter):
    # Shown under -q too: which Slurm and Python the end-to-end tests ran on, so that a run meant for
    # one Slurm generation cannot pass on another one unnoticed.
    version = slurm_under_test()  # noqa: F405  (from slurm_support)
    if version is not None:
        import shutil
        terminalreporter.write_line("end-to-end tests ran on %s (%s, cluster generation asked: %s), "
                                    "python %s (%s)" % (
                                        version, shutil.which("sinfo"),
                                        expected_slurm_generation() or "any",  # noqa: F405
                                        ".".join(map(str, sys.version_info[:3])), sys.executable))
