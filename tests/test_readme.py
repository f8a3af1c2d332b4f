"""The README as a new user meets it: its links stay inside the repository, and its commands run as written
(tests/readme_commands.py, in a copy of this checkout, with the documented set-up)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme_commands import bash_commands, readme_commands

REPO = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    return _LINK.findall(path.read_text())


DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
# A path of this repository named in backticks: `engine/...`, `cluster/...`, ... (a file or a folder).
_REPO_PATH = re.compile(r"`((?:engine|cluster|comm|scheduler|bench|tests|docs|examples|\.ci)/[^`\s:]*)`")
_URL = re.compile(r"\bhttps?://([^/\s`'\")]+)")


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_inside_the_repository(doc):
    """Every markdown link is a relative path to a file of this repository (an #anchor allowed)."""
    path = REPO / doc
    targets = _links(path)
    if doc == "README.md":
        assert "docs/architecture.md" in targets and "docs/model.md" in targets
    for target in targets:
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"{doc}: link to {target!r}"
        file = (path.parent / target.split("#", 1)[0]).resolve()
        assert file.is_relative_to(REPO) and file.exists(), f"{doc}: {target!r} is not a file of the repository"
    assert "../" not in path.read_text().replace("](../README.md)", ""), f"{doc} points outside the repository"


@pytest.mark.parametrize("doc", DOCS)
def test_no_address_outside_this_machine_and_every_named_path_exists(doc):
    """No web address but the local server's (a link or bare), no absolute path of the machine it was written
    on, and every repository path the text names in backticks exists."""
    text = (REPO / doc).read_text()
    hosts = {h.split(":")[0] for h in _URL.findall(text)}
    assert hosts <= {"127.0.0.1", "localhost"}, f"{doc}: addresses outside this machine: {sorted(hosts)}"
    assert "/work/" not in text and "/home/" not in text, f"{doc}: an absolute path of some machine"
    missing = sorted({p for p in _REPO_PATH.findall(text) if not (REPO / p).exists()})
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_metrics_the_readme_names_are_exported():
    """The README's metrics bullet (metric names in backticks, then `labels are ... only`) is what /metrics
    exports: every name it lists is a series, and the label names are exactly those it lists."""
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.server.metrics import PREFIX, Metrics

    text = (REPO / "README.md").read_text()
    bullet = re.search(r"^- Metrics \(`megaserve:` prefix\):(.*?)(?=^\S|^- )", text, re.S | re.M)
    assert bullet, "README: the `- Metrics (`megaserve:` prefix):` bullet is gone"
    listed, labels_part = bullet.group(1).split("labels are", 1)
    named_labels = set(re.findall(r"`(\w+)`", labels_part))
    m = Metrics()
    m.record_request(3)
    m.record_choice("stop", 2, 0.01, 0.1)
    m.record_error(400)
    stats = [{"rank": 0, "connected": True, "outstanding_tokens": 1,
              "engine": {"running": 1, "waiting": 0, "pages_used": 1, "pages_free": 3, "prefix_hit_rate": 0.5,
                         "expert_balance": [{"layer": 0, "balancedness": 0.9}]}}]
    families = list(text_string_to_metric_families(m.render(stats)))
    exported = {f.name.removeprefix(PREFIX) for f in families}
    for name in re.findall(r"`(\w+)(?:\{\w+\})?`", listed):
        assert name in exported, f"README names metric {name!r}; exported: {sorted(exported)}"
    labels = {k for f in families for s in f.samples for k in s.labels if k != "le"}
    assert labels == named_labels, f"README says labels {sorted(named_labels)}; /metrics has {sorted(labels)}"


def test_readme_commands_are_found():
    cmds = readme_commands(REPO / "README.md")
    texts = [c.text for c in cmds]
    assert texts[:2] == ["make demo    # the main job: see \"The demo\" below",
                         "make test    # ruff + the whole test suite (what CI runs: .ci/run)"]
    assert texts[2].startswith("source .venv/bin/activate")  # the set-up comes before any other command
    assert any(t.startswith("megaserve up examples/local.yaml --detach") for t in texts)
    ups = [i for i, t in enumerate(texts) if t.startswith("megaserve up ")]
    downs = [i for i, t in enumerate(texts) if t.startswith("megaserve down ")]
    assert len(ups) == len(downs) == 1 and ups[0] < downs[0]  # every cluster started is stopped
    assert sum(c.kind == "python" for c in cmds) >= 4
    loop = bash_commands(1, ["for i in 1 2; do", "  echo $i", "done > x  # a comment", "ls \\", "  -l"])
    assert [c.text for c in loop] == ["for i in 1 2; do\n  echo $i\ndone > x  # a comment", "ls \\\n  -l"]


def test_the_readmes_pytest_commands_find_their_tests():
    """`pytest tests/x.py` as the README writes it (the console script, not `python -m pytest`, which would put
    the working directory on sys.path for it) imports the `tests.*` helpers: collection only, no PYTHONPATH."""
    text = (REPO / "README.md").read_text()
    commands = sorted({m.strip() for m in re.findall(r"(?:^|`)(pytest [^`\n]*)", text, re.M)})
    assert "pytest tests/test_fuzz.py" in commands
    script = Path(sys.executable).parent / "pytest"
    if not script.exists():
        pytest.skip("no pytest console script beside this python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    files = sorted({a for c in commands for a in c.split()[1:] if a.startswith("tests/")})  # one run for all
    r = subprocess.run([str(script), *files, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " collected" in r.stdout, f"{commands}:\n{r.stdout[-3000:]}{r.stderr[-2000:]}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """Every README command but the set-up and the minutes-long benchmarks, in a copy of this checkout: the
    environment is this test's (.venv), the demo checkpoint comes from `megaserve make-checkpoint`."""
    if shutil.which("curl") is None:
        pytest.skip("the README's HTTP examples use curl")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is in use (a running server?): the README's cluster serves there")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    copy = tmp_path / "clone"
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / ".venv").symlink_to(Path(sys.prefix))
    env = {**os.environ, "PYTHONPATH": str(copy), "HOME": str(tmp_path / "home")}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([sys.executable, "-m", "cluster.cli", "make-checkpoint", "--preset", "tiny", "--out",
                    "out/demo/tiny"], cwd=copy, env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "tests/readme_commands.py", "--fast"], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and ">>> every README command ran" in out, out[-6000:]
    assert "WARNING" not in out and "Traceback" not in out, out[-6000:]
    assert not (copy / ".megaserve").exists()
