"""The ledger keeps any text whole or refuses it up front, and readers skip damaged entries.

Property-based (hypothesis) where the class of input is open: reasons and tag values of any
length and character, damaged JSON of every kind. The sqlite tests go through the real CLI.
"""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.errors import ConfigError
from lifecycle.registry import ledger as L
from tests.cli import cli
from tests.registry_support import make_version
from tests.test_registry import aliases

#: Any text: every code point but lone surrogates (which are not text), control characters included.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
LONG_TEXT = st.builds(lambda s, n: s * n, ANY_TEXT.filter(bool), st.integers(1, 120))


def _event(reason: str, value: str, gate_reason: str = "") -> L.Event:
    return L.Event(model="m", action=L.PROMOTE, target="production", seq=3, from_version="1", to_version="2",
                   effective=True, actor="alice", reason=reason,
                   gates=[{"gate": "g", "status": "pass", "reason": gate_reason}],
                   eval_run_ids={"eval_run_id": value}, data_digests={"data_digest": value})


@pytest.mark.tried("ledger", "reasons, gate reasons and lineage tag values of any length with quotes, newlines, "
                   "control characters, non-ASCII (hypothesis)", "stored whole across tags of at most 8000 characters, "
                   "read back exactly, or refused with exit 2 before anything is written")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reason=st.one_of(ANY_TEXT, LONG_TEXT), value=st.one_of(ANY_TEXT, LONG_TEXT), gate_reason=ANY_TEXT)
def test_any_text_round_trips_through_the_tags(reason, value, gate_reason):
    event = _event(reason, value, gate_reason)
    try:
        L.check_text(reason)
        tags = event.tags()
    except ConfigError as exc:
        assert len(reason) > L.MAX_REASON_CHARS or "too large" in str(exc)
        return
    assert all(len(v) <= 8000 for v in tags.values())
    assert all("\x00" not in v for k, v in tags.items() if not k.startswith("ledger.event"))  # PostgreSQL-safe
    assert "\n" not in tags["mlflow.runName"] and len(tags["mlflow.runName"]) <= 250
    back = L.Event.from_tags(tags, run_id="r1")
    assert back.reason == reason and back.eval_run_ids["eval_run_id"] == value
    assert back.gates[0]["reason"] == gate_reason and back.data_digests["data_digest"] == value
    assert (back.seq, back.to_version, back.state, back.run_id) == (3, "2", L.DONE, "r1")
    # An older reader (one tag, JSON only) still gets a whole, parseable event.
    old = json.loads(tags["ledger.event"])
    assert old["seq"] == 3 and old["to_version"] == "2"


@pytest.mark.tried("ledger", "--reason longer than the cap, or not valid UTF-8 (lone surrogates from argv)",
                   "refused with exit 2 before anything is written")
@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=50), cut=st.integers(0, 40))
def test_check_text_keeps_or_refuses(text, cut):
    assert L.check_text(text) == text
    with pytest.raises(ConfigError, match="at most"):
        L.check_text("x" * (L.MAX_REASON_CHARS + 1 + cut))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        L.check_text(text[:cut] + "\udcff" + text[cut:])


def _mutations():
    """Ways a stored event gets damaged: cut off, edited by hand, wrong types, older or foreign formats."""
    good = _event("why", "run-1").to_json()
    cut = st.integers(0, len(good) - 1).map(lambda n: {"ledger.event": good[:n]})
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                               max_leaves=5)
    keys = st.sampled_from(["model", "action", "target", "seq", "effective", "from_version", "to_version", "gates",
                            "eval_run_ids", "timestamp", "reverts", "reason"])

    def retype(key: str, value) -> dict[str, str]:
        data = json.loads(good)
        data[key] = value
        return {"ledger.event": json.dumps(data)}

    edited = st.builds(retype, keys, json_values)
    tags = st.fixed_dictionaries({"ledger.event": st.just(good)})
    foreign = st.one_of(
        st.builds(lambda t: {"ledger.event": t}, ANY_TEXT),
        st.builds(lambda s: {"ledger.event": good, "ledger.state": s},
                  ANY_TEXT.filter(lambda s: s not in ("pending", "done", "failed", ""))),
        st.builds(lambda p: {"ledger.event": good, "ledger.event.parts": p}, ANY_TEXT),
        tags.map(lambda t: {**t, "ledger.event.parts": "2", "ledger.event.part.0": good[:10]}),
        tags.map(lambda t: {**t, "ledger.seq": "0000000099"}),
        st.just({"ledger.reason": "no event at all"}))
    return st.one_of(cut, edited, foreign)


