import os
import time

from outboxer.contrib.django import DjangoOutbox
from shop.models import Invoice

outbox = DjangoOutbox()
outbox.register_event("order.placed", service="billing")


@outbox.handler("order.placed")
def create_invoice(event):
    Invoice.objects.create(order_id=event.payload["id"])
    # A slow invoice service, to watch the worker (and to stop it mid-run in a test).
    time.sleep(float(os.environ.get("SHOP_HANDLER_SECONDS", "0")))
