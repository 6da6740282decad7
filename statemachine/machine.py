"""The job state machine as data: states, transitions, and the one shared `AsyncMachine`.

A job is a model added to the shared machine (`add_model` with its persisted state as
`initial`, `remove_model` when it ends); entering a step's state fires that step (see
`engine.JobModel`). `queued="model"` serialises triggers per job, so a trigger never cancels
a running callback of the same job (a trap of transitions' AsyncMachine).
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from typing import Any

from transitions.extensions.asyncio import AsyncMachine

from schemas.common import CLEANUP_STEPS, FAILOVER_STEPS

FAILOVER = list(FAILOVER_STEPS)
CLEANUP = list(CLEANUP_STEPS)
STEP_STATES = FAILOVER + CLEANUP
END_STATES = ["completed", "failed", "cancelled", "cleaned_up"]
STATES = ["pending", *STEP_STATES, "rolling_back", *END_STATES]

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": "pending", "dest": FAILOVER[0], "conditions": "is_failover"},
    {"trigger": "start", "source": "pending", "dest": CLEANUP[0], "conditions": "is_cleanup"},
    *(
        {"trigger": "step_done", "source": a, "dest": b}
        for steps in (FAILOVER, CLEANUP)
        for a, b in pairwise([*steps, "completed"])
    ),
    # after a crash or a takeover: enter the same step again (its `do` looks up first)
    {"trigger": "resume", "source": [*STEP_STATES, "rolling_back"], "dest": "="},
    # a cleanup undoes a test failover: it is not itself undone, it stops and can be re-run
    {"trigger": "fail", "source": ["pending", *CLEANUP], "dest": "failed", "conditions": "is_cleanup"},
    {"trigger": "cancel", "source": ["pending", *CLEANUP], "dest": "cancelled", "conditions": "is_cleanup"},
    {"trigger": "fail", "source": ["pending", *FAILOVER], "dest": "rolling_back"},
    {"trigger": "cancel", "source": ["pending", *FAILOVER], "dest": "rolling_back"},
    # a rollback ends a job cancelled only when a cancel, not a failed step, began it
    {"trigger": "rolled_back", "source": "rolling_back", "dest": "cancelled", "conditions": "ends_cancelled"},
    {"trigger": "rolled_back", "source": "rolling_back", "dest": "failed"},
    {"trigger": "rollback_incomplete", "source": "rolling_back", "dest": "failed"},
    {"trigger": "retry_rollback", "source": "failed", "dest": "rolling_back"},
    {"trigger": "cleaned", "source": "completed", "dest": "cleaned_up"},
]


def build_machine() -> AsyncMachine:
    """The one machine every job of a process shares."""
    machine = AsyncMachine(
        model=None,
        states=STATES,
        transitions=TRANSITIONS,
        initial="pending",
        auto_transitions=False,
        send_event=True,
        queued="model",
        model_override=False,
    )
    for state in STEP_STATES:
        machine.get_state(state).on_enter.append("enter_step")
    machine.get_state("rolling_back").on_enter.append("enter_rollback")
    for state in ("completed", "failed", "cancelled"):
        machine.get_state(state).on_enter.append("enter_end")
    return machine


def unbind(model: Any) -> None:
    """Drop what `add_model` bound to `model`, once `remove_model` has taken it off the machine.

    `add_model` sets about forty conveniences on the model (its triggers, `may_<trigger>`,
    `is_<state>`, `trigger`, `may_trigger`), each a `functools.partial` holding the model: a
    reference cycle per job, which only Python's cycle collector could free, and with it
    everything the job held (its context, row and ledger entries: ~120 of the ~175 objects a
    paced job left to the collector, bench/PROFILE.md). Each collection stops every job and
    command while it runs (at 20 jobs/s, middle ones of 60-70 ms). Without the partials the job's
    objects go with their last reference."""
    for name, value in list(vars(model).items()):
        if isinstance(value, partial) and any(arg is model for arg in value.args):
            delattr(model, name)


def steps_for(job_type: str) -> list[str]:
    """The ordered step names of a job type."""
    return CLEANUP if job_type == "cleanup" else FAILOVER


def mermaid() -> str:
    """The state diagram, generated from the definition above (docs/state-machine.md)."""
    lines = ["stateDiagram-v2", "    [*] --> pending"]
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        for source in sources:
            dest = source if t["dest"] == "=" else t["dest"]
            label = t["trigger"] + (f" [{t['conditions']}]" if "conditions" in t else "")
            lines.append(f"    {_m(source)} --> {_m(dest)}: {label}")
    for end in ("completed", "failed", "cancelled", "cleaned_up"):
        lines.append(f"    {_m(end)} --> [*]")
    return "\n".join(lines) + "\n"


def _m(state: str) -> str:
    return state.replace("-", "_")
