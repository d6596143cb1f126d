"""Turn finished runs into a table and a figure: `python -m reptile.report <multirun dir> ...`.

Every job directory below the given directories that holds a `results.json` is one point. A job is
described by its config: `--x` and `--hue` name either a config group (`algorithm`, `dataset`,
`experiment`: the option chosen, e.g. `fomaml`), a dotted config key (`algorithm.inner_steps`) or
`job`, the job's directory below the given one (a multirun's `0`, `1`, ..., or a name you chose);
several keys may be joined with commas (`--hue algorithm,algorithm.tail_shots`). By default `--x`
and `--hue` are the first two overrides other than `seed` that differ between the jobs (`--hue
none`: no hue), and `--y` is the adapted score (`test/mse_after`, `test/acc`). Jobs that agree on
x and hue (e.g. different seeds) are averaged.
Writes `report.md` and `report.png` into the first directory and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Job:
    path: Path
    name: str  # the directory below the one searched: `--x job`
    config: DictConfig
    choices: dict[str, str]  # config group → chosen option
    overrides: dict[str, str]  # the command line's key=value pairs
    results: dict[str, float]

    def value(self, keys: str) -> str:
        return ", ".join(self._value(key) for key in keys.split(","))

    def _value(self, key: str) -> str:
        if key == "job":
            return self.name
        if key in self.choices:
            return str(self.choices[key])
        value = OmegaConf.select(self.config, key, default=None)
        return "n/a" if value is None else str(value)  # e.g. a knob only some algorithms have


class ReportError(ValueError):
    """The runs cannot be reported as asked."""


def load_job(results_path: Path, directory: Path) -> Job:
    path = results_path.parent
    hydra_dir = path / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise ReportError(f"{path}: no .hydra/config.yaml beside results.json")
    hydra = OmegaConf.load(hydra_dir / "hydra.yaml").hydra
    overrides = {}
    for item in OmegaConf.load(hydra_dir / "overrides.yaml"):
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return Job(
        path=path,
        name=path.relative_to(directory).as_posix() if path != directory else path.name,
        config=OmegaConf.load(hydra_dir / "config.yaml"),
        choices={key: str(value) for key, value in hydra.runtime.choices.items()},
        overrides=overrides,
        results=json.loads(results_path.read_text()),
    )


def find_jobs(directories: list[Path]) -> list[Job]:
    def job_order(path: Path) -> list[Any]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]

    found = sorted(
        ((p, directory) for directory in directories for p in directory.rglob("results.json")),
        key=lambda found: job_order(found[0]),
    )
    if not found:
        raise ReportError(f"no results.json under {', '.join(map(str, directories))}")
    return [load_job(path, directory) for path, directory in found]


def varying_overrides(jobs: list[Job]) -> list[str]:
    """Swept keys, in command-line order; seeds are repetitions to average, not a variable."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides if key != "seed"))
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def default_metric(jobs: list[Job]) -> str:
    """The adapted score: `*_after` (regression), else the first score (classification's `acc`)."""
    scores = [key for key in jobs[0].results if not key.endswith("_ci95")]
    if not scores:
        raise ReportError(f"no score in {jobs[0].path / 'results.json'}: pass --y")
    return next((key for key in scores if key.endswith("_after")), scores[0])


def ordered(values: list[str]) -> list[str]:
    """Numbers by value; anything else in order of first appearance (the sweep's order)."""
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


@dataclass(frozen=True)
class Cell:
    mean: float
    ci95: float  # the job's own ci95 over tasks when alone, else 1.96·s.e. over the jobs
    jobs: int


def cell(jobs: list[Job], metric: str) -> Cell:
    values = [job.results[metric] for job in jobs]
    if len(values) == 1:
        return Cell(values[0], jobs[0].results.get(f"{metric}_ci95", math.nan), 1)
    spread = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return Cell(statistics.fmean(values), spread, len(values))


