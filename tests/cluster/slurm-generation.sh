#!/usr/bin/env bash
# Newer Slurm generations for hpc-compose's tests, each in a cached Debian root with its own daemons.
#
#   bash tests/cluster/slurm-generation.sh up GEN [--containers] [--nodes N]
#   bash tests/cluster/slurm-generation.sh status GEN
#   bash tests/cluster/slurm-generation.sh exec GEN -- COMMAND...
#   bash tests/cluster/slurm-generation.sh down GEN
# GEN is 24.11 (Debian trixie) or 26.05 (Debian forky). 22.05 is the host's own cluster
# (tests/cluster/slurm-cluster.sh without --slurm), which this script does not handle.
# `slurm-cluster.sh ACTION --slurm GEN ...` hands these actions to this script.
#
# What it does (as root, on a Debian 12 host):
# - `up` creates the generation's root once (debootstrap minbase of the suite, then Slurm, munge,
#   MariaDB, python3, pytest and the container-tools build packages from the distribution) under
#   $HPC_COMPOSE_TEST_CACHE/roots/slurm-GEN-KEY, KEY being a hash of the recipe: a changed recipe
#   makes a new root, an unchanged one is reused. Then it writes that root's Slurm configuration
#   and starts munged, mariadbd, slurmdbd, slurmctld and slurmd inside it, on ports of their own
#   (several generations and the host's cluster can be up at once). With --containers it runs
#   tests/cluster/container-tools.sh install inside the root (real Enroot and Pyxis, built against
#   that generation's libslurm) and registers Pyxis in the root's plugstack.
# - `exec` runs COMMAND as a user of that cluster would: the generation's client commands and
#   python3 first on PATH, the checkout, $HOME, /tmp and /opt at the same paths as on the host, the
#   current directory kept. HPC_COMPOSE_TEST_SLURM=GEN is set, so that the tests can check that the
#   `sinfo` they talk to is that generation's.
# - `--nodes N` (N >= 2), as the host's cluster does it (slurm-cluster.sh, "several nodes"): nodes
#   n1..nN, each a real `slurmd -N nI` in its own network, UTS and mount namespace, the mount
#   namespace pivot_rooted into the generation's root as every daemon's is. Each generation has a
#   bridge, subnet and namespace names of its own, so the host's cluster (hcbr0, 10.213.77.0/24,
#   netns hc-nI) and both generations can be up at once: 24.11 is bridge hgbr2411 on
#   10.213.78.0/24 (netns hg2411-nI, veth hgv2411-nI), 26.05 hgbr2605 on 10.213.79.0/24. The
#   controller listens on the bridge's .1, node nI is .(10+I). Each node binds, inside its mount
#   namespace, a hosts file naming every node over /etc/hosts, an enroot.conf.d of its own (its own
#   Enroot data and runtime directories) and a TmpFS folder of its own. The other daemons stay in the
#   machine's network namespace, as the host's do. Slurm never puts two components of one
#   heterogeneous job on one node: the heterogeneous-job tests need three nodes.
# - `down` stops that generation's daemons and removes its nodes' namespaces and its bridge; the
#   cached root stays.
#
# Facts found on the machine this was written on (Debian 12 host, root, only the package mirror
# reachable):
# - Inside a plain chroot the kernel refuses new user namespaces (`unshare -U`: Operation not
#   permitted), and Enroot needs them. Every daemon and command therefore starts in a new mount
#   namespace (`unshare -m --propagation private`) that pivot_roots into the root (bound onto itself
#   first), with /proc, /sys, /dev (and so /dev/pts, /dev/shm) and the shared paths mounted inside.
#   The daemons keep their namespace alive; the root's /run, /etc and /var are its own directories.
# - Bookworm's debootstrap has no forky script: the sid script is passed explicitly. Forky's
#   Release file can be past its Valid-Until date: the root's apt ignores that.
# - slurmdbd 24.11 and 26.05 die at start with the suites' MariaDB 11.8 client library (`5027 Number
#   of columns in result (=1) set execeeds maxmimum allowed number of columns (=0)` on `select @var
#   := concat('');`). With bookworm's libmariadb.so.3 (package libmariadb3 10.11, downloaded on the
#   host) on slurmdbd's LD_LIBRARY_PATH it works; the server stays the suite's.
# - CgroupPlugin=disabled (23.02 and later) avoids every cgroup problem; processes are tracked by
#   their parent chain (proctrack/linuxproc), as on the host's cluster.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/../.." && pwd)"
CACHE="${HPC_COMPOSE_TEST_CACHE:-/opt/hpc-compose-tests}"
ROOTS="$CACHE/roots"
MIRROR="${HPC_COMPOSE_DEBIAN_MIRROR:-}"
UP_TIMEOUT="${SLURM_CLUSTER_UP_TIMEOUT:-120}"
CLUSTER_NAME=hpccompose
DB_USER=slurm
DB_PASS=slurm-test-cluster
# Raised when the recipe below changes in a way the package list does not show.
RECIPE_VERSION=1
# Several nodes (`--nodes N`): per-node state inside the root (hosts file, Enroot configuration and
# runtime folders, TmpFS folders), the node names `up` made, and the TmpFS every node binds its own
# folder over (see NODE_TMPFS in slurm-cluster.sh: Slurm's pmix plugin and Enroot's PMI hook use it).
NODE_STATE=/var/lib/slurm/nodes
NODES_FILE=/run/slurm/cluster-nodes
NODE_TMPFS=/var/tmp/hpc-compose-tmpfs
# Packages of every root: the daemons and clients, what the tests run (python3, pytest, curl, nc,
# ps; git for the packaging tests of the 3.14 run), and what tests/cluster/container-tools.sh needs
# to build Enroot and Pyxis.
ROOT_PACKAGES=(
    slurmctld slurmd slurm-client slurmdbd munge mariadb-server
    python3 python3-pytest procps curl netcat-openbsd ca-certificates mount util-linux iproute2 git
    shellcheck
    build-essential libtool automake autoconf squashfs-tools parallel zstd jq fuse-overlayfs
    squashfuse libbsd-dev makeself pigz libcap2-bin bsdmainutils libslurm-dev
)

