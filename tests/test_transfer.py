"""Transfer from a language model run: word-by-word embedding mapping, recurrent layers,
discriminative learning rates and gradual unfreezing (ULMFiT)."""

import json

import pytest
import torch
from conftest import demo_config

from training import checkpoint
from training.config import ConfigError
from training.evaluate import load_run
from training.tasks import make_task
from training.train import build_optimizer, train
from training.transfer import layer_groups, transfer_from_lm, unfreeze_for_epoch


def _pos(synth_dir, lm_run, *overrides):
    return demo_config("demo-pos", synth_dir, "model.embedding_size=64", "model.hidden_size=64",
                       f'model.init_from="{lm_run}"', *overrides)


def test_the_embedding_is_mapped_word_by_word_and_the_first_layer_copied(synth_dir,
                                                                         demo_lm_run):
    _, lm_task, lm = load_run(demo_lm_run, device="cpu")
    task = make_task(_pos(synth_dir, demo_lm_run))
    torch.manual_seed(0)
    tagger = task.build_model()
    fresh = tagger.embedding.weight.detach().clone()
    report = transfer_from_lm(tagger, task.vocab, demo_lm_run)
    shared = [w for w in task.vocab.tokens if w in lm_task.vocab.index and w != "<pad>"]
    assert report["words"] == len(shared) > 0 and report["recurrent_layers"] == 1
    for word in shared:
        ours, theirs = task.vocab.index[word], lm_task.vocab.index[word]
        assert torch.equal(tagger.embedding.weight[ours], lm.embedding.weight[theirs])
    pad = task.vocab.pad_id
    assert torch.equal(tagger.embedding.weight[pad], fresh[pad])  # <pad> stays zero
    new = [i for i, w in enumerate(task.vocab.tokens) if w not in lm_task.vocab.index]
    assert all(torch.equal(tagger.embedding.weight[i], fresh[i]) for i in new)
    mine, source = tagger.stack.forward_layers[0], lm.stack.forward_layers[0]
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(),
                                                 source.state_dict().values()))
    backward = tagger.stack.backward_layers[0]  # no counterpart in a left-to-right LM
    assert not torch.equal(backward.weight_hh, source.weight_hh)


def test_mismatched_sizes_and_non_lm_runs_are_refused(synth_dir, demo_lm_run, tmp_path):
    task = make_task(demo_config("demo-pos", synth_dir))  # embedding_size 32 against 64
    with pytest.raises(ConfigError, match="embedding_size"):
        transfer_from_lm(task.build_model(), task.vocab, demo_lm_run)
    with pytest.raises(ConfigError, match="not a run directory"):
        transfer_from_lm(task.build_model(), task.vocab, tmp_path)
    with pytest.raises(ConfigError, match="applies to taggers and classifiers"):
        demo_config("demo-lm", synth_dir, f'model.init_from="{demo_lm_run}"')


def test_discriminative_rates_slow_each_group_down_from_the_top(synth_dir, demo_lm_run):
    config = _pos(synth_dir, demo_lm_run, "optimizer.layer_lr_decay=2.6")
    model = make_task(config).build_model()
    optimizer = build_optimizer(config, model)
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates == pytest.approx([0.01 / 2.6 ** 2, 0.01 / 2.6, 0.01])  # embedding, LSTM, output
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_gradual_unfreezing_trains_the_top_groups_first(synth_dir, demo_lm_run, tmp_path):
    model = make_task(_pos(synth_dir, demo_lm_run)).build_model()
    assert unfreeze_for_epoch(model, 2, 0) == 1
    groups = layer_groups(model)
    assert [all(p.requires_grad for p in g) for g in groups] == [False, False, True]
    assert unfreeze_for_epoch(model, 2, 2) == 2
    assert unfreeze_for_epoch(model, 2, 9) == 3
    options = ("train.unfreeze_every=1", "optimizer.layer_lr_decay=2.6")
    run = tmp_path / "pos"
    summary = train(_pos(synth_dir, demo_lm_run, "train.epochs=3", *options), run)
    assert summary["transferred"]["recurrent_layers"] == 1
    assert json.loads((run / "transfer.json").read_text()) == summary["transferred"]
    # after epoch 1, in which the output layer alone trained, the rest is still the LM's
    stopped = tmp_path / "stopped"
    train(_pos(synth_dir, demo_lm_run, "train.epochs=3", *options,
               f"train.max_steps={summary['steps'] // 3}"), stopped)
    _, lm_task, lm = load_run(demo_lm_run, device="cpu")
    vocab = make_task(_pos(synth_dir, demo_lm_run), run).vocab
    word = next(w for w in vocab.tokens if w in lm_task.vocab.index and w != "<unk>")
    after_one = checkpoint.load(stopped / checkpoint.LAST)["model"]
    final = checkpoint.load(run / checkpoint.LAST)["model"]
    ours, theirs = vocab.index[word], lm_task.vocab.index[word]
    assert torch.equal(after_one["embedding.weight"][ours], lm.embedding.weight[theirs])
    assert torch.equal(after_one["stack.forward_layers.0.weight_hh"],
                       lm.stack.forward_layers[0].weight_hh)
    config = _pos(synth_dir, demo_lm_run)
    torch.manual_seed(config.train.seed)  # as train() seeds before it builds the model
    initial = make_task(config).build_model()
    assert torch.equal(initial.stack.backward_layers[0].weight_hh,
                       after_one["stack.backward_layers.0.weight_hh"])  # frozen, fresh
    assert not torch.equal(after_one["output.weight"], initial.output.weight)
    assert not torch.equal(final["embedding.weight"][ours], lm.embedding.weight[theirs])


