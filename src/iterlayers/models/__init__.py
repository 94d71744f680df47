"""Ready-made networks, by name: ``build_model(name, in_features, num_classes, **options)``.

Every factory has the signature ``factory(in_features, num_classes, **options) -> nn.Module``; options are
keyword-only and validated by the model. :func:`build_model` raises the family's
:class:`~iterlayers.errors.ValidationError` (a bad value or name) or :class:`~iterlayers.errors.OptionTypeError`
(an unknown option or a wrong type), naming the model and the option.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..errors import IterlayersError, OptionTypeError, ValidationError

__all__ = ["MODELS", "build_model", "register_model"]


def _lazy(module: str, attr: str) -> Callable[..., nn.Module]:
    # Import on use so the registry (and the CLI's --help) never pays for, or breaks on, an unused model.
    def factory(in_features: int, num_classes: int, **options) -> nn.Module:
        cls = getattr(importlib.import_module(f"iterlayers.models.{module}"), attr)
        return cls(in_features, num_classes, **options)

    factory.__name__ = f"build_{attr}"
    factory.__doc__ = f"Build iterlayers.models.{module}.{attr}."
    return factory


def _implicit_linear(in_features: int, num_classes: int, *, width: int = 64, equilibrium: str = "iterative",
                     **options) -> nn.Module:
    """Kawaguchi's deep equilibrium linear model f(x) = B (I - gamma sigma(A))^{-1} phi(x) as a classifier."""
    from iterlayers.implicit_linear import ImplicitLinearModel

    if "options" not in options:  # a DEQOptions value given is used as it is
        options.setdefault("atol", 1e-5)  # float32 training; the model's own default (1e-6) sits at rounding level
    return ImplicitLinearModel(in_features, width, num_classes, equilibrium=equilibrium, **options)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "deq_mlp": _lazy("deq_mlp", "DEQMLP"),
    "deq_conv": _lazy("deq_conv", "DEQConv"),
    "mlp": _lazy("deq_mlp", "MLPClassifier"),
    "implicit_linear": _implicit_linear,
    "mdeq": _lazy("mdeq", "MDEQ"),
    "ignn": _lazy("ignn", "IGNN"),
    "deq_transformer": _lazy("deq_transformer", "DEQTransformer"),
    "mondeq": _lazy("mondeq", "MonDEQ"),
    "mondeq_conv": _lazy("mondeq", "MonDEQConv"),
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add ``factory(in_features, num_classes, **options)`` to :data:`MODELS` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise OptionTypeError(f"register_model({name!r}): factory must be callable, got {type(factory).__name__}")
    MODELS[name] = factory


def build_model(name: str, in_features: int, num_classes: int, **options) -> nn.Module:
    """Build the registered model ``name``; an unknown name raises ValidationError listing the valid ones."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValidationError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](in_features, num_classes, **options)
    except (OptionTypeError, ValidationError) as err:
        # The family's own option errors (from the model or the DEQOptions it builds): keep the type, name the model.
        if str(err).startswith(f"model {name!r}"):
            raise
        raise type(err)(f"model {name!r}: {err}") from None
    except IterlayersError:
        raise
    except TypeError as err:
        # An unknown keyword reaches the constructor as a TypeError (from Python's argument binding or a model
        # outside the family); say which model rejected it, as the family's error.
        raise OptionTypeError(f"model {name!r}: {err}") from None
    except ValueError as err:
        # Only the constructor ran, on the caller's options: a ValueError raised outside the family (a layer
        # the model builds) is about those options too.
        raise ValidationError(f"model {name!r}: {err}") from None
