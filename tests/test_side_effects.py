"""Importing finetune or calling it leaves the process as it was: pyplot's backend and figures, other
modules' compiled graphs, the logger's level."""

from __future__ import annotations

import logging
import subprocess
import sys

import torch
from helpers import SixGroupNet, batches, make_cfg, make_trainer

from finetune.output import report


def test_importing_finetune_loads_nothing_heavy():
    code = "import sys, finetune; print(any(m in sys.modules for m in ('torch', 'matplotlib', 'hydra')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plots_leave_pyplots_backend_and_figures_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("svg")  # a user's choice, e.g. a notebook's inline backend
    try:
        rows = [{"step": i, "epoch": 0, "group": "head", "lr": 0.1, "momentum": 0.9, "trainable": 1} for i in range(4)]
        report.plot_lr_trace(tmp_path / "lr.png", rows, ["head"], 4)
        report.plot_confusion(tmp_path / "cm.png", [[3, 1], [0, 4]], ["a", "b"])
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
        assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use("agg")


def test_a_freeze_change_keeps_other_compiled_graphs():
    """Each freeze state gets its graph beside the others (no process-wide reset of dynamo's caches): a
    module compiled elsewhere in the process is not compiled again."""
    counts = []

    def counting_backend(gm, inputs):
        counts.append(1)
        return gm.forward

    other = torch.compile(torch.nn.Linear(4, 2), backend=counting_backend)
    x = torch.randn(3, 4)
    other(x)
    assert len(counts) == 1
    cfg = make_cfg(epochs=2, lr=0.05, unfreeze="all", compile=True,
                   **{"freeze.kind": "fine_tune", "schedule.kind": "constant", "optimizer.name": "sgd"})
    trainer = make_trainer(SixGroupNet(), cfg, 1)
    trainer.compile_backend = "aot_eager"
    (images, labels), = batches(1)
    for epoch in range(2):
        assert trainer.set_epoch(epoch)
        trainer.step(images, labels, epoch)
    other(x)
    assert len(counts) == 1  # its graph survived both freeze changes


def test_the_command_line_puts_the_loggers_level_back(monkeypatch, tmp_path, capsys):
    from tiny_runs import QUIET, TINY, run_cli

    from finetune.engine import distributed

    log = logging.getLogger("finetune")
    log.setLevel(logging.INFO)
    # a non-zero rank's view of the world, without a process group: it quiets its log while it runs
    world = distributed.World(rank=1, size=2, local_rank=1)
    monkeypatch.setattr(distributed, "from_env", lambda: world)
    monkeypatch.setattr(distributed, "init", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "broadcast", lambda value: value)
    quiet = []
    monkeypatch.setattr("finetune.commands.train.train", lambda cfg, out_dir, **kw: quiet.append(log.level) or {
        "final_val_acc": 1.0})
    code, err = run_cli(capsys, "train", *TINY, "experiment=lp_ft", "epochs=1", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert quiet == [logging.ERROR] and log.level == logging.INFO


def test_eval_on_the_command_line_leaves_the_root_logger_alone(tmp_path, capsys):
    from tiny_runs import QUIET, TINY, run_cli

    code, err = run_cli(capsys, "train", *TINY, "experiment=lp_ft", "epochs=1", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    handlers = list(logging.getLogger().handlers)
    code, err = run_cli(capsys, "eval", f"ckpt={tmp_path}", "num_workers=0")
    assert code == 0, err
    assert logging.getLogger().handlers == handlers and not logging.getLogger("finetune").handlers


def test_a_lost_process_under_torchrun_is_one_line_with_the_resume_command(monkeypatch, tmp_path, capsys):
    """What a surviving rank sees when another is killed: gloo's connection error in a collective. It says
    so in one line, naming the rank that died, with the command that resumes, and summary.json says failed,
    not running."""
    import json
    import os
    import socket
    import subprocess
    import time

    from tiny_runs import QUIET, TINY, run_cli

    from finetune.engine import distributed

    world = distributed.World(rank=0, size=2, local_rank=0)
    monkeypatch.setattr(distributed, "from_env", lambda: world)
    monkeypatch.setattr(distributed, "init", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "broadcast", lambda value: value)

    def lost(cfg, out_dir, on_start):
        on_start()  # the run had started
        (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: "
                           "Connection reset by peer")

    monkeypatch.setattr("finetune.commands.train.train", lost)
    # the roster init() gathers: rank 1's process on this node has ended (a zombie torchrun has not reaped yet)
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    time.sleep(0.2)
    monkeypatch.setattr(distributed, "_ROSTER", [(socket.gethostname(), os.getpid()),
                                                 (socket.gethostname(), dead.pid)])
    code, err = run_cli(capsys, "train", *TINY, "experiment=lp_ft", *QUIET, f"hydra.run.dir={tmp_path}")
    dead.wait()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "finetune: error: [rank 0] rank 1 of this run ended (its log or the scheduler says why); "
        "the last checkpoint stays: resume with: torchrun <the same options> -m finetune train ")
    assert f"resume={tmp_path}" in err[0]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    # reaped, or on another node
    assert distributed.lost_ranks([(socket.gethostname(), os.getpid()), (socket.gethostname(), dead.pid)]) == [1]
    assert distributed.lost_ranks([(socket.gethostname(), os.getpid()), ("node-b", 1)]) == []
    monkeypatch.setattr(distributed, "_ROSTER", [])
    code, err = run_cli(capsys, "train", *TINY, "experiment=lp_ft", "overwrite=true", *QUIET,
                        f"hydra.run.dir={tmp_path}")
    assert code == 2 and "[rank 0] another process of this run ended (its log" in err[0]


def test_groups_on_one_lr_curve_share_one_legend_entry():
    names = ["stem", *[f"blocks_{i}" for i in range(7)], "neck", "head"]
    trace = [{"step": s, "epoch": 0, "group": n, "lr": 1e-2 if n == "head" else 2e-4, "momentum": 0.9,
              "trainable": 1} for s in range(3) for n in names]
    assert [label for label, _ in report.lr_curves(trace, names)] == ["stem .. neck (9 groups)", "head"]
