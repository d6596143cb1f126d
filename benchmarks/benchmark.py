"""The project's training step against the per-task loop, and against the hardware's limit.

    python benchmarks/benchmark.py [--quick] [--out benchmarks/results-cpu.md]
    python benchmarks/benchmark.py --data-loading [--data-dir data] [--threads 1]

For every setting both implementations start from the same φ and run the same meta-batches,
alternating round by round so that load from other processes hits both alike. Before timing, the
run checks that one meta-iteration of each, from the same φ on the same tasks, reaches the same
φ (in float64; see `phi_difference` for why not float32). Reported:
- meta-iterations/s (median over the rounds) of the project's step and of the per-task loop;
- the ratio;
- peak memory of one meta-iteration (GPU: `max_memory_allocated`; CPU: the rise of the peak
  resident set size, measured in a fresh subprocess per setting);
- FLOP efficiency: FLOPs of one meta-iteration (`torch.utils.flop_counter`) × meta-iterations/s
  ÷ the FLOP/s of a large matrix product on the same device in the same run;
- for sine, also the project's step with `algorithm.compile=true` (timed after its warm-up; the
  cold compile time of that warm-up separately), which must reach the loop's φ after one
  meta-iteration to float32 tolerance (its float64 graph would be one more cold compile).
- with `--data-loading` instead, on the real datasets under `--data-dir` (Omniglot's archives,
  mini-imagenet.zip): meta-batches/s that the DataLoader delivers from the real `TrainTasks` with
  0, 1 and 2 workers, beside the training step's rate on those meta-batches and the rate of the
  step fed by one worker (as the presets run), so that one sees whether loading keeps up.
The project's step is what `MetaLearner.training_step` runs, built by the same classes:
`algorithm.meta_gradient` with the module's inner loop and carried state, then the outer
optimizer's step on p.grad (the all-reduce, logging and scheduler are left out: one process, ε
fixed). The baseline is the loop other libraries use: `copy.deepcopy` of the model per task, a
torch optimizer for the inner steps, then the interpolation φ ← φ + ε·mean(W − φ).
"""

from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import ctypes.util
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from reptile.algorithms import Reptile
from reptile.algorithms.base import Algorithm
from reptile.cli import has_bf16_units
from reptile.data.distribution import TaskDistribution
from reptile.data.miniimagenet import MiniImageNet
from reptile.data.omniglot import Omniglot
from reptile.data.tasks import InnerSchedule, Task
from reptile.lightning.module import MetaLearner
from reptile.models.conv4 import Conv4
from reptile.models.mlp import MLP

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # key of MODELS
    support: int  # samples per training task
    inner_batch: int
    inner_steps: int
    meta_batch: int
    inner_optimizer: str
    inner_lr: float
    algorithm: str = "reptile"


def mlp() -> nn.Module:
    return MLP()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (constructor, input shape, classes; 0 = regression)
    "mlp": (mlp, (1,), 0),
    "omniglot5": (lambda: Conv4(1, 5), (1, 28, 28), 5),
    "omniglot20": (lambda: Conv4(1, 20), (1, 28, 28), 20),
    "miniimagenet5": (
        lambda: Conv4(3, 5, hidden=32, stride=1, max_pool=True, image_size=84),
        (3, 84, 84),
        5,
    ),
}

# The paper's hyperparameters (reference/reptile-paper.md); sine as conf/experiment/sine.yaml.
BASE = [
    Setting("sine", "mlp", 10, 10, 5, 5, "sgd", 0.02),
    Setting("sine, 10 tasks × 32 steps", "mlp", 10, 10, 32, 10, "sgd", 0.02),
    Setting("Omniglot 5-way", "omniglot5", 50, 10, 5, 5, "sgd", 1e-3),
    Setting("Omniglot 20-way", "omniglot20", 200, 20, 10, 5, "sgd", 5e-4),
    Setting("Mini-ImageNet 5-way", "miniimagenet5", 75, 10, 8, 5, "sgd", 1e-3),
]
SETTINGS = [replace(s, inner_optimizer=o) for s in BASE for o in ("sgd", "adam")]


# torch.compile pays off where dispatch dominates (the sine MLP); a Conv4 graph takes minutes.
COMPILED_MODELS = ("mlp",)


