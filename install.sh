#!/bin/sh
# Install hpc-compose (the single-file hpc-compose.pyz) as an executable named `hpc-compose`.
#
# It installs only what it is given; no download location is built in:
#   sh install.sh dist/hpc-compose.pyz              # a local file (checked against FILE.sha256
#                                                   # when that file exists)
#   sh install.sh https://host/path/hpc-compose.pyz # a URL (https:// or file://), verified against
#                                                   # URL.sha256, which must exist
#   HPC_COMPOSE_BASE_URL=https://host/hpc-compose sh install.sh
#                                                   # a release mirror: <base>/<version>/hpc-compose.pyz
#
# Environment:
#   HPC_COMPOSE_INSTALL_DIR  where to install (default: ~/.local/bin)
#   HPC_COMPOSE_BASE_URL     a folder of releases, one sub-folder per version plus `latest`:
#                              <base>/<version>/hpc-compose.pyz and hpc-compose.pyz.sha256
#                            (https:// or file://)
#   HPC_COMPOSE_VERSION      the release folder to take from HPC_COMPOSE_BASE_URL (default: latest;
#                            0.2.0 and v0.2.0 both name folder 0.2.0)
#
# A download is verified against its SHA-256 before anything is placed; on any failure the install
# directory is left as it was. Exit codes: 0 installed, 1 failed, 2 usage (nothing to install).
# Needs curl or wget for downloads, and python3 (3.6+) to run the tool.
set -eu

ASSET=hpc-compose.pyz
SHEBANG='#!/usr/bin/env python3'

say() {
    printf '%s\n' "$*"
}

fail() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

usage_error() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 2
}

usage() {
    cat <<'USAGE'
usage: sh install.sh [FILE.pyz | https://.../hpc-compose.pyz | file:///.../hpc-compose.pyz]
       HPC_COMPOSE_BASE_URL=URL [HPC_COMPOSE_VERSION=0.2.0] sh install.sh

Installs hpc-compose into $HPC_COMPOSE_INSTALL_DIR (default ~/.local/bin) from what you give it:
  - a local hpc-compose.pyz (checked against FILE.sha256 when it exists);
  - the URL of an hpc-compose.pyz, verified against URL.sha256 (which must exist);
  - a release mirror: HPC_COMPOSE_BASE_URL/<version>/hpc-compose.pyz (version: latest by default).
USAGE
}

no_source() {
    usage >&2
    cat >&2 <<'HOWTO'

install.sh: error: nothing to install: give a .pyz, its URL, or HPC_COMPOSE_BASE_URL.
To get hpc-compose.pyz:
  - download hpc-compose.pyz and hpc-compose.pyz.sha256 from this project's release page (or your
    site's mirror of it), then: sh install.sh ./hpc-compose.pyz
  - or build it from a checkout of this project: make -f zipapp.mk && sh install.sh dist/hpc-compose.pyz
HOWTO
    exit 2
}

download() {
    # download URL FILE: one clear line on failure, never a partial FILE.
    if command -v curl >/dev/null 2>&1; then
        if ! curl -fsSL --proto '=https,file' --retry 2 --connect-timeout 20 -o "$2" "$1" 2>/dev/null; then
            rm -f "$2"
            fail "could not download $1 (curl failed); check the network, the URL and the version"
        fi
    elif command -v wget >/dev/null 2>&1; then
        case "$1" in
            file://*) cp "${1#file://}" "$2" 2>/dev/null || fail "could not read $1" ;;
            *) if ! wget -q -T 20 -O "$2" "$1" 2>/dev/null; then
                   rm -f "$2"
                   fail "could not download $1 (wget failed); check the network, the URL and the version"
               fi ;;
        esac
    else
        fail "neither curl nor wget is available to download $1"
    fi
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 "$1" | sed 's/^.*= *//'
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    else
        fail "no SHA-256 tool found (sha256sum, shasum, openssl or python3)"
    fi
}

verify() {
    # verify FILE CHECKSUM_FILE CHECKSUM_NAME FILE_NAME: the checksum file's first field is the hash.
    expected=$(sed -n '1s/^[[:space:]]*\([0-9A-Fa-f]\{64\}\).*$/\1/p' "$2" | tr 'A-F' 'a-f')
    [ -n "$expected" ] || fail "$3 does not contain a SHA-256 checksum"
    actual=$(sha256_of "$1" | tr 'A-F' 'a-f')
    if [ "$expected" != "$actual" ]; then
        fail "checksum mismatch for $4: expected $expected, got $actual; nothing was installed"
    fi
}

