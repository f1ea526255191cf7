"""`python -m fastformer train`: the synthetic tasks, the command line's outputs, and DDP
over two gloo processes giving the weights of one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fastformer.models.tasks import BOS, DIGIT0, EOS, PAD, DigitTask
from fastformer.models.train import TrainConfig, load_checkpoint, train
from tests.conftest import requires_extension

pytestmark = requires_extension

ROOT = Path(__file__).resolve().parents[1]
# A tiny model and task: a few seconds per run.
TINY = dict(
    max_digits=5,
    batch_size=16,
    d_model=32,
    n_heads=2,
    n_layers=1,
    dim_feedforward=48,
    eval_every=10,
    eval_size=16,
    test_size=16,
    progress=False,
)


def _flags(config: dict) -> list[str]:
    flags = []
    for name, value in config.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------


def _digits(tokens: torch.Tensor) -> list[int]:
    return [t - DIGIT0 for t in tokens.tolist() if t >= DIGIT0]


@pytest.mark.parametrize("name", ["reverse", "sort", "copy"])
def test_task_targets(name):
    task = DigitTask(name, min_digits=1, max_digits=7)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    expected = {"reverse": lambda d: d[::-1], "sort": sorted, "copy": list}[name]
    for src, tgt in zip(batch.src, batch.tgt, strict=True):
        digits = _digits(src)
        assert 1 <= len(digits) <= 7 and src[len(digits) :].eq(PAD).all()
        assert tgt[0] == BOS and tgt[len(digits) + 1] == EOS
        assert _digits(tgt) == expected(digits)
        assert tgt[len(digits) + 2 :].eq(PAD).all()
    assert task.exact_match(batch.tgt[:, 1:], batch.tgt).all()


def test_held_out_strings_are_never_trained_on():
    task = DigitTask(max_digits=4)
    train_batch = task.sample(3000, torch.Generator().manual_seed(0))
    held_out = task.held_out_set(300, seed=1)
    seen = {tuple(row) for row in train_batch.src.tolist()}
    unseen = {tuple(row) for row in held_out.src.tolist()}
    assert len(unseen) == held_out.src.shape[0] > 200  # distinct strings
    assert not seen & unseen


def test_exact_match_wants_the_whole_answer_and_nothing_after():
    task = DigitTask(max_digits=3)
    tgt = torch.tensor([[BOS, 5, 4, EOS, PAD]])
    assert task.exact_match(torch.tensor([[5, 4, EOS]]), tgt).item()
    assert task.exact_match(torch.tensor([[5, 4, EOS, PAD, PAD, PAD]]), tgt).item()
    assert not task.exact_match(torch.tensor([[5, 4]]), tgt).item()  # no EOS
    assert not task.exact_match(torch.tensor([[5, 4, 6, EOS]]), tgt).item()
    assert not task.exact_match(torch.tensor([[5, 4, EOS, PAD, PAD, 7]]), tgt).item()


# ----------------------------------------------------------------------------------------
# The command line and DDP
# ----------------------------------------------------------------------------------------


def test_train_command_writes_checkpoint_metrics_and_plot(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastformer", "train", "--steps", "20", "--out", str(out)]
    done = subprocess.run(
        command + _flags(TINY),
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "trained 20 steps" in done.stdout and "exact-match" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and len(metrics["history"]["loss"]) == 20
    assert metrics["history"]["loss"][-1] < metrics["history"]["loss"][0]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_checkpoint(out / "checkpoint.pt")
    assert model.config.d_model == 32
    src = DigitTask(max_digits=5).held_out_set(4, seed=0).src
    assert model.generate(src, 6).shape[0] == 4


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one_process(tmp_path, fsdp):
    """3 steps on 2 gloo ranks (torchrun; DDP, or FSDP2's fully_shard) leave the weights of
    3 steps in one process on the same global batch; dropout off, since each rank draws its
    own masks. An evaluation mid-way gathers FSDP's shards."""
    config = dict(TINY, steps=3, seed=5, eval_every=2, fsdp=fsdp)
    single = train(TrainConfig(**config, out=str(tmp_path / "single")))
    # torchrun's module, from this interpreter: the venv's bin/ need not be on PATH.
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    command = [*torchrun, "-m", "fastformer", "train", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(
        command + _flags(config),
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "on 2 process(es)" in done.stdout
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    ours = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert ddp["result"]["world_size"] == 2
    assert ddp["train_config"] == ours["train_config"] | {"out": str(tmp_path / "ddp")}
    for name, weight in ours["model"].items():
        torch.testing.assert_close(ddp["model"][name], weight, rtol=0, atol=1e-6)
    assert ddp["result"]["final_loss"] == pytest.approx(single.final_loss, abs=1e-6)
    assert asdict(single)["steps"] == 3


# ----------------------------------------------------------------------------------------
# Bad settings: a clean error before any work
# ----------------------------------------------------------------------------------------


def _main_error(capsys, argv: list[str]) -> str:
    """The one-line error of `fastformer <argv>`, which must exit with argparse's code 2."""
    from fastformer.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--steps", "0", "expected an integer >= 1"),  # trained 0 steps, loss NaN
        ("--steps", "-1", "expected an integer >= 1"),
        ("--threads", "-1", "expected an integer >= 1"),  # a RuntimeError traceback
        ("--threads", "0", "expected an integer >= 1"),
        ("--batch-size", "0", "expected an integer >= 1"),
        ("--n-layers", "0", "expected an integer >= 1"),
        ("--eval-every", "0", "expected an integer >= 1"),  # a ZeroDivisionError
        ("--test-size", "0", "expected an integer >= 1"),
        ("--max-digits", "2.5", "expected an integer >= 1"),
        ("--lr", "nan", "expected a finite number > 0"),
        ("--lr", "0", "expected a finite number > 0"),
        ("--grad-clip", "-1", "expected a finite number > 0"),
        ("--weight-decay", "-0.1", "expected a finite number >= 0"),
        ("--warmup", "-1", "expected an integer >= 0"),
        ("--dropout", "1", "expected a finite number in [0, 1)"),
        ("--stop-at", "1.5", "expected a finite number in (0, 1]"),
    ],
)
def test_train_command_rejects_each_bad_number(capsys, tmp_path, option, value, expected):
    out = tmp_path / "run"
    error = _main_error(capsys, ["train", "--out", str(out), option, value])
    assert error == f"fastformer train: error: argument {option}: {expected}, got {value!r}"
    assert not out.exists()


def test_train_command_rejects_settings_that_do_not_fit_together(capsys, tmp_path):
    out = str(tmp_path / "run")
    error = _main_error(capsys, ["train", "--out", out, "--d-model", "30", "--n-heads", "4"])
    assert error.startswith("fastformer train: error: Seq2SeqConfig: d_model (30) must be")
    error = _main_error(capsys, ["train", "--out", out, "--min-digits", "5", "--max-digits", "3"])
    assert "min_digits <= max_digits" in error


def test_train_command_rejects_an_out_that_is_a_file_before_training(tmp_path, monkeypatch):
    """It trained first, then failed to save with a FileExistsError traceback."""
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out in (taken, taken / "below"):
        command = [sys.executable, "-m", "fastformer", "train", "--out", str(out)]
        done = subprocess.run(
            [*command, "--steps", "1", *_flags(TINY)],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert (
            done.stderr.strip()
            .splitlines()[-1]
            .startswith(f"fastformer train: error: argument --out: output folder '{out}' ")
        )
        assert "exists and is not a folder" in done.stderr
    assert taken.read_text() == "not a folder"
    # train() itself checks before the first step too.
    import fastformer.models.train as training

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(training, "_train_step", no_training)
    with pytest.raises(ValueError, match="exists and is not a folder"):
        train(TrainConfig(**dict(TINY, steps=1), out=str(taken)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "TrainConfig: steps must be an integer >= 1"),
        ("steps", 2.0, "TrainConfig: steps must be an integer >= 1"),
        ("threads", 0, "TrainConfig: threads must be an integer >= 1"),
        ("lr", float("nan"), "TrainConfig: lr must be a finite number > 0"),
        ("n_layers", 0, "TrainConfig: n_layers must be an integer >= 1"),
        ("backend", "nope", "backend must be one of"),
        ("task", "nope", "task must be one of"),
    ],
)
def test_train_config_checks_its_fields(field, value, message):
    """The Python API checks as the command line does, before any work."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_metrics_json_is_strict_json_even_for_a_diverged_loss(tmp_path):
    """NaN and infinity, which json.dumps writes as bare NaN / Infinity (not JSON), are null."""
    from fastformer.models.train import TrainResult, _save

    config = TrainConfig(**dict(TINY, steps=2), out=str(tmp_path))
    model_config = config.model_config(DigitTask(max_digits=5))
    history = {"step": [1, 2], "loss": [2.5, float("nan")], "eval_step": [2], "exact": [0.0]}
    result = TrainResult(2, 0.5, float("inf"), float("nan"), 0.0, 1, history)
    _save({}, model_config, config, result)

    def not_json(constant: str) -> None:
        raise AssertionError(f"{constant} in metrics.json")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=not_json)
    assert metrics["final_loss"] is None and metrics["tokens_per_second"] is None
    assert metrics["history"]["loss"] == [2.5, None] and metrics["steps"] == 2
