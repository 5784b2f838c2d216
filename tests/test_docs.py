"""The docs hold together: every relative link in README.md and docs/*.md names a file that exists and an
anchor that names a heading there (GitHub's slugs); the README stays a front page; every page of docs/ is in
its index; envs/trace.yaml is what scripts/make_env_yaml.py writes from requirements.txt."""
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose_lines(text: str):
    """The lines outside fenced code blocks, inline code spans blanked."""
    fence = None
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        yield re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation but `-` and `_` dropped, spaces -> `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    text = text.replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in page.read_text().splitlines():  # headings outside code blocks, code spans kept
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            fence = None if stripped.startswith(fence) else fence
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path):
    for number, line in enumerate(prose_lines(page.read_text()), 1):
        for match in LINK.finditer(line):
            yield number, match.group(1)


@pytest.mark.parametrize("heading, anchor", [
    ("Several GPUs: torchrun + FSDP2", "several-gpus-torchrun--fsdp2"),
    ("Why a compact loop instead of TRL's `GRPOTrainer`", "why-a-compact-loop-instead-of-trls-grpotrainer"),
    ("What it costs (an estimate, not a measurement)", "what-it-costs-an-estimate-not-a-measurement"),
    ("snakemake --lint", "snakemake---lint"),
    ("Why plugin 2.6.1", "why-plugin-261"),
])
def test_slugs_are_githubs(heading, anchor):
    assert slug(heading) == anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for number, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"line {number}: {target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(broken)


def test_the_pages_link_to_something():
    assert sum(1 for _ in links(README)) >= len(DOCS)  # the parser sees links at all


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move sections to docs/ (see docs/README.md)"


def test_every_docs_page_is_in_the_index_and_the_readme():
    index = {target.partition("#")[0] for _, target in links(REPO_ROOT / "docs" / "README.md")}
    readme = {target.partition("#")[0] for _, target in links(README)}
    for page in DOCS:
        if page.name != "README.md":
            assert page.name in index, f"docs/README.md does not list {page.name}"
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def _make_env_yaml():
    spec = importlib.util.spec_from_file_location("make_env_yaml", REPO_ROOT / "scripts" / "make_env_yaml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_conda_env_is_generated_from_requirements():
    make = _make_env_yaml()
    committed = (REPO_ROOT / "envs" / "trace.yaml").read_text()
    assert committed == make.render(REPO_ROOT), "envs/trace.yaml is stale: run python scripts/make_env_yaml.py"
    env = yaml.safe_load(committed)
    pip = next(entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict))
    wanted = [spec for source in make.SOURCES for spec, _ in make.requirements(REPO_ROOT / source)]
    assert pip == wanted
    for name in ("torch==", "jsonschema", "snakemake==", "vllm=="):  # what the old hand-written file lacked or pinned
        assert any(spec.startswith(name) for spec in pip), name