fetch_verified() {
    # fetch_verified URL FILE: download URL and URL.sha256, refuse unless they agree.
    case "$1" in
        https://*|file://*) ;;
        *) usage_error "only https:// and file:// URLs are accepted, not $1" ;;
    esac
    say "downloading $1"
    download "$1" "$2"
    download "$1.sha256" "$2.sha256"
    verify "$2" "$2.sha256" "$1.sha256" "$1"
    say "checksum ok"
}

main() {
    source_arg=""
    case "${1:-}" in
        -h|--help) usage; exit 0 ;;
        -*) usage_error "unknown option $1 (see --help)" ;;
        "") ;;
        *) source_arg=$1 ;;
    esac
    [ "$#" -le 1 ] || usage_error "too many arguments (see --help)"

    base=${HPC_COMPOSE_BASE_URL:-}
    base=${base%/}
    version=${HPC_COMPOSE_VERSION:-latest}
    version=${version#v}
    [ -n "$source_arg" ] || [ -n "$base" ] || no_source
    install_dir=${HPC_COMPOSE_INSTALL_DIR:-${HOME:?HOME is not set}/.local/bin}

    workdir=$(mktemp -d "${TMPDIR:-/tmp}/hpc-compose-install.XXXXXX") || fail "cannot create a temporary folder"
    trap 'rm -rf "$workdir"' EXIT
    trap 'rm -rf "$workdir"; exit 130' INT TERM

    case "$source_arg" in
        "")
            source_name="$base/$version/$ASSET"
            fetch_verified "$source_name" "$workdir/$ASSET"
            ;;
        *://*)
            source_name=$source_arg
            fetch_verified "$source_name" "$workdir/$ASSET"
            ;;
        *)
            source_name=$source_arg
            [ -f "$source_arg" ] || fail "$source_arg does not exist"
            cp "$source_arg" "$workdir/$ASSET"
            if [ -f "$source_arg.sha256" ]; then
                verify "$workdir/$ASSET" "$source_arg.sha256" "$source_arg.sha256" "$source_arg"
                say "checksum ok: $source_arg"
            else
                say "note: no $source_arg.sha256 beside it; installing the local file without a checksum check"
            fi
            ;;
    esac

    # A zipapp is a zip file, optionally after a shebang line: check before installing it.
    first=$(head -c 2 "$workdir/$ASSET")
    line=$(head -n 1 "$workdir/$ASSET" | tr -d '\r')
    if [ "$line" != "$SHEBANG" ]; then
        [ "$first" = "PK" ] || fail "$source_name is not an hpc-compose .pyz (no shebang, no zip header)"
        { printf '%s\n' "$SHEBANG"; cat "$workdir/$ASSET"; } > "$workdir/$ASSET.new"
        mv "$workdir/$ASSET.new" "$workdir/$ASSET"
    fi

    mkdir -p "$install_dir" 2>/dev/null || fail "cannot create $install_dir"
    target="$install_dir/hpc-compose"
    # Copy next to the target, then rename: a running hpc-compose is never replaced half-written.
    cp "$workdir/$ASSET" "$target.tmp.$$" 2>/dev/null || fail "cannot write into $install_dir"
    chmod 755 "$target.tmp.$$"
    mv -f "$target.tmp.$$" "$target" 2>/dev/null || { rm -f "$target.tmp.$$"; fail "cannot write $target"; }
    say "installed $target"

    if command -v python3 >/dev/null 2>&1; then
        if installed_version=$("$target" --version 2>/dev/null); then
            say "$installed_version"
        else
            say "warning: $target did not run; hpc-compose needs python3 3.6 or newer on PATH" >&2
        fi
    else
        say "warning: python3 is not on PATH; hpc-compose needs Python 3.6 or newer to run" >&2
    fi
    case ":${PATH:-}:" in
        *":$install_dir:"*) ;;
        *) say "note: $install_dir is not on your PATH; add it, e.g. export PATH=\"$install_dir:\$PATH\"" ;;
    esac
}

main "$@"