def make_algorithm(setting: Setting, compile: bool = False) -> Algorithm:
    kwargs = dict(
        compile=compile,
        inner_steps=setting.inner_steps,
        inner_batch_size=setting.inner_batch,
        inner_lr=setting.inner_lr,
        inner_optimizer=setting.inner_optimizer,
        meta_lr=1.0,
    )
    if setting.algorithm != "reptile":  # FOMAML, MAML: where this checkout has them
        module = importlib.import_module(f"reptile.algorithms.{setting.algorithm}")
        return getattr(module, setting.algorithm.upper())(**kwargs)
    return Reptile(**kwargs)


def random_tasks(setting: Setting, rounds: int, device: torch.device) -> list[Task]:
    """`rounds` meta-batches of random data of the setting's shapes, with inner mini-batches."""
    _, shape, classes = MODELS[setting.model]
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(rounds):
        n, size = setting.meta_batch, setting.support
        inputs = torch.rand(n, size, *shape, generator=generator)
        if classes:
            targets = torch.arange(size).remainder(classes).expand(n, size).clone()
        else:
            targets = torch.randn(n, size, 1, generator=generator)
        order = torch.stack(
            [torch.randperm(size, generator=generator) for _ in range(n * setting.inner_steps)]
        )
        index = order[:, : setting.inner_batch].view(n, setting.inner_steps, -1)
        task = {"support_inputs": inputs, "support_targets": targets, "batch_index": index}
        tasks.append({key: value.to(device) for key, value in task.items()})
    return tasks


def project_learner(setting: Setting, device: torch.device, compile: bool = False) -> MetaLearner:
    torch.manual_seed(0)
    model = MODELS[setting.model][0]().to(device)
    loss = "cross_entropy" if MODELS[setting.model][2] else "mse"
    return MetaLearner(model, make_algorithm(setting, compile), loss=loss)


def project_step(learner: MetaLearner, outer: torch.optim.Optimizer) -> Callable[[Task], None]:
    def step(task: Task) -> None:
        result = learner.algorithm.meta_step(
            learner.inner, learner.meta_parameters(), learner.inner_state, task
        )
        if result.state is not None:
            learner.inner_state = result.state
        learner.descend(result.gradient, outer)

    return step


def loop_step(model: nn.Module, setting: Setting) -> Callable[[Task], None]:
    """Deep copy per task, a torch optimizer, copy back: φ ← φ + ε·mean(W − φ), ε = 1."""
    loss_fn = F.cross_entropy if MODELS[setting.model][2] else F.mse_loss
    carried: dict[str, dict[str, torch.Tensor]] = {}  # Adam's moments, averaged over tasks

    def step(task: Task) -> None:
        adapted, states = [], []
        for i in range(len(task["support_targets"])):
            clone = copy.deepcopy(model)
            params = list(clone.parameters())
            if setting.inner_optimizer == "adam":
                optimizer = torch.optim.Adam(params, lr=setting.inner_lr, betas=(0.0, 0.999))
                for p, (name, _) in zip(params, clone.named_parameters(), strict=True):
                    if name in carried:
                        optimizer.state[p] = {k: v.clone() for k, v in carried[name].items()}
            else:
                optimizer = torch.optim.SGD(params, lr=setting.inner_lr)
            for s in range(setting.inner_steps):
                batch = task["batch_index"][i, s]
                optimizer.zero_grad()
                loss = loss_fn(
                    clone(task["support_inputs"][i][batch]), task["support_targets"][i][batch]
                )
                loss.backward()
                optimizer.step()
            adapted.append(dict(clone.named_parameters()))
            if setting.inner_optimizer == "adam":
                states.append({n: optimizer.state[p] for n, p in clone.named_parameters()})
        with torch.no_grad():
            for name, p in model.named_parameters():
                p += torch.stack([w[name] for w in adapted]).mean(0) - p
        for name in states[0] if states else ():
            carried[name] = {
                k: torch.stack([s[name][k] for s in states]).mean(0) for k in states[0][name]
            }

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast_bf16(step: Callable[[Task], None], device: torch.device) -> Callable[[Task], None]:
    """`step` as Lightning runs it under trainer.precision=bf16-mixed."""

    def run(task: Task) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step(task)

    return run


