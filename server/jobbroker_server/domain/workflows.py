"""Jobs that wait on other jobs: what a workflow's job needs, checked before
anything is stored, and the input a waiting job gets when it is released.

A workflow is one batch of jobs submitted together; a job names the earlier
jobs of the batch it waits on (its parents) by their index. Its input is its
own payload, or is made from its parents' results by a shape: a JSON value of
numbers and lists, where the number n stands for the result of its n-th
parent. With ``with_payload`` the input is ``{"result": <shape>, "payload":
<its own payload>}``. A job that tolerates failures is released when its
parents end however they end, and each parent's place holds
``{"state": "succeeded", "result": r}`` or ``{"state": "dead", "error": {...}}``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobbroker_server.domain.errors import InvalidArgument, ResourceExhausted
from jobbroker_server.domain.models import JSON_CONTENT_TYPE, ErrorInfo, Payload

# One workflow is one transaction: these keep one from holding the store
# (SQLite's one writer) for more than about a second.
MAX_WORKFLOW_JOBS = 20_000
# Parent links in one workflow, in all: a group of n followed by a group of m
# makes n * m of them.
MAX_WORKFLOW_LINKS = 100_000
# A released job's input, made from its parents' results: what a worker
# accepts in one message.
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_SHAPE_CHARS = 1024 * 1024
MAX_SHAPE_DEPTH = 32

Shape = int | list["Shape"]


@dataclass(frozen=True, slots=True)
class Needs:
    """What a job of a workflow waits on, and how its input is made."""

    parents: tuple[str, ...]  # the ids of earlier jobs of its workflow
    shape: Shape | None = None  # None: its input is its own payload
    with_payload: bool = False
    tolerate_failures: bool = False


def needs(
    parents: Sequence[int],
    earlier: Sequence[str],
    shape: str,
    with_payload: bool,
    tolerate_failures: bool,
) -> Needs | None:
    """Validate what a job waits on: ``parents`` index ``earlier``, the ids
    of the jobs before it in its workflow."""
    index = len(earlier)
    if not parents:
        if shape or with_payload or tolerate_failures:
            raise InvalidArgument("needs.input, with_payload and tolerate_failures need parents")
        return None
    if len(parents) > MAX_WORKFLOW_JOBS:
        raise ResourceExhausted(f"a job waits on at most {MAX_WORKFLOW_JOBS} parents")
    for parent in parents:
        if parent >= index:
            raise InvalidArgument(
                f"needs.parents names job {parent}: a job waits only on jobs before it "
                "in its workflow"
            )
    if len(set(parents)) != len(parents):
        raise InvalidArgument("needs.parents names a job twice")
    if with_payload and not shape:
        raise InvalidArgument("needs.with_payload needs needs.input: the parents' results")
    parsed = _shape(shape, len(parents)) if shape else None
    return Needs(tuple(earlier[i] for i in parents), parsed, with_payload, tolerate_failures)


def _shape(text: str, parents: int) -> Shape:
    if len(text) > MAX_SHAPE_CHARS:
        raise ResourceExhausted(
            f"needs.input is {len(text)} characters; the limit is {MAX_SHAPE_CHARS}"
        )
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument("needs.input is not JSON") from None
    _check_shape(value, parents, 0, set())
    shape: Shape = value
    return shape


def _check_shape(value: Any, parents: int, depth: int, seen: set[int]) -> None:
    """Lists and numbers of parents, each parent at most once: a result
    named many times would make an input many times its size."""
    if depth > MAX_SHAPE_DEPTH:
        raise InvalidArgument(f"needs.input nests deeper than {MAX_SHAPE_DEPTH} lists")
    if isinstance(value, list):
        for item in value:
            _check_shape(item, parents, depth + 1, seen)
        return
    if type(value) is not int or not 0 <= value < parents:
        raise InvalidArgument(
            f"needs.input holds {json.dumps(value)[:40]}: only lists and numbers of parents "
            f"(0 to {parents - 1})"
        )
    if value in seen:
        raise InvalidArgument(f"needs.input names parent {value} twice")
    seen.add(value)


def check_workflow(links: int, jobs: int) -> None:
    if jobs > MAX_WORKFLOW_JOBS:
        raise ResourceExhausted(f"a workflow holds at most {MAX_WORKFLOW_JOBS} jobs (got {jobs})")
    if links > MAX_WORKFLOW_LINKS:
        raise ResourceExhausted(
            f"a workflow's jobs wait on {links} parents in all; the limit is {MAX_WORKFLOW_LINKS}"
        )


class InputTooLarge(Exception):
    pass


def check_input_size(size: int) -> None:
    if size > MAX_INPUT_BYTES:
        raise InputTooLarge(
            f"its parents' results come to {size} bytes; a job's input holds at most "
            f"{MAX_INPUT_BYTES} (store large results elsewhere and pass references)"
        )


def released_input(
    shape: Shape | None, with_payload: bool, own: Payload, slots: Sequence[bytes]
) -> Payload:
    """A released job's input: its shape over ``slots``, one per parent in
    its order of parents (``result_slot`` or ``outcome_slot``). The results'
    JSON is spliced in as it is, never parsed."""
    if shape is None:
        return own
    built = _build(shape, slots)
    if with_payload:
        built = b'{"result":' + built + b',"payload":' + _json(own.data, own.content_type) + b"}"
    return Payload(built, JSON_CONTENT_TYPE)


def _build(shape: Shape, slots: Sequence[bytes]) -> bytes:
    if isinstance(shape, int):
        return slots[shape]
    return b"[" + b",".join([_build(item, slots) for item in shape]) + b"]"


def result_slot(data: bytes | None, content_type: str | None) -> bytes:
    """A parent's result as JSON: as it is, or (not JSON) its bytes in base64."""
    return _json(data, content_type)


def _json(data: bytes | None, content_type: str | None) -> bytes:
    """Spliced as it is only when it is JSON: a worker's word for it is not
    enough, since a result such as ``1,2`` would forge its siblings' places."""
    if not data:
        return b"null"
    if content_type == JSON_CONTENT_TYPE and _is_json(data):
        return data
    wrapped = {"content_type": content_type, "base64": base64.b64encode(data).decode()}
    return json.dumps(wrapped).encode()


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def outcome_slot(
    state: str, data: bytes | None, content_type: str | None, error: ErrorInfo | None
) -> bytes:
    """A parent's place for a job that tolerates failures: its state, and its
    result or its error."""
    named = json.dumps(state).encode()
    if state == "succeeded":
        return b'{"state":' + named + b',"result":' + _json(data, content_type) + b"}"
    error = error or ErrorInfo("", "")
    described = json.dumps({"type": error.type, "message": error.message}).encode()
    return b'{"state":' + named + b',"error":' + described + b"}"
