"""Named dashboard users: a users file of argon2id salted hashes, the roles, and what each role may do.

The file (``fedbus coordinator users add|remove|passwd``, ``serve --users FILE``) is JSON,
``{"users": {"ada": {"role": "approver", "hash": "$argon2id$...", "created_at": ...}}}``,
written atomically with mode 0600. A hash is argon2-cffi's (salted, memory-hard); the
password itself is never stored or logged. Roles are fixed here, once:

* ``viewer`` reads everything and may run the audit (a check that changes nothing);
* ``researcher`` also designs experiments and starts and stops runs;
* ``approver`` also marks a model valid (signs a registry entry); an approver does not
  start runs, so whoever trains a model is not the one who vouches for it;
* ``admin`` may do everything.

The ``serve --token`` secret stays as the machine-to-machine option: a request that
carries it acts as the ``admin`` named ``token``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from protocol.durable import write_atomic

ROLES = ("viewer", "researcher", "approver", "admin")
# action -> roles allowed; every state-changing route names one of these (app.py, designer.py, registry_routes.py)
ALLOWED: dict[str, frozenset[str]] = {
    "design": frozenset({"researcher", "admin"}),  # save an experiment to STATE/experiments/
    "start": frozenset({"researcher", "admin"}),
    "stop": frozenset({"researcher", "admin"}),
    "approve": frozenset({"approver", "admin"}),  # mark valid: a signed approval and registry entry
}
NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
TOKEN_USER = "token"  # who a request with the machine-to-machine token acts as

_hasher = PasswordHasher()


class UsersError(ValueError):
    """A bad user name, role, password or users file; the message says which and how to fix it."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, action: str) -> bool:
        return self.role in ALLOWED[action]


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsersError(f"user name {name!r}: 1-64 characters, lower-case letters, digits, '.', '_' or '-', "
                         "starting with a letter")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UsersError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise UsersError(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters (got {len(password)})")
    return password


class UsersFile:
    """The users file; every change re-reads it and writes it back atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, object]]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsersError(f"users file {self.path}: cannot read it as JSON ({e})") from None
        users = doc.get("users") if isinstance(doc, dict) else None
        if not isinstance(users, dict) or not all(
                isinstance(u, dict) and u.get("role") in ROLES and isinstance(u.get("hash"), str) for u in users.values()):
            raise UsersError(f"users file {self.path}: expected {{\"users\": {{NAME: {{\"role\", \"hash\"}}}}}}; "
                             "manage it with `fedbus coordinator users add|remove|passwd`")
        return users

    def _save(self, users: dict[str, dict[str, object]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"users": users}, indent=2, sort_keys=True).encode("utf-8"))
        os.chmod(self.path, 0o600)

    def add(self, name: str, role: str, password: str) -> None:
        users = self.load()
        check_name(name), check_role(role), check_password(password)
        if name in users:
            raise UsersError(f"user {name!r} exists already: change the password with `users passwd {name}`")
        users[name] = {"role": role, "hash": _hasher.hash(password), "created_at": time.time()}
        self._save(users)

    def remove(self, name: str) -> None:
        users = self.load()
        if name not in users:
            raise UsersError(f"no user {name!r} in {self.path}")
        del users[name]
        self._save(users)

    def passwd(self, name: str, password: str, role: str | None = None) -> None:
        users = self.load()
        if name not in users:
            raise UsersError(f"no user {name!r} in {self.path}: add one with `users add {name} --role ROLE`")
        check_password(password)
        users[name]["hash"] = _hasher.hash(password)
        if role is not None:
            users[name]["role"] = check_role(role)
        self._save(users)

    def verify(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (the same answer for an unknown name)."""
        users = self.load()
        entry = users.get(name)
        if entry is None or len(password) > MAX_PASSWORD:
            _hasher.hash("x" * MIN_PASSWORD)  # about as slow as a real check: no timing hint that the name is unknown
            return None
        try:
            _hasher.verify(str(entry["hash"]), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return User(name, str(entry["role"]))
