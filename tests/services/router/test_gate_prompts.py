"""The gate's prompt domains and the resumable scoring cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.router.gate_data import BATCH, JobCache, run_job
from services.router.gate_prompts import DOMAINS, GateItem, domain_items


def test_every_domain_has_items_and_paired_domains_share_no_text() -> None:
    items = domain_items(20, 64)
    assert tuple(items) == DOMAINS and len(DOMAINS) >= 6
    for d, got in items.items():
        assert len(got) >= 20, d
        assert {i.domain for i in got} == {d}
        assert all(i.split in ("train", "heldout", "test") for i in got)
    assert all(i.chat for d in DOMAINS if d.startswith("chat-") for i in items[d])
    # A quote's head / a gloss must not also appear as a raw item of the paired domain.
    raw_fortunes = " ".join(i.prompt for i in items["fortunes"])
    for q in items["chat-quote"]:
        head = q.prompt.split("\n\n", 1)[1].removesuffix(" ...")
        assert head not in raw_fortunes
    glosses = {i.continuation for i in items["chat-define"]}
    assert not any(g in i.prompt for i in items["wordnet"] for g in glosses)


def test_sources_never_read_man_pages_or_other_dictionaries() -> None:
    import services.router.gate_prompts as gp

    src = Path(gp.__file__).read_text()
    for banned in ("/usr/share/man", "/usr/share/dict", "dictd", "/usr/share/info"):
        assert banned not in src


def test_run_job_resumes_from_cached_batches_and_honours_the_deadline(tmp_path: Path) -> None:
    items = [GateItem("d", "train", f"p{i}", "c") for i in range(3 * BATCH)]
    order = np.arange(len(items))[::-1]
    calls: list[int] = []

    def fn(batch):
        calls.append(len(batch))
        return np.array([float(b.prompt[1:]) for b in batch])

    cache = JobCache(tmp_path / "job")
    # Deadline already past: nothing is scored.
    run_job("t", fn, items, cache, order, deadline=-1.0, log=lambda _: None)
    assert calls == [] and np.isnan(cache.collect(len(items), ())).all()
    # Score one batch by hand, then a full run only does the other two.
    cache.put(0, order[:BATCH], fn([items[i] for i in order[:BATCH]]))
    calls.clear()
    run_job("t", fn, items, cache, order, deadline=float("inf"), log=lambda _: None)
    assert calls == [BATCH, BATCH]
    np.testing.assert_array_equal(cache.collect(len(items), ()), np.arange(len(items)))