say() { printf '[slurm-generation%s] %s\n' "${GEN:+ $GEN}" "$*"; }
die() { printf '[slurm-generation%s] ERROR: %s\n' "${GEN:+ $GEN}" "$*" >&2; exit 1; }
# shellcheck source-path=SCRIPTDIR source=slurm-conf.sh
. "$HERE/slurm-conf.sh"  # node_resources, write_if_changed, the shared slurm.conf lines

usage() {
    cat >&2 <<EOF
usage: $0 up GEN [--containers] [--nodes N]
       $0 status GEN | down GEN
       $0 exec GEN -- COMMAND...
GEN: 24.11 (Debian trixie) or 26.05 (Debian forky); 22.05 is the host's cluster (slurm-cluster.sh)
EOF
    exit 2
}

# generation GEN: sets SUITE, SCRIPT, the ports and the nodes' network of that generation (host's
# cluster: ports 6817-6819 and 3306, bridge hcbr0 on 10.213.77.0/24, netns hc-nI).
generation() {
    case "$1" in
        24.11) SUITE=trixie; SCRIPT=trixie; PORT_BASE=6900; DB_PORT=3317; SUBNET_PREFIX=10.213.78 ;;
        26.05) SUITE=forky; SCRIPT=sid; PORT_BASE=7000; DB_PORT=3327; SUBNET_PREFIX=10.213.79 ;;
        22.05) die "22.05 is the host's cluster: use tests/cluster/slurm-cluster.sh up (without --slurm)" ;;
        *) die "unknown Slurm generation '$1' (known: 22.05, 24.11, 26.05)" ;;
    esac
    GEN=$1
    CTLD_PORT=$((PORT_BASE + 17))
    SLURMD_PORT=$((PORT_BASE + 18))
    DBD_PORT=$((PORT_BASE + 19))
    NET_TAG=${GEN//./}          # 2411: in the bridge's, namespaces' and veths' names (15 characters at most)
    BRIDGE="hgbr$NET_TAG"
    CONTROLLER_ADDR="$SUBNET_PREFIX.1"
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo bash $0 ...): it creates roots, mounts and starts daemons"
}

debian_mirror() {  # the host's Debian mirror, from its apt sources (deb822 or one-line format)
    [ -n "$MIRROR" ] && { echo "$MIRROR"; return 0; }
    local url
    url="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' | grep -oE 'https?://[^ ]+/debian/?' \
        | grep -v security | head -n 1 || true)"
    [ -n "$url" ] || die "no Debian mirror found in /etc/apt/sources.list*: set HPC_COMPOSE_DEBIAN_MIRROR"
    echo "${url%/}"
}

recipe() {  # the text whose hash names the root: change anything here and a new root is made
    printf 'recipe %s\nsuite %s script %s\nmirror %s\npackages %s\nbookworm libmariadb3 %s\n' \
        "$RECIPE_VERSION" "$SUITE" "$SCRIPT" "$(debian_mirror)" "${ROOT_PACKAGES[*]}" \
        "$(bookworm_libmariadb_version)"
}

bookworm_libmariadb_version() {
    apt-cache policy libmariadb3 2>/dev/null | awk '/Candidate:/ {print $2; exit}'
}

root_dir() {
    echo "$ROOTS/slurm-$GEN-$(recipe | sha256sum | cut -c1-12)"
}

# ---------------------------------------------------------------- entering a root

# enter ROOT COMMAND...: run COMMAND pivot_rooted into ROOT in a new private mount namespace, with
# /proc, /sys, /dev and the shared paths (checkout, $HOME, /tmp, /opt, extra SHARED_PATHS) mounted.
# PRIVATE_TMP=1 keeps the root's own /tmp (for builds whose fixed log paths would collide).
# NODE_NETNS=NAME (a node of `--nodes N`) enters that network namespace first and gives the command
# a UTS namespace of its own too. (`ip netns exec` is avoided, as the host's cluster avoids it: it
# remounts /sys.)
enter() {
    local root=$1
    shift
    local shared=("$CHECKOUT" "$HOME" /opt ${SHARED_PATHS[@]+"${SHARED_PATHS[@]}"})
    [ "${PRIVATE_TMP:-0}" = 1 ] || shared+=(/tmp)
    local namespaces=(unshare -m --propagation private)
    if [ -n "${NODE_NETNS:-}" ]; then
        namespaces=(nsenter --net="/run/netns/$NODE_NETNS" unshare --uts -m --propagation private)
    fi
    "${namespaces[@]}" -- /bin/bash -c '
set -e
root=$1; n=$2; shift 2
mount --rbind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
i=0
while [ "$i" -lt "$n" ]; do
    p=$1; shift; i=$((i + 1))
    [ -d "$p" ] || continue
    mkdir -p "$root$p"
    mount --rbind "$p" "$root$p"
done
cd "$root"
mkdir -p .hpc-compose-oldroot
pivot_root . .hpc-compose-oldroot
cd /
umount -l /.hpc-compose-oldroot
exec "$@"
' enter "$root" "${#shared[@]}" "${shared[@]}" "$@"
}

# ---------------------------------------------------------------- the root

