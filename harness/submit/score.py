"""`arena submit BUNDLE`: check, attack and score a submitted defense; `--template DIR` writes a skeleton.

Submitted code never runs in this process: the bundle is copied into a private staging folder
(`harness.submit.bundle.stage_bundle`) and every use of the model goes to a sandboxed worker
process (`harness.submit.sandbox`, `harness.submit.remote`). Flags are validated before anything
else (one line, exit status 2, nothing written). The checks then run in order and the first that
fails rejects the bundle with a one-line reason (exit status 2), before anything is attacked:

0. `bundle`: no symbolic link leaves the bundle, no special files, bounded size;
1. `card`: `defense.yaml` against the schema (errors name the field; unknown and duplicate keys
   refused; the card names a dataset, never a file);
2. `checksum`: the weights file's sha256 equals the card's;
3. `loading`: in a fresh sandboxed worker, weights read with `torch.load(weights_only=True)`
   (arbitrary pickles refused), `model.py` imported, `create()` called, the state dict loaded
   strictly, all within the sandbox's load time limit;
4. `contract`: logits of shape (N, C) in a floating dtype on float32 [0, 1] NCHW input, eval
   mode, not probabilities, observed randomness as declared (several passes), ensemble structure
   as declared;
5. `clean_accuracy`: the declared clean accuracy is reproduced on the evaluation subset within
   max(clean_tolerance, clean_sigmas binomial standard errors).

After the suite: 6. `stateful_model`: a sample of the attack worker's requests replayed in fresh
workers must be answered the same (`harness.submit.audit`), else the bundle is rejected; and every
verdict is re-judged by fresh workers (`harness.submit.rejudge`), whose verdicts the board uses.

An accepted bundle then gets the health report (`harness.health.report`) on a subset, the scoring
suite (`conf/suite/submission*.yaml`, fixed and versioned; the randomized / ensemble variant when
the card declares it) through the normal evaluator with a seed the harness draws, and a
leaderboard row marked `submission` with the card, the bundle's hashes and the seed in the run's
manifest. The health report is stored as `health.json` in the run directory and its verdict sets
`masking_suspected` in the run's summary, which the leaderboard reads.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.core.errors import UserError
from harness.core.formats import pct
from harness.core.hashing import file_sha256
from harness.submit.bundle import CARD_NAME, Bundle, load_bundle, stage_bundle, verify_checksum, write_template
from harness.submit.remote import Session, Worker, open_session
from harness.submit.sandbox import BUNDLE_MOUNT, MODES, Isolation, SandboxLimits, detect_isolation

FAMILY = "submission"
CHECKS = ("bundle", "card", "checksum", "loading", "contract", "clean_accuracy", "suite", "stateful_model")
VERDICTS = "fresh@v1"  # how verdicts are taken (part of the run key)
MAX_SEED = 2**31 - 1
MAX_BATCH = 65536
MAX_AUDIT = 16
CLASSES = {"mnist5k": 10, "digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


class Rejection(UserError):
    """The bundle failed one of the acceptance checks; `check` names it."""

    def __init__(self, check: str, reason: str) -> None:
        self.check = check
        self.reason = " ".join(str(reason).split())
        super().__init__(f"rejected by the {check} check: {self.reason}")


@dataclass
class SubmitOptions:
    """How to score a bundle (CLI flags of `arena submit`)."""

    work_dir: Path = Path("arena-work")
    suite: str | None = None  # default: submission (+ _randomized / _ensemble as declared)
    n_samples: int | None = None  # default: the suite's submission.n_samples
    health_samples: int | None = None  # default: the suite's health.n_samples
    seed: int | None = None  # default: drawn by the harness
    data: Path | None = None  # an .npz with the card's dataset's test images (offline CIFAR-10, ...)
    device: str = "auto"
    batch_size: int = 250
    check_only: bool = False
    board: bool = True
    progress: bool = True  # bars on a terminal, one line per stage in logs (harness.core.progress)
    isolation: str = "auto"  # auto (bubblewrap if usable, else the labelled fallback) | full | reduced
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    audit_per_batch: int = 2  # requests of each evaluation batch replayed in fresh workers (0: no audit)


def _int_flag(name: str, value: Any, lo: int, hi: int, example: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} must be an integer from {lo} to {hi} (e.g. {name} {example})")


def validate_options(opts: "SubmitOptions", bundle_path: Path | str | None = None) -> None:
    """Every flag of `arena submit`, checked before anything is read or written (one line each)."""
    _int_flag("--n-samples", opts.n_samples, 1, 10**7, 1000)
    _int_flag("--health-samples", opts.health_samples, 1, 10**6, 100)
    _int_flag("--seed", opts.seed, 0, MAX_SEED, 0)
    _int_flag("--batch-size", opts.batch_size, 1, MAX_BATCH, 250)
    _int_flag("--audit-per-batch", opts.audit_per_batch, 0, MAX_AUDIT, 2)
    if opts.isolation not in MODES:
        raise UserError(f"--isolation {opts.isolation!r} unknown; choose one of: {', '.join(MODES)}")
    if opts.suite is not None:
        from harness.cli.hydra_app import group_options

        if opts.suite not in group_options("suite"):
            raise UserError(f"--suite {opts.suite!r} is not a suite; choose one of: {', '.join(group_options('suite'))}")
    from harness.core.device import resolve_device

    resolve_device(str(opts.device))
    if opts.data is not None:
        path = Path(opts.data).expanduser()
        if not path.is_file() or path.suffix != ".npz":
            raise UserError(f"--data {str(opts.data)!r} is not an existing .npz file; give an .npz with x (uint8) and y (int64)")
    if not isinstance(opts.sandbox, SandboxLimits):
        raise UserError("sandbox limits must be a SandboxLimits")
    SandboxLimits.from_dict(opts.sandbox.as_dict())
    if bundle_path is not None:
        work = Path(opts.work_dir).expanduser().resolve()
        root = Path(bundle_path).expanduser().resolve()
        if work == root or root in work.parents:
            raise UserError(f"--work-dir {str(opts.work_dir)!r} is inside the bundle; give a work directory outside it")


@dataclass
class SubmissionResult:
    """What an accepted submission produced."""

    bundle: Bundle
    seed: int
    suite: str
    clean: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # one summary per threat model
    health: dict[str, Any] = field(default_factory=dict)  # threat name -> HealthReport
    board: Path | None = None
    isolation: Isolation | None = None

    @property
    def masking_suspected(self) -> bool:
        return any(r.masking_suspected for r in self.health.values())


# ---------------------------------------------------------------------------------- helpers


def _stage(check: str, fn: Callable[[], Any]) -> Any:
    """Run one acceptance check; any user error in it becomes a rejection naming the check."""
    try:
        return fn()
    except Rejection:
        raise
    except UserError as exc:
        raise Rejection(check, str(exc)) from None


def choose_suite(card: dict[str, Any], requested: str | None) -> str:
    """The suite for this card: the requested one, else the family's randomized/ensemble variant, else the family."""
    from harness.cli.hydra_app import group_options

    options = group_options("suite")
    if requested:
        if requested not in options:
            raise UserError(f"--suite {requested!r} is not a suite; choose one of: {', '.join(options)}")
        return requested
    if card["randomized"] and f"{FAMILY}_randomized" in options:
        return f"{FAMILY}_randomized"
    if card["ensemble"] and f"{FAMILY}_ensemble" in options:
        return f"{FAMILY}_ensemble"
    return FAMILY


