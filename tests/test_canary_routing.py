"""Canary routing without a server: the share a user types, the routing key (param or X-Routing-Key header, any
text or bytes), and the key's fixed point that makes raising the share only add keys to the canary."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.serving.router import (
    MAX_KEY_CHARS,
    RoutingKeyError,
    RoutingKeyHeader,
    check_key,
    check_share,
    header_key,
    header_text,
    request_key,
    route_fraction,
    tag_share,
    to_canary,
)

# ---------------------------------------------------------------- routing


@given(key=st.text(max_size=50))
def test_route_fraction_is_a_fixed_point_of_the_unit_interval(key):
    x = route_fraction(key)
    assert 0.0 <= x < 1.0
    assert route_fraction(key) == x


# Keys as they arrive: any text up to the limit (lone surrogates too: a JSON param may carry one), and
# raw header bytes as the middleware decodes them.
KEYS = st.one_of(st.text(min_size=1, max_size=MAX_KEY_CHARS), st.text(st.characters(), min_size=1, max_size=8),
                 st.binary(min_size=1, max_size=64).map(header_text))


@given(keys=st.lists(KEYS, min_size=1, max_size=20), a=st.floats(0, 1), b=st.floats(0, 1))
def test_raising_the_share_only_adds_keys_to_the_canary(keys, a, b):
    low, high = sorted((a, b))
    at_low = {k for k in keys if to_canary(low, k)}
    at_high = {k for k in keys if to_canary(high, k)}
    assert at_low <= at_high


def test_keys_split_by_the_share_within_binomial_noise():
    n, share = 4000, 0.1
    hits = sum(to_canary(share, f"user-{i}") for i in range(n))
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(hits - n * share) < 4 * sigma
    assert not any(to_canary(0.0, f"u{i}") for i in range(100)) and all(to_canary(1.0, f"u{i}") for i in range(100))


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "x", None, float("nan")])
def test_share_outside_the_open_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="between 0 and 1"):
        check_share(bad)
    assert check_share(0.25) == 0.25


@pytest.mark.parametrize("text, share", [("0.0001", 0.0001), (".5", 0.5), ("0.5", 0.5), ("1e-3", 0.001),
                                         ("0.999", 0.999), ("5.", None), ("0", None), ("1", None), ("1.0", None),
                                         ("1.5", None), ("-0.1", None), ("+0.5", None), ("nan", None), ("inf", None),
                                         ("50%", None), (" 0.5", None), ("0.5 ", None), ("", None), ("0x1p-3", None),
                                         ("1e-400", None), ("0.99999999999999999", None), ("\u0660.\u0665", None),
                                         ("0_5", None)])
def test_share_text_is_a_plain_decimal_or_refused(text, share):
    if share is None:
        with pytest.raises(ValueError, match="between 0 and 1") as err:
            check_share(text)
        assert repr(text) in str(err.value) and "\n" not in str(err.value)  # the user's text, one line
    else:
        assert check_share(text) == share


def test_a_percent_share_is_refused_with_its_decimal():
    with pytest.raises(ValueError, match=r"got '50%' \(50% is 0.5\)"):
        check_share("50%")


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8"))),
       param=st.one_of(st.none(), st.just(""), st.text(max_size=300)))
def test_any_routing_key_routes_deterministically_or_is_refused_by_name(raw, param):
    """Any X-Routing-Key header (unicode, very long, empty, not UTF-8) and any routing_key param: the same key
    every time, or RoutingKeyError (the router's HTTP 400) naming which of the two is at fault; nothing else."""
    import asyncio

    seen: list[str | None] = []

    async def app(scope, receive, send):  # the scoring app behind the middleware: what predict reads
        seen.append(header_key.get())

    scope = {"type": "http", "method": "POST", "headers": [(b"x-routing-key", raw)]}
    for _ in range(2):
        asyncio.run(RoutingKeyHeader(app)(scope, None, None))
    assert seen[0] == seen[1] and (seen[0] is None) == (raw == b"")
    assert header_key.get() is None  # reset after the request
    try:
        key = request_key(param, seen[0])
    except RoutingKeyError as exc:
        from_param = isinstance(param, str) and len(param) > MAX_KEY_CHARS
        assert ("routing_key" in str(exc)) == from_param and ("X-Routing-Key" in str(exc)) != from_param
        return
    assert key == (param or seen[0] or None)
    if key is not None:
        assert route_fraction(key) == route_fraction(key) and request_key(param, seen[0]) == key


def test_header_text_keeps_distinct_keys_distinct():
    assert header_text("über".encode("utf-8")) == "über" == header_text("über".encode("latin-1"))
    assert header_text(b"\xff\xfe") != header_text(b"\xff\xfd")  # no replacement character merges them
    long = "k" * (MAX_KEY_CHARS + 1)
    with pytest.raises(RoutingKeyError, match="X-Routing-Key header may have at most"):
        request_key(None, long)
    assert request_key("", "user-1") == "user-1" and request_key("u", "user-1") == "u"
    assert request_key(None, None) is None and request_key(float("nan"), None) is None


def test_routing_key_must_be_a_short_string():
    assert check_key(None) is None and check_key("") is None and check_key("abc") == "abc"
    for bad in (3, ["a"], "k" * 257):
        with pytest.raises(ValueError):
            check_key(bad)


@given(share=st.floats(allow_nan=True, allow_infinity=True))
def test_check_share_accepts_exactly_the_open_unit_interval(share):
    if 0 < share < 1:
        assert check_share(share) == share
        assert check_share(repr(share)) == share  # text round-trips exactly
    else:
        with pytest.raises(ValueError):
            check_share(share)


def test_a_hand_edited_share_tag_is_no_share_for_every_reader():
    """The router and `lifecycle canary --act` read the registry's share tag alike: a tag that is no share
    (edited in the UI) is ignored by the router, and --act starts the policy's steps over instead of taking the
    canary for finished and promoting a challenger that never had the full share."""
    from lifecycle.registry.canary import next_share
    from lifecycle.serving.router import SHARE_TAG
    from lifecycle.serving.router_model import share_from_tags

    steps = (0.1, 0.5, 1.0)
    for raw in ("nan", "5", "-0.1", "50%", "", "inf", "x"):
        assert tag_share(raw) is None and share_from_tags({SHARE_TAG: raw}, 0.3) == 0.3, raw
        assert next_share(steps, tag_share(raw)) == 0.1, raw
    for raw, share in (("0.5", 0.5), ("1.0", 1.0), ("0.0", 0.0), (repr(0.1), 0.1)):
        assert tag_share(raw) == share == share_from_tags({SHARE_TAG: raw}, 0.3)
    assert next_share(steps, tag_share("1.0")) is None  # the last step: --act promotes
    assert tag_share(None) is None and share_from_tags({}, 0.3) == 0.3
