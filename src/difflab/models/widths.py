"""A network's layer widths as plain numbers, and a network of its architecture resized to them: how a
structurally pruned network is stored (numbers and tensors, nothing pickled) and rebuilt."""

from __future__ import annotations

from torch import Tensor, nn

SIZE_ATTRS = {nn.Conv2d: ("in_channels", "out_channels"), nn.Linear: ("in_features", "out_features"),
              nn.GroupNorm: ("num_groups", "num_channels"), nn.Embedding: ("num_embeddings", "embedding_dim")}


def _attrs(module: nn.Module) -> tuple[str, ...]:
    return next((attrs for kind, attrs in SIZE_ATTRS.items() if isinstance(module, kind)), ())


def network_widths(net: nn.Module) -> dict[str, dict[str, int]]:
    """module name -> its size attributes, for every convolution, linear layer, norm and embedding."""
    return {name: {a: int(getattr(m, a)) for a in _attrs(m)} for name, m in net.named_modules() if _attrs(m)}


def resize_to(net: nn.Module, widths: dict[str, dict[str, int]], weights: dict[str, Tensor]) -> nn.Module:
    """`net` (built at its configured widths) with each layer set to `widths` and each parameter shaped as in
    `weights`, ready for load_state_dict(weights)."""
    for name, attrs in widths.items():
        module = net.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        for pname, param in list(module.named_parameters(recurse=False)):
            shape = weights[f"{name}.{pname}" if name else pname].shape
            if param.shape != shape:
                setattr(module, pname, nn.Parameter(param.new_empty(shape)))
    return net
