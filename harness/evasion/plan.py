"""Plan an evaluation: validate the whole config, pick the samples and the suite, hash the run.

Nothing is written and no model is built here, so a bad value fails before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.core.atomic import check_writable_dir
from harness.core.attack import Attack, build_attack
from harness.core.defense import DEFENSES, build_defense, threat_context
from harness.core.device import resolve_device
from harness.core.errors import UserError
from harness.core.hashing import file_sha256, stable_hash, tensor_hash
from harness.core.threat import ThreatModel
from harness.data.datasets import DatasetSplits, load_dataset, select_eval
from harness.results.memory import MemoryRun
from harness.results.store import RunDir

PATH_KEYS = ("model_file", "weights", "path", "root")


@dataclass
class AttackSlot:
    """One entry of the suite: the attack, its label in records, and the model view it attacks."""

    label: str
    attack: Attack
    spec: dict[str, Any]
    view: str | None = None
    # image-passes `attack.prepare` spent (e.g. training a LAFEAT head), per evaluated sample of the
    # whole evaluation; set by the run, charged to every sample's record of this attack
    prepare_forward: float = 0.0
    prepare_backward: float = 0.0


@dataclass
class EvalPlan:
    """Everything decided before any work or any write: validated, hashed, ready to run."""

    cfg: dict[str, Any]
    data: DatasetSplits
    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    slots: list[AttackSlot]
    suite_name: str
    semantic: dict[str, Any]
    run: RunDir | MemoryRun
    device: torch.device
    seed: int
    batch_size: int
    draws: int
    cascade: bool
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one-line warnings to print before the run
    eval_range: tuple[int, int] = (0, 0)  # [lo, hi) of the whole evaluation (all shards) in data.test_x
    # batch_size=auto: `batch_size` is provisional (the default) until the run resolves it on the
    # device (harness.core.device.fit_batch_size) or reads it back from the run's manifest
    batch_auto: bool = False
    amp: torch.dtype | None = None  # evaluator.amp: autocast dtype of the attacks' passes (never the verdict's)


def _semantic_value(key: str, value: Any) -> Any:
    """Replace file paths by content hashes so the run key survives moving files around."""
    if key in PATH_KEYS and isinstance(value, str) and value:
        path = Path(value).expanduser()
        return f"sha256:{file_sha256(path)}" if path.is_file() else value
    return value


def semantic_part(cfg: dict[str, Any] | None) -> dict[str, Any]:
    return {k: _semantic_value(k, v) for k, v in (cfg or {}).items() if k not in ("download",)}


def parse_shard(shard: Any, n: int, batch_size: int = 1) -> tuple[slice, str | None]:
    """`i/n` -> the i-th of n contiguous, deterministic slices of the evaluation samples.

    Slices are cut at batch boundaries (whole batches of `batch_size`), so a shard's batches are
    exactly the unsharded run's batches (same members, same per-batch seeds): merged shards equal
    the unsharded run sample for sample, costs included.
    """
    if shard in (None, "", "null"):
        return slice(0, n), None
    try:
        i, k = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise UserError(f"shard={shard!r} is not of the form i/n (e.g. shard=0/4)") from None
    if not (k >= 1 and 0 <= i < k):
        raise UserError(f"shard={shard!r} needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)")
    n_batches = -(-n // batch_size)
    if k > n_batches:
        raise UserError(f"shard={shard!r}: {n} samples make only {n_batches} batches of batch_size={batch_size}; "
                        f"use at most {n_batches} shards or a smaller batch_size")
    lo, hi = (n_batches * i) // k * batch_size, min(n, (n_batches * (i + 1)) // k * batch_size)
    return slice(lo, hi), f"{i}/{k}"


def suite_specs(cfg: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The ordered attack specs: the single `attack` if one is chosen, else the suite's list."""
    if cfg.get("attack"):
        spec = dict(cfg["attack"])
        return str(spec.get("label") or spec.get("name")), [spec]
    suite = cfg.get("suite") or {}
    specs = [dict(s) for s in suite.get("attacks") or []]
    if not specs:
        raise UserError("the suite has no attacks; choose suite=quick|standard|... or attack=NAME")
    return f"{suite.get('name', 'custom')}@v{suite.get('version', 1)}", specs