def tabulate(jobs: list[Job], x: str | None, y: str, hue: str | None) -> dict:
    """{hue value: {x value: Cell}}, both in display order."""
    for job in jobs:
        if y not in job.results:
            raise ReportError(f"--y {y!r}: not in {job.path / 'results.json'}")
    for keys in filter(None, (x, hue)):
        for key in keys.split(","):
            if all(job._value(key) == "n/a" for job in jobs):
                raise ReportError(f"--x/--hue key {key!r}: not in the config of any job")
    x_of = {job.path: job.value(x) if x else y for job in jobs}
    hue_of = {job.path: job.value(hue) if hue else y for job in jobs}
    table = {}
    for hue_value in ordered([hue_of[job.path] for job in jobs]):
        row = {}
        for x_value in ordered([x_of[job.path] for job in jobs]):
            members = [
                job for job in jobs if x_of[job.path] == x_value and hue_of[job.path] == hue_value
            ]
            if members:
                row[x_value] = cell(members, y)
        table[hue_value] = row
    return table


def markdown(table: dict, x: str | None, y: str, hue: str | None) -> str:
    x_values = ordered([x_value for row in table.values() for x_value in row])
    corner = f"{x or ''} \\ {hue}" if hue else (x or "")
    lines = [
        f"{y} (mean ± 95% CI)",
        "",
        "| " + " | ".join([corner, *table]) + " |",
        "|" + "---|" * (len(table) + 1),
    ]
    for x_value in x_values:
        cells = []
        for row in table.values():
            c = row.get(x_value)
            text = "" if c is None else f"{c.mean:.4g} ± {c.ci95:.2g}"
            cells.append(text + (f" (n={c.jobs})" if c is not None and c.jobs > 1 else ""))
        lines.append("| " + " | ".join([x_value if x else y, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, x: str | None, y: str, hue: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_values = ordered([x_value for row in table.values() for x_value in row])
    numeric = all(_is_number(v) for v in x_values)
    position = {v: float(v) if numeric else i for i, v in enumerate(x_values)}
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for hue_value, row in table.items():
        xs = [position[v] for v in row]
        axis.errorbar(
            xs,
            [c.mean for c in row.values()],
            yerr=[0 if math.isnan(c.ci95) else c.ci95 for c in row.values()],
            marker="o",
            linestyle="-" if numeric else "none",  # categories are not a continuum
            capsize=3,
            label=hue_value if hue else None,
        )
    axis.set_xticks(list(position.values()), list(position))  # the swept values, no others
    axis.set_xlabel(x or "")
    axis.set_ylabel(y)
    if hue:
        axis.legend(title=hue, fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build(
    directories: list[Path], x: str | None = None, y: str | None = None, hue: str | None = None
) -> tuple[dict, str | None, str, str | None]:
    """The table of the runs under `directories`, with the x, y and hue it was made with."""
    jobs = find_jobs(directories)
    varying = varying_overrides(jobs)
    x = x or (varying[0] if varying else None)
    if hue is None:
        hue = next((key for key in varying if key != x), None)
    elif hue == "none":
        hue = None
    y = y or default_metric(jobs)
    return tabulate(jobs, x, y, hue), x, y, hue


def report(
    directories: list[Path], x: str | None = None, y: str | None = None, hue: str | None = None
) -> str:
    """Write report.md and report.png into `directories[0]`; returns the markdown."""
    table, x, y, hue = build(directories, x, y, hue)
    text = markdown(table, x, y, hue)
    out = directories[0]
    (out / "report.md").write_text(text)
    plot(table, x, y, hue, out / "report.png")
    return text


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reptile.report", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun (or run) directories")
    parser.add_argument("--x", help="config key or group, or job, on the x axis / table rows")
    parser.add_argument("--y", help="metric from results.json (default: the *_after score)")
    parser.add_argument(
        "--hue",
        help="config key or group, or job: one line / table column per value; none: no hue",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        text = report(args.dirs, args.x, args.y, args.hue)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"wrote {args.dirs[0] / 'report.md'} and {args.dirs[0] / 'report.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
