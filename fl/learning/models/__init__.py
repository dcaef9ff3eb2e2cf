"""The models a run can train, by the name ``--model`` gives: a built-in (one file each
here) or ``package.module:factory``, a user's function that takes (input shape C x H x W,
class count) and returns a ``torch.nn.Module``. Everything else (the flat layout, the
payload limits, checkpoints, evaluation, ``predict.py``) derives what it needs from the
instance ``build`` returns, so no other module names a model class.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fl.common.layout import Layout
from fl.learning import datasets
from fl.learning.models import improved_cnn, mlp, resnet_small

Factory = Callable[[tuple[int, int, int], int], nn.Module]
DEFAULT = "improved-cnn"
BUILTIN: dict[str, Factory] = {"improved-cnn": improved_cnn.build, "resnet-small": resnet_small.build,
                               "mlp": mlp.build}
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 200  # WELCOME's schema (wire/control.py TERMS) takes any name of this length


def check_name(name: str) -> str:
    """``name`` when it is a built-in or of the form package.module:factory; ValueError, one line."""
    if name in BUILTIN or (len(name) <= MAX_NAME and _FACTORY.fullmatch(name)):
        return name
    raise ValueError(f"unknown --model {name!r}: expected one of {', '.join(BUILTIN)} or package.module:factory "
                     "(a function of (input_shape, num_classes) that returns a torch.nn.Module)")


def factory(name: str) -> Factory:
    """The built-in's factory, or the user's imported; ValueError, one line, when it cannot be."""
    if check_name(name) in BUILTIN:
        return BUILTIN[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever the module raised on import
        raise ValueError(f"--model {name}: cannot import {module_name} ({type(exc).__name__}: "
                         f"{_first_line(exc)}); is its folder on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {name}: {module_name} has no callable {attr!r}")
    return fn


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh model for images of ``input_shape`` (C, H, W) and ``num_classes`` classes."""
    fn = factory(name)
    try:
        model = fn(tuple(input_shape), num_classes)
    except Exception as exc:  # noqa: BLE001 - the user's code: its failure is one line here
        shape = "x".join(map(str, input_shape))
        raise ValueError(f"--model {name} cannot be built for {shape} images of {num_classes} classes "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {name}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def input_of(dataset: str, data_dir: str | Path | None = None) -> tuple[tuple[int, int, int], int]:
    """(C x H x W, classes) of a dataset's images; a folder's classes are its subfolders
    (read from ``data_dir``; DataError when unusable), 2 without one."""
    spec = datasets.spec(dataset)
    if spec.classes is not None:
        return spec.shape, spec.classes
    return spec.shape, len(datasets.folder_classes(Path(data_dir))) if data_dir is not None else 2


def for_dataset(name: str, dataset: str, data_dir: str | Path | None = None) -> nn.Module:
    """Model ``name`` built for ``dataset``'s images and classes."""
    return build(name, *input_of(dataset, data_dir))


def check_trainable(dataset: str, model: str = DEFAULT) -> None:
    """Refuse a model that cannot train on the dataset's images: ValueError, one line, from
    building it and running a batch of two blank images through it."""
    shape, classes = input_of(dataset)
    net = build(model, shape, classes)
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *shape).contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--model {model} cannot take --dataset {dataset}'s {'x'.join(map(str, shape))} images "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--model {model} gives {got} for a batch of 2, expected [2, {classes}] "
                         f"(--dataset {dataset} has {classes} classes)")


def describe(name: str, model: nn.Module | Layout) -> str:
    """What a log says of a run's model: its name, size and layout fingerprint."""
    layout = model if isinstance(model, Layout) else Layout.of(model.state_dict())
    return f"model {name} ({4 * layout.float_numel / 1e6:.2f} MB, layout {layout.fingerprint:016x})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
