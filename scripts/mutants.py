"""``make mutants``: plant each curated bug (scripts/mutant_catalogue.py) and check a test fails.

For every mutant: copy the working tree (tracked + untracked, not ignored) once into a
scratch directory, apply the mutant's exact replacements there, run its test files with
``pytest -x`` (``PYTHONPATH`` = the copy, so subprocesses run the mutated code too) under
a per-mutant timeout, restore the files, and record

* ``caught``   a test failed; the first failing test is named;
* ``survived`` every test passed: a guarantee without a test;
* ``stale``    a replacement no longer matches exactly once (the code moved): fix the mutant;
* ``skipped``  every selected test skipped (no broker?): nothing was checked;
* ``timeout`` / ``error``  pytest hung or could not run (collection error, bad node id).

Afterwards the tests that caught something are re-run on the *unmutated* copy: a test that
fails there catches nothing, and its mutant becomes ``error``. The exit status is 0 only when
every mutant that ran was caught. Progress goes to stderr and to ``OUT/mutants.log``; the
results to ``OUT/results.json`` and, with ``--markdown``, to a table.

    python scripts/mutants.py                 # everything that can run here
    python scripts/mutants.py --check         # only: does every mutant still apply? (seconds)
    python scripts/mutants.py --only ack-before-commit --only late-update-counted
    python scripts/mutants.py --no-broker     # leave out mutants whose tests need RabbitMQ
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.mutant_catalogue import MUTANTS, Mutant  # noqa: E402

DEFAULT_TIMEOUT_S = 420.0


@dataclass
class Outcome:
    name: str
    status: str  # caught | survived | stale | skipped | timeout | error | not_run
    caught_by: str | None = None
    seconds: float = 0.0
    detail: str = ""
    tests: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- applying


def stale_reasons(mutant: Mutant, root: Path) -> list[str]:
    """Why ``mutant`` does not apply to the tree at ``root`` (empty when every edit matches once)."""
    problems = []
    for e in mutant.edits:
        path = root / e.file
        if not path.is_file():
            problems.append(f"{e.file}: file is gone")
            continue
        n = path.read_text(encoding="utf-8").count(e.old)
        if n != 1:
            first = e.old.strip().splitlines()[0][:70] if e.old.strip() else repr(e.old)
            problems.append(f"{e.file}: {first!r} occurs {n} times (must be exactly once)")
    if not problems:
        mutated: dict[str, str] = {}
        for e in mutant.edits:
            text = mutated.get(e.file) or (root / e.file).read_text(encoding="utf-8")
            mutated[e.file] = text.replace(e.old, e.new, 1)
        for f, text in mutated.items():
            if f.endswith(".py"):
                try:
                    compile(text, f, "exec")
                except SyntaxError as err:
                    problems.append(f"{f}: the mutated file does not compile ({err.msg}, line {err.lineno})")
    for t in mutant.tests:
        if not (root / t.split("::")[0]).is_file():
            problems.append(f"test {t} does not exist")
    return problems


def apply(mutant: Mutant, root: Path) -> dict[Path, str]:
    """Apply every edit in place; returns the original texts for ``restore``."""
    originals: dict[Path, str] = {}
    for e in mutant.edits:
        path = root / e.file
        originals.setdefault(path, path.read_text(encoding="utf-8"))
        current = path.read_text(encoding="utf-8")
        path.write_text(current.replace(e.old, e.new, 1), encoding="utf-8")
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text, encoding="utf-8")


def scratch_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, minus ignored) under ``dest``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


# ---------------------------------------------------------------------------- running


def run_pytest(root: Path, tests: list[str], *, marks: str | None, timeout_s: float, log_path: Path,
               stop_first: bool = True, env_extra: dict[str, str] | None = None) -> tuple[str, str | None, str]:
    """(status, first failing test, detail) of pytest over ``tests`` in the copy at ``root``."""
    junit = log_path.with_suffix(".xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={junit}", "--timeout", str(int(timeout_s)), *(["-x"] if stop_first else [])]
    if marks:
        cmd += ["-m", marks]
    cmd += tests
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1", **(env_extra or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", None, f"no result after {timeout_s:.0f} s (see {log_path})"
    failed, ran, skipped = _junit(junit)
    if rc == 1 and failed:
        return "caught", failed[0], f"{len(failed)} failed of {ran}"
    if rc == 0:
        if ran and skipped == ran:
            return "skipped", None, f"all {ran} selected tests skipped"
        return "survived", None, f"{ran - skipped} passed, {skipped} skipped"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return "error", None, f"pytest exit {rc}: {' | '.join(tail)}"


def _junit(path: Path) -> tuple[list[str], int, int]:
    """Failed test ids (in order), tests run, tests skipped, from a junit XML report."""
    if not path.exists():
        return [], 0, 0
    failed, ran, skipped = [], 0, 0
    for case in ET.parse(path).getroot().iter("testcase"):
        ran += 1
        if case.find("skipped") is not None:
            skipped += 1
        if case.find("failure") is not None or case.find("error") is not None:
            cls = case.get("classname", "")
            failed.append(f"{cls.replace('.', '/')}.py::{case.get('name')}" if cls else case.get("name", "?"))
    return failed, ran, skipped


def run_mutant(mutant: Mutant, root: Path, *, timeout_s: float, logs: Path) -> Outcome:
    problems = stale_reasons(mutant, root)
    if problems:
        return Outcome(mutant.name, "stale", detail="; ".join(problems), tests=mutant.tests)
    originals = apply(mutant, root)
    t0 = time.monotonic()
    try:
        status, by, detail = run_pytest(root, list(mutant.tests), marks=mutant.marks,
                                        timeout_s=mutant.timeout_s or timeout_s,
                                        log_path=logs / f"{mutant.name}.log")
    finally:
        restore(originals)
    return Outcome(mutant.name, status, by, round(time.monotonic() - t0, 1), detail, mutant.tests)


def collected(root: Path, tests: list[str]) -> set[str]:
    """Which of ``tests`` (node ids) the unmutated copy at ``root`` has. A catching test can exist
    only under its mutant: a property test parametrised over every row-independent layer type gets
    a ``[BatchNorm1d]`` case when the mutant declares BatchNorm row-independent."""
    files = sorted({t.split("::", 1)[0] for t in tests})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          "--collect-only", *files], cwd=root, env=env, capture_output=True, text=True)
    ids = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    return {t for t in tests if t in ids}


def verify_catchers(outcomes: list[Outcome], root: Path, *, timeout_s: float, logs: Path,
                    say) -> None:
    """Re-run every catching test on the unmutated copy; a test failing there proves nothing."""
    catchers = sorted({o.caught_by for o in outcomes if o.status == "caught" and o.caught_by})
    present = collected(root, catchers)
    for gone in sorted(set(catchers) - present):  # e.g. a parametrisation the mutant itself adds
        say(f"verify: {gone} exists only under its mutant (nothing to re-run)")
    catchers = [c for c in catchers if c in present]
    if not catchers:
        return
    say(f"verify: {len(catchers)} catching test(s) on the unmutated tree")
    slowest = max([timeout_s, *(m.timeout_s or 0 for m in MUTANTS)])
    status, first, detail = run_pytest(root, catchers, marks=None, timeout_s=timeout_s + slowest,
                                       log_path=logs / "verify.log", stop_first=False)
    if status == "survived":
        return
    failed, _, _ = _junit((logs / "verify.log").with_suffix(".xml"))
    bad = set(failed) if failed else set(catchers)
    for o in outcomes:
        if o.caught_by in bad:
            o.status, o.detail = "error", f"{o.caught_by} fails without the mutant too ({status}: {detail})"


# ---------------------------------------------------------------------------- report


def markdown(outcomes: list[Outcome]) -> str:
    by_name = {m.name: m for m in MUTANTS}
    lines = ["| mutant | guarantee broken | result | first test that failed | time (s) |",
             "|---|---|---|---|---|"]
    for o in outcomes:
        m = by_name[o.name]
        lines.append(f"| `{o.name}` | {m.guarantee} | {o.status} | "
                     f"{'`' + o.caught_by + '`' if o.caught_by else o.detail} | {o.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies (no tests)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutants")
    ap.add_argument("--no-broker", action="store_true", help="leave out mutants whose tests need RabbitMQ")
    ap.add_argument("--private-broker", action="store_true",
                    help="also run mutants whose tests restart the broker (FEDBUS_AMQP_URL must be a node you own)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutant (default %(default)s)")
    ap.add_argument("--no-verify", action="store_true", help="skip re-running the catching tests unmutated")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "mutants", help="log and results directory")
    ap.add_argument("--markdown", type=Path, help="also write the result table (Markdown) here")
    args = ap.parse_args(argv)

    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"--only: no mutant named {', '.join(sorted(unknown))}; see --list")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            flags = " [broker]" if m.broker else ""
            flags += " [restarts broker]" if m.private_broker else ""
            print(f"{m.name}{flags}: {m.guarantee}\n    tests: {' '.join(m.tests)}" + (f"  -m '{m.marks}'" if m.marks else ""))
        return 0
    if args.check:
        stale = {m.name: stale_reasons(m, REPO) for m in chosen}
        for name, problems in stale.items():
            print(f"{'STALE' if problems else 'ok   '} {name}" + (f": {'; '.join(problems)}" if problems else ""))
        return 1 if any(stale.values()) else 0

    args.out = args.out.resolve()  # pytest runs in the scratch copy: a relative --junitxml would land there
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    log_file = open(args.out / "mutants.log", "a", encoding="utf-8")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedbus-mutants-") as tmp:
        root = scratch_copy(Path(tmp) / "tree")
        say(f"scratch copy of the working tree at {root}; {len(chosen)} mutant(s)")
        for i, m in enumerate(chosen, 1):
            if (m.broker and args.no_broker) or (m.private_broker and not args.private_broker):
                why = "--no-broker" if m.broker and args.no_broker else "restarts the broker: needs --private-broker"
                outcomes.append(Outcome(m.name, "not_run", detail=why, tests=m.tests))
                say(f"[{i}/{len(chosen)}] {m.name}: not run ({why})")
                continue
            say(f"[{i}/{len(chosen)}] {m.name} ...")
            o = run_mutant(m, root, timeout_s=args.timeout, logs=logs)
            outcomes.append(o)
            say(f"[{i}/{len(chosen)}] {m.name}: {o.status.upper()} in {o.seconds:.1f} s"
                + (f" by {o.caught_by}" if o.caught_by else f" ({o.detail})"))
        if not args.no_verify:
            verify_catchers(outcomes, root, timeout_s=args.timeout, logs=logs, say=say)
    total = time.monotonic() - started
    counts = {s: sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes})}
    say(f"done in {total:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    (args.out / "results.json").write_text(json.dumps({"total_s": round(total, 1),
                                                       "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    table = markdown(outcomes)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    bad = [o for o in outcomes if o.status not in ("caught", "not_run")]
    for o in bad:
        say(f"FAIL {o.name}: {o.status} - {o.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
