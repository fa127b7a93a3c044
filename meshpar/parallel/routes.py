"""Routes of the 1F1B loop's boundary values: each device keeps ``1/P`` of them, the loop fetches.

The 1F1B backward loop (:mod:`meshpar.parallel.onef1b`) reads the stack's input ``xs[m]`` on stage
0 (chunk 0's forward, and its backward where that recomputes), reads the stack's output gradient
``dys[m]`` on stage ``P - 1`` (the last chunk's backward), and makes the input gradient ``dxs[m]``
on stage 0 (chunk 0's backward). Those are ``M`` microbatch activations each. Held whole on every
device, as until 2026-12-03, they were the one part of a 1F1B step that grew with ``M`` (one
activation per microbatch, ``benchmarks/README.md``, "1F1B"). Here every device holds only its
*block* of them -- microbatch ``m`` lives on stage ``m // q`` in slot ``m % q``, ``q = ceil(M/P)``,
which is ``PartitionSpec("pipe")`` on the microbatch dimension (padded to ``q * P``) -- and three
*channels* bring each value to where it is used, one stage per tick, riding along the loop's two
permutes (so each tick still runs one ``collective-permute`` per direction, with more rows):

* ``xs``: from its owner down to stage 0 (stage ``s`` sends to ``s - 1``), arriving at the tick
  that reads it;
* ``dys``: from its owner up to stage ``P - 1`` (``s`` to ``s + 1``);
* ``dxs``: from stage 0 to its owner round the ring the gradients take (``0`` to ``P - 1``, then
  down), where it overwrites ``xs[m]`` (read for the last time before ``dxs[m]`` is made).

The 1F1B forward loop (:func:`meshpar.parallel.schedule.onef1b_forward`) has two: ``xs`` to stage 0
as above, and ``ys``, the stack's output, from stage ``P - 1`` down to its owner.

A value owned by the stage that reads or makes it does not move. Between its ends a value is
relayed: a stage sends on each channel what arrived on it, unless the table says to send from
its block instead. Each channel has one fixed end (stage 0 or ``P - 1``) and every tick that end
reads or makes at most one value, so two values never need the same link at the same tick
(checked here, a bug if not). Reads on the way in start early enough (``xs[m]`` is read no earlier
than tick ``m``, and its owner is at most ``m`` stages away); on the way out the last values may
arrive after the last tick of compute: :attr:`BoundaryRoutes.ticks` is then longer (only where
``M`` is not a multiple of ``P``), and a value arriving one tick after the loop is stored from its
final carry (:attr:`Outbound.last`).

Length: about 200 lines, one concept (the boundary values' routes, pure NumPy).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["BoundaryRoutes", "Inbound", "Outbound", "boundary_routes"]


@dataclasses.dataclass(frozen=True, eq=False)
class Inbound:
    """A channel bringing values from their owners to one end stage (``int32[stages, ticks]``).

    Attributes:
        load: the block slot this stage sends at the end of the tick (``-1``: it relays what
            arrived).
        take: on the end stage, the block slot read this tick where it owns the value; ``-1``:
            the channel's arrival (or nothing is read).
    """

    load: np.ndarray
    take: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Outbound:
    """A channel taking values from the stage that makes them to their owners.

    Attributes:
        send: ``int32[stages, ticks]``, ``1`` where the making stage sends the value it made
            this tick (``0``: it relays).
        keep: the block slot the making stage's own value of this tick goes to (``-1``: none).
        store: the block slot the channel's arrival at this tick goes to.
        last: ``int32[stages]``: the block slot the channel's value after the last tick goes to.
    """

    send: np.ndarray
    keep: np.ndarray
    store: np.ndarray
    last: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class BoundaryRoutes:
    """The channels of one loop (``ticks`` columns; ``-1`` for none in every table).

    Attributes:
        block: ``q``, microbatches per stage's block (``ceil(M / P)``).
        ticks: loop length (the compute table's, or longer, see the module docstring).
        inbound: name -> :class:`Inbound` (the backward loop: ``xs`` to stage 0, ``dys`` to
            stage ``P - 1``; the forward loop: ``xs``).
        outbound: name -> :class:`Outbound` (the backward loop: ``dxs`` from stage 0; the
            forward loop: ``ys``, the stack's output, from stage ``P - 1``).
    """

    block: int
    ticks: int
    inbound: dict[str, Inbound]
    outbound: dict[str, Outbound]


class _Channel:
    # One channel's sends, checked for two values on one link at one tick.

    def __init__(self, name: str, stages: int, step: int, ring: bool):
        self.name, self.stages, self.step, self.ring = name, stages, step, ring
        self.sent: dict[tuple[int, int], int] = {}     # (tick, sender) -> microbatch

    def hops(self, src: int, dst: int) -> int:
        h = (dst - src) * self.step
        if self.ring:
            h %= self.stages
        if h < 0:   # a line channel only runs one way
            raise RuntimeError(f"meshpar internal error: the {self.name} channel cannot go from "
                               f"stage {src} to stage {dst} (please report this)")
        return h

    def send(self, tick: int, stage: int, m: int) -> None:
        key = (tick, stage % self.stages)
        if key in self.sent or tick < 0:
            raise RuntimeError(
                f"meshpar internal error: the {self.name} channel needs stage {key[1]} to send "
                f"microbatch {m} at tick {tick}, "
                + ("before the loop" if tick < 0 else f"which also sends {self.sent[key]}")
                + " (please report this)")
        self.sent[key] = m


def boundary_routes(stages: int, micro: int, ticks: int, *,
                    inbound: dict[str, tuple[int, int, list[tuple[int, int]]]],
                    outbound: dict[str, tuple[int, int, bool, list[tuple[int, int]]]],
                    ) -> BoundaryRoutes:
    """The channels of one loop.

    Args:
        stages, micro: ``P`` and ``M``.
        ticks: the compute table's length.
        inbound: name -> ``(end stage, step, reads)``: the channel moves ``step`` (``+1`` or
            ``-1``) stages a tick, along a line, and ``reads`` lists the ``(tick, m)`` at which
            the end stage reads value ``m`` (one a tick at most).
        outbound: name -> ``(making stage, step, ring, made)``: ``made`` lists the
            ``(tick, m)`` at which the making stage makes value ``m``; ``ring``: the channel
            wraps round from one end stage to the other.

    Returns:
        The :class:`BoundaryRoutes`.

    Example:
        >>> r = boundary_routes(2, 2, 4, inbound={"xs": (0, -1, [(0, 0), (1, 1)])},
        ...                     outbound={"dxs": (0, -1, True, [(2, 0), (3, 1)])})
        >>> r.block, r.inbound["xs"].load[1].tolist(), r.outbound["dxs"].last.tolist()
        (1, [0, -1, -1, -1], [-1, 0])
    """
    P, q = stages, -(-micro // stages)

    def owner(m):
        return m // q, m % q

    channels = {name: _Channel(name, P, step, ring)
                for name, (_, step, ring, _) in outbound.items()}
    arrivals = [t + channels[name].hops(src, owner(m)[0])
                for name, (src, _, _, made) in outbound.items() for t, m in made]
    # A value arriving at tick T (one after the loop) is stored from the final carry.
    total = max([ticks, *arrivals])

    def table(fill=-1):
        return np.full((P, total), fill, np.int32)

    ins = {}
    for name, (end, step, reads) in inbound.items():
        channel, load, take = _Channel(name, P, step, False), table(), table()
        taken = set()
        for t, m in reads:
            o, slot = owner(m)
            if t in taken:
                raise RuntimeError(f"meshpar internal error: two {name} reads at tick {t}")
            taken.add(t)
            if o == end:
                take[end, t] = slot
                continue
            h = channel.hops(o, end)
            for i in range(h):                      # sent by o at t - h, relayed after
                channel.send(t - h + i, o + i * step, m)
            load[o, t - h] = slot
        ins[name] = Inbound(load=load, take=take)
    outs = {}
    for name, (src, step, _, made) in outbound.items():
        channel, send, keep, store = channels[name], table(0), table(), table()
        last = np.full((P,), -1, np.int32)
        for t, m in made:
            o, slot = owner(m)
            if o == src:
                keep[src, t] = slot
                continue
            h = channel.hops(src, o)
            for i in range(h):
                channel.send(t + i, src + i * step, m)
            send[src, t] = 1
            if t + h < total:
                store[o, t + h] = slot
            else:
                last[o] = slot
        outs[name] = Outbound(send=send, keep=keep, store=store, last=last)
    for route in (*ins.values(), *outs.values()):
        for field in dataclasses.fields(route):
            getattr(route, field.name).setflags(write=False)
    return BoundaryRoutes(block=q, ticks=total, inbound=ins, outbound=outs)
