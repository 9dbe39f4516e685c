"""Training outputs, fast parts: checkpoint reload on the CPU, RNG state, background saves, the
folder lock, TF32 scoping and per-run checkpoint folders (in process; the SIGKILL and two-process
tests are in tests/test_train_faults.py).
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.errors import ConcurrencyError, ConfigError, NotFoundError
from lifecycle.precision import tf32_matmul_enabled
from lifecycle.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from lifecycle.train.config import TrainConfig
from lifecycle.train.data import load_prepared
from lifecycle.train.distributed import DistContext
from lifecycle.train.finetune import load_starting_point
from lifecycle.train.lock import LOCK_FILE, OutputLock, read_record
from lifecycle.train.loop import Trainer
from lifecycle.train.run import run_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(max_steps=8, batch_size=4, eval_every=4, eval_batches=2, checkpoint_every=4, warmup_steps=2,
            progress=False, system_metrics=False, log_model=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(prepared_tiny):
    return load_prepared(prepared_tiny)


def _trainer(cfg: TrainConfig, data, *, resume_from=None) -> Trainer:
    start = load_starting_point(cfg, data.tokenizer, data.block_size)
    return Trainer(cfg, start.model, data, ctx=DistContext(device=torch.device("cpu")),
                   checkpoints=CheckpointManager(cfg.output, keep=10), resume_from=resume_from)


def _optimizer_state():
    """A real AdamW state (nested dicts of tensors), after two steps."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    return model, opt


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# -- reload on the CPU, RNG state -----------------------------------------------------------------


def test_checkpoint_reload_maps_to_cpu_and_restores_every_rng(tmp_path):
    model, opt = _optimizer_state()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, model_state=model.state_dict(), optimizer_state=opt.state_dict(), scheduler_state={},
                    trainer_state={"step": 3}, device=torch.device("cpu"))
    after_save = _draws()
    _draws()  # the generators move on
    ck = CheckpointManager.load(path)
    tensors = [ck["model"]["weight"], ck["rng"]["torch"],
               *[v for s in ck["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]]
    assert all(t.device.type == "cpu" for t in tensors)
    # torch.set_rng_state accepts only a CPU ByteTensor: the reason loading must not map to a GPU.
    assert ck["rng"]["torch"].dtype == torch.uint8 and "cuda" not in ck["rng"]
    set_rng_state(ck["rng"], torch.device("cpu"))
    assert _draws() == after_save
    # The optimizer takes the CPU state back and moves it to its parameters itself.
    fresh_model, fresh_opt = _optimizer_state()
    fresh_opt.load_state_dict(ck["optimizer"])
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_holds_only_the_ranks_own_device():
    # On the CPU there is no CUDA generator to save; on a GPU only `device`'s is saved (one tensor,
    # not a list per visible GPU), so a resume with another GPU count finds what it needs.
    assert set(rng_state(torch.device("cpu"))) == {"python", "numpy", "torch"}
    state = rng_state(None)
    # A checkpoint from before this change held a list of CUDA states: on the CPU it is ignored.
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8)]
    set_rng_state(state, torch.device("cpu"))


def test_trainer_resumes_from_a_loaded_checkpoint_or_a_folder(data, tmp_path):
    cfg = TrainConfig(**FAST, output=str(tmp_path / "ck"))
    straight = _trainer(cfg, data).fit()
    first = CheckpointManager(cfg.output).checkpoints()[0]
    from_folder = _trainer(cfg, data, resume_from=first).fit()
    from_loaded = _trainer(cfg, data, resume_from=CheckpointManager.load(first)).fit()
    assert straight.last_val_loss == from_folder.last_val_loss == from_loaded.last_val_loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check runs it)")
def test_resume_on_cuda_restores_the_devices_rng_and_continues(data, tmp_path):
    device = torch.device("cuda:0")
    cfg = TrainConfig(**{**FAST, "dropout": 0.1}, output=str(tmp_path / "ck"))

    def trainer(resume_from=None) -> Trainer:
        start = load_starting_point(cfg, data.tokenizer, data.block_size)
        return Trainer(cfg, start.model, data, ctx=DistContext(device=device),
                       checkpoints=CheckpointManager(cfg.output, keep=10), resume_from=resume_from)

    straight = trainer().fit()
    first = CheckpointManager(cfg.output).checkpoints()[0]
    saved = CheckpointManager.load(first)
    assert torch.is_tensor(saved["rng"]["cuda"]) and saved["rng"]["cuda"].device.type == "cpu"
    resumed = trainer(resume_from=first).fit()  # crashed in torch.set_rng_state before the fix
    # Dropout draws from the CUDA generator: the same numbers after the resume need its state back.
    # Tolerance: CUDA backward kernels may sum in another order (a different dropout mask moves it far more).
    assert resumed.last_val_loss == pytest.approx(straight.last_val_loss, rel=2e-3)


