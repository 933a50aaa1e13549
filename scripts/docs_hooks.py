"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks:``).

* ``changelog.md`` is generated from the repository's ``CHANGELOG.md`` (one copy in git).
* The API reference page of ``liftkit.optim`` is generated, and listed under "API reference", only when that
  module exists, so the strict build works before and after it lands.
* Sphinx roles in docstrings (``:class:`~liftkit.errors.LiftkitError` ``) render as plain code
  (``LiftkitError``), as Sphinx would show them, instead of a stray ``:class:`` before the code; ``:math:``
  goes to MathJax like the pages' ``$...$``.
* A link from a page to a repository file outside ``docs/`` (``../src/liftkit/methods/lpom_shards.py``) is
  valid on the repository's own file view but has no page on the site; it becomes the file's repository path
  in code type. Links to missing files still fail the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_REFERENCES = {
    # module -> (page, nav title); the page is generated when the module's source exists
    "liftkit.optim": ("reference/optim.md", "Optimizers (liftkit.optim)"),
}
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(?P<tilde>~?)(?P<name>[^<]*)</code>")
_MATH_ROLE = re.compile(r":math:<code>(?P<tex>[^<]*)</code>")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def _module_exists(module: str) -> bool:
    base = ROOT / "src" / Path(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def on_config(config: Any) -> Any:
    for module, (page, title) in OPTIONAL_REFERENCES.items():
        if not _module_exists(module):
            continue
        for section in config["nav"]:
            if isinstance(section, dict) and "API reference" in section:
                section["API reference"].append({title: page})
    return config


def on_files(files: Files, config: Any) -> Files:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    for module, (page, _) in OPTIONAL_REFERENCES.items():
        if _module_exists(module):
            files.append(File.generated(config, page, content=f"# `{module}`\n\n::: {module}\n"))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    if page.file.abs_src_path is None:
        return markdown
    here = Path(page.file.abs_src_path).parent

    def rewrite(match: re.Match[str]) -> str:
        target = match.group("target")
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        resolved = (here / target).resolve()
        if resolved.is_relative_to(docs_dir) or not resolved.exists() or not resolved.is_relative_to(ROOT):
            return match.group(0)  # a page of the site, or a broken link the strict build must report
        path = resolved.relative_to(ROOT).as_posix()
        text = match.group("text").strip("`")
        return f"`{path}`" if text in (path, resolved.name) else f"{match.group('text')} (`{path}`)"

    return _LINK.sub(rewrite, markdown)


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    def plain(match: re.Match[str]) -> str:
        name = match.group("name")
        return f"<code>{name.rsplit('.', 1)[-1] if match.group('tilde') else name}</code>"

    html = _MATH_ROLE.sub(lambda m: f'<span class="arithmatex">\\({m.group("tex")}\\)</span>', html)
    return _ROLE.sub(plain, html)
