"""The YAML reader: core-schema values, every construct of the subset, every refusal with its
position, source marks, and the corpus of realistic compose files under tests/yaml_corpus/."""
import glob
import json
import math
import os

import pytest

import hpc_compose
from hpc_compose import Mark, YamlError, parse_yaml_document, parse_yaml

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yaml_corpus")


def yaml_error(text, filename=None):
    """The YamlError that reading ``text`` raises."""
    with pytest.raises(YamlError) as info:
        parse_yaml_document(text, filename=filename)
    return info.value


def position(error):
    return (error.line, error.column)


# -- core schema ------------------------------------------------------------------------------

def test_yes_no_on_off_are_strings():
    assert parse_yaml("a: yes\nb: no\nc: on\nd: off\ne: Yes\nf: y") == {
        "a": "yes", "b": "no", "c": "on", "d": "off", "e": "Yes", "f": "y"}


def test_sexagesimal_time_is_a_string():
    assert parse_yaml("time: 00:10:00\nport: 22:22") == {"time": "00:10:00", "port": "22:22"}


def test_true_and_false_spellings_are_booleans():
    assert parse_yaml("[true, True, TRUE, false, False, FALSE]") == [True, True, True,
                                                                      False, False, False]


def test_mixed_case_boolean_words_stay_strings():
    assert parse_yaml("[tRUE, fALSE, truE]") == ["tRUE", "fALSE", "truE"]


def test_null_spellings_and_empty_values_are_none():
    assert parse_yaml("a: null\nb: Null\nc: NULL\nd: ~\ne:\nf: [~, null]") == {
        "a": None, "b": None, "c": None, "d": None, "e": None, "f": [None, None]}


def test_decimal_integers_take_an_optional_sign():
    assert parse_yaml("[0, 12, +12, -3, 007]") == [0, 12, 12, -3, 7]


def test_hexadecimal_and_octal_integers():
    assert parse_yaml("[0x1F, 0xff, 0o17, 0o0]") == [31, 255, 15, 0]


def test_signed_or_malformed_hex_and_octal_stay_strings():
    assert parse_yaml("[-0x1F, 0x, 0xG, 0o8, 0b101, 1_000]") == [
        "-0x1F", "0x", "0xG", "0o8", "0b101", "1_000"]


def test_floats_with_fraction_and_exponent():
    values = parse_yaml("[1.10, 1e3, -1.5e-3, .5, 1., +2.5E+2]")
    assert values == [1.1, 1000.0, -0.0015, 0.5, 1.0, 250.0]
    assert all(type(value) is float for value in values)


def test_infinity_and_nan_spellings():
    values = parse_yaml("[.inf, .Inf, .INF, +.inf, -.inf, -.Inf, .nan, .NaN, .NAN]")
    assert values[:5] == [math.inf] * 4 + [-math.inf]
    assert values[5] == -math.inf
    assert all(math.isnan(value) for value in values[6:])


def test_things_that_only_look_numeric_stay_strings():
    assert parse_yaml("[., 1.2.3, 1e, e3, +, -.5x, .infinity, nan]") == [
        ".", "1.2.3", "1e", "e3", "+", "-.5x", ".infinity", "nan"]


def test_quoted_values_are_always_strings():
    assert parse_yaml("a: '1'\nb: \"true\"\nc: 'null'\nd: \"\"") == {
        "a": "1", "b": "true", "c": "null", "d": ""}


def test_plain_scalar_text_is_kept_in_its_mark():
    document = parse_yaml_document("version: 1.10\nflag: true\nmask: 0x1F\nwhen: 00:10:00\nnone: ~")
    assert document.data["version"] == 1.1
    assert document.marks[("version",)].text == "1.10"
    assert document.marks[("flag",)].text == "true"
    assert document.marks[("mask",)].text == "0x1F"
    assert document.marks[("when",)].text == "00:10:00"
    assert document.marks[("none",)].text == "~"


def test_mapping_keys_resolve_with_the_core_schema():
    document = parse_yaml_document("1: one\nfalse: no\n'2': two\n~: none")
    assert document.data == {1: "one", False: "no", "2": "two", None: "none"}
    assert document.marks[("1",)].text == "one"
    assert document.marks[("False",)].text == "no"
    assert document.key_marks[("None",)].text == "~"


# -- block collections ------------------------------------------------------------------------

def test_nested_block_mappings():
    assert parse_yaml("a:\n  b:\n    c: 1\n  d: 2\ne: 3") == {"a": {"b": {"c": 1}, "d": 2},
                                                            "e": 3}


def test_block_sequence_of_compact_mappings():
    text = "- name: a\n  image: x\n- name: b\n  image: y\n"
    assert parse_yaml(text) == [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]


