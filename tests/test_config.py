import pytest

from training.config import ConfigError, load_config, parse_override


def test_overrides_are_typed_toml_values():
    assert parse_override("optimizer.lr=0.5") == ("optimizer", "lr", 0.5)
    assert parse_override("model.tie_weights=true") == ("model", "tie_weights", True)
    assert parse_override("model.cell=gru") == ("model", "cell", "gru")
    config = load_config("demo-lm", ["optimizer.lr=1", "train.epochs=2"])
    assert config.optimizer.lr == 1.0 and config.train.epochs == 2


@pytest.mark.parametrize("override,key", [
    ("train.bptx=20", "train.bptx"),
    ("modle.cell=gru", "modle"),
    ("model.bidirectional=true", "model.bidirectional"),
    ("model.hidden_size=32", "model.tie_weights"),
    ("model.cell=transformer", "model.cell"),
    ("train.epochs=many", "train.epochs"),
    ("optimizer.lr=0", "optimizer.lr"),
])
def test_configuration_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo-lm", [override])


def test_unknown_key_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\ntrain = "x"\n[model]\nhiden_size = 3\n')
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        load_config(path)


def test_config_round_trips_through_toml(tmp_path):
    config = load_config("demo-ner", ["model.dropout=0.25"])
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="demo-lm"):
        load_config("no-such-recipe")
