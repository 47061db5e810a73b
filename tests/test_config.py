"""A broken configuration gets one clear message naming the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from launch import config
from launch.config import ConfigError
from tests.conftest import ROOT, make_conf


def load_error(conf, profile="demo") -> str:
    with pytest.raises(ConfigError) as err:
        config.load(conf, profile)
    return str(err.value)


def edit(path, **changes):
    data = yaml.safe_load(path.read_text()) | changes
    path.write_text(yaml.safe_dump(data))


def test_shipped_conf_loads():
    d = config.load(ROOT / "conf", "demo")
    assert [m.name for m in d.models] == ["smollm2-135m", "smollm2-135m-int8"]
    assert [m.quant for m in d.models] == ["none", "int8"]
    assert [m.quant_lm_head for m in d.models] == [True, False]  # SmolLM2 int8 keeps lm_head + embeddings bf16
    assert all(m.quant_lm_head for m in config.load(ROOT / "conf", "seed-int8").models)  # 7B: lm_head int8 too
    assert d.stack.api.port == 8000 and d.stack.web.port == 7860
    assert d.stack.controller.host == "127.0.0.1"  # unauthenticated: loopback only by default
    assert d.profile_config.questions == "seed-en"


def test_bad_dtype_names_file_key_and_choices(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", dtype="fp8")
    msg = load_error(conf)
    assert "smollm2-135m.yaml" in msg and "dtype" in msg and "'bfloat16' or 'float32'" in msg and "'fp8'" in msg


def test_quant_lm_head_false_needs_quant_int8(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", quant_lm_head=False)  # quant: none, the default
    msg = load_error(conf)
    assert "smollm2-135m.yaml: quant_lm_head: false has no effect without quant: int8" in msg
    assert "remove quant_lm_head or set quant: int8" in msg
    edit(conf / "models" / "smollm2-135m.yaml", quant="int8")
    assert [m.quant_lm_head for m in config.load(conf).models] == [False, False]


def test_misspelt_key_lists_the_allowed_ones(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", threds=2)
    msg = load_error(conf)
    assert "threds: unknown key" in msg and "threads" in msg


def test_misspelt_nested_key_lists_the_keys_of_that_section(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "stack.yaml", api={"host": "127.0.0.1", "prot": 8000})
    msg = load_error(conf)
    assert "stack.yaml" in msg and "api.prot: unknown key" in msg and "host, port" in msg


def test_port_out_of_range(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "stack.yaml", web={"port": 70000})
    msg = load_error(conf)
    assert "web.port" in msg and "65535" in msg and "70000" in msg


def test_profile_with_unknown_model_lists_known_models(tmp_path):
    conf = make_conf(tmp_path, profile={"models": ["smollm2-135m", "gpt-5"]})
    msg = load_error(conf, "test")
    assert "test.yaml" in msg and "models[1]" in msg and "'gpt-5'" in msg and "smollm2-135m" in msg


def test_unknown_profile_lists_profiles(tmp_path):
    msg = load_error(make_conf(tmp_path), "prod")
    assert "no profile 'prod'" in msg and "demo" in msg


def test_model_listed_twice(tmp_path):
    msg = load_error(make_conf(tmp_path, profile={"models": ["smollm2-135m", "smollm2-135m"]}), "test")
    assert "listed twice: smollm2-135m" in msg


def test_unknown_template(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", template="chatml-typo")
    msg = load_error(conf)
    assert "template" in msg and "'chatml-typo'" in msg and "smollm2" in msg


def test_unknown_source_kind(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", source={"kind": "s3", "path": "x"})
    msg = load_error(conf)
    assert "source" in msg and "'pypi-gguf'" in msg and "'local'" in msg


def test_missing_required_key(tmp_path):
    conf = make_conf(tmp_path)
    data = yaml.safe_load((conf / "models" / "smollm2-135m.yaml").read_text())
    del data["template"]
    (conf / "models" / "smollm2-135m.yaml").write_text(yaml.safe_dump(data))
    assert "template: required key is missing" in load_error(conf)


def test_name_must_match_file(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", name="smollm2")
    assert "must match the file name 'smollm2-135m'" in load_error(conf)


def test_invalid_yaml(tmp_path):
    conf = make_conf(tmp_path)
    (conf / "stack.yaml").write_text("api: {port: 8000\n")
    msg = load_error(conf)
    assert "stack.yaml: not valid YAML" in msg and "line" in msg


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path / "cache"))
    assert config.load(make_conf(tmp_path)).stack.model_cache_dir == tmp_path / "cache"


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "models" / "smollm2-135m.yaml", dtype="fp8")
    done = subprocess.run([sys.executable, "-m", "deploy", "--conf", str(conf), "up"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "dtype" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "supervisord.pid").exists(), "nothing may start on a bad config"


def test_web_ui_off_loopback_needs_logins(tmp_path):
    conf = make_conf(tmp_path)
    edit(conf / "stack.yaml", web={"host": "0.0.0.0", "port": 7860})
    msg = load_error(conf)
    assert "web.host 0.0.0.0 is reachable from other machines" in msg and "python -m launch.web_users add" in msg


def test_unreadable_users_file(tmp_path):
    conf = make_conf(tmp_path)
    (tmp_path / "users.yaml").write_text("alice: not-a-mapping-of-users\n")
    edit(conf / "stack.yaml", web={"port": 7860, "users_file": str(tmp_path / "users.yaml")})
    msg = load_error(conf)
    assert "web.users_file" in msg and "expected 'users:'" in msg


def edit_controller(conf, **changes):
    stack = yaml.safe_load((conf / "stack.yaml").read_text())
    edit(conf / "stack.yaml", controller=stack["controller"] | changes)


def role_error(conf, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(conf, "demo", **kwargs)
    return str(err.value)


def test_roles_pick_the_processes_of_a_host(tmp_path):
    conf = make_conf(tmp_path)
    (tmp_path / "secret").write_text("s" * 32)
    edit_controller(conf, host="10.0.0.1", secret_file=str(tmp_path / "secret"))
    head = config.load(conf, "demo", role="head", models=[])
    assert [m.name for m in head.models] == ["smollm2-135m", "smollm2-135m-int8"] and head.workers() == []
    assert head.controller_url.startswith("http://10.0.0.1:")
    edit(conf / "stack.yaml", worker_host="0.0.0.0", worker_advertise_host="10.0.0.2")
    worker = config.load(conf, "demo", role="worker", controller="http://10.0.0.1:21001", models=["smollm2-135m"])
    assert [w.model.name for w in worker.workers()] == ["smollm2-135m"] and [m.name for m in worker.models] == ["smollm2-135m"]
    assert worker.controller_url == "http://10.0.0.1:21001"
    assert worker.stack.worker_url(21002) == "http://10.0.0.2:21002"


def test_role_mistakes_say_what_to_set(tmp_path):
    conf = make_conf(tmp_path)
    assert "not a role; use one of: all, head, worker" in role_error(conf, role="boss")
    assert "ROLE=worker needs CONTROLLER=http://HEAD:PORT" in role_error(conf, role="worker")
    assert "not a controller URL" in role_error(conf, role="worker", controller="10.0.0.1:21001")
    assert "CONTROLLER: only for ROLE=worker" in role_error(conf, role="head", controller="http://10.0.0.1:1")
    assert "controller.host: 127.0.0.1 cannot be reached by worker hosts" in role_error(conf, role="head")
    assert "controller.secret_file: required" in role_error(conf, role="worker", controller="http://10.0.0.1:21001")
    assert "MODELS: no model 'nope'" in role_error(conf, models=["nope"])
    assert "MODELS: empty" in role_error(conf, models=[])
    (tmp_path / "secret").write_text("s" * 32)
    edit_controller(conf, secret_file=str(tmp_path / "secret"))
    # Registering from loopback with a remote controller: the head could never reach the worker.
    msg = role_error(conf, role="worker", controller="http://10.0.0.1:21001")
    assert "worker_host: 127.0.0.1 cannot be reached from the head" in msg
    edit(conf / "stack.yaml", worker_host="0.0.0.0")
    assert "set worker_advertise_host" in load_error(conf)
