"""The serving half of `make demo`: start `recur serve` on the exported demo models, call
every service through the command line and the OpenAI-compatible HTTP API, print a few
metrics lines, stop with SIGTERM.

    python tools/demo.py runs/models data/synth
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def run(command: list[str], stdin: str | None = None) -> None:
    print(f"\n$ {' '.join(command)}" + (f"   <<< {stdin!r}" if stdin else ""), flush=True)
    subprocess.run(command, input=stdin, text=True, check=True, timeout=300)


def main(argv: list[str]) -> int:
    models, data = Path(argv[0]), Path(argv[1])
    recur = [sys.executable, "-m", "recur"]
    server = subprocess.Popen([*recur, "serve", "--model-repository", str(models), "--port",
                               "0", "--metrics-port", "0", "--http-port", "0",
                               "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"listening on ([\d.]+:\d+), metrics on (\d+).*HTTP on (\d+)", line)
        if match is None:
            raise SystemExit(f"recur serve did not start: {line!r}")
        target, metrics_port, http_port = match[1], match[2], match[3]
        print(line.strip(), flush=True)
        at = ["--server", target]
        run([*recur, "models", *at])
        run([*recur, "complete", *at, "--model", "demo-lm", "--prompt",
                         "the old dogs that", "--max-tokens", "20", "--temperature", "0.8",
                         "--seed", "1", "-n", "3"])
        run([*recur, "score", *at, "--model", "demo-lm", str(data / "lm" / "test.txt")])
        run([*recur, "session", *at, "--model", "demo-lm", "--top-k", "3"],
            stdin="the old dogs that\nthe cat sees\nrun\n")
        sentences = ["the cruel cats that watch the cat sleep in rome",
                     "some happy dogs run in san francisco"]
        run([*recur, "tag", *at, "--model", "demo-pos", *sentences])
        run([*recur, "tag", *at, "--model", "demo-ner", *sentences])
        run([*recur, "classify", *at, "--model", "demo-cls",
                         "every dark child that follows this house sleeps again",
                         "the kind teachers laugh happily"])
        openai_completion(http_port)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        print(f"\n$ curl -s 127.0.0.1:{metrics_port}/metrics | grep ...")
        wanted = ("recur_tokens_total", "recur_requests_total", "recur_batch_size_count",
                  "recur_active_sessions", "recur_http_requests_total",
                  "nv_inference_request_success")
        for row in page.splitlines():
            if row.startswith(wanted) and not row.endswith(" 0.0"):
                print(row)
    finally:
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = server.wait(30)
        print(f"\nrecur serve stopped on SIGTERM (exit {code}, "
              f"{time.monotonic() - started:.1f} s)")
    return code


def openai_completion(http_port: str) -> None:
    """What `curl` or the `openai` package sends: the seed of `recur complete` above, so
    the first sample's text is the same."""
    body = {"model": "demo-lm", "prompt": "the old dogs that", "max_tokens": 20,
            "temperature": 0.8, "seed": 1, "n": 1}
    print(f"\n$ curl -s 127.0.0.1:{http_port}/v1/completions -H 'Content-Type: "
          f"application/json' -d '{json.dumps(body)}'", flush=True)
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    choice = answer["choices"][0]
    print(f"choices[0]: {choice['text']!r} (finish_reason {choice['finish_reason']}), usage "
          f"{answer['usage']}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
