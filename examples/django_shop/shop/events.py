import os

from outboxer.contrib.django import DjangoOutbox
from shop.models import Invoice

outbox = DjangoOutbox()
outbox.register_event("order.placed", service="billing")


@outbox.handler("order.placed")
def create_invoice(event):
    Invoice.objects.create(order_id=event.payload["id"])
    if event.payload.get("fail") and not os.environ.get("SHOP_FIXED"):
        raise RuntimeError("the invoice service refused the order")
