"""One owner of plate scales: no module but ``infer/_weights.py`` computes a subsampling factor.

A plate's subsampling factor ``N / B`` (``full_size / size``) decides whether a minibatch bound is
unbiased; it is computed in one place and every other module asks ``_weights`` for it (issue 9).
"""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pyro_vi_ext"
OWNER = PACKAGE / "infer" / "_weights.py"
# N / B written out: a full size divided by a size, or by a batch length
FACTOR = re.compile(
    r"full_size\s*\)?\s*(?<!/)/(?!/)"
    r"|(?<!/)/(?!/)\s*\(?\s*\w*\.?(size|batch_size|subsample_size)\b"
    r"|(?<!/)/(?!/)\s*len\(\s*idx"
)
STRING = re.compile(r"\"[^\"]*\"|'[^']*'")


def _code_lines(path: Path):
    in_docstring = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_docstring or stripped.startswith('"""'):
            if quotes % 2 == 1:
                in_docstring = not in_docstring
            continue
        code = STRING.sub('""', line).split("#", 1)[0]
        yield number, code


def test_only_weights_computes_a_plate_subsampling_factor():
    """Grep the package: the pattern of N / B appears in ``_weights.py`` alone."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {code.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != OWNER
        for number, code in _code_lines(path)
        if FACTOR.search(code)
    ]
    assert not offenders, "plate scale computed outside infer/_weights.py:\n" + "\n".join(offenders)


def test_the_pattern_finds_the_factors_in_weights():
    """The grep is not vacuous: it finds the factors ``_weights.py`` does compute."""
    found = [code for _, code in _code_lines(OWNER) if FACTOR.search(code)]
    assert len(found) >= 2
