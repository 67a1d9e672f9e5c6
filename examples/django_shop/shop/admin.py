from django.contrib import admin

from shop.models import Invoice, Order

admin.site.register(Order)
admin.site.register(Invoice)
