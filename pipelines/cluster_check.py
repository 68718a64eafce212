"""Security check of a Ray cluster launcher config (``cluster.yaml``) before ``ray up``.

The services a cluster's head starts must not be open to whoever can reach the machine:
MLflow runs its basic-auth app and listens on the private address (never ``0.0.0.0``), the Ray
dashboard / Jobs API listens on 127.0.0.1 (reached through ``ray dashboard cluster.yaml``) with
token authentication left on, and no credential is written into the file itself.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from attmask.errors import ConfigError

COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
SECRETS = ("RAY_AUTH_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY", "admin_password")
OPEN_HOSTS = ("0.0.0.0", "::", "[::]")
# A key whose literal value is a credential wherever it appears in the file (provider blocks,
# environment maps, node types); ssh_private_key is a path by the launcher's schema.
CREDENTIAL_KEY = re.compile(r"(password|passwd|secret|token|api_?key|access_?key|private_?key|"
                            r"credential)", re.IGNORECASE)
NOT_A_CREDENTIAL = {"ssh_private_key"}
URI_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@", re.IGNORECASE)


def _commands(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(key, cmd) for key in COMMAND_KEYS for cmd in cfg.get(key) or []]
    for name, node in (cfg.get("available_node_types") or {}).items():
        found += [(f"available_node_types.{name}.{key}", cmd)
                  for key in COMMAND_KEYS for cmd in node.get(key) or []]
    return [(key, " ".join(str(cmd).split())) for key, cmd in found]


def _words(command: str) -> list[list[str]]:
    """The words of a command line, and of every command a shell wrapper in it runs
    (``bash -c '...'``, ``sh -lc "..."``), so a wrapped ``mlflow server`` is still seen."""
    try:
        words = shlex.split(command, posix=True)
    except ValueError:
        words = command.split()
    out = [words]
    for i, word in enumerate(words[:-1]):
        if Path(word).name in ("bash", "sh", "zsh", "dash") and i + 1 < len(words):
            flags = words[i + 1]
            if flags.startswith("-") and "c" in flags and i + 2 < len(words):
                out += _words(words[i + 2])
    return out


def _option(words: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``words``."""
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _programs(command: str, program: list[str]) -> list[list[str]]:
    """Every invocation of ``program`` (e.g. ["mlflow", "server"]) in a shell command line,
    inside shell wrappers too."""
    found, n = [], len(program)
    for words in _words(command):
        for i in range(len(words) - n + 1):
            if words[i:i + n] == program:
                end = next((j for j in range(i + n, len(words))
                            if words[j] in ("&&", "||", ";", "&", "|", ">")
                            or words[j].endswith(";")), len(words))
                found.append(words[i + n:end])
    return found


def _leaves(node: Any, path: str = ""):
    """(dotted path, key, value) of every scalar in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, path.rsplit(".", 1)[-1].split("[")[0], node


def credential_problems(cfg: dict[str, Any]) -> list[str]:
    """Credentials written into the file itself: a key that names one with a literal value,
    or a password inside a URI (``http://user:pass@host``)."""
    problems = []
    for path, key, value in _leaves(cfg):
        if value is None or isinstance(value, bool):
            continue
        text = str(value)
        if (CREDENTIAL_KEY.search(key) and key not in NOT_A_CREDENTIAL and text.strip()
                and not text.startswith("$")):
            problems.append(f"{path}: a credential is written into the file; read it from a "
                            "secret store or the environment at start-up instead")
        elif (m := URI_PASSWORD.search(text)) and not m.group(1).startswith("$"):
            problems.append(f"{path}: a URI carries a password (user:PASSWORD@host); pass it "
                            "through MLFLOW_TRACKING_PASSWORD from a secret instead")
    return problems


def security_problems(cfg: dict[str, Any]) -> list[str]:
    """What in ``cfg`` leaves a service open or a credential in the file; empty when secure."""
    problems = []
    for key, command in _commands(cfg):
        for args in _programs(command, ["mlflow", "ui"]):
            host = _option(args, "--host") or _option(args, "-h") or "127.0.0.1"
            if host in OPEN_HOSTS:
                problems.append(f"{key}: `mlflow ui --host {host}` serves every run, without "
                                "authentication, on every interface; use `mlflow server "
                                "--app-name basic-auth` on the head's private address")
        for args in _programs(command, ["mlflow", "server"]):
            host = _option(args, "--host") or _option(args, "-h") or "127.0.0.1"
            if _option(args, "--app-name") != "basic-auth":
                problems.append(f"{key}: `mlflow server` without `--app-name basic-auth` lets "
                                "anyone who reaches it read and delete every run")
            if host in OPEN_HOSTS:
                problems.append(f"{key}: `mlflow server --host {host}` listens on every "
                                "interface; use the head's private address (workers) or "
                                "127.0.0.1 (port forwarding)")
        for args in _programs(command, ["ray", "start"]):
            if "--head" in args and (_option(args, "--dashboard-host") or "") in OPEN_HOSTS:
                problems.append(f"{key}: `ray start --dashboard-host="
                                f"{_option(args, '--dashboard-host')}` opens the dashboard and "
                                "Jobs API to the network; use 127.0.0.1 and `ray dashboard "
                                "cluster.yaml` to forward it")
        if re.search(r"\bRAY_AUTH_MODE=disabled\b", command):
            problems.append(f"{key}: RAY_AUTH_MODE=disabled turns Ray's token authentication off")
        for secret in SECRETS:
            literal = re.search(rf"\b{secret}\s*[=:]\s*['\"]?([^\s'\";]+)", command)
            if literal and not literal.group(1).startswith("$"):
                problems.append(f"{key}: {secret} is written into the file; read it from a "
                                "secret store or the environment at start-up instead")
    return problems + [p for p in credential_problems(cfg)
                       if not any(p.split(":")[0] == q.split(":")[0] for q in problems)]


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Load ``path`` and raise one ``ConfigError`` naming the first problem, if any."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read a cluster config ({exc.__class__.__name__})") \
            from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a Ray cluster launcher config (a mapping)")
    problems = security_problems(cfg)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{path}: {problems[0]}{more}")
    return cfg
