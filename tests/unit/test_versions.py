"""The supported torch range is declared once (raytune_llama/versions.py) and everything else
agrees with it: pyproject.toml's torch requirement, every image named in cluster/ (launcher YAML,
KubeRay manifest, Dockerfile, README), and the start-up checks of the engine and of
`raytune-llama finetune`, which refuse an older torch with the installed version, the minimum
and the fix."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from raytune_llama import versions
from raytune_llama.cli.main import main
from raytune_llama.versions import (
    MIN_TORCH,
    ROCM_IMAGE,
    TORCH_BELOW,
    TorchVersionError,
    check_torch_version,
    parse_torch_version,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
# An image reference and the torch version its tag names: the official ROCm PyTorch images
# (`..._pytorch_release_2.10.0`) and the image cluster/Dockerfile.rocm builds (`...-torch2.10.0`).
IMAGE_PATTERNS = (
    re.compile(r"rocm/pytorch:[\w.-]*?pytorch_release_(?P<torch>\d+\.\d+(?:\.\d+)?)"),
    re.compile(r"raytune-llama:[\w.-]*?-torch(?P<torch>\d+\.\d+(?:\.\d+)?)"),
)
ANY_IMAGE = re.compile(r"(?:rocm/pytorch|raytune-llama):[\w.-]+")


def torch_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return req


def in_range(version: str) -> bool:
    return parse_torch_version(MIN_TORCH) <= parse_torch_version(version) < parse_torch_version(TORCH_BELOW)


def image_torch(ref: str) -> str:
    for pattern in IMAGE_PATTERNS:
        m = pattern.search(ref)
        if m:
            return m.group("torch")
    raise AssertionError(f"image {ref!r} names no torch version in its tag")


def yaml_images(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "image" and isinstance(v, str)] + \
            [i for v in obj.values() for i in yaml_images(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in yaml_images(v)]
    return []


# --- one declaration, and pyproject.toml agrees -------------------------------------------------


def test_pyproject_torch_range_is_the_declared_one():
    spec = {(s.operator, s.version) for s in torch_requirement().specifier}
    assert spec == {(">=", MIN_TORCH), ("<", TORCH_BELOW)}, spec


def test_installed_torch_is_in_the_declared_range():
    import torch

    assert versions.installed_torch_version() == str(torch.__version__)
    assert check_torch_version() == str(torch.__version__)
    assert Version(torch.__version__.split("+")[0]) in torch_requirement().specifier


# --- every image in cluster/ ships a torch inside [MIN_TORCH, TORCH_BELOW) ---------------------


def test_launcher_and_dockerfile_use_the_declared_rocm_image():
    launcher = yaml.safe_load((CLUSTER / "mi250.yaml").read_text())
    assert launcher["docker"]["image"] == ROCM_IMAGE
    froms = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile.rocm").read_text(), flags=re.M)
    assert froms == [ROCM_IMAGE]
    assert in_range(image_torch(ROCM_IMAGE)), ROCM_IMAGE


@pytest.mark.parametrize("name", ["mi250.yaml", "kuberay-mi250.yaml", "kuberay-rayjob-mi250.yaml",
                                  "kuberay-shared-pvc.yaml"])
def test_every_yaml_image_names_a_supported_torch(name):
    images = [i for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc for i in yaml_images(doc)]
    if name in ("mi250.yaml", "kuberay-mi250.yaml"):
        assert images, f"{name} names no image"
    for ref in images:
        assert in_range(image_torch(ref)), f"{name}: {ref} carries torch {image_torch(ref)}, outside [{MIN_TORCH}, {TORCH_BELOW})"


@pytest.mark.parametrize("name", ["mi250.yaml", "kuberay-mi250.yaml", "Dockerfile.rocm", "README.md"])
def test_every_image_mentioned_in_cluster_files_names_a_supported_torch(name):
    refs = ANY_IMAGE.findall((CLUSTER / name).read_text())
    assert refs, f"{name} mentions no image"
    for ref in refs:
        torch_version = image_torch(ref)
        assert in_range(torch_version), f"{name}: {ref} carries torch {torch_version}, outside [{MIN_TORCH}, {TORCH_BELOW})"


def test_kubernetes_image_carries_the_base_images_torch():
    # cluster/Dockerfile.rocm adds this package to ROCM_IMAGE, so its tag names the base's torch.
    (rc,) = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-mi250.yaml").read_text()) if d]
    for ref in yaml_images(rc):
        assert image_torch(ref) == image_torch(ROCM_IMAGE), ref
    build = re.findall(r"docker build -f cluster/Dockerfile.rocm -t (\S+)", (CLUSTER / "README.md").read_text())
    assert build and set(build) <= set(yaml_images(rc)), build


def test_images_check_the_torch_they_carry():
    # Before pip install, which would otherwise fail first with a resolver conflict that names no fix.
    launcher = yaml.safe_load((CLUSTER / "mi250.yaml").read_text())
    setup = launcher["setup_commands"]
    install = next(i for i, c in enumerate(setup) if "pip install" in c and "/opt/raytune_llama" in c)
    assert any("check_torch_version()" in c for c in setup[:install]), "ray up must check the image's torch"
    dockerfile = (CLUSTER / "Dockerfile.rocm").read_text()
    assert -1 < dockerfile.find("check_torch_version()") < dockerfile.find("pip install")


# --- parsing and the check itself ----------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2.13.0+cpu", (2, 13, 0)),
    ("2.8.0+rocm6.4", (2, 8, 0)),
    ("2.10.0+rocm7.2.4.git3d3aa833", (2, 10, 0)),
    ("2.9.0a0+git1234abc", (2, 9, 0)),
    ("2.11.0.dev20260101+cpu", (2, 11, 0)),
    ("2.12.1+cu128", (2, 12, 1)),
    ("2.10", (2, 10, 0)),
    (" v2.14.0rc1 ", (2, 14, 0)),
])
def test_parse_torch_version(text, expected):
    assert parse_torch_version(text) == expected


@pytest.mark.parametrize("text", ["", "unknown", "two.ten", "2"])
def test_parse_torch_version_refuses_garbage(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_torch_version(text)


@pytest.mark.parametrize("installed", ["2.6.0+rocm6.4.1", "2.9.1", "2.9.0a0+gitdeadbee", "1.13.1+cu117"])
def test_too_old_torch_is_refused_naming_both_versions_and_the_fix(installed):
    with pytest.raises(TorchVersionError) as info:
        check_torch_version(installed)
    message = str(info.value)
    assert installed in message and f">= {MIN_TORCH}" in message
    assert ROCM_IMAGE in message and f"pip install 'torch>={MIN_TORCH},<{TORCH_BELOW}'" in message


@pytest.mark.parametrize("installed", [MIN_TORCH, "2.10.0+rocm7.2.4.git3d3aa833", "2.10.0a0+git449b176",
                                       "2.13.0+cpu", "2.14.1+cu128"])
def test_new_enough_torch_passes(installed):
    assert check_torch_version(installed) == installed


def test_unreadable_or_missing_torch_is_refused(monkeypatch):
    with pytest.raises(TorchVersionError, match="'garbage'"):
        check_torch_version("garbage")
    monkeypatch.setattr(versions, "installed_torch_version", lambda: None)
    with pytest.raises(TorchVersionError, match=f"torch is not installed.*>= {re.escape(MIN_TORCH)}"):
        check_torch_version()


# --- where the check runs --------------------------------------------------------------------------


def test_finetune_refuses_an_old_torch_before_any_ray_work(monkeypatch, capsys):
    import ray

    import raytune_llama.trainer.llama_trainer as llama_trainer

    class NoTrainer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("finetune went on to train with a torch that is too old")

    monkeypatch.setattr(llama_trainer, "LlamaTrainer", NoTrainer)
    monkeypatch.setattr(versions, "installed_torch_version", lambda: "2.6.0+rocm6.4.1")
    was_initialized = ray.is_initialized()
    for extra in ([], ["--validate-only"]):
        rc = main(["finetune", str(ROOT / "examples/configs/tiny_cpu.yaml"), *extra])
        err = capsys.readouterr().err
        assert rc == 2
        assert "2.6.0+rocm6.4.1" in err and f">= {MIN_TORCH}" in err and ROCM_IMAGE in err
    assert ray.is_initialized() == was_initialized


def test_engine_checks_torch_before_importing_anything_from_it():
    tree = ast.parse((ROOT / "raytune_llama/engine/parallel/__init__.py").read_text())
    body = [s for s in tree.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    first, second = body[0], body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "raytune_llama.versions"
    assert [a.name for a in first.names] == ["check_torch_version"]
    assert isinstance(second, ast.Expr) and ast.unparse(second) == "check_torch_version()"


def test_engine_import_fails_with_the_versions_on_an_old_torch():
    code = ("import raytune_llama.versions as v\n"
            "v.installed_torch_version = lambda: '2.6.0+rocm6.4.1'\n"
            "try:\n"
            "    import raytune_llama.engine.parallel\n"
            "except v.TorchVersionError as exc:\n"
            "    print('REFUSED', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED") and "2.6.0+rocm6.4.1" in out.stdout and MIN_TORCH in out.stdout


def test_versions_module_imports_no_torch_and_the_planner_never_imports_it():
    code = ("import sys, raytune_llama.versions, raytune_llama.cli.main\n"
            "raytune_llama.versions.check_torch_version()\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    for path in (ROOT / "raytune_llama/planner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "versions" or n.endswith(".versions") for n in names), (path, ast.unparse(node))
