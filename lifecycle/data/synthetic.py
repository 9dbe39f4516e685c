"""Generated corpora for tests and benchmarks (no download, deterministic per seed).

Documents are random sentences over a few hundred English words (or common Chinese characters),
so two documents share almost no 5-word shingles unless a test makes them share on purpose.
"""

from __future__ import annotations

import random
from typing import Iterator

_EN_WORDS = (
    "the of and to in is was for that with as on by at from this are be or an which have has not "
    "but were their one all there been also more its can other into time only some new would first "
    "after when two these many such may most where about between both over used then them through "
    "system model data training river mountain city music history language science garden kitchen "
    "window market village winter summer morning evening teacher student journey library bridge "
    "harbor forest island valley engine signal pattern result method question answer problem number "
    "record season picture letter family friend animal weather station theory process network value "
    "energy planet culture economy policy country market people school paper water light sound color "
    "simple large small early recent strong quiet bright careful ancient modern public private local "
    "build write read carry follow measure compare discover explain improve protect describe collect "
    "quickly slowly often rarely together alone perhaps however therefore meanwhile although because"
).split()

_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事"
    "平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理"
).replace(" ", "")


def english_document(rng: random.Random, min_words: int = 60, max_words: int = 160) -> str:
    """A random English-like paragraph or two."""
    n = rng.randint(min_words, max_words)
    words = [rng.choice(_EN_WORDS) for _ in range(n)]
    out, sentence = [], []
    for w in words:
        sentence.append(w)
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    cut = max(1, len(out) // 2)
    return " ".join(out[:cut]) + "\n\n" + " ".join(out[cut:]) if len(out) > 2 else " ".join(out)


def chinese_document(rng: random.Random, min_chars: int = 80, max_chars: int = 200) -> str:
    """A random Chinese paragraph (no spaces, full-width punctuation)."""
    n = rng.randint(min_chars, max_chars)
    parts = []
    while n > 0:
        k = min(n, rng.randint(8, 20))
        parts.append("".join(rng.choice(_ZH_CHARS) for _ in range(k)) + rng.choice("，。；"))
        n -= k
    return "".join(parts)[:-1] + "。"


def generate_documents(n: int, seed: int = 0, chinese_share: float = 0.1) -> Iterator[str]:
    """``n`` distinct documents, ``chinese_share`` of them Chinese."""
    rng = random.Random(seed)
    for _ in range(n):
        yield chinese_document(rng) if rng.random() < chinese_share else english_document(rng)
