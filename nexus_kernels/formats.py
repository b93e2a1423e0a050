"""Low-precision floating-point formats as data: E4M3, E5M2, E2M1 (elements) and E8M0 (MX scales).

The numbers follow the OCP 8-bit Floating Point spec (OFP8, v1.0) and the OCP Microscaling
Formats spec (MX, v1.0):

=====  ====  ====  ====  ==========  =============  ====  ==================================
name   exp   man   bias  max normal  min subnormal  inf   NaN codes
=====  ====  ====  ====  ==========  =============  ====  ==================================
e4m3   4     3     7     448         2**-9          no    S.1111.111 (0x7F, 0xFF)
e5m2   5     2     15    57344       2**-16         yes   S.11111.{01,10,11}; inf S.11111.00
e2m1   2     1     1     6           0.5            no    none: values {0,.5,1,1.5,2,3,4,6}
e8m0   8     0     127   2**127      2**-127        no    0xFF; unsigned, powers of two only
=====  ====  ====  ====  ==========  =============  ====  ==================================

E4M3 is the "fn" variant (finite, NaN only at all-ones), as ``torch.float8_e4m3fn``.

Example::

    >>> get_format("e4m3").max_normal
    448.0
"""
from __future__ import annotations

import dataclasses

__all__ = ["FloatFormat", "E4M3", "E5M2", "E2M1", "E8M0", "FORMATS", "get_format"]


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A small binary floating-point format.

    ``name``: lower-case id; ``exp_bits``/``man_bits``: field widths; ``bias``: exponent bias;
    ``max_normal``/``min_subnormal``/``min_normal``: largest finite, smallest positive and smallest
    normal magnitude; ``emin``/``emax``: unbiased exponents of ``min_normal``/``max_normal``;
    ``max_code``: code of +max_normal; ``signed``: has a sign bit above the exponent;
    ``has_inf``/``inf_code``: +inf code if any; ``nan_code``: the +NaN code a cast writes, if any.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_normal: float
    min_subnormal: float
    min_normal: float
    emin: int
    emax: int
    max_code: int
    signed: bool = True
    has_inf: bool = False
    inf_code: int | None = None
    nan_code: int | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"name must be a non-empty lower-case string, got {self.name!r}")
        if not 1 <= self.exp_bits <= 8:
            raise ValueError(f"exp_bits must be in 1..8, got {self.exp_bits}")
        if not 0 <= self.man_bits <= 7:
            raise ValueError(f"man_bits must be in 0..7, got {self.man_bits}")
        if self.bits > 8:
            raise ValueError(f"exp_bits + man_bits + sign must fit a byte, got {self.bits} bits")
        if self.max_normal != (1 + (self.max_code & ((1 << self.man_bits) - 1)) / (1 << self.man_bits)) * 2.0 ** self.emax:
            raise ValueError(f"max_normal={self.max_normal} does not match max_code={self.max_code:#x} and emax={self.emax}")
        if self.min_normal != 2.0 ** self.emin:
            raise ValueError(f"min_normal={self.min_normal} is not 2**emin=2**{self.emin}")
        if not 0 < self.min_subnormal <= self.min_normal:
            raise ValueError(f"min_subnormal={self.min_subnormal} must be in (0, min_normal]")
        if self.has_inf != (self.inf_code is not None):
            raise ValueError(f"has_inf={self.has_inf} but inf_code={self.inf_code}")

    @property
    def bits(self) -> int:
        """Total width in bits (sign + exponent + mantissa)."""
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def sign_bit(self) -> int:
        """Mask of the sign bit in a code (0 for unsigned formats)."""
        return (1 << (self.exp_bits + self.man_bits)) if self.signed else 0


E4M3 = FloatFormat(name="e4m3", exp_bits=4, man_bits=3, bias=7, max_normal=448.0, min_subnormal=2.0**-9,
                   min_normal=2.0**-6, emin=-6, emax=8, max_code=0x7E, nan_code=0x7F)
E5M2 = FloatFormat(name="e5m2", exp_bits=5, man_bits=2, bias=15, max_normal=57344.0, min_subnormal=2.0**-16,
                   min_normal=2.0**-14, emin=-14, emax=15, max_code=0x7B, has_inf=True, inf_code=0x7C,
                   nan_code=0x7F)
E2M1 = FloatFormat(name="e2m1", exp_bits=2, man_bits=1, bias=1, max_normal=6.0, min_subnormal=0.5,
                   min_normal=1.0, emin=0, emax=2, max_code=0x7)
E8M0 = FloatFormat(name="e8m0", exp_bits=8, man_bits=0, bias=127, max_normal=2.0**127, min_subnormal=2.0**-127,
                   min_normal=2.0**-127, emin=-127, emax=127, max_code=0xFE, signed=False, nan_code=0xFF)

FORMATS: dict[str, FloatFormat] = {f.name: f for f in (E4M3, E5M2, E2M1, E8M0)}


def get_format(name_or_format: str | FloatFormat) -> FloatFormat:
    """Return the ``FloatFormat`` for ``"e4m3"``, ``"e5m2"``, ``"e2m1"``, ``"e8m0"`` (any case) or a format.

    >>> get_format("E5M2") is E5M2
    True
    """
    if isinstance(name_or_format, FloatFormat):
        return name_or_format
    if isinstance(name_or_format, str):
        fmt = FORMATS.get(name_or_format.lower())
        if fmt is not None:
            return fmt
        raise ValueError(f"unknown float format {name_or_format!r}; expected one of {', '.join(FORMATS)}")
    raise TypeError(f"format must be a name or a FloatFormat, got {type(name_or_format).__name__}")
