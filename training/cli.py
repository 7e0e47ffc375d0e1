"""`recur train | evaluate | generate | data`: the training side's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recur train", description="Train a model.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a TOML file, or a recipe name from training/configs/")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. optimizer.lr=0.5")
    parser.add_argument("--out", help="run directory (default: runs/<config name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one epoch of a few batches, then evaluate: for CI")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine, launched by torchrun "
                             "(for several machines run torchrun yourself)")
    return parser


def train_command(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    from training.config import ConfigError, load_config

    try:
        if args.resume:
            run_dir = Path(args.resume)
            config = load_config(run_dir / "config.toml", args.set)
        else:
            run_dir = Path(args.out or f"runs/{Path(args.config).stem}")
            config = load_config(args.config, args.set)
        if args.nproc > 1 and config.train.batch_size % args.nproc:
            raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible "
                              f"by the number of processes ({args.nproc})")
    except (ConfigError, FileNotFoundError) as error:
        print(f"recur train: configuration error: {error}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc, _without_nproc(argv))
    from training.data.readers import CorpusError
    from training.train import train

    try:
        summary = train(config, run_dir, resume=bool(args.resume), dry_run=args.dry_run)
    except ConfigError as error:
        print(f"recur train: configuration error: {error}", file=sys.stderr)
        return 2
    except (CorpusError, FileNotFoundError) as error:
        print(f"recur train: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _launch_torchrun(nproc: int, train_args: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node N -m recur.cli train ...`, in this process."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "recur.cli", "train",
                  *train_args])
    except ChildFailedError as error:
        print(f"recur train: a training process failed:\n{error}", file=sys.stderr)
        return 1
    return 0


def evaluate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recur evaluate",
                                     description="Print a run's metrics on a split as JSON.")
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--probes", help="a TSV of (grammatical, ungrammatical) sentence pairs")
    parser.add_argument("--device", help="override train.device, e.g. cpu")
    args = parser.parse_args(argv)
    from training.config import ConfigError
    from training.data.readers import CorpusError
    from training.evaluate import load_run, probe_accuracy
    from training.train import device_of

    try:
        config, task, model = load_run(args.run_dir, args.device)
        result = {"split": args.split, **task.evaluate(model, args.split, device_of(config))}
        if args.probes:
            result["probe_accuracy"] = probe_accuracy(model, task.vocab, args.probes)
    except (ConfigError, CorpusError, FileNotFoundError) as error:
        print(f"recur evaluate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recur generate",
                                     description="Sample text from a trained language model.")
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", "--samples", type=int, default=1)
    args = parser.parse_args(argv)
    from serving.model.sampler import SamplingParams
    from training.evaluate import load_run
    from training.generate import generate

    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        parser.error(str(error))
    try:
        config, task, model = load_run(args.run_dir)
    except FileNotFoundError as error:
        print(f"recur generate: {error}", file=sys.stderr)
        return 2
    if config.data.task != "lm" or config.model.type == "kn":
        parser.error(f"{args.run_dir} is not a neural language model")
    for index in range(args.samples):
        ids = generate(model, task.vocab, args.prompt, args.max_tokens, params, args.seed, index)
        text = task.vocab.decode([i for i in ids if i != task.vocab.eos_id])
        print((args.prompt + " " if args.prompt and config.data.level == "word" else args.prompt)
              + text)
    return 0


def data_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recur data", description="Data utilities.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write the generated corpus (LM, POS, NER, labelled)")
    synth.add_argument("--out", default="data/synth")
    synth.add_argument("--seed", type=int, default=1234)
    synth.add_argument("--scale", type=float, default=1.0, help="multiplies every file's size")
    args = parser.parse_args(argv)
    from training.data.synth import write_corpus

    counts = write_corpus(args.out, args.seed, args.scale)
    for name, n in counts.items():
        print(f"{Path(args.out) / name}: {n} sentences")
    return 0


def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="recur export",
        description="Export a trained run as a verified ONNX model artifact.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, metavar="REPO/NAME/VERSION",
                        help="artifact directory; VERSION is an integer, never overwritten")
    parser.add_argument("--quantize", choices=("int8",),
                        help="publish the graph with its weight matrices quantized by ONNX "
                             "Runtime (language models only), checked against the float32 "
                             "graph and its validation perplexity cost measured")
    parser.add_argument("--max-ppl-cost", type=float, metavar="FRACTION",
                        help="with --quantize: refuse (and publish nothing) when the int8 "
                             "validation perplexity is more than this fraction above float32's "
                             "(default 0.02, i.e. 2%%)")
    parser.add_argument("--ppl-tokens", type=int, metavar="N",
                        help="with --quantize: validation tokens scored by each graph "
                             "(default 20000; the first N of the split)")
    args = parser.parse_args(argv)
    if args.quantize is None and (args.max_ppl_cost is not None or args.ppl_tokens is not None):
        parser.error("--max-ppl-cost and --ppl-tokens apply only with --quantize int8")
    if args.max_ppl_cost is not None and not 0 <= args.max_ppl_cost < float("inf"):
        parser.error(f"--max-ppl-cost must be a finite fraction >= 0, got {args.max_ppl_cost}")
    from serving.model.artifact import ArtifactError
    from training.data.readers import CorpusError
    from training.export import ExportError, export_run
    from training.export.quantize import MAX_PPL_COST, PPL_TOKENS, QuantizationError
    from training.export.verify import ExportMismatch

    try:
        metadata = export_run(args.run_dir, args.out, args.quantize,
                              MAX_PPL_COST if args.max_ppl_cost is None else args.max_ppl_cost,
                              PPL_TOKENS if args.ppl_tokens is None else args.ppl_tokens)
    except (ArtifactError, ExportError, ExportMismatch, QuantizationError, CorpusError,
            FileNotFoundError) as error:
        print(f"recur export: {error}", file=sys.stderr)
        return 1
    if args.quantize:
        q = metadata["quantization"]
        print(f"{metadata['path']}: {metadata['task']} {metadata['cell']} x{metadata['layers']}, "
              f"int8 ({q['nodes']['int8_products']} int8 products, "
              f"{q['nodes']['in_recurrence_bodies']} in the recurrence's Loop bodies); "
              f"log-probs within "
              f"{q['max_logprob_diff']:.1e} of the float32 graph's; validation ppl "
              f"{q['validation_ppl_float32']:.3f} -> {q['validation_ppl_int8']:.3f} "
              f"({100 * q['relative_ppl_cost']:+.2f}%, allowed {100 * q['max_ppl_cost']:.2f}%) "
              f"on {q['tokens']:,} tokens")
        return 0
    outputs = metadata["verification"]["outputs"].values()
    graph = max(o["graph_vs_float64"] for o in outputs)
    torch32 = max(o["torch_float32_vs_float64"] for o in outputs)
    print(f"{metadata['path']}: {metadata['task']} {metadata['cell']} x{metadata['layers']}, "
          f"verified against torch (float64 reference: graph within {graph:.1e}, torch's "
          f"float32 forward within {torch32:.1e})")
    return 0
