"""Config loading: the seed's YAML maps key by key, round trips are exact, and every bad input is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from titans.config import (
    VARIANTS,
    ConfigError,
    DataConfig,
    MemoryConfig,
    ModelConfig,
    RunConfig,
    TrainingConfig,
    all_keys,
    config_to_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_seed_yaml_loads_unchanged_and_maps_each_key():
    cfg = load_config(ROOT / "configs" / "seed.yaml")
    assert (cfg.model.variant, cfg.model.d_model, cfg.model.n_heads) == ("MAC", 32, 2)
    assert (cfg.model.memory_layers, cfg.model.persistent_memory_size) == (2, 8)
    assert (cfg.data.dataset, cfg.data.seq_len, cfg.data.vocab_size, cfg.data.num_samples) == (
        "copy_task",
        96,
        10,
        1000,
    )
    assert (cfg.training.batch_size, cfg.training.max_epochs) == (4, 200)
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.gradient_clip == 1.0
    # Everything the seed does not mention keeps its default.
    assert cfg.model.memory == MemoryConfig() and cfg.training.betas == TrainingConfig().betas


def test_repo_default_config_is_mac_on_copy():
    cfg = load_config(ROOT / "config.yaml")
    assert (cfg.model.variant, cfg.data.dataset) == ("MAC", "copy_task")


def test_none_gives_defaults_and_round_trips(tmp_path):
    cfg = load_config(None)
    assert cfg == RunConfig()
    save_config(cfg, tmp_path / "a" / "config.yaml")
    assert load_config(tmp_path / "a" / "config.yaml") == cfg


def test_non_default_config_round_trips_exactly(tmp_path):
    overrides = [
        "model.variant=mag",
        "model.memory.heads=2",
        "model.memory.max_lr=0.037",
        "data.dataset=needle_haystack",
        "data.needle_query=value",
        "training.betas=[0.8, 0.999]",
        "training.learning_rate=3.3e-5",
        "training.run_name=x1",
        "seed=12345",
    ]
    cfg = load_config(None, overrides)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg) == yaml.safe_load((tmp_path / "c.yaml").read_text())


def test_overrides_are_parsed_and_coerced():
    cfg = load_config(ROOT / "configs" / "seed.yaml", ["model.memory.chunk_size=8", "training.learning_rate=3e-4"])
    assert cfg.model.memory.chunk_size == 8
    # PyYAML reads 3e-4 (no dot) as a string; the loader turns it into the float.
    assert cfg.training.learning_rate == 3e-4 and isinstance(cfg.training.learning_rate, float)
    cfg = load_config(None, ["training.betas=[0.9, 1e-1]", "training.max_steps=1e3", "data.copy_length=null"])
    assert cfg.training.betas == (0.9, 0.1) and cfg.training.max_steps == 1000 and cfg.data.copy_length is None
    # Later overrides win; whole sections can be given as YAML mappings.
    cfg = load_config(None, ["model.d_model=32", "model={d_model: 128, n_heads: 8}"])
    assert (cfg.model.d_model, cfg.model.n_heads) == (128, 8)


@pytest.mark.parametrize("spelling, canonical", [("mac", "MAC"), ("Lmm", "LMM"), ("BASELINE", "baseline")])
def test_variant_is_case_insensitive(spelling, canonical):
    assert load_config(None, [f"model.variant={spelling}"]).model.variant == canonical
    assert canonical in VARIANTS


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "training.learnin_rate=1",
            "unknown config key 'training.learnin_rate' (did you mean 'training.learning_rate'?)",
        ),
        ("model.learning_rate=1", "did you mean 'training.learning_rate'?"),
        ("model.memory.chunksize=4", "did you mean 'model.memory.chunk_size'?"),
        ("trainng.batch_size=4", "did you mean 'training'?"),
        ("model.variant=MACC", "did you mean 'MAC'?"),
        ("data.dataset=copy", "did you mean 'copy_task'?"),
        ("training.dtype=bfloat", "did you mean 'bfloat16'?"),
    ],
)
def test_unknown_names_suggest_the_closest(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.seq_len=abc", "data.seq_len must be an int, got 'abc'"),
        ("data.seq_len=2.5", "data.seq_len must be an int, got 2.5"),
        ("model.d_model=true", "model.d_model must be an int, got the bool True"),
        ("training.progress=1", "training.progress must be true or false, got 1"),
        ("training.learning_rate=fast", "training.learning_rate must be a float such as 3e-4, got 'fast'"),
        ("training.learning_rate=.nan", "training.learning_rate must be a finite float"),
        ("training.betas=0.9", "training.betas must be a list of 2 values"),
        ("training.betas=[0.9, x]", "training.betas[1] must be a float"),
        ("training.run_name=7", "training.run_name must be a string, got 7"),
        ("training.device=tpu", "training.device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        ("model.memory=3", "model.memory must be a mapping"),
        ("seed=99999999999999999999", "does not fit in int64"),
    ],
)
def test_wrong_types_say_expected_and_got(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.d_model=30", "model.n_heads=4"], "model.d_model = 30 is not divisible by model.n_heads = 4"),
        (["model.d_model=12", "model.n_heads=4"], "must be even for rotary embeddings"),
        (["model.memory.heads=3"], "set model.memory.heads to a divisor of d_model"),
        (["model.memory.chunk_size=0"], "model.memory.chunk_size must be >= 1"),
        (["model.window=0"], "model.window must be >= 1"),
        (["model.memory.theta_init=2"], "model.memory.theta_init must lie in (0, max_lr = 1.0)"),
        (["model.memory.alpha_init=1"], "model.memory.alpha_init must lie in (0, 1) or be null"),
        (["model.memory.eta_init=0"], "model.memory.eta_init must lie in (0, 1)"),
        (["data.vocab_size=1"], "data.vocab_size must be >= 2"),
        (["data.test_fraction=1.0"], "data.test_fraction must lie in (0, 1)"),
        (["data.num_samples=1"], "raise data.num_samples"),
        (["data.seq_len=8", "data.copy_length=4"], "needs data.seq_len >= 9, got 8"),
        (["data.dataset=language_modeling", "data.seq_len=1"], "raise data.seq_len"),
        (["data.dataset=needle_haystack", "data.needle_min_distance=200"], "data.needle_min_distance = 200"),
        (["data.dataset=needle_haystack", "data.needle_buckets=1000"], "data.needle_buckets must lie in [2, 48]"),
        (["model.vocab_size=10"], "model.vocab_size = 10 is smaller than the copy_task vocabulary (14 ids"),
        (["training.batch_size=900"], "exceeds the 800 train samples"),
        (["training.eval_samples=201"], "exceeds the 200 test samples"),
        (["training.min_lr_ratio=2"], "training.min_lr_ratio must lie in [0, 1]"),
        (["training.run_name=a/b"], "plain directory name"),
    ],
)
def test_impossible_combinations_say_what_to_change(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="model.n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="data.dataset"):
        DataConfig(dataset="nope")
    assert TrainingConfig(learning_rate="3e-4").learning_rate == 3e-4
    # fresh_samples lifts the fixed-split size checks.
    assert load_config(None, ["data.fresh_samples=true", "training.batch_size=5000"]).training.batch_size == 5000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: [1, 2", "is not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("model: 3\n", "model must be a mapping"),
        ("1: 2\n", "config keys must be strings"),
        ("seed: !!int x\n", "is not valid YAML"),
        ("seed: 2001-13-45\n", "is not valid YAML"),
    ],
)
def test_malformed_files_raise_config_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_unreadable_inputs_raise_config_error(tmp_path):
    for bad_path in (tmp_path / "missing.yaml", tmp_path, "bad\0name"):
        with pytest.raises(ConfigError, match="cannot read config file"):
            load_config(bad_path)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == RunConfig()
    for bad_override in ("no_equals_sign", "=3", "a..b=1", "seed.x=1"):
        with pytest.raises(ConfigError):
            load_config(None, [bad_override])
    with pytest.raises(ConfigError, match="list of 'key=value' strings"):
        load_config(None, "seed=1")


# Property: whatever text or overrides arrive, the loader returns a RunConfig or raises ConfigError, nothing else.

_KEYS = all_keys()
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["3e-4", "MAC", "copy_task", "value", "bfloat16", "cpu", "1e3", "[0.9, 0.9]"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_key_names = st.one_of(st.sampled_from(_KEYS), st.text(max_size=15))


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *sections, leaf = dotted.split(".")
        for part in sections:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else node
        node[leaf] = value
    return tree


def _assert_loads_or_config_error(path, overrides) -> None:
    try:
        cfg = load_config(path, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abdelmostn_.:-[]{},'\"!&*#|>%@ \n\t0123456789")), max_size=120))
def test_random_yaml_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("prop") / "c.yaml"
    path.write_text(text)
    _assert_loads_or_config_error(path, ())


@settings(max_examples=80, deadline=None)
@given(flat=st.dictionaries(_key_names, _values, max_size=6))
def test_random_yaml_documents_load_or_raise_config_error(tmp_path_factory, flat):
    path = tmp_path_factory.mktemp("prop") / "c.yaml"
    path.write_text(yaml.safe_dump(_nest(flat)))
    _assert_loads_or_config_error(path, ())


@settings(max_examples=60, deadline=None)
@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(_key_names, st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
            st.tuples(st.sampled_from(_KEYS), _scalars).map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1])}"),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
def test_random_overrides_load_or_raise_config_error(overrides):
    _assert_loads_or_config_error(None, overrides)


def test_impossible_configs_name_the_key_and_the_fix():
    # heads not dividing d_model, odd head widths, memory heads, window < 1 ...: the tests above
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.memory.forgetting=false", "model.memory.channelwise_forget=true"])
    assert "model.memory.channelwise_forget = true needs model.memory.forgetting = true" in str(error.value)
    assert "set model.memory.forgetting=true or model.memory.channelwise_forget=false" in str(error.value)
    with pytest.raises(ConfigError, match="model.d_model = 30 is not divisible by model.n_heads = 4"):
        load_config(None, ["model.d_model=30"])
    # A vocabulary of billions is refused by the config, not by an out-of-memory kill in the task or the embedding.
    with pytest.raises(ConfigError, match="data.vocab_size = 4617739213 exceeds the 1,048,576 ids"):
        load_config(None, ["data.vocab_size=4617739213.0"])
    with pytest.raises(ConfigError, match="model.vocab_size = 2000000 exceeds the 1,048,576 ids"):
        load_config(None, ["model.vocab_size=2000000"])
    # bfloat16 autocast is no longer refused on the CPU (tests/test_robustness.py tests it).
    assert load_config(None, ["training.dtype=bfloat16", "training.device=cpu"]).training.dtype == "bfloat16"


# Extends the properties above (each path alone: a RunConfig or a ConfigError) with agreement: the same
# values given as a YAML file or as key=value overrides load to the same config or fail with the same message, and a
# config that loads survives save_config/load_config unchanged.

_SECTIONS = {"model", "data", "training", "model.memory"}
_LEAVES = [key for key in all_keys() if key not in _SECTIONS]
_PLAUSIBLE = st.one_of(
    st.integers(min_value=-2, max_value=130),
    st.floats(min_value=-1, max_value=2, allow_nan=False),
    st.booleans(),
    st.none(),
    st.sampled_from(["MAC", "mag", "LMM", "copy_task", "needle_haystack", "bfloat16", "cpu", "gelu", "3e-4", "x"]),
    st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=2),
)


def _load_or_error(path, overrides):
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        return f"ConfigError: {error}"


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(st.sampled_from(_LEAVES), _PLAUSIBLE, max_size=4))
def test_yaml_file_and_overrides_agree_and_loaded_configs_round_trip(tmp_path_factory, values):
    folder = tmp_path_factory.mktemp("agree")
    tree: dict = {}
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    # In the overrides' order, so that both paths meet the same first bad value.
    (folder / "c.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    from_file = _load_or_error(folder / "c.yaml", [])
    from_overrides = _load_or_error(None, [f"{key}={yaml.safe_dump(value)}" for key, value in values.items()])
    assert from_file == from_overrides
    if not isinstance(from_file, str):
        save_config(from_file, folder / "saved.yaml")
        assert load_config(folder / "saved.yaml") == from_file
