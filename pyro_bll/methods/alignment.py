"""Feedback alignment (Lillicrap et al. 2016): backprop with fixed random backward weights.

For a layer with forward weight W, backprop sends the error g = dL/d(out) to its input
through W^T. Feedback alignment sends it through a fixed random matrix B of W's shape
instead, so no weight is transported:

    linear   out = x W^T + b      d/dx: g B             (BP: g W)
    conv2d   out = x * W + b      d/dx: conv2d_input(x.shape, B, g)   (BP: the same with W)

The weight and bias gradients are backprop's (dL/dW = g^T x, the conv weight gradient),
since they need no transport. B is drawn Kaiming-uniform (as in the paper's FA baseline),
is a buffer (saved in checkpoints, never trained) and is fixed for the whole run.
``--method fa`` (``pyro_bll.methods.end_to_end.FeedbackAlignment``) trains the whole chain
end to end on the output cross-entropy with every ``nn.Linear`` and ``nn.Conv2d`` of the
forward blocks and the head converted in place.
Normalisation layers (BatchNorm, LayerNorm) keep their exact gradients, as in the FA
baselines of the literature; parameter-free operations (ReLU, pooling, attention's
softmax and products) are differentiated exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_bll.config import ConfigError

# weighted layers whose input gradient would still use W^T: FA is refused on them
_UNSUPPORTED = (
    nn.MultiheadAttention,
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.Bilinear,
)


class _LinearFA(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, back: Tensor) -> Tensor:
        ctx.save_for_backward(x, back)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: Tensor):
        x, back = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ back.to(g.dtype)  # [..., out] @ [out, in]
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            gw = g2.transpose(0, 1) @ x.reshape(-1, x.shape[-1]).to(g.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb, None


class _Conv2dFA(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, back, stride, padding, dilation, groups):
        ctx.save_for_backward(x, back)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: Tensor):
        x, back = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need = ctx.needs_input_grad
        # one call gives the input gradient through B (= torch.nn.grad.conv2d_input with B)
        # and the weight gradient, which depends on the weight's shape only, not its values
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g,
            x.to(g.dtype),
            back.to(g.dtype),
            [back.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need[0], need[1], has_bias and need[2]],
        )
        return gx, gw, gb if has_bias else None, None, None, None, None, None


def _backward_weight(weight: Tensor) -> Tensor:
    back = torch.empty_like(weight, requires_grad=False)
    nn.init.kaiming_uniform_(back)  # bound sqrt(6 / fan_in), fan_in of W's shape
    return back


class FALinear(nn.Linear):
    """``nn.Linear`` whose input gradient goes through the buffer ``backward_weight``."""

    backward_weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return _LinearFA.apply(x, self.weight, self.bias, self.backward_weight)


class FAConv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose input gradient uses ``backward_weight``."""

    backward_weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return _Conv2dFA.apply(
            x,
            self.weight,
            self.bias,
            self.backward_weight,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def _fa_copy(layer: nn.Module) -> nn.Module:
    """The FA twin of a Linear or Conv2d, sharing its weight and bias Parameters."""
    if type(layer) is nn.Linear:
        new: nn.Module = FALinear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
    else:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ConfigError(
                "--method fa supports Conv2d with integer zero padding only; "
                f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
            )
        new = FAConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            device="meta",
        )
    new.weight = layer.weight
    new.bias = layer.bias
    new.register_buffer("backward_weight", _backward_weight(layer.weight.detach()))
    new.train(layer.training)
    return new


def convert_to_feedback_alignment(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` below ``module`` in place; count them."""
    for sub in module.modules():
        if isinstance(sub, _UNSUPPORTED):
            raise ConfigError(
                f"--method fa has no fixed-backward-weight version of {type(sub).__name__}; "
                "use a network of Linear and Conv2d layers or another --method"
            )
    count = 0
    for sub in list(module.modules()):
        for name, child in list(sub.named_children()):
            if type(child) in (nn.Linear, nn.Conv2d):
                setattr(sub, name, _fa_copy(child))
                count += 1
    return count
