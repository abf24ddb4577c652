"""Submission bundles: the `defense.yaml` card, its schema and the bundle's file checks.

A bundle is a directory with

- `defense.yaml`: the model card (schema below; every field is checked, unknown fields refused);
- `model.py`: defines `create()` returning the `nn.Module` (inputs in [0, 1] NCHW, logits out,
  normalisation inside); an optional `load(weights_path)` is ignored, since the harness loads
  weights itself with `torch.load(weights_only=True)`;
- the weights file named by the card, whose sha256 the card declares.

Errors name the field by its path in the card (`threat_models[1].eps`), say what was found and
what is expected, so a rejected submitter can fix the card without reading this module.

The card describes the model, never the evaluation: it names a dataset from the known list and
nothing else (no file, root, download switch or label: a local .npz is the operator's `--data`),
and unknown or duplicate keys are errors that list the known ones. A bundle is read once, by
`stage_bundle`, into a private copy that everything else uses (hashes, the sandboxed worker): no
symbolic link may point outside the bundle, special files are refused, sizes are bounded, and a
file changed after the checks cannot reach the worker.
"""
from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from harness.core.errors import UserError
from harness.core.numbers import as_number
from harness.core.hashing import file_sha256

CARD_NAME = "defense.yaml"
CARD_FORMAT = 1
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
NORMS = ("Linf", "L2")
AGGREGATIONS = ("softmax", "logits", "voting")
DATASETS = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
MAX_CARD_BYTES = 64 * 1024
MAX_BUNDLE_BYTES = 8 * 1024**3
MAX_BUNDLE_FILES = 10_000


class CardError(UserError):
    """A schema error in `defense.yaml`, naming the field."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field = field_path
        super().__init__(f"{CARD_NAME}: {field_path}: {message}")


# ------------------------------------------------------------------------------------- fields
# Each validator takes (path, value) and returns the normalised value or raises CardError.


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise CardError(path, f"must be a non-empty string (got {v!r})")
    return v.strip()


def _slug(path: str, v: Any) -> str:
    v = _str(path, v)
    if not SLUG.match(v):
        raise CardError(path, f"{v!r} must be 1-64 characters of letters, digits, '_', '.', '-' (it names the leaderboard row)")
    return v


def _text(path: str, v: Any) -> str:
    """Free text, possibly empty (optional descriptive fields)."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise CardError(path, f"must be text (got {v!r})")
    return v.strip()


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise CardError(path, f"must be true or false (got {v!r})")
    return v


def _url_or_null(path: str, v: Any) -> str | None:
    if v is None:
        return None
    v = _str(path, v)
    if not re.match(r"^https?://\S+$", v):
        raise CardError(path, f"must be an http(s) URL or null (got {v!r})")
    return v


