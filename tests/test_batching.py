"""Group commit: callers that share a failed transaction are tried again apart."""

from __future__ import annotations

import asyncio

import pytest

from jobbroker_server.domain.errors import InvalidArgument, StoreUnavailable
from jobbroker_server.services.batching import GroupCommit


def test_a_failed_group_is_tried_again_caller_by_caller() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        await asyncio.sleep(0)
        if -1 in items:
            raise InvalidArgument("no negatives")
        return [i * 10 for i in items]

    async def run() -> list[object]:
        group = GroupCommit(flush)
        first = group.enqueue([1])  # flushes alone at once; the next three share one
        rest = [group.enqueue(items) for items in ([2, 3], [-1], [4])]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    ones, twos, bad, fours = asyncio.run(run())
    assert ones == [10] and twos == [20, 30] and fours == [40]
    assert isinstance(bad, InvalidArgument)
    assert flushes == [[1], [2, 3, -1, 4], [2, 3], [-1], [4]]


def test_a_store_that_is_down_fails_the_group_once() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        raise StoreUnavailable("the database is unreachable")

    async def run() -> None:
        group = GroupCommit(flush, shared_errors=(StoreUnavailable,))
        first = group.enqueue([1])
        rest = [group.enqueue([n]) for n in (2, 3)]
        for future in (first, *rest):
            with pytest.raises(StoreUnavailable):
                await future

    asyncio.run(run())
    assert flushes == [[1], [2, 3]]
