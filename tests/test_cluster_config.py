"""cluster.yaml and the on-premises example pass Ray's own checker (what `ray up` validates
first), offline; broken copies fail; and the files keep the promises the README makes."""

import copy
import importlib.metadata
import re
import tomllib

import pytest
import ray
import yaml
from click import ClickException
from jsonschema import ValidationError
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import ROOT

CONFIGS = ["cluster.yaml", "examples/cluster-onprem.yaml"]


def ray_check(config: dict) -> dict:
    """Ray's checks before `ray up` launches anything: defaults merged, then the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_checker(name):
    prepared = ray_check(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


BROKEN = {  # breakage -> (the change, the error Ray's checker raises, words of its message)
    "no provider": (lambda c: c.pop("provider"), KeyError, "provider"),
    "float resources": (lambda c: c["available_node_types"][c["head_node_type"]].update(
        resources={"CPU": 0.5}), ValidationError, "0.5 is not of type 'integer'"),
    "unknown head type": (lambda c: c.update(head_node_type="missing"), ValueError,
                          "`head_node_type` must be one of `available_node_types`"),
    "unknown key": (lambda c: c.update(max_wrokers=3), ValidationError,
                    r"\('max_wrokers' was unexpected\)"),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_a_broken_copy_fails_rays_checker(breakage):
    config = load("cluster.yaml")
    change, error, words = BROKEN[breakage]
    change(config)
    with pytest.raises(error, match=words):
        ray_check(config)


@pytest.mark.parametrize("missing", ["worker_ips", "head_ip"])
def test_onprem_example_without_its_machines_fails_rays_checker(missing):
    config = load("examples/cluster-onprem.yaml")
    ray_check(copy.deepcopy(config))  # complete, it passes
    del config["provider"][missing]
    with pytest.raises(ClickException, match="Please supply a `head_ip` and list of `worker_ips`"):
        ray_check(config)


def test_aws_cluster_has_a_cpu_head_and_two_gpu_worker_types():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    gpus = sorted(t["resources"].get("GPU", 0) for name, t in types.items()
                  if name != config["head_node_type"])
    assert gpus == [1, 4]
    for node in types.values():  # an explicit image on every node type, never Ray's old default
        assert node["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= 1


@pytest.mark.parametrize("name", CONFIGS)
def test_no_credentials_and_no_public_dashboard(name):
    text = (ROOT / name).read_text()
    assert not re.search(r"aws_(secret_)?access_key|AKIA[0-9A-Z]{16}|BEGIN .*PRIVATE KEY", text)
    config = load(name)
    assert "security_group" not in config["provider"]  # only SSH: Ray's default group
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text


@pytest.mark.parametrize("name", CONFIGS)
def test_nodes_install_the_pinned_versions_this_project_is_tested_with(name):
    config = load(name)
    setup = "\n".join(config["setup_commands"])
    assert "-r ~/cmg-sweep/requirements-cluster.txt" in setup and "-e ~/cmg-sweep" in setup
    assert config["file_mounts"]["~/cmg-sweep"] == "."
    pins = dict(line.split("==") for line in (ROOT / "requirements-cluster.txt").read_text()
                .splitlines() if "==" in line and not line.startswith("#"))
    assert pins["ray[default]"] == ray.__version__
    import optuna
    import torch

    assert pins["optuna"] == optuna.__version__
    assert pins["torch"] == torch.__version__.split("+")[0]


def _launch_command(name: str) -> list[str]:
    """The `python -m tune.sweep ...` command that a config's comments tell the user to run."""
    import shlex

    lines = [line.lstrip("#").strip() for line in (ROOT / name).read_text().splitlines()
             if line.startswith("#")]
    text = " ".join(lines).replace("\\ ", " ")
    command = re.search(r"python -m tune.sweep (.*?)\"", text).group(1)
    return shlex.split(command)


@pytest.mark.parametrize("name", ["examples/cluster-onprem.yaml"])
def test_the_printed_launch_command_parses_and_names_the_data(name):
    from tune.sweep import build_parser

    args = build_parser().parse_args(_launch_command(name))
    assert args.data_root and args.data_root.startswith("/mnt/shared")
    assert args.storage.startswith("/mnt/shared") and args.address == "auto"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_ray_start_raises_the_open_files_limit(name):
    config = load(name)
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert re.match(r"ulimit -n \d+; (\w+=\S* )*ray start", command), command


