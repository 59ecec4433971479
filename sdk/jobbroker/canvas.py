"""Workflows: chain, group and chord of task signatures, typed end to end.

A `Flow[In, Out]` is a piece of a workflow that, given the result of what
runs before it (`In`), makes `Out`. `task.s(...)` is a signature: a task with
its payload and options, not yet submitted. How a step's input is made:

- `task.s()`: the input is the previous step's result (for a step after a
  group, the list of the group's results);
- `task.s(payload)` for a task whose input is `Piped[R, P]`: the input is
  `{"result": <the previous step's result>, "payload": payload}`;
- `task.s(payload)` for any other task: the input is `payload`; the step only
  runs after the previous one (Celery's immutable `.si()`).

`chain(a, b, c)` runs them in turn, `group(a, b)` side by side (its result is
the list of its members' results, in order), `chord(header, body)` runs the
body once every member of the header has succeeded, with the list of their
results. They nest. `client.submit(flow)` stores the whole workflow in one
transaction; the broker releases each step when its parents are done.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, overload

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .task import Task
    from .types import SubmitOptions

R = TypeVar("R")
P = TypeVar("P")
M = TypeVar("M")
X = TypeVar("X")
R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")
R5 = TypeVar("R5")
R6 = TypeVar("R6")
In = TypeVar("In")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


class Piped(TypedDict, Generic[R, P]):
    """The input of a step that has its own payload and follows another step."""

    result: R  # the previous step's result
    payload: P  # the step's own payload


class FailureInfo(TypedDict):
    type: str
    message: str


class Outcome(TypedDict, Generic[R], total=False):
    """One member's place in the input of a chord body told to run with
    failures (`chord(..., on_failure="run")`): its state ("succeeded",
    "dead" or "cancelled"), and its result or its error."""

    state: str
    result: R
    error: FailureInfo


Takes = Literal["own", "result", "piped"]


class Flow(Generic[In_contra, Out_co]):
    """A piece of a workflow: a signature, a chain, a group or a chord."""

    __slots__ = ()


class Signature(Flow[In_contra, Out_co]):
    """A task with its payload and options, not yet submitted."""

    __slots__ = ("options", "payload", "takes", "task")

    def __init__(
        self, task: Task[Any, Any], payload: Any, takes: Takes, options: SubmitOptions
    ) -> None:
        self.task = task
        self.payload = payload
        self.takes = takes
        self.options = options

    def __repr__(self) -> str:
        return f"<Signature {self.task.name} takes={self.takes}>"


class Chain(Flow[In_contra, Out_co]):
    __slots__ = ("steps",)

    def __init__(self, steps: tuple[Flow[Any, Any], ...]) -> None:
        self.steps = steps


class Group(Flow[In_contra, list[Out_co]]):
    __slots__ = ("members",)

    def __init__(self, members: tuple[Flow[Any, Any], ...]) -> None:
        self.members = members


class Chord(Flow[In_contra, Out_co]):
    __slots__ = ("body", "header", "run_on_failure")

    def __init__(self, header: Group[Any, Any], body: Flow[Any, Any], run_on_failure: bool) -> None:
        self.header = header
        self.body = body
        self.run_on_failure = run_on_failure


@overload
def chain(a: Flow[In, R1], b: Flow[R1, R2], /) -> Chain[In, R2]: ...
@overload
def chain(a: Flow[In, R1], b: Flow[R1, R2], c: Flow[R2, R3], /) -> Chain[In, R3]: ...
@overload
def chain(
    a: Flow[In, R1], b: Flow[R1, R2], c: Flow[R2, R3], d: Flow[R3, R4], /
) -> Chain[In, R4]: ...
@overload
def chain(
    a: Flow[In, R1], b: Flow[R1, R2], c: Flow[R2, R3], d: Flow[R3, R4], e: Flow[R4, R5], /
) -> Chain[In, R5]: ...
@overload
def chain(
    a: Flow[In, R1],
    b: Flow[R1, R2],
    c: Flow[R2, R3],
    d: Flow[R3, R4],
    e: Flow[R4, R5],
    f: Flow[R5, R6],
    /,
) -> Chain[In, R6]: ...
@overload
def chain(
    a: Flow[Any, Any],
    b: Flow[Any, Any],
    c: Flow[Any, Any],
    d: Flow[Any, Any],
    e: Flow[Any, Any],
    f: Flow[Any, Any],
    g: Flow[Any, Any],
    /,
    *more: Flow[Any, Any],
) -> Chain[Any, Any]: ...
@overload
def chain(a: Flow[In, R1], /) -> Chain[In, R1]: ...
def chain(*steps: Flow[Any, Any]) -> Chain[Any, Any]:
    """Run the steps in turn, each given the previous one's result. Up to six
    steps are type-checked step to step; a longer chain is typed Any (or
    nest chains: a chain is a step)."""
    if not steps:
        raise InvalidArgumentError("a chain needs at least one step")
    return Chain(tuple(_flow(step) for step in steps))


@overload
def group(members: Iterable[Flow[In, M]], /) -> Group[In, M]: ...
@overload
def group(*members: Flow[In, M]) -> Group[In, M]: ...
def group(*members: Any) -> Group[Any, Any]:
    """Run the members side by side; the result is the list of theirs, in order."""
    listed = _members(members)
    if not listed:
        raise InvalidArgumentError("a group needs at least one member")
    return Group(tuple(_flow(m) for m in listed))


@overload
def chord(
    header: Group[In, M] | Iterable[Flow[In, M]],
    body: Flow[list[M], R],
    /,
    *,
    on_failure: Literal["cancel"] = "cancel",
) -> Chord[In, R]: ...
@overload
def chord(
    header: Group[In, M] | Iterable[Flow[In, M]],
    body: Flow[list[Outcome[M]], R],
    /,
    *,
    on_failure: Literal["run"],
) -> Chord[In, R]: ...
def chord(
    header: Group[Any, Any] | Iterable[Flow[Any, Any]],
    body: Flow[Any, Any],
    /,
    *,
    on_failure: Literal["cancel", "run"] = "cancel",
) -> Chord[Any, Any]:
    """Run `body` once every member of `header` is done, given the list of
    their results. By default a member that ends dead or cancelled cancels
    the body; with `on_failure="run"` the body runs anyway and each member's
    place holds an `Outcome` (its state, and its result or error)."""
    if on_failure not in ("cancel", "run"):
        raise InvalidArgumentError(f"on_failure is 'cancel' or 'run', not {on_failure!r}")
    members = header if isinstance(header, Group) else group(list(header))
    return Chord(members, _flow(body), on_failure == "run")


def _members(given: tuple[Any, ...]) -> list[Any]:
    if len(given) == 1 and not isinstance(given[0], Flow) and isinstance(given[0], Iterable):
        return list(given[0])
    return list(given)


def _flow(value: Any) -> Flow[Any, Any]:
    if not isinstance(value, Flow):
        raise InvalidArgumentError(
            f"a workflow step is a signature (task.s(...)), chain, group or chord, not {value!r}"
        )
    return value


# --- what the broker is sent ---

Shape = int | list["Shape"]  # job indices: where a flow's result comes from


class Step:
    """One job of a compiled workflow: its signature and what it waits on."""

    __slots__ = ("parents", "shape", "signature", "tolerant")

    def __init__(
        self, signature: Signature[Any, Any], parents: list[int], shape: str, tolerant: bool
    ) -> None:
        self.signature = signature
        self.parents = parents
        self.shape = shape
        self.tolerant = tolerant


def compile_flow(flow: Flow[Any, Any]) -> tuple[list[Step], Shape]:
    """The workflow's jobs, each after those it waits on, and where its
    result comes from."""
    steps: list[Step] = []
    out = _compile(flow, None, False, steps)
    return steps, out


def _compile(flow: Flow[Any, Any], feed: Shape | None, tolerant: bool, steps: list[Step]) -> Shape:
    if isinstance(flow, Signature):
        return _add(flow, feed, tolerant, steps)
    if isinstance(flow, Chain):
        out = feed
        for i, step in enumerate(flow.steps):
            out = _compile(step, out, tolerant and i == 0, steps)
        assert out is not None
        return out
    if isinstance(flow, Group):
        return [_compile(m, feed, tolerant, steps) for m in flow.members]
    if isinstance(flow, Chord):
        header = _compile(flow.header, feed, tolerant, steps)
        return _compile(flow.body, header, flow.run_on_failure, steps)
    raise InvalidArgumentError(f"not a workflow step: {flow!r}")


def _add(sig: Signature[Any, Any], feed: Shape | None, tolerant: bool, steps: list[Step]) -> int:
    parents: list[int] = []
    shape = ""
    if feed is not None:
        position: dict[int, int] = {}
        for leaf in leaves(feed):
            position.setdefault(leaf, len(position))
        parents = list(position)
        if sig.takes != "own":
            shape = _shape_text(feed, position)
    steps.append(Step(sig, parents, shape, tolerant and bool(parents)))
    return len(steps) - 1


def leaves(shape: Shape) -> list[int]:
    """The jobs a shape names, in order."""
    if isinstance(shape, int):
        return [shape]
    return [leaf for item in shape for leaf in leaves(item)]


def _shape_text(shape: Shape, position: Mapping[int, int]) -> str:
    if isinstance(shape, int):
        return str(position[shape])
    return "[" + ",".join(_shape_text(item, position) for item in shape) + "]"
