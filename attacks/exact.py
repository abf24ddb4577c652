"""`attack=exact`: a mixed-integer program that decides L-inf robustness of a small ReLU network.

For each sample the network x -> logits is encoded exactly (Tjeng, Xiao & Tedrake, ICLR 2019):
the input ranges over the L-inf ball intersected with the [0, 1] box, every stable neuron is linear
(active) or dropped (inactive), and every unstable neuron gets a binary and the big-M constraints

    a >= z,  a >= 0,  a <= u*d,  a <= z - l*(1 - d),  d in {0, 1}

with l, u its pre-activation bounds from `attacks.relu_bounds` (interval arithmetic tightened by
CROWN). For each other class j the MIP minimises the margin z_y - z_j with the open solver HiGHS
(`highspy`), under one time limit for the whole sample. The outcome per sample is one of

- adversarial: a point with margin <= -tau for some j, which is returned to the harness (which
  re-verifies it in float32 like any other example);
- certified: for every j the margin is proven >= cert_margin, by the CROWN bound alone or by the
  MIP (HiGHS finds no point below the cutoff cert_margin); the flag goes into the records;
- unknown: the time limit ran out first (or only boundary points within tau were found).

Numerics (docs/exact.md): the MIP's point satisfies the constraints only up to HiGHS's tolerances,
so the solver is asked for margin <= -tau rather than < 0 (objective target and cutoff), the point
is clipped to the ball and box and checked in float32 by our own forward pass, and if that check
fails the cutoff is tightened tenfold (twice) and finally a few projected-gradient steps from the
MIP's point are tried; an example that fails all of these is "unknown", never "adversarial".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from harness.core.attack import Attack, AttackResult, register
from attacks.pgd import PGD
from attacks.relu_bounds import Bounds, ReluNet, crown_bounds, extract, input_box
from harness.core.access import Capability, CountingModule, ModelAccess
from harness.core.errors import UserError
from harness.core.threat import ThreatModel

OUTCOMES = ("adversarial", "certified", "unknown")
# HiGHS statuses that mean "no feasible point has an objective below the cutoff (objective_bound)"
NONE_BELOW_CUTOFF = ("Infeasible", "Bound on objective reached")


def _highspy():
    try:
        import highspy
    except ImportError:  # an optional extra: pip install robustarena[exact]
        raise UserError("attack=exact needs the HiGHS solver: pip install highspy (or pip install 'robustarena[exact]')") from None
    return highspy


@dataclass
class MipOutcome:
    """One MIP solve: HiGHS's status name, the point (flattened input) if any, its objective, nodes."""

    status: str
    x: np.ndarray | None
    objective: float
    dual_bound: float
    nodes: int


