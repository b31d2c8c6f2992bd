#!/usr/bin/env python3
"""Start-up benchmark: `validate` and `inspect` of the shipped examples against a bare interpreter.

Prints, for each way of running the tool, the median wall-clock time of a command and its ratio to
`python -c pass` measured in the same run (the aim in issue 2 is a ratio within about 2.5x):

  script        python hpc_compose.py COMMAND           (source compiled at every run)
  import        python hpc-compose COMMAND               (launcher importing the module: bytecode
                                                          cached in __pycache__ after the first run)
  pyz           python dist/hpc-compose.pyz COMMAND       (precompiled bytecode for this Python)
  pyz-source    the same archive without bytecode         (zipimport compiles the source each run)

Nothing is asserted: these are figures to read. Usage:
  python3 tests/bench/bench_startup.py [--repeat N] [--examples a,b] [--python PATH]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_pyz(dist, pythons):
    """Build the archive into ``dist`` with bytecode for ``pythons`` (empty: source only)."""
    subprocess.run(["make", "-s", "-f", "zipapp.mk", "DIST=" + dist, "PYTHONS=" + " ".join(pythons)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(dist, "hpc-compose.pyz")


def time_once(argv, env):
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit("command failed (%d): %s\n%s" % (result.returncode, " ".join(argv),
                                                          result.stderr.decode()[-2000:]))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (median kept)")
    parser.add_argument("--examples", default="", help="comma-separated names (default: all)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to measure (default: this one, not a pyenv shim)")
    parser.add_argument("--no-site", action="store_true",
                        help="run every command (the baseline too) with python -S, so that .pth "
                             "files installed in site-packages do not weigh on the baseline")
    args = parser.parse_args()

    python = os.path.realpath(args.python)
    flags = ["-S"] if args.no_site else []
    examples = sorted(name[:-5] for name in os.listdir(os.path.join(REPO, "examples"))
                      if name.endswith(".yaml"))
    if args.examples:
        examples = [name for name in args.examples.split(",") if name]
    env = dict(os.environ)
    env.setdefault("USER", "bench")
    env["PYTHONDONTWRITEBYTECODE"] = ""
    env.pop("PYTHONDONTWRITEBYTECODE")

    scratch = tempfile.mkdtemp(prefix="hpc-compose-bench-")
    try:
        launcher = os.path.join(scratch, "hpc-compose")
        with open(launcher, "w") as handle:
            handle.write("import sys\nsys.path.insert(0, %r)\nimport hpc_compose\n"
                         "sys.exit(hpc_compose.main())\n" % REPO)
        pyz = build_pyz(os.path.join(scratch, "with-bytecode"), [python])
        pyz_source = build_pyz(os.path.join(scratch, "source-only"), [])
        variants = [
            ("script", [python] + flags + [os.path.join(REPO, "hpc_compose.py")]),
            ("import", [python] + flags + [launcher]),
            ("pyz", [python] + flags + [pyz]),
            ("pyz-source", [python] + flags + [pyz_source]),
        ]
        # Warm the file cache and __pycache__ before measuring anything.
        for _, prefix in variants:
            time_once(prefix + ["--version"], env)

        baseline = []
        samples = {}
        for _ in range(args.repeat):
            baseline.append(time_once([python] + flags + ["-c", "pass"], env))
            for command in ("validate", "inspect"):
                for name in examples:
                    path = os.path.join("examples", name + ".yaml")
                    for label, prefix in variants:
                        seconds = time_once(prefix + [command, "-f", path], env)
                        samples.setdefault((command, label), []).append(seconds)
            baseline.append(time_once([python] + flags + ["-c", "pass"], env))

        base = statistics.median(baseline)
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        print("start-up benchmark: Python %s (%s%s), %d examples x %d runs"
              % (version, python, " -S" if flags else "", len(examples), args.repeat))
        print("bare `python%s -c pass`: %.1f ms (median)" % (" -S" if flags else "", base * 1000))
        print("%-9s %-11s %10s %10s %8s" % ("command", "how", "median ms", "p90 ms", "ratio"))
        for (command, label), values in sorted(samples.items(),
                                               key=lambda item: (item[0][0], [v[0] for v in variants].index(item[0][1]))):
            values = sorted(values)
            median = statistics.median(values)
            p90 = values[int(0.9 * (len(values) - 1))]
            print("%-9s %-11s %10.1f %10.1f %7.2fx" % (command, label, median * 1000, p90 * 1000,
                                                      median / base))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
