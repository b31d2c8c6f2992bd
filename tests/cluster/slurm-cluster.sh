#!/usr/bin/env bash
# Single-node Slurm test cluster for hpc-compose: up | down | status | restart.
#
# Other Slurm generations, each in a cached Debian root on ports of its own (tests/cluster/slurm-generation.sh):
#   sudo bash tests/cluster/slurm-cluster.sh up --slurm 24.11|26.05 [--containers] [--nodes N]   # also down/status
#   sudo bash tests/cluster/slurm-cluster.sh exec --slurm 24.11 -- COMMAND...  # with that Slurm's clients
# (`--slurm 22.05` is this host's cluster, the default.)
#
# Run as root on Debian/Ubuntu (the CI machine is Debian 12 with Slurm 22.05):
#   sudo bash tests/cluster/slurm-cluster.sh up       # install, configure, start; waits for an idle node
#   sudo bash tests/cluster/slurm-cluster.sh status   # sinfo, daemons, log paths; exit 0 only if usable
#   sudo bash tests/cluster/slurm-cluster.sh down     # stop every daemon this script started
# `up` is idempotent: a second run rewrites the same config, restarts the Slurm daemons only if the
# config changed, and returns as soon as the node is idle again.
#
# It installs munge, MariaDB, slurmdbd, slurmctld, slurmd and the client tools from the distribution,
# starts them WITHOUT systemd (plain daemons, pid files under /run), registers the cluster in the
# accounting database (so `sacct` works) and gathers job accounting with jobacct_gather/linux (so
# `sstat` works on running steps). Jobs run as the submitting user on this very host.
#
# Facts found on the machine this was written on (Debian 12, Firecracker VM, 2 cores, 24 GiB,
# PID 1 is not systemd, policy-rc.d forbids package scripts from starting services):
# - Debian 12 ships Slurm 22.05.8; its packages start nothing here, so every daemon is started by hand.
# - The munge package generates /etc/munge/munge.key; /run/munge does not exist until we create it.
# - MariaDB's datadir is initialised by the package; mariadbd is started with --user=mysql directly.
# - cgroup v1 hierarchies are mounted (hybrid with cgroup2 at /sys/fs/cgroup/unified) but nothing
#   delegates them, so the config uses ProctrackType=proctrack/linuxproc and TaskPlugin=task/affinity,
#   which need no cgroup: a step's processes are found through their parent chain; this is what
#   teardown (scancel, time limit) relies on. Even so, slurmd 22.05 initialises its cgroup plugin at
#   start-up and exits ("No filesystem mounted on /sys/fs/cgroup", "slurmd initialization failed")
#   when /sys/fs/cgroup is not mounted; a cgroup2 mount beside v1 controllers fails too ("Hybrid mode
#   is not supported"). The machine's own v1 layout works. (CgroupPlugin=disabled only exists from
#   23.02 on.)
# - A fresh Debian 12 (debootstrap minbase + policy-rc.d) was brought up with this script from
#   nothing in a network namespace: install, daemons, a job COMPLETED in sacct, a second `up`, `down`.
#   Inside a namespace with only `lo`, slurmdbd cannot bind (getaddrinfo with AI_ADDRCONFIG needs a
#   non-loopback address); real machines and containers have one.
# - `hostname -s` resolves through /etc/hosts to 127.0.0.1, so the node and the controller are
#   addressed as 127.0.0.1 and nothing depends on DNS.
# - Background steps inside one job need `srun --overlap` on 22.05 (see the issue); that is the
#   renderer's business, not this config's.
# - The partition oversubscribes cores (OverSubscribe=FORCE:4) so that up to 4 small test jobs per
#   core run at once on a 2-core machine instead of queueing behind each other; memory is not a
#   consumable resource (CR_Core), so a job without --mem does not claim the whole node.
set -euo pipefail

ACTION="${1:-status}"
# --slurm GEN (anywhere before `--`): 22.05 is this host's own cluster, handled below; the newer
# generations (24.11, 26.05) run in roots of their own: tests/cluster/slurm-generation.sh.
SLURM_GENERATION=22.05
REST=()
shift || true
while [ "$#" -gt 0 ]; do
    case "$1" in
        --slurm) SLURM_GENERATION="${2:-}"; shift ;;
        --slurm=*) SLURM_GENERATION="${1#--slurm=}" ;;
        --) REST+=("$@"); break ;;
        *) REST+=("$1") ;;
    esac
    shift || true