in_chroot() {  # in_chroot ROOT COMMAND...: for package installation only (no user namespaces needed)
    local root=$1
    shift
    unshare -m --propagation private -- /bin/bash -c '
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 "$@"
' in_chroot "$root" "$@"
}

create_root() {  # create_root ROOT: build the root in a temporary directory, then rename it
    local root=$1 tmp log start
    command -v debootstrap >/dev/null 2>&1 \
        || die "debootstrap is missing: apt-get install debootstrap"
    [ -e "/usr/share/debootstrap/scripts/$SCRIPT" ] \
        || die "debootstrap has no '$SCRIPT' script: install a newer debootstrap"
    start=$(date +%s)
    mkdir -p "$ROOTS"
    tmp="$root.tmp"
    log="$ROOTS/slurm-$GEN.create.log"
    rm -rf --one-file-system "$tmp"
    mkdir -p "$tmp"
    say "creating the $SUITE root (debootstrap, then ${#ROOT_PACKAGES[@]} packages; log: $log)"
    if ! debootstrap --variant=minbase "$SUITE" "$tmp" "$(debian_mirror)" \
            "/usr/share/debootstrap/scripts/$SCRIPT" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -rf --one-file-system "$tmp"
        die "debootstrap of $SUITE failed (log: $log)"
    fi
    # Forky's Release may be past its Valid-Until; package scripts must start no service.
    printf 'Acquire::Check-Valid-Until "false";\n' >"$tmp/etc/apt/apt.conf.d/99hpc-compose-tests"
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    if ! { in_chroot "$tmp" apt-get update -q \
            && in_chroot "$tmp" apt-get install -y -q --no-install-recommends "${ROOT_PACKAGES[@]}" \
            && in_chroot "$tmp" apt-get clean; } >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -rf --one-file-system "$tmp"
        die "installing the packages into the $SUITE root failed (log: $log)"
    fi
    # Bookworm's MariaDB client library for slurmdbd (see the facts at the top).
    local dl
    dl="$(mktemp -d)"
    if ! (cd "$dl" && apt-get download -q libmariadb3) >>"$log" 2>&1; then
        rm -rf "$dl"
        rm -rf --one-file-system "$tmp"
        tail -n 5 "$log" >&2
        die "apt-get download libmariadb3 (bookworm) failed (log: $log); run apt-get update on the host"
    fi
    mkdir -p "$dl/x" "$tmp/usr/local/lib/bookworm-mariadb"
    dpkg-deb -x "$dl"/libmariadb3_*.deb "$dl/x"
    cp -a "$dl"/x/usr/lib/x86_64-linux-gnu/libmariadb.so.3 "$tmp/usr/local/lib/bookworm-mariadb/"
    rm -rf "$dl"
    recipe >"$tmp/etc/hpc-compose-root-recipe"
    mv "$tmp" "$root"
    say "root ready in $(( $(date +%s) - start )) s: $root"
}

remove_old_roots() {  # stop the daemons of this generation's roots of older recipes, then remove them
    local keep=$ROOT old
    for old in "$ROOTS/slurm-$GEN"-*; do
        [ -d "$old" ] && [ "$old" != "$keep" ] || continue
        ROOT=$old
        stop_all
        remove_nodes
        unmount_enroot_data
        say "removing the root of an older recipe: $old"
        rm -rf --one-file-system "$old"
    done
    ROOT=$keep
}

