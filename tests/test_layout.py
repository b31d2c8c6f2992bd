"""Layout of hpc_compose.py: sections in the docstring's order, and every section calls only upward."""
import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(REPO, "hpc_compose.py")

# {(function, the later name it uses): why it may stay}: at most one, also said in a comment where
# it happens. None today: prune_cache, which asks tracking which jobs still run, ends job tracking.
EXCEPTIONS = {}

_BANNER = "#" * 78


def read_module():
    with open(MODULE) as handle:
        return handle.read()


def sections(source):
    """[(first line, title)] of every section banner: a ``#####`` line, ``# title``, ``#####``."""
    lines = source.splitlines()
    found = []
    for number, line in enumerate(lines[:-2]):
        if line == _BANNER and lines[number + 2] == _BANNER and lines[number + 1].startswith("# "):
            found.append((number + 1, lines[number + 1][2:]))
    return found


def section_of(line, banners):
    """The title of the section that holds ``line`` (None above the first banner)."""
    title = None
    for first, name in banners:
        if first <= line:
            title = name
    return title


def defined_names(statement):
    if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
        return [statement.name]
    targets = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign):
        targets = [statement.target]
    return [node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)]


def used_names(statement):
    return {node.id for node in ast.walk(statement)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def downward_references(source=None):
    """{(top-level name, later name it uses): (its section, the later section)}."""
    source = read_module() if source is None else source
    banners = sections(source)
    order = {name: index for index, (_, name) in enumerate(banners)}
    tree = ast.parse(source)
    home = {}
    for statement in tree.body:
        for name in defined_names(statement):
            home.setdefault(name, section_of(statement.lineno, banners))
    found = {}
    for statement in tree.body:
        user = section_of(statement.lineno, banners)
        for name in used_names(statement):
            owner = home.get(name)
            if owner is not None and user is not None and order[owner] > order[user]:
                where = (defined_names(statement) or ["line %d" % statement.lineno])[0]
                found[(where, name)] = (user, owner)
    return found


def test_sections_are_the_docstring_table_of_contents():
    import hpc_compose
    listed = re.findall(r"^(\d+)\. ([^-\n]+?) --", hpc_compose.__doc__, re.M)
    titles = [title for _, title in sections(read_module())]
    assert [int(number) for number, _ in listed] == list(range(1, len(titles) + 1))
    for (_, entry), title in zip(listed, titles):
        assert title.startswith(entry.split(" (")[0]), (entry, title)


def test_every_section_calls_only_upward():
    found = downward_references()
    unexplained = dict((key, value) for key, value in found.items() if key not in EXCEPTIONS)
    assert unexplained == {}
    assert sorted(found) == sorted(EXCEPTIONS)
    assert len(EXCEPTIONS) <= 1


def test_the_exception_is_said_where_it_happens():
    source = read_module()
    for user, name in EXCEPTIONS:
        body = source[source.index("\ndef %s(" % user):]
        body = body[:body.index("\ndef ", 1)]
        assert "later section" in body and name in body


def test_the_layout_check_sees_a_call_to_a_later_section():
    source = "\n".join([_BANNER, "# First", _BANNER, "def early():", "    return late()", "",
                         "def also_early():", "    return early()", "",
                         _BANNER, "# Second", _BANNER, "def late():", "    return early()", ""])
    assert downward_references(source) == {("early", "late"): ("First", "Second")}


def test_the_module_has_thirteen_sections_ending_with_main():
    banners = sections(read_module())
    assert len(banners) == 13 and banners[-1][1] == "main"
