"""The `recur` command: dispatches to a subcommand, importing only what that one needs,
so serving commands run where torch is not installed."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, summary)
COMMANDS = {
    "train": ("training.cli", "train_command", "train a model from a TOML config"),
    "evaluate": ("training.cli", "evaluate_command", "print a run's metrics as JSON"),
    "generate": ("training.cli", "generate_command", "sample text from a language model"),
    "data": ("training.cli", "data_command", "write the generated corpus (recur data synth)"),
    "export": ("training.cli", "export_command", "export a run as a verified ONNX artifact"),
    "serve": ("serving.cli", "serve_command", "serve a model repository over gRPC"),
    "complete": ("serving.cli", "complete_command", "stream a completion from a server"),
    "score": ("serving.cli", "score_command", "perplexity of a file, scored by a server"),
    "tag": ("serving.cli", "tag_command", "tag texts with a served tagger"),
    "classify": ("serving.cli", "classify_command", "classify texts with a served classifier"),
    "session": ("serving.cli", "session_command", "interactive incremental scoring session"),
    "models": ("serving.cli", "models_command", "list the models a server serves"),
}


def usage() -> str:
    lines = ["usage: recur COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "recur COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"recur: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    try:
        command = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as error:
        side = "train" if module.startswith("training") else "serve"
        print(f"recur {argv[0]}: {error.name} is not installed here; `recur {argv[0]}` needs "
              f"the {side} extra (pip install 'recur[{side}]')", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
