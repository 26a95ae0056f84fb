"""The relay's outgoing HTTP session: a `requests.Session` that reads the environment once per host, not per request.

`requests` looks at the environment on every request (`Session.merge_environment_settings`: the proxy variables,
`no_proxy`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`), and `urllib.request.getproxies_environment` walks every
variable of the environment twice to find them: measured in the pipeline bench, about a tenth of the worker's
CPU per job went there (three requests per job: Kling's create and the copy's task read, the download). The result
only depends on the URL's scheme and host, the session's own settings and those few variables, so it is kept per
(scheme, host, settings, the variables' values): a change of any of them (a test's `monkeypatch.setenv`, say) is
seen at the next request, as with plain `requests`. One difference: `requests` also honours a variable spelt in
mixed case (`Http_Proxy`); only the lower- and upper-case spellings are looked at here.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

import requests

#: Every variable `requests` reads for an http(s) URL (urllib's proxy lookup, CGI's REQUEST_METHOD guard included).
ENV_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
             "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "REQUEST_METHOD")
MAX_CACHED = 256


class Session(requests.Session):
    """A `requests.Session` whose environment settings are computed once per host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._env_cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def merge_environment_settings(self, url: str | bytes | None, proxies: MutableMapping[str, str] | None,
                                   stream: Any, verify: Any, cert: Any) -> Any:
        if not self.trust_env or proxies or not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, repr(stream), repr(verify), repr(cert), repr(self.stream),
               repr(self.verify), repr(self.cert), repr(sorted(self.proxies.items())),
               tuple(os.environ.get(name) for name in ENV_NAMES))
        found = self._env_cache.get(key)
        if found is None:
            if len(self._env_cache) >= MAX_CACHED:
                self._env_cache.clear()
            found = self._env_cache[key] = dict(super().merge_environment_settings(url, proxies, stream, verify,
                                                                                   cert))
        return {**found, "proxies": dict(found["proxies"])}
