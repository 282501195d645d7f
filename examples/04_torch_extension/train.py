"""Example 04: mpopt as a PyTorch optimizer on the GPU, trained side by side with torch.optim.AdamW.

Two copies of one small MLP start from the same weights and see the same batches: one steps with
torch.optim.AdamW, the other with mpopt's AdamW (mpopt_torch.cu, compiled here on first use with
torch.utils.cpp_extension). Both losses are printed; in fp32 they agree to rounding.

    python3 train.py            # fp32 params
    python3 train.py --bf16     # bf16 params and grads, fp32 master inside mpopt (torch side stays fp32)

Prints "SKIPPED: ..." and exits 0 when PyTorch or a CUDA device is missing.
"""
import os
import sys

try:
    import torch
except ImportError:
    print("SKIPPED: example 04 needs PyTorch (import torch failed)")
    sys.exit(0)
if not torch.cuda.is_available():
    print("SKIPPED: example 04 needs a CUDA device (torch.cuda.is_available() is False)")
    sys.exit(0)

from torch.utils.cpp_extension import load

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
    ext = load(name="mpopt_torch", sources=[os.path.join(HERE, "mpopt_torch.cu")],
               extra_include_paths=[MPOPT_INCLUDE], extra_cflags=["-std=c++17"],
               extra_cuda_cflags=["-std=c++17"], verbose=False)

    torch.manual_seed(0)
    dev = torch.device("cuda")
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
    ok = applied and rel < tol
    print(f"{'PASS' if ok else 'FAIL'}: final loss torch {final_ref:.6f}, mpopt {final:.6f} "
          f"(relative difference {rel:.2e}, tolerance {tol:g}; last grad norm {norm:.4f})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
