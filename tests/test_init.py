"""init: the shipped examples as templates, customized by editing their text."""
import difflib
import os
import shutil
import subprocess
import sys

import pytest

import hpc_compose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
ENV = {"USER": "tester"}


def example_names():
    return sorted(name[:-5] for name in os.listdir(EXAMPLES) if name.endswith(".yaml"))


def test_template_table_matches_the_examples_folder():
    assert sorted(hpc_compose.TEMPLATE_NAMES) == example_names()


def test_list_prints_every_template_with_its_description(cli):
    result = cli(["init", "--list"])
    assert result.code == 0
    lines = result.out.splitlines()
    assert [line.split()[0] for line in lines] == list(hpc_compose.TEMPLATE_NAMES)
    assert all(len(line.split(None, 1)) == 2 for line in lines)
    assert "minimal-batch" in lines[0] and "smallest" in lines[0]


def test_list_templates_is_an_alias_of_list(cli):
    assert cli(["init", "--list-templates"]).out == cli(["init", "--list"]).out


def test_describe_template_shows_description_notes_and_init_command(cli):
    result = cli(["init", "--describe-template", "app-redis-worker"])
    assert result.code == 0
    assert "template: app-redis-worker" in result.out
    assert "description: a small multi-service stack on one node." in result.out
    assert "hpc-compose init --template app-redis-worker" in result.out


def test_describe_template_names_the_mounted_companion_folders(cli):
    result = cli(["init", "--describe-template", "llama-uv-worker"])
    assert "./llama-uv-worker" in result.out and "./models" in result.out


def test_describe_unknown_template_lists_the_available_names(cli):
    result = cli(["init", "--describe-template", "nope"])
    assert result.code == 2
    assert "unknown template 'nope'" in result.err
    assert "minimal-batch" in result.err and "host-pipeline" in result.err


def test_unknown_template_is_a_usage_error_listing_names(cli, tmp_path):
    result = cli(["init", "--template", "big-cluster", "--output", tmp_path / "c.yaml"])
    assert result.code == 2
    assert "unknown template 'big-cluster'" in result.err
    for name in hpc_compose.TEMPLATE_NAMES:
        assert name in result.err
    assert not (tmp_path / "c.yaml").exists()
    assert "Traceback" not in result.err


def test_init_without_template_asks_for_one(cli, tmp_path):
    result = cli(["init", "--output", tmp_path / "c.yaml"])
    assert result.code == 2
    assert "--template" in result.err


def test_template_name_may_carry_the_yaml_suffix(cli, tmp_path):
    result = cli(["init", "--template", "minimal-batch.yaml", "--output", tmp_path / "c.yaml"])
    assert result.code == 0
    assert "name: minimal-batch" in (tmp_path / "c.yaml").read_text()


@pytest.mark.parametrize("template", hpc_compose.TEMPLATE_NAMES)
def test_each_template_writes_a_customized_file_that_validates(cli, tmp_path, template):
    output = tmp_path / "compose.yaml"
    result = cli(["init", "--template", template, "--name", "my-app",
                  "--cache-dir", "/shared/tester/hpc-compose-cache", "--output", output], env=ENV)
    assert result.code == 0, result.err
    assert "wrote %s" % output in result.out
    document = hpc_compose.parse_yaml(output.read_text())
    assert document["name"] == "my-app"
    assert document["x-slurm"]["job_name"] == "my-app"
    assert document["x-slurm"]["cache_dir"] == "/shared/tester/hpc-compose-cache"
    original = hpc_compose.parse_yaml(open(os.path.join(EXAMPLES, template + ".yaml")).read())
    assert document["services"] == original["services"]
    validate = cli(["validate", "-f", output], env=ENV)
    assert validate.code == 0, validate.err


@pytest.mark.parametrize("template", ["minimal-batch", "host-pipeline", "training-resume"])
def test_init_keeps_every_comment_and_changes_only_the_three_keys(cli, tmp_path, template):
    output = tmp_path / "compose.yaml"
    assert cli(["init", "--template", template, "--name", "renamed", "--cache-dir",
                "/project/cache", "--output", output]).code == 0
    before = open(os.path.join(EXAMPLES, template + ".yaml")).read().splitlines()
    after = output.read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line[:2] in ("- ", "+ ")]
    assert changed, "nothing was customized"
    for line in changed:
        assert line[2:].strip().split(":")[0] in ("name", "job_name", "cache_dir"), line
    assert [l for l in before if l.lstrip().startswith("#")] == \
        [l for l in after if l.lstrip().startswith("#")]


def test_template_without_cache_dir_gets_one_under_x_slurm(cli, tmp_path):
    output = tmp_path / "compose.yaml"
    assert cli(["init", "--template", "host-pipeline", "--cache-dir", "/project/cache",
                "--output", output]).code == 0
    document = hpc_compose.parse_yaml(output.read_text())
    assert document["x-slurm"]["cache_dir"] == "/project/cache"
    assert document["x-slurm"]["runtime"] == "host"