done
if [ "$SLURM_GENERATION" != 22.05 ]; then
    exec bash "$(dirname "$0")/slurm-generation.sh" "$ACTION" "$SLURM_GENERATION" ${REST[@]+"${REST[@]}"}
fi
if [ "$ACTION" = exec ]; then  # on the host's cluster the clients are the machine's own
    [ "${REST[0]:-}" = -- ] && REST=("${REST[@]:1}")
    [ "${#REST[@]}" -gt 0 ] || { echo "usage: $0 exec [--slurm 22.05|24.11|26.05] -- COMMAND..." >&2; exit 2; }
    HPC_COMPOSE_TEST_SLURM=22.05 exec "${REST[@]}"
fi
set -- "$ACTION" ${REST[@]+"${REST[@]}"}
shift || true
CONTAINERS=0
PLUGSTACK_NEW=0
PACKAGES_NEW=0
NODES=1
ARGS=("$@")
while [ "$#" -gt 0 ]; do
    case "$1" in
        --containers) CONTAINERS=1 ;;
        --nodes) NODES="${2:-}"; shift ;;
        --nodes=*) NODES="${1#--nodes=}" ;;
        *) printf '[slurm-cluster] ERROR: unknown option %s (usage: %s up|down|status|restart [--containers] [--nodes N] [--slurm 22.05|24.11|26.05])\n' "$1" "$0" >&2; exit 2 ;;
    esac
    shift
done
case "$NODES" in
    ''|*[!0-9]*|0) printf '[slurm-cluster] ERROR: --nodes wants a number >= 1, not %s\n' "$NODES" >&2; exit 2 ;;
esac
CLUSTER_NAME="${HPC_COMPOSE_TEST_CLUSTER:-hpccompose}"
NODE="$(hostname -s)"
ETC=/etc/slurm
LOGDIR=/var/log/slurm
STATEDIR=/var/lib/slurm
DB_USER=slurm
DB_PASS=slurm-test-cluster
UP_TIMEOUT="${SLURM_CLUSTER_UP_TIMEOUT:-120}"
# Several nodes (`--nodes N`, N >= 2): each node nI is a real slurmd in its own network, UTS and
# mount namespace (netns hc-nI, veth hcv-nI on bridge hcbr0), on a subnet that exists only inside
# this machine: the controller is 10.213.77.1 on the bridge, node nI is 10.213.77.(10+I). The
# generations' nodes (slurm-generation.sh) have bridges, subnets and namespaces of their own
# (hgbr2411 on 10.213.78.0/24, hgbr2605 on 10.213.79.0/24, netns hg2411-nI...): `down` here
# leaves them alone, as theirs leaves these.
BRIDGE=hcbr0
SUBNET_PREFIX=10.213.77
CONTROLLER_ADDR="$SUBNET_PREFIX.1"
NODE_STATE=/var/lib/slurm/nodes          # per-node hosts file and Enroot directories
ENROOT_CONF=/etc/enroot/enroot.conf       # its .d drop-ins are per node (the Enroot paths)
NODES_FILE=/run/slurm/cluster-nodes       # the node names `up` created (for status and down)
# TmpFS: where Slurm's pmix plugin makes each step's spmix_appdir_<uid>_<job>.<step>, and what
# Enroot's 50-slurm-pmi.sh hook binds into a container. The namespaced nodes share /tmp, so on the
# second node that folder already exists and the step aborts ("Cannot create directory ... File
# exists"); each node binds a folder of its own over this path instead (/tmp itself stays shared:
# tests hand files to jobs through it).
NODE_TMPFS=/var/tmp/hpc-compose-tmpfs

# shellcheck source-path=SCRIPTDIR source=slurm-conf.sh
. "$(dirname "$0")/slurm-conf.sh"  # node_resources, write_if_changed, the shared slurm.conf lines

say() { printf '[slurm-cluster] %s\n' "$*"; }
die() { printf '[slurm-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
    # It installs packages and starts daemons: as a normal user, ask sudo once (when there is one).
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
        exec sudo bash "$0" "$ACTION" "${ARGS[@]}"
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo bash $0 $ACTION): it installs packages and starts daemons"
}

pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in the file is a live process of that daemon
    # The daemon's name is the pid file's name; checking it guards against a stale pid file from
    # before a reboot whose number now belongs to some other process.
    local pid comm want
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    want="$(basename "$1" .pid)"
    want="${want%%-*}"  # slurmd-n1.pid (one slurmd per node) is a slurmd
    [ "$want" = mysqld ] && want=mariadbd
    [ "$comm" = "$want" ]
}

wait_until() {  # wait_until SECONDS PIDFILE COMMAND... -> polls the (external) command every 0.5 s
    # Gives up early (status 2) when the daemon of PIDFILE has died: a dead daemon never answers,
    # and each client command asking it can hang for many seconds. The first 5 s are left for the
    # daemon to write its pid file.
    local limit=$1 pidfile=$2 start now
    shift 2
    start=$(date +%s)
    while ! timeout 15 "$@" >/dev/null 2>&1; do
        now=$(date +%s)
        if [ -n "$pidfile" ] && [ $((now - start)) -ge 5 ] && ! pid_alive "$pidfile"; then
            return 2
        fi
        [ $((now - start)) -ge "$limit" ] && return 1
        sleep 0.5
    done
    return 0
}

show_log_tail() {
    local f
    for f in "$@"; do
        if [ -f "$f" ]; then
            printf -- '---- last lines of %s ----\n' "$f" >&2
            tail -n 25 "$f" >&2
        fi
    done
}

# ---------------------------------------------------------------- install

install_packages() {
    # iproute2 (ip) makes the nodes' namespaces and bridge of `--nodes N`; a minimal Debian lacks it.
    # Open MPI (built with PMIx and Slurm support, not Slurm's PMI-2: `srun --mpi=pmix`), PMIx and
    # Lmod are for the MPI and modules tests. Slurm's mpi/pmix plugin loads libpmix when slurmd
    # starts: a slurmd older than libpmix fails every --mpi=pmix step ("can not load PMIx library"),
    # so a new libpmix restarts the daemons (PACKAGES_NEW).
    local pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server shellcheck curl iproute2
                openmpi-bin libopenmpi-dev libpmix-dev lmod)
    local missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    case " ${missing[*]} " in *" libpmix-dev "*) PACKAGES_NEW=1 ;; esac
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent on a fresh machine: update once if the first try fails.
    # Lock::Timeout: on a shared machine someone else's apt-get may hold the lock for a while.
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >/tmp/slurm-cluster-apt.log 2>&1; then
        apt-get update -q >>/tmp/slurm-cluster-apt.log 2>&1 || true
        apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >>/tmp/slurm-cluster-apt.log 2>&1 \
            || { tail -n 30 /tmp/slurm-cluster-apt.log >&2; die "apt-get install failed (log: /tmp/slurm-cluster-apt.log)"; }
    fi
}

# ---------------------------------------------------------------- config

cluster_shape() {  # the node-dependent parts of slurm.conf, for one host or --nodes N namespaces
    local i mem
    NODE_NAMES=()
    if [ "$NODES" -eq 1 ]; then
        CLUSTER_SHAPE=single-node
        CONTROLLER_HOST="$NODE(127.0.0.1)"
        SLURMD_NAME=slurmd
        SLURMD_TIMEOUT=60
        NODE_NAMES=("$NODE")
        NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
        PARTITION_NODES="$NODE"
        return 0
    fi
    CLUSTER_SHAPE="$NODES-node"
    CONTROLLER_HOST="$NODE($CONTROLLER_ADDR)"
    # One slurmd per node on one machine: per-node pid, spool and log paths through %n.
    SLURMD_NAME='slurmd-%n'
    # A lost node (test of NODE_FAIL) is noticed within about 20 s instead of a minute.
    SLURMD_TIMEOUT=20
    mem=$((REAL_MEM / NODES))
    NODE_LINES=""
    for i in $(seq 1 "$NODES"); do
        NODE_NAMES+=("n$i")
        NODE_LINES+="NodeName=n$i NodeAddr=$SUBNET_PREFIX.$((10 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
    done
    NODE_LINES="${NODE_LINES%$'\n'}"
    PARTITION_NODES="n[1-$NODES]"
}

