"""Swap every BatchNorm of a model for bnspec's reference modules, and back.

For debugging a model: "is it wrong because of the BatchNorm kernel?" ::

    model = bnspec.swap.to_reference(model)    # every BatchNorm now computes with bnspec.reference
    ...                                         # run, compare outputs and gradients
    model = bnspec.swap.from_reference(model)  # the original classes again

A BatchNorm is any instance of torch's ``_BatchNorm`` (``nn.BatchNorm1d/2d/3d``,
``nn.SyncBatchNorm``, bnspec's modules and any subclass of them, such as a custom
kernel written as a subclass of ``nn.BatchNorm2d``). The replacement is a new module of
bnspec's class of the same kind (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) that takes
over the old module's whole state: the same parameter and buffer tensors (so their
device, dtype and values, and an optimizer that holds the parameters, carry over),
train/eval mode, hyperparameters, hooks and any other attribute. Only the class, and
so the forward, changes. :func:`from_reference` puts back the class each layer had
(torch's class of the same kind for a layer that was built as bnspec's).

Both change ``model`` in place and return it; when ``model`` itself is a BatchNorm the
returned module is the replacement (as ``SyncBatchNorm.convert_sync_batchnorm`` does).
"""

from __future__ import annotations

from torch import nn

from bnspec.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, ReferenceBatchNorm, TorchBatchNorm
from bnspec.sync import SyncBatchNorm

__all__ = ["to_reference", "from_reference", "REPLACED_CLASS"]

#: The attribute in which a swapped-in module keeps the class it replaced.
REPLACED_CLASS = "bnspec_replaced_class"

# (torch's class, bnspec's class), most specific first: SyncBatchNorm before the ranks.
_KINDS = (
    (nn.SyncBatchNorm, SyncBatchNorm),
    (nn.BatchNorm1d, BatchNorm1d),
    (nn.BatchNorm2d, BatchNorm2d),
    (nn.BatchNorm3d, BatchNorm3d),
)


def to_reference(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (``model`` included) with bnspec's module of
    the same kind, carrying its whole state over; bnspec's modules are left as they are.

    Raises TypeError for a BatchNorm of no known kind (a direct subclass of torch's
    ``_BatchNorm``, or a lazy BatchNorm before its first forward), before changing anything.
    """
    for name, module in _batchnorms(model):
        if not isinstance(module, ReferenceBatchNorm) and _kind(module) is None:
            raise TypeError(f"{name or 'model'}: {type(module).__qualname__} is a BatchNorm of no known kind "
                            "(not a BatchNorm1d/2d/3d or SyncBatchNorm subclass; a lazy BatchNorm becomes one "
                            "after its first forward); bnspec has no module to replace it with")
    return _replace(model, _to_reference_one)


def from_reference(model: nn.Module) -> nn.Module:
    """Undo :func:`to_reference`: every bnspec module in ``model`` becomes the class it
    replaced, or torch's class of the same kind when it was built as bnspec's."""
    return _replace(model, _from_reference_one)


def _to_reference_one(module: nn.Module) -> nn.Module:
    if not isinstance(module, TorchBatchNorm) or isinstance(module, ReferenceBatchNorm):
        return module
    new = _with_class(module, _kind(module)[1])
    setattr(new, REPLACED_CLASS, type(module))
    return new


def _from_reference_one(module: nn.Module) -> nn.Module:
    if not isinstance(module, ReferenceBatchNorm):
        return module
    original = getattr(module, REPLACED_CLASS, None) or _kind(module)[0]
    new = _with_class(module, original)
    new.__dict__.pop(REPLACED_CLASS, None)
    return new


def _kind(module: nn.Module) -> tuple[type, type] | None:
    """(torch's class, bnspec's class) of a BatchNorm, or None when it is of no known kind."""
    return next(((t, b) for t, b in _KINDS if isinstance(module, t)), None)


def _with_class(module: nn.Module, cls: type) -> nn.Module:
    """A module of class ``cls`` with ``module``'s state: the same attribute values
    (tensors shared, not copied); its own registries, so later changes stay separate."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if registry in module.__dict__:
            new.__dict__[registry] = module.__dict__[registry].copy()
    return new


def _batchnorms(model: nn.Module):
    return ((name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, TorchBatchNorm))


def _replace(module: nn.Module, one, done: dict | None = None) -> nn.Module:
    """``one`` applied to ``module`` and, depth first, to every submodule, in place. A
    module reached twice (shared between layers) gets one replacement, still shared."""
    done = {} if done is None else done
    if id(module) not in done:
        new = done[id(module)] = one(module)
        # _modules, not named_children(): that skips a child registered under two names.
        for name, child in list(new._modules.items()):
            if child is not None:
                new.add_module(name, _replace(child, one, done))
    return done[id(module)]
