"""`python train.py` as a real subprocess, and readers for what a run leaves behind."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# A run of a few seconds: few meta-iterations, few and small evaluation tasks.
TINY = (
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "dataset.num_val_tasks=4",
    "dataset.num_test_tasks=6",
    "dataset.grid_points=50",
    "algorithm.eval_inner_steps=2",
)


def environment(home: Path) -> dict[str, str]:
    """This checkout's sources first; W&B offline, its settings and caches under `home`."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return os.environ | {
        "PYTHONPATH": path,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / ".wandb_config"),
        "WANDB_CACHE_DIR": str(home / ".wandb_cache"),
        "WANDB_DATA_DIR": str(home / ".wandb_data"),
    }


def command(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def run(
    cwd: Path, *overrides: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs train.py to its end in `cwd` (in `environment(cwd)` unless `env` says); returns the
    finished process (output in stdout/stderr)."""
    # Its own session: a hung run is killed with the DDP ranks it started.
    process = subprocess.Popen(
        command(*overrides),
        cwd=cwd,
        env=environment(cwd) if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train(cwd: Path, *overrides: str, timeout: float = 240) -> str:
    """Runs train.py, which must succeed; returns its output (stdout and stderr)."""
    finished = run(cwd, *overrides, timeout=timeout)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    return output


def start(cwd: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """Starts train.py without waiting, in its own process group (`signal_group` reaches it, its
    DDP ranks and DataLoader workers, as a scheduler or Ctrl-C does); its output goes to `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command(*overrides),
            cwd=cwd,
            env=environment(cwd),
            stdout=handle,
            stderr=handle,
            start_new_session=True,
        )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until `path` exists (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists() and process.poll() is None, f"{path} never appeared"


def signal_group(process: subprocess.Popen, signum: int) -> None:
    os.killpg(process.pid, signum)


def group_ended(process: subprocess.Popen, timeout: float = 60) -> bool:
    """Whether every process of the group (DDP ranks, workers) has exited within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def checkpoint(path: Path) -> dict[str, Any]:
    # The default weights_only loading: checkpoints must not need unpickling arbitrary objects.
    return torch.load(path, map_location="cpu")


def results(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "results.json").read_text())


def offline_runs(directory: Path) -> list[Path]:
    """The offline W&B runs written anywhere under `directory`."""
    return sorted(directory.rglob("wandb/offline-run-*"))


def wandb_records(run: Path) -> Iterator[Any]:
    """The `Record`s (run, history, exit, ...) of an offline W&B run, from its transaction log.

    The log (run-<id>.wandb) is LevelDB's log format after a 7-byte header: 32 KiB blocks of
    records, each with a 7-byte header (crc32 4, length 2, type 1: full, first, middle or last
    fragment) and a serialized `Record` protobuf as payload.
    """
    from wandb.proto import wandb_internal_pb2

    data = next(run.glob("run-*.wandb")).read_bytes()
    block, position, payload = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += left
            continue
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def wandb_record(run: Path, kind: str) -> Any:
    """The first record of `kind` ("run": id, group, ...; "exit": exit_code) of an offline run."""
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == kind:
            return getattr(record, kind)
    raise AssertionError(f"no {kind} record in {run}")


def wandb_run_record(run: Path) -> Any:
    return wandb_record(run, "run")


def wandb_exit_code(run: Path) -> int:
    """The exit code W&B recorded for the run (what `wandb sync` reports its status by)."""
    return wandb_record(run, "exit").exit_code
