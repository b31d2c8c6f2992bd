"""Stand-in workload for torchrun's c10d rendezvous and for an MPI reduce (no PyTorch, no MPI here).

Rank 0 listens on the primary node; every other rank connects to it BY THE PRIMARY NODE'S NAME
(HPC_COMPOSE_PRIMARY_NODE), sends "rank host value", and gets the total back, as a real rendezvous
and an allreduce would. Ranks and world size come from Slurm (SLURM_PROCID, SLURM_NTASKS), as
torchrun's and MPI's do under srun.

    python3 rendezvous.py PORT [VALUE]   (VALUE defaults to the rank)
"""
import os
import socket
import sys
import time


def serve(port, world, value):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(world)
    peers = []
    members = {0: socket.gethostname()}
    total = value
    while len(peers) < world - 1:
        conn, _ = listener.accept()
        rank, host, their = conn.makefile().readline().split()
        members[int(rank)] = host
        total += int(their)
        peers.append(conn)
    for conn in peers:
        conn.sendall(("%d\n" % total).encode())
        conn.close()
    hosts = sorted(set(members.values()))
    print("rendezvous complete: %d ranks on %d nodes (%s), total %d"
          % (world, len(hosts), " ".join(hosts), total), flush=True)
    return total


def join(primary, port, rank, value, timeout=60):
    deadline = time.time() + timeout
    while True:
        try:
            conn = socket.create_connection((primary, port), timeout=10)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    # Rank 0 answers once every rank has joined; the last ones may still be unpacking their
    # container image, so the reply can take a while.
    conn.settimeout(timeout * 5)
    conn.sendall(("%d %s %d\n" % (rank, socket.gethostname(), value)).encode())
    total = int(conn.makefile().readline())
    print("rank %d on %s joined %s:%d, total %d" % (rank, socket.gethostname(), primary, port, total),
          flush=True)
    return total


def main():
    port = int(sys.argv[1])
    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    value = int(sys.argv[2]) if len(sys.argv) > 2 else rank
    if rank == 0:
        serve(port, world, value)
    else:
        join(os.environ["HPC_COMPOSE_PRIMARY_NODE"], port, rank, value)


if __name__ == "__main__":
    main()