def test_sequence_may_sit_at_the_indentation_of_its_key():
    assert parse_yaml("a:\n- 1\n- 2\nb: 3") == {"a": [1, 2], "b": 3}


def test_nested_compact_sequences():
    assert parse_yaml("- - a\n  - b\n- - - c\n") == [["a", "b"], [["c"]]]


def test_sequence_item_on_the_next_line():
    assert parse_yaml("-\n  a: 1\n-\n  - x\n") == [{"a": 1}, ["x"]]


def test_empty_values_in_mappings_and_sequences_are_none():
    assert parse_yaml("a:\nb:\n  -\n  - ''\nc:") == {"a": None, "b": [None, ""], "c": None}


def test_keys_may_contain_spaces_and_colons_not_followed_by_space():
    assert parse_yaml("key with spaces: v\nhttp://x:80/p: url\na:b: c") == {
        "key with spaces": "v", "http://x:80/p": "url", "a:b": "c"}


def test_quoted_keys():
    assert parse_yaml("\"a: b\": 1\n'c # d': 2\n\"\": 3") == {"a: b": 1, "c # d": 2, "": 3}


def test_space_before_the_key_colon_is_allowed():
    assert parse_yaml("a : 1\n'b'  : 2") == {"a": 1, "b": 2}


def test_value_separated_by_a_tab():
    assert parse_yaml("a:\tvalue") == {"a": "value"}


def test_root_mapping_may_be_indented():
    assert parse_yaml("  a: 1\n  b: 2\n") == {"a": 1, "b": 2}


# -- plain and quoted scalars ---------------------------------------------------------------

def test_multi_line_plain_scalar_folds_into_spaces():
    assert parse_yaml("a: one\n  two\n    three\nb: 2") == {"a": "one two three", "b": 2}


def test_blank_line_inside_a_plain_scalar_becomes_a_newline():
    assert parse_yaml("a: one\n\n  two\n\n\n  three") == {"a": "one\ntwo\n\nthree"}


def test_multi_line_plain_scalar_is_never_resolved_to_a_number():
    assert parse_yaml("a: 1\n  2") == {"a": "1 2"}


def test_comment_ends_a_plain_scalar():
    assert parse_yaml("a: value # note\n  # more\nb: x") == {"a": "value", "b": "x"}


def test_hash_without_a_space_before_it_is_part_of_the_value():
    assert parse_yaml("a: C#\nb: x#y\nc: '#'") == {"a": "C#", "b": "x#y", "c": "#"}


def test_plain_scalars_may_start_with_indicator_like_characters():
    assert parse_yaml("[-1, -x, :x, ?x, a-b]") == [-1, "-x", ":x", "?x", "a-b"]


def test_single_quoted_doubled_quote_is_a_quote():
    assert parse_yaml("a: 'it''s ''quoted'''") == {"a": "it's 'quoted'"}


def test_single_quoted_backslash_is_literal():
    assert parse_yaml(r"a: 'C:\new\path'") == {"a": "C:\\new\\path"}


def test_single_quoted_string_folds_line_breaks():
    assert parse_yaml("a: 'one\n  two\n\n  three'") == {"a": "one two\nthree"}


def test_double_quoted_escapes():
    text = r'a: "\0\a\b\t\	\n\v\f\r\e\ \"\/\\\N\_\L\P"'
    assert parse_yaml(text) == {"a": "\0\a\b\t\t\n\v\f\r\x1b \"/\\\x85\xa0\u2028\u2029"}


def test_double_quoted_hex_and_unicode_escapes():
    assert parse_yaml(r'a: "\x41\u00e9\U0001F600"') == {"a": "A\u00e9\U0001F600"}


def test_surrogate_escape_is_refused():
    error = yaml_error('a: "\\ud800"')
    assert position(error) == (1, 5)
    assert "not a valid Unicode code point" in error.message


def test_double_quoted_string_folds_line_breaks_and_trims_lines():
    assert parse_yaml('a: "one   \n     two\n\n  three"') == {"a": "one two\nthree"}


def test_double_quoted_escaped_line_break_joins_lines():
    assert parse_yaml('a: "abc \\\n     def"') == {"a": "abc def"}
    assert parse_yaml('a: "abc\\\n  \\ def"') == {"a": "abc def"}


def test_escaped_backslash_at_line_end_is_not_a_line_continuation():
    assert parse_yaml('a: "x\\\\\n  y"') == {"a": "x\\ y"}


def test_unknown_escape_is_refused_at_the_backslash():
    error = yaml_error('a: "bad \\q"')
    assert position(error) == (1, 9)
    assert "unknown escape" in error.message