write_configs() {  # sets CONFIG_CHANGED=1 when slurm.conf or slurmdbd.conf changed
    CONFIG_CHANGED=0
    node_resources
    mkdir -p "$ETC" "$LOGDIR" "$STATEDIR/slurmctld" "$STATEDIR/slurmd" /run/slurm "$NODE_TMPFS"
    chmod 1777 "$NODE_TMPFS"
    chown slurm:slurm "$LOGDIR" "$STATEDIR" "$STATEDIR/slurmctld" "$STATEDIR/slurmd" /run/slurm

    cluster_shape
    if write_if_changed "$ETC/slurm.conf" 0644 root:root <<EOF
# Written by tests/cluster/slurm-cluster.sh: $CLUSTER_SHAPE test cluster. Do not edit by hand.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CONTROLLER_HOST
StateSaveLocation=$STATEDIR/slurmctld
SlurmdSpoolDir=$STATEDIR/$SLURMD_NAME
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/$SLURMD_NAME.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/$SLURMD_NAME.log
SwitchType=switch/none
SlurmdTimeout=$SLURMD_TIMEOUT
TmpFS=$NODE_TMPFS
$(slurm_conf_shared)
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    then CONFIG_CHANGED=1; fi

    if write_if_changed "$ETC/slurmdbd.conf" 0600 slurm:slurm <<EOF
# Written by tests/cluster/slurm-cluster.sh. Do not edit by hand.
LogFile=$LOGDIR/slurmdbd.log
$(slurmdbd_conf_shared)
EOF
    then CONFIG_CHANGED=1; fi
    return 0
}

# ---------------------------------------------------------------- daemons

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating munge key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    if pid_alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    wait_until 15 /run/munge/munged.pid sh -c 'munge -n </dev/null | unmunge' \
        || { show_log_tail /var/log/munge/munged.log; die "munged does not answer"; }
}

mariadb_alive() {
    mariadb-admin --protocol=socket -uroot ping >/dev/null 2>&1
}

