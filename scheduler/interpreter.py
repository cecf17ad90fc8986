"""Execute a program on the CPU with the reference semantics.

In order, every wait must already hold (otherwise the program's order is not
topological). With `order_seed`, instructions run in a seeded random order chosen among
those whose waits hold: any order the GPU's dynamic queue could produce. A result that
differs from the in-order run means a dependency is missing, the race the GPU would show
as a wrong or flaky token.
"""
from __future__ import annotations

import random

from megakernel.instructions import MachineState, ScheduleError


def run_step(program, state: MachineState, order_seed: int | None = None) -> None:
    """Run every instruction of `program` once on `state` (one step, state.epoch)."""
    instrs = program.instruction_list()
    if order_seed is None:
        for instr in instrs:
            state.check_waits(instr)
            instr.spec.reference(instr, state)
            state.signal(instr)
    else:
        rng = random.Random(order_seed)
        pending = list(range(len(instrs)))
        while pending:
            ready = [i for i in pending if state.ready(instrs[i])]
            if not ready:
                raise ScheduleError(f"deadlock: {len(pending)} instructions wait forever")
            pick = rng.choice(ready)
            pending.remove(pick)
            instr = instrs[pick]
            instr.spec.reference(instr, state)
            state.signal(instr)
    check_counters(program, state)


def check_counters(program, state: MachineState) -> None:
    """After a step every counter holds exactly target * epoch."""
    for c, (name, target) in enumerate(zip(program.counter_names, program.counter_targets)):
        seen = int(state.counters[c])
        if seen != target * state.epoch:
            raise ScheduleError(f"counter {name} holds {seen} after step {state.epoch}, "
                                f"expected {target * state.epoch}")
