"""Print the project's direct dependencies (runtime, test and the extras `make setup` installs) by name,
without version bounds.

`make test-latest` installs these at their newest releases, so a release that breaks vlmprune is
seen before the supported range in pyproject.toml admits it.
"""
import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
requirements = project["dependencies"] + extras["test"] + extras["lmms"] + extras["export"]
print(" ".join(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0) for requirement in requirements))
