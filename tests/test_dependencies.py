"""The installed dependency set is the one constraints.txt records (the set CI last passed with).

A fresh resolve takes the newest releases that pyproject.toml's ranges admit; when one of them breaks
ftgate (transformers 5.24 needing an unreleased peft), this test names the packages that moved instead of
leaving a customer to find the failure.
"""

from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# torch's own requirements differ between its CPU and CUDA builds (nvidia-* wheels, triton): torch itself is
# pinned, what it brings is the build's.
BUILD_SPECIFIC = {"torch"}


def pinned_versions(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not of the form name==version"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def requirement_closure(root: str, extras: set[str]) -> dict[str, str]:
    """Installed distributions reachable from `root[extras]`, name -> installed version."""
    found, seen, pending = {}, set(), [(canonicalize_name(root), frozenset(extras))]
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        seen.add(key)
        name, wanted = key
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not install (e.g. the deploy extra)
        found[name] = dist.version
        if name in BUILD_SPECIFIC:
            continue
        environments = [{**default_environment(), "extra": extra} for extra in ("", *wanted)]
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


def drift(installed: dict[str, str], pins: dict[str, str]) -> list[str]:
    problems = []
    for name, version in sorted(installed.items()):
        if name not in pins:
            problems.append(f"{name} {version} is installed but has no pin")
        elif Version(version).public != Version(pins[name]).public:
            problems.append(f"{name} {version} is installed, constraints.txt pins {pins[name]}")
    return problems


def test_installed_versions_match_the_constraints_file():
    pins = pinned_versions(CONSTRAINTS.read_text())
    installed = requirement_closure("ftgate", {"test", "deploy"})
    installed.pop("ftgate")
    problems = drift(installed, pins)
    assert not problems, (
        f"{len(problems)} installed packages differ from constraints.txt (the set CI last passed with):\n  "
        + "\n  ".join(problems)
        + '\nInstall with `pip install -c constraints.txt -e ".[test]"`, or, to move to newer releases, run '
        "`make constraints` and then `make test` (README, 'Dependencies')."
    )


def test_drift_names_a_moved_and_an_unpinned_package():
    pins = pinned_versions("# header\ntransformers==5.23.0\ntorch==2.13.0  # cpu or cuda\n")
    installed = {"transformers": "5.24.0", "torch": "2.13.0+cu128", "peft": "0.21.2"}
    assert drift(installed, pins) == [
        "peft 0.21.2 is installed but has no pin",
        "transformers 5.24.0 is installed, constraints.txt pins 5.23.0",
    ]


def test_closure_reaches_transitive_and_extra_requirements():
    installed = requirement_closure("ftgate", {"test"})
    # kombu comes through celery, redis through the celery[redis] extra, psycopg-binary through psycopg[binary],
    # pytest through ftgate's own test extra; torch's build-specific requirements are not followed.
    assert {"celery", "kombu", "redis", "psycopg-binary", "pytest", "huggingface-hub"} <= set(installed)
    assert not any(name.startswith("nvidia-") for name in installed)
