"""Interpolation ($VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, :? ? :+ +, $$) and the .env file."""
import os

import pytest

VARS = {"NAME": "value", "EMPTY": "", "HOME": "/home/me"}


def expand(hc, text, **options):
    return hc.interpolate(text, VARS, **options)


def test_plain_text_is_returned_unchanged(hc):
    assert expand(hc, "no dollars here") == "no dollars here"


def test_dollar_name_expands(hc):
    assert expand(hc, "a-$NAME-b") == "a-value-b"


def test_braced_name_expands(hc):
    assert expand(hc, "${NAME}suffix") == "valuesuffix"


def test_name_ends_at_first_non_name_character(hc):
    assert expand(hc, "$NAME.txt") == "value.txt"


def test_colon_dash_default_applies_when_unset(hc):
    assert expand(hc, "${MISSING:-fallback}") == "fallback"


def test_colon_dash_default_applies_when_empty(hc):
    assert expand(hc, "${EMPTY:-fallback}") == "fallback"


def test_colon_dash_default_ignored_when_set(hc):
    assert expand(hc, "${NAME:-fallback}") == "value"


def test_dash_default_applies_only_when_unset(hc):
    assert expand(hc, "${MISSING-fallback}") == "fallback"


def test_dash_default_keeps_empty_value(hc):
    assert expand(hc, "[${EMPTY-fallback}]") == "[]"


def test_default_may_be_empty(hc):
    assert expand(hc, "[${MISSING:-}]") == "[]"


def test_default_is_itself_interpolated(hc):
    assert expand(hc, "${MISSING:-$HOME/x}") == "/home/me/x"


def test_nested_braced_default(hc):
    assert expand(hc, "${MISSING:-${NAME}}") == "value"


def test_double_dollar_is_a_literal_dollar(hc):
    assert expand(hc, "cost: $$5 and $$NAME") == "cost: $5 and $NAME"


def test_dollar_before_non_name_character_stays_literal(hc):
    assert expand(hc, "echo $(date) $1 $ end") == "echo $(date) $1 $ end"


def test_trailing_dollar_stays_literal(hc):
    assert expand(hc, "price$") == "price$"


def test_missing_variable_is_an_error_naming_it(hc):
    with pytest.raises(hc.SpecError) as info:
        hc.interpolate("$NOPE", VARS, path="services.app.image", file="/x/compose.yaml", line=7,
                       column=12)
    error = info.value
    assert "NOPE" in error.message
    assert "not set" in error.message
    assert (error.file, error.line, error.column) == ("/x/compose.yaml", 7, 12)
    assert error.path == "services.app.image"
    assert "${NOPE:-value}" in error.hint


def test_missing_braced_variable_is_an_error(hc):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, "${NOPE}")
    assert "'NOPE'" in info.value.message


def test_unset_is_empty_option_expands_missing_to_empty(hc):
    assert expand(hc, "repo/$NOPE:tag", unset_is_empty=True) == "repo/:tag"


def test_keep_option_leaves_named_variables_as_written(hc):
    assert expand(hc, "./out/${SLURM_JOB_ID}/$SLURM_JOB_ID/$NAME",
                  keep=("SLURM_JOB_ID",)) == "./out/${SLURM_JOB_ID}/$SLURM_JOB_ID/value"


def test_unterminated_brace_is_an_error(hc):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, "${NAME")
    assert "unterminated" in info.value.message


def test_empty_braces_are_an_error(hc):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, "${}")
    assert "invalid variable expression" in info.value.message


def test_name_starting_with_digit_in_braces_is_an_error(hc):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, "${1X}")
    assert "invalid variable expression" in info.value.message


@pytest.mark.parametrize("text", ["${NAME:=x}", "${NAME#x}", "${NAME%x}", "${NAME:0:2}"])
def test_bash_only_operators_are_refused(hc, text):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, text)
    assert "unsupported variable expression" in info.value.message


@pytest.mark.parametrize("text, expected", [
    ("${NAME:?must be set}", "value"), ("${NAME?must be set}", "value"),
    ("${EMPTY?must be set}", ""),
])
def test_required_forms_expand_a_set_variable(hc, text, expected):
    assert expand(hc, text) == expected


@pytest.mark.parametrize("text, message", [
    ("${MISSING:?give the model path}", "variable 'MISSING' is empty or not set: give the model "
                                        "path"),
    ("${EMPTY:?no empty}", "variable 'EMPTY' is empty or not set: no empty"),
    ("${MISSING?unset}", "variable 'MISSING' is not set: unset"),
    ("${MISSING?}", "variable 'MISSING' is not set"),
    ("${MISSING:?needs ${NAME}}", "variable 'MISSING' is empty or not set: needs value"),
])
def test_required_forms_fail_with_the_message_and_the_location(hc, text, message):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, text, path="services.app.image", file="/p/compose.yaml", line=3, column=12)
    error = info.value
    assert (error.message, error.file, error.line, error.column, error.path) == (
        message, "/p/compose.yaml", 3, 12, "services.app.image")


