"""Tokenizer: train a byte-level BPE on the train split, or reuse an existing one.

A trained tokenizer is saved as a ``PreTrainedTokenizerFast`` folder (``tokenizer.json`` and
friends) with bos/eos/pad set, loadable with ``AutoTokenizer.from_pretrained``. Byte-level BPE
has no unknown token, so any UTF-8 text (Chinese included) round-trips exactly.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

from lifecycle.errors import ConfigError, DataError, NotFoundError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# A reused tokenizer with no limit reports this huge sentinel as model_max_length.
_UNLIMITED = 10**12
#: default training sample per vocabulary entry. Measured on 36 MB of Python source: at 8192
#: entries a 2 MB sample gave held-out bytes/token within 2.5% of a 32 MB one; at 32768 entries
#: 8 MB was within 2% of 16 MB. BPE learns its merges from the frequent pairs, which a
#: sample of this size already ranks.
SAMPLE_BYTES_PER_ENTRY = 256


def choose_vocab(corpus_bytes: int) -> int:
    """``--vocab-size auto``: 72 x sqrt(KB of train text), a multiple of 64 in [512, 32768].

    A larger corpus affords more merges (each seen often enough to learn its embedding), growing
    as the square root; the budget benchmark's measurements at 1 MB are in docs/training-and-evaluation.md.
    """
    raw = 72.0 * (max(corpus_bytes, 1) / 1024.0) ** 0.5
    return int(min(32768, max(512, 64 * round(raw / 64))))


def choose_block(corpus_bytes: int) -> int:
    """``--block-size auto``: 128 tokens up to 2 MB of train text, doubling per 4x more, at most 1024.

    A small corpus trains a small model in a short time, and for a small model attention over a long
    context is a large share of each step's FLOPs (12 x layers x width x context per token, against
    6 x parameters) for dependencies it cannot yet learn. Measured at 1 MB (the budget benchmark,
    docs/training-and-evaluation.md): context 128 beat 64 and 256; the growth is an assumption.
    """
    mb = max(corpus_bytes, 1) / 2**20
    steps = 0
    while mb > 2.0 * 4**steps and steps < 3:
        steps += 1
    return 128 * 2**steps


#: ``--block-size auto`` never picks a block the data cannot fill: the train split holds at least this
#: many blocks and every other split that has text at least one (halving down to MIN_AUTO_BLOCK).
MIN_TRAIN_BLOCKS = 32
MIN_AUTO_BLOCK = 16
#: Below this much train text the splits are counted in tokens to check that (cheap at this size;
#: above it the train split alone is ~250k tokens, hundreds of blocks of any size choose_block picks).
FIT_CHECK_BYTES = 2**20


def fit_block(block: int, tokens: dict[str, int]) -> int:
    """``block`` halved until the splits' ``tokens`` (EOS included) fill it; see :data:`MIN_TRAIN_BLOCKS`.

    A block longer than a split leaves that split with no block at all (validation then has
    nothing to measure), and a train split of a few blocks is a few distinct examples.
    """
    train = tokens.get("train", 0)
    others = [n for split, n in tokens.items() if split != "train" and n > 0]
    while block > MIN_AUTO_BLOCK and (train < MIN_TRAIN_BLOCKS * block or any(n < block for n in others)):
        block //= 2
    return block


def sample_bytes(configured: int | None, vocab_size: int) -> int | None:
    """Bytes of train text to train a tokenizer on: ``None`` means all of it.

    ``configured`` is ``tokenizer.sample_bytes``: ``None`` picks :data:`SAMPLE_BYTES_PER_ENTRY`
    per vocabulary entry, ``0`` asks for the whole train split.
    """
    if configured is None:
        return SAMPLE_BYTES_PER_ENTRY * vocab_size
    return configured or None


def train_tokenizer(batches: Iterable[list[str]], *, vocab_size: int, min_frequency: int = 2,
                    length: int | None = None) -> Any:
    """Train a byte-level BPE on batches of texts; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def find_tokenizer_dir(path: Path) -> Path:
    """The folder holding tokenizer files inside a tokenizer, model, prepared or pyfunc folder."""
    for cand in (path, path / "tokenizer", path / "artifacts" / "model", path / "model"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            return cand
    found = sorted(p.parent for p in path.rglob("tokenizer.json"))
    if len(found) == 1:
        return found[0]
    raise NotFoundError(f"no tokenizer (tokenizer.json / tokenizer_config.json) found in {path}")


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load a tokenizer from a local folder or a hub name, making sure eos and pad are set."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    target = str(find_tokenizer_dir(path)) if path.exists() else str(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"cannot load tokenizer {name_or_path}: {str(exc).splitlines()[0]}") from None
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer {name_or_path} has no eos token; packing needs one between documents")
    if tok.pad_token is None:
        # Blocks are always full, so padding only matters downstream (batching prompts).
        tok.pad_token = tok.eos_token
    return tok


def max_block_size(tok: Any) -> int | None:
    """The largest block a reused tokenizer allows (``model_max_length``), or ``None``: unlimited."""
    limit = getattr(tok, "model_max_length", None)
    if not isinstance(limit, int) or limit >= _UNLIMITED:
        return None
    return limit


def check_block_size(tok: Any, block_size: int, name: str) -> None:
    """Refuse a block size longer than the tokenizer (and its model) allows."""
    limit = max_block_size(tok)
    if limit is not None and block_size > limit:
        raise DataError(f"block size {block_size} exceeds the tokenizer's model_max_length {limit} "
                        f"({name}); use --block-size {limit} or less")


def encode_batch(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens, through the Rust backend when possible."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [enc.ids for enc in fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Group ``items`` into lists of ``size``."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_eos(tok: Any) -> int:
    """The eos id, or a clear error when the tokenizer has none."""
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token id; packing needs one between documents")
    return int(eos)


# Tokenizers loaded by worker processes, by file: loaded once per process, then reused.
_FILE_TOKENIZERS: dict[str, Any] = {}


def encode_with_file(texts: list[str], tokenizer_file: str) -> tuple[Any, Any]:
    """Encode ``texts`` with the ``tokenizer.json`` at ``tokenizer_file`` (no special tokens).

    What a worker process runs: the tokenizer is loaded from the file the main process saved,
    once per process. Returns the ids of all texts as one flat int32 array and the length of
    each text's ids, which pickle as two buffers instead of a list per document.
    """
    import numpy as np
    from tokenizers import Tokenizer

    tok = _FILE_TOKENIZERS.get(tokenizer_file)
    if tok is None:
        tok = _FILE_TOKENIZERS[tokenizer_file] = Tokenizer.from_file(tokenizer_file)
    fast = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    ids = [enc.ids for enc in fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths
