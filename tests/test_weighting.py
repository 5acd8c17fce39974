"""Loss weighting: each method's gradient against its closed form, on hand-made problems."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tasktune.config import WeightingConfig
from tasktune.errors import TasktuneError
from tasktune.train.gradient_weighting import pcgrad_combine
from tasktune.train.weighting import dwa_weights, make_weighter

D64 = torch.float64


def _quadratic(centres: dict[str, list[float]], theta: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """L_i = 0.5 ||theta - c_i||^2, so grad_i = theta - c_i."""
    return {n: 0.5 * (theta - torch.tensor(c, dtype=D64)).pow(2).sum() for n, c in centres.items()}


def _linear(grads: dict[str, list[float]], theta: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """L_i = g_i . theta, so grad_i = g_i exactly."""
    return {n: torch.dot(torch.tensor(g, dtype=D64), theta) for n, g in grads.items()}


# ---------------------------------------------------------------- static


def test_static_is_weighted_sum_and_accumulates():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=D64))
    w = make_weighter(WeightingConfig(method="static", weights={"a": 2.0, "b": 0.5}), ["a", "b", "c"])
    centres = {"a": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 1.0], "c": [3.0, 0.0, -1.0]}
    used = w.backward(_quadratic(centres, theta), [theta])
    assert used == {"a": 2.0, "b": 0.5, "c": 1.0}  # c defaults to 1.0
    t = theta.detach()
    expected = 2.0 * t + 0.5 * (t - 1.0) + (t - torch.tensor(centres["c"], dtype=D64))
    torch.testing.assert_close(theta.grad, expected)
    # A second micro-batch with task a missing, scaled by 1/2: added, not overwritten.
    w.backward(_quadratic({"b": centres["b"]}, theta), [theta], scale=0.5)
    torch.testing.assert_close(theta.grad, expected + 0.25 * (t - 1.0))


def test_static_task_weights_and_unknown_names():
    w = make_weighter(WeightingConfig(weights={"a": 3.0}), ["a", "b"], task_weights={"a": 5.0, "b": 2.0})
    assert w.weights == [3.0, 2.0]  # cfg.weights override the tasks' own weights
    with pytest.raises(TasktuneError, match="unknown task 'typo'"):
        make_weighter(WeightingConfig(weights={"typo": 1.0}), ["a", "b"])
    with pytest.raises(TasktuneError, match="'a' must be a finite number >= 0"):
        make_weighter(WeightingConfig(weights={"a": -1.0}), ["a", "b"])
    with pytest.raises(ValueError, match="unknown task"):
        w.backward({"zzz": torch.tensor(1.0, requires_grad=True)}, [])


# ---------------------------------------------------------------- uncertainty


def test_uncertainty_loss_and_gradients_match_closed_form():
    w = make_weighter(WeightingConfig(method="uncertainty"), ["a", "b", "c"])
    assert not w.steps_itself and w.optimizer_param_groups()[0]["params"] == [w.log_vars]
    s = [0.3, -0.5, 1.2]
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor(s))
    x = torch.nn.Parameter(torch.tensor([2.0, 0.7]))
    losses = {"a": x[0] ** 2, "b": 3.0 * x[1]}  # c is missing from this batch
    used = w.backward(losses, [x])
    la, lb = 4.0, 2.1
    assert w.last_loss == pytest.approx(math.exp(-0.3) * la + 0.3 + math.exp(0.5) * lb - 0.5, rel=1e-6)
    assert {n: float(v) for n, v in used.items()} == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.5)})
    # d/ds_i = 1 - exp(-s_i) L_i; the missing task's s gets no gradient (no NaN either).
    torch.testing.assert_close(w.log_vars.grad, torch.tensor([1 - math.exp(-0.3) * la, 1 - math.exp(0.5) * lb, 0.0]))
    torch.testing.assert_close(x.grad, torch.tensor([math.exp(-0.3) * 2 * 2.0, math.exp(0.5) * 3.0]))


def test_uncertainty_optimum_is_inverse_loss():
    """Trained alone on fixed losses, exp(-s_i) converges to 1 / L_i."""
    w = make_weighter(WeightingConfig(method="uncertainty"), ["a", "b"])
    opt = torch.optim.Adam(w.optimizer_param_groups(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        w.backward({"a": torch.tensor(4.0), "b": torch.tensor(0.5)}, [])
        opt.step()
    torch.testing.assert_close(torch.exp(-w.log_vars.detach()), torch.tensor([0.25, 2.0]), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("method", ["static", "uncertainty"])
def test_static_and_uncertainty_never_read_the_device(method):
    """A step on the 'meta' device (it holds no data: any read raises): the objective and
    the weights used stay unread tensors (static's weights are host floats)."""
    w = make_weighter(WeightingConfig(method=method), ["a", "b"], device="meta")
    assert all(p.device.type == "meta" for p in w.parameters())
    theta = torch.nn.Parameter(torch.ones(2, device="meta"))
    used = w.backward({"a": theta.sum(), "b": theta.pow(2).sum()}, [theta], scale=0.5)
    assert set(used) == {"a", "b"} and theta.grad is not None and w.last_total.device.type == "meta"
    if method == "uncertainty":
        assert w.log_vars.grad is not None and all(v.device.type == "meta" for v in used.values())
    else:
        assert used == {"a": 1.0, "b": 1.0}


# ---------------------------------------------------------------- DWA


def _softmax_k(ratios: list[float], t: float) -> list[float]:
    e = [math.exp(r / t) for r in ratios]
    return [len(e) * v / sum(e) for v in e]


def test_dwa_weights_follow_the_formula_over_epochs():
    history = [[1.0, 2.0, 3.0], [0.5, 1.8, 3.0], [0.25, 1.5, 2.0]]
    w = make_weighter(WeightingConfig(method="dwa", dwa_temperature=2.0), ["a", "b", "c"])
    theta = torch.nn.Parameter(torch.zeros(3, dtype=D64))
    seen = []
    for epoch_losses in history:
        for _ in range(2):  # two steps per epoch with the same losses: the means are these
            theta.grad = None
            used = w.backward({n: theta.sum() * 0 + v for n, v in zip("abc", epoch_losses)}, [theta])
        seen.append([used[n] for n in "abc"])
        w.end_epoch()
    assert seen[0] == seen[1] == [1.0, 1.0, 1.0]  # the first two periods
    assert seen[2] == pytest.approx(_softmax_k([0.5, 0.9, 1.0], 2.0))
    # by hand: K e^{r/T} / sum: e^.25=1.28403, e^.45=1.56831, e^.5=1.64872, sum 4.50106
    assert seen[2] == pytest.approx([0.85582, 1.04530, 1.09888], abs=1e-5)
    assert w.weights == pytest.approx(_softmax_k([0.5, 1.5 / 1.8, 2.0 / 3.0], 2.0))
    assert sum(w.weights) == pytest.approx(3.0)


def test_dwa_window_missing_tasks_and_given_means():
    w = make_weighter(WeightingConfig(method="dwa", dwa_temperature=1.0), ["a", "b"], dwa_window=2)
    x = torch.nn.Parameter(torch.tensor(1.0, dtype=D64))
    steps = [{"a": 4.0, "b": 1.0}, {"a": 2.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}]
    for losses in steps:  # periods: a=[3, 1], b=[1, 2]
        w.backward({n: x * v for n, v in losses.items()}, [x])
    assert w.weights == pytest.approx(_softmax_k([1 / 3, 2.0], 1.0))
    w.end_epoch({"a": 9.0})  # ignored in window mode
    assert w.weights == pytest.approx(_softmax_k([1 / 3, 2.0], 1.0))
    assert dwa_weights([[1.0, None], [0.5, 3.0]], 2.0) == pytest.approx(_softmax_k([0.5, 1.0], 2.0))  # r=1 if unseen


# ---------------------------------------------------------------- PCGrad


def test_pcgrad_projects_conflicting_pair_by_hand():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=D64))
    head = torch.nn.Parameter(torch.tensor(1.0, dtype=D64))  # not shared: gets the plain sum
    w = make_weighter(WeightingConfig(method="pcgrad"), ["a", "b"])
    losses = _linear({"a": [1.0, 0.0], "b": [-1.0, 1.0]}, theta)
    losses = {n: l + 2.0 * head for n, l in losses.items()}
    assert w.backward(losses, [theta]) == {"a": 1.0, "b": 1.0}
    # g_a.g_b = -1: g_a' = g_a + 1/2 g_b = (.5, .5); g_b' = g_b + g_a = (0, 1); sum (.5, 1.5)
    torch.testing.assert_close(theta.grad, torch.tensor([0.5, 1.5], dtype=D64))
    torch.testing.assert_close(head.grad, torch.tensor(4.0, dtype=D64))


