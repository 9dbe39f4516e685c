"""``lifecycle prepare``: the click face of :func:`lifecycle.data.prepare.prepare`."""

from __future__ import annotations

import json

import click

from lifecycle.cli.params import INT


def _whole_or_auto(text: str | None, flag: str) -> int | None:
    """``--vocab-size`` / ``--block-size``: a whole number (the config checks its range) or ``auto``."""
    if text is None or text == "auto":
        return None
    if not (text.isascii() and text.isdigit()):
        raise click.BadParameter(f"{text!r} is neither a whole number nor auto", param_hint=flag)
    return int(text)


@click.command("prepare")
@click.option("--source", default=None,
              help="File, folder, hf:NAME[:CONFIG], saved dataset, runs:/ URI or builtin:pydoc (default).")
@click.option("--output", required=True, type=click.Path(), help="Prepared data folder to create.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML file with a PrepareConfig.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set quality.min_words=20 (repeatable).")
@click.option("--tokenizer", default=None,
              help="Reuse a tokenizer: folder, model, prepared data, runs:/ or models:/ URI.")
@click.option("--vocab-size", default=None, metavar="N|auto",
              help="Vocabulary size of a trained BPE tokenizer, or auto (sized by the train split).")
@click.option("--block-size", default=None, metavar="N|auto",
              help="Tokens per packed block, or auto (sized by the train split; raw text, tokenizer trained here).")
@click.option("--max-documents", type=INT, default=None, help="Read at most this many documents.")
@click.option("--text-column", default=None, help="Column holding the text (jsonl/json/csv/parquet/datasets).")
@click.option("--format", "data_format", type=click.Choice(["auto", "lm", "sft"]), default=None,
              help="lm: raw text packed into blocks; sft: prompt/response or chat records (loss on responses); "
                   "auto (default): sft when the first record has those columns.")
@click.option("--prompt-column", default=None, help="sft: column of the prompt (default prompt).")
@click.option("--response-column", default=None, help="sft: column of the response (default response).")
@click.option("--messages-column", default=None, help="sft: column of chat messages (default messages).")
@click.option("--document-per-file", is_flag=True, default=False, help=".txt/.md: one document per file.")
@click.option("--dedup-against", default=None,
              help="Earlier prepared data to deduplicate against (folder or runs:/ URI).")
@click.option("--pii", type=click.Choice(["replace", "drop", "off"]), default=None,
              help="Replace PII with placeholders, drop the document, or off.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default=None,
              help="Non-UTF-8 bytes: fail (strict) or replace and count.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing output folder.")
@click.option("--num-proc", type=INT, default=None, help="Worker processes for the per-document steps.")
@click.option("--seed", type=INT, default=None, help="Seed of the split hash and MinHash permutations.")
def prepare(source: str | None, output: str, config_path: str | None, overrides: tuple[str, ...],
            tokenizer: str | None, vocab_size: str | None, block_size: str | None, max_documents: int | None,
            text_column: str | None, data_format: str | None, prompt_column: str | None,
            response_column: str | None, messages_column: str | None, document_per_file: bool,
            dedup_against: str | None, pii: str | None,
            errors: str | None, overwrite: bool, num_proc: int | None, seed: int | None) -> None:
    """Clean, filter, deduplicate, scrub, split, tokenize and pack a corpus into OUTPUT."""
    from lifecycle.cli import check_writable
    from lifecycle.config import load_config
    from lifecycle.data.config import PrepareConfig
    from lifecycle.data.prepare import prepare as run_prepare

    # Parameter names match the flags (and the MLproject parameters: entrypoints/_run.py).
    cfg = load_config(
        PrepareConfig, config_path, overrides,
        **{
            "source.uri": source,
            "source.text_column": text_column,
            "format": data_format,
            "sft.prompt_column": prompt_column,
            "sft.response_column": response_column,
            "sft.messages_column": messages_column,
            "source.document_per_file": True if document_per_file else None,
            "source.max_documents": max_documents,
            "source.errors": errors,
            "tokenizer.name_or_path": tokenizer,
            "tokenizer.vocab_size": _whole_or_auto(vocab_size, "--vocab-size"),
            "tokenizer.auto_vocab": True if vocab_size == "auto" else None,
            "pack.block_size": _whole_or_auto(block_size, "--block-size"),
            "pack.auto_block": True if block_size == "auto" else None,
            "dedup.against": dedup_against,
            "pii.mode": pii,
            "num_proc": num_proc,
            "seed": seed,
        },
    )
    check_writable(output, "--output")
    outcome = run_prepare(cfg, output, overwrite=overwrite)
    card = outcome.card
    summary = {
        "output": str(outcome.output),
        "run_id": outcome.run_id,
        "artifact_uri": f"runs:/{outcome.run_id}/prepared",
        "digest": card["digest"],
        "format": card.get("format", "lm"),
        "documents": card["counts"]["documents_kept"],
        "splits": card["splits"],
        "tokens": card["tokens"],
    }
    click.echo(json.dumps(summary))
