"""The device thread of asynchronous scheduling (worker/device_thread.py) and the decode
inputs of rows whose last token is still being computed (worker/inputs.py): pure, no
model. A step's output is given to its waiter only once the next step reaches the backend
(or nothing is queued), every call runs in order, and an error reaches its own waiter."""

from __future__ import annotations

import threading

import pytest
import torch

from vllm_neuronx.worker.device_thread import DeviceThread
from vllm_neuronx.worker.inputs import SequenceRow, decode_inputs


@pytest.fixture
def device():
    thread = DeviceThread()
    yield thread
    thread.shutdown()


def test_a_step_is_given_once_the_next_one_launches(device):
    order, gate = [], threading.Event()

    def first():
        gate.wait(5)  # the second step is queued by then
        order.append("first ran")
        return 1

    def second():
        order.append(("first given before second launches", one.done()))
        device.launching()
        order.append(("first given at launch", one.done()))
        return 2

    one = device.submit(first, step=True)
    two = device.submit(second, step=True)
    gate.set()
    assert two.result(5) == 2 and one.result(5) == 1
    assert order == ["first ran", ("first given before second launches", False),
                     ("first given at launch", True)]


def test_the_last_step_is_given_when_nothing_follows(device):
    assert device.submit(lambda: 7, step=True).result(5) == 7


def test_other_calls_run_in_order_and_give_the_held_step_first(device):
    log = []
    one = device.submit(lambda: log.append("step") or "s", step=True)
    two = device.submit(lambda: (log.append("call"), one.done())[1])
    assert two.result(5) is True and one.result(5) == "s" and log == ["step", "call"]
    assert device.current is False
    assert device.submit(lambda: device.current).result(5) is True


def test_an_error_reaches_its_own_waiter_and_the_thread_goes_on(device):
    def boom():
        raise ValueError("bad step")

    bad = device.submit(boom, step=True)
    good = device.submit(lambda: 3, step=True)
    with pytest.raises(ValueError, match="bad step"):
        bad.result(5)
    assert good.result(5) == 3


def test_the_thread_never_frees_what_a_call_was_given_or_returned(device):
    """Freed on this thread, a step's objects would cost host time between two device
    calls: the last reference is always the submitter's."""
    freed_on = []

    class Step:  # a step's objects, as the runner's are
        def __del__(self):
            freed_on.append(threading.current_thread().name)

    def launch(out):  # a step: the one before it is given as it launches
        device.launching()
        return out

    for _ in range(3):
        args, out, last = Step(), Step(), Step()
        first = device.submit(lambda a, o=out: o, args, step=True)
        second = device.submit(launch, last, step=True)  # queued: first is held till then
        assert first.result(5) is out and second.result(5) is last
        del args, out, last, first, second
    assert freed_on == [threading.current_thread().name] * 9


def test_rows_ahead_take_position_len_and_a_token_filled_in_later():
    rows = [SequenceRow("b", 1, [5, 6, 7], (1, 1.0, 0.0)),
            SequenceRow("a", 0, [1, 2], (1, 1.0, 0.0))]
    step = decode_inputs(rows, ahead={"b"})
    assert step.req_ids == ["a", "b"]  # by KV line
    assert step.input_ids.tolist() == [[2], [0]]
    assert step.position_ids.tolist() == [[1], [3]]  # b's token 7 sits at 2; the next at 3
    assert decode_inputs(rows).position_ids.tolist() == [[1], [2]]
    step.input_ids.view(-1)[1] = 9  # the device thread's fill writes through
    assert torch.equal(step.input_ids, torch.tensor([[2], [9]]))
