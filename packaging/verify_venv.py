"""Check the venv dh-virtualenv built, before it is packaged.

Run with the venv's own interpreter: ``VENV/bin/python packaging/verify_venv.py VENV
INSTALLED_PATH VERSION``. It checks that the project and its twistd plugin are
installed in site-packages (not only importable from the source tree), that Twisted's
plugin discovery and ``twistd --help`` both find ``agentpost``, that the console
scripts were re-pointed at the installed interpreter, and that ``agentpost --version``
answers the packaged version.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def fail(message: str) -> None:
    sys.stderr.write(f"verify_venv: {message}\n")
    raise SystemExit(1)


def main() -> None:
    venv, installed, version = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
    # Import from the venv only, never from the source tree we are run in.
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path.cwd().resolve()]
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if venv not in site.parents:
        fail(f"run me with {venv}/bin/python (site-packages is {site})")
    plugin = site / "twisted" / "plugins" / "agentpost_plugin.py"
    if not plugin.is_file():
        fail(f"{plugin} is missing: the twisted.plugins namespace was not installed")
    if (site / "twisted" / "plugins" / "__init__.py").exists() is False:
        fail("Twisted's own twisted/plugins/__init__.py is missing")

    import agentpost

    if Path(agentpost.__file__).resolve().parent != site / "agentpost":
        fail(f"agentpost imported from {agentpost.__file__}, not from the venv")
    if agentpost.__version__ != version:
        fail(f"venv has agentpost {agentpost.__version__}, the package is {version}")

    from twisted.plugin import IPlugin, getPlugins

    names = {getattr(p, "tapname", None) for p in getPlugins(IPlugin)}
    if "agentpost" not in names:
        fail(f"twisted.plugin does not find agentpost (found {sorted(n for n in names if n)})")

    from twisted.scripts.twistd import run

    out = io.StringIO()
    sys.argv = ["twistd", "--help"]
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        run()
    if not any(line.split()[:1] == ["agentpost"] for line in out.getvalue().splitlines()):
        fail("`twistd --help` does not list the agentpost command")

    shebang = f"#!{installed}/bin/python"
    for script in ("agentpost", "twistd"):
        first = (venv / "bin" / script).read_text().splitlines()[0]
        if first != shebang:
            fail(f"bin/{script} starts with {first!r}, wanted {shebang!r}")

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    answer = subprocess.run(
        [sys.executable, "-m", "agentpost.cli", "--version"], env=env, cwd="/",
        capture_output=True, text=True, check=False)
    if answer.stdout.strip() != f"agentpost {version}":
        fail(f"`agentpost --version` said {answer.stdout!r} {answer.stderr!r}")
    print(f"verify_venv: {venv} OK (agentpost {version}, twistd plugin found)")


if __name__ == "__main__":
    main()
