import json

from django.db import transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from shop.events import outbox
from shop.models import Order


@csrf_exempt
@require_POST
def place_order(request):
    body = json.loads(request.body or b"{}")
    with transaction.atomic():
        order = Order.objects.create(total=int(body.get("total", 10)))
        outbox.publish("order.placed", {"id": order.id}, key=f"order-{order.id}")
    return JsonResponse({"id": order.id}, status=201)
