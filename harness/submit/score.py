"""`arena submit BUNDLE`: check, attack and score a submitted defense; `--template DIR` writes a skeleton.

The checks run in order and the first that fails rejects the bundle with a one-line reason
(exit status 2), before anything is attacked:

1. `card`: `defense.yaml` against the schema (errors name the field);
2. `checksum`: the weights file's sha256 equals the card's;
3. `loading`: weights read with `torch.load(weights_only=True)` (arbitrary pickles refused),
   `model.py` imported, `create()` called, the state dict loaded strictly;
4. `contract`: logits of shape (N, C) in a floating dtype on float32 [0, 1] NCHW input, eval
   mode, not probabilities, observed randomness as declared (several passes), ensemble structure
   as declared;
5. `clean_accuracy`: the declared clean accuracy is reproduced on the evaluation subset within
   max(clean_tolerance, clean_sigmas binomial standard errors).

An accepted bundle then gets the health report (`harness.health.report`) on a subset, the scoring
suite (`conf/suite/submission*.yaml`, fixed and versioned; the randomized / ensemble variant when
the card declares it) through the normal evaluator with a seed the harness draws, and a
leaderboard row marked `submission` with the card, the bundle's hashes and the seed in the run's
manifest. The health report is stored as `health.json` in the run directory and its verdict sets
`masking_suspected` in the run's summary, which the leaderboard reads.
"""
from __future__ import annotations

import argparse
import math
import secrets
import shlex
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.submit.bundle import CARD_NAME, Bundle, load_bundle, verify_checksum, write_template
from harness.core.errors import UserError
from harness.core.hashing import file_sha256

FAMILY = "submission"
CHECKS = ("card", "checksum", "loading", "contract", "clean_accuracy")


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
    progress: bool = False


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
    """The card's dataset, or `--data FILE.npz` standing in for its test split (labelled as the card's dataset)."""
    cfg = bundle.dataset_cfg()
    if data is None:
        return cfg
    path = Path(data).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--data {str(data)!r} does not exist; give an .npz with x (uint8) and y (int64)")
    label = cfg.get("label") or (cfg["name"] if cfg["name"] != "npz" else path.stem)
    return {"name": "npz", "path": str(path), "label": label, "num_classes": cfg.get("num_classes")}


