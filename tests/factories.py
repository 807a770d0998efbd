"""Plain-torch models for the factory (`package.module:function`) and fx front-end tests."""
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.conv = nn.Conv2d(3, 8, **(conv or dict(kernel_size=3, padding=1)))
        self.head = nn.Linear(8, 4)

    def forward(self, x, ids):
        feature = self.conv(x).mean(dim=(2, 3))
        return self.head(feature + self.embed(ids).mean(dim=1))


def cnn_inputs_toml(height: int, width: int) -> str:
    """The `[[capture.inputs]]` of TinyCNN (an image x and token ids), as spec text."""
    return (f'[[capture.inputs]]\nname = "x"\nshape = [2, 3, {height}, {width}]\n'
            '[[capture.inputs]]\nname = "ids"\nshape = [2, 5]\ndtype = "int64"\nhigh = 32\n')


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def strided_cnn() -> nn.Module:
    """TinyCNN whose conv has a non-square kernel, stride, padding and dilation (settings the LoRA branch copies)."""
    torch.manual_seed(0)
    return TinyCNN(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1))


def not_a_module():
    return 42


class DeepMLP(nn.Module):
    """4 x Linear(64, 64) with ReLUs between: weight sites `layers.0` .. `layers.3`, rows independent."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def mlp4() -> nn.Module:
    torch.manual_seed(0)
    return DeepMLP().eval()