start_mariadb() {
    mkdir -p /run/mysqld /var/log/mysql
    chown mysql:mysql /run/mysqld /var/log/mysql
    if [ ! -d /var/lib/mysql/mysql ]; then
        say "initialising the MariaDB datadir"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/slurm-cluster-mariadb-init.log 2>&1 \
            || { tail -n 20 /tmp/slurm-cluster-mariadb-init.log >&2; die "mariadb-install-db failed"; }
    fi
    if ! mariadb_alive; then
        say "starting mariadbd"
        # setsid + nohup: the server must outlive this script and whatever shell ran it.
        setsid nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
            --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
            --bind-address=127.0.0.1 --log-error=/var/log/mysql/error.log \
            </dev/null >/dev/null 2>&1 &
        local server=$! i
        for i in $(seq 1 120); do
            mariadb_alive && break
            # A server that died (port taken, bad datadir) will not answer: say so now.
            kill -0 "$server" 2>/dev/null \
                || { show_log_tail /var/log/mysql/error.log; die "mariadbd exited during start-up"; }
            sleep 0.5
        done
        mariadb_alive || { show_log_tail /var/log/mysql/error.log; die "mariadbd did not come up within 60 s"; }
    fi
    accounting_db_sql | mariadb --protocol=socket -uroot
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE -> SIGTERM, wait up to 20 s, then SIGKILL
    local name=$1 pidfile=$2 pid i
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

start_slurmdbd() {
    if ! pid_alive /run/slurm/slurmdbd.pid; then
        say "starting slurmdbd"
        /usr/sbin/slurmdbd || { show_log_tail "$LOGDIR/slurmdbd.log"; die "slurmdbd failed to start"; }
    fi
    wait_until 60 /run/slurm/slurmdbd.pid sacctmgr -n -P list cluster format=cluster \
        || { show_log_tail "$LOGDIR/slurmdbd.log"; die "slurmdbd died or does not answer sacctmgr within 60 s"; }
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        say "registering cluster $CLUSTER_NAME in accounting"
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
}

node_state() {  # node_state NAME; never fails: under `set -e` a failing sinfo would end the script
    { timeout 15 sinfo -h -N -n "$1" -o '%T' 2>/dev/null || true; } | head -n 1
}

node_usable() {
    case "$(node_state "$1")" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

start_slurm() {
    if ! pid_alive /run/slurm/slurmctld.pid; then
        say "starting slurmctld"
        /usr/sbin/slurmctld || { show_log_tail "$LOGDIR/slurmctld.log"; die "slurmctld failed to start"; }
    fi
    wait_until 30 /run/slurm/slurmctld.pid scontrol ping \
        || { show_log_tail "$LOGDIR/slurmctld.log"; die "slurmctld died or does not answer scontrol ping within 30 s"; }
    mountpoint -q /sys/fs/cgroup \
        || die "/sys/fs/cgroup is not mounted: slurmd 22.05 refuses to start without it (mount the cgroup hierarchy, or in a container run it with /sys/fs/cgroup available)"
    if [ "$NODES" -gt 1 ]; then
        start_nodes
    elif ! pid_alive /run/slurm/slurmd.pid; then
        mountpoint -q /sys/fs/cgroup \
            || die "/sys/fs/cgroup is not mounted: slurmd 22.05 refuses to start without it (mount the cgroup hierarchy, or in a container run it with /sys/fs/cgroup available)"
        say "starting slurmd"
        /usr/sbin/slurmd || { show_log_tail "$LOGDIR/slurmd.log"; die "slurmd failed to start"; }
    fi
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
        ip link add hcprobe0 type bridge 2>/dev/null \
            || die "cannot create a Linux bridge (ip link add type bridge): load the bridge module (modprobe bridge) or run on a VM"
        ip link del hcprobe0
    fi
}

setup_network() {  # the bridge with the controller's address; no route out, no forwarding
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

write_node_hosts() {  # every node's name resolves inside each node's mount namespace
    local i
    mkdir -p "$NODE_STATE"
    {
        echo "127.0.0.1 localhost"
        echo "$CONTROLLER_ADDR $NODE"
        for i in $(seq 1 "$NODES"); do echo "$SUBNET_PREFIX.$((10 + i)) n$i"; done
    } >"$NODE_STATE/hosts"
}

start_node() {  # start_node NAME INDEX: namespaces, veth, then slurmd -N NAME inside them
    local name=$1 index=$2 ns="hc-$1" veth="hcv-$1" dir="$NODE_STATE/$1"
    pid_alive "/run/slurm/slurmd-$name.pid" && return 0
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns add "$ns"
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" addr add "$SUBNET_PREFIX.$((10 + index))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    fi
    # Each node has its own Enroot data and runtime directories: two nodes unpacking one image into
    # a shared one collide ("File exists"). They are set by a drop-in of the node's own enroot.conf.d
    # (Pyxis passes no ENROOT_*_PATH from the environment to enroot), not bound over root's default
    # paths: `enroot list -f`, through which Pyxis finds the container that --container-name=NAME:exec
    # joins, matches a container's mount root against the data path, and a bind mount hides it.
    mkdir -p "$dir/enroot-data" "$dir/enroot-run" "$dir/enroot.conf.d" "$STATEDIR/slurmd-$name" "$dir/tmpfs"
    chmod 1777 "$dir/tmpfs"
    rm -f "$dir/enroot.conf.d/"*.conf
    if [ -d "$ENROOT_CONF.d" ]; then
        find "$ENROOT_CONF.d" -maxdepth 1 -name '*.conf' -exec cp -p {} "$dir/enroot.conf.d/" \;
    fi
    printf 'ENROOT_DATA_PATH %s\nENROOT_RUNTIME_PATH %s\n' "$dir/enroot-data" "$dir/enroot-run" \
        >"$dir/enroot.conf.d/99-hpc-compose-node.conf"
    chown slurm:slurm "$STATEDIR/slurmd-$name"
    say "starting slurmd for node $name ($SUBNET_PREFIX.$((10 + index)), netns $ns)"
    # `ip netns exec` is avoided: it remounts /sys, hiding the cgroup v1 mounts slurmd 22.05 needs.
    # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        /bin/sh -c 'hostname "$1" &&
            mount --bind "$2/hosts" /etc/hosts &&
            mkdir -p "$3.d" &&
            mount --bind "$2/$1/enroot.conf.d" "$3.d" &&
            mount --bind "$2/$1/tmpfs" "$4" &&
            exec /usr/sbin/slurmd -N "$1"' node "$name" "$NODE_STATE" "$ENROOT_CONF" "$NODE_TMPFS" \
        || { show_log_tail "$LOGDIR/slurmd-$name.log"; return 1; }
}

node_processes() {  # node_processes NAME -> pids of every process in that node's network namespace
    ip netns pids "hc-$1" 2>/dev/null || true
}

remove_node() {  # remove_node NAME: its slurmd, every process left in it, its namespace and veth
    local name=$1 pid
    stop_pidfile "slurmd $name" "/run/slurm/slurmd-$name.pid"
    for pid in $(node_processes "$name"); do kill -KILL "$pid" 2>/dev/null || true; done
    if [ -e "/run/netns/hc-$name" ]; then
        ip netns del "hc-$name" 2>/dev/null || true
    fi
    ip link del "hcv-$name" 2>/dev/null || true
}

remove_nodes() {  # every node namespace this script made, and the bridge
    local ns name
    for ns in /run/netns/hc-*; do
        [ -e "$ns" ] || continue
        name="${ns#/run/netns/hc-}"
        say "removing node $name"
        remove_node "$name"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        say "removing bridge $BRIDGE"
        ip link del "$BRIDGE" 2>/dev/null || true
    fi
    rm -f "$NODES_FILE"
}

start_nodes() {
    local i
    write_node_hosts
    for i in $(seq 1 "$NODES"); do
        start_node "n$i" "$i" || { remove_nodes; die "slurmd for node n$i failed to start (log above); the nodes were removed, fix the cause and run up again"; }
    done
    printf '%s\n' "${NODE_NAMES[@]}" >"$NODES_FILE"
}

stop_all_slurmds() {
    local pidfile
    stop_pidfile slurmd /run/slurm/slurmd.pid
    for pidfile in /run/slurm/slurmd-*.pid; do
        [ -e "$pidfile" ] && stop_pidfile "$(basename "$pidfile" .pid)" "$pidfile"
    done
    return 0
}

wait_for_idle_nodes() {
    local i state name pending
    for i in $(seq 1 $((UP_TIMEOUT * 2))); do
        pending=()
        for name in "${NODE_NAMES[@]}"; do
            state="$(node_state "$name")"
            case "$state" in
                idle|mixed|allocated|completing) ;;
                down*|drain*|fail*)
                    pending+=("$name:$state")
                    # A node that was down before a restart: ReturnToService=2 normally clears it; nudge it.
                    if [ $((i % 10)) -eq 0 ]; then
                        scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
                    fi ;;
                *) pending+=("$name:${state:-none}") ;;
            esac
        done
        if [ "${#pending[@]}" -eq 0 ]; then
            say "nodes ${NODE_NAMES[*]} are usable"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    show_log_tail "$LOGDIR/slurmctld.log" "$LOGDIR"/slurmd*.log
    die "not usable after ${UP_TIMEOUT} s: ${pending[*]}; see the logs above"
}