# -- TF32 -----------------------------------------------------------------------------------------


def test_training_leaves_the_process_tf32_setting_as_it_found_it(data, tmp_path):
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # e.g. the user's own choice before training
    try:
        _trainer(TrainConfig(**{**FAST, "max_steps": 2}, output=str(tmp_path / "ck")), data).fit()
        assert tf32_matmul_enabled() is True and matmul.fp32_precision == "tf32"
        matmul.fp32_precision = "ieee"
        _trainer(TrainConfig(**{**FAST, "max_steps": 2}, output=str(tmp_path / "ck2")), data).fit()
        assert tf32_matmul_enabled() is False and matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


# -- background saves -----------------------------------------------------------------------------


def _contents(path: Path) -> dict:
    ck = CheckpointManager.load(path)
    return {"files": sorted(p.name for p in path.iterdir()), "ck": ck}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_background_save_writes_what_a_synchronous_save_writes(tmp_path):
    model, opt = _optimizer_state()
    best = {k: v.clone() for k, v in model.state_dict().items()}
    states = dict(model_state=model.state_dict(), optimizer_state=opt.state_dict(), scheduler_state={"n": 1},
                  trainer_state={"step": 5, "history": {"train/loss": [[1, 2.0]]}}, best_state=best)
    torch.manual_seed(7)
    sync = CheckpointManager(tmp_path / "sync").save(5, **states, background=False)
    torch.manual_seed(7)
    bg_mgr = CheckpointManager(tmp_path / "bg")
    bg = bg_mgr.save(5, **states, background=True)
    # The loop goes on changing its tensors and history while the writer works: the checkpoint
    # holds the values of the moment save() was called.
    with torch.no_grad():
        model.weight.add_(100.0)
    for s in opt.state.values():
        s["exp_avg"].add_(100.0)
    states["trainer_state"]["history"]["train/loss"].append([2, 1.0])
    assert bg_mgr.wait() == bg
    bg_mgr.close()
    a, b = _contents(sync), _contents(bg)
    assert a["files"] == b["files"] == ["best_model.pt", "model.pt", "optim.pt", "trainer_state.json"]
    assert _same(a["ck"], b["ck"])
    assert (sync / "trainer_state.json").read_bytes() == (bg / "trainer_state.json").read_bytes()


def test_a_trainer_saving_in_the_background_writes_the_same_checkpoints(data, tmp_path):
    sync_cfg = TrainConfig(**FAST, output=str(tmp_path / "sync"), checkpoint_background=False)
    bg_cfg = TrainConfig(**FAST, output=str(tmp_path / "bg"), checkpoint_background=True)
    _sync, bg = _trainer(sync_cfg, data).fit(), _trainer(bg_cfg, data).fit()
    assert bg.checkpoint == Path(bg_cfg.output) / "step-00000008"  # joined before fit returned
    names = [p.name for p in CheckpointManager(sync_cfg.output).checkpoints()]
    assert names == [p.name for p in CheckpointManager(bg_cfg.output).checkpoints()] == ["step-00000004",
                                                                                       "step-00000008"]
    for name in names:
        a, b = _contents(Path(sync_cfg.output) / name), _contents(Path(bg_cfg.output) / name)
        assert a["files"] == b["files"]
        assert _same(a["ck"]["model"], b["ck"]["model"]) and _same(a["ck"]["optimizer"], b["ck"]["optimizer"])
        assert _same(a["ck"]["best"], b["ck"]["best"]) and _same(a["ck"]["rng"], b["ck"]["rng"])
        sa, sb = a["ck"]["state"], b["ck"]["state"]
        sa["config"].pop("output"), sb["config"].pop("output")
        sa["config"].pop("checkpoint_background"), sb["config"].pop("checkpoint_background")
        for key in ("step", "best_val_loss", "last_val_loss", "samples_consumed", "config"):
            assert sa[key] == sb[key], key


@pytest.mark.tried("train", "the background checkpoint writer fails (its folder cannot be created)",
                   "the error is raised in the training thread at the next save or at the end, never lost")
