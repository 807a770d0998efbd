"""Tiny plain-torch models for the coupling and prune tests: a CNN with BatchNorm and residual adds (a ResNet basic
block with an identity shortcut, one with a conv shortcut), and one plain multi-head attention block; for the
scorers that train, the attention block captured with a dynamic batch and a regression task written as [data]."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """stem conv+bn, an identity-shortcut block, a conv-shortcut block, global pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def resnet_tiny(seed: int = 0) -> nn.Module:
    """ResNetTiny in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model = ResNetTiny()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model.eval()


class Attention(nn.Module):
    """Plain multi-head self-attention (q, k, v, o Linear, heads by view) and a ReLU FFN, no norms."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 48):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1)
        x = self.o((attn @ v).transpose(1, 2).reshape(b, s, -1))
        return self.fc2(torch.relu(self.fc1(x)))


def attention(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Attention().eval()


def attention_task(root, steps: int = 24, batch_size: int = 16, lr: float = 1e-2, examples: int = 64):
    """(the attention block captured with a dynamic batch, [data] options of an MSE task on `root`/data.safetensors:
    inputs x [examples, 6, 32], labels the outputs of a differently seeded attention block (the teacher))."""
    from safetensors.torch import save_file

    from rewrite.capture import capture
    from rewrite.inputs import ExampleInputs
    from rewrite.load import LoadedModel
    from rewrite.options import DataOptions

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 6, 32, generator=generator)
    with torch.no_grad():
        labels = attention(seed=1)(x)
    save_file({"x": x, "labels": labels}, root / "data.safetensors")
    gm, _ = capture(LoadedModel(attention(), None, "factory", "attention", None),
                    ExampleInputs({"x": x[:2]}, {"x": ["batch", None, None]}))
    return gm, DataOptions(path="data.safetensors", loss="mse", batch_size=batch_size, steps=steps, lr=lr)


def fused_decoder(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny real transformers decoder (seeded random weights, no download), eval mode: `qwen2` (GQA, q/k/v
    biases), `phi3` (GQA through a fused qkv_proj, gate and up fused in gate_up_proj), `gpt_neox` (a fused
    query_key_value laid out per head: [q_h, k_h, v_h] side by side, partial rotary)."""
    import transformers

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 max_position_embeddings=64, intermediate_size=128, use_cache=False)
    config = {"qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **small),
              "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **small),
              "gpt_neox": lambda: transformers.GPTNeoXConfig(**small)}[name]()
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "phi3": transformers.Phi3ForCausalLM,
           "gpt_neox": transformers.GPTNeoXForCausalLM}[name]
    torch.manual_seed(seed)
    return cls(config).eval()