ensure_root() {  # sets ROOT; creates it when its recipe has no root yet
    ROOT="$(root_dir)"
    mkdir -p "$ROOTS"
    exec 9>"$ROOTS/.lock-$GEN"
    flock 9
    [ -f "$ROOT/etc/hpc-compose-root-recipe" ] || create_root "$ROOT"
    remove_old_roots
    flock -u 9
    # The host's name and resolver, refreshed on every `up` (the root may be older than them).
    cp /etc/hosts "$ROOT/etc/hosts"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

current_root() {  # sets ROOT to the newest existing root of GEN (for status/exec/down), or fails
    ROOT=""
    local r
    for r in "$ROOTS/slurm-$GEN"-*; do
        [ -f "$r/etc/hpc-compose-root-recipe" ] && ROOT=$r
    done
    [ -n "$ROOT" ] || die "no root for Slurm $GEN yet: run 'bash tests/cluster/slurm-cluster.sh up --slurm $GEN'"
}

# ---------------------------------------------------------------- configuration

cluster_shape() {  # the node-dependent parts of slurm.conf, for one node or --nodes N namespaces
    local i mem
    NODE="$(hostname -s)"
    NODE_NAMES=()
    if [ "$NODES" -eq 1 ]; then
        CONTROLLER_HOST="$NODE(127.0.0.1)"
        SLURMD_NAME=slurmd
        NODE_NAMES=("$NODE")
        NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
        PARTITION_NODES="$NODE"
        TMPFS_LINE=""
        return 0
    fi
    CONTROLLER_HOST="$NODE($CONTROLLER_ADDR)"
    # One slurmd per node in one root: per-node pid, spool and log paths through %n.
    SLURMD_NAME='slurmd-%n'
    mem=$((REAL_MEM / NODES))
    NODE_LINES=""
    for i in $(seq 1 "$NODES"); do
        NODE_NAMES+=("n$i")
        NODE_LINES+="NodeName=n$i NodeAddr=$SUBNET_PREFIX.$((10 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
    done
    NODE_LINES="${NODE_LINES%$'\n'}"
    PARTITION_NODES="n[1-$NODES]"
    TMPFS_LINE="TmpFS=$NODE_TMPFS"
}

write_configs() {  # sets CONFIG_CHANGED=1 when a Slurm configuration file changed
    CONFIG_CHANGED=0
    node_resources
    cluster_shape
    local etc="$ROOT/etc/slurm"
    mkdir -p "$etc" "$etc/plugstack.conf.d"
    # (SlurmdTimeout stays 60 s with several nodes: the multi-node file, whose lost-node test wants
    # it short, runs on the host's cluster only.)
    if write_if_changed "$etc/slurm.conf" 0644 <<EOF
# Written by tests/cluster/slurm-generation.sh: Slurm $GEN test cluster in $ROOT. Do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CONTROLLER_HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/$SLURMD_NAME
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/$SLURMD_NAME.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/$SLURMD_NAME.log
AccountingStoragePort=$DBD_PORT
SlurmdTimeout=60
${TMPFS_LINE:+$TMPFS_LINE
}$(slurm_conf_shared)
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    then CONFIG_CHANGED=1; fi
    if write_if_changed "$etc/cgroup.conf" 0644 <<EOF
# Written by tests/cluster/slurm-generation.sh. No cgroup is delegated to this root.
CgroupPlugin=disabled
EOF
    then CONFIG_CHANGED=1; fi
    if write_if_changed "$etc/slurmdbd.conf" 0600 <<EOF
# Written by tests/cluster/slurm-generation.sh. Do not edit.
DbdPort=$DBD_PORT
LogFile=/var/log/slurm/slurmdbd.log
StoragePort=$DB_PORT
$(slurmdbd_conf_shared)
EOF
    then CONFIG_CHANGED=1; fi
    if write_if_changed "$etc/plugstack.conf" 0644 <<EOF
include /etc/slurm/plugstack.conf.d/*.conf
EOF
    then CONFIG_CHANGED=1; fi
    return 0
}

# ---------------------------------------------------------------- daemons

DAEMONS=(munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid
         slurmdbd:/run/slurm/slurmdbd.pid slurmctld:/run/slurm/slurmctld.pid
         slurmd:/run/slurm/slurmd.pid)

pid_alive() {  # pid_alive NAME PIDFILE (path inside ROOT) -> 0 if that daemon of this root runs
    local name=$1 file="$ROOT$2" pid
    [ -s "$file" ] || return 1
    pid="$(cat "$file" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    # The process must live in this root (the host's daemons have the same names).
    [ -f "/proc/$pid/root/etc/hpc-compose-root-recipe" ]
}

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM, up to 20 s, then SIGKILL
    local name=$1 pidfile=$2 pid i
    pid_alive "$name" "$pidfile" || { rm -f "$ROOT$pidfile"; return 0; }
    pid="$(cat "$ROOT$pidfile")"
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$ROOT$pidfile"
}

# The script that starts the daemons, run inside the root. Each daemon is started only when it is
# not running; each wait gives up as soon as its daemon died.
write_start_script() {
    cat >"$ROOT/usr/local/sbin/hpc-compose-start-daemons" <<EOF
#!/bin/bash
# Written by tests/cluster/slurm-generation.sh: starts this root's daemons (run inside the root).
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { printf '[slurm-generation $GEN] %s\n' "\$*"; }
fail() { local log=\$1; shift; say "ERROR: \$*" >&2; [ -f "\$log" ] && tail -n 25 "\$log" >&2; exit 1; }
alive() { [ -s "\$1" ] && kill -0 "\$(cat "\$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS PIDFILE COMMAND...
    local limit=\$1 pidfile=\$2 start=\$(date +%s)
    shift 2
    until timeout 15 "\$@" >/dev/null 2>&1; do
        if [ \$((\$(date +%s) - start)) -ge 5 ] && ! alive "\$pidfile"; then return 2; fi
        [ \$((\$(date +%s) - start)) -ge "\$limit" ] && return 1
        sleep 0.5
    done
}
mkdir -p /run/munge /var/log/munge /var/lib/munge /run/mysqld /var/log/mysql /run/slurm \
    /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chown mysql:mysql /run/mysqld /var/log/mysql
chown slurm:slurm /run/slurm /var/log/slurm /var/lib/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown slurm:slurm /etc/slurm/slurmdbd.conf
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --force; fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
fi
wait_for 15 /run/munge/munged.pid sh -c 'munge -n </dev/null | unmunge' \
    || fail /var/log/munge/munged.log "munged does not answer"
if [ ! -d /var/lib/mysql/mysql ]; then
    say "initialising the MariaDB datadir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/var/log/mysql/install.log 2>&1 \
        || fail /var/log/mysql/install.log "mariadb-install-db failed"
fi
if ! mariadb-admin --protocol=socket -uroot ping >/dev/null 2>&1; then
    say "starting mariadbd on port $DB_PORT"
    setsid nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --port=$DB_PORT \
        --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
        --bind-address=127.0.0.1 --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
    wait_for 60 /run/mysqld/mysqld.pid mariadb-admin --protocol=socket -uroot ping \
        || fail /var/log/mysql/error.log "mariadbd did not come up"
fi
mariadb --protocol=socket -uroot <<SQL
$(accounting_db_sql)
SQL
if ! alive /run/slurm/slurmdbd.pid; then
    say "starting slurmdbd (with bookworm's libmariadb)"
    LD_LIBRARY_PATH=/usr/local/lib/bookworm-mariadb /usr/sbin/slurmdbd \
        || fail /var/log/slurm/slurmdbd.log "slurmdbd failed to start"
fi
wait_for 60 /run/slurm/slurmdbd.pid sacctmgr -n -P list cluster format=cluster \
    || fail /var/log/slurm/slurmdbd.log "slurmdbd died or does not answer sacctmgr"
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
fi
if ! alive /run/slurm/slurmctld.pid; then
    say "starting slurmctld on port $CTLD_PORT"
    /usr/sbin/slurmctld || fail /var/log/slurm/slurmctld.log "slurmctld failed to start"
fi
wait_for 30 /run/slurm/slurmctld.pid scontrol ping \
    || fail /var/log/slurm/slurmctld.log "slurmctld died or does not answer scontrol ping"
# With several nodes, each node's slurmd is started from the host, in its namespaces (start_nodes).
if [ $NODES -eq 1 ] && ! alive /run/slurm/slurmd.pid; then
    say "starting slurmd on port $SLURMD_PORT"
    /usr/sbin/slurmd || fail /var/log/slurm/slurmd.log "slurmd failed to start"
fi
EOF
    chmod 755 "$ROOT/usr/local/sbin/hpc-compose-start-daemons"
}

in_root() {  # in_root COMMAND...: a command inside the root with a clean environment
    enter "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}

node_state() {  # node_state NAME; never fails: under `set -e` a failing sinfo would end the script
    { in_root timeout 15 sinfo -h -N -n "$1" -o '%T' 2>/dev/null || true; } | head -n 1
}

wait_for_idle_nodes() {  # every node usable ("planned": idle, held by backfill for a pending job)
    local i state name pending=()
    for i in $(seq 1 $((UP_TIMEOUT))); do
        pending=()
        for name in "${NODE_NAMES[@]}"; do
            state="$(node_state "$name")"
            case "$state" in
                idle|mixed|allocated|completing|planned) ;;
                down*|drain*|fail*)
                    pending+=("$name:$state")
                    [ $((i % 5)) -eq 0 ] && in_root scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true ;;
                *) pending+=("$name:${state:-none}") ;;
            esac
        done
        if [ "${#pending[@]}" -eq 0 ]; then
            say "nodes ${NODE_NAMES[*]} are usable"
            return 0
        fi
        sleep 1
    done
    in_root sinfo -N -l >&2 || true
    tail -n 25 "$ROOT/var/log/slurm/slurmctld.log" "$ROOT"/var/log/slurm/slurmd*.log >&2 || true
    die "not usable after ${UP_TIMEOUT} s: ${pending[*]}"
}

# ---------------------------------------------------------------- several nodes (namespaces)

check_namespace_support() {  # one line naming what is missing, before the cluster is changed
    local tool
    for tool in ip nsenter unshare; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: apt-get install iproute2 util-linux"
    done
    unshare --uts --mount --propagation private true 2>/dev/null \
        || die "this kernel or container refuses new UTS/mount namespaces (unshare --uts --mount): run on a VM or a privileged container"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "hgprobe$NET_TAG" type bridge 2>/dev/null \
            || die "cannot create a Linux bridge (ip link add type bridge): load the bridge module (modprobe bridge) or run on a VM"
        ip link del "hgprobe$NET_TAG"
    fi
}

setup_network() {  # the generation's bridge with the controller's address; no route out, no forwarding
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        say "creating bridge $BRIDGE ($CONTROLLER_ADDR/24)"
        ip link add "$BRIDGE" type bridge
    fi
    # (no `ip ... | grep -q` here: with pipefail, grep's early exit fails the pipeline)
    case "$(ip -4 -o addr show dev "$BRIDGE")" in
        *"inet $CONTROLLER_ADDR/24"*) ;;
        *) ip addr add "$CONTROLLER_ADDR/24" dev "$BRIDGE" ;;
    esac
    ip link set "$BRIDGE" up
}

node_netns() { echo "hg$NET_TAG-$1"; }  # node_netns NAME: that node's network namespace

write_node_hosts() {  # every node's name resolves inside each node's mount namespace
    local i
    mkdir -p "$ROOT$NODE_STATE"
    {
        echo "127.0.0.1 localhost"
        echo "$CONTROLLER_ADDR $NODE"
        for i in $(seq 1 "$NODES"); do echo "$SUBNET_PREFIX.$((10 + i)) n$i"; done
    } >"$ROOT$NODE_STATE/hosts"
}

write_node_enroot_conf() {  # write_node_enroot_conf NAME: the root's enroot.conf.d, with that node's paths
    # Two nodes unpacking one image into one data directory collide ("File exists"), and Pyxis passes
    # no ENROOT_*_PATH from the environment: each node binds a drop-in folder of its own over
    # /etc/enroot/enroot.conf.d. Its data path stays on the Enroot tmpfs (see ENROOT_DATA_MOUNT),
    # one folder per generation and node, so that `enroot list -f` names only this node's containers.
    local name=$1 dir="$ROOT$NODE_STATE/$1/enroot.conf.d" file
    mkdir -p "$dir" "$ROOT/etc/enroot/enroot.conf.d"
    rm -f "$dir"/*.conf
    for file in "$ROOT"/etc/enroot/enroot.conf.d/*.conf; do
        [ -f "$file" ] || continue
        [ "$(basename "$file")" = hpc-compose-root.conf ] || cp -p "$file" "$dir/"
    done
    cat >"$dir/hpc-compose-node.conf" <<EOF
# Written by tests/cluster/slurm-generation.sh: node $name's own Enroot storage.
ENROOT_DATA_PATH $ENROOT_DATA_MOUNT/slurm-$GEN/$name/user-\$(id -u)
ENROOT_CACHE_PATH /var/lib/enroot/cache/user-\$(id -u)
ENROOT_RUNTIME_PATH $NODE_STATE/$name/enroot-run/user-\$(id -u)
EOF
}

start_node() {  # start_node NAME INDEX: namespaces, veth, then slurmd -N NAME inside the root
    local name=$1 index=$2 ns veth="hgv$NET_TAG-$1"
    ns="$(node_netns "$name")"
    pid_alive slurmd "/run/slurm/slurmd-$name.pid" && return 0
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns add "$ns"
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" addr add "$SUBNET_PREFIX.$((10 + index))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    fi
    write_node_enroot_conf "$name"
    mkdir -p "$ROOT$NODE_STATE/$name/tmpfs" "$ROOT$NODE_STATE/$name/enroot-run" "$ROOT$NODE_TMPFS"
    chmod 1777 "$ROOT$NODE_STATE/$name/tmpfs" "$ROOT$NODE_TMPFS"
    say "starting slurmd for node $name ($SUBNET_PREFIX.$((10 + index)), netns $ns)"
    # shellcheck disable=SC2016  # $1..$3 are the inner shell's arguments
    if ! NODE_NETNS=$ns enter "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            /bin/sh -c 'echo "$1" >/proc/sys/kernel/hostname &&
                mount --bind "$2/hosts" /etc/hosts &&
                mount --bind "$2/$1/enroot.conf.d" /etc/enroot/enroot.conf.d &&
                mount --bind "$2/$1/tmpfs" "$3" &&
                mkdir -p "/var/lib/slurm/slurmd-$1" &&
                exec /usr/sbin/slurmd -N "$1"' node "$name" "$NODE_STATE" "$NODE_TMPFS"; then
        tail -n 25 "$ROOT/var/log/slurm/slurmd-$name.log" >&2 2>/dev/null || true
        return 1
    fi
}

start_nodes() {
    local i
    write_node_hosts
    for i in $(seq 1 "$NODES"); do
        start_node "n$i" "$i" || { remove_nodes; die "slurmd for node n$i failed to start (log above); the nodes were removed, fix the cause and run up again"; }
    done
    printf '%s\n' "${NODE_NAMES[@]}" >"$ROOT$NODES_FILE"
}

node_processes() {  # node_processes NAME -> pids of every process in that node's network namespace
    ip netns pids "$(node_netns "$1")" 2>/dev/null || true
}

stop_node_slurmds() {  # the slurmd of every node of `--nodes N`
    local pidfile
    for pidfile in "$ROOT"/run/slurm/slurmd-*.pid; do
        [ -e "$pidfile" ] && stop_daemon slurmd "${pidfile#"$ROOT"}"
    done
    return 0
}

stop_slurmds() {  # the single node's slurmd and every node's
    stop_daemon slurmd /run/slurm/slurmd.pid
    stop_node_slurmds
}

remove_nodes() {  # every node namespace of this generation (its processes too), its veths, its bridge
    local ns name pid
    stop_node_slurmds
    for ns in /run/netns/"hg$NET_TAG"-*; do
        [ -e "$ns" ] || continue
        name="${ns#/run/netns/hg"$NET_TAG"-}"
        say "removing node $name"
        for pid in $(node_processes "$name"); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$(basename "$ns")" 2>/dev/null || true
        ip link del "hgv$NET_TAG-$name" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        say "removing bridge $BRIDGE"
        ip link del "$BRIDGE" 2>/dev/null || true
    fi
    rm -f "$ROOT$NODES_FILE"
}

# ---------------------------------------------------------------- containers

# Apptainer from sid, pinned to that one package (sid priority 100, apptainer 990), with what it
# needs to run SquashFS and SIF images and to build them. An install step at up time, not part of
# the root's recipe, so a cached root keeps its key; a second up finds it installed and does nothing.
APPTAINER_VERSION="${HPC_COMPOSE_APPTAINER_VERSION:-1.4.5}"
install_apptainer() {
    local have
    # shellcheck disable=SC2016  # dpkg-query's own ${Version} field
    have="$(in_root dpkg-query -W -f '${Version}' apptainer 2>/dev/null || true)"
    case "$have" in "$APPTAINER_VERSION"*) return 0 ;; esac
    say "installing Apptainer $APPTAINER_VERSION from sid inside the root"
    printf 'deb %s sid main\n' "$(debian_mirror)" >"$ROOT/etc/apt/sources.list.d/hpc-compose-sid.list"
    printf '%s\n' 'Package: *' 'Pin: release n=sid' 'Pin-Priority: 100' '' \
        'Package: apptainer' 'Pin: release n=sid' 'Pin-Priority: 990' \
        >"$ROOT/etc/apt/preferences.d/hpc-compose-apptainer"
    # sid's Release file may be past its Valid-Until on a cached mirror.
    printf '%s\n' 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99hpc-compose-sid"
    in_root apt-get update -q >/dev/null || die "apt-get update (with sid) failed inside the $SUITE root"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "apptainer=$APPTAINER_VERSION*" squashfuse fuse-overlayfs fuse2fs >/dev/null ||
        die "apt-get install apptainer failed inside the $SUITE root"
    # Root here lacks CAP_SYS_RESOURCE ("Requesting capability set ... while permitted ..."): root
    # keeps its file capabilities instead of asking for all of them; root builds use fakeroot.
    sed -i 's/^root default capabilities = .*/root default capabilities = file/' \
        "$ROOT/etc/apptainer/apptainer.conf"
    in_root apptainer config fakeroot --add root >/dev/null 2>&1 || true
    in_root apptainer --version >&2 || die "apptainer does not run inside the $SUITE root"
}

install_containers() {  # real Enroot and Pyxis inside the root, through the issue-7 install script
    local tools="${HPC_COMPOSE_CONTAINER_TOOLS:-$CHECKOUT/tests/cluster/container-tools.sh}"
    [ -f "$tools" ] || die "$tools is missing: it builds Enroot and Pyxis (set HPC_COMPOSE_CONTAINER_TOOLS to another copy)"
    tools="$(readlink -f "$tools")"
    local enroot="${ENROOT_SOURCE:-$CHECKOUT/../shared/vendor/enroot-4.1.2.tar.gz}"
    local pyxis="${PYXIS_SOURCE:-$CHECKOUT/../shared/vendor/pyxis-0.24.0.tar.gz}"
    # The script and local archives are seen inside the root at their real paths.
    SHARED_PATHS=("$(dirname "$tools")")
    case "$enroot" in *://*) ;; *) enroot="$(readlink -f "$enroot")"; SHARED_PATHS+=("$(dirname "$enroot")") ;; esac
    case "$pyxis" in *://*) ;; *) pyxis="$(readlink -f "$pyxis")"; SHARED_PATHS+=("$(dirname "$pyxis")") ;; esac
    local conf="$ROOT/etc/slurm/plugstack.conf.d/pyxis.conf" before after
    before="$(cat "$conf" 2>/dev/null || true)"
    say "installing Enroot and Pyxis inside the root ($tools install)"
    # The root's own /tmp: the install script's log has a fixed path there.
    if ! PRIVATE_TMP=1 in_root ENROOT_SOURCE="$enroot" PYXIS_SOURCE="$pyxis" SLURM_CONF_DIR=/etc/slurm \
            bash "$tools" install; then
        tail -n 30 "$ROOT/tmp/container-tools-build.log" >&2 2>/dev/null || true
        die "container-tools.sh install failed inside the $SUITE root (log: $ROOT/tmp/container-tools-build.log)"
    fi
    SHARED_PATHS=()
    # Enroot's default data and cache paths are under $HOME, which the root shares with the host:
    # the root's containers go to the root's own /var instead (no clash with the host's Pyxis), in a
    # folder named after the generation (see ENROOT_DATA_MOUNT below).
    mkdir -p "$ROOT/etc/enroot/enroot.conf.d"
    write_if_changed "$ROOT/etc/enroot/enroot.conf.d/hpc-compose-root.conf" 0644 <<EOF || true
# Written by tests/cluster/slurm-generation.sh: this root's own Enroot storage (not the shared \$HOME).
ENROOT_DATA_PATH $ENROOT_DATA_MOUNT/slurm-$GEN/user-\$(id -u)
ENROOT_CACHE_PATH /var/lib/enroot/cache/user-\$(id -u)
EOF
    after="$(cat "$conf" 2>/dev/null || true)"
    [ -n "$after" ] || die "container-tools.sh install did not register Pyxis in $conf"
    # container_scope=job: Pyxis's job epilog (run by slurmd, outside the step) removes what the
    # job's steps left. From 24.11 on, with proctrack/linuxproc, the time limit's SIGTERM also kills
    # Pyxis's own `enroot remove` of a step's container ("pyxis: child N terminated with signal 15",
    # "failed to remove container filesystem"), which left pyxis_JOB.STEP behind after every time
    # limit. Real clusters track by cgroup, where slurmstepd's helpers are outside the tasks'
    # cgroup. Named containers are therefore per job here; the host's 22.05 keeps Pyxis's default.
    case "$after" in
        *container_scope=*) ;;
        *) after="$after container_scope=job"; printf '%s\n' "$after" >"$conf" ;;
    esac
    [ "$before" = "$after" ] || CONFIG_CHANGED=1
    # The test image lives under /opt, which the root shares with the host: one image for all.
    bash "$tools" image || die "container-tools.sh image failed: the container tests have no image"
}

