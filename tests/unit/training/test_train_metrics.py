"""What training reports: the metrics JSONL streamed while it runs, TensorBoard scalars, the
loss-curve PNG in the adapter, and the CLI's progress/notes (train_metrics.py, cli.py)."""

from __future__ import annotations

import errno
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qalora_export.errors import ConfigError, OutputWriteError
from qalora_export.training.config import TrainConfig
from qalora_export.training.train import iter_training_log, train_adapter
from qalora_export.training.metrics_log import LOSS_CURVE, MetricsLog, default_metrics_path
from test_train import FAST, GROUP_SIZE, copy_task, write_jsonl

ROW_KEYS = {"step", "loss", "lr", "tokens", "response_tokens", "tokens_per_s", "grad_norm", "seconds"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One OpenMP thread: on a busy 2-core machine two spinning threads slow tiny models 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("metrics") / "base", bits=4, group_size=GROUP_SIZE,
                                      layers=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("metrics-data") / "train.jsonl", copy_task(40, seed=3))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    ihdr = data[16:24]
    return struct.unpack(">II", ihdr)


def test_metrics_jsonl_tensorboard_and_loss_curve(base, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen: list[dict] = []
    metrics, tb, out = tmp_path / "run.metrics.jsonl", tmp_path / "tb", tmp_path / "adapter"
    result = train_adapter(base, data_file, out, TrainConfig(steps=5, **FAST), metrics_path=metrics,
                           tensorboard_dir=tb, on_step=seen.append)

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [r["loss"] for r in rows] == result.losses
    assert rows == list(iter_training_log(out)) == seen  # the same rows in the file, the adapter, the callback
    assert all(a["tokens"] < b["tokens"] and a["seconds"] <= b["seconds"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["tokens"] == result.tokens and all(r["tokens_per_s"] > 0 for r in rows)
    assert result.metrics_path == str(metrics) and result.tokens_per_second > 0

    width, height = png_size((out / LOSS_CURVE).read_bytes())
    assert (width, height) == (640, 400)
    from matplotlib.image import imread

    pixels = imread(str(out / LOSS_CURVE))
    assert pixels.shape[:2] == (400, 640) and float(pixels.std()) > 0  # a drawing, not a blank canvas

    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss_events] == pytest.approx(result.losses, rel=1e-6)  # stored as float32
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "held_out/loss"} <= set(acc.Tags()["scalars"])
    held = acc.Scalars("held_out/loss")
    assert [e.step for e in held] == [0, 5]
    assert [e.value for e in held] == pytest.approx([result.held_out_loss_before, result.held_out_loss_after], rel=1e-6)


def test_metrics_rows_reach_the_disk_as_steps_end(base, data_file, tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 99, "stale": "a previous run"}\n')  # a fresh run replaces the log
    on_disk: list[int] = []

    def on_step(row: dict) -> None:  # what a SIGKILL right now would leave behind
        on_disk.append(len(metrics.read_text().splitlines()))

    train_adapter(base, data_file, tmp_path / "a", TrainConfig(steps=4, **FAST), metrics_path=metrics,
                  on_step=on_step, loss_curve=False)
    assert on_disk == [1, 2, 3, 4]
    assert '"stale"' not in metrics.read_text()
    assert not (tmp_path / "a" / LOSS_CURVE).exists()


def test_a_failed_metrics_write_says_why(tmp_path):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log = MetricsLog(tmp_path / "m.jsonl", None)
    log._file.close()
    log._file = FullDisk()  # the next row does not fit
    with pytest.raises(OutputWriteError, match=r"m\.jsonl: the disk is full; training stopped and nothing was written"):
        log.write({"step": 1, "loss": 1.0})
    log.close()


def test_tensorboard_missing_is_a_config_error_naming_pip(base, data_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is absent
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train_adapter(base, data_file, tmp_path / "out", TrainConfig(steps=2, **FAST), tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()


def test_cli_streams_metrics_next_to_the_output_and_reports_overlong_examples(base, tmp_path, capsys):
    records = copy_task(30, seed=4)
    for r in records[:5]:  # 5 of 30 examples longer than --max-length 32, their answers cut, not lost
        r["instruction"] = " ".join(["w20"] * 24)
    records[5]["instruction"] = " ".join(["w21"] * 40)  # and one whose answer does not fit at all
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "adapter"
    argv = ["train", str(base), "--data", str(data), "-o", str(out), "--rank", "4", "--alpha", "8", "--steps", "3",
            "--batch-size", "4", "--max-length", "32", "--held-out", "0", "--lr", "1e-2"]
    assert main(argv) == EXIT_OK
    printed = capsys.readouterr().out
    assert "note: train: 6 example(s) longer than --max-length 32 dropped, 0 truncated (--on-overlong drop)\n" in printed
    rows = [json.loads(line) for line in default_metrics_path(out).read_text().splitlines()]
    assert default_metrics_path(out) == tmp_path / "adapter.metrics.jsonl"
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / LOSS_CURVE).is_file()

    assert main(argv + ["--overwrite", "--on-overlong", "truncate"]) == EXIT_OK
    assert ("0 example(s) longer than --max-length 32 dropped, 5 truncated (--on-overlong truncate), "
            "1 dropped with no response token left") in capsys.readouterr().out

    assert main(argv[:-2] + ["--lr", "1e-2", "--grad-accum", "8", "-o", str(tmp_path / "x")]) == EXIT_BAD_INPUT
    assert "--grad-accum 8" in capsys.readouterr().err
