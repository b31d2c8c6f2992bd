# Build dist/hpc-compose.pyz, the single-file release of hpc-compose.
#
#   make -f zipapp.mk            # dist/hpc-compose.pyz and dist/hpc-compose.pyz.sha256
#   make -f zipapp.mk release    # + dist/hpc-compose-<version>.pyz (+ .sha256), dist/install.sh and
#                                # dist/SHA256SUMS: the folder to publish as one release
#   make -f zipapp.mk clean
#   make -f zipapp.mk PYTHONS="python3.8 python3.12"   # choose the precompiled bytecode versions
#
# The archive holds hpc_compose.py, a small __main__.py, the examples/ folder (the templates of
# `hpc-compose init`) and, for start-up speed, hpc_compose's bytecode precompiled by every Python
# in PYTHONS (one hpc_compose.<cache tag>.pyc each). A Python without a matching .pyc runs the source.
# The version is hpc_compose.__version__ (its only home); in a git checkout the archived module also
# records `git describe --tags --always --dirty`, which `hpc-compose --version` prints after it.
#
# The build is reproducible: entries are sorted, every timestamp is 1980-01-01, permissions are
# fixed, and the bytecode headers carry a source hash instead of a modification time, so building
# twice from the same tree (same commit) with the same interpreters gives the same bytes.