# Inside the root, Enroot's data path is a tmpfs of its own. `enroot list -f`, through which Pyxis
# finds the container that --container-name=NAME:exec joins (`hpc-compose exec`), names a running
# container by the root of the mount its processes see as "/" (the path within that filesystem) and
# compares it with the data path taken relative to its nearest mount point. Inside the root, "/" is
# a bind mount of a host directory, so the two never match unless the data path is the root of a
# filesystem: with it on the root's own disk, every running container showed as "<unknown>" and
# exec answered "the container is not running". It is mounted on the host, below the root, and
# `enter` binds the root recursively, so the daemons, their steps and `exec` all see the same one.
# The process table is the machine's, so `enroot list -f` also sees the containers running in
# another root, and it names them by that same relative path. With the data path <tmpfs>/user-0 in
# both roots, jobs of 24.11 and 26.05 with the same id (both count from 1, and CI runs the same
# tests in both at once) had containers of the same name, `enroot list -f` listed both under it,
# and Pyxis joined the first listed (the lowest pid): `hpc-compose exec` ran in the other root's
# container (and a service started then could have been put in it). The data path is therefore
# <tmpfs>/slurm-GEN/user-UID: here another root's containers are "<unknown>".
ENROOT_DATA_MOUNT=/var/lib/enroot/data

