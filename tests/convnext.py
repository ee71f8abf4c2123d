"""ConvNeXt's channels_first LayerNorm, as its repository writes it: the module tn.convert
recognises by behaviour (tritonnorm.zoo.channels_first_layer_norm), shared by the tests that
convert it (its import path names it in reports and pickles)."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """facebookresearch/ConvNeXt's LayerNorm, verbatim (models/convnext.py)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        elif self.data_format == "channels_first":
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
            return x
