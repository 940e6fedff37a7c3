"""Streaming cost: CPU microseconds per SSE frame in the parser and assemblers, and requests/s for the
same job streamed and not streamed through the real CLI.

    python tests/bench/bench_stream.py [--frames 200000] [--rows 5000] [--chunks 50]

1. Parser micro-benchmark: a captured-shape stream of each dialect, fed in 1,400-byte pieces (a
   typical TCP read), parsed and assembled; CPU time per frame (time.process_time).
2. End to end: `runner run` against the emulator (a subprocess) with `--stream-chunks N`, streamed
   and plain, printing requests/s and the runner's CPU ms per request.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.bench.harness import ROOT, start_emulator, stop_emulator, write_job

from runner.clients import dashscope_native, openai_compat
from runner.clients.sse import SSEParser


def compat_stream(chunks: int) -> bytes:
    frames = [b'data: {"choices":[{"delta":{"content":"","role":"assistant"},"index":0,"finish_reason":null}],'
              b'"object":"chat.completion.chunk","usage":null,"created":1764300100,"model":"qwen-plus",'
              b'"id":"chatcmpl-e30f5ae7-3063-93c4-90fe-beb5f900bd57"}\n\n']
    for i in range(chunks):
        frames.append(b'data: {"choices":[{"finish_reason":null,"delta":{"content":" word%d"},"index":0,'
                      b'"logprobs":null}],"object":"chat.completion.chunk","usage":null,"created":1764300100,'
                      b'"system_fingerprint":null,"model":"qwen-plus","id":"chatcmpl-e30f5ae7-3063-93c4-90fe-beb5f900bd57"}'
                      b'\n\n' % i)
    frames.append(b'data: {"choices":[{"finish_reason":"stop","delta":{"content":""},"index":0}],"usage":null,'
                  b'"id":"chatcmpl-e30f5ae7-3063-93c4-90fe-beb5f900bd57"}\n\n')
    frames.append(b'data: {"choices":[],"usage":{"prompt_tokens":22,"completion_tokens":12,"total_tokens":34},'
                  b'"id":"chatcmpl-e30f5ae7-3063-93c4-90fe-beb5f900bd57"}\n\ndata: [DONE]\n\n')
    return b"".join(frames)


def native_stream(chunks: int) -> bytes:
    frames = []
    for i in range(chunks):
        finish = b"stop" if i == chunks - 1 else b"null"
        frames.append(b'id:%d\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choices":[{"message":{"content":'
                      b'" word%d","role":"assistant"},"finish_reason":"%s"}]},"usage":{"total_tokens":%d,'
                      b'"input_tokens":26,"output_tokens":%d},"request_id":"9a0b1c2d-3e4f-9a5b-c6d7-e8f9a0b1c2d3"}\n\n'
                      % (i + 1, i, finish, 27 + i, i + 1))
    return b"".join(frames)


def parse_cost(dialect, raw: bytes, frames_per_stream: int, total_frames: int) -> float:
    pieces = [raw[i:i + 1400] for i in range(0, len(raw), 1400)]
    streams = max(1, total_frames // frames_per_stream)
    started = time.process_time()
    for _ in range(streams):
        parser = SSEParser()
        assembler = dialect.StreamAssembler({}, 0.0, time.perf_counter)
        for piece in pieces:
            for event in parser.feed(piece):
                assembler.add(event)
        assembler.finish()
    return (time.process_time() - started) / (streams * frames_per_stream) * 1e6


def end_to_end(rows: int, chunks: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with open(folder / "prompts.jsonl", "w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"id": f"r{i}", "prompt": f"Streaming benchmark prompt {i}, answer at length."})
                         + "\n")
        proc, url = start_emulator(50, (), "--stream-chunks", str(chunks), "--chunk-delay-ms", "2")
        try:
            for dialect in ("openai", "dashscope"):
                for stream in (False, True):
                    name = f"{dialect}-{'stream' if stream else 'plain'}"
                    job = write_job(folder, url, name, dialect=dialect, model={"max_tokens": 512, "stream": stream},
                                    concurrency=256, adaptive_rate=False)
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    run = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--quiet", "--overwrite"],
                                         cwd=ROOT, env={**os.environ, "DASHSCOPE_API_KEY": "sk-bench"},
                                         capture_output=True, text=True, timeout=900)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    if run.returncode != 0:
                        raise SystemExit(run.stderr)
                    summary = json.loads((folder / f"{name}.summary.json").read_text())
                    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                    row = {"run": name, "req_per_s": summary["this_run"]["rows_per_second"],
                           "cpu_ms_per_req": round(cpu * 1000 / rows, 3), "ok": summary["ok"]}
                    results.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop_emulator(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--chunks", type=int, default=50)
    args = parser.parse_args()
    compat_us = parse_cost(openai_compat, compat_stream(500), 503, args.frames)
    native_us = parse_cost(dashscope_native, native_stream(500), 500, args.frames)
    print(f"SSE parse + assemble, 500-frame streams in 1,400-byte reads: compatible {compat_us:.2f} us/frame, "
          f"native {native_us:.2f} us/frame (125,000 frames/s would take {compat_us * 0.125:.0%} / "
          f"{native_us * 0.125:.0%} of one core)", flush=True)
    results = end_to_end(args.rows, args.chunks)
    print()
    for r in results:
        print(f"{r['run']:>18}: {r['req_per_s']:>8,.0f} req/s  {r['cpu_ms_per_req']:.2f} ms CPU/request")


if __name__ == "__main__":
    main()
