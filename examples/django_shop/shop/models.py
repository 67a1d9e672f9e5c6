from django.db import models


class Order(models.Model):
    total = models.IntegerField()


class Invoice(models.Model):
    # No unique constraint on purpose: exactly-once comes from outboxer, and a test
    # counts invoices per order to prove it.
    order_id = models.BigIntegerField()
