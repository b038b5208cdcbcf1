"""The secret a launched job's ranks share (distmlip.cluster.secret): where it comes from, who may
read it, and a job that finds it in the user-only file alone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from multinode import Job, environment

from distmlip.cluster.secret import JobKeys, job_secret, secret_file


def test_the_variable_wins_and_must_be_long_enough(tmp_path):
    environ = {"XDG_CONFIG_HOME": str(tmp_path), "DISTMLIP_SECRET": " a-long-enough-secret "}
    assert job_secret(environ) == b"a-long-enough-secret"
    assert not secret_file(environ).exists()  # the variable alone: no file made
    for weak in ("hunter2", "a" * 40, "abababababababababab"):
        with pytest.raises(ValueError, match="DISTMLIP_SECRET is shorter than 16 characters"):
            job_secret({**environ, "DISTMLIP_SECRET": weak})


def test_the_file_is_made_once_for_this_user_alone(tmp_path):
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    first = job_secret(environ)
    path = secret_file(environ)
    assert path == tmp_path / "config" / "distmlip" / "job-secret"
    assert len(first) == 64 and job_secret(environ) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["job-secret"]  # no temporary file left


def test_ranks_starting_together_read_one_secret(tmp_path):
    """Several processes making the file at the same moment all end up with the same one."""
    code = (
        "import sys, time; from distmlip.cluster.secret import job_secret\n"
        "time.sleep(float(sys.argv[1]) - time.time())\n"
        "print(job_secret().decode())"
    )
    start = f"{__import__('time').time() + 3.0}"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("DISTMLIP_SECRET", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, start], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    secrets = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(secrets) == 1 and len(secrets.pop()) == 64
    assert os.listdir(tmp_path / "distmlip") == ["job-secret"]


def test_a_file_others_can_read_or_a_short_one_is_refused(tmp_path):
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = secret_file(environ)
    job_secret(environ)
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"can be read or written by other users.*chmod 600"):
        job_secret(environ)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 16 characters"):
        job_secret(environ)


def test_no_secret_to_be_had_is_one_clear_error(tmp_path):
    blocked = tmp_path / "file-not-directory"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot be used.*set DISTMLIP_SECRET to the same value"):
        job_secret({"XDG_CONFIG_HOME": str(blocked)})


def test_keys_depend_on_the_secret_and_the_job():
    one = JobKeys(b"a" * 32, "distmlip/job.0")
    assert one.authkey("n") == JobKeys(b"a" * 32, "distmlip/job.0").authkey("n")
    assert one.authkey("n") != JobKeys(b"b" * 32, "distmlip/job.0").authkey("n")
    assert one.authkey("n") != JobKeys(b"a" * 32, "distmlip/job.1").authkey("n")


@pytest.mark.slow
def test_a_job_without_the_variable_uses_the_users_file(tmp_path):
    """torchrun on one machine with no DISTMLIP_SECRET: every rank reads the same user-only
    file (made by whichever rank came first) and the job runs."""
    env = environment(XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("DISTMLIP_SECRET")
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    args = ["predict", "bulk:Cu:fcc:3.61:cubic", "--model", "reference", "--json"]
    job = Job.start([args, args], cwds, env=env)
    job.wait(300)
    assert [node.process.returncode for node in job.nodes] == [0, 0], job.errors()
    assert json.loads(job.nodes[0].stdout)["nprocs"] == 4
    assert (tmp_path / "config" / "distmlip" / "job-secret").is_file()
    assert not job.left_behind()


@pytest.mark.slow
def test_nodes_with_different_secrets_end_at_once_with_one_clear_line(tmp_path):
    """A rank with another secret could never verify rank 0's record: rank 0 sees its posted
    key check and ends the job at once (not after the 300 s start-up timeout)."""
    import time

    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    envs = [environment(DISTMLIP_SECRET=secret + "0123456789abcdef") for secret in ("ab", "cd")]
    args = ["predict", "bulk:Cu:fcc:3.61:cubic", "--model", "reference", "--json"]
    began = time.monotonic()
    job = Job.start([args, args], cwds, env=envs)
    job.wait(200)
    assert time.monotonic() - began < 90
    assert all(node.process.returncode != 0 for node in job.nodes)
    assert not job.nodes[0].stdout
    errors = job.errors()
    assert any(
        "rank 2 holds a different job secret from rank 0's" in line and "DISTMLIP_SECRET" in line
        for line in errors
    ), errors
    assert not job.left_behind()


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o604, 0o660, 0o602])
def test_a_file_the_group_or_others_can_use_is_refused(tmp_path, mode):
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    job_secret(environ)
    secret_file(environ).chmod(mode)
    with pytest.raises(ValueError, match="can be read or written by other users"):
        job_secret(environ)


def test_a_file_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    job_secret(environ)
    owner = secret_file(environ).stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(ValueError, match="owner uid"):
        job_secret(environ)


@pytest.mark.parametrize("value", ["", "   ", " " * 20 + "hunter2" + " " * 20])
def test_an_empty_or_padded_short_variable_is_refused(tmp_path, value):
    environ = {"XDG_CONFIG_HOME": str(tmp_path), "DISTMLIP_SECRET": value}
    with pytest.raises(ValueError, match="DISTMLIP_SECRET is shorter than 16 characters"):
        job_secret(environ)
    assert not secret_file(environ).exists()


def test_a_secret_another_rank_just_made_is_never_replaced(tmp_path):
    """The file appears between this rank's look and its write: theirs is kept, whole."""
    from distmlip.cluster.secret import _create

    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = secret_file(environ)
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_text("theirs-" + "t" * 57 + "\n")
    path.chmod(0o600)
    _create(path)
    assert path.read_text() == "theirs-" + "t" * 57 + "\n"
    assert job_secret(environ) == ("theirs-" + "t" * 57).encode()
    assert os.listdir(path.parent) == ["job-secret"]
