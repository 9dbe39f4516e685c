"""The CLI's wiring: help, string flags taken exactly, the MLproject translation, OS errors as one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.errors import LifecycleError
from tests.cli import cli
from tests.test_config import TEXT

REPO = Path(__file__).resolve().parents[1]


def _entrypoint_helper():
    """entrypoints/_run.py, loaded by path: putting entrypoints/ on sys.path would shadow modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lifecycle_entrypoints_run", REPO / "entrypoints" / "_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


to_cli_args = _entrypoint_helper().to_cli_args


def test_cli_help_and_python_m():
    out = subprocess.run([sys.executable, "-m", "lifecycle", "--help"], capture_output=True, text=True, check=True)
    assert "Manage the whole life of a language model" in out.stdout
    assert "prepare" in out.stdout


def test_every_listed_command_has_help():
    from click.testing import CliRunner

    from lifecycle.cli import COMMANDS
    from lifecycle.cli import cli as group

    runner = CliRunner()
    assert group.list_commands(None) == list(COMMANDS)  # type: ignore[arg-type]
    for name in COMMANDS:
        result = runner.invoke(group, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


# -- string flags reach the stage exactly -----------------------------------------------------------

class Seen(LifecycleError):
    """Raised by the recorder standing in for a stage's library call: the config was seen, stop here."""


def _record(monkeypatch: pytest.MonkeyPatch, target: str) -> dict:
    """Record what the command hands to the library function ``target`` (module:function) and stop."""
    import importlib

    module, attr = target.split(":")
    seen: dict = {}
    # Import the orchestration modules first: they bind ``train``/``prepare`` at import time, and one
    # first imported while the recorder is in place would keep it after this test (pipeline tests).
    for orchestration in ("lifecycle.pipeline", "lifecycle.retrain"):
        importlib.import_module(orchestration)

    def recorder(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise Seen("seen")

    monkeypatch.setattr(importlib.import_module(module), attr, recorder)
    return seen


def _one_line_refusal(code: int, err: str) -> bool:
    return code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("Error: ")


# A path-safe piece of any text: no separator or NUL (those make another path, not another name).
NAME = TEXT.map(lambda t: t.replace("/", "_").replace("\0", "_")).filter(lambda t: t not in ("", ".", ".."))


@pytest.mark.tried("cli", "any text to --source, --text-column, --output of prepare: '#', YAML-looking values "
                   "(012, yes, null, [..]), leading dashes, control characters, non-ASCII (hypothesis)",
                   "reaches the prepare config exactly, or is refused up front with one line (exit 2)")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=TEXT.filter(lambda t: "\0" not in t), column=TEXT, name=NAME)
def test_prepare_string_flags_reach_the_config_exactly(monkeypatch, tmp_path, capsys, source, column, name):
    seen = _record(monkeypatch, "lifecycle.data.prepare:prepare")
    output = str(tmp_path / name)
    code = cli("prepare", "--source", source, "--text-column", column, "--output", output)
    err = capsys.readouterr().err
    if "args" not in seen:
        assert _one_line_refusal(code, err), (code, err)
        return
    cfg, out = seen["args"]
    assert (cfg.source.uri, cfg.source.text_column, out) == (source, column, output)
    assert not os.listdir(tmp_path) or Path(output).exists()  # the write check leaves nothing behind


@pytest.mark.tried("cli", "any text to --model-name and --output of train, --model-name and --source of pipeline, "
                   "--text-column of retrain (hypothesis)", "reaches the config exactly, or is refused with one line")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, name=NAME)
def test_train_pipeline_retrain_string_flags_reach_the_config_exactly(monkeypatch, tmp_path, capsys, text, name):
    output = str(tmp_path / name)
    seen = _record(monkeypatch, "lifecycle.train.run:train")
    code = cli("train", "--data", "prepared", "--model-name", text, "--output", output)
    err = capsys.readouterr().err
    if "args" in seen:
        cfg = seen["args"][0]
        assert (cfg.model_name, cfg.output) == (text, output)
    else:
        assert _one_line_refusal(code, err), (code, err)
    seen = _record(monkeypatch, "lifecycle.pipeline:run_pipeline")
    code = cli("pipeline", "--model-name", text, "--source", text, "--workdir", output)
    err = capsys.readouterr().err
    if "args" in seen:
        cfg = seen["args"][0]
        assert (cfg.model_name, cfg.prepare.source.uri, cfg.workdir) == (text, text, output)
    else:
        assert _one_line_refusal(code, err), (code, err)
    seen = _record(monkeypatch, "lifecycle.retrain:retrain")
    code = cli("retrain", "m", "--new-data", text, "--text-column", text, "--workdir", output)
    err = capsys.readouterr().err
    if "args" in seen:
        name_arg, new_data, cfg = seen["args"]
        assert (name_arg, new_data, cfg.text_column) == ("m", text, text)
    else:
        assert _one_line_refusal(code, err), (code, err)


