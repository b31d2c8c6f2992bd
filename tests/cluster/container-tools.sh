#!/usr/bin/env bash
# Build and install the real container tools of the test cluster: Enroot and the Pyxis SPANK plugin.
#
#   bash tests/cluster/container-tools.sh install   # build + install both (skips what is installed)
#   bash tests/cluster/container-tools.sh image     # the test image (skipped when cached)
#   bash tests/cluster/container-tools.sh image-mpi # its variant with Open MPI and mpi4py (test-image-mpi.sqsh)
#   bash tests/cluster/container-tools.sh status    # installed versions; exit 0 only if both are there
#
# Sources (a local archive path, or a release URL for machines with network):
#   ENROOT_SOURCE  default ../shared/vendor/enroot-4.1.2.tar.gz beside the checkout
#   PYXIS_SOURCE   default ../shared/vendor/pyxis-0.24.0.tar.gz beside the checkout
#   SLURM_CONF_DIR default /etc/slurm (plugstack.conf and plugstack.conf.d/pyxis.conf go there)
# The test image, ${HPC_COMPOSE_TEST_CACHE:-/opt/hpc-compose-tests}/test-image.sqsh, is a debootstrap
# minbase of the machine's Debian release (TEST_IMAGE_SUITE overrides it) with python3, curl,
# netcat-openbsd, procps and ca-certificates, squashed with mksquashfs. It is rebuilt only when its
# recipe (suite, mirror, packages, squash options; kept in test-image.recipe beside it) changes.
# Run as root on Debian 12, 13 or 14 (it installs build packages with apt-get). It is standalone:
# it runs as well inside a debootstrapped root as on the host, and touches nothing of a running
# cluster (restarting slurmd/slurmctld so that they load Pyxis is the caller's business).
#
# Idempotent by version: the version is read from the archive's own Makefile; a tool installed at
# that version (enroot: `enroot version`; pyxis: the stamp file written beside the plugin) is not
# rebuilt. Build facts (see ../shared/vendor/README.md for how they were found on Debian 12):
# - The release archives have no git submodules. Debian's makeself stands in for deps/makeself and
#   the system kernel headers for deps/linux-headers; FORCE_GLIBC=1 avoids musl.
# - glibc < 2.38 (Debian 12) has no strlcpy/strlcat: a header declaring them is force-included and
#   the system's static libbsd is linked. Glibc >= 2.38 (Debian 13, 14) has them: no shim there.
# - Everything is built with the final prefix (/usr, /etc) from the start, so paths baked into the
#   enroot scripts are the installed ones and slurmd finds `enroot` on its default PATH.
set -euo pipefail

ACTION="${1:-install}"
HERE="$(cd "$(dirname "$0")" && pwd)"
CHECKOUT="$(cd "$HERE/../.." && pwd)"
VENDOR="$(cd "$CHECKOUT/.." && pwd)/shared/vendor"
ENROOT_SOURCE="${ENROOT_SOURCE:-$VENDOR/enroot-4.1.2.tar.gz}"
PYXIS_SOURCE="${PYXIS_SOURCE:-$VENDOR/pyxis-0.24.0.tar.gz}"
SLURM_CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
PYXIS_PLUGIN=/usr/lib/slurm/spank_pyxis.so
PYXIS_STAMP=/usr/share/pyxis/version
LOG=/tmp/container-tools-build.log
TEST_CACHE="${HPC_COMPOSE_TEST_CACHE:-/opt/hpc-compose-tests}"
TEST_IMAGE="$TEST_CACHE/test-image.sqsh"
TEST_IMAGE_PACKAGES=python3,curl,netcat-openbsd,procps,ca-certificates
# The MPI variant (tests/test_multinode_e2e.py, host cluster only): Debian's Open MPI and mpi4py.
TEST_MPI_IMAGE="$TEST_CACHE/test-image-mpi.sqsh"
TEST_MPI_IMAGE_PACKAGES="$TEST_IMAGE_PACKAGES,openmpi-bin,python3-mpi4py"

BUILD_PACKAGES=(build-essential libtool automake autoconf squashfs-tools parallel zstd jq curl
    fuse-overlayfs squashfuse makeself pigz libcap2-bin bsdmainutils libslurm-dev ca-certificates)

