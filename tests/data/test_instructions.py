from tandem.data.instructions import load_instructions


def test_prompts_are_deterministic_prefix_stable_and_disjoint():
    a = load_instructions("train", 60)
    assert [x.prompt for x in a[:30]] == [x.prompt for x in load_instructions("train", 30)]
    assert {x.source.split("-")[0] for x in a} == {"fortunes", "wordnet", "stdlib"}
    train = frozenset(x.prompt for x in load_instructions("train", 600))
    held = load_instructions("heldout", 60, exclude=train)
    assert len(held) == 60 and not train & {x.prompt for x in held}
    assert all(len(x.prompt) < 700 for x in a)
