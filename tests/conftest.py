import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (reference implementations)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: extra threads cost far more than they give
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in a module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def crash_at_step(monkeypatch):
    """`with crash_at_step(n):` the trainer raises KeyboardInterrupt in optimizer step n, after the
    update and before step n's logging or saving (a simulated crash); restored on leaving."""
    from llava_smoe.training import trainer

    @contextlib.contextmanager
    def crash(at: int):
        real_step = trainer.moe_optimizer_step

        def step_or_crash(model, step):
            if step == at:
                raise KeyboardInterrupt("simulated crash")
            real_step(model, step)

        monkeypatch.setattr(trainer, "moe_optimizer_step", step_or_crash)
        try:
            yield
        finally:
            monkeypatch.setattr(trainer, "moe_optimizer_step", real_step)

    return crash
