"""A stand-in for a training run (no framework needed): counts steps, checkpoints, resumes.

It behaves the way a real trainer should under hpc-compose's signal, requeue and resume support:
- on start it loads ``<checkpoint dir>/checkpoint.json`` when it exists and continues from there;
- on SIGUSR1 (the warning hpc-compose forwards before the time limit) it saves a checkpoint at
  once and exits 0, so the job can requeue itself and the next attempt continues;
- every ``--save-every`` steps it saves anyway, and it writes ``result.json`` when it is done.

    python3 train_standin.py --steps 40 --step-seconds 0.5 --checkpoint-dir "$HPC_COMPOSE_RESUME_DIR"
"""
import argparse
import json
import os
import random
import signal
import sys
import time


def save(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None,
                        help="a replicate's seed: a little noise on each step's loss")
    parser.add_argument("--checkpoint-dir", default=os.environ.get("HPC_COMPOSE_RESUME_DIR", "."))
    args = parser.parse_args()
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    checkpoint = os.path.join(args.checkpoint_dir, "checkpoint.json")
    attempt = os.environ.get("HPC_COMPOSE_ATTEMPT", "0")
    step, loss = 0, 1.0
    noise = random.Random(args.seed) if args.seed is not None else None
    if os.path.exists(checkpoint):
        with open(checkpoint) as handle:
            state = json.load(handle)
        step, loss = state["step"], state["loss"]
        print("resumed from step %d (attempt %s, HPC_COMPOSE_IS_RESUME=%s)"
              % (step, attempt, os.environ.get("HPC_COMPOSE_IS_RESUME")), flush=True)
    else:
        print("starting at step 0 (attempt %s)" % attempt, flush=True)
    warned = []
    signal.signal(signal.SIGUSR1, lambda number, frame: warned.append(number))
    while step < args.steps:
        if warned:
            save(checkpoint, {"step": step, "loss": loss, "attempt": attempt})
            print("signal received: checkpoint saved at step %d, exiting" % step, flush=True)
            return 0
        time.sleep(args.step_seconds)
        step += 1
        loss *= 1.0 - args.learning_rate / 10.0
        if noise is not None:
            loss *= 1.0 + noise.uniform(-0.01, 0.01)
        print("step %d loss %.5f" % (step, loss), flush=True)
        if step % args.save_every == 0:
            save(checkpoint, {"step": step, "loss": loss, "attempt": attempt})
    save(checkpoint, {"step": step, "loss": loss, "attempt": attempt})
    save(os.path.join(args.checkpoint_dir, "result.json"),
         {"steps": step, "loss": loss, "learning_rate": args.learning_rate, "attempt": attempt,
          "seed": args.seed})
    print("done: %d steps, loss %.5f" % (step, loss), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