mount_enroot_data() {  # mount_enroot_data -> CONFIG_CHANGED=1 when it was not mounted yet
    local target="$ROOT$ENROOT_DATA_MOUNT"
    mkdir -p "$target"
    mountpoint -q "$target" && return 0
    mount -t tmpfs -o mode=0755 "hpc-compose-enroot-$GEN" "$target" \
        || die "cannot mount a tmpfs on $target for the root's Enroot data"
    # Daemons started before it see the disk below it: restart them.
    CONFIG_CHANGED=1
}

unmount_enroot_data() {
    local target="$ROOT$ENROOT_DATA_MOUNT"
    if mountpoint -q "$target" 2>/dev/null; then
        umount -l "$target" || say "warning: could not unmount $target"
    fi
}

# ---------------------------------------------------------------- actions

cmd_up() {
    local containers=0
    NODES=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --containers) containers=1 ;;
            --nodes) [ $# -ge 2 ] || usage; NODES=$2; shift ;;
            --nodes=*) NODES=${1#--nodes=} ;;
            *) usage ;;
        esac
        shift
    done
    case "$NODES" in
        ''|*[!0-9]*|0) die "--nodes wants a number >= 1, not '$NODES'" ;;
    esac
    need_root
    if [ "$NODES" -gt 1 ]; then check_namespace_support; fi
    local start
    start=$(date +%s)
    ensure_root
    write_configs
    if [ "$containers" -eq 1 ]; then
        install_containers
        install_apptainer
        mount_enroot_data
    else
        rm -f "$ROOT/etc/slurm/plugstack.conf.d/pyxis.conf"
    fi
    if [ "$CONFIG_CHANGED" -eq 1 ]; then
        # A changed configuration needs fresh daemons; an unchanged one keeps running jobs alive.
        stop_slurmds
        stop_daemon slurmctld /run/slurm/slurmctld.pid
        stop_daemon slurmdbd /run/slurm/slurmdbd.pid
    fi
    # Back to one node: the namespaces of an earlier `--nodes N` go. With several, the bridge (and
    # so the route to the nodes' subnet) exists before any daemon addresses a node: without it,
    # those addresses would go out through the default route.
    if [ "$NODES" -eq 1 ]; then remove_nodes; else setup_network; fi
    write_start_script
    enter "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        setsid /usr/local/sbin/hpc-compose-start-daemons </dev/null
    if [ "$NODES" -gt 1 ]; then start_nodes; fi
    wait_for_idle_nodes
    local version
    version="$(in_root sinfo --version)"
    case "$version" in
        "slurm $GEN".*|"slurm-wlm $GEN".*) ;;
        *) die "the root's Slurm is '$version', not $GEN: the recipe of this generation needs updating" ;;
    esac
    say "$version up in $(( $(date +%s) - start )) s (root $ROOT, slurmctld port $CTLD_PORT, nodes ${NODE_NAMES[*]})"
}

