"""Plain-torch models for the factory (`package.module:function`) and fx front-end tests."""
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, ids):
        feature = self.conv(x).mean(dim=(2, 3))
        return self.head(feature + self.embed(ids).mean(dim=1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def not_a_module():
    return 42