def test_a_char_aware_tagger_gets_the_lm_layer_in_its_word_columns(synth_dir, demo_lm_run):
    _, _, lm = load_run(demo_lm_run, device="cpu")
    task = make_task(_pos(synth_dir, demo_lm_run, "model.char_embedding_size=8",
                          "model.char_filters=10"))
    torch.manual_seed(0)
    tagger = task.build_model()
    fresh = tagger.stack.forward_layers[0].weight_ih.detach().clone()
    assert transfer_from_lm(tagger, task.vocab, demo_lm_run)["recurrent_layers"] == 1
    mine, source = tagger.stack.forward_layers[0], lm.stack.forward_layers[0]
    assert torch.equal(mine.weight_ih[:, :64], source.weight_ih)
    assert torch.equal(mine.weight_ih[:, 64:], fresh[:, 64:])  # the characters' columns
    assert torch.equal(mine.weight_hh, source.weight_hh)


def test_a_fresh_character_cnn_trains_at_the_top_rate_from_the_first_epoch(synth_dir,
                                                                          demo_lm_run):
    config = _pos(synth_dir, demo_lm_run, "model.char_embedding_size=8",
                  "model.char_filters=10", "optimizer.layer_lr_decay=2.6")
    model = make_task(config).build_model()
    chars = {id(p) for p in model.chars.parameters()}
    rates = {id(p): group["lr"] for group in build_optimizer(config, model).param_groups
             for p in group["params"]}
    assert chars and all(rates[p] == pytest.approx(0.01) for p in chars)
    assert rates[id(model.embedding.weight)] == pytest.approx(0.01 / 2.6 ** 2)
    assert unfreeze_for_epoch(model, 2, 0) == 1
    assert all(p.requires_grad for p in model.chars.parameters())
    assert not model.embedding.weight.requires_grad


def test_a_bpe_language_model_is_refused(synth_dir, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n".join((synth_dir / "lm" / "train.txt").read_text().splitlines()[:300]))
    lm_run = tmp_path / "bpe"
    train(demo_config("demo-lm", synth_dir, f'data.train="{small}"', f'data.valid="{small}"',
                      'data.level="bpe"', "data.bpe_vocab_size=300", "train.max_steps=2"),
          lm_run)
    task = make_task(demo_config("demo-pos", synth_dir, "model.embedding_size=64"))
    with pytest.raises(ConfigError, match="bpe-level language model"):
        transfer_from_lm(task.build_model(), task.vocab, lm_run)


def test_the_lm_words_join_the_vocabulary_when_asked(synth_dir, demo_lm_run):
    """min_count keeps only frequent training words; with init_vocabulary the LM's other
    words come back with its vectors, where they would have been <unk>."""
    _, lm_task, lm = load_run(demo_lm_run, device="cpu")
    lm_words = [w for w in lm_task.vocab.tokens if w not in ("<unk>", "<eos>")]
    plain = make_task(_pos(synth_dir, demo_lm_run, "data.min_count=200"))
    rare = [w for w in lm_words if w not in plain.vocab.index]
    assert rare  # words the tagger alone would read as <unk>
    widened = make_task(_pos(synth_dir, demo_lm_run, "data.min_count=200",
                             "model.init_vocabulary=true"))
    assert widened.vocab.tokens[:len(plain.vocab)] == plain.vocab.tokens  # ids kept
    assert set(widened.vocab.tokens) == set(plain.vocab.tokens) | set(lm_words)
    tagger = widened.build_model()
    transfer_from_lm(tagger, widened.vocab, demo_lm_run)
    for word in rare:
        assert torch.equal(tagger.embedding.weight[widened.vocab.index[word]],
                           lm.embedding.weight[lm_task.vocab.index[word]])
    # the training data now reads those words as themselves, not as <unk>
    unk = widened.vocab.unk_id
    assert sum(i == unk for ids, _ in widened.encoded("train") for i in ids) < sum(
        i == unk for ids, _ in plain.encoded("train") for i in ids)
    with pytest.raises(ConfigError, match="model.init_vocabulary"):
        demo_config("demo-pos", synth_dir, "model.init_vocabulary=true")