def test_short_hex_escape_is_refused():
    error = yaml_error('a: "\\x4"')
    assert position(error) == (1, 5)
    assert "2 hexadecimal digits" in error.message


def test_unterminated_double_quote_points_at_the_opening_quote():
    error = yaml_error('a: 1\nb: "open\nc: 2\n')
    assert position(error) == (2, 4)
    assert "expected a closing" in error.message


def test_unterminated_single_quote_points_at_the_opening_quote():
    error = yaml_error("a: 'open")
    assert position(error) == (1, 4)


def test_text_after_a_quoted_value_is_refused():
    error = yaml_error('a: "x" y')
    assert position(error) == (1, 8)
    assert "expected a comment or the end of the line" in error.message


# -- block scalars --------------------------------------------------------------------------

def test_literal_block_scalar_keeps_lines_and_clips_the_end():
    assert parse_yaml("a: |\n  one\n    two\n\n  three\n\n\nb: 1") == {
        "a": "one\n  two\n\nthree\n", "b": 1}


def test_literal_block_scalar_strip_chomping():
    assert parse_yaml("a: |-\n  one\n  two\n\n") == {"a": "one\ntwo"}


def test_literal_block_scalar_keep_chomping():
    assert parse_yaml("a: |+\n  one\n\n\nb: 1") == {"a": "one\n\n\n", "b": 1}


def test_folded_block_scalar_joins_lines():
    assert parse_yaml("a: >\n  one\n  two\n\n  three\n") == {"a": "one two\nthree\n"}


def test_folded_block_scalar_keeps_more_indented_lines():
    text = "a: >\n  para\n    code 1\n    code 2\n  next\n"
    assert parse_yaml(text) == {"a": "para\n  code 1\n  code 2\nnext\n"}


def test_folded_block_scalar_with_strip_and_keep():
    assert parse_yaml("a: >-\n  x\n  y\nb: >+\n  z\n\n") == {"a": "x y", "b": "z\n\n"}


def test_block_scalar_indentation_indicator():
    assert parse_yaml("a: |2\n    indented\n  base\n") == {"a": "  indented\nbase\n"}


def test_block_scalar_indicators_in_either_order():
    assert parse_yaml("a: |-2\n   x\nb: |2-\n   y\n") == {"a": " x", "b": " y"}


def test_block_scalar_keeps_comment_like_lines():
    assert parse_yaml("a: |\n  # not a comment\n  x # nor this\n# a real comment\nb: 1") == {
        "a": "# not a comment\nx # nor this\n", "b": 1}


def test_block_scalar_header_may_carry_a_comment():
    assert parse_yaml("a: | # the script\n  echo hi\n") == {"a": "echo hi\n"}


def test_block_scalar_at_end_of_text_without_final_newline():
    assert parse_yaml("a: |\n  x") == {"a": "x"}
    assert parse_yaml("a: |\n  x\n") == {"a": "x\n"}


def test_empty_block_scalar():
    assert parse_yaml("a: |\nb: >\n\nc: |+\n\n") == {"a": "", "b": "", "c": "\n"}


def test_block_scalar_as_sequence_item():
    assert parse_yaml("- |\n  one\n- >-\n  two\n  three\n") == ["one\n", "two three"]


def test_block_scalar_with_leading_blank_lines():
    assert parse_yaml("a: |\n\n  x\n") == {"a": "\nx\n"}


def test_folded_block_scalar_with_bullets_and_final_empty_lines():
    text = (">\n\n folded\n line\n\n next\n line\n   * bullet\n\n   * list\n   * lines\n\n"
            " last\n line\n\n# Comment\n")
    assert parse_yaml(text) == ("\nfolded line\nnext line\n  * bullet\n\n  * list\n  * lines\n"
                                "\nlast line\n")


def test_keep_chomping_keeps_whitespace_only_lines_beyond_the_indentation():
    assert parse_yaml("--- |+\n ab\n \n  \n...\n") == "ab\n\n \n"


def test_block_scalar_indentation_detected_past_blank_lines():
    text = "- |\n detected\n- >\n \n  \n  # detected\n- |1\n  explicit\n"
    assert parse_yaml(text) == ["detected\n", "\n\n# detected\n", " explicit\n"]


def test_bad_block_scalar_header_is_refused():
    error = yaml_error("a: |x\n  y\n")
    assert position(error) == (1, 5)
    assert "chomping indicator" in error.message


def test_zero_indentation_indicator_is_refused():
    error = yaml_error("a: |0\n  y\n")
    assert position(error) == (1, 5)


# -- flow collections -----------------------------------------------------------------------

