"""Sweeps (x-sweep): matrix expansion, the parameter table in the script, sweep status / retry, diff.

The scheduler is played by stand-ins (named so): shell scripts that record their argv and print
what sacct, squeue and sbatch print. The real cluster runs tests/test_sweep_e2e.py.
"""
import json
import os
import shutil
import subprocess

import pytest

import hpc_compose as hc

HEAD = """\
name: sw
x-slurm:
  runtime: host
  time: "00:05:00"
"""
SERVICES = """\
services:
  train:
    command: echo ((param.lr))
"""


def load(tmp_path, text):
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    return hc.load_spec(str(path), environ={"HOME": "/home/u", "USER": "u"})


def combos(spec):
    return [(tuple(value for _, value in task.params), task.replicate) for task in spec.sweep.tasks]


# --- matrix expansion -------------------------------------------------------------------------

def test_the_matrix_is_the_product_of_its_lists_the_first_parameter_varying_slowest():
    tasks = hc._expand_sweep((("lr", ("0.1", "0.01")), ("model", ("s", "m", "l"))))
    assert [tuple(v for _, v in t.params) for t in tasks] == [
        ("0.1", "s"), ("0.1", "m"), ("0.1", "l"), ("0.01", "s"), ("0.01", "m"), ("0.01", "l")]
    assert [t.index for t in tasks] == list(range(6))


def test_exclude_removes_every_combination_that_matches_all_of_its_keys():
    matrix = (("lr", ("0.1", "0.01")), ("model", ("s", "l")))
    one_key = hc._expand_sweep(matrix, exclude=((("lr", "0.01"),),))
    assert [dict(t.params) for t in one_key] == [{"lr": "0.1", "model": "s"},
                                                 {"lr": "0.1", "model": "l"}]
    both_keys = hc._expand_sweep(matrix, exclude=((("lr", "0.01"), ("model", "l")),))
    assert len(both_keys) == 3 and {"lr": "0.01", "model": "l"} not in [dict(t.params)
                                                                        for t in both_keys]


def test_include_adds_whole_combinations_once_and_exclude_does_not_remove_them():
    matrix = (("lr", ("0.1",)), ("model", ("s", "l")))
    tasks = hc._expand_sweep(matrix, include=((("model", "xl"), ("lr", "0.5")),
                                              (("lr", "0.1"), ("model", "s"))),
                             exclude=((("lr", "0.5"),),))
    assert [dict(t.params) for t in tasks] == [{"lr": "0.1", "model": "s"},
                                               {"lr": "0.1", "model": "l"},
                                               {"lr": "0.5", "model": "xl"}]
    # the include's pairs follow the matrix order, whatever order it was written in
    assert tasks[2].params == (("lr", "0.5"), ("model", "xl"))


def test_replicates_are_consecutive_tasks_of_one_combination():
    tasks = hc._expand_sweep((("lr", ("a", "b")),), replicates=3)
    assert [(t.index, dict(t.params)["lr"], t.replicate) for t in tasks] == [
        (0, "a", 0), (1, "a", 1), (2, "a", 2), (3, "b", 0), (4, "b", 1), (5, "b", 2)]


def test_a_3x2_matrix_with_two_replicates_and_one_exclude_is_an_array_of_ten(tmp_path):
    spec = load(tmp_path, HEAD + """\
x-sweep:
  matrix:
    lr: [0.1, 0.01, 0.001]
    model: [small, large]
  exclude:
    - {lr: 0.001, model: large}
  replicates: 2
  max_parallel: 3
""" + SERVICES)
    assert len(spec.sweep.tasks) == 10 and spec.slurm.array == "0-9%3"
    assert combos(spec)[-2:] == [(("0.001", "small"), 0), (("0.001", "small"), 1)]


