"""What the commands print and where it goes: start-up without the heavy libraries, progress
of long jobs, the round line, and the public records that reach TensorBoard."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from torch.utils.data import TensorDataset

from dpfl.cli.display import ProgressDisplay
from dpfl.progress import tracked
from dpfl.server.public_records import PUBLIC_ROUND_KEYS
from dpfl.server.recorder import NotPublicError
from dpfl.server.round_line import round_line
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.evaluation import evaluate
from dpfl.task.pretraining import PretrainConfig, pretrain
from dpfl.task.rendering import SyntheticConfig

SMALL = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5", "--rounds", "2", "--workers", "1"]


COMMANDS = ["simulate", "audit", "compare", "privacy", "strategies", "compress", "deploy"]


def test_parsing_any_command_line_imports_no_heavy_library(tmp_path):
    # What keeps `dpfl --help` and a mistyped option under a second (benchmarks/startup.py
    # prints the times): every parser is built without torch, Flower or Opacus.
    command_lines = [
        ["simulate", "--rounds", "3", "--out", "runs/x"], ["audit", "--canaries", "8"], ["compare", "--strategies", "a"],
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.5", "--rounds", "3"], ["strategies"],
        ["compress", "--checkpoint", "x.pt", "--ratio", "0.5", "--out", "runs/x"],
        ["deploy", "--checkpoint", "x.pt", "--tile", "64", "--out", "runs/x"],
    ]
    assert sorted({argv[0] for argv in command_lines}) == sorted(COMMANDS)
    code = (
        f"import sys; from dpfl.cli.main import build_parser; parser = build_parser(); "
        f"[parser.parse_args(argv) for argv in {command_lines!r}]; "
        "print(sorted(name for name in ('torch', 'flwr', 'opacus', 'dp_accounting', 'scipy') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_printing_a_commands_help_imports_no_heavy_library(tmp_path, command):
    # argparse lists every option's choices in --help: the names a choice is checked against
    # (data sets, methods, mappings, modes) must come without torch.
    code = (
        "import contextlib, io, sys; from dpfl.cli.main import build_parser; help = io.StringIO()\n"
        f"with contextlib.redirect_stdout(help), contextlib.suppress(SystemExit): build_parser().parse_args([{command!r}, '--help'])\n"
        "print(sorted(name for name in ('torch', 'flwr', 'opacus', 'dp_accounting', 'scipy') if name in sys.modules))\n"
        "print(help.getvalue())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    heavy, _, help_text = result.stdout.partition("\n")
    assert heavy == "[]"
    assert f"usage: dpfl {command}" in help_text


def test_a_log_gets_one_plain_line_per_stage():
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    with ProgressDisplay(console) as progress:
        for _ in tracked(range(3), "first stage", progress):
            progress("inner stage", 0, 2)
            progress("inner stage", 2, 2)
        list(tracked(range(2), "second stage", progress))
    lines = console.file.getvalue().splitlines()
    # The inner stage runs three times: a line each time it starts, none per step.
    assert [line.split("] ", 1)[1] for line in lines] == [
        "first stage (3 steps)", "inner stage (2 steps)", "inner stage (2 steps)", "inner stage (2 steps)",
        "second stage (2 steps)",
    ]


def test_a_log_hears_from_a_long_stage_once_a_minute():
    now = [0.0]
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    with ProgressDisplay(console, clock=lambda: now[0]) as progress:
        progress("sweep", 0, 12)
        for done, seconds in [(1, 30.0), (2, 59.0), (3, 61.0), (4, 100.0), (5, 125.0), (12, 400.0)]:
            now[0] = seconds
            progress("sweep", done, 12)
    # A line at the start, then one for a step finished a minute or more after the
    # stage's last line; none for the finished stage.
    assert console.file.getvalue().splitlines() == [
        "[     0 s] sweep (12 steps)", "[    61 s] sweep: 3/12", "[   125 s] sweep: 5/12",
    ]


def test_a_terminal_gets_a_bar_per_running_stage():
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    with ProgressDisplay(console) as progress:
        progress("outer", 1, 4)
        progress("inner", 3, 10)
        assert [task.description for task in progress._bars.tasks] == ["outer", "inner"]
        progress("inner", 10, 10)
        assert [(task.description, task.completed) for task in progress._bars.tasks] == [("outer", 1)]


def test_library_jobs_report_their_steps():
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done, total))

    data = TensorDataset(torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,)))
    model = ModelSpec(name="cnn", num_classes=10, in_channels=1, image_size=8, width=4).build()
    evaluate(model, data, batch_size=4, progress=progress, stage="evaluating")
    assert seen == [("evaluating", done, 3) for done in range(4)]
    seen.clear()
    tiny = PretrainConfig(data=SyntheticConfig(categories=4, instances=6), epochs=2, batch_size=8)
    pretrain(ModelSpec(name="cnn", num_classes=10, in_channels=1, image_size=8, width=4), "strokes", tiny, progress)
    epochs = [step for step in seen if step[0].startswith("public pretraining")]
    assert [done for _, done, _ in epochs] == [0, epochs[-1][2] // 2, epochs[-1][2]]


def test_the_round_line_shows_the_guarantee_the_run_has():
    row = {"round": 3, "accuracy": 0.8, "loss": 0.5, "epsilon": 2.5}
    assert round_line(row, 5, 1e-5, 1e-5) == "round   3/5  accuracy 0.8000  loss 0.5000  epsilon 2.500 (delta 1e-05)"
    # No client-level guarantee, sample-level DP in every silo (the docker example): its epsilon, not "not valid".
    silo = {**row, "epsilon": None, "local-epsilon-nominal": 8.08}
    line = round_line(silo, 5, 1e-5, 1e-6)
    assert line.endswith("no client-level epsilon; local DP-SGD epsilon of a nominal client 8.080 (delta 1e-06)")
    # A node's own lines say "sample-level": the public log must not look like one (tests/test_public_records.py).
    assert "not valid" not in line and "sample-level" not in line
    assert "epsilon not valid" in round_line({**row, "epsilon": None}, 5, 1e-5, 1e-5)


def test_tensorboard_receives_the_public_round_records_and_nothing_else(dpfl_quick, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpfl.server.tracking import TensorBoardTracker

    out, board = tmp_path / "run", tmp_path / "board"
    result = dpfl_quick("simulate", *SMALL, "--out", str(out), "--tensorboard", str(board), "--engine", "in-process")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rounds (dp-fedpgn) (2 steps)" in result.stdout  # the progress line of a log
    events = EventAccumulator(str(board / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    private = {key for line in (out / "server_private_diagnostics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert tags and tags <= PUBLIC_ROUND_KEYS and not tags & (private - {"round", "update-skipped"})
    for tag in tags:
        recorded = {row["round"]: row[tag] for row in rows if isinstance(row.get(tag), float | int)}
        assert {event.step: event.value for event in events.Scalars(tag)} == pytest.approx(recorded)
        assert all(event.wall_time == event.step for event in events.Scalars(tag))  # no clock: no round durations
    tracker = TensorBoardTracker(board, "refused")
    with pytest.raises(NotPublicError, match="sampled"):
        tracker.record({**rows[-1], "sampled": 7})
    tracker.close()


def test_flowers_colour_codes_stay_out_of_the_logs(tmp_path):
    from dpfl.engines.local_federation import split_stream

    stream = io.BytesIO(b"\x1b[92mINFO \x1b[0m:      dpfl round 1/2 epsilon 1.0\n"
                        b"\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n")
    split_stream(stream, tmp_path / "flower.log", tmp_path / "server.log", tmp_path / "nodes.log")
    # The ServerApp's own line to the public log, Flower's to the server's: both as plain text.
    assert (tmp_path / "flower.log").read_bytes() == b"INFO :      dpfl round 1/2 epsilon 1.0\n"
    assert (tmp_path / "server.log").read_bytes() == b"INFO :      Starting Flower Simulation\n"
