"""Packaging guards: forbidden PyPI names, pinned requirements, README commands match CI."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# `jetstream` is an unrelated package, `jetstream-pt` a dependency-confusion proof of concept, and
# `tunix` is not Google's (that one is `google-tunix`).
FORBIDDEN = {"jetstream", "jetstream-pt", "tunix"}


def _names(lines):
  for line in lines:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
      continue
    yield re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0].lower().replace("_", "-")


def _requirement_files():
  return sorted(ROOT.glob("requirements*.txt")) + sorted(ROOT.glob("**/requirements*.txt"))


def test_no_forbidden_package_names():
  seen = {}
  for path in _requirement_files():
    if ".venv" in path.parts:
      continue
    for name in _names(path.read_text().splitlines()):
      seen.setdefault(name, str(path))
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  deps = list(project["dependencies"])
  for extra in project.get("optional-dependencies", {}).values():
    deps += extra
  for name in _names(deps):
    seen.setdefault(name, "pyproject.toml")
  bad = {n: f for n, f in seen.items() if n in FORBIDDEN}
  assert not bad, f"forbidden PyPI names requested: {bad}"
  assert "google-jetstream" in seen


def test_forbidden_check_catches_a_bad_line():
  assert set(_names(["jetstream==0.1", "jetstream-pt", "Tunix>=1", "google-jetstream==0.2.2"])) & FORBIDDEN == FORBIDDEN


def test_runtime_requirements_are_pinned():
  for fn in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"):
    for line in (ROOT / fn).read_text().splitlines():
      line = line.split("#", 1)[0].strip()
      if line and not line.startswith("-r"):
        assert "==" in line, f"{fn}: {line!r} is not pinned"


def test_readme_commands_and_ci_agree():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
  first = [b.strip() for b in blocks[:2]]
  assert "stepsearch_jax.train" in first[0] and ".venv" in first[0] or "install.sh" in first[0]
  assert "pytest" in first[1]
  assert first[1] in (ROOT / ".ci" / "run").read_text()
