"""A sweep's summary: one row per job from the job directories, as summary.csv, summary.md, a rich table
and summary.png. Built from what the jobs wrote to disk (job.json, summary.json, metrics.csv), so it
works for any launcher (jobs in other processes or on other machines) and for a sweep that is partly
finished or was interrupted (`finetune summarize DIR`)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

from finetune.output.report import fonts_checked, subplots

JOB_FILE = "job.json"  # written when a job starts: its number and overrides
OBJECTIVE = "final_val_acc"  # what `train` returns to sweepers
FIELDS = ("job", "overrides", "status", "recipe", "final_val_acc", "best_val_acc", "final_val_loss", "wall_seconds",
          "images_per_s", "reason", "dir", "all_overrides")


LOCK = ".finetune-sweep.lock"  # the process that sweeps into the directory


def lock(sweep_dir: Path) -> int | None:
    """Take `sweep_dir` for this process: None when taken (also from a holder that no longer runs),
    else the live process that holds it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder != os.getpid():
                return holder
            path.unlink(missing_ok=True)  # a holder that ended without unlocking (killed)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return None
    return _holder(path)


def unlock(sweep_dir: Path) -> None:
    path = sweep_dir / LOCK
    if _holder(path) in (os.getpid(), None):
        path.unlink(missing_ok=True)


def _holder(path: Path) -> int | None:
    """The running process named in the lock file, or None."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)  # signal 0: only checks that the process exists
        return pid
    except (OSError, ValueError):
        return None


def write_job_file(job_dir: Path, num: int, overrides: Sequence[str]) -> None:
    """job.json: the job's number and overrides, and the process that runs it (a dead one is interrupted)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_FILE).write_text(json.dumps({"num": num, "overrides": list(overrides), "pid": os.getpid(),
                                                "host": socket.gethostname()}) + "\n")


PLAN_FILE = "sweep_jobs.json"  # in the sweep directory: every job the sweep will run, listed when it starts


def write_plan(sweep_dir: Path, jobs: list[list[str]]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PLAN_FILE).write_text(json.dumps({"jobs": jobs}) + "\n")


def job_status(job_dir: Path) -> str:
    """completed | failed | interrupted | running | incomplete (started, no epoch finished yet). A job whose
    summary says running (or that never reported) while its process is gone (killed with the sweep) is
    interrupted: a rerun of the sweep resumes it."""
    status = (read_json(job_dir / "summary.json") or {}).get("status", "incomplete")
    if status in ("running", "incomplete"):
        job = read_json(job_dir / JOB_FILE) or {}
        if job.get("pid") and job.get("host") == socket.gethostname() and not _alive(int(job["pid"])):
            return "interrupted"
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def rerun_action(job_dir: Path) -> str:
    """What a sweep run again into its directory does with a job directory that holds a run: keep a
    completed one (its result stands), resume one that stopped (interrupted, failed or killed: from its
    last checkpoint, or afresh without one), refuse one whose process still runs."""
    status = job_status(job_dir)
    if status == "completed":
        return "keep"
    job = read_json(job_dir / JOB_FILE) or {}
    if status == "running" and job.get("pid") != os.getpid():  # this process: the sweep that reruns it now
        return "refuse"
    from finetune.engine.checkpoint import LAST

    return "resume" if (job_dir / "checkpoints" / LAST).is_file() else "fresh"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short by a kill mid-write
        return None


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return [d for d in sweep_dir.iterdir()
            if d.is_dir() and ((d / JOB_FILE).is_file() or (d / "summary.json").is_file())]


def _overrides(job_dir: Path, job: dict | None) -> list[str]:
    if job is not None:
        return job["overrides"]
    hydra_file = job_dir / ".hydra" / "overrides.yaml"  # a job directory from before job.json existed
    if hydra_file.is_file():
        from omegaconf import OmegaConf

        return list(OmegaConf.load(hydra_file))
    return []