# ---------------------------------------------------------------- actions

install_containers() {
    # Real Enroot + Pyxis (registered in plugstack.conf before the daemons start) and the test image.
    bash "$(dirname "$0")/container-tools.sh" install || die "building the container tools failed (see above)"
    bash "$(dirname "$0")/container-tools.sh" image || die "building the test image failed (see above)"
    bash "$(dirname "$0")/container-tools.sh" image-mpi || die "building the Open MPI test image failed (see above)"
    # Daemons started before Pyxis was registered are restarted (PLUGSTACK_NEW) so that they load it.
    local conf="$ETC/plugstack.conf.d/pyxis.conf" pidfile pid started
    for pidfile in /run/slurm/slurmctld.pid /run/slurm/slurmd.pid /run/slurm/slurmd-*.pid; do
        pid_alive "$pidfile" || continue
        pid="$(cat "$pidfile")"
        started=$(( $(date +%s) - $(ps -o etimes= -p "$pid") ))
        if [ "$(stat -c %Y "$conf")" -gt "$started" ]; then PLUGSTACK_NEW=1; fi
    done
    return 0
}

cmd_up() {
    need_root
    install_packages
    if [ "$NODES" -gt 1 ]; then check_namespace_support; fi
    if [ "$CONTAINERS" -eq 1 ]; then install_containers; fi
    write_configs
    start_munge
    start_mariadb
    if [ "$CONFIG_CHANGED" -eq 1 ] || [ "$PLUGSTACK_NEW" -eq 1 ] || [ "$PACKAGES_NEW" -eq 1 ]; then
        # A changed config needs fresh daemons; an unchanged one keeps running jobs alive.
        stop_all_slurmds
        stop_pidfile slurmctld /run/slurm/slurmctld.pid
        stop_pidfile slurmdbd /run/slurm/slurmdbd.pid
    fi
    # Going back to one node: the namespaces of an earlier `--nodes N` go. With several, the
    # bridge (and so the route to the nodes' subnet) exists before any daemon addresses a node:
    # without it, those addresses would go out through the default route.
    if [ "$NODES" -eq 1 ]; then remove_nodes; else setup_network; fi
    start_slurmdbd
    start_slurm
    wait_for_idle_nodes
    say "cluster $CLUSTER_NAME is up: partition debug on $CLUSTER_SHAPE ${NODE_NAMES[*]} ($CPUS CPUs each)$([ "$CONTAINERS" -eq 1 ] && echo ', Pyxis + Enroot')"
}

