"""`armodal serve` under load: aggregate tokens/s, latency and time to first token at 1, 8 and
32 concurrent streaming clients, from a separate load-generator process on loopback.

    python bench/serve.py                      # a random-weight ~20M-parameter byte-level run
    python bench/serve.py --run runs/<dir> --clients 1,8,32 --max-tokens 64

The server runs as a subprocess (`python -m armodal.cli serve`); the clients are asyncio tasks
with httpx streaming, each sending its requests back to back; the levels take turns for
--rounds rounds and each figure pools its level's rounds. Every request asks for exactly
--max-tokens tokens (min_tokens = max_tokens, ignore_eos), sampled with its own seed, so every
concurrency level does the same work per request. The peer of each figure is the 1-client
level of the same run: continuous batching should multiply the aggregate throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Level:
    """One concurrency level's measurements."""

    clients: int
    tokens: int
    wall_s: float
    latencies: list[float]
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def add(self, other: Level) -> None:
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        self.latencies += other.latencies
        self.ttfts += other.ttfts


def build_random_run(directory: Path) -> Path:
    """A byte-level run of ~20M random parameters (6 layers, width 512)."""
    import torch

    from armodal.checkpoint import save_run
    from armodal.model import ModelConfig, Transformer
    from armodal.tokenizers.space import TokenSpace
    from armodal.tokenizers.text import ByteTokenizer

    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    space = TokenSpace.for_tokenizers(tokenizer)
    model = Transformer(ModelConfig(vocab_size=space.vocab_size, n_layer=6, n_head=8,
                                    d_model=512, max_seq_len=256))
    print(f"random run: {model.num_params() / 1e6:.1f}M parameters", flush=True)
    return save_run(directory / "serve_bench_20m", model, space, tokenizer)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "armodal.cli", "serve", f"run={run}", f"port={port}",
               f"max_batch={args.max_batch}", "max_queue=256", "log_level=warning",
               f"max_tokens_limit={args.max_tokens}", "model_name=bench"]
    if args.threads:
        command.append(f"threads={args.threads}")
    # Request logs go to a file: a JSON line per request is not what this run prints.
    log = open(Path(tempfile.gettempdir()) / "armodal_serve_bench.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "ARMODAL_API_KEY"}  # no key on loopback
    server = subprocess.Popen(command, cwd=ROOT, stderr=log, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health within 120 s")


async def one_request(http: httpx.AsyncClient, body: dict) -> tuple[int, float, float]:
    """Stream one completion: (tokens, latency s, time to first token s)."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            tokens += len(chunk["choices"])
            first = first if first is not None else time.perf_counter() - start
    return tokens, time.perf_counter() - start, first


async def run_level(url: str, clients: int, requests_each: int, max_tokens: int,
                    prompt: str) -> Level:
    latencies, ttfts, tokens = [], [], 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(requests_each):
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                    "min_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "seed": 1000 * c + r}
            n, latency, ttft = await one_request(http, body)
            tokens += n
            latencies.append(latency)
            ttfts.append(ttft)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return Level(clients, tokens, wall, latencies, ttfts)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); the max for p99 of fewer than 100 values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run directory (default: a random ~20M byte-level run)")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level "
                        "(the 1-client level sends 4x as many, for a steadier peer)")
    parser.add_argument("--rounds", type=int, default=2, help="times each level runs, in turn")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="The quick brown fox jumps over",
                        help="every request's prompt (byte-level: one token per byte, + bos)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="server torch threads (0: torch's default). One by default: the "
                        "figures compare batching, not thread scaling, and on a shared machine "
                        "spinning OpenMP threads mostly add noise")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else build_random_run(Path(tmp))
        port = free_port()
        server = start_server(run, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, 1, 1, 8, args.prompt))  # warm-up
            results = {c: Level(c, 0, 0.0, [], []) for c in levels}
            # Levels take turns, round after round, so a slow spell of a shared machine hits
            # every level rather than one.
            for round_ in range(args.rounds):
                for clients in levels:
                    each = args.requests * (4 if clients == 1 else 1)
                    level = asyncio.run(run_level(url, clients, each, args.max_tokens,
                                                  args.prompt))
                    results[clients].add(level)
                    print(f"  round {round_ + 1}, {clients} clients: "
                          f"{level.tokens_per_s:.0f} tok/s", flush=True)
        finally:
            server.send_signal(signal.SIGINT)  # a graceful stop, as an operator would
            server.wait(60)
    report(list(results.values()), args)


def report(results: list[Level], args) -> None:
    print(f"\nserve bench: {args.max_tokens} tokens per request after a "
          f"{len(args.prompt.encode()) + 1}-token prompt, streaming, CPU ({os.cpu_count()} "
          f"cores visible, server threads={args.threads or 'default'}), "
          f"max_batch={args.max_batch}")
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} "
          f"{'ttft p50':>8} {'ttft p99':>8} {'lat p50':>8} {'lat p99':>8}")
    for r in results:
        print(f"{r.clients:>7} {len(r.latencies):>8} {r.tokens:>7} {r.wall_s:>7.2f} "
              f"{r.tokens_per_s:>7.0f} {statistics.median(r.ttfts):>8.3f} "
              f"{percentile(r.ttfts, 99):>8.3f} {statistics.median(r.latencies):>8.3f} "
              f"{percentile(r.latencies, 99):>8.3f}")
    by_clients = {r.clients: r for r in results}
    single = by_clients.get(1)
    for r in results:
        if r.clients == 1:
            continue
        line = f"figure serve_tokens_per_s_{r.clients}_clients: {r.tokens_per_s:.0f} tok/s"
        if single is not None:
            line += (f" | peer 1 client {single.tokens_per_s:.0f} tok/s | ratio "
                     f"{r.tokens_per_s / single.tokens_per_s:.1f}x")
        print(line)
    for r in results:
        print(f"figure serve_ttft_p99_{r.clients}_clients: {percentile(r.ttfts, 99):.2f} s")
    for r in results:
        print(f"figure serve_latency_p99_{r.clients}_clients: "
              f"{percentile(r.latencies, 99):.2f} s")


if __name__ == "__main__":
    main()
