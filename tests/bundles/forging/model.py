"""Test bundle `forging`: the clean CNN, but model.py replaces the harness's verdict at import, as a
hostile submitter would in a harness that imports submissions: `correct_draws` (the cascade's
verdict) says every sample is still correct, and the fresh judge and the health report's decider are
patched the same way. Expected: with the model in a sandboxed worker these patches change only the
worker's own copy of the harness, so the bundle scores exactly as `clean` (same records).
"""
import torch
from torch import nn

from harness.data.models import SmallCNN


def _always_correct(clf, x, y, draws, seed):
    n = draws if getattr(clf, "randomized", False) else 1
    return torch.full((x.shape[0],), n, dtype=torch.long, device=x.device), y.clone()


try:
    import harness.evasion.cascade as cascade

    cascade.correct_draws = _always_correct
except Exception:  # noqa: BLE001  (whatever the worker can import, it patches)
    pass
try:
    import harness.health.report as report

    report.Decider.fooled = lambda self, x, y: torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
except Exception:  # noqa: BLE001
    pass
try:
    import harness.submit.rejudge as rejudge

    rejudge.judge = lambda session, examples, *a, **k: []
except Exception:  # noqa: BLE001
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def create() -> nn.Module:
    return Net()