def test_nested_flow_collections():
    assert parse_yaml('a: [1, [2, 3], {b: c, d: [e]}, "q", \'r\']') == {
        "a": [1, [2, 3], {"b": "c", "d": ["e"]}, "q", "r"]}


def test_multi_line_flow_mapping_with_trailing_comma():
    text = "a: {\n  x: 1,   # one\n  y: [2,\n      3],\n}\nb: 4"
    assert parse_yaml(text) == {"a": {"x": 1, "y": [2, 3]}, "b": 4}


def test_multi_line_flow_sequence_closing_at_column_one():
    assert parse_yaml("command: [\n  \"python\",\n  \"-c\",\n]\n") == {
        "command": ["python", "-c"]}


def test_empty_flow_collections():
    assert parse_yaml("a: []\nb: {}\nc: [ ]") == {"a": [], "b": {}, "c": []}


def test_flow_mapping_key_without_value_is_none():
    assert parse_yaml("{a, b: 1, c: }") == {"a": None, "b": 1, "c": None}


def test_flow_sequence_single_pair_mapping():
    assert parse_yaml("[a: 1, b, c: [2]]") == [{"a": 1}, "b", {"c": [2]}]


def test_json_style_keys_need_no_space_after_the_colon():
    assert parse_yaml('{"a":1, "b":[true,null]}') == {"a": 1, "b": [True, None]}


def test_colon_inside_flow_plain_scalar():
    assert parse_yaml("[http://x:80/a, a:b]") == ["http://x:80/a", "a:b"]


def test_flow_plain_scalar_may_span_lines():
    assert parse_yaml("[one\n  two, three]") == ["one two", "three"]


def test_flow_collection_at_the_root():
    assert parse_yaml("[1, 2]") == [1, 2]
    assert parse_yaml("{a: b}") == {"a": "b"}


def test_unterminated_flow_sequence_points_at_the_bracket():
    error = yaml_error("a: 1\nb: [x, y\n")
    assert position(error) == (2, 4)
    assert "expected a closing ']'" in error.message


def test_missing_comma_in_flow_sequence_is_refused():
    error = yaml_error("a: ['x' 'y']")
    assert position(error) == (1, 9)
    assert "expected ',' or ']'" in error.message


def test_multi_line_implicit_flow_key_is_refused():
    error = yaml_error("a: [b\n  : c]")
    assert position(error) == (1, 5)
    assert "fit on one line" in error.message


def test_flow_mapping_key_may_have_its_colon_on_the_next_line():
    assert parse_yaml('{ "foo"\n  :bar }') == {"foo": "bar"}


def test_block_sequence_entry_inside_flow_is_refused():
    error = yaml_error("a: [- x]")
    assert position(error) == (1, 5)


def test_block_scalar_inside_flow_is_refused():
    error = yaml_error("a: [|\n  x]")
    assert position(error) == (1, 5)


# -- comments ---------------------------------------------------------------------------------

def test_comments_everywhere():
    text = ("# head\n"
            "a:   # after key\n"
            "  # before entry\n"
            "  - x   # after item\n"
            "# at column one inside the sequence\n"
            "  - [y, # inside flow\n"
            "     z] # after flow\n"
            "b: 'q' # after quoted\n"
            "   # indented trailing comment\n"
            "# tail\n")
    assert parse_yaml(text) == {"a": ["x", ["y", "z"]], "b": "q"}


# -- anchors, aliases, merge keys -------------------------------------------------------------

def test_alias_repeats_an_anchored_scalar():
    assert parse_yaml("a: &v 1.10\nb: *v\nc: [*v]") == {"a": 1.1, "b": 1.1, "c": [1.1]}


def test_alias_of_a_collection_is_an_independent_copy():
    data = parse_yaml("a: &m {x: [1]}\nb: *m")
    assert data["b"] == {"x": [1]}
    data["b"]["x"].append(2)
    assert data["a"] == {"x": [1]}


def test_anchor_on_its_own_line_before_a_block_mapping():
    assert parse_yaml("base: &b\n  x: 1\nuse: *b") == {"base": {"x": 1}, "use": {"x": 1}}


def test_anchor_before_a_sequence_at_the_key_indentation():
    assert parse_yaml("a: &s\n- 1\nb: *s") == {"a": [1], "b": [1]}


def test_anchored_quoted_value_containing_colon_space_in_a_sequence():
    assert parse_yaml('- &a "x: y"\n- *a') == ["x: y", "x: y"]


def test_later_anchor_with_the_same_name_replaces_the_earlier_one():
    assert parse_yaml("a: &x 1\nb: *x\nc: &x 2\nd: *x") == {"a": 1, "b": 1, "c": 2, "d": 2}


