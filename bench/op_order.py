"""Print the order of Inductor's extern calls and Triton kernels for a FLUX transformer at real width on CUDA.

Compiles 3 double + 3 single blocks (whole model, the ``flux`` preset with no dense first layers) with
``mlp.early_selection`` off and on, checks that the two orders differ only by the ``mlp_select`` calls, and prints
where those land. Session 10's output: ``results/op_order_flux_NVIDIA-H100_session10.txt``. A chipmunk op shows
more than once per call (the call, then the size check that names it).
"""

from __future__ import annotations

import difflib
import re

import torch


def kernel_order(early: bool) -> list[str]:
    from diffusers import FluxTransformer2DModel
    from torch._inductor.utils import run_and_get_code

    import chipmunk_compile  # noqa: F401  (registers the backend)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=3, num_single_layers=3).eval().cuda().bfloat16()
    options = {"preset": "flux", "mlp.early_selection": early, "mlp.first_dense_layers": 0,
               "attention.first_dense_layers": 0}
    compiled = torch.compile(model, backend="chipmunk", options=options)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 3840, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
                  pooled_projections=torch.randn(1, 768, generator=g), img_ids=torch.randn(3840, 3, generator=g),
                  txt_ids=torch.randn(512, 3, generator=g))
    inputs = {k: v.cuda().bfloat16() for k, v in inputs.items()}
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, **inputs, timestep=torch.tensor([0.9]).cuda().bfloat16(),
                                    return_dict=False)
    call = codes[-1][codes[-1].index("def call("):]
    seq = re.findall(r"(extern_kernels\.\w+\(|torch\.ops\.chipmunk\.\w+|triton_\w+\.run\()", call)
    short = (s.replace("extern_kernels.", "").replace("torch.ops.chipmunk.", "CM.") for s in seq)
    return [re.sub(r"_\d+\.run\($", "", s) for s in short]


def main() -> None:
    off, on = kernel_order(False), kernel_order(True)
    print(False, len(off))
    print(True, len(on))
    without = [x for x in on if x != "CM.mlp_select"]
    print("same apart from mlp_select:", off == without)
    for line in difflib.unified_diff(off, without, lineterm="", n=3):
        print(line[:110])
    for k, name in enumerate(on):
        if name == "CM.mlp_select" and on[k - 1] != "CM.mlp_select":
            print("around select:", on[k - 2 : k + 12])


if __name__ == "__main__":
    main()
