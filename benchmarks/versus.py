"""The project's training step in two checkouts, side by side: is this one faster or slower?

    git worktree add /tmp/before <commit>
    python benchmarks/versus.py /tmp/before [--only sine] [--compile] [--rounds 3] [--threads 1]

Each round measures the step rates of the selected settings (benchmark.py's, random data of their
shapes) once in a fresh process per checkout, the two checkouts alternating, so that both see the
same machine load; the table gives the medians over rounds and their ratio. A checkout is measured
with its own `src/` and its own benchmark.py. With `--compile` the step is `algorithm.compile=true`
(set TORCHINDUCTOR_CACHE_DIR to one folder so that only the first round compiles cold).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(tree: Path, only: str, compile: bool, steps: int) -> dict[str, float]:
    """Meta-iterations/s of every setting whose name contains `only`, in this process."""
    sys.path.insert(0, str(tree / "src"))
    spec = importlib.util.spec_from_file_location("benchmark", tree / "benchmarks/benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = benchmark  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    import torch

    cpu, rates = torch.device("cpu"), {}
    for setting in [s for s in benchmark.SETTINGS if only in s.name]:
        learner = benchmark.project_learner(setting, cpu, compile=compile)
        step = benchmark.project_step(learner, torch.optim.SGD(learner.parameters(), lr=1.0))
        tasks = benchmark.random_tasks(setting, 2, cpu)
        for _ in range(3):  # compiled, Adam's second graph comes on the second call
            step(tasks[0])
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(steps):
                step(tasks[1])
            times.append((time.perf_counter() - start) / steps)
        rates[f"{setting.name} ({setting.inner_optimizer})"] = 1 / statistics.median(times)
    return rates


def rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other checkout")
    parser.add_argument("--only", default="sine", help="settings whose name contains this")
    parser.add_argument("--compile", action="store_true", help="algorithm.compile=true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="meta-iterations per timing")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child: one checkout, one round
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.measure, args.only, args.compile, args.steps)))
        return
    trees = {"this checkout": HERE, "before": args.before.resolve()}
    rates: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            command = [sys.executable, __file__, str(args.before), "--measure", str(tree)]
            command += ["--only", args.only, "--threads", str(args.threads)]
            command += ["--steps", str(args.steps)] + (["--compile"] if args.compile else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rates[name].append(json.loads(output.splitlines()[-1]))
    print("| setting | before (it/s) | this checkout (it/s) | ratio | each round: before → this |")
    print("|---|---|---|---|---|")
    for setting in rates["before"][0]:
        before = statistics.median(r[setting] for r in rates["before"])
        now = statistics.median(r[setting] for r in rates["this checkout"])
        pairs = zip(rates["before"], rates["this checkout"], strict=True)
        rounds = ", ".join(f"{rate(b[setting])} → {rate(t[setting])}" for b, t in pairs)
        print(f"| {setting} | {before:.1f} | {now:.1f} | {now / before:.2f}× | {rounds} |")


if __name__ == "__main__":
    main()
