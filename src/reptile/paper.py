"""The paper's tables, reproduced row by row: `python -m reptile.paper continue|table`.

`benchmarks/paper/rows.yaml` lists the training runs (one per dataset and way: the 1- and 5-shot
rows of the paper share their whole training configuration and differ only in evaluation) and the
table rows each one fills. Every run keeps, committed under `benchmarks/paper/<run>/`:
- `config.yaml`: the training configuration that decides its results (seed, algorithm, model, the
  task distribution, length, precision), resolved, without the machine's settings;
- `checkpoint.ckpt`: its latest checkpoint (about 1.4 MB for Omniglot), where it continues from;
- `curve.csv`: its validation curve; `run.json`: commits, hardware and wall times of every piece of
  training (and what stopped it) and evaluation; `results/<evaluation>.json`: the final scores.

    python -m reptile.paper continue omniglot_5w [--hours H] [override ...]

continues run `omniglot_5w` on whatever machine runs it (overrides say where the data is, how many
threads, which accelerator), from the newer of its committed checkpoint and the one in its working
directory `outputs/paper/<run>/`; it refuses, in one line, an override that changes what the run
computes. When training is complete it evaluates every listed evaluation. `--hours` stops training
after that long (SIGTERM: a checkpoint at the current meta-iteration), ready for the next machine;
a SIGTERM or Ctrl-C sent to it does the same, records the piece and exits with 143 or 130.

    python -m reptile.paper table

prints the paper-vs-ours tables rendered from the committed files; `python -m reptile.readme`
puts them into the README and benchmarks/paper/README.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reptile.cli import STOP_SIGNALS, emulated_bf16
from reptile.files import copy_atomically, write_atomically

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "benchmarks" / "paper"  # the committed runs
WORK = ROOT / "outputs" / "paper"  # their working directories (git-ignored)
# What decides a run's results: these groups and keys, less MACHINE. Everything else (where the
# data is, threads, devices, logging, checkpoint frequency, speed-only knobs that give the same
# results) may differ between the machines that train one run.
DECISIVE_GROUPS = ("seed", "algorithm", "model", "dataset")
DECISIVE_TRAINER = ("max_steps", "precision")
MACHINE = (
    "dataset.root",
    "dataset.cache_dir",
    "dataset.download",
    "dataset.num_workers",
    "dataset.eval_batch_tasks",
    "algorithm.backend",
    "algorithm.compile",
    "algorithm.eval_memory_mib",
)


class RowError(ValueError):
    """A run cannot be continued or reported as asked."""


class RunInterrupted(Exception):
    """A signal stopped a run's training (the piece up to its checkpoint is recorded) or one of
    its evaluations (scored again from the start by the next `continue`)."""

    def __init__(self, run: Run, signum: int, where: str, status: int) -> None:
        super().__init__(
            f"run {run.name} interrupted by {signal.Signals(signum).name} {where}; continue: "
            f"python -m reptile.paper continue {run.name}"
        )
        self.status = status


@dataclass(frozen=True)
class Run:
    """One training run of rows.yaml and the table rows its evaluations fill."""

    name: str
    train: list[str]  # train.py overrides of the run
    evaluations: dict[str, list[str]]  # evaluation name → train.py overrides on top of `train`
    rows: list[dict[str, Any]]  # {table, column, method, evaluation, metric, paper: [value, ci]}
    folder: Path  # its committed files
    work: Path  # its working directory

    @property
    def last_checkpoint(self) -> Path:
        return self.work / "checkpoints" / "last.ckpt"

    def results(self, evaluation: str) -> dict[str, float] | None:
        path = self.folder / "results" / f"{evaluation}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record(self) -> dict[str, Any]:
        path = self.folder / "run.json"
        return (
            json.loads(path.read_text()) if path.is_file() else {"training": [], "evaluation": {}}
        )


def load_runs(paper: Path = PAPER, work: Path = WORK) -> dict[str, Run]:
    spec = OmegaConf.to_container(OmegaConf.load(paper / "rows.yaml"))
    return {
        name: Run(
            name,
            entry["train"],
            entry.get("evaluations", {}),
            entry.get("rows", []),
            paper / name,
            work / name,
        )
        for name, entry in spec.items()
    }


# --- the configuration a run is held to ------------------------------------------------------


def compose(overrides: list[str]) -> DictConfig:
    """The config `python train.py <overrides>` composes (its output directory a placeholder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import reptile.cli  # noqa: F401  (registers the config's resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, "paths.output_dir=."])


def decisive_config(config: DictConfig) -> dict[str, Any]:
    """The resolved part of `config` that decides a run's results."""
    resolved = {
        group: OmegaConf.to_container(config[group], resolve=True)
        if group != "seed"
        else config.seed
        for group in DECISIVE_GROUPS
    }
    for key in MACHINE:
        group, leaf = key.split(".")
        resolved[group].pop(leaf, None)
    resolved["trainer"] = {key: config.trainer.get(key) for key in DECISIVE_TRAINER}
    return resolved


def first_difference(committed: Any, current: Any, key: str = "") -> str | None:
    """The first dotted key at which two configs differ, with both values; None if equal."""
    if isinstance(committed, dict) and isinstance(current, dict):
        for name in list(committed) + [k for k in current if k not in committed]:
            where = f"{key}.{name}" if key else name
            if name not in committed or name not in current:
                side = "the row has no" if name not in committed else "this command sets no"
                return f"{where}: {side} such key"
            found = first_difference(committed[name], current[name], where)
            if found:
                return found
        return None
    if committed != current:
        return f"{key}={current!r} differs from the run's {committed!r}"
    return None


def check_config(run: Run, composed: DictConfig) -> dict[str, Any]:
    """The decisive part of `composed` (the run's config with this machine's overrides), checked
    against the committed one."""
    current = decisive_config(composed)
    path = run.folder / "config.yaml"
    if path.is_file():
        committed = OmegaConf.to_container(OmegaConf.load(path))
        difference = first_difference(committed, current)
        if difference:
            raise RowError(
                f"run {run.name}: {difference} ({path}); a run continues only "
                "with its own config: start a new run in rows.yaml instead"
            )
    return current


# --- continuing a run ----------------------------------------------------------------------


def hardware(overrides: list[str]) -> str:
    """The machine, in words: CPU model and cores (or GPU), torch, the threads asked for."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()}-core {cpu}, torch {torch.__version__}"
    if torch.cuda.is_available() and not any("accelerator=cpu" in o for o in overrides):
        text = f"{torch.cuda.get_device_name()}, " + text
    threads = [o.split("=", 1)[1] for o in overrides if o.startswith("threads=")]
    return text + (f", {threads[-1]} thread(s)" if threads else "")


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "conf"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+changes" if dirty else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def global_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_point(run: Run) -> Path | None:
    """Seeds the working directory with the committed checkpoint unless its own is newer."""
    committed = run.folder / "checkpoint.ckpt"
    local = run.last_checkpoint
    if committed.is_file() and (not local.is_file() or global_step(local) < global_step(committed)):
        copy_atomically(committed, local)
    return local if local.is_file() else None


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def run_until(
    command: list[str], hours: float | None, log: Path
) -> tuple[int, int | None, str | None]:
    """Runs `command`, sending it SIGTERM after `hours`; its exit status, the SIGTERM or SIGINT
    sent to this process meanwhile (a scheduler's, Ctrl-C), if any, and what stopped it early
    (`--hours`, the signal's name; None: it ended by itself). Such a signal is passed on:
    train.py stops with a checkpoint, and this process records the piece after it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    expired = False

    def pass_on(signum: int, frame: Any) -> None:
        received.append(signum)
        process.send_signal(signum)  # train.py ignores a repeated one (Ctrl-C reaches both)

    with open(log, "a") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        handlers = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
        try:
            process.wait(timeout=None if hours is None else hours * 3600)
        except subprocess.TimeoutExpired:
            expired = True
            process.send_signal(signal.SIGTERM)
            process.wait()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    signum = received[0] if received else None
    stopped_by = signal.Signals(signum).name if signum else "--hours" if expired else None
    return process.returncode, signum, stopped_by


def validation_curve(run: Run) -> list[dict[str, str]]:
    """The validation rows of every CSV log of the run (one per resumed piece), by step."""
    rows: dict[int, dict[str, str]] = {}
    path = run.folder / "curve.csv"
    if path.is_file():
        with open(path, newline="") as file:
            rows.update({int(row["step"]): row for row in csv.DictReader(file)})
    for log in sorted((run.work).glob("csv/version_*/metrics.csv")):
        with open(log, newline="") as file:
            for row in csv.DictReader(file):
                values = {k: v for k, v in row.items() if k.startswith("val/") and v != ""}
                if values:
                    rows[int(row["step"]) + 1] = {"step": str(int(row["step"]) + 1), **values}
    return [rows[step] for step in sorted(rows)]


def save_curve(run: Run) -> None:
    rows = validation_curve(run)
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(run.folder / "curve.csv", text.getvalue().encode())


def save_record(run: Run, record: dict[str, Any]) -> None:
    write_atomically(run.folder / "run.json", (json.dumps(record, indent=2) + "\n").encode())


def continue_training(
    run: Run, overrides: list[str], config: dict[str, Any], hours: float | None
) -> bool:
    """Trains the run on from its resume point; True once it has reached its length."""
    max_steps = config["trainer"]["max_steps"]
    local = resume_point(run)
    start_step = global_step(local) if local else 0
    if start_step >= max_steps:
        return True
    command = train_command(
        [
            *run.train,
            *overrides,
            f"hydra.run.dir={run.work}",
            "ckpt_path=last",
            "test=false",
            "logger=csv",
        ]
    )
    # The code that trains is the checkout's at the start: commits made meanwhile do not count.
    started, began, code = now(), time.monotonic(), commit()
    status, interrupted, stopped_by = run_until(command, hours, run.work / "train.out")
    end = run.last_checkpoint
    end_step = global_step(end) if end.is_file() else start_step
    record = run.record()
    record["training"].append(
        {
            "commit": code,
            "hardware": hardware(overrides),
            "started": started,
            "seconds": round(time.monotonic() - began),
            "from_step": start_step,
            "to_step": end_step,
            "exit_status": status,  # 143 when stopped by SIGTERM, which --hours sends too
            "stopped_by": stopped_by,
        }
    )
    if end_step > start_step:
        copy_atomically(end, run.folder / "checkpoint.ckpt")
    save_curve(run)
    save_record(run, record)
    if interrupted is not None:
        where = f"at meta-iteration {end_step:,}, recorded in {run.folder}"
        raise RunInterrupted(run, interrupted, where, status)
    return end_step >= max_steps


def evaluate(run: Run, overrides: list[str]) -> None:
    """Scores the final checkpoint under every evaluation not scored yet."""
    checkpoint = run.folder / "checkpoint.ckpt"
    for name, extra in run.evaluations.items():
        if run.results(name) is not None:
            continue
        where = run.work / f"eval-{name}"
        command = train_command(
            [
                *run.train,
                *extra,
                *overrides,
                "train=false",
                f"ckpt_path={checkpoint}",
                f"hydra.run.dir={where}",
                "logger=none",
            ]
        )
        started, began, code = now(), time.monotonic(), commit()
        status, interrupted, _ = run_until(command, None, where / "eval.out")
        if interrupted is not None:
            raise RunInterrupted(run, interrupted, f"in evaluation {name}", status)
        if status != 0:
            raise RowError(f"run {run.name}: evaluation {name} failed (exit {status}; {where})")
        copy_atomically(where / "results.json", run.folder / "results" / f"{name}.json")
        record = run.record()
        record["evaluation"][name] = {
            "commit": code,
            "hardware": hardware(overrides),
            "started": started,
            "seconds": round(time.monotonic() - began),
            "overrides": extra,
        }
        save_record(run, record)


def continue_run(
    runs: dict[str, Run], name: str, overrides: list[str], hours: float | None
) -> None:
    if name not in runs:
        raise RowError(
            f"run {name!r}: expected one of {', '.join(runs)} (benchmarks/paper/rows.yaml)"
        )
    run = runs[name]
    composed = compose([*run.train, *overrides])
    config = check_config(run, composed)
    if not (run.folder / "config.yaml").is_file():
        yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        write_atomically(run.folder / "config.yaml", yaml.encode())
    slow = emulated_bf16(composed.trainer.precision, composed.trainer.get("accelerator", "auto"))
    if slow:  # the run pins its precision: say so before hours of it
        print(
            f"warning: run {name}: {slow}; continue it on a machine that has them", file=sys.stderr
        )
    if continue_training(run, overrides, config, hours):
        evaluate(run, overrides)


# --- the table -----------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def table_row(run: Run, row: dict[str, Any]) -> list[str]:
    paper, paper_ci = row["paper"]
    record = run.record()
    config = (
        OmegaConf.load(run.folder / "config.yaml")
        if (run.folder / "config.yaml").is_file()
        else None
    )
    planned = int(config.trainer.max_steps) if config is not None else None
    done = max((piece["to_step"] for piece in record["training"]), default=0)
    results = run.results(row["evaluation"])
    if results is None:
        ours = difference = "—"
    else:
        mean, ci = results[row["metric"]], results[f"{row['metric']}_ci95"]
        ours = f"{percent(mean)} ± {percent(ci)}"
        delta = 100 * mean - paper
        combined = math.hypot(100 * ci, paper_ci)
        difference = f"{delta:+.2f} ({abs(delta) / combined:.1f} CIs)"
    hardware = "; ".join(dict.fromkeys(piece["hardware"] for piece in record["training"])) or "—"
    training = sum(piece["seconds"] for piece in record["training"])
    length = f"{done:,} of {planned:,}" if planned else "—"
    if training:
        length += f" ({training / 3600:.1f} h)"
    return [
        row["method"],
        f"{paper:.2f} ± {paper_ci:.2f}",
        ours,
        difference,
        length,
        run.name,
        hardware,
    ]


def render(runs: dict[str, Run]) -> str:
    """The paper-vs-ours tables, one per paper table, from the committed files."""
    tables: dict[str, list[tuple[Run, dict[str, Any]]]] = {}
    for run in runs.values():
        for row in run.rows:
            tables.setdefault(row["table"], []).append((run, row))
    header = ["method", "paper", "ours", "ours − paper", "meta-iterations", "run", "hardware"]
    lines = []
    for title, rows in tables.items():
        lines += [
            f"#### {title}",
            "",
            "| setting | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        for run, row in rows:
            lines.append("| " + " | ".join([row["column"], *table_row(run, row)]) + " |")
        lines.append("")
    lines.append(
        "± is the 95 % confidence interval over 10,000 test tasks (the paper's as it reports "
        'them); "ours − paper" is in points, and in units of the two intervals combined. The '
        "rows of one run share one training; only their evaluation differs."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reptile.paper",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--paper", type=Path, default=PAPER, help="the committed runs")
    parser.add_argument("--work", type=Path, default=WORK, help="their working directories")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("continue", help="train a run on from its checkpoint, then evaluate")
    go.add_argument("run")
    go.add_argument("--hours", type=float, help="stop training after this long (resumable)")
    go.add_argument(
        "overrides", nargs="*", help="machine settings, e.g. paths.data_dir=... threads=2"
    )
    commands.add_parser("table", help="print the tables rendered from the committed files")
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            print(render(load_runs(args.paper, args.work)), end="")
            return 0
        continue_run(load_runs(args.paper, args.work), args.run, args.overrides, args.hours)
    except RowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as error:
        print(error, file=sys.stderr)
        return error.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