def test_values_are_kept_as_written_and_interpolated(tmp_path):
    spec = load(tmp_path, HEAD + "x-sweep:\n  matrix:\n    lr: [1.10, '${LR:-2e-5}', true]\n"
                + SERVICES)
    assert [value for (value,), _ in combos(spec)] == ["1.10", "2e-5", "true"]


def test_include_alone_is_the_sweep(tmp_path):
    spec = load(tmp_path, HEAD + "x-sweep:\n  include:\n    - {lr: 1}\n    - {lr: 2}\n" + SERVICES)
    assert spec.sweep.parameters == ("lr",) and spec.slurm.array == "0-1"


@pytest.mark.parametrize("sweep, message", [
    ("  matrix: {lr: [1]}\n  include:\n    - {model: x}\n",
     "an include entry is a whole combination: it has no value for lr"),
    ("  matrix: {lr: [1]}\n  exclude:\n    - {model: x}\n", "exclude names 'model'"),
    ("  matrix: {lr: [1]}\n  exclude:\n    - {lr: 1}\n", "exclude removes every combination"),
    ("  matrix: {lr: []}\n", "parameter 'lr' has no values"),
    ("  matrix: {lr: [1, 1]}\n", "parameter 'lr' lists a value twice"),
    ("  matrix: {lr: [1], LR: [2]}\n", "are the same variable HPC_COMPOSE_PARAM_LR"),
    ("  matrix: {lr: [1]}\n  replicates: 0\n", "must be at least 1"),
    ("  matrix: {lr: [1]}\n  results: [../out.json]\n", "a result file is a path under"),
    ("  matrx: {lr: [1]}\n", "did you mean 'matrix'"),
    ("  replicates: 2\n", "x-sweep needs matrix (or include)"),
])
def test_a_wrong_sweep_is_a_located_error(tmp_path, sweep, message):
    with pytest.raises(hc.SpecError) as info:
        load(tmp_path, HEAD + "x-sweep:\n" + sweep + SERVICES)
    assert message in info.value.format() and "x-sweep" in info.value.format()


def test_x_sweep_and_x_slurm_array_together_are_an_error(tmp_path):
    with pytest.raises(hc.SpecError) as info:
        load(tmp_path, HEAD + "  array: 0-3\nx-sweep:\n  matrix: {lr: [1]}\n" + SERVICES)
    assert "x-slurm.array and x-sweep both make the job array" in info.value.format()


def test_a_placeholder_naming_no_parameter_is_an_error(tmp_path):
    with pytest.raises(hc.SpecError) as info:
        load(tmp_path, HEAD + "x-sweep:\n  matrix: {rate: [1]}\n" + SERVICES)
    text = info.value.format()
    assert "((param.lr)) names no x-sweep parameter" in text and "parameters: rate" in text


def test_the_schema_describes_x_sweep():
    schema = hc._compose_json_schema()["properties"]["x-sweep"]
    assert sorted(schema["properties"]) == sorted(hc._SWEEP_KEYS)
    assert schema["properties"]["matrix"]["patternProperties"]


def test_config_prints_the_sweep_as_includes_that_load_back_to_the_same_tasks(tmp_path, cli):
    text = HEAD + ("x-sweep:\n  matrix: {lr: [1, 2], m: [a, b]}\n  exclude:\n    - {m: b, lr: 2}\n"
                   "  replicates: 2\n") + SERVICES
    spec = load(tmp_path, text)
    printed = cli(["config", "-f", tmp_path / "compose.yaml"], cwd=tmp_path)
    assert printed.code == 0, printed
    assert "array" not in printed.out
    (tmp_path / "again").mkdir()
    again = load(tmp_path / "again", printed.out)
    assert again.sweep.tasks == spec.sweep.tasks and again.slurm.array == spec.slurm.array


# --- validate, inspect, render ----------------------------------------------------------------

GRID = HEAD + """\
x-sweep:
  matrix:
    lr: [0.1, "a b; rm -rf x"]
    model: [small]
  replicates: 2
"""


