"""exp, exp2 and sigmoid in plain float32 arithmetic, so CPU kernels keep them in vectors.

LLVM lowers a vector `exp` to one scalar libm call per lane (no vector math library is linked
here), which turns a vectorized SiLU or softmax back into a serial loop. These build 2**n for
n = round(x) (in base 2) in the exponent bits and multiply by a degree-7 Taylor polynomial of
the remainder (|r| <= ln 2 / 2: its error, < 1e-8 relative, is below float32's resolution), in
operations LLVM keeps in AVX-512 lanes.
"""

import math

from relaxlm.tvm_api import T, tirx

_LOG2E = math.log2(math.e)
# ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact in float32 for the n that occur here, so
# x - n ln 2 keeps float32 accuracy where one rounded product would lose |x| * 2**-24.
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_MIN_EXP2 = -126.0  # below: 0 (what would be a denormal is flushed)
_MAX_EXP2 = 127.0


def widest_lanes(n: int, widths=(16, 8, 4, 2, 1)) -> int:
    """The widest vector of `widths` (16 float32 lanes: one AVX-512 register) that divides n;
    0 if none does."""
    return next((w for w in widths if n % w == 0), 0)


def _horner(coefficients: list[float], x: tirx.Expr) -> tirx.Expr:
    poly = T.float32(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        poly = poly * x + T.float32(c)
    return poly


def _times_power_of_two(value: tirx.Expr, n: tirx.Expr) -> tirx.Expr:
    """value * 2**n for integral float n in [-126, 127], built in the exponent bits."""
    return value * T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))


def exp2(x: tirx.Expr) -> tirx.Expr:
    """2**x for float32 x: to float32 accuracy on [-126, 127], 0 below, 2**127 above."""
    clamped = T.min(T.max(x, T.float32(_MIN_EXP2)), T.float32(_MAX_EXP2))
    n = T.floor(clamped + T.float32(0.5))
    # 2**f = e**(f ln 2) for |f| <= 1/2, Taylor to degree 7
    poly = _horner([math.log(2) ** i / math.factorial(i) for i in range(8)], clamped - n)
    return T.Select(x < T.float32(_MIN_EXP2), T.float32(0), _times_power_of_two(poly, n))


def exp(x: tirx.Expr) -> tirx.Expr:
    """e**x for float32 x, to float32 accuracy; 0 below e**-87.3 (2**-126), at most 2**127."""
    lowest, highest = _MIN_EXP2 / _LOG2E, _MAX_EXP2 / _LOG2E
    clamped = T.min(T.max(x, T.float32(lowest)), T.float32(highest))
    n = T.floor(clamped * T.float32(_LOG2E) + T.float32(0.5))
    r = clamped - n * T.float32(_LN2_HI) - n * T.float32(_LN2_LO)  # |r| <= ln 2 / 2
    poly = _horner([1 / math.factorial(i) for i in range(8)], r)
    return T.Select(x < T.float32(lowest), T.float32(0), _times_power_of_two(poly, n))


def sigmoid(x: tirx.Expr) -> tirx.Expr:
    return T.float32(1) / (T.float32(1) + exp(-x))
