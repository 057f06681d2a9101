"""SequenceLayout: validation, segment arithmetic, hashing."""

import pytest
import torch

from visattn.ops import SequenceLayout


def test_segments_text_end_and_start():
    lay = SequenceLayout((2, 3, 5), text_len=7)
    assert lay.video_grid == (2, 3, 5) and lay.num_video == 30 and lay.seq_len == 37
    assert lay.video_slice == slice(0, 30) and lay.text_slice == slice(30, 37)
    lay = SequenceLayout((3, 5), text_len=7, text_position="start")
    assert lay.video_grid == (1, 3, 5)
    assert lay.video_slice == slice(7, 22) and lay.text_slice == slice(0, 7)
    assert lay.num_video_blocks(4) == 4 and lay.num_text_blocks(4) == 2


def test_valid_text_int_tensor_none():
    assert SequenceLayout((4,), text_len=5).valid_text(2).tolist() == [5, 5]
    assert SequenceLayout((4,), text_len=5, text_valid_len=3).valid_text(2).tolist() == [3, 3]
    lay = SequenceLayout((4,), text_len=5, text_valid_len=torch.tensor([9, -1, 2]))
    assert lay.valid_text(3).tolist() == [5, 0, 2]
    with pytest.raises(ValueError, match="text_valid_len"):
        lay.valid_text(2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(video_grid=(0, 2, 2)), "video_grid"),
        (dict(video_grid=5), "video_grid"),
        (dict(video_grid=(1, 2, 3, 4)), "video_grid"),
        (dict(video_grid=(2, 2), text_len=-1), "text_len"),
        (dict(video_grid=(2, 2), text_position="middle"), "text_position"),
        (dict(video_grid=(2, 2), text_len=3, text_valid_len=4), "text_valid_len"),
        (dict(video_grid=(2, 2), text_len=3, text_valid_len=torch.ones(2, 2, dtype=torch.int32)), "text_valid_len"),
        (dict(video_grid=(2, 2), text_len=3, text_valid_len=torch.ones(2)), "text_valid_len"),
    ],
)
def test_bad_input_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SequenceLayout(**kwargs)


def test_hashable_and_length_check():
    a, b = SequenceLayout((2, 4, 4), 3), SequenceLayout((2, 4, 4), 3)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    t = torch.tensor([1])
    assert SequenceLayout((2,), 3, text_valid_len=t) != SequenceLayout((2,), 3, text_valid_len=torch.tensor([1]))
    assert a.replace(text_len=0).seq_len == 32
    a.check_length(35)
    with pytest.raises(ValueError, match="seq_layout"):
        a.check_length(34)
