import pytest
import torch

from qlora import data


def test_clean_markdown_unmarks_play_text():
    md = "# Play\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be_that_ is  \n\n\n\nthe question"
    assert data.clean_markdown(md) == (
        "Play\n\nACT I\n\nEnter HAMLET\n\nHAMLET\nTo be, or not to be_that_ is\n\nthe question\n"
    )


def test_pack_drops_the_tail():
    blocks = data.pack(list(range(10)), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="shorter than one block of seq_len 16"):
        data.pack(list(range(10)), 16)


def test_batches_are_seeded_and_cover_every_block():
    blocks = torch.arange(12).view(6, 2)
    a, b = data.batches(blocks, 2, seed=1), data.batches(blocks, 2, seed=1)
    first = [next(a) for _ in range(3)]
    assert all(torch.equal(x, next(b)) for x in first)
    seen = torch.cat(first).flatten().sort().values
    assert torch.equal(seen, torch.arange(12))


def test_byte_tokenizer_round_trips():
    tok = data.ByteTokenizer()
    assert tok.decode(tok.encode("Wherefore art thou — Romeo?")) == "Wherefore art thou — Romeo?"
    assert max(tok.encode("ÿ")) < 256


def test_shakespeare_holds_out_hamlet():
    train, held = data.shakespeare("train"), data.shakespeare("heldout")
    assert "To be, or not to be" in held and "To be, or not to be" not in train
    assert "**" not in train and len(train) > 4_000_000