say() { printf '[container-tools] %s\n' "$*"; }
die() { printf '[container-tools] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo bash $0 $ACTION): it installs packages into /usr"
}

install_packages() {  # install_packages PKG...: apt-get the ones not installed yet
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "installing build packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1; then
        apt-get update -q >>"$LOG" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 \
            || die "apt-get install ${missing[*]} failed (is the package in this Debian release? log: $LOG)"
    fi
}

fetch_source() {  # fetch_source SOURCE DEST_ARCHIVE: copy a local archive or download a URL
    local source=$1 dest=$2
    case "$source" in
        http://*|https://*)
            command -v curl >/dev/null 2>&1 || install_packages curl ca-certificates
            curl -fsSL --retry 3 -o "$dest" "$source" \
                || die "cannot download $source (no network? set ENROOT_SOURCE/PYXIS_SOURCE to a local archive)" ;;
        *)
            [ -f "$source" ] || die "source archive $source does not exist (set ENROOT_SOURCE/PYXIS_SOURCE, or put it in $VENDOR)"
            [ -r "$source" ] || die "source archive $source is not readable"
            cp "$source" "$dest" ;;
    esac
}

unpack() {  # unpack SOURCE WORKDIR -> sets SRC to the unpacked top directory
    local source=$1 work=$2 top
    fetch_source "$source" "$work/source.tar.gz"
    tar -xzf "$work/source.tar.gz" -C "$work" 2>>"$LOG" \
        || die "$source is not a readable .tar.gz archive"
    top="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    if [ -z "$top" ] || [ ! -f "$top/Makefile" ]; then
        die "$source has no top directory with a Makefile"
    fi
    SRC="$top"
}

glibc_has_strlcpy() {
    printf '#include <string.h>\nint main(void){char b[4];return (int)strlcpy(b, "ab", sizeof b);}\n' \
        | gcc -x c -o /dev/null - >/dev/null 2>&1
}

installed_enroot_version() {
    if command -v enroot >/dev/null 2>&1; then
        enroot version 2>/dev/null | head -n 1
    fi
}

installed_pyxis_version() {
    if [ -f "$PYXIS_PLUGIN" ] && [ -f "$PYXIS_STAMP" ]; then
        cat "$PYXIS_STAMP"
    fi
}

build_enroot() {
    local work src version
    work="$(mktemp -d /tmp/enroot-build.XXXXXX)"
    unpack "$ENROOT_SOURCE" "$work"
    src="$SRC"
    version="$(sed -n 's/^VERSION[[:space:]]*:=[[:space:]]*//p' "$src/Makefile" | head -n 1)"
    [ -n "$version" ] || die "$ENROOT_SOURCE: no VERSION in its Makefile (not an enroot source archive?)"
    if [ "$(installed_enroot_version)" = "$version" ]; then
        say "enroot $version is installed"
        rm -rf "$work"
        return 0
    fi
    say "building enroot $version from $ENROOT_SOURCE"
    install -m 755 /usr/bin/makeself "$src/deps/makeself/makeself.sh"
    mkdir -p "$src/deps/linux-headers"
    touch "$src/deps/linux-headers/.stamp"
    local flags=(FORCE_GLIBC=1 prefix=/usr sysconfdir=/etc) shim=(env)
    if ! glibc_has_strlcpy; then
        install_packages libbsd-dev
        local libbsd
        libbsd="$(find /usr/lib -name libbsd.a 2>/dev/null | head -n 1)"
        [ -n "$libbsd" ] || die "libbsd.a not found although libbsd-dev is installed"
        printf '#include <stddef.h>\nsize_t strlcpy(char *, const char *, size_t);\nsize_t strlcat(char *, const char *, size_t);\n' \
            >"$work/strlcpy.h"
        # As environment, not make arguments: a command-line CPPFLAGS would override the flags of
        # enroot's own Makefiles (its bundled libbsd then fails to build).
        shim=(env "CPPFLAGS=-include $work/strlcpy.h" "LOADLIBES=$libbsd")
    fi
    ( cd "$src" && "${shim[@]}" make -j "$(nproc)" "${flags[@]}" && "${shim[@]}" make install "${flags[@]}" \
        && make setcap "${flags[@]}" ) >>"$LOG" 2>&1 \
        || die "enroot $version build failed (last lines: tail -n 40 $LOG)"
    [ "$(installed_enroot_version)" = "$version" ] \
        || die "enroot $version installed but \`enroot version\` says '$(installed_enroot_version)'"
    rm -rf "$work"
    say "enroot $version installed in /usr"
}

