"""Pipeline model parallelism: a sequential model split into contiguous stages over the
``pipe`` axis, micro-batches run by a schedule's action lists with non-blocking MPI
point-to-point transfers of activations and gradients.

Collective on the pipe communicator (``step``); construction is not.
"""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mltrain.comm import broadcast_, irecv, isend
from mltrain.comm.ownership import gather_params, gather_state
from mltrain.comm.waiting import probe
from mltrain.config import ConfigError
from mltrain.nn import is_residual
from mltrain.pipeline.schedules import build_schedule

__all__ = ["Pipeline", "sequential_layers", "residual_span", "default_balance"]


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a list of layers whose composition is its forward: an
    ``nn.Sequential`` (or a model whose ``net`` is one), or a residual network with the
    residual-block protocol (opening, blocks, closing). Raises ConfigError otherwise."""
    if isinstance(model, nn.Sequential):
        return list(model)
    if isinstance(getattr(model, "net", None), nn.Sequential):
        return list(model.net)
    if is_residual(model):
        return [model.opening, *model.blocks, model.closing]
    raise ConfigError(f"parallel.pipe: {type(model).__name__} is not sequential (an "
                      "nn.Sequential, a model with a Sequential .net, or a residual network "
                      "with opening, blocks and closing)")


def residual_span(model: nn.Module) -> tuple[int, int] | None:
    """Where a residual network's blocks sit in ``sequential_layers(model)``: (1, 1 + the
    number of blocks), after the opening; None for other models."""
    if is_residual(model):
        return 1, 1 + len(model.blocks)
    return None


def default_balance(n: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible (the first stages take the remainder)."""
    return [n // stages + (s < n % stages) for s in range(stages)]


def _tag(kind: str, mb: int) -> int:
    return 1000 + 4 * mb + {"ACT": 0, "GRAD": 1, "ACT_META": 2}[kind]


class Pipeline:
    """Stage ``comm.rank`` of ``layers`` (``balance``: layers per stage, default even),
    trained on ``microbatches`` micro-batches per step with ``schedule`` ("gpipe" or
    "1f1b"); ``loss_fn(output, target)`` is a mean over its batch."""

    def __init__(self, layers: list[nn.Module], comm: MPI.Comm, *, microbatches: int,
                 schedule: str = "1f1b", balance: list[int] | None = None, loss_fn=None):
        S = comm.Get_size()
        self.comm, self.S, self.s = comm, S, comm.Get_rank()
        n = len(layers)
        if n < S:
            raise ConfigError(f"parallel.pipe: {S} stages for a model of {n} layers")
        balance = list(balance) if balance else default_balance(n, S)
        if len(balance) != S or sum(balance) != n or min(balance) < 1:
            raise ConfigError(f"pipeline.balance: {balance} must give each of the {S} stages "
                              f"at least one layer and sum to the {n} layers")
        self.balance = balance
        lo = sum(balance[:self.s])
        self.stage = nn.Sequential(*layers[lo:lo + balance[self.s]])
        self.M = microbatches
        self.schedule_name = schedule
        self.actions = build_schedule(schedule, S, microbatches)[self.s]
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.amp_dtype: torch.dtype | None = None  # run.amp: the stage's forward under autocast

    @property
    def first(self) -> bool:
        return self.s == 0

    @property
    def last(self) -> bool:
        return self.s == self.S - 1

    def parameters(self):
        return self.stage.parameters()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of the batch (x, y) in micro-batches; gradients accumulate
        in this stage's parameters as for the whole batch's mean loss. Returns that loss
        (on every stage). Every stage passes the same batch; only the first reads x and
        only the last y. Collective on the pipe axis."""
        B = len(x)
        if B < self.M:
            raise ConfigError(f"pipeline.microbatches: {self.M} micro-batches of a batch of {B}")
        xs, ys = torch.tensor_split(x, self.M), torch.tensor_split(y, self.M)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        pending: list = []  # handles of sends in flight (isend/irecv stage device tensors)
        comm = self.comm
        # Received activations live where this stage computes: with its parameters, or
        # (a stage without any) with the batch, which the trainer put on the device.
        device = next(iter(self.parameters()), x).device
        for a in self.actions:
            m = a.mb
            if a.kind == "F":
                inp = xs[m] if self.first else inputs[m]
                # Forward and loss only: backward keeps the types forward chose.
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    out = self.stage(inp)
                    if self.last:  # the batch mean as a sum of weighted micro-batch means
                        losses[m] = self.loss_fn(out, ys[m]) * (len(ys[m]) / B)
                outputs[m] = out
            elif a.kind == "SEND_ACT":
                t = outputs[m].detach().contiguous()
                comm.send((tuple(t.shape), str(t.dtype).split(".")[1]), dest=a.peer,
                          tag=_tag("ACT_META", m))
                pending.append(isend(t, a.peer, comm, _tag("ACT", m)))
            elif a.kind == "RECV_ACT":
                probe(comm, a.peer, _tag("ACT_META", m))
                shape, dtype = comm.recv(source=a.peer, tag=_tag("ACT_META", m))
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                irecv(buf, a.peer, comm, _tag("ACT", m)).wait()
                inputs[m] = buf.requires_grad_(True)
            elif a.kind == "B":
                if self.last:
                    losses[m].backward()
                else:
                    outputs[m].backward(grads.pop(m))
                outputs.pop(m)
            elif a.kind == "SEND_GRAD":
                g = inputs.pop(m).grad.contiguous()
                pending.append(isend(g, a.peer, comm, _tag("GRAD", m)))
            elif a.kind == "RECV_GRAD":
                buf = torch.empty_like(outputs[m])
                irecv(buf, a.peer, comm, _tag("GRAD", m)).wait()
                grads[m] = buf
        for h in pending:
            h.wait()
        loss = torch.tensor([float(sum(v.detach() for v in losses.values())) if self.last
                             else 0.0], dtype=torch.float64)  # host: one float, returned as such
        broadcast_(loss, comm, root=self.S - 1)
        return float(loss[0])

    def groups(self, layers: list[nn.Module]) -> list[list[nn.Parameter]]:
        """The parameters of each stage (``layers``: the whole model's list)."""
        out, lo = [], 0
        for k in self.balance:
            out.append([p for layer in layers[lo:lo + k] for p in layer.parameters()])
            lo += k
        return out

    def gather(self, layers: list[nn.Module]) -> None:
        """Brings every stage's parameters to every rank of the pipe axis (into
        ``layers``), one broadcast per stage. Collective on the pipe axis."""
        gather_params(self.groups(layers), self.comm)

    def gather_state(self, optimizer: torch.optim.Optimizer, layers: list[nn.Module]) -> None:
        """Brings every stage's optimizer state to every rank of the pipe axis. Collective on
        the pipe axis."""
        gather_state(optimizer, self.groups(layers), self.comm)
