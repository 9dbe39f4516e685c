"""Cleaning, quality filters, dedup, split, packing and the config: pure logic, no MLflow."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lifecycle.config import load_config
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig, QualityConfig
from lifecycle.data.dedup import Deduplicator, MinHasher, exact_key, jaccard_estimate
from lifecycle.data.pack import BlockPacker
from lifecycle.data.pipeline import prepare_folder
from lifecycle.data.quality import first_failure, words_of
from lifecycle.data.split import assign_split
from lifecycle.data.synthetic import chinese_document, english_document, generate_documents
from lifecycle.data.tally import PassTally
from lifecycle.errors import ConfigError

Q = QualityConfig()


def test_clean_normalises_unicode_controls_and_whitespace() -> None:
    text = "Cafe\u0301\x00 \x07bar\t\t baz   \r\n\r\n\r\n\r\n    indented  code\u200b"
    out = clean_text(text)
    assert out == "Caf\u00e9 bar baz\n\n    indented code"


def test_chinese_and_japanese_text_is_kept() -> None:
    rng = random.Random(3)
    zh = chinese_document(rng)
    ja = ("今日はとても良い天気ですね。私たちは公園で散歩をしました。"
          "桜の花がきれいに咲いていて、多くの人が写真を撮っていました。") * 2
    assert " " not in zh
    assert first_failure(zh, Q) is None
    assert first_failure(ja, Q) is None
    # Each CJK character is a word, so word-count rules see a real length.
    assert len(words_of("你好，世界")) == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("too short to keep", "min_words"),
        ("#### ### ## # " * 20 + "words here", "symbol_word_ratio"),
        ("\n".join(f"line number {i} goes on and on..." for i in range(20)), "symbol_word_ratio"),
        ("\n".join(["buy cheap watches now today"] * 10 + ["unique closing line with words"]), "duplicate_lines"),
        (" ".join(["x1y2z3w4v5u6t7s8r9q0p1o2n3m4"] * 15), "mean_word_length"),
        ("12 34 56 78 90 11 22 33 44 55 66 77 88 99 10 20 30 40 50 60 70 80 90", "alpha_words"),
        ("   \n\n  ", "empty"),
    ],
)
def test_junk_is_dropped_by_the_right_filter(text: str, expected: str) -> None:
    assert first_failure(text, Q) == expected


def test_ellipsis_line_filter() -> None:
    cfg = QualityConfig(max_symbol_word_ratio=10.0)  # isolate the ellipsis rule
    text = "\n".join(f"and then the story continues with item {i} \u2026" for i in range(10))
    assert first_failure(text, cfg) == "ellipsis_lines"


def test_clean_documents_pass() -> None:
    for doc in generate_documents(50, seed=1, chinese_share=0.3):
        assert first_failure(doc, Q) is None


def test_exact_duplicates_ignore_case_and_whitespace() -> None:
    a = "The Quick brown fox\n\njumps  over the lazy dog."
    b = "the quick BROWN fox jumps over the lazy dog."
    assert exact_key(a) == exact_key(b)
    assert exact_key(a) != exact_key(a + " again")


def test_near_duplicates_are_found_and_distinct_documents_are_not() -> None:
    rng = random.Random(7)
    base = english_document(rng, 150, 150)
    words = base.split(" ")
    near = " ".join(words[:-3] + ["entirely", "new", "ending."])  # ~95% shingle overlap
    other = english_document(rng, 150, 150)
    h = MinHasher(seed=0)
    assert jaccard_estimate(h.signature(base), h.signature(near)) > 0.8
    assert jaccard_estimate(h.signature(base), h.signature(other)) < 0.2
    d = Deduplicator(seed=0)
    assert d.check_and_add(exact_key(base), h.signature(base)) is None
    assert d.check_and_add(exact_key(base.upper()), h.signature(base.upper())) == "exact"
    assert d.check_and_add(exact_key(near), h.signature(near)) == "near"
    assert d.check_and_add(exact_key(other), h.signature(other)) is None


def test_dedup_against_reference_is_reported_separately() -> None:
    rng = random.Random(8)
    old, new = english_document(rng, 120, 120), english_document(rng)
    h = MinHasher(seed=0)
    d = Deduplicator(seed=0)
    assert d.add_reference([(exact_key(old), h.signature(old))]) == 1
    assert d.check_and_add(exact_key(old), h.signature(old)) == "exact_against"
    tweaked = old.replace(".", "!", 1)
    assert d.check_and_add(exact_key(tweaked), h.signature(tweaked)) == "near_against"
    assert d.check_and_add(exact_key(new), h.signature(new)) is None


def test_signatures_are_identical_across_instances() -> None:
    text = english_document(random.Random(1))
    assert np.array_equal(MinHasher(seed=3).signature(text), MinHasher(seed=3).signature(text))


def test_split_is_stable_and_roughly_proportional() -> None:
    docs = list(generate_documents(2000, seed=2))
    first = {d: assign_split(d, validation=0.1, test=0.1, seed=0) for d in docs[:1000]}
    # Adding documents never moves old ones: the split depends on the document only.
    for d in docs[:1000]:
        assert assign_split(d, validation=0.1, test=0.1, seed=0) == first[d]
    counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
    assert 60 < counts["validation"] < 140 and 60 < counts["test"] < 140
    moved = sum(assign_split(d, validation=0.1, test=0.1, seed=1) != first[d] for d in docs[:1000])
    assert moved > 100  # the seed does change the assignment


def test_packer_makes_full_blocks_with_eos_between_documents() -> None:
    p = BlockPacker(block_size=4, eos_id=0)
    blocks = p.add([[1, 2, 3], [4, 5], [6]])  # 1 2 3 0 | 4 5 0 6 | 0
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert p.remainder == 1 and p.tokens == 9 and p.blocks == 2
    assert p.add([[7, 8]]).tolist() == [[0, 7, 8, 0]]


def test_config_from_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "prep.yaml"
    path.write_text("quality:\n  min_words: 3\ndedup:\n  threshold: 0.7\npack:\n  block_size: 32\n")
    cfg = load_config(PrepareConfig, path, ["dedup.near=false", "split.test=0.2"], **{"pack.block_size": 16})
    assert cfg.quality.min_words == 3 and cfg.dedup.threshold == 0.7 and cfg.dedup.near is False
    assert cfg.pack.block_size == 16 and cfg.split.test == 0.2


@pytest.mark.parametrize(
    "override",
    ["dedup.threshold=1.5", "split.validation=0.6", "tokenizer.vocab_size=100", "pii.types=[email,ssn]",
     "quality.min_wrds=3", "pack.block_size=1", "num_proc=0", "pii.mode=hide", "tokenizer.sample_bytes=-1"],
)
def test_bad_config_values_are_refused(override: str) -> None:
    if override.startswith("split.validation"):
        overrides = [override, "split.test=0.5"]
    else:
        overrides = [override]
    with pytest.raises(ConfigError):
        load_config(PrepareConfig, None, overrides)


# -- the fast paths against the plain regex definitions they replace --------------------------

def _fuzz_texts(n: int = 3000) -> list[str]:
    """Documents plus random strings over ASCII, controls, Unicode spaces, CJK and digits."""
    rng = random.Random(5)
    alphabet = list("abc XYZ 019_-.,!?#\u2026\t\n\r\x00\x07\x0b\x1c\x7f\x85\u200b\ufeff\u00a0\u2003\u3000"
                    "\u4f60\u597d\u30a2\ud55c\u00e9\u0301\ufb01\u2460\u0661\uff12") + [" "] * 6 + ["..."] * 2
    docs = list(generate_documents(200, seed=9, chinese_share=0.2))
    out = list(docs)
    for _ in range(n):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        out.append(rng.choice(docs) + t if rng.random() < 0.3 else t)
    return out


def _clean_reference(text: str) -> str:
    import re
    import unicodedata

    from lifecycle.data import clean as c

    # Every pattern unconditionally: what clean_text did before its gates.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = c._CONTROL.sub("", text)
    text = c._LEADING_TABS.sub(lambda m: m.group(0).replace("\t", "    "), text)
    text = c._INNER_SPACES.sub(" ", text)
    text = c._TRAILING.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def test_fast_paths_agree_with_the_regex_definitions() -> None:
    import re
    import unicodedata

    from lifecycle.data import quality
    from lifecycle.data.dedup import normalize_for_hash

    strict = [QualityConfig(min_alpha_word_fraction=f, min_words=0) for f in (0.0, 0.5, 0.7, 0.8, 1.0)]
    for text in _fuzz_texts():
        assert clean_text(text) == _clean_reference(text), repr(text)
        stats, words = quality.doc_stats(text), words_of(text)
        assert (stats.n_words, stats.word_chars) == (len(words), sum(map(len, words))), repr(text)
        assert normalize_for_hash(text) == re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
        cleaned = clean_text(text)
        stats = quality.doc_stats(cleaned)
        no_alpha = len(quality._NO_ALPHA_WORD.findall(cleaned))
        for cfg in strict:
            expected = stats.n_words > 0 and 1.0 - no_alpha / stats.n_words >= cfg.min_alpha_word_fraction
            assert quality._alpha_ok(stats, cfg, cleaned) == expected, (repr(cleaned), cfg.min_alpha_word_fraction)


def test_batch_signatures_equal_the_per_document_definition() -> None:
    from lifecycle.data.dedup import normalize_for_hash

    texts = list(generate_documents(60, seed=4, chinese_share=0.3)) + ["", "!!!", "two words", "a b c d e f"]
    for h in (MinHasher(seed=0), MinHasher(num_perm=64, shingle_size=3, seed=7)):
        norms = [normalize_for_hash(t) for t in texts]
        # The definition: min over the document's shingles of (a*x + b mod 2**64) >> 32, per permutation.
        expected = np.stack([((np.outer(h._a, h.shingle_hashes(n, n)) + h._b[:, None]) >> np.uint64(32))
                             .min(axis=1).astype(np.uint32) for n in norms])
        for size in (1, 7, len(texts)):
            got = np.concatenate([h.signatures(norms[i:i + size]) for i in range(0, len(norms), size)])
            assert np.array_equal(got, expected)
        assert np.array_equal(h.signature(texts[0]), expected[0])


def test_lsh_bands_match_datasketch_and_band_keys_follow_the_bands() -> None:
    from datasketch.lsh import _optimal_param

    from lifecycle.data.dedup import band_keys, lsh_params

    for num_perm in (16, 64, 128, 256):
        for threshold in (0.5, 0.7, 0.8, 0.9):
            assert lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    b, r = lsh_params(0.8, 128)
    sig = MinHasher(seed=0).signature(english_document(random.Random(2)))
    other = sig.copy()
    other[r + 1] ^= 1  # one value of the second band changes
    keys, changed = band_keys(np.stack([sig, other]), b, r)
    assert len(set(keys.tolist())) == b  # the band index is part of the key
    assert [k1 == k2 for k1, k2 in zip(keys, changed)] == [i != 1 for i in range(b)]


# -- named rule sets (quality.rules) and the card's warning -----------------------------------

_NAMES = ("Anna", "Tom", "Mira", "Jonas", "Eli", "Rosa", "Karl", "Nadia", "Owen", "Lena", "Ivo", "Petra",
          "Sam", "Ada", "Felix", "Greta", "Hugo", "Ines", "Jules", "Kira")
_VERBS = ("said", "asked", "replied", "muttered", "whispered", "laughed")
_LINES = ("Where are you going?", "Not yet.", "I told you... I don't know.", "Come here, quickly!",
          "Is it raining again?", "Yes, all night.", "Why would anyone do that?", "Never mind.")


def dialogue_paragraphs(n: int, seed: int = 0) -> list[str]:
    """Short paragraphs of clean dialogue and narration, the kind a novel is made of (3-12 words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(english_document(rng, 14, 40))  # a narration paragraph long enough for web
        else:
            out.append(f'"{rng.choice(_LINES)}" {rng.choice(_NAMES)} {rng.choice(_VERBS)}.')
    return out


_GARBAGE = {
    "#### ### ## # " * 20 + "words here": "symbol_word_ratio",
    "12 34 56 78 90 11 22 33 44 55 66 77 88 99 10 20 30 40 50 60 70 80 90": "alpha_words",
    "\n".join(["buy cheap watches now today"] * 10 + ["unique closing line with words"]): "duplicate_lines",
    "\n\n".join(["Click here to subscribe to our newsletter today."] * 4): "duplicate_lines",
}


def test_short_clean_dialogue_survives_clean_and_is_dropped_by_web() -> None:
    web, clean = QualityConfig(rules="web"), QualityConfig(rules="clean")
    short = [p for p in dialogue_paragraphs(60) if len(words_of(p)) < 10]
    assert len(short) >= 30
    assert {first_failure(p, web) for p in short} == {"min_words"}
    assert {first_failure(p, clean) for p in short} == {None}
    # A markdown heading and a trailing ellipsis are structure and punctuation in curated text.
    for text in ("## Installation", "Well... I thought... maybe...", "# Chapter 1\n\nIt was late."):
        assert first_failure(text, clean) is None


@pytest.mark.parametrize("rules", ["web", "clean"])
def test_garbage_is_dropped_by_web_and_clean(rules: str) -> None:
    cfg = QualityConfig(rules=rules)
    for text, expected in _GARBAGE.items():
        assert first_failure(text, cfg) == expected, (rules, text[:40])


def test_rules_off_keeps_everything_non_empty() -> None:
    off = QualityConfig(rules="off")
    for text in [*_GARBAGE, *dialogue_paragraphs(20), "x"]:
        assert first_failure(text, off) is None
    assert first_failure(" \n\n ", off) == "empty"


def test_rules_are_set_through_the_config_and_a_bad_value_is_one_line() -> None:
    assert PrepareConfig().quality.rules == "web"  # the default: existing configs judge as before
    assert load_config(PrepareConfig, None, ["quality.rules=clean"]).quality.rules == "clean"
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, None, ["quality.rules=strict"])
    assert "quality.rules" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="quality.rules"):
        QualityConfig(rules="lenient")  # type: ignore[arg-type]


