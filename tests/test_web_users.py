"""Web UI logins: scrypt hashes, the management command, the gradio authenticator."""

from __future__ import annotations

import subprocess
import sys

import yaml

from launch import web_users
from tests.conftest import ROOT


def test_hash_verifies_only_its_password():
    stored = web_users.hash_password("s3cret-pass")
    assert web_users.verify(stored, "s3cret-pass")
    assert not web_users.verify(stored, "s3cret-pasS")
    assert web_users.hash_password("s3cret-pass") != stored  # salted
    assert not web_users.verify("plain-text", "plain-text")


def test_command_adds_and_removes_users_and_keeps_no_plain_password(tmp_path):
    path = tmp_path / "users.yaml"

    def run(*args, password=""):
        return subprocess.run([sys.executable, "-m", "launch.web_users", *args, "--file", str(path)],
                              input=password, text=True, capture_output=True, cwd=ROOT)

    assert run("add", "alice", "--password-stdin", password="long enough\n").returncode == 0
    assert run("add", "bob", "--password-stdin", password="short\n").returncode == 1
    assert "long enough" not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    check = web_users.authenticator(path)
    assert check("alice", "long enough") and not check("alice", "wrong") and not check("bob", "short")
    assert run("remove", "alice").returncode == 0
    assert yaml.safe_load(path.read_text()) == {"users": {}}
    assert "no user 'alice'" in run("remove", "alice").stderr
