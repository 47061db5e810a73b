"""`make up` twice, `make down`, and a process that fails to start: the code path of the Makefile."""

from __future__ import annotations

import re
import shutil

import psutil
import requests

from launch import config
from launch.prepare import prepare
from tests.conftest import ROOT, Stack, gone, make_conf


def test_up_twice_converts_once_and_starts_nothing_twice_then_down_leaves_nothing(tmp_path):
    # A fresh model cache, with the wheel copied in so that no network is needed.
    shipped = config.load(ROOT / "conf", "demo")
    prepare(shipped.models[0], shipped.stack.model_cache_dir)
    cache = tmp_path / "cache"
    shutil.copytree(shipped.stack.model_cache_dir / "downloads", cache / "downloads")
    stack = Stack(make_conf(tmp_path, model_cache_dir=str(cache)), "demo")

    try:
        first = stack.up()
        assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in first.stdout + first.stderr
        assert "model smollm2-135m answers through the API" in first.stdout
        assert f"OpenAI API  {stack.api_base}" in first.stdout
        before = {p.pid for p in stack.processes()}
        second = stack.up()
        assert "converting" not in second.stdout + second.stderr
        assert "already running: no changes" in second.stdout
        assert {p.pid for p in stack.processes()} == before
        workers = [p for p in stack.processes() if "launch.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2  # bf16 and int8

        # A changed conf/ is applied: the UI's title restarts the web UI, and nothing else.
        settings = stack.settings
        settings["web"]["title"] = "Renamed"
        (stack.conf / "stack.yaml").write_text(__import__("yaml").safe_dump(settings))
        old = {p["name"]: p["pid"] for p in stack.supervisor().processes()}
        stack.up()
        new = {p["name"]: p["pid"] for p in stack.supervisor().processes()}
        assert [n for n in old if old[n] != new[n]] == ["web"]

        status = stack.deploy("status").stdout
        assert "worker-smollm2-135m" in status and "RUNNING" in status
        assert re.search(r"workers registered at http://127\.0\.0\.1:\d+:\n  http://127\.0\.0\.1:\d+ +smollm2-135m  queue 0", status), status
        assert "worker-smollm2-135m.log" in stack.deploy("logs", "-n", "5").stdout

        # `drain` takes the host's workers out (nothing to finish here), `up` brings them back.
        assert "drained: worker-smollm2-135m" in stack.deploy("drain").stdout
        assert {p["name"]: p["statename"] for p in stack.supervisor().processes()}["worker-smollm2-135m"] == "STOPPED"
        assert "workers registered at http://127.0.0.1" in (status := stack.deploy("status").stdout) and " none" in status
        assert "started again (stopped by a drain or by hand): worker-smollm2-135m" in stack.up().stdout
    finally:
        procs = stack.processes()
        assert "the stack is stopped" in stack.deploy("down").stdout
    psutil.wait_procs(procs, timeout=30)
    assert gone(procs), f"left running: {[p.cmdline() for p in procs if p.is_running()]}"
    assert "not running" in stack.deploy("status").stdout
    assert not list(ROOT.glob("*.log")), "FastChat log files written into the work tree"
    try:
        requests.get(stack.api_base + "/models", timeout=2)
        raise AssertionError("the API still answers after down")
    except requests.ConnectionError:
        pass


def test_a_worker_that_cannot_start_fails_up_with_its_log(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    model = {"name": "broken", "source": {"kind": "local", "path": str(broken)}, "template": "smollm2"}
    stack = Stack(make_conf(tmp_path, models={"broken": model}, profile={"models": ["broken"]}), "test")
    try:
        done = stack.deploy("up", "--profile", "test", check=False)
        assert done.returncode == 1
        assert "worker-broken failed to start" in done.stderr
        assert "last lines of" in done.stderr and "Traceback" in done.stderr  # the worker's own traceback tail
    finally:
        stack.deploy("down")


def test_a_port_in_use_is_named_before_anything_starts(tmp_path):
    stack = Stack(make_conf(tmp_path), "demo")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", stack.settings["api"]["port"]))
        s.listen()
        done = stack.deploy("up", check=False)
    assert done.returncode == 2
    assert f"127.0.0.1:{stack.settings['api']['port']} (api.port in conf/stack.yaml) is not available" in done.stderr
    assert not stack.processes()


def test_a_profile_that_does_not_fit_is_refused_with_the_numbers(tmp_path):
    stack = Stack(make_conf(tmp_path, memory_limit_gib=1.2), "demo")
    done = stack.deploy("up", check=False)
    assert done.returncode == 2
    err = done.stderr
    # smollm2-135m 0.25 GiB + smollm2-135m-int8 0.15 GiB (bf16 lm_head) of weights, KV caches, overhead
    assert "profile 'demo' needs about 3.0 GiB, but 1.2 GiB is stack.memory_limit_gib" in err
    assert "0.3 GiB weights (bfloat16)" in err and "0.2 GiB weights (int8)" in err and "KV cache (8192 tokens)" in err
    assert "quant: int8" in err and err.startswith("error: ")
    assert not stack.processes()
