"""Example 04: mpopt as a PyTorch optimizer, trained side by side with torch.optim.AdamW.

Two copies of one small MLP start from the same weights and see the same batches: one steps with
torch.optim.AdamW, the other with mpopt's AdamW, compiled here on first use with torch.utils.cpp_extension:
mpopt_torch.cu (mpopt::cuda::optimizer) on a CUDA device, else mpopt_torch.cpp (the host optimizer) on the CPU.
Both losses are printed. In fp32 on the CPU the two runs are bit for bit the same (mpopt's AdamW rounds as
torch's does); on the GPU they agree to rounding.

    python3 train.py                 # fp32 params, on the GPU when there is one
    python3 train.py --bf16          # bf16 params and grads, fp32 master inside mpopt (torch side stays fp32)
    python3 train.py --device cpu    # force the CPU build

Prints "SKIPPED: ..." and exits 0 when PyTorch, or its C++ headers, are missing.
"""
import os
import sys

try:
    import torch
except ImportError:
    print("SKIPPED: example 04 needs PyTorch (import torch failed)")
    sys.exit(0)
from torch.utils.cpp_extension import include_paths, load

if not os.path.isfile(os.path.join(include_paths()[0], "torch", "extension.h")):
    print("SKIPPED: example 04 needs PyTorch's C++ headers (torch/extension.h; Debian: libtorch-dev)")
    sys.exit(0)

HERE = os.path.dirname(os.path.abspath(__file__))
MPOPT_INCLUDE = os.environ.get("MPOPT_INCLUDE_DIR", os.path.join(HERE, "..", "..", "include"))


def flatten_(model, dtype):
    """Moves the model's params into one flat tensor and gives them .grad views into one flat grad tensor.

    Autograd accumulates into an existing .grad in place, so after backward() the flat grad holds every grad.
    """
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params]).to(dtype).contiguous()
    grad = torch.zeros_like(flat)
    offset = 0
    for p, n in zip(params, sizes):
        p.data = flat[offset:offset + n].view_as(p)
        p.grad = grad[offset:offset + n].view_as(p)
        offset += n
    return flat, grad, sizes


def main():
    bf16 = "--bf16" in sys.argv
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        sys.exit(f"--device must be cpu or cuda, got {device!r}")
    # -ffp-contract=off: mpopt's host arithmetic is torch's only without fused multiply-adds.
    flags = ["-std=c++17", "-O2", "-fopenmp", "-ffp-contract=off"]
    if device == "cuda":
        ext = load(name="mpopt_torch_cuda", sources=[os.path.join(HERE, "mpopt_torch.cu")],
                   extra_include_paths=[MPOPT_INCLUDE, HERE], extra_cflags=flags,
                   extra_cuda_cflags=["-std=c++17", "-Xcompiler=-fopenmp", "-Xcompiler=-ffp-contract=off"],
                   extra_ldflags=["-fopenmp"], verbose=False)
    else:
        ext = load(name="mpopt_torch_cpu", sources=[os.path.join(HERE, "mpopt_torch.cpp")],
                   extra_include_paths=[MPOPT_INCLUDE, HERE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   verbose=False)

    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(1024, 16, device=dev)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dev)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(1024, 4, device=dev)

    def make_model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dev)

    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **hp)

    dtype = torch.bfloat16 if bf16 else torch.float32
    model = make_model().to(dtype)
    flat, grad, sizes = flatten_(model, dtype)
    opt = ext.AdamW(flat, grad, sizes, lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                    weight_decay=hp["weight_decay"], max_grad_norm=0.0)

    print(f"device {device}, torch {torch.__version__}")
    print(f"{'step':>5}  {'torch.optim.AdamW':>18}  {'mpopt AdamW (' + ('bf16' if bf16 else 'fp32') + ')':>20}")
    for step in range(301):
        ref_opt.zero_grad()
        ref_loss = torch.nn.functional.mse_loss(ref(x), y)
        ref_loss.backward()
        ref_opt.step()

        grad.zero_()  # not model.zero_grad(): that would drop the .grad views
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"{step:5d}  {ref_loss.item():18.6f}  {loss.item():20.6f}")

    applied, norm = opt.last_result()
    final_ref, final = ref_loss.item(), loss.item()
    tol = 5e-2 if bf16 else 1e-3
    rel = abs(final - final_ref) / final_ref
    with torch.no_grad():
        # largest difference relative to the largest weight of the same tensor
        weight_diff = max(((p.float() - q).abs().max() / q.abs().max()).item()
                          for p, q in zip(model.parameters(), ref.parameters()))
    # fp32: the same AdamW formula; torch's vectorised kernels fuse some multiply-adds that mpopt rounds twice, so
    # the weights drift apart by a few ulps over the run. bf16: forward and backward in bf16 take another path
    # through weight space (small weights differ by 10 % after 300 steps), so only the loss is compared.
    weight_tol = float("inf") if bf16 else 1e-5
    ok = applied and rel < tol and weight_diff < weight_tol
    print(f"{'PASS' if ok else 'FAIL'}: final loss torch {final_ref:.6f}, mpopt {final:.6f} "
          f"(relative difference {rel:.2e}, tolerance {tol:g}); largest relative weight difference {weight_diff:.3g} "
          f"(tolerance {weight_tol:g}); last grad norm {norm:.4f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
