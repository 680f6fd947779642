"""A real Flower ``NumPyClient`` as a hospital would already have it (the ECG seed's shape),
used by the adapter test through ``flower_client = "tests.site_worker.flower_client:make_client"``.
It knows nothing about fedbus."""

from __future__ import annotations

from collections import OrderedDict

import flwr as fl
import numpy as np
import torch
from torch import nn

CALLS: list[tuple[str, dict]] = []  # what Flower was asked to do, for the test to inspect


class TinyNet(nn.Module):
    """12 features -> 8 -> 1: the same arrays, in the same order, as the fedbus layer list of the test."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(OrderedDict([("1", nn.Linear(12, 8)), ("2", nn.ReLU()), ("3", nn.Linear(8, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class TinyClient(fl.client.NumPyClient):
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(96, 12, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).float().unsqueeze(1)
        self.net = TinyNet()

    def get_parameters(self, config):
        return [v.detach().cpu().numpy() for v in self.net.state_dict().values()]

    def set_parameters(self, parameters):
        keys = list(self.net.state_dict().keys())
        self.net.load_state_dict(OrderedDict((k, torch.tensor(np.array(v))) for k, v in zip(keys, parameters)))

    def fit(self, parameters, config):
        CALLS.append(("fit", dict(config)))
        self.set_parameters(parameters)
        opt = torch.optim.SGD(self.net.parameters(), lr=0.5)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(int(config.get("epochs", 5))):
            opt.zero_grad()
            loss = loss_fn(self.net(self.x), self.y)
            loss.backward()
            opt.step()
        return self.get_parameters(config={}), len(self.x), {"train_loss": float(loss.detach()), "note": "text is dropped"}

    def evaluate(self, parameters, config):
        CALLS.append(("evaluate", dict(config)))
        self.set_parameters(parameters)
        with torch.no_grad():
            out = self.net(self.x)
            loss = nn.BCEWithLogitsLoss()(out, self.y)
            acc = float(((out > 0).float() == self.y).float().mean())
        return float(loss), len(self.x), {"accuracy": acc}


def make_client() -> TinyClient:
    return TinyClient()