def timed(step: Callable[[Task], None], task: Task, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(task)
    synchronize(device)
    return time.perf_counter() - start


def matmul_flops(device: torch.device) -> float:
    """FLOP/s of a large float32 matrix product: the hardware's practical peak."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = [timed(lambda _: a @ b, {}, device) for _ in range(7)]
    return 2 * n**3 / statistics.median(times[2:])


def count_flops(step: Callable[[Task], None], task: Task) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step(task)
    return counter.get_total_flops()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampled_peak(step: Callable[[Task], None], task: Task) -> int:
    """Peak resident set size during `step` over the size before it, sampled every 0.2 ms (the
    kernels release the GIL, so the sampler runs during them)."""
    before, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step(task)
    done.set()
    sampler.join()
    return max(peak[0], resident_bytes()) - before


def peak_mib(step: Callable[[Task], None], task: Task, device: torch.device) -> float:
    """Peak memory (MiB) that `step` adds: allocated on a GPU, the resident set on the CPU."""
    if device.type != "cuda":
        return sampled_peak(step, task) / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(task)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_memory_here(setting: Setting, device: torch.device, loop: bool) -> dict[str, float]:
    """Peak memory (MiB) that one meta-iteration adds, for the project's step (and the loop)."""
    if device.type == "cpu":
        # Every block of 64 KiB or more straight from the OS and back on free, so the resident
        # set follows the live tensors (glibc otherwise keeps freed blocks, and raises the bar).
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    task = random_tasks(setting, 1, device)[0]
    learner = project_learner(setting, device)
    outer = learner.algorithm.make_outer_optimizer(list(learner.model.parameters()))
    steps = {"project": project_step(learner, outer)}
    if loop:
        steps["loop"] = loop_step(learner.model, setting)
    peaks = {}
    for which, step in steps.items():
        step(task)  # warm-up: one-time allocations are not the step's
        peaks[which] = peak_mib(step, task, device)
    return peaks


def in_fresh_process(probe: dict) -> dict[str, float]:
    """`--memory-probe` in a fresh process, whose heap holds nothing of the other settings."""
    threads = str(torch.get_num_threads())
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", json.dumps(probe), "--threads", threads],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(setting: Setting, device: torch.device, loop: bool = True) -> dict[str, float]:
    """Peak memory of one meta-iteration; on CPU in a fresh process."""
    if device.type == "cuda":
        return peak_memory_here(setting, device, loop)
    return in_fresh_process({"setting": setting.__dict__, "loop": loop})


# Evaluation batches as the presets score them: model, shots, eval batch size (ways from the model).
EVALUATIONS = {
    "Omniglot 5-way 1-shot": ("omniglot5", 1, 5),
    "Omniglot 20-way 1-shot": ("omniglot20", 1, 10),
    "Mini-ImageNet 5-way 5-shot": ("miniimagenet5", 5, 15),
}


def evaluation_peak_here(name: str, tasks: int, device: torch.device) -> dict[str, float]:
    """Peak memory (MiB) of scoring one DataLoader batch of `tasks` evaluation tasks as the
    Lightning module does (both query modes, within `algorithm.eval_memory_mib`), and how many
    tasks the budget adapts at once. Two inner steps: no graph outlives a step, so more steps
    take the same memory."""
    if device.type == "cpu":
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    model_key, shots, batch = EVALUATIONS[name]
    build, shape, ways = MODELS[model_key]
    torch.manual_seed(0)
    algorithm = Reptile(eval_inner_steps=2, eval_batch_size=batch)
    learner = MetaLearner(build().to(device), algorithm, loss="cross_entropy", score_after="acc")
    support = ways * shots
    index = torch.stack([torch.randperm(support)[: min(batch, support)] for _ in range(tasks * 2)])
    task = {
        "support_inputs": torch.rand(tasks, support, *shape),
        "support_targets": torch.arange(ways).repeat_interleave(shots).expand(tasks, support),
        "query_inputs": torch.rand(tasks, ways, *shape),
        "query_targets": torch.arange(ways).expand(tasks, ways),
        "batch_index": index.view(tasks, 2, -1),
    }
    task = {key: value.to(device) for key, value in task.items()}
    per_task = learner.inner.evaluation_bytes(task, batch, non_transductive=True)
    at_once = min(tasks, max(1, algorithm.eval_memory_bytes(device) // per_task))

    def evaluate(task: Task) -> None:
        with torch.no_grad():
            learner.evaluation_step(task)

    return {"mib": peak_mib(evaluate, task, device), "at_once": at_once}


def evaluation_memory_table(device: torch.device, tasks: int = 100) -> list[str]:
    """Peak memory of one evaluation batch per dataset (the default dataset.eval_batch_tasks)."""
    lines = [
        f"| evaluation ({tasks} tasks a batch) | tasks adapted at once | peak memory (MiB) |",
        "|---|---|---|",
    ]
    for name in EVALUATIONS:
        if device.type == "cuda":
            peak = evaluation_peak_here(name, tasks, device)
        else:
            peak = in_fresh_process({"evaluation": name, "tasks": tasks})
        lines.append(f"| {name} | {peak['at_once']} | {peak['mib']:.0f} |")
    return lines


@dataclass
class Result:
    setting: Setting
    project: float  # meta-iterations/s
    loop: float
    flops: int
    project_mib: float
    loop_mib: float
    max_error: float
    bf16: float = float(
        "nan"
    )  # meta-iterations/s under bf16 autocast (trainer.precision=bf16-mixed)
    compiled: float = float("nan")  # meta-iterations/s with algorithm.compile=true
    compile_seconds: float = float("nan")  # its cold warm-up
    compiled_error: float = float("nan")  # max |Δφ| / max |φ| against the loop, 1 it. float32


def cell(value: float, spec: str, unit: str = "") -> str:
    """A table cell; — where the path was not measured (no compiled model, no bf16 units)."""
    return "—" if math.isnan(value) else f"{value:{spec}}{unit}"


def phi_difference(setting: Setting, task: Task, device: torch.device) -> float:
    """max |Δφ| / max |φ| after one meta-iteration of both from the same φ on the same tasks,
    in float64. In float32 the paths differ by rounding (different kernels), which Adam turns
    into whole steps: its first steps are about lr·sign(g), and a few gradient entries are pure
    rounding noise (sums that batch norm makes zero); from there the runs drift apart, vmap
    against the loop too. In float64 the same code must agree to many digits."""
    learner = project_learner(setting, device)
    learner.model.double()
    baseline = copy.deepcopy(learner.model)
    outer = learner.algorithm.make_outer_optimizer(list(learner.model.parameters()))
    task = {k: v.double() if v.is_floating_point() else v for k, v in task.items()}
    project_step(learner, outer)(task)
    loop_step(baseline, setting)(task)
    pairs = list(zip(learner.model.parameters(), baseline.parameters(), strict=True))
    scale = max(q.abs().max().item() for _, q in pairs)
    return max((p - q).abs().max().item() for p, q in pairs) / scale


def compare(setting: Setting, rounds: int, device: torch.device, memory: bool) -> Result:
    tasks = random_tasks(setting, rounds + 1, device)
    error = phi_difference(setting, tasks[0], device)
    if error > 1e-9:
        raise AssertionError(f"{setting.name}: φ differs from the per-task loop's by {error:.2e}")
    learner = project_learner(setting, device)
    baseline = copy.deepcopy(learner.model)
    learners = {"project": learner}
    if setting.model in COMPILED_MODELS:
        learners["compiled"] = compiled = project_learner(setting, device, compile=True)
    steps = {
        which: project_step(
            each, each.algorithm.make_outer_optimizer(list(each.model.parameters()))
        )
        for which, each in learners.items()
    }
    if has_bf16_units(device.type):
        steps["bf16"] = autocast_bf16(steps["project"], device)
    steps["loop"] = loop_step(baseline, setting)
    # Two warm-up meta-iterations: with Adam the compiled step compiles once more on its second
    # call (the carried step count turns symbolic), and neither compile may be timed. The
    # compiled φ is checked after the first: over many meta-iterations float32 rounding grows
    # (ε = 1, Adam) until even the uncompiled step and the loop differ in the first digit.
    warm_up = {which: timed(step, tasks[0], device) for which, step in steps.items()}
    compiled_stats = {}
    if "compiled" in steps:
        pairs = list(zip(compiled.model.parameters(), baseline.parameters(), strict=True))
        scale = max(q.abs().max().item() for _, q in pairs)
        compiled_error = max((p - q).abs().max().item() for p, q in pairs) / scale
        if compiled_error > 1e-4:
            raise AssertionError(
                f"{setting.name}: compiled φ differs from the per-task loop's by "
                f"{compiled_error:.2e}"
            )
    for which, step in steps.items():
        warm_up[which] += timed(step, tasks[0], device)
    times: dict[str, list[float]] = {which: [] for which in steps}
    for task in tasks[1:]:
        for which, step in steps.items():
            times[which].append(timed(step, task, device))
    if "compiled" in steps:
        compiled_stats = dict(
            compiled=1 / statistics.median(times["compiled"]),
            compile_seconds=warm_up["compiled"],
            compiled_error=compiled_error,
        )
    bf16 = 1 / statistics.median(times["bf16"]) if "bf16" in times else float("nan")
    flops = count_flops(steps["loop"], tasks[0])  # the textbook computation: what both must do
    nan = float("nan")
    mib = peak_memory(setting, device) if memory else {"project": nan, "loop": nan}
    return Result(
        setting,
        1 / statistics.median(times["project"]),
        1 / statistics.median(times["loop"]),
        flops,
        mib["project"],
        mib["loop"],
        error,
        bf16=bf16,
        **compiled_stats,
    )


def evaluation_throughput(tasks: int, rounds: int, device: torch.device) -> tuple[float, float]:
    """Test tasks/s, Omniglot 5-way 1-shot: 50 Adam steps on the support set, then scoring the
    queries both ways batch norm allows (each beside the support set, and all together), for
    `MetaLearner.evaluation_step` and for the per-task loop."""
    setting = Setting("eval", "omniglot5", 5, 5, 50, tasks, "adam", 1e-3)
    learner = project_learner(setting, device)
    task = random_tasks(setting, 1, device)[0]
    task["query_inputs"] = torch.rand(tasks, 5, 1, 28, 28, device=device)
    task["query_targets"] = torch.arange(5, device=device).expand(tasks, 5)

    def theirs(task: Task) -> None:
        for i in range(tasks):
            clone = copy.deepcopy(learner.model)
            optimizer = torch.optim.Adam(clone.parameters(), lr=1e-3, betas=(0.0, 0.999))
            support = task["support_inputs"][i]
            for s in range(50):
                batch = task["batch_index"][i, s]
                optimizer.zero_grad()
                F.cross_entropy(clone(support[batch]), task["support_targets"][i][batch]).backward()
                optimizer.step()
            with torch.no_grad():
                (clone(task["query_inputs"][i]).argmax(-1) == task["query_targets"][i]).float()
                for query in task["query_inputs"][i]:
                    clone(torch.cat([support, query.unsqueeze(0)]))[-1].argmax()

    def ours(task: Task) -> None:
        with torch.no_grad():  # as Lightning evaluates
            learner.evaluation_step(task)

    ours(task), theirs(task)
    times: dict[str, list[float]] = {"project": [], "loop": []}
    for _ in range(rounds):
        times["project"].append(timed(ours, task, device))
        times["loop"].append(timed(theirs, task, device))
    return tasks / statistics.median(times["project"]), tasks / statistics.median(times["loop"])


def memory_table(device: torch.device, quick: bool) -> list[str]:
    """Peak memory against the meta-batch size and against k (Omniglot 5-way, SGD): Reptile and
    FOMAML keep no graph across inner steps, MAML keeps all k."""
    base = SETTINGS[4]
    batches, ks = ([1, 5, 10], [1, 5, 20]) if quick else ([1, 5, 10, 20], [1, 5, 10, 20, 40])
    algorithms = ["reptile"] + [
        name
        for name in ("fomaml", "maml")
        if importlib.util.find_spec(f"reptile.algorithms.{name}")
    ]
    lines = ["| algorithm | meta-batch | k | peak memory (MiB) |", "|---|---|---|---|"]
    for algorithm in algorithms:
        points = [(n, 5) for n in batches] + [(5, k) for k in ks if k != 5]
        for n, k in points:
            setting = replace(base, meta_batch=n, inner_steps=k, algorithm=algorithm)
            mib = peak_memory(setting, device, loop=False)["project"]
            lines.append(f"| {algorithm} | {n} | {k} | {mib:.0f} |")
    return lines


# The training settings whose meta-batches come from a real dataset (Adam, as the presets), and
# the dataset class and folder under --data-dir that each reads.
REAL_DATA = {
    "Omniglot 5-way": (Omniglot, "omniglot"),
    "Omniglot 20-way": (Omniglot, "omniglot"),
    "Mini-ImageNet 5-way": (MiniImageNet, "miniimagenet"),
}
LOADER_WORKERS = (0, 1, 2)


def real_tasks(setting: Setting, data_dir: Path, cache_dir: str | None) -> TaskDistribution:
    """The dataset behind `setting`, drawing its training tasks: the same shapes and schedule."""
    dataset, folder = REAL_DATA[setting.name]
    ways = MODELS[setting.model][2]
    data = dataset(
        root=data_dir / folder,
        cache_dir=cache_dir,
        ways=ways,
        train_shots=setting.support // ways,
        meta_batch_size=setting.meta_batch,
        train_schedule=InnerSchedule(steps=setting.inner_steps, batch_size=setting.inner_batch),
    )
    data.prepare()  # decodes into the cache on first use: not timed
    real = next(iter(train_loader(data, 0, 1)))
    for key, value in random_tasks(setting, 1, torch.device("cpu"))[0].items():
        if real[key].shape != value.shape:  # the table would time another setting
            raise AssertionError(
                f"{setting.name}: real {key} {tuple(real[key].shape)}, timed {tuple(value.shape)}"
            )
    return data


def train_loader(data: TaskDistribution, workers: int, batches: int) -> DataLoader:
    return DataLoader(data.train_tasks(0, batches), batch_size=None, num_workers=workers)


def loader_rate(data: TaskDistribution, workers: int, batches: int) -> float:
    """Meta-batches/s the DataLoader delivers from the real TrainTasks, not counting the first
    (the workers' start)."""
    loaded = iter(train_loader(data, workers, batches + 1))
    next(loaded)
    start = time.perf_counter()
    for _ in loaded:
        pass
    return batches / (time.perf_counter() - start)


def step_rates(
    setting: Setting, data: TaskDistribution, rounds: int, device: torch.device
) -> tuple[float, float]:
    """Training steps/s of the project's step on real meta-batches: alone (the meta-batches
    loaded beforehand), and fed by a DataLoader with one worker, as the presets train."""
    learner = project_learner(setting, device)
    step = project_step(
        learner, learner.algorithm.make_outer_optimizer(list(learner.model.parameters()))
    )

    def on_device(task: Task) -> Task:
        return {key: value.to(device) for key, value in task.items()}

    tasks = [on_device(task) for task in train_loader(data, 0, rounds + 1)]
    step(tasks[0])  # warm-up
    alone = 1 / statistics.median(timed(step, task, device) for task in tasks[1:])
    loaded = iter(train_loader(data, 1, rounds + 1))
    step(on_device(next(loaded)))  # the worker's start and a warm-up
    synchronize(device)
    start = time.perf_counter()
    for task in loaded:
        step(on_device(task))
    synchronize(device)
    return alone, rounds / (time.perf_counter() - start)


def data_loading_table(
    device: torch.device, data_dir: Path, cache_dir: str | None, rounds: int
) -> list[str]:
    """Whether task sampling keeps up with the training step, per dataset (see the docstring)."""
    lines = [
        "| setting | training step alone (it/s) | loader, 0 / 1 / 2 workers (meta-batches/s) "
        "| step fed by 1 worker (it/s) |",
        "|---|---|---|---|",
    ]
    for setting in (s for s in SETTINGS if s.name in REAL_DATA and s.inner_optimizer == "adam"):
        data = real_tasks(setting, data_dir, cache_dir)
        rates = [loader_rate(data, workers, 4 * rounds) for workers in LOADER_WORKERS]
        alone, fed = step_rates(setting, data, rounds, device)
        line = (
            f"| {setting.name} (k={setting.inner_steps}, meta-batch {setting.meta_batch}, "
            f"{setting.support} images per task) | {alone:.2f} "
            f"| {' / '.join(f'{rate:.1f}' for rate in rates)} | {fed:.2f} |"
        )
        lines.append(line)
        print(line, flush=True)
    return lines


# End to end: train.py itself, data loading, logging and checkpoints included.
END_TO_END = {
    "sine (the default job)": (["experiment=sine"], 1500, 200),
    "Omniglot 5-way 1-shot": (["experiment=omniglot_5w1s"], 300, 100),
    "Mini-ImageNet 5-way 5-shot": (["experiment=miniimagenet_5w5s"], 40, 10),
}


def paths_for(device: torch.device, also: list[str] | None = None) -> dict[str, list[str]]:
    """The paths compared, today's first, as train.py overrides: float32; bf16-mixed where the
    hardware has bfloat16 units; the compiled meta-step, on a GPU in bf16 and replayed as a CUDA
    graph; then each of `also` (space-separated overrides): today's with those overrides. Each
    runs on `device`."""
    where = ["trainer.accelerator=gpu" if device.type == "cuda" else "trainer.accelerator=cpu"]
    paths = {"fp32 (today)": ["trainer.precision=32-true"]}
    if has_bf16_units(device.type):
        paths["bf16-mixed"] = ["trainer.precision=bf16-mixed"]
    if device.type == "cuda":
        paths["bf16-mixed, CUDA graph"] = ["trainer.precision=bf16-mixed", "algorithm.compile=true"]
    else:
        paths["fp32, compiled meta-step"] = ["trainer.precision=32-true", "algorithm.compile=true"]
    paths.update({extra: paths["fp32 (today)"] + extra.split() for extra in also or []})
    return {name: where + overrides for name, overrides in paths.items()}


def speed_metrics(run_dir: Path) -> tuple[list[float], float]:
    """speed/meta_iterations_per_s of every logged interval and speed/test_tasks_per_s."""
    rows = []
    for log in run_dir.glob("csv/version_*/metrics.csv"):
        with open(log, newline="") as file:
            rows += list(csv.DictReader(file))
    rates = [
        float(r["speed/meta_iterations_per_s"])
        for r in rows
        if r.get("speed/meta_iterations_per_s")
    ]
    tests = [float(r["speed/test_tasks_per_s"]) for r in rows if r.get("speed/test_tasks_per_s")]
    return rates, tests[-1]


def train_py_rates(
    overrides: list[str], steps: int, test_tasks: int, data_dir: Path, copies: int = 1
) -> tuple[list[float], list[float]]:
    """Runs `copies` train.py jobs at once; each one's logged rates (the first interval, the
    warm-up, left out) and test tasks/s."""
    with tempfile.TemporaryDirectory() as root:
        runs = [Path(root) / str(i) for i in range(copies)]
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "train.py"),
                    *overrides,
                    f"trainer.max_steps={steps}",
                    f"trainer.log_every_n_steps={steps // 6}",
                    f"trainer.val_check_interval={steps}",
                    "dataset.num_val_tasks=0",
                    f"dataset.num_test_tasks={test_tasks}",
                    f"paths.data_dir={data_dir}",
                    "logger=csv",
                    f"hydra.run.dir={run}",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for run in runs
        ]
        for process in processes:
            _, error = process.communicate()
            if process.returncode:
                raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{error[-2000:]}")
        measured = [speed_metrics(run) for run in runs]
    return [statistics.median(m[0][1:]) for m in measured], [m[1] for m in measured]


def end_to_end_table(
    device: torch.device,
    data_dir: Path,
    threads: int | None,
    rounds: int,
    only: str | None,
    steps: int | None = None,
    also: list[str] | None = None,
) -> list[str]:
    """train.py's meta-iterations/s and test tasks/s for every path, alternating the paths
    round by round so that the machine's load hits them alike; medians over the rounds."""
    paths = paths_for(device, also)
    machine = [f"threads={threads}"] if threads else []
    lines = [
        "| job | path | train.py meta-iterations/s | test tasks/s | ratio to fp32 (train, test) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for job, (preset, job_steps, test_tasks) in END_TO_END.items():
        if only and only not in job:
            continue
        steps_here = steps or job_steps
        rates: dict[str, list[float]] = {name: [] for name in paths}
        tests: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, overrides in paths.items():
                train, test = train_py_rates(
                    [*preset, *overrides, *machine], steps_here, test_tasks, data_dir
                )
                rates[name] += train
                tests[name] += test
        base = [statistics.median(values[next(iter(paths))]) for values in (rates, tests)]
        for name in paths:
            train_rate, test_rate = statistics.median(rates[name]), statistics.median(tests[name])
            line = (
                f"| {job} | {name} | {train_rate:.1f} | {test_rate:.1f} "
                f"| {train_rate / base[0]:.2f}×, {test_rate / base[1]:.2f}× |"
            )
            lines.append(line)
            print(line, flush=True)
    return lines


def concurrency_table(
    device: torch.device,
    data_dir: Path,
    counts: list[int],
    only: str | None,
    steps: int | None = None,
) -> list[str]:
    """The aggregate meta-iterations/s of N jobs at once on one device (the fastest path), for
    each N: whether one job fills the device, or several must share it."""
    name, overrides = list(paths_for(device).items())[-1]
    lines = [
        "| job | path | jobs at once | meta-iterations/s, each | together |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for job, (preset, job_steps, _) in END_TO_END.items():
        if only and only not in job:
            continue
        for count in counts:
            rates, _ = train_py_rates(
                [*preset, *overrides], steps or job_steps, 10, data_dir, copies=count
            )
            each = ", ".join(f"{r:.1f}" for r in rates)
            lines.append(f"| {job} | {name} | {count} | {each} | {sum(rates):.1f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a few settings")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    parser.add_argument(
        "--only",
        default=None,
        help="only the training settings whose name contains this (e.g. sine); no evaluation "
        "or memory table",
    )
    parser.add_argument(
        "--data-loading",
        action="store_true",
        help="only the data-loading table: the DataLoader's rate against the training step's, on "
        "the real datasets under --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="holds omniglot/ and miniimagenet/"
    )
    parser.add_argument("--cache-dir", default=None, help="the image cache (default ~/.cache)")
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="only the end-to-end table: train.py's rates for each path (fp32, bf16-mixed where "
        "the hardware has bfloat16 units, the CUDA graph on a GPU) on --device, data from "
        "--data-dir; --only picks a job",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="with --end-to-end: meta-iterations of each run"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        help="with --end-to-end: one more path, today's with these overrides (e.g. "
        "dataset.num_workers=1); repeatable",
    )
    parser.add_argument(
        "--concurrency",
        default=None,
        help="with --end-to-end: job counts (e.g. 1,2,4) run at once on the device; their "
        "aggregate rate",
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe = json.loads(args.memory_probe)
        if "evaluation" in probe:
            peak = evaluation_peak_here(probe["evaluation"], probe["tasks"], device)
        else:
            peak = peak_memory_here(Setting(**probe["setting"]), device, probe["loop"])
        print(json.dumps(peak))
        return

    if args.end_to_end:
        data_dir = args.data_dir.resolve()
        if args.concurrency:
            counts = [int(n) for n in args.concurrency.split(",")]
            table = concurrency_table(device, data_dir, counts, args.only, args.steps)
        else:
            rounds = args.rounds or 2
            table = end_to_end_table(
                device, data_dir, args.threads, rounds, args.only, args.steps, args.also
            )
        if args.out:
            args.out.write_text("\n".join(table) + "\n")
        return
    if args.data_loading:
        rounds = args.rounds or (3 if args.quick else 7)
        loading = data_loading_table(device, args.data_dir, args.cache_dir, rounds)
        if args.out:
            args.out.write_text("\n".join(loading) + "\n")
        return
    if args.memory_only:
        memory = memory_table(device, args.quick) + [""] + evaluation_memory_table(device)
        print("\n".join(memory))
        if args.out:
            args.out.write_text("\n".join(memory) + "\n")
        return
    rounds = args.rounds or (3 if args.quick else 7)
    settings = SETTINGS if not args.quick else [SETTINGS[i] for i in (0, 2, 4, 5)]
    if args.only:
        settings = [s for s in settings if args.only in s.name]
    peak = matmul_flops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        f"Device: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s; {rounds} rounds, medians.",
        "",
        "| setting | inner | ours (it/s) | per-task loop (it/s) | ratio | GFLOP/it | FLOP eff. "
        "| peak MiB ours | peak MiB loop | Δφ vs loop, 1 it. float64 | compiled (it/s) "
        "| compiled ratio | cold compile (s) | compiled Δφ vs loop, 1 it. float32 "
        "| bf16-mixed (it/s) | bf16 ÷ ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for setting in settings:
        r = compare(setting, rounds, device, memory=True)
        line = (
            f"| {setting.name} (k={setting.inner_steps}, meta-batch {setting.meta_batch}) "
            f"| {setting.inner_optimizer} | {r.project:.1f} | {r.loop:.1f} "
            f"| {r.project / r.loop:.1f}× | {r.flops / 1e9:.3f} "
            f"| {r.flops * r.project / peak:.0%} | {r.project_mib:.0f} | {r.loop_mib:.0f} "
            f"| {r.max_error:.0e} | {cell(r.compiled, '.1f')} "
            f"| {cell(r.compiled / r.loop, '.1f', '×')} "
            f"| {cell(r.compile_seconds, '.0f')} | {cell(r.compiled_error, '.0e')} "
            f"| {cell(r.bf16, '.1f')} | {cell(r.bf16 / r.project, '.2f', '×')} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.only:
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return
    eval_tasks = 10 if args.quick else 25
    ours, theirs = evaluation_throughput(eval_tasks, rounds, device)
    evaluation = [
        "",
        "Evaluation, Omniglot 5-way 1-shot, 50 Adam steps + scoring each query beside the support "
        f"set ({eval_tasks} tasks at once): ours {ours:.1f} tasks/s, per-task loop "
        f"{theirs:.1f} tasks/s ({ours / theirs:.1f}×).",
        "",
    ]
    print("\n".join(evaluation), flush=True)
    memory = memory_table(device, args.quick) + [""] + evaluation_memory_table(device)
    print("\n".join(memory), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines + evaluation + memory) + "\n")


if __name__ == "__main__":
    main()