PLAIN_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
DIGITS = st.sampled_from(["٥", "５", "۳", "१", "1_000", "Infinity", "½", "0x10", "1e", "", "-", "7 7"])


@pytest.mark.tried("cli", "any text to integer and number flags (train --max-steps/--learning-rate): other scripts' "
                   "digits, underscores, 'Infinity', whitespace (hypothesis)",
                   "a plain ASCII number reaches the config as written; anything else is one line, exit 2")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(TEXT, DIGITS, st.integers(-10**6, 10**6).map(str)))
def test_number_flags_take_plain_ascii_numbers_only(monkeypatch, capsys, text):
    seen = _record(monkeypatch, "lifecycle.train.run:train")
    code = cli("train", "--data", "d", "--max-steps", text)
    err = capsys.readouterr().err
    if "args" in seen:
        assert PLAIN_INT.fullmatch(text.strip()) and seen["args"][0].max_steps == int(text)
    else:
        assert _one_line_refusal(code, err), (code, err)
        assert not PLAIN_INT.fullmatch(text.strip()) or int(text) <= 0, text
    seen = _record(monkeypatch, "lifecycle.train.run:train")
    code = cli("train", "--data", "d", "--learning-rate", text)
    err = capsys.readouterr().err
    if "args" in seen:
        assert text.strip().isascii() and "_" not in text and seen["args"][0].learning_rate == float(text)
    else:
        assert _one_line_refusal(code, err), (code, err)


def test_usage_errors_are_one_line(capsys):
    for args in (["train", "--bogus"], ["nocmd"], ["train", "--max-steps"], ["serve", "--port", "١"]):
        assert _one_line_refusal(cli(*args), err := capsys.readouterr().err), (args, err)
        assert err.rstrip().endswith("--help')"), err


def test_set_on_the_command_line_is_typed_by_the_field(monkeypatch, capsys):
    seen = _record(monkeypatch, "lifecycle.train.run:train")
    cli("train", "--data", "d", "--set", "model_name=012", "--set", "max_steps=1e2", "--set", "seed=07")
    cfg = seen["args"][0]
    assert (cfg.model_name, cfg.max_steps, cfg.seed) == ("012", 100, 7)
    capsys.readouterr()
    assert cli("train", "--data", "d", "--set", "max_steps=ten") == 2
    err = capsys.readouterr().err
    assert err == "Error: max_steps: expected an integer, got 'ten'\n"


@pytest.mark.tried("mlproject", "any text as an MLproject parameter value (source, output, text_column, set items), "
                   "values starting with '-' or '--', '=' inside (hypothesis)",
                   "reaches the click command exactly as the same flag would")
@settings(max_examples=150, deadline=None)
@given(source=TEXT, column=TEXT, item=TEXT.filter(lambda t: ";" not in t and t == t.lstrip()), name=TEXT)
def test_entry_point_words_reach_the_command_exactly(source, column, item, name):
    from lifecycle.cli import cli as group

    words = [f"source={source}", f"text_column={column}", "output=out", f"set=model_name={item}", "overwrite=true"]
    args = to_cli_args("prepare", words)
    ctx = group.get_command(None, "prepare").make_context("prepare", args[1:])  # type: ignore[union-attr]
    assert ctx.params["source"] == (source or None)  # empty: "not given"
    assert ctx.params["text_column"] == (column or None)
    assert ctx.params["overrides"] == (f"model_name={item}",) and ctx.params["overwrite"] is True
    if name:
        args = to_cli_args("report", [f"name={name}", "out=r.html"])
        ctx = group.get_command(None, "report").make_context("report", args[1:])  # type: ignore[union-attr]
        assert ctx.params["name"] == name and ctx.params["out"] == "r.html"


@pytest.mark.parametrize("word, given", [("true", True), ("Yes", True), (" on ", True), ("1", True),
                                         ("false", False), ("no", False), ("OFF", False), ("0", False)])
def test_entry_point_booleans_are_true_or_false(word, given):
    assert ("--overwrite" in to_cli_args("prepare", ["source=s", f"overwrite={word}"])) is given


@pytest.mark.parametrize("words", [["overwrite=ture"], ["overwrite=maybe"], ["overwrite=2"], ["no_such=1"]])
def test_bad_entry_point_words_exit_2_in_one_line(words, capsys):
    with pytest.raises(SystemExit) as exc:
        to_cli_args("prepare", ["source=s", *words])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("Error: prepare: ") and len(err.strip().splitlines()) == 1, err


def test_mlproject_parameters_are_the_cli_option_names():
    """Every MLproject parameter is an option (or argument) of its command, spelled the same way."""
    import yaml

    from lifecycle.cli import cli as group

    project = yaml.safe_load((REPO / "MLproject").read_text())
    scripts = {"main": "pipeline", "evaluate": "evaluate"}
    for entry, spec in project["entry_points"].items():
        command = group.get_command(None, scripts.get(entry, entry))  # type: ignore[arg-type]
        spellings = {p.name for p in command.params if p.param_type_name == "argument"}
        spellings |= {o[2:].replace("-", "_") for p in command.params for o in p.opts if o.startswith("--")}
        for param in spec["parameters"]:
            assert param in spellings, (entry, param)
            assert f"{param}={{{param}}}" in spec["command"], (entry, param)


# -- operating-system errors: one line, a documented code, nothing left behind -----------------------

@pytest.mark.tried("cli", "an output folder the OS refuses for root too (under a regular file, in /proc), for "
                   "prepare, train, pipeline and report", "one-line error, exit 14, nothing created, no MLflow run")
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_is_one_line_exit_14_and_leaves_nothing(tmp_path, tracking_uri, capsys, where):
    import mlflow

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    base = blocker if where == "under-a-file" else Path("/proc")
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # MLflow's own log lines of creating the database
    for argv in (["prepare", "--source", "builtin:pydoc", "--output", str(base / "prepared")],
                 ["train", "--data", "prepared", "--output", str(base / "ckpt" / "x")],
                 ["pipeline", "--workdir", str(base / "work")],
                 ["report", "some-model", "--out", str(base / "r.html")]):
        code = cli(*argv)
        err = capsys.readouterr().err
        assert code == 14, (argv, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("Error: --"), err
        assert str(base) in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert blocker.read_text() == "not a folder"
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before


def test_os_errors_at_the_boundary_are_one_line_with_their_code(monkeypatch, capsys):
    """An OSError from anywhere below the CLI (here a stage raising it) is one line, never a traceback."""
    import errno

    cases = [(PermissionError(errno.EACCES, "Permission denied", "/data/x"), 14),
             (OSError(errno.ENOSPC, "No space left on device", "/out/y"), 14),
             (OSError(errno.EADDRINUSE, "Address already in use"), 15),
             (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/z.txt"), 4)]
    import socket

    with socket.socket() as sock, pytest.raises(OverflowError) as real:  # what a port out of range raises
        sock.bind(("127.0.0.1", 70000))
    cases.append((real.value, 15))
    for exc, code in cases:
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr("lifecycle.data.prepare.prepare", fail)
        assert cli("prepare", "--output", "p") == code
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1
        assert (getattr(exc, "strerror", None) or str(exc)) in err


@pytest.mark.tried("cli", "a real prepare with --source 'notes #3.jsonl', --output 'exp #2/prepared' --overwrite "
                   "and --text-column yes, beside a folder 'exp'",
                   "reads and writes exactly those names; 'exp' untouched")
def test_real_prepare_uses_the_names_exactly_as_written(tmp_path, tracking_uri, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    rows = [{"yes": f"Document {i} talks about rivers, mountains and the music of village {i} in the early "
                    "morning, with many more words to pass the quality filters.", "text": "wrong column"}
            for i in range(60)]
    Path("notes #3.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "keep.txt").write_text("mine")
    (tmp_path / "exp #2" / "prepared").mkdir(parents=True)  # replaced by --overwrite
    assert cli("prepare", "--source", "notes #3.jsonl", "--text-column", "yes", "--output", "exp #2/prepared",
               "--overwrite", "--vocab-size", "300", "--block-size", "32", "--format", "lm") == 0, capsys.readouterr()
    card = json.loads((tmp_path / "exp #2" / "prepared" / "data_card.json").read_text())
    assert card["config"]["source"]["text_column"] == "yes" and card["config"]["source"]["uri"] == "notes #3.jsonl"
    assert (tmp_path / "exp" / "keep.txt").read_text() == "mine"
    raw = (tmp_path / "exp #2" / "prepared" / "raw" / "train.jsonl").read_text(encoding="utf-8")
    assert "Document" in raw and "wrong column" not in raw  # the text came from the column named "yes"
