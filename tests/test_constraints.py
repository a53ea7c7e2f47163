"""constraints.txt pins a version of every package setup.py asks for, inside its range."""
import ast
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_requirements() -> list[Requirement]:
    """install_requires and the `test` extra, read from setup.py's literals."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in kwargs["install_requires"] + kwargs["extras_require"]["test"]]


def pins() -> dict[str, str]:
    with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    pinned = {}
    for line in lines:
        name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
        pinned[canonicalize_name(name)] = version
    return pinned


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for requirement in setup_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside setup.py's {requirement}")


def test_install_commands_use_the_constraints():
    """CI and the README's two commands install with the constraints file."""
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    commands = ci + "".join(re.findall(r"```(?:bash)?\n(.*?)```", readme, flags=re.S))
    installs = [line for line in commands.splitlines()
                if re.search(r"pip install (-q )?-e ", line)]
    assert len(installs) >= 3
    for line in installs:
        assert "-c constraints.txt" in line, line
