"""`robustbench`: a model of RobustBench's zoo by name, loaded by the robustbench package's own
`load_model`, evaluated as is.

    arena eval defense=robustbench defense.name=Carmon2019Unlabeled defense.threat_model=Linf \
        dataset=cifar10 dataset.download=true threat.eps=0.0313725 suite=standard

`defense.name` and `defense.threat_model` are RobustBench's `model_name` and `threat_model`; the
zoo's dataset comes from `dataset=` (cifar10, cifar100; an npz file of CIFAR images named
`cifar10...` counts as cifar10, or set `defense.dataset`). The config says which plugin builds it
with `plugin: robustbench`, so `name` can carry the zoo's model name, as RobustBench users write it.

Where the weights come from is RobustBench's business: `load_model(name, model_dir, dataset,
threat_model)` first looks for `<model_dir>/<dataset>/<threat_model>/<name>.pt` and downloads it
there (Google Drive, or the timm hub for the few zoo models that live in timm) when it is absent.
`model_dir` defaults to `<work_dir>/cache/robustbench`, so a work directory holds its models.
With internet every zoo entry is one override away; offline, place the checkpoint at that path.
RobustBench models take [0, 1] inputs and normalise inside, as the harness's contract wants;
`robustbench.utils.load_model` reads checkpoints with `torch.load` (weights only on torch >= 2.6).

Install: `pip install 'robustarena[robustbench]'` (an extra: robustbench 1.1.1 pins timm==1.0.9
and gdown==5.1.0 exactly).
"""
from __future__ import annotations

import difflib
import importlib
import sys
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from harness.core.classifier import Classifier
from harness.core.defense import BuildContext, Defense, register
from harness.core.errors import UserError
from harness.core.hashing import file_sha256
from harness.core.registry import config_key

DATASETS = ("cifar10", "cifar100", "imagenet")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
INSTALL = "pip install 'robustarena[robustbench]'"


@contextmanager
def _compat_modules() -> Iterator[None]:
    """Names robustbench 1.1.1 imports that a current environment lacks, for the import only.

    It imports `autoattack` (the reference code's name on GitHub; PyPI ships the same code as
    `pyautoattack`, which robustbench's own metadata requires) and `pkg_resources` (removed from
    setuptools 81) for one `resource_filename` call. Missing names are aliased while robustbench
    imports and removed afterwards, so nothing else in the process sees them.
    """
    added: list[str] = []
    try:
        importlib.import_module("autoattack")
    except ImportError:
        import pyautoattack
        import pyautoattack.state

        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
        added += ["autoattack", "autoattack.state"]
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, path: str(resources.files(package).joinpath(path))  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
        added.append("pkg_resources")
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def robustbench() -> Any:
    """The `robustbench` package (imported once), or a one-line error saying how to install it."""
    if "robustbench.utils" in sys.modules:
        return sys.modules["robustbench"]
    try:
        with _compat_modules(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's and torch.jit's deprecation notes at import
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module("robustbench")
            importlib.import_module("robustbench.utils")
    except ImportError as exc:
        raise UserError(f"defense=robustbench needs the robustbench package ({exc}); {INSTALL}") from None
    return module


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("robustbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def zoo_names(dataset: str, threat_model: str) -> list[str]:
    """Model names RobustBench's zoo holds for (dataset, threat model)."""
    robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return list(model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)])


def _threat_model(value: str) -> str:
    options = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions", "corruptions_3d": "corruptions_3d"}
    key = str(value).strip().lower()
    if key not in options:
        raise UserError(f"defense.threat_model={value!r} unknown; RobustBench's threat models are: {', '.join(options.values())}")
    return options[key]


