# Build dist/hpc-compose.pyz, the single-file release of hpc-compose.
#
#   make -f zipapp.mk            # dist/hpc-compose.pyz and dist/hpc-compose.pyz.sha256
#   make -f zipapp.mk clean
#   make -f zipapp.mk PYTHONS="python3.8 python3.12"   # choose the precompiled bytecode versions
#
# The archive holds hpc_compose.py, a small __main__.py, the examples/ folder (the templates of
# `hpc-compose init`) and, for start-up speed, hpc_compose's bytecode precompiled by every Python
# in PYTHONS (one hpc_compose.<cache tag>.pyc each). A Python without a matching .pyc runs the source.
#
# The build is reproducible: entries are sorted, every timestamp is 1980-01-01, permissions are
# fixed, and the bytecode headers carry a source hash instead of a modification time, so building
# twice from the same tree with the same interpreters gives the same bytes.

PYTHON ?= python3
# Every pyenv interpreter present, plus $(PYTHON); duplicates (same cache tag) are compiled once.
PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/*/bin/python) $(PYTHON)
DIST ?= dist
PYZ := $(DIST)/hpc-compose.pyz
# The tracked files of examples/ in a git checkout (so run output such as examples/slurm-*.out or
# examples/hpc-compose.sbatch never ends up in a release); outside git, every file minus run output.
EXAMPLE_FILES := $(shell git ls-files examples 2>/dev/null | grep . || find examples -type f \
    ! -path '*/__pycache__/*' ! -path '*/.hpc-compose/*' ! -name '*.pyc' ! -name '*.sbatch' \
    ! -name 'slurm-*.out' ! -path '*/results/*' 2>/dev/null)
SOURCES := hpc_compose.py $(shell printf '%s\n' $(EXAMPLE_FILES) | LC_ALL=C sort)

.PHONY: all clean
all: $(PYZ)

$(PYZ): $(SOURCES) zipapp.mk
	@mkdir -p $(DIST)/pyc
	@rm -f $(DIST)/pyc/*.pyc
	@for py in $(PYTHONS); do \
	    "$$py" -c "$$COMPILE_PY" hpc_compose.py $(DIST)/pyc || echo "zipapp.mk: skipped $$py (could not compile)" >&2; \
	done
	@$(PYTHON) -c "$$PACK_PY" $@ $(DIST)/pyc $(SOURCES)
	@cd $(DIST) && $(PYTHON) -c "$$CHECKSUM_PY" hpc-compose.pyz > hpc-compose.pyz.sha256
	@echo "built $@ ($$(wc -c < $@) bytes; bytecode for: $$(ls $(DIST)/pyc | sed 's/hpc_compose\.//; s/\.pyc//' | sort -t- -k2n | tr '\n' ' '))"

clean:
	rm -rf $(DIST)/pyc $(PYZ) $(PYZ).sha256

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


hpc_compose = _load_precompiled()
if hpc_compose is None:
    import hpc_compose
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
        entries[path.replace(os.sep, "/")] = handle.read()
for name in os.listdir(pyc_dir):
    with open(os.path.join(pyc_dir, name), "rb") as handle:
        entries[name] = handle.read()
buffer = io.BytesIO()
buffer.write(b"#!/usr/bin/env python3\n")
with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
    for name in sorted(entries):
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
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
with open(sys.argv[1], "rb") as handle:
    print("%s  %s" % (hashlib.sha256(handle.read()).hexdigest(), sys.argv[1]))
endef
export CHECKSUM_PY
