"""`hpc-compose schema`: the JSON Schema editors read, generated from the validator's field table.

Checking a file against the schema needs a JSON Schema implementation; ``jsonschema`` (PyPI) is a
test-only dependency, installed by .ci/run for every CPython that runs this file. The tool itself
never needs it.
"""
import glob
import json
import os

import pytest

import test_spec

jsonschema = pytest.importorskip(
    "jsonschema", reason="the test-only jsonschema is missing: python3 -m pip install jsonschema")

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = sorted(glob.glob(os.path.join(HERE, "..", "examples", "*.yaml")))
CORPUS = sorted(glob.glob(os.path.join(HERE, "yaml_corpus", "*.yaml")))
ENV = {"HOME": "/home/tester", "USER": "tester", "TAG": "7"}


@pytest.fixture(scope="module")
def validator():
    import hpc_compose
    schema = hpc_compose._compose_json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def problems(validator, data):
    return sorted(error.message for error in validator.iter_errors(data))


def test_schema_command_prints_a_draft_07_schema(cli):
    result = cli(["schema"])
    assert result.code == 0, result
    schema = json.loads(result.out)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def test_every_field_of_the_validator_is_described_in_the_schema(hc, validator):
    schema = validator.schema
    service = schema["properties"]["services"]["patternProperties"]
    service = list(service.values())[0]
    assert tuple(schema["properties"]) == hc._TOP_LEVEL_KEYS
    assert tuple(service["properties"]) == hc._SERVICE_KEYS
    assert tuple(schema["properties"]["x-slurm"]["properties"]) == hc._SLURM_KEYS
    assert tuple(service["properties"]["x-slurm"]["properties"]) == hc._SERVICE_SLURM_KEYS
    readiness = set(service["properties"]["readiness"]["properties"])
    assert readiness == {"type"}.union(*hc._READINESS_FIELDS.values())
    for name, field in service["properties"].items():
        assert field["description"], name


def test_enums_come_from_the_validator(hc, validator):
    slurm = validator.schema["properties"]["x-slurm"]["properties"]
    assert slurm["runtime"]["anyOf"][0]["enum"] == list(hc._RUNTIMES)
    assert slurm["runtime"]["default"] == "pyxis"


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_every_shipped_example_validates(hc, validator, path):
    with open(path, encoding="utf-8") as handle:
        assert problems(validator, hc.parse_yaml(handle.read())) == []


def test_there_are_examples_and_corpus_specs_to_check():
    assert len(EXAMPLES) >= 5 and len(CORPUS) >= 5


def test_every_valid_spec_of_the_corpus_validates(hc, validator, tmp_path):
    checked = 0
    for path in CORPUS + EXAMPLES:
        try:
            hc.load_spec(path, environ=dict(ENV, MODEL="m", PORT="8000"))
        except hc.HpcComposeError:
            continue
        with open(path, encoding="utf-8-sig") as handle:
            data = hc.parse_yaml(handle.read())
        assert problems(validator, data) == [], path
        checked += 1
    for text in (test_spec.FULL,):
        assert problems(validator, hc.parse_yaml(text)) == []
    assert checked >= len(EXAMPLES)


# Errors the schema can express: unknown keys, wrong shapes, values outside an enum.
STRUCTURAL = ("unknown key", "is not supported", "is not one of", "expected a", "must be true or "
              "false", "must be an integer", "not a valid environment variable name")
# Not expressible: which image schemes and healthcheck probes are understood.
SEMANTIC = ("scheme", "probe", "healthcheck:")
INVALID = [case for case in test_spec.CASES if any(word in case[1] for word in STRUCTURAL)
           and not any(word in case[0] + case[1] for word in SEMANTIC) and "${" not in case[0]]


def test_there_is_a_sample_of_invalid_specs():
    assert len(INVALID) >= 20


@pytest.mark.parametrize("text,message,line,path", INVALID,
                         ids=["%02d-%s" % (i, c[1][:40]) for i, c in enumerate(INVALID)])
def test_invalid_specs_are_rejected_by_the_schema(hc, validator, text, message, line, path):
    assert problems(validator, hc.parse_yaml(text)) != [], message


SECRETS_SPEC = """\
secrets:
  token:
    file: ./token.txt
  hf:
    environment: HF_TOKEN
x-slurm:
  share_with_group: true
services:
  app:
    image: redis:7
    volumes:
      - ./data:/data
      - {type: bind, source: ./ro, target: /ro, read_only: true, bind: {create_host_path: true}}
    secrets:
      - token
      - {source: hf, target: hf_token, mode: 0400}
    x-enroot:
      prepare:
        commands: [true]
        mounts:
          - {type: bind, source: ./build, target: /build}
"""


def test_secrets_share_with_group_and_long_syntax_volumes_are_in_the_schema(hc, validator):
    assert problems(validator, hc.parse_yaml(SECRETS_SPEC)) == []


@pytest.mark.parametrize("text", [
    "secrets:\n  t:\n    content: x\nservices:\n  a:\n    image: x\n",
    "secrets:\n  t:\n    file: a\n    environment: B\nservices:\n  a:\n    image: x\n",
    "services:\n  a:\n    image: x\n    secrets:\n      - {source: t, uid: '0'}\n",
    "services:\n  a:\n    image: x\n    volumes:\n      - {type: volume, source: d, target: /d}\n",
    "services:\n  a:\n    image: x\n    volumes:\n      - {type: bind, target: /d}\n",
])
def test_secret_and_volume_mistakes_are_rejected_by_the_schema(hc, validator, text):
    assert problems(validator, hc.parse_yaml(text)) != []


SIGNAL_SPEC = """\
x-slurm:
  time: "01:00:00"
  resume: {path: /shared/r}
  signal: {name: SIGusr2, before: 1m30s, on_signal: requeue, grace: 30, max_attempts: 3}
  requeue: true
  dependency: afterok:12:13
  array: 0-15%4
services:
  a:
    image: x
    x-slurm:
      signal: {name: int, forward: true}
  b:
    image: x
    x-slurm:
      signal: false
"""


def test_signal_requeue_dependency_and_array_are_in_the_schema(hc, validator):
    assert problems(validator, hc.parse_yaml(SIGNAL_SPEC)) == []
    signal = validator.schema["properties"]["x-slurm"]["properties"]["signal"]
    assert tuple(signal["properties"]) == hc._SIGNAL_KEYS
    assert signal["properties"]["on_signal"]["anyOf"][0]["enum"] == list(hc._ON_SIGNAL_ACTIONS)


@pytest.mark.parametrize("text", [
    "x-slurm:\n  signal: {before: 5m, when: now}\nservices:\n  a:\n    image: x\n",
    "x-slurm:\n  signal: {name: TERM, before: 5m}\nservices:\n  a:\n    image: x\n",
    "x-slurm:\n  signal: {before: soon}\nservices:\n  a:\n    image: x\n",
    "x-slurm:\n  signal: {before: ''}\nservices:\n  a:\n    image: x\n",
    "x-slurm:\n  signal: {before: 5m, on_signal: stop}\nservices:\n  a:\n    image: x\n",
    "x-slurm:\n  requeue: sometimes\nservices:\n  a:\n    image: x\n",
    "services:\n  a:\n    image: x\n    x-slurm:\n      signal: true\n",
    "services:\n  a:\n    image: x\n    x-slurm:\n      signal: {name: KILL}\n",
    "services:\n  a:\n    image: x\n    x-slurm:\n      signal: {forward: maybe}\n",
])
def test_signal_mistakes_are_rejected_by_the_schema(hc, validator, text):
    assert problems(validator, hc.parse_yaml(text)) != []
