"""The control-plane application: `create_app(settings)` wires the store, the blobs and the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from tuneforge import __version__
from tuneforge.api.body_limit import BodyLimit
from tuneforge.api.endpoints import router as endpoints
from tuneforge.api.endpoints.service import make_resolver
from tuneforge.api.errors import install_error_handlers
from tuneforge.api.files import router as files
from tuneforge.api.files.processing import FileProcessor
from tuneforge.api.files.service import direct_idle_s, sweep_stale_uploads, sweep_while_serving
from tuneforge.api.fine_tunes import router as fine_tunes
from tuneforge.api.hardware import router as hardware
from tuneforge.api.identity import router as identity
from tuneforge.api.inference import router as inference
from tuneforge.api.inference.service import ProxyCache
from tuneforge.api.models import router as models
from tuneforge.api.responses import complete_schema
from tuneforge.catalog import background
from tuneforge.catalog.registry import Catalog
from tuneforge.endpoints.supervisor import EndpointSupervisor
from tuneforge.jobs.executors.registry import make_executor
from tuneforge.jobs.worker import Worker
from tuneforge.serve import hardware as host_hardware
from tuneforge.serve.pool import ModelServerPool
from tuneforge.settings import Settings
from tuneforge.storage import open_blob_store
from tuneforge.store import open_database
from tuneforge.store.sealing import home_key

log = logging.getLogger("tuneforge.api")


def _upload_secret(settings: Settings) -> bytes:
    """The key that signs upload URLs: the setting, or a random one kept in the home folder."""
    if settings.upload_secret:
        return settings.upload_secret.encode()
    path = settings.home / "upload_secret"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip().encode()


def create_app(settings: Settings) -> FastAPI:
    settings.ensure_home()
    db = open_database(settings.database_url, secrets_key=home_key(settings.home, settings.secrets_key),
                       pool_size=settings.database_pool_size)  # fmt: skip
    blobs = open_blob_store(settings.storage_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        swept = sweep_stale_uploads(db, blobs, idle_s=settings.stale_upload_s, direct_idle_s=direct_idle_s(settings))
        requeued = app.state.processor.requeue_unfinished()
        if swept or requeued:
            log.info("start-up: %d stale uploads removed, %d file checks requeued", swept, requeued)
        # Uploads left idle are swept while the server runs too, not only at the next start.
        sweeper = asyncio.create_task(
            sweep_while_serving(db, blobs, idle_s=settings.stale_upload_s, direct_idle_s=direct_idle_s(settings))
        )
        if app.state.worker is not None:
            app.state.worker.start()
        app.state.pool.start()
        app.state.endpoints.start()  # endpoints that were live come back
        yield
        app.state.endpoints.shutdown()
        app.state.pool.shutdown()  # model servers end with the server that started them
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper  # a sweep under way ends first: it uses the database closed below
        if app.state.worker is not None:
            app.state.worker.stop()
        app.state.processor.shutdown()
        background.stop_all()  # a conversion cut short leaves nothing: it writes aside and renames when done
        db.close()

    app = FastAPI(
        title="tuneforge",
        version=__version__,
        description="Self-hosted LLM fine-tuning, wire-compatible with the Together AI API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.blobs = blobs
    app.state.upload_secret = _upload_secret(settings)
    app.state.catalog = Catalog(blobs, hosted=settings.hosted_catalog)
    app.state.processor = FileProcessor(db, blobs, settings)
    app.state.pool = ModelServerPool(settings)
    app.state.proxy_cache = ProxyCache()
    app.state.hardware = host_hardware.probe  # probed on first use, once per process
    app.state.endpoint_resolver = make_resolver(db, app.state.catalog, blobs, settings)
    app.state.endpoints = EndpointSupervisor(
        db, app.state.pool, settings, app.state.endpoint_resolver, hardware_options=lambda: app.state.hardware()
    )
    app.state.worker = (
        Worker(db, blobs, settings, make_executor(settings.executor, settings), slots=settings.train_slots)
        if settings.run_worker
        else None
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    v1 = APIRouter(prefix="/v1")
    v1.include_router(files.router)
    v1.include_router(identity.router)
    v1.include_router(fine_tunes.router)
    v1.include_router(fine_tunes.downloads)
    v1.include_router(models.router)
    v1.include_router(inference.router)
    v1.include_router(hardware.router)
    v1.include_router(endpoints.router)
    app.include_router(v1)
    app.include_router(identity.router_v3, prefix="/v3")
    app.include_router(files.uploads)
    app.include_router(fine_tunes.signed)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    complete_schema(app)

    return app
