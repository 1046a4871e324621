"""The config tree: every shipped YAML loads, mistakes name their key, and derived settings agree."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest

from pcrl.config import (
    ConfigError,
    ModelConfig,
    PretrainConfig,
    config_from_dict,
    config_hash,
    config_to_dict,
    flatten_config,
    load_config,
    save_config,
)
from pcrl.distributed import deepspeed_config
from pcrl.optim import lr_schedule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_every_yaml_loads(path: Path) -> None:
    """A YAML in configs/ that no longer matches the schema would only fail when a user launches it."""
    if path.parent.name == "tune":  # sweeps: their own schema, with the pretraining config they name
        from pcrl.sweep import load_sweep

        assert load_sweep(path, ["data.shards=shards"]).space
        return
    if path.parent.name == "finetune":  # downstream tasks: the fine-tuning schema
        from pcrl.finetune import FinetuneConfig, load_finetune_config

        assert isinstance(load_finetune_config(path), FinetuneConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, PretrainConfig)


def test_config_defaults_are_the_paper() -> None:
    """The defaults are documented as the paper's 3D setting; pin the numbers that define it."""
    cfg = PretrainConfig()
    assert cfg.views.global_size == (64, 64, 32)
    assert cfg.views.local_size == (16, 16, 16)
    assert cfg.views.num_locals == 6
    assert cfg.views.min_iou == 0.3
    assert cfg.model.base_channels == 32 and cfg.model.depth == 4
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd",
        1e-3,
        0.9,
        1e-4,
    )
    assert cfg.objective.restore_views == [1]


