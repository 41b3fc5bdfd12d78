"""Compression Z (eq. 11 of the STTP paper) of every table row, from the architectures.

    python benchmarks/sttp_paper_z.py            # the tables, paper value beside ours
    python benchmarks/sttp_paper_z.py --wrn      # also WideResNet-28-10 over ranks (Fig. 7)

Each network is built on the ``meta`` device (no memory, no data), converted with
:func:`ttmanifold.nn.convert_model` (default, i.e. the reference tensorization and rank
rule; ``init="orthogonal"`` since counting needs no weights) and measured with
:func:`ttmanifold.nn.compression_z`. The settings follow the paper's configurations:
"-C" is the identity spectrum, "-L" the normalized (``"lipschitz"``) one, "-R" the same
with the D-optimal penalty (same Z as "-L"); generators keep ``noise_to_conv`` dense and
count BatchNorm statistics. The paper prints Z truncated, not rounded (53.358 -> 53.3).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sttp_paper_models import SNGANDiscriminator, SNGANGenerator, WideResNet  # noqa: E402

from ttmanifold.nn import compression_z, convert_model  # noqa: E402


class Row(NamedTuple):
    table: str
    label: str
    z: float
    paper: Optional[str]  # as printed in the paper

    def truncated(self) -> Optional[str]:
        """Our Z truncated to the digits the paper prints."""
        if self.paper is None:
            return None
        k = len(self.paper.split(".")[1]) if "." in self.paper else 0
        return f"{math.floor(self.z * 10 ** k) / 10 ** k:.{k}f}"


_SPECTRUM = {"C": "identity", "L": "lipschitz", "R": "lipschitz"}


#: tensorization scheme of the STTP layers (``--tensorization``)
SCHEME = "reference"


def z_of(model, rank: int, method: str, setting: str, ignore=(), count_buffers=False) -> float:
    """Z (percent) of ``model`` after conversion of every Linear/Conv2d (``ignore`` kept
    dense) with ``method`` at ``rank`` in the paper's ``setting`` ("C", "L", "R")."""
    kw = dict(tensorization=SCHEME) if method == "sttp" else {}
    report = convert_model(model, rank, method=method, ignore=ignore, init="orthogonal",
                           spectrum=_SPECTRUM[setting], kinds=("linear", "conv2d"), **kw)
    extra = set(report.skipped) - set(ignore)
    if extra:
        raise RuntimeError(f"layers left dense: {report.skipped}")
    return compression_z(model, count_buffers=count_buffers)


def paper_rows() -> List[Row]:
    """Every Z the paper reports for the GAN tables, with our value."""
    rows = []
    D = lambda size, ndf=None: SNGANDiscriminator(size, ndf=ndf, device="meta")  # noqa: E731
    G = lambda size: SNGANGenerator(size, device="meta")  # noqa: E731
    # Table 1: reduced discriminators (ndf 32 on CIFAR, 64 on STL), rank 64
    for ds, size, ndf, items in (("CIFAR-10", 32, 32, [("SVDP", "C", "93.1"),
                                                         ("STTP", "C", "87.7")]),
                                 ("STL-10", 48, 64, [("SVDP", "C", None),
                                                     ("STTP", "C", "74.1")])):
        for m, s, paper in items:
            rows.append(Row("Table 1", f"{ds} D(ndf={ndf}) {m}-{s} r64",
                            z_of(D(size, ndf), 64, m.lower(), s), paper))
    # Table 2: full discriminators, rank 64
    t2 = {"CIFAR-10": (32, {"SVDP-C": "51.7", "STTP-C": "16.7", "SVDP-L": "53.3",
                            "STTP-L": "18.3", "SVDP-R": "53.3", "STTP-R": "18.3"}),
          "STL-10": (48, {"SVDP-C": None, "STTP-C": "3.24", "SVDP-L": None, "STTP-L": "3.51",
                          "SVDP-R": None, "STTP-R": "3.51"})}
    for ds, (size, items) in t2.items():
        for key, paper in items.items():
            m, s = key.split("-")
            rows.append(Row("Table 2", f"{ds} D {key} r64", z_of(D(size), 64, m.lower(), s),
                            paper))
    # Table 3: rank sweeps on CIFAR-10 (discriminator; generator without noise_to_conv)
    for r in (16, 32, 64, 128):
        rows.append(Row("Table 3", f"CIFAR-10 D STTP-R r{r}", z_of(D(32), r, "sttp", "R"),
                        "6.44" if r == 32 else None))
    for r in (16, 32, 64, 128):
        rows.append(Row("Table 3", f"CIFAR-10 G STTP-R r{r}",
                        z_of(G(32), r, "sttp", "R", ignore=("noise_to_conv",),
                             count_buffers=True), "18.82" if r == 64 else None))
        rows.append(Row("Table 3", f"CIFAR-10 G SVDP-R r{r}",
                        z_of(G(32), r, "svdp", "R", ignore=("noise_to_conv",),
                             count_buffers=True), None))
    return rows


def wrn_rows() -> List[Row]:
    """WideResNet-28-10 on CIFAR-10 (Fig. 7): Z over ranks, BatchNorm statistics counted."""
    rows = []
    for m, ranks in (("sttp", (8, 16, 32, 64, 128, 256)), ("svdp", (4, 8, 16, 32, 64, 128))):
        for r in ranks:
            rows.append(Row("Fig. 7", f"WRN-28-10 {m.upper()}-R r{r}",
                            z_of(WideResNet(device="meta"), r, m, "R", count_buffers=True),
                            None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wrn", action="store_true", help="also WideResNet-28-10 (Fig. 7)")
    ap.add_argument("--tensorization", default="reference", choices=("reference", "section8"),
                    help="STTP mode scheme (section8: the paper's section 8 ordering)")
    args = ap.parse_args(argv)
    global SCHEME
    SCHEME = args.tensorization
    rows = paper_rows() + (wrn_rows() if args.wrn else [])
    print(f"{'table':8s} {'row':34s} {'Z ours %':>10s} {'truncated':>10s} {'paper':>7s}  match")
    bad = 0
    for row in rows:
        tr = row.truncated()
        ok = "" if row.paper is None else ("yes" if tr == row.paper else "NO")
        bad += ok == "NO"
        print(f"{row.table:8s} {row.label:34s} {row.z:10.4f} {tr or '':>10s} "
              f"{row.paper or '-':>7s}  {ok}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