def test_merge_key_copies_missing_keys():
    text = "base: &b\n  image: x\n  env: {A: 1}\napp:\n  <<: *b\n  command: run\n"
    assert parse_yaml(text)["app"] == {"image": "x", "env": {"A": 1}, "command": "run"}


def test_explicit_keys_win_over_merged_keys_wherever_they_are():
    text = "b: &b {x: 1, y: 2}\nfirst:\n  x: 10\n  <<: *b\nlast:\n  <<: *b\n  x: 10\n"
    data = parse_yaml(text)
    assert data["first"] == {"x": 10, "y": 2}
    assert data["last"] == {"x": 10, "y": 2}


def test_earlier_mappings_in_a_merge_list_win():
    text = "a: &a {x: a, y: a}\nb: &b {x: b, z: b}\nc:\n  <<: [*a, *b]\n"
    assert parse_yaml(text)["c"] == {"x": "a", "y": "a", "z": "b"}


def test_merge_key_with_an_inline_mapping():
    assert parse_yaml("a:\n  <<: {x: 1}\n  y: 2") == {"a": {"x": 1, "y": 2}}


def test_merge_key_inside_a_flow_mapping():
    text = "a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\nc: {<<: [*a, {z: 1}], y: 0}\n"
    data = parse_yaml(text)
    assert data["b"] == {"x": 3, "y": 2}
    assert data["c"] == {"x": 1, "y": 0, "z": 1}


def test_quoted_merge_key_is_an_ordinary_key():
    assert parse_yaml("a:\n  '<<': 1") == {"a": {"<<": 1}}


def test_merge_of_a_scalar_is_refused_at_the_merge_key():
    error = yaml_error("a: &s text\nb:\n  <<: *s\n")
    assert position(error) == (3, 3)
    assert "mapping or a list of mappings" in error.message


def test_two_merge_keys_in_one_mapping_are_duplicates():
    error = yaml_error("a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n")
    assert position(error) == (4, 3)


def test_alias_marks_point_at_the_anchored_definition():
    document = parse_yaml_document("base: &b\n  version: 1.10\nuse: *b\n")
    assert document.marks[("use", "version")] == Mark(2, 12, "1.10")
    assert document.key_marks[("use", "version")] == Mark(2, 3, "version")


def test_merged_value_marks_point_at_their_definition():
    text = "x-common: &c\n  image: nginx\nservices:\n  app:\n    <<: *c\n    command: run\n"
    document = parse_yaml_document(text)
    assert document.marks[("services", "app", "image")] == Mark(2, 10, "nginx")
    assert document.key_marks[("services", "app", "image")] == Mark(2, 3, "image")
    assert document.marks[("services", "app", "command")] == Mark(6, 14, "run")


def test_explicit_key_keeps_its_own_mark_over_a_merged_one():
    document = parse_yaml_document("b: &b {x: 1}\nm:\n  <<: *b\n  x: 2\n")
    assert document.marks[("m", "x")] == Mark(4, 6, "2")


def test_aliased_mapping_keeps_what_it_merged():
    text = ("base: &base {image: x, env: {A: 1}}\n"
            "svc: &svc\n  <<: *base\n  command: run\n"
            "copy: *svc\n")
    document = parse_yaml_document(text)
    assert document.data["copy"] == {"image": "x", "env": {"A": 1}, "command": "run"}
    assert document.marks[("copy", "image")] == Mark(1, 21, "x")
    assert document.marks[("copy", "command")] == Mark(4, 12, "run")


def test_merge_list_with_a_scalar_is_refused():
    error = yaml_error("a: &a {x: 1}\nb:\n  <<: [*a, 2]\n")
    assert position(error) == (3, 3)


def test_alias_inside_flow_collections():
    document = parse_yaml_document("v: &v 1.10\nl: [*v, {k: *v}]\n")
    assert document.data["l"] == [1.1, {"k": 1.1}]
    assert document.marks[("l", 1, "k")].text == "1.10"


def test_undefined_alias_is_refused_at_the_alias():
    error = yaml_error("a: 1\nb: *nope\n")
    assert position(error) == (2, 4)
    assert "undefined alias '*nope'" in error.message


def test_alias_to_an_enclosing_node_is_refused():
    error = yaml_error("a: &a [1, *a]")
    assert "undefined alias" in error.message


def test_alias_bomb_is_refused_with_a_clear_error():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    previous = "a"
    for name in "bcdefghi":
        lines.append("%s: &%s [%s]" % (name, name, ", ".join(["*" + previous] * 9)))
        previous = name
    error = yaml_error("\n".join(lines))
    assert "aliases expand this document" in error.message
    assert error.line is not None and error.line <= 9