class MarginMip:
    """The MIP of one sample: built once, re-solved per target class by changing the objective.

    Columns: the input x; per hidden layer, a pre-activation z = W a_prev + b for every neuron that
    is not provably inactive (one equality row, the only row holding W) and, for unstable neurons,
    the post-activation a and the binary d. Keeping W in one row per neuron (not in each big-M row)
    makes the matrix three times sparser than substituting z, which is what keeps the root LP fast.
    """

    def __init__(self, net: ReluNet, bounds: Bounds, x_lo: torch.Tensor, x_up: torch.Tensor, threads: int) -> None:
        import scipy.sparse as sp

        hs = _highspy()
        inf = hs.kHighsInf
        n0 = x_lo.numel()
        col_lo, col_up, integer = [x_lo.numpy()], [x_up.numpy()], [np.zeros(n0, bool)]
        r_all, c_all, v_all, row_lo, row_up = [], [], [], [], []
        n_row = 0
        n_col = n0
        prev_cols = np.arange(n0)  # column holding each kept neuron's output, previous layer
        prev_keep = np.ones(n0, bool)

        def add_rows(r: np.ndarray, c: np.ndarray, v: np.ndarray, lo: np.ndarray, up: np.ndarray) -> None:
            nonlocal n_row
            r_all.append(r + n_row)
            c_all.append(c)
            v_all.append(v)
            row_lo.append(lo)
            row_up.append(up)
            n_row += len(lo)

        for k in range(net.hidden):
            lo, up = bounds.lower[k].numpy(), bounds.upper[k].numpy()
            keep = up > 0  # provably inactive neurons (u <= 0) output 0 and are dropped
            unstable = (lo < 0) & (up > 0)
            idx = np.flatnonzero(keep)
            idx_u = np.flatnonzero(unstable)
            w = sp.csr_matrix(net.weights[k].numpy()[np.ix_(idx, np.flatnonzero(prev_keep))])
            b = net.biases[k].numpy()[idx]
            z_col = n_col + np.arange(len(idx))  # z of the kept neurons
            col_lo.append(lo[idx])
            col_up.append(up[idx])
            integer.append(np.zeros(len(idx), bool))
            n_col += len(idx)
            # z - W a_prev = b
            coo = w.tocoo()
            add_rows(np.concatenate([np.arange(len(idx)), coo.row]), np.concatenate([z_col, prev_cols[coo.col]]),
                     np.concatenate([np.ones(len(idx)), -coo.data]), b, b)
            out_col = np.full(len(lo), -1)
            out_col[idx] = z_col  # active neurons: a = z
            n_u = len(idx_u)
            if n_u:
                pos = np.searchsorted(idx, idx_u)
                zu = z_col[pos]
                a_col = n_col + np.arange(n_u)
                d_col = n_col + n_u + np.arange(n_u)
                col_lo += [np.zeros(n_u), np.zeros(n_u)]
                col_up += [up[idx_u], np.ones(n_u)]
                integer += [np.zeros(n_u, bool), np.ones(n_u, bool)]
                n_col += 2 * n_u
                r = np.arange(n_u)
                lu, uu = lo[idx_u], up[idx_u]
                # a - z >= 0
                add_rows(np.concatenate([r, r]), np.concatenate([a_col, zu]), np.concatenate([np.ones(n_u), -np.ones(n_u)]),
                         np.zeros(n_u), np.full(n_u, inf))
                # a - z - l d <= -l   (a <= z - l (1 - d))
                add_rows(np.concatenate([r, r, r]), np.concatenate([a_col, zu, d_col]),
                         np.concatenate([np.ones(n_u), -np.ones(n_u), -lu]), np.full(n_u, -inf), -lu)
                # a - u d <= 0
                add_rows(np.concatenate([r, r]), np.concatenate([a_col, d_col]), np.concatenate([np.ones(n_u), -uu]),
                         np.full(n_u, -inf), np.zeros(n_u))
                out_col[idx_u] = a_col
            prev_cols = out_col[idx]
            prev_keep = keep
        mat = sp.csc_matrix((np.concatenate(v_all), (np.concatenate(r_all), np.concatenate(c_all))), shape=(n_row, n_col))
        lp = hs.HighsLp()
        lp.num_col_, lp.num_row_ = n_col, n_row
        lp.col_cost_ = np.zeros(n_col)
        lp.col_lower_ = np.concatenate(col_lo)
        lp.col_upper_ = np.concatenate(col_up)
        lp.row_lower_ = np.concatenate(row_lo)
        lp.row_upper_ = np.concatenate(row_up)
        lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
        lp.a_matrix_.start_ = mat.indptr
        lp.a_matrix_.index_ = mat.indices
        lp.a_matrix_.value_ = mat.data
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n_col, n_row
        kinds = np.concatenate(integer)
        lp.integrality_ = [hs.HighsVarType.kInteger if flag else hs.HighsVarType.kContinuous for flag in kinds]
        self.h = hs.Highs()
        self.h.setOptionValue("output_flag", False)
        self.h.setOptionValue("threads", int(threads))
        self.h.setOptionValue("mip_rel_gap", 0.0)
        self.h.passModel(lp)
        self.n_input = n0
        self.n_col = n_col
        self.n_binary = int(kinds.sum())
        self.last_cols = prev_cols  # columns of the last hidden layer's kept neurons' outputs
        self.last_keep = torch.from_numpy(prev_keep)
        self.net = net

    def minimize_margin(self, label: int, target: int, cutoff: float, stop_at: float, time_limit: float) -> MipOutcome:
        """min z_label - z_target; only points below `cutoff` count, stop at the first <= `stop_at`."""
        w, b = self.net.weights[-1], self.net.biases[-1]
        coef = (w[label] - w[target])[self.last_keep].numpy()
        cost = np.zeros(self.n_col)
        cost[self.last_cols] = coef
        h = self.h
        h.clearSolver()
        h.changeColsCost(self.n_col, np.arange(self.n_col, dtype=np.int32), cost)
        h.changeObjectiveOffset(float(b[label] - b[target]))
        h.setOptionValue("objective_bound", float(cutoff))
        h.setOptionValue("objective_target", float(stop_at))
        h.setOptionValue("time_limit", max(float(time_limit), 0.01))
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        has_point = info.primal_solution_status == 2  # kSolutionStatusFeasible
        x = np.asarray(h.getSolution().col_value[: self.n_input]) if has_point else None
        return MipOutcome(status, x, float(info.objective_function_value) if has_point else math.inf,
                          float(info.mip_dual_bound), int(info.mip_node_count))


