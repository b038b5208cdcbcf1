"""Helpers of the multi-node tests: a torchrun job of two "nodes" on this machine (loopback),
with every process it started recorded, to check that none is left behind."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NODES = 2
PER_NODE = 2
SECRET = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    # The job's shared secret (distmlip.cluster.secret): one per test session, never the user's.
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "DISTMLIP_SECRET": SECRET})
    env.update(extra)
    return env


@dataclass
class Node:
    process: subprocess.Popen
    cwd: Path
    stdout: str = ""
    stderr: str = ""


@dataclass
class Job:
    """Two torchrun agents (node ranks 0 and 1), each starting ``PER_NODE`` ranks."""

    nodes: list[Node]
    seen: dict[int, float] = field(default_factory=dict)  # pid → create time
    port: int = 0  # MASTER_PORT: where the job's store listens

    @classmethod
    def start(
        cls,
        node_args: list[list[str]],
        cwds: list[Path],
        module=True,
        env=None,
        n_nodes=NODES,
        per_node=PER_NODE,
    ) -> Job:
        port = free_port()
        nodes = []
        for node_rank, (args, cwd) in enumerate(zip(node_args, cwds, strict=True)):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={n_nodes}",
                f"--nproc-per-node={per_node}",
                f"--node-rank={node_rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                *(["-m", "distmlip"] if module else []),
                *args,
            ]
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=(env[node_rank] if isinstance(env, list) else env) or environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            nodes.append(Node(process, cwd))
        return cls(nodes, port=port)

    @classmethod
    def srun(cls, args: list[str], cwds: list[Path]) -> Job:
        """What ``srun -N 2 --ntasks-per-node 2 python -m distmlip ARGS`` starts: one process
        per task, with SLURM's variables (``cwds``: each node's directory)."""
        port = free_port()
        nodes = []
        for task in range(NODES * PER_NODE):
            slurm = {
                "SLURM_PROCID": str(task),
                "SLURM_STEP_NUM_TASKS": str(NODES * PER_NODE),
                "SLURM_LOCALID": str(task % PER_NODE),
                "SLURM_NODEID": str(task // PER_NODE),
                "SLURM_STEP_TASKS_PER_NODE": f"{PER_NODE}(x{NODES})",
                "SLURM_JOB_ID": "4242",
                "SLURM_STEP_ID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            process = subprocess.Popen(
                [sys.executable, "-m", "distmlip", *args],
                cwd=cwds[task // PER_NODE],
                env=environment(**slurm),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            nodes.append(Node(process, cwds[task // PER_NODE]))
        job = cls(nodes)
        for node in nodes:
            job.seen[node.process.pid] = psutil.Process(node.process.pid).create_time()
        return job

    def descendants(self) -> list[psutil.Process]:
        found = []
        for node in self.nodes:
            try:
                found += psutil.Process(node.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for process in found:
            try:
                self.seen.setdefault(process.pid, process.create_time())
            except psutil.NoSuchProcess:
                pass
        return found

    def rank_process(self, rank: int, timeout: float = 120.0) -> psutil.Process:
        """The process torchrun started as global ``rank``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.descendants():
                try:
                    if process.environ().get("RANK") == str(rank):
                        if process.cmdline()[1:3] != ["-m", "distmlip.worker"]:
                            return process
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.2)
        raise AssertionError(f"rank {rank} never started")

    def wait(self, timeout: float) -> float:
        """Wait for both agents (recording their processes meanwhile); seconds taken."""
        began = time.monotonic()
        for node in self.nodes:
            while node.process.poll() is None:
                self.descendants()
                if time.monotonic() - began > timeout:
                    self.kill()
                    raise AssertionError(f"the job did not end within {timeout:.0f} s")
                time.sleep(0.2)
            node.stdout, node.stderr = node.process.communicate()
        return time.monotonic() - began

    def kill(self) -> None:
        for process in self.descendants():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        for node in self.nodes:
            node.process.kill()
            node.stdout, node.stderr = node.process.communicate()

    def left_behind(self) -> list[int]:
        """Processes of the job still alive (a pid reused since does not count)."""
        alive = []
        for pid, created in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != "zombie":
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def errors(self) -> list[str]:
        """distmlip's error lines on every node's stderr."""
        return [
            line
            for node in self.nodes
            for line in node.stderr.splitlines()
            if line.startswith("distmlip: error:")
        ]
