"""lint: each smell found with its stable code and line, --format json, --strict, x-lint.ignore,
and every shipped example clean."""
import glob
import json
import os

import pytest

import hpc_compose as hc

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

SMELLY = """\
x-slurm:
  mem: 4G
  time: "00:10:00"
  cpus_per_task: 2
services:
  db:
    image: postgres
    volumes:
      - ./data:/data
      - ./sub:/data/sub
  app:
    image: python:latest
    depends_on: [db]
    readiness:
      type: tcp
      port: 80
      timeout_seconds: 7200
    x-slurm:
      cpus_per_task: 8
      mem: 8G
"""
EXPECTED = [(1, "HC005"), (6, "HC004"), (7, "HC001"), (10, "HC007"), (12, "HC001"), (14, "HC003"),
            (19, "HC006"), (20, "HC006")]


def write(tmp_path, text):
    for folder in ("data", "sub"):
        (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    return str(path)


def lint(tmp_path, text):
    path = write(tmp_path, text)
    environ = {"HOME": str(tmp_path / "home"), "USER": "tester"}
    return hc._lint_plan(hc.build_plan(hc.load_spec(path, environ=environ), environ=environ))


def test_each_smell_is_found_with_its_code_and_line(tmp_path):
    assert [(w.line, w.code) for w in lint(tmp_path, SMELLY)] == EXPECTED


def test_no_time_limit_is_a_warning_at_x_slurm(tmp_path):
    found = lint(tmp_path, "x-slurm:\n  runtime: host\nservices:\n  a:\n    command: [\"true\"]\n")
    assert [(w.line, w.code, w.path) for w in found] == [(1, "HC002", ("x-slurm",))]


def test_a_node_local_cache_dir_is_a_warning(tmp_path):
    found = lint(tmp_path, "x-slurm:\n  time: 5\n  cache_dir: /local/cache\nservices:\n  a:\n"
                           "    image: redis:7\n")
    assert [(w.line, w.code) for w in found] == [(3, "HC005")]
    assert "/local" in found[0].message


def test_x_lint_ignore_silences_a_code_for_the_file_or_one_service(tmp_path):
    text = SMELLY.replace("  db:\n", "  db:\n    x-lint: {ignore: [HC004, HC007]}\n")
    codes = [w.code for w in lint(tmp_path, "x-lint:\n  ignore: [HC001]\n" + text)]
    assert codes == ["HC005", "HC003", "HC006", "HC006"]


def test_cli_text_json_and_strict(tmp_path, cli):
    path = write(tmp_path, SMELLY)
    env = {"HOME": str(tmp_path / "home"), "USER": "tester"}
    text = cli(["lint", "-f", path], env=env)
    assert text.code == 0, text
    assert "compose.yaml:7: HC001 services.db.image: image postgres has no tag" in text.out
    assert text.out.endswith("lint: 8 warnings\n")
    strict = cli(["lint", "--strict", "--format", "json", "-f", path], env=env)
    assert strict.code == 1
    data = json.loads(strict.out)
    assert data["ok"] is False
    assert [(w["line"], w["code"]) for w in data["warnings"]] == EXPECTED
    assert data["warnings"][2]["name"] == "image-not-pinned"
    assert data["warnings"][2]["path"] == "services.db.image"


def test_an_invalid_spec_is_an_error_not_a_lint(tmp_path, cli):
    result = cli(["lint", "-f", write(tmp_path, "services:\n  a:\n    imgae: x\n")])
    assert result.code == 2 and "did you mean 'image'" in result.err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))))
def test_every_shipped_example_is_lint_clean(cli, path):
    result = cli(["lint", "--strict", "-f", path], env={"HOME": "/home/alice", "USER": "alice"})
    assert result.code == 0 and result.out == "lint: 0 warnings\n", result


def test_every_code_is_documented_once():
    with open(os.path.join(os.path.dirname(EXAMPLES), "docs", "lint.md")) as handle:
        page = handle.read()
    for code, name, _what in hc._LINT_CODES:
        assert page.count("| `%s` | `%s` |" % (code, name)) == 1