def build_slots(specs: list[dict[str, Any]]) -> list[AttackSlot]:
    slots, seen = [], set()
    for spec in specs:
        spec = dict(spec)
        view = spec.pop("view", None)
        label = str(spec.get("label") or spec.get("name"))
        if label in seen:
            raise UserError(f"two attacks in the suite share the label {label!r}; give one a distinct label:")
        seen.add(label)
        slots.append(AttackSlot(label, build_attack(spec), spec, view))
    return slots


def int_setting(value: Any, name: str, example: int) -> int:
    """An integer from the config (null or text -> one-line UserError, not a TypeError deep inside)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, however large (the caller checks the range)
    ok = isinstance(value, (float, str))
    if ok:
        try:
            number = float(value)
            ok = number.is_integer()  # False for 2.5, nan and inf
        except (ValueError, OverflowError):
            ok = False
    if not ok:
        raise UserError(f"{name}={_show(value)} must be an integer (e.g. {name}={example})")
    return int(str(value)) if isinstance(value, str) and str(value).strip().lstrip("+-").isdigit() else int(number)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _check_board_path(board: Any) -> None:
    """`leaderboard.path` must name a file the board can be written to (when the config has a
    leaderboard section, as `arena eval`'s does, and updates it)."""
    if board is None:
        return  # library use: the caller builds no board
    board = dict(board)
    if board.get("update", True) is False:
        return
    path = board.get("path")
    if path in (None, "") or str(path).endswith(("/", "\\")) or Path(str(path)).is_dir():
        raise UserError(f"leaderboard.path={_show(path) or chr(39) * 2} must name a CSV file "
                        f"(e.g. leaderboard.path=arena-work/leaderboard/evasion.csv), or set leaderboard.update=false")
    check_writable_dir(Path(str(path)).parent, key="leaderboard.path", value=path)


DEFAULT_BATCH = 250  # what batch_size=auto resolves to on a CPU (and the config's default)


def batch_setting(value: Any) -> int | None:
    """`batch_size`: a positive integer, or `auto` (None here: resolved on the device by the run)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        size = int_setting(value, "batch_size", DEFAULT_BATCH)
    except UserError:
        raise UserError(f"batch_size={_show(value)} must be a positive integer or auto "
                        f"(e.g. batch_size={DEFAULT_BATCH} or batch_size=auto)") from None
    if size <= 0:
        raise UserError(f"batch_size={size} must be > 0 (e.g. batch_size={DEFAULT_BATCH}) or auto")
    return size


AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "true": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def amp_setting(value: Any, device: torch.device) -> torch.dtype | None:
    """`evaluator.amp`: false (float32 everywhere), true / bfloat16, or float16 (CUDA only)."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("false", "off", "none", "")):
        return None
    key = "true" if value is True else str(value).strip().lower()
    if key not in AMP_DTYPES:
        raise UserError(f"evaluator.amp={_show(value)} is not a precision; use false, bfloat16 (or true) or float16")
    dtype = AMP_DTYPES[key]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(f"evaluator.amp=float16 needs a CUDA device (device={device.type}: CPU autocast runs "
                        f"bfloat16); use evaluator.amp=bfloat16 or device=cuda")
    return dtype


SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's generators take any seed in 0..2**63-1


def seed_setting(value: Any, name: str = "seed") -> int:
    """The run seed: an integer in 0..2**63-1 (a larger one overflows torch's generators)."""
    seed = int_setting(value, name, 0)
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name}={seed} is outside 0..{SEED_MAX}; use a smaller seed (e.g. {name}=0)")
    return seed


