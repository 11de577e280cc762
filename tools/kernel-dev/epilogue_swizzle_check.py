#!/usr/bin/env python3
# Simulates the address math of epilogue_staged (src/backend/cuda/grouped_gemm_tma.cuh) for one
# consumer warpgroup (128 threads) and each chunk, f32 and bf16: every accumulator value is written
# to the staging buffer once, each 16-byte read returns the right (row, column) vector, and the bank
# conflicts of the writes (float2 per half-warp, bf16x2 per warp) and the 16-byte reads (per
# quarter-warp) are 1-way. `--swizzle plain` / `none` shows what v ^ (r % 8) / no swizzle would cost.
import sys


def swizzle(r8, kind):
    if kind == "plain":
        return r8
    if kind == "none":
        return 0
    return ((r8 & 3) << 1) | ((r8 >> 2) & 1)  # epi_swizzle


def check(elem, kind):
    chunk_cols, vec = 128 // elem, 16 // elem
    worst_w = worst_r = 0
    for ch in range(256 // chunk_cols):
        buf, writes = {}, {}
        for wtid in range(128):
            lane, warp = wtid % 32, wtid // 32
            g, q = lane // 4, lane % 4
            s = swizzle(g, kind)
            w_row = (warp * 16 + g) * 128
            w_base = w_row + ((q // 2) ^ s) * 16 + (q % 2) * 8 if elem == 4 else w_row + s * 16 + q * 4
            for half in range(2):
                for jj in range(chunk_cols // 8):
                    addr = (w_base ^ (2 * jj * 16 if elem == 4 else jj * 16)) + half * 8 * 128
                    row, col = 16 * warp + g + 8 * half, ch * chunk_cols + 8 * jj + 2 * q
                    for k in range(2):
                        a = addr + k * elem
                        assert a not in buf and 0 <= a < 8192, ("write", elem, ch, wtid)
                        buf[a] = (row, col + k)
                    writes.setdefault((warp, half, jj), []).append((addr, 2 * elem))
        assert len(buf) * elem == 8192
        for lst in writes.values():
            for grp in ([lst[:16], lst[16:]] if elem == 4 else [lst]):
                banks = {}
                for addr, nb in grp:
                    for w in range(addr // 4, (addr + nb) // 4):
                        banks.setdefault(w % 32, set()).add(w)
                worst_w = max(worst_w, max(len(v) for v in banks.values()))
        for wtid in range(128):
            r_row, r_vec = wtid // 8, wtid % 8
            for i in range(4):
                a = r_row * 128 + (r_vec ^ swizzle(r_row % 8, kind)) * 16 + i * 16 * 128
                got = [buf[a + k * elem] for k in range(vec)]
                assert got == [(r_row + 16 * i, ch * chunk_cols + r_vec * vec + k) for k in range(vec)], ("read", wtid)
        for first in range(0, 128, 8):  # quarter-warps of the reads
            for i in range(4):
                banks = {}
                for wtid in range(first, first + 8):
                    r_row, r_vec = wtid // 8, wtid % 8
                    a = r_row * 128 + (r_vec ^ swizzle(r_row % 8, kind)) * 16 + i * 16 * 128
                    for w in range(a // 4, a // 4 + 4):
                        banks.setdefault(w % 32, set()).add(w)
                worst_r = max(worst_r, max(len(v) for v in banks.values()))
    return worst_w, worst_r


if __name__ == "__main__":
    kind = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--swizzle" else "epi"
    ok = True
    for elem, name in ((4, "f32"), (2, "bf16")):
        w, r = check(elem, kind)
        print(f"{name}: every value staged once and read back at its row and column; "
              f"writes {w}-way, reads {r}-way bank conflicts")
        ok &= kind != "epi" or (w == 1 and r == 1)
    sys.exit(0 if ok else 1)
