"""``python -m bench.equivalence [--device cuda] [--pin-memory]``: the server on a device equals local PyTorch on it.

Three training steps (Forward, the tutorial's loss, Backward, SGD Step) through a benchmark server
on ``--device`` (with ``--pin-memory``: the server's pinned host buffers and non-blocking copies,
CUDA only) and in local PyTorch on the same device with the same weights and inputs; the logits,
losses, every gradient and every parameter afterwards must agree within the stated tolerance. Then
sessions that choose their own fast path on that server (CreateSession's autocast bf16 and fp16,
memory_format channels_last) against local PyTorch on the same fast path; and, in local PyTorch,
bf16 autocast and channels_last against fp32 (what the fast paths cost in accuracy); then issue 21's
uint8 images and shared-memory region. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bench.launch import start_server
from bench.steps import LocalStep, RemoteStep
from remote_trainer.client import TrainerClient

# Server and local run the same kernels, but in two processes: cuDNN may pick other algorithms
# (and reduce in another order), so the tolerance is relative to each tensor's largest magnitude.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}
# Options against fp32, as relative L2 error ||a - b|| / ||b||: bf16 keeps 8 bits of mantissa,
# about 2-3 significant digits after 18 layers; channels_last only reorders the same arithmetic.
BF16_TOLERANCE = 5e-2
CHANNELS_LAST_TOLERANCE = 1e-4
# A session's fast path against local PyTorch on the same one, relative to each tensor's largest
# magnitude: on the CPU the same kernels (as the fp32 check); on CUDA another process may pick other
# cuDNN algorithms, which round differently by a few units in the last place of the autocast type
# (bf16 keeps 8 bits of mantissa, 3.9e-3; fp16 11 bits, 4.9e-4; fp32 as TOLERANCE).
FAST_PATH_TOLERANCE = {"cpu": {"bf16": 1e-5, "fp16": 1e-5, "off": 1e-5},
                       "cuda": {"bf16": 2e-2, "fp16": 5e-3, "off": 1e-3}}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(1e-12, float(np.linalg.norm(b))))


def server_vs_local(device: str, steps: int, shape: tuple[int, int, int, int], pin_memory: bool = False) -> bool:
    dev = torch.device(device)
    tol = TOLERANCE[dev.type]
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    labels = rng.random((shape[0], 1000), dtype=np.float32)
    local = LocalStep("full", dev)
    ok = True
    print(f"server on {device}{' with pinned host buffers (--pin-memory 1)' if pin_memory else ''}")
    with start_server(device, 4, pin_memory=pin_memory) as server, TrainerClient(server.target, timeout=600) as client:
        with client.create_session("random", seed=0) as session:
            remote = RemoteStep(session, "full")
            for i in range(steps):
                remote(x, labels)
                local(torch.from_numpy(x), torch.from_numpy(labels))
                assert remote.logits is not None and local.logits is not None
                worst = relative(remote.logits, local.logits.cpu().numpy())
                print(f"step {i + 1}: logits differ by {worst:.2e} (tolerance {tol:.0e})")
                ok &= worst <= tol
            session.forward(x)
            session.backward("sum", labels)
            prediction = local.model(torch.from_numpy(x).to(dev))
            (prediction - torch.from_numpy(labels).to(dev)).sum().backward()
            grads = session.gradients()
            params = session.parameters()
            for name, p in local.model.named_parameters():
                assert p.grad is not None
                g, v = grads[name].array, params[name].array
                assert g is not None and v is not None
                dg, dv = relative(g, p.grad.cpu().numpy()), relative(v, p.detach().cpu().numpy())
                if dg > tol or dv > tol:
                    print(f"{name}: gradient differs by {dg:.2e}, value by {dv:.2e} (tolerance {tol:.0e})")
                    ok = False
            print(f"gradients and parameters of {len(grads)} tensors checked: {'equal within tolerance' if ok else 'DIFFERENT'}")
    return ok


def precision_options(device: str, shape: tuple[int, int, int, int]) -> bool:
    """bf16 autocast and channels_last against fp32, in local PyTorch (logits and gradients)."""
    dev = torch.device(device)
    x = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32)).to(dev)
    reference = LocalStep("full", dev).model
    direction = torch.randn((shape[0], 1000), generator=torch.Generator().manual_seed(0)).to(dev)

    def run(model: torch.nn.Module, inp: torch.Tensor, autocast: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        model.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(inp)
        # A fixed random output gradient: the tutorial's sum gives all-ones, whose gradient mostly
        # cancels in train-mode BatchNorm and leaves rounding noise to compare.
        out.float().backward(gradient=direction)
        params = dict(model.named_parameters())
        fc, conv1 = params["fc.weight"].grad, params["conv1.weight"].grad
        assert fc is not None and conv1 is not None
        return out.detach().float().cpu().numpy(), fc.float().cpu().numpy(), conv1.float().cpu().numpy()

    base = run(reference, x, False)
    ok = True
    for name, tol, autocast, channels_last in (
        ("bf16 autocast", BF16_TOLERANCE, True, False),
        ("channels_last", CHANNELS_LAST_TOLERANCE, False, True),
    ):
        model = LocalStep("full", dev).model
        inp = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last)
        out, fc, conv1 = run(model, inp, autocast)
        d_out, d_fc, d_conv1 = relative_l2(out, base[0]), relative_l2(fc, base[1]), relative_l2(conv1, base[2])
        verdict = "within" if max(d_out, d_fc) <= tol else "OVER"
        # The first layer's gradient passes back through 17 BatchNorm layers, which amplify rounding
        # when batches are small: reported, not checked.
        print(f"{name}: relative L2 error against fp32: logits {d_out:.2e}, fc gradient {d_fc:.2e} "
              f"({verdict} {tol:.0e}); conv1 gradient {d_conv1:.2e} (reported only)")
        ok &= max(d_out, d_fc) <= tol
    return ok


def session_fast_paths(device: str, shape: tuple[int, int, int, int], pin_memory: bool = False) -> bool:
    """Sessions that choose autocast or channels_last in CreateSession, on a server whose default is
    fp32, against local PyTorch on the same fast path: logits and fc gradient checked, conv1's
    gradient reported (as in ``precision_options``); and the fast path measurably not fp32."""
    dev = torch.device(device)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    direction = torch.randn((shape[0], 1000), generator=torch.Generator().manual_seed(0))
    types = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def local(autocast: str, channels_last: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        model = LocalStep("full", dev).model
        inp = torch.from_numpy(x).to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=types.get(autocast, torch.float32), enabled=autocast in types):
            out = model(inp)
        out.backward(gradient=direction.to(dev, out.dtype))
        params = dict(model.named_parameters())
        fc, conv1 = params["fc.weight"].grad, params["conv1.weight"].grad
        assert fc is not None and conv1 is not None
        return out.detach().float().cpu().numpy(), fc.float().cpu().numpy(), conv1.float().cpu().numpy()

    fp32 = local("off", False)
    ok = True
    with start_server(device, 4, pin_memory=pin_memory) as server, TrainerClient(server.target, timeout=600) as client:
        for autocast, memory_format in (("bf16", "contiguous"), ("fp16", "contiguous"), ("off", "channels_last")):
            with client.create_session("random", seed=0, autocast=autocast, memory_format=memory_format) as session:  # type: ignore[arg-type]
                info = session.info()
                assert (info.autocast, info.memory_format) == (autocast, memory_format), info
                logits = session.forward(x).logits
                session.backward(output_gradient=direction.numpy())
                grads = session.gradients("fc.weight", "conv1.weight")
                fc, conv1 = grads["fc.weight"].array, grads["conv1.weight"].array
                assert logits is not None and fc is not None and conv1 is not None
            expected = local(autocast, memory_format == "channels_last")
            tol = FAST_PATH_TOLERANCE[dev.type][autocast]
            d_out, d_fc, d_conv1 = relative(logits, expected[0]), relative(fc, expected[1]), relative(conv1, expected[2])
            from_fp32 = relative_l2(logits, fp32[0])
            took_effect = autocast == "off" or from_fp32 > 1e-4
            verdict = "within" if max(d_out, d_fc) <= tol and took_effect else "OVER" if took_effect else "NOT APPLIED"
            print(f"session autocast={autocast} memory_format={memory_format}: against local on the same path: "
                  f"logits {d_out:.2e}, fc gradient {d_fc:.2e} ({verdict} {tol:.0e}), conv1 gradient {d_conv1:.2e} "
                  f"(reported only); logits against fp32 {from_fp32:.2e} (relative L2)")
            ok &= max(d_out, d_fc) <= tol and took_effect
    return ok


def issue21_paths(device: str, shape: tuple[int, int, int, int], pin_memory: bool = False) -> bool:
    """Issue 21's paths on ``device``: uint8 images through a session with the ImageNet input transform
    against local ``ToTensor()`` + ``Normalize()`` on the same device (logits and every gradient,
    within TOLERANCE); and a session's shared-memory region (the input, the gradients and the
    parameters through it) against the same session's gRPC path: equal bit for bit."""
    dev = torch.device(device)
    tol = TOLERANCE[dev.type]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.random((shape[0], 1000), dtype=np.float32)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    local = LocalStep("full", dev).model
    x = (torch.from_numpy(pixels).to(dev).float() / 255 - mean) / std  # ToTensor() then Normalize()
    expected_logits = local(x)
    (expected_logits - torch.from_numpy(labels).to(dev)).sum().backward()
    ok = True
    with start_server(device, 4, pin_memory=pin_memory) as server, TrainerClient(server.target, timeout=600) as client:
        with client.create_session("random", seed=0, input_transform="imagenet") as session:
            logits = session.forward(pixels).logits
            session.backward("sum", labels)
            grads = session.gradients()
            assert logits is not None
            worst = relative(logits, expected_logits.detach().cpu().numpy())
            for name, p in local.named_parameters():
                g = grads[name].array
                assert p.grad is not None and g is not None
                worst = max(worst, relative(g, p.grad.cpu().numpy()))
            print(f"uint8 images, input_transform=imagenet: logits and {len(grads)} gradients against local "
                  f"ToTensor()+Normalize() differ by at most {worst:.2e} (tolerance {tol:.0e})")
            ok &= worst <= tol
        x32 = rng.random(shape, dtype=np.float32)
        answers = {}
        for shared in (False, True):
            with client.create_session("random", seed=0, shared_memory=shared) as session:
                logits = session.forward(x32).logits
                session.backward("sum", labels)
                answers[shared] = (logits, session.gradients(), session.parameters())
        (l0, g0, p0), (l1, g1, p1) = answers[False], answers[True]
        assert l0 is not None and l1 is not None
        same = bool(np.array_equal(l0, l1)) and g0.keys() == g1.keys() and p0.keys() == p1.keys()
        same &= all(np.array_equal(g0[n].array, g1[n].array) for n in g0)  # type: ignore[arg-type]
        same &= all(np.array_equal(p0[n].array, p1[n].array) for n in p0)  # type: ignore[arg-type]
        print(f"shared memory: input, {len(g1)} gradients and {len(p1)} parameters through the region "
              f"{'equal' if same else 'DIFFER FROM'} the gRPC path bit for bit")
        ok &= same
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.equivalence", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pin-memory", action="store_true", help="the server with --pin-memory 1 (CUDA only)")
    args = parser.parse_args(argv)
    shape = (args.batch, 3, args.size, args.size)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}; torch {torch.__version__}")
    ok = server_vs_local(args.device, args.steps, shape, args.pin_memory)
    ok &= session_fast_paths(args.device, shape, args.pin_memory)
    ok &= precision_options(args.device, shape)
    ok &= issue21_paths(args.device, shape, args.pin_memory)
    print("equivalence: PASS" if ok else "equivalence: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
