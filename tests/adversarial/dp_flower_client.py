"""Flower clients for the site's Flower path: one that trains with Opacus and declares its DP
parameters (``fedbus_dp_plan``), and one that declares less noise than the site allows."""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.site_worker.flower_client import TinyClient

BATCH = 32  # of the client's 96 rows: Poisson rate 1/3
NOISE = 1.0


class DPTinyClient(TinyClient):
    noise = NOISE

    def fedbus_dp_plan(self, config):
        epochs = int(config.get("epochs", 1))
        per_epoch = -(-len(self.x) // BATCH)
        return {"noise_multiplier": self.noise, "sample_rate": 1 / per_epoch, "steps": epochs * per_epoch,
                "max_grad_norm": 1.0}

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        loader = DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH)
        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(module=self.net, optimizer=torch.optim.SGD(self.net.parameters(), lr=0.1),
                                                 data_loader=loader, noise_multiplier=self.noise, max_grad_norm=1.0)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(int(config.get("epochs", 1))):
            for xb, yb in loader:
                opt.zero_grad()
                if len(xb):
                    loss_fn(model(xb), yb).backward()
                opt.step()
        model._close()
        return self.get_parameters(config={}), len(self.x), {"epsilon": 0.001}  # a self-reported ε is ignored


class WeakDPClient(DPTinyClient):
    noise = 0.1


def make_dp_client() -> DPTinyClient:
    return DPTinyClient()


def make_weak_client() -> WeakDPClient:
    return WeakDPClient()


class DeclaringClient(TinyClient):
    """Declares whatever DP plan the test sets in ``plan`` (the hospital's code, under test) and
    returns the parameters it got: the caps are checked on the declaration, before ``fit``."""

    plan = {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 6, "max_grad_norm": 1.0}

    def fedbus_dp_plan(self, config):
        return dict(self.plan)

    def fit(self, parameters, config):
        return parameters, len(self.x), {}


def make_declaring_client() -> DeclaringClient:
    return DeclaringClient()
