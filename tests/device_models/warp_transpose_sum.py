"""A lane-level model of warp_transpose_sum (csrc/search/topk_fused_scan_cuda.cuh): 32 lanes with V values each
exchange halves with lane ^ O for O = 16, 8, ..., 1. Checks that lane l ends with the warp totals of
entries first + j, that exactly one lane owns each entry (spare bits), and the layouts the fused scan
relies on (V = 4: lane 8 r holds row r; V = 64: lane l holds entries 2 l, 2 l + 1).
Run by tests/test_device_models.py (no GPU)."""
import random
def simulate(V):
    orig = [[random.random() for _ in range(V)] for _ in range(32)]
    v = [row[:] for row in orig]
    first = [0]*32; spare = [0]*32
    Vc, O = V, 16
    while True:
        if Vc >= 2:
            h = Vc // 2
            new = [row[:] for row in v]
            for lane in range(32):
                upper = bool(lane & O)
                for i in range(h):
                    partner = lane ^ O
                    pu = bool(partner & O)
                    send_partner = v[partner][i] if pu else v[partner][i + h]
                    keep = v[lane][i + h] if upper else v[lane][i]
                    new[lane][i] = keep + send_partner
                if upper: first[lane] += h
            v = new; Vc = h
        else:
            new = [row[:] for row in v]
            for lane in range(32):
                new[lane][0] = v[lane][0] + v[lane ^ O][0]
                spare[lane] |= lane & O
            v = new
        if O == 1: break
        O //= 2
    held = max(1, V // 32)
    totals = [sum(orig[l][e] for l in range(32)) for e in range(V)]
    owners = {}
    for lane in range(32):
        for j in range(held):
            e = first[lane] + j
            assert abs(v[lane][j] - totals[e]) < 1e-9, (V, lane, j)
            if not spare[lane]: owners[e] = owners.get(e, 0) + 1
    assert all(owners.get(e) == 1 for e in range(V)), owners
    return first
for V in (1, 2, 4, 8, 16, 32, 64, 128):
    f = simulate(V)
assert simulate(4)[:32:8] == [0, 1, 2, 3] and simulate(64)[:4] == [0, 2, 4, 6]
print("warp transpose-sum model: totals, owners and layouts as the kernel assumes")
