"""x-slurm values checked against Slurm's own grammar at validate, the first-class sbatch fields
and their #SBATCH / srun lines, and the JSON Schema's patterns for them."""
import re

import pytest

from test_spec import failure, load, plan, service

# What the real sbatch accepts and refuses (tests/test_spec_slurm_e2e.py asks it for each value).
TIMES_ACCEPTED = ("90", "0", "1-12", "61:00", "01:00:00", "2-12:00:00", "1-0", "1-00:30",
                  "100:00:00", "UNLIMITED", "unlimited", "INFINITE", "-1", "5:30", "5-", "00")
TIMES_REFUSED = ("10 minutes", "1h", "1:00:00:00", "1.5", "lots", "30m", "1-2-3", "1:-2",
                 "1:2:3:4", "01:00:00 ", " 90", "+90", ":30", "1-:30", "1d", "never")
MEMORY_ACCEPTED = ("4G", "4GB", "2048mb", "2048", "512M", "1T", "8g", "0", "100K", "1tb",
                   "4gB", "4kb", "00")
MEMORY_REFUSED = ("4 GB", "lots", "-5", "1.5G", "4Gi", "4GiB", "G", "4X", "4GBB", "four", "4Bb")


def slurm_spec(key, value, service_level=False):
    if service_level:
        return ("services:\n  app:\n    image: redis:7\n    x-slurm:\n      %s: %s\n"
                % (key, value))
    return "x-slurm:\n  %s: %s\nservices:\n  app:\n    image: redis:7\n" % (key, value)


def quoted(value):
    return '"%s"' % value


ACCEPTED = [("time", value) for value in TIMES_ACCEPTED] + [("mem", value)
                                                           for value in MEMORY_ACCEPTED]
REFUSED = [("time", value) for value in TIMES_REFUSED] + [("mem", value)
                                                        for value in MEMORY_REFUSED]
HINTS = {"time": ("01:00:00", "2-12:00:00", "90"), "mem": ("8G", "512M")}


@pytest.mark.parametrize("key,value", ACCEPTED)
def test_time_and_memory_forms_slurm_accepts_validate(hc, project, key, value):
    assert getattr(load(hc, project, slurm_spec(key, quoted(value))).slurm, key) == value


@pytest.mark.parametrize("key,value", REFUSED)
def test_time_and_memory_forms_slurm_refuses_are_located_errors_with_the_accepted_forms(
        hc, project, key, value):
    error = failure(hc, project, slurm_spec(key, quoted(value)))
    assert error.path == "x-slurm." + key and error.line == 2
    assert "not a value Slurm accepts for --" + key in error.message
    assert all(form in error.hint for form in HINTS[key])


def test_an_unquoted_number_of_minutes_is_a_time(hc, project):
    assert load(hc, project, slurm_spec("time", "90")).slurm.time == "90"


def test_an_interpolated_time_is_checked_once_interpolated(hc, project):
    assert load(hc, project, slurm_spec("time", "${T:-30}")).slurm.time == "30"
    error = failure(hc, project, slurm_spec("time", "${T}"), env={"T": "1 hour"})
    assert error.path == "x-slurm.time"


@pytest.mark.parametrize("key,good,bad", [
    ("gres", "gpu:a100:2,shard:1", "gpu:2:a100"),
    ("gres", "gpu", "gpu 2"),
    ("mem_per_cpu", "2G", "2 G"),
    ("mem_per_gpu", "16G", "16Gi"),
    ("gpus_per_node", "a100:4", "4:a100"),
    ("gpus_per_task", "1", "one"),
    ("licenses", "matlab:2,ansys", "matlab:two"),
    ("nodelist", "node[01-04],node07", "node01 node02"),
    ("exclude", "node07", "node 7"),
    ("reservation", "maint", "my reservation"),
    ("partition", "gpu,debug", "gpu debug"),
    ("begin", "now+1hours", "in an hour"),
    ("begin", "2030-01-31T16:00:00", "31.01.2030 16:00"),
    ("mail_type", "END,FAIL", "END,OOPS"),
    ("mail_user", "someone@example.org", "a b"),
])
def test_each_sbatch_option_is_checked_against_its_grammar(hc, project, key, good, bad):
    assert getattr(load(hc, project, slurm_spec(key, quoted(good))).slurm, key) == good
    assert failure(hc, project, slurm_spec(key, quoted(bad))).path == "x-slurm." + key


