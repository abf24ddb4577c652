"""The bad-input corpus: malformed configs, overrides, data files, checkpoints, model files, bundles
and leaderboard files, each answered with exactly the expected one-line message and exit status 2,
and nothing written to the work dir. Table-driven: one row per input, `{tmp}` stands for the
test's directory. (`tests/test_core_bad_input.py` checks the core ones by substring; this table
pins whole messages, so a reworded or multi-line message is a visible change.)"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from harness.cli.dispatch import main
from harness.data.models import build_model

Setup = Callable[[Path], list[str]]
FAST = ["dataset=digits", "n_samples=20", "defense.train.epochs=1", "progress=false"]
CKPT = ["dataset=digits", "n_samples=20", "defense=checkpoint", "model=small_cnn", "progress=false"]


def npz(name: str, **arrays) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.savez(tmp / name, **arrays)
        return tmp / name
    return make


def raw(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path
    return make


def weights(name: str, transform: Callable[[dict], object] = lambda s: s, cut: int | None = None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        torch.save(transform(build_model({"name": "small_cnn"}, 10, (1, 8, 8)).state_dict()), path)
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        return path
    return make


def bundle(name: str, card: str | None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.mkdir()
        if card is not None:
            (path / "defense.yaml").write_text(card)
        return path
    return make


def ev(*args: str, files: dict[str, Callable[[Path], Path]] | None = None, base: list[str] = FAST) -> Setup:
    """`arena eval` with `base`, then args; `{name}` in an arg is replaced by the file `files[name]` makes."""
    def setup(tmp: Path) -> list[str]:
        made = {k: str(f(tmp)) for k, f in (files or {}).items()}
        return ["eval", *base, f"work_dir={tmp / 'w'}", *[a.format(**made, tmp=tmp) for a in args]]
    return setup


def cmd(*args: str, files: dict[str, Callable[[Path], Path]] | None = None) -> Setup:
    def setup(tmp: Path) -> list[str]:
        made = {k: str(f(tmp)) for k, f in (files or {}).items()}
        return [a.format(**made, tmp=tmp) for a in args]
    return setup


OK_CSV = raw("ok.csv", "defense,robust_acc\na,1\n")
E = "arena eval: error: "
B = "arena board: error: "
S = "arena submit: error: rejected by the card check: "

CASES: list[tuple[str, Setup, str]] = [
    # --- overrides and configs -------------------------------------------------------------
    ("unknown group option", ev("dataset=imagenet"),
     E + "unknown dataset 'imagenet'; choose one of: cifar10, cifar100, digits, fashion_mnist, mnist, mnist5k, npz, svhn"),
    ("unknown option inside a sweep", ev("-m", "threat=linf,l1"), E + "unknown threat 'l1'; choose one of: l2, linf"),
    ("unknown key", ev("nosuchkey=1"),
     E + "bad override in 'dataset=digits n_samples=20 defense.train.epochs=1 progress=false work_dir={tmp}/w nosuchkey=1': "
         "Could not override 'nosuchkey'. To append to your config use +nosuchkey=1"),
    ("unbalanced bracket", ev("seed=[1,2"),
     E + "cannot parse the overrides 'dataset=digits n_samples=20 defense.train.epochs=1 progress=false work_dir={tmp}/w "
         "seed=[1,2': no viable alternative at input '[1,2'; write key=value (lists as a,b for -m)"),
    ("override without a value", ev("seed"),
     E + "cannot parse the overrides 'dataset=digits n_samples=20 defense.train.epochs=1 progress=false work_dir={tmp}/w "
         "seed': Error parsing override 'seed'; write key=value (lists as a,b for -m)"),
    ("sweep without -m", ev("seed=0,1"),
     E + "seed=0,1 sweeps over several values; add -m to run one job per value (or write a list as seed=[a,b], a string as seed='a,b')"),
    ("interval sweep", ev("-m", "threat.eps=interval(0,1)"),
     E + "threat.eps=interval(0,1) cannot be listed; give the values (a,b,c or range(0,10,2)) or use a sweeper that samples intervals"),
    ("text for an integer", ev("batch_size=abc"), E + "batch_size=abc must be an integer (default: 250)"),
    ("float for an integer", ev("seed=1.5"), E + "seed=1.5 must be an integer (default: 0)"),
    ("text for a number", ev("threat.eps=8/255"), E + "threat.eps=8/255 must be a number (default: 0.3)"),
    ("text for a boolean", ev("evaluator.cascade=maybe"), E + "evaluator.cascade=maybe must be true or false (default: True)"),
    ("bad type inside a sweep", ev("-m", "attack=pgd", "attack.steps=10,many"), E + "attack.steps=many must be an integer (default: 20)"),
    ("broken interpolation", ev("shard=${{nope}}"),
     E + "cannot resolve shard: Interpolation key 'nope' not found; fix or remove the ${{...}} reference"),
    ("null seed", ev("seed=null"), E + "seed=null must be an integer (e.g. seed=0)"),
    ("null draws", ev("evaluator.draws=null"), E + "evaluator.draws=null must be an integer (e.g. evaluator.draws=10)"),
    ("zero batch size", ev("batch_size=0"), E + "batch_size=0 must be > 0 (e.g. batch_size=250)"),
    ("zero draws", ev("evaluator.draws=0"), E + "evaluator.draws=0 must be >= 1"),
    ("negative n_samples", ev("n_samples=-3"), E + "n_samples=-3 must be positive"),
    ("too many samples", ev("n_samples=5000"), E + "n_samples=5000 (offset 0) exceeds the 360 test images of digits; use n_samples<=360"),
    ("offset past the end", ev("offset=400"), E + "dataset.offset=400 is outside 0..359 for digits"),
    ("shard out of range", ev("shard=2/2"), E + "shard='2/2' needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)"),
    ("shard not i/n", ev("shard=half"), E + "shard='half' is not of the form i/n (e.g. shard=0/4)"),
    ("more shards than batches", ev("batch_size=10", "shard=0/9"),
     E + "shard='0/9': 20 samples make only 2 batches of batch_size=10; use at most 2 shards or a smaller batch_size"),
    ("unknown launcher", ev("-m", "+launcher=kubernetes"),
     E + "unknown launcher 'kubernetes'; choose one of: joblib, local, ray, slurm, submitit_local"),
    ("unknown device", ev("device=tpu"), E + "device='tpu' is not a device; use auto, cpu or cuda[:N]"),
    ("unknown optimizer", ev("defense.train.optimizer=rmsprop"), E + "train.optimizer='rmsprop' unknown; use one of: sgd, adam"),
    ("attack parameter out of range", ev("attack=pgd", "attack.steps=-5"),
     E + "pgd needs steps, restarts and eot >= 1 (got steps=-5, restarts=1, eot=1)"),
    ("empty suite", ev("suite.attacks=[]"), E + "the suite has no attacks; choose suite=quick|standard|... or attack=NAME"),
    # --- data files --------------------------------------------------------------------------
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
    ("npz with a trained defense", ev("dataset=npz", "dataset.path={f}", "n_samples=5",
                                      files={"f": npz("ok.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.arange(5))}),
     E + "defense 'standard' trains a model but dataset 'ok' has no training split; use a dataset with one "
         "(mnist5k, digits, cifar10, ...) or defense=checkpoint"),
    # --- checkpoints and model files -----------------------------------------------------------
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
    # --- leaderboard files -----------------------------------------------------------------------
    ("leaderboard missing", cmd("board", "--csv", "{tmp}/none.csv"),
     B + "no leaderboard at '{tmp}/none.csv'; run `arena eval` or `arena board build` first"),
    ("leaderboard binary", cmd("board", "--csv", "{f}", files={"f": raw("bin.csv", b"\x00\xff\xfe junk \x00")}),
     B + "leaderboard '{tmp}/bin.csv' is not a readable CSV (UnicodeDecodeError); rebuild it with `arena board build`"),
    ("leaderboard empty", cmd("board", "--csv", "{f}", files={"f": raw("empty.csv", "")}),
     B + "leaderboard '{tmp}/empty.csv' is not a readable CSV (EmptyDataError); rebuild it with `arena board build`"),
    ("sort by a missing column", cmd("board", "--csv", "{f}", "--sort", "nope", files={"f": OK_CSV}),
     B + "--sort 'nope' is not a column; choose one of: defense, robust_acc"),
    ("show a missing column", cmd("board", "--csv", "{f}", "--columns", "defense,nope", files={"f": OK_CSV}),
     B + "--columns ['nope'] not in the leaderboard; choose from: defense, robust_acc"),
    ("filter on a missing column", cmd("board", "--csv", "{f}", "--dataset", "x", files={"f": OK_CSV}),
     B + "--dataset does not apply to the evasion leaderboard"),
    ("html without an output", cmd("board", "html", "--csv", "{f}", files={"f": OK_CSV}),
     B + "arena board html needs an output file: arena board html OUT.html"),
    ("unknown command", cmd("frobnicate"), "arena: error: unknown command 'frobnicate'; choose one of: eval, poison, board, layers, submit"),
    # --- bundles (harness/submit/bundle.py, harness/submit/score.py) ------------------------------------------------
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
]


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_exactly_one_line_and_status_2(tmp_path, capsys, name, setup, expected):
    argv = setup(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert lines == [expected.format(tmp=tmp_path)]
    runs = tmp_path / "w" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was written"
