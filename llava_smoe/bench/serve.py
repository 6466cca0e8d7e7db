"""Serving throughput and latency: the continuous-batching engine against static batching, over
loopback HTTP, in one run.

Two `llava-smoe serve` apps (the production FastAPI app over the production engine, one with
`scheduling="static"`, one with `"continuous"`) run in child processes on loopback ports with the
same checkpoint, threads and maximum batch size. One seeded workload is built once: arrival
times (a Poisson process), prompts (lengths from a log-normal; a share of them with an image of
random size and colour) and reply lengths (a log-normal, clipped; `ignore_eos` makes every reply
exactly that long). Each round replays the whole workload against each server in turn, the
first server rotating, with one streaming HTTP client per request (asyncio, one thread) that
waits for its arrival time. Reported per mode: completion tokens per second (from the first
arrival to the last reply), completion tokens per decoding step (the server's step count from
/health: how full the batches were, whatever else the machine was doing), latency and time to
first token (from each request's arrival), medians over the rounds; continuous rows also carry
the medians of the per-round ratios to static.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from llava_smoe.config import Config, invalid

MODES = ("static", "continuous")


@dataclass
class ServeBenchConfig(Config):
    """checkpoint: a save_pretrained folder (None: a tiny random-weight checkpoint, written to a
    temporary folder). arrival_rate: requests per second (Poisson). prompt_words_median /
    output_tokens_median: medians of the log-normal prompt and reply lengths (sigma 0.8 and 1.0),
    replies clipped to [output_tokens_min, output_tokens_max]. image_fraction: share of requests
    with an image."""

    checkpoint: str | None = None
    streams: int = 32
    max_batch_size: int = 8
    arrival_rate: float = 20.0
    prompt_words_median: int = 12
    output_tokens_median: int = 32
    output_tokens_min: int = 8
    output_tokens_max: int = 192
    image_fraction: float = 0.5
    rounds: int = 3
    threads: int = 1
    device: str = "cpu"
    seed: int = 0

    def validate(self) -> None:
        for name in ("streams", "max_batch_size", "prompt_words_median", "output_tokens_min", "rounds", "threads"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be a positive int, got {getattr(self, name)!r}")
        if self.arrival_rate <= 0:
            raise invalid("arrival_rate", f"must be > 0 requests per second, got {self.arrival_rate!r}")
        if not self.output_tokens_min <= self.output_tokens_median <= self.output_tokens_max:
            raise invalid("output_tokens_median", "needs output_tokens_min <= output_tokens_median <= output_tokens_max")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise invalid("image_fraction", f"must be in [0, 1], got {self.image_fraction!r}")


@dataclass
class BenchRequest:
    arrival_s: float
    text: str
    image_png: bytes | None
    max_tokens: int


def build_workload(cfg: ServeBenchConfig) -> list[BenchRequest]:
    """The requests both modes receive: seeded, so every round and mode sees the same ones."""
    import io

    from PIL import Image

    from llava_smoe.testing import CORPUS

    rng = random.Random(cfg.seed)
    words = " ".join(CORPUS).split()
    t, requests = 0.0, []
    for _ in range(cfg.streams):
        n_words = max(1, round(rng.lognormvariate(math.log(cfg.prompt_words_median), 0.8)))
        text = " ".join(rng.choice(words) for _ in range(min(n_words, 80)))
        image = None
        if rng.random() < cfg.image_fraction:
            size = (rng.randint(16, 64), rng.randint(16, 64))
            buf = io.BytesIO()
            Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
            image = buf.getvalue()
        out = round(rng.lognormvariate(math.log(cfg.output_tokens_median), 1.0))
        requests.append(BenchRequest(t, text, image, min(max(out, cfg.output_tokens_min), cfg.output_tokens_max)))
        t += rng.expovariate(cfg.arrival_rate)
    return requests


def _body(r: BenchRequest, model: str) -> dict:
    import base64

    content: list[dict] = [{"type": "text", "text": r.text}]
    if r.image_png is not None:
        url = "data:image/png;base64," + base64.b64encode(r.image_png).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": r.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def replay(url: str, model: str, workload: list[BenchRequest]) -> dict:
    """Send every request at its arrival time (one streaming client each, on one event loop, as
    serving benchmarks do: client threads would compete with the server for the CPU); measure."""
    import asyncio

    import httpx

    async def one(client, r: BenchRequest, t0: float) -> tuple[float, float, int, float]:
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
        arrival = t0 + r.arrival_s
        first, tokens = None, 0
        async with client.stream("POST", url, json=_body(r, model)) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                # Parsed only when needed: the client must not slow the server it measures.
                if first is None and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter()
                elif line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        done = time.perf_counter()
        return done - arrival, (first or done) - arrival, tokens, done

    async def run_all() -> tuple[list, float, int]:
        limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            before = (await client.get(health)).json()["decode_steps"]
            t0 = time.perf_counter() + 0.2
            results = await asyncio.gather(*(one(client, r, t0) for r in workload), return_exceptions=True)
            steps = (await client.get(health)).json()["decode_steps"] - before
        return results, t0, steps

    health = url.rsplit("/v1/", 1)[0] + "/health"
    results, t0, steps = asyncio.run(run_all())
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(workload)} requests failed, the first: {errors[0]!r}")
    latency = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    wall = max(r[3] for r in results) - t0
    expected = sum(r.max_tokens for r in workload)
    if tokens != expected:
        raise RuntimeError(f"the replies hold {tokens} tokens, the workload asked for {expected}")
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens, "decode_steps": steps,
            "tokens_per_step": tokens / steps,
            "latency_p50_s": _percentile(latency, 50), "latency_p95_s": _percentile(latency, 95),
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95)}


def _percentile(sorted_values: list[float], q: int) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cfg: ServeBenchConfig, checkpoint: str, mode: str, log_dir: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    log = open(os.path.join(log_dir, f"{mode}.log"), "w")
    cmd = [sys.executable, "-m", "llava_smoe.bench.serve", checkpoint, str(port), mode, str(cfg.max_batch_size),
           str(cfg.threads), cfg.device, str(cfg.streams)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the {mode} server did not start in 300 s; see {log.name}")


def run_serve_bench(cfg: ServeBenchConfig) -> list[dict]:
    """Both servers up, `rounds` interleaved replays of the workload; one row per mode."""
    import torch
    import transformers

    workload = build_workload(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = cfg.checkpoint
        if checkpoint is None:
            from llava_smoe.testing import save_tiny_checkpoint

            checkpoint = save_tiny_checkpoint(os.path.join(tmp, "tiny_vlm"))
        model = os.path.basename(os.path.normpath(checkpoint))
        servers = {}
        try:
            for mode in MODES:
                servers[mode] = _start_server(cfg, checkpoint, mode, tmp)
            warm = workload[: min(4, len(workload))]
            for _, url in servers.values():  # first forwards (allocations, kernel choice) untimed
                replay(url + "/v1/chat/completions", model, [BenchRequest(0.0, r.text, r.image_png, 4) for r in warm])
            measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for k in range(cfg.rounds):
                for mode in (MODES if k % 2 == 0 else MODES[::-1]):
                    measured[mode].append(replay(servers[mode][1] + "/v1/chat/completions", model, workload))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    setup = {"streams": cfg.streams, "max_batch_size": cfg.max_batch_size, "arrival_rate": cfg.arrival_rate,
             "rounds": cfg.rounds, "threads": cfg.threads, "device": cfg.device, "seed": cfg.seed,
             "checkpoint": cfg.checkpoint or "tiny (llava_smoe.testing.save_tiny_checkpoint)",
             "prompt_words_median": cfg.prompt_words_median, "output_tokens_median": cfg.output_tokens_median,
             "output_tokens_range": [cfg.output_tokens_min, cfg.output_tokens_max],
             "image_fraction": cfg.image_fraction, "torch": torch.__version__, "transformers": transformers.__version__}
    rows = []
    for mode in MODES:
        runs = measured[mode]
        row = {"mode": mode, **{key: statistics.median(r[key] for r in runs) for key in runs[0]}, **setup}
        if mode != "static":
            row["tokens_per_s_ratio_to_static"] = statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, measured["static"]))
            row["tokens_per_step_ratio_to_static"] = statistics.median(
                a["tokens_per_step"] / b["tokens_per_step"] for a, b in zip(runs, measured["static"]))
            row["ttft_p50_ratio_to_static"] = statistics.median(
                a["ttft_p50_s"] / b["ttft_p50_s"] for a, b in zip(runs, measured["static"]))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| mode | tokens/s | x static | tokens per step | x static | latency p50 (s) | latency p95 (s) "
             "| TTFT p50 (s) | TTFT p95 (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("tokens_per_s_ratio_to_static", 1.0)
        step_ratio = r.get("tokens_per_step_ratio_to_static", 1.0)
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {ratio:.2f} | {r['tokens_per_step']:.2f} | "
                     f"{step_ratio:.2f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                     f"{r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |")
    return "\n".join(lines)


def _serve_child(checkpoint: str, port: str, mode: str, max_batch_size: str, threads: str, device: str,
                 streams: str) -> None:
    """A child process: the production app over an engine in `mode`, on 127.0.0.1:port."""
    import uvicorn

    from llava_smoe.inference import Engine, EngineConfig
    from llava_smoe.serve.api import create_app
    from llava_smoe.serve.config import ServerLimits

    engine = Engine(EngineConfig(checkpoint, device=device, max_batch_size=int(max_batch_size),
                                 num_threads=int(threads), scheduling=mode))
    limits = ServerLimits(max_concurrent_requests=int(streams) + 8)
    uvicorn.run(create_app(engine, limits, os.path.basename(os.path.normpath(checkpoint))), host="127.0.0.1",
                port=int(port), log_level="warning")


if __name__ == "__main__":
    _serve_child(*sys.argv[1:])
