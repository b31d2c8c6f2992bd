"""Worker for examples/llama-uv-worker.yaml: send prompts to an OpenAI-compatible server.

Reads one prompt per line, sends them concurrently to the server named by OPENAI_BASE_URL, and
writes one JSON line per answer into the per-job directory shared by every service. The same file
works against llama.cpp (llama-uv-worker.yaml) and vLLM (vllm-uv-worker.yaml).
"""
import argparse
import concurrent.futures
import json
import os
import time

from openai import OpenAI


def ask(client, model, prompt):
    started = time.time()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=int(os.environ.get("WORKER_MAX_TOKENS", "128")),
        temperature=0.2,
    )
    return {
        "prompt": prompt,
        "answer": reply.choices[0].message.content.strip(),
        "seconds": round(time.time() - started, 2),
        "completion_tokens": reply.usage.completion_tokens if reply.usage else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="prompts.txt", help="file with one prompt per line")
    parser.add_argument("--model", default=os.environ.get("WORKER_MODEL", "local"),
                        help="model name sent to the server (llama.cpp ignores it)")
    args = parser.parse_args()

    with open(args.prompts) as handle:
        prompts = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment
    workers = int(os.environ.get("WORKER_CONCURRENCY", "4"))
    out_path = os.path.join(os.environ.get("HPC_COMPOSE_JOB_DIR", "."), "worker-results.jsonl")

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, \
            open(out_path, "w") as out:
        for result in pool.map(lambda p: ask(client, args.model, p), prompts):
            out.write(json.dumps(result) + "\n")
            print("[%5.2fs] %s -> %s" % (result["seconds"], result["prompt"][:40],
                                         result["answer"][:80]), flush=True)
    print("%d answers written to %s" % (len(prompts), out_path), flush=True)


if __name__ == "__main__":
    main()