def zoo_dataset(requested: str | None, data_name: str) -> str:
    """RobustBench's dataset: `defense.dataset`, else the evaluation dataset's name (npz: its label or file stem)."""
    if requested:
        if requested not in DATASETS:
            raise UserError(f"defense.dataset={requested!r} unknown; RobustBench's datasets are: {', '.join(DATASETS)}")
        return requested
    name = str(data_name).lower()
    for candidate in ("cifar100", "cifar10", "imagenet"):  # cifar100 before its prefix cifar10
        if name == candidate or name.startswith(candidate):
            return candidate
    raise UserError(f"dataset {data_name!r} has no RobustBench zoo; choose dataset=cifar10 or cifar100 "
                    f"(or set defense.dataset=cifar10|cifar100|imagenet for an npz file of such images)")


@register("robustbench")
@dataclass
class RobustBenchModel(Defense):
    """A RobustBench zoo model (Croce et al. 2021), weights and architecture from robustbench.

    Args:
        name (field `model_name`): the zoo's model name, e.g. Carmon2019Unlabeled, Ding2020MMA, Standard.
        threat_model: Linf | L2 | corruptions: the zoo's leaderboard the model belongs to.
        dataset: cifar10 | cifar100 | imagenet; null = from `dataset=`.
        model_dir: where load_model keeps checkpoints; null = <work_dir>/cache/robustbench.
    """

    model_name: str = config_key("name", "Carmon2019Unlabeled")
    threat_model: str = "Linf"
    dataset: str | None = None
    model_dir: str | None = None

    def validate(self) -> None:
        self.threat_model = _threat_model(self.threat_model)
        robustbench()  # a missing package is bad input, reported before any data is loaded

    def checkpoint_path(self, model_dir: Path, dataset: str) -> Path:
        """Where `load_model` looks first (and downloads to): <model_dir>/<dataset>/<threat>/<name>.pt."""
        return Path(model_dir) / dataset / self.threat_model.replace("_3d", "") / f"{self.model_name}.pt"

    def build(self, ctx: BuildContext) -> Classifier:
        import timm

        dataset = zoo_dataset(self.dataset, ctx.data.name)
        names = zoo_names(dataset, self.threat_model)
        timm_name = f"{self.model_name.lower().replace('-', '_')}_{dataset}_{self.threat_model.lower()}"
        if self.model_name not in names and not timm.is_model(timm_name):
            close = difflib.get_close_matches(self.model_name, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"defense.name={self.model_name!r} is not in RobustBench's {dataset} {self.threat_model} zoo; "
                            f"{hint}it has {len(names)} models, e.g. {', '.join(names[:4])}")
        if ctx.data.num_classes != NUM_CLASSES[dataset]:
            raise UserError(f"RobustBench {dataset} models predict {NUM_CLASSES[dataset]} classes but the dataset "
                            f"{ctx.data.name!r} has {ctx.data.num_classes}; evaluate it on {dataset} images")
        model_dir = Path(self.model_dir).expanduser() if self.model_dir else Path(ctx.cache_dir) / "robustbench"
        path = self.checkpoint_path(model_dir, dataset)
        from robustbench.utils import load_model

        try:
            module = load_model(model_name=self.model_name, model_dir=str(model_dir), dataset=dataset,
                                threat_model=self.threat_model)
        except Exception as exc:  # download failures, damaged files, key mismatches: one line, the way out
            where = "" if path.is_file() else f"; with internet it downloads to {path}, offline place the checkpoint there"
            raise UserError(f"robustbench could not load {self.model_name} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}){where}") from None
        info: dict[str, Any] = {"robustbench": {"name": self.model_name, "dataset": dataset, "threat_model": self.threat_model,
                                                "version": _version(),
                                                "architecture": type(module).__name__,
                                                "checkpoint": str(path) if path.is_file() else f"timm:{timm_name}"},
                                "parameters": sum(p.numel() for p in module.parameters())}
        if path.is_file():
            info["weights_sha256"] = file_sha256(path)
        return Classifier(module.to(ctx.device).eval(), ctx.data.num_classes, ctx.data.input_shape, info=info)
