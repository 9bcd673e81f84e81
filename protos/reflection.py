"""Server reflection that resolves every symbol kind clients ask for.

grpc_reflection looks symbols up with the protobuf descriptor pool's
FindFileContainingSymbol, which (with the upb backend) knows services,
messages, fields and enums but not a service's methods or an enum's values
under their enum: `tiergate.v1.Classifier.Classify` was "Symbol not found",
so ghz and grpcurl could not call a method by reflection. The pool below
falls back to the enclosing symbol when it holds the last name part.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

__all__ = ["enable_reflection", "SymbolPool"]


class SymbolPool:
    """A descriptor pool whose FindFileContainingSymbol also finds methods and enum values."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def __getattr__(self, name: str):
        return getattr(self._pool, name)  # every other lookup as the pool does it

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 (protobuf's name)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, last = symbol.rpartition(".")
            if parent and self._holds(parent, last):
                return self._pool.FindFileContainingSymbol(parent)
            raise

    def _holds(self, parent: str, last: str) -> bool:
        for find, members in ((self._pool.FindServiceByName, "methods_by_name"),
                              (self._pool.FindEnumTypeByName, "values_by_name")):
            try:
                return last in getattr(find(parent), members)
            except KeyError:
                continue
        return False


def enable_reflection(service_names, server) -> None:
    reflection.enable_server_reflection(list(service_names), server, pool=SymbolPool())
