"""Helpers shared by the test files (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import torch


def trained_like(model, seed=0):
    """Random routers and task embeddings, so routing is far from uniform (as after training); returns the model
    in eval mode. Zero-initialised routers tie every expert and make routing arbitrary."""
    g = torch.Generator().manual_seed(seed)
    backbone = getattr(model, "moe_vit", model)
    with torch.no_grad():
        for module in backbone.moe_layers().values():
            for r in module.router.routers.values():
                r.weight.copy_(torch.randn(r.weight.shape, generator=g))
        for emb in backbone.task_embeddings.values():
            emb.copy_(0.1 * torch.randn(emb.shape, generator=g))
    return model.eval()


def run_two_processes(cmd: list, timeout: int = 300) -> str:
    """Run a 2-process launch (`torchrun`, `accelerate launch`) from the repository root with one thread per
    process and no Hub access; kill the launcher and its workers on timeout; assert it exited 0; return its output."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: leave no process behind
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    return output
