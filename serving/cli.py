"""`recur serve | complete | score | tag | classify | session | models`: the serving side's
commands. They need only the `serve` (or `serve-cpu`) extra: no torch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def serve_parser() -> argparse.ArgumentParser:
    from serving import config as server_config

    parser = argparse.ArgumentParser(
        prog="recur serve", description="Serve a model repository over gRPC. Every option is "
        "also an environment variable (RECUR_<OPTION>, e.g. RECUR_MAX_BATCH_SIZE) and a key of "
        "the --config TOML file; flags win over the environment, which wins over the file.")
    server_config.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO",
                        help="Python logging level: DEBUG, INFO, WARNING or ERROR. Default: INFO.")
    return parser


def serve_command(argv: list[str]) -> int:
    from serving import config as server_config

    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = server_config.from_arguments(args)
    except (ValueError, OSError) as error:
        print(f"recur serve: configuration error: {error}", file=sys.stderr)
        return 2
    from serving.model.artifact import ArtifactError
    from serving.model.runtime import DeviceUnavailable
    from serving.server import serve

    try:
        asyncio.run(serve(config))
    except (ArtifactError, DeviceUnavailable, FileNotFoundError, OSError, ValueError) as error:
        print(f"recur serve: {error}", file=sys.stderr)
        return 1
    return 0


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_TARGET, help="host:port of recur serve")
    group = parser.add_argument_group("connection security")
    group.add_argument("--tls-ca", help="PEM CA of the server's certificate: connect with TLS")
    group.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    group.add_argument("--tls-key", help="PEM key of --tls-cert")
    group.add_argument("--token-file", help="a file holding a bearer token")


def _connect(args):
    from serving.client import RecurClient, connect

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    channel = connect(args.server, args.tls_ca, args.tls_cert, args.tls_key, token)
    return RecurClient(args.server, channel=channel)


def _client_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_connection(parser)
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    return parser


def _run_client(function, args) -> int:
    try:
        with _connect(args) as client:
            return function(client, args) or 0
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable certificate or token file
        print(f"recur: {error}", file=sys.stderr)
        return 2


def complete_command(argv: list[str]) -> int:
    parser = _client_parser("recur complete", "Stream a completion of a prompt.")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the server's default")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("-n", type=int, default=1, help="number of samples")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = parser.parse_args(argv)

    def run(client, args):
        for event in client.complete(args.model, args.prompt, version=args.version,
                                     max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                     n=args.n, stop=args.stop):
            if event.finish_reason:
                print(f"[{event.index}] {args.prompt} {event.text}".strip()
                      + f"  ({event.finish_reason})", flush=True)
        return 0

    return _run_client(run, args)


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recur score",
        description="Perplexity of text files, one sentence per line: streamed to a server "
        "(ScoreStream), or with --local scored in this process by ONNX Runtime, which is what "
        "a batch Job runs (--file-list and --shard split the work between pods).")
    parser.add_argument("files", nargs="*", type=Path, help="input files")
    _add_connection(parser)
    parser.add_argument("--model", help="model name in the server's repository")
    parser.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    parser.add_argument("--no-eos", action="store_true", help="do not score each line's <eos>")
    parser.add_argument("--output", type=Path, help="write per-line JSON results here")
    parser.add_argument("--lines-per-message", type=int, default=64,
                        help="sentences sent in one stream message (default 64)")
    local = parser.add_argument_group("in-process scoring (no server)")
    local.add_argument("--local", metavar="MODEL_DIR", type=Path,
                       help="score with this artifact (REPO/NAME/VERSION) in this process")
    local.add_argument("--file-list", type=Path,
                       help="a file naming the input files, one path per line")
    local.add_argument("--shard", default="0/1", metavar="INDEX/COUNT",
                       help="score every COUNT-th input file from INDEX on (default 0/1)")
    local.add_argument("--out", type=Path, default=Path("scores"),
                       help="results folder: <shard>.jsonl and <shard>.summary.json")
    local.add_argument("--threads", type=int, default=0,
                       help="ONNX Runtime threads (0: its default)")
    return parser


def score_command(argv: list[str]) -> int:
    parser = score_parser()
    args = parser.parse_args(argv)
    if args.local:
        return _score_locally(parser, args)
    if args.model is None:
        parser.error("--model is required (or --local MODEL_DIR to score without a server)")
    if len(args.files) != 1 or args.file_list:
        parser.error("a server scores one file per call; several files need --local")
    args.file = args.files[0]
    if args.lines_per_message < 1:
        print("recur score: --lines-per-message must be >= 1", file=sys.stderr)
        return 2
    if not args.file.exists():
        print(f"recur score: {args.file}: no such file", file=sys.stderr)
        return 2

    def groups():
        """(first line number, lines) in groups of --lines-per-message."""
        with args.file.open() as lines:
            group, first = [], 0
            for number, line in enumerate(lines):
                if not group:
                    first = number
                group.append(line.rstrip("\n"))
                if len(group) == args.lines_per_message:
                    yield str(first), group
                    group = []
            if group:
                yield str(first), group

    def run(client, args):
        with args.file.open() as f:
            lines = sum(1 for _ in f)
        total, tokens, unknown, done = 0.0, 0, 0, 0
        started = last = time.perf_counter()
        out = args.output.open("w") if args.output else None
        for result in client.score_stream(args.model, groups(), version=args.version,
                                          add_eos=not args.no_eos):
            for offset, score in enumerate(result.scores):
                total, tokens = total + score.total_logprob, tokens + score.token_count
                unknown, done = unknown + score.unknown_count, done + 1
                if out:
                    out.write(json.dumps({"line": int(result.id) + offset,
                                          "logprob": score.total_logprob,
                                          "tokens": score.token_count}) + "\n")
            if (now := time.perf_counter()) - last > 0.5 or done == lines:
                last = now
                print(f"\r{done}/{lines} lines, {tokens / (now - started):,.0f} tokens/s, "
                      f"perplexity so far {_ppl(total, tokens):.2f}", end="", file=sys.stderr)
        print(file=sys.stderr)
        if out:
            out.close()
        print(json.dumps({"file": str(args.file), "lines": done, "tokens": tokens,
                          "unknown": unknown, "logprob": total,
                          "perplexity": _ppl(total, tokens)}))
        return 0

    return _run_client(run, args)


def _score_locally(parser: argparse.ArgumentParser, args) -> int:
    from serving.batch_score import Shard, read_file_list, score_shard
    from serving.model.artifact import ArtifactError

    try:
        shard = Shard.parse(args.shard)
    except ValueError as error:
        parser.error(str(error))
    files = list(args.files)
    if args.file_list:
        if not args.file_list.is_file():
            parser.error(f"--file-list {args.file_list}: no such file")
        files += read_file_list(args.file_list)
    if not files:
        parser.error("no input files: name them or give --file-list")

    def progress(summary) -> None:
        print(f"\r{summary.shard}: {summary.lines} lines, {summary.tokens} tokens", end="",
              file=sys.stderr, flush=True)

    try:
        result = score_shard(args.local, files, shard, args.out, not args.no_eos, args.threads,
                             progress=progress)
    except (ArtifactError, FileNotFoundError, ValueError) as error:
        print(f"recur score: {error}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    print(json.dumps(result))
    return 0


def _ppl(total: float, tokens: int) -> float:
    import math

    return math.exp(-total / tokens) if tokens else float("nan")


def tag_command(argv: list[str]) -> int:
    parser = _client_parser("recur tag", "Tag texts (arguments, or lines of stdin).")
    parser.add_argument("texts", nargs="*")
    args = parser.parse_args(argv)

    def run(client, args):
        texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
        for result in client.tag(args.model, texts, version=args.version):
            print(" ".join(f"{t.token}/{t.tag}" for t in result.tokens))

    return _run_client(run, args)


def classify_command(argv: list[str]) -> int:
    parser = _client_parser("recur classify", "Classify texts (arguments, or lines of stdin).")
    parser.add_argument("texts", nargs="*")
    args = parser.parse_args(argv)

    def run(client, args):
        texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
        for text, result in zip(texts, client.classify(args.model, texts,
                                                       version=args.version)):
            probs = ", ".join(f"{c.label} {c.probability:.3f}" for c in result.classes)
            print(f"{result.label}\t{text}\t({probs})")

    return _run_client(run, args)


def session_command(argv: list[str]) -> int:
    parser = _client_parser("recur session", "Interactive session: type text, see each "
                            "token's log-prob and the likely next words (a blank line ends).")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    def run(client, args):
        session = client.create_session(args.model, version=args.version, top_k=args.top_k)
        _show(session)
        try:
            for line in sys.stdin:
                if not line.strip():
                    break
                _show(client.append(session.session_id, line.strip(), top_k=args.top_k))
        finally:
            client.close_session(session.session_id)

    return _run_client(run, args)


def _show(response) -> None:
    for token in response.tokens:
        print(f"  {token.text:<16} {token.logprob:8.3f}")
    for tag in response.tags:
        print(f"  {tag.token:<16} {tag.tag}")
    if response.classes:
        print("  classes: " + ", ".join(f"{c.label} {c.probability:.3f}"
                                        for c in response.classes))
    if response.next_tokens:
        print("  next: " + ", ".join(f"{t.text} ({t.logprob:.2f})" for t in response.next_tokens))
    sys.stdout.flush()


def models_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recur models", description="List served models.")
    _add_connection(parser)
    args = parser.parse_args(argv)
    from dataclasses import asdict

    try:
        with _connect(args) as client:
            for info in client.list_models():
                print(json.dumps(asdict(info)))
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0