def test_defaults_keep_template_name_and_its_cache_dir(cli, tmp_path):
    output = tmp_path / "compose.yaml"
    assert cli(["init", "--template", "minimal-batch", "--output", output]).code == 0
    document = hpc_compose.parse_yaml(output.read_text())
    assert document["name"] == "minimal-batch"
    assert document["x-slurm"]["job_name"] == "minimal-batch"
    assert document["x-slurm"]["cache_dir"] == "/shared/$USER/hpc-compose-cache"


def test_output_defaults_to_compose_yaml_in_the_current_folder(cli, tmp_path):
    assert cli(["init", "--template", "minimal-batch"], cwd=str(tmp_path)).code == 0
    assert (tmp_path / "compose.yaml").is_file()


def test_existing_output_is_not_overwritten_without_force(cli, tmp_path):
    output = tmp_path / "compose.yaml"
    output.write_text("mine\n")
    result = cli(["init", "--template", "minimal-batch", "--output", output])
    assert result.code == 2
    assert "already exists" in result.err and "--force" in result.err
    assert output.read_text() == "mine\n"


def test_force_overwrites_the_output(cli, tmp_path):
    output = tmp_path / "compose.yaml"
    output.write_text("mine\n")
    result = cli(["init", "--template", "minimal-batch", "--output", output, "--force"])
    assert result.code == 0
    assert output.read_text().startswith("# minimal-batch:")


def test_output_dash_prints_the_customized_template(cli):
    result = cli(["init", "--template", "minimal-batch", "--name", "x1", "--output", "-"])
    assert result.code == 0
    assert "\nname: x1\n" in result.out
    assert hpc_compose.parse_yaml(result.out)["x-slurm"]["job_name"] == "x1"


@pytest.mark.parametrize("value", ["my app: v2", "yes", "123", "#hash", "it's \"quoted\"",
                                   "ünïcode", "-dash", "true"])
def test_names_that_need_quoting_read_back_exactly(value):
    template = hpc_compose.load_template("minimal-batch")
    text = hpc_compose.customize_template(template.text, name=value, job_name=value,
                                          cache_dir="/c/" + value)
    document = hpc_compose.parse_yaml(text)
    assert document["name"] == value
    assert document["x-slurm"]["job_name"] == value
    assert document["x-slurm"]["cache_dir"] == "/c/" + value


def test_customize_adds_name_and_x_slurm_block_when_missing():
    text = "# header\nservices:\n  app:\n    image: alpine\n"
    result = hpc_compose.customize_template(text, name="n", job_name="n", cache_dir="/c")
    document = hpc_compose.parse_yaml(result)
    assert document == {"name": "n", "x-slurm": {"job_name": "n", "cache_dir": "/c"},
                        "services": {"app": {"image": "alpine"}}}
    assert result.startswith("# header\n")


def test_init_writes_the_files_the_template_mounts(cli, tmp_path):
    result = cli(["init", "--template", "llama-uv-worker", "--output", tmp_path / "compose.yaml"])
    assert result.code == 0, result.err
    for relative in ("llama-uv-worker/worker.py", "llama-uv-worker/prompts.txt",
                     "llama-uv-worker/README.md", "models/README.md"):
        with open(os.path.join(EXAMPLES, relative), "rb") as handle:
            assert (tmp_path / relative).read_bytes() == handle.read()
        assert "wrote %s" % (tmp_path / relative) in result.out


def test_no_files_writes_only_the_compose_file(cli, tmp_path):
    result = cli(["init", "--template", "dev-python-app", "--no-files", "--output",
                  tmp_path / "compose.yaml"])
    assert result.code == 0
    assert sorted(os.listdir(str(tmp_path))) == ["compose.yaml"]
    assert "mounts ./app" in result.out


def test_existing_companion_file_is_not_overwritten_without_force(cli, tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('mine')\n")
    result = cli(["init", "--template", "dev-python-app", "--output", tmp_path / "compose.yaml"])
    assert result.code == 2
    assert "main.py' already exists" in result.err
    assert (tmp_path / "app" / "main.py").read_text() == "print('mine')\n"
    assert not (tmp_path / "compose.yaml").exists()
    forced = cli(["init", "--template", "dev-python-app", "--force", "--output",
                  tmp_path / "compose.yaml"])
    assert forced.code == 0
    assert "rich" in (tmp_path / "app" / "main.py").read_text()


def test_template_without_mounts_writes_no_companion_files(cli, tmp_path):
    assert cli(["init", "--template", "postgres-etl", "--output", tmp_path / "c.yaml"]).code == 0
    assert os.listdir(str(tmp_path)) == ["c.yaml"]


def test_empty_name_is_refused(cli, tmp_path):
    result = cli(["init", "--template", "minimal-batch", "--name", " ", "--output",
                  tmp_path / "c.yaml"])
    assert result.code == 2


def test_vendored_single_file_without_examples_gives_a_clear_error(tmp_path):
    shutil.copy(os.path.join(REPO, "hpc_compose.py"), str(tmp_path / "hpc_compose.py"))
    result = subprocess.run([sys.executable, str(tmp_path / "hpc_compose.py"), "init", "--template",
                             "minimal-batch", "--output", str(tmp_path / "c.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 1
    assert "shipped examples are not available" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.yaml").exists()
