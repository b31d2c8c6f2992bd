# shellcheck shell=bash
# What the test clusters' Slurm configurations share, sourced by slurm-cluster.sh (the host's Slurm
# 22.05: one node, or --nodes N namespaced nodes) and slurm-generation.sh (Slurm 24.11 and 26.05,
# each in a Debian root on ports of its own). Functions only: sourcing it runs nothing. Each script
# writes its own paths, ports, controller and node lines around these.

node_resources() {  # sets CPUS and REAL_MEM (MiB) for the node lines
    # shellcheck disable=SC2034  # both are read by the sourcing script's node lines
    CPUS="$(nproc)"
    local total_mb reserve
    total_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    # Leave room for the OS and the daemons: 1/8 of the memory, at least 512 MiB.
    reserve=$((total_mb / 8))
    [ "$reserve" -lt 512 ] && reserve=512
    REAL_MEM=$((total_mb - reserve))
    [ "$REAL_MEM" -lt 256 ] && REAL_MEM=256
    return 0
}

write_if_changed() {  # write_if_changed PATH MODE [OWNER] < content -> 0 if the file changed
    local path=$1 mode=$2 owner=${3:-} tmp
    tmp="$(mktemp "${path}.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    [ -z "$owner" ] || chown "$owner" "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$path"
    return 0
}

slurm_conf_shared() {  # the slurm.conf lines every test cluster has
    cat <<'EOF'
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup delegation here: track processes by parent chain. (proctrack/pgid was tried: on 26.05
# sstat then reported 0 tasks and garbage CPU times for a running step.)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Accounting through slurmdbd (sacct), per-step usage sampling (sstat).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobCompType=jobcomp/none
# Tests want quick turnaround: finished jobs leave squeue after a minute (then sacct answers).
# scancel/time-limit escalate SIGTERM to SIGKILL after KillWait seconds: Slurm's default 30, as on
# users' clusters. Pyxis removes a step's container after its tasks ended, inside the step: with
# KillWait=10 that removal was SIGKILLed on a loaded 3-node machine and the unpacked container stayed.
MinJobAge=60
KillWait=30
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
MessageTimeout=20
EOF
}

slurmdbd_conf_shared() {  # the slurmdbd.conf lines every test cluster has (DB_USER, DB_PASS)
    cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

accounting_db_sql() {  # the SQL that makes the accounting database and its user (DB_USER, DB_PASS)
    cat <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}
