"""Login accounts for the web UI: a YAML file of user names and scrypt password hashes.

    python -m launch.web_users add NAME [--file conf/web-users.yaml]   # asks for the password
    python -m launch.web_users remove NAME [--file ...]

Point `web.users_file` in conf/stack.yaml at the file; `make up` then requires a login, and
refuses to serve the UI on a non-loopback address without one.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys
from pathlib import Path

import yaml

DEFAULT_FILE = Path("conf/web-users.yaml")
# scrypt at the cost OWASP recommends for interactive logins (about 50 ms here).
N, R, P = 2**15, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, maxmem=64 * 2**20)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 2**20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


def load(path: Path) -> dict[str, str]:
    """name → hash; a clear ValueError for a file that is not such a mapping."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    users = (data or {}).get("users") if isinstance(data, dict) or data is None else None
    if users is None or not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
        raise ValueError(f"{path}: expected 'users:' mapping each name to a hash made by `python -m launch.web_users add`")
    return {str(k): v for k, v in users.items()}


def authenticator(path: Path):
    """A gradio `auth` callable checking names and passwords against the file."""
    users = load(path)
    # An unknown name costs the same scrypt as a known one: timing does not tell names apart.
    nobody = hash_password(os.urandom(16).hex())

    def check(name: str, password: str) -> bool:
        return verify(users.get(name, nobody), password) and name in users

    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Manage web UI logins.")
    parser.add_argument("action", choices=["add", "remove"])
    parser.add_argument("name")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(argv)
    users = load(args.file) if args.file.is_file() else {}
    if args.action == "remove":
        if users.pop(args.name, None) is None:
            print(f"no user '{args.name}' in {args.file}", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else _ask()
        if len(password) < 8:
            print("the password must have at least 8 characters", file=sys.stderr)
            return 1
        users[args.name] = hash_password(password)
    args.file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, even briefly
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump({"users": users}))
    tmp.replace(args.file)
    print(f"{args.file}: {args.action} {args.name} ({len(users)} users)")
    return 0


def _ask() -> str:
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        raise SystemExit("the passwords differ")
    return password


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


if __name__ == "__main__":
    sys.exit(main())
