"""Scale out, multi-host for real on one machine: two network namespaces joined by a veth pair
are the head (controller, gateway, web UI, one local worker) and a worker host (one worker of
the same model), each with its own address, its own supervisord and its own copy of conf/.
Only loopback and these two namespaces carry traffic.

The test is a client on the head: it enters the head's namespace with setns(2) on its own
thread (threads and processes it starts there inherit the namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import psutil
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Stack, make_conf

HEAD_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"
MODEL = "smollm2-135m"
SECRET = "multi-host-secret-" + "x" * 16
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
CLONE_NEWNET = 0x40000000


@dataclass
class Hosts:
    head: Stack
    worker: Stack
    head_ns: str
    worker_ns: str
    worker_link: str  # the worker host's end of the veth pair

    @property
    def controller(self) -> str:
        return f"http://{HEAD_IP}:{self.head.settings['controller']['port']}"

    @property
    def local_worker(self) -> str:
        return f"http://127.0.0.1:{self.head.settings['worker_port']}"

    @property
    def remote_worker(self) -> str:
        return f"http://{WORKER_IP}:{self.worker.settings['worker_port']}"

    def up_worker_host(self) -> subprocess.CompletedProcess:
        # The worker host's address from the command line (make's WORKER_HOST=): its conf is the head's.
        return self.worker.deploy("up", "--profile", "test", "--role", "worker", "--controller", self.controller,
                                  "--models", MODEL, "--worker-host", WORKER_IP)


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def inside(netns: str):
    """Run the block, and the threads and processes it starts, in network namespace `netns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        yield
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    tag = str(os.getpid())[-6:]
    head_ns, worker_ns, head_link, worker_link = f"llmd-h{tag}", f"llmd-w{tag}", f"llmdh{tag}", f"llmdw{tag}"
    try:
        if shutil.which("ip") is None:
            raise OSError("iproute2's `ip` is not installed")
        ip("netns", "add", head_ns)
    except OSError as e:
        # .ci/run installs iproute2 and runs as root: there, this must work.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"cannot create network namespaces here: {e}")
    stacks: list[Stack] = []
    try:
        ip("netns", "add", worker_ns)
        ip("link", "add", head_link, "type", "veth", "peer", "name", worker_link)
        for link, ns, addr in ((head_link, head_ns, HEAD_IP), (worker_link, worker_ns, WORKER_IP)):
            ip("link", "set", link, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            ip("-n", ns, "link", "set", link, "up")
            ip("-n", ns, "link", "set", "lo", "up")

        tmp = tmp_path_factory.mktemp("multihost")
        (tmp / "secret").write_text(SECRET + "\n")
        base = yaml.safe_load((ROOT / "conf" / "models" / f"{MODEL}.yaml").read_text())
        models, profile = {MODEL: base | {"threads": 1}}, {"models": [MODEL]}
        head = Stack(make_conf(tmp / "head", models=models, profile=profile,
                               controller={"host": HEAD_IP, "secret_file": str(tmp / "secret")}), "test", netns=head_ns)
        # The same conf/ on both hosts, but for the run dir (both hosts share this machine's disk).
        worker_conf = shutil.copytree(head.conf, tmp / "worker" / "conf")
        settings = head.settings | {"run_dir": str(tmp / "worker" / "run")}
        (worker_conf / "stack.yaml").write_text(yaml.safe_dump(settings))
        worker = Stack(worker_conf, "test", netns=worker_ns)
        # The namespaces have no way out: fetch the model here first (a cache hit if done before).
        subprocess.run([sys.executable, "-m", "launch.prepare", "--conf", str(head.conf), "--profile", "test"],
                       cwd=ROOT, check=True, capture_output=True, timeout=900)
        stacks.append(head)
        head.deploy("up", "--profile", "test", "--role", "head")
        hosts = Hosts(head, worker, head_ns, worker_ns, worker_link)
        stacks.append(worker)
        hosts.up_worker_host()
        yield hosts
    finally:
        procs = [p for s in stacks for p in s.processes()]
        for s in stacks:
            s.deploy("down", check=False)
        psutil.wait_procs(procs, timeout=30)
        for ns in (head_ns, worker_ns):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def workers(hosts: Hosts) -> dict:
    with inside(hosts.head_ns):
        return requests.post(hosts.controller + "/list_workers", timeout=5).json()


def served_by(hosts: Hosts) -> dict[str, float]:
    """Generations answered by each worker, from the gateway's /metrics."""
    with inside(hosts.head_ns):
        text = requests.get(hosts.head.api_base.removesuffix("/v1") + "/metrics", timeout=5).text
    return {s.labels["worker"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "llmd_worker_requests" for s in f.samples if s.name.endswith("_total")}


def wait_for(predicate, seconds: float) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def stream(client: openai.OpenAI, max_tokens: int) -> tuple[str, str]:
    """(outcome, text): outcome is the finish reason, or 'error: ...' if the stream failed."""
    text = ""
    try:
        for chunk in client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=max_tokens, temperature=0,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.choices and chunk.choices[0].finish_reason:
                return chunk.choices[0].finish_reason, text
        return "error: the stream ended without a finish reason", text
    except openai.APIError as e:
        return f"error: {e}", text


def head_client(hosts: Hosts) -> openai.OpenAI:
    return openai.OpenAI(base_url=hosts.head.api_base, api_key="none", timeout=120, max_retries=0)


def test_the_remote_worker_registers_with_the_secret_and_answers_through_the_head(hosts):
    listed = workers(hosts)
    assert set(listed) == {hosts.local_worker, hosts.remote_worker}, listed
    assert listed[hosts.remote_worker]["models"] == [MODEL]
    # From the worker host's address, a registration without the secret is refused.
    forged = {"worker_name": f"http://{WORKER_IP}:9", "check_heart_beat": True,
              "worker_status": {"model_names": [MODEL], "speed": 1, "queue_length": 0}, "multimodal": False}
    with inside(hosts.worker_ns):
        assert requests.post(hosts.controller + "/register_worker", json=forged, timeout=5).status_code == 403
        # ... and the head's gateway and UI are not reachable from other hosts (loopback there).
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{HEAD_IP}:{hosts.head.settings['api']['port']}/health", timeout=5)
    assert f"http://{WORKER_IP}:9" not in workers(hosts)
    with inside(hosts.head_ns):
        # Draining a worker needs the secret too (or a loopback peer).
        assert requests.post(hosts.remote_worker + "/drain", timeout=5).status_code == 403
    assert hosts.remote_worker in workers(hosts)
    with inside(hosts.head_ns):
        health = requests.get(hosts.head.api_base.removesuffix("/v1") + "/health", timeout=5).json()
    assert set(health["workers"]) == {hosts.local_worker, hosts.remote_worker}


def test_idle_replicas_share_requests_that_come_one_at_a_time():
    # FastChat's shortest-queue dispatch takes the first worker registered on a tie: requests
    # that each end before the next would all go to one host.
    from fastchat.serve.controller import DispatchMethod, WorkerInfo

    from launch.controller import Controller

    # Without __init__: FastChat's starts a heartbeat thread that would keep pytest from exiting.
    controller = Controller.__new__(Controller)
    controller.dispatch_method, controller.worker_info = DispatchMethod.SHORTEST_QUEUE, {}
    for name in ("http://10.0.0.1:21002", "http://10.0.0.2:21002"):
        controller.worker_info[name] = WorkerInfo([MODEL], 1, 0, False, time.time(), False)
    picked = set()
    for _ in range(50):
        picked.add(controller.get_worker_address(MODEL))
        for info in controller.worker_info.values():
            info.queue_length = 0  # the request finished; the next probe says so
    assert picked == set(controller.worker_info)
    assert controller.get_worker_address("other") == ""


def test_load_is_spread_over_both_hosts(hosts):
    before = served_by(hosts)
    with inside(hosts.head_ns):
        client = head_client(hosts)
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda _: stream(client, 8)[0], range(12)))
    assert all(not o.startswith("error") for o in outcomes), outcomes
    after = served_by(hosts)
    local = after.get(hosts.local_worker, 0) - before.get(hosts.local_worker, 0)
    remote = after.get(hosts.remote_worker, 0) - before.get(hosts.remote_worker, 0)
    print(f"12 requests, 4 at a time: head's replica {local:.0f}, worker host's replica {remote:.0f}")
    assert local + remote == 12 and local >= 2 and remote >= 2, (local, remote)


def test_drain_finishes_the_streams_of_the_host_then_removes_it(hosts):
    with inside(hosts.head_ns):
        client = head_client(hosts)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, client, 40) for _ in range(4)]
            busy = wait_for(lambda: workers(hosts)[hosts.remote_worker]["queue_length"] >= 1, 60)
            assert busy is not None, "no request reached the worker host"
            drained = hosts.worker.deploy("drain")
            results = [f.result(timeout=300) for f in futures]
        assert all(outcome in ("length", "stop") for outcome, _ in results), results
        assert all(text for _, text in results), results
        print(drained.stdout)
        assert "requests to finish" in drained.stdout and "drained:" in drained.stdout
        assert hosts.remote_worker not in workers(hosts)
        state = {p["name"]: p["statename"] for p in hosts.worker.supervisor().processes()}
        assert state == {f"worker-{MODEL}": "STOPPED"}, state
        # The head keeps serving, on its own replica.
        before = served_by(hosts)
        assert stream(client, 4)[0] in ("length", "stop")
        assert served_by(hosts).get(hosts.local_worker, 0) == before.get(hosts.local_worker, 0) + 1
    # `make up` on the drained host brings it back.
    again = hosts.up_worker_host()
    assert "started again" in again.stdout, again.stdout
    assert hosts.remote_worker in workers(hosts)


def test_a_cut_link_moves_all_traffic_to_the_head_within_seconds(hosts):
    assert hosts.remote_worker in workers(hosts)
    with inside(hosts.head_ns):
        client = head_client(hosts)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, client, 64) for _ in range(4)]
            assert wait_for(lambda: workers(hosts)[hosts.remote_worker]["queue_length"] >= 1, 60) is not None
            ip("-n", hosts.worker_ns, "link", "set", hosts.worker_link, "down")
            cut = time.monotonic()
            removed = wait_for(lambda: hosts.remote_worker not in workers(hosts), 30)
            results = [f.result(timeout=120) for f in futures]
            settled = time.monotonic() - cut
        print(f"link cut: worker host out of the dispatch after {removed:.1f}s; "
              f"all 4 streams ended {settled:.1f}s after the cut: {[o[:60] for o, _ in results]}")
        assert removed is not None and removed < 10, removed
        # Streams the worker host had started end with an error; the others finish on the head.
        assert settled < 60, settled
        assert any(o in ("length", "stop") for o, _ in results), results
        before = served_by(hosts)
        outcomes = [stream(client, 4)[0] for _ in range(4)]
        assert all(o in ("length", "stop") for o in outcomes), outcomes
        assert served_by(hosts).get(hosts.local_worker, 0) == before.get(hosts.local_worker, 0) + 4
    # The link back: the worker host registers again on its next heartbeat.
    ip("-n", hosts.worker_ns, "link", "set", hosts.worker_link, "up")
    back = wait_for(lambda: hosts.remote_worker in workers(hosts), 60)
    print(f"link restored: worker host registered again after {back}s")
    assert back is not None