def test_validate_shows_the_number_of_tasks_and_inspect_lists_them(tmp_path, cli):
    (tmp_path / "compose.yaml").write_text(GRID + SERVICES)
    valid = cli(["validate", "-f", tmp_path / "compose.yaml"], cwd=tmp_path)
    assert "sweep: 4 tasks (2 combinations x 2 replicates) of lr, model; array 0-3\n" in valid.out
    data = json.loads(cli(["validate", "-f", tmp_path / "compose.yaml", "--format", "json"],
                          cwd=tmp_path).out)
    assert data["sweep_task_count"] == 4
    inspect = cli(["inspect", "-f", tmp_path / "compose.yaml"], cwd=tmp_path).out
    assert "  task 2: lr=a b; rm -rf x model=small (replicate 0)\n" in inspect
    tasks = json.loads(cli(["inspect", "-f", tmp_path / "compose.yaml", "--format", "json"],
                           cwd=tmp_path).out)["sweep"]["tasks"]
    assert tasks[3] == {"index": 3, "replicate": 1, "params": {"lr": "a b; rm -rf x",
                                                               "model": "small"}}


def render(tmp_path, text):
    spec = load(tmp_path, text)
    return hc.render_script(hc.build_runtime_plan(hc.build_plan(spec)))


def test_the_script_holds_the_table_once_and_passes_bash_n_and_shellcheck(tmp_path):
    script = render(tmp_path, GRID + SERVICES)
    assert script.count("SWEEP_PARAM_0=(") == 1 and "#SBATCH --array=0-3" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(path)], check=True)


def test_a_task_exports_its_row_and_writes_params_json_values_as_data(tmp_path):
    script = render(tmp_path, GRID + SERVICES)
    block = script[script.index("# Sweep (x-sweep)"):]
    block = block[:block.index('"$JOB_DIR/params.json"') + len('"$JOB_DIR/params.json"')]
    probe = block + '\nprintf "%s|%s|%s|%s\\n" "$HPC_COMPOSE_PARAM_LR" "$HPC_COMPOSE_PARAM_MODEL" ' \
                    '"$HPC_COMPOSE_SWEEP_INDEX" "$HPC_COMPOSE_REPLICATE"\n'
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + probe], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True,
                         env=dict(os.environ, SLURM_ARRAY_TASK_ID="3", JOB_DIR=str(tmp_path)))
    assert out.stdout == "a b; rm -rf x|small|3|1\n"
    assert json.loads((tmp_path / "params.json").read_text()) == {
        "index": 3, "replicate": 1, "params": {"lr": "a b; rm -rf x", "model": "small"}}
    missing = subprocess.run(["bash", "-c", block], stderr=subprocess.PIPE,
                             universal_newlines=True,
                             env=dict(os.environ, SLURM_ARRAY_TASK_ID="9", JOB_DIR=str(tmp_path)))
    assert missing.returncode == 1 and "array task 9 is not in this sweep's table" in missing.stderr


def test_placeholders_become_variables_in_list_commands_environment_and_volumes(tmp_path):
    (tmp_path / "data").mkdir()
    script = render(tmp_path, HEAD.replace("runtime: host", "runtime: pyxis") + GRID.split(
        "\n", 4)[4] + """\
services:
  train:
    image: python:3.11
    environment:
      RATE: "lr=((param.lr))"
    volumes:
      - ./data/((param.model)):/data
    command: ["python3", "-c", "pass", "--lr", "((param.lr))"]
""")
    assert 'RATE=lr="${HPC_COMPOSE_PARAM_LR}" \\\n' in script
    assert '/data/"${HPC_COMPOSE_PARAM_MODEL}":/data' in script
    assert '[[ -e %s/data/"${HPC_COMPOSE_PARAM_MODEL}" ]]' % tmp_path in script
    assert ' --lr "${HPC_COMPOSE_PARAM_LR}"\n' in script