@pytest.mark.parametrize(
    ("override", "key", "phrase"),
    [
        ("train.max_step=3", "train.max_step", "Did you mean 'max_steps'"),
        ("trian.max_steps=3", "trian", "unknown key"),
        ("train.max_steps=abc", "train.max_steps", "expected an integer"),
        ("train.max_steps=0", "train.max_steps", "must be >= 1"),
        ("train.micro_batch_size=1", "train.micro_batch_size", "two samples per device"),
        ("objective.weights.global=-1", "objective.weights.global", "must be >= 0"),
        ("objective.weights.globl=1", "objective.weights.globl", "unknown key"),
        ("objective.restore_views=[3]", "objective.restore_views", "must be [1], [2] or [1, 2]"),
        ("engine.precision=fp8", "engine.precision", "fp32, bf16, fp16 or auto"),
        ("views.global_size=[30,32,16]", "views.global_size", "divisible by 8"),
        ("views.global_size=[32,32]", "views.global_size", "expected 3 values"),
        ("model.norm=layer", "model.norm", "batch, sync_batch, group or instance"),
        ("tracking.enabled=maybe", "tracking.enabled", "true or false"),
        ("engine.compile=maybe", "engine.compile", "true or false"),
        ("run=3", "run", "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str, phrase: str) -> None:
    """Users fix typos from the message alone: it must name the dotted key and say what is wrong."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(key), str(err.value)
    assert phrase in str(err.value)


def test_config_compile_refuses_activation_checkpointing() -> None:
    """torch.compile cannot trace the decoder's checkpointing (its context keeps BatchNorm statistics from
    counting twice): the combination is refused at load, naming both keys, not at the first step."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["engine.compile=true", "model.activation_checkpointing=true"])
    assert str(err.value).startswith("engine.compile") and "model.activation_checkpointing" in str(err.value)


def _choice_keys(schema: type, prefix: str = "") -> list[tuple[str, tuple[object, ...]]]:
    """Every ``Literal[...]`` key of a schema tree, dotted, with its allowed values."""
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        key, tp = f"{prefix}{f.name.rstrip('_')}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _choice_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is typing.Literal:
            keys.append((key, typing.get_args(tp)))
    return keys


def test_config_every_choice_is_checked_from_its_type() -> None:
    """A key typed Literal[...] rejects other values with the key and every allowed value named, in every
    section of both schemas (a section whose __post_init__ forgot check_choices would let them through)."""
    from pcrl.finetune import FinetuneConfig, load_finetune_config

    for schema, load in ((PretrainConfig, load_config), (FinetuneConfig, load_finetune_config)):
        keys = _choice_keys(schema)
        assert "model.norm" in dict(keys)
        for key, allowed in keys:
            bad = 99 if isinstance(allowed[0], int) else "nope"
            with pytest.raises(ConfigError) as err:
                load(None, [f"{key}={bad}"])
            listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
            assert str(err.value) == f"{key}: must be {listed}, got {bad!r}"
    # A near miss gets a suggestion; a section built in code is checked like a loaded one.
    with pytest.raises(ConfigError, match=r"^model\.norm: .*got 'btach'\. Did you mean 'batch'\?$"):
        load_config(None, ["model.norm=btach"])
    with pytest.raises(ConfigError, match=r"^model\.norm: must be batch, sync_batch, group or instance"):
        ModelConfig(norm="layer")  # type: ignore[arg-type]


def test_config_precedence_cli_over_yaml_over_defaults(tmp_path: Path) -> None:
    """Overrides must beat the YAML, which must beat the defaults, key by key (not section by section)."""
    y = tmp_path / "c.yaml"
    y.write_text("train: {max_steps: 7, log_every: 3}\nobjective: {weights: {global: 0.5}}\n")
    cfg = load_config(y, ["train.max_steps=9"])
    assert cfg.train.max_steps == 9  # CLI
    assert cfg.train.log_every == 3  # YAML
    assert cfg.train.micro_batch_size == 8  # default
    assert cfg.objective.weights.global_ == 0.5
    assert cfg.objective.weights.local == 1.0


def test_config_string_overrides_keep_their_text() -> None:
    """A string key given something YAML reads as a number keeps the text as written (a Ray trial id like
    28683_00000 became the run name 2868300000, so the sweep driver looked for the trial in another
    folder); quotes and null still mean what YAML says, and other keys still get YAML's value."""
    cfg = load_config(
        None,
        [
            "run.name=28683_00000",
            "data.shards=0123",
            "run.output_dir='007'",
            "tracking.uri=null",
            "tracking.experiment=2026-01-02",
            "train.max_steps=1_000",
            "tracking.enabled=false",
        ],
    )
    assert cfg.run.name == "28683_00000" and cfg.data.shards == "0123" and cfg.run.output_dir == "007"
    assert cfg.tracking.uri == "" and cfg.tracking.experiment == "2026-01-02"
    assert cfg.train.max_steps == 1000 and cfg.tracking.enabled is False
    with pytest.raises(ConfigError, match=r"^train\.max_steps: expected an integer, got 'x'"):
        load_config(None, ["train.max_steps=x"])


def test_config_bad_yaml_files_are_named(tmp_path: Path) -> None:
    """A broken or misplaced file is reported with its path, not as a parser traceback."""
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("views: {globl_size: [8, 8, 8]}\n")
    with pytest.raises(ConfigError, match=r"views\.globl_size.*typo\.yaml"):
        load_config(typo)


def test_config_round_trip_and_hash(tmp_path: Path) -> None:
    """The saved config must reload to the same tree (checkpoints and MLflow rely on it)."""
    cfg = load_config(REPO / "configs/pretrain/tiny.yaml", ["objective.weights.global=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["run.seed=1"])) != config_hash(load_config(None))
    flat = flatten_config(cfg)
    assert flat["objective.weights.global"] == 0.25
    assert flat["views.global_size"] == [32, 32, 16]


def test_deepspeed_config_is_derived(tmp_path: Path) -> None:
    """Batch sizes and precision live once, in pcrl's config; DeepSpeed's keys are computed from them."""
    cfg = load_config(
        None,
        [
            "train.micro_batch_size=4",
            "train.grad_accum_steps=3",
            "engine.precision=bf16",
            "engine.zero_stage=2",
        ],
    )
    ds = deepspeed_config(cfg, world=2)
    assert ds["train_batch_size"] == 24
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2


def test_deepspeed_overlay_adds_but_never_contradicts(tmp_path: Path) -> None:
    """An expert overlay may add engine knobs, but must not silently override a pcrl setting."""
    ok = tmp_path / "ok.json"
    ok.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 0, "reduce_bucket_size": 1000}, "prescale_gradients": True}
        )
    )
    ds = deepspeed_config(load_config(None, [f"engine.deepspeed_overlay={ok}"]), world=1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["prescale_gradients"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=2.*gives 0"):
        deepspeed_config(load_config(None, [f"engine.deepspeed_overlay={bad}"]), world=1)
    opt = tmp_path / "opt.json"
    opt.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optim"):
        deepspeed_config(load_config(None, [f"engine.deepspeed_overlay={opt}"]), world=1)


def test_lr_schedule_warmup_then_cosine() -> None:
    """The schedule is a pure function of the step: warm-up ramps to the peak, cosine decays to the floor."""
    cfg = load_config(None, ["optim.lr=0.1", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    assert lr_schedule(0, 110, cfg) == pytest.approx(0.01)
    assert lr_schedule(9, 110, cfg) == pytest.approx(0.1)
    assert lr_schedule(10, 110, cfg) == pytest.approx(0.1)
    assert lr_schedule(60, 110, cfg) == pytest.approx(0.01 + 0.09 * 0.5)
    assert lr_schedule(110, 110, cfg) == pytest.approx(0.01)
    no_warm = load_config(None, ["optim.lr=1.0"]).optim
    assert lr_schedule(50, 100, no_warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
