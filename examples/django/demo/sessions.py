"""Django's cache session store, except that a cache failure is not a logout.

Django's stock store (django.contrib.sessions.backends.cache) catches every
exception raised while reading a session and carries on with an empty one
(Django ticket #17810, for keys memcached refuses): when dynacache answers
SERVER_ERROR because DynamoDB is unreachable, the user is logged out and the
session cookie deleted, with nothing in the logs. This store lets such an
error through, so the request fails with HTTP 500 and a logged traceback,
and the session is there again once DynamoDB answers.

    SESSION_ENGINE = "demo.sessions"
"""

from django.contrib.sessions.backends import cache
from django.core.cache.backends.base import InvalidCacheKey
from pymemcache.exceptions import MemcacheIllegalInputError

# A cookie that cannot be a memcached key is no session, as in Django.
_NOT_A_KEY = (InvalidCacheKey, MemcacheIllegalInputError)


class SessionStore(cache.SessionStore):
    def load(self):
        try:
            data = self._cache.get(self.cache_key)
        except _NOT_A_KEY:
            data = None
        return self._loaded(data)

    async def aload(self):
        try:
            data = await self._cache.aget(await self.acache_key())
        except _NOT_A_KEY:
            data = None
        return self._loaded(data)

    def _loaded(self, data):
        if data is not None:
            return data
        self._session_key = None
        return {}