stop_all() {  # the daemons of ROOT, in the reverse order of their start (every node's slurmd first)
    local i
    stop_slurmds
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[$i]%%:*}" "${DAEMONS[$i]#*:}"
    done
}

cmd_down() {
    need_root
    current_root
    stop_all
    # Only now, with no daemon left to address a node, do the namespaces and the bridge go.
    remove_nodes
    unmount_enroot_data
    say "down (the root stays cached: $ROOT)"
}

cmd_status() {
    need_root
    current_root
    local ok=0 d name nodes=()
    echo "root: $ROOT"
    for d in "${DAEMONS[@]}"; do
        [ "${d%%:*}" = slurmd ] && continue
        if pid_alive "${d%%:*}" "${d#*:}"; then
            printf '%-10s running (pid %s)\n' "${d%%:*}" "$(cat "$ROOT${d#*:}")"
        else
            printf '%-10s NOT running\n' "${d%%:*}"
            ok=1
        fi
    done
    if [ -s "$ROOT$NODES_FILE" ]; then
        mapfile -t nodes <"$ROOT$NODES_FILE"
        for name in "${nodes[@]}"; do
            if pid_alive slurmd "/run/slurm/slurmd-$name.pid"; then
                printf 'node %-5s slurmd running (pid %s), netns %s, %s, %s processes in it\n' "$name" \
                    "$(cat "$ROOT/run/slurm/slurmd-$name.pid")" "$(node_netns "$name")" \
                    "$(ip -n "$(node_netns "$name")" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')" \
                    "$(node_processes "$name" | wc -l)"
            else
                printf 'node %-5s slurmd NOT running\n' "$name"
                ok=1
            fi
        done
    elif pid_alive slurmd /run/slurm/slurmd.pid; then
        printf '%-10s running (pid %s)\n' slurmd "$(cat "$ROOT/run/slurm/slurmd.pid")"
        nodes=("$(hostname -s)")
    else
        printf '%-10s NOT running\n' slurmd
        ok=1
    fi
    if in_root timeout 15 sinfo --version 2>/dev/null && in_root timeout 15 sinfo -N -o '%N %P %T %c %m' 2>/dev/null; then
        for name in ${nodes[@]+"${nodes[@]}"}; do
            case "$(node_state "$name")" in idle|mixed|allocated|completing|planned) ;; *) ok=1 ;; esac
        done
    else
        echo "sinfo: controller not reachable"
        ok=1
    fi
    if [ -f "$ROOT/etc/slurm/plugstack.conf.d/pyxis.conf" ]; then
        echo "pyxis: $(cat "$ROOT/etc/slurm/plugstack.conf.d/pyxis.conf")"
    fi
    echo "logs: $ROOT/var/log/slurm/{slurmctld,slurmd*,slurmdbd}.log"
    if [ "$ok" -eq 0 ]; then echo "status: up"; else echo "status: DOWN or degraded"; fi
    return "$ok"
}

cmd_exec() {
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || usage
    need_root
    current_root
    # The caller's environment, minus what would pick the host's tools or Python.
    local -a env_args=(-u SLURM_CONF -u PYTHONHOME -u PYTHONPATH -u VIRTUAL_ENV -u PYENV_VERSION
        PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HPC_COMPOSE_TEST_SLURM="$GEN")
    local dir
    dir="$(pwd -P)"
    enter "$ROOT" env "${env_args[@]}" /bin/sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' \
        exec "$dir" "$@"
}

ACTION="${1:-}"
[ $# -ge 2 ] || usage
generation "$2"
shift 2
SHARED_PATHS=()
case "$ACTION" in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    exec) cmd_exec "$@" ;;
    *) usage ;;
esac
