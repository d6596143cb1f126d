"""`python train.py` as a real subprocess, and readers for what a run leaves behind."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
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


def train(cwd: Path, *overrides: str, timeout: float = 240) -> str:
    """Runs train.py to completion in `cwd`; returns its output (stdout and stderr)."""
    # Its own session: a hung run is killed with the DDP ranks it started.
    process = subprocess.Popen(
        command(*overrides),
        cwd=cwd,
        env=environment(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, output[-4000:]
    return output


def start(cwd: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """Starts train.py without waiting; its output goes to `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            command(*overrides), cwd=cwd, env=environment(cwd), stdout=handle, stderr=handle
        )


def checkpoint(path: Path) -> dict[str, Any]:
    # The default weights_only loading: checkpoints must not need unpickling arbitrary objects.
    return torch.load(path, map_location="cpu")


def results(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "results.json").read_text())


def offline_runs(directory: Path) -> list[Path]:
    """The offline W&B runs written anywhere under `directory`."""
    return sorted(directory.rglob("wandb/offline-run-*"))


def wandb_run_record(run: Path) -> Any:
    """The RunRecord (id, group, ...) of an offline W&B run, read from its transaction log.

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
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {run}")