cmd_down() {
    need_root
    stop_all_slurmds
    stop_pidfile slurmctld /run/slurm/slurmctld.pid
    stop_pidfile slurmdbd /run/slurm/slurmdbd.pid
    # Only now, with no daemon left to address a node, do the bridge and the namespaces go.
    remove_nodes
    if mariadb_alive; then
        say "stopping mariadbd"
        mariadb-admin --protocol=socket -uroot shutdown >/dev/null 2>&1 || stop_pidfile mariadbd /run/mysqld/mysqld.pid
    fi
    stop_pidfile munged /run/munge/munged.pid
    say "cluster is down"
}

cmd_status() {
    local ok=0 name pidfile nodes=()
    for name in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid \
                slurmdbd:/run/slurm/slurmdbd.pid slurmctld:/run/slurm/slurmctld.pid; do
        pidfile="${name#*:}"
        if pid_alive "$pidfile"; then
            printf '%-10s running (pid %s)\n' "${name%%:*}" "$(cat "$pidfile")"
        else
            printf '%-10s NOT running\n' "${name%%:*}"
            ok=1
        fi
    done
    if [ -s "$NODES_FILE" ]; then
        mapfile -t nodes <"$NODES_FILE"
        for name in "${nodes[@]}"; do
            if pid_alive "/run/slurm/slurmd-$name.pid"; then
                printf 'node %-5s slurmd running (pid %s), netns hc-%s, %s, %s processes in it\n' "$name" \
                    "$(cat "/run/slurm/slurmd-$name.pid")" "$name" \
                    "$(ip -n "hc-$name" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')" \
                    "$(node_processes "$name" | wc -l)"
            else
                printf 'node %-5s slurmd NOT running\n' "$name"
                ok=1
            fi
        done
    elif pid_alive /run/slurm/slurmd.pid; then
        printf '%-10s running (pid %s)\n' slurmd "$(cat /run/slurm/slurmd.pid)"
        nodes=("$NODE")
    else
        printf '%-10s NOT running\n' slurmd
        ok=1
    fi
    if command -v sinfo >/dev/null 2>&1 && sinfo >/dev/null 2>&1; then
        sinfo -N -o '%N %P %T %c %m'
        for name in "${nodes[@]}"; do node_usable "$name" || ok=1; done
    else
        echo "sinfo: controller not reachable"
        ok=1
    fi
    if [ -f /usr/lib/slurm/spank_pyxis.so ]; then
        bash "$(dirname "$0")/container-tools.sh" status | sed 's/^/containers: /' || true
    fi
    echo "logs: $LOGDIR/{slurmctld,slurmd*,slurmdbd}.log /var/log/mysql/error.log"
    if [ "$ok" -eq 0 ]; then echo "status: up"; else echo "status: DOWN or degraded"; fi
    return "$ok"
}

case "$ACTION" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    restart) cmd_down; cmd_up ;;
    *) die "usage: $0 up|down|status|restart|exec [--slurm 22.05|24.11|26.05] [--containers] [--nodes N]" ;;
esac
