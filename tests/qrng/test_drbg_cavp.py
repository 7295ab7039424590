"""SP 800-90A DRBGs against the NIST CAVP vectors (CAVS 14.3, drbgtestvectors.zip) in
``tests/vectors/nist-cavp-drbg/{no_reseed,pr_false,pr_true}``.

Every vector of a supported mechanism runs; 3KeyTDEA CTR_DRBG is the only section not
applicable (TDEA is not implemented, by design) and is counted as skipped.
"""

from __future__ import annotations

import pytest

from qrng.drbg import HASHES, CtrDrbg, Drbg, HashDrbg, HmacDrbg
from tests.vectors import CavpCase, read_cavp, vector_file

MODES = ("no_reseed", "pr_false", "pr_true")
MECHANISMS = ("HMAC_DRBG", "Hash_DRBG", "CTR_DRBG")


def make_drbg(mechanism: str, section: dict[str, str]) -> Drbg | None:
    """The DRBG a section describes, or None when it is not applicable (TDEA)."""
    if mechanism == "CTR_DRBG":
        name = next(k for k in section if k.endswith(" df"))
        cipher, df = name.rsplit(" ", 2)[0], name.endswith("use df")
        if not cipher.startswith("AES-"):
            return None
        return CtrDrbg(int(cipher[4:]), use_df=df)
    hash_name = next(k for k in section if k in HASHES)
    return HmacDrbg(hash_name) if mechanism == "HMAC_DRBG" else HashDrbg(hash_name)


def run_case(mode: str, drbg: Drbg, case: CavpCase) -> bytes:
    """Drive one vector as the CAVP Readme describes; return the second generate's output."""
    n = int(case.section["ReturnedBitsLen"]) // 8
    drbg.instantiate(case.get("EntropyInput"), case.get("Nonce"), case.get("PersonalizationString"))
    additional = case.all("AdditionalInput")
    if mode == "pr_false":
        drbg.reseed(case.get("EntropyInputReseed"), case.get("AdditionalInputReseed"))
    out = b""
    for i in range(2):
        if mode == "pr_true":  # prediction resistance: reseed(entropy_PR, additional), then no AI
            drbg.reseed(case.all("EntropyInputPR")[i], additional[i])
            out = drbg.generate(n)
        else:
            out = drbg.generate(n, additional[i])
    drbg.uninstantiate()
    return out


def load(mode: str, mechanism: str) -> list[CavpCase]:
    return read_cavp(vector_file(f"nist-cavp-drbg/{mode}/{mechanism}.rsp"))


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str], tuple[int, list[str], int]]:
    """(mode, mechanism) -> (passed, failures, not applicable), computed once."""
    results = {}
    for mode in MODES:
        for mechanism in MECHANISMS:
            passed, failures, skipped = 0, [], 0
            for case in load(mode, mechanism):
                drbg = make_drbg(mechanism, case.section)
                if drbg is None:
                    skipped += 1
                elif run_case(mode, drbg, case) == case.get("ReturnedBits"):
                    passed += 1
                else:
                    failures.append(f"{drbg.name} {case.section}")
            results[(mode, mechanism)] = (passed, failures, skipped)
    return results


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("mode", MODES)
def test_cavp_vectors(outcomes, mode, mechanism):
    passed, failures, _ = outcomes[(mode, mechanism)]
    assert not failures, failures[:3]
    assert passed > 0


def test_cavp_totals(outcomes, capsys):
    """All applicable vectors across the three folders, reported as one line per folder."""
    with capsys.disabled():
        print()
        for (mode, mechanism), (passed, failures, skipped) in outcomes.items():
            print(
                f"CAVP {mode}/{mechanism}: {passed} passed, {len(failures)} failed"
                + (f", {skipped} not applicable (3KeyTDEA)" if skipped else "")
            )
    total = sum(p for p, _, _ in outcomes.values())
    assert total == 14400 and not any(f for _, f, _ in outcomes.values())
