"""`make bench`'s profile of the labeling forward: the operators that take the time, as shares of the whole."""

from __future__ import annotations

from pipeline.studies.bench import format_label_profile, label_profile


def test_the_labeling_profile_names_the_operators_that_take_the_time(smoke_corpus, teacher):
    p = label_profile(smoke_corpus, teacher, clips=4, top=5)
    assert p["clips"] == 4 and len(p["ops"]) == 5 and p["total_ms"] > 0
    shares = [o["share"] for o in p["ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-9
    # the model's matmuls (linear layers, attention, the convolution) are among the heaviest operators
    assert any(k in o["op"] for o in p["ops"] for k in ("addmm", "linear", "mm", "attention", "conv"))
    assert format_label_profile(p).count("\n| `") == 5
