"""Server-side dataset checks: each finalised file is validated in a worker thread, never trusting the client.

QUEUED -> RUNNING -> COMPLETED | INVALID_FORMAT (or FAILED when the check itself broke). Files left
QUEUED or RUNNING by a stopped server are queued again at start-up.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from tuneforge.data import validate_stream
from tuneforge.errors import NotFoundError
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store import files as repo
from tuneforge.store.files import FileProcessingStatus
from tuneforge.store.tables import FileRow

log = logging.getLogger("tuneforge.files")


class FileProcessor:
    """Runs `data.validate_stream` on stored files and records the verdict on the file row."""

    def __init__(self, db: Database, blobs: BlobStore, settings: Settings) -> None:
        self._db = db
        self._blobs = blobs
        self._settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.validation_workers, thread_name_prefix="validate")

    def submit(self, file_id: str) -> Future[None]:
        return self._pool.submit(self._run, file_id)

    def requeue_unfinished(self) -> int:
        with self._db.session() as s:
            unfinished = (FileProcessingStatus.QUEUED, FileProcessingStatus.RUNNING)
            ids = [r.id for r in repo.files_with_processing(s, statuses=unfinished)]
            for file_id in ids:
                repo.set_processing(s, file_id=file_id, status=FileProcessingStatus.QUEUED)
        for file_id in ids:
            self.submit(file_id)
        return len(ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, file_id: str) -> None:
        try:
            with self._db.session() as s:
                row = s.get(FileRow, file_id)
                if row is None or row.state != "ready":
                    return
                file_type, purpose = row.file_type, row.purpose
                repo.set_processing(s, file_id=file_id, status=FileProcessingStatus.RUNNING)
            from tuneforge.api.files.service import blob_key

            with self._blobs.open(blob_key(file_id)) as stream:
                report = validate_stream(
                    stream,
                    filetype=file_type,
                    purpose=purpose,
                    max_errors=self._settings.max_report_errors,
                    max_line_bytes=self._settings.max_line_bytes,
                )
            wire = report.to_wire(file_id)
            status = FileProcessingStatus.COMPLETED if report.valid else FileProcessingStatus.INVALID_FORMAT
            with self._db.session() as s:
                repo.set_processing(s, file_id=file_id, status=status, report=wire)
        except NotFoundError:
            log.info("file %s was deleted before its check finished", file_id)
        except Exception as exc:
            log.exception("validation of %s failed", file_id)
            # `error`/`error_type` are kept for dataset problems (the SDK types error_type as
            # "INVALID_FORMAT" only); a broken check says why in its own key.
            wire = {
                "valid": False,
                "file_id": file_id,
                "processing_error": f"the server could not check this file: {type(exc).__name__}: {exc}",
            }
            with self._db.session() as s:
                repo.set_processing(s, file_id=file_id, status=FileProcessingStatus.FAILED, report=wire)
