"""The skeleton: config loading, CLI wiring and the entry point translation."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from lifecycle.config import config_digest, flatten, from_mapping, load_config, parse_overrides
from lifecycle.errors import ConfigError


@dataclass
class Lora:
    r: int = 8
    alpha: float = 16.0


@dataclass
class Cfg:
    preset: Literal["tiny", "small"] = "tiny"
    lr: float = 1e-3
    steps: int = 10
    compile: bool = False
    base: Optional[str] = None
    lora: Lora = field(default_factory=Lora)

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError("steps must be positive")


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["lora.r=4", "lr=3e-4", "compile=true", "base=x"]) == {
        "lora": {"r": 4}, "lr": 3e-4, "compile": True, "base": "x"}


def test_load_config_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nsteps: 20\nlora:\n  r: 2\n")
    cfg = load_config(Cfg, f, ["lora.alpha=4"], steps=30, base=None)
    assert (cfg.lr, cfg.steps, cfg.lora.r, cfg.lora.alpha, cfg.base) == (0.5, 30, 2, 4.0, None)
    assert flatten(cfg)["lora.r"] == "2"
    assert config_digest(cfg) == config_digest(load_config(Cfg, f, ["lora.alpha=4"], steps=30))


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=8"], "unknown config key lora.rank; valid keys: lora.r, lora.alpha"),
    (["steps=abc"], "steps: expected an integer"),
    (["steps=1.5"], "steps: expected an integer"),
    (["preset=huge"], "preset: 'huge' is not one of tiny, small"),
    (["compile=maybe"], "compile: expected true/false"),
    (["steps=0"], "steps must be positive"),
    (["noequals"], "--set expects key=value"),
])
def test_bad_config_is_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(Cfg, None, overrides)


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 1\nsteps: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(Cfg, f)


def test_from_mapping_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="lora: expected a section"):
        from_mapping(Cfg, {"lora": 3})


def test_cli_help_and_python_m():
    out = subprocess.run([sys.executable, "-m", "lifecycle", "--help"], capture_output=True, text=True, check=True)
    assert "Manage the whole life of a language model" in out.stdout
    assert "prepare" in out.stdout


def test_every_listed_command_has_help():
    from click.testing import CliRunner

    from lifecycle.cli import cli

    runner = CliRunner()
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_default_tracking_keeps_artifacts_out_of_mlruns(tmp_path):
    """With MLflow's embedded default (sqlite:///mlflow.db, no server), MLflow itself would put
    artifacts under ./mlruns; the CLI keeps them in ./mlartifacts beside the database."""
    import os

    (tmp_path / "corpus.txt").write_text(
        "\n\n".join(f"Document {i} talks about rivers, mountains and the music of village {i} "
                    "in the early morning, with many more words to pass the quality filters." for i in range(60)),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "_MLFLOW_SERVER_ARTIFACT_ROOT")}
    proc = subprocess.run(
        [sys.executable, "-m", "lifecycle", "prepare", "--source", "corpus.txt", "--output", "prepared",
         "--vocab-size", "300", "--block-size", "32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
    cards = list((tmp_path / "mlartifacts").rglob("data_card.json"))
    assert cards, "the prepare run's artifacts should be in ./mlartifacts"