def test_pcgrad_leaves_agreeing_gradients_and_keeps_accumulated_grad():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=D64))
    theta.grad = torch.tensor([10.0, 20.0], dtype=D64)  # from an earlier micro-batch
    w = make_weighter(WeightingConfig(method="pcgrad"), ["a", "b", "c"])
    w.backward(_linear({"a": [1.0, 0.0], "b": [1.0, 1.0]}, theta), [theta], scale=0.5)  # c missing
    torch.testing.assert_close(theta.grad, torch.tensor([11.0, 20.5], dtype=D64))


def test_pcgrad_three_tasks_against_a_reference_loop():
    g = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.5], [0.5, -3.0, 1.0]], dtype=D64)
    got = pcgrad_combine(g, random.Random(7))
    rng, ref = random.Random(7), []
    for i in range(3):  # Yu et al.'s Algorithm 1, written out on python floats
        gi = g[i].tolist()
        order = [j for j in range(3) if j != i]
        rng.shuffle(order)
        for j in order:
            gj = g[j].tolist()
            dot = sum(a * b for a, b in zip(gi, gj))
            if dot < 0:
                gi = [a - dot / sum(b * b for b in gj) * b for a, b in zip(gi, gj)]
        ref.append(gi)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=D64).sum(0))
    assert not torch.allclose(got, g.sum(0))  # this example does conflict
    # seeded by (seed, step): two weighters with one seed agree step for step
    theta1, theta2 = (torch.nn.Parameter(torch.zeros(3, dtype=D64)) for _ in range(2))
    w1, w2 = (make_weighter(WeightingConfig(method="pcgrad"), list("abc"), seed=3) for _ in range(2))
    for _ in range(3):
        w1.backward(_linear(dict(zip("abc", g.tolist())), theta1), [theta1])
        w2.backward(_linear(dict(zip("abc", g.tolist())), theta2), [theta2])
    assert torch.equal(theta1.grad, theta2.grad)


