"""Independent reference for the project's two e4m3 row roundings: the FP8 selection scores
(src/model/fp8_scores.rs) and the MoE's FP8 dispatch (src/model/dispatch.rs).

Writes tests/fixtures/fp8_scores.json: rows x [R, 128] f32, their rotation by the normalised
Hadamard matrix (Sylvester's recursion, computed in float64 and rounded once to f32), and those
rotated rows rounded to e4m3 with one power-of-two scale per row (the smallest power of two s
with amax / s <= 448, found with math.frexp in float64; the e4m3 rounding is ml_dtypes'
float8_e4m3fn cast, round to nearest even); and x rounded as the dispatch rounds it (scale =
f32(max(amax, 2^-100) / 448), q = f32(x / scale) clamped to +-448, e4m3, back = f32(e4m3 scale),
numpy's float32 divisions and products being correctly rounded). Values are stored as their f32
bit patterns.

    python tools/parity/make_fp8_scores_fixture.py     (needs numpy and ml_dtypes)
"""

import json
import math
import os

import ml_dtypes
import numpy as np


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def pow2_scale(amax: float) -> float:
    v = max(amax, 2.0**-100) / 448.0
    m, e = math.frexp(v)  # v = m 2^e, m in [0.5, 1)
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def main() -> None:
    rng = np.random.default_rng(20261208)
    rows, di = 24, 128
    x = rng.standard_normal((rows, di)).astype(np.float32)
    x *= (2.0 ** (np.arange(rows) % 9 * 4 - 16)).astype(np.float32)[:, None]
    x[0] = 0.0  # an all-zero row
    y = (x.astype(np.float64) @ hadamard(di)).astype(np.float32)
    # A row whose amax is exactly 448 2^-3 and one just above it (the scale doubles there).
    y[1, 5] = 56.0
    y[2, 9] = np.nextafter(np.float32(56.0), np.float32(100.0))
    back = np.empty_like(y)
    for r in range(rows):
        scale = pow2_scale(float(np.abs(y[r]).max()))
        q = (y[r].astype(np.float64) / scale).astype(np.float32)  # exact: a power of two
        codes = q.astype(ml_dtypes.float8_e4m3fn)
        back[r] = (codes.astype(np.float64) * scale).astype(np.float32)
    dispatch = np.empty_like(x)
    for r in range(rows):
        amax = np.float32(np.abs(x[r]).max())
        scale = np.float32(np.maximum(amax, np.float32(2.0**-100)) / np.float32(448.0))
        q = np.clip(x[r] / scale, np.float32(-448.0), np.float32(448.0))
        codes = q.astype(ml_dtypes.float8_e4m3fn)
        dispatch[r] = codes.astype(np.float32) * scale
    bits = lambda a: [int(v) for v in a.view(np.uint32).ravel()]
    out = {
        "about": "tools/parity/make_fp8_scores_fixture.py: x, its Hadamard rotation y, y rounded to e4m3 rows with power-of-two scales (f32 bits)",
        "rows": rows,
        "cols": di,
        "x": bits(x),
        "y": bits(y),
        "rounded": bits(back),
        "dispatch": bits(dispatch),
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "tests", "fixtures", "fp8_scores.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
