"""The external corpus: Debian's manual pages installed with apt and written out as Markdown files.

Layout: `en/man1/ls.1.md` for the English pages (packages `manpages`, `manpages-dev`), `zh/man1/ls.1.md` for the
Simplified Chinese ones (`manpages-zh`, its `zh_CN` tree; the `zh_TW` tree is the same text in traditional
characters and is left out). Each file is headed by the page's name and section (`# ls(1)`), which SAGE takes as
the title; the page's own sections follow as `##` headings (NAME, SYNOPSIS, DESCRIPTION, ...). Pages that only
point at another page (`.so`, or a symlink) are left out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.external_eval.manpage import convert, is_link_page

PACKAGES = ("manpages", "manpages-dev", "manpages-zh", "mandoc")
# (package, folder of its pages under /usr/share/man, language folder in the corpus)
SOURCES = (
    ("manpages", "", "en"),
    ("manpages-dev", "", "en"),
    ("manpages-zh", "zh_CN", "zh"),
)
MAN_ROOT = Path("/usr/share/man")


class SetupError(Exception):
    """The corpus cannot be built on this machine (no root for apt, no mandoc, ...)."""


def package_versions() -> dict[str, str]:
    """Installed version of each package the corpus comes from; missing packages are left out."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Status}\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    )
    versions = {}
    for line in result.stdout.splitlines():
        name, version, status = line.split("\t")
        if status.endswith(" installed"):
            versions[name] = version
    return versions


def install_packages() -> dict[str, str]:
    """Install the packages with apt when any is missing (needs root); return their versions."""
    versions = package_versions()
    missing = [name for name in PACKAGES if name not in versions]
    if not missing:
        return versions
    if os.geteuid() != 0:
        raise SetupError(f"packages {', '.join(missing)} are missing and installing them needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SetupError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return package_versions()


def _package_pages(package: str, subfolder: str) -> list[Path]:
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    root = MAN_ROOT / subfolder if subfolder else MAN_ROOT
    pages = []
    for line in listing.splitlines():
        path = Path(line)
        # .../man<section>/<name>.<section>.gz directly under the language root (not other languages' trees).
        if path.suffix == ".gz" and path.parent.parent == root and path.parent.name.startswith("man"):
            pages.append(path)
    return sorted(pages)


@dataclass
class BuiltCorpus:
    """What `build` wrote and what it left out."""

    root: Path
    pages: int
    link_pages: int


def build(root: Path) -> BuiltCorpus:
    """Write every page of the source packages as Markdown under `root` (emptied first)."""
    if shutil.which("mandoc") is None:
        raise SetupError("mandoc is not installed")
    if root.exists():
        shutil.rmtree(root)
    jobs: list[tuple[Path, Path]] = []
    links = 0
    for package, subfolder, language in SOURCES:
        for page in _package_pages(package, subfolder):
            if is_link_page(page):
                links += 1
                continue
            jobs.append((page, root / language / page.parent.name / (page.name.removesuffix(".gz") + ".md")))

    def write(job: tuple[Path, Path]) -> None:
        source, target = job
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(convert(source), encoding="utf-8")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(write, jobs))
    return BuiltCorpus(root=root, pages=len(jobs), link_pages=links)
