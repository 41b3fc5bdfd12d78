"""geoopt's Riemannian optimizers with a step that ``torch.compile`` can capture.

:class:`RiemannianSGD` and :class:`RiemannianAdam` are geoopt's optimizers (subclasses,
same constructor arguments, same ``state_dict`` keys, the same iterates to rounding in
eager mode) whose ``step`` also runs under ``torch.compile(opt.step, fullgraph=True)``,
so a CUDA user can capture a whole optimizer step in one graph (and a CUDA graph).

Why they exist: under ``torch.compile``, dynamo hands an optimizer's parameters to the
traced ``step`` as plain tensors, so geoopt's ``isinstance(p, ManifoldParameter)`` test
fails and geoopt's own step silently takes a Euclidean step ``p - lr g`` (see
``tests/test_compile.py``). These classes record each parameter's manifold when the
parameter group is added, and keep Adam's step count in a tensor (a Python integer that
changes every step would make dynamo recompile at every step). The algebra follows
geoopt 0.5.1 exactly, including its quirks (RiemannianSGD starts the momentum buffer at
``p.grad`` before the gradient is converted), except that RiemannianAdam re-projects the
point with ``projx`` before every step, as geoopt's later sources do (the 0.5.1 release
only in ``stabilize``): on a valid point ``FixedTTRank.projx`` returns it bit for bit, on
geoopt's own manifolds it is a rounding-level change. Adam's bias corrections are
computed from the tensor count; in float64 they equal geoopt's Python-float powers to
rounding.

Usage::

    opt = ttmanifold.optim.RiemannianAdam([P], lr=1e-2)   # P a geoopt.ManifoldParameter
    step = torch.compile(opt.step, fullgraph=True)
    for batch in data:
        opt.zero_grad(); loss(P, batch).backward(); step()

Compilation happens on the first two calls (before and after the state is created); later
steps reuse the graph. ``stabilize=k`` (geoopt's periodic re-projection) is a host-side
count and is refused under compilation: call ``opt.stabilize()`` every k steps instead.

With an lr scheduler, compile ``opt.step`` before attaching the scheduler: a scheduler
wraps ``opt.step`` in a function dynamo refuses to trace (``fullgraph=True`` then fails).
Compiled first, the step follows the scheduler's lr without recompiling (the eager iterates
to rounding); the scheduler warns once that its step came first (the compiled step
bypasses its call counter), which is harmless.
"""
from __future__ import annotations

import geoopt
import torch

__all__ = ["RiemannianSGD", "RiemannianAdam", "restart_momentum_"]


def restart_momentum_(manifold, point: torch.Tensor, grad: torch.Tensor,
                      momentum: torch.Tensor) -> torch.Tensor:
    """Adaptive momentum restart, gradient scheme (O'Donoghue and Candes 2015): zero
    ``momentum`` in place wherever a step along ``-momentum`` goes uphill.

    A momentum method steps along ``-momentum``; once its slope ``-<grad, momentum>`` is
    positive the momentum has overshot and oscillates instead of descending. Restarting
    from the local gradient removes the cap that too much momentum puts on the rate (about
    ``sqrt(beta)`` per step whatever the step size) without knowing the conditioning.

    Args:
        manifold: a ``geoopt.Manifold``; its ``inner(point, grad, momentum, keepdim=True)``
            decides the granularity: one decision per point of a
            :class:`~ttmanifold.FixedTTRank` (also per point of a batch), one per entry
            for geoopt's ``Euclidean()`` default.
        point: the point (packed for a ``FixedTTRank``).
        grad: the gradient at ``point`` (Riemannian, or for a ``FixedTTRank`` also the
            Euclidean ``p.grad``: the gauge projection between them is orthogonal and
            ``momentum`` is tangent, so the slope is the same).
        momentum: a tangent vector at ``point`` (the transported buffer), zeroed in place
            where ``<grad, momentum> < 0`` (NaN slopes restart too).

    Returns:
        The kept mask (1 kept, 0 restarted) in ``momentum``'s dtype, shaped as the
        manifold's ``inner(..., keepdim=True)``. No host synchronization.

    Cost: one ``inner`` (for a ``FixedTTRank``, O(size) per point).
    """
    kept = (manifold.inner(point, grad, momentum, keepdim=True) >= 0).to(momentum.dtype)
    momentum.mul_(kept)
    return kept


