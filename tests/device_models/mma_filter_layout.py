"""A lane-level model of mma_filter_kernel (csrc/search/topk_mma_cuda.cuh): its cp.async staging, ldmatrix
addresses, fragment use and epilogue indexing, with ldmatrix and mma.sync m16n8k16 as the PTX ISA lays
out their fragments (see the kernel's header comment). Checks that every (query, row) score is computed
exactly once and equals Q_tile @ X_tile^T. Run by tests/test_device_models.py
(NumPy only; no GPU). Keep it in step with the kernel when its tiling changes."""
import numpy as np
rng = np.random.default_rng(0)
ROWS, STEP, LD = 128, 32, 40
D = 72  # not a multiple of 32: the last step is zero-padded
Qt = rng.standard_normal((ROWS, D)).astype(np.float32)
Xt = rng.standard_normal((ROWS, D)).astype(np.float32)

def ldmatrix_x4(smem, addr_of_lane):
    # lane L gives the row address of matrix L // 8, row L % 8; thread t gets (row t//4, cols 2(t%4), +1)
    regs = [[None] * 4 for _ in range(32)]
    rows = {}
    for L in range(32):
        r, c = addr_of_lane(L)
        rows[(L // 8, L % 8)] = smem[r, c:c + 8]
    for t in range(32):
        for m in range(4):
            row = rows[(m, t // 4)]
            regs[t][m] = (row[2 * (t % 4)], row[2 * (t % 4) + 1])
    return regs

def mma(acc, a, b):
    # acc[t] = [c0..c3]; a[t] = 4 pairs; b[t] = 2 pairs
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for t in range(32):
        g, t4 = t // 4, t % 4
        for reg, (r, c) in enumerate([(g, 2 * t4), (g + 8, 2 * t4), (g, 2 * t4 + 8), (g + 8, 2 * t4 + 8)]):
            A[r, c], A[r, c + 1] = a[t][reg]
        for reg, k in enumerate([2 * t4, 2 * t4 + 8]):
            B[k, g], B[k + 1, g] = b[t][reg]
    C = A @ B
    for t in range(32):
        g, t4 = t // 4, t % 4
        acc[t][0] += C[g, 2 * t4]; acc[t][1] += C[g, 2 * t4 + 1]
        acc[t][2] += C[g + 8, 2 * t4]; acc[t][3] += C[g + 8, 2 * t4 + 1]

out = np.full((ROWS, ROWS), np.nan)
for warp in range(8):
    warp_q, warp_n = warp >> 2, warp & 3
    acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(4)] for _ in range(4)]  # [mi][ni][lane][e]
    for s in range((D + STEP - 1) // STEP):
        d0 = s * STEP
        qs = np.zeros((ROWS, LD)); xs = np.zeros((ROWS, LD))
        for c in range(ROWS * STEP // 8):  # load_stage
            r, col = c >> 2, (c & 3) * 8
            if d0 + col < D:
                qs[r, col:col + 8] = Qt[r, d0 + col:d0 + col + 8]
                xs[r, col:col + 8] = Xt[r, d0 + col:d0 + col + 8]
        for kk in (0, 16):
            a = [ldmatrix_x4(qs, lambda L, mi=mi: (warp_q * 64 + mi * 16 + (L & 15), kk + (L >> 4) * 8)) for mi in range(4)]
            b = [None] * 4
            for nj in range(2):
                r = ldmatrix_x4(xs, lambda L, nj=nj: (warp_n * 32 + nj * 16 + (L & 7) + ((L >> 4) << 3), kk + ((L >> 3) & 1) * 8))
                b[2 * nj] = [(r[t][0], r[t][1]) for t in range(32)]
                b[2 * nj + 1] = [(r[t][2], r[t][3]) for t in range(32)]
            for mi in range(4):
                for ni in range(4):
                    mma(acc[mi][ni], a[mi], b[ni])
    for lane in range(32):  # epilogue indexing
        g, t4 = lane >> 2, lane & 3
        for mi in range(4):
            for h in range(2):
                r = warp_q * 64 + mi * 16 + g + h * 8
                for ni in range(4):
                    for e in range(2):
                        n = warp_n * 32 + ni * 8 + t4 * 2 + e
                        assert np.isnan(out[r, n])
                        out[r, n] = acc[mi][ni][lane][h * 2 + e]
np.testing.assert_allclose(out, Qt @ Xt.T, rtol=1e-5, atol=1e-4)
print("mma model: every (query, row) score computed once and correct")
