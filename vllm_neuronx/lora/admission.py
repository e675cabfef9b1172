"""Which waiting requests a prefill step may take, so that at most ``max_loras`` adapters run.

Upstream vLLM counts adapters over the requests it schedules in a step, and asserts the
count on every decode step. Our scheduler runs prefill steps with the running requests
hidden from upstream's loop, so that count would miss them: two prefills of two adapters
each with ``max_loras=2`` would put four adapters in flight, and the next decode step would
fail upstream's assertion (and overfill the device's adapter slots). The rule is therefore
applied here, over the running requests and the waiting ones together.

Fairness: once one adapter request has to wait, every later adapter request waits behind it
(base-model requests still pass). The adapters in flight then stop taking new requests,
drain within one request's lifetime, and the oldest held adapter gets its slot: no request
waits forever, however busy the other adapters are.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

# Loads of an adapter that replaced one still used by running requests, per (id, folder):
# the worker's host pool counts them (``replaced``), the scheduler reads them. Both live in
# the engine-core process (the platform runs vLLM's one-process executor).
_replacements: dict[tuple[int, str], int] = {}


def adapter_key(lora_request) -> tuple[int, str, int] | None:
    """What counts as one adapter, for the scheduler and the worker's host pool alike: its
    id, its folder, and how often it was replaced while in use (``load_inplace``, or a
    removal and a new load). The requests still running on the old load then hold another
    adapter than new requests do, and both count against max_loras. None: the base model."""
    if lora_request is None:
        return None
    where = (lora_request.lora_int_id, lora_request.lora_path)
    return (*where, _replacements.get(where, 0))


def replaced(lora_id: int, path: str) -> None:
    """The host pool replaced this adapter while running requests still use the old load."""
    _replacements[(lora_id, path)] = _replacements.get((lora_id, path), 0) + 1


def admit(adapters: Sequence[Hashable | None], active: Collection[Hashable],
          max_loras: int) -> list[bool]:
    """For each waiting request in queue order (its adapter's key, None for the base model),
    whether this step may schedule it. ``active``: the adapters of the running requests.

    A request is admissible when it is a base-model request, or when no adapter request
    before it was held and its adapter is active or fits in the ``max_loras`` slots left.
    """
    if max_loras < 1:
        raise ValueError(f"max_loras must be at least 1, got {max_loras}")
    in_flight = set(active)
    if len(in_flight) > max_loras:
        raise RuntimeError(
            f"{len(in_flight)} adapters are running but max_loras={max_loras} (a scheduling bug)")
    allowed = []
    holding = False
    for key in adapters:
        if key is None:
            allowed.append(True)
            continue
        if not holding and (key in in_flight or len(in_flight) < max_loras):
            in_flight.add(key)
            allowed.append(True)
        else:
            holding = True
            allowed.append(False)
    return allowed
