"""The `recur` command as a user runs it."""

import json
import subprocess
import sys

from conftest import REPO


def recur(*args, env=None):
    return subprocess.run([sys.executable, "-m", "recur", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_dry_run_trains_a_few_batches_and_writes_the_run(synth_dir, tmp_path):
    out = tmp_path / "run"
    result = recur("train", "--config", "demo-ner", "--dry-run", "--out", str(out),
                   "--set", f'data.train="{synth_dir / "ner" / "train.conll"}"',
                   "--set", f'data.valid="{synth_dir / "ner" / "valid.conll"}"',
                   "--set", f'data.test="{synth_dir / "ner" / "test.conll"}"')
    assert result.returncode == 0, result.stderr
    for name in ("config.toml", "vocab.json", "labels.json", "best.pt", "last.pt",
                 "metrics.jsonl", "summary.json", "learning_curve.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    evaluated = recur("evaluate", str(out), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert {"accuracy", "entity_f1", "loss"} <= metrics.keys()


def test_configuration_error_is_refused_before_training(tmp_path):
    result = recur("train", "--config", "demo-lm", "--set", "model.bidirectional=true",
                   "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "model.bidirectional" in result.stderr
    assert not (tmp_path / "x").exists()


def test_generate_is_reproducible_for_a_seed(demo_lm_run):
    first = recur("generate", str(demo_lm_run), "--prompt", "the dogs that", "--seed", "3",
                  "--temperature", "0.9", "--top-p", "0.95", "-n", "2")
    again = recur("generate", str(demo_lm_run), "--prompt", "the dogs that", "--seed", "3",
                  "--temperature", "0.9", "--top-p", "0.95", "-n", "2")
    other = recur("generate", str(demo_lm_run), "--prompt", "the dogs that", "--seed", "4",
                  "--temperature", "0.9", "--top-p", "0.95", "-n", "2")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("the dogs that ") for line in lines)
    assert first.stdout == again.stdout != other.stdout


def test_greedy_generation_continues_the_agreement(demo_lm_run):
    result = recur("generate", str(demo_lm_run), "--prompt", "the old dogs that see a cat",
                   "--temperature", "0")
    words = result.stdout.split()
    # the main verb after the relative clause agrees with "dogs", not with "cat"
    verbs = {"sleep", "run", "sing", "laugh", "wait", "see", "like", "follow", "find", "watch"}
    assert words[7] in verbs, result.stdout


def test_unknown_command_and_help():
    assert recur("frobnicate").returncode == 2
    help_text = recur("--help").stdout
    assert all(c in help_text for c in ("train", "evaluate", "generate", "data"))


def test_serving_imports_without_torch_or_training():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['training'] = None\n"
            "import serving.model.tokenizer, serving.model.sampler, serving.model.artifact\n"
            "import serving.model.runtime, serving.server, serving.cli, serving.batch_score\n"
            "import recur.cli\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
    offenders = [p for p in (REPO / "serving").rglob("*.py")
                 if any(w in p.read_text() for w in ("import torch", "from torch",
                                                       "import training", "from training"))]
    assert offenders == []


def test_export_writes_a_verified_artifact_and_refuses_to_overwrite(demo_lm_run, tmp_path):
    out = tmp_path / "repo" / "demo" / "1"
    first = recur("export", str(demo_lm_run), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "verified against torch" in first.stdout
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["task"] == "lm" and metadata["cell"] == "lstm"
    assert metadata["validation"]["ppl"] < 10 and len(metadata["onnx_sha256"]) == 64
    report = json.loads((out / "verification.json").read_text())
    assert max(report["max_abs_diff"].values()) <= 1e-4
    again = recur("export", str(demo_lm_run), "--out", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_a_run_evaluates_from_any_folder_and_exports_without_its_corpus(synth_dir, tmp_path):
    """The recipe names its data relative to the folder it is trained in; the run records
    those paths absolute, and export needs only the run directory."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(synth_dir, work / "data" / "synth")
    run = work / "run"
    trained = subprocess.run([sys.executable, "-m", "recur", "train", "--config", "demo-lm",
                              "--dry-run", "--out", str(run)], cwd=work, capture_output=True,
                             text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def recur_in(folder, *args):
        return subprocess.run([sys.executable, "-m", "recur", *args], cwd=folder,
                              capture_output=True, text=True, timeout=300)

    evaluated = recur_in(elsewhere, "evaluate", str(run), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["tokens"] > 0
    shutil.rmtree(work / "data")  # the corpus is gone: export and generate need none of it
    exported = recur_in(elsewhere, "export", str(run), "--out", "repo/demo-lm/1")
    assert exported.returncode == 0, exported.stderr
    assert (elsewhere / "repo" / "demo-lm" / "1" / "model.onnx").exists()
    generated = recur_in(elsewhere, "generate", str(run), "--max-tokens", "3", "--seed", "1")
    assert generated.returncode == 0, generated.stderr
    missing = recur_in(elsewhere, "evaluate", str(run), "--split", "test")
    assert missing.returncode == 2 and "no such corpus file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_corpus_in_another_encoding_is_named_with_its_byte_offset(tmp_path):
    corpus = tmp_path / "trec.txt"
    corpus.write_bytes("DESC what is a caf\xe9 ?\nLOC where is rome ?\n".encode("latin-1"))
    result = recur("train", "--config", "demo-cls", "--dry-run", "--out", str(tmp_path / "r"),
                   "--set", f'data.train="{corpus}"', "--set", f'data.valid="{corpus}"',
                   "--set", f'data.test="{corpus}"')
    assert result.returncode == 2
    assert f"{corpus}: not valid utf-8 at byte 18" in result.stderr
    assert "data.encoding" in result.stderr and "Traceback" not in result.stderr
    latin = recur("train", "--config", "demo-cls", "--dry-run", "--out", str(tmp_path / "r2"),
                  "--set", f'data.train="{corpus}"', "--set", f'data.valid="{corpus}"',
                  "--set", f'data.test="{corpus}"', "--set", 'data.encoding="latin-1"')
    assert latin.returncode == 0, latin.stderr
