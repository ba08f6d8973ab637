"""The logged loss is the mean of the step losses since the previous logged step (as HF Trainer logs it), also
across a resume; the step's own loss is logged too, as step_loss.

In one process with a fake accelerator: runs in a second.
Run: .venv/bin/python -m pytest tests/test_loss_window.py -q
"""

import json
import os
import types

import torch

from conftest import read_jsonl
from test_loop import _fake_accelerator

LOSSES = [8.0, 6.0, 5.0, 3.0, 2.5, 2.0, 1.5, 1.25]
KD = [0.5, 0.25, 1.0, 2.0, 0.75, 0.5, 0.25, 0.125]


def _args(tmp_path, resume_from=None):
    return types.SimpleNamespace(
        output_dir=str(tmp_path),
        save_total_limit=3,
        resume_from=resume_from,
        report_to="none",
        max_steps=len(LOSSES),
        logging_steps=3,  # logged at 3, 6 and 8 (the last step)
        eval_steps=100,
        save_steps=4,  # a checkpoint in the middle of the second window
    )


def _run(tmp_path, stop_after=None, resume_from=None):
    from dsrecipes.train.loop import Loop, Session

    args = _args(tmp_path, resume_from)
    stop = types.SimpleNamespace(requested=lambda acc: False)
    session = Session(_fake_accelerator(), args, stop)
    loop = Loop(session, args)
    loop.scheduler = types.SimpleNamespace(get_last_lr=lambda: [0.1])

    def step():
        i = loop.step
        if stop_after is not None and i + 1 == stop_after:
            stop.requested = lambda acc: True
        return LOSSES[i], {"kd": KD[i]}

    loop.drive(step)
    return [r for r in read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl")) if "loss" in r]


def test_the_logged_loss_is_the_window_mean(tmp_path):
    logged = _run(tmp_path)
    assert [r["step"] for r in logged] == [3, 6, 8]
    windows = [(0, 3), (3, 6), (6, 8)]
    for r, (a, b) in zip(logged, windows):
        assert r["loss"] == sum(LOSSES[a:b]) / (b - a)
        assert r["kd"] == sum(KD[a:b]) / (b - a)  # the logged terms are window means too
        assert r["step_loss"] == LOSSES[b - 1]


def test_the_window_mean_is_exact_across_a_resume(tmp_path):
    whole = _run(tmp_path / "whole")
    first = _run(tmp_path / "cut", stop_after=4)  # preempted at step 4: the window 4..6 is open in the checkpoint
    assert [r["step"] for r in first] == [3]
    with open(os.path.join(str(tmp_path / "cut"), "checkpoints", "step_00000004", "trainer_state.json")) as fh:
        window = json.load(fh)["loss_window"]
    assert window == {"sums": {"loss": LOSSES[3], "kd": KD[3]}, "steps": 1}
    resumed = _run(tmp_path / "cut", resume_from="latest")
    assert resumed == whole  # every logged value, bit for bit (tokens_per_s is 0 with no tokens counted)
    assert torch.tensor([r["loss"] for r in whole]).ne(torch.tensor([r["step_loss"] for r in whole])).any()
