"""PII scrubbing: every type is found and replaced by its typed placeholder, counted once."""

from __future__ import annotations

import pytest

from lifecycle.data import pii
from lifecycle.data.clean import clean_text
from lifecycle.data.sources import pydoc_documents


@pytest.mark.parametrize(
    ("text", "kind", "secret"),
    [
        ("write to jane.doe+news@example.co.uk today", "email", "jane.doe+news@example.co.uk"),
        ("call +1 (415) 555-2671 after nine", "phone", "555-2671"),
        ("London office +44 20 7946 0958.", "phone", "7946 0958"),
        ("US desk (415) 555-2671 today", "phone", "555-2671"),
        ("or dial 415-555-2671 instead", "phone", "555-2671"),
        ("请拨打13812345678联系我", "phone", "13812345678"),
        ("手机：+86 139-1234-5678。", "phone", "1234-5678"),
        ("the host 192.168.10.254 answered", "ipv4", "192.168.10.254"),
        ("paid with 4111 1111 1111 1111 yesterday", "credit_card", "4111 1111 1111 1111"),
        ("card 5500-0000-0000-0004 expired", "credit_card", "5500-0000-0000-0004"),
        ("amex 378282246310005 on file", "credit_card", "378282246310005"),
        ("aws id AKIAIOSFODNN7EXAMPLE in config", "aws_access_key", "AKIAIOSFODNN7EXAMPLE"),
        ("OPENAI_API_KEY=sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789", "api_key", "sk-proj-Abcdef"),
        ("token ghp_" + "x1" * 18 + " leaked", "api_key", "ghp_"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\nabc==\n-----END RSA PRIVATE KEY-----\nafter",
         "private_key", "MIIEpAIBAAKCAQEA7"),
    ],
)
@pytest.mark.tried(
    "data: personal data",
    "e-mail, phone numbers (US, UK, Chinese), IPv4, Luhn-valid card numbers, AWS keys, API keys, PEM "
    "private keys inside running text",
    "replaced by the placeholder of its type and counted; the secret is gone from the text")
def test_each_type_is_scrubbed(text: str, kind: str, secret: str) -> None:
    out, counts = pii.scrub(text)
    assert secret not in out
    assert pii.PLACEHOLDERS[kind] in out
    assert counts == {kind: 1}


def test_card_numbers_need_luhn_and_version_numbers_are_not_ips() -> None:
    text = "order 4111 1111 1111 1112, version 1.2.3.4.5, pi 3.14159265358979, '+3.140000'"
    out, counts = pii.scrub(text)
    assert out == text and counts == {}
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")


def test_counts_add_up_and_types_can_be_limited() -> None:
    text = "a@b.io, c@d.org and 10.0.0.1"
    out, counts = pii.scrub(text)
    assert counts == {"email": 2, "ipv4": 1}
    assert out == "<EMAIL>, <EMAIL> and <IPV4>"
    out, counts = pii.scrub(text, types=["ipv4"])
    assert counts == {"ipv4": 1} and "a@b.io" in out


@pytest.mark.tried(
    "data: personal data",
    "every document of the built-in corpus (the CPython docs: versions, numbers, format examples)",
    "nothing is scrubbed: no false positive")
def test_builtin_corpus_has_no_false_positives() -> None:
    # CPython's docs are full of numbers, versions and format examples, and hold no PII.
    found = {}
    for doc in pydoc_documents():
        _, counts = pii.scrub(clean_text(doc))
        for k, v in counts.items():
            found[k] = found.get(k, 0) + v
    assert found == {}


@pytest.mark.tried(
    "data: personal data",
    "four-part version numbers after a version word, and addresses after words that merely end like "
    "one",
    "versions kept as written; addresses scrubbed as <IPV4>")
def test_version_numbers_after_a_version_word_are_not_addresses() -> None:
    kept = ["Python 3.11.7.1 is out", "version 1.2.3.4", "upgrade to v2.0.0.1", "build: 4.8.1.0", "ver. 10.0.19041.1",
            "release 1.0.0.0 notes"]
    for text in kept:
        assert pii.scrub(text) == (text, {}), text
    # An address is still an address, also after words that merely end like a version word.
    for text, out in [("server 10.0.0.1 is down", "server <IPV4> is down"), ("ip=10.0.0.1", "ip=<IPV4>"),
                      ("the nav 172.16.0.9 host", "the nav <IPV4> host")]:
        assert pii.scrub(text) == (out, {"ipv4": 1})


def test_digit_free_text_skips_nothing_that_needs_no_digit() -> None:
    # The digit check only skips card numbers, addresses and phones; the rest still run.
    text = "mail jane@example.org, key AKIAIOSFODNN7EXAMPLE and no numbers otherwise"
    out, counts = pii.scrub(text.replace("7", "Z"))
    assert counts == {"email": 1, "aws_access_key": 1} and "@" not in out
    # Digits from other scripts are digits to the patterns (\d is Unicode-aware), and so to the check.
    assert pii.scrub("\u7535\u8bdd \u0664\u0661\u0665-\u0665\u0665\u0665-\u0662\u0666\u0667\u0661 \u8c22\u8c22") \
        == ("\u7535\u8bdd <PHONE> \u8c22\u8c22", {"phone": 1})