def _job_number(job_dir: Path, job: dict | None) -> int | None:
    if job is not None:
        return job["num"]
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory, sorted by the objective (best first); failed and unfinished jobs last.
    `swept` overrides (the keys whose values differ between jobs) are in `overrides`, all of them in
    `all_overrides`."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job_dir in _job_dirs(sweep_dir):
        job = read_json(job_dir / JOB_FILE)
        summary = read_json(job_dir / "summary.json") or {}
        status = job_status(job_dir)
        rows.append({
            "job": _job_number(job_dir, job), "all_overrides": _overrides(job_dir, job), "status": status,
            "recipe": recipe_cell(summary),
            **{k: summary.get(k) for k in ("final_val_acc", "best_val_acc", "final_val_loss", "wall_seconds")},
            "images_per_s": summary.get("train_images_per_second"), "reason": summary.get("reason", ""),
            "dir": job_dir.name, "trace": _digest(job_dir / "lr_trace.csv"),
            # best_metric's choice in the job (val_acc, val_map, val_loss...): what the summary ranks by
            "best_metric": (summary.get("best") or {}).get("metric"), "best_value": (summary.get("best") or {}).get("value"),
        })
    started = {row["job"] for row in rows}
    planned = (read_json(sweep_dir / PLAN_FILE) or {}).get("jobs", [])
    rows += [{"job": num, "all_overrides": overrides, "status": "not started", "recipe": "", "final_val_acc": None,
              "best_val_acc": None, "final_val_loss": None, "wall_seconds": None, "images_per_s": None,
              "reason": "", "dir": "", "trace": None, "best_metric": None, "best_value": None}
             for num, overrides in enumerate(planned) if num not in started]
    swept = swept_keys(rows)
    for row in rows:
        row["overrides"] = [o for o in row["all_overrides"] if _key(o) in swept]

    def order(row):
        """Completed jobs first, best by their best_metric (its direction: losses down), else by the final val
        accuracy; then the others by job number."""
        value = row["best_value"] if row.get("best_value") is not None else row[OBJECTIVE]
        done = row["status"] == "completed" and value is not None and math.isfinite(value)
        up = not str(row.get("best_metric") or "").endswith("loss")
        return (not done, -(value if up else -value) if done else 0.0, row["job"] if row["job"] is not None else 1 << 30)

    return sorted(rows, key=order)


