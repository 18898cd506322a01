"""Run by ``torchrun`` in test_distributed.py (and directly for the single-process reference).

Fits a deterministic regression program (no latent sampling, so the runs are comparable
exactly) and writes the final parameters of this rank to ``OUT/rank{r}.pt``.
"""

import os
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule

from probgen.inference import fit
from probgen.nets import MLP


class Regression(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = MLP(3, 1, (16,))
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def model(self, x):
        self.rows_seen = x.shape[0]
        with pyro.plate("data", x.shape[0]):
            loc = self.net(x[:, :3]).squeeze(-1)
            pyro.sample("y", dist.Normal(loc, self.log_scale.exp()), obs=x[:, 3])

    def guide(self, x):
        pass

    def elbo(self):
        return Trace_ELBO()


def main(out: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 3, generator=g)
    data = torch.cat([inputs, inputs.sin().sum(-1, keepdim=True)], dim=-1)
    torch.manual_seed(0)
    method = Regression()
    fit(method, data, steps=25, batch_size=32, lr=1e-2, progress=False, device="cpu")
    rank = int(os.environ.get("RANK", 0))
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save({"state": state, "world": world, "rows": method.rows_seen}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