class _ManifoldsOfGroups:
    """Each parameter group's manifolds, recorded when the group is added (a parameter
    that is no ``ManifoldParameter``/``ManifoldTensor`` gets geoopt's Euclidean default),
    and the ``momentum_restart`` option (a per-group setting, default off)."""

    def __init__(self, params, *args, momentum_restart: bool = False, **kwargs):
        if not isinstance(momentum_restart, bool):
            raise ValueError(f"momentum_restart: expected True or False, got "
                             f"{momentum_restart!r}")
        super().__init__(params, *args, **kwargs)
        # after geoopt's constructor (which fixes its own defaults): groups added later
        # take it from the defaults, the existing ones get it here
        self.defaults["momentum_restart"] = momentum_restart
        for group in self.param_groups:
            group.setdefault("momentum_restart", momentum_restart)
        self._check_restart_groups()

    def _check_restart_groups(self) -> None:
        pass

    def _manifolds_of(self, group: dict) -> list:
        return [p.manifold if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor))
                else self._default_manifold for p in group["params"]]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        # kept beside param_groups, not in it: state_dict() must stay free of modules
        self.__dict__.setdefault("_group_manifolds", []).append(
            self._manifolds_of(self.param_groups[-1]))

    def __setstate__(self, state: dict) -> None:
        # torch pickles (and deep-copies) an optimizer as its defaults, state and groups
        # only: the manifolds come back from the parameters, which are eager objects here
        super().__setstate__(state)
        self._group_manifolds = [self._manifolds_of(g) for g in self.param_groups]
        # (load_state_dict comes here too: a geoopt state dict's groups have no
        # momentum_restart, and the constructor's choice must not be dropped silently)
        for group in self.param_groups:
            group.setdefault("momentum_restart", self.defaults.get("momentum_restart", False))

    @staticmethod
    def _closure_loss(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _groups(self):
        """``(group, [(point, manifold, grad), ...])`` for the parameters with a gradient;
        refuses sparse gradients, and stabilization under compilation."""
        for group, manifolds in zip(self.param_groups, self._group_manifolds):
            if group["stabilize"] is not None and torch.compiler.is_compiling():
                raise RuntimeError(
                    "stabilize: periodic stabilization counts steps on the host and cannot "
                    "be compiled; construct the optimizer with stabilize=None and call "
                    "opt.stabilize() every k steps outside the compiled step")
            points = []
            for point, manifold in zip(group["params"], manifolds):
                if point.grad is None:
                    continue
                if point.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       f"gradients")
                points.append((point, manifold, point.grad))
            yield group, points


