"""Host microseconds of the ways a step's routing can be gathered and copied to the host.

At small batches an eager decode step on a GPU is bound by the launching thread, so what capture
costs per step is the host time of its tensor calls. This times, per step, candidate ways of
packing L layers' ids ``(n, k)`` and weights plus the step's tokens, positions and validity into
one buffer and starting its copy to pinned memory, and the fixed costs around them (a forward
hook on a module, a ``torch._dynamo.disable`` wrapper). Every variant's bytes are checked against
the reference on the host.

    python bench/capture_pack_variants.py --device cuda --layers 12,58 --tokens 1,8,32,128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_step(layers: int, n: int, k: int, experts: int, wdtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = [torch.randint(0, experts, (n, k), generator=g).to(device) for _ in range(layers)]
    w = [torch.rand(n, k, generator=g).to(wdtype).to(device) for _ in range(layers)]
    tokens = torch.randint(0, 1000, (n,), generator=g).to(device)
    positions = torch.arange(n, device=device, dtype=torch.int64)
    valid = torch.ones(n, dtype=torch.int8, device=device)
    return ids, w, tokens, positions, valid


def pack_promote(ids, w, tokens, positions, valid):
    """The packing of the last release: one promoting cat to float32."""
    parts = [torch.stack(ids).reshape(-1), torch.stack(w).reshape(-1).float(), tokens, positions, valid]
    return torch.cat(parts).view(torch.uint8)


class Grouped:
    """One same-dtype stack per group into views of a device byte buffer kept per shape."""

    def __init__(self) -> None:
        self.cache: dict = {}

    def views(self, ids, w, tokens, valid):
        key = (len(ids), tuple(ids[0].shape), ids[0].dtype, w[0].dtype, tokens.dtype, valid.dtype, ids[0].device)
        got = self.cache.get(key)
        if got is None:
            L, (n, k) = len(ids), ids[0].shape
            sizes = [(L * n * k, ids[0].dtype), (L * n * k, w[0].dtype), (2 * n, tokens.dtype), (n, valid.dtype)]
            nbytes = [c * torch.empty((), dtype=d).element_size() for c, d in sizes]
            offsets = [0]
            for b in nbytes:
                offsets.append(offsets[-1] + -(-b // 8) * 8)
            buf = torch.empty(offsets[-1], dtype=torch.uint8, device=ids[0].device)
            v = [buf[o:o + b].view(d) for o, b, (c, d) in zip(offsets, nbytes, sizes)]
            got = self.cache[key] = (buf, v[0].view(L, n, k), v[1].view(L, n, k), v[2].view(2, n), v[3])
        return got

    def __call__(self, ids, w, tokens, positions, valid):
        buf, vi, vw, vt, vv = self.views(ids, w, tokens, valid)
        torch.stack(ids, out=vi)
        torch.stack(w, out=vw)
        torch.stack((tokens, positions), out=vt)
        vv.copy_(valid)
        return buf


class Foreach(Grouped):
    """Like Grouped, with ``torch._foreach_copy_`` into per-layer slot views."""

    def __call__(self, ids, w, tokens, positions, valid):
        buf, vi, vw, vt, vv = self.views(ids, w, tokens, valid)
        key = ("slots", id(buf))
        slots = self.cache.get(key)
        if slots is None:
            slots = self.cache[key] = (list(vi.unbind(0)), list(vw.unbind(0)), [vt[0], vt[1], vv])
        torch._foreach_copy_(slots[0], ids)
        torch._foreach_copy_(slots[1], w)
        slots[2][0].copy_(tokens)
        slots[2][1].copy_(positions)
        slots[2][2].copy_(valid)
        return buf


def timed(fn, args, steps: int, device: str) -> float:
    """Host µs per call, median of 5 rounds of ``steps`` calls (the device drains between rounds)."""
    rounds = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter_ns()
        for _ in range(steps):
            fn(*args)
        rounds.append((time.perf_counter_ns() - t) / steps / 1e3)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", default="12,58")
    ap.add_argument("--tokens", default="1,8,32,128")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    dev = args.device
    pinned = dev == "cuda"
    host = torch.empty(1 << 24, dtype=torch.uint8, pin_memory=pinned)

    def with_copy(pack):
        def run(*a):
            out = pack(*a)
            host[: out.numel()].copy_(out, non_blocking=True)
        return run

    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("host µs per step (median of 5 rounds); 'ok' = bytes equal to the promoting pack's values")
    for L in [int(x) for x in args.layers.split(",")]:
        for n in [int(x) for x in args.tokens.split(",")]:
            for wdtype in (torch.bfloat16, torch.float32):
                step = make_step(L, n, args.k, 256, wdtype, dev)
                ref = pack_promote(*step).cpu()
                variants = {"promote": pack_promote, "grouped": Grouped(), "foreach": Foreach()}
                row = []
                for name, pack in variants.items():
                    out = pack(*step)
                    if name != "promote":
                        ok = _same(out.cpu(), ref, step)
                        row.append(f"{name} {timed(with_copy(pack), step, args.steps, dev):7.1f}{'' if ok else ' WRONG'}")
                    else:
                        row.append(f"{name} {timed(with_copy(pack), step, args.steps, dev):7.1f}")
                print(f"L={L:3d} n={n:4d} w={str(wdtype)[6:]:9s} " + "  ".join(row))

    # fixed costs around the pack
    lin = [torch.nn.Linear(64, 64).to(dev) for _ in range(12)]
    x = torch.randn(1, 64, device=dev)

    def call_all():
        for m in lin:
            m(x)

    plain = timed(call_all, (), args.steps, dev)
    hooks = [m.register_forward_hook(lambda mod, a, o: None) for m in lin]
    hooked = timed(call_all, (), args.steps, dev)
    for h in hooks:
        h.remove()
    print(f"12 module calls: {plain:.1f} µs plain, {hooked:.1f} µs with a no-op forward hook each "
          f"({(hooked - plain) / 12:.2f} µs per hook)")
    import torch._dynamo as dynamo

    def f():
        return None

    g = dynamo.disable(f, recursive=True)
    print(f"function call: {timed(f, (), 20000, dev):.2f} µs plain, {timed(g, (), 20000, dev):.2f} µs through dynamo.disable")
    if dev == "cuda":
        print(f"torch.cuda.Event().record(): {timed(lambda: torch.cuda.Event().record(), (), 2000, dev):.2f} µs")


def _same(out: torch.Tensor, ref: torch.Tensor, step) -> bool:
    """Decode the grouped buffer and compare values with the promoting pack's float32 values."""
    ids, w, tokens, positions, valid = step
    L, (n, k) = len(ids), ids[0].shape
    r = ref.view(torch.float32)
    want_ids, want_w = r[: L * n * k], r[L * n * k: 2 * L * n * k]
    o = 0
    got_ids = out[o: o + L * n * k * 8].view(torch.int64)
    o += -(-(L * n * k * 8) // 8) * 8
    wsize = w[0].element_size()
    got_w = out[o: o + L * n * k * wsize].view(w[0].dtype).float()
    o += -(-(L * n * k * wsize) // 8) * 8
    got_tp = out[o: o + 2 * n * 8].view(torch.int64)
    return bool(torch.equal(got_ids.float(), want_ids) and torch.equal(got_w, want_w)
                and torch.equal(got_tp[:n].float(), r[2 * L * n * k: 2 * L * n * k + n]))


if __name__ == "__main__":
    main()