def _authors(path: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise CardError(path, f"must be a non-empty list of names (got {v!r})")
    return [_str(f"{path}[{i}]", a) for i, a in enumerate(v)]


def _percent(path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        raise CardError(path, f"must be a percentage between 0 and 100, e.g. 98.2 (got {v!r})")
    return float(v)


def _eps(path: str, v: Any) -> float:
    """A positive number, or a fraction string such as "8/255"."""
    parsed = as_number(v)
    value = float(parsed) if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else None
    if value is None or not value > 0 or not math.isfinite(value):
        raise CardError(path, f"must be a positive finite number or a fraction such as \"8/255\" (got {v!r})")
    return value


def _threat_models(path: str, v: Any) -> list[dict[str, Any]]:
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not v:
        raise CardError(path, "must be a non-empty list of {norm: Linf|L2, eps: NUMBER}")
    out = []
    for i, t in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(t, dict):
            raise CardError(p, f"must be a mapping {{norm: Linf|L2, eps: NUMBER}} (got {t!r})")
        unknown = sorted(set(t) - {"norm", "eps"})
        if unknown:
            raise CardError(f"{p}.{unknown[0]}", "unknown key; a threat model has only norm and eps")
        if t.get("norm") not in NORMS:
            raise CardError(f"{p}.norm", f"must be one of {', '.join(NORMS)} (got {t.get('norm')!r})")
        eps = _eps(f"{p}.eps", t.get("eps"))
        if t["norm"] == "Linf" and eps > 1:
            raise CardError(f"{p}.eps", f"{eps} exceeds 1 for Linf on [0, 1] images; write e.g. \"8/255\"")
        out.append({"norm": t["norm"], "eps": eps})
    return out


def _dataset(path: str, v: Any) -> dict[str, Any]:
    """A dataset name from the known list (or {name: NAME}); the card never names a file or a root."""
    if isinstance(v, dict):
        unknown = sorted(set(v) - {"name"})
        if unknown:
            raise CardError(f"{path}.{unknown[0]}", "unknown key; a card names its dataset only (known keys: name); "
                            "a local .npz is given by the operator: arena submit BUNDLE --data FILE.npz")
        v = v.get("name")
    if v == "npz":
        raise CardError(path, "a card cannot bring its own data; name the dataset (one of: "
                        f"{', '.join(DATASETS)}) and the operator gives a local copy with --data FILE.npz")
    if v not in DATASETS:
        raise CardError(path, f"unknown dataset {v!r}; use one of: {', '.join(DATASETS)}")
    return {"name": v}


def _ensemble(path: str, v: Any) -> dict[str, Any] | None:
    if v is None or v is False:
        return None
    if not isinstance(v, dict):
        raise CardError(path, f"must be null or {{members: N, aggregation: softmax|logits|voting}} (got {v!r})")
    unknown = sorted(set(v) - {"members", "aggregation"})
    if unknown:
        raise CardError(f"{path}.{unknown[0]}", "unknown key; an ensemble has members and aggregation")
    m = v.get("members")
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise CardError(f"{path}.members", f"must be an integer >= 2 (got {m!r})")
    if v.get("aggregation") not in AGGREGATIONS:
        raise CardError(f"{path}.aggregation", f"must be one of {', '.join(AGGREGATIONS)} (got {v.get('aggregation')!r})")
    return {"members": m, "aggregation": v["aggregation"]}


def _training_data(path: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CardError(path, "must be a mapping {description: TEXT, extra_data: true|false}")
    unknown = sorted(set(v) - {"description", "extra_data"})
    if unknown:
        raise CardError(f"{path}.{unknown[0]}", "unknown key; use description and extra_data")
    return {"description": _str(f"{path}.description", v.get("description")),
            "extra_data": _bool(f"{path}.extra_data", v.get("extra_data"))}


def _relative_file(path: str, v: Any) -> str:
    v = _str(path, v)
    p = Path(v)
    if p.is_absolute() or ".." in p.parts:
        raise CardError(path, f"{v!r} must be a file inside the bundle (a relative path without '..')")
    return v


def _weights(path: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise CardError(path, "must be a mapping {file: weights.pt, sha256: <64 hex digits>}")
    unknown = sorted(set(v) - {"file", "sha256"})
    if unknown:
        raise CardError(f"{path}.{unknown[0]}", "unknown key; weights has file and sha256")
    sha = v.get("sha256")
    if not isinstance(sha, str) or not SHA256.match(sha.strip().lower()):
        raise CardError(f"{path}.sha256", f"must be the file's sha256 as 64 hex digits (`sha256sum FILE`; got {sha!r})")
    return {"file": _relative_file(f"{path}.file", v.get("file")), "sha256": sha.strip().lower()}


def _positive_int(path: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CardError(path, f"must be a positive integer (got {v!r})")
    return v


def _format(path: str, v: Any) -> int:
    if v != CARD_FORMAT:
        raise CardError(path, f"card format {v!r} is not supported; this harness reads format: {CARD_FORMAT}")
    return CARD_FORMAT


@dataclass(frozen=True)
class Field:
    """One card field: validator, whether required, default, and the help line for the template."""

    name: str
    check: Callable[[str, Any], Any]
    required: bool
    doc: str
    default: Any = None


FIELDS: tuple[Field, ...] = (
    Field("format", _format, False, "card format version", CARD_FORMAT),
    Field("name", _slug, True, "short unique name of the defense (the leaderboard row), e.g. my-defense"),
    Field("authors", _authors, True, "list of author names"),
    Field("paper", _url_or_null, True, "link to the paper or preprint (http/https), or null"),
    Field("architecture", _str, True, "architecture in words, e.g. ResNet-18 or WRN-34-10"),
    Field("dataset", _dataset, True, f"dataset the defense is for: {', '.join(DATASETS)}"),
    Field("threat_models", _threat_models, True, "threat models the defense claims, e.g. [{norm: Linf, eps: 8/255}]"),
    Field("randomized", _bool, True, "true if two calls on the same input may differ (noise, random switching)"),
    Field("ensemble", _ensemble, True, "null, or {members: N, aggregation: softmax|logits|voting}"),
    Field("training_data", _training_data, True, "{description: what it was trained on, extra_data: true|false}"),
    Field("license", _str, True, "licence of the weights and code, e.g. MIT or CC-BY-4.0"),
    Field("model_file", _relative_file, False, "Python file in the bundle with create()", "model.py"),
    Field("weights", _weights, True, "{file: weights file in the bundle, sha256: its sha256}"),
    Field("clean_accuracy", _percent, True, "declared clean accuracy in percent on the dataset's test split"),
    Field("number_forward_passes", _positive_int, False, "forward passes one prediction costs (ensembles, EOT)", 1),
    Field("preprocessing", _text, False, "any input preprocessing inside the model, in words", "none"),
    Field("notes", _text, False, "anything else a reviewer should know", ""),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


@dataclass
class Bundle:
    """A validated bundle: its directory and normalised card."""

    path: Path
    card: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return self.path / self.card["model_file"]

    @property
    def weights_file(self) -> Path:
        return self.path / self.card["weights"]["file"]

    def dataset_cfg(self) -> dict[str, Any]:
        """The card's dataset as a `dataset` config: its name only (the harness sets everything else)."""
        return {"name": self.card["dataset"]["name"]}


def validate_card(raw: Any) -> dict[str, Any]:
    """The normalised card, or `CardError` naming the first bad field."""
    if not isinstance(raw, dict):
        raise CardError("(top level)", f"must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELD_NAMES))
    if unknown:
        raise CardError(unknown[0], f"unknown field; valid fields: {', '.join(FIELD_NAMES)}")
    card: dict[str, Any] = {}
    for f in FIELDS:
        if f.name not in raw:
            if f.required:
                raise CardError(f.name, f"missing required field ({f.doc})")
            card[f.name] = f.default
            continue
        card[f.name] = f.check(f.name, raw[f.name])
    return card


NESTED_KEYS = {"threat_models[]": ("norm", "eps"), "ensemble": ("members", "aggregation"),
               "training_data": ("description", "extra_data"), "weights": ("file", "sha256"), "dataset": ("name",)}


def _known_keys(path: str) -> tuple[str, ...]:
    return FIELD_NAMES if not path else NESTED_KEYS.get(re.sub(r"\[\d+\]$", "[]", path), ())


def _check_duplicates(node: Any, path: str = "") -> None:
    """Refuse a key given twice in any mapping of the card (YAML would silently keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                where = f"{path}.{key}" if path else str(key)
                known = _known_keys(path)
                raise CardError(where, f"duplicate key (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); give each "
                                f"key once" + (f" (known keys here: {', '.join(known)})" if known else ""))
            seen[key] = key_node.start_mark.line
            _check_duplicates(value_node, f"{path}.{key}" if path else str(key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


def parse_card_text(text: str) -> Any:
    """YAML of a card: no anchors or aliases, no duplicate keys, then the plain safe load."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise CardError("(syntax)", f"YAML anchors and aliases are not allowed in a card (line {mark.line + 1})")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_duplicates(root)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise CardError("(syntax)", f"not valid YAML{where}: {problem}") from None


def read_card(path: Path) -> dict[str, Any]:
    """Parse `defense.yaml` (YAML errors become a one-line message with the line number)."""
    if not path.is_file():
        raise UserError(f"no {CARD_NAME} in {str(path.parent)!r}; a bundle needs {CARD_NAME}, model.py and the weights "
                        f"(`arena submit --template DIR` writes a skeleton)")
    if path.stat().st_size > MAX_CARD_BYTES:
        raise CardError("(file)", f"{path.stat().st_size} bytes; a card has at most {MAX_CARD_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CardError("(file)", "not UTF-8 text") from None
    return parse_card_text(text)


def load_bundle(path: Path | str) -> Bundle:
    """Read and validate the card and check that the files it names exist (as regular files)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"bundle {str(path)!r} is not a directory; give the directory that holds {CARD_NAME}")
    check_links(root)
    raw = read_card(root / CARD_NAME)
    card = validate_card(raw)
    bundle = Bundle(root, card, raw)
    for name, f in (("model_file", bundle.model_file), ("weights.file", bundle.weights_file)):
        rel = card["model_file"] if name == "model_file" else card["weights"]["file"]
        if not f.is_file():
            raise CardError(name, f"{rel!r} does not exist in the bundle as a regular file")
    return bundle


class BundleError(UserError):
    """The bundle's files break a hygiene rule (links out, special files, size)."""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_links(root: Path) -> None:
    """Refuse symbolic links that resolve outside the bundle, and special files (FIFOs, devices, sockets)."""
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                target = Path(os.path.realpath(p))
                if not _inside(target, root):
                    raise BundleError(f"bundle file {str(rel)!r} is a symbolic link that leaves the bundle; copy the file "
                                      f"into the bundle instead of linking to it")
                if target.is_dir():
                    raise BundleError(f"bundle entry {str(rel)!r} is a symbolic link to a folder; put the folder itself in the bundle")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"bundle entry {str(rel)!r} is not a regular file or folder (a FIFO, socket or device); remove it")


def stage_bundle(src: Path | str, dst: Path, max_bytes: int = MAX_BUNDLE_BYTES, max_files: int = MAX_BUNDLE_FILES) -> Path:
    """Copy the bundle into `dst` (which must not exist): regular files only, links inside resolved.

    Every later step (card, hashes, the worker) reads the copy, so what was checked is what runs.
    """
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"bundle {str(src)!r} is not a directory; give the directory that holds {CARD_NAME}")
    check_links(root)
    dst.mkdir(parents=True)
    total = files = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        for d in dirnames:
            if not (here / d).is_symlink():
                (dst / rel_dir / d).mkdir()
                files += 1  # folders count toward the entry limit too
        for name in filenames:
            p = here / name
            target = Path(os.path.realpath(p))
            if not _inside(target, root):  # changed since check_links
                raise BundleError(f"bundle file {str(rel_dir / name)!r} is a symbolic link that leaves the bundle; copy the file in")
            files += 1
            if files > max_files:
                raise BundleError(f"the bundle holds more than {max_files} files and folders; submit only the model, its "
                                  f"weights and the card")
            try:
                fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:  # a link loop, a file that vanished, no permission
                raise BundleError(f"bundle file {str(rel_dir / name)!r} cannot be read ({exc.strerror}); "
                                  f"replace it by a regular file") from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise BundleError(f"bundle entry {str(rel_dir / name)!r} is not a regular file; remove it")
                total += info.st_size
                if total > max_bytes:
                    raise BundleError(f"the bundle is larger than {max_bytes // 1024**2} MiB; submit only the model, its "
                                      f"weights and the card")
                with os.fdopen(os.dup(fd), "rb") as fin, open(dst / rel_dir / name, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
            finally:
                os.close(fd)
    return dst


def verify_checksum(bundle: Bundle) -> str:
    """The weights' sha256; raises `UserError` if it differs from the card's."""
    actual = file_sha256(bundle.weights_file)
    declared = bundle.card["weights"]["sha256"]
    if actual != declared:
        raise UserError(
            f"weights file {bundle.card['weights']['file']!r} has sha256 {actual} but {CARD_NAME} declares "
            f"weights.sha256 {declared}; the file changed or the card is stale (recompute with sha256sum)"
        )
    return actual


TEMPLATE_MODEL = '''"""Model of the submission: `create()` returns the nn.Module to score.

Contract: input images in [0, 1], float32, NCHW; output logits of shape (N, num_classes), not
probabilities; any normalisation inside the model; deterministic unless the card says
randomized: true. The harness loads the weights itself (torch.load(weights_only=True)), so save
them with torch.save(model.state_dict(), "weights.pt").
"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create() -> nn.Module:
    return Net()
'''


def template_card() -> str:
    """A commented `defense.yaml` with every field (placeholders to replace)."""
    lines = [
        "# Model card of a RobustArena submission (`arena submit DIR` checks every field).",
        "# Replace every value; compute the weights' sha256 with `sha256sum weights.pt`.",
        f"format: {CARD_FORMAT}",
        "name: my-defense                 # letters, digits, _ . - (the leaderboard row)",
        "authors: [Your Name]",
        "paper: null                      # or https://arxiv.org/abs/...",
        "architecture: small CNN (2 conv + 2 fc)",
        "dataset: mnist5k                 # mnist5k | digits | mnist | fashion_mnist | cifar10 | cifar100 | svhn",
        "threat_models:",
        "  - {norm: Linf, eps: 0.3}       # eps may be a fraction: \"8/255\"",
        "randomized: false                # true if two calls on the same input may differ",
        "ensemble: null                   # or {members: 3, aggregation: softmax}",
        "training_data:",
        "  description: mnist5k training split (4,000 images), no extra data",
        "  extra_data: false",
        "license: MIT",
        "model_file: model.py",
        "weights:",
        "  file: weights.pt",
        "  sha256: \"REPLACE_WITH_SHA256_OF_WEIGHTS\"   # quoted: a hash of digits only would read as a number",
        "clean_accuracy: 98.0             # percent on the test split; the harness reproduces it",
        "number_forward_passes: 1",
        "preprocessing: none",
        "notes: \"\"",
    ]
    return "\n".join(lines) + "\n"


def write_template(directory: Path | str) -> list[Path]:
    """Write a bundle skeleton (card + model.py); refuses to overwrite existing files."""
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    files = {d / CARD_NAME: template_card(), d / "model.py": TEMPLATE_MODEL}
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; give an empty or new directory to --template")
    for p, text in files.items():
        p.write_text(text)
    return list(files)