class RiemannianSGD(_ManifoldsOfGroups, geoopt.optim.RiemannianSGD):
    """``geoopt.optim.RiemannianSGD`` with a compilable step (see the module docstring).

    Args: as geoopt's: ``params``, ``lr``, ``momentum=0``, ``dampening=0``,
    ``weight_decay=0``, ``nesterov=False``, ``stabilize=None``; and ``momentum_restart``
    (default False; needs ``momentum > 0``): before each update the momentum buffer is
    zeroed where it points uphill (:func:`restart_momentum_`), which lifts the rate limit
    that a large momentum puts on ill-conditioned problems.
    Cost per step and parameter: one ``egrad2rgrad`` and one ``retr`` (``retr_transp``
    with momentum) of the parameter's manifold; with ``momentum_restart`` one ``inner``.
    """

    def _check_restart_groups(self) -> None:
        for group in self.param_groups:
            if group["momentum_restart"] and not group["momentum"] > 0:
                raise ValueError("momentum_restart: needs momentum > 0 (there is no "
                                 "momentum buffer to restart)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group, points in self._groups():
            wd, momentum = group["weight_decay"], group["momentum"]
            dampening, nesterov, lr = group["dampening"], group["nesterov"], group["lr"]
            for point, manifold, grad in points:
                state = self.state[point]
                if len(state) == 0 and momentum > 0:
                    state["momentum_buffer"] = grad.clone()
                if wd != 0:
                    grad.add_(point, alpha=wd)
                grad = manifold.egrad2rgrad(point, grad)
                if momentum > 0:
                    buf = state["momentum_buffer"]
                    if group.get("momentum_restart", False):
                        restart_momentum_(manifold, point, grad, buf)
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    direction = grad.add_(buf, alpha=momentum) if nesterov else buf
                    new_point, new_buf = manifold.retr_transp(point, -lr * direction, buf)
                    buf.copy_(new_buf)
                else:
                    new_point = manifold.retr(point, -lr * grad)
                point.copy_(new_point)
            if group["stabilize"] is not None:
                group["step"] = group.get("step", 0) + 1
                if group["step"] % group["stabilize"] == 0:
                    self.stabilize_group(group)
        return loss


class RiemannianAdam(_ManifoldsOfGroups, geoopt.optim.RiemannianAdam):
    """``geoopt.optim.RiemannianAdam`` with a compilable step (see the module docstring).

    Args: as geoopt's: ``params``, ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``weight_decay=0``, ``amsgrad=False``, ``stabilize=None``; and ``momentum_restart``
    (default False): before each update the first moment ``exp_avg`` is zeroed where it
    points uphill (:func:`restart_momentum_`). With beta1 = 0.9 on ill-conditioned
    problems (tensor completion) the momentum otherwise caps the rate at about 0.9 per
    step in the loss whatever the lr; ``ttmanifold compare``'s automatic step rule for
    ``radam`` uses it (docs/comparison.md, step-size rule).
    State per parameter: ``step`` (a tensor of shape ``(1,)`` on the parameter's device, in
    its dtype, float32 for a lower precision, whose integers stop at 256 for bfloat16;
    geoopt's integer ``step`` in a loaded state dict is converted), ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``).
    Cost per step and parameter: one ``projx``, ``egrad2rgrad``, ``component_inner`` and
    ``retr_transp`` of the parameter's manifold; with ``momentum_restart`` one ``inner``.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group, points in self._groups():
            (beta1, beta2), eps = group["betas"], group["eps"]
            wd, lr, amsgrad = group["weight_decay"], group["lr"], group["amsgrad"]
            stabilize = False
            for point, manifold, grad in points:
                state = self.state[point]
                # the count in at least float32: bfloat16's integers stop at 256 (float16's
                # at 2048), where the count, and with it the bias corrections, would stall
                count_dtype = torch.float64 if point.dtype == torch.float64 else torch.float32
                if len(state) == 0:
                    # shape (1,), not 0-d: torch 2.13's aot_eager/inductor drop in-place
                    # updates of a 0-d CPU tensor input (tests/test_optim.py pins it)
                    state["step"] = torch.zeros(1, dtype=count_dtype, device=point.device)
                    state["exp_avg"] = torch.zeros_like(point)
                    state["exp_avg_sq"] = torch.zeros_like(point)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(point)
                elif not (isinstance(state["step"], torch.Tensor)
                          and state["step"].shape == (1,) and state["step"].dtype == count_dtype):
                    # geoopt's int, or the float32 0-d tensor that torch's load_state_dict
                    # makes of a "step" entry (its float32 powers would drift by ~1e-7)
                    state["step"] = torch.full((1,), float(state["step"]), dtype=count_dtype,
                                               device=point.device)
                count = state["step"]
                count.add_(1)
                point.copy_(manifold.projx(point))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if wd != 0:
                    grad.add_(point, alpha=wd)
                grad = manifold.egrad2rgrad(point, grad)
                if group.get("momentum_restart", False):
                    restart_momentum_(manifold, point, grad, exp_avg)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).add_(manifold.component_inner(point, grad),
                                            alpha=1 - beta2)
                # (in the point's dtype: a float32 count must not promote a bfloat16 step)
                correction1 = (1 - torch.pow(beta1, count)).to(point.dtype)
                correction2 = (1 - torch.pow(beta2, count)).to(point.dtype)
                if amsgrad:
                    max_sq = state["max_exp_avg_sq"]
                    torch.max(max_sq, exp_avg_sq, out=max_sq)
                    denom = (max_sq / correction2).sqrt_()
                else:
                    denom = (exp_avg_sq / correction2).sqrt_()
                direction = (exp_avg / correction1) / denom.add_(eps)
                new_point, new_avg = manifold.retr_transp(point, -lr * direction, exp_avg)
                point.copy_(new_point)
                exp_avg.copy_(new_avg)
                if group["stabilize"] is not None:  # a host sync, never compiled (above)
                    stabilize |= int(count.item()) % group["stabilize"] == 0
            if stabilize:
                self.stabilize_group(group)
        return loss
