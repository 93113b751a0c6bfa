"""Status codes of KLP/1: gRPC's codes, with gRPC's names and numbers.

The numbers are those of ``kelpie.v1.Code`` in ``proto/kelpie/v1/header.proto``;
they are repeated here as a plain ``IntEnum`` so that importing ``kelpie`` does
not need the generated protobuf module, and so that users who know gRPC find
the same names (``StatusCode.NOT_FOUND``, ``StatusCode.DEADLINE_EXCEEDED``...).
"""

import enum

__all__ = ["StatusCode"]


class StatusCode(enum.IntEnum):
    """The status of a finished call (``kelpie.v1.Code``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def coerce(cls, value):
        """Map an int, a name or a StatusCode to a StatusCode (UNKNOWN if unknown)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                return cls.UNKNOWN
        try:
            return cls(int(value))
        except ValueError:
            return cls.UNKNOWN
