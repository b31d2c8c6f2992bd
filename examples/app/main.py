"""A small application used by examples/dev-python-app.yaml.

It stands in for your own code: it reads its settings from the environment, does a little work,
and records a result in the per-job directory that every service shares.
"""
import argparse
import json
import os
import platform
import time

from rich.console import Console


def main():
    parser = argparse.ArgumentParser(description="dev-python-app demo")
    parser.add_argument("--items", type=int, default=3, help="how many work items to process")
    args = parser.parse_args()

    console = Console()
    console.print("[bold]dev-python-app[/bold] on %s (APP_ENV=%s)"
                  % (platform.node(), os.environ.get("APP_ENV", "unset")))
    results = []
    for index in range(args.items):
        started = time.time()
        value = sum(i * i for i in range(200000 + index))
        results.append({"item": index, "value": value, "seconds": round(time.time() - started, 3)})
        console.print("item %d done" % index)

    # /hpc-compose/job is the per-job directory, mounted into every container.
    job_dir = os.environ.get("HPC_COMPOSE_JOB_DIR", ".")
    path = os.path.join(job_dir, "dev-python-app-result.json")
    with open(path, "w") as handle:
        json.dump({"results": results}, handle, indent=2)
    console.print("wrote %s" % path)


if __name__ == "__main__":
    main()