@pytest.mark.tried("ledger", "damaged entries: JSON cut at any point, fields edited to any JSON value, unknown "
                   "states, missing parts, tags that disagree with the event (hypothesis)",
                   "either read as a well-typed event or skipped as damaged with a reason; never an exception")
@settings(max_examples=300, deadline=None)
@given(change=_mutations())
def test_damaged_entries_are_refused_with_a_reason(change):
    tags = {"ledger.model": "m", "ledger.seq": "0000000003", **change}
    try:
        ev = L.Event.from_tags(tags, run_id="r")
    except ValueError as exc:
        assert str(exc)
        return
    # Whatever was accepted has the types every reader relies on.
    assert isinstance(ev.seq, int) and isinstance(ev.model, str) and isinstance(ev.effective, bool)
    assert ev.to_version is None or isinstance(ev.to_version, str)
    assert all(isinstance(g, dict) for g in ev.gates) and ev.state in (L.PENDING, L.DONE, L.FAILED)
    L.holder_stack([ev]), L.passed_production([ev], "2")


def test_events_of_the_older_writer_still_read():
    """The previous writer: one JSON tag, no ``detail``, no ``ledger.state`` (a finished move)."""
    old = ('{"action":"promote","actor":"bob","data_digests":{},"effective":true,"eval_run_ids":{},"from_version":null,'
           '"gates":[],"model":"m","policy_digest":null,"policy_path":null,"reason":"r","reverts":null,"seq":1,'
           '"target":"production","timestamp":1700000000.0,"to_version":"1"}')
    ev = L.Event.from_tags({"ledger.model": "m", "ledger.seq": "0000000001", "ledger.event": old}, run_id="r")
    assert (ev.seq, ev.to_version, ev.state, ev.detail, ev.done) == (1, "1", L.DONE, "", True)
    assert L.holder_stack([ev]) == ["1"]


# ---- through the CLI on MLflow's sqlite store ------------------------------------------------------

@pytest.fixture
def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def snapshot(client, name: str) -> dict:
    """Everything a refused command must leave as it was: aliases, model and version tags, stages, ledger."""
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name='{name}'")
    exp = client.get_experiment_by_name(L.experiment_name())
    runs = client.search_runs([exp.experiment_id], f"tags.`ledger.model` = '{name}'") if exp else []
    return {"aliases": dict(model.aliases or {}), "tags": dict(model.tags or {}),
            "versions": sorted((v.version, v.current_stage, tuple(sorted((v.tags or {}).items()))) for v in versions),
            "ledger": sorted((r.info.run_id, tuple(sorted(r.data.tags.items()))) for r in runs)}


@pytest.mark.tried("ledger", "--reason of any text through `lifecycle promote` and `lifecycle rollback` on the "
                   "sqlite store (hypothesis)", "`lifecycle history --json` gives the reason back exactly")
