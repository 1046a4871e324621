"""Hostile config values: a run name that is not one plain folder name, and values Python cannot parse (an
integer of thousands of digits, a number that overflows to infinity, nesting deeper than the parser's
recursion), are config errors naming the key, never a traceback, and the launcher exits with status 2
before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO, TINY, launcher_env

from pcrl import exit_status
from pcrl.config import ConfigError, RunConfig, load_config

HUGE_INT = "9" * 5000  # past Python's 4,300-digit limit for int(str)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up", "a\\b", "a\0b", "tab\there", "new\nline"])
def test_run_name_must_be_one_plain_folder_name(name: str) -> None:
    """Built in code (every loaded config is built this way too) and, where a command line can carry it, as
    an override."""
    with pytest.raises(ConfigError, match=r"run\.name: must be a plain folder name"):
        RunConfig(name=name)
    if "\n" not in name and "\0" not in name:
        with pytest.raises(ConfigError, match=r"run\.name: must be a plain folder name"):
            load_config(TINY, [f"run.name={name}"])


def test_run_name_with_a_nul_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "nul.yaml"
    config.write_text('run:\n  name: "a\\0b"\n')  # YAML's \0 escape: a NUL character in the value
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(config)


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        (f"run.seed={HUGE_INT}", "run.seed: expected an integer, got '9999"),
        ("optim.lr=1e400", "optim.lr: expected a finite number"),
        ("optim.lr=.nan", "optim.lr: expected a finite number"),
        ("train.max_steps=1e400", "train.max_steps: expected an integer"),
        ("views.global_size=" + "[" * 2000 + "]" * 2000, "views.global_size"),
    ],
)
def test_unparsable_override_values_are_config_errors(override: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert phrase in str(e.value)
    assert len(str(e.value)) < 1000  # the value is cut, not printed whole


@pytest.mark.parametrize(
    "text",
    [f"run:\n  seed: {HUGE_INT}\n", "run:\n  seed: " + "[" * 5000 + "]" * 5000 + "\n"],
    ids=["huge-int", "deep-nesting"],
)
def test_unparsable_config_files_are_config_errors_naming_the_file(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(config) in str(e.value)


@pytest.mark.parametrize("override", ["run.name=..", f"run.seed={HUGE_INT}"])
def test_launcher_exits_2_without_a_traceback_and_writes_nothing(tmp_path: Path, override: str) -> None:
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY)]
    cmd += [f"data.shards={tmp_path}", f"run.output_dir={out}", override]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == exit_status.USAGE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "pretrain: error: run." in proc.stderr
    assert not out.exists() and not (tmp_path / "pcrlv2").exists()