def test_absurdly_deep_nesting_is_refused_before_the_stack_overflows():
    error = yaml_error("a: " + "[" * 150 + "]" * 150)
    assert position(error) == (1, 103)
    assert "nested more than 100 levels" in error.message
    assert position(yaml_error("- " * 200 + "x")) == (1, 201)


def test_nesting_of_ninety_levels_is_read():
    assert parse_yaml("[" * 90 + "x" + "]" * 90) is not None


def test_integer_with_thousands_of_digits_is_refused_at_its_position():
    error = yaml_error("a: 1\nb: " + "7" * 5000)
    assert position(error) == (2, 4)
    assert "more than 1000 digits" in error.message


def test_anchor_in_front_of_a_key_is_refused():
    error = yaml_error("- &a key: value")
    assert position(error) == (1, 6)


# -- documents --------------------------------------------------------------------------------

def test_empty_text_is_none():
    assert parse_yaml("") is None


def test_comment_only_text_is_none():
    assert parse_yaml("# nothing here\n\n   # still nothing\n") is None


def test_explicit_document_start_and_end():
    assert parse_yaml("# c\n---\na: 1\n...\n# after\n") == {"a": 1}


def test_document_start_with_an_inline_root_scalar():
    assert parse_yaml("--- |\n  text\n") == "text\n"
    assert parse_yaml("--- [1, 2]\n") == [1, 2]


def test_several_documents_are_refused_at_the_second_start():
    error = yaml_error("a: 1\n---\nb: 2\n")
    assert position(error) == (2, 1)
    assert "several YAML documents" in error.message


def test_content_after_document_end_is_refused():
    error = yaml_error("a: 1\n...\nb: 2\n")
    assert position(error) == (3, 1)


def test_directive_is_refused():
    error = yaml_error("%YAML 1.2\n---\na: 1\n")
    assert position(error) == (1, 1)
    assert "directives (%YAML)" in error.message


def test_dashes_not_followed_by_space_are_plain_text():
    assert parse_yaml("a: ---x\nb: --") == {"a": "---x", "b": "--"}


# -- encodings and binary input ---------------------------------------------------------------

def test_crlf_line_endings():
    assert parse_yaml("a: 1\r\nb: |\r\n  x\r\n  y\r\n") == {"a": 1, "b": "x\ny\n"}


def test_old_mac_line_endings():
    assert parse_yaml("a: 1\rb: [x,\r  y]\r") == {"a": 1, "b": ["x", "y"]}


def test_line_numbers_count_crlf_lines_once():
    error = yaml_error("a: 1\r\nb: 2\r\nb: 3\r\n")
    assert position(error) == (3, 1)


def test_utf8_bom_is_ignored():
    assert parse_yaml("\ufeffa: 1") == {"a": 1}
    assert parse_yaml(b"\xef\xbb\xbfa: 1") == {"a": 1}


def test_utf8_bytes_are_decoded():
    assert parse_yaml("name: caf\u00e9".encode("utf-8")) == {"name": "caf\u00e9"}


def test_invalid_utf8_bytes_are_refused_with_their_position():
    error = yaml_error(b"a: 1\nb: \xff\xfe\n")
    assert position(error) == (2, 4)
    assert "not valid UTF-8" in error.message