build_pyxis() {
    local work src version
    work="$(mktemp -d /tmp/pyxis-build.XXXXXX)"
    unpack "$PYXIS_SOURCE" "$work"
    src="$SRC"
    version="$(sed -n 's/^PYXIS_VER[[:space:]]*[:?]*=[[:space:]]*//p' "$src/Makefile" | head -n 1)"
    [ -n "$version" ] || version="$(basename "$src" | sed 's/^pyxis-//')"
    if [ "$(installed_pyxis_version)" = "$version" ]; then
        say "pyxis $version is installed"
        rm -rf "$work"
        return 0
    fi
    [ -f /usr/include/slurm/spank.h ] || die "slurm/spank.h missing: install libslurm-dev"
    say "building pyxis $version from $PYXIS_SOURCE"
    ( cd "$src" && make -j "$(nproc)" prefix=/usr && make install prefix=/usr ) >>"$LOG" 2>&1 \
        || die "pyxis $version build failed (last lines: tail -n 40 $LOG)"
    [ -f "$PYXIS_PLUGIN" ] || die "pyxis $version built but $PYXIS_PLUGIN is missing"
    mkdir -p "$(dirname "$PYXIS_STAMP")"
    printf '%s\n' "$version" >"$PYXIS_STAMP"
    rm -rf "$work"
    say "pyxis $version installed as $PYXIS_PLUGIN"
}

register_pyxis() {
    mkdir -p "$SLURM_CONF_DIR/plugstack.conf.d"
    # Debian's slurm packages ship `include /etc/slurm/plugstack.conf.d/*.conf`: a second include
    # of the same directory would load Pyxis twice ("option provided by both").
    if ! grep -qsE "^[[:space:]]*include[[:space:]]+$SLURM_CONF_DIR/plugstack\.conf\.d/\*(\.conf)?[[:space:]]*\$" \
            "$SLURM_CONF_DIR/plugstack.conf"; then
        printf 'include %s/plugstack.conf.d/*.conf\n' "$SLURM_CONF_DIR" >>"$SLURM_CONF_DIR/plugstack.conf"
    fi
    # Rewritten only when different: its modification time tells the cluster script whether
    # running daemons predate Pyxis.
    local conf="$SLURM_CONF_DIR/plugstack.conf.d/pyxis.conf" line="required $PYXIS_PLUGIN"
    if [ "$(cat "$conf" 2>/dev/null)" != "$line" ]; then
        printf '%s\n' "$line" >"$conf"
    fi
}

