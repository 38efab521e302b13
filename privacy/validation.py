"""Which models can be trained under client-level DP.

Client-level DP privatises the *parameters'* update. A model state that changes in
training without being a parameter (BatchNorm running statistics) would travel
from the clients unclipped and un-noised, so such models are converted to
GroupNorm with Opacus's BatchNorm fixer, or refused. (Opacus's full
``ModuleValidator`` is for sample-level DP-SGD; it also rejects layers, such as
``nn.MultiheadAttention``, that are fine for client-level DP.)
"""

from __future__ import annotations

from opacus.validators import ModuleValidator, batch_norm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dpfl.errors import UsageError


def convert_batch_norm(model: nn.Module) -> None:
    """Replace every BatchNorm in ``model``, at any depth, by Opacus's GroupNorm equivalent."""
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, batch_norm.fix(child))
        else:
            convert_batch_norm(child)


def ensure_client_level_dp_compatible(model: nn.Module, convert: bool = True) -> nn.Module:
    """Return a model whose whole state is parameters, converting BatchNorm if allowed."""
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        if not convert:
            raise UsageError(
                "the model has BatchNorm layers, whose running statistics would leave the clients "
                "unprivatised; use a GroupNorm model or allow conversion"
            )
        convert_batch_norm(model)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise UsageError(
            f"the model has state that is not a parameter ({', '.join(buffers[:3])}); "
            "client-level DP can only privatise parameters"
        )
    return model


def check_local_dp_supported(model: nn.Module, model_name: str) -> None:
    """Refuse, in one line, a model whose per-sample gradients Opacus cannot compute (for local DP-SGD)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = dict.fromkeys(str(err).split(". ")[0].strip() for err in errors)
        raise UsageError(f"local-dp does not support model {model_name!r}: {'; '.join(reasons)}")