@pytest.mark.parametrize("text, expected", [
    ("${NAME:+alt}", "alt"), ("${EMPTY:+alt}", ""), ("${MISSING:+alt}", ""),
    ("${NAME+alt}", "alt"), ("${EMPTY+alt}", "alt"), ("${MISSING+alt}", ""),
    ("${NAME:+--flag=$NAME}", "--flag=value"),
])
def test_alternative_forms(hc, text, expected):
    assert expand(hc, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("${MISSING:-${OTHER:-c}}", "c"), ("${MISSING:-${NAME:-c}}", "value"),
    ("${MISSING-${EMPTY:-${HOME}}}", "/home/me"), ("${NAME:+${MISSING:-d}}", "d"),
])
def test_nested_defaults(hc, text, expected):
    assert expand(hc, text) == expected


def test_dotenv_grammar(hc, tmp_path):
    path = tmp_path / ".env"
    path.write_text("# comment\n\nPLAIN=1\nexport EXPORTED=yes\nDQ=\"double quoted\"\n"
                    "SQ='single $NOT'\n  SPACED = padded  \nEQUALS=a=b\nEMPTY=\n"
                    "HASH=a # not a comment\n")
    assert hc.load_dotenv(str(path)) == {
        "PLAIN": "1", "EXPORTED": "yes", "DQ": "double quoted", "SQ": "single $NOT",
        "SPACED": "padded", "EQUALS": "a=b", "EMPTY": "", "HASH": "a # not a comment"}


def test_dotenv_missing_file_is_empty(hc, tmp_path):
    assert hc.load_dotenv(str(tmp_path / ".env")) == {}


def test_dotenv_line_without_equals_is_an_error_with_line(hc, tmp_path):
    path = tmp_path / ".env"
    path.write_text("A=1\nthis is wrong\n")
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(path))
    assert info.value.line == 2
    assert info.value.file == str(path)
    assert "KEY=VALUE" in info.value.message


def test_dotenv_invalid_name_is_an_error_naming_the_line_not_its_text(hc, tmp_path):
    path = tmp_path / ".env"
    path.write_text("1BAD=x\n")
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(path))
    assert info.value.line == 1
    assert "valid variable name" in info.value.message and "1BAD" not in info.value.message


def test_dotenv_directory_is_an_error(hc, tmp_path):
    (tmp_path / ".env").mkdir()
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(tmp_path / ".env"))
    assert "directory" in info.value.message


def test_dotenv_unreadable_is_an_error(hc, tmp_path):
    # A symlink loop cannot be read even by root (the tests may run as root).
    os.symlink(".env", str(tmp_path / ".env"))
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(tmp_path / ".env"))
    assert "cannot read .env" in info.value.message
    assert info.value.file == str(tmp_path / ".env")
    assert info.value.exit_code == 2


def test_dotenv_dangling_symlink_is_an_error(hc, tmp_path):
    os.symlink("missing-target", str(tmp_path / ".env"))
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(tmp_path / ".env"))
    assert "cannot read .env" in info.value.message


def test_dotenv_not_utf8_is_an_error_with_line(hc, tmp_path):
    path = tmp_path / ".env"
    path.write_bytes(b"A=1\nB=\xff\xfe\n")
    with pytest.raises(hc.SpecError) as info:
        hc.load_dotenv(str(path))
    assert info.value.line == 2


def test_process_environment_wins_over_dotenv(hc, tmp_path):
    (tmp_path / ".env").write_text("A=from-dotenv\nB=only-dotenv\n")
    variables = hc._build_variables(str(tmp_path), {"A": "from-shell"})
    assert variables["A"] == "from-shell"
    assert variables["B"] == "only-dotenv"


def test_dotenv_fills_variable_set_to_empty_only_if_missing(hc, tmp_path):
    (tmp_path / ".env").write_text("A=from-dotenv\n")
    assert hc._build_variables(str(tmp_path), {"A": ""})["A"] == ""


def test_missing_slurm_variable_hint_explains_load_time(hc):
    with pytest.raises(hc.SpecError) as info:
        expand(hc, "slurm-${SLURM_JOB_ID}.out")
    assert "%j" in info.value.hint
    assert "$$SLURM_JOB_ID" in info.value.hint


# compose-go's own cases (template_test.go: TestValueWithCurlyBracesDefault and its no-value twin):
# braces inside a default are counted, so the expression ends at the brace that balances them.
@pytest.mark.parametrize("text, variables, expected", [
    ('ok ${JSON:-{"json":1}}', {"JSON": '{"json":2}'}, 'ok {"json":2}'),
    ('ok ${JSON-{"json":1}}', {"JSON": '{"json":2}'}, 'ok {"json":2}'),
    ('ok ${missing:-{"json":1}}', {}, 'ok {"json":1}'),
    ('ok ${missing-{"json":1}}', {}, 'ok {"json":1}'),
    ("ok ${UNSET_VAR-${FOO} ${FOO}}", {"FOO": "first"}, "ok first first"),
])
def test_braces_inside_a_default_are_counted_as_compose_go_counts_them(hc, text, variables,
                                                                      expected):
    assert hc.interpolate(text, variables) == expected