def test_a_string_command_reads_the_value_from_the_environment_never_as_code(tmp_path):
    script = hc._placeholder_script("echo ((param.lr)) done")
    assert script == 'echo "$HPC_COMPOSE_PARAM_LR" done'
    out = subprocess.run(["sh", "-c", script], stdout=subprocess.PIPE, universal_newlines=True,
                         env=dict(os.environ, HPC_COMPOSE_PARAM_LR="$(touch pwned); x"),
                         cwd=str(tmp_path))
    assert out.stdout == "$(touch pwned); x done\n" and not (tmp_path / "pwned").exists()


def test_without_x_sweep_a_script_has_no_sweep_block(tmp_path):
    script = render(tmp_path, HEAD + "services:\n  train:\n    command: echo hi\n")
    assert "SWEEP" not in script


# --- sweep status, retry, diff (stand-ins for sacct, squeue, sbatch) ---------------------------

SACCT_STANDIN = """#!/bin/sh
# STAND-IN for sacct: records its argv, prints $STANDIN_DIR/sacct.out (what sacct -P prints).
echo "sacct $*" >> "$STANDIN_DIR/calls.log"
cat "$STANDIN_DIR/sacct.out"
"""
SQUEUE_STANDIN = """#!/bin/sh
# STAND-IN for squeue: records its argv, prints nothing (every task has left the queue).
echo "squeue $*" >> "$STANDIN_DIR/calls.log"
"""
SBATCH_STANDIN = """#!/bin/sh
# STAND-IN for sbatch: records its argv, answers with job id 90 (--parsable).
echo "sbatch $*" >> "$STANDIN_DIR/calls.log"
echo 90
"""