def test_service_mem_and_time_are_checked(hc, project):
    spec = load(hc, project, slurm_spec("mem", "4G", service_level=True))
    assert service(spec).slurm.mem == "4G"
    error = failure(hc, project, slurm_spec("time", "1h", service_level=True))
    assert error.path == "services.app.x-slurm.time"


def test_mem_and_mem_per_cpu_together_are_refused(hc, project):
    error = failure(hc, project, "x-slurm:\n  mem: 4G\n  mem_per_cpu: 1G\n"
                                 "services:\n  app:\n    image: redis:7\n")
    assert error.path == "x-slurm.mem_per_cpu" and "only one of" in error.message


def test_exclusive_takes_true_or_a_mode(hc, project):
    assert load(hc, project, slurm_spec("exclusive", "true")).slurm.exclusive is True
    assert load(hc, project, slurm_spec("exclusive", "user")).slurm.exclusive == "user"
    assert failure(hc, project, slurm_spec("exclusive", "everyone")).path == "x-slurm.exclusive"


def test_a_refused_value_is_not_repeated_in_the_error(hc, project):
    error = failure(hc, project, slurm_spec("time", "1" * 100000 + "h"))
    assert len(error.format()) < 600 and "100001 characters" in error.message
    assert "11111" not in error.format()


def test_the_new_sbatch_fields_render_after_the_resources(hc, project):
    text = ("x-slurm:\n  mem_per_gpu: 16G\n  gpus_per_node: a100:4\n  cpus_per_gpu: 8\n"
            "  exclusive: true\n  reservation: maint\n  licenses: matlab:2\n"
            "  nodelist: node[01-02]\n  exclude: node07\n  begin: now+1hours\n"
            "  mail_type: END,FAIL\n  mail_user: me@example.org\n"
            "services:\n  app:\n    image: redis:7\n")
    script = hc.render_script(hc.build_runtime_plan(plan(hc, project, text)))
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert lines[-11:] == [
        "#SBATCH --mem-per-gpu=16G", "#SBATCH --gpus-per-node=a100:4", "#SBATCH --cpus-per-gpu=8",
        "#SBATCH --reservation=maint", "#SBATCH --licenses=matlab:2",
        "#SBATCH --nodelist='node[01-02]'", "#SBATCH --exclude=node07",
        "#SBATCH --begin=now+1hours", "#SBATCH --mail-type=END,FAIL",
        "#SBATCH --mail-user=me@example.org", "#SBATCH --exclusive"]


def test_service_mem_and_time_reach_the_step(hc, project):
    text = ("services:\n  app:\n    image: redis:7\n    x-slurm:\n      mem: 4G\n"
            "      time: \"00:30:00\"\n")
    runtime = hc.build_runtime_plan(plan(hc, project, text))
    argv = hc._srun_parts(runtime, 0)
    assert ("--mem=4G",) in argv and ("--time=00:30:00",) in argv
    assert hc.plan_to_dict(runtime.plan)["services"][0]["mem"] == "4G"


@pytest.mark.parametrize("key", ["time", "mem", "gres", "mail_type", "begin"])
def test_the_schema_pattern_is_the_validators(hc, key):
    schema = hc._compose_json_schema()["properties"]["x-slurm"]["properties"][key]
    patterns = [choice["pattern"] for choice in schema["anyOf"] if "pattern" in choice]
    assert hc._SLURM_GRAMMARS[key].pattern in patterns
    if key == "time":
        for value in TIMES_ACCEPTED:
            assert re.fullmatch(hc._SLURM_GRAMMARS[key].pattern, value)
