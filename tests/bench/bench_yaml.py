#!/usr/bin/env python3
"""Speed of hpc_compose.parse_yaml against PyYAML's pure-Python SafeLoader, measured in one run.

The corpus: the YAML test corpus (tests/yaml_corpus/*.yaml), the shipped examples
(examples/*.yaml) and a few generated compose files of the size large projects reach (many
services, anchors and merge keys, block scalars, flow lists, comments). Each reader parses the
whole corpus REPEAT times, best of ROUNDS rounds; the figures are the seconds per corpus pass and
their ratio. Nothing is asserted: this prints figures.

PyYAML is needed only here (`python3 -m pip install pyyaml`); without it the benchmark says so and
exits 0. `yaml.SafeLoader` is PyYAML's pure-Python loader (the libyaml-based CSafeLoader is printed
for information when it is available, but it is not the comparison the issue asks for).

Usage: python3 tests/bench/bench_yaml.py [--repeat 5] [--rounds 5]
"""
import argparse
import glob
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

import hpc_compose  # noqa: E402

SERVICE_TEMPLATE = """\
  {name}:
    <<: *defaults
    image: registry.example.com/team/{name}:1.{index}.0
    command: ["python", "-m", "app.{name}", "--port", "{port}", "--workers", "4"]
    environment:
      <<: *common-env
      SERVICE_NAME: {name}
      SERVICE_PORT: "{port}"
      FEATURE_FLAG: {flag}
      TIMEOUT: 00:10:00
    depends_on:
      {dependency}:
        condition: service_healthy
    readiness:
      type: http
      url: http://127.0.0.1:{port}/health   # probe the health endpoint
      timeout_seconds: 120
    volumes:
      - ./data/{name}:/data
      - /shared/$USER/cache:/cache:ro
    x-slurm:
      cpus_per_task: {cpus}
      failure_policy:
        mode: restart_on_failure
        max_restarts: 3
        backoff_seconds: 10
    x-enroot:
      prepare:
        commands:
          - pip install --no-cache-dir "{name}-client>=1.{index},<2"
          - |
            set -eu
            echo "prepared {name}" > /etc/prepared-{name}
            python -c 'import sys; print(sys.version)'
"""

HEADER = """\
# Generated benchmark compose file with {count} services.
name: generated-{count}

x-common-env: &common-env
  PYTHONUNBUFFERED: "1"
  LOG_LEVEL: info
  OMP_NUM_THREADS: 4

x-defaults: &defaults
  working_dir: /workspace
  x-slurm: {{cpus_per_task: 2, mem: 4G}}

x-slurm:
  job_name: generated-{count}
  time: "02:00:00"
  nodes: 1
  cpus_per_task: 64
  mem: 256G
  cache_dir: /shared/$USER/hpc-compose-cache
  setup:
    - module load python/3.11
    - export HF_HOME=/shared/$USER/hf

services:
  base:
    image: redis:7
    command: redis-server --bind 127.0.0.1 --save "" --appendonly no
    readiness: {{type: tcp, host: 127.0.0.1, port: 6379}}
"""


def generated_compose(count):
    """A compose file with ``count`` services built from SERVICE_TEMPLATE."""
    parts = [HEADER.format(count=count)]
    for index in range(count):
        parts.append(SERVICE_TEMPLATE.format(
            name="svc%03d" % index, index=index, port=8000 + index,
            flag="true" if index % 2 else "false", cpus=1 + index % 8,
            dependency="base" if index == 0 else "svc%03d" % (index - 1)))
    return "".join(parts)


def read_corpus():
    """(label, text) of every corpus file."""
    corpus = []
    patterns = [os.path.join(REPO_ROOT, "tests", "yaml_corpus", "*.yaml"),
                os.path.join(REPO_ROOT, "examples", "*.yaml")]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8-sig") as handle:
                corpus.append((os.path.relpath(path, REPO_ROOT), handle.read()))
    for count in (10, 50):
        corpus.append(("generated-%d-services" % count, generated_compose(count)))
    return corpus


def best_time(parse, texts, repeat, rounds):
    """Best seconds per pass over ``texts`` (each pass parses every text once)."""
    best = None
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            for text in texts:
                parse(text)
        elapsed = (time.perf_counter() - start) / repeat
        best = elapsed if best is None else min(best, elapsed)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="corpus passes per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the best one counts)")
    args = parser.parse_args(argv)
    try:
        import yaml
    except ImportError:
        print("bench_yaml: skipped: PyYAML is not installed (python3 -m pip install pyyaml); it is "
              "needed only by this benchmark")
        return 0
    corpus = read_corpus()
    texts = [text for _, text in corpus]
    size = sum(len(text.encode("utf-8")) for text in texts)
    lines = sum(text.count("\n") + 1 for text in texts)
    for label, text in corpus:       # both readers must accept every file
        hpc_compose.parse_yaml(text)
        yaml.load(text, Loader=yaml.SafeLoader)

    def pyyaml_safe(text):
        return yaml.load(text, Loader=yaml.SafeLoader)

    ours = best_time(hpc_compose.parse_yaml, texts, args.repeat, args.rounds)
    theirs = best_time(pyyaml_safe, texts, args.repeat, args.rounds)
    print("YAML reader benchmark on Python %s" % sys.version.split()[0])
    print("corpus: %d files, %d lines, %.1f KiB (tests/yaml_corpus, examples, generated)"
          % (len(texts), lines, size / 1024.0))
    print("  hpc_compose.parse_yaml          %8.2f ms per corpus pass" % (ours * 1000))
    print("  PyYAML %-6s yaml.SafeLoader   %8.2f ms per corpus pass (pure Python)"
          % (yaml.__version__, theirs * 1000))
    print("  ratio (SafeLoader / parse_yaml) %8.1fx" % (theirs / ours))
    if getattr(yaml, "CSafeLoader", None) is not None:
        def pyyaml_c(text):
            return yaml.load(text, Loader=yaml.CSafeLoader)
        compiled = best_time(pyyaml_c, texts, args.repeat, args.rounds)
        print("  (for information: yaml.CSafeLoader, libyaml in C: %.2f ms per corpus pass, "
              "ratio CSafeLoader / parse_yaml %.1fx)" % (compiled * 1000, compiled / ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
