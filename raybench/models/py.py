"""The user's own model: `function(**kwargs)` from an importable module, returning an nn.Module."""
from __future__ import annotations

import importlib
import inspect
import sys

import torch
from torch import nn

from raybench.configs import ConfigError, PyConfig
from raybench.models.registry import Family, register


def load_function(cfg: PyConfig):
    where = f"py:{cfg.module}:{cfg.function}"
    if cfg.path and cfg.path not in sys.path:
        sys.path.insert(0, cfg.path)  # Ray workers start elsewhere: the config carries the folder
    try:
        module = importlib.import_module(cfg.module)
    except Exception as e:
        raise ConfigError(f"{where}: module {cfg.module!r} does not import (from {cfg.path or 'sys.path'}): "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, cfg.function, None)
    if not callable(fn):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                  and getattr(v, "__module__", None) == module.__name__]
        raise ConfigError(f"{where}: {module.__name__} has no function {cfg.function!r}"
                          + (f"; it defines {', '.join(sorted(public))}" if public else ""))
    return fn


def _takes(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def _head_parameters(model: nn.Module, size: int) -> set[int]:
    """The parameters `forward_head` uses, found by autograd on a test batch: what stays trainable."""
    was = model.training
    model.eval()
    with torch.enable_grad():
        f = model.forward_features(torch.zeros(2, 3, size, size)).detach()
        out = model.forward_head(f)
    model.train(was)
    params = list(model.parameters())
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise ConfigError(f"{type(model).__name__}.forward_head uses no trainable parameter: nothing would train")
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads) if g is not None}


class PyModel(nn.Module):
    """Holds the user's module (as `inner`); with `frozen`, only what its forward_head uses trains, and the
    rest stays in eval mode (no dropout or BatchNorm updates: the features are the same every epoch)."""

    def __init__(self, inner: nn.Module, frozen: bool, size: int):
        super().__init__()
        self.inner, self.frozen = inner, frozen
        self.head_modules: list[nn.Module] = []
        if frozen:
            head = _head_parameters(inner, size)
            for p in inner.parameters():
                p.requires_grad_(id(p) in head)
            self.head_modules = [m for m in inner.modules()
                                 if any(id(p) in head for p in m.parameters(recurse=False))]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.inner.eval()
            for m in self.head_modules:
                m.train(mode)
        return self

    def forward(self, x):
        return self.inner(x)


class PySplitModel(PyModel):
    """A user's module with a backbone/head split: the trainer may cache `forward_features` when frozen."""

    def forward_features(self, x):
        return self.inner.forward_features(x)

    def forward_head(self, f):
        return self.inner.forward_head(f)


def build_py(cfg: PyConfig, weights: bool = True) -> PyModel:
    """`weights` is ignored: the function decides its own initial weights (seeded by the trial)."""
    where = f"py:{cfg.module}:{cfg.function}"
    fn = load_function(cfg)
    kwargs = cfg.kwargs_dict
    if "num_classes" not in kwargs and _takes(fn, "num_classes"):
        kwargs["num_classes"] = cfg.num_classes
    try:
        inner = fn(**kwargs)
    except Exception as e:
        raise ConfigError(f"{where}(**{kwargs}) raised {type(e).__name__}: {e}") from None
    if not isinstance(inner, nn.Module):
        raise ConfigError(f"{where} returned a {type(inner).__name__}, not a torch.nn.Module")
    split = callable(getattr(inner, "forward_features", None)) and callable(getattr(inner, "forward_head", None))
    if cfg.finetune and not split:
        raise ConfigError(f"{where}: finetune needs a backbone/head split: give {type(inner).__name__} the methods "
                          "forward_features(x) -> features and forward_head(features) -> logits (the parameters "
                          "forward_head uses are the ones that train), or drop finetune")
    model = (PySplitModel if split else PyModel)(inner, cfg.finetune, cfg.image_size)
    model.input_size, model.mean, model.std = cfg.image_size, None, None
    return model


register(Family(PyConfig, build_py, test_batch=True))