PYTHON ?= python3
# Every pyenv interpreter present, plus $(PYTHON); duplicates (same cache tag) are compiled once.
PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/*/bin/python) $(PYTHON)
DIST ?= dist
PYZ := $(DIST)/hpc-compose.pyz
# Intermediate files (the stamped module, bytecode) stay out of the folder that gets published.
BUILD := $(DIST)/.build
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' hpc_compose.py)
# Only a checkout's own .git counts: a tree copied elsewhere (or into another project) has none.
DESCRIPTION := $(shell [ -e .git ] && git describe --tags --always --dirty 2>/dev/null)
# The tracked files of examples/ in a git checkout (so run output such as examples/slurm-*.out or
# examples/hpc-compose.sbatch never ends up in a release); outside git, every file minus run output.
EXAMPLE_FILES := $(shell git ls-files examples 2>/dev/null | grep . || find examples -type f \
    ! -path '*/__pycache__/*' ! -path '*/.hpc-compose/*' ! -name '*.pyc' ! -name '*.sbatch' \
    ! -name 'slurm-*.out' ! -path '*/results/*' 2>/dev/null)
SOURCES := hpc_compose.py $(shell printf '%s\n' $(EXAMPLE_FILES) | LC_ALL=C sort)

.PHONY: all clean release FORCE
all: $(PYZ)

# Rewritten only when the description changes, so that a new commit rebuilds the archive.
$(BUILD)/description: FORCE
	@mkdir -p $(BUILD)
	@printf '%s\n' '$(DESCRIPTION)' | cmp -s - $@ || printf '%s\n' '$(DESCRIPTION)' > $@

$(PYZ): $(SOURCES) zipapp.mk $(BUILD)/description
	@mkdir -p $(BUILD)/pyc
	@rm -f $(BUILD)/pyc/*.pyc
	@$(PYTHON) -c "$$STAMP_PY" hpc_compose.py $(BUILD)/hpc_compose.py '$(DESCRIPTION)'
	@for py in $(PYTHONS); do \
	    "$$py" -c "$$COMPILE_PY" $(BUILD)/hpc_compose.py $(BUILD)/pyc || echo "zipapp.mk: skipped $$py (could not compile)" >&2; \
	done
	@$(PYTHON) -c "$$PACK_PY" $@ $(BUILD)/pyc $(BUILD)/hpc_compose.py $(filter-out hpc_compose.py,$(SOURCES))
	@cd $(DIST) && $(PYTHON) -c "$$CHECKSUM_PY" hpc-compose.pyz > hpc-compose.pyz.sha256
	@echo "built $@ $(VERSION)$(if $(DESCRIPTION), ($(DESCRIPTION))) ($$(wc -c < $@) bytes; bytecode for: $$(ls $(BUILD)/pyc | sed 's/hpc_compose\.//; s/\.pyc//' | sort -t- -k2n | tr '\n' ' '))"

release: $(PYZ) install.sh
	@case '$(DESCRIPTION)' in *-dirty) echo "zipapp.mk: warning: the tree has uncommitted changes ($(DESCRIPTION))" >&2 ;; esac
	@cp $(PYZ) $(DIST)/hpc-compose-$(VERSION).pyz
	@cp install.sh $(DIST)/install.sh
	@chmod 755 $(DIST)/install.sh
	@cd $(DIST) && $(PYTHON) -c "$$CHECKSUM_PY" hpc-compose-$(VERSION).pyz > hpc-compose-$(VERSION).pyz.sha256
	@cd $(DIST) && $(PYTHON) -c "$$CHECKSUM_PY" hpc-compose-$(VERSION).pyz hpc-compose.pyz install.sh > SHA256SUMS
	@echo "release $(VERSION) in $(DIST): hpc-compose-$(VERSION).pyz hpc-compose.pyz install.sh SHA256SUMS (+ .sha256 files)"

clean:
	rm -rf $(BUILD) $(PYZ) $(PYZ).sha256 $(DIST)/hpc-compose-*.pyz $(DIST)/hpc-compose-*.pyz.sha256 \
	    $(DIST)/install.sh $(DIST)/SHA256SUMS

# Copy the module with its build description filled in (the one line `_BUILD_DESCRIPTION = ""`).
define STAMP_PY
import sys
source, target, description = sys.argv[1], sys.argv[2], sys.argv[3]
with open(source, "rb") as handle:
    text = handle.read()
marker = b'\n_BUILD_DESCRIPTION = ""\n'
if text.count(marker) != 1:
    sys.exit("zipapp.mk: %s must hold the line _BUILD_DESCRIPTION = \"\" exactly once" % source)
stamped = b'\n_BUILD_DESCRIPTION = %s\n' % repr(str(description)).encode("ascii")
with open(target, "wb") as handle:
    handle.write(text.replace(marker, stamped))
endef
export STAMP_PY

# Compile hpc_compose.py with the running interpreter into <outdir>/hpc_compose.<cache tag>.pyc.
# The header is written here rather than by py_compile so that it never depends on the source's
# modification time: 3.7+ get an unchecked hash-based header (PEP 552), 3.6 a zero timestamp.
define COMPILE_PY
import marshal, os, struct, sys
if sys.version_info < (3, 6):
    sys.exit(0)
import importlib.util
source_path, out_dir = sys.argv[1], sys.argv[2]
with open(source_path, "rb") as handle:
    source = handle.read()
code = compile(source, "hpc_compose.py", "exec", dont_inherit=True)
if sys.version_info >= (3, 7):
    header = importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b01) + importlib.util.source_hash(source)
else:
    header = importlib.util.MAGIC_NUMBER + struct.pack("<II", 0, len(source) & 0xFFFFFFFF)
name = "hpc_compose.%s.pyc" % sys.implementation.cache_tag
with open(os.path.join(out_dir, name), "wb") as handle:
    handle.write(header + marshal.dumps(code))
endef
export COMPILE_PY

# The archive's __main__.py: run the precompiled module for this Python when the archive has it,
# else import the source (zipimport compiles it in memory).
define MAIN_PY
"""hpc-compose zipapp entry point: python3 hpc-compose.pyz COMMAND ..."""
import sys

if sys.version_info < (3, 6):
    sys.stderr.write("hpc-compose needs Python 3.6 or newer (this is %s)\n" % sys.version.split()[0])
    sys.exit(2)


def _load_precompiled():
    import marshal
    from _frozen_importlib_external import MAGIC_NUMBER
    archive = __loader__.archive
    try:
        data = __loader__.get_data("%s/hpc_compose.%s.pyc" % (archive, sys.implementation.cache_tag))
    except (OSError, IOError):
        return None
    if data[:4] != MAGIC_NUMBER:
        return None
    module = type(sys)("hpc_compose")
    module.__file__ = archive + "/hpc_compose.py"
    module.__loader__ = __loader__
    module.__package__ = ""
    sys.modules["hpc_compose"] = module
    try:
        exec(marshal.loads(data[16 if sys.version_info >= (3, 7) else 12:]), module.__dict__)
    except BaseException:
        del sys.modules["hpc_compose"]
        raise
    return module


# The module's classes and functions live as long as the process. The cyclic garbage collector
# would walk them in the collections that defining them sets off and again at exit, which made
# up a third of the start-up cost; so it is off while the module loads, and what the module defined
# is then frozen out of its reach (gc.freeze, Python 3.7+). The command's own garbage is collected
# as usual. Only this entry point does it: importing hpc_compose changes nothing in the importer.
import gc
gc.disable()
hpc_compose = _load_precompiled()
if hpc_compose is None:
    import hpc_compose
if hasattr(gc, "freeze"):
    gc.freeze()
gc.enable()
sys.exit(hpc_compose.main())
endef
export MAIN_PY

# Write the archive: shebang, then a zip with sorted entries and fixed metadata.
define PACK_PY
import io, os, sys, zipfile
target, pyc_dir, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
entries = {"__main__.py": os.environ["MAIN_PY"].encode("utf-8") + b"\n"}
for path in sources:
    with open(path, "rb") as handle:
        # The first source is the stamped module, stored under its own name.
        name = "hpc_compose.py" if path == sources[0] else path.replace(os.sep, "/")
        entries[name] = handle.read()
for name in os.listdir(pyc_dir):
    with open(os.path.join(pyc_dir, name), "rb") as handle:
        entries[name] = handle.read()
buffer = io.BytesIO()
buffer.write(b"#!/usr/bin/env python3\n")
with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
    for name in sorted(entries):
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        # The bytecode is stored, not deflated: inflating it took about as long as unmarshalling it,
        # at every start (docs/performance.md); the source and examples stay deflated.
        info.compress_type = zipfile.ZIP_STORED if name.endswith(".pyc") else zipfile.ZIP_DEFLATED
        info.create_system = 3
        archive.writestr(info, entries[name])
tmp = target + ".tmp"
with open(tmp, "wb") as handle:
    handle.write(buffer.getvalue())
os.chmod(tmp, 0o755)
os.replace(tmp, target)
endef
export PACK_PY

define CHECKSUM_PY
import hashlib, sys
for name in sys.argv[1:]:
    with open(name, "rb") as handle:
        print("%s  %s" % (hashlib.sha256(handle.read()).hexdigest(), name))
endef
export CHECKSUM_PY
