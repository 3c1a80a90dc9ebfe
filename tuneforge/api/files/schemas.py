"""Wire models of the files API (contract section 1), with Together's PascalCase keys where it has them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.api.bodies import RequestBody

Purpose = Literal["fine-tune", "calibration", "eval", "batch-api"]
FileType = Literal["jsonl", "parquet", "csv"]
PURPOSES: tuple[str, ...] = ("fine-tune", "calibration", "eval", "batch-api")
FILE_TYPES: tuple[str, ...] = ("jsonl", "parquet", "csv")


class FilePublic(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    file_type: str = Field(serialization_alias="FileType")
    processed: bool = Field(serialization_alias="Processed")
    purpose: str
    processing_status: str | None = None
    validation_report: dict[str, Any] | None = None
    line_count: int | None = Field(default=None, serialization_alias="LineCount")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class MultipartInitiate(RequestBody):
    file_name: str
    file_size: int
    num_parts: int
    purpose: str = "fine-tune"
    file_type: str
    checksum: str


class MultipartPartURL(BaseModel):
    PartNumber: int
    URL: str
    Headers: dict[str, str] = Field(default_factory=dict)


class MultipartInitiated(BaseModel):
    upload_id: str
    file_id: str
    parts: list[MultipartPartURL]


class CompletedPart(RequestBody):
    part_number: int
    etag: str


class MultipartComplete(RequestBody):
    upload_id: str
    file_id: str
    parts: list[CompletedPart]


class MultipartAbort(RequestBody):
    upload_id: str
    file_id: str
