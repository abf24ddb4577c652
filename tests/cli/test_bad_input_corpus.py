"""The bad-input corpus: one table, argv -> the expected part of the one-line message.

Every row is a bad value, file or place: malformed configs and overrides, values the harness
cannot evaluate (an infinite radius, zero samples, a device it does not run on, a seed torch
cannot take, a NaN learning rate), data files, checkpoints, model files, bundles, leaderboard
files, and work dirs that cannot hold results. Each must end with exit status 2, exactly one line
on stderr that contains the expected text, no traceback anywhere, and nothing written: the test
runs in its own directory and compares every file and folder under it before and after (so a
Hydra output folder, a cache or a run directory would fail it).

Rows run in-process through `harness.cli.dispatch.main` (the `arena` command minus the process
start); `test_real_processes` runs a few through the console entry point itself.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from harness.cli.dispatch import main
from harness.data.models import build_model
from harness.evasion.board import COLUMNS

Setup = Callable[[Path, contextlib.ExitStack], list[str]]
Maker = Callable[[Path, contextlib.ExitStack], Path]
FAST = ["dataset=digits", "n_samples=20", "defense.train.epochs=1", "progress=false"]
CKPT = ["dataset=digits", "n_samples=20", "defense=checkpoint", "model=small_cnn", "progress=false"]
BASE = ["progress=false"]


# ---------------------------------------------------------------------------------- file makers


def npz(name: str, **arrays) -> Maker:
    def make(tmp: Path, stack) -> Path:
        np.savez(tmp / name, **arrays)
        return tmp / name
    return make


def raw(name: str, data: bytes | str) -> Maker:
    def make(tmp: Path, stack) -> Path:
        path = tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path
    return make


def model_file(name: str, body: str) -> Maker:
    return raw(name, "import torch\nfrom torch import nn\n" + body)


def weights(name: str, transform: Callable[[dict], object] = lambda s: s, cut: int | None = None) -> Maker:
    def make(tmp: Path, stack) -> Path:
        path = tmp / name
        torch.save(transform(build_model({"name": "small_cnn"}, 10, (1, 8, 8)).state_dict()), path)
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        return path
    return make


def bundle(name: str, card: str | None) -> Maker:
    def make(tmp: Path, stack) -> Path:
        path = tmp / name
        path.mkdir()
        if card is not None:
            (path / "defense.yaml").write_text(card)
        return path
    return make


def board_csv(name: str, edit: Callable[[str], str] = lambda text: text) -> Maker:
    """A leaderboard CSV as the harness writes it (one plausible row), then `edit`ed."""
    row = {c: "x" for c in COLUMNS}
    row.update({"eps": 0.1, "n_samples": 20, "clean_acc": 90.0, "robust_acc": 50.0, "robust_acc_mean": 50.0,
                "robust_acc_majority": 50.0, "best_known_acc": 45.0, "forward_per_sample": 1.0, "backward_per_sample": 1.0,
                "queries_per_sample": 0.0, "attack_time_s": 1.0, "train_time_s": 1.0, "train_passes": 10, "params": 10,
                "violations": 0, "seed": 0, "randomized": False, "ensemble": False, "upper_bound": False,
                "masking_suspected": False, "submission": False, "transductive": False, "nonfinite_grad": 0,
                "stateful_model": False, "certified_acc": float("nan")})

    def make(tmp: Path, stack) -> Path:
        path = tmp / name
        pd.DataFrame([row], columns=COLUMNS).to_csv(path, index=False, lineterminator="\n")
        path.write_text(edit(path.read_text()))
        return path
    return make


def a_file(name: str) -> Maker:
    return raw(name, "not a directory\n")


def empty_runs(name: str) -> Maker:
    """A work dir with an empty runs/ folder (nothing evaluated yet)."""
    def make(tmp: Path, stack) -> Path:
        (tmp / name / "runs").mkdir(parents=True)
        return tmp / name
    return make


def read_only_dir(name: str) -> Maker:
    """A directory nobody may write to: chmod for a normal user; for root (whom permissions do not
    stop) a read-only tmpfs when this machine lets us mount one; otherwise the case is skipped."""
    def make(tmp: Path, stack) -> Path:
        path = tmp / name
        path.mkdir()
        if os.geteuid() != 0:
            path.chmod(0o555)
            stack.callback(path.chmod, 0o755)
            return path
        if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                                                           capture_output=True).returncode != 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        stack.callback(subprocess.run, ["umount", str(path)], capture_output=True)
        return path
    return make


# ---------------------------------------------------------------------------------- argv builders


def ev(*args: str, files: dict[str, Maker] | None = None, base: list[str] = FAST, work_dir: str = "{tmp}/w") -> Setup:
    """`arena eval` with `base`, then args; `{name}` in an arg is the file `files[name]` makes."""
    def setup(tmp: Path, stack) -> list[str]:
        made = {k: str(f(tmp, stack)) for k, f in (files or {}).items()}
        return ["eval", *base, "work_dir=" + work_dir.format(**made, tmp=tmp), *[a.format(**made, tmp=tmp) for a in args]]
    return setup


def cmd(*args: str, files: dict[str, Maker] | None = None) -> Setup:
    def setup(tmp: Path, stack) -> list[str]:
        made = {k: str(f(tmp, stack)) for k, f in (files or {}).items()}
        return [a.format(**made, tmp=tmp) for a in args]
    return setup


E = "arena eval: error: "
B = "arena board: error: "
S = "arena submit: error: rejected by the card check: "
CHOOSE = ", ".join(COLUMNS)
REBUILD = "; rebuild it with `arena board build`"
NO_CUDA = not torch.cuda.is_available()

CASES: list[tuple[str, Setup, str]] = [
    # --- group options, overrides, types ---------------------------------------------------------
    ("unknown dataset", ev("dataset=imagenet"),
     E + "unknown dataset 'imagenet'; choose one of: cifar10, cifar100, digits, fashion_mnist, mnist, mnist5k, npz, svhn"),
    ("unknown model", ev("model=nope"), E + "unknown model 'nope'; choose one of: "),
    ("unknown defense", ev("defense=nope"), E + "unknown defense 'nope'; choose one of: "),
    ("unknown suite", ev("suite=nope"), E + "unknown suite 'nope'; choose one of: "),
    ("unknown attack", ev("attack=nope"), E + "unknown attack 'nope'; choose one of: "),
    ("unknown option inside a sweep", ev("-m", "threat=linf,l1"), E + "unknown threat 'l1'; choose one of: l2, linf"),
    ("unknown key", ev("nosuchkey=1"), E + "nosuchkey is not a setting of the config; it has: batch_size, dataset, "),
    ("misspelt key", ev("n_sample=5"), "; did you mean 'n_samples'?"),
    ("misspelt attack parameter", ev("attack=pgd", "attack.stepz=5"),
     E + "attack.stepz is not a setting of attack 'pgd'; it has: eot, loss, name, random_start, restarts, step_size, steps; "
         "did you mean 'steps'?"),
    ("a key nothing reads", ev("+foo=1"), E + "+foo adds a key nothing reads; the config has: "),
    ("unbalanced bracket", ev("seed=[1,2"), "no viable alternative at input '[1,2'; write key=value (lists as a,b for -m)"),
    ("override without a value", ev("seed"), "Error parsing override 'seed'; write key=value (lists as a,b for -m)"),
    ("sweep without -m", ev("seed=0,1"),
     E + "seed=0,1 sweeps over several values; add -m to run one job per value (or write a list as seed=[a,b], a string as seed='a,b')"),
    ("interval sweep", ev("-m", "threat.eps=interval(0,1)"),
     E + "threat.eps=interval(0,1) cannot be listed; give the values (a,b,c or range(0,10,2)) or use a sweeper that samples intervals"),
    ("text for an integer", ev("batch_size=abc"), E + "batch_size=abc must be an integer or auto (default: 250)"),
    ("float for an integer", ev("seed=1.5"), E + "seed=1.5 must be an integer (default: 0)"),
    ("float offset", ev("offset=1.5"), E + "offset=1.5 must be an integer (default: 0)"),
    ("text for a number", ev("threat.eps=eight"), E + "threat.eps=eight must be a number or a fraction such as 8/255 (default: 0.3)"),
    ("a fraction with a zero denominator", ev("threat.eps=8/0"), E + "threat.eps='8/0' must be > 0"),
    ("text for a boolean", ev("evaluator.cascade=maybe"), E + "evaluator.cascade=maybe must be true or false (default: True)"),
    ("bad type inside a sweep", ev("-m", "attack=pgd", "attack.steps=10,many"), E + "attack.steps=many must be an integer (default: 20)"),
    ("broken interpolation", ev("shard=${{nope}}"),
     E + "cannot resolve shard: Interpolation key 'nope' not found; fix or remove the ${{...}} reference"),
    ("unknown launcher", ev("-m", "+launcher=kubernetes"),
     E + "unknown launcher 'kubernetes'; choose one of: joblib, local, ray, slurm, submitit_local"),
    ("unknown parameter", ev("+attack.name=pgd", "+attack.stepz=3"), "no parameter 'stepz'"),
    ("unknown loss", ev("attack=pgd", "attack.loss=hinge"), "loss='hinge'"),
    ("attack parameter out of range", ev("attack=pgd", "attack.steps=-5"),
     E + "pgd needs steps, restarts and eot >= 1 (got steps=-5, restarts=1, eot=1)"),
    ("empty suite", ev("suite.attacks=[]"), E + "the suite has no attacks; choose suite=quick|standard|... or attack=NAME"),
    # --- values the harness cannot evaluate ------------------------------------------------------
    ("infinite L2 radius", ev("threat.norm=L2", "threat.eps=inf"), E + "threat.eps=inf must be a finite radius"),
    ("NaN radius", ev("threat.eps=nan"), E + "threat.eps=nan must be > 0"),
    ("zero radius", ev("threat.eps=0"), E + "threat.eps=0 must be > 0"),
    ("negative radius", ev("threat.eps=-0.1"), E + "threat.eps=-0.1 must be > 0"),
    ("Linf radius above 1", ev("threat.eps=2"), E + "threat.eps=2 exceeds 1 for Linf"),
    ("unknown norm", ev("threat.norm=L7"), E + "threat.norm='L7' is not supported; use one of: Linf, L2"),
    ("infinite radius in a sweep", ev("-m", "seed=0,1", "threat.eps=0.1,inf"), E + "threat.eps=inf must be a finite radius"),
    ("zero samples", ev("n_samples=0"), E + "n_samples=0 must be positive (n_samples=null evaluates the whole test split)"),
    ("zero samples in a sweep", ev("-m", "n_samples=0,10"), E + "n_samples=0 must be positive"),
    ("negative n_samples", ev("n_samples=-3"), E + "n_samples=-3 must be positive"),
    ("too many samples", ev("n_samples=5000"), E + "n_samples=5000 (offset 0) exceeds the 360 test images of digits; use n_samples<=360"),
    ("offset past the end", ev("offset=400"), E + "dataset.offset=400 is outside 0..359 for digits"),
    ("negative offset", ev("offset=-1"), E + "dataset.offset=-1 is outside 0..359 for digits"),
    ("meta device", ev("device=meta"), E + "device='meta' is not supported (the harness runs on cpu and cuda); use device=auto, cpu or cuda[:N]"),
    ("mps device", ev("device=mps"), E + "device='mps' is not supported (the harness runs on cpu and cuda)"),
    ("unknown device", ev("device=tpu"), E + "device='tpu' is not a device; use auto, cpu or cuda[:N]"),
    ("cuda without a GPU" if NO_CUDA else "cuda index past the GPUs", ev("device=cuda" if NO_CUDA else "device=cuda:99"),
     E + ("device='cuda' but no CUDA GPU is visible; use device=auto or device=cpu" if NO_CUDA else "device='cuda:99' but only")),
    ("huge seed", ev("seed=99999999999999999999999"),
     E + "seed=99999999999999999999999 is outside 0..9223372036854775807; use a smaller seed (e.g. seed=0)"),
    ("negative seed", ev("seed=-1"), E + "seed=-1 is outside 0..9223372036854775807"),
    ("null device", ev("device=null"), E + "device=null is not a device; use auto, cpu or cuda[:N]"),
    ("null cascade", ev("evaluator.cascade=null"), E + "evaluator.cascade=null must be true or false"),
    ("null seed", ev("seed=null"), E + "seed=null must be an integer (e.g. seed=0)"),
    ("null draws", ev("evaluator.draws=null"), E + "evaluator.draws=null must be an integer (e.g. evaluator.draws=10)"),
    ("zero batch size", ev("batch_size=0"), E + "batch_size=0 must be > 0 (e.g. batch_size=250)"),
    ("zero draws", ev("evaluator.draws=0"), E + "evaluator.draws=0 must be >= 1"),
    ("auto batch size with shards", ev("batch_size=auto", "shard=0/2"),
     E + "shard='0/2' needs a fixed batch_size (shards are cut at batch boundaries, and batch_size=auto resolves per machine)"),
    ("unknown precision", ev("evaluator.amp=int8"), E + "evaluator.amp=int8 must be true or false or bfloat16, float16 (default: False)"),
    ("float16 on a CPU", ev("device=cpu", "evaluator.amp=float16"),
     E + "evaluator.amp=float16 needs a CUDA device (device=cpu: CPU autocast runs bfloat16); use evaluator.amp=bfloat16 or device=cuda"),
    ("shard out of range", ev("shard=2/2"), E + "shard='2/2' needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)"),
    ("shard not i/n", ev("shard=half"), E + "shard='half' is not of the form i/n (e.g. shard=0/4)"),
    ("more shards than batches", ev("batch_size=10", "shard=0/9"),
     E + "shard='0/9': 20 samples make only 2 batches of batch_size=10; use at most 2 shards or a smaller batch_size"),
    ("NaN learning rate", ev("defense.train.lr=nan"), E + "defense 'standard': train.lr=nan must be a finite number > 0, e.g. train.lr=0.05"),
    ("negative learning rate", ev("defense.train.lr=-1"), E + "defense 'standard': train.lr=-1.0 must be a finite number > 0"),
    ("momentum of 1.5", ev("defense.train.momentum=1.5"), E + "defense 'standard': train.momentum=1.5 must be a finite number in [0, 1)"),
    ("infinite weight decay", ev("defense.train.weight_decay=inf"), E + "defense 'standard': train.weight_decay=inf must be a finite number >= 0"),
    ("NaN learning rate of a regularised defense", ev("defense=gradreg", "defense.train.lr=nan"), E + "defense 'gradreg': train.lr=nan must be a finite number > 0"),
    ("unknown optimizer", ev("defense.train.optimizer=rmsprop"), E + "defense 'standard': train.optimizer='rmsprop' unknown; use one of: sgd, adam"),
    ("mean/std for the wrong channel count", ev("model=wrn28_10", "model.depth=10", "model.widen=1"),
     E + "model.mean/std have 3/3 entries for 1-channel images; give one value or 1"),
    # --- places that cannot hold results -----------------------------------------------------------
    ("work dir under a file", ev(files={"f": a_file("plain.txt")}, work_dir="{f}/w"),
     E + "work_dir='{tmp}/plain.txt/w' is under '{tmp}/plain.txt', which is a file, not a directory; set work_dir= to a path in a directory"),
    ("work dir is a file", ev(files={"f": a_file("plain.txt")}, work_dir="{f}"),
     E + "work_dir='{tmp}/plain.txt' is under '{tmp}/plain.txt', which is a file"),
    ("leaderboard path empty", ev("leaderboard.path="),
     E + "leaderboard.path='' must name a CSV file (e.g. leaderboard.path=arena-work/leaderboard/evasion.csv), or set leaderboard.update=false"),
    ("leaderboard path a directory", ev("leaderboard.path={tmp}"), E + "leaderboard.path={tmp} must name a CSV file"),
    ("leaderboard path under a file", ev("leaderboard.path={f}/b.csv", files={"f": a_file("plain.txt")}),
     E + "leaderboard.path='{tmp}/plain.txt/b.csv' is under '{tmp}/plain.txt', which is a file, not a directory; "
         "set leaderboard.path= to a path in a directory"),
    ("plots under a file", cmd("board", "plot", "{f}/plots", "--csv", "{c}", files={"f": a_file("plain.txt"), "c": board_csv("ok.csv")}),
     B + "cannot write {tmp}/plain.txt/plots/robust_acc_vs_eps.png: {tmp}/plain.txt is a file, not a directory"),
    ("read-only work dir", ev(files={"ro": read_only_dir("ro")}, work_dir="{ro}/w"), "set work_dir= to a writable directory"),
    ("read-only work dir in a sweep", ev("-m", "seed=0,1", files={"ro": read_only_dir("ro")}, work_dir="{ro}/w"),
     "set work_dir= to a writable directory"),
    # --- data files --------------------------------------------------------------------------------
    ("npz missing", ev("dataset=npz", "dataset.path={tmp}/nope.npz", base=CKPT),
     E + "dataset.path='{tmp}/nope.npz' does not exist; give an .npz file with arrays x (uint8) and y (int64)"),
    ("npz path not given", ev("dataset=npz", base=CKPT), E + "dataset=npz needs dataset.path=FILE.npz (arrays x uint8 NHWC/NHW and y int64)"),
    ("npz is text", ev("dataset=npz", "dataset.path={f}", files={"f": raw("junk.npz", "hello")}, base=CKPT),
     E + "{tmp}/junk.npz is not a readable .npz file (ValueError); re-create it with numpy.savez_compressed(path, x=..., y=...)"),
    ("npz without x", ev("dataset=npz", "dataset.path={f}", base=CKPT,
                         files={"f": npz("keys.npz", images=np.zeros((5, 8, 8), np.uint8), y=np.zeros(5, np.int64))}),
     E + "{tmp}/keys.npz has keys ['images', 'y']; it needs 'x' (uint8 images) and 'y' (int64 labels)"),
    ("npz float images", ev("dataset=npz", "dataset.path={f}", base=CKPT,
                            files={"f": npz("float.npz", x=np.zeros((5, 8, 8), np.float32), y=np.zeros(5, np.int64))}),
     E + "{tmp}/float.npz: x has dtype float32; it must be uint8 in 0..255 (convert with (x*255).round().astype('uint8'))"),
    ("npz flat images", ev("dataset=npz", "dataset.path={f}", base=CKPT,
                           files={"f": npz("flat.npz", x=np.zeros((5, 64), np.uint8), y=np.zeros(5, np.int64))}),
     E + "{tmp}/flat.npz: x has shape (5, 64); expected (N, H, W) or (N, H, W, C) with C in (1, 3)"),
    ("npz label count", ev("dataset=npz", "dataset.path={f}", base=CKPT,
                           files={"f": npz("len.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.zeros(4, np.int64))}),
     E + "{tmp}/len.npz: y has shape (4,) and dtype int64; expected integer labels of shape (5,)"),
    ("npz labels out of range", ev("dataset=npz", "dataset.path={f}", "dataset.num_classes=10", base=CKPT,
                                   files={"f": npz("lab.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.array([0, 1, 2, 3, 12]))}),
     E + "lab: test labels span 0..12, outside 0..9; fix the labels or set dataset.num_classes"),
    ("npz without images", ev("dataset=npz", "dataset.path={f}", base=CKPT,
                              files={"f": npz("empty.npz", x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64))}),
     E + "{tmp}/empty.npz holds no images (x has shape (0, 8, 8)); give a file with at least one image"),
    ("npz label 12 for a 10-class model", ev("dataset=npz", "dataset.path={d}", "defense.model_file={m}", "n_samples=5",
                                            base=["defense=checkpoint", "progress=false"],
                                            files={"d": npz("lab12.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.array([0, 1, 2, 3, 12])),
                                                   "m": model_file("lin.py", "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")}),
     E + "dataset 'lab12' has label 12 but the model returns 10 classes (labels 0..9); fix the labels, or use a model with 13 outputs"),
    ("npz with a trained defense", ev("dataset=npz", "dataset.path={f}", "n_samples=5",
                                      files={"f": npz("ok.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.arange(5))}),
     E + "defense 'standard' trains a model but dataset 'ok' has no training split; use a dataset with one "
         "(mnist5k, digits, cifar10, ...) or defense=checkpoint"),
    ("missing dataset root", ev("dataset=cifar10", "dataset.root={tmp}/empty", base=BASE), "not found"),
    # --- checkpoints and model files -----------------------------------------------------------------
    ("no weights given", ev(base=CKPT), E + "defense=checkpoint needs defense.weights=FILE (and optionally defense.model_file=FILE.py)"),
    ("weights missing", ev("defense.weights={tmp}/nope.pt", base=CKPT),
     E + "checkpoint '{tmp}/nope.pt' does not exist; check the path (relative paths are from the working directory)"),
    ("weights empty", ev("defense.weights={f}", files={"f": raw("empty.pt", b"")}, base=CKPT),
     E + "checkpoint '{tmp}/empty.pt' is empty; download or save it again"),
    ("weights are an HTML page", ev("defense.weights={f}", files={"f": raw("page.pt", "<!DOCTYPE html><html>quota</html>")}, base=CKPT),
     E + "checkpoint '{tmp}/page.pt' is an HTML page, not weights (a failed download?); fetch the real file"),
    ("weights are text", ev("defense.weights={f}", files={"f": raw("notes.pt", "these are not weights")}, base=CKPT),
     E + "checkpoint '{tmp}/notes.pt' is not a PyTorch weights file (neither a zip archive nor a pickle); "
         "save the weights with torch.save(model.state_dict(), path)"),
    ("weights truncated", ev("defense.weights={f}", files={"f": weights("cut.pt", cut=3000)}, base=CKPT),
     E + "checkpoint '{tmp}/cut.pt' is truncated or corrupt (bad zip archive); download or save it again"),
    ("weights cut in half", ev("defense.weights={f}", files={"f": weights("half.pt", cut=40000)}, base=CKPT), "truncated"),
    ("weights carry objects", ev("defense.weights={f}", files={"f": weights("evil.pt", lambda s: {"state_dict": s, "x": Path("/")})},
                                 base=CKPT),
     E + "checkpoint '{tmp}/evil.pt' carries arbitrary Python objects and is refused (weights_only=True); "
         "re-save it as a plain state dict with torch.save(model.state_dict(), path)"),
    ("weights not a state dict", ev("defense.weights={f}", files={"f": weights("list.pt", lambda s: list(s.values()))}, base=CKPT),
     E + "checkpoint does not hold a state dict (a mapping of parameter names to tensors); save model.state_dict()"),
    ("weights of another width", ev("model.width=16", "defense.weights={f}", files={"f": weights("w32.pt")}, base=CKPT),
     E + "checkpoint '{tmp}/w32.pt' does not fit the model: 5 tensors differ in shape, e.g. conv1.weight is (32, 1, 3, 3) "
         "in the file but (16, 1, 3, 3) in the model; check model= / defense.model_file"),
    ("weights missing a layer", ev("defense.weights={f}", files={"f": weights("part.pt", lambda s: {k: v for k, v in s.items() if "fc2" not in k})},
                                   base=CKPT),
     E + "checkpoint '{tmp}/part.pt' does not fit the model: missing ['fc2.weight', 'fc2.bias'], unexpected []; "
         "check model= / defense.model_file"),
    ("model file missing", ev("defense.model_file={tmp}/nope.py", base=CKPT),
     E + "defense.model_file='{tmp}/nope.py' does not exist; give a .py file that defines create()"),
    ("model file syntax error", ev("defense.model_file={f}", files={"f": raw("syn.py", "def create(:\n")}, base=CKPT),
     E + "defense.model_file='{tmp}/syn.py' fails to import (SyntaxError: invalid syntax (syn.py, line 1))"),
    ("model file without create", ev("defense.model_file={f}", files={"f": raw("nocreate.py", "x = 1\n")}, base=CKPT),
     E + "defense.model_file='{tmp}/nocreate.py' defines no create() returning the model"),
    ("create returns no module", ev("defense.model_file={f}", files={"f": raw("notmod.py", "def create():\n    return 3\n")}, base=CKPT),
     E + "create() in {tmp}/notmod.py returned int, not a torch.nn.Module"),
    ("model returns probabilities", ev("defense.model_file={f}", base=CKPT, files={"f": model_file(
        "soft.py", "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))\n")}),
     E + "the model returns probabilities (rows in [0,1] summing to 1), not logits; remove the final softmax"),
    ("model returns a flat vector", ev("defense.model_file={f}", base=CKPT, files={"f": model_file(
        "flat.py", "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Flatten(0))\n")}),
     "it must be logits of shape (N, C)"),
    ("model returns NaN", ev("defense.model_file={f}", base=CKPT, files={"f": model_file(
        "nan.py", "class M(nn.Module):\n    def forward(self, x):\n        return torch.full((x.shape[0], 10), float('nan'))\n"
                  "def create():\n    return M()\n")}),
     E + "the model's output contains NaN or Inf on clean inputs; fix the model or its weights"),
    ("undeclared randomness", ev("defense.model_file={f}", base=CKPT, files={"f": model_file(
        "rnd.py", "class M(nn.Module):\n    def __init__(self):\n        super().__init__(); self.l = nn.Linear(64, 10)\n"
                  "    def forward(self, x):\n        return self.l(x.flatten(1) + torch.randn_like(x.flatten(1)))\n"
                  "def create():\n    return M()\n")}),
     "changes between two calls on the same input but it declares no randomness"),
    ("model built for another image size", ev("defense.model_file={f}", base=CKPT, files={"f": model_file(
        "m784.py", "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")}),
     E + "the model cannot take 1x8x8 images from dataset 'digits' (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    # --- leaderboard files -------------------------------------------------------------------------------
    ("leaderboard missing", cmd("board", "--csv", "{tmp}/none.csv"),
     B + "no leaderboard at '{tmp}/none.csv'; run `arena eval` or `arena board build` first"),
    ("leaderboard binary", cmd("board", "--csv", "{f}", files={"f": raw("bin.csv", b"\x00\xff\xfe junk \x00")}),
     B + "leaderboard '{tmp}/bin.csv' is not a readable CSV (UnicodeDecodeError)" + REBUILD),
    ("leaderboard empty", cmd("board", "--csv", "{f}", files={"f": raw("empty.csv", "")}), B + "leaderboard '{tmp}/empty.csv' is empty" + REBUILD),
    ("leaderboard truncated mid-row", cmd("board", "--csv", "{f}", files={"f": board_csv("cut.csv", lambda t: t[:-25])}),
     B + "leaderboard '{tmp}/cut.csv' is truncated (its last line is incomplete)" + REBUILD),
    ("leaderboard truncated mid-field", cmd("board", "--csv", "{f}", files={"f": board_csv("cut2.csv", lambda t: t[:t.index("\n") + 61] + "\n")}),
     B + "leaderboard '{tmp}/cut2.csv' line 2 has "),
    ("leaderboard of another schema", cmd("board", "--csv", "{f}", files={"f": raw("old.csv", "defense,robust_acc\na,1\n")}),
     B + "leaderboard '{tmp}/old.csv' has other columns than this harness writes (missing ['defense_id', 'model', 'dataset', 'data_hash']..., "
         "unexpected [])" + REBUILD),
    ("leaderboard with an extra column", cmd("board", "--csv", "{f}", files={"f": board_csv("extra.csv", lambda t: t.replace("\n", ",z\n"))}),
     "unexpected ['z'])" + REBUILD),
    ("leaderboard with text for a number", cmd("board", "--csv", "{f}", files={"f": board_csv("num.csv", lambda t: t.replace(",90.0,", ",ninety,"))}),
     B + "leaderboard '{tmp}/num.csv' line 2: clean_acc='ninety' is not a number" + REBUILD),
    ("leaderboard with a fraction of a sample", cmd("board", "--csv", "{f}", files={"f": board_csv("int.csv", lambda t: t.replace(",20,", ",20.5,"))}),
     "line 2: n_samples='20.5' is not an integer" + REBUILD),
    ("leaderboard with a non-boolean flag", cmd("board", "--csv", "{f}", files={"f": board_csv("bool.csv", lambda t: t.replace("False", "no", 1))}),
     "line 2: randomized='no' is not True or False" + REBUILD),
    ("leaderboard with an empty key", cmd("board", "--csv", "{f}", files={"f": board_csv("key.csv", lambda t: t.replace(",0.1,", ",,"))}),
     "line 2 has no eps" + REBUILD),
    ("poisoning leaderboard in the evasion schema", cmd("board", "--track", "poisoning", "--csv", "{f}", files={"f": board_csv("p.csv")}),
     B + "leaderboard '{tmp}/p.csv' has other columns than this harness writes"),
    ("leaderboard cut by three bytes", cmd("board", "show", "--csv", "{f}", files={"f": board_csv("c.csv", lambda t: t[:-3])}),
     "is truncated"),
    ("sort by a missing column", cmd("board", "--csv", "{f}", "--sort", "nope", files={"f": board_csv("ok.csv")}),
     B + "--sort 'nope' is not a column; choose one of: " + CHOOSE),
    ("show a missing column", cmd("board", "--csv", "{f}", "--columns", "defense,nope", files={"f": board_csv("ok.csv")}),
     B + "--columns ['nope'] not in the leaderboard; choose from: " + CHOOSE),
    ("matrix on the evasion board", cmd("board", "--csv", "{f}", "--matrix", files={"f": board_csv("ok.csv")}),
     B + "--matrix shows the poisoning board's poison x defense matrix; use it with --track poisoning"),
    ("a filter that matches nothing", cmd("board", "--csv", "{f}", "--suite", "nope", files={"f": board_csv("ok.csv")}),
     B + "--suite 'nope' matches no row of this leaderboard; it has: x"),
    ("ascending without a column", cmd("board", "--csv", "{f}", "--ascending", files={"f": board_csv("ok.csv")}),
     B + "--ascending needs --sort COLUMN"),
    ("filter that does not apply", cmd("board", "--track", "poisoning", "--threat", "x"),
     B + "--threat does not apply to the poisoning leaderboard (filters: --dataset, --defense)"),
    ("html without an output", cmd("board", "html", "--csv", "{f}", files={"f": board_csv("ok.csv")}),
     B + "arena board html needs an output file: arena board html OUT.html"),
    ("board build into a file", cmd("board", "build", "--work-dir", "{w}", "--csv", "{f}/evasion.csv",
                                    files={"f": a_file("plain.txt"), "w": empty_runs("w")}),
     B + "cannot write {tmp}/plain.txt/evasion.csv"),
    ("unknown command", cmd("frobnicate"), "arena: error: unknown command 'frobnicate'; choose one of: eval, poison, board, layers, submit"),
    # --- bundles ---------------------------------------------------------------------------------------
    ("bundle is not a directory", cmd("submit", "{tmp}/nobundle"),
     S + "bundle '{tmp}/nobundle' is not a directory; give the directory that holds defense.yaml"),
    ("bundle without a card", cmd("submit", "{f}", files={"f": bundle("empty", None)}),
     S + "no defense.yaml in '{tmp}/empty'; a bundle needs defense.yaml, model.py and the weights "
         "(`arena submit --template DIR` writes a skeleton)"),
    ("card is not YAML", cmd("submit", "{f}", files={"f": bundle("badyaml", "name: [unclosed\n")}),
     S + "defense.yaml: (syntax): not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("card with an unknown field", cmd("submit", "{f}", files={"f": bundle("unk", "format: 1\nname: x\ncolour: red\n")}),
     S + "defense.yaml: colour: unknown field; valid fields: format, name, authors, paper, architecture, dataset, "
         "threat_models, randomized, ensemble, training_data, license, model_file, weights, clean_accuracy, "
         "number_forward_passes, preprocessing, notes"),
    # --- the poisoning track shares the checks --------------------------------------------------------
    ("poison: huge seed", cmd("poison", "seed=99999999999999999999999", "work_dir={tmp}/w"), "seed=99999999999999999999999 is outside"),
    ("poison: work dir under a file", cmd("poison", "work_dir={f}/w", files={"f": a_file("plain.txt")}), "which is a file, not a directory"),
    ("poison: meta device in a sweep", cmd("poison", "-m", "seed=0,1", "device=meta", "work_dir={tmp}/w"), "device='meta' is not supported"),
]


def snapshot(root: Path) -> set[str]:
    """Every file and folder under `root` (relative paths)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_status_2_and_writes_nothing(tmp_path, capsys, monkeypatch, name, setup, expected):
    monkeypatch.chdir(tmp_path)  # a Hydra folder or a relative path would land here
    with contextlib.ExitStack() as stack:
        argv = setup(tmp_path, stack)
        before = snapshot(tmp_path)
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        after = snapshot(tmp_path)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err + captured.out
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert expected.format(tmp=tmp_path) in lines[0]
    assert after == before, f"written: {sorted(after - before)}"


@pytest.mark.parametrize("argv, expected", [
    (["eval", "dataset=nope"], "unknown dataset 'nope'"),
    (["eval", "-m", "dataset=digits", "n_samples=20", "seed=0,1", "threat.eps=0.1,inf"], "threat.eps=inf must be a finite radius"),
    (["eval", "dataset=digits", "n_samples=20", "device=meta"], "device='meta' is not supported"),
])
def test_real_processes(tmp_path, argv, expected):
    """The console entry point itself: exit status 2, one line on stderr, nothing on disk."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *argv, f"work_dir={tmp_path / 'w'}", "progress=false"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir()), sorted(snapshot(tmp_path))
