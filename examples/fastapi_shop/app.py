"""A FastAPI shop: orders written with an async SQLAlchemy session, the event
published in the same transaction (``publish_async``), and the outbox's worker run
by the application's lifespan (``run_async``). The database comes from
``SHOP_DATABASE_URL`` (default: ``sqlite:///shop.db``).

Run it with ``uvicorn app:app`` from this directory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outboxer import Outbox

outbox = Outbox(os.environ.get("SHOP_DATABASE_URL", "sqlite:///shop.db"))
outbox.register_event("order.placed", service="billing")

metadata = MetaData()
orders = Table(
    "orders", metadata, Column("id", Integer, primary_key=True), Column("total", Integer)
)
invoices = Table(
    "invoices", metadata, Column("id", Integer, primary_key=True), Column("order_id", Integer)
)


@outbox.handler("order.placed")
def create_invoice(event: Any, tx: Session) -> None:
    # Runs in the transaction that marks the event consumed: both commit, or neither.
    tx.execute(insert(invoices).values(order_id=event.payload["id"]))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await outbox.migrate_async()
    async with outbox.db.async_engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    worker = asyncio.create_task(outbox.run_async())
    try:
        yield
    finally:
        outbox.stop()
        await worker
        await outbox.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/orders", status_code=201)
async def place_order(total: int = 10) -> dict[str, int]:
    async with AsyncSession(outbox.db.async_engine) as session, session.begin():
        order_id = (
            await session.execute(insert(orders).values(total=total).returning(orders.c.id))
        ).scalar_one()
        await outbox.publish_async(
            session, "order.placed", {"id": order_id}, key=f"order-{order_id}"
        )
    return {"id": order_id}


@app.get("/invoices")
async def count_invoices() -> dict[str, int]:
    async with AsyncSession(outbox.db.async_engine) as session:
        count = (await session.execute(select(func.count()).select_from(invoices))).scalar_one()
    return {"invoices": count}
