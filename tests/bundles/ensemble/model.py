"""Test bundle `ensemble`: two small CNNs averaged in softmax space, as a harness Ensemble so that
ensemble-aware attacks (MORA) see the members (expected: accepted; scored with the ensemble suite)."""
from torch import nn

from harness.core.ensemble import Ensemble
from harness.data.models import SmallCNN


def create() -> nn.Module:
    return Ensemble([SmallCNN(1, 10, width=8, hidden=32) for _ in range(2)], mode="softmax")
