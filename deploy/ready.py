"""Wait until the stack really serves, and say which process failed if it does not.

In order: the controller answers, every worker of this host has registered, the API server
lists the models, the web UI answers, and every local model generates a token through the
API. A worker host (role worker) has no API or UI: its workers answer a token directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from deploy.supervisor import FAILED_STATES, Supervisor
from launch.config import Deployment
from launch.api_keys import load_keys


class StartupError(Exception):
    pass


@dataclass
class Check:
    program: str  # whose log explains a failure
    label: str
    probe: Callable[[], str | None]  # None when satisfied, else what is still missing


def wait(deployment: Deployment, sup: Supervisor, since: float, say: Callable[[str], None] = print) -> None:
    """Return once every check passes; raise StartupError as soon as a program has exited
    after `since` (a time.time()), or when stack.startup_timeout runs out."""
    deadline = time.monotonic() + deployment.stack.startup_timeout
    for check in checks(deployment):
        while (missing := check.probe()) is not None:
            _raise_if_failed(sup, since)
            if time.monotonic() > deadline:
                raise StartupError(
                    f"timed out after {deployment.stack.startup_timeout:.0f}s waiting for {check.label}: {missing}\n"
                    f"last lines of {sup.log_file(check.program)}:\n{sup.tail(check.program)}"
                )
            time.sleep(0.5)
        say(f"  ok  {check.label}")


def checks(deployment: Deployment) -> list[Check]:
    stack = deployment.stack
    controller, api, web = deployment.controller_url, stack.api.url + "/v1", stack.web.url
    names = [m.name for m in deployment.local_models]
    workers = deployment.workers()
    keys = sorted(load_keys(stack.api.keys_file))
    auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def controller_up():
        return _missing(lambda: requests.post(controller + "/list_models", timeout=2).json()["models"])

    def registered(url):
        def probe():
            listed = requests.post(controller + "/list_workers", timeout=2).json()
            return None if url in listed else f"{url} not among the {len(listed)} workers registered"
        return lambda: _missing(probe)

    def api_lists():
        def probe():
            listed = {m["id"] for m in requests.get(api + "/models", headers=auth, timeout=5).json()["data"]}
            return None if set(names) <= listed else f"lists {sorted(listed)}"
        return _missing(probe)

    def web_up():
        return _missing(lambda: requests.get(web + "/", timeout=5).raise_for_status())

    def answers(name):
        def probe():
            body = {"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
            r = requests.post(api + "/completions", json=body, headers=auth, timeout=120)
            if r.status_code in (400, 401, 403, 422):  # will not get better by waiting
                raise StartupError(f"model {name} refuses a one-token request: HTTP {r.status_code}: {r.text[:500]}")
            return None if r.status_code == 200 and r.json().get("choices") else f"HTTP {r.status_code}: {r.text[:300]}"
        return lambda: _missing(probe)

    def answers_directly(url):
        def probe():
            body = {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0, "echo": False}
            reply = requests.post(url + "/worker_generate", json=body, timeout=120).json()
            return None if reply.get("error_code") == 0 else f"error {reply.get('error_code')}: {reply.get('text')}"
        return lambda: _missing(probe)

    def name(w):
        return f"model {w.model.name}" + (f" (replica {w.replica})" if w.model.replicas > 1 else "")

    registrations = [Check(w.program, f"{name(w)} registered as {stack.worker_url(w.port)}",
                           registered(stack.worker_url(w.port))) for w in workers]
    if deployment.role == "worker":
        # The head's controller is not this host's program: a failure shows the first worker's log.
        return [
            Check(workers[0].program, f"head's controller at {controller}", controller_up),
            *registrations,
            *[Check(w.program, f"{name(w)} answers", answers_directly(stack.worker_url(w.port))) for w in workers],
        ]
    return [
        Check("controller", f"controller at {controller}", controller_up),
        *registrations,
        Check("api", f"OpenAI API at {api}", api_lists),
        Check("web", f"web UI at {web}", web_up),
        *[Check(w.program, f"model {w.model.name} answers through the API", answers(w.model.name))
          for w in workers if w.replica == 1],
    ]


def _missing(probe: Callable[[], object]) -> str | None:
    """Run a probe: None if it passed, else why not (a refused connection is just 'not up yet')."""
    try:
        result = probe()
    except requests.ConnectionError:
        return "not answering yet"
    except (requests.RequestException, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return result if isinstance(result, str) else None


def _raise_if_failed(sup: Supervisor, since: float) -> None:
    # A program that dies after its first seconds is RUNNING again moments later
    # (autorestart), so look at when it last stopped, not only at its state now.
    for p in sup.processes():
        if p["statename"] in FAILED_STATES or p["stop"] >= since:
            if p["statename"] in FAILED_STATES:
                why = f"{p['statename']}: {p['spawnerr'] or 'exit status ' + str(p['exitstatus'])}"
            else:
                why = "it exited and supervisor restarted it"
            raise StartupError(
                f"{p['name']} failed to start ({why}).\n"
                f"last lines of {sup.log_file(p['name'])}:\n{sup.tail(p['name'])}\n"
                f"supervisor keeps restarting it; fix the cause and run `make up` again, or `make down`."
            )
