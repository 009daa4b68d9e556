"""Every file in cluster/ is checked: it parses, carries what its schema requires, and every
`python -m pipelines.X …` or `drc X …` in it (and in the top-level README.md) names a module that
exists, with flags that module's parser accepts (the whole command is parsed when it holds no
placeholders), so a renamed flag fails here. Nothing is downloaded: Ray's
launcher schema is the one installed with Ray, the KubeRay required keys are the table below."""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path
from unittest import mock

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
PINS = dict(line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
RAY_VERSION, TORCH_PIN = PINS["ray[default,train,tune,data]"], f"torch=={PINS['torch']}"

# Required keys of the KubeRay CRDs, apiVersion ray.io/v1, read from ray-project/kuberay
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml at commit
# 1184bc872c0801e59c18caf8a1a4eb5f2800ce93 (the `required:` lists of the v1 schema). A RayJob's
# rayClusterSpec is the same Go type as a RayCluster's spec. Newer operators (≥ 1.4) no longer
# require rayStartParams; we keep it so that older operators accept the manifests too.
# Path syntax: "" is the spec itself, "x[]" every item of the list x.
RAYCLUSTER_SPEC_REQUIRED = {
    "": ["headGroupSpec"],
    "headGroupSpec": ["rayStartParams", "template"],
    "headGroupSpec.template.spec": ["containers"],
    "headGroupSpec.template.spec.containers[]": ["name"],
    "workerGroupSpecs[]": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
    "workerGroupSpecs[].template.spec": ["containers"],
    "workerGroupSpecs[].template.spec.containers[]": ["name"],
}
RAYJOB_SPEC_REQUIRED = {"": ["entrypoint"], "submitterPodTemplate.spec": ["containers"]}

# Instance types the launcher config may use: (GPUs, vCPUs), from AWS's instance type pages.
AWS_INSTANCES = {"m5.2xlarge": (0, 8), "m5.4xlarge": (0, 16), "g5.xlarge": (1, 4), "g5.12xlarge": (4, 48),
                 "g5.48xlarge": (8, 192), "p4d.24xlarge": (8, 96), "p5.48xlarge": (8, 192)}
PLACEHOLDER = re.compile(r"[$<>…{}]")


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind_of(path: Path) -> str | None:
    if path.suffix == ".md":
        return "markdown"
    if path.suffix == ".sh":
        return "shell"
    if path.name == "Dockerfile":
        return "dockerfile"
    if path.suffix in (".yaml", ".yml"):
        docs = _yaml_docs(path)
        if docs and all(d.get("apiVersion") == "ray.io/v1" for d in docs):
            return "kuberay"
        if len(docs) == 1 and "provider" in docs[0]:
            return "launcher"
        if path.name.startswith("runtime_env"):
            return "runtime_env"
    return None


def files_of(kind: str) -> list[Path]:
    found = [p for p in FILES if kind_of(p) == kind]
    assert found, f"no {kind} file in cluster/"
    return found


def _ids(paths):
    return [str(p.relative_to(CLUSTER)) for p in paths]


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_every_cluster_file_is_of_a_checked_kind(path):
    assert kind_of(path) is not None, f"{path}: no checks for this kind of file; add them here"


# ---- commands: python -m pipelines.X … -----------------------------------------------------------
class _Captured(BaseException):
    pass


@cache
def parser_of(module: str) -> argparse.ArgumentParser:
    """The module's own parser, caught when its main() calls parse_args (nothing else runs)."""
    captured = []
    if module == "pipelines.bench":                      # a package: its command line is __main__
        module = "pipelines.bench.__main__"

    def grab(self, *args, **kwargs):
        captured.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            importlib.import_module(module).main([])
        except _Captured:
            pass
    return captured[0]


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


COMMAND = re.compile(r"(?:python -m (pipelines\.\w+)|(?:^|[\s/`])drc (\w+))([^`\n]*)")


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python -m pipelines.X …` or `drc X …` in a file (YAML: in its string
    values)."""
    from pipelines.cli import STAGES
    texts = list(_strings(_yaml_docs(path))) if path.suffix == ".yaml" else [path.read_text()]
    found = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for m in COMMAND.finditer(line):
                if m.group(2) is not None and m.group(2) not in STAGES:
                    continue
                module = m.group(1) or f"pipelines.{m.group(2)}"
                argv = []
                for tok in shlex.split(m.group(3), comments=True):
                    if tok in ("&&", "||", ";", "|", "&", ">", "2>&1"):
                        break
                    argv.append(tok)
                found.append((module, argv))
    return found


ALL_COMMANDS = [(p, mod, argv) for p in [*FILES, ROOT / "README.md", ROOT / "docs" / "usage.md"] for mod, argv in commands(p)]


def test_the_cluster_files_run_the_pipelines():
    modules = {mod for _, mod, _ in ALL_COMMANDS}
    assert {"pipelines.preprocess", "pipelines.train", "pipelines.segment", "pipelines.plan"} <= modules


@pytest.mark.parametrize("path, module, argv", ALL_COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{m}:{i}" for i, (p, m, _) in enumerate(ALL_COMMANDS)])
def test_command_names_a_module_and_flags_it_accepts(path, module, argv):
    assert importlib.util.find_spec(module) is not None, f"{path}: no module {module}"
    parser = parser_of(module)
    known = set(parser._option_string_actions)
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subcommands and argv and argv[0] in subcommands[0].choices:    # bench <name> …: that one's flags
        known = set(subcommands[0].choices[argv[0]]._option_string_actions)
    for tok in argv:
        if tok.startswith("--"):
            assert tok.split("=", 1)[0] in known, f"{path}: {module} has no flag {tok}"
    if not any(PLACEHOLDER.search(t) for t in argv) and not {"-h", "--help"} & set(argv):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{path}: {module} rejects {' '.join(argv)} (exit {exc.code})")


# ---- Ray cluster launcher --------------------------------------------------------------------------
@pytest.mark.parametrize("path", files_of("launcher"), ids=_ids(files_of("launcher")))
def test_launcher_config(path):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = _yaml_docs(path)[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)                       # Ray's own schema, as written
    validate_config(prepare_config(copy.deepcopy(cfg)))    # and with Ray's defaults, as `ray up` does
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not among {sorted(types)}"
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "no worker node types"
    for name, t in types.items():
        assert t["node_config"]["InstanceType"] in AWS_INSTANCES, f"{name}: unknown instance type"
        gpus, vcpus = AWS_INSTANCES[t["node_config"]["InstanceType"]]
        assert t["resources"].get("GPU", 0) == (gpus if name != head else 0), name
        assert t["resources"].get("CPU", 0) <= vcpus, name
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "no GPU worker type"

    setup = cfg["setup_commands"]
    torch_at = [i for i, c in enumerate(setup) if "download.pytorch.org/whl/cu" in c]
    reqs_at = [i for i, c in enumerate(setup) if re.search(r"-r \S*requirements\.txt", c)]
    assert torch_at and reqs_at and torch_at[0] < reqs_at[0], "CUDA torch must be installed before requirements.txt"
    assert "grep -E '^torch==' ~/drc/requirements.txt" in setup[torch_at[0]] or TORCH_PIN in setup[torch_at[0]]
    assert "requirements.txt" in "".join(cfg["file_mounts"].values())
    for remote, local in cfg["file_mounts"].items():
        if not local.startswith("~"):                      # paths on the operator's machine
            assert (ROOT / local).exists(), f"file_mounts source {local} is not in the repository"
    assert "RAY_AUTH_MODE=token" in " ".join(setup) and "~/.ray/auth_token" in cfg["file_mounts"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


# ---- KubeRay ---------------------------------------------------------------------------------------
def _at(node, path: str):
    """Every node at a dotted path ("a.b[].c"); a missing step yields nothing."""
    nodes = [node]
    for step in filter(None, path.split(".")):
        many = step.endswith("[]")
        key = step[:-2] if many else step
        nxt = [n[key] for n in nodes if isinstance(n, dict) and key in n]
        nodes = [x for n in nxt for x in n] if many else nxt
    return nodes


def _check_required(spec: dict, table: dict, where: str) -> None:
    for path, keys in table.items():
        for node in _at(spec, path):
            missing = [k for k in keys if k not in node]
            assert not missing, f"{where}.{path}: missing required {missing}"


KUBERAY = [(p, d) for p in files_of("kuberay") for d in _yaml_docs(p)]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path, doc", KUBERAY, ids=[f"{p.name}:{d.get('kind')}" for p, d in KUBERAY])
def test_kuberay_manifest(path, doc):
    assert doc["kind"] in ("RayCluster", "RayJob") and doc["metadata"]["name"]
    if doc["kind"] == "RayJob":
        _check_required(doc["spec"], RAYJOB_SPEC_REQUIRED, "spec")
    spec = _cluster_spec(doc)
    _check_required(spec, RAYCLUSTER_SPEC_REQUIRED, "rayClusterSpec" if doc["kind"] == "RayJob" else "spec")
    assert spec["rayVersion"] == RAY_VERSION, "rayVersion must be the ray pin of requirements.txt"
    assert spec.get("authOptions", {}).get("mode") == "token"
    for c in _at(spec, "headGroupSpec.template.spec.containers[]"):
        assert c["image"] and "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{group['groupName']}: no GPU limit"
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]


def test_kuberay_manifests_agree_on_image_and_pods():
    images = {c["image"] for _, d in KUBERAY for c in _at(_cluster_spec(d), "headGroupSpec.template.spec.containers[]")
              + _at(_cluster_spec(d), "workerGroupSpecs[].template.spec.containers[]")}
    assert len(images) == 1, f"one image for every pod, got {images}"
    pods = {json.dumps(_at(_cluster_spec(d), "workerGroupSpecs[].template.spec"), sort_keys=True) for _, d in KUBERAY}
    assert len(pods) == 1, "the RayJob's worker pods should match raycluster.yaml"


@pytest.mark.parametrize("path, doc", [(p, d) for p, d in KUBERAY if d["kind"] == "RayJob"],
                         ids=[p.name for p, d in KUBERAY if d["kind"] == "RayJob"])
def test_rayjob_trains_a_paper_preset_on_its_gpus(path, doc):
    from ray.runtime_env import RuntimeEnv
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.train"]
    args = parser_of("pipelines.train").parse_args(argv[3:])
    assert args.preset.startswith("paper-") and args.device == "cuda"
    assert args.data.startswith("s3://") and args.storage.startswith("s3://")
    spec = doc["spec"]["rayClusterSpec"]
    gpus, cpus = 0, []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["minReplicas"] * int(limits["nvidia.com/gpu"])
        cpus.append(int(limits["cpu"]) / int(limits["nvidia.com/gpu"]))
    workers = args.workers if isinstance(args.workers, int) else args.workers[1]
    assert workers <= gpus, f"--workers {workers} but the cluster starts with {gpus} GPUs"
    assert args.cpus_per_worker <= min(cpus), "a pod cannot host one worker per GPU at --cpus-per-worker"
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert re.match(r"https?://", env["env_vars"]["MLFLOW_TRACKING_URI"])


# ---- runtime_env, Dockerfile, shell, markdown ------------------------------------------------------
@pytest.mark.parametrize("path", files_of("runtime_env"), ids=_ids(files_of("runtime_env")))
def test_runtime_env(path):
    from ray.runtime_env import RuntimeEnv
    env = _yaml_docs(path)[0]
    assert set(env) <= RuntimeEnv.known_fields, f"unknown runtime_env keys {set(env) - RuntimeEnv.known_fields}"
    RuntimeEnv(**env)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.get("env_vars", {}).items())


@pytest.mark.parametrize("path", files_of("dockerfile"), ids=_ids(files_of("dockerfile")))
def test_dockerfile(path):
    code = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    text = code.replace("\\\n", " ")
    assert re.search(r"^FROM \S+", text, re.M)
    torch_at, reqs_at = text.find("download.pytorch.org/whl/"), text.find("-r requirements.txt")
    assert 0 <= torch_at < reqs_at, "CUDA torch must be installed before requirements.txt"
    assert "grep -E '^torch==' requirements.txt" in text or TORCH_PIN in text
    for package in ("drc_core", "pipelines"):
        assert re.search(rf"^COPY {package}/ ", text, re.M), f"the image lacks {package}"
    assert "PYTHONPATH=/app" in text and "wget" in text


@pytest.mark.parametrize("path", files_of("shell"), ids=_ids(files_of("shell")))
def test_shell_script(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    for ref in re.findall(r"cluster/[\w./-]+", path.read_text()):
        assert (ROOT / ref).exists(), f"{path.name} refers to {ref}, which does not exist"


@pytest.mark.parametrize("path", files_of("markdown"), ids=_ids(files_of("markdown")))
def test_markdown_refers_to_files_that_exist(path):
    for ref in set(re.findall(r"\b(?:cluster|pipelines|tests|drc_core)/[\w./-]*\w", path.read_text())):
        assert (ROOT / ref).exists(), f"{path.name} refers to {ref}, which does not exist"
