"""Run by ``torchrun`` in test_distributed.py (and directly for the single-process reference).

``ddp_worker.py OUT``: fits a deterministic regression program (no latent sampling, so the runs are
comparable exactly) and writes the final parameters of this rank to ``OUT/rank{r}.pt``.

``ddp_worker.py OUT methods``: joins the process group itself, then fits a VAE, a GAN and a
consistency model by distillation (three objectives: one ELBO player, two adversarial players, a
target network) with run directories ``OUT/<name>``, and again interrupted by SIGINT on every rank
after step 3 and resumed (``OUT/<name>-split``); writes this rank's final parameters of both to
``OUT/<name>-rank{r}.pt``.
"""

import os
import signal
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


def methods(out: str) -> None:
    from probgen.models import GAN, VAE, Consistency, ScoreSDE

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    sde, net = dict(sde="ve", sigma_min=0.01, sigma_max=4.0), dict(hidden=(16,), embed_dim=8)
    torch.manual_seed(0)
    teacher = ScoreSDE(2, **sde, **net)
    builders = {
        "vae": lambda: VAE(2, latent_dim=2, hidden=(16,), likelihood="gaussian"),
        "gan": lambda: GAN(2, latent_dim=2, generator_hidden=(16,), discriminator_hidden=(16,), d_steps=2),
        "cd": lambda: Consistency(2, **sde, **net, sigma_data=1.0, num_scales=8),
    }

    def run(name, run_dir, **kw):
        torch.manual_seed(0)
        method = builders[name]()
        objective = method.objective(teacher=teacher) if name == "cd" else None
        fit(method, data, objective=objective, steps=6, batch_size=32, val_data=data[:64], val_every=3,
            checkpoint_every=2, run_dir=run_dir, progress=False, device="cpu", **kw)  # fmt: skip
        return {k: v.detach().clone() for k, v in method.state_dict().items()}

    def interrupt(step, loss):  # Ctrl-C on every rank (as torchrun forwards it) after step 3
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    for name in builders:
        state = run(name, f"{out}/{name}")
        try:
            run(name, f"{out}/{name}-split", callback=interrupt)
            stopped_at = None
        except KeyboardInterrupt:
            from probgen.checkpoint import load_checkpoint

            stopped_at = load_checkpoint(f"{out}/{name}-split", "last")[1]["metadata"]["step"]
        resumed = run(name, f"{out}/{name}-split", resume=True)
        torch.save(
            {"state": state, "resumed": resumed, "stopped_at": stopped_at}, f"{out}/{name}-rank{rank}.pt"
        )
    torch.distributed.destroy_process_group()


def main(out: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 3, generator=g)
    data = torch.cat([inputs, inputs.sin().sum(-1, keepdim=True)], dim=-1)
    torch.manual_seed(0)
    method = Regression()
    seen = {}

    def record(step, loss):
        seen["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    fit(method, data, steps=25, batch_size=32, lr=1e-2, progress=False, device="cpu", callback=record)
    rank = int(os.environ.get("RANK", 0))
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    world = seen["world"]
    torch.save({"state": state, "world": world, "rows": method.rows_seen}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["methods"]:
        methods(sys.argv[1])
    else:
        main(sys.argv[1])
