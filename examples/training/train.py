"""Training script shared by the training examples (checkpoints, resume, multi-node torchrun).

A small regression network on synthetic data: small enough to finish in minutes on one GPU (or a
CPU), but with the parts a real training loop needs on a cluster:

- checkpoints written atomically (temporary file + rename), so a job killed mid-write never
  leaves a truncated checkpoint behind;
- resume from the newest checkpoint in --resume-dir (default: $HPC_COMPOSE_RESUME_DIR, set when
  x-slurm.resume is enabled), so a requeued or restarted run continues where it stopped;
- DistributedDataParallel when started by torchrun (WORLD_SIZE > 1), rank 0 doing the writes.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn


def parse_args():
    parser = argparse.ArgumentParser(description="hpc-compose example trainer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR", "checkpoints"),
                        help="where every epoch's checkpoint is written")
    parser.add_argument("--resume-dir", default=os.environ.get("HPC_COMPOSE_RESUME_DIR"),
                        help="shared folder holding latest.pt; resumed from when present")
    return parser.parse_args()


def save_atomic(state, path):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main():
    args = parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn(64, 1, device=device)

    start_epoch = 0
    latest = os.path.join(args.resume_dir, "latest.pt") if args.resume_dir else None
    if latest and os.path.exists(latest):
        state = torch.load(latest, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print("resumed from %s at epoch %d (attempt %s)"
                  % (latest, start_epoch, os.environ.get("HPC_COMPOSE_ATTEMPT", "?")), flush=True)
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    if rank == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        if args.resume_dir:
            os.makedirs(args.resume_dir, exist_ok=True)
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        total = 0.0
        for _ in range(args.steps_per_epoch):
            inputs = torch.randn(args.batch_size, 64, device=device)
            loss = nn.functional.mse_loss(model(inputs), inputs @ target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        if rank == 0:
            mean = total / args.steps_per_epoch
            print("epoch %d loss %.5f (%.1fs)" % (epoch, mean, time.time() - started), flush=True)
            weights = model.module if distributed else model
            state = {"epoch": epoch, "loss": mean, "model": weights.state_dict(),
                     "optimizer": optimizer.state_dict()}
            save_atomic(state, os.path.join(args.checkpoint_dir, "epoch-%03d.pt" % epoch))
            if args.resume_dir:
                save_atomic(state, os.path.join(args.resume_dir, "latest.pt"))
                with open(os.path.join(args.resume_dir, "progress.json"), "w") as handle:
                    json.dump({"epoch": epoch, "loss": mean}, handle)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
