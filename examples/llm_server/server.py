#!/usr/bin/env python3
"""An example external server for `tuner search --server`: the design of seed 001's
`llm_model` app (a FastAPI service batching requests for a GPU), in the standard library only.

It reads seed 001's variables, batches requests with a wait timeout, runs up to
MAX_CONCURRENT_GENERATIONS batches at once, queues up to MAX_INFERENCE_QUEUE_SIZE requests and
answers 429 beyond, and serves POST /generate, POST /v1/completions and GET /health.

It is a SIMULATED model: a batch of n requests costs SIM_BATCH_MS + n * SIM_ITEM_MS of CPU work,
plus SIM_TOKEN_MS per decoding step (the batch decodes as many steps as its longest request's
tokens). The work is real (SHA-256 over a buffer, which releases the GIL, so concurrent batches
really compete for this host's cores), calibrated at start so that 1 ms of cost is 1 ms of one
core. Knobs therefore trade off as they do on a device: bigger batches amortize the fixed cost
and raise latency, the wait timeout trades latency for fuller batches, and more concurrent
generations than cores only add contention.

    MAX_CONCURRENT_GENERATIONS=6 MAX_INFERENCE_BATCH_SIZE=4 BATCH_WAIT_TIMEOUT=0.08 \
        python3 examples/llm_server/server.py --port 8000
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def env_num(name, default, cast=int, lo=1):
    """A numeric variable, or exit naming it (as a misconfigured service should)."""
    v = os.environ.get(name, str(default))
    try:
        x = cast(v)
    except ValueError:
        sys.exit(f"{name}={v!r}: expected {'an integer' if cast is int else 'a number'}")
    if x < lo:
        sys.exit(f"{name}={x}: must be at least {lo}")
    return x


CONCURRENT = env_num("MAX_CONCURRENT_GENERATIONS", 4)
BATCH = env_num("MAX_INFERENCE_BATCH_SIZE", 4)
WAIT_S = env_num("BATCH_WAIT_TIMEOUT", 0.05, float, 0.0)
QUEUE = env_num("MAX_INFERENCE_QUEUE_SIZE", 500)
MAX_NEW_TOKENS = env_num("MAX_NEW_TOKENS", 128)
BATCH_MS = env_num("SIM_BATCH_MS", 20.0, float, 0.0)
ITEM_MS = env_num("SIM_ITEM_MS", 4.0, float, 0.0)
TOKEN_MS = env_num("SIM_TOKEN_MS", 0.5, float, 0.0)
LOAD_S = env_num("SIM_LOAD_S", 0.5, float, 0.0)

BLOCK = b"\x5a" * 16384


def calibrate():
    """Blocks hashed per CPU-millisecond of this thread (CPU time: immune to other load)."""
    n, t0 = 0, time.thread_time()
    while time.thread_time() - t0 < 0.2:
        for _ in range(64):
            hashlib.sha256(BLOCK).digest()
        n += 64
    return n / ((time.thread_time() - t0) * 1000.0)


BLOCKS_PER_MS = None


def burn(ms):
    for _ in range(max(1, int(ms * BLOCKS_PER_MS))):
        hashlib.sha256(BLOCK).digest()


def run_batch(tokens):
    """The simulated forward passes of one batch: prefill, then one step per output token."""
    burn(BATCH_MS + ITEM_MS * len(tokens) + TOKEN_MS * max(tokens))


class Server:
    def __init__(self):
        self.pending = asyncio.Queue()
        self.queued = 0
        self.ready = False
        self.pool = ThreadPoolExecutor(max_workers=CONCURRENT)
        self.slots = asyncio.Semaphore(CONCURRENT)

    async def batcher(self):
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()
            first = await self.pending.get()
            batch = [first]
            deadline = loop.time() + WAIT_S
            while len(batch) < BATCH:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.pending.get(), left))
                except asyncio.TimeoutError:
                    break
            self.queued -= len(batch)
            asyncio.create_task(self.generate(batch))

    async def generate(self, batch):
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, run_batch, [n for n, _ in batch]
            )
            for n, fut in batch:
                if not fut.done():
                    fut.set_result(n)
        except Exception as e:  # a failed batch fails its own requests only
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        finally:
            self.slots.release()

    async def complete(self, n):
        """Queues a request for n tokens; None when the queue is full."""
        if self.queued >= QUEUE:
            return None
        fut = asyncio.get_running_loop().create_future()
        self.queued += 1
        await self.pending.put((n, fut))
        return await fut

    async def handle(self, method, path, body):
        if path == "/health" and method == "GET":
            if not self.ready:
                return 503, {"status": "loading"}
            return 200, {"status": "ok", "queued": self.queued}
        if path not in ("/generate", "/v1/completions"):
            return 404, {"error": f"no route {path}"}
        if method != "POST":
            return 405, {"error": f"{path} takes POST"}
        if not self.ready:
            return 503, {"error": "model loading"}
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as e:
            return 400, {"error": f"invalid JSON: {e}"}
        field = "max_new_tokens" if path == "/generate" else "max_tokens"
        want = req.get(field, 16)
        if not isinstance(want, int) or isinstance(want, bool) or want < 1:
            return 400, {"error": f"{field} must be a positive integer"}
        n = min(want, MAX_NEW_TOKENS)
        t0 = time.monotonic()
        done = await self.complete(n)
        if done is None:
            return 429, {"error": f"inference queue full ({QUEUE} requests)"}
        text = " ".join(["token"] * n)
        took = time.monotonic() - t0
        if path == "/generate":
            return 200, {"text": text, "generated_tokens": n, "time_s": round(took, 4)}
        return 200, {
            "object": "text_completion",
            "model": "simulated",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n},
        }

    async def connection(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                parts = line.decode("latin-1").split()
                if len(parts) < 2:
                    break
                method, path = parts[0], parts[1].split("?")[0]
                length, close = 0, False
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip() or 0)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                status, obj = await self.handle(method, path, body)
                data = json.dumps(obj).encode()
                reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                          429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(data)}\r\n\r\n".encode() + data
                )
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def main():
    global BLOCKS_PER_MS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args()
    BLOCKS_PER_MS = calibrate()
    s = Server()
    srv = await asyncio.start_server(s.connection, a.host, a.port, backlog=4096)
    asyncio.create_task(s.batcher())
    await asyncio.sleep(LOAD_S)  # "loading the model": /health answers 503 meanwhile
    s.ready = True
    print(
        f"ready on {a.host}:{a.port}: generations={CONCURRENT} batch={BATCH} wait={WAIT_S}s "
        f"queue={QUEUE} max_new_tokens={MAX_NEW_TOKENS}",
        flush=True,
    )
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
