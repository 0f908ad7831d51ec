from django.contrib.auth.decorators import login_required
from django.http import HttpResponse


@login_required
def home(request):
    """Reads the session, changes nothing."""
    count = request.session.get("count", 0)
    return HttpResponse(f"user={request.user.username} count={count}\n", content_type="text/plain")


@login_required
def count(request):
    """Increments a counter kept in the session (so the session is saved)."""
    request.session["count"] = request.session.get("count", 0) + 1
    return HttpResponse(f"count={request.session['count']}\n", content_type="text/plain")
