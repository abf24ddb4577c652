"""Checkpoints as researchers save them: envelopes, DataParallel's `module.`, a wrapper's prefix
either way; matched, reported in one line, loaded strictly, always with weights_only=True."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.core.errors import UserError
from harness.data.models import build_model
from harness.data.weights import load_into

ARCH = {"name": "small_cnn", "width": 8, "hidden": 16}
SHAPE = (1, 8, 8)


class Wrapped(nn.Module):
    """A normaliser module around the network: its keys are `net.conv1.weight`, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model(ARCH, 10, SHAPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.5)


def _source() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return build_model(ARCH, 10, SHAPE).state_dict()


SHAPES = {  # name -> what the file holds, given the plain state dict
    "plain": lambda s: s,
    "state_dict envelope": lambda s: {"state_dict": s, "epoch": 90, "best_acc": torch.tensor(0.5)},
    "model envelope": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "net envelope": lambda s: {"net": s},
    "nested envelope": lambda s: {"model": {"state_dict": s}, "epoch": 3},
    "DataParallel": lambda s: {f"module.{k}": v for k, v in s.items()},
    "DataParallel in an envelope": lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    "wrapper prefix in the file": lambda s: {f"net.{k}": v for k, v in s.items()},
    "wrapper prefix and DataParallel": lambda s: {"model_state_dict": {f"module.net.{k}": v for k, v in s.items()}},
}
EXPECTED_NOTE = {
    "plain": None, "state_dict envelope": "unwrapped ['state_dict']", "model envelope": "unwrapped ['model']",
    "net envelope": "unwrapped ['net']", "nested envelope": "unwrapped ['model']['state_dict']",
    "DataParallel": "stripped DataParallel's module.", "DataParallel in an envelope": "unwrapped ['state_dict']; stripped DataParallel's module.",
    "wrapper prefix in the file": "remapped 8 keys: net.* -> *",
    "wrapper prefix and DataParallel": "unwrapped ['model_state_dict']; stripped DataParallel's module.; remapped 8 keys: net.* -> *",
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_checkpoint_shape_loads_into_the_plain_architecture(tmp_path: Path, shape: str):
    source = _source()
    path = tmp_path / "w.pt"
    torch.save(SHAPES[shape](source), path)
    lines: list[str] = []
    model = load_into(build_model(ARCH, 10, SHAPE), path, log=lines.append)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k
    note = EXPECTED_NOTE[shape]
    assert lines == ([] if note is None else [f"checkpoint w.pt: {note}"])


def test_a_plain_checkpoint_loads_into_a_wrapped_model(tmp_path: Path):
    """The reverse direction: the file is the bare network, the model wraps it (`* -> net.*`)."""
    source = _source()
    torch.save(source, tmp_path / "bare.pt")
    lines: list[str] = []
    model = load_into(Wrapped(), tmp_path / "bare.pt", log=lines.append)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in source.items())
    assert lines == ["checkpoint bare.pt: remapped 8 keys: * -> net.*"]


def test_loading_stays_strict_after_remapping(tmp_path: Path):
    source = _source()
    extra = {"mu": torch.zeros(1), "sigma": torch.ones(1), **{f"net.{k}": v for k, v in source.items()}}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(UserError, match=r"unexpected \['mu', 'sigma', 'net.conv1.weight'\] \(renaming net.\* -> \* would match 8 of 8"):
        load_into(build_model(ARCH, 10, SHAPE), tmp_path / "extra.pt")
    partial = {f"net.{k}": v for k, v in source.items() if not k.startswith("fc2")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"missing \['conv1.weight', 'conv1.bias', 'conv2.weight'\]"):
        load_into(build_model(ARCH, 10, SHAPE), tmp_path / "partial.pt")
    wide = build_model({**ARCH, "width": 4}, 10, SHAPE).state_dict()
    torch.save({f"net.{k}": v for k, v in wide.items()}, tmp_path / "wide.pt")
    with pytest.raises(UserError, match=r"\(with keys renamed net.\* -> \*\): 5 tensors differ in shape"):
        load_into(build_model(ARCH, 10, SHAPE), tmp_path / "wide.pt")


def test_pickled_objects_are_refused_even_inside_an_envelope(tmp_path: Path):
    torch.save({"state_dict": _source(), "args": Path("/")}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        load_into(build_model(ARCH, 10, SHAPE), tmp_path / "evil.pt")


def test_defense_checkpoint_reports_the_remapping(tmp_path: Path, capsys):
    """`arena eval defense=checkpoint` with a DataParallel + wrapper checkpoint: loads, one log line."""
    from harness.api import run_eval

    torch.save({"state_dict": {f"module.net.{k}": v for k, v in _source().items()}}, tmp_path / "pub.pt")
    summary = run_eval(["dataset=digits", "n_samples=16", "defense=checkpoint", "model=small_cnn", "model.width=8",
                        "model.hidden=16", f"defense.weights={tmp_path / 'pub.pt'}", "attack=pgd", "attack.steps=2"],
                       tmp_path / "w")
    assert summary["n_samples"] == 16
    manifest = (Path(summary["run_dir"]) / "manifest.json").read_text()
    assert "remapped 8 keys: net.* -> *" in manifest
