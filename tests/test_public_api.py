"""Everything public is importable from `legato.client`, and `__all__` says exactly what."""

from __future__ import annotations

import inspect
from types import ModuleType

import legato.client
from legato.client import _async, _sync, errors, models

PUBLIC_MODULES: tuple[ModuleType, ...] = (errors, models, _async, _sync)


def public_classes(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and name[0] != "_"
    }


def test_every_public_class_of_the_client_is_exported_from_the_package() -> None:
    defined = set().union(*(public_classes(module) for module in PUBLIC_MODULES))
    assert defined <= set(legato.client.__all__), defined - set(legato.client.__all__)


def test_all_names_exactly_what_the_package_exports() -> None:
    exported = set(legato.client.__all__)
    assert len(exported) == len(legato.client.__all__), "a name is listed twice"
    for name in exported:
        assert getattr(legato.client, name) is not None
    assert legato.client.__all__ == sorted(legato.client.__all__)


def test_the_readme_error_names_import_as_written() -> None:
    from legato.client import FailedPreconditionError, NotFoundError, UnavailableError

    assert issubclass(NotFoundError, legato.client.RPCError)
    assert issubclass(FailedPreconditionError, legato.client.LegatoError)
    assert issubclass(UnavailableError, legato.client.RPCError)
