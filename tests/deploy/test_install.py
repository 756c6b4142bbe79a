"""The image's install step, without Docker: the build context (.dockerignore applied,
the files the builder stage COPYs) installed non-editable into a fresh venv, as the
Dockerfile does it (`venv --without-pip`, then `pip --python`). The installed copy must
run on its own and carry the shipped policies (catalog and presets) as package data.

No network: dependencies come from this test's own environment through a .pth file, and
pip runs with --no-index --no-build-isolation (the build backend, setuptools, is taken
from this environment too)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from deploy.manifests import DOCKER, ROOT, Dockerfile, build_context

import egress_guard


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run outside the checkout, with no PYTHONPATH: only the fresh venv's own paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def builder_sources() -> list[str]:
    df = Dockerfile.load()
    return [
        src.rstrip("/")
        for sources, _dst, inst in df.copies()
        if inst.stage == 0
        for src in sources
        if not src.startswith("docker/")
    ]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail(
            "setuptools (the build backend of pyproject.toml) is not installed in the test "
            "environment, so the package cannot be built offline; add 'setuptools>=68' to "
            "the dev extras"
        )
    tmp = tmp_path_factory.mktemp("install")
    ctx = tmp / "ctx"
    sources = builder_sources()
    assert {"pyproject.toml", "egress_guard", "policies"} <= set(sources)
    for path in build_context():
        rel = path.relative_to(ROOT)
        if rel.parts[0] in sources or rel.as_posix() in sources:
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, ctx / rel)
    venv = tmp / "fresh"
    r = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    assert r.returncode == 0, r.stderr
    site = Path(
        run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            tmp,
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    r = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            str(ctx),
        ],
        tmp,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return venv, tmp


def test_installed_cli_runs(fresh: tuple[Path, Path]) -> None:
    venv, tmp = fresh
    r = run([str(venv / "bin" / "egress-guard"), "--version"], tmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"egress-guard {egress_guard.__version__}"


def test_installed_copy_is_not_the_checkout(fresh: tuple[Path, Path]) -> None:
    venv, tmp = fresh
    r = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import egress_guard, egress_guard.policy as p; "
            "print(egress_guard.__file__); print(p.policies_dir())",
        ],
        tmp,
    )
    assert r.returncode == 0, r.stderr
    module, policies = (Path(x).resolve() for x in r.stdout.split())
    for path in (module, policies):
        assert path.is_relative_to(venv.resolve()), path
        assert not path.is_relative_to(ROOT), path


def test_installed_policies_validate(fresh: tuple[Path, Path]) -> None:
    venv, tmp = fresh
    r = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import egress_guard.policy as p; print(p.policies_dir())",
        ],
        tmp,
    )
    installed = Path(r.stdout.strip())
    assert installed.resolve().is_relative_to(venv.resolve())
    shipped = sorted(p.name for p in installed.glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "policies").glob("*.yaml"))
    out = tmp / "copied-policies"
    out.mkdir(exist_ok=True)
    presets = []
    for name in shipped:
        shutil.copy(installed / name, out / name)
        if name != "catalog.yaml":
            presets.append(str(out / name))
    assert presets
    r = run(
        [str(venv / "bin" / "egress-guard"), "validate", *presets, str(DOCKER / "policy.yaml")], tmp
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == len(presets) + 1


def test_every_subpackage_is_packaged() -> None:
    """pyproject.toml lists packages by hand: a new subpackage missing from the list is
    absent from the wheel and the image (the editable dev install hides it)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "egress_guard").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(found - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