debian_mirror() {  # the machine's own Debian mirror (apt sources), else deb.debian.org
    local uri
    uri="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)"
    [ -n "$uri" ] || uri="$(sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\)[[:space:]].*/\2/p' \
        /etc/apt/sources.list 2>/dev/null | head -n 1)"
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

build_image() {  # build_image IMAGE PACKAGES: a Debian minbase with PACKAGES, cached by its recipe
    local image=$1 packages=$2 suite mirror recipe rootfs start
    # shellcheck disable=SC1091
    suite="${TEST_IMAGE_SUITE:-$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")}"
    [ -n "$suite" ] || die "cannot tell this machine's Debian release: set TEST_IMAGE_SUITE (e.g. bookworm)"
    mirror="$(debian_mirror)"
    recipe="debootstrap --variant=minbase --include=$packages $suite $mirror | mksquashfs -all-root -comp lzo -noD"
    if [ -f "$image" ] && [ "$(cat "$image.recipe" 2>/dev/null)" = "$recipe" ]; then
        say "test image $image is cached"
        return 0
    fi
    command -v debootstrap >/dev/null 2>&1 || install_packages debootstrap
    command -v mksquashfs >/dev/null 2>&1 || install_packages squashfs-tools
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap missing: apt-get install debootstrap"
    mkdir -p "$TEST_CACHE"
    rootfs="$(mktemp -d "$TEST_CACHE/rootfs.XXXXXX")"
    start=$(date +%s)
    say "building the test image $image ($suite from $mirror)"
    : >>"$LOG"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >>"$LOG" 2>&1 \
        || { rm -rf "$rootfs"; die "debootstrap $suite from $mirror failed (log: $LOG)"; }
    rm -rf "${rootfs:?}"/var/cache/apt/* "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/dev/*
    rm -f "$image.tmp"
    mksquashfs "$rootfs" "$image.tmp" -all-root -comp lzo -noD -quiet >>"$LOG" 2>&1 \
        || { rm -rf "$rootfs" "$image.tmp"; die "mksquashfs failed (squashfs-tools installed? log: $LOG)"; }
    rm -rf "$rootfs"
    chmod 0644 "$image.tmp"
    mv -f "$image.tmp" "$image"
    printf '%s\n' "$recipe" >"$image.recipe"
    say "test image $image built in $(( $(date +%s) - start )) s ($(du -m "$image" | cut -f1) MiB)"
}

cmd_image() {
    need_root
    build_image "$TEST_IMAGE" "$TEST_IMAGE_PACKAGES"
}

cmd_image_mpi() {  # the variant with Open MPI (PMIx-capable, as Debian builds it) and mpi4py
    need_root
    build_image "$TEST_MPI_IMAGE" "$TEST_MPI_IMAGE_PACKAGES"
}

install_pmi_hook() {
    # Enroot's PMIx hook, enabled as sites enable it (copied into hooks.d): it passes the step's
    # PMIX_* variables into the container and binds the pmix plugin's folders (under TmpFS and
    # SlurmdSpoolDir). It reads SlurmdSpoolDir from `scontrol show config`, where a cluster of
    # several slurmds on one machine has a literal %n (the node name): the copy expands it.
    local src=/usr/share/enroot/hooks.d/50-slurm-pmi.sh dst=/etc/enroot/hooks.d/50-slurm-pmi.sh tmp
    # Only the MPI tests (host cluster) need it: a missing hook is said, not fatal.
    [ -f "$src" ] || { say "no $src: MPI in containers will lack the PMIx hook"; return 0; }
    mkdir -p "$(dirname "$dst")"
    tmp="$(mktemp "$dst.XXXXXX")"
    # shellcheck disable=SC2016  # the added line is the hook's own bash
    sed '/read -r slurm_spool; read -r slurm_tmpfs; }/a\
    slurm_spool="${slurm_spool//%n/$(hostname)}"  # added by hpc-compose tests/cluster/container-tools.sh' \
        "$src" >"$tmp"
    if ! grep -q 'slurm_spool//%n' "$tmp"; then
        rm -f "$tmp"
        say "$src: its SlurmdSpoolDir line changed; the PMIx hook is not installed (update install_pmi_hook)"
        return 0
    fi
    chmod 0755 "$tmp"
    mv -f "$tmp" "$dst"
}

cmd_install() {
    need_root
    : >"$LOG"
    install_packages "${BUILD_PACKAGES[@]}"
    build_enroot
    build_pyxis
    register_pyxis
    install_pmi_hook
    say "done: enroot $(installed_enroot_version), pyxis $(installed_pyxis_version), plugstack in $SLURM_CONF_DIR"
}

cmd_status() {
    local enroot_v pyxis_v ok=0
    enroot_v="$(installed_enroot_version)"
    pyxis_v="$(installed_pyxis_version)"
    echo "enroot: ${enroot_v:-NOT installed}"
    echo "pyxis:  ${pyxis_v:-NOT installed}"
    if grep -qs "spank_pyxis.so" "$SLURM_CONF_DIR/plugstack.conf.d/pyxis.conf"; then
        echo "plugstack: $SLURM_CONF_DIR/plugstack.conf.d/pyxis.conf"
    else
        echo "plugstack: pyxis NOT registered in $SLURM_CONF_DIR"
        ok=1
    fi
    [ -n "$enroot_v" ] && [ -n "$pyxis_v" ] || ok=1
    if [ -f "$TEST_IMAGE" ]; then echo "test image: $TEST_IMAGE"; else echo "test image: NOT built ($TEST_IMAGE)"; ok=1; fi
    return "$ok"
}

case "$ACTION" in
    install) cmd_install ;;
    image) cmd_image ;;
    image-mpi) cmd_image_mpi ;;
    status) cmd_status ;;
    *) die "usage: $0 install|image|image-mpi|status" ;;
esac