@pytest.fixture
def swept(tmp_path, monkeypatch):
    """A tracked sweep (job 70, 4 tasks of lr x replicate) and stand-ins for the scheduler."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("sacct", SACCT_STANDIN), ("squeue", SQUEUE_STANDIN),
                       ("sbatch", SBATCH_STANDIN)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("STANDIN_DIR", str(folder))
    (tmp_path / "compose.yaml").write_text(GRID.replace('"a b; rm -rf x"', "0.01") + SERVICES)
    spec = load(tmp_path, (tmp_path / "compose.yaml").read_text())
    runtime_plan = hc.build_runtime_plan(hc.build_plan(spec))
    script = tmp_path / "hpc-compose.sbatch"
    script.write_text(hc.render_script(runtime_plan))
    record = hc._build_job_record(runtime_plan, "70", script_path=str(script), submitted_at=1.0)
    record["sweep_script"] = hc._keep_sweep_script(str(tmp_path), "70", str(script))
    hc._record_job(str(tmp_path), record)
    for task, loss in ((0, 0.5), (1, 0.25), (2, 0.75)):
        job_dir = tmp_path / ".hpc-compose" / ("70_%d" % task)
        job_dir.mkdir(parents=True)
        (job_dir / "result.json").write_text(json.dumps({"loss": loss, "eval": {"acc": task}}))
    failed = tmp_path / ".hpc-compose" / "70_3"
    (failed / "logs").mkdir(parents=True)
    (failed / "logs" / "train.log").write_text("step 1\nstep 2\nTraceback\nValueError: nan\n")
    (failed / "state.json").write_text(json.dumps({
        "status": "failed", "reason": "service 'train' exited with code 1",
        "services": [{"name": "train", "token": "train", "status": "failed",
                      "last_exit_code": 1}]}))
    (folder / "sacct.out").write_text("70_0|COMPLETED|0:0|00:00:05|n1\n70_1|COMPLETED|0:0|"
                                      "00:00:04|n2\n70_2|COMPLETED|0:0|00:00:06|n1\n"
                                      "70_3|FAILED|1:0|00:00:02|n3\n")

    class Sweep(object):
        root = tmp_path
        compose = str(tmp_path / "compose.yaml")
        bin = folder

        def calls(self):
            path = folder / "calls.log"
            return path.read_text().splitlines() if path.exists() else []

    return Sweep()


def sweep_cli(cli, swept, *args):
    tools = ["--sacct-bin", swept.bin / "sacct", "--squeue-bin", swept.bin / "squeue"]
    if args[0] == "retry":
        tools += ["--sbatch-bin", swept.bin / "sbatch"]
    return cli(["sweep"] + list(args[:1]) + ["-f", swept.compose] + tools + list(args[1:]),
               cwd=swept.root)


def test_sweep_status_is_one_row_per_task_with_results_as_columns_from_one_sacct_call(
        cli, swept):
    result = sweep_cli(cli, swept, "status")
    assert result.code == 0, result
    assert swept.calls() == ["sacct -n -X -P -j 70 --format=JobID,State,ExitCode,Elapsed,NodeList"]
    lines = result.out.splitlines()
    assert lines[0] == "sweep 70 (4 tasks): 3 COMPLETED, 1 FAILED"
    assert lines[1].split() == ["index", "lr", "model", "rep", "state", "elapsed", "exit", "loss",
                                "eval.acc"]
    assert lines[2].split() == ["0", "0.1", "small", "0", "COMPLETED", "00:00:05", "0", "0.5", "0"]
    assert lines[5].split() == ["3", "0.01", "small", "1", "FAILED", "00:00:02", "1", "-", "-"]
    assert "task 3 (70_3): FAILED, service train: service 'train' exited with code 1" in lines
    assert "    | ValueError: nan" in lines


def test_sweep_status_sorts_by_a_result_and_keeps_the_top_rows(cli, swept):
    result = sweep_cli(cli, swept, "status", "--sort", "loss", "--top", "2")
    assert [line.split()[0] for line in result.out.splitlines()[2:4]] == ["1", "0"]
    descending = sweep_cli(cli, swept, "status", "--sort=-loss", "--format", "json")
    assert [row["index"] for row in json.loads(descending.out)["tasks"]] == [2, 0, 1, 3]
    unknown = sweep_cli(cli, swept, "status", "--sort", "los")
    assert unknown.code == 2 and "columns: index" in unknown.err


def test_sweep_status_as_csv(cli, swept):
    rows = sweep_cli(cli, swept, "status", "--format", "csv").out.splitlines()
    assert rows[0] == ('"index","lr","model","replicate","job_id","attempt","state","elapsed",'
                       '"exit_code","loss","eval.acc"')
    assert rows[2] == '"1","0.1","small","1","70_1","1","COMPLETED","00:00:04","0:0","0.25","1"'


def test_sacct_task_ids_name_one_task_or_the_tasks_not_started():
    assert hc._parse_sacct_task_id("70_[2-3%2]") == ("70", [2, 3])
    assert hc._parse_sacct_task_id("70_4") == ("70", [4])


def test_sweep_status_asks_squeue_only_for_tasks_sacct_does_not_know_yet(cli, swept):
    (swept.bin / "sacct.out").write_text("70_[0-3]|PENDING|0:0|00:00:00|None assigned\n")
    result = sweep_cli(cli, swept, "status", "--format", "json")
    assert [row["state"] for row in json.loads(result.out)["tasks"]] == ["PENDING"] * 4
    assert len(swept.calls()) == 1
    (swept.bin / "sacct.out").write_text("")
    sweep_cli(cli, swept, "status")
    assert swept.calls()[-1].startswith("squeue -h -r -j 70 ")


def test_sweep_retry_submits_the_failed_tasks_and_status_shows_the_latest_attempt(cli, swept):
    result = sweep_cli(cli, swept, "retry", "--failed")
    assert result.code == 0, result
    assert "submitted batch job 90: tasks 3 of sweep 70 again" in result.out
    sbatch = [call for call in swept.calls() if call.startswith("sbatch")]
    assert sbatch == ["sbatch --parsable --array=3 %s" % (
        swept.root / ".hpc-compose" / "jobs" / "70.sbatch")]
    retry = json.loads((swept.root / ".hpc-compose" / "jobs" / "90.json").read_text())
    assert retry["sweep_root"] == "70" and retry["array_tasks"] == [3]
    assert retry["job_dir"].endswith(os.path.join(".hpc-compose", "90"))
    done = swept.root / ".hpc-compose" / "90_3"
    done.mkdir()
    (done / "result.json").write_text('{"loss": 0.1}')
    (swept.bin / "sacct.out").write_text((swept.bin / "sacct.out").read_text()
                                         + "90_3|COMPLETED|0:0|00:00:03|n2\n")
    status = sweep_cli(cli, swept, "status", "--sort", "loss")
    assert status.out.splitlines()[0] == "sweep 70 (4 tasks, retries: 90): 4 COMPLETED"
    assert status.out.splitlines()[2].split() == ["3", "0.01", "small", "1", "COMPLETED",
                                                  "(retry", "1)", "00:00:03", "0", "0.1", "-"]
    assert swept.calls()[-1] == ("sacct -n -X -P -j 70,90 "
                                 "--format=JobID,State,ExitCode,Elapsed,NodeList")
    again = sweep_cli(cli, swept, "retry", "--job-id", "90")
    assert again.code == 0 and "nothing to retry" in again.out


def test_sweep_retry_of_chosen_tasks_keeps_max_parallel_and_refuses_unknown_ones(cli, swept):
    record_path = swept.root / ".hpc-compose" / "jobs" / "70.json"
    record = json.loads(record_path.read_text())
    record["sweep"]["max_parallel"] = 2
    record_path.write_text(json.dumps(record))
    assert sweep_cli(cli, swept, "retry", "--job-id", "70", "--tasks", "0,2").code == 0
    assert swept.calls()[-1].startswith("sbatch --parsable --array=0,2%2 ")
    unknown = sweep_cli(cli, swept, "retry", "--tasks", "7")
    assert unknown.code == 2 and "sweep 70 has no task 7" in unknown.err


def test_sweep_commands_refuse_a_job_that_is_not_a_sweep(cli, tmp_path):
    (tmp_path / "compose.yaml").write_text(HEAD + "services:\n  train:\n    command: echo\n")
    record = {"job_id": "5", "project_dir": str(tmp_path), "services": [],
              "compose_file": str(tmp_path / "compose.yaml")}
    hc._record_job(str(tmp_path), record)
    result = cli(["sweep", "status", "-f", tmp_path / "compose.yaml"], cwd=tmp_path)
    assert result.code == 2 and "job 5 is not a sweep" in result.err


def test_status_of_a_sweep_points_to_sweep_status(cli, swept):
    result = cli(["status", "-f", swept.compose, "--squeue-bin", swept.bin / "squeue",
                  "--sacct-bin", swept.bin / "sacct"], cwd=swept.root)
    assert "hpc-compose sweep status -f %s" % swept.compose in result.out


def test_diff_of_two_tasks_names_the_differing_parameter_and_results(cli, swept):
    for task in (0, 2):
        job_dir = swept.root / ".hpc-compose" / ("70_%d" % task)
        (job_dir / "params.json").write_text(json.dumps({
            "index": task, "replicate": 0,
            "params": {"lr": "0.1" if task == 0 else "0.01", "model": "small"}}))
    (swept.bin / "sacct.out").write_text("")
    result = cli(["diff", "70_0", "70_2", "-f", swept.compose, "--sacct-bin",
                  swept.bin / "sacct"], cwd=swept.root)
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0] == "70_0  vs  70_2"
    assert [line.split()[0] for line in lines[1:]] == ["params.lr", "results.eval.acc",
                                                       "results.loss"]
    assert lines[1].split() == ["params.lr", "0.1", "->", "0.01"]
    data = json.loads(cli(["diff", "70_0", "70_2", "-f", swept.compose, "--sacct-bin",
                           swept.bin / "sacct", "--format", "json"], cwd=swept.root).out)
    assert {"field": "results.loss", "left": 0.5, "right": 0.75} in data["differences"]
    whole = cli(["diff", "70", "70_2", "-f", swept.compose], cwd=swept.root)
    assert whole.code == 2 and "pick one task" in whole.err


def test_a_value_that_fills_a_volume_may_not_split_the_mount(tmp_path):
    with pytest.raises(hc.SpecError) as info:
        load(tmp_path, HEAD.replace("runtime: host", "runtime: pyxis")
             + "x-sweep:\n  matrix:\n    shard: ['a:b']\n" + """\