def plan_evaluation(cfg: dict[str, Any], data: DatasetSplits | None = None, check_defense: bool = True) -> EvalPlan:
    """Validate the whole config and decide the run directory; writes nothing.

    `data` replaces the configured dataset (in-memory arrays from `harness.evaluate`), and
    `check_defense=False` skips the defense (the caller brings its own classifier). With
    `work_dir: null` the run is kept in memory (`harness.results.memory.MemoryRun`).
    """
    seed = seed_setting(cfg.get("seed", 0))
    fixed_batch = batch_setting(cfg.get("batch_size", DEFAULT_BATCH))
    batch_size = fixed_batch if fixed_batch is not None else DEFAULT_BATCH
    if fixed_batch is None and cfg.get("shard") not in (None, "", "null"):
        raise UserError(f"shard={cfg.get('shard')!r} needs a fixed batch_size (shards are cut at batch boundaries, and "
                        f"batch_size=auto resolves per machine); set batch_size={DEFAULT_BATCH} or another number")
    work_dir = None if cfg.get("work_dir", "arena-work") is None else Path(str(cfg.get("work_dir", "arena-work")))
    if work_dir is not None:  # None: an in-memory run (harness.evaluate), nothing written
        check_writable_dir(work_dir)
    _check_board_path(cfg.get("leaderboard"))
    device_name = cfg.get("device", "auto")
    if device_name is None:
        raise UserError("device=null is not a device; use auto, cpu or cuda[:N]")
    device = resolve_device(str(device_name))
    threat_cfg = dict(cfg.get("threat") or {})
    threat = ThreatModel(norm=str(threat_cfg.get("norm", "Linf")), eps=threat_cfg.get("eps", 0.3))
    suite_name, specs = suite_specs(cfg)
    slots = build_slots(specs)
    notes: list[str] = []
    if check_defense:
        defense = build_defense(dict(cfg.get("defense") or {}), threat)  # checked before any data work
    if data is None:
        data = load_dataset(dict(cfg.get("dataset") or {}))
    if check_defense:
        notes = [*DEFENSES.follow_notes(defense, threat_context(threat)), *defense.notes(data.name)]
    n_samples = None if cfg.get("n_samples") is None else int_setting(cfg.get("n_samples"), "n_samples", 1000)
    offset = int_setting(cfg.get("offset", 0) or 0, "offset", 0)
    ids, x, y = select_eval(data, n_samples, offset)
    eval_range = (offset, offset + int(ids.shape[0]))
    eval_ids, eval_data = tensor_hash(ids), tensor_hash(x)  # the whole evaluation set: all shards share it
    sl, shard = parse_shard(cfg.get("shard"), ids.shape[0], batch_size)
    ids, x, y = ids[sl], x[sl], y[sl]
    ev = dict(cfg.get("evaluator") or {})
    draws = int_setting(ev.get("draws", 10), "evaluator.draws", 10)
    if draws < 1:
        raise UserError(f"evaluator.draws={draws} must be >= 1")
    cascade = ev.get("cascade", True)
    if not isinstance(cascade, bool):
        raise UserError(f"evaluator.cascade={_show(cascade)} must be true or false")
    amp = amp_setting(ev.get("amp", False), device)
    semantic = {
        "dataset": {**semantic_part(cfg.get("dataset")), "eval_ids": eval_ids, "eval_data": eval_data},
        "model": semantic_part(cfg.get("model")),
        "defense": semantic_part(cfg.get("defense")),
        "suite": suite_name,
        "attacks": [dict(s.spec, view=s.view) for s in slots],
        "threat": {"norm": threat.norm, "eps": threat.eps},
        "n_samples": cfg.get("n_samples"), "offset": offset,
        "seed": seed, "batch_size": "auto" if fixed_batch is None else batch_size,
        "evaluator": {"draws": draws, "cascade": cascade},
        "shard": shard,
    }
    if amp is not None:  # part of the run's identity only when on (runs without it keep their hash)
        semantic["evaluator"]["amp"] = str(amp).removeprefix("torch.")
    if cfg.get("submission"):  # how `arena submit` ran the model (isolation, re-judging): part of the run's identity
        semantic["submission"] = dict(cfg["submission"])
    unsharded = {**semantic, "shard": None}
    run = MemoryRun.for_config(semantic) if work_dir is None else RunDir.for_config(work_dir, "runs", semantic)
    return EvalPlan(cfg, data, ids, x, y, threat, slots, suite_name, semantic, run, device, seed, batch_size,
                    draws, cascade, extra={"unsharded_hash": stable_hash(unsharded), "shard": shard,
                                           "first_batch": sl.start // batch_size,
                                           **({"threat_eps_text": str(threat_cfg["eps_text"])} if threat_cfg.get("eps_text") else {})},
                    notes=notes, eval_range=eval_range, batch_auto=fixed_batch is None, amp=amp)


