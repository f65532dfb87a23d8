"""Forward hooks on torch modules, registered for the length of a `with` block and always removed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


@contextmanager
def forward_hooks(hooks: Iterable[tuple[object, Callable]], pre: bool = False,
                  with_kwargs: bool = False) -> Iterator[None]:
    """Register each (module, fn) as a forward pre-hook (`pre`: fn(module, args)) or forward hook
    (fn(module, args, out), or fn(module, args, kwargs, out) `with_kwargs`); remove them all on leaving."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if pre
                           else module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()