def test_a_failing_background_write_surfaces_in_the_main_thread(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    mgr = CheckpointManager(blocker / "ck")
    mgr.save(1, model_state={"w": torch.ones(2)}, optimizer_state={}, scheduler_state={},
             trainer_state={"step": 1}, background=True)
    with pytest.raises(NotADirectoryError):
        mgr.wait()
    mgr.close()
    cfg = TrainConfig(**{**FAST, "max_steps": 4, "checkpoint_every": 2}, output=str(blocker / "ck"))
    with pytest.raises(NotADirectoryError):
        _trainer(cfg, data).fit()


@pytest.mark.tried("train", "SIGKILL while the background writer is half-way through a large checkpoint",
                   "the previous checkpoint stays complete and loadable; the partial one is never listed")
def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_usable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from lifecycle.train.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r}, keep=5)
        mgr.save(1, model_state={{"w": torch.ones(4)}}, optimizer_state={{}}, scheduler_state={{}},
                 trainer_state={{"step": 1}})
        big = {{f"w{{i}}": torch.randn(2_000_000) for i in range(60)}}  # ~480 MB: the write takes a while
        mgr.save(2, model_state=big, optimizer_state={{}}, scheduler_state={{}}, trainer_state={{"step": 2}},
                 background=True)
        print("saving", flush=True)
        mgr.wait()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    tmp = tmp_path / f".tmp-step-00000002-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (tmp / "model.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait(timeout=30)
    assert tmp.is_dir(), "the kill landed after the write: nothing was interrupted"
    mgr = CheckpointManager(tmp_path)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001"]
    path, ck = mgr.load_latest()
    assert ck["state"]["step"] == 1 and ck["model"]["w"].tolist() == [1.0] * 4
    mgr.save(3, model_state={"w": torch.zeros(1)}, optimizer_state={}, scheduler_state={}, trainer_state={"step": 3})
    assert not tmp.exists()  # the next save cleans what the killed writer left


@pytest.mark.tried("train", "resume when the newest checkpoint's weights file is truncated or garbage",
                   "that checkpoint is skipped with a warning naming it; the previous one is used")
@pytest.mark.parametrize("damage", [b"", b"garbage", None])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    mgr = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2):
        mgr.save(step, model_state={"w": torch.full((4,), float(step))}, optimizer_state={}, scheduler_state={},
                 trainer_state={"step": step})
    model = tmp_path / "step-00000002" / "model.pt"
    if damage is None:
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    else:
        model.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="lifecycle.train.checkpoint"):
        path, ck = mgr.load_latest()
    assert path.name == "step-00000001" and ck["model"]["w"].tolist() == [1.0] * 4
    assert "step-00000002" in caplog.text and "skipping damaged checkpoint" in caplog.text


def test_checkpoints_by_time_save_whenever_the_interval_passed(data, tmp_path):
    cfg = TrainConfig(**{**FAST, "max_steps": 5, "eval_every": 100, "checkpoint_every": 1000,
                         "checkpoint_every_s": 1e-6, "keep_checkpoints": 10}, output=str(tmp_path / "ck"))
    _trainer(cfg, data).fit()
    assert [p.name for p in CheckpointManager(cfg.output).checkpoints()] == [f"step-{s:08d}" for s in range(1, 6)]


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf")])
def test_a_bad_checkpoint_interval_is_refused(value):
    with pytest.raises(ConfigError, match="checkpoint_every_s"):
        TrainConfig(checkpoint_every_s=value)


# -- the folder lock ------------------------------------------------------------------------------


@pytest.mark.tried("train", "a second trainer (same process or another) opens a checkpoint folder in use",
                   "refused with exit 9 and a one-line message naming the holder's pid, host, run id and start")
def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "checkpoints" / "ck"
    with OutputLock(folder, run_id="run-a"):
        record = read_record(folder / LOCK_FILE)
        assert record["pid"] == os.getpid() and record["run_id"] == "run-a"
        with pytest.raises(ConcurrencyError) as err:
            OutputLock(folder, run_id="run-b").acquire()
        message = str(err.value)
        assert "\n" not in message and err.value.exit_code == 9
        for part in (f"pid {os.getpid()}", record["host"], "run run-a", f"started {record['started']}"):
            assert part in message
    # Released: the record is gone and the folders the lock made (holding nothing else) too.
    assert not (tmp_path / "checkpoints").exists()
    with OutputLock(folder, run_id="run-b") as lock:
        (folder / "step-00000001").mkdir()
        lock.update(run_id="run-c")
        assert read_record(folder / LOCK_FILE)["run_id"] == "run-c"
    assert folder.is_dir() and read_record(folder / LOCK_FILE) == {}


