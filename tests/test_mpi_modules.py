"""x-slurm.mpi and x-slurm.modules: the spec, the srun line, the batch script's module loading,
and preflight's questions to `srun --mpi=list` and the module system (stand-ins record them)."""
import os

import pytest

from test_spec import failure, load, plan, service

HOST = "x-slurm:\n  runtime: host\n%sservices:\n  app:\n    command: echo hi\n    x-slurm:\n%s"


def test_mpi_as_a_string_or_a_mapping_is_the_plugin_name(hc, project):
    for form in ("pmix", "{type: pmix}"):
        spec = load(hc, project, HOST % ("", "      mpi: %s\n" % form))
        assert service(spec).slurm.mpi == "pmix"


def test_mpi_becomes_srun_mpi_of_the_service_step(hc, project):
    runtime_plan = hc.build_runtime_plan(plan(hc, project, HOST % ("", "      mpi: pmi2\n")))
    assert "--mpi=pmi2" in hc.service_srun_argv(runtime_plan, 0)


def test_an_mpi_type_that_is_no_plugin_name_is_a_located_error(hc, project):
    error = failure(hc, project, HOST % ("", "      mpi: \"pm ix\"\n"))
    assert error.path == "services.app.x-slurm.mpi" and error.line == 7
    assert "srun --mpi=list" in error.hint


def test_mpi_mapping_without_type_is_an_error(hc, project):
    error = failure(hc, project, HOST % ("", "      mpi: {}\n"))
    assert "needs type" in error.message


def test_job_modules_come_before_the_service_s_own_with_their_lines(hc, project):
    text = HOST % ("  modules: [gcc/12.2]\n  modules_path: [mods]\n",
                   "      modules:\n        - openmpi\n")
    result = plan(hc, project, text)
    app = result.services[0]
    assert [m.name for m in app.modules] == ["gcc/12.2", "openmpi"]
    assert [m.location.rsplit(":", 1)[1] for m in app.modules] == ["3", "10"]
    assert app.module_paths == (os.path.join(str(project.root), "mods"),)


@pytest.mark.parametrize("name", ["-f", "gcc 12", ""])
def test_a_module_name_with_blanks_or_an_option_is_a_located_error(hc, project, name):
    error = failure(hc, project, HOST % ("  modules: [\"%s\"]\n" % name, ""))
    assert error.path.startswith("x-slurm.modules")


def test_the_script_loads_modules_in_the_service_s_shell_before_srun(hc, project):
    result = plan(hc, project, HOST % ("  modules_path: [/opt/mods]\n", "      modules: [gcc]\n"))
    script = hc.render_script(hc.build_runtime_plan(result))
    assert "    load_modules app /opt/mods -- gcc || exit 1\n    exec env" in script
    assert "load_modules() {" in script and "/etc/profile.d/lmod.sh" in script


def test_a_script_without_modules_has_no_module_code(hc, project):
    script = hc.render_script(hc.build_runtime_plan(plan(hc, project, HOST % ("", "      gpus: 1\n"))))
    assert "load_modules" not in script


def test_srun_mpi_list_output_is_read_with_its_pmix_versions(hc):
    text = "MPI plugin types are...\n\tpmix\n\tnone\n\tpmi2\nspecific pmix plugin versions " \
           "available: pmix_v4,pmix_v5\n"
    assert hc._mpi_types(text) == {"pmix", "none", "pmi2", "pmix_v4", "pmix_v5"}


def _srun_standin(tmp_path, types):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\necho \"$@\" >>%s/srun.args\nprintf 'MPI plugin types are...\\n"
                    "%s'\n" % (tmp_path, "".join("\\t%s\\n" % t for t in types)))
    srun.chmod(0o755)
    return str(srun)


def test_preflight_refuses_an_mpi_type_the_cluster_lacks(hc, project, tmp_path):
    runtime_plan = hc.build_runtime_plan(plan(hc, project, HOST % ("", "      mpi: pmix_v5\n")))
    findings = hc._preflight_mpi(runtime_plan.plan, _srun_standin(tmp_path, ["pmix", "pmi2"]))
    assert [f.level for f in findings] == ["error"]
    assert "no MPI plugin 'pmix_v5'" in findings[0].message and "pmi2, pmix" in findings[0].message
    assert (tmp_path / "srun.args").read_text() == "--mpi=list\n"


def test_preflight_accepts_an_mpi_type_the_cluster_has(hc, project, tmp_path):
    runtime_plan = hc.build_runtime_plan(plan(hc, project, HOST % ("", "      mpi: pmi2\n")))
    findings = hc._preflight_mpi(runtime_plan.plan, _srun_standin(tmp_path, ["pmix", "pmi2"]))
    assert [f.level for f in findings] == ["ok"]


def _module_standin(tmp_path, known):
    """A stand-in for the site's module system: an init script defining `module`, which knows
    ``known`` names and records what it was asked."""
    init = tmp_path / "modules-init.sh"
    init.write_text("module() { echo \"$*\" >>%s/module.args; case \"$2\" in %s) return 0;; esac;"
                    " [ \"$1\" = use ]; }\n" % (tmp_path, "|".join(known)))
    return str(init)


@pytest.mark.parametrize("variable", ["LMOD_PKG", "MODULESHOME"])
def test_preflight_names_a_missing_module_and_its_line(hc, project, tmp_path, monkeypatch,
                                                       variable):
    init = _module_standin(tmp_path, ["gcc"])
    os.makedirs(str(tmp_path / "site" / "init"))
    os.rename(init, str(tmp_path / "site" / "init" / "bash"))
    for name in ("LMOD_PKG", "MODULESHOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "site"))
    monkeypatch.delenv("BASH_FUNC_module%%", raising=False)
    result = plan(hc, project, HOST % ("  modules: [gcc, nosuch/1.0]\n", ""))
    findings = hc._preflight_modules(result)
    assert [(f.level, f.message.split(" (")[0]) for f in findings] == [
        ("ok", "module 'gcc' is available"), ("error", "module 'nosuch/1.0'")]
    assert "compose.yaml:3) is not available" in findings[1].message
    assert (tmp_path / "module.args").read_text() == "is-avail gcc\nis-avail nosuch/1.0\n"


def test_preflight_without_a_module_system_is_an_error(hc, project, monkeypatch):
    monkeypatch.setattr(hc, "_MODULE_CHECK_SHELL", "echo no-module-command")
    findings = hc._preflight_modules(plan(hc, project, HOST % ("  modules: [gcc]\n", "")))
    assert [f.level for f in findings] == ["error"]
    assert "no environment modules" in findings[0].message


def test_schema_knows_mpi_and_modules(hc):
    schema = hc._field_schema([f for f in hc._SERVICE_SLURM_FIELDS if f.name == "mpi"][0])
    assert schema["anyOf"][1]["required"] == ["type"]
    assert [f.name for f in hc._SLURM_FIELDS if f.name.startswith("modules")] == [
        "modules", "modules_path"]
