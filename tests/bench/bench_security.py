#!/usr/bin/env python3
"""How fast hostile or huge input is refused (issue 27): seconds for each case, best of ROUNDS.

The cases are the issue's: `validate` of 8,000 services that each have an unknown key (main took
20 s: error collection was quadratic), of 4,000 services that each depend on an unknown service
(29 s: a suggestion compared every name with every other), `${U:-${U:-...}}` nested 1,000 deep (a
RecursionError traceback), and `render` of a 1 MB anchored string used by 1,500 aliases (a
1.5 GB script in 26 s and 4.4 GB of memory; now an error naming the biggest values). Each case runs
in-process through `main()`, with its output discarded; the exit code is printed with the time.
Nothing is asserted: this prints figures (the issue asks for the 8,000-service case under 5 s).

Usage: python3 tests/bench/bench_security.py [--rounds 3]
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

import hpc_compose  # noqa: E402

HEAD = "x-slurm: {runtime: host}\nservices:\n"


def unknown_keys(count):
    return HEAD + "".join("  s%d:\n    command: [x]\n    bogus: 1\n" % i for i in range(count))


def unknown_dependencies(count):
    return HEAD + "".join("  s%d:\n    command: [x]\n    depends_on: [gone%d]\n" % (i, i)
                          for i in range(count))


def deep_interpolation(depth):
    return HEAD + "  app:\n    command: [\"%s\"]\n" % ("${U:-" * depth + "x" + "}" * depth)


def alias_bomb(aliases):
    lines = ["  app:", "    command: [x]", "    environment:",
             "      A0: &big \"%s\"" % ("x" * 1000000)]
    lines += ["      A%d: *big" % index for index in range(1, aliases)]
    return HEAD + "\n".join(lines) + "\n"


CASES = (
    ("validate: 8,000 services with an unknown key", "validate", lambda: unknown_keys(8000)),
    ("validate: 4,000 unknown depends_on", "validate", lambda: unknown_dependencies(4000)),
    ("validate: ${U:-...} nested 1,000 deep", "validate", lambda: deep_interpolation(1000)),
    ("render: 1 MB anchor used by 1,500 aliases", "render", lambda: alias_bomb(1500)),
)


def run(command, path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        return hpc_compose.main([command, "-f", path])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-security-")
    print("%-45s %10s %6s" % ("case", "seconds", "exit"))
    for title, command, make in CASES:
        path = os.path.join(folder, "compose.yaml")
        with open(path, "w") as handle:
            handle.write(make())
        best, code = None, None
        for _ in range(args.rounds):
            start = time.perf_counter()
            code = run(command, path)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        print("%-45s %10.2f %6d" % (title, best, code))
        os.unlink(path)
    os.rmdir(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
