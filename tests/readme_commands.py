"""Run the README's commands as a new user would: every command of its fenced bash blocks and every fenced
python block, in the README's order, from the repository root, in one shell.

    python tests/readme_commands.py [--repo DIR] [--fast] [--from LINE] [--list]

Bash blocks: each command (lines joined at a trailing backslash; a `for ... done` loop is one command) runs
in one bash session under `set -eo pipefail`, so `source .venv/bin/activate` carries over to what follows.
Python blocks: saved to out/readme/block_<n>.py and run with `python FILE`, as a user saves and runs a
script (so a missing `if __name__ == "__main__":` guard matters as it would for them).

--fast skips the set-up (`make ...`: the caller provides .venv and out/demo/tiny, e.g. `make demo` once, or
`megaserve make-checkpoint --preset tiny --out out/demo/tiny`) and the commands that take minutes (the
benchmarks under bench/, `bench offline`, `bench sweep`, `pytest ...`). Everything else runs exactly as written.
Each command's wall time is printed after it (`<<< line N: S s`).
--from LINE starts at the first command on or after that README line (to go on after a failure).
Exit status 0 when every command exited 0; otherwise the output ends with the failing command.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\w*)\s*$")
# Commands --fast leaves out: the set-up, and what takes minutes on a 2-core CPU (the benchmarks, and test
# suites the README names: pytest runs those itself).
SLOW = (re.compile(r"^make\b"), re.compile(r"^python (bench/|-m bench\.)"),
        re.compile(r"^megaserve bench (offline|sweep)\b"), re.compile(r"^pytest\b"))


@dataclass(frozen=True)
class Command:
    kind: str  # "bash" | "python"
    text: str  # one shell command, or a whole python block
    line: int  # where it starts in the README (1-based)

    @property
    def slow(self) -> bool:
        return self.kind == "bash" and any(p.search(self.text) for p in SLOW)


def fenced_blocks(markdown: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    blocks: list[tuple[str, int, list[str]]] = []
    lang, start, body = None, 0, []
    for n, line in enumerate(markdown.splitlines(), start=1):
        m = _FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1), n + 1, []
        elif line.strip() == "```" and lang is not None:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ValueError(f"README: the block opened on line {start - 1} is never closed")
    return blocks


def bash_commands(start: int, lines: list[str]) -> list[Command]:
    """The commands of a bash block: comments and blank lines dropped, continuations and loops joined."""
    out: list[Command] = []
    pending: list[str] = []
    first = 0
    depth = 0  # open for/while loops
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            first = start + i
        pending.append(line)
        words = line.split()
        depth += sum(w in ("for", "while") for w in words[:1]) - sum(w.startswith("done") for w in words[:1])
        if line.endswith("\\") or depth > 0:
            continue
        out.append(Command("bash", "\n".join(pending), first))
        pending = []
    if pending:
        raise ValueError(f"README line {first}: a command never ends (trailing backslash or open loop)")
    return out


def readme_commands(readme: Path) -> list[Command]:
    commands: list[Command] = []
    for lang, start, lines in fenced_blocks(readme.read_text()):
        if lang == "bash":
            commands += bash_commands(start, lines)
        elif lang == "python":
            commands.append(Command("python", "\n".join(lines) + "\n", start))
    return commands


def shell_script(commands: list[Command], repo: Path) -> str:
    """One bash script running `commands` in order; python blocks go to out/readme/block_<line>.py."""
    blocks = repo / "out" / "readme"
    parts = ["set -eo pipefail", f"cd {shlex.quote(str(repo))}"]
    for c in commands:
        parts.append(f"echo {shlex.quote(f'>>> README line {c.line}:')}")
        parts.append("_t0=${EPOCHREALTIME/./}")
        if c.kind == "bash":
            parts.append(f"echo {shlex.quote(c.text)}")
            parts.append(c.text)
        else:
            blocks.mkdir(parents=True, exist_ok=True)
            path = blocks / f"block_{c.line}.py"
            path.write_text(c.text)
            rel = path.relative_to(repo)
            parts.append(f"echo {shlex.quote(f'python {rel}')}")
            parts.append(f"python {shlex.quote(str(rel))}")
        parts.append(f"_ms=$(( (${{EPOCHREALTIME/./}} - _t0) / 1000 )); "
                     f"printf '\\n<<< line {c.line}: %d.%03d s\\n' $((_ms / 1000)) $((_ms % 1000))")
    parts.append("echo '>>> every README command ran'")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose README runs, from its root")
    ap.add_argument("--fast", action="store_true", help="skip the set-up (make) and the minutes-long benchmarks")
    ap.add_argument("--from", dest="from_line", type=int, default=1, metavar="LINE",
                    help="start at the first command on or after this README line")
    ap.add_argument("--list", action="store_true", help="print the commands instead of running them")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    commands = [c for c in readme_commands(repo / "README.md")
                if not (args.fast and c.slow) and c.line >= args.from_line]
    if args.list:
        for c in commands:
            print(f"--- line {c.line} ({c.kind})\n{c.text.rstrip()}")
        return 0
    script = shell_script(commands, repo)
    return subprocess.run(["bash", "-c", script], cwd=repo).returncode


if __name__ == "__main__":
    sys.exit(main())
