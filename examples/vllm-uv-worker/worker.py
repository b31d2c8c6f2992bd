"""Worker for examples/vllm-uv-worker.yaml: batch prompts through vLLM's OpenAI-compatible API.

Reads one prompt per line, keeps WORKER_CONCURRENCY requests in flight (vLLM batches them on the
GPU), and writes one JSON line per answer plus a throughput summary into the per-job directory.
"""
import argparse
import concurrent.futures
import json
import os
import time

from openai import OpenAI


def ask(client, model, prompt, max_tokens):
    started = time.time()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.2,
    )
    return {
        "prompt": prompt,
        "answer": reply.choices[0].message.content.strip(),
        "seconds": round(time.time() - started, 2),
        "completion_tokens": reply.usage.completion_tokens if reply.usage else 0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="prompts.txt", help="file with one prompt per line")
    parser.add_argument("--model", default=os.environ.get("WORKER_MODEL", "qwen"),
                        help="served model name (vLLM --served-model-name)")
    parser.add_argument("--repeat", type=int, default=4, help="send every prompt this many times")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    with open(args.prompts) as handle:
        prompts = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    prompts = prompts * args.repeat
    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment
    workers = int(os.environ.get("WORKER_CONCURRENCY", "16"))
    job_dir = os.environ.get("HPC_COMPOSE_JOB_DIR", ".")
    out_path = os.path.join(job_dir, "worker-results.jsonl")

    started = time.time()
    tokens = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, \
            open(out_path, "w") as out:
        for result in pool.map(lambda p: ask(client, args.model, p, args.max_tokens), prompts):
            tokens += result["completion_tokens"] or 0
            out.write(json.dumps(result) + "\n")
    elapsed = time.time() - started
    summary = {"requests": len(prompts), "concurrency": workers, "seconds": round(elapsed, 2),
               "completion_tokens": tokens,
               "tokens_per_second": round(tokens / elapsed, 1) if elapsed else None}
    with open(os.path.join(job_dir, "worker-summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
