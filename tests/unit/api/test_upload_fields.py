"""The fields that open an upload are checked together, and each problem is named."""

import pytest

from tuneforge.api.files.service import check_upload_fields
from tuneforge.errors import InvalidRequestError

SHA = "a" * 64


def test_good_fields_normalise_the_checksum():
    assert (
        check_upload_fields(purpose="fine-tune", file_name="t.jsonl", file_type="jsonl", checksum="A" * 64) == "a" * 64
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"purpose": "fine_tune"}, "purpose 'fine_tune' is not one of"),
        ({"file_type": "txt", "file_name": "a.txt"}, "file_type 'txt' is not one of"),
        ({"file_name": "../etc/passwd.jsonl"}, "without path separators"),
        ({"file_name": "dir\\x.jsonl"}, "without path separators"),
        ({"file_name": ""}, "file_name is empty"),
        ({"file_name": "data.parquet"}, "does not end in .jsonl"),
        ({"checksum": "abc"}, "SHA-256 as 64 hex"),
        ({"file_type": "csv", "file_name": "a.csv"}, "CSV files are accepted only for purpose 'eval'"),
        ({"file_type": "parquet", "file_name": "a.parquet", "purpose": "eval"}, "not accepted for purpose 'eval'"),
    ],
)
def test_bad_fields(fields, expected):
    args = {"purpose": "fine-tune", "file_name": "t.jsonl", "file_type": "jsonl", "checksum": SHA} | fields
    with pytest.raises(InvalidRequestError, match=expected):
        check_upload_fields(**args)


def test_all_problems_are_reported_at_once():
    with pytest.raises(InvalidRequestError) as info:
        check_upload_fields(purpose="x", file_name="a/b", file_type="y", checksum="z")
    msg = info.value.message
    assert "purpose" in msg and "file_type" in msg and "path separators" in msg and "SHA-256" in msg
