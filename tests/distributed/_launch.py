"""Helpers for the distributed tests: launch ``torchrun`` / ``accelerate launch`` subprocesses
(gloo on CPU, ``DS_ACCELERATOR=cpu``), each running many short jobs (``_worker.py``)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BASE = HERE / "base.yaml"
WORKER = HERE / "_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = os.environ.copy()
    # PYTHONFAULTHANDLER: a worker killed by a signal (SIGABRT from C++, SIGSEGV) prints every thread's Python stack
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args]


def accelerate(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
            "--main_process_port", str(free_port()), *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout kill that group (its workers too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"launcher timed out after {timeout}s: {' '.join(cmd)}\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def log_tail(out: str, chars: int = 8000) -> str:
    """The end of a launcher's output without torch's repeated c10d deprecation warnings (two lines
    per collective call site), which otherwise fill a failure message."""
    lines = out.splitlines()
    keep = [ln for i, ln in enumerate(lines)
            if "FutureWarning" not in ln and not (i and "FutureWarning" in lines[i - 1] and "return func(" in ln)]
    return "\n".join(keep)[-chars:]


def run_jobs(launcher: list[str], jobs: list[dict], workdir: Path, name: str, timeout: float = 900) -> dict:
    """Launch ``_worker.py`` with ``jobs``; return {job name: result} (asserts the launch succeeded)."""
    spec = workdir / f"{name}.spec.json"
    out = workdir / f"{name}.results.json"
    spec.write_text(json.dumps({"base": str(BASE), "jobs": jobs, "out": str(out)}))
    t0 = time.perf_counter()
    proc = run([*launcher, str(WORKER), str(spec)], timeout=timeout)
    (workdir / f"{name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"{name} failed (rc={proc.returncode}):\n{log_tail(proc.stdout)}"
    results = json.loads(out.read_text())
    results["_launch_seconds"] = time.perf_counter() - t0
    results["_log"] = proc.stdout
    return results


def job(name: str, workdir: Path, *overrides: str, kind: str = "train") -> dict:
    return {"name": name, "kind": kind, "overrides": [f"output.dir={workdir / name}", *overrides]}


def shard_report(run_dir) -> list[dict]:
    return json.loads((Path(run_dir) / "shard_report.json").read_text())
