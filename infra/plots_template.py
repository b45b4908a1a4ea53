"""Build DVC's offline plots page, .dvc/plots/offline.html: `dvc plots show` renders without a network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on an air-gapped machine it
renders blank. This page inlines the same three libraries, at the versions the installed
dvc-render asks for (`VegaRenderer.SCRIPTS`), and .dvc/config names it (`plots.html_template`).

Maintainers only, after a dvc-render upgrade (tests/unit/test_dvc_views.py says when): it needs
npm and the npm registry. `python -m infra.plots_template [OUT]`.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

OUT = Path(".dvc/plots/offline.html")

#: npm package → the file its CDN URL serves (the package's "jsdelivr" build)
BUILDS = {
    "vega": "package/build/vega.min.js",
    "vega-lite": "package/build/vega-lite.min.js",
    "vega-embed": "package/build/vega-embed.min.js",
}

PAGE = """<!DOCTYPE html>
<!-- DVC plots page for machines without a network (`dvc plots show`, set in .dvc/config):
     DVC's default page with {libraries} inlined (BSD-3-Clause, the
     Vega project); built by infra/plots_template.py, do not edit. -->
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
        /* the charts side by side, as many as the window holds */
        body > div {{
            display: inline-block;
            vertical-align: top;
            margin: 8px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def dvc_versions() -> list[tuple[str, str]]:
    """``(package, version)`` of each script the installed dvc-render loads from its CDN."""
    from dvc_render.vega import VegaRenderer

    found = re.findall(r"/npm/([a-z-]+)@([0-9][0-9.]*)", VegaRenderer.SCRIPTS)
    if [name for name, _ in found] != list(BUILDS):
        raise RuntimeError(f"dvc-render's scripts changed: {found}; update BUILDS in {__file__}")
    return [(str(name), str(version)) for name, version in found]


def inline(js: str) -> str:
    """``js`` safe inside a <script> element, without its source-map comment."""
    js = re.sub(r"\n?//# sourceMappingURL=\S*\s*$", "", js)
    return js.replace("</script", "<\\/script")


def page(scripts: Sequence[tuple[str, str, str]]) -> str:
    """The page from ``(package, version, javascript)`` triples, in load order."""
    tags = "\n".join(
        f'    <script type="text/javascript" data-package="{name}@{version}">\n'
        f"{inline(js)}\n    </script>"
        for name, version, js in scripts
    )
    names = ", ".join(f"{name} {version}" for name, version, _ in scripts)
    return PAGE.format(libraries=names, scripts=tags)


def npm_build(name: str, version: str, workdir: Path) -> str:
    """The CDN build of ``name@version`` from its npm package (`npm pack`)."""
    done = subprocess.run(
        ["npm", "pack", "--silent", f"{name}@{version}"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    )
    tarball = workdir / done.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(BUILDS[name])
        if member is None:
            raise RuntimeError(f"{tarball}: no {BUILDS[name]}")
        return io.TextIOWrapper(member, encoding="utf-8").read()


def main(argv: Sequence[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    with tempfile.TemporaryDirectory() as tmp:
        scripts = [(n, v, npm_build(n, v, Path(tmp))) for n, v in dvc_versions()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(scripts), encoding="utf-8")
    print(f"{out}: {', '.join(f'{n}@{v}' for n, v, _ in scripts)} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
