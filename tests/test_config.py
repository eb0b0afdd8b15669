import pytest

from pipeline.config import Config, ConfigError, config_hash, load_config


def test_default_config_is_the_broad_miniature():
    """The default is the broad miniature (issue 20); configs/broad.yaml pins the same values, so
    both reach the corpus, clean model and backdoored models findings §9 measured."""
    from pipeline.backdoor import backdoor_key
    from pipeline.build import corpus_key, model_key

    cfg = load_config()
    assert cfg.model.name == "ViT-Mini-8-p4-32" and cfg.corpus.pretrain_style == "broad"
    assert cfg.corpus.num_classes == 24
    assert cfg.poison.for_attack("blended").rate <= 0.01
    assert cfg.poison.for_attack("badclip").params == {"position": "top_left"}
    pinned = load_config("configs/broad.yaml", ["sweep.name=rvpt-default"])
    assert pinned == cfg
    assert corpus_key(cfg) == "dc76f0b777"
    corpus = "/r/corpus/synthetic-dc76f0b777"
    assert model_key(cfg, corpus) == "2dd119025d"
    clean = {"model_dir": "/r/models/clean-2dd119025d"}
    assert backdoor_key(cfg, cfg.poison.for_attack("trojvqa"), clean, corpus) == "73747498ec"
    machine = load_config(None, ["pretrain.compile=true", "pretrain.threads=1"])
    assert model_key(machine, corpus) == "2dd119025d", "how the loop runs is not part of the key"
    assert backdoor_key(machine, machine.poison.for_attack("trojvqa"), clean, corpus) == "73747498ec"
    # a corpus with an effect left out is another corpus; unknown or negative weights are errors
    assert corpus_key(load_config(None, ["corpus.effect_weights={static: 0}"])) != "dc76f0b777"
    with pytest.raises(ConfigError, match="unknown effects"):
        load_config(None, ["corpus.effect_weights={statik: 0}"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["corpus.effect_weights={static: -1}"])


def test_shapes_config_is_the_earlier_default():
    """configs/shapes.yaml keeps the shapes benchmark's keys (its models and figures stay valid)."""
    from pipeline.build import corpus_key, model_key

    cfg = load_config("configs/shapes.yaml")
    assert cfg.model.name == "ViT-Tiny-12-p8-32" and cfg.corpus.pretrain_style == "shapes"
    assert corpus_key(cfg) == "e6a27b763a", "the shapes corpus keeps the key it was measured with"
    assert model_key(cfg, "/r/corpus/synthetic-e6a27b763a") == "1d94e6a093", \
        "options added since (pretrain.twins) keep the clean model's key while off"
    assert cfg.poison.for_attack("trojvqa").rate == 0.3 and cfg.poison.for_attack("sig").epochs == 6
    assert cfg.poison.for_attack("badnet").rate == 0.1
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(None, ["pretrain.crop_scale=[0.8,0.2]"])
    for on in ("pretrain.twins=0.25", "pretrain.crop_scale=[0.3,1.0]"):
        over = load_config("configs/shapes.yaml", [on])
        assert model_key(over, "/r/corpus/synthetic-e6a27b763a") != "1d94e6a093"


def test_overrides_are_typed():
    cfg = load_config(None, ["pretrain.epochs=7", "corpus.noise=0.1", "model.pretrained=openai",
                             "corpus.shifted=false"])
    assert cfg.pretrain.epochs == 7 and cfg.corpus.noise == 0.1
    assert cfg.model.pretrained == "openai" and cfg.corpus.shifted is False


@pytest.mark.parametrize("override, field", [
    ("pretrain.lr=abc", "pretrain.lr"),
    ("pretrain.epochs=0", "pretrain.epochs"),
    ("corpus.nosuch=1", "corpus.nosuch"),
    ("corpus.kind=video", "corpus.kind"),
    ("corpus.num_classes=99", "corpus"),
    ("device=gpu0", "device"),
])
def test_bad_value_fails_with_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and field in msg


def test_device_auto_resolves_and_a_missing_gpu_is_one_clear_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config().torch_device() == "cpu" and load_config(None, ["device=cpu"]).torch_device() == "cpu"
    with pytest.raises(ConfigError, match="device: cuda:1 asked for, but torch sees no GPU"):
        load_config(None, ["device=cuda:1"]).torch_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config().torch_device() == "cuda"


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["pretrain.epochs"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=3"])
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["seed=4"])) != config_hash(cfg)


@pytest.mark.parametrize("name", ["default.yaml", "shapes.yaml", "broad.yaml", "smoke.yaml",
                                  "paper.yaml"])
def test_shipped_configs_validate(name):
    from pipeline.config import CONFIG_DIR, load_config

    cfg = load_config(CONFIG_DIR / name)
    assert cfg.sweep.attacks and cfg.sweep.defenses


def test_one_source_of_defaults():
    """configs/default.yaml sets nothing: the schema's defaults are the embedded default. The
    sweep's space is per defense: a defense the config does not name searches its declared space."""
    from pipeline.config import CONFIG_DIR, load_config
    from pipeline.sweep import spaces
    from rvpt.defenses import DEFENSES

    cfg = load_config(CONFIG_DIR / "default.yaml")
    assert cfg == Config()
    assert set(spaces(cfg)) == set(cfg.sweep.defenses) == set(cfg.sweep.space)
    cfg = load_config(None, ["sweep.defenses=[rvpt,cleanclip,linear_probe]"])
    got = spaces(cfg)
    assert got["cleanclip"] == DEFENSES["cleanclip"].space and got["linear_probe"] == {}
    assert got["rvpt"] == cfg.sweep.space["rvpt"] != DEFENSES["rvpt"].space