def compose(bundle: Bundle, opts: SubmitOptions, suite: str, seed: int) -> tuple[dict[str, Any], list[str]]:
    """The evaluation config (as `arena eval` would compose it) and the equivalent overrides."""
    from harness.api import compose_config

    ds = dataset_config(bundle, opts.data)
    threat = bundle.card["threat_models"][0]
    cfg = compose_config(["defense=checkpoint", f"suite={suite}", f"dataset={ds['name']}",
                          f"threat={threat['norm'].lower()}"])
    cfg["dataset"] = {**cfg.get("dataset", {}), **ds}
    cfg["defense"] = {**cfg["defense"], "model_file": str(bundle.model_file), "weights": str(bundle.weights_file),
                      "randomized": bool(bundle.card["randomized"]), "label": bundle.card["name"]}
    cfg.update(seed=seed, work_dir=str(opts.work_dir), device=opts.device, batch_size=opts.batch_size,
               progress=opts.progress)
    sub = dict((cfg.get("suite") or {}).get("submission") or {})
    n = opts.n_samples if opts.n_samples is not None else sub.get("n_samples")
    cfg["n_samples"] = n
    overrides = ["defense=checkpoint", f"defense.model_file={_q(bundle.model_file)}", f"defense.weights={_q(bundle.weights_file)}",
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


def check_loading(bundle: Bundle) -> None:
    """Weights readable with weights_only=True and holding a state dict; model.py importable with create()."""
    from defenses.checkpoint import import_model_file
    from harness.data.weights import extract_state_dict, load_weights

    extract_state_dict(load_weights(bundle.weights_file))
    import_model_file(bundle.model_file)


@torch.no_grad()
def check_contract(clf: Any, x: torch.Tensor, card: dict[str, Any], passes: int = 8) -> dict[str, Any]:
    """The harness's model contract plus the card's declarations (randomness, ensemble)."""
    from harness.core.contract import check_classifier
    from harness.core.ensemble import Ensemble

    try:
        out = clf.module(x)
    except Exception as exc:  # the model cannot take the harness's input at all
        raise UserError(f"the model fails on a float32 [0,1] batch of shape {tuple(x.shape)} "
                        f"({type(exc).__name__}: {str(exc)[:160]}); it must take NCHW images in [0, 1]") from None
    if torch.is_tensor(out) and not out.dtype.is_floating_point:
        raise UserError(f"the model returns {out.dtype}, not floating-point logits; return the logits tensor")
    outs = torch.stack([clf.module(x).float() for _ in range(passes)]) if torch.is_tensor(out) else None
    varies = outs is not None and bool((outs - outs[0]).abs().amax() > 1e-5 * (1 + outs[0].abs().amax()))
    if varies and not card["randomized"] and not clf.module.training:
        raise UserError(f"the card declares randomized: false but the model's outputs differ across {passes} calls on the "
                        f"same inputs; declare randomized: true (scored with EOT and repeated decisions) or make it deterministic")
    check_classifier(clf, x[: min(8, x.shape[0])])
    if not varies and card["randomized"]:
        raise UserError(f"the card declares randomized: true but {passes} calls on the same {x.shape[0]} inputs gave "
                        f"identical outputs; declare randomized: false")
    declared, module = card["ensemble"], clf.module
    has_members = hasattr(module, "members")
    if declared and not isinstance(module, Ensemble):
        raise UserError(f"the card declares an ensemble but create() returns a {type(module).__name__}; return "
                        f"harness.core.ensemble.Ensemble(members, mode={declared['aggregation']!r}) so attacks can see the members")
    if declared and (len(module.members) != declared["members"] or module.mode != declared["aggregation"]):
        raise UserError(f"the card declares ensemble {declared} but the model has {len(module.members)} members "
                        f"aggregated by {module.mode!r}")
    if not declared and has_members:
        raise UserError(f"create() returns an ensemble ({len(module.members)} members) but the card declares ensemble: null")
    return {"probe_samples": int(x.shape[0]), "passes": passes, "randomness_observed": varies,
            "ensemble": bool(declared), "output_dtype": str(out.dtype)}


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
    import attacks  # noqa: F401  (registers attacks)
    import defenses  # noqa: F401  (registers defenses)
    from harness.core.defense import BuildContext, build_defense
    from harness.evasion import board as leaderboard
    from harness.evasion.run import run_evaluation
    from harness.health.report import HealthConfig, build_surrogate, format_report, mark_summary, merge_suite_checks, run_health, \
        suite_checks, write_report
    from harness.core.threat import ThreatModel
    from harness.data.training import to_unit

    opts = opts or SubmitOptions()
    started = time.perf_counter()
    bundle = _stage("card", lambda: load_bundle(bundle_path))
    card = bundle.card
    log(f"  ok  card: {card['name']} ({card['architecture']}; {len(card['threat_models'])} threat model(s))")
    sha = _stage("checksum", lambda: verify_checksum(bundle))
    log(f"  ok  checksum: {bundle.card['weights']['file']} sha256 {sha[:16]}...")
    _stage("loading", lambda: check_loading(bundle))

    seed_source = "user" if opts.seed is not None else "harness"
    seed = int(opts.seed) if opts.seed is not None else secrets.randbelow(2**31 - 1)
    suite = choose_suite(card, opts.suite)
    cfg, overrides = _stage("dataset", lambda: compose(bundle, opts, suite, seed))
    cfg = with_threat(cfg, [], card["threat_models"][0])[0]  # the first threat model until the scoring loop
    suite_cfg = cfg.get("suite") or {}
    sub = dict(suite_cfg.get("submission") or {})
    health_cfg = HealthConfig.from_dict(suite_cfg.get("health"))
    if opts.health_samples is not None:
        health_cfg.n_samples = int(opts.health_samples)

    from harness.data.datasets import load_dataset, select_eval
    from harness.core.device import resolve_device

    data = _stage("dataset", lambda: load_dataset(dict(cfg["dataset"])))
    cap_samples(cfg, int(data.test_x.shape[0]))
    ids, x_u8, y = _stage("dataset", lambda: select_eval(data, cfg["n_samples"], int(cfg.get("offset", 0) or 0)))
    device = _stage("dataset", lambda: resolve_device(str(cfg.get("device", "auto"))))
    _stage("dataset", lambda: plan_suite(cfg))
    cache_dir = Path(str(cfg["work_dir"])) / "cache"

    def build() -> Any:
        return build_defense(dict(cfg["defense"])).build(BuildContext(
            data=data, model_cfg=dict(cfg.get("model") or {}), device=device, seed=seed,
            cache_dir=cache_dir, progress=opts.progress)).to(device)

    clf = _stage("loading", build)
    log(f"  ok  loading: weights_only load, create() from {card['model_file']}, strict state dict")
    probe = to_unit(x_u8[: min(64, x_u8.shape[0])], device)
    contract = _stage("contract", lambda: check_contract(clf, probe, card))
    log(f"  ok  contract: logits ({contract['output_dtype']}), eval mode, randomness "
        f"{'observed as declared' if card['randomized'] else 'none, as declared'}")
    draws = int((cfg.get("evaluator") or {}).get("draws", 10))
    measured = clean_accuracy(clf, x_u8, y, device, opts.batch_size, draws, seed)
    clean = _stage("clean_accuracy", lambda: check_clean_accuracy(measured, card["clean_accuracy"], int(x_u8.shape[0]), sub))
    log(f"  ok  clean accuracy: {clean['measured']}% measured on {clean['n']} images, {clean['declared']}% declared "
        f"(tolerance {clean['tolerance_points']} points)")
    result = SubmissionResult(bundle, seed, suite, clean)
    if opts.check_only:
        log(f"accepted (checks only; not scored): {card['name']}")
        return result

    # health report (before the suite, on the first evaluation samples)
    threats = [ThreatModel(t["norm"], float(t["eps"])) for t in card["threat_models"]]
    surrogate, why = build_surrogate(data, health_cfg, device, seed, cache_dir, progress=opts.progress)
    nh = min(health_cfg.n_samples, int(x_u8.shape[0]))
    reports = run_health(clf, to_unit(x_u8[:nh], device), y[:nh].to(device), ids[:nh], threats, health_cfg, seed,
                         surrogate, why)
    log(f"  ok  health report: {len(reports)} threat model(s), {sum(r.wall_s for r in reports.values()):.0f} s")
    del clf

    from harness.core.attack import build_attack
    from harness.core.access import Capability
    from harness.results.store import RunDir

    blackbox = [str(s.get("label") or s.get("name")) for s in suite_cfg.get("attacks") or []
                if build_attack({k: v for k, v in s.items() if k != "view"}).requires == Capability.SCORES]
    command = "arena submit " + " ".join(shlex.quote(a) for a in _command_args(bundle, opts, seed))
    provenance = {
        "submission": True,
        "card": card,
        "bundle": {"path": str(bundle.path), "card_sha256": file_sha256(bundle.path / CARD_NAME),
                   "model_file_sha256": file_sha256(bundle.model_file), "weights_sha256": sha},
        "scoring": {"suite": suite, "seed": seed, "seed_source": seed_source, "n_samples": int(x_u8.shape[0]),
                    "health_samples": nh, "clean_check": clean,
                    "contract": contract},
        "submit_command": command,
    }
    for threat_decl, threat in zip(card["threat_models"], threats):
        cfg_t, ov_t = with_threat(cfg, overrides, threat_decl)
        report = reports[threat.name]
        summary = run_evaluation(cfg_t, overrides=ov_t, log=lambda *a: None, manifest_extra=provenance)
        run_dir = Path(summary["run_dir"])
        samples = RunDir(run_dir).samples()
        merge_suite_checks(report, suite_checks(samples, threat, blackbox, health_cfg))
        write_report(run_dir, report)
        mark_summary(run_dir, report)
        summary["masking_suspected"] = report.masking_suspected
        result.runs.append(summary)
        result.health[threat.name] = report
        log(format_report(report))
        log(f"  scored {threat.name} with {suite}: clean {100 * summary['clean_acc']:.2f}%, robust "
            f"{100 * summary['robust_acc']:.2f}% (n={summary['n_samples']}, seed {seed}); run {summary['run_dir']}")
    if opts.board:
        out = Path(opts.work_dir) / "leaderboard" / "evasion.csv"
        leaderboard.build([Path(opts.work_dir)], out)
        result.board = out
        log(f"leaderboard: {out}")
    log(f"accepted: {card['name']} ({'MASKING SUSPECTED' if result.masking_suspected else 'no masking suspected'}; "
        f"{time.perf_counter() - started:.0f} s)")
    return result


def _command_args(bundle: Bundle, opts: SubmitOptions, seed: int) -> list[str]:
    args = [str(bundle.path), "--seed", str(seed), "--work-dir", str(opts.work_dir)]
    if opts.suite:
        args += ["--suite", opts.suite]
    if opts.n_samples is not None:
        args += ["--n-samples", str(opts.n_samples)]
    if opts.health_samples is not None:
        args += ["--health-samples", str(opts.health_samples)]
    if opts.data is not None:
        args += ["--data", str(opts.data)]
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI: `arena submit BUNDLE [options]` or `arena submit --template DIR`."""
    p = argparse.ArgumentParser(prog="arena submit", description="Check, attack and score a defense bundle "
                                "(a directory with defense.yaml, model.py and the weights).")
    p.add_argument("bundle", nargs="?", help="bundle directory")
    p.add_argument("--template", metavar="DIR", help="write a bundle skeleton (defense.yaml, model.py) into DIR and exit")
    p.add_argument("--work-dir", type=Path, default=Path("arena-work"), help="runs/, cache/ and leaderboard/ (default ./arena-work)")
    p.add_argument("--suite", help="scoring suite (default: submission, or its _randomized / _ensemble variant as declared)")
    p.add_argument("--n-samples", type=int, help="evaluation samples (default: the suite's, capped at the test split)")
    p.add_argument("--health-samples", type=int, help="samples for the health report's probes (default: the suite's)")
    p.add_argument("--seed", type=int, help="scoring seed (default: drawn by the harness and recorded; give it to reproduce)")
    p.add_argument("--data", type=Path, help="an .npz (x uint8, y int64) with the card's dataset's test images, for offline use")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--check-only", action="store_true", help="run the acceptance checks only (no health report, no attacks)")
    p.add_argument("--no-board", action="store_true", help="do not rebuild the leaderboard CSV")
    p.add_argument("--progress", action="store_true", help="show progress bars")
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
                         check_only=args.check_only, board=not args.no_board, progress=args.progress)
    submit(args.bundle, opts)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