def test_the_aws_launch_command_leaves_placement_to_the_node_types():
    """The documented command runs on a cold cluster: no --gpus-per-trial (its default is read
    from these node types: a whole GPU) and no --max-concurrent (as many as they hold)."""
    from tune.sweep import build_parser

    args = build_parser().parse_args(_launch_command("cluster.yaml"))
    assert args.address == "auto" and args.gpus_per_trial is None and args.max_concurrent is None
    types = load("cluster.yaml")["available_node_types"]
    assert all(t["min_workers"] == 0 for t in types.values() if t["resources"].get("GPU"))


def node_python(config: dict) -> Version:
    """The Python a config declares for its nodes: the `-pyXY` of Ray's image in its `docker:`
    section (every command runs in that image), or the `sys.version_info >= (X, Y)` that its
    first setup command checks on each machine (provider: local)."""
    docker = config.get("docker") or {}
    images = {docker.get(k) for k in ("image", "head_image", "worker_image")} - {None}
    images |= {t["docker"].get(k) for t in config.get("available_node_types", {}).values()
               for k in ("image", "worker_image") if t.get("docker", {}).get(k)}
    if images:
        found = {re.search(r":[^:]*-py(\d)(\d+)\b", image) for image in images}
        assert None not in found, f"an image without a -pyXY tag: {sorted(images)}"
        (declared,) = {f"{m.group(1)}.{m.group(2)}" for m in found}  # one Python on every node
        return Version(declared)
    checked = re.search(r"sys\.version_info >= \((\d+), (\d+)\)", config["setup_commands"][0])
    assert checked, "the config declares no Python for its nodes (a -pyXY image, or a check)"
    return Version(f"{checked.group(1)}.{checked.group(2)}")


def pinned_packages() -> dict[str, str]:
    """requirements-cluster.txt's pins, {name without extras: version}."""
    return {re.sub(r"\[.*\]", "", name): version for name, version in
            (line.split("==") for line in (ROOT / "requirements-cluster.txt").read_text()
             .splitlines() if "==" in line and not line.startswith("#"))}


# what scripts/setup.sh leaves as a venv has it (any torch >= 2.4 with its torchvision)
KEPT_BY_SETUP = {"torch", "torchvision"}


def python_misfits(python: Version) -> list[str]:
    """Each pin, and the project itself, whose Requires-Python refuses PYTHON: the pins' from
    their installed metadata (scripts/setup.sh installs exactly the pinned versions)."""
    misfits = []
    for name, version in pinned_packages().items():
        installed = importlib.metadata.metadata(name)
        if installed["Version"].split("+")[0] != version:
            assert name in KEPT_BY_SETUP, (
                f"{name} {installed['Version']} is installed, {version} is pinned: "
                "bash scripts/setup.sh")
            continue  # another version's metadata says nothing of the pinned one
        requires = installed["Requires-Python"] or ""
        if not SpecifierSet(requires).contains(python):
            misfits.append(f"{name}=={version} (Requires-Python {requires})")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    if not SpecifierSet(project).contains(python):
        misfits.append(f"cmg-sweep (requires-python {project})")
    return misfits


@pytest.mark.parametrize("name", CONFIGS)
def test_every_pin_installs_on_the_python_the_nodes_run(name):
    python = node_python(load(name))
    assert python >= Version("3.11")
    assert python_misfits(python) == [], f"{name}: nodes run Python {python}"


def test_a_python_too_old_for_the_pins_is_named():
    """The Ubuntu 22.04 deep-learning image's own Python (3.10), as a Ray image tag: the check
    names the pins that would stop `pip install -r` on it, and the project."""
    config = load("cluster.yaml")
    config["docker"]["image"] = config["docker"]["image"].replace("-py311-", "-py310-")
    misfits = python_misfits(node_python(config))
    for name in ("numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "pyarrow",
                 "cmg-sweep"):
        assert any(m.startswith(f"{name}") for m in misfits), (name, misfits)


def test_the_oldest_python_the_project_admits_installs_every_pin():
    """pyproject.toml's requires-python floor is a Python every pinned version supports."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    (floor,) = [s.version for s in SpecifierSet(project) if s.operator == ">="]
    assert python_misfits(Version(floor)) == [], f"requires-python {project}"