def test_nul_bytes_mean_a_binary_file():
    error = yaml_error(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert "binary file" in error.message
    assert error.line == 3


def test_nul_character_in_text_means_a_binary_file():
    error = yaml_error("a: 1\nb: x\0y")
    assert position(error) == (2, 5)
    assert "binary file" in error.message


def test_control_characters_are_refused():
    error = yaml_error("a: b\x07c")
    assert position(error) == (1, 5)
    assert "U+0007" in error.message


def test_non_ascii_text_is_accepted():
    assert parse_yaml("\u540d\u524d: \u5024 \U0001F600") == {"\u540d\u524d": "\u5024 \U0001F600"}


# -- refusals ---------------------------------------------------------------------------------

def test_tags_are_refused_with_their_position():
    error = yaml_error("services:\n  app:\n    ports: !custom []\n")
    assert position(error) == (3, 12)
    assert "tags (!custom)" in error.message
    assert position(yaml_error("a: !!str 1")) == (1, 4)


def test_complex_keys_are_refused():
    error = yaml_error("a: 1\n? b\n: c\n")
    assert position(error) == (2, 1)
    assert "complex mapping keys" in error.message


def test_complex_key_in_flow_mapping_is_refused():
    assert position(yaml_error("{? a: b}")) == (1, 2)


def test_flow_collection_as_key_is_refused():
    error = yaml_error("[a, b]: c")
    assert position(error) == (1, 1)
    assert "complex key" in error.message


def test_tab_indentation_is_refused():
    error = yaml_error("a:\n\tb: 1\n")
    assert position(error) == (2, 1)
    assert "tab" in error.message


def test_tab_after_spaces_in_indentation_is_refused():
    error = yaml_error("a:\n  \tb: 1\n")
    assert position(error) == (2, 3)


def test_tab_in_a_comment_line_is_allowed():
    assert parse_yaml("a: 1\n\t# comment\n") == {"a": 1}


def test_duplicate_key_is_refused_at_the_second_key():
    error = yaml_error("services:\n  app:\n    image: a\n    image: b\n")
    assert position(error) == (4, 5)
    assert "duplicate key 'image'" in error.message
    assert "line 3" in error.message


def test_duplicate_key_in_flow_mapping_is_refused_at_the_second_key():
    error = yaml_error("a: {x: 1, x: 2}")
    assert position(error) == (1, 11)


def test_keys_equal_after_resolution_are_duplicates():
    error = yaml_error("1: a\n0x1: b\n")
    assert position(error) == (2, 1)


def test_mapping_value_on_a_value_line_is_refused():
    error = yaml_error("a: b: c")
    assert position(error) == (1, 5)
    assert "mapping values are not allowed here" in error.message


def test_over_indented_key_is_refused_where_it_is():
    error = yaml_error("services:\n  app:\n    image: x\n     command: y\n")
    assert position(error) == (4, 13)
    assert "indent it exactly like the key above" in error.hint


def test_over_indented_key_after_a_quoted_value_is_refused():
    error = yaml_error("a: 'x'\n  b: 1\n")
    assert position(error) == (2, 3)
    assert "unexpected indentation" in error.message


def test_under_indented_key_is_refused():
    error = yaml_error("a:\n    b: 1\n  c: 2\n")
    assert position(error) == (3, 3)


def test_block_sequence_on_the_key_line_is_refused():
    error = yaml_error("a: - 1")
    assert position(error) == (1, 4)


def test_line_without_colon_inside_a_mapping_is_refused():
    error = yaml_error("a: 1\nb\nc: 2\n")
    assert position(error) == (2, 1)
    assert "without a ':'" in error.message


def test_key_without_space_after_colon_among_keys_is_refused_at_the_colon():
    error = yaml_error("app:\n  command: x\n  image:nginx\n")
    assert position(error) == (3, 8)
    assert "space after the ':'" in error.message
    assert "image: nginx" in error.hint


def test_first_key_without_space_after_colon_is_refused_on_its_own_line():
    error = yaml_error("services:\n  app:\n    image:nginx\n    command: x\n")
    assert position(error) == (3, 10)
    assert "space after the ':'" in error.message


def test_missing_colon_after_a_parent_key_is_refused_at_that_key():
    error = yaml_error("services:\n  app\n    image: x\n")
    assert position(error) == (2, 3)
    assert "write 'app:'" in error.hint


def test_sequence_entry_between_mapping_keys_is_refused():
    error = yaml_error("a: 1\n- b\n")
    assert position(error) == (2, 1)
    assert "sequence entry" in error.message


def test_mapping_key_after_sequence_items_is_refused():
    error = yaml_error("a:\n  - 1\n  b: 2\n")
    assert position(error) == (3, 3)
    assert "expected a sequence entry" in error.message


def test_reserved_indicator_is_refused():
    assert position(yaml_error("a: @x")) == (1, 4)
    assert position(yaml_error("a: `x`")) == (1, 4)


# -- errors and marks -------------------------------------------------------------------------

def test_error_names_the_file_and_position():
    error = yaml_error("a: [", filename="compose.yaml")
    assert error.file == "compose.yaml"
    assert str(error).startswith("compose.yaml:1:4: ")


def test_yaml_error_is_a_usage_level_error():
    error = yaml_error("a: [")
    assert isinstance(error, hpc_compose.HpcComposeError)
    assert error.exit_code == 2


def test_marks_of_collections_and_items():
    document = parse_yaml_document("a:\n  - x\n  - {b: 'y'}\n")
    assert document.marks[()] == Mark(1, 1, None)
    assert document.marks[("a",)] == Mark(2, 3, None)
    assert document.marks[("a", 0)] == Mark(2, 5, "x")
    assert document.marks[("a", 1)] == Mark(3, 5, None)
    assert document.marks[("a", 1, "b")] == Mark(3, 9, None)


def test_key_marks_point_at_the_keys():
    document = parse_yaml_document("top:\n  inner: 1\n  'quoted': 2\n")
    assert document.key_marks[("top",)] == Mark(1, 1, "top")
    assert document.key_marks[("top", "inner")] == Mark(2, 3, "inner")
    assert document.key_marks[("top", "quoted")][:2] == (3, 3)


def test_empty_value_has_a_mark_on_its_key_line():
    document = parse_yaml_document("a:\nb: 1\n")
    assert document.marks[("a",)].line == 1


def test_quoted_and_block_scalars_have_no_mark_text():
    document = parse_yaml_document("a: '1.10'\nb: |\n  x\n")
    assert document.marks[("a",)] == Mark(1, 4, None)
    assert document.marks[("b",)] == Mark(2, 4, None)


def test_multi_line_plain_mark_is_its_first_line_with_the_folded_text():
    document = parse_yaml_document("a: one\n  two\n")
    assert document.marks[("a",)] == Mark(1, 4, "one two")


def test_parse_yaml_document_returns_a_yaml_document():
    document = parse_yaml_document("a: 1")
    assert isinstance(document, hpc_compose.YamlDocument)
    assert document.data == {"a": 1}


# -- corpus -----------------------------------------------------------------------------------

CORPUS = sorted(glob.glob(os.path.join(CORPUS_DIR, "*.yaml")))


def test_corpus_is_present():
    assert len(CORPUS) >= 8


@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_corpus_file_reads_as_its_expected_json(path):
    with open(path, "rb") as handle:
        raw = handle.read()
    with open(path[:-len(".yaml")] + ".json", encoding="utf-8") as handle:
        expected = json.load(handle)
    assert parse_yaml(raw) == expected


# --- yaml-test-suite cases the reader used to get wrong --------------------------------------------

def test_last_line_of_spaces_without_a_line_break_ends_like_one():
    # yaml-test-suite L24T (second variant) and JEF9 (third variant).
    assert parse_yaml("foo: |\n  x\n   ") == {"foo": "x\n \n"}
    assert parse_yaml("foo: |\n  x\n   \n") == {"foo": "x\n \n"}
    assert parse_yaml("- |+\n   ") == ["\n"]
    assert parse_yaml("- |+\n   \n") == ["\n"]


def test_last_content_line_without_a_line_break_keeps_having_none():
    assert parse_yaml("foo: |\n  x") == {"foo": "x"}
    assert parse_yaml("foo: |+\n  x") == {"foo": "x"}


@pytest.mark.parametrize("text, row, col, words", [
    # 9C9N: a flow sequence whose entries are not indented under their key.
    ("---\nflow: [a,\nb,\nc]\n", 3, 1, "must be indented more than the block it is in"),
    ("k:\n  - [a,\n  b]\n", 3, 3, "must be indented more than the block it is in"),
    # Y79Y (fourth variant): a tab is not indentation.
    ("- [\n\tfoo,\n foo\n ]\n", 2, 1, "must be indented more than the block it is in"),
    # QB6E: a multi-line quoted scalar whose continuation lines are not indented.
    ('---\nquoted: "a\nb\nc"\n', 2, 9, "which is not indented under its key"),
    # SR86: an anchor on an alias; and its flow twin.
    ("key1: &a value\nkey2: &b *a\n", 2, 10, "an alias cannot have an anchor"),
    ("[&a x, &b *a]", 1, 11, "an alias cannot have an anchor"),
    # Y79Y (first variant): a tab-only line inside a block scalar.
    ("foo: |\n\t\nbar: 1\n", 2, 1, "a tab in the indentation of a block scalar line"),
    ("foo: |\n  x\n \t\n  y\n", 3, 2, "a tab in the indentation of a block scalar line"),
])
def test_invalid_documents_are_refused_with_a_located_error(text, row, col, words):
    error = yaml_error(text)
    assert position(error) == (row, col)
    assert words in error.message


@pytest.mark.parametrize("text, expected", [
    ("foo: |\n \t\nbar: 1\n", {"foo": "\t\n", "bar": 1}),          # Y79Y second variant
    ("- [\n\t\n foo\n ]\n", [["foo"]]),                             # Y79Y third variant
    ("flow: [a,\n b,\n c]\n", {"flow": ["a", "b", "c"]}),
    ('quoted: "a\n b\n c"\n', {"quoted": "a b c"}),
    ("[a,\nb]", ["a", "b"]),                                        # no block parent: any column
    ("k: {\n  a: 1\n}\n", {"k": {"a": 1}}),                         # a lone closer at the key
])
def test_valid_neighbours_of_the_refused_documents_still_read(text, expected):
    assert parse_yaml(text) == expected