@pytest.mark.tried("train", "a lock record left by a trainer that died (kill -9, power loss), torn or not",
                   "taken over with a warning naming the dead holder")
@pytest.mark.parametrize("left", ['{"pid": 999999, "host": "gone", "run_id": "r1", "started": "then"}\n',
                                  '{"pid": 99', "\x00\x00"])
def test_a_lock_left_by_a_dead_trainer_is_taken_over_with_a_warning(tmp_path, caplog, left):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(left)
    with caplog.at_level(logging.WARNING, logger="lifecycle.train.lock"), OutputLock(folder, run_id="new"):
        assert read_record(folder / LOCK_FILE)["run_id"] == "new"
    if left.startswith('{"pid": 999999'):
        assert "taking over the lock" in caplog.text and "pid 999999 on gone, run r1" in caplog.text


# -- per-run folders ------------------------------------------------------------------------------


@pytest.mark.tried("train", "--resume-run with any text: separators, '..', NUL, spaces, non-ASCII (hypothesis)",
                   "a plain run id names exactly checkpoints/<id>; anything else is refused with a one-line error")
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_resume_run_names_a_folder_under_the_root_or_is_refused(text):
    try:
        path = run_folder("checkpoints", text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "is not a run id" in str(exc)
        return
    assert path.parent == Path("checkpoints") and path.name == text and text not in (".", "..")


def test_default_runs_get_their_own_folder_and_resume_by_run(prepared_tiny, tmp_path, monkeypatch, tracking_uri):
    from click.testing import CliRunner

    from lifecycle.cli import cli
    from lifecycle.train.run import train

    monkeypatch.chdir(tmp_path)
    sets = [a for k, v in {**FAST, "max_steps": 4}.items()
            for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    run_ids = []
    for _ in range(2):  # the same command twice in one folder: two independent runs
        result = CliRunner().invoke(cli, ["train", "--data", str(prepared_tiny), *sets], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        run_ids.append(result.output.split("; run ")[1].split()[0])
    assert run_ids[0] != run_ids[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(run_ids)
    for run_id in run_ids:
        latest = CheckpointManager(tmp_path / "checkpoints" / run_id).latest()
        assert latest.name == "step-00000004" and CheckpointManager.read_state(latest)["run_id"] == run_id
    import mlflow

    assert mlflow.get_run(run_ids[0]).data.tags["checkpoint_dir"] == str(Path("checkpoints") / run_ids[0])
    cfg = TrainConfig(**{**FAST, "max_steps": 6})
    # --resume: the run that saved last; --resume-run: the one named.
    out = train(cfg, str(prepared_tiny), resume=True)
    assert (out.run_id, out.resumed_from, out.steps) == (run_ids[1], 4, 6)
    out = train(cfg, str(prepared_tiny), resume_run=run_ids[0])
    assert (out.run_id, out.resumed_from, out.steps) == (run_ids[0], 4, 6)
    assert out.checkpoint_dir == str(Path("checkpoints") / run_ids[0])
    with pytest.raises(NotFoundError, match="no checkpoint in checkpoints/0123abcd"):
        train(cfg, str(prepared_tiny), resume_run="0123abcd")
    with pytest.raises(ConfigError, match="--resume-run picks a run folder"):
        train(TrainConfig(**{**FAST, "output": "elsewhere"}), str(prepared_tiny), resume_run=run_ids[0])
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.tried("train", "a start refused after the output lock is taken (missing base model, bad --resume-run)",
                   "one-line error; no output folder, lock file or checkpoints/ folder is left behind")
def test_a_refused_start_leaves_no_output_folder(prepared_tiny, tmp_path, monkeypatch, tracking_uri):
    from lifecycle.errors import LifecycleError
    from lifecycle.train.run import train

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(**FAST, output=str(tmp_path / "new" / "ck"), base_model=str(tmp_path / "no-such-model"))
    with pytest.raises(LifecycleError) as err:
        train(cfg, str(prepared_tiny))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError):
        train(TrainConfig(**FAST), str(prepared_tiny), resume_run="../escape")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "escape").exists()
