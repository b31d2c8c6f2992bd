#!/usr/bin/env python3
"""What `hpc-compose migrate` achieves on the Compose corpus (tests/migrate_corpus/*/), measured in
one run: for each app, whether its docker-compose.yml validates as it is (the baseline), whether the
migrated file validates, the TODO lines migrate leaves, and the time migrate takes per file against
the time `validate` takes on the result (the ratio says what migrating costs next to loading).
Nothing is asserted: this prints figures.

Usage: python3 tests/bench/bench_migrate.py [--rounds 5]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

import hpc_compose  # noqa: E402

CORPUS = os.path.join(REPO_ROOT, "tests", "migrate_corpus")


def first_problem(path):
    """``None`` when the file validates (spec and plan), else the first line of the error."""
    try:
        hpc_compose.build_plan(hpc_compose.load_spec(path))
        return None
    except hpc_compose.HpcComposeError as exc:
        return exc.render().splitlines()[0].replace(os.path.dirname(path) + os.sep, "")


def best_time(rounds, function, *args):
    best = None
    for _ in range(rounds):
        start = time.perf_counter()
        function(*args)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best


def measure(app, rounds, scratch):
    folder = os.path.join(scratch, app)
    shutil.copytree(os.path.join(CORPUS, app), folder)
    source = os.path.join(folder, "docker-compose.yml")
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    before = first_problem(source)
    result = hpc_compose.migrate_compose(text, source)
    target = os.path.join(folder, "compose.yaml")
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(result.text)
    after = first_problem(target)
    migrate_seconds = best_time(rounds, hpc_compose.migrate_compose, text, source)
    validate_seconds = best_time(rounds, first_problem, target)
    return {"app": app, "before": before, "after": after, "todos": len(result.todos),
            "notes": len(result.notes), "counts": result.counts,
            "migrate": migrate_seconds, "validate": validate_seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    options = parser.parse_args(argv)
    apps = sorted(name for name in os.listdir(CORPUS)
                  if os.path.isfile(os.path.join(CORPUS, name, "docker-compose.yml")))
    scratch = tempfile.mkdtemp(prefix="bench-migrate-")
    try:
        rows = [measure(app, options.rounds, scratch) for app in apps]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    width = max(len(row["app"]) for row in rows)
    print("%-*s  %-7s  %-9s  %5s  %5s  %11s  %12s  %6s" % (
        width, "app", "as-is", "migrated", "TODOs", "notes", "migrate ms", "validate ms",
        "ratio"))
    for row in rows:
        print("%-*s  %-7s  %-9s  %5d  %5d  %11.2f  %12.2f  %6.2f" % (
            width, row["app"], "valid" if row["before"] is None else "invalid",
            "valid" if row["after"] is None else "TODO" if row["todos"] else "invalid",
            row["todos"], row["notes"], row["migrate"] * 1000, row["validate"] * 1000,
            row["migrate"] / row["validate"]))
    total = len(rows)
    valid_before = sum(1 for row in rows if row["before"] is None)
    valid_after = sum(1 for row in rows if row["after"] is None)
    todo_files = [row for row in rows if row["todos"]]
    print()
    print("files: %d; valid as written: %d/%d (%.0f%%); valid after migrate: %d/%d (%.0f%%)"
          % (total, valid_before, total, 100.0 * valid_before / total, valid_after, total,
             100.0 * valid_after / total))
    print("TODO lines left: %d in %d file(s): %s" % (
        sum(row["todos"] for row in rows), len(todo_files),
        ", ".join(row["app"] for row in todo_files) or "none"))
    print("mean migrate time per file: %.2f ms (%.2fx the time validate takes on the result)"
          % (1000 * sum(row["migrate"] for row in rows) / total,
             sum(row["migrate"] for row in rows) / sum(row["validate"] for row in rows)))
    print("first problem as written:")
    for row in rows:
        print("  %-*s  %s" % (width, row["app"], row["before"]))
    not_valid = [row for row in rows if row["after"] is not None]
    if not_valid:
        print("first problem after migrate:")
        for row in not_valid:
            print("  %-*s  %s" % (width, row["app"], row["after"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