@register("exact")
@dataclass
class Exact(Attack):
    """Exact L-inf robustness of a small ReLU network by a MIP (HiGHS); see the module docstring.

    Args:
        time_limit: seconds per sample, shared by its target classes (then "unknown").
        tau: the MIP looks for points with margin <= -tau (logit units), inside the boundary.
        cert_margin: a target class is certified when its margin is proven >= cert_margin.
        polish_steps: projected-gradient steps from a MIP point that fails the float32 check.
        threads: HiGHS threads.
        pgd_steps: a margin-loss PGD pre-screen on the batch (0: none); samples it breaks are
            returned at once (stage "pgd"), the MIP decides the rest.
    """

    requires: ClassVar[Capability] = Capability.GRADIENTS

    time_limit: float = 60.0
    tau: float = 1e-3
    cert_margin: float = 1e-4
    polish_steps: int = 20
    threads: int = 1
    pgd_steps: int = 20

    def validate(self) -> None:
        if not self.time_limit > 0:
            raise UserError(f"exact time_limit={self.time_limit!r} must be > 0 seconds per sample")
        if not self.tau > 0 or not self.cert_margin >= 0:
            raise UserError(f"exact needs tau > 0 and cert_margin >= 0; got tau={self.tau!r}, cert_margin={self.cert_margin!r}")
        if self.polish_steps < 0 or self.threads < 1:
            raise UserError(f"exact polish_steps={self.polish_steps!r} must be >= 0 and threads={self.threads!r} >= 1")
        if self.pgd_steps < 0:
            raise UserError(f"exact pgd_steps={self.pgd_steps!r} must be >= 0 (0: no PGD pre-screen)")
        self._net: tuple[int, ReluNet] | None = None

    def _network(self, access: ModelAccess, shape: tuple[int, ...]) -> ReluNet:
        module = access.model.module if isinstance(access.model, CountingModule) else access.model
        key = hash((id(module), tuple(float(p.detach().double().sum()) for p in module.parameters())))
        if self._net is None or self._net[0] != key:
            self._net = (key, extract(module, shape))
        return self._net[1]

    def run(self, access: ModelAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        _highspy()
        if threat.norm != "Linf":
            raise UserError(f"attack=exact encodes the L-inf ball; threat.norm={threat.norm!r} is not supported (use threat=linf)")
        if access.randomized:
            raise UserError("attack=exact decides deterministic ReLU networks; this defense is randomised")
        net = self._network(access, tuple(x.shape[1:]))
        with torch.no_grad():
            logits = access.model(x).double().cpu()
        gap = (net.forward(x.cpu()) - logits).abs().max()
        if gap > 1e-3 * (1 + logits.abs().max()):  # the extracted chain must be the model
            raise RuntimeError(f"exact: the extracted network differs from the model by {float(gap):.3g}")
        x_adv = x.detach().clone()
        screened = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.pgd_steps:  # cheap: most non-robust samples fall here, the MIP takes the rest
            pre = PGD(steps=self.pgd_steps, loss="margin", restarts=1).run(access, x, y, threat, generator)
            with torch.no_grad():
                screened = (access.model(pre.x_adv).argmax(1) != y) & ~threat.violations(pre.x_adv, x)
            x_adv[screened] = pre.x_adv[screened].detach()
        screened_list = screened.tolist()
        certified = torch.zeros(x.shape[0], dtype=torch.bool)
        stage, outcome, times, nodes, unstable = [], [], [], [], []
        for i in range(x.shape[0]):
            start = time.perf_counter()
            if screened_list[i]:
                outcome.append("adversarial")
                stage.append("pgd")
                times.append(0.0)
                nodes.append(0)
                unstable.append(-1)
                continue
            verdict, point, st, n_nodes, n_unst = self._sample(access, net, x[i], int(y[i]), logits[i], threat, start)
            times.append(time.perf_counter() - start)
            outcome.append(verdict)
            nodes.append(n_nodes)
            unstable.append(n_unst)
            stage.append(st)
            if verdict == "adversarial":
                x_adv[i] = point
            certified[i] = verdict == "certified"
        extras = {"outcomes": {k: outcome.count(k) for k in OUTCOMES}, "time_s": times, "mip_nodes": nodes,
                  "unstable_neurons": unstable, "outcome": outcome}
        return AttackResult(x_adv=x_adv, stage=stage, extras=extras, certified=certified.to(x.device))

    # ------------------------------------------------------------------------------ one sample
    def _sample(self, access: ModelAccess, net: ReluNet, x: torch.Tensor, label: int, logits: torch.Tensor,
                threat: ThreatModel, start: float) -> tuple[str, torch.Tensor | None, str, int, int]:
        """(outcome, adversarial point or None, stage, MIP nodes, unstable neurons) for one sample."""
        bounds = crown_bounds(net, x.cpu(), threat.eps, label)
        n_unstable = bounds.unstable()
        open_targets = [j for j in torch.argsort(logits, descending=True).tolist()
                        if j != label and float(bounds.margin_lower[j]) < self.cert_margin]
        if not open_targets:
            return "certified", None, "", 0, n_unstable
        x_lo, x_up = input_box(x.cpu(), threat.eps)
        mip = MarginMip(net, bounds, x_lo, x_up, self.threads)
        total_nodes, undecided = 0, False
        for j in open_targets:
            cutoff, stop_at = self.cert_margin, -self.tau
            for attempt in range(3):  # the cutoff tightens tenfold when a point fails the float32 check
                left = self.time_limit - (time.perf_counter() - start)
                if left <= 0:
                    return "unknown", None, "", total_nodes, n_unstable
                res = mip.minimize_margin(label, j, cutoff, stop_at, left)
                total_nodes += res.nodes
                # proved: no point has margin < cutoff (the search was pruned at the cutoff; an
                # "Optimal" incumbent above the cutoff is not the optimum, only a heuristic's point)
                none_below = ((res.status in NONE_BELOW_CUTOFF and res.x is None)
                              or (res.status == "Optimal" and res.objective >= cutoff))
                if none_below:
                    if attempt == 0:
                        break  # cutoff = cert_margin: target j certified
                    undecided = True  # points in (cutoff, -tau] exist but failed the float32 check
                    break
                if res.x is None:  # time limit without a point
                    return "unknown", None, "", total_nodes, n_unstable
                point = self._verified(access, x, label, res.x, threat)
                if point is not None:
                    return "adversarial", point, "mip", total_nodes, n_unstable
                if attempt == 2 or res.objective > -self.tau:
                    polished = self._polish(access, x, label, j, res.x, threat)
                    if polished is not None:
                        return "adversarial", polished, "mip+polish", total_nodes, n_unstable
                    if res.objective > -self.tau:  # optimum within tau of the boundary
                        undecided = True
                        break
                cutoff = stop_at = -self.tau * 10 ** (attempt + 1)
            else:
                undecided = True
        return ("unknown" if undecided else "certified"), None, "", total_nodes, n_unstable

    def _as_image(self, x: torch.Tensor, flat: np.ndarray, threat: ThreatModel) -> torch.Tensor:
        cand = torch.from_numpy(np.asarray(flat)).to(x.device, torch.float32).view_as(x)
        return threat.project(cand.unsqueeze(0), x.unsqueeze(0))[0]

    @torch.no_grad()
    def _verified(self, access: ModelAccess, x: torch.Tensor, label: int, flat: np.ndarray,
                  threat: ThreatModel) -> torch.Tensor | None:
        """The MIP point in float32, inside the ball and box, if our forward pass misclassifies it."""
        cand = self._as_image(x, flat, threat)
        pred = int(access.model(cand.unsqueeze(0)).argmax(1))
        return cand if pred != label else None

    def _polish(self, access: ModelAccess, x: torch.Tensor, label: int, target: int, flat: np.ndarray,
                threat: ThreatModel) -> torch.Tensor | None:
        """A few signed-gradient steps on z_target - z_label from the MIP point, projected."""
        cur = self._as_image(x, flat, threat).unsqueeze(0)
        x0 = x.unsqueeze(0)
        step = threat.eps / 50
        for _ in range(self.polish_steps):
            cur = cur.detach().requires_grad_(True)
            z = access.model(cur)
            if int(z.argmax(1)) != label:
                return cur.detach()[0]
            (grad,) = torch.autograd.grad(z[0, target] - z[0, label], cur)
            cur = threat.project(cur.detach() + step * grad.sign(), x0)
        with torch.no_grad():
            return cur[0] if int(access.model(cur).argmax(1)) != label else None
