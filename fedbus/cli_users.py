"""``fedbus coordinator users add|remove|passwd``: the dashboard's named users (fedbus/dashboard/users.py).

Passwords are read from a hidden prompt (twice) or, for scripts, one line on stdin
(``--password-stdin``); never from the command line, where ``ps`` and shell histories show them.
Bad input: one line naming what is wrong, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Dashboard users (name, role, argon2 password hash).", no_args_is_help=True)
FILE = typer.Option(..., "--file", help="The users file (give it to `coordinator serve --users`).")
STDIN = typer.Option(False, "--password-stdin", help="Read the password from one line on stdin.")


def _fail(message: str) -> None:
    typer.echo(f"fedbus coordinator users: {message}", err=True)
    raise typer.Exit(2)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = typer.prompt("password", hide_input=True)
    if typer.prompt("again", hide_input=True) != first:
        _fail("the two passwords differ")
    return first


def _do(fn, *args) -> None:
    from fedbus.dashboard.users import UsersError

    try:
        fn(*args)
    except UsersError as e:
        _fail(str(e))


@app.command("add")
def add(name: str = typer.Argument(...), role: str = typer.Option(..., "--role", help="viewer | researcher | approver | admin"),
        file: Path = FILE, password_stdin: bool = STDIN) -> None:
    """Add a user with a role; asks for the password."""
    from fedbus.dashboard.users import UsersFile, check_name, check_role

    _do(check_name, name)
    _do(check_role, role)
    _do(UsersFile(file).load)
    _do(UsersFile(file).add, name, role, _password(password_stdin))
    typer.echo(f"added {name} ({role}) to {file}", err=True)


@app.command("remove")
def remove(name: str = typer.Argument(...), file: Path = FILE) -> None:
    """Remove a user (their open sessions end when the dashboard restarts)."""
    from fedbus.dashboard.users import UsersFile

    _do(UsersFile(file).remove, name)
    typer.echo(f"removed {name} from {file}", err=True)


@app.command("passwd")
def passwd(name: str = typer.Argument(...), file: Path = FILE, password_stdin: bool = STDIN,
           role: Optional[str] = typer.Option(None, "--role", help="Also change the role.")) -> None:
    """Set a user's password (and, with --role, their role)."""
    from fedbus.dashboard.users import UsersFile, check_role

    if role is not None:
        _do(check_role, role)
    users = UsersFile(file)
    known = users.load() if file.exists() else {}
    if name not in known:
        _fail(f"no user {name!r} in {file}: add one with `users add {name} --role ROLE --file {file}`")
    _do(users.passwd, name, _password(password_stdin), role)
    typer.echo(f"password of {name} changed in {file}", err=True)
