"""The objects table's pure checks (``pipeline/ingest/objects.py``) on hand-built input.

Each test states its expected answer by hand (or from an independent pandas / bytes
oracle): the cut of the CSV into line blocks, the row checks and their first reason, the
bbox rule at its edges, the repeated-object key, the selection codes and the rejects
table's columns. Found by hand mutation: each of these mutants survived the rest of the
suite.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SelectConfig
from pipeline.ingest.objects import (
    _line_blocks,
    check_rows,
    first_of_each_key,
    key_hashes,
    rejects_frame,
    selection_codes,
    valid_bboxes,
)

# ----------------------------------------------------------------------------- line blocks


def lines_file(tmp_path, data: bytes):
    path = tmp_path / "objects.csv"
    path.write_bytes(data)
    return path


CSV_BYTES = b"".join(
    [b"h1,h2\n"]
    + [b"row%d,%s\n" % (i, b"x" * (i * 7 % 23)) for i in range(60)]
    + [b"long," + b"y" * 300 + b"\n"]  # one line longer than the small blocks
    + [b"row%d,z\n" % i for i in range(60, 90)]
)


@pytest.mark.parametrize("terminated", [True, False])
@pytest.mark.parametrize("block_bytes", [1, 16, 97, 1000, 1 << 20])
def test_line_blocks_cut_the_file_at_line_breaks_without_losing_a_byte(
    tmp_path, block_bytes, terminated
):
    data = CSV_BYTES if terminated else CSV_BYTES[:-1]  # last line without its break
    blocks = list(_line_blocks(lines_file(tmp_path, data), block_bytes))
    assert b"".join(blocks) == data  # every byte once, in order
    assert all(blocks)  # no empty block
    assert all(block.endswith(b"\n") for block in blocks[:-1])
    assert blocks[-1].endswith(b"\n") == terminated
    # Each block is whole lines: it starts where a line starts.
    starts = {0} | {i + 1 for i, byte in enumerate(data) if byte == ord("\n")}
    offsets = np.cumsum([0] + [len(b) for b in blocks[:-1]])
    assert set(offsets.tolist()) <= starts


def test_line_blocks_are_about_block_bytes_long(tmp_path):
    # Blocks of ~1,000 bytes over lines of at most 40 bytes: every block but the last
    # two (the short read at the end of the file, and what is left after it) holds at
    # least block_bytes - longest line bytes; cutting at the first line break instead
    # of the last would give one line per block (and hold the rest of the file).
    data = b"".join(b"row%d,%s\n" % (i, b"x" * (i % 30)) for i in range(2000))
    longest = max(len(line) + 1 for line in data.split(b"\n"))
    blocks = list(_line_blocks(lines_file(tmp_path, data), 1000))
    assert b"".join(blocks) == data
    assert all(len(b) >= 1000 - longest for b in blocks[:-2])
    assert len(blocks) <= len(data) // (1000 - longest) + 2


@pytest.mark.parametrize("block_bytes", [1, 16, 1000])
def test_line_blocks_of_a_byte_range_are_exactly_its_bytes(tmp_path, block_bytes):
    # Ranges that start and end at line starts (as csv_partitions cuts them).
    path = lines_file(tmp_path, CSV_BYTES)
    starts = [0] + [i + 1 for i, byte in enumerate(CSV_BYTES) if byte == ord("\n")]
    for start, end in [(starts[3], starts[40]), (starts[60], starts[62]), (starts[80], None),
                       (0, starts[1]), (starts[5], starts[5])]:  # fmt: skip
        blocks = list(_line_blocks(path, block_bytes, start, end))
        assert b"".join(blocks) == CSV_BYTES[start:end]
        assert all(block.endswith(b"\n") for block in blocks)


def test_line_blocks_of_an_empty_file(tmp_path):
    assert list(_line_blocks(lines_file(tmp_path, b""), 10)) == []


# ----------------------------------------------------------------------------- row checks


def raw_rows(rows: list[dict]) -> pd.DataFrame:
    """A raw CSV table (every value text) from partial rows over a good default row."""
    good = {"username": "u", "image_name": "img", "score": "0.5", "idx": "0",
            "bbox": "[0, 0, 1, 1]", "tag": "shoe"}  # fmt: skip
    return pd.DataFrame([{**good, **row} for row in rows], dtype=object)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({}, ""),
        ({"idx": "0"}, ""),  # idx 0 is the first object of an image
        ({"idx": "3.0"}, ""),  # an integer written as a float
        ({"idx": str(2**53 - 1)}, ""),  # the largest idx that survives the float parse
        ({"idx": str(2**53)}, "bad_idx"),
        ({"idx": "1.5"}, "bad_idx"),
        ({"idx": "-1"}, "bad_idx"),
        ({"idx": "abc"}, "bad_idx"),
        ({"username": "   "}, "missing_key"),  # blank is missing
        ({"username": ""}, "missing_key"),
        ({"image_name": ""}, "missing_key"),
        ({"image_name": " \t"}, "missing_key"),
        ({"score": "inf"}, "bad_score"),
        ({"score": "-inf"}, "bad_score"),
        ({"score": "nan"}, "bad_score"),
        ({"score": "high"}, "bad_score"),
        ({"bbox": "[3, 0, 1, 1]"}, "bad_bbox"),
        ({"bbox": "[0, 0, 1e999, 1]"}, "bad_bbox"),  # an infinite coordinate
    ],
)
def test_each_row_check_by_hand(row, reason):
    typed, reasons, details = check_rows(raw_rows([row]), on_bad_bbox="reject")
    assert reasons.tolist() == [reason]
    assert (details.iloc[0] == "") == (reason == "")
    if reason == "":
        assert typed["idx"].iloc[0] == int(float(row.get("idx", "0")))
    else:  # the detail names the column it found bad, and its value
        column = {"missing_key": next(iter(row), ""), "bad_idx": "idx", "bad_score": "score",
                  "bad_bbox": "bbox"}[reason]  # fmt: skip
        assert details.iloc[0].startswith(column) and repr(row[column]) in details.iloc[0]


def test_the_first_failed_check_gives_the_reason():
    # Checks run in the order key, score, idx, bbox: a row failing several keeps the first.
    rows = [
        {"username": "", "score": "nan", "idx": "-1", "bbox": "x"},
        {"score": "nan", "idx": "-1", "bbox": "x"},
        {"idx": "-1", "bbox": "x"},
        {"bbox": "x"},
        {"image_name": "", "idx": "0.5"},
    ]
    _, reasons, details = check_rows(raw_rows(rows), on_bad_bbox="reject")
    assert reasons.tolist() == ["missing_key", "bad_score", "bad_idx", "bad_bbox", "missing_key"]
    assert details.iloc[0].startswith("username") and details.iloc[4].startswith("image_name")
    assert details.iloc[1].startswith("score") and details.iloc[2].startswith("idx")


def test_a_kept_bad_bbox_is_flagged_not_rejected():
    typed, reasons, _ = check_rows(raw_rows([{}, {"bbox": "[1, 2]"}]), on_bad_bbox="keep")
    assert reasons.tolist() == ["", ""]
    assert typed["bbox_ok"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("[0, 0, 1e308, 1]", True),
        ("[0, 0, 1e999, 1]", False),  # overflows to inf: not a finite box
        ("[-1e999, 0, 1, 1]", False),
        ("[0, 5, 0, 5]", True),  # zero width and height
        ("[0, 5, 1, 4]", False),  # y2 < y1
        ("[2, 0, 1, 3]", False),  # x2 < x1, though y2 >= x1
    ],
)
def test_bbox_edges_by_hand(text, ok):
    assert valid_bboxes(pd.Series([text, "[0, 0, 1, 1]"])).tolist() == [ok, True]


# ----------------------------------------------------------------------------- keys


def test_first_of_each_key_keeps_the_key_parts_apart():
    # ("a", "bc") and ("ab", "c") join to the same text without a separator.
    frame = pd.DataFrame(
        {
            "username": ["a", "ab", "a", "ab"],
            "image_name": ["bc", "c", "bc", "c"],
            "idx": [0, 0, 0, 1],
        }  # fmt: skip
    )
    assert first_of_each_key(frame).tolist() == [0, 1, 0, 3]


def test_first_of_each_key_equals_a_pandas_groupby():
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "username": rng.choice(["u", "v", "uv", ""], n),
            "image_name": rng.choice(["x", "vx", "y"], n),
            "idx": rng.integers(0, 3, n),
        }
    )
    expected = (
        frame.reset_index().groupby(["username", "image_name", "idx"])["index"].transform("min")
    )
    np.testing.assert_array_equal(first_of_each_key(frame), expected.to_numpy())


def test_key_hashes_follow_the_key_not_the_row_position():
    a = pd.DataFrame({"username": ["u", "v"], "image_name": ["x", "y"], "idx": [0, 1]})
    b = a.iloc[::-1].set_axis([10, 11])  # the same keys, other positions and index
    np.testing.assert_array_equal(key_hashes(a), key_hashes(b)[::-1])
    assert key_hashes(a)[0] != key_hashes(a)[1]


# ----------------------------------------------------------------------------- selection


def typed_rows(tags: list[str], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"tag": tags, "score": scores})


def test_selection_codes_by_hand():
    typed = typed_rows(
        ["shoe", "bag", "bag", "hat", "hat", "shoe"], [0.5, 0.9, 0.1, 0.5, 0.49, 0.1]
    )
    select = SelectConfig(exclude_tags=["bag"], min_score=0.5)
    # A score equal to min_score is selected; a row with an excluded tag *and* a low
    # score is reported by its tag (the tag test comes first).
    assert selection_codes(typed, select).tolist() == [0, 1, 1, 0, 2, 2]
    both = SelectConfig(tags=["shoe", "bag"], exclude_tags=["bag"], min_score=0.0)
    assert selection_codes(typed, both).tolist() == [0, 1, 1, 1, 1, 0]
    assert selection_codes(typed, SelectConfig()).tolist() == [0] * 6


# ----------------------------------------------------------------------------- rejects


def test_rejects_frame_takes_each_column_from_its_own_column():
    rows = pd.DataFrame(
        {
            "username": ["u0", "u1", "u2"],
            "image_name": ["i0", "i1", "i2"],
            "idx": ["0", "7", "x"],
            "score": ["1", "2", "3"],
        },  # fmt: skip
        index=[5, 6, 7],
    )
    out = rejects_frame(
        pd.Series([50, 60, 70], index=[5, 6, 7]), rows,
        np.array(["", "bad_score", "bad_idx"], dtype=object),
        np.array(["", "d1", "d2"], dtype=object),
    )  # fmt: skip
    assert out.to_dict("list") == {
        "source_row": [60, 70], "reason": ["bad_score", "bad_idx"], "username": ["u1", "u2"],
        "image_name": ["i1", "i2"], "idx": ["7", "x"], "detail": ["d1", "d2"],
    }  # fmt: skip
