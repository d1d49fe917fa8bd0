"""Curvature-vector products of a model's loss on one batch, on flat parameter vectors.

``Curvature(model, loss_fn, x, y, kind)`` holds one batch; ``.grad()`` returns the flat
gradient and ``.mv(v)`` the product of ``v`` with the Hessian (``"hessian"``: double
backward) or the generalised Gauss-Newton matrix (``"ggn"``: J^T H_loss J, with the
softmax cross-entropy Hessian H_loss = (diag(p) - p p^T) / batch, positive semi-definite).
Pure torch; products are local to the rank. Averaging over the data axis is the caller's
job (one allreduce per product). Not collective.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vjp


__all__ = ["Curvature", "CURVATURES"]

CURVATURES = ("hessian", "ggn", "lsr1")  # lsr1: gradients here, products from linalg.lsr1


class Curvature:
    def __init__(self, model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                 kind: str = "hessian", params: list | None = None, penalty=None):
        """``params``: the parameters to differentiate (default: all of the model's);
        a subset works for gradients (``loss_and_grad``) only. ``penalty(model)``: a term
        of the parameters alone added to the loss (``mltrain.nn.depth_penalty``), in every
        product too; when it returns None, or is None, nothing is added."""
        if kind not in CURVATURES:
            raise ValueError(f"tr.curvature: {kind!r} is not one of {CURVATURES}")
        self.model, self.loss_fn, self.x, self.y, self.kind = model, loss_fn, x, y, kind
        self.penalty = penalty
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = ([p for p in model.parameters() if p.requires_grad] if params is None
                       else list(params))
        self.shapes = [p.shape for p in self.params]
        self.numel = sum(p.numel() for p in self.params)
        self._loss = None
        self._grads = None
        self._pullback = self._probs = None  # Gauss-Newton: J^T and softmax at the point
        self.products = 0

    def _split(self, v: torch.Tensor):
        out, off = [], 0
        for s in self.shapes:
            n = s.numel()
            out.append(v[off:off + n].view(s))
            off += n
        return out

    def loss_and_grad(self) -> tuple[float, torch.Tensor]:
        """Loss value and flat gradient at the current parameters (kept for ``mv``)."""
        loss = self.loss_fn(self.model(self.x), self.y)
        term = self.penalty(self.model) if self.penalty is not None else None
        if term is not None:
            loss = loss + term
        grads = torch.autograd.grad(loss, self.params, create_graph=self.kind == "hessian")
        self._loss, self._grads = loss, grads
        return float(loss.detach()), torch.cat([g.detach().reshape(-1) for g in grads])

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """Curvature times the flat vector ``v`` (at the point of ``loss_and_grad``)."""
        self.products += 1
        if self.kind == "lsr1":
            raise RuntimeError("Curvature('lsr1') has no products; use linalg.lsr1.LSR1")
        if self.kind == "hessian":
            if self._grads is None:
                self.loss_and_grad()
            dot = sum((g * vi).sum() for g, vi in zip(self._grads, self._split(v)))
            hv = torch.autograd.grad(dot, self.params, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv])
        hv = self._ggn_mv(v)
        extra = self._penalty_mv(v)
        return hv if extra is None else hv + extra

    def _penalty_mv(self, v: torch.Tensor) -> torch.Tensor | None:
        """The depth penalty's Hessian times ``v``: exact, the penalty being quadratic (the
        Gauss-Newton product covers the data term only); None without a penalty term."""
        with torch.enable_grad():
            term = None if self.penalty is None else self.penalty(self.model)
            if term is None:
                return None
            g = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
            used = [(gi, vi, p) for gi, vi, p in zip(g, self._split(v), self.params)
                    if gi is not None]
            dot = sum((gi * vi).sum() for gi, vi, _ in used)
            hv = dict(zip((id(p) for *_, p in used),
                          torch.autograd.grad(dot, [p for *_, p in used])))
        return torch.cat([hv.get(id(p), torch.zeros_like(p)).reshape(-1)
                          for p in self.params])

    def _ggn_mv(self, v: torch.Tensor) -> torch.Tensor:
        params = {n: p.detach() for n, p in zip(self.names, self.params)}

        def logits_of(flat_ps):
            return functional_call(self.model, dict(zip(self.names, flat_ps)), (self.x,))

        primals = tuple(params[n] for n in self.names)
        logits, jv = jvp(logits_of, (primals,), (tuple(self._split(v)),))
        if self._pullback is None:  # J^T at this point, traced once for every product
            p = torch.softmax(logits.detach(), dim=-1)
            _, self._pullback = vjp(logits_of, primals)
            self._probs = p
        p = self._probs
        hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / logits.shape[0]
        (jt,) = self._pullback(hjv)
        return torch.cat([t.reshape(-1) for t in jt])