services:
  train:
    image: python:3.11
    volumes:
      - ./data/((param.shard)):/data
""")
    assert "fills a volume of service 'train', but contains ',' or ':'" in info.value.format()


def test_sweep_status_watch_refreshes_until_every_task_has_ended(swept, monkeypatch, capsys):
    answers = ["70_[0-3]|PENDING|0:0|00:00:00|None assigned\n",
               (swept.bin / "sacct.out").read_text()]

    def next_answer(seconds):
        (swept.bin / "sacct.out").write_text(answers.pop(0))
    next_answer(0)
    parser = hc.build_parser("sweep")
    args = parser.parse_args(["sweep", "status", "--watch", "-f", swept.compose, "--sacct-bin",
                              str(swept.bin / "sacct"), "--squeue-bin",
                              str(swept.bin / "squeue")])
    monkeypatch.chdir(str(swept.root))
    assert hc._cmd_sweep_status(args, sleep=next_answer) == 0
    out = capsys.readouterr().out
    assert out.count("sweep 70 (4 tasks)") == 2 and not answers
    assert "4 PENDING" in out and "3 COMPLETED, 1 FAILED" in out


def test_diff_of_two_jobs_names_what_differs_in_their_normalized_specs(cli, tmp_path):
    for job_id, mode in (("80", "fast"), ("81", "slow")):
        folder = tmp_path / job_id
        folder.mkdir()
        spec = load(folder, HEAD + "services:\n  train:\n    environment:\n      MODE: %s\n"
                    "    command: echo\n" % mode)
        record = hc._build_job_record(hc.build_runtime_plan(hc.build_plan(spec)), job_id)
        record["project_dir"] = str(tmp_path)
        hc._record_job(str(tmp_path), record)
    (tmp_path / "compose.yaml").write_text(HEAD + "services:\n  train:\n    command: echo\n")
    sacct = tmp_path / "sacct"
    sacct.write_text("#!/bin/sh\n# STAND-IN for sacct: knows no job.\n")
    sacct.chmod(0o755)
    result = cli(["diff", "80", "81", "-f", tmp_path / "compose.yaml", "--sacct-bin", sacct],
                 cwd=tmp_path)
    assert result.code == 0, result
    lines = [line.split() for line in result.out.splitlines()[1:]]
    assert lines[0][0] == "compose_file"
    assert ["spec.services.train.environment.MODE", "fast", "->", "slow"] in lines


def test_a_result_named_like_a_parameter_is_shown_and_sorted_as_results_name(cli, swept):
    for task, lr in ((0, 3), (1, 1), (2, 2)):
        path = swept.root / ".hpc-compose" / ("70_%d" % task) / "result.json"
        path.write_text(json.dumps({"lr": lr}))
    result = sweep_cli(cli, swept, "status", "--sort", "results.lr")
    lines = result.out.splitlines()
    assert lines[1].split() == ["index", "lr", "model", "rep", "state", "elapsed", "exit",
                                "results.lr"]
    assert [line.split()[0] for line in lines[2:6]] == ["1", "2", "0", "3"]
    by_parameter = sweep_cli(cli, swept, "status", "--sort=-lr").out.splitlines()
    assert [line.split()[1] for line in by_parameter[2:6]] == ["0.1", "0.1", "0.01", "0.01"]
