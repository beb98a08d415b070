"""Name-to-constructor registry for the model zoo."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ModelFactory = Callable[..., nn.Module]
_FactoryT = TypeVar("_FactoryT", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


class UnknownModelError(KeyError):
    """Raised when a model name is not in the registry."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a readable sentence is more useful here.
        return str(self.args[0]) if self.args else ""


def register_model(name: str) -> Callable[[_FactoryT], _FactoryT]:
    """Return a decorator that registers a model constructor under ``name``."""

    def decorator(factory: _FactoryT) -> _FactoryT:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_factory(name: str) -> ModelFactory:
    """Return the constructor registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(available_models())
        raise UnknownModelError(f"unknown model {name!r}; available models: {names}") from None


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered under ``name`` with the given keyword arguments."""
    factory = get_model_factory(name)
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def _check_kwargs(name: str, factory: ModelFactory, kwargs: dict[str, Any]) -> None:
    """Reject keyword arguments the constructor does not accept, naming the ones it does."""
    accepted = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unexpected argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
