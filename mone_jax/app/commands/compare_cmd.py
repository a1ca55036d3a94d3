"""``mone-jax compare``: one calibration, every metric x ratio x mode judged on validation data."""

from __future__ import annotations


def run(args) -> None:
    from mone_jax.app.compare_job import run_compare

    res = run_compare(args)
    t = res["timing"]
    n = len(res["plans"])
    print(f"{n} plan{'s' * (n != 1)} judged on {', '.join(res['sources'])} in {t['total']:.1f} s (calibration "
          f"{t['calibration']:.1f} s, compilation {t['compile']:.1f} s, {t['forward_per_plan']:.2f} s per plan); "
          f"wrote {', '.join(res['written'].values())}")