def dataset_config(bundle: Bundle, data: Path | None) -> dict[str, Any]:
    """The card's dataset by name, or the operator's `--data FILE.npz` standing in for its test split.

    The harness alone decides where data comes from: nothing from the card but the name, and
    never a download (a torchvision dataset is read from the default root if it is there).
    """
    name = bundle.card["dataset"]["name"]
    if data is None:
        return {"name": name}
    path = Path(data).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--data {str(data)!r} does not exist; give an .npz with x (uint8) and y (int64)")
    return {"name": "npz", "path": str(path), "label": name, "num_classes": CLASSES.get(name)}


def data_facts(path: Path) -> dict[str, Any]:
    """Provenance of an operator's --data file: its stem, file hash and content hashes (x and y bytes)."""
    from harness.data.datasets import load_npz_arrays

    x, y = load_npz_arrays(path)
    return {"file": path.name, "stem": path.stem, "file_sha256": file_sha256(path),
            "x_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "y_sha256": hashlib.sha256(y.astype("int64").tobytes()).hexdigest(), "n": int(x.shape[0])}


def compose(bundle: Bundle, opts: SubmitOptions, suite: str, seed: int) -> tuple[dict[str, Any], list[str]]:
    """The evaluation config (as `arena eval` would compose it) and the equivalent overrides."""
    from harness.api import compose_config

    ds = dataset_config(bundle, opts.data)
    threat = bundle.card["threat_models"][0]
    cfg = compose_config(["defense=checkpoint", f"suite={suite}", f"dataset={ds['name']}",
                          f"threat={threat['norm'].lower()}"])
    cfg["dataset"] = {**cfg.get("dataset", {}), **ds}
    if "download" in cfg["dataset"]:
        cfg["dataset"]["download"] = False  # a card can never make the harness fetch anything
    cfg["defense"] = {**cfg["defense"], "model_file": str(bundle.model_file), "weights": str(bundle.weights_file),
                      "randomized": bool(bundle.card["randomized"]), "label": bundle.card["name"]}
    cfg.update(seed=seed, work_dir=str(opts.work_dir), device=opts.device, batch_size=opts.batch_size,
               progress=opts.progress)
    sub = dict((cfg.get("suite") or {}).get("submission") or {})
    n = opts.n_samples if opts.n_samples is not None else sub.get("n_samples")
    cfg["n_samples"] = n
    overrides = ["defense=checkpoint", f"defense.model_file={_q(bundle.model_file.name)}", f"defense.weights={_q(bundle.weights_file.name)}",
                 f"defense.randomized={str(bool(bundle.card['randomized'])).lower()}", f"defense.label={bundle.card['name']}",
                 f"suite={suite}", f"dataset={ds['name']}"]
    overrides += [f"dataset.{k}={_q(v)}" for k, v in ds.items() if k != "name" and v is not None]
    overrides += [f"seed={seed}", f"batch_size={opts.batch_size}"]
    return cfg, overrides


def _q(value: Any) -> str:
    """Quote a value for a Hydra override when it needs it."""
    text = str(value)
    return text if all(c.isalnum() or c in "/._-" for c in text) else "'" + text.replace("'", "\\'") + "'"


def with_threat(cfg: dict[str, Any], overrides: list[str], threat: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    cfg = deepcopy(cfg)
    cfg["threat"] = {"norm": threat["norm"], "eps": float(threat["eps"])}
    return cfg, [*overrides, f"threat={threat['norm'].lower()}", f"threat.eps={threat['eps']!r}"]


def plan_suite(cfg: dict[str, Any]) -> None:
    """Validate the suite's attack specs before any work (the evaluator builds them again)."""
    from harness.evasion.plan import build_slots, suite_specs

    build_slots(suite_specs(cfg)[1])


def cap_samples(cfg: dict[str, Any], total: int) -> None:
    """Default sample counts larger than the test split become the whole split."""
    n = cfg.get("n_samples")
    offset = int(cfg.get("offset", 0) or 0)
    if n is None or int(n) > total - offset:
        cfg["n_samples"] = total - offset


# ------------------------------------------------------------------------------ the checks


def _digest(bundle: Bundle) -> bytes:
    """What identifies the bundle's model for `module_hash`: card, model file and weights, hashed."""
    h = hashlib.sha256()
    for f in (bundle.path / CARD_NAME, bundle.model_file, bundle.weights_file):
        h.update(file_sha256(f).encode())
    return h.digest()


def check_loading(bundle: Bundle, isolation: Isolation | None = None, limits: SandboxLimits | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """In a sandboxed worker: weights_only load, model file import, create(), strict state dict; the worker's facts."""
    worker = Worker(bundle.path, bundle.card["model_file"], bundle.card["weights"]["file"],
                    isolation or detect_isolation("auto"), limits or SandboxLimits(), device=device, role="loading")
    try:
        return worker.start()
    finally:
        worker.close()


@torch.no_grad()
def check_contract(session: Session, x: torch.Tensor, card: dict[str, Any], passes: int = 8) -> dict[str, Any]:
    """The harness's model contract plus the card's declarations (randomness, ensemble), through the worker."""
    from harness.core.contract import check_classifier
    from harness.submit.remote import RemoteError

    clf, facts = session.classifier, session.facts
    if facts["training_modules"]:
        raise UserError(f"the model keeps modules in training mode after eval() ({', '.join(facts['training_modules'][:3])}); "
                        f"the harness evaluates models in eval() mode")
    declared = card["ensemble"]
    if declared and not facts["ensemble"]:
        raise UserError(f"the card declares an ensemble but create() returns a model that is not a harness.core.ensemble."
                        f"Ensemble; return Ensemble(members, mode={declared['aggregation']!r}) so attacks can see the members")
    if declared and (facts["ensemble"]["members"] != declared["members"] or facts["ensemble"]["mode"] != declared["aggregation"]):
        raise UserError(f"the card declares ensemble {declared} but the model has {facts['ensemble']['members']} members "
                        f"aggregated by {facts['ensemble']['mode']!r}")
    if not declared and (facts["ensemble"] or facts["has_members"]):
        raise UserError("create() returns an ensemble (a model with members) but the card declares ensemble: null")
    try:
        outs = torch.stack([clf.module(x).float() for _ in range(passes)])
    except RemoteError as exc:  # the model cannot take the harness's input at all
        raise UserError(f"the model fails on a float32 [0,1] batch of shape {tuple(x.shape)} ({exc}); it must take NCHW "
                        f"images in [0, 1]") from None
    varies = bool((outs - outs[0]).abs().amax() > 1e-5 * (1 + outs[0].abs().amax()))
    if varies and not card["randomized"]:
        raise UserError(f"the card declares randomized: false but the model's outputs differ across {passes} calls on the "
                        f"same inputs; declare randomized: true (scored with EOT and repeated decisions) or make it deterministic")
    if card["randomized"] and not varies:
        raise UserError(f"the card declares randomized: true but {passes} calls on the same {x.shape[0]} inputs gave "
                        f"identical outputs; declare randomized: false")
    check_classifier(clf, x[: min(8, x.shape[0])])
    return {"probe_samples": int(x.shape[0]), "passes": passes, "randomness_observed": varies,
            "ensemble": bool(declared), "output_dtype": "float32 (as sent by the worker)", "parameters": facts["parameters"]}


@torch.no_grad()
def clean_accuracy(clf: Any, x_u8: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int,
                   draws: int, seed: int) -> float:
    """Mean clean accuracy (over `draws` draws for randomised models) on the evaluation subset."""
    from harness.data.training import to_unit

    torch.manual_seed(seed)
    n_draws = draws if clf.randomized else 1
    correct = 0.0
    for i in range(0, x_u8.shape[0], batch_size):
        x = to_unit(x_u8[i:i + batch_size], device)
        yy = y[i:i + batch_size].to(device)
        for _ in range(n_draws):
            correct += float((clf.module(x).argmax(1) == yy).sum())
    return correct / (n_draws * max(int(x_u8.shape[0]), 1))


def check_clean_accuracy(measured: float, declared_pct: float, n: int, sub: dict[str, Any]) -> dict[str, Any]:
    """Declared vs measured clean accuracy (percent) within max(tolerance, sigmas * binomial s.e.)."""
    p = measured
    tol = max(float(sub.get("clean_tolerance", 1.0)), float(sub.get("clean_sigmas", 3.0)) * 100 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)))
    diff = 100 * measured - declared_pct
    facts = {"declared": declared_pct, "measured": round(100 * measured, 2), "n": n, "tolerance_points": round(tol, 2)}
    if abs(diff) > tol:
        raise UserError(f"the card declares clean_accuracy {declared_pct:g}% but the harness measures {100 * measured:.2f}% "
                        f"on {n} test images (allowed difference {tol:.2f} points); check the weights, the "
                        f"preprocessing inside the model, or the declared number")
    return facts


# --------------------------------------------------------------------------------- the flow


def submit(bundle_path: Path | str, opts: SubmitOptions | None = None, log: Callable[[str], None] = print) -> SubmissionResult:
    """Check, health-test and score a bundle; raises `Rejection` naming the failed check."""
    opts = opts or SubmitOptions()
    validate_options(opts, bundle_path)
    isolation = detect_isolation(opts.isolation)
    if isolation.level == "full":
        log(f"  ok  isolation: {isolation.describe()}")
    else:
        log(f"  !!  isolation: {isolation.describe()}")
    staging = Path(tempfile.mkdtemp(prefix="arena-bundle-"))
    try:
        return _submit(Path(bundle_path), opts, isolation, staging / "bundle", log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _submit(bundle_path: Path, opts: SubmitOptions, isolation: Isolation, staged: Path,
            log: Callable[[str], None]) -> SubmissionResult:
    from harness.core.threat import ThreatModel
    from harness.data.training import to_unit
    from harness.evasion import board as leaderboard
    from harness.health.report import HealthConfig, build_surrogate, format_report, mark_summary, merge_suite_checks, \
        run_health, suite_checks, write_report

    started = time.perf_counter()
    original = bundle_path.expanduser().resolve()
    if not original.is_dir():
        raise Rejection("card", f"bundle {str(bundle_path)!r} is not a directory; give the directory that holds {CARD_NAME}")
    _stage("bundle", lambda: stage_bundle(original, staged))
    bundle = _stage("card", lambda: _as_original(lambda: load_bundle(staged), staged, original))
    card = bundle.card
    log(f"  ok  card: {card['name']} ({card['architecture']}; {len(card['threat_models'])} threat model(s))")
    sha = _stage("checksum", lambda: verify_checksum(bundle))
    log(f"  ok  checksum: {bundle.card['weights']['file']} sha256 {sha[:16]}...")

    seed_source = "user" if opts.seed is not None else "harness"
    seed = int(opts.seed) if opts.seed is not None else secrets.randbelow(MAX_SEED)
    suite = choose_suite(card, opts.suite)
    cfg, overrides = _stage("dataset", lambda: compose(bundle, opts, suite, seed))
    cfg = with_threat(cfg, [], card["threat_models"][0])[0]  # the first threat model until the scoring loop
    suite_cfg = cfg.get("suite") or {}
    sub = dict(suite_cfg.get("submission") or {})
    health_cfg = HealthConfig.from_dict(suite_cfg.get("health"))
    if opts.health_samples is not None:
        health_cfg.n_samples = int(opts.health_samples)

    from harness.core.device import resolve_device
    from harness.data.datasets import select_eval

    data = _stage("dataset", lambda: _load_data(cfg, opts))
    cap_samples(cfg, int(data.test_x.shape[0]))
    ids, x_u8, y = _stage("dataset", lambda: select_eval(data, cfg["n_samples"], int(cfg.get("offset", 0) or 0)))
    device = _stage("dataset", lambda: resolve_device(str(cfg.get("device", "auto"))))
    _stage("dataset", lambda: plan_suite(cfg))
    cache_dir = Path(str(cfg["work_dir"])) / "cache"
    digest = _digest(bundle)
    randomized = bool(card["randomized"])
    worker_device = str(device) if device.type == "cuda" else "cpu"  # the same GPU as the harness
    log_dir = Path(opts.work_dir) / "workers" / f"{card['name']}-{seed}"
    info = {"model_file": card["model_file"], "weights_sha256": sha, "isolation": isolation.level}

    staged_tree = tree_hashes(bundle.path)

    def fresh(role: str) -> Session:
        if isolation.level != "full" and tree_hashes(bundle.path) != staged_tree:
            # a reduced worker runs as the harness's user and could rewrite the staged copy for the next one
            raise Rejection("suite", f"the staged copy of the bundle changed during scoring (before starting the {role} "
                            f"worker): a worker wrote to it; this needs --isolation full")
        return open_session(bundle.path, card["model_file"], card["weights"]["file"], isolation=isolation,
                            limits=opts.sandbox, device=worker_device, num_classes=data.num_classes,
                            input_shape=tuple(data.input_shape), randomized=randomized, digest=digest, role=role,
                            log_dir=log_dir, info=info)

    session = _stage("loading", lambda: _as_original(lambda: fresh("check"), staged, original))
    try:
        log(f"  ok  loading: in a sandboxed worker, weights_only load, create() from {card['model_file']}, strict state dict")
        probe = to_unit(x_u8[: min(64, x_u8.shape[0])], device)
        contract = _stage("contract", lambda: check_contract(session, probe, card))
        log(f"  ok  contract: logits, eval mode, randomness "
            f"{'observed as declared' if randomized else 'none, as declared'}")
        draws = int((cfg.get("evaluator") or {}).get("draws", 10))
        measured = _stage("contract", lambda: clean_accuracy(session.classifier, x_u8, y, device, opts.batch_size, draws, seed))
        clean = _stage("clean_accuracy", lambda: check_clean_accuracy(measured, card["clean_accuracy"], int(x_u8.shape[0]), sub))
        log(f"  ok  clean accuracy: {clean['measured']}% measured on {clean['n']} images, {clean['declared']}% declared "
            f"(tolerance {clean['tolerance_points']} points)")
        result = SubmissionResult(bundle, seed, suite, clean, isolation=isolation)
        if opts.check_only:
            log(f"accepted (checks only; not scored): {card['name']}")
            return result
        # health report (before the suite, on the first evaluation samples)
        threats = [ThreatModel(t["norm"], float(t["eps"])) for t in card["threat_models"]]
        surrogate, why = build_surrogate(data, health_cfg, device, seed, cache_dir, progress=opts.progress)
        nh = min(health_cfg.n_samples, int(x_u8.shape[0]))
        reports = _stage("contract", lambda: run_health(session.classifier, to_unit(x_u8[:nh], device), y[:nh].to(device),
                                                        ids[:nh], threats, health_cfg, seed, surrogate, why,
                                                        progress=opts.progress))
        _stage("contract", lambda: _worker_model_checks(session, reports, to_unit(x_u8[:nh], device)))
        log(f"  ok  health report: {len(reports)} threat model(s), {sum(r.wall_s for r in reports.values()):.0f} s")
    finally:
        session.close()

    from harness.core.access import Capability
    from harness.core.attack import build_attack

    blackbox = [str(s.get("label") or s.get("name")) for s in suite_cfg.get("attacks") or []
                if build_attack({k: v for k, v in s.items() if k != "view"}).requires == Capability.SCORES]
    command = "arena submit " + " ".join(shlex.quote(a) for a in _command_args(original, opts, seed))
    provenance = {
        "submission": True,
        "card": card,
        "bundle": {"path": str(original), "card_sha256": file_sha256(bundle.path / CARD_NAME),
                   "model_file_sha256": file_sha256(bundle.model_file), "weights_sha256": sha},
        "isolation": isolation.as_dict(),
        "sandbox": opts.sandbox.as_dict(),
        "scoring": {"suite": suite, "seed": seed, "seed_source": seed_source, "n_samples": int(x_u8.shape[0]),
                    "health_samples": nh, "clean_check": clean, "contract": contract, "verdicts": VERDICTS,
                    "audit_per_batch": opts.audit_per_batch,
                    **({"data": data_facts(Path(opts.data).expanduser().resolve())} if opts.data is not None else {})},
        "submit_command": command,
    }
    clean_inputs = {int(i): to_unit(x_u8[k:k + 1], torch.device("cpu"))[0].numpy() for k, i in enumerate(ids.tolist())}
    labels = {int(i): int(v) for i, v in zip(ids.tolist(), y.tolist())}
    for threat_decl, threat in zip(card["threat_models"], threats):
        cfg_t, ov_t = with_threat(cfg, overrides, threat_decl)
        report = reports[threat.name]
        summary, stateful = _score_threat(cfg_t, ov_t, provenance, fresh, threat, clean_inputs, labels, health_cfg, opts,
                                          device, draws, randomized, isolation, seed)
        run_dir = Path(summary["run_dir"])
        from harness.results.store import RunDir

        samples = RunDir(run_dir).samples()
        merge_suite_checks(report, [*suite_checks(samples, threat, blackbox, health_cfg), stateful])
        write_report(run_dir, report)
        mark_summary(run_dir, report)
        summary["masking_suspected"] = report.masking_suspected
        result.runs.append(summary)
        result.health[threat.name] = report
        log(format_report(report))
        log(f"  scored {threat.name} with {suite}: clean {pct(summary['clean_acc'])}, robust "
            f"{pct(summary['robust_acc'])} (n={summary['n_samples']}, seed {seed}; fresh verdicts, isolation "
            f"{isolation.level}); run {summary['run_dir']}")
    if opts.board:
        out = Path(opts.work_dir) / "leaderboard" / "evasion.csv"
        leaderboard.build([Path(opts.work_dir)], out)
        result.board = out
        log(f"leaderboard: {out}")
    log(f"accepted: {card['name']} ({'MASKING SUSPECTED' if result.masking_suspected else 'no masking suspected'}; "
        f"isolation {isolation.level}; {time.perf_counter() - started:.0f} s)")
    return result


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the staged bundle), keyed by relative path."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _as_original(fn: Callable[[], Any], staged: Path, original: Path) -> Any:
    """Run fn; an error naming the private staged copy names the submitted bundle instead."""
    try:
        return fn()
    except UserError as exc:
        text = str(exc).replace(str(staged), str(original)).replace(f"'{BUNDLE_MOUNT}/", f"'{original}/")
        raise UserError(text) from None


def _load_data(cfg: dict[str, Any], opts: SubmitOptions) -> Any:
    from harness.data.datasets import load_dataset

    try:
        return load_dataset(dict(cfg["dataset"]))
    except UserError as exc:
        if opts.data is None and cfg["dataset"].get("name") not in ("mnist5k", "digits"):
            reason = str(exc).split("; add dataset.download=true")[0]  # an `arena eval` option, not a submit one
            raise UserError(f"{reason}; arena submit never downloads: give the test split with --data FILE.npz "
                            f"(x uint8, y int64)") from None
        raise


def _worker_model_checks(session: Session, reports: dict[str, Any], x: torch.Tensor) -> None:
    """Checks 3 and 19 as observed inside the worker (self-reported: the worker runs the submitted code)."""
    from harness.health.report import inference_optimisation_check, model_mode_check

    source = "observed inside the sandboxed worker, self-reported"
    traced = session.model.trace(x)
    state = session.model.state()
    c3 = inference_optimisation_check(traced["calls"], traced["changed"], source)
    c19 = model_mode_check(state["training"], state["changed"], source)
    for r in reports.values():
        r.checks = sorted([c for c in r.checks if c.id not in (3, 19)] + [c3, c19], key=lambda c: c.id)


def _score_threat(cfg_t: dict[str, Any], ov_t: list[str], provenance: dict[str, Any], fresh: Callable[[str], Session],
                  threat: Any, clean_inputs: dict[int, Any], labels: dict[int, int], health_cfg: Any, opts: SubmitOptions,
                  device: torch.device, draws: int, randomized: bool, isolation: Isolation, seed: int) -> tuple[dict[str, Any], Any]:
    """One threat model: the suite against a fresh attack worker, the audit, fresh verdicts, the finished run."""
    from harness.evasion.plan import plan_evaluation
    from harness.evasion.run import execute
    from harness.submit.audit import Reservoir, replay
    from harness.submit.rejudge import rejudge, stateful_check

    cfg_t = {**cfg_t, "submission": {"isolation": isolation.level, "mechanism": isolation.mechanism, "verdicts": VERDICTS,
                                     "audit_per_batch": int(opts.audit_per_batch)}}
    run_dir = plan_evaluation(cfg_t, check_defense=False).run
    was_done = run_dir.is_done()
    reservoir = Reservoir(opts.audit_per_batch)
    holder: dict[str, Any] = {}

    def attack_classifier() -> Any:
        session = _stage("loading", lambda: fresh(f"attack-{threat.name}"))
        session.model.tap = reservoir
        holder["session"] = session
        return session.classifier

    def finalize(samples: Any, candidates: list[Any]) -> tuple[Any, dict[str, Any]]:
        session = holder.pop("session", None)
        if session is not None:
            holder["attack_stats"] = vars(session.worker.stats).copy()
            session.close()
        audit = replay(reservoir, fresh)
        if not audit.passed:
            m = audit.mismatched[0]
            raise Rejection("stateful_model", f"{len(audit.mismatched)} of {audit.replayed} attack requests replayed in a fresh "
                            f"worker were answered differently (e.g. evaluation batch {m['batch']}, {m['what']} of "
                            f"{m['rows']} of {m['inputs']} inputs); a model's answer must depend only on its input and "
                            f"seed, never on what it was shown before")
        rej = rejudge(samples, examples_of_candidates(candidates), clean_inputs, labels, fresh, draws=draws,
                      randomized=randomized, batch_size=int(opts.batch_size), seed=seed, device=device)
        fresh_successes(candidates, rej.records)  # adversarial.npz then lists what the fresh verdicts broke
        check = stateful_check(rej.facts, audit.as_dict(), health_cfg)
        holder["check"] = check
        return rej.records, {"stateful_model": check.status == "fail", "verdicts": rej.facts, "audit": audit.as_dict(),
                             "isolation": isolation.level, "attack_worker": holder.get("attack_stats", {})}

    try:
        out = execute(cfg_t, overrides=ov_t, log=lambda *a: None, manifest_extra=provenance, classifier=attack_classifier,
                      keep_adversarial=True, before_batch=reservoir.begin, finalize=finalize)
        summary = {**out.summary, "run_dir": str(out.run.path), "skipped": out.skipped}
    except UserError as exc:
        if not was_done and not run_dir.is_done():  # a rejected submission leaves no half-written run
            shutil.rmtree(run_dir.path, ignore_errors=True)
        if isinstance(exc, Rejection):
            raise
        raise Rejection("suite", str(exc)) from None
    finally:
        session = holder.pop("session", None)
        if session is not None:
            session.close()
    check = holder.get("check")
    if check is None:  # the run was already complete: rebuild the check from its summary
        check = stateful_check(summary.get("verdicts") or _no_verdicts(randomized), summary.get("audit"), health_cfg)
    return summary, check


def examples_of_candidates(candidates: list[Any]) -> dict[str, Any]:
    """Every verified candidate of the run (harness.evasion.adversarial.Candidates) as flat arrays."""
    import numpy as np

    ids = [i for c in candidates for i in c.ids]
    if not ids:
        return {"sample_id": np.zeros(0, np.int64), "attack": np.zeros(0, str), "x": np.zeros((0, 1, 1, 1), np.float32)}
    return {"sample_id": np.concatenate(ids),
            "attack": np.concatenate([np.full(len(i), label) for c in candidates for label, i in zip(c.labels, c.ids)]),
            "x": np.concatenate([x for c in candidates for x in c.x_adv]).astype(np.float32)}


def fresh_successes(candidates: list[Any], records: Any) -> None:
    """Replace each candidate's attack-time success by the fresh verdict's (in place)."""
    import numpy as np

    rows = records[records["attack"] != "clean"]
    fresh = {(int(s), str(a)): bool(v) for s, a, v in zip(rows["sample_id"], rows["attack"], rows["success"])}
    for c in candidates:
        for i, (label, ids) in enumerate(zip(c.labels, c.ids)):
            c.success[i] = np.array([fresh.get((int(s), label), False) for s in ids], dtype=bool)


def _no_verdicts(randomized: bool) -> dict[str, Any]:
    return {"judges": 0, "examples": 0, "records": 0, "disagreements": 0, "numerical_ties": 0, "attack_correct_fresh_wrong": 0,
            "attack_wrong_fresh_correct": 0, "disagreeing_ids": [], "per_attack": {}, "randomized": randomized}


def _command_args(bundle_path: Path, opts: SubmitOptions, seed: int) -> list[str]:
    args = [str(bundle_path), "--seed", str(seed), "--work-dir", str(opts.work_dir)]
    if opts.suite:
        args += ["--suite", opts.suite]
    if opts.n_samples is not None:
        args += ["--n-samples", str(opts.n_samples)]
    if opts.health_samples is not None:
        args += ["--health-samples", str(opts.health_samples)]
    if opts.data is not None:
        args += ["--data", str(opts.data)]
    if opts.isolation != "auto":
        args += ["--isolation", opts.isolation]
    if opts.audit_per_batch != SubmitOptions.audit_per_batch:
        args += ["--audit-per-batch", str(opts.audit_per_batch)]
    return args


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `UserError`s (exit status 2, nothing written)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see arena submit --help")


def _sandbox_limits(pairs: list[str]) -> SandboxLimits:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--sandbox {pair!r} must be KEY=NUMBER, e.g. --sandbox load_s=120")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--sandbox {pair!r}: {value!r} is not a number") from None
        values[key.strip()] = int(number) if number.is_integer() and key.strip() not in ("load_s", "request_s", "wall_s") else number
    return SandboxLimits.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    """CLI: `arena submit BUNDLE [options]` or `arena submit --template DIR`."""
    p = _Parser(prog="arena submit", description="Check, attack and score a defense bundle "
                "(a directory with defense.yaml, model.py and the weights). The bundle's code runs only in a "
                "sandboxed worker process.")
    p.add_argument("bundle", nargs="?", help="bundle directory")
    p.add_argument("--template", metavar="DIR", help="write a bundle skeleton (defense.yaml, model.py) into DIR and exit")
    p.add_argument("--work-dir", type=Path, default=Path("arena-work"), help="runs/, cache/ and leaderboard/ (default ./arena-work)")
    p.add_argument("--suite", help="scoring suite (default: submission, or its _randomized / _ensemble variant as declared)")
    p.add_argument("--n-samples", type=int, help="evaluation samples, >= 1 (default: the suite's, capped at the test split)")
    p.add_argument("--health-samples", type=int, help="samples for the health report's probes, >= 1 (default: the suite's)")
    p.add_argument("--seed", type=int, help=f"scoring seed 0..{MAX_SEED} (default: drawn by the harness and recorded)")
    p.add_argument("--data", type=Path, help="the operator's .npz (x uint8, y int64) with the card's dataset's test images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=250, help=f"1..{MAX_BATCH} (default 250)")
    p.add_argument("--isolation", default="auto", help="auto (bubblewrap if usable, else reduced, labelled) | full | reduced")
    p.add_argument("--sandbox", action="append", default=[], metavar="KEY=VALUE",
                   help="a worker limit, e.g. load_s=120, request_s=600, memory_mb=16384, cpu_s=43200 (repeatable)")
    p.add_argument("--audit-per-batch", type=int, default=2,
                   help=f"attack requests per evaluation batch replayed in fresh workers, 0..{MAX_AUDIT} (default 2)")
    p.add_argument("--check-only", action="store_true", help="run the acceptance checks only (no health report, no attacks)")
    p.add_argument("--no-board", action="store_true", help="do not rebuild the leaderboard CSV")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress: bars on a terminal, one line per stage in logs (default on)")
    args = p.parse_args(argv)
    if args.template:
        for path in write_template(args.template):
            print(f"wrote {path}")
        print("next: train your model, save torch.save(model.state_dict(), 'weights.pt') into the directory, "
              f"put `sha256sum weights.pt` into {CARD_NAME}, then `arena submit {args.template}`")
        return 0
    if not args.bundle:
        p.error("give a bundle directory (or --template DIR)")
    opts = SubmitOptions(work_dir=args.work_dir, suite=args.suite, n_samples=args.n_samples, health_samples=args.health_samples,
                         seed=args.seed, data=args.data, device=args.device, batch_size=args.batch_size,
                         check_only=args.check_only, board=not args.no_board, progress=args.progress,
                         isolation=args.isolation, sandbox=_sandbox_limits(args.sandbox), audit_per_batch=args.audit_per_batch)
    submit(args.bundle, opts)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
