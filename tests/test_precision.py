"""TF32 scoping (lifecycle.precision): restores what it found, and never trips torch's legacy/new API check.

torch >= 2.9 raises on *reading* a legacy ``allow_tf32`` flag once the new ``fp32_precision``
settings were set in the process (transformers' ``TrainingArguments(tf32=...)`` sets them). The
mixing cases run in a fresh interpreter each, because that check is sticky for the whole process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from lifecycle.precision import tf32, tf32_matmul_enabled

SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


@pytest.mark.parametrize("before", ["tf32", "ieee", "none"])
@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_context_sets_and_restores_every_setting(before, enabled):
    saved = [s.fp32_precision for s in SETTINGS]
    try:
        for s in SETTINGS:
            s.fp32_precision = before
        with tf32(enabled):
            assert [s.fp32_precision for s in SETTINGS] == ["tf32" if enabled else "ieee"] * 3
            assert tf32_matmul_enabled() is enabled
        assert [s.fp32_precision for s in SETTINGS] == [before] * 3
        with pytest.raises(RuntimeError, match="failing block"), tf32(enabled):
            raise RuntimeError("a failing block restores too")
        assert [s.fp32_precision for s in SETTINGS] == [before] * 3
    finally:
        for s, value in zip(SETTINGS, saved):
            s.fp32_precision = value


def test_none_inherits_the_process_wide_setting():
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert tf32_matmul_enabled() is True
        torch.backends.fp32_precision = "ieee"
        assert tf32_matmul_enabled() is False
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


# What TrainingArguments(tf32=True) does on torch >= 2.9 (the new API), and what older user code does.
NEW_API = "from transformers.utils.import_utils import enable_tf32; enable_tf32(True)"
LEGACY = "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True"


@pytest.mark.parametrize("set_before", [NEW_API, LEGACY], ids=["transformers-new-api", "legacy-flags"])
def test_scoping_works_whichever_api_set_tf32_first(set_before):
    out = _fresh(f"""
        import torch
        from lifecycle.precision import tf32, tf32_matmul_enabled
        {set_before}
        assert tf32_matmul_enabled() is True
        with tf32(False):
            assert tf32_matmul_enabled() is False
        assert tf32_matmul_enabled() is True
        print("ok")
    """)
    assert out == "ok"