def test_reasons_round_trip_through_the_cli(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    v2 = make_version(client, name, {"eval/loss": "2.9"})
    assert cli("promote", name, v1, "--to", "production") == 0
    given_reasons = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(reason=st.one_of(ANY_TEXT.filter(lambda s: "\x00" not in s), LONG_TEXT.filter(lambda s: "\x00" not in s)))
    def promote_with(reason):
        code = cli("promote", name, v2, "--to", "staging", "--dry-run", "--reason", reason)
        assert code == (0 if len(reason) <= L.MAX_REASON_CHARS else 2)
        if code == 0:
            given_reasons.append(reason)

    promote_with()
    odd = 'He said "stop"\n\tthen left; ünïcödé 🚀 \\ \' \x07 ' + "x" * 9000
    assert cli("promote", name, v2, "--to", "production", "--reason", odd) == 0
    assert cli("rollback", name, "--reason", odd + " (rollback)") == 0
    capsys.readouterr()
    assert cli("history", name, "--json") == 0
    events = json.loads(capsys.readouterr().out)
    dry = [e["reason"] for e in events if e["action"] == L.DRY_RUN]
    # No reason given: the ledger says what the gates said instead.
    assert dry == [r if r else "all enabled gates passed" for r in given_reasons]
    assert events[-2]["reason"] == odd and events[-1]["reason"] == odd + " (rollback)"
    assert events[-1]["detail"].startswith("back to v1") and aliases(client, name)["production"] == v1
    assert cli("status", name) == 0 and cli("history", name) == 0


@pytest.mark.tried("registry", "refused input to promote, rollback, repair, status, history: bad reason, unknown "
                   "version, bad alias, unknown or invalid model name", "one-line error, exit 2 or 5, and aliases, "
                   "tags, stages and ledger exactly as before")
def test_refused_input_changes_nothing(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    assert cli("promote", name, v1, "--to", "staging") == 0
    before = snapshot(client, name)
    long_reason = "r" * (L.MAX_REASON_CHARS + 1)
    cases = [
        (("promote", name, v1, "--to", "production", "--reason", long_reason), 2),
        (("promote", name, v1, "--to", "production", "--reason", "bad \udcff bytes"), 2),
        (("promote", name, "7", "--to", "production"), 5),
        (("promote", name, "x7", "--to", "production"), 2),
        (("promote", name, v1, "--to", "prod"), 2),
        (("promote", name, v1, "--to", ""), 2),
        (("promote", f"{name}-missing", v1, "--to", "staging"), 5),
        (("promote", "a/b", v1, "--to", "staging"), 2),
        (("promote", "a:b", v1, "--to", "staging"), 2),
        (("promote", "../x", v1, "--to", "staging"), 2),
        (("promote", " ", v1, "--to", "staging"), 2),
        (("rollback", name, "--reason", long_reason), 2),
        (("rollback", name, "--reason", ""), 2),
        (("rollback", name, "--to", "9", "--reason", "r"), 5),
        (("rollback", name, "--to", "v1", "--reason", "r"), 2),
        (("rollback", f"{name}-missing", "--reason", "r"), 5),
        (("rollback", "a/b", "--reason", "r"), 2),
        (("repair", f"{name}-missing"), 5),
        (("repair", "a:b"), 2),
        (("status", "a/b"), 2),
        (("history", "a:b"), 2),
        (("status", f"{name}-missing"), 5),
    ]
    for args, code in cases:
        assert cli(*args) == code, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("Error: ") and len(err.splitlines()) == 1, (args, err)
        assert snapshot(client, name) == before, args
    assert f"{name}-missing" not in {m.name for m in client.search_registered_models()}


def _damage(client, name: str, tags: dict[str, str]) -> str:
    exp = client.get_experiment_by_name(L.experiment_name())
    run = client.create_run(exp.experiment_id, tags={"ledger.model": name, **tags})
    return run.info.run_id


@pytest.mark.tried("ledger", "entries cut off mid-JSON (an older version's 8000-character cut), edited by hand, "
                   "with wrong types or missing parts, on the sqlite store",
                   "history, status, promote, rollback and repair skip them with a warning naming the run; "
                   "status lists them; new events keep counting after them")
def test_damaged_entries_never_stop_the_commands(client, unique_name, capsys, caplog):
    name = unique_name
    v1, v2 = make_version(client, name), make_version(client, name, {"eval/loss": "2.9"})
    assert cli("promote", name, v1, "--to", "production") == 0
    whole = L.Event(model=name, action=L.PROMOTE, target="production", seq=2, to_version=v2, effective=True,
                    reason="x" * 9000).to_json()
    bad = {
        _damage(client, name, {"ledger.seq": "0000000002", "ledger.event": whole[:8000]}): "cut off",
        _damage(client, name, {"ledger.seq": "0000000003",
                               "ledger.event": whole.replace('"seq":2', '"seq":"3"')}): "seq",
        _damage(client, name, {"ledger.seq": "0000000004", "ledger.event": whole, "ledger.event.parts": "3"}): "parts",
        _damage(client, name, {"ledger.seq": "0000000005", "ledger.event": "{not json"}): "JSON",
    }
    caplog.set_level(logging.WARNING)
    assert cli("history", name) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "#2" not in out
    for run_id in bad:
        assert run_id in caplog.text
    assert cli("status", name) == 0
    out = capsys.readouterr().out
    assert sum("UNREADABLE: ledger entry" in line for line in out.splitlines()) == 4
    assert all(run_id in out for run_id in bad)
    # The commands that write go on, and number their events after the damaged ones.
    assert cli("promote", name, v2, "--to", "production", "--reason", "after damage") == 0
    assert cli("rollback", name, "--reason", "back", "--expect-current", v2) == 0
    assert cli("repair", name) == 0
    events = L.Ledger(client).events(name)
    assert [e.seq for e in events] == [1, 6, 7] and aliases(client, name)["production"] == v1


NAME_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/:")


@pytest.mark.tried("registry", "model names of any text: quotes, backslashes, SQL wildcards, spaces, non-ASCII, "
                   "'/', ':', '..', empty, over-long (hypothesis)", "a name MLflow can hold gets its events back "
                   "exactly; any other is refused with exit 2 (or 5 when no such model) and nothing changes")
def test_model_names_of_any_text(client, unique_name, capsys):
    from tests.registry_support import make_source

    source = make_source(client, f"{unique_name}-runs")
    known = make_version(client, unique_name, source=source)
    assert cli("promote", unique_name, known, "--to", "staging") == 0
    before = snapshot(client, unique_name)
    counter = iter(range(10**6))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.one_of(st.text(NAME_CHARS, min_size=1, max_size=30), st.text(max_size=30),
                         st.sampled_from(["a\\b", "o'neil", "100%_x", " x ", "..", "x/..", "a" * 300])))
    def one(raw):
        try:
            from lifecycle.registry.facts import check_name

            check_name(raw)
        except ConfigError:
            assert cli("promote", raw, "1", "--to", "staging") == 2
            assert cli("status", raw) == 2 and cli("rollback", raw, "--reason", "r") == 2
            return
        name = f"{unique_name}-{next(counter)}-{raw}"  # hypothesis may replay a name
        assert cli("promote", name, "1", "--to", "staging") == 5  # no such model: nothing written
        assert cli("history", name) == 5
        v = make_version(client, name, source=source)
        assert cli("promote", name, v, "--to", "staging", "--reason", raw) == 0
        capsys.readouterr()
        assert cli("history", name, "--json") == 0
        events = json.loads(capsys.readouterr().out)
        assert [(e["model"], e["reason"], e["to_version"]) for e in events] == [(name, raw, v)]
        assert aliases(client, name) == {"staging": v}

    one()
    assert snapshot(client, unique_name) == before


def test_an_event_without_a_sequence_number_is_refused_before_any_write(client, unique_name):
    """Numbering an event inside write/append would read the ledger outside the caller's lock (two writers could
    take one number): every writer takes its seq under the lock, and a missing one is refused, nothing written."""
    make_version(client, unique_name)
    led = L.Ledger(client)
    before = snapshot(client, unique_name)
    for write in (led.append, led.write):
        with pytest.raises(ValueError, match="has no sequence number"):
            write(L.Event(model=unique_name, action=L.GUARD_FAILED, target="production", reason="r"))
    assert snapshot(client, unique_name) == before and led.events(unique_name) == []
    first = led.append(L.Event(model=unique_name, action=L.GUARD_FAILED, target="production", reason="r",
                               seq=led.next_seq(unique_name)))
    assert [e.seq for e in led.events(unique_name)] == [first.seq] == [1]