@pytest.mark.parametrize(("dropped", "warned"), [(101, True), (100, False), (0, False)])
def test_card_warns_when_one_rule_drops_over_a_tenth_of_the_bytes(dropped: int, warned: bool) -> None:
    cfg = load_config(PrepareConfig, None, ["dedup.near=false"])
    tally = PassTally.start(cfg)
    tally.filter_bytes["min_words"] = dropped
    tally.filter_bytes["empty"] = 500  # never warns: no rule set keeps an empty text
    warnings = tally.quality_warnings(cfg, 1000)
    assert len(warnings) == int(warned)
    if warned:
        assert "min_words" in warnings[0] and "10.1%" in warnings[0]
        assert "--set quality.rules=clean" in warnings[0]
    section = tally.card_quality(cfg, 1000)
    assert section["rules"] == "web" and section["bytes_dropped"]["min_words"] == dropped


def test_prepare_card_records_rules_bytes_and_warning(tmp_path) -> None:
    src = tmp_path / "novel.txt"
    src.write_text("\n\n".join(dialogue_paragraphs(240, seed=5)) + "\n")
    cards = {}
    for rules in ("web", "clean"):
        cfg = load_config(PrepareConfig, None, [f"quality.rules={rules}", "tokenizer.vocab_size=300",
                                                "pack.block_size=16", f"source.uri={src}", "dedup.near=false"])
        cards[rules] = prepare_folder(cfg, tmp_path / rules).card
    web, clean = cards["web"], cards["clean"]
    assert web["quality"]["rules"] == "web" and clean["quality"]["rules"] == "clean"
    assert web["quality"]["bytes_dropped"]["min_words"] > 0.1 * web["counts"]["bytes_read"]
    assert any(w.startswith("quality rule min_words dropped") and "quality.rules=clean" in w for w in web["warnings"])
    assert clean["quality"]["bytes_dropped"]["min_words"] == 0
    assert not any(w.startswith("quality rule") for w in clean["warnings"])
    assert clean["counts"]["bytes_kept"] > web["counts"]["bytes_kept"]
