#!/bin/sh
# Install hpc-compose (the single-file hpc-compose.pyz) as an executable named `hpc-compose`.
#
#   sh install.sh                          # latest release, into ~/.local/bin
#   sh install.sh dist/hpc-compose.pyz     # a local build (checked against dist/hpc-compose.pyz.sha256
#                                          # when that file exists)
#   curl -fsSL <raw url of this file> | sh
#
# Environment:
#   HPC_COMPOSE_INSTALL_DIR  where to install (default: ~/.local/bin)
#   HPC_COMPOSE_VERSION      release tag to download, e.g. v0.1.0 (default: latest)
#   HPC_COMPOSE_REPO         GitHub owner/name to download from (default: NicolasSchuler/hpc-compose)
#   HPC_COMPOSE_BASE_URL     mirror of the releases folder, laid out like GitHub's:
#                              <base>/latest/download/hpc-compose.pyz
#                              <base>/download/<version>/hpc-compose.pyz
#                            each with a hpc-compose.pyz.sha256 beside it (file:// works with curl)
#
# A download is verified against its published SHA-256 before anything is placed; on any failure
# the install directory is left as it was. Needs curl or wget, and python3 (3.6+) to run the tool.
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

usage() {
    cat <<'USAGE'
usage: sh install.sh [PATH/TO/hpc-compose.pyz]

Installs hpc-compose into $HPC_COMPOSE_INSTALL_DIR (default ~/.local/bin): the given local .pyz
(checked against PATH.sha256 when present), or else a release download verified against its
published SHA-256. Environment: HPC_COMPOSE_INSTALL_DIR, HPC_COMPOSE_VERSION (default latest),
HPC_COMPOSE_REPO, HPC_COMPOSE_BASE_URL (a mirror laid out like GitHub's releases folder).
USAGE
}

download() {
    # download URL FILE: one clear line on failure, never a partial FILE.
    if command -v curl >/dev/null 2>&1; then
        if ! curl -fsSL --retry 2 --connect-timeout 20 -o "$2" "$1" 2>/dev/null; then
            rm -f "$2"
            fail "could not download $1 (curl failed); check the network, the version, or set HPC_COMPOSE_BASE_URL to a mirror"
        fi
    elif command -v wget >/dev/null 2>&1; then
        if ! wget -q -T 20 -O "$2" "$1" 2>/dev/null; then
            rm -f "$2"
            fail "could not download $1 (wget failed); check the network, the version, or set HPC_COMPOSE_BASE_URL to a mirror"
        fi
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
    # verify FILE CHECKSUM_FILE: the first field of the checksum file is the expected hash.
    expected=$(sed -n '1s/^[[:space:]]*\([0-9A-Fa-f]\{64\}\).*$/\1/p' "$2" | tr 'A-F' 'a-f')
    [ -n "$expected" ] || fail "$3 does not contain a SHA-256 checksum"
    actual=$(sha256_of "$1" | tr 'A-F' 'a-f')
    if [ "$expected" != "$actual" ]; then
        fail "checksum mismatch for $4: expected $expected, got $actual; nothing was installed"
    fi
}

main() {
    local_file=""
    case "${1:-}" in
        -h|--help) usage; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        "") ;;
        *) local_file=$1 ;;
    esac
    [ "$#" -le 1 ] || fail "too many arguments (see --help)"

    install_dir=${HPC_COMPOSE_INSTALL_DIR:-${HOME:?HOME is not set}/.local/bin}
    version=${HPC_COMPOSE_VERSION:-latest}
    case "$version" in
        [0-9]*) version="v$version" ;;
    esac
    repo=${HPC_COMPOSE_REPO:-NicolasSchuler/hpc-compose}
    base=${HPC_COMPOSE_BASE_URL:-https://github.com/$repo/releases}
    base=${base%/}

    workdir=$(mktemp -d "${TMPDIR:-/tmp}/hpc-compose-install.XXXXXX") || fail "cannot create a temporary folder"
    trap 'rm -rf "$workdir"' EXIT
    trap 'rm -rf "$workdir"; exit 130' INT TERM

    if [ -n "$local_file" ]; then
        [ -f "$local_file" ] || fail "$local_file does not exist"
        cp "$local_file" "$workdir/$ASSET"
        if [ -f "$local_file.sha256" ]; then
            verify "$workdir/$ASSET" "$local_file.sha256" "$local_file.sha256" "$local_file"
            say "checksum ok: $local_file"
        else
            say "note: no $local_file.sha256 beside it; installing the local file without a checksum check"
        fi
        source_name=$local_file
    else
        if [ "$version" = latest ]; then
            url="$base/latest/download/$ASSET"
        else
            url="$base/download/$version/$ASSET"
        fi
        say "downloading $url"
        download "$url" "$workdir/$ASSET"
        download "$url.sha256" "$workdir/$ASSET.sha256"
        verify "$workdir/$ASSET" "$workdir/$ASSET.sha256" "$url.sha256" "$url"
        say "checksum ok"
        source_name=$url
    fi

    # A zipapp is a zip file, optionally after a shebang line: check before installing it.
    first=$(head -c 2 "$workdir/$ASSET")
    line=$(head -n 1 "$workdir/$ASSET" | tr -d '\r')
    if [ "$line" != "$SHEBANG" ]; then
        [ "$first" = "PK" ] || fail "$source_name is not an hpc-compose .pyz (no shebang, no zip header)"
        { printf '%s\n' "$SHEBANG"; cat "$workdir/$ASSET"; } > "$workdir/$ASSET.new"
        mv "$workdir/$ASSET.new" "$workdir/$ASSET"
    fi

    mkdir -p "$install_dir" || fail "cannot create $install_dir"
    target="$install_dir/hpc-compose"
    # Copy next to the target, then rename: a running hpc-compose is never replaced half-written.
    cp "$workdir/$ASSET" "$target.tmp.$$" || fail "cannot write into $install_dir"
    chmod 755 "$target.tmp.$$"
    mv -f "$target.tmp.$$" "$target"
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