def _digest(path: Path) -> str | None:
    """A hash of a job's LR trace: every group's LR and trainability at every step."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def identical(rows: Sequence[dict]) -> list[list[int]]:
    """Jobs (by number) that trained the same plan: their LR traces (every group's LR and freeze state at
    every step) are equal, so different overrides changed nothing they computed (`-m unfreeze=1,all
    epochs=1` under lp_ft: the head alone trains in both)."""
    same: dict[str, list[int]] = {}
    for row in rows:
        if row.get("trace") and row["status"] == "completed":
            same.setdefault(row["trace"], []).append(row["job"])
    return [sorted(jobs) for jobs in same.values() if len(jobs) > 1]


def recipe_cell(summary: dict) -> str:
    """The recipe a job trained: under experiment=auto its choice, marked (each job probes its own data
    and length, so jobs of one sweep may differ); none; "" before the job said."""
    if "recipe" not in summary:
        return ""
    recipe = summary["recipe"]
    if recipe is None:
        return "none"
    return f"{recipe['name']} (auto)" if recipe.get("auto") else recipe["name"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def swept_keys(rows: Sequence[dict]) -> list[str]:
    """The override keys whose values differ between jobs (or that some jobs lack), in first-seen order."""
    seen: dict[str, set] = {}
    for row in rows:
        for o in row["all_overrides"]:
            seen.setdefault(_key(o), set())
    for row in rows:
        values = {_key(o): _value(o) for o in row["all_overrides"]}
        for key in seen:
            seen[key].add(values.get(key))
    return [k for k, values in seen.items() if len(values) > 1]


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


# the table's columns (summary.md and the terminal): field, header, decimals
TABLE = (("job", "job", 0), ("overrides", "overrides", 0), ("status", "status", 0), ("recipe", "recipe", 0),
         ("final_val_acc", "val acc", 4), ("best_val_acc", "best val acc", 4), ("final_val_loss", "val loss", 4),
         ("wall_seconds", "s", 1), ("images_per_s", "img/s", 0), ("reason", "reason", 0))


def _short(override: str) -> str:
    """lr=0.00044303752452182633 (an optuna trial) as lr=0.000443."""
    number = _number(_value(override))
    if number is None or len(_value(override)) <= 8:
        return override
    return f"{override.split('=', 1)[0]}={number:.3g}"


def _cells(row: dict) -> list[str]:
    return [" ".join(map(_short, row[field])) if field == "overrides" else _cell(row[field], digits)
            for field, _, digits in TABLE]


def write_summary(sweep_dir: str | Path, rows: Sequence[dict]) -> list[Path]:
    """summary.csv (every field), summary.md (the table) and summary.png in the sweep directory."""
    sweep_dir = Path(sweep_dir)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) if isinstance(row[k], list) else row[k] for k in FIELDS})
    lines = ["| " + " | ".join(header for _, header, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    notes = [f"\nJobs {', '.join(map(str, jobs))} trained the same plan (equal LR traces for every group): "
             "their overrides changed nothing these runs computed.\n" for jobs in identical(rows)]
    (sweep_dir / "summary.md").write_text(f"# sweep {sweep_dir.name}: {failure_line(rows)}\n\n"
                                          + "\n".join(lines) + "\n" + "".join(notes))
    paths = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    if plot_summary(sweep_dir / "summary.png", sweep_dir, rows):
        paths.append(sweep_dir / "summary.png")
    return paths


def print_table(rows: Sequence[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for field, header, _ in TABLE:
        table.add_column(header, justify="left" if field in ("overrides", "status", "reason") else "right",
                         no_wrap=field not in ("overrides", "reason"))
    style = {"completed": None, "failed": "red"}
    for row in rows:
        table.add_row(*_cells(row), style=style.get(row["status"], "yellow"))
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file or pipe: wide enough for a row per line
        console = Console(stderr=True, width=160)
    console.print(table)


def failed(rows: Sequence[dict]) -> int:
    return sum(row["status"] != "completed" for row in rows)


def failure_line(rows: Sequence[dict]) -> str:
    bad = [r for r in rows if r["status"] != "completed"]
    if not bad:
        return f"all {len(rows)} jobs completed"
    kinds = sorted({r["status"] for r in bad})
    return f"{len(bad)} of {len(rows)} jobs did not complete ({', '.join(kinds)})"


def _val_acc_curve(job_dir: Path) -> list[float]:
    try:
        with open(job_dir / "metrics.csv") as f:
            return [float(r["val_acc"]) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return []


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@fonts_checked
def plot_summary(path: Path, sweep_dir: Path, rows: Sequence[dict]) -> bool:
    """summary.png (summary_figure); False when no job has finished an epoch (nothing to draw)."""
    fig = summary_figure(sweep_dir, rows)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


def summary_figure(sweep_dir: Path, rows: Sequence[dict]):
    """Every job's val acc per epoch (one bar per job when each trained one epoch); beside it, when one
    numeric key is swept, the objective against it. None when no job has finished an epoch."""
    curves = {row["dir"]: _val_acc_curve(sweep_dir / row["dir"]) for row in rows}
    if not any(curves.values()):
        return None
    from matplotlib.ticker import MaxNLocator

    swept = swept_keys(rows)
    points = []
    if len(swept) == 1:  # and every value of it a number (unfreeze=1,3,all is not)
        xs = [next((_number(_value(o)) for o in row["all_overrides"] if _key(o) == swept[0]), None) for row in rows]
        if None not in xs:
            points = [(x, row[OBJECTIVE]) for x, row in zip(xs, rows)
                      if row["status"] == "completed" and row[OBJECTIVE] is not None]
    fig, axes = subplots(1, 2 if points else 1, figsize=(12 if points else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    same = {job: jobs[0] for jobs in identical(rows) for job in jobs[1:]}  # a job -> the first job it repeats
    ordered = [row for row in sorted(rows, key=lambda r: (r["job"] is None, r["job"])) if curves[row["dir"]]]

    def label(row) -> str:
        text = f"{row['job']}: {' '.join(map(_short, row['overrides'])) or row['dir']}"[:60]
        if row["job"] in same:
            text += f" (= job {same[row['job']]}'s plan)"
        return text + ("" if row["status"] == "completed" else f" ({row['status']})")

    if max(len(curves[row["dir"]]) for row in ordered) == 1:  # one epoch each: one bar per job, not a dot per job
        ax.barh(range(len(ordered)), [curves[row["dir"]][0] for row in ordered],
                color=["0.6" if row["job"] in same else "C0" for row in ordered])
        ax.set_yticks(range(len(ordered)), [label(row) for row in ordered], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("val acc after epoch 0")
        ax.set_title(f"val acc, {len(rows)} jobs of one epoch")
    else:
        for row in ordered:
            curve = curves[row["dir"]]
            ax.plot(range(len(curve)), curve, marker="o", markersize=3,
                    linestyle="-" if row["status"] == "completed" else ":", label=label(row))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("val acc")
        ax.set_title(f"val acc per epoch, {len(rows)} jobs")
        ax.legend(fontsize=7)
    if points:
        ax = axes[0][1]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if all(p[0] > 0 for p in points) and max(p[0] for p in points) / min(p[0] for p in points) >= 10:
            ax.set_xscale("log")
        xs = sorted({p[0] for p in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the swept values themselves, not log-scale minor labels
        ax.minorticks_off()
        ax.set_xlabel(swept[0])
        ax.set_ylabel(OBJECTIVE)
        ax.set_title(f"{OBJECTIVE} against {swept[0]}")
    fig.tight_layout()
    return fig


def summarize(sweep_dir: str | Path, *, show: bool = True) -> list[dict]:
    """Collect, write the three files, print the table; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:  # not a sweep directory (or no job started): nothing to write
        return rows
    write_summary(sweep_dir, rows)
    if show:
        print_table(rows, f"sweep {sweep_dir}: {failure_line(rows)}")
        for jobs in identical(rows):
            print(f"finetune: jobs {', '.join(map(str, jobs))} trained the same plan (equal LR traces): their "
                  "overrides changed nothing these runs computed", file=sys.stderr)
    return rows