# ---------------------------------------------------------------- GradNorm


def test_gradnorm_raises_the_slower_task_and_keeps_sum_k():
    """L_i = |v_i . theta - t_i| has a gradient of norm 1 whatever the loss, so only the
    training rate differs: task a (t=1) shrinks fast in relative terms, b (t=10) slowly."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=D64))
    w = make_weighter(WeightingConfig(method="gradnorm", gradnorm_alpha=1.5), ["a", "b"])
    history = []
    for _ in range(10):
        theta.grad = None
        losses = {"a": (theta[0] - 1.0).abs(), "b": (theta[1] - 10.0).abs()}
        used = w.backward(losses, [theta])
        # the model's gradient is sum_i w_i grad L_i with the weights used this step
        torch.testing.assert_close(theta.grad, torch.tensor([-used["a"], -used["b"]], dtype=D64))
        with torch.no_grad():
            theta -= 0.05 * theta.grad
        history.append(w.weights.clone())
        assert float(w.weights.sum()) == pytest.approx(2.0)
    assert history[0].tolist() == [1.0, 1.0]  # first step: L = L(0), every r_i = 1, no move
    assert all(later[1] > earlier[1] for earlier, later in zip(history[1:], history[2:]))
    assert history[-1][1] > 1.1 > 0.9 > history[-1][0]


def test_gradnorm_first_adam_step_is_lr_times_sign_then_renormalised():
    w = make_weighter(WeightingConfig(method="gradnorm", gradnorm_alpha=1.0), ["a", "b", "c"], gradnorm_lr=0.1)
    state = w.state_dict()
    state["initial_losses"] = [2.0, 2.0, 2.0]
    w.load_state_dict(state)
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    # losses (1, 3, 3), gradient norms all 1: G = (1, 1, 1); r = (.5, 1.5, 1.5) / (3.5 / 3)
    # so target = r: G_a > target_a, G_b < target_b, G_c < target_c. Adam's first step moves
    # each weight by lr against the sign: (0.9, 1.1, 1.1), then sum 3.1 -> 3.
    w.backward({"a": x[0], "b": x[1] + 2.0, "c": x[2] + 2.0}, [x])
    torch.testing.assert_close(w.weights, torch.tensor([0.9, 1.1, 1.1]) * 3 / 3.1, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", ["static", "uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_missing_tasks_and_resume(method):
    cfg = WeightingConfig(method=method)
    make = lambda: make_weighter(cfg, ["a", "b", "c"], dwa_window=2, seed=1)  # noqa: E731
    w1, w2 = make(), make()
    p1, p2 = (torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0])) for _ in range(2))
    batches = [{"a": 1, "b": 2}, {"c": 0}, {"a": 0, "b": 1, "c": 2}, {"b": 2}, {}, {"a": 1, "c": 0}]

    def run(w, p, batch):
        p.grad = None
        used = w.backward({n: (p - 1.0)[i] ** 2 + p.sum() * 0.1 for n, i in batch.items()}, [p])
        used = {n: float(v) for n, v in used.items()}  # uncertainty's are tensors
        assert set(used) == set(batch) and all(math.isfinite(v) for v in used.values())
        assert p.grad is None if not batch else bool(torch.isfinite(p.grad).all())
        return used

    for batch in batches[:3]:
        run(w1, p1, batch)
    w2.load_state_dict(json.loads(json.dumps(w1.state_dict())))  # JSON-safe, exact
    p2 = torch.nn.Parameter(p1.detach().clone())
    for batch in batches[3:]:
        assert run(w1, p1, batch) == run(w2, p2, batch)
        assert torch.equal(p1.grad, p2.grad) if batch else True
    with pytest.raises(TasktuneError, match="loss weighting is"):
        make_weighter(WeightingConfig(method=method), ["a", "b"]).load_state_dict(w1.state_dict())
